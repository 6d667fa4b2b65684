/*
 * sched - the delivery scheduler; see sched.h.
 *
 * Happy path: tick or kick -> spool_due() -> for each id not already in delivery, load the
 * envelope and body and start a delivery round.  A round sends the pending recipients
 * group by group, one group per upstream (the route of each recipient decides), one group
 * after the other; after each group but the last its per-recipient results are written
 * (so a crash between groups never sends a recipient twice), after the last the round's
 * outcome is written with spool_update_async() (the writer thread makes it durable).  One
 * log line per recipient, Postfix style: "ID: to=<a@b> relay=provider[host]:587 tls=...
 * status=sent (250 2.0.0 Ok: queued as 3B1F0)".
 *
 * Failure modes: 4xx, network and TLS failures defer with exponential backoff; 5xx fails
 * the recipients concerned, and a notification (bounce.c) for just those goes to the sender
 * or bounce_to as a new message with the null sender; a message older than max_lifetime
 * fails as expired, likewise.  Faults of the relay's own configuration (the result's
 * config_fault: TLS verification, AUTH refused, "send as denied") and slow-down replies
 * only wait: no attempt counted, no expiry, no bounce.  The pool (relayd/pool.c) marks
 * such an upstream unhealthy, tells the administrator, and probes it; meanwhile
 * pool_would_accept() says no and the mail stays in the spool without connecting.  A
 * message whose recipients have no route any more is held.
 *
 * A delivery (struct sched_delivery) lives from its start until the round is over and
 * every spool write it made is durable; until then spool_due() may still show the message
 * but it is "in delivery" and not picked again.
 */
#include "relayd/sched.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/bounce.h"
#include "relayd/pool.h"
#include "relayd/rewrite.h"
#include "relayd/smtpc.h"
#include "relayd/upstream.h"

#define SCHED_TICK_MS 1000
#define SCHED_PURGE_EVERY 60 /* seconds between looks for FAILED mail past failed_retention */
#define SCHED_PURGE_MAX 256  /* at most this many deletions per look */
#define SCHED_WARNED "delay warning sent" /* attempt-log mark: the delay DSN went out */

struct sched_delivery {
    struct sched *sc;
    struct spool_msg *msg;
    char *body;
    size_t len;
    /* Per recipient of msg (indexed like msg->rcpts), for this round: */
    unsigned char *tried;           /* handled in this round */
    unsigned char *fault;           /* deferred by a config fault (not the message's) */
    enum spool_rcpt_status *st;     /* its status after this round */
    char **reply;                   /* reply or reason, owned */
    const struct cfg_upstream **at; /* upstream it was tried at */
    int64_t *when;                  /* when */
    /* The group in delivery now: the pending recipients of one route. */
    const struct cfg_route *route;
    const struct cfg_upstream *up; /* the upstream that delivers it */
    const char **rcpts;
    size_t *rcpt_index;
    size_t nrcpts;
    unsigned *dsn_notify;   /* per group slot: the recipient's RFC 3461 NOTIFY bits */
    const char **dsn_orcpt; /* per group slot: its ORCPT, or NULL */
    struct smtpc_msg m; /* what smtpc delivers; must live until its done callback */
    /* The group's rewriting (relayd/rewrite.h), owned; NULL when nothing was rewritten: */
    char *rw_sender;    /* envelope sender per the route */
    char *rw_body;      /* message with From:/Reply-To: rewritten */
    size_t rw_len;
    char **rw_rcpts;    /* per group slot: recipient per recipient_map */
    char result[768]; /* attempt-log line of the last group delivered, "" when none */
    const char *result_up;
    char last_error[512];
    int counted;  /* a real attempt (not just config faults) was made in this round */
    int writes;   /* spool writes not yet durable */
    int finished; /* the round's outcome has been submitted */
    enum spool_state final_state;
    int64_t final_next;
    struct sched_delivery *next;
};

/* A message deferred because its upstream was unhealthy (memory only: after a restart the
 * message's next_attempt is the fallback). */
struct sched_waiter {
    uint64_t id;
    const struct cfg_upstream *up;
    struct sched_waiter *next;
};

struct sched {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct spool *sp;
    uv_timer_t timer;
    struct pool *pool;         /* sessions to the upstreams (relayd/pool.h) */
    int pool_open;             /* pool_stop() has not finished yet */
    struct sched_delivery *active;
    int nactive;
    struct sched_waiter *waiters;
    int stopping;
    int timer_open;
    int64_t last_purge; /* when the last purge started */
    int purging;        /* a purge runs on the thread pool */
    uv_work_t purge_req;
    uint64_t purge_ids[SCHED_PURGE_MAX];
    size_t npurged;
    int purge_rc;
    int64_t purge_now;
    void (*stop_done)(void *arg);
    void *stop_arg;
};

