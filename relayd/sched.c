/*
 * sched - the delivery scheduler; see sched.h.
 *
 * Happy path: tick or kick -> spool_due() -> for each id not already in delivery, load the
 * envelope and body, choose the upstream by the route of the first pending recipient,
 * start smtpc with the recipients routed there; on completion write the result with
 * spool_update_async() (the writer thread makes it durable) and log one line per
 * recipient, Postfix style: "ID: to=<a@b> relay=provider[host]:587 tls=... status=sent
 * (250 2.0.0 Ok: queued as 3B1F0)".
 *
 * Failure modes: 4xx, network and TLS failures defer with exponential backoff; 5xx fails
 * the recipients concerned; a message older than max_lifetime fails as expired.  A
 * message whose recipients have no route any more is held, with the reason.
 */
#include "relayd/sched.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/smtpc.h"

#define SCHED_TICK_MS 1000

struct sched_delivery {
    struct sched *sc;
    struct spool_msg *msg;
    const struct cfg_upstream *up;
    char *body;
    size_t len;
    const char **rcpts;      /* the recipients sent in this attempt */
    size_t *rcpt_index;      /* their index in msg->rcpts */
    size_t nrcpts;
    struct smtpc_msg m;      /* what smtpc delivers; must live until its done callback */
    struct smtpc *client;
    time_t started;
    struct sched_delivery *next;
};

struct sched {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct spool *sp;
    uv_timer_t timer;
    struct tlsio_cred **creds; /* per upstream, NULL for tls = none */
    struct sched_delivery *active;
    int nactive;
    int stopping;
    int timer_open;
    void (*stop_done)(void *arg);
    void *stop_arg;
};

int64_t sched_backoff(int attempts, int first, int max, unsigned rnd)
{
    int64_t delay = first;
    int i;

    for (i = 1; i < attempts && delay < max; i++)
        delay *= 2;
    if (delay > max)
        delay = max;
    /* +-10% jitter */
    delay += (int64_t)((double)delay * (((double)(rnd % 2001) - 1000.0) / 10000.0));
    return delay < 1 ? 1 : delay;
}

static int sched_in_delivery(const struct sched *sc, uint64_t id)
{
    const struct sched_delivery *d;

    for (d = sc->active; d != NULL; d = d->next)
        if (d->msg->id == id)
            return 1;
    return 0;
}

static int sched_upstream_index(const struct sched *sc, const struct cfg_upstream *up)
{
    return (int)(up - sc->cfg->upstreams);
}

static void sched_maybe_stopped(struct sched *sc)
{
    if (sc->stopping && sc->nactive == 0 && !sc->timer_open && sc->stop_done != NULL) {
        void (*done)(void *) = sc->stop_done;
        sc->stop_done = NULL;
        done(sc->stop_arg);
    }
}

static void sched_delivery_free(struct sched_delivery *d)
{
    struct sched *sc = d->sc;
    struct sched_delivery **pp;

    for (pp = &sc->active; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == d) {
            *pp = d->next;
            break;
        }
    }
    sc->nactive--;
    spool_msg_free(d->msg);
    free(d->body);
    free(d->rcpts);
    free(d->rcpt_index);
    free(d);
}

/* The result is durable: only now may the message be picked again (until then spool_due()
 * still shows it, and picking it would deliver it twice). */
static void sched_update_done(void *arg, int rc)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    char qid[17];

    if (rc != 0)
        log_error("%s: could not record the delivery result: %s", spool_id_str(d->msg->id, qid),
                  spool_strerror(rc));
    sched_delivery_free(d);
    if (sc->stopping)
        sched_maybe_stopped(sc);
    else
        sched_kick(sc);
}

static const char *sched_status_word(enum smtpc_status st)
{
    return st == SMTPC_SENT ? "sent" : st == SMTPC_FAIL ? "bounced" : "deferred";
}

