/*
 * sched - the delivery scheduler; see sched.h.
 *
 * Why one file of this length: a round's steps (pick, group, verdicts, notifications, the
 * conditional write and its retries, parking) all work on struct sched_delivery and the
 * scheduler's busy set; the decisions are pure functions here (sched_round_decide(),
 * sched_backoff_factor()) with their own table tests, and the I/O is in pool.c and spool/.
 *
 * Happy path: tick or kick -> spool_due() -> for each id not already busy, load the
 * envelope (not the body), re-check that it is still due, route its pending recipients.
 * When a route can take mail now the body is loaded and a round starts: the pending
 * recipients go group by group, one group per route (pool.c picks the upstream and fails
 * over), each recipient ends the round with its own verdict (struct sched_rcpt: cause,
 * reply, upstream), and after each group but the last the group's results are written (a
 * crash between groups never sends a recipient twice).  At the end of the round:
 *   sched_round_decide()   the message's new state (pure, table-tested),
 *   sched_notify_failed()  a non-delivery notification for recipients that failed,
 *   sched_notify_delayed() the one delay warning,
 *   sched_write()          one spool update holding all of it (the notifications are new
 *                          messages in the same transaction: one exists iff the other does).
 * One log line per recipient outcome, Postfix style: "ID: to=<a@b> relay=provider[host]:587
 * delay=3 tls=... status=sent (250 2.0.0 Ok: queued as 3B1F0)".
 *
 * Waiting costs nothing.  While every route is blocked (its upstreams unhealthy, paused or
 * at their rate limit) the schedule is not even scanned: due mail simply stays due.  A
 * message found due for blocked routes only is parked: its next_attempt moves (in one
 * transaction for the whole scan) to when the route opens, or SCHED_PARK_SECONDS ahead
 * when only a probe can tell; it is remembered per route in memory and woken by
 * sched_on_upstream_healthy().  Its body is never loaded for that.
 *
 * Exactly once: a message is busy (in sc->active) from its pick until every spool write of
 * its round is durable; a busy message is never picked again.  A write that fails (disk
 * full, I/O error) is retried with backoff while the message stays busy, and no new round
 * starts meanwhile (the log says why).  Writes are conditional (spool_update.if_scheduled):
 * a hold made with relayctl during the round stays; a delete makes the write a no-op, and
 * the notifications with it.  On stop, rounds waiting for the reply to their final dot get
 * [relayd] stop_grace to read it (pool.c) and their results are written.
 *
 * Failure modes of the spool: an envelope that does not decode is set aside
 * (spool_quarantine_async: held, the original bytes kept) so it never blocks the head of
 * the schedule; a body that cannot be read holds the message with the reason.
 */
#include "relayd/sched.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>

#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/bounce.h"
#include "relayd/metrics.h"
#include "relayd/pool.h"
#include "relayd/rewrite.h"
#include "relayd/route.h"
#include "relayd/smtpc.h"
#include "relayd/upstream.h"

#define SCHED_TICK_MS 1000
#define SCHED_PURGE_EVERY 60 /* seconds between looks for FAILED mail past failed_retention */
#define SCHED_PURGE_MAX 256  /* at most this many deletions per look */
#define SCHED_SCAN_MAX 256   /* due ids looked at per scan, beyond those in delivery */
#define SCHED_WARNED "delay warning sent" /* attempt-log mark: the delay DSN went out */
#define SCHED_WRITE_RETRY_MAX 60          /* seconds: cap of the write retry backoff */

/* One recipient of the message in delivery, for this round. */
struct sched_rcpt {
    const struct cfg_route *route; /* its route, found once at the pick; NULL: none */
    int in_round;                  /* it got a verdict in this round */
    enum verdict_cause cause;      /* that verdict */
    enum spool_rcpt_status status; /* its status after the round */
    char *reply;                   /* the reply or reason, owned */
    char *action;                  /* what the administrator must do, owned, or NULL */
    const struct cfg_upstream *up; /* the upstream that gave the verdict */
    int64_t when;                  /* when */
    int64_t wait_until;            /* CONFIG/SLOWDOWN: when to look again */
    const struct cfg_route *park;  /* it waits for an unhealthy upstream of this route */
    int expired;                   /* failed now because max_lifetime passed */
    char *expired_reply;           /* its reply then, owned */
    char dsn_status[16];           /* RFC 3463 code for an expired recipient */
};

enum sched_write_kind {
    SCHED_W_GROUP,      /* one group's results, before the next group */
    SCHED_W_FINAL,      /* the round's outcome, with its notifications */
    SCHED_W_HOLD,       /* no route: held */
    SCHED_W_QUARANTINE, /* the envelope does not decode: set aside */
};

struct sched_dsn {
    enum bounce_kind kind;
    struct spool_msg msg;
    struct spool_rcpt rcpt;
    char *body;
    size_t len;
};

struct sched_delivery {
    struct sched *sc;
    uint64_t id;
    struct spool_msg *msg; /* NULL for a quarantine */
    char *body;
    size_t len;
    struct sched_rcpt *rc; /* msg->nrcpts entries */
    /* The group in delivery now: the pending recipients of one route. */
    const struct cfg_route *route;
    const char **rcpts;
    size_t *rcpt_index;
    size_t nrcpts;
    unsigned *dsn_notify;
    const char **dsn_orcpt;
    struct smtpc_msg m; /* what the pool delivers; must live until its done callback */
    /* The group's rewriting (relayd/rewrite.h), owned; NULL when nothing was rewritten: */
    char *rw_sender;
    char *rw_body;
    size_t rw_len;
    char **rw_rcpts;
    char result[768]; /* attempt-log line of the last group delivered, "" when none */
    const char *result_up;
    char last_error[512];
    /* The round's outcome (sched_round_decide) and its notifications. */
    struct sched_outcome out;
    struct sched_dsn dsn[2];
    int ndsn;
    char *reason; /* SCHED_W_HOLD / SCHED_W_QUARANTINE: why */
    /* The spool write in flight, or waiting to be retried after a failure. */
    enum sched_write_kind wkind;
    int wtries;
    int64_t wretry_at;
    LIST_ENTRY(sched_delivery) active;     /* sc->active */
    SLIST_ENTRY(sched_delivery) retry_link; /* sc->retry */
};

/* Messages waiting for an unhealthy upstream of one route (memory only: after a restart
 * their next_attempt, at most SCHED_PARK_SECONDS away, is the fallback). */
struct sched_park {
    uint64_t *ids;
    size_t n, cap;
};

struct sched {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct spool *sp;
    uv_timer_t timer;
    struct pool *pool; /* sessions to the upstreams (relayd/pool.h) */
    int pool_open;     /* pools whose pool_stop() has not finished yet */
    int started_pool;  /* sc->pool was started and not yet stopped */
    /* A reload waiting to take over (sched_reconfigure()): the started pool of the new
     * configuration, the configuration, and who to tell once the old one is gone. */
    struct pool *next_pool;
    const struct cfg *next_cfg;
    struct pool *old_pool; /* being stopped after a reload took over */
    void (*reconf_done)(void *arg, int swapped);
    void *reconf_arg;
    LIST_HEAD(, sched_delivery) active; /* busy: picked, results not yet durable */
    int nactive;
    size_t own_bytes;             /* the counter when no budget is shared */
    size_t *mem_used;             /* max_memory's counter: bodies in delivery count in it */
    SLIST_HEAD(, sched_delivery) retry; /* writes that failed, to do again */
    int write_faults;             /* deliveries whose write failed and waits */
    struct sched_park *parks;     /* per route (cfg->routes[i]) */
    uint64_t *scan;               /* ids of one scan: workers + SCHED_SCAN_MAX entries */
    size_t nscan;
    int parking;                  /* a reschedule of parked mail is being written */
    int stopping;
    int timer_open;
    int64_t last_purge;
    int purging;
    uv_work_t purge_req;
    uint64_t purge_ids[SCHED_PURGE_MAX];
    size_t npurged;
    int purge_rc;
    int64_t purge_now;
    void (*stop_done)(void *arg);
    void *stop_arg;
};

static void sched_round_next(struct sched_delivery *d);
static void sched_write(struct sched_delivery *d);
static void sched_rewrite_group(struct sched_delivery *d, const struct cfg_route *route);