static void sched_round_next(struct sched_delivery *d);
static int sched_in_delivery(const struct sched *sc, uint64_t id);

static void sched_waiter_add(struct sched *sc, uint64_t id, const struct cfg_upstream *up)
{
    struct sched_waiter *w;

    for (w = sc->waiters; w != NULL; w = w->next)
        if (w->id == id) {
            w->up = up;
            return;
        }
    w = xcalloc(1, sizeof(*w));
    w->id = id;
    w->up = up;
    w->next = sc->waiters;
    sc->waiters = w;
}

static void sched_wake_done(void *arg, int rc)
{
    (void)arg;
    (void)rc; /* SPOOL_ENOTFOUND: delivered or deleted meanwhile; nothing to wake */
}

/* The pool found up working again: the mail that waited for it is due now, instead of at
 * its next_attempt (up to a probe interval away). */
static void sched_on_upstream_healthy(void *arg, const struct cfg_upstream *up)
{
    struct sched *sc = arg;
    struct sched_waiter **pp = &sc->waiters, *w;
    int64_t now = (int64_t)time(NULL);
    int n = 0;

    while ((w = *pp) != NULL) {
        if (w->up != up) {
            pp = &w->next;
            continue;
        }
        *pp = w->next;
        if (!sched_in_delivery(sc, w->id)) {
            struct spool_update u;

            memset(&u, 0, sizeof(u));
            u.id = w->id;
            u.wake_only = 1; /* a message held or failed meanwhile stays so */
            u.next_attempt = now;
            spool_update_async(sc->sp, &u, sched_wake_done, NULL);
            n++;
        }
        free(w);
    }
    if (n > 0)
        log_info("upstream %s: %d waiting message%s due now", up->name, n, n == 1 ? " is" : "s are");
    sched_kick(sc);
}

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

static int sched_in_delivery(const struct sched *sc, uint64_t id)
{
    const struct sched_delivery *d;

    for (d = sc->active; d != NULL; d = d->next)
        if (d->msg->id == id)
            return 1;
    return 0;
}

/* The route of recipient i: sender, recipient, client address and listener all count. */
static const struct cfg_route *sched_route(const struct cfg *cfg, const struct spool_msg *msg,
                                           size_t i)
{
    return cfg_route_match(cfg, msg->sender, msg->rcpts[i].addr, msg->client, msg->listener);
}

/*
 * Applies route's rewriting to the group in d: the envelope sender (rewrite_sender[_map]),
 * explicitly mapped recipients (recipient_map) and, with rewrite_from, the From: and
 * Reply-To: headers.  Fills d->m's sender and body; d->rcpts slots may then point to
 * d->rw_rcpts.  Everything it allocates is freed here on the next group or with d.
 */
static void sched_rewrite(struct sched_delivery *d, const struct cfg_route *route)
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

static void sched_maybe_stopped(struct sched *sc)
{
    if (sc->stopping && sc->nactive == 0 && !sc->timer_open && !sc->purging && !sc->pool_open &&
        sc->stop_done != NULL) {
        void (*done)(void *) = sc->stop_done;
        sc->stop_done = NULL;
        done(sc->stop_arg);
    }
}

static struct sched_delivery *sched_delivery_new(struct sched *sc, struct spool_msg *msg)
{
    struct sched_delivery *d = xcalloc(1, sizeof(*d));
    size_t n = msg->nrcpts ? msg->nrcpts : 1;

    d->sc = sc;
    d->msg = msg;
    d->tried = xcalloc(n, 1);
    d->fault = xcalloc(n, 1);
    d->st = xcalloc(n, sizeof(*d->st));
    d->reply = xcalloc(n, sizeof(*d->reply));
    d->at = xcalloc(n, sizeof(*d->at));
    d->when = xcalloc(n, sizeof(*d->when));
    d->rcpts = xcalloc(n, sizeof(*d->rcpts));
    d->rcpt_index = xcalloc(n, sizeof(*d->rcpt_index));
    d->rw_rcpts = xcalloc(n, sizeof(*d->rw_rcpts));
    d->dsn_notify = xcalloc(n, sizeof(*d->dsn_notify));
    d->dsn_orcpt = xcalloc(n, sizeof(*d->dsn_orcpt));
    d->next = sc->active;
    sc->active = d;
    sc->nactive++;
    return d;
}

