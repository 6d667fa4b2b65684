/*
 * test_pool - the outbound worker pool against auto-answering SMTP servers on 127.0.0.1:
 * connection limits, queueing, reuse (RSET), failover order, health after an AUTH fault
 * and recovery by probe, rate limits and pool_would_accept(, NULL), throttling, stop.
 *
 * The fake server answers every command by its verb (EHLO, AUTH, MAIL, RCPT, DATA, ".",
 * RSET, QUIT) and counts connections and messages.  Each test runs its own loop, bounded.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <criterion/redirect.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/authsasl.h"
#include "common/buf.h"
#include "common/log.h"
#include "common/tlsio.h"
#include "relayd/pool.h"
#include "relayd/upstream.h"

static uv_loop_t loop;

static void walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void setup(void)
{
    char err[256];

    cr_assert(eq(int, tlsio_global_init(err, sizeof(err)), 0));
    cr_assert(eq(int, authsasl_client_init(err, sizeof(err)), 0));
    cr_assert(eq(int, uv_loop_init(&loop), 0));
    if (getenv("POOL_TEST_VERBOSE") != NULL)
        log_set_verbose(2);
}

static void teardown(void)
{
    int rc = uv_loop_close(&loop);

    if (rc != 0) {
        uv_walk(&loop, walk_close, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        uv_loop_close(&loop);
    }
    cr_assert(eq(int, rc, 0), "handles leaked on the test loop");
}

TestSuite(pool, .init = setup, .fini = teardown, .timeout = 30);

/* ---- Auto-answering server ---- */

struct asrv {
    uv_tcp_t listener;
    int port;
    const char *ehlo; /* whole EHLO reply */
    const char *auth; /* reply to AUTH */
    const char *dot;  /* reply to the end of data */
    int accepted, open, max_open, messages, rsets, auths;
    int carried; /* connections that carried at least one MAIL */
};

struct aconn {
    struct asrv *s;
    struct tlsio *io;
    int in_data;
    int closing;
    int mails;
};

static void aconn_closed(void *arg)
{
    struct aconn *a = arg;

    a->s->open--;
    free(a);
}

static void aconn_close(struct aconn *a)
{
    if (!a->closing) {
        a->closing = 1;
        tlsio_close(a->io, aconn_closed, a);
    }
}

static void say(struct aconn *a, const char *text)
{
    tlsio_write(a->io, text, strlen(text));
    tlsio_write(a->io, "\r\n", 2);
}

static void aconn_cb(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct aconn *a = arg;
    struct asrv *s = a->s;
    const char *line;
    size_t n, used;

    if (ev == TLSIO_EOF || ev == TLSIO_ERROR) {
        aconn_close(a);
        return;
    }
    if (ev != TLSIO_DATAIN)
        return;
    while (!a->closing && (used = buf_getline(tlsio_input(io), &line, &n)) > 0) {
        char t[512];

        snprintf(t, sizeof(t), "%.*s", (int)n, line);
        buf_consume(tlsio_input(io), used);
        if (a->in_data) {
            if (strcmp(t, ".") == 0) {
                a->in_data = 0;
                s->messages++;
                say(a, s->dot);
                if (strncmp(s->dot, "421", 3) == 0)
                    aconn_close(a);
            }
        } else if (strncmp(t, "EHLO", 4) == 0) {
            say(a, s->ehlo);
        } else if (strncmp(t, "AUTH", 4) == 0) {
            s->auths++;
            say(a, s->auth);
        } else if (strncmp(t, "MAIL", 4) == 0 || strncmp(t, "RCPT", 4) == 0) {
            if (t[0] == 'M' && a->mails++ == 0)
                s->carried++;
            say(a, "250 2.1.0 Ok");
        } else if (strncmp(t, "RSET", 4) == 0) {
            s->rsets++;
            say(a, "250 2.0.0 Ok");
        } else if (strcmp(t, "DATA") == 0) {
            a->in_data = 1;
            say(a, "354 go");
        } else if (strcmp(t, "QUIT") == 0) {
            say(a, "221 2.0.0 Bye");
            aconn_close(a);
        } else {
            say(a, "502 5.5.2 what?");
        }
    }
}