/* ---- Pure policy ---- */

int64_t sched_backoff_factor(int attempts, int first, int factor, int max, unsigned rnd)
{
    int64_t delay = first;
    int i;

    for (i = 1; i < attempts && delay < max && factor > 1; i++)
        delay *= factor;
    if (delay > max)
        delay = max;
    /* +-10% jitter */
    delay += (int64_t)((double)delay * (((double)(rnd % 2001) - 1000.0) / 10000.0));
    return delay < 1 ? 1 : delay;
}

int64_t sched_backoff(int attempts, int first, int max, unsigned rnd)
{
    return sched_backoff_factor(attempts, first, 2, max, rnd);
}

int64_t sched_age(int64_t now, int64_t arrived, int64_t config_wait, int64_t config_since)
{
    int64_t age = now - arrived - config_wait;

    if (config_since > 0 && now > config_since)
        age -= now - config_since;
    return age;
}

void sched_round_decide(const struct sched_round_in *in, struct sched_round_rcpt *r, size_t n,
                        struct sched_outcome *out)
{
    const struct cfg *cfg = in->cfg;
    int expired =
        sched_age(in->now, in->arrived, in->config_wait, in->config_since) >= cfg->max_lifetime;
    size_t i, pending_normal = 0, pending_wait = 0, pending_later = 0, pending_noroute = 0;
    size_t failed = 0, failed_now = 0, pending_config = 0;
    int64_t next = INT64_MAX;

    memset(out, 0, sizeof(*out));
    /* The wait in progress, if any, ends with this round. */
    out->config_wait = in->config_wait;
    if (in->config_since > 0 && in->now > in->config_since)
        out->config_wait += in->now - in->config_since;
    for (i = 0; i < n; i++) {
        struct sched_round_rcpt *x = &r[i];

        x->after = x->before;
        x->expired = 0;
        if (!x->in_round) {
            if (x->before == SPOOL_RCPT_FAILED)
                failed++;
            else if (x->before == SPOOL_RCPT_PENDING && x->routed)
                pending_later++; /* not reached: a stop came first */
            else if (x->before == SPOOL_RCPT_PENDING)
                pending_noroute++;
            continue;
        }
        switch (x->cause) {
        case VERDICT_SENT:
            x->after = SPOOL_RCPT_SENT;
            continue;
        case VERDICT_PERMANENT:
            x->after = SPOOL_RCPT_FAILED;
            break;
        case VERDICT_TRANSIENT:
        case VERDICT_SLOWDOWN:
            /* Waiting on a rate or a pause still ages: a destination that never comes back
             * must not keep mail forever.  Only the relay's own fault stops the clock. */
            x->after = SPOOL_RCPT_PENDING;
            if (expired) {
                x->after = SPOOL_RCPT_FAILED;
                x->expired = 1;
            }
            break;
        case VERDICT_CONFIG:
            x->after = SPOOL_RCPT_PENDING;
            pending_config++;
            break;
        }
        if (x->after == SPOOL_RCPT_FAILED) {
            failed++;
            failed_now++;
        } else if (x->cause == VERDICT_TRANSIENT) {
            pending_normal++;
        } else {
            pending_wait++;
            if (x->wait_until > 0 && x->wait_until < next)
                next = x->wait_until;
        }
        /* An attempt counts when an upstream judged the message (not the relay, not a
         * slow-down). */
        if (x->cause == VERDICT_PERMANENT || x->cause == VERDICT_TRANSIENT)
            out->count_attempt = 1;
    }
    if (pending_normal + pending_wait + pending_later + pending_noroute == 0) {
        out->state = failed > 0 ? SPOOL_FAILED : SPOOL_QUEUED; /* QUEUED: removed */
        out->delivered = failed == 0;
        out->expired = expired && failed_now > 0;
        return;
    }
    if (pending_normal + pending_wait + pending_later == 0) {
        out->state = SPOOL_HELD;
        out->noroute = 1;
        return;
    }
    if (pending_normal > 0) {
        int64_t t = in->now + sched_backoff_factor(in->attempts + out->count_attempt,
                                                   cfg->retry_first, cfg->retry_factor,
                                                   cfg->retry_max, in->rnd);
        next = t < next ? t : next;
    }
    if (pending_wait > 0 && next == INT64_MAX)
        next = in->now + cfg->retry_first;
    /* Only the relay's own fault holds it: the clock stops until the next round. */
    if (pending_config > 0 && pending_config == pending_normal + pending_wait + pending_later)
        out->config_since = in->now;
    if (pending_later > 0)
        next = in->now;
    out->state = SPOOL_DEFERRED;
    out->next_attempt = next;
}

/* ---- Deliveries ---- */

static int sched_busy(const struct sched *sc, uint64_t id)
{
    const struct sched_delivery *d;

    LIST_FOREACH(d, &sc->active, active)
        if (d->id == id)
            return 1;
    return 0;
}

/* The route of recipient i: sender, recipient, client address and listener all count. */
static const struct cfg_route *sched_route(const struct cfg *cfg, const struct spool_msg *msg,
                                           size_t i)
{
    return route_match(cfg, msg->sender, msg->rcpts[i].addr, msg->client, msg->listener);
}

static size_t sched_route_index(const struct sched *sc, const struct cfg_route *r)
{
    return (size_t)(r - sc->cfg->routes);
}

static struct sched_delivery *sched_delivery_new(struct sched *sc, uint64_t id,
                                                 struct spool_msg *msg)
{
    struct sched_delivery *d = xcalloc(1, sizeof(*d));
    size_t n = msg != NULL && msg->nrcpts ? msg->nrcpts : 1;

    d->sc = sc;
    d->id = id;
    d->msg = msg;
    d->rc = xcalloc(n, sizeof(*d->rc));
    d->rcpts = xcalloc(n, sizeof(*d->rcpts));
    d->rcpt_index = xcalloc(n, sizeof(*d->rcpt_index));
    d->rw_rcpts = xcalloc(n, sizeof(*d->rw_rcpts));
    d->dsn_notify = xcalloc(n, sizeof(*d->dsn_notify));
    d->dsn_orcpt = xcalloc(n, sizeof(*d->dsn_orcpt));
    for (size_t i = 0; msg != NULL && i < msg->nrcpts; i++)
        if (msg->rcpts[i].status == SPOOL_RCPT_PENDING)
            d->rc[i].route = sched_route(sc->cfg, msg, i);
    LIST_INSERT_HEAD(&sc->active, d, active);
    sc->nactive++;
    return d;
}

static void sched_maybe_stopped(struct sched *sc)
{
    if (sc->stopping && sc->nactive == 0 && !sc->timer_open && !sc->purging && !sc->pool_open &&
        sc->stop_done != NULL) {
        void (*done)(void *) = sc->stop_done;
        sc->stop_done = NULL;
        done(sc->stop_arg);
    }
}

static void sched_delivery_free(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    size_t i, n = d->msg != NULL ? d->msg->nrcpts : 0;

    LIST_REMOVE(d, active);
    sc->nactive--;
    *sc->mem_used -= d->len < *sc->mem_used ? d->len : *sc->mem_used;
    for (i = 0; i < n; i++) {
        free(d->rc[i].reply);
        free(d->rc[i].action);
        free(d->rc[i].expired_reply);
        free(d->rw_rcpts[i]);
    }
    for (i = 0; i < (size_t)d->ndsn; i++)
        free(d->dsn[i].body);
    free(d->rc);
    free(d->rw_rcpts);
    free(d->rw_sender);
    free(d->rw_body);
    free(d->reason);
    spool_msg_free(d->msg);
    free(d->body);
    free(d->rcpts);
    free(d->rcpt_index);
    free(d->dsn_notify);
    free(d->dsn_orcpt);
    free(d);
}

/* d is done with: free it and look for more work (or finish stopping). */
static void sched_delivery_end(struct sched_delivery *d)
{
    struct sched *sc = d->sc;

    sched_delivery_free(d);
    if (sc->stopping)
        sched_maybe_stopped(sc);
    else
        sched_kick(sc);
}