static void sched_delivery_free(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    struct sched_delivery **pp;
    size_t i;

    for (pp = &sc->active; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    }
    sc->nactive--;
    for (i = 0; i < d->msg->nrcpts; i++)
        free(d->reply[i]);
    for (i = 0; i < d->msg->nrcpts; i++)
        free(d->rw_rcpts[i]);
    free(d->rw_rcpts);
    free(d->rw_sender);
    free(d->rw_body);
    spool_msg_free(d->msg);
    free(d->body);
    free(d->tried);
    free(d->fault);
    free(d->st);
    free(d->reply);
    free(d->at);
    free(d->when);
    free(d->rcpts);
    free(d->rcpt_index);
    free(d->dsn_notify);
    free(d->dsn_orcpt);
    free(d);
}

/* A spool write of d is durable (or failed).  Only once the round is over and every write
 * is done may the message be picked again (until then spool_due() may still show it, and
 * picking it would deliver it twice). */
static void sched_write_done(void *arg, int rc)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    char qid[17];

    if (rc != 0)
        log_error("%s: could not record the delivery result: %s", spool_id_str(d->msg->id, qid),
                  spool_strerror(rc));
    if (--d->writes > 0 || !d->finished)
        return;
    sched_delivery_free(d);
    if (sc->stopping)
        sched_maybe_stopped(sc);
    else
        sched_kick(sc);
}

static void sched_set_reply(struct sched_delivery *d, size_t i, const char *reply)
{
    free(d->reply[i]);
    d->reply[i] = reply != NULL ? xstrdup(reply) : NULL;
}

/* ---- notifications ---- */

struct sched_dsn {
    struct sched_delivery *d;
    enum bounce_kind kind;
    uint64_t id;
};

static void sched_dsn_done(void *arg, int rc)
{
    struct sched_dsn *job = arg;
    struct sched_delivery *d = job->d;
    const char *what = job->kind == BOUNCE_FAILED ? "non-delivery" : "delay";
    char qid[17], nid[17];

    spool_id_str(d->msg->id, qid);
    spool_id_str(job->id, nid);
    if (rc != 0) {
        log_error("%s: could not queue the sender %s notification: %s", qid, what,
                  spool_strerror(rc));
    } else {
        log_info("%s: sender %s notification: %s", qid, what, nid);
        if (job->kind == BOUNCE_DELAYED) {
            /* Remember it in the attempt log: it must go out once, restarts included.  The
             * round's outcome (submitted after the notification) is durable by now or in
             * the same batch; this repeats its state so it changes nothing else. */
            struct spool_update u;
            char line[64];

            memset(&u, 0, sizeof(u));
            u.id = d->msg->id;
            u.state = d->final_state;
            u.next_attempt = d->final_next;
            snprintf(line, sizeof line, "%s: %s", SCHED_WARNED, nid);
            u.result = line;
            d->writes++;
            spool_update_async(d->sc->sp, &u, sched_write_done, d);
        }
    }
    free(job);
    sched_write_done(d, 0);
}

