/*
 * pool - the outbound worker pool; see pool.h.
 *
 * Per upstream (struct pool_up): the list of sessions (struct pool_conn, one smtpc session
 * each), a FIFO of requests waiting in memory, a wake-up timer for rate windows and
 * throttle pauses, and a probe timer while unhealthy.  Every state change (a session ready,
 * idle, failed or closed; a new request; a window opening) only records what happened and
 * arms the pool's kick timer; pool_dispatch() then matches queued requests to sessions from
 * the loop.  So no callback of ours ever runs inside pool_deliver(), and smtpc callbacks
 * never re-enter smtpc.
 *
 * Happy path: pool_deliver() -> queue -> dispatch: idle session? send : open a session (up
 * to max_connections) -> SMTPC_EV_READY -> dispatch -> smtpc_session_send() -> done ->
 * the scheduler's done -> SMTPC_EV_IDLE -> dispatch (next message, or idle until
 * idle_timeout).
 *
 * Failure modes: set-up failure with no working session left -> every queued request moves
 * to its next candidate upstream (or finishes with the failure); configuration fault ->
 * unhealthy + probe; throttle -> pause; a reused session found stale -> the message is
 * retried once at the head of the queue, not counted as an attempt.
 */
#include "relayd/pool.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/apisend.h"
#include "relayd/metrics.h"
#include "relayd/upstream.h"

#define POOL_PROBE_INTERVAL_DEFAULT 60
/* After a session could not be set up, no new one to that upstream for this long (a
 * provider refusing extra connections must not see a reconnect storm). */
#define POOL_REOPEN_DELAY_MS 5000

struct pool_up;

/* One recipient of the caller's message: its verdict once final for this delivery. */
struct pool_rcpt {
    int final;
    enum smtpc_status status;
    enum verdict_cause cause;
    char *reply, *action, *tls; /* owned */
    const struct cfg_upstream *up;
};

struct pool_req {
    struct pool *p;
    const struct cfg_route *route;
    const struct smtpc_msg *msg; /* the caller's */
    smtpc_done_fn done;
    void *arg;
    int cand;                 /* 0: route->upstream, i: route->failover[i - 1] */
    int retried;              /* retried once after a stale session */
    struct smtpc_result last; /* why the previous candidate failed (no arrays) */
    int have_last;
    /* What goes to the next transaction: msg's recipients without a final verdict (all of
     * them at first).  A failover re-offers only recipients that got a CONFIG verdict,
     * never one an upstream accepted or refused for good. */
    struct smtpc_msg sub;
    const char **sub_rcpts;
    unsigned *sub_notify;
    const char **sub_orcpt;
    size_t *sub_index; /* sub slot -> index in msg */
    struct pool_rcpt *rc; /* msg->nrcpts */
    STAILQ_ENTRY(pool_req) link; /* in its upstream's queue or p->finished, or in none */
};

struct pool_conn {
    struct pool_up *pu;
    struct smtpc *c;
    struct apisend *api; /* instead of c for transport = graph | gmail (relayd/apisend.h) */
    int ready;            /* set-up done */
    int failed;           /* set-up failed: closing */
    struct pool_req *req; /* in transit */
    LIST_ENTRY(pool_conn) link;
};

struct pool_up {
    struct pool *p;
    const struct cfg_upstream *cfg;
    struct upstream *u;
    struct tlsio_cred *cred;
    LIST_HEAD(, pool_conn) conns;
    int nconns, nconnecting;
    STAILQ_HEAD(, pool_req) queue; /* waiting in memory, first in first out */
    int nqueued;
    uint64_t reopen_at; /* no new session before this (after a set-up failure) */
    uv_timer_t wake;
    uv_timer_t probe_timer;
    struct smtpc *probe;
    struct apisend *api_probe; /* the probe of a transport = graph | gmail upstream */
};

/* The session calls, for SMTP (smtpc) and the HTTP APIs (apisend) alike. */
static int conn_idle(const struct pool_conn *conn)
{
    return conn->api != NULL ? apisend_session_idle(conn->api) : smtpc_session_idle(conn->c);
}

static int conn_offered(const struct pool_conn *conn)
{
    return conn->api != NULL ? apisend_session_offered(conn->api)
                             : smtpc_session_offered(conn->c);
}

static void conn_quit(struct pool_conn *conn)
{
    if (conn->api != NULL)
        apisend_session_quit(conn->api);
    else
        smtpc_session_quit(conn->c);
}

static void conn_abort(struct pool_conn *conn)
{
    if (conn->api != NULL)
        apisend_session_abort(conn->api);
    else
        smtpc_session_abort(conn->c);
}

#define PROBING(pu) ((pu)->probe != NULL || (pu)->api_probe != NULL)