static void sched_rcpt_set(struct sched_rcpt *r, enum verdict_cause cause, const char *reply,
                           const char *action, const struct cfg_upstream *up, int64_t now)
{
    r->in_round = 1;
    r->cause = cause;
    free(r->reply);
    free(r->action);
    r->reply = xstrdup(reply != NULL ? reply : "");
    r->action = action != NULL && action[0] != '\0' ? xstrdup(action) : NULL;
    r->up = up;
    r->when = now;
}

/* ---- Parking: mail that waits for a blocked route costs nothing ---- */

static void sched_park_add(struct sched *sc, const struct cfg_route *route, uint64_t id)
{
    struct sched_park *pk = &sc->parks[sched_route_index(sc, route)];

    if (pk->n == pk->cap) {
        pk->cap = pk->cap ? pk->cap * 2 : 64;
        pk->ids = xrealloc(pk->ids, pk->cap * sizeof(*pk->ids));
    }
    pk->ids[pk->n++] = id;
}

static void sched_parked_written(void *arg, int rc)
{
    struct sched *sc = arg;

    sc->parking = 0;
    if (rc != 0) {
        /* The next tick tries again; no kick, or a failing disk would make this spin. */
        log_error("spool: cannot reschedule waiting mail: %s", spool_strerror(rc));
        if (sc->stopping)
            sched_maybe_stopped(sc);
        return;
    }
    if (sc->stopping)
        sched_maybe_stopped(sc);
    else
        sched_kick(sc);
}

static void sched_wake_done(void *arg, int rc)
{
    struct sched *sc = arg;

    if (rc != 0)
        log_error("spool: cannot wake mail that waited for an upstream: %s", spool_strerror(rc));
    sched_kick(sc);
}

static int route_uses(const struct cfg_route *r, const struct cfg_upstream *up)
{
    if (r->upstream == up)
        return 1;
    for (int i = 0; i < r->nfailover; i++)
        if (r->failover[i] == up)
            return 1;
    return 0;
}

/* The pool found up working again: the mail parked on routes through it is due now, in
 * one transaction (instead of at its next_attempt, up to SCHED_PARK_SECONDS away). */
static void sched_on_upstream_healthy(void *arg, const struct cfg_upstream *up)
{
    struct sched *sc = arg;
    int64_t now = (int64_t)time(NULL);
    uint64_t *ids = NULL;
    int64_t *whens;
    size_t n = 0, cap = 0;

    for (int r = 0; r < sc->cfg->nroutes; r++) {
        struct sched_park *pk = &sc->parks[r];

        if (!route_uses(&sc->cfg->routes[r], up) || pk->n == 0)
            continue;
        if (n + pk->n > cap) {
            cap = n + pk->n;
            ids = xrealloc(ids, cap * sizeof(*ids));
        }
        memcpy(ids + n, pk->ids, pk->n * sizeof(*ids));
        n += pk->n;
        pk->n = 0;
    }
    if (n > 0) {
        whens = xcalloc(n, sizeof(*whens));
        for (size_t i = 0; i < n; i++)
            whens[i] = now;
        spool_reschedule_async(sc->sp, ids, whens, n, sched_wake_done, sc);
        log_info("upstream %s: %zu waiting message%s due now", up->name, n,
                 n == 1 ? " is" : "s are");
        free(whens);
    }
    free(ids);
    sched_kick(sc);
}

/* Whether route can take mail now; else *until is when to look again and *park says
 * that only a probe can tell (every upstream of the route is unhealthy). */
static int sched_route_open(struct sched *sc, const struct cfg_route *route, int64_t now,
                            int64_t *until, int *park)
{
    uint64_t wait_ms;

    if (pool_would_accept(sc->pool, route, &wait_ms))
        return 1;
    *park = wait_ms == 0;
    *until = *park ? now + SCHED_PARK_SECONDS : now + (int64_t)((wait_ms + 999) / 1000) + rand() % 3;
    return 0;
}

/* How many routes are blocked now (0..nroutes): all of them means nothing to scan for
 * (with no route at all mail is held, so scan), none means no mail needs parking. */
static int sched_blocked_routes(struct sched *sc)
{
    int64_t until;
    int park, blocked = 0;

    for (int r = 0; r < sc->cfg->nroutes; r++)
        blocked += !sched_route_open(sc, &sc->cfg->routes[r], 0, &until, &park);
    return blocked;
}

/* ---- Writes ---- */

static void sched_write_done(void *arg, int rc);

/* The group in d is recorded; go on with the next one. */
static void sched_group_written(struct sched_delivery *d)
{
    sched_round_next(d);
}

static void sched_final_written(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    char qid[17], nid[17];

    spool_id_str(d->id, qid);
    for (int i = 0; i < d->ndsn; i++)
        log_info("%s: sender %s notification: %s", qid,
                 d->dsn[i].kind == BOUNCE_FAILED ? "non-delivery" : "delay",
                 spool_id_str(d->dsn[i].msg.id, nid));
    if (d->out.delivered)
        log_info("%s: removed", qid);
    for (size_t i = 0; i < d->msg->nrcpts; i++)
        if (d->rc[i].park != NULL && d->rc[i].status == SPOOL_RCPT_PENDING) {
            sched_park_add(sc, d->rc[i].park, d->id);
            break;
        }
    sched_delivery_end(d);
}

static void sched_write_done(void *arg, int rc)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    char qid[17];
    int delay;

    spool_id_str(d->id, qid);
    metrics_on_spool_write(rc, NULL);
    if (rc != 0 && rc != SPOOL_ENOTFOUND && !sc->stopping) {
        /* Keep the message busy: picking it again before its result is durable would
         * deliver it twice.  No new round starts while results cannot be written. */
        if (d->wtries++ == 0)
            sc->write_faults++;
        delay = d->wtries < 6 ? 1 << (d->wtries - 1) : SCHED_WRITE_RETRY_MAX;
        d->wretry_at = (int64_t)time(NULL) + delay;
        log_error("%s: could not record the delivery result: %s; trying again in %ds, no new "
                  "delivery starts until the spool can be written",
                  qid, spool_strerror(rc), delay);
        SLIST_INSERT_HEAD(&sc->retry, d, retry_link);
        return;
    }
    if (d->wtries > 0) {
        sc->write_faults--;
        if (rc == 0)
            log_info("%s: delivery result recorded after %d failed tr%s; delivery resumes", qid,
                     d->wtries, d->wtries == 1 ? "y" : "ies");
    }
    if (rc == SPOOL_ENOTFOUND) {
        /* Deleted (relayctl) while in delivery: the delete wins; nothing is bounced. */
        log_info("%s: deleted during delivery; its results are not recorded", qid);
        sched_delivery_end(d);
        return;
    }
    if (rc != 0) {
        log_error("%s: could not record the delivery result: %s; relayd is stopping, so the "
                  "message may be delivered again after the restart",
                  qid, spool_strerror(rc));
        sched_delivery_end(d);
        return;
    }
    switch (d->wkind) {
    case SCHED_W_GROUP:
        sched_group_written(d);
        break;
    case SCHED_W_FINAL:
        sched_final_written(d);
        break;
    case SCHED_W_HOLD:
    case SCHED_W_QUARANTINE:
        sched_delivery_end(d);
        break;
    }
}