/* Queues a notification about rcpts[0..n) of d's message as a new message from <>. */
static void sched_dsn_send(struct sched_delivery *d, enum bounce_kind kind,
                           const struct bounce_rcpt *rcpts, size_t n)
{
    struct sched *sc = d->sc;
    const struct spool_msg *msg = d->msg;
    struct sched_dsn *job = xcalloc(1, sizeof(*job));
    struct bounce_info bi;
    struct spool_msg nm;
    struct spool_rcpt nr;
    time_t now = time(NULL);
    char *text;
    size_t len;

    memset(&nm, 0, sizeof(nm));
    nm.id = spool_id_new(sc->sp);
    memset(&bi, 0, sizeof(bi));
    bi.kind = kind;
    bi.hostname = sc->cfg->hostname;
    bi.queue_id = msg->id;
    bi.dsn_id = nm.id;
    bi.sender = msg->sender;
    bi.to = sc->cfg->bounce_to != NULL ? sc->cfg->bounce_to : msg->sender;
    bi.arrived = msg->arrived;
    bi.now = now;
    bi.retry_until = msg->arrived + sc->cfg->max_lifetime;
    bi.rcpts = rcpts;
    bi.nrcpts = n;
    bi.orig = d->body;
    bi.orig_len = d->len;
    bi.dsn_ret = msg->dsn_ret;
    bi.envid = msg->dsn_envid;
    bounce_build(&bi, &text, &len);

    nm.state = SPOOL_QUEUED;
    nm.arrived = now;
    nm.next_attempt = now;
    nm.size = len;
    nm.sender = ""; /* RFC 5321 6.1: notifications are sent from <> and never bounce */
    nm.client = "127.0.0.1";
    nm.helo = "relayd";
    nm.listener = "bounce";
    memset(&nr, 0, sizeof(nr));
    nr.addr = (char *)bi.to;
    nr.status = SPOOL_RCPT_PENDING;
    nm.rcpts = &nr;
    nm.nrcpts = 1;
    job->d = d;
    job->kind = kind;
    job->id = nm.id;
    d->writes++;
    spool_put_async(sc->sp, &nm, text, len, sched_dsn_done, job); /* takes text */
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
                 strncmp(h->attempts_log[i].result, SCHED_WARNED, strlen(SCHED_WARNED)) == 0;
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

/* ---- a delivery round ---- */

/* The round is over: work out the message's new state, send notifications, record it. */
static void sched_round_finish(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    const struct cfg *cfg = sc->cfg;
    struct spool_msg *msg = d->msg;
    struct spool_update u;
    struct bounce_rcpt *br = xcalloc(msg->nrcpts + 1, sizeof(*br));
    char **expired_reply = xcalloc(msg->nrcpts + 1, sizeof(*expired_reply));
    char(*status)[16] = xcalloc(msg->nrcpts + 1, sizeof(*status));
    size_t *idx = xcalloc(msg->nrcpts + 1, sizeof(*idx));
    enum spool_rcpt_status *st = xcalloc(msg->nrcpts + 1, sizeof(*st));
    const char **replies = xcalloc(msg->nrcpts + 1, sizeof(*replies));
    size_t i, n = 0, nfailed = 0, nbr = 0, nfailed_now = 0, nquiet = 0;
    size_t pending_normal = 0, pending_fault = 0, pending_routed = 0, pending_noroute = 0;
    int64_t now = (int64_t)time(NULL), age = now - msg->arrived, next;
    int expired = age >= cfg->max_lifetime;
    int bounce_ok = msg->sender[0] != '\0' && cfg->bounces;
    char qid[17], why[128];

    spool_id_str(msg->id, qid);
    d->finished = 1;
    for (i = 0; i < msg->nrcpts; i++) {
        if (!d->tried[i]) {
            if (msg->rcpts[i].status != SPOOL_RCPT_PENDING)
                continue;
            if (sched_route(cfg, msg, i) != NULL)
                pending_routed++; /* not reached: shutdown came first */
            else
                pending_noroute++;
            continue;
        }
        if (d->st[i] == SPOOL_RCPT_PENDING && !d->fault[i] && expired) {
            /* Expired: whoever is still pending for an ordinary reason fails now. */
            char st0[16];

            d->st[i] = SPOOL_RCPT_FAILED;
            expired_reply[i] =
                xasprintf("delivery time expired after %lld seconds in the queue; last error: %s",
                          (long long)age, d->reply[i] != NULL ? d->reply[i] : "none");
            snprintf(status[i], sizeof status[i], "%s",
                     sched_is_4xx(d->reply[i]) ? bounce_status(d->reply[i], BOUNCE_DELAYED, st0)
                                               : "4.4.7");
        }
        idx[n] = i;
        st[n] = d->st[i];
        replies[n] = expired_reply[i] != NULL ? expired_reply[i] : d->reply[i];
        n++;
        if (d->st[i] == SPOOL_RCPT_FAILED) {
            nfailed++;
            nfailed_now++;
            if (!sched_dsn_wanted(&msg->rcpts[i], BOUNCE_FAILED)) {
                nquiet++; /* NOTIFY=NEVER, or NOTIFY without FAILURE */
                continue;
            }
            br[nbr].addr = msg->rcpts[i].addr;
            br[nbr].orcpt = msg->rcpts[i].dsn_orcpt;
            br[nbr].reply = replies[n - 1];
            br[nbr].status = status[i][0] != '\0' ? status[i] : NULL;
            br[nbr].remote_mta = d->at[i] != NULL ? d->at[i]->host : NULL;
            br[nbr].last_attempt = d->when[i];
            nbr++;
        } else if (d->st[i] == SPOOL_RCPT_PENDING) {
            if (d->fault[i])
                pending_fault++;
            else
                pending_normal++;
        }
    }
    /* Recipients failed in earlier rounds count for the state, not for notifications. */
    for (i = 0; i < msg->nrcpts; i++)
        if (!d->tried[i] && msg->rcpts[i].status == SPOOL_RCPT_FAILED)
            nfailed++;

    memset(&u, 0, sizeof(u));
    u.id = msg->id;
    u.count_attempt = d->counted;
    u.upstream = d->result_up;
    u.result = d->result[0] != '\0' ? d->result : NULL;
    u.nrcpts = n;
    u.rcpt_index = idx;
    u.rcpt_status = st;
    u.rcpt_reply = replies;
    u.last_error = d->last_error[0] != '\0' ? d->last_error : NULL;
    if (pending_normal + pending_fault + pending_routed + pending_noroute == 0) {
        if (nfailed > 0) {
            u.state = SPOOL_FAILED;
            if (expired && nfailed_now > 0) {
                snprintf(why, sizeof why, "expired: not delivered within max_lifetime (%ds)",
                         cfg->max_lifetime);
                u.last_error = why;
                log_warn("%s: expired after %lld seconds in the queue", qid, (long long)age);
            }
        } else {
            u.state = SPOOL_QUEUED; /* every recipient done: the spool removes the message */
            log_info("%s: removed", qid);
        }
    } else if (pending_normal + pending_fault + pending_routed == 0) {
        u.state = SPOOL_HELD;
        u.last_error = "no upstream route is configured for some of its recipients";
        log_warn("%s: held: %s", qid, u.last_error);
    } else {
        next = INT64_MAX;
        if (pending_normal > 0)
            next = now + sched_backoff_factor(msg->attempts + d->counted, cfg->retry_first,
                                              cfg->retry_factor, cfg->retry_max, (unsigned)rand());
        if (pending_fault > 0) {
            for (i = 0; i < msg->nrcpts; i++) {
                if (d->tried[i] && d->fault[i] && d->at[i] != NULL) {
                    sched_waiter_add(sc, msg->id, d->at[i]);
                    break;
                }
            }
            /* The pool probes an unhealthy upstream every upstream_probe_interval and a
             * paused one opens again within a minute: look again then, with a little
             * jitter so that waiting mail does not move in lock step. */
            int64_t t = now + (cfg->upstream_probe_interval < 60 ? cfg->upstream_probe_interval
                                                                 : 60) + rand() % 3;
            next = t < next ? t : next;
        }
        if (pending_routed > 0)
            next = now;
        u.state = SPOOL_DEFERRED;
        u.next_attempt = next;
    }
    d->final_state = u.state;
    d->final_next = u.next_attempt;

    /* Notifications first: the outcome written after them may let the message go. */
    if (nbr > 0 && bounce_ok)
        sched_dsn_send(d, BOUNCE_FAILED, br, nbr);
    else if (nbr > 0)
        log_info("%s: no non-delivery notification: %s", qid,
                 msg->sender[0] == '\0' ? "null sender" : "bounces = no");
    if (nquiet > 0)
        log_info("%s: no non-delivery notification for %zu recipient%s: NOTIFY", qid, nquiet,
                 nquiet == 1 ? "" : "s");
    /* The delay notification goes to those who did not opt out (RFC 3461 4.1); when
     * nobody wants one, none is sent and none is recorded as sent. */
    nbr = 0;
    for (i = 0; i < msg->nrcpts; i++)
        if (d->tried[i] && !d->fault[i] && d->st[i] == SPOOL_RCPT_PENDING &&
            sched_dsn_wanted(&msg->rcpts[i], BOUNCE_DELAYED))
            nbr++;
    if (nbr > 0 && cfg->delay_warning > 0 && age >= cfg->delay_warning && bounce_ok &&
        !sched_warned(sc, msg->id)) {
        nbr = 0;
        for (i = 0; i < msg->nrcpts; i++) {
            if (!d->tried[i] || d->fault[i] || d->st[i] != SPOOL_RCPT_PENDING ||
                !sched_dsn_wanted(&msg->rcpts[i], BOUNCE_DELAYED))
                continue;
            memset(&br[nbr], 0, sizeof(br[nbr]));
            br[nbr].addr = msg->rcpts[i].addr;
            br[nbr].orcpt = msg->rcpts[i].dsn_orcpt;
            br[nbr].reply = d->reply[i];
            br[nbr].remote_mta = d->at[i] != NULL ? d->at[i]->host : NULL;
            br[nbr].last_attempt = d->when[i];
            nbr++;
        }
        sched_dsn_send(d, BOUNCE_DELAYED, br, nbr);
    }
    d->writes++;
    spool_update_async(sc->sp, &u, sched_write_done, d); /* d stays busy until then */
    for (i = 0; i < msg->nrcpts; i++)
        free(expired_reply[i]);
    free(expired_reply);
    free(status);
    free(br);
    free(idx);
    free(st);
    free(replies);
}

/* A group's results are durable: go on with the next group. */
static void sched_group_written(void *arg, int rc)
{
    struct sched_delivery *d = arg;
    char qid[17];

    d->writes--;
    if (rc != 0)
        log_error("%s: could not record the delivery result: %s", spool_id_str(d->msg->id, qid),
                  spool_strerror(rc));
    sched_round_next(d);
}

static const char *sched_status_word(enum smtpc_status st)
{
    return st == SMTPC_SENT ? "sent" : st == SMTPC_FAIL ? "bounced" : "deferred";
}

/* Another group of recipients is left for this round. */
static int sched_more_groups(const struct sched_delivery *d)
{
    const struct spool_msg *msg = d->msg;

    for (size_t i = 0; i < msg->nrcpts; i++)
        if (!d->tried[i] && msg->rcpts[i].status == SPOOL_RCPT_PENDING &&
            sched_route(d->sc->cfg, msg, i) != NULL)
            return 1;
    return 0;
}

static void sched_on_delivered(void *arg, const struct smtpc_result *res)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    struct spool_msg *msg = d->msg;
    struct spool_update u;
    enum spool_rcpt_status *st;
    const char **replies;
    char qid[17];
    int64_t now = (int64_t)time(NULL);
    size_t i;

    spool_id_str(msg->id, qid);
    if (sc->stopping && res->status == SMTPC_DEFER) {
        /* Aborted by shutdown: not a failed attempt; it stays due as it was (groups before
         * this one are recorded already). */
        log_info("%s: delivery interrupted by shutdown; it stays queued", qid);
        sched_delivery_free(d);
        sched_maybe_stopped(sc);
        return;
    }
    if (res->up != NULL)
        d->up = res->up; /* failover may have picked another upstream of the route */
    st = xcalloc(d->nrcpts + 1, sizeof(*st));
    replies = xcalloc(d->nrcpts + 1, sizeof(*replies));
    for (i = 0; i < d->nrcpts; i++) {
        size_t k = d->rcpt_index[i];
        enum smtpc_status rs = res->status == SMTPC_SENT ? res->rcpt_status[i] : res->status;
        const char *reply = (res->status == SMTPC_SENT || res->status == SMTPC_FAIL) &&
                                    res->rcpt_reply != NULL && res->rcpt_reply[i] != NULL &&
                                    rs != SMTPC_SENT
                                ? res->rcpt_reply[i]
                                : res->reply;
        /* A 5xx to MAIL/DATA fails everyone; a recipient refused at RCPT keeps its reply. */
        if (res->status == SMTPC_FAIL && res->rcpt_status != NULL &&
            res->rcpt_status[i] == SMTPC_FAIL && res->rcpt_reply != NULL &&
            res->rcpt_reply[i] != NULL)
            reply = res->rcpt_reply[i];
        d->st[k] = rs == SMTPC_SENT   ? SPOOL_RCPT_SENT
                   : rs == SMTPC_FAIL ? SPOOL_RCPT_FAILED
                                      : SPOOL_RCPT_PENDING;
        d->fault[k] = rs == SMTPC_DEFER && res->config_fault;
        d->at[k] = d->up;
        d->when[k] = now;
        sched_set_reply(d, k, reply);
        st[i] = d->st[k];
        replies[i] = d->reply[k];
        if (rs != SMTPC_SENT)
            snprintf(d->last_error, sizeof d->last_error, "%s", reply);
        /* A session with TLS up has passed verification: relayd never goes on otherwise. */
        log_info("%s: to=<%s> relay=%s[%s]:%d delay=%lld tls=%s%s status=%s (%s)", qid,
                 d->rcpts[i], d->up->name, d->up->host, d->up->port,
                 (long long)(now - msg->arrived), res->tls[0] ? res->tls : "none",
                 res->tls[0] ? " verify=ok" : "", sched_status_word(rs), reply);
    }
    /* An attempt counts unless only the relay's own configuration is to blame, or the
     * upstream asked us to slow down. */
    if (!res->config_fault && !res->throttled)
        d->counted = 1;
    snprintf(d->result, sizeof d->result, "%s: %s", sched_status_word(res->status), res->reply);
    d->result_up = d->up->name;

    if (sched_more_groups(d) && !sc->stopping) {
        /* Record this group before the next one starts; due now if we crash in between. */
        memset(&u, 0, sizeof(u));
        u.id = msg->id;
        u.state = SPOOL_QUEUED;
        u.next_attempt = now;
        u.upstream = d->result_up;
        u.result = d->result;
        u.nrcpts = d->nrcpts;
        u.rcpt_index = d->rcpt_index;
        u.rcpt_status = st;
        u.rcpt_reply = replies;
        d->writes++;
        spool_update_async(sc->sp, &u, sched_group_written, d);
        d->result[0] = '\0';
        d->result_up = NULL;
    } else {
        sched_round_finish(d);
    }
    free(st);
    free(replies);
}