static void sched_on_delivered(void *arg, const struct smtpc_result *res)
{
    struct sched_delivery *d = arg;
    struct sched *sc = d->sc;
    struct spool_msg *msg = d->msg;
    struct spool_update u;
    enum spool_rcpt_status *st = xcalloc(d->nrcpts, sizeof(*st));
    const char **replies = xcalloc(d->nrcpts, sizeof(*replies));
    char qid[17], result[768];
    time_t now = time(NULL);
    size_t i, pending = 0, failed = 0;
    int any_sent = 0;

    spool_id_str(msg->id, qid);
    d->client = NULL;
    if (sc->stopping && res->status == SMTPC_DEFER) {
        /* Aborted by shutdown: not a failed attempt; it stays due as it was. */
        log_info("%s: delivery interrupted by shutdown; it stays queued", qid);
        free(st);
        free(replies);
        sched_delivery_free(d);
        sched_maybe_stopped(sc);
        return;
    }
    for (i = 0; i < d->nrcpts; i++) {
        enum smtpc_status rs = res->status == SMTPC_SENT ? res->rcpt_status[i] : res->status;
        const char *reply =
            (res->status == SMTPC_SENT || res->status == SMTPC_FAIL) && res->rcpt_reply != NULL &&
                    res->rcpt_reply[i] != NULL && rs != SMTPC_SENT
                ? res->rcpt_reply[i]
                : res->reply;
        /* A 5xx to MAIL/DATA fails everyone; a recipient refused at RCPT keeps its reply. */
        if (res->status == SMTPC_FAIL && res->rcpt_status != NULL &&
            res->rcpt_status[i] == SMTPC_FAIL && res->rcpt_reply != NULL &&
            res->rcpt_reply[i] != NULL)
            reply = res->rcpt_reply[i];
        st[i] = rs == SMTPC_SENT ? SPOOL_RCPT_SENT
                : rs == SMTPC_FAIL ? SPOOL_RCPT_FAILED
                                   : SPOOL_RCPT_PENDING;
        replies[i] = reply;
        any_sent |= rs == SMTPC_SENT;
        log_info("%s: to=<%s> relay=%s[%s]:%d delay=%lld tls=%s status=%s (%s)", qid, d->rcpts[i],
                 d->up->name, d->up->host, d->up->port, (long long)(now - msg->arrived),
                 res->tls[0] ? res->tls : "none", sched_status_word(rs), reply);
    }
    /* What is left after this attempt, counting recipients of other routes too. */
    for (i = 0; i < msg->nrcpts; i++) {
        enum spool_rcpt_status s = msg->rcpts[i].status;
        for (size_t j = 0; j < d->nrcpts; j++)
            if (d->rcpt_index[j] == i)
                s = st[j];
        pending += s == SPOOL_RCPT_PENDING;
        failed += s == SPOOL_RCPT_FAILED;
    }

    memset(&u, 0, sizeof(u));
    u.id = msg->id;
    u.count_attempt = 1;
    u.upstream = d->up->name;
    snprintf(result, sizeof(result), "%s: %s", sched_status_word(res->status), res->reply);
    u.result = result;
    u.nrcpts = d->nrcpts;
    u.rcpt_index = d->rcpt_index;
    u.rcpt_status = st;
    u.rcpt_reply = replies;
    if (pending > 0) {
        if (now - msg->arrived >= sc->cfg->max_lifetime) {
            /* Expired: fail whoever is still pending. */
            for (i = 0; i < d->nrcpts; i++)
                if (st[i] == SPOOL_RCPT_PENDING)
                    st[i] = SPOOL_RCPT_FAILED;
            u.state = SPOOL_FAILED;
            u.last_error = "expired: could not be delivered within max_lifetime";
            log_warn("%s: expired after %lld seconds in the spool: %s", qid,
                     (long long)(now - msg->arrived), res->reply);
        } else {
            int64_t delay = sched_backoff(msg->attempts + 1, sc->cfg->retry_first,
                                          sc->cfg->retry_max, (unsigned)rand());
            u.state = SPOOL_DEFERRED;
            u.next_attempt = now + delay;
            u.last_error = res->reply;
            if (res->config_fault)
                log_warn("%s: upstream %s needs the administrator's attention: %s", qid,
                         d->up->name, res->reply);
        }
    } else if (failed > 0) {
        u.state = SPOOL_FAILED;
        u.last_error = res->status == SMTPC_SENT ? "some recipients were refused" : res->reply;
    } else {
        u.state = SPOOL_QUEUED; /* every recipient done: the spool removes the message */
        log_info("%s: removed", qid);
    }
    (void)any_sent;
    spool_update_async(sc->sp, &u, sched_update_done, d); /* d stays busy until then */
    free(st);
    free(replies);
}

/* Holds msg (taken over) with the reason; it stays busy until the update is durable. */
static void sched_hold(struct sched *sc, struct spool_msg *msg, const char *why)
{
    struct sched_delivery *d = xcalloc(1, sizeof(*d));
    struct spool_update u;
    char qid[17];

    log_warn("%s: held: %s", spool_id_str(msg->id, qid), why);
    d->sc = sc;
    d->msg = msg;
    d->next = sc->active;
    sc->active = d;
    sc->nactive++;
    memset(&u, 0, sizeof(u));
    u.id = msg->id;
    u.state = SPOOL_HELD;
    u.last_error = why;
    spool_update_async(sc->sp, &u, sched_update_done, d);
}