static void asrv_accept(uv_stream_t *l, int status)
{
    struct asrv *s = l->data;
    struct aconn *a = calloc(1, sizeof(*a));

    cr_assert(eq(int, status, 0));
    a->s = s;
    a->io = tlsio_new(&loop, aconn_cb, a);
    cr_assert(eq(int, uv_accept(l, tlsio_stream(a->io)), 0));
    s->accepted++;
    if (++s->open > s->max_open)
        s->max_open = s->open;
    tlsio_read_start(a->io);
    say(a, "220 auto ESMTP");
}

static void asrv_start(struct asrv *s)
{
    struct sockaddr_storage ss;
    struct sockaddr_in sin;
    int len = sizeof(ss);

    memset(s, 0, sizeof(*s));
    s->ehlo = "250-auto\r\n250-PIPELINING\r\n250 8BITMIME";
    s->auth = "235 2.7.0 Ok";
    s->dot = "250 2.0.0 Ok: queued";
    uv_tcp_init(&loop, &s->listener);
    s->listener.data = s;
    uv_ip4_addr("127.0.0.1", 0, &sin);
    cr_assert(eq(int, uv_tcp_bind(&s->listener, (struct sockaddr *)&sin, 0), 0));
    cr_assert(eq(int, uv_listen((uv_stream_t *)&s->listener, 16, asrv_accept), 0));
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len);
    s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void asrv_stop(struct asrv *s)
{
    uv_close((uv_handle_t *)&s->listener, NULL);
}

/* A port nobody listens on. */
static int dead_port(void)
{
    struct asrv s;
    int port;

    asrv_start(&s);
    port = s.port;
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_NOWAIT);
    return port;
}

/* ---- Configuration by hand ---- */

struct setup {
    struct cfg cfg;
    struct cfg_upstream ups[3];
    struct cfg_route route;
    struct cfg_upstream *failover[2];
};

static void cfg_build(struct setup *st, int nups, const int *ports)
{
    static char *names[] = {"primary", "backup1", "backup2"};
    int i;

    memset(st, 0, sizeof(*st));
    for (i = 0; i < nups; i++) {
        struct cfg_upstream *u = &st->ups[i];
        u->name = names[i];
        u->host = "127.0.0.1";
        u->port = ports[i];
        u->tls = CFG_TLS_NONE;
        u->connect_timeout = 5;
        u->command_timeout = 5;
        u->max_connections = 4;
        u->idle_timeout = 30;
        u->reuse = 1;
    }
    st->cfg.hostname = "relay.test";
    st->cfg.upstreams = st->ups;
    st->cfg.nupstreams = nups;
    st->cfg.upstream_probe_interval = 60;
    st->route.name = "default";
    st->route.upstream = &st->ups[0];
    for (i = 1; i < nups; i++)
        st->failover[i - 1] = &st->ups[i];
    st->route.failover = st->failover;
    st->route.nfailover = nups - 1;
    st->cfg.routes = &st->route;
    st->cfg.nroutes = 1;
}

/* ---- Deliveries ---- */

static const char *rcpt1[] = {"a@example.com", NULL};

struct result {
    int ncalls;
    enum smtpc_status status;
    int config_fault, throttled;
    char reply[512];
    char action[256];
    const char *up;
    enum smtpc_status rcpt0;
};

static void on_done(void *arg, const struct smtpc_result *res)
{
    struct result *r = arg;

    r->ncalls++;
    r->status = res->status;
    r->config_fault = res->config_fault;
    r->throttled = res->throttled;
    r->up = res->up != NULL ? res->up->name : "(none)";
    r->rcpt0 = res->rcpt[0].status;
    snprintf(r->reply, sizeof(r->reply), "%s", res->reply);
    snprintf(r->action, sizeof(r->action), "%s", res->action);
}