struct pool {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct oauth2 *oauth2; /* tokens for OAuth 2.0 upstreams, handed to every session */
    struct pool_up *ups;
    int nups;
    int started;
    uv_timer_t kick;
    uv_timer_t grace; /* stop: how long offered transactions may wait for their reply */
    STAILQ_HEAD(, pool_req) finished; /* to finish from the loop (pool_deliver refusals) */
    int open_handles;
    int stopping;
    void (*stop_done)(void *arg);
    void *stop_arg;
    long opened, transactions;
    void (*on_healthy)(void *arg, const struct cfg_upstream *up);
    void *on_healthy_arg;
};

static void pool_kick(struct pool *p);

static uint64_t pool_now(const struct pool *p)
{
    return uv_now(p->loop);
}

static struct pool_up *pool_up_of(struct pool *p, const struct cfg_upstream *up)
{
    int i;

    for (i = 0; i < p->nups; i++)
        if (p->ups[i].cfg == up)
            return &p->ups[i];
    return NULL;
}

static const struct cfg_upstream *cand_up(const struct cfg_route *r, int cand)
{
    if (cand == 0)
        return r->upstream;
    return cand - 1 < r->nfailover ? r->failover[cand - 1] : NULL;
}

static int pool_up_ok(const struct pool_up *pu)
{
    return pu != NULL && upstream_is_healthy(pu->u);
}

/* Healthy, within its rates, and not just found unreachable: a message could go now. */
static int pool_up_ready(const struct pool_up *pu, size_t nrcpts, uint64_t now)
{
    const struct pool_conn *conn;
    int working = 0;

    if (!pool_up_ok(pu) || upstream_rate_wait(pu->u, nrcpts, now, NULL))
        return 0;
    LIST_FOREACH(conn, &pu->conns, link)
        working += conn->ready && !conn->failed;
    return working > 0 || pu->reopen_at <= now;
}

/* ---- Requests and their recipients ---- */

static struct pool_req *req_new(struct pool *p, const struct cfg_route *route,
                                const struct smtpc_msg *msg, smtpc_done_fn done, void *arg)
{
    struct pool_req *req = xcalloc(1, sizeof(*req));
    size_t n = msg->nrcpts + 1;

    req->p = p;
    req->route = route;
    req->msg = msg;
    req->done = done;
    req->arg = arg;
    req->rc = xcalloc(n, sizeof(*req->rc));
    req->sub_rcpts = xcalloc(n, sizeof(*req->sub_rcpts));
    req->sub_notify = xcalloc(n, sizeof(*req->sub_notify));
    req->sub_orcpt = xcalloc(n, sizeof(*req->sub_orcpt));
    req->sub_index = xcalloc(n, sizeof(*req->sub_index));
    return req;
}

static void req_free(struct pool_req *req)
{
    for (size_t i = 0; i < req->msg->nrcpts; i++) {
        free(req->rc[i].reply);
        free(req->rc[i].action);
        free(req->rc[i].tls);
    }
    free(req->rc);
    free(req->sub_rcpts);
    free(req->sub_notify);
    free(req->sub_orcpt);
    free(req->sub_index);
    free(req);
}

/* Makes req->sub the recipients of msg that have no final verdict yet; their number. */
static size_t req_build_sub(struct pool_req *req)
{
    const struct smtpc_msg *m = req->msg;
    size_t i, n = 0;

    req->sub = *m;
    for (i = 0; i < m->nrcpts; i++) {
        if (req->rc[i].final)
            continue;
        req->sub_rcpts[n] = m->rcpts[i];
        req->sub_notify[n] = m->dsn_notify != NULL ? m->dsn_notify[i] : 0;
        req->sub_orcpt[n] = m->dsn_orcpt != NULL ? m->dsn_orcpt[i] : NULL;
        req->sub_index[n++] = i;
    }
    req->sub.rcpts = req->sub_rcpts;
    req->sub.nrcpts = n;
    req->sub.dsn_notify = m->dsn_notify != NULL ? req->sub_notify : NULL;
    req->sub.dsn_orcpt = m->dsn_orcpt != NULL ? req->sub_orcpt : NULL;
    return n;
}

/* Makes rc final with the given verdict (strings copied). */
static void rcpt_set(struct pool_rcpt *rc, enum smtpc_status st, enum verdict_cause cause,
                     const char *reply, const char *action, const char *tls,
                     const struct cfg_upstream *up)
{
    rc->final = 1;
    rc->status = st;
    rc->cause = cause;
    free(rc->reply);
    free(rc->action);
    free(rc->tls);
    rc->reply = xstrdup(reply != NULL ? reply : "");
    rc->action = action != NULL && action[0] != '\0' ? xstrdup(action) : NULL;
    rc->tls = xstrdup(tls != NULL ? tls : "");
    rc->up = up;
}