static void sched_start_one(struct sched *sc, uint64_t id)
{
    struct sched_delivery *d;
    struct spool_msg *msg;
    const struct cfg_route *route = NULL;
    char qid[17];
    size_t i;
    int rc;

    spool_id_str(id, qid);
    if ((rc = spool_msg_get(sc->sp, id, 0, &msg)) != 0) {
        if (rc != SPOOL_ENOTFOUND)
            log_error("%s: cannot read from the spool: %s", qid, spool_strerror(rc));
        return;
    }
    for (i = 0; i < msg->nrcpts && route == NULL; i++)
        if (msg->rcpts[i].status == SPOOL_RCPT_PENDING)
            route = cfg_route_find(sc->cfg, msg->sender, msg->rcpts[i].addr);
    if (route == NULL) {
        sched_hold(sc, msg, "no upstream route is configured for its recipients");
        return;
    }
    d = xcalloc(1, sizeof(*d));
    d->sc = sc;
    d->msg = msg;
    d->up = route->upstream;
    d->rcpts = xcalloc(msg->nrcpts, sizeof(*d->rcpts));
    d->rcpt_index = xcalloc(msg->nrcpts, sizeof(*d->rcpt_index));
    for (i = 0; i < msg->nrcpts; i++) {
        const struct cfg_route *r;
        if (msg->rcpts[i].status != SPOOL_RCPT_PENDING)
            continue;
        r = cfg_route_find(sc->cfg, msg->sender, msg->rcpts[i].addr);
        if (r == NULL || r->upstream != d->up)
            continue; /* another route: a later attempt takes it */
        d->rcpts[d->nrcpts] = msg->rcpts[i].addr;
        d->rcpt_index[d->nrcpts++] = i;
    }
    if ((rc = spool_body_get(sc->sp, id, &d->body, &d->len)) != 0) {
        log_error("%s: cannot read the message body: %s", qid, spool_strerror(rc));
        d->next = sc->active;
        sc->active = d;
        sc->nactive++;
        sched_delivery_free(d);
        return;
    }
    d->started = time(NULL);
    d->next = sc->active;
    sc->active = d;
    sc->nactive++;
    d->m.id = id;
    d->m.sender = msg->sender;
    d->m.rcpts = d->rcpts;
    d->m.nrcpts = d->nrcpts;
    d->m.body = d->body;
    d->m.len = d->len;
    log_debug(1, "%s: delivering to upstream %s (%zu recipients)", qid, d->up->name, d->nrcpts);
    rc = smtpc_deliver(sc->loop, d->up, sc->creds[sched_upstream_index(sc, d->up)],
                       sc->cfg->hostname, &d->m, sched_on_delivered, d, &d->client);
    if (rc != 0) {
        log_error("%s: cannot start delivery: %s", qid, uv_strerror(rc));
        sched_delivery_free(d);
    }
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

static void sched_on_tick(uv_timer_t *t)
{
    sched_run(t->data);
}

struct sched *sched_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp)
{
    struct sched *sc = xcalloc(1, sizeof(*sc));

    sc->loop = loop;
    sc->cfg = cfg;
    sc->sp = sp;
    sc->creds = xcalloc((size_t)cfg->nupstreams + 1, sizeof(*sc->creds));
    return sc;
}

int sched_start(struct sched *sc, char *err, size_t errlen)
{
    char e[256];
    int i, rc;

    for (i = 0; i < sc->cfg->nupstreams; i++) {
        const struct cfg_upstream *up = &sc->cfg->upstreams[i];
        if (up->tls == CFG_TLS_NONE)
            continue;
        if ((rc = tlsio_cred_client_new(up->ca_file, up->tls_priority, &sc->creds[i], e,
                                        sizeof(e))) != 0) {
            snprintf(err, errlen, "upstream %s: %s", up->name, e);
            return rc;
        }
    }
    if (sc->cfg->nupstreams == 0)
        log_warn("no upstream is configured: mail is accepted and held in the spool");
    uv_timer_init(sc->loop, &sc->timer);
    sc->timer.data = sc;
    sc->timer_open = 1;
    uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
    return 0;
}

void sched_kick(struct sched *sc)
{
    if (!sc->stopping && sc->timer_open)
        uv_timer_start(&sc->timer, sched_on_tick, 0, SCHED_TICK_MS);
}

static void sched_on_timer_closed(uv_handle_t *h)
{
    struct sched *sc = h->data;

    sc->timer_open = 0;
    sched_maybe_stopped(sc);
}

void sched_stop(struct sched *sc, void (*done)(void *arg), void *arg)
{
    struct sched_delivery *d, *next;

    sc->stopping = 1;
    sc->stop_done = done;
    sc->stop_arg = arg;
    for (d = sc->active; d != NULL; d = next) {
        next = d->next;
        if (d->client != NULL)
            smtpc_abort(d->client); /* calls sched_on_delivered: stays queued */
    }
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
    for (i = 0; i < sc->cfg->nupstreams; i++)
        tlsio_cred_free(sc->creds[i]);
    free(sc->creds);
    free(sc);
}