/* Builds the update for d's current write (again after a failure) and submits it. */
static void sched_write(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    const struct spool_msg *msg = d->msg;
    struct spool_update u;
    struct spool_newmsg puts[2];
    size_t n = 0, i, cap = msg != NULL && msg->nrcpts ? msg->nrcpts : 1;
    size_t *idx = xcalloc(cap, sizeof(*idx));
    enum spool_rcpt_status *st = xcalloc(cap, sizeof(*st));
    const char **replies = xcalloc(cap, sizeof(*replies));

    memset(&u, 0, sizeof(u));
    u.id = d->id;
    u.if_scheduled = 1;
    switch (d->wkind) {
    case SCHED_W_QUARANTINE:
        spool_quarantine_async(sc->sp, d->id, d->reason, sched_write_done, d);
        goto out;
    case SCHED_W_HOLD:
        u.state = SPOOL_HELD;
        u.last_error = d->reason;
        break;
    case SCHED_W_GROUP:
        /* This group's recipients only; due now if we crash before the next group. */
        for (i = 0; i < d->nrcpts; i++) {
            size_t k = d->rcpt_index[i];
            if (!d->rc[k].in_round)
                continue;
            idx[n] = k;
            st[n] = d->rc[k].status;
            replies[n++] = d->rc[k].reply;
        }
        u.state = SPOOL_QUEUED;
        u.next_attempt = (int64_t)time(NULL);
        u.upstream = d->result_up;
        u.result = d->result[0] != '\0' ? d->result : NULL;
        break;
    case SCHED_W_FINAL:
        for (i = 0; i < msg->nrcpts; i++) {
            if (!d->rc[i].in_round)
                continue;
            idx[n] = i;
            st[n] = d->rc[i].status;
            replies[n++] = d->rc[i].expired ? d->rc[i].expired_reply : d->rc[i].reply;
        }
        u.state = d->out.state;
        u.next_attempt = d->out.next_attempt;
        u.count_attempt = d->out.count_attempt;
        u.set_config_wait = 1;
        u.config_wait = d->out.config_wait;
        u.config_since = d->out.config_since;
        u.upstream = d->result_up;
        u.result = d->result[0] != '\0' ? d->result : NULL;
        u.last_error = d->last_error[0] != '\0' ? d->last_error : NULL;
        for (i = 0; i < (size_t)d->ndsn; i++) {
            puts[i].msg = &d->dsn[i].msg;
            puts[i].body = d->dsn[i].body;
            puts[i].len = d->dsn[i].len;
        }
        u.puts = puts;
        u.nputs = (size_t)d->ndsn;
        break;
    }
    u.nrcpts = n;
    u.rcpt_index = idx;
    u.rcpt_status = st;
    u.rcpt_reply = replies;
    spool_update_async(sc->sp, &u, sched_write_done, d); /* d stays busy until then */
out:
    free(idx);
    free(st);
    free(replies);
}

static void sched_retry_writes(struct sched *sc, int force)
{
    struct sched_delivery *d, *next;
    int64_t now = (int64_t)time(NULL);

    /* Take the list: a write that fails again puts its delivery back on sc->retry. */
    d = SLIST_FIRST(&sc->retry);
    SLIST_INIT(&sc->retry);
    for (; d != NULL; d = next) {
        next = SLIST_NEXT(d, retry_link);
        if (!force && d->wretry_at > now) {
            SLIST_INSERT_HEAD(&sc->retry, d, retry_link);
            continue;
        }
        sched_write(d);
    }
}

/* ---- Notifications ---- */

/* Builds a notification about rcpts[0..n) of d's message into d->dsn (written with the
 * round's outcome). */
static void sched_dsn_add(struct sched_delivery *d, enum bounce_kind kind,
                          const struct bounce_rcpt *rcpts, size_t n)
{
    struct sched *sc = d->sc;
    const struct spool_msg *msg = d->msg;
    struct sched_dsn *dsn = &d->dsn[d->ndsn++];
    struct bounce_info bi;
    time_t now = time(NULL);

    memset(dsn, 0, sizeof(*dsn));
    dsn->kind = kind;
    dsn->msg.id = spool_id_new(sc->sp);
    memset(&bi, 0, sizeof(bi));
    bi.kind = kind;
    bi.hostname = sc->cfg->hostname;
    bi.queue_id = msg->id;
    bi.dsn_id = dsn->msg.id;
    bi.sender = msg->sender;
    bi.to = sc->cfg->bounce_to != NULL ? sc->cfg->bounce_to : msg->sender;
    bi.arrived = msg->arrived;
    bi.now = now;
    bi.retry_until = msg->arrived + msg->config_wait + sc->cfg->max_lifetime;
    bi.rcpts = rcpts;
    bi.nrcpts = n;
    bi.orig = d->body;
    bi.orig_len = d->len;
    bi.dsn_ret = msg->dsn_ret;
    bi.envid = msg->dsn_envid;
    bounce_build(&bi, &dsn->body, &dsn->len);

    dsn->msg.state = SPOOL_QUEUED;
    dsn->msg.arrived = now;
    dsn->msg.next_attempt = now;
    dsn->msg.size = dsn->len;
    dsn->msg.sender = ""; /* RFC 5321 6.1: notifications are sent from <> and never bounce */
    dsn->msg.client = "127.0.0.1";
    dsn->msg.helo = "relayd";
    dsn->msg.listener = "bounce";
    dsn->rcpt.addr = (char *)bi.to;
    dsn->rcpt.status = SPOOL_RCPT_PENDING;
    dsn->msg.rcpts = &dsn->rcpt;
    dsn->msg.nrcpts = 1;
}

/* Whether the attempt log of id says that the delay notification went out. */
static int sched_warned(struct sched *sc, uint64_t id)
{
    struct spool_msg *h;
    int warned = 0;

    if (spool_msg_get(sc->sp, id, SPOOL_GET_HISTORY, &h) != 0)
        return 1; /* cannot tell: rather none than one per attempt */
    for (size_t i = 0; i < h->nattempts_log && !warned; i++)
        warned = h->attempts_log[i].result != NULL &&
                 strstr(h->attempts_log[i].result, SCHED_WARNED) != NULL;
    spool_msg_free(h);
    return warned;
}

static int sched_is_4xx(const char *r)
{
    return r != NULL && r[0] == '4' && isdigit((unsigned char)r[1]) && isdigit((unsigned char)r[2]);
}

/* RFC 3461 4.1: whether recipient r wants a notification of kind.  No NOTIFY: the
 * default (failures and delays are reported); NEVER: none; else only the kinds named. */
static int sched_dsn_wanted(const struct spool_rcpt *r, enum bounce_kind kind)
{
    if (r->dsn_notify == 0)
        return 1;
    if (r->dsn_notify & SPOOL_NOTIFY_NEVER)
        return 0;
    return (r->dsn_notify &
            (kind == BOUNCE_FAILED ? SPOOL_NOTIFY_FAILURE : SPOOL_NOTIFY_DELAY)) != 0;
}

static int sched_bounce_ok(const struct sched_delivery *d)
{
    return d->msg->sender[0] != '\0' && d->sc->cfg->bounces;
}

/* A non-delivery notification for the recipients that failed in this round. */
static void sched_notify_failed(struct sched_delivery *d)
{
    const struct spool_msg *msg = d->msg;
    struct bounce_rcpt *br = xcalloc(msg->nrcpts + 1, sizeof(*br));
    size_t i, nbr = 0, nquiet = 0;
    char qid[17];

    spool_id_str(d->id, qid);
    for (i = 0; i < msg->nrcpts; i++) {
        const struct sched_rcpt *r = &d->rc[i];

        if (!r->in_round || r->status != SPOOL_RCPT_FAILED)
            continue;
        if (!sched_dsn_wanted(&msg->rcpts[i], BOUNCE_FAILED)) {
            nquiet++; /* NOTIFY=NEVER, or NOTIFY without FAILURE */
            continue;
        }
        br[nbr].addr = msg->rcpts[i].addr;
        br[nbr].orcpt = msg->rcpts[i].dsn_orcpt;
        br[nbr].reply = r->expired ? r->expired_reply : r->reply;
        br[nbr].status = r->dsn_status[0] != '\0' ? r->dsn_status : NULL;
        br[nbr].remote_mta = r->up != NULL ? r->up->host : NULL;
        br[nbr].last_attempt = r->when;
        nbr++;
    }
    if (nbr > 0 && sched_bounce_ok(d))
        sched_dsn_add(d, BOUNCE_FAILED, br, nbr);
    else if (nbr > 0)
        log_info("%s: no non-delivery notification: %s", qid,
                 msg->sender[0] == '\0' ? "null sender" : "bounces = no");
    if (nquiet > 0)
        log_info("%s: no non-delivery notification for %zu recipient%s: NOTIFY", qid, nquiet,
                 nquiet == 1 ? "" : "s");
    free(br);
}

/* The one delay warning (delay_warning), to those who did not opt out (RFC 3461 4.1);
 * when nobody wants one, none is sent and none is recorded as sent. */