static void tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until every result in r[0..n) is in, or ms milliseconds passed. */
static void run_for(struct result *r, int n, int ms)
{
    uv_timer_t t;
    uint64_t end;
    int i, all;

    uv_timer_init(&loop, &t);
    uv_timer_start(&t, tick, 10, 10);
    uv_update_time(&loop);
    end = uv_now(&loop) + (uint64_t)ms;
    for (;;) {
        for (all = 1, i = 0; i < n; i++)
            all &= r[i].ncalls > 0;
        if ((n > 0 && all) || uv_now(&loop) >= end)
            break;
        uv_run(&loop, UV_RUN_ONCE);
    }
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

static int stopped;
static void on_stopped(void *arg)
{
    (void)arg;
    stopped++;
}

static void pool_finish(struct pool *p)
{
    int i;

    stopped = 0;
    pool_stop(p, on_stopped, NULL);
    for (i = 0; i < 100000 && !stopped; i++)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert(eq(int, stopped, 1));
    pool_free(p);
}

static struct pool *pool_up_and_running(struct setup *st)
{
    struct pool *p = pool_new(&loop, &st->cfg, NULL);
    char err[256];

    cr_assert(eq(int, pool_start(p, err, sizeof(err)), 0), "%s", err);
    return p;
}

static struct smtpc_msg msg_n(uint64_t id)
{
    struct smtpc_msg m = {.id = id,
                          .sender = "fax@lan",
                          .rcpts = rcpt1,
                          .nrcpts = 1,
                          .body = "Subject: t\r\n\r\nhi\r\n",
                          .len = 19};
    return m;
}

/* Five messages at once with max_connections = 2: two sessions, the rest queued and sent
 * over the same sessions with RSET between; a later message reuses an idle session. */
Test(pool, limit_queue_reuse)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m[6];
    struct result r[6];
    struct pool_stats ps;
    struct pool *p;
    int i;

    asrv_start(&s);
    cfg_build(&st, 1, &s.port);
    st.ups[0].max_connections = 2;
    p = pool_up_and_running(&st);
    memset(r, 0, sizeof(r));
    for (i = 0; i < 5; i++) {
        m[i] = msg_n((uint64_t)i + 1);
        cr_assert(eq(int, pool_deliver(p, &st.route, &m[i], on_done, &r[i]), 0));
    }
    cr_assert(eq(int, r[0].ncalls, 0), "done must not run inside pool_deliver()");
    pool_get_stats(p, &ps);
    cr_assert(eq(int, ps.queued, 5));
    run_for(r, 5, 10000);
    for (i = 0; i < 5; i++) {
        cr_assert(eq(int, r[i].ncalls, 1));
        cr_assert(eq(int, (int)r[i].status, SMTPC_SENT), "%d: %s", i, r[i].reply);
        cr_assert(eq(str, (char *)r[i].up, "primary"));
    }
    /* Two sessions at most; the second may still be starting when the first has carried
     * everything (loopback is fast), so count from the pool's side too: a session's first
     * message goes without RSET, every later one with it, whichever session carried it. */
    cr_assert(le(int, s.max_open, 2), "max_open %d", s.max_open);
    cr_assert(eq(int, s.messages, 5));
    cr_assert(eq(int, s.rsets, 5 - s.carried), "rsets %d, sessions that carried mail %d",
              s.rsets, s.carried);
    pool_get_stats(p, &ps);
    cr_assert(eq(int, ps.opened, 2));
    run_for(NULL, 0, 200);
    m[5] = msg_n(6);
    cr_assert(eq(int, pool_deliver(p, &st.route, &m[5], on_done, &r[5]), 0));
    run_for(&r[5], 1, 5000);
    cr_assert(eq(int, (int)r[5].status, SMTPC_SENT));
    pool_get_stats(p, &ps);
    cr_assert(eq(int, ps.opened, 2), "an idle session is reused");
    cr_assert(eq(int, s.accepted, 2));
    cr_assert(eq(int, ps.transactions, 6));
    cr_assert(eq(int, ps.idle, 2));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert(eq(int, s.open, 0), "idle sessions said QUIT at stop");
}

/* reuse = no: a new session per message. */
Test(pool, no_reuse)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m[2];
    struct result r[2];
    struct pool *p;

    asrv_start(&s);
    cfg_build(&st, 1, &s.port);
    st.ups[0].reuse = 0;
    st.ups[0].max_connections = 1;
    p = pool_up_and_running(&st);
    memset(r, 0, sizeof(r));
    m[0] = msg_n(1);
    m[1] = msg_n(2);
    pool_deliver(p, &st.route, &m[0], on_done, &r[0]);
    pool_deliver(p, &st.route, &m[1], on_done, &r[1]);
    run_for(r, 2, 10000);
    cr_assert(eq(int, (int)r[1].status, SMTPC_SENT), "%s", r[1].reply);
    cr_assert(eq(int, s.accepted, 2));
    cr_assert(eq(int, s.rsets, 0));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
}