/*
 * The one place that hands a group to the outbound side: the pool picks the route's
 * upstream or a failover one (res->up says which) and reuses sessions.  0, or a negative
 * UV_E* when the attempt could not start (then no callback).
 */
static int sched_deliver(struct sched *sc, struct sched_delivery *d)
{
    return pool_deliver(sc->pool, d->route, &d->m, sched_on_delivered, d);
}

/* Starts the next group of the round, or finishes the round when none is left. */
static void sched_round_next(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    struct spool_msg *msg = d->msg;
    char qid[17];
    size_t i;
    int rc;

    spool_id_str(msg->id, qid);
    while (!sc->stopping) {
        const struct cfg_route *route = NULL;
        int64_t now = (int64_t)time(NULL);

        for (i = 0; i < msg->nrcpts && route == NULL; i++)
            if (!d->tried[i] && msg->rcpts[i].status == SPOOL_RCPT_PENDING)
                route = sched_route(sc->cfg, msg, i);
        if (route == NULL)
            break;
        d->route = route;
        d->up = route->upstream;
        d->nrcpts = 0;
        for (i = 0; i < msg->nrcpts; i++) {
            const struct cfg_route *r;
            if (d->tried[i] || msg->rcpts[i].status != SPOOL_RCPT_PENDING)
                continue;
            r = sched_route(sc->cfg, msg, i);
            if (r != route)
                continue; /* another route: another group */
            d->tried[i] = 1;
            d->st[i] = SPOOL_RCPT_PENDING;
            d->rcpts[d->nrcpts] = msg->rcpts[i].addr;
            d->dsn_notify[d->nrcpts] = msg->rcpts[i].dsn_notify;
            d->dsn_orcpt[d->nrcpts] = msg->rcpts[i].dsn_orcpt;
            d->rcpt_index[d->nrcpts++] = i;
        }
        if (!pool_would_accept(sc->pool, route)) {
            /* Unhealthy (the pool probes it), throttled or at its rate limit: the mail
             * waits in the spool, no attempt counted, and tries again a little later. */
            struct upstream *pu = pool_upstream(sc->pool, d->up);
            const char *why = pu != NULL ? upstream_reason(pu) : "";
            char reason[512];

            snprintf(reason, sizeof reason, "waiting for upstream %s: %s", d->up->name,
                     why[0] != '\0' ? why : "rate limit or slow-down pause");
            log_debug(1, "%s: %s", qid, reason);
            for (i = 0; i < d->nrcpts; i++) {
                size_t k = d->rcpt_index[i];
                d->fault[k] = 1;
                d->at[k] = d->up;
                sched_set_reply(d, k, reason);
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
        sched_rewrite(d, route); /* sets d->m.sender, body and len */
        log_debug(1, "%s: delivering on route %s (%zu recipients)", qid, route->name, d->nrcpts);
        if ((rc = sched_deliver(sc, d)) == 0)
            return; /* sched_on_delivered goes on */
        log_error("%s: cannot start delivery to %s: %s", qid, d->up->name, uv_strerror(rc));
        for (i = 0; i < d->nrcpts; i++) {
            size_t k = d->rcpt_index[i];
            d->at[k] = d->up;
            d->when[k] = now;
            sched_set_reply(d, k, "cannot start delivery");
        }
        snprintf(d->last_error, sizeof d->last_error, "cannot start delivery: %s", uv_strerror(rc));
        d->counted = 1;
    }
    sched_round_finish(d);
}

/* Holds msg (taken over) with the reason; it stays busy until the update is durable. */
static void sched_hold(struct sched *sc, struct spool_msg *msg, const char *why)
{
    struct sched_delivery *d = sched_delivery_new(sc, msg);
    struct spool_update u;
    char qid[17];

    log_warn("%s: held: %s", spool_id_str(msg->id, qid), why);
    memset(&u, 0, sizeof(u));
    u.id = msg->id;
    u.state = SPOOL_HELD;
    u.last_error = why;
    d->finished = 1;
    d->writes++;
    spool_update_async(sc->sp, &u, sched_write_done, d);
}

static void sched_start_one(struct sched *sc, uint64_t id)
{
    struct sched_delivery *d;
    struct spool_msg *msg;
    char qid[17];
    size_t i;
    int rc, routed = 0;

    spool_id_str(id, qid);
    if ((rc = spool_msg_get(sc->sp, id, 0, &msg)) != 0) {
        if (rc != SPOOL_ENOTFOUND)
            log_error("%s: cannot read from the spool: %s", qid, spool_strerror(rc));
        return;
    }
    for (i = 0; i < msg->nrcpts && !routed; i++)
        routed = msg->rcpts[i].status == SPOOL_RCPT_PENDING &&
                 sched_route(sc->cfg, msg, i) != NULL;
    if (!routed) {
        sched_hold(sc, msg, "no upstream route is configured for its recipients");
        return;
    }
    d = sched_delivery_new(sc, msg);
    if ((rc = spool_body_get(sc->sp, id, &d->body, &d->len)) != 0) {
        log_error("%s: cannot read the message body: %s", qid, spool_strerror(rc));
        sched_delivery_free(d);
        return;
    }
    sched_round_next(d);
}

static void sched_run(struct sched *sc)
{
    uint64_t ids[64];
    size_t n = 0, i;
    int room = sc->cfg->workers - sc->nactive;
    int rc;

    if (sc->stopping || room <= 0)
        return;
    /* Ask for a few more than there is room for: some may be in delivery already. */
    if ((rc = spool_due(sc->sp, (int64_t)time(NULL), ids,
                        (size_t)(room + sc->nactive) < 64 ? (size_t)(room + sc->nactive) : 64,
                        &n)) != 0) {
        log_error("spool: cannot read the schedule: %s", spool_strerror(rc));
        return;
    }
    for (i = 0; i < n && sc->nactive < sc->cfg->workers; i++)
        if (!sched_in_delivery(sc, ids[i]))
            sched_start_one(sc, ids[i]);
}

/* ---- failed_retention ---- */

int sched_purge_failed(struct spool *sp, int64_t now, int64_t retention, uint64_t *ids, size_t max,
                       size_t *n)
{
    *n = 0;
    if (max == 0)
        return 0;
    /* One transaction that reads each state itself: a message relayctl retried a moment
     * ago is no longer FAILED and stays. */
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

static void sched_on_tick(uv_timer_t *t)
{
    struct sched *sc = t->data;

    sched_run(sc);
    if ((int64_t)time(NULL) - sc->last_purge >= SCHED_PURGE_EVERY)
        sched_purge_start(sc);
}

struct sched *sched_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp)
{
    struct sched *sc = xcalloc(1, sizeof(*sc));

    sc->loop = loop;
    sc->cfg = cfg;
    sc->sp = sp;
    sc->pool = pool_new(loop, cfg);
    return sc;
}

int sched_start(struct sched *sc, char *err, size_t errlen)
{
    int rc;

    if ((rc = pool_start(sc->pool, err, errlen)) != 0)
        return rc;
    pool_set_on_healthy(sc->pool, sched_on_upstream_healthy, sc);
    sc->pool_open = 1;
    if (sc->cfg->nupstreams == 0)
        log_warn("no upstream is configured: mail is accepted and held in the spool");
    /* Nothing is "in delivery" at start: that state lives only in sc->active, so mail a
     * crash interrupted mid-delivery is simply due (QUEUED/DEFERRED in the spool) and is
     * picked up by the first tick; recipients recorded as sent are not sent again. */
    uv_timer_init(sc->loop, &sc->timer);
    sc->timer.data = sc;
    sc->timer_open = 1;
    uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
    return 0;
}

void sched_reload(struct sched *sc)
{
    if (!sc->stopping)
        pool_reprobe(sc->pool);
}

void sched_kick(struct sched *sc)
{
    if (!sc->stopping && sc->timer_open)
        uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
}

static void sched_on_pool_stopped(void *arg)
{
    struct sched *sc = arg;

    sc->pool_open = 0;
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
    sc->stopping = 1;
    sc->stop_done = done;
    sc->stop_arg = arg;
    /* Every delivery in the pool ends now with SMTPC_DEFER (sched_on_delivered: stays
     * queued); the pool's own sessions close after. */
    if (sc->pool_open)
        pool_stop(sc->pool, sched_on_pool_stopped, sc);
    if (sc->timer_open)
        uv_close((uv_handle_t *)&sc->timer, sched_on_timer_closed);
    else
        sched_maybe_stopped(sc);
}

void sched_free(struct sched *sc)
{
    int i;

    if (sc == NULL)
        return;
    (void)i;
    pool_free(sc->pool);
    while (sc->waiters != NULL) {
        struct sched_waiter *w = sc->waiters;
        sc->waiters = w->next;
        free(w);
    }
    free(sc);
}