/*
 * Calls done with one verdict per recipient of the caller's message: the one an earlier
 * upstream of this delivery gave (req->rc, before a failover), else its own in res (the
 * last transaction's, for the recipients it carried), else res's as a whole (a failure
 * without a transaction).  Nothing is copied: res lives until done returns.
 */
static void req_finish(struct pool_req *req, const struct smtpc_result *res)
{
    size_t n = req->msg->nrcpts, i, j, nsent = 0, nfail = 0;
    struct smtpc_result r = *res;
    struct smtpc_rcpt_result *rr = xcalloc(n + 1, sizeof(*rr));
    const struct cfg_upstream *up = res->up != NULL ? res->up : cand_up(req->route, req->cand);

    for (i = 0; i < n; i++) {
        const struct pool_rcpt *rc = &req->rc[i];

        if (rc->final) {
            rr[i] = (struct smtpc_rcpt_result){rc->status, rc->cause, rc->reply, rc->action,
                                               rc->up, rc->tls};
        } else {
            rr[i] = (struct smtpc_rcpt_result){res->status, res->cause, res->reply,
                                               res->action[0] != '\0' ? res->action : NULL, up,
                                               res->tls};
        }
    }
    for (j = 0; j < res->nrcpts && j < req->sub.nrcpts; j++)
        if (!req->rc[req->sub_index[j]].final)
            rr[req->sub_index[j]] = res->rcpt[j];
    for (i = 0; i < n; i++) {
        nsent += rr[i].status == SMTPC_SENT;
        nfail += rr[i].status == SMTPC_FAIL;
    }
    r.nrcpts = n;
    r.rcpt = rr;
    if (nsent == n)
        r.status = SMTPC_SENT;
    else if (nfail == n)
        r.status = SMTPC_FAIL;
    else if (r.status == SMTPC_SENT)
        r.status = SMTPC_DEFER; /* some recipients are still to go */
    if (r.up == NULL)
        r.up = cand_up(req->route, req->cand);
    req->done(req->arg, &r);
    free(rr);
    req_free(req);
}