static void sched_notify_delayed(struct sched_delivery *d, int64_t now)
{
    const struct cfg *cfg = d->sc->cfg;
    const struct spool_msg *msg = d->msg;
    struct bounce_rcpt *br;
    size_t i, nbr = 0;

    if (cfg->delay_warning <= 0 || now - msg->arrived < cfg->delay_warning || !sched_bounce_ok(d))
        return;
    br = xcalloc(msg->nrcpts + 1, sizeof(*br));
    for (i = 0; i < msg->nrcpts; i++) {
        const struct sched_rcpt *r = &d->rc[i];

        if (!r->in_round || r->cause != VERDICT_TRANSIENT || r->status != SPOOL_RCPT_PENDING ||
            !sched_dsn_wanted(&msg->rcpts[i], BOUNCE_DELAYED))
            continue;
        br[nbr].addr = msg->rcpts[i].addr;
        br[nbr].orcpt = msg->rcpts[i].dsn_orcpt;
        br[nbr].reply = r->reply;
        br[nbr].remote_mta = r->up != NULL ? r->up->host : NULL;
        br[nbr].last_attempt = r->when;
        nbr++;
    }
    if (nbr > 0 && !sched_warned(d->sc, msg->id))
        sched_dsn_add(d, BOUNCE_DELAYED, br, nbr);
    free(br);
}

/* ---- A delivery round ---- */

/* The round is over: decide the message's state, build the notifications, write it all. */
static void sched_round_finish(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    const struct cfg *cfg = sc->cfg;
    struct spool_msg *msg = d->msg;
    struct sched_round_rcpt *x = xcalloc(msg->nrcpts + 1, sizeof(*x));
    struct sched_round_in in;
    int64_t now = (int64_t)time(NULL), age = now - msg->arrived;
    char qid[17];
    size_t i;

    spool_id_str(d->id, qid);
    for (i = 0; i < msg->nrcpts; i++) {
        x[i].before = msg->rcpts[i].status;
        x[i].in_round = d->rc[i].in_round;
        x[i].cause = d->rc[i].cause;
        x[i].wait_until = d->rc[i].wait_until;
        x[i].routed = msg->rcpts[i].status == SPOOL_RCPT_PENDING && d->rc[i].route != NULL;
    }
    in.cfg = cfg;
    in.now = now;
    in.arrived = msg->arrived;
    in.attempts = msg->attempts;
    in.rnd = (unsigned)rand();
    in.config_wait = msg->config_wait;
    in.config_since = msg->config_since;
    sched_round_decide(&in, x, msg->nrcpts, &d->out);
    for (i = 0; i < msg->nrcpts; i++) {
        struct sched_rcpt *r = &d->rc[i];

        if (!r->in_round)
            continue;
        r->status = x[i].after;
        if (x[i].expired) {
            char st0[16];

            r->expired = 1;
            r->expired_reply =
                xasprintf("delivery time expired after %lld seconds in the queue; last error: %s",
                          (long long)age, r->reply != NULL ? r->reply : "none");
            snprintf(r->dsn_status, sizeof r->dsn_status, "%s",
                     sched_is_4xx(r->reply) ? bounce_status(r->reply, BOUNCE_DELAYED, st0)
                                            : "4.4.7");
        }
    }
    free(x);
    if (d->out.expired) {
        snprintf(d->last_error, sizeof d->last_error,
                 "expired: not delivered within max_lifetime (%ds)", cfg->max_lifetime);
        log_warn("%s: expired after %lld seconds in the queue", qid, (long long)age);
        metrics_on_expired();
    }
    if (d->out.noroute) {
        snprintf(d->last_error, sizeof d->last_error,
                 "no upstream route is configured for some of its recipients");
        log_warn("%s: held: %s", qid, d->last_error);
    }
    sched_notify_failed(d);
    sched_notify_delayed(d, now);
    if (d->ndsn > 0 && d->dsn[d->ndsn - 1].kind == BOUNCE_DELAYED) {
        /* The mark that the warning went out rides in the same attempt-log line. */
        char nid[17];
        size_t len = strlen(d->result);

        snprintf(d->result + len, sizeof d->result - len, "%s" SCHED_WARNED ": %s",
                 len > 0 ? "; " : "", spool_id_str(d->dsn[d->ndsn - 1].msg.id, nid));
    }
    d->wkind = SCHED_W_FINAL;
    sched_write(d);
}

/* The route of recipient i when it still waits for its group in this round, else NULL. */
static const struct cfg_route *sched_todo(const struct sched_delivery *d, size_t i)
{
    const struct sched_rcpt *r = &d->rc[i];

    if (r->in_round || r->wait_until != 0 || d->msg->rcpts[i].status != SPOOL_RCPT_PENDING)
        return NULL;
    return r->route;
}

/* Another group of recipients is left for this round. */
static int sched_more_groups(const struct sched_delivery *d)
{
    for (size_t i = 0; i < d->msg->nrcpts; i++)
        if (sched_todo(d, i) != NULL)
            return 1;
    return 0;
}

/* How long a recipient with cause waits, given the verdict came from up on route. */
static void sched_wait_for(struct sched_delivery *d, struct sched_rcpt *r,
                           const struct cfg_route *route, int64_t now)
{
    struct sched *sc = d->sc;
    struct upstream *u = r->up != NULL ? pool_upstream(sc->pool, r->up) : NULL;
    int64_t until;
    int park;

    r->park = NULL;
    r->wait_until = 0;
    if (r->cause != VERDICT_CONFIG && r->cause != VERDICT_SLOWDOWN)
        return;
    if (!sched_route_open(sc, route, now, &until, &park)) {
        r->wait_until = until;
        r->park = park ? route : NULL;
        return;
    }
    if (r->cause == VERDICT_CONFIG && (u == NULL || upstream_is_healthy(u))) {
        /* A fault about this recipient or sender only ("553 not owned by user"): the
         * upstream works for others; look again on the ordinary schedule, uncounted. */
        r->wait_until = now + sched_backoff_factor(d->msg->attempts + 1, sc->cfg->retry_first,
                                                   sc->cfg->retry_factor, sc->cfg->retry_max,
                                                   (unsigned)rand());
        return;
    }
    r->wait_until = now + sc->cfg->retry_first;
}

static void sched_on_delivered(void *arg, const struct smtpc_result *res)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    struct spool_msg *msg = d->msg;
    char qid[17];
    int64_t now = (int64_t)time(NULL);
    int aborted = 0;
    size_t i;

    spool_id_str(d->id, qid);
    for (i = 0; i < d->nrcpts && i < res->nrcpts; i++) {
        const struct smtpc_rcpt_result *x = &res->rcpt[i];
        struct sched_rcpt *r = &d->rc[d->rcpt_index[i]];
        const struct cfg_upstream *up = x->up != NULL ? x->up : d->route->upstream;

        if (sc->stopping && x->reply != NULL && strcmp(x->reply, SMTPC_ABORTED) == 0) {
            /* A stop came first: nothing was decided; it stays as it was. */
            aborted++;
            continue;
        }
        sched_rcpt_set(r, x->cause, x->reply, x->action, up, now);
        r->status = x->status == SMTPC_SENT   ? SPOOL_RCPT_SENT
                    : x->status == SMTPC_FAIL ? SPOOL_RCPT_FAILED
                                              : SPOOL_RCPT_PENDING;
        sched_wait_for(d, r, d->route, now);
        if (x->status != SMTPC_SENT)
            snprintf(d->last_error, sizeof d->last_error, "%s", r->reply);
        /* A session with TLS up has passed verification: relayd never goes on otherwise. */
        log_info("%s: to=<%s> relay=%s[%s]:%d delay=%lld tls=%s%s status=%s (%s)%s%s%s%s", qid,
                 d->rcpts[i], up->name, up->host, up->port, (long long)(now - msg->arrived),
                 x->tls != NULL && x->tls[0] ? x->tls : "none",
                 x->tls != NULL && x->tls[0] ? " verify=ok" : "",
                 verdict_status_word(x->cause), r->reply,
                 x->cause == VERDICT_CONFIG || x->cause == VERDICT_SLOWDOWN ? " cause=" : "",
                 x->cause == VERDICT_CONFIG     ? "relay-configuration"
                 : x->cause == VERDICT_SLOWDOWN ? "slow-down"
                                                : "",
                 r->action != NULL ? "; the administrator must: " : "",
                 r->action != NULL ? r->action : "");
        metrics_on_rcpt(up->name, (int)x->status, verdict_cause_name(x->cause), now - msg->arrived);
    }
    if (aborted > 0)
        log_info("%s: delivery to %zu recipient%s interrupted by the stop; %s queued", qid,
                 (size_t)aborted, aborted == 1 ? "" : "s", aborted == 1 ? "it stays" : "they stay");
    snprintf(d->result, sizeof d->result, "%s: %s",
             res->status == SMTPC_SENT   ? "sent"
             : res->status == SMTPC_FAIL ? "bounced"
                                         : "deferred",
             res->reply);
    d->result_up = res->up != NULL ? res->up->name : d->route->upstream->name;
    if (sched_more_groups(d) && !sc->stopping) {
        /* Record this group before the next one starts. */
        d->wkind = SCHED_W_GROUP;
        sched_write(d);
        return;
    }
    sched_round_finish(d);
}