/* Primary and first backup unreachable: the second backup delivers, in that order. */
Test(pool, failover_order)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m = msg_n(1);
    struct result r;
    struct pool *p;
    int ports[3];

    cr_redirect_stderr();
    ports[0] = dead_port();
    ports[1] = dead_port();
    asrv_start(&s);
    ports[2] = s.port;
    cfg_build(&st, 3, ports);
    p = pool_up_and_running(&st);
    memset(&r, 0, sizeof(r));
    cr_assert(eq(int, pool_deliver(p, &st.route, &m, on_done, &r), 0));
    run_for(&r, 1, 10000);
    cr_assert(eq(int, (int)r.status, SMTPC_SENT), "%s", r.reply);
    cr_assert(eq(str, (char *)r.up, "backup2"));
    cr_assert(eq(int, s.messages, 1));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
    fflush(stderr);
    cr_assert_stderr_neq_str("");
}

/* No failover and nobody listening: deferred with the connect error, not a fault. */
Test(pool, unreachable_without_failover)
{
    struct setup st;
    struct smtpc_msg m = msg_n(1);
    struct result r;
    struct pool *p;
    int port;

    cr_redirect_stderr();
    port = dead_port();
    cfg_build(&st, 1, &port);
    p = pool_up_and_running(&st);
    memset(&r, 0, sizeof(r));
    pool_deliver(p, &st.route, &m, on_done, &r);
    run_for(&r, 1, 10000);
    cr_assert(eq(int, (int)r.status, SMTPC_DEFER));
    cr_assert(eq(int, r.config_fault, 0));
    cr_assert_not_null(strstr(r.reply, "connection refused"), "%s", r.reply);
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 1));
    pool_finish(p);
}

/* AUTH refused with 535 5.7.139: a configuration fault; the upstream turns unhealthy, mail
 * is held (config_fault, the action), would_accept says no; once the account is fixed a
 * probe makes it healthy again by itself. */
Test(pool, auth_fault_unhealthy_then_probe_recovers)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m[2] = {msg_n(1), msg_n(2)};
    struct result r[2];
    struct pool *p;
    struct upstream *u;
    char line[600];
    int i;

    cr_redirect_stderr();
    asrv_start(&s);
    s.ehlo = "250-auto\r\n250 AUTH PLAIN LOGIN";
    s.auth = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled";
    cfg_build(&st, 1, &s.port);
    st.ups[0].username = "dev@corp.example";
    st.ups[0].password = "secret";
    st.ups[0].allow_plaintext_auth = 1;
    st.cfg.upstream_probe_interval = 1;
    p = pool_up_and_running(&st);
    memset(r, 0, sizeof(r));
    pool_deliver(p, &st.route, &m[0], on_done, &r[0]);
    run_for(&r[0], 1, 10000);
    cr_assert(eq(int, (int)r[0].status, SMTPC_DEFER));
    cr_assert(eq(int, r[0].config_fault, 1));
    cr_assert_not_null(strstr(r[0].action, "Authenticated SMTP"), "%s", r[0].action);
    u = pool_upstream(p, &st.ups[0]);
    cr_assert(eq(int, upstream_is_healthy(u), 0));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 0));
    /* Still handed in: held at once, from the loop, with the reason. */
    cr_assert(eq(int, pool_deliver(p, &st.route, &m[1], on_done, &r[1]), 0));
    cr_assert(eq(int, r[1].ncalls, 0));
    run_for(&r[1], 1, 2000);
    cr_assert(eq(int, r[1].config_fault, 1));
    cr_assert_not_null(strstr(r[1].reply, "upstream primary is unhealthy: "), "%s", r[1].reply);
    cr_assert(eq(int, s.messages, 0));
    /* The administrator fixes the account; the probe notices within a few seconds. */
    s.auth = "235 2.7.0 Authentication successful";
    for (i = 0; i < 50 && !upstream_is_healthy(u); i++)
        run_for(NULL, 0, 100);
    cr_assert(eq(int, upstream_is_healthy(u), 1));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 1));
    upstream_status(u, uv_now(&loop), line, sizeof(line));
    cr_assert(eq(str, line, "healthy"));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
}