static void req_fail_now(struct pool_req *req, int config_fault, const char *action,
                         const struct cfg_upstream *up, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void req_fail_now(struct pool_req *req, int config_fault, const char *action,
                         const struct cfg_upstream *up, const char *fmt, ...)
{
    struct smtpc_result r;
    va_list ap;

    memset(&r, 0, sizeof(r));
    r.status = SMTPC_DEFER;
    r.cause = config_fault ? VERDICT_CONFIG : VERDICT_TRANSIENT;
    r.config_fault = config_fault;
    r.up = up;
    snprintf(r.action, sizeof(r.action), "%s", action != NULL ? action : "");
    va_start(ap, fmt);
    vsnprintf(r.reply, sizeof(r.reply), fmt, ap);
    va_end(ap);
    req_finish(req, &r);
}

/* Finishes req from the loop with its recorded result (pool_deliver() must not call done). */
static void req_finish_later(struct pool_req *req)
{
    struct pool *p = req->p;

    STAILQ_INSERT_TAIL(&p->finished, req, link);
    pool_kick(p);
}

/* ---- Queues ---- */

static void queue_push(struct pool_up *pu, struct pool_req *req, int at_head)
{
    if (at_head)
        STAILQ_INSERT_HEAD(&pu->queue, req, link);
    else
        STAILQ_INSERT_TAIL(&pu->queue, req, link);
    pu->nqueued++;
}

static struct pool_req *queue_pop(struct pool_up *pu)
{
    struct pool_req *req = STAILQ_FIRST(&pu->queue);

    if (req == NULL)
        return NULL;
    STAILQ_REMOVE_HEAD(&pu->queue, link);
    pu->nqueued--;
    return req;
}

/*
 * The candidate req->cand failed (last says why): go on with the next healthy candidate,
 * or finish with last.
 */
static void req_failover(struct pool_req *req, const struct smtpc_result *last)
{
    struct pool *p = req->p;
    const struct cfg_upstream *from = cand_up(req->route, req->cand);
    int cand;

    if (last != NULL) {
        req->last = *last;
        req->last.rcpt = NULL;
        req->last.nrcpts = 0;
        req->have_last = 1;
    }
    if (!p->stopping) {
        for (cand = req->cand + 1; cand_up(req->route, cand) != NULL; cand++) {
            struct pool_up *pu = pool_up_of(p, cand_up(req->route, cand));
            if (!pool_up_ok(pu))
                continue;
            log_info("%012llX: upstream %s failed (%s); trying failover upstream %s for %zu "
                     "recipient%s",
                     (unsigned long long)req->msg->id, from->name,
                     req->have_last ? req->last.reply : upstream_reason(pool_up_of(p, from)->u),
                     pu->cfg->name, req->sub.nrcpts, req->sub.nrcpts == 1 ? "" : "s");
            req->cand = cand;
            queue_push(pu, req, 0);
            pool_kick(p);
            return;
        }
    }
    if (req->have_last) {
        req_finish(req, &req->last);
    } else {
        struct pool_up *pu = pool_up_of(p, from);
        req_fail_now(req, 1, upstream_action(pu->u), from, "upstream %s is unhealthy: %s",
                     from->name, upstream_reason(pu->u));
    }
}

/* ---- Health probes ---- */

static void probe_fire(uv_timer_t *t);

/* Probes an unhealthy upstream every upstream_probe_interval; a paused one too while its
 * pause has longer to run than that (else the pause's end is the probe). */
static void probe_arm(struct pool_up *pu)
{
    int every = pu->p->cfg->upstream_probe_interval;
    uint64_t until = upstream_paused_until(pu->u, pool_now(pu->p));

    if (pu->p->stopping || PROBING(pu))
        return;
    if (every <= 0)
        every = POOL_PROBE_INTERVAL_DEFAULT;
    if (upstream_is_healthy(pu->u) && (until == 0 || until - pool_now(pu->p) <= (uint64_t)every * 1000))
        return;
    if (!uv_is_active((uv_handle_t *)&pu->probe_timer))
        uv_timer_start(&pu->probe_timer, probe_fire, (uint64_t)every * 1000, 0);
}

static void probe_done(void *arg, const struct smtpc_result *res)
{
    struct pool_up *pu = arg;

    pu->probe = NULL;
    pu->api_probe = NULL;
    if (pu->p->stopping)
        return;
    if (res->status == SMTPC_SENT) {
        upstream_set_healthy(pu->u, pool_now(pu->p));
        upstream_session_ok(pu->u, pool_now(pu->p)); /* a pause ends too */
        pool_kick(pu->p);
        if (pu->p->on_healthy != NULL)
            pu->p->on_healthy(pu->p->on_healthy_arg, pu->cfg);
        return;
    }
    log_info("upstream %s: probe failed: %s", pu->cfg->name, res->reply);
    /* A new configuration fault replaces the reason; anything else keeps the old one. */
    if (res->config_fault)
        upstream_set_unhealthy(pu->u, res->reply, res->action, pool_now(pu->p));
    probe_arm(pu);
}

static void probe_fire(uv_timer_t *t)
{
    struct pool_up *pu = t->data;
    int rc;

    if (pu->p->stopping ||
        (upstream_is_healthy(pu->u) && upstream_paused_until(pu->u, pool_now(pu->p)) == 0))
        return;
    log_debug(1, "upstream %s: probing", pu->cfg->name);
    if (pu->cfg->transport != CFG_TRANSPORT_SMTP)
        rc = apisend_probe(pu->p->loop, pu->cfg, pu->p->oauth2, NULL, probe_done, pu,
                           &pu->api_probe);
    else
        rc = smtpc_probe(pu->p->loop, pu->cfg, pu->cred, pu->p->oauth2, pu->p->cfg->hostname, NULL, probe_done, pu,
                     &pu->probe);
    if (rc < 0) {
        pu->probe = NULL;
        pu->api_probe = NULL;
        log_warn("upstream %s: cannot start a probe: %s", pu->cfg->name, uv_strerror(rc));
        probe_arm(pu);
    }
}

/* A configuration fault: unhealthy, probing, its queue moves on. */
static void up_fault(struct pool_up *pu, const struct smtpc_result *res)
{
    struct pool_req *req;

    upstream_set_unhealthy(pu->u, res->reply, res->action[0] != '\0' ? res->action : NULL,
                           pool_now(pu->p));
    probe_arm(pu);
    while ((req = queue_pop(pu)) != NULL)
        req_failover(req, res);
}

/* ---- Sessions ---- */

static void conn_event(void *arg, struct smtpc *c, enum smtpc_event ev,
                       const struct smtpc_result *res);

static void conn_unlink(struct pool_conn *conn)
{
    LIST_REMOVE(conn, link);
    conn->pu->nconns--;
    metrics_on_conn(conn->pu->cfg->name, -1);
}

static void pool_grace_close(struct pool *p);

static void pool_maybe_stopped(struct pool *p)
{
    int i;

    if (!p->stopping || p->stop_done == NULL)
        return;
    for (i = 0; i < p->nups; i++)
        if (p->ups[i].nconns > 0 || PROBING(&p->ups[i]))
            return;
    pool_grace_close(p);
    if (p->open_handles > 0)
        return;
    {
        void (*done)(void *) = p->stop_done;
        p->stop_done = NULL;
        done(p->stop_arg);
    }
}

/* What a finished session or transaction says about the upstream itself. */
static void up_learn(struct pool_up *pu, const struct smtpc_result *res)
{
    struct pool *p = pu->p;
    uint64_t now = pool_now(p);

    metrics_on_session_result(pu->cfg->name, res->reply, res->config_fault, res->setup);
    if (res->throttled)
        upstream_throttle(pu->u, now);
    if (res->session_transient &&
        upstream_session_failed(pu->u, pu->cfg->max_connections > 0 ? pu->cfg->max_connections : 4,
                                (uint64_t)p->cfg->retry_first * 1000,
                                (uint64_t)p->cfg->retry_max * 1000, now))
        probe_arm(pu); /* a probe that works ends the pause early */
    if (res->throttled)
        probe_arm(pu);
    if (!res->throttled && !res->session_transient && !res->config_fault)
        upstream_session_ok(pu->u, now); /* the dialogue ran to its end */
}

static void tx_done(void *arg, const struct smtpc_result *res)
{
    struct pool_conn *conn = arg;
    struct pool_up *pu = conn->pu;
    struct pool *p = pu->p;
    struct pool_req *req = conn->req;
    size_t j, nconfig = 0;

    conn->req = NULL;
    if (res->stale && !req->retried && !p->stopping) {
        /* The reused session had gone stale; nothing was offered: go again, first in line. */
        log_debug(1, "%012llX: session to %s was stale (%s); retrying on another",
                  (unsigned long long)req->msg->id, pu->cfg->name, res->reply);
        req->retried = 1;
        queue_push(pu, req, 1);
        pool_kick(p);
        return;
    }
    if (conn->api != NULL && res->throttled && apisend_retry_after(conn->api) > 0)
        upstream_pause_for(pu->u, (uint64_t)apisend_retry_after(conn->api) * 1000, pool_now(p));
    up_learn(pu, res);
    if (res->config_fault && !p->stopping)
        up_fault(pu, res); /* unhealthy; the rest of its queue moves on */
    /* Each recipient's verdict is final now, except a CONFIG one: another upstream of the
     * route (another account, another connector) may be allowed what this one is not.
     * Only then are the others' verdicts copied to wait for the end of the delivery. */
    for (j = 0; j < res->nrcpts && j < req->sub.nrcpts; j++)
        nconfig += res->rcpt[j].cause == VERDICT_CONFIG;
    if (nconfig > 0 && !p->stopping && cand_up(req->route, req->cand + 1) != NULL) {
        for (j = 0; j < res->nrcpts && j < req->sub.nrcpts; j++) {
            const struct smtpc_rcpt_result *r = &res->rcpt[j];

            if (r->cause != VERDICT_CONFIG)
                rcpt_set(&req->rc[req->sub_index[j]], r->status, r->cause, r->reply, r->action,
                         r->tls, r->up);
        }
        req_build_sub(req);
        req_failover(req, res);
        pool_kick(p);
        return;
    }
    req_finish(req, res);
    pool_kick(p);
}

static void conn_event(void *arg, struct smtpc *c, enum smtpc_event ev,
                       const struct smtpc_result *res)
{
    struct pool_conn *conn = arg;
    struct pool_up *pu = conn->pu;
    struct pool *p = pu->p;
    struct pool_req *req;
    struct pool_conn *o;
    int working = 0;

    (void)c;
    switch (ev) {
    case SMTPC_EV_READY:
        conn->ready = 1;
        pu->nconnecting--;
        pool_kick(p);
        break;
    case SMTPC_EV_FAILED:
        conn->failed = 1;
        pu->nconnecting--;
        pu->reopen_at = pool_now(p) + POOL_REOPEN_DELAY_MS;
        log_warn("upstream %s: cannot set up a session: %s%s%s", pu->cfg->name, res->reply,
                 res->action[0] != '\0' ? "; action: " : "", res->action);
        up_learn(pu, res);
        if (res->config_fault && !p->stopping) {
            up_fault(pu, res);
            break;
        }
        LIST_FOREACH(o, &pu->conns, link)
            working += o->ready && !o->failed;
        /* With no working session left, the queue goes to the failover upstreams (or
         * finishes); sessions still being set up get new requests as they come. */
        if (working == 0) {
            int keep = pu->nconnecting;
            STAILQ_HEAD(, pool_req) kept = STAILQ_HEAD_INITIALIZER(kept);

            while ((req = queue_pop(pu)) != NULL) {
                if (keep > 0 && cand_up(req->route, req->cand + 1) == NULL) {
                    /* No failover for it: let a session still being set up try. */
                    keep--;
                    STAILQ_INSERT_TAIL(&kept, req, link);
                    continue;
                }
                req_failover(req, res);
            }
            while ((req = STAILQ_FIRST(&kept)) != NULL) {
                STAILQ_REMOVE_HEAD(&kept, link);
                queue_push(pu, req, 0);
            }
        }
        pool_kick(p);
        break;
    case SMTPC_EV_IDLE:
        if (!pu->cfg->reuse || p->stopping)
            conn_quit(conn);
        else
            pool_kick(p);
        break;
    case SMTPC_EV_CLOSED:
        if (!conn->ready && !conn->failed)
            pu->nconnecting--;
        conn_unlink(conn);
        free(conn);
        pool_kick(p);
        pool_maybe_stopped(p);
        break;
    }
}

static int conn_open(struct pool_up *pu)
{
    struct pool_conn *conn = xcalloc(1, sizeof(*conn));
    int rc;

    conn->pu = pu;
    if (pu->cfg->transport != CFG_TRANSPORT_SMTP)
        rc = apisend_session_open(pu->p->loop, pu->cfg, pu->p->oauth2, conn_event, conn,
                                  &conn->api);
    else
        rc = smtpc_session_open(pu->p->loop, pu->cfg, pu->cred, pu->p->oauth2, pu->p->cfg->hostname, conn_event, conn,
                            &conn->c);
    if (rc < 0) {
        free(conn);
        return rc;
    }
    LIST_INSERT_HEAD(&pu->conns, conn, link);
    pu->nconns++;
    metrics_on_conn(pu->cfg->name, 1);
    pu->nconnecting++;
    pu->p->opened++;
    log_debug(1, "upstream %s: opening session %d of at most %d", pu->cfg->name, pu->nconns,
              pu->cfg->max_connections);
    return 0;
}

/* ---- Dispatch ---- */

static void wake_fire(uv_timer_t *t)
{
    struct pool_up *pu = t->data;

    pool_kick(pu->p);
}

static void pool_dispatch_up(struct pool_up *pu)
{
    struct pool *p = pu->p;
    uint64_t now = pool_now(p), wait;
    struct pool_req *req;
    struct pool_conn *conn;
    int rc, maxc = pu->cfg->max_connections > 0 ? pu->cfg->max_connections : 4;

    /* Graph allows 4 concurrent requests per mailbox. */
    if (pu->cfg->transport == CFG_TRANSPORT_GRAPH && maxc > 4)
        maxc = 4;

    if (!upstream_is_healthy(pu->u)) {
        while ((req = queue_pop(pu)) != NULL)
            req_failover(req, NULL);
        return;
    }
    while ((req = STAILQ_FIRST(&pu->queue)) != NULL) {
        if (upstream_rate_wait(pu->u, req->sub.nrcpts, now, &wait)) {
            uv_timer_start(&pu->wake, wake_fire, wait, 0);
            return;
        }
        LIST_FOREACH(conn, &pu->conns, link)
            if (conn->ready && !conn->failed && conn->req == NULL && conn_idle(conn))
                break;
        if (conn != NULL) {
            queue_pop(pu);
            conn->req = req;
            upstream_rate_take(pu->u, req->sub.nrcpts, now);
            p->transactions++;
            if (conn->api != NULL)
                apisend_set_failover(conn->api, cand_up(req->route, req->cand + 1) != NULL);
            rc = conn->api != NULL ? apisend_session_send(conn->api, &req->sub, tx_done, conn)
                                   : smtpc_session_send(conn->c, &req->sub, tx_done, conn);
            if (rc < 0) {
                conn->req = NULL;
                queue_push(pu, req, 1);
                return;
            }
            continue;
        }
        if (pu->nconns < maxc && pu->nconnecting < pu->nqueued) {
            if (pu->reopen_at > now) {
                uv_timer_start(&pu->wake, wake_fire, pu->reopen_at - now, 0);
                return;
            }
            if ((rc = conn_open(pu)) < 0) {
                queue_pop(pu);
                req_fail_now(req, 0, NULL, pu->cfg, "cannot start a session to %s: %s",
                             pu->cfg->name, uv_strerror(rc));
            }
            continue;
        }
        return;
    }
}

static void kick_fire(uv_timer_t *t)
{
    struct pool *p = t->data;
    struct pool_req *req;
    int i;

    while ((req = STAILQ_FIRST(&p->finished)) != NULL) {
        STAILQ_REMOVE_HEAD(&p->finished, link);
        req_failover(req, NULL);
    }
    if (p->stopping)
        return;
    for (i = 0; i < p->nups; i++)
        pool_dispatch_up(&p->ups[i]);
}

static void pool_kick(struct pool *p)
{
    if (p->started && !uv_is_closing((uv_handle_t *)&p->kick))
        uv_timer_start(&p->kick, kick_fire, 0, 0);
}

/* ---- Public ---- */

struct pool *pool_new(uv_loop_t *loop, const struct cfg *cfg, struct oauth2 *oauth2)
{
    struct pool *p = xcalloc(1, sizeof(*p));
    int i;

    p->loop = loop;
    p->cfg = cfg;
    p->oauth2 = oauth2;
    p->nups = cfg->nupstreams;
    STAILQ_INIT(&p->finished);
    p->ups = xcalloc((size_t)p->nups + 1, sizeof(*p->ups));
    for (i = 0; i < p->nups; i++) {
        p->ups[i].p = p;
        p->ups[i].cfg = &cfg->upstreams[i];
        p->ups[i].u = upstream_new(&cfg->upstreams[i]);
        STAILQ_INIT(&p->ups[i].queue);
        LIST_INIT(&p->ups[i].conns);
    }
    return p;
}

int pool_start(struct pool *p, char *err, size_t errlen)
{
    char e[256];
    int i, rc;

    for (i = 0; i < p->nups; i++) {
        struct pool_up *pu = &p->ups[i];
        if (pu->cfg->tls == CFG_TLS_NONE)
            continue;
        if ((rc = tlsio_cred_client_new(pu->cfg->ca_file, pu->cfg->tls_priority, &pu->cred, e,
                                        sizeof(e))) != 0) {
            snprintf(err, errlen, "upstream %s: %s", pu->cfg->name, e);
            return rc;
        }
    }
    uv_timer_init(p->loop, &p->kick);
    p->kick.data = p;
    uv_timer_init(p->loop, &p->grace);
    p->grace.data = p;
    p->open_handles = 2;
    for (i = 0; i < p->nups; i++) {
        struct pool_up *pu = &p->ups[i];
        uv_timer_init(p->loop, &pu->wake);
        uv_timer_init(p->loop, &pu->probe_timer);
        pu->wake.data = pu;
        pu->probe_timer.data = pu;
        p->open_handles += 2;
    }
    p->started = 1;
    return 0;
}

int pool_deliver(struct pool *p, const struct cfg_route *route, const struct smtpc_msg *msg,
                 smtpc_done_fn done, void *arg)
{
    struct pool_req *req;
    struct pool_up *first_ok = NULL, *pu;
    int cand, first_cand = 0;
    uint64_t now = pool_now(p);

    if (p->stopping || !p->started)
        return UV_ECANCELED;
    if (route == NULL || route->upstream == NULL || pool_up_of(p, route->upstream) == NULL)
        return UV_EINVAL;
    req = req_new(p, route, msg, done, arg);
    req_build_sub(req);
    /* The first healthy candidate that can send now; else the first healthy one (wait). */
    for (cand = 0; cand_up(route, cand) != NULL; cand++) {
        pu = pool_up_of(p, cand_up(route, cand));
        if (!pool_up_ok(pu))
            continue;
        if (first_ok == NULL) {
            first_ok = pu;
            first_cand = cand;
        }
        if (pool_up_ready(pu, msg->nrcpts, now)) {
            first_ok = pu;
            first_cand = cand;
            break;
        }
    }
    if (first_ok == NULL) {
        /* Every candidate is unhealthy: finish from the loop with the primary's reason. */
        req->cand = 0;
        req_finish_later(req);
        return 0;
    }
    req->cand = first_cand;
    queue_push(first_ok, req, 0);
    pool_kick(p);
    return 0;
}

int pool_would_accept(struct pool *p, const struct cfg_route *route, uint64_t *wait_ms)
{
    uint64_t now = pool_now(p), wait, soonest = 0;
    int cand;

    if (wait_ms != NULL)
        *wait_ms = 0;
    if (p->stopping || route == NULL)
        return 0;
    for (cand = 0; cand_up(route, cand) != NULL; cand++) {
        struct pool_up *pu = pool_up_of(p, cand_up(route, cand));
        if (!pool_up_ok(pu))
            continue;
        if (!upstream_rate_wait(pu->u, 1, now, &wait))
            return 1;
        if (soonest == 0 || wait < soonest)
            soonest = wait;
    }
    if (wait_ms != NULL)
        *wait_ms = soonest;
    return 0;
}

static void kick_closed(uv_handle_t *h)
{
    struct pool *p = h->data;

    p->open_handles--;
    pool_maybe_stopped(p);
}

static void up_timer_closed(uv_handle_t *h)
{
    struct pool_up *pu = h->data;

    pu->p->open_handles--;
    pool_maybe_stopped(pu->p);
}

/* Ends every session; with offered_wait, a session whose transaction sent its final dot
 * keeps waiting for the reply (the upstream may have the message: aborting now would send
 * it again after a restart). */
static void pool_close_sessions(struct pool *p, int offered_wait)
{
    struct pool_conn *conn, *next;
    int i, waiting = 0;

    for (i = 0; i < p->nups; i++) {
        for (conn = LIST_FIRST(&p->ups[i].conns); conn != NULL; conn = next) {
            next = LIST_NEXT(conn, link);
            if (conn->req != NULL && offered_wait && conn_offered(conn)) {
                waiting++;
                continue;
            }
            if (conn->req != NULL || !conn->ready)
                conn_abort(conn); /* tx_done runs now */
            else
                conn_quit(conn);
        }
    }
    if (waiting > 0)
        log_info("stopping: %d deliver%s waiting up to %ds for the reply to the end of data",
                 waiting, waiting == 1 ? "y is" : "ies are", p->cfg->stop_grace);
}

static void grace_fire(uv_timer_t *t)
{
    struct pool *p = t->data;

    pool_close_sessions(p, 0);
}

void pool_stop(struct pool *p, void (*done)(void *arg), void *arg)
{
    struct pool_req *req;
    int i;

    p->stopping = 1;
    p->stop_done = done;
    p->stop_arg = arg;
    while ((req = STAILQ_FIRST(&p->finished)) != NULL) {
        STAILQ_REMOVE_HEAD(&p->finished, link);
        req_fail_now(req, 0, NULL, cand_up(req->route, req->cand), SMTPC_ABORTED);
    }
    for (i = 0; i < p->nups; i++) {
        struct pool_up *pu = &p->ups[i];
        while ((req = queue_pop(pu)) != NULL)
            req_fail_now(req, 0, NULL, pu->cfg, SMTPC_ABORTED);
    }
    pool_close_sessions(p, p->cfg->stop_grace > 0);
    if (p->started && p->cfg->stop_grace > 0)
        uv_timer_start(&p->grace, grace_fire, (uint64_t)p->cfg->stop_grace * 1000, 0);
    for (i = 0; i < p->nups; i++) {
        struct pool_up *pu = &p->ups[i];
        if (pu->probe != NULL)
            smtpc_abort(pu->probe); /* probe_done runs now */
        if (pu->api_probe != NULL)
            apisend_probe_abort(pu->api_probe);
        if (p->started) {
            uv_close((uv_handle_t *)&pu->wake, up_timer_closed);
            uv_close((uv_handle_t *)&pu->probe_timer, up_timer_closed);
        }
    }
    if (p->started)
        uv_close((uv_handle_t *)&p->kick, kick_closed);
    pool_maybe_stopped(p);
}

/* The last session is gone: the grace timer has nothing left to wait for. */
static void pool_grace_close(struct pool *p)
{
    if (p->started && !uv_is_closing((uv_handle_t *)&p->grace))
        uv_close((uv_handle_t *)&p->grace, kick_closed);
}

void pool_free(struct pool *p)
{
    int i;

    if (p == NULL)
        return;
    for (i = 0; i < p->nups; i++) {
        tlsio_cred_free(p->ups[i].cred);
        upstream_free(p->ups[i].u);
    }
    free(p->ups);
    free(p);
}

void pool_carry(struct pool *p, const struct pool *from)
{
    for (int i = 0; i < p->nups; i++)
        for (int j = 0; j < from->nups; j++)
            if (strcmp(p->ups[i].cfg->name, from->ups[j].cfg->name) == 0) {
                upstream_carry(p->ups[i].u, from->ups[j].u);
                p->ups[i].reopen_at = from->ups[j].reopen_at;
                break;
            }
}

struct upstream *pool_upstream(struct pool *p, const struct cfg_upstream *up)
{
    struct pool_up *pu = pool_up_of(p, up);

    return pu != NULL ? pu->u : NULL;
}

void pool_get_stats(const struct pool *p, struct pool_stats *st)
{
    const struct pool_conn *conn;
    int i;

    memset(st, 0, sizeof(*st));
    for (i = 0; i < p->nups; i++) {
        st->sessions += p->ups[i].nconns;
        st->queued += p->ups[i].nqueued;
        LIST_FOREACH(conn, &p->ups[i].conns, link)
            st->idle += conn->ready && conn->req == NULL && conn_idle(conn);
    }
    st->opened = p->opened;
    st->transactions = p->transactions;
}

void pool_set_on_healthy(struct pool *p, void (*fn)(void *arg, const struct cfg_upstream *up),
                         void *arg)
{
    p->on_healthy = fn;
    p->on_healthy_arg = arg;
}

void pool_reprobe(struct pool *p)
{
    int i;

    if (p->stopping || !p->started)
        return;
    for (i = 0; i < p->nups; i++) {
        struct pool_up *pu = &p->ups[i];

        /* An unhealthy upstream is probed now rather than at the end of its interval: the
         * administrator has just fixed something (a reload).  Healthy ones are left be. */
        if (!upstream_is_healthy(pu->u) && !PROBING(pu))
            uv_timer_start(&pu->probe_timer, probe_fire, 0, 0);
    }
}