/* Starts the next group of the round, or finishes the round when none is left. */
static void sched_round_next(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    struct spool_msg *msg = d->msg;
    char qid[17];
    size_t i;
    int rc;

    d->result[0] = '\0';
    d->result_up = NULL;
    spool_id_str(d->id, qid);
    while (!sc->stopping) {
        const struct cfg_route *route = NULL;
        int64_t now = (int64_t)time(NULL), until;
        int park;

        for (i = 0; i < msg->nrcpts && route == NULL; i++)
            route = sched_todo(d, i);
        if (route == NULL)
            break;
        d->route = route;
        d->nrcpts = 0;
        for (i = 0; i < msg->nrcpts; i++) {
            if (sched_todo(d, i) != route)
                continue; /* done, or another route: another group */
            d->rcpts[d->nrcpts] = msg->rcpts[i].addr;
            d->dsn_notify[d->nrcpts] = msg->rcpts[i].dsn_notify;
            d->dsn_orcpt[d->nrcpts] = msg->rcpts[i].dsn_orcpt;
            d->rcpt_index[d->nrcpts++] = i;
        }
        if (!sched_route_open(sc, route, now, &until, &park)) {
            /* Unhealthy (the pool probes it), paused or at its rate limit: these wait,
             * uncounted, and are not offered anywhere in this round. */
            struct upstream *pu = pool_upstream(sc->pool, route->upstream);
            const char *why = pu != NULL ? upstream_reason(pu) : "";
            char reason[512];

            snprintf(reason, sizeof reason, "waiting for upstream %s: %s",
                     route->upstream->name, why[0] != '\0' ? why : "rate limit or slow-down pause");
            log_debug(1, "%s: %s", qid, reason);
            for (i = 0; i < d->nrcpts; i++) {
                struct sched_rcpt *r = &d->rc[d->rcpt_index[i]];

                sched_rcpt_set(r, park ? VERDICT_CONFIG : VERDICT_SLOWDOWN, reason,
                               pu != NULL ? upstream_action(pu) : NULL, route->upstream, now);
                r->wait_until = until;
                r->park = park ? route : NULL;
            }
            snprintf(d->last_error, sizeof d->last_error, "%s", reason);
            continue;
        }
        d->m.id = msg->id;
        d->m.rcpts = d->rcpts;
        d->m.nrcpts = d->nrcpts;
        /* RFC 3461: the sender's DSN wishes travel on (smtpc sends them if DSN is offered). */
        d->m.dsn_ret = msg->dsn_ret;
        d->m.dsn_envid = msg->dsn_envid;
        d->m.dsn_notify = d->dsn_notify;
        d->m.dsn_orcpt = d->dsn_orcpt;
        sched_rewrite_group(d, route); /* sets d->m.sender, body and len */
        log_debug(1, "%s: delivering on route %s (%zu recipients)", qid, route->name, d->nrcpts);
        if ((rc = pool_deliver(sc->pool, d->route, &d->m, sched_on_delivered, d)) == 0)
            return; /* sched_on_delivered goes on */
        log_error("%s: cannot start delivery to %s: %s", qid, route->upstream->name,
                  uv_strerror(rc));
        for (i = 0; i < d->nrcpts; i++)
            sched_rcpt_set(&d->rc[d->rcpt_index[i]], VERDICT_TRANSIENT, "cannot start delivery",
                           NULL, route->upstream, now);
        snprintf(d->last_error, sizeof d->last_error, "cannot start delivery: %s", uv_strerror(rc));
    }
    sched_round_finish(d);
}

/* ---- Picking mail ---- */

/* Sets d aside with a write of kind (hold or quarantine) and why; it stays busy until the
 * write is durable. */
static void sched_set_aside(struct sched_delivery *d, enum sched_write_kind kind, const char *why)
{
    char qid[17];

    log_warn("%s: held: %s", spool_id_str(d->id, qid), why);
    d->reason = xstrdup(why);
    d->wkind = kind;
    sched_write(d);
}

/* What sched_pick() did with a due id. */
enum sched_pick {
    SCHED_PICK_SKIPPED, /* gone, no longer due, or unreadable for now */
    SCHED_PICK_STARTED, /* a round (or a hold) started: it is busy */
    SCHED_PICK_PARKED,  /* every route it needs is blocked: *until says when to look again */
    SCHED_PICK_NO_ROOM, /* it could go, but every worker is busy */
};

static enum sched_pick sched_pick(struct sched *sc, uint64_t id, int room, int64_t now,
                                  int64_t *until, const struct cfg_route **park)
{
    struct sched_delivery *d;
    struct spool_msg *msg;
    char qid[17], why[256];
    size_t i;
    int rc, routed = 0, open = 0, p;
    int64_t t, soonest = INT64_MAX;

    spool_id_str(id, qid);
    *park = NULL;
    if ((rc = spool_msg_get(sc->sp, id, 0, &msg)) != 0) {
        if (rc == SPOOL_ECORRUPT) {
            /* Never left at the head of the line: set aside, original kept. */
            snprintf(why, sizeof why, "unreadable envelope record (%s); the original record is "
                     "kept in the spool's \"bad\" database", spool_strerror(rc));
            sched_set_aside(sched_delivery_new(sc, id, NULL), SCHED_W_QUARANTINE, why);
            return SCHED_PICK_STARTED;
        }
        if (rc != SPOOL_ENOTFOUND)
            log_error("%s: cannot read from the spool: %s", qid, spool_strerror(rc));
        return SCHED_PICK_SKIPPED;
    }
    /* Re-check after loading: relayctl may have held or rescheduled it since the scan. */
    if ((msg->state != SPOOL_QUEUED && msg->state != SPOOL_DEFERRED) || msg->next_attempt > now) {
        spool_msg_free(msg);
        return SCHED_PICK_SKIPPED;
    }
    for (i = 0; i < msg->nrcpts; i++) {
        const struct cfg_route *r;

        if (msg->rcpts[i].status != SPOOL_RCPT_PENDING || (r = sched_route(sc->cfg, msg, i)) == NULL)
            continue;
        routed++;
        if (sched_route_open(sc, r, now, &t, &p)) {
            open = 1;
            break;
        }
        if (t < soonest)
            soonest = t;
        if (p)
            *park = r;
    }
    if (routed == 0) {
        sched_set_aside(sched_delivery_new(sc, id, msg), SCHED_W_HOLD,
                        "no upstream route is configured for its recipients");
        return SCHED_PICK_STARTED;
    }
    /* Mail past max_lifetime still gets its round, so that a pause cannot keep it forever. */
    if (!open && sched_age(now, msg->arrived, msg->config_wait, msg->config_since) <
                     sc->cfg->max_lifetime) {
        *until = soonest;
        spool_msg_free(msg);
        return SCHED_PICK_PARKED;
    }
    /* Bodies are loaded whole: they count against max_memory, the budget the inbound
     * sessions share, so workers x 35 MB scans cannot take the machine's memory (and
     * devices get 451 rather than relayd dying).  One delivery always may go. */
    if (room <= 0 ||
        (sc->nactive > 0 && *sc->mem_used + msg->size > (uint64_t)sc->cfg->max_memory)) {
        spool_msg_free(msg);
        return SCHED_PICK_NO_ROOM;
    }
    d = sched_delivery_new(sc, id, msg);
    rc = spool_body_get(sc->sp, id, &d->body, &d->len);
    *sc->mem_used += d->len;
    if (rc != 0) {
        snprintf(why, sizeof why, "cannot read the message body: %s", spool_strerror(rc));
        sched_set_aside(d, SCHED_W_HOLD, why);
        return SCHED_PICK_STARTED;
    }
    sched_round_next(d);
    return SCHED_PICK_STARTED;
}