/* An AUTH fault on the primary sends the message to the failover upstream. */
Test(pool, auth_fault_fails_over)
{
    struct asrv bad, good;
    struct setup st;
    struct smtpc_msg m = msg_n(1);
    struct result r;
    struct pool *p;
    int ports[2];

    cr_redirect_stderr();
    asrv_start(&bad);
    bad.ehlo = "250-auto\r\n250 AUTH PLAIN";
    bad.auth = "535 5.7.8 Error: authentication failed";
    asrv_start(&good);
    ports[0] = bad.port;
    ports[1] = good.port;
    cfg_build(&st, 2, ports);
    st.ups[0].username = "u";
    st.ups[0].password = "p";
    st.ups[0].allow_plaintext_auth = 1;
    p = pool_up_and_running(&st);
    memset(&r, 0, sizeof(r));
    pool_deliver(p, &st.route, &m, on_done, &r);
    run_for(&r, 1, 10000);
    cr_assert(eq(int, (int)r.status, SMTPC_SENT), "%s", r.reply);
    cr_assert(eq(str, (char *)r.up, "backup1"));
    cr_assert(eq(int, upstream_is_healthy(pool_upstream(p, &st.ups[0])), 0));
    pool_finish(p);
    asrv_stop(&bad);
    asrv_stop(&good);
    uv_run(&loop, UV_RUN_DEFAULT);
}

/* max_messages_per_minute = 1: the second message waits in memory, would_accept says no,
 * and stopping hands it back as deferred. */
Test(pool, rate_limit_would_accept)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m[2] = {msg_n(1), msg_n(2)};
    struct result r[2];
    struct pool_stats ps;
    struct pool *p;

    asrv_start(&s);
    cfg_build(&st, 1, &s.port);
    st.ups[0].max_messages_per_minute = 1;
    p = pool_up_and_running(&st);
    memset(r, 0, sizeof(r));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 1));
    pool_deliver(p, &st.route, &m[0], on_done, &r[0]);
    run_for(&r[0], 1, 5000);
    cr_assert(eq(int, (int)r[0].status, SMTPC_SENT));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 0));
    pool_deliver(p, &st.route, &m[1], on_done, &r[1]);
    run_for(&r[1], 1, 300);
    cr_assert(eq(int, r[1].ncalls, 0), "over the rate: it waits");
    pool_get_stats(p, &ps);
    cr_assert(eq(int, ps.queued, 1));
    stopped = 0;
    pool_stop(p, on_stopped, NULL);
    cr_assert(eq(int, r[1].ncalls, 1), "stop hands it back at once");
    cr_assert(eq(str, r[1].reply, "delivery aborted (shutting down)"));
    for (int i = 0; i < 100000 && !stopped; i++)
        uv_run(&loop, UV_RUN_ONCE);
    pool_free(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert(eq(int, s.messages, 1));
}

/* A 421 4.7.0 throttle pauses the whole upstream: would_accept says no. */
Test(pool, throttle_pauses_upstream)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m = msg_n(1);
    struct result r;
    struct pool *p;

    cr_redirect_stderr();
    asrv_start(&s);
    s.dot = "421 4.7.0 Too many messages, rate limit exceeded, closing connection";
    cfg_build(&st, 1, &s.port);
    p = pool_up_and_running(&st);
    memset(&r, 0, sizeof(r));
    pool_deliver(p, &st.route, &m, on_done, &r);
    run_for(&r, 1, 5000);
    cr_assert(eq(int, (int)r.status, SMTPC_DEFER));
    cr_assert(eq(int, r.throttled, 1));
    cr_assert(eq(int, r.config_fault, 0));
    cr_assert(gt(u64, upstream_paused_until(pool_upstream(p, &st.ups[0]), uv_now(&loop)), 0));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 0));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
}

/* One session's "421 4.7.0 Service not available" defers its message only: the upstream is
 * not paused (a pause needs words naming a rate, or a failed cohort of sessions). */
Test(pool, one_421_does_not_pause)
{
    struct asrv s;
    struct setup st;
    struct smtpc_msg m = msg_n(1);
    struct result r;
    struct pool *p;

    cr_redirect_stderr();
    asrv_start(&s);
    s.dot = "421 4.7.0 Service not available, closing transmission channel";
    cfg_build(&st, 1, &s.port);
    p = pool_up_and_running(&st);
    memset(&r, 0, sizeof(r));
    pool_deliver(p, &st.route, &m, on_done, &r);
    run_for(&r, 1, 5000);
    cr_assert(eq(int, (int)r.status, SMTPC_DEFER));
    cr_assert(eq(int, r.throttled, 0));
    cr_assert(eq(int, r.config_fault, 0));
    cr_assert(eq(u64, upstream_paused_until(pool_upstream(p, &st.ups[0]), uv_now(&loop)), 0));
    cr_assert(eq(int, pool_would_accept(p, &st.route, NULL), 1));
    pool_finish(p);
    asrv_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
}