/* ---- Reload ---- */

static void sched_on_old_pool_stopped(void *arg)
{
    struct sched *sc = arg;
    void (*done)(void *, int) = sc->reconf_done;

    pool_free(sc->old_pool);
    sc->old_pool = NULL;
    sc->pool_open--;
    sc->reconf_done = NULL;
    if (done != NULL)
        done(sc->reconf_arg, 1);
    sched_maybe_stopped(sc);
}

static void sched_on_next_pool_stopped(void *arg)
{
    struct sched *sc = arg;
    void (*done)(void *, int) = sc->reconf_done;

    pool_free(sc->next_pool);
    sc->next_pool = NULL;
    sc->next_cfg = NULL;
    sc->pool_open--;
    sc->reconf_done = NULL;
    if (done != NULL)
        done(sc->reconf_arg, 0);
    sched_maybe_stopped(sc);
}

/*
 * The reload takes over the delivery side once nothing is in delivery: every delivery in
 * progress finished on the configuration it started with (its routes, upstreams, sessions
 * and credentials), and its results are durable.  The new pool gets the upstreams' state
 * by name, the parked mail stays parked on the route of the same name, unhealthy
 * upstreams are probed at once, and the old pool closes its idle sessions.  1 when done.
 */
static int sched_swap(struct sched *sc)
{
    const struct cfg *old = sc->cfg, *cfg = sc->next_cfg;
    struct sched_park *parks;

    if (sc->nactive > 0 || sc->parking || sc->old_pool != NULL)
        return 0;
    parks = xcalloc((size_t)cfg->nroutes + 1, sizeof(*parks));
    for (int i = 0; i < old->nroutes; i++) {
        int j;

        for (j = 0; j < cfg->nroutes; j++)
            if (strcmp(old->routes[i].name, cfg->routes[j].name) == 0)
                break;
        if (j < cfg->nroutes)
            parks[j] = sc->parks[i]; /* the ids move */
        else
            free(sc->parks[i].ids); /* next_attempt (at most SCHED_PARK_SECONDS) wakes them */
    }
    free(sc->parks);
    sc->parks = parks;
    if ((size_t)cfg->workers + SCHED_SCAN_MAX > sc->nscan) {
        sc->nscan = (size_t)cfg->workers + SCHED_SCAN_MAX;
        free(sc->scan);
        sc->scan = xcalloc(sc->nscan, sizeof(*sc->scan));
    }
    pool_carry(sc->next_pool, sc->pool);
    pool_set_on_healthy(sc->next_pool, sched_on_upstream_healthy, sc);
    sc->old_pool = sc->pool;
    sc->pool = sc->next_pool;
    sc->cfg = cfg;
    sc->next_pool = NULL;
    sc->next_cfg = NULL;
    log_info("reload: deliveries now use the new configuration");
    pool_reprobe(sc->pool);
    pool_stop(sc->old_pool, sched_on_old_pool_stopped, sc); /* may call back now */
    return 1;
}

int sched_reconfigure(struct sched *sc, const struct cfg *cfg, struct oauth2 *oauth2,
                      void (*done)(void *arg, int swapped), void *arg, char *err, size_t errlen)
{
    struct pool *p;
    int rc;

    if (sc->stopping || sc->next_cfg != NULL || sc->old_pool != NULL) {
        snprintf(err, errlen, "the previous reload is still taking over deliveries");
        return -1;
    }
    p = pool_new(sc->loop, cfg, oauth2);
    if ((rc = pool_start(p, err, errlen)) != 0) {
        pool_free(p); /* pool_start() fails before it initialises any handle */
        return rc;
    }
    sc->pool_open++;
    sc->next_pool = p;
    sc->next_cfg = cfg;
    sc->reconf_done = done;
    sc->reconf_arg = arg;
    if (sc->nactive > 0)
        log_info("reload: %d deliver%s in progress finish on the old configuration first",
                 sc->nactive, sc->nactive == 1 ? "y" : "ies");
    sched_kick(sc);
    return 0;
}

void sched_reconfigure_cancel(struct sched *sc)
{
    if (sc->next_pool != NULL)
        pool_stop(sc->next_pool, sched_on_next_pool_stopped, sc);
}

static void sched_run(struct sched *sc)
{
    uint64_t *ids = sc->scan, *pids = NULL;
    int64_t now = (int64_t)time(NULL), *pwhen = NULL, until;
    size_t n = 0, i, npark = 0, want = sc->nscan;
    int rc, blocked;

    if (sc->stopping || sc->parking || sc->write_faults > 0)
        return;
    if (sc->next_cfg != NULL && !sched_swap(sc))
        return; /* no new delivery until the reload takes over */
    if (sc->nactive >= sc->cfg->workers)
        return;
    if ((blocked = sched_blocked_routes(sc)) == sc->cfg->nroutes && blocked > 0)
        return;
    /* Busy messages may still look due: look past them (they are skipped unread).  With no
     * route blocked nothing will be parked, so the busy ones and the free workers are all
     * the scan needs (a drain of a full spool scans little per delivery). */
    if (blocked == 0)
        want = (size_t)sc->cfg->workers + 1;
    if ((rc = spool_due(sc->sp, now, ids, want, &n)) != 0) {
        log_error("spool: cannot read the schedule: %s", spool_strerror(rc));
        return;
    }
    for (i = 0; i < n; i++) {
        const struct cfg_route *park;
        enum sched_pick pk;

        if (sched_busy(sc, ids[i]))
            continue;
        if (blocked == 0 && sc->nactive >= sc->cfg->workers)
            break; /* nothing to park, no room: no need to read the next envelope */
        pk = sched_pick(sc, ids[i], sc->cfg->workers - sc->nactive, now, &until, &park);
        if (pk == SCHED_PICK_NO_ROOM)
            break;
        if (pk != SCHED_PICK_PARKED)
            continue;
        if (pids == NULL) {
            pids = xcalloc(n, sizeof(*pids));
            pwhen = xcalloc(n, sizeof(*pwhen));
        }
        pids[npark] = ids[i];
        pwhen[npark++] = until;
        if (park != NULL)
            sched_park_add(sc, park, ids[i]);
    }
    if (npark > 0) {
        /* One transaction for the whole scan; until it is durable nothing is scanned (the
         * parked mail would still look due). */
        log_debug(1, "%zu message%s wait for blocked routes", npark, npark == 1 ? "" : "s");
        sc->parking = 1;
        spool_reschedule_async(sc->sp, pids, pwhen, npark, sched_parked_written, sc);
    }
    free(pids);
    free(pwhen);
}

/* ---- Rewriting ---- */

/*
 * Applies route's rewriting to the group in d: the envelope sender (rewrite_sender[_map]),
 * explicitly mapped recipients (recipient_map) and, with rewrite_from, the From: and
 * Reply-To: headers.  Fills d->m's sender and body; d->rcpts slots may then point to
 * d->rw_rcpts.  Everything it allocates is freed here on the next group or with d.
 */
static void sched_rewrite_group(struct sched_delivery *d, const struct cfg_route *route)
{
    const struct spool_msg *msg = d->msg;
    char qid[17];
    size_t i;

    spool_id_str(msg->id, qid);
    d->rw_sender = (free(d->rw_sender), NULL);
    d->rw_body = (free(d->rw_body), NULL);
    d->m.sender = msg->sender;
    d->m.body = d->body;
    d->m.len = d->len;
    for (i = 0; i < d->nrcpts; i++) {
        d->rw_rcpts[i] = (free(d->rw_rcpts[i]), NULL);
        if (rewrite_recipient(route, d->rcpts[i], &d->rw_rcpts[i])) {
            log_info("%s: orig_to=<%s> to=<%s> route=%s: recipient_map", qid, d->rcpts[i],
                     d->rw_rcpts[i], route->name);
            d->rcpts[i] = d->rw_rcpts[i];
        }
    }
    if (!rewrite_envelope(route, msg->sender, &d->rw_sender))
        return;
    d->m.sender = d->rw_sender;
    if (rewrite_wants_headers(route)) {
        struct buf *b = buf_new(0);

        if (rewrite_headers(route, msg->sender, d->rw_sender, d->body, d->len, b) == 1)
            d->rw_body = buf_steal(b, &d->rw_len);
        buf_free(b);
        if (d->rw_body != NULL) {
            d->m.body = d->rw_body;
            d->m.len = d->rw_len;
        }
    }
    log_info("%s: orig_from=<%s> from=<%s> route=%s%s", qid, msg->sender, d->rw_sender,
             route->name, d->rw_body != NULL ? " header=From,Reply-To" : "");
}

/* ---- failed_retention ---- */

int sched_purge_failed(struct spool *sp, int64_t now, int64_t retention, uint64_t *ids, size_t max,
                       size_t *n)
{
    *n = 0;
    if (max == 0)
        return 0;
    /* Candidates are read without the write lock; each is read again in the deleting
     * transaction, so a message relayctl retried a moment ago is no longer FAILED and stays. */
    return spool_purge_ids(sp, SPOOL_FAILED, now - retention + 1, ids, max, n);
}

static void sched_purge_work(uv_work_t *req)
{
    struct sched *sc = req->data;

    sc->purge_rc = sched_purge_failed(sc->sp, sc->purge_now, sc->cfg->failed_retention,
                                      sc->purge_ids, SCHED_PURGE_MAX, &sc->npurged);
}

static void sched_purge_after(uv_work_t *req, int status)
{
    struct sched *sc = req->data;
    char qid[17];

    (void)status;
    sc->purging = 0;
    for (size_t i = 0; i < sc->npurged; i++)
        log_info("%s: removed: failed, and older than failed_retention (%ds)",
                 spool_id_str(sc->purge_ids[i], qid), sc->cfg->failed_retention);
    if (sc->purge_rc != 0)
        log_error("spool: cannot remove old failed messages: %s", spool_strerror(sc->purge_rc));
    if (sc->stopping)
        sched_maybe_stopped(sc);
}

/* Deleting is a durable commit: never on the loop. */
static void sched_purge_start(struct sched *sc)
{
    if (sc->purging || sc->stopping)
        return;
    sc->purge_now = sc->last_purge = (int64_t)time(NULL);
    sc->purge_req.data = sc;
    if (uv_queue_work(sc->loop, &sc->purge_req, sched_purge_work, sched_purge_after) == 0)
        sc->purging = 1;
}

/* ---- Upstream state kept in the spool ---- */

static int64_t wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Notes every upstream whose state changed since the last note (once a tick at most, so
 * at most one record per upstream per second, however much mail goes). */
static void sched_save_upstreams(struct sched *sc)
{
    uint64_t now = uv_now(sc->loop);
    int64_t wall = wall_ms();

    for (int i = 0; i < sc->cfg->nupstreams; i++) {
        struct upstream *u = pool_upstream(sc->pool, &sc->cfg->upstreams[i]);
        struct spool_upstate st;

        if (u == NULL || !upstream_state_dirty(u))
            continue;
        upstream_state_save(u, now, wall, &st);
        spool_upstate_note(sc->sp, &st);
        spool_upstate_clear(&st);
    }
}

/* At start: each upstream's state from before the restart (state of upstreams no longer
 * configured is ignored).  Unhealthy ones are probed at once by the caller. */
static void sched_load_upstreams(struct sched *sc)
{
    uint64_t now = uv_now(sc->loop);
    int64_t wall = wall_ms();

    for (int i = 0; i < sc->cfg->nupstreams; i++) {
        struct upstream *u = pool_upstream(sc->pool, &sc->cfg->upstreams[i]);
        struct spool_upstate *st;

        if (u == NULL || spool_upstate_get(sc->sp, sc->cfg->upstreams[i].name, &st) != 0)
            continue;
        upstream_state_load(u, st, now, wall);
        spool_upstate_free(st);
    }
}

/* ---- Lifecycle ---- */

static void sched_on_tick(uv_timer_t *t)
{
    struct sched *sc = t->data;

    sched_save_upstreams(sc);
    if (!SLIST_EMPTY(&sc->retry))
        sched_retry_writes(sc, 0);
    sched_run(sc);
    if ((int64_t)time(NULL) - sc->last_purge >= SCHED_PURGE_EVERY)
        sched_purge_start(sc);
}

struct sched *sched_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp,
                        struct oauth2 *oauth2)
{
    struct sched *sc = xcalloc(1, sizeof(*sc));

    sc->loop = loop;
    sc->cfg = cfg;
    sc->sp = sp;
    sc->pool = pool_new(loop, cfg, oauth2);
    sc->parks = xcalloc((size_t)cfg->nroutes + 1, sizeof(*sc->parks));
    sc->mem_used = &sc->own_bytes;
    sc->nscan = (size_t)cfg->workers + SCHED_SCAN_MAX;
    sc->scan = xcalloc(sc->nscan, sizeof(*sc->scan));
    return sc;
}

int sched_start(struct sched *sc, char *err, size_t errlen)
{
    int rc;

    if ((rc = pool_start(sc->pool, err, errlen)) != 0)
        return rc;
    pool_set_on_healthy(sc->pool, sched_on_upstream_healthy, sc);
    sc->pool_open = 1;
    sc->started_pool = 1;
    sched_load_upstreams(sc);
    pool_reprobe(sc->pool); /* an upstream held before the restart is probed at once */
    if (sc->cfg->nupstreams == 0)
        log_warn("no upstream is configured: mail is accepted and held in the spool");
    /* Nothing is busy at start: that state lives only in sc->active, so mail a crash
     * interrupted mid-delivery is simply due (QUEUED/DEFERRED in the spool) and is picked
     * up by the first tick; recipients recorded as sent are not sent again. */
    uv_timer_init(sc->loop, &sc->timer);
    sc->timer.data = sc;
    sc->timer_open = 1;
    uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
    return 0;
}

void sched_share_memory(struct sched *sc, size_t *used)
{
    if (sc->nactive == 0 && used != NULL) {
        *used += sc->own_bytes;
        sc->own_bytes = 0;
        sc->mem_used = used;
    }
}

void sched_kick(struct sched *sc)
{
    if (!sc->stopping && sc->timer_open)
        uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
}

static void sched_on_pool_stopped(void *arg)
{
    struct sched *sc = arg;

    sc->pool_open--;
    sched_maybe_stopped(sc);
}

static void sched_on_timer_closed(uv_handle_t *h)
{
    struct sched *sc = h->data;

    sc->timer_open = 0;
    sched_maybe_stopped(sc);
}

void sched_stop(struct sched *sc, void (*done)(void *arg), void *arg)
{
    if (sc->started_pool)
        sched_save_upstreams(sc); /* the writer commits it before it stops */
    sc->stopping = 1;
    sc->stop_done = done;
    sc->stop_arg = arg;
    /* Results that could not be written get one last try (sched_write_done gives up on a
     * second failure while stopping). */
    sched_retry_writes(sc, 1);
    /* Deliveries in the pool end now (or after stop_grace for those waiting on the reply
     * to their final dot); their results are written before done runs. */
    if (sc->pool != NULL && sc->started_pool) {
        sc->started_pool = 0;
        pool_stop(sc->pool, sched_on_pool_stopped, sc);
    }
    sched_reconfigure_cancel(sc); /* a reload not yet in force is dropped */
    if (sc->timer_open)
        uv_close((uv_handle_t *)&sc->timer, sched_on_timer_closed);
    else
        sched_maybe_stopped(sc);
}

void sched_free(struct sched *sc)
{
    if (sc == NULL)
        return;
    pool_free(sc->pool);
    for (int r = 0; r < sc->cfg->nroutes; r++)
        free(sc->parks[r].ids);
    free(sc->parks);
    free(sc->scan);
    free(sc);
}
