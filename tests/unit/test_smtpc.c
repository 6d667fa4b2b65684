/*
 * test_smtpc - the outbound client against a scripted SMTP server on 127.0.0.1.
 *
 * The fake server is a tlsio server following a script of (expected command prefix,
 * reply) steps; "STARTTLS" steps start TLS after the reply, DATA collects the message up
 * to "." and the step after it answers the dot.  Certificates come from certtool in a
 * temporary directory.  Each test runs its own loop, bounded, and checks uv_loop_close().
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/authsasl.h"
#include "common/log.h"
#include "common/tlsio.h"
#include "relayd/smtpc.h"
#include "tests/lib/testlib.h"

static char dir[64];
static uv_loop_t loop;

struct step {
    const char *expect; /* prefix of the command line, "." for the end of DATA */
    const char *reply;  /* NULL: say nothing (to provoke a timeout) */
};

struct fake {
    uv_tcp_t listener;
    int port;
    struct tlsio *io;
    struct tlsio_cred *scred;
    const char *greeting;
    const struct step *script;
    int pos;
    int in_data;
    struct buf *data;  /* the message as received, still dot-stuffed */
    struct buf *lines; /* every command line, "\n"-separated */
    int closed;
    int max_batch; /* most command lines read from one TLSIO_DATAIN (pipelining) */
};

struct outcome {
    size_t nrcpts; /* set before delivering */
    int ncalls;
    enum smtpc_status status;
    int config_fault, throttled;
    char reply[512];
    char tls[128];
    enum smtpc_status rcpt_status[4];
    enum verdict_cause rcpt_cause[4];
    char rcpt_reply[4][256];
};

static void setup(void)
{
    char err[256];

    testlib_tmpdir(dir, sizeof(dir), "test_smtpc");
    testlib_pki(dir);
    cr_assert(eq(int, tlsio_global_init(err, sizeof(err)), 0));
    cr_assert(eq(int, authsasl_client_init(err, sizeof(err)), 0));
    cr_assert(eq(int, uv_loop_init(&loop), 0));
    if (getenv("SMTPC_TEST_VERBOSE") != NULL)
        log_set_verbose(2);
}

static void teardown(void)
{
    int rc = testlib_loop_close(&loop);

    testlib_rmtree(dir);
    cr_assert(eq(int, rc, 0), "handles leaked on the test loop");
}

TestSuite(smtpc, .init = setup, .fini = teardown, .timeout = 30);

/* ---- The fake server ---- */

static void fake_closed(void *arg)
{
    struct fake *f = arg;
    f->closed = 1;
}

static void fake_reply(struct fake *f, const char *line)
{
    const struct step *st = &f->script[f->pos];

    buf_printf(f->lines, "%s\n", line);
    if (st->expect == NULL) {
        cr_fail("unexpected command after the script ended: %s", line);
        tlsio_close(f->io, fake_closed, f);
        return;
    }
    cr_assert(eq(int, strncmp(line, st->expect, strlen(st->expect)), 0), "got \"%s\", want \"%s\"",
              line, st->expect);
    f->pos++;
    if (st->reply == NULL)
        return;
    if (strcmp(st->reply, "CLOSE") == 0) {
        tlsio_close(f->io, fake_closed, f);
        return;
    }
    tlsio_write(f->io, st->reply, strlen(st->reply));
    tlsio_write(f->io, "\r\n", 2);
    if (strcmp(st->expect, "STARTTLS") == 0 && strncmp(st->reply, "220", 3) == 0)
        cr_assert(eq(int, tlsio_starttls(f->io, f->scred, 1, NULL), 0));
    if (strcmp(st->expect, "DATA") == 0 && strncmp(st->reply, "354", 3) == 0)
        f->in_data = 1;
    if (strcmp(st->expect, "QUIT") == 0)
        tlsio_close(f->io, fake_closed, f);
}

static void fake_cb(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct fake *f = arg;
    const char *line;
    size_t n, used;
    char text[1024];
    int batch = 0;

    switch (ev) {
    case TLSIO_DATAIN:
        while (!f->closed && (used = buf_getline(tlsio_input(io), &line, &n)) > 0) {
            if (!f->in_data && ++batch > f->max_batch)
                f->max_batch = batch;
            snprintf(text, sizeof(text), "%.*s", (int)n, line);
            if (f->in_data) {
                if (strcmp(text, ".") == 0) {
                    f->in_data = 0;
                    buf_consume(tlsio_input(io), used);
                    fake_reply(f, ".");
                    continue;
                }
                buf_append(f->data, line, used);
                buf_consume(tlsio_input(io), used);
                continue;
            }
            buf_consume(tlsio_input(io), used);
            fake_reply(f, text);
        }
        break;
    case TLSIO_EOF:
    case TLSIO_ERROR:
        tlsio_close(io, fake_closed, f);
        break;
    default:
        break;
    }
}

static void fake_accept(uv_stream_t *l, int status)
{
    struct fake *f = l->data;

    cr_assert(eq(int, status, 0));
    f->io = tlsio_new(&loop, fake_cb, f);
    cr_assert(eq(int, uv_accept(l, tlsio_stream(f->io)), 0));
    tlsio_read_start(f->io);
    if (f->greeting == NULL) {
        /* Implicit TLS: the greeting follows the handshake. */
        cr_assert(eq(int, tlsio_starttls(f->io, f->scred, 1, NULL), 0));
        tlsio_write(f->io, "220 fake ESMTP\r\n", 16);
    } else {
        tlsio_write(f->io, f->greeting, strlen(f->greeting));
    }
}

static void fake_start(struct fake *f, const struct step *script)
{
    struct sockaddr_storage ss;
    struct sockaddr_in sin;
    char err[256], cert[128], key[128];
    int len = sizeof(ss);

    memset(f, 0, sizeof(*f));
    f->script = script;
    f->greeting = "220 fake ESMTP\r\n";
    f->data = buf_new(0);
    f->lines = buf_new(0);
    snprintf(cert, sizeof(cert), "%s/srv.pem", dir);
    snprintf(key, sizeof(key), "%s/srv.key", dir);
    cr_assert(eq(int, tlsio_cred_server_new(cert, key, NULL, &f->scred, err, sizeof(err)), 0));
    uv_tcp_init(&loop, &f->listener);
    f->listener.data = f;
    uv_ip4_addr("127.0.0.1", 0, &sin);
    cr_assert(eq(int, uv_tcp_bind(&f->listener, (struct sockaddr *)&sin, 0), 0));
    cr_assert(eq(int, uv_listen((uv_stream_t *)&f->listener, 8, fake_accept), 0));
    uv_tcp_getsockname(&f->listener, (struct sockaddr *)&ss, &len);
    f->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void fake_stop(struct fake *f)
{
    if (f->io != NULL && !f->closed)
        tlsio_close(f->io, fake_closed, f);
    uv_close((uv_handle_t *)&f->listener, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    tlsio_cred_free(f->scred);
    buf_free(f->data);
    buf_free(f->lines);
}

/* ---- Running a delivery ---- */

static void tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until *flag reaches want.  A 10 ms tick keeps UV_RUN_ONCE from sleeping
 * in poll until the next long timer after a callback that ran from a timer. */
static void run_until(int *flag, int want)
{
    uv_timer_t t;
    int i;

    uv_timer_init(&loop, &t);
    uv_timer_start(&t, tick, 10, 10);
    for (i = 0; i < 100000 && *flag < want; i++)
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
    cr_assert(ge(int, *flag, want), "the loop ended before the event came");
}

/*
 * One message on its own session, driven the way relayd/pool.c drives a session: open, send
 * the message on SMTPC_EV_READY, quit on SMTPC_EV_IDLE.  A set-up failure (SMTPC_EV_FAILED)
 * reaches done as the pool passes it on (pool.c req_finish()): the failure's verdict for
 * every recipient.
 */
struct oneshot {
    const struct smtpc_msg *msg;
    smtpc_done_fn done;
    void *arg;
    struct smtpc *c; /* NULL once closed */
    int nfailed, closed;
};

static void oneshot_failed(struct oneshot *os, const struct smtpc_result *res)
{
    struct smtpc_rcpt_result rr[4];
    struct smtpc_result r = *res;
    size_t i;

    cr_assert(le(sz, os->msg->nrcpts, 4));
    for (i = 0; i < os->msg->nrcpts; i++) {
        rr[i].status = res->status;
        rr[i].cause = res->cause;
        rr[i].reply = res->reply;
        rr[i].action = res->action[0] != '\0' ? res->action : NULL;
        rr[i].tls = res->tls;
        rr[i].up = res->up;
    }
    r.nrcpts = os->msg->nrcpts;
    r.rcpt = rr;
    os->done(os->arg, &r);
}

static void oneshot_event(void *arg, struct smtpc *c, enum smtpc_event ev,
                          const struct smtpc_result *res)
{
    struct oneshot *os = arg;

    switch (ev) {
    case SMTPC_EV_READY:
        cr_assert(eq(int, smtpc_session_send(c, os->msg, os->done, os->arg), 0));
        break;
    case SMTPC_EV_FAILED:
        os->nfailed++;
        oneshot_failed(os, res);
        break;
    case SMTPC_EV_IDLE:
        smtpc_session_quit(c);
        break;
    case SMTPC_EV_CLOSED:
        os->closed = 1;
        os->c = NULL;
        break;
    }
}

static void oneshot_start(struct oneshot *os, const struct cfg_upstream *up,
                          struct tlsio_cred *cred, const struct smtpc_msg *msg, smtpc_done_fn done,
                          void *arg)
{
    memset(os, 0, sizeof(*os));
    os->msg = msg;
    os->done = done;
    os->arg = arg;
    cr_assert(eq(int,
                 smtpc_session_open(&loop, up, cred, NULL, "relay.test", oneshot_event, os, &os->c),
                 0));
}

/* Delivers msg on a session of its own; returns once the session has closed. */
static void deliver_msg(const struct cfg_upstream *up, struct tlsio_cred *cred,
                        const struct smtpc_msg *msg, smtpc_done_fn done, void *arg)
{
    struct oneshot os;

    oneshot_start(&os, up, cred, msg, done, arg);
    run_until(&os.closed, 1);
}

static void on_done(void *arg, const struct smtpc_result *res)
{
    struct outcome *o = arg;
    size_t i;

    o->ncalls++;
    o->status = res->status;
    o->config_fault = res->config_fault;
    o->throttled = res->throttled;
    snprintf(o->reply, sizeof(o->reply), "%s", res->reply);
    snprintf(o->tls, sizeof(o->tls), "%s", res->tls);
    for (i = 0; i < o->nrcpts; i++) {
        o->rcpt_status[i] = res->rcpt[i].status;
        o->rcpt_cause[i] = res->rcpt[i].cause;
        snprintf(o->rcpt_reply[i], sizeof(o->rcpt_reply[i]), "%s",
                 res->rcpt[i].reply != NULL ? res->rcpt[i].reply : "(null)");
    }
}

static struct cfg_upstream upstream(int port, enum cfg_tls tls)
{
    struct cfg_upstream up;

    memset(&up, 0, sizeof(up));
    up.name = "test";
    up.host = "127.0.0.1";
    up.port = port;
    up.tls = tls;
    up.connect_timeout = 5;
    up.command_timeout = 5;
    return up;
}

static const char *rcpts2[] = {"a@example.com", "b@example.com", NULL, NULL};

static void deliver(const struct cfg_upstream *up, const char *ca, const char *body, size_t nrcpts,
                    struct outcome *o)
{
    struct smtpc_msg msg = {
        .id = 0x190A3F2C1D4,
        .sender = "fax@lan",
        .rcpts = rcpts2,
        .nrcpts = nrcpts,
        .body = body,
        .len = strlen(body),
    };
    struct tlsio_cred *cred = NULL;
    char err[256], path[128];

    memset(o, 0, sizeof(*o));
    o->nrcpts = nrcpts;
    if (ca != NULL) {
        snprintf(path, sizeof(path), "%s/%s", dir, ca);
        cr_assert(eq(int, tlsio_cred_client_new(path, NULL, &cred, err, sizeof(err)), 0));
    }
    deliver_msg(up, cred, &msg, on_done, o);
    cr_assert(eq(int, o->ncalls, 1));
    tlsio_cred_free(cred);
}

/* Issue #9, defect 1: the first RCPT refused as the relay's own fault ("not owned by
 * user"), the second accepted, DATA accepted: the refused one is deferred with its own
 * reply and cause, never "sent"; the upstream is not marked faulty for it. */
Test(smtpc, rcpt_config_fault_is_that_recipient_only)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 8BITMIME"},
        {"MAIL FROM:<fax@lan>", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>",
         "553 5.7.1 <a@example.com>: Sender address rejected: not owned by user dev"},
        {"RCPT TO:<b@example.com>", "250 2.1.5 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.6.0 <x@y> Queued mail for delivery"},
        {"QUIT", "221 2.0.0 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    deliver(&up, NULL, "Subject: x\r\n\r\nbody\r\n", 2, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(eq(int, o.config_fault, 0));
    cr_assert(eq(int, (int)o.rcpt_status[0], SMTPC_DEFER));
    cr_assert(eq(int, (int)o.rcpt_cause[0], VERDICT_CONFIG));
    cr_assert(eq(str, o.rcpt_reply[0],
                 "553 5.7.1 <a@example.com>: Sender address rejected: not owned by user dev"));
    cr_assert(eq(int, (int)o.rcpt_status[1], SMTPC_SENT));
    cr_assert(eq(int, (int)o.rcpt_cause[1], VERDICT_SENT));
    fake_stop(&f);
}

/* Issue #9, defect 3: "452 4.2.2 mailbox quota exceeded" on one RCPT is about that mailbox:
 * that recipient is deferred (transient, counted), nothing asks the upstream to slow down. */
Test(smtpc, rcpt_quota_is_not_a_throttle)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 8BITMIME"},
        {"MAIL FROM:<fax@lan>", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", "452 4.2.2 <a@example.com>: mailbox quota exceeded"},
        {"RCPT TO:<b@example.com>", "250 2.1.5 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as 4D"},
        {"QUIT", "221 2.0.0 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    deliver(&up, NULL, "Subject: x\r\n\r\nbody\r\n", 2, &o);
    cr_assert(eq(int, (int)o.rcpt_status[0], SMTPC_DEFER));
    cr_assert(eq(int, (int)o.rcpt_cause[0], VERDICT_TRANSIENT));
    cr_assert(eq(int, (int)o.rcpt_status[1], SMTPC_SENT));
    cr_assert(eq(int, o.throttled, 0));
    fake_stop(&f);
}

/* Plaintext delivery: dot-stuffing, a final CRLF added, one recipient refused. */
Test(smtpc, plain_delivery_with_one_rcpt_refused)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250-SIZE 1000000\r\n250 8BITMIME"},
        {"MAIL FROM:<fax@lan> SIZE=", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", "250 2.1.5 Ok"},
        {"RCPT TO:<b@example.com>", "550 5.1.1 <b@example.com>: Recipient address rejected"},
        {"DATA", "354 End data with <CR><LF>.<CR><LF>"},
        {".", "250 2.0.0 Ok: queued as 3B1F0"},
        {"QUIT", "221 2.0.0 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    deliver(&up, NULL, "Subject: x\r\n\r\n.hidden\r\n..two\r\nlast", 2, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(eq(str, o.reply, "250 2.0.0 Ok: queued as 3B1F0"));
    cr_assert(eq(str, o.tls, ""));
    cr_assert(eq(int, (int)o.rcpt_status[0], SMTPC_SENT));
    cr_assert(eq(int, (int)o.rcpt_status[1], SMTPC_FAIL));
    cr_assert(eq(str, o.rcpt_reply[1], "550 5.1.1 <b@example.com>: Recipient address rejected"));
    cr_assert(eq(str, f.data->data, "Subject: x\r\n\r\n..hidden\r\n...two\r\nlast\r\n"));
    cr_assert(eq(int, f.pos, 7));
    fake_stop(&f);
}

/* STARTTLS, verification against our CA, EHLO again, AUTH PLAIN, 8BITMIME announced. */
Test(smtpc, starttls_auth_plain)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250-PIPELINING\r\n250 STARTTLS"},
        {"STARTTLS", "220 2.0.0 Ready to start TLS"},
        {"EHLO relay.test", "250-fake\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME"},
        {"AUTH PLAIN AHVzZXIAc2VjcmV0", "235 2.7.0 Authentication successful"},
        {"MAIL FROM:<fax@lan> BODY=8BITMIME", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", "250 2.1.5 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as 4C2A1"},
        {"QUIT", "221 2.0.0 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.host = "localhost";
    up.username = "user";
    up.password = "secret";
    deliver(&up, "ca.pem", "Subject: caf\xc3\xa9\r\n\r\nhi\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(eq(str, o.reply, "250 2.0.0 Ok: queued as 4C2A1"));
    cr_assert(eq(int, strncmp(o.tls, "TLSv1.3 with cipher ", 20), 0), "%s", o.tls);
    cr_assert(eq(int, f.pos, 9));
    fake_stop(&f);
}

/* No STARTTLS on offer: no cleartext fallback, and the operator is told why. */
Test(smtpc, starttls_required_but_missing)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 AUTH PLAIN"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.username = "user";
    up.password = "secret";
    deliver(&up, "ca.pem", "x\r\n", 2, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(int, o.config_fault, 1));
    cr_assert(eq(str, o.reply, "upstream does not offer STARTTLS; refusing to send in cleartext"));
    cr_assert(eq(int, (int)o.rcpt_status[1], SMTPC_DEFER));
    cr_assert_null(strstr(f.lines->data, "AUTH"));
    fake_stop(&f);
}

/* A certificate from an unknown CA stops the delivery before any credentials are sent. */
Test(smtpc, starttls_untrusted)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250-AUTH PLAIN\r\n250 STARTTLS"},
        {"STARTTLS", "220 2.0.0 Ready to start TLS"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.tls_name = "localhost";
    up.username = "user";
    up.password = "secret";
    deliver(&up, "ca2.pem", "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(int, o.config_fault, 1));
    cr_assert(eq(str, o.reply, "TLS: certificate signer not trusted"));
    fake_stop(&f);
}

/* Implicit TLS with a name mismatch. */
Test(smtpc, implicit_tls_name_mismatch)
{
    static const struct step script[] = {{NULL, NULL}};
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    f.greeting = NULL;
    up = upstream(f.port, CFG_TLS_IMPLICIT);
    up.tls_name = "smtp.example.net";
    deliver(&up, "ca.pem", "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(int, o.config_fault, 1));
    cr_assert(eq(str, o.reply, "TLS: certificate name mismatch: expected smtp.example.net"));
    fake_stop(&f);
}

/* Implicit TLS, happy path. */
Test(smtpc, implicit_tls_delivery)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as 77"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    f.greeting = NULL;
    up = upstream(f.port, CFG_TLS_IMPLICIT);
    deliver(&up, "ca.pem", "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(ne(str, o.tls, ""));
    fake_stop(&f);
}

/* AUTH refused: deferred, a configuration fault, the server's words; no password. */
Test(smtpc, auth_refused)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 STARTTLS"},
        {"STARTTLS", "220 go"},
        {"EHLO relay.test", "250-fake\r\n250 AUTH LOGIN"},
        {"AUTH LOGIN", "334 VXNlcm5hbWU6"},
        {"dXNlcg==", "334 UGFzc3dvcmQ6"},
        {"c2VjcmV0", "535 5.7.8 Error: authentication failed"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.host = "localhost";
    up.username = "user";
    up.password = "secret";
    deliver(&up, "ca.pem", "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(int, o.config_fault, 1));
    cr_assert(eq(str, o.reply, "AUTH LOGIN: 535 5.7.8 Error: authentication failed"));
    fake_stop(&f);
}

/* tls = none with a username but no allow_plaintext_auth: no AUTH is ever sent. */
Test(smtpc, no_auth_in_cleartext)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 AUTH PLAIN"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    up.username = "user";
    up.password = "secret";
    deliver(&up, NULL, "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(int, o.config_fault, 1));
    cr_assert_null(strstr(f.lines->data, "AUTH"));
    fake_stop(&f);
}

/* 4xx to DATA's end: everyone accepted at RCPT is deferred with the server's words. */
Test(smtpc, data_deferred)
{
    static const struct step script[] = {
        {"EHLO", "554 go away"},
        {"HELO relay.test", "250 hi"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"RCPT TO:<b@example.com>", "450 4.2.0 mailbox busy"},
        {"DATA", "354 go"},
        {".", "451 4.3.0 try later"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    deliver(&up, NULL, "x\r\n", 2, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(str, o.reply, "451 4.3.0 try later"));
    cr_assert(eq(int, (int)o.rcpt_status[0], SMTPC_DEFER));
    cr_assert(eq(str, o.rcpt_reply[0], "451 4.3.0 try later"));
    cr_assert(eq(str, o.rcpt_reply[1], "450 4.2.0 mailbox busy"));
    fake_stop(&f);
}

/* Every recipient refused for good: the attempt fails, no DATA. */
Test(smtpc, all_rcpts_refused)
{
    static const struct step script[] = {
        {"EHLO", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "550 no"},
        {"RCPT TO:<b@example.com>", "550 5.1.1 nope"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    deliver(&up, NULL, "x\r\n", 2, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_FAIL));
    cr_assert(eq(int, (int)o.rcpt_status[0], SMTPC_FAIL));
    cr_assert(eq(str, o.rcpt_reply[0], "550 no"));
    fake_stop(&f);
}

/* Silence after RCPT: a timeout in words. */
Test(smtpc, timeout_waiting_for_rcpt)
{
    static const struct step script[] = {
        {"EHLO", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", NULL},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    up.command_timeout = 1;
    deliver(&up, NULL, "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(str, o.reply, "timeout waiting for reply to RCPT"));
    fake_stop(&f);
}

/* Nobody listening: libuv's words with the address. */
Test(smtpc, connection_refused)
{
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;
    int port;

    fake_start(&f, (const struct step[]){{NULL, NULL}});
    port = f.port;
    fake_stop(&f);
    up = upstream(port, CFG_TLS_NONE);
    deliver(&up, NULL, "x\r\n", 1, &o);
    char want[128];
    snprintf(want, sizeof(want), "connect to 127.0.0.1:%d: connection refused", port);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(str, o.reply, want));
}

/* Abort mid-dialogue (shutdown): done runs once, before smtpc_session_abort() returns,
 * with DEFER; no SMTPC_EV_FAILED, then SMTPC_EV_CLOSED. */
Test(smtpc, abort_mid_dialogue)
{
    static const struct step script[] = {
        {"EHLO", "250 fake"},
        {"MAIL", NULL},
        {NULL, NULL},
    };
    struct smtpc_msg msg = {
        .id = 1, .sender = "", .rcpts = rcpts2, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct oneshot os;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 1;
    oneshot_start(&os, &up, NULL, &msg, on_done, &o);
    run_until(&f.pos, 2);
    smtpc_session_abort(os.c);
    cr_assert(eq(int, o.ncalls, 1));
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(str, o.reply, "delivery aborted (shutting down)"));
    run_until(&os.closed, 1);
    cr_assert(eq(int, os.nfailed, 0));
    fake_stop(&f);
    cr_assert(eq(int, o.ncalls, 1));
}

/* Abort during set-up: nothing to report (no done, no SMTPC_EV_FAILED), SMTPC_EV_CLOSED. */
Test(smtpc, abort_during_setup)
{
    static const struct step script[] = {
        {"EHLO", NULL},
        {NULL, NULL},
    };
    struct smtpc_msg msg = {
        .id = 1, .sender = "", .rcpts = rcpts2, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct oneshot os;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 1;
    oneshot_start(&os, &up, NULL, &msg, on_done, &o);
    run_until(&f.pos, 1);
    smtpc_session_abort(os.c);
    run_until(&os.closed, 1);
    cr_assert(eq(int, os.nfailed, 0));
    cr_assert(eq(int, o.ncalls, 0));
    fake_stop(&f);
}

/* Pipelined: each reply of the group re-arms the timer, so silence after MAIL's reply is
 * a timeout that names the command whose reply is missing. */
Test(smtpc, pipelined_timeout_after_mail)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 PIPELINING"},
        {"MAIL FROM:<fax@lan>", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", NULL},
        {"DATA", NULL},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    up.command_timeout = 1;
    deliver(&up, NULL, "x\r\n", 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_DEFER));
    cr_assert(eq(str, o.reply, "timeout waiting for reply to RCPT"));
    fake_stop(&f);
}

/* A body larger than one write chunk, over TLS, arrives intact and dot-stuffed. */
Test(smtpc, large_body_in_chunks)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as BIG"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct buf *body = buf_new(0), *want = buf_new(0);
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;
    int i;

    for (i = 0; i < 20000; i++) {
        buf_printf(body, "%sline %d of a long message, padded to be a bit wider\r\n",
                   i % 7 == 0 ? "." : "", i);
        buf_printf(want, "%sline %d of a long message, padded to be a bit wider\r\n",
                   i % 7 == 0 ? ".." : "", i);
    }
    fake_start(&f, script);
    f.greeting = NULL;
    up = upstream(f.port, CFG_TLS_IMPLICIT);
    deliver(&up, "ca.pem", body->data, 1, &o);
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(eq(sz, f.data->len, want->len));
    cr_assert(eq(int, memcmp(f.data->data, want->data, want->len), 0));
    fake_stop(&f);
    buf_free(body);
    buf_free(want);
}

/* ---- Sessions: several transactions on one connection ---- */

struct sess {
    int events[SMTPC_EV_CLOSED + 1];
    char failed[512];
    int failed_fault;
    struct smtpc *c;
};

static void on_event(void *arg, struct smtpc *c, enum smtpc_event ev,
                     const struct smtpc_result *res)
{
    struct sess *s = arg;

    s->events[ev]++;
    if (ev == SMTPC_EV_FAILED) {
        snprintf(s->failed, sizeof(s->failed), "%s", res->reply);
        s->failed_fault = res->config_fault;
    }
    if (ev == SMTPC_EV_CLOSED)
        s->c = NULL;
    (void)c;
}

struct full_outcome {
    struct outcome o;
    int throttled, stale, setup;
    char action[256];
};

static void on_done_full(void *arg, const struct smtpc_result *res)
{
    struct full_outcome *fo = arg;

    on_done(&fo->o, res);
    fo->throttled = res->throttled;
    fo->stale = res->stale;
    fo->setup = res->setup;
    snprintf(fo->action, sizeof(fo->action), "%s", res->action);
}

static void session_open(struct sess *s, const struct cfg_upstream *up)
{
    memset(s, 0, sizeof(*s));
    cr_assert(
        eq(int, smtpc_session_open(&loop, up, NULL, NULL, "relay.test", on_event, s, &s->c), 0));
    run_until(&s->events[SMTPC_EV_READY], 1);
    cr_assert(eq(int, smtpc_session_idle(s->c), 1));
}

static void session_send(struct sess *s, const struct smtpc_msg *msg, struct full_outcome *fo)
{
    memset(fo, 0, sizeof(*fo));
    fo->o.nrcpts = msg->nrcpts;
    cr_assert(eq(int, smtpc_session_send(s->c, msg, on_done_full, fo), 0));
    cr_assert(eq(int, fo->o.ncalls, 0), "done must not run inside smtpc_session_send()");
    cr_assert(eq(int, smtpc_session_send(s->c, msg, on_done_full, fo), UV_EBUSY));
    run_until(&fo->o.ncalls, 1);
}

static void session_close(struct sess *s)
{
    if (s->c != NULL)
        smtpc_session_quit(s->c);
    run_until(&s->events[SMTPC_EV_CLOSED], 1);
    cr_assert(eq(int, s->events[SMTPC_EV_CLOSED], 1));
}

/* Two messages on one session: pipelined MAIL/RCPT/DATA, RSET before the second, and each
 * recipient's 2xx/4xx/5xx kept apart. */
Test(smtpc, session_reuse_pipelining_partial_rcpts)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250-PIPELINING\r\n250-SIZE 100000\r\n250 8BITMIME"},
        {"MAIL FROM:<fax@lan> SIZE=3", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", "250 2.1.5 Ok"},
        {"RCPT TO:<b@example.com>", "450 4.2.0 <b@example.com>: mailbox busy"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as ONE"},
        {"RSET", "250 2.0.0 Ok"},
        {"MAIL FROM:<> SIZE=3", "250 2.1.0 Ok"},
        {"RCPT TO:<a@example.com>", "550 5.1.1 <a@example.com>: unknown"},
        {"RCPT TO:<b@example.com>", "250 2.1.5 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as TWO"},
        {"QUIT", "221 2.0.0 Bye"},
        {NULL, NULL},
    };
    struct smtpc_msg m1 = {
        .id = 1, .sender = "fax@lan", .rcpts = rcpts2, .nrcpts = 2, .body = "x\r\n", .len = 3};
    struct smtpc_msg m2 = m1;
    struct cfg_upstream up;
    struct full_outcome fo;
    struct sess s;
    struct fake f;

    m2.id = 2;
    m2.sender = "";
    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    session_open(&s, &up);
    session_send(&s, &m1, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_SENT), "%s", fo.o.reply);
    cr_assert(eq(int, (int)fo.o.rcpt_status[0], SMTPC_SENT));
    cr_assert(eq(int, (int)fo.o.rcpt_status[1], SMTPC_DEFER));
    cr_assert(eq(str, fo.o.rcpt_reply[1], "450 4.2.0 <b@example.com>: mailbox busy"));
    cr_assert(eq(int, fo.stale, 0));
    run_until(&s.events[SMTPC_EV_IDLE], 1);
    cr_assert(eq(int, smtpc_session_count(s.c), 1));
    session_send(&s, &m2, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_SENT), "%s", fo.o.reply);
    cr_assert(eq(str, fo.o.reply, "250 2.0.0 Ok: queued as TWO"));
    cr_assert(eq(int, (int)fo.o.rcpt_status[0], SMTPC_FAIL));
    cr_assert(eq(int, (int)fo.o.rcpt_status[1], SMTPC_SENT));
    /* RSET, MAIL, two RCPTs and DATA came in one group. */
    cr_assert(ge(int, f.max_batch, 5), "max batch %d", f.max_batch);
    session_close(&s);
    cr_assert(eq(int, f.pos, 13));
    fake_stop(&f);
}

/* 421 in the middle of a transaction: the message is deferred as a throttle and the
 * session closes without waiting. */
Test(smtpc, session_421_mid_transaction)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "421 4.7.0 Too many messages, closing connection"},
        {NULL, NULL},
    };
    struct smtpc_msg m = {
        .id = 1, .sender = "fax@lan", .rcpts = rcpts2, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct full_outcome fo;
    struct sess s;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    session_open(&s, &up);
    session_send(&s, &m, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_DEFER));
    cr_assert(eq(str, fo.o.reply, "421 4.7.0 Too many messages, closing connection"));
    cr_assert(eq(int, fo.throttled, 1));
    cr_assert(eq(int, (int)fo.o.rcpt_status[0], SMTPC_DEFER));
    session_close(&s);
    cr_assert(eq(int, s.events[SMTPC_EV_IDLE], 0));
    fake_stop(&f);
}

/* A reused session that the server dropped: the message is marked stale (retry at once). */
Test(smtpc, session_stale_after_reuse)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as ONE"},
        {"RSET", "CLOSE"},
        {NULL, NULL},
    };
    struct smtpc_msg m = {
        .id = 1, .sender = "fax@lan", .rcpts = rcpts2, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct full_outcome fo;
    struct sess s;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    session_open(&s, &up);
    session_send(&s, &m, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_SENT));
    session_send(&s, &m, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_DEFER));
    cr_assert(eq(int, fo.stale, 1), "%s", fo.o.reply);
    session_close(&s);
    fake_stop(&f);
}

/* Too big for the upstream's SIZE: fails at once with both numbers, nothing is sent, and
 * the session stays usable. */
Test(smtpc, size_exceeds_upstream_limit)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 SIZE 10"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct smtpc_msg m = {.id = 1,
                          .sender = "fax@lan",
                          .rcpts = rcpts2,
                          .nrcpts = 2,
                          .body = "0123456789012345678\n",
                          .len = 20};
    struct cfg_upstream up;
    struct full_outcome fo;
    struct sess s;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    session_open(&s, &up);
    session_send(&s, &m, &fo);
    cr_assert(eq(int, (int)fo.o.status, SMTPC_FAIL));
    cr_assert(eq(str, fo.o.reply, "message size 20 exceeds upstream limit 10"));
    cr_assert(eq(int, (int)fo.o.rcpt_status[1], SMTPC_FAIL));
    run_until(&s.events[SMTPC_EV_IDLE], 1);
    session_close(&s);
    cr_assert_null(strstr(f.lines->data, "MAIL"));
    fake_stop(&f);
}

/* A non-ASCII envelope: SMTPUTF8 on MAIL when offered, a clear failure when not. */
Test(smtpc, smtputf8)
{
    static const struct step offered[] = {
        {"EHLO relay.test", "250-fake\r\n250 SMTPUTF8"},
        {"MAIL FROM:<fax@lan> SMTPUTF8", "250 Ok"},
        {"RCPT TO:<j\xc3\xb6rg@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as U8"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    static const struct step missing[] = {
        {"EHLO relay.test", "250 fake"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    static const char *u8[] = {"j\xc3\xb6rg@example.com", NULL};
    struct smtpc_msg m = {
        .id = 1, .sender = "fax@lan", .rcpts = u8, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, offered);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 1;
    deliver_msg(&up, NULL, &m, on_done, &o);
    cr_assert(eq(int, o.ncalls, 1));
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    fake_stop(&f);

    fake_start(&f, missing);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 1;
    deliver_msg(&up, NULL, &m, on_done, &o);
    cr_assert(eq(int, o.ncalls, 1));
    cr_assert(eq(int, (int)o.status, SMTPC_FAIL));
    cr_assert(
        eq(str, o.reply,
           "upstream does not offer SMTPUTF8, needed for the address <j\xc3\xb6rg@example.com>"));
    fake_stop(&f);
}

/* Microsoft's SendAsDenied is the relay's fault: deferred (held), never bounced, with the
 * operator action. */
Test(smtpc, send_as_denied_is_held)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "554 5.2.252 SendAsDenied; dev@corp.example not allowed to send as fax@lan"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct smtpc_msg m = {
        .id = 1, .sender = "fax@lan", .rcpts = rcpts2, .nrcpts = 1, .body = "x\r\n", .len = 3};
    struct cfg_upstream up;
    struct full_outcome fo;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&fo, 0, sizeof(fo));
    fo.o.nrcpts = 1;
    deliver_msg(&up, NULL, &m, on_done_full, &fo);
    cr_assert(eq(int, fo.o.ncalls, 1));
    cr_assert(eq(int, (int)fo.o.status, SMTPC_DEFER));
    /* About this sender, not the upstream: the upstream stays healthy. */
    cr_assert(eq(int, fo.o.config_fault, 0));
    cr_assert(eq(int, (int)fo.o.rcpt_status[0], SMTPC_DEFER));
    cr_assert(eq(int, (int)fo.o.rcpt_cause[0], VERDICT_CONFIG));
    cr_assert_not_null(strstr(fo.action, "Send As"), "%s", fo.action);
    fake_stop(&f);
}

/* An idle session says QUIT by itself after idle_timeout. */
Test(smtpc, session_idle_timeout)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250 fake"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct sess s;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    up.idle_timeout = 1;
    session_open(&s, &up);
    run_until(&s.events[SMTPC_EV_CLOSED], 1);
    cr_assert(eq(int, f.pos, 2));
    fake_stop(&f);
}

/* A failed set-up is reported once as SMTPC_EV_FAILED (with the fault), then CLOSED. */
Test(smtpc, session_setup_failure)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 STARTTLS"},
        {"STARTTLS", "220 go"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct tlsio_cred *cred;
    struct sess s;
    struct fake f;
    char err[256], path[128];

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.tls_name = "localhost";
    snprintf(path, sizeof(path), "%s/ca2.pem", dir);
    cr_assert(eq(int, tlsio_cred_client_new(path, NULL, &cred, err, sizeof(err)), 0));
    memset(&s, 0, sizeof(s));
    cr_assert(
        eq(int, smtpc_session_open(&loop, &up, cred, NULL, "relay.test", on_event, &s, &s.c), 0));
    run_until(&s.events[SMTPC_EV_CLOSED], 1);
    cr_assert(eq(int, s.events[SMTPC_EV_FAILED], 1));
    cr_assert(eq(int, s.events[SMTPC_EV_READY], 0));
    cr_assert(eq(str, s.failed, "TLS: certificate signer not trusted"));
    cr_assert(eq(int, s.failed_fault, 1));
    tlsio_cred_free(cred);
    fake_stop(&f);
}

/* ---- Probe ---- */

struct probe_log {
    char steps[4096];
    int nsteps, nfail;
    struct full_outcome fo;
};

static void on_step(void *arg, int ok, const char *text)
{
    struct probe_log *pl = arg;
    size_t used = strlen(pl->steps);

    snprintf(pl->steps + used, sizeof(pl->steps) - used, "%s %s\n", ok ? "ok" : "FAIL", text);
    pl->nsteps++;
    pl->nfail += !ok;
}

static void on_probe_done(void *arg, const struct smtpc_result *res)
{
    struct probe_log *pl = arg;

    on_done_full(&pl->fo, res);
}

static void probe(const struct cfg_upstream *up, const char *ca, struct probe_log *pl)
{
    struct tlsio_cred *cred = NULL;
    char err[256], path[128];

    memset(pl, 0, sizeof(*pl));
    if (ca != NULL) {
        snprintf(path, sizeof(path), "%s/%s", dir, ca);
        cr_assert(eq(int, tlsio_cred_client_new(path, NULL, &cred, err, sizeof(err)), 0));
    }
    cr_assert(eq(int,
                 smtpc_probe(&loop, up, cred, NULL, "relay.test", on_step, on_probe_done, pl, NULL),
                 0));
    run_until(&pl->fo.o.ncalls, 1);
    uv_run(&loop, UV_RUN_NOWAIT);
    tlsio_cred_free(cred);
}

/* Every step reported: resolve, connect, greeting, EHLO, TLS (with the key's pin), AUTH,
 * QUIT; no MAIL. */
Test(smtpc, probe_all_steps)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 STARTTLS"},
        {"STARTTLS", "220 go"},
        {"EHLO relay.test", "250-fake\r\n250 AUTH PLAIN"},
        {"AUTH PLAIN", "235 2.7.0 Authentication successful"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct probe_log pl;
    struct fake f;
    char pin[64], err[256], path[128];

    snprintf(path, sizeof(path), "%s/srv.pem", dir);
    cr_assert(eq(int, tlsio_pin_of_cert_file(path, pin, sizeof(pin), err, sizeof(err)), 0));
    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_STARTTLS);
    up.host = "localhost";
    up.username = "user";
    up.password = "secret";
    up.tls_pin = pin;
    probe(&up, "ca.pem", &pl);
    cr_assert(eq(int, (int)pl.fo.o.status, SMTPC_SENT), "%s\n%s", pl.fo.o.reply, pl.steps);
    cr_assert(eq(int, pl.nfail, 0), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "ok resolve localhost"), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "ok greeting from "), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "matches tls_pin; public key sha256//"), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "ok AUTH PLAIN as user: 235"), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "ok QUIT: 221 Bye"), "%s", pl.steps);
    cr_assert_null(strstr(f.lines->data, "MAIL"));
    fake_stop(&f);
}

/* A probe refused at AUTH with Microsoft's 5.7.139: failed step, fault, the action. */
Test(smtpc, probe_auth_disabled)
{
    static const struct step script[] = {
        {"EHLO relay.test", "250-fake\r\n250 AUTH LOGIN"},
        {"AUTH LOGIN", "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is "
                       "disabled for the Tenant"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    struct cfg_upstream up;
    struct probe_log pl;
    struct fake f;

    fake_start(&f, script);
    up = upstream(f.port, CFG_TLS_NONE);
    up.username = "user";
    up.password = "secret";
    up.allow_plaintext_auth = 1;
    probe(&up, NULL, &pl);
    cr_assert(eq(int, (int)pl.fo.o.status, SMTPC_DEFER));
    cr_assert(eq(int, pl.fo.o.config_fault, 1));
    cr_assert(eq(int, pl.nfail, 1), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.steps, "FAIL AUTH LOGIN: 535 5.7.139"), "%s", pl.steps);
    cr_assert_not_null(strstr(pl.fo.action, "Authenticated SMTP"), "%s", pl.fo.action);
    fake_stop(&f);
}

/* RFC 3461: with DSN offered, MAIL gets RET=/ENVID= and RCPT NOTIFY=/ORCPT=, xtext-encoded;
 * without it nothing of the kind is sent. */
Test(smtpc, dsn_parameters)
{
    static const struct step offered[] = {
        {"EHLO relay.test", "250-fake\r\n250 DSN"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"RCPT TO:<b@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as D1"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    static const struct step plain[] = {
        {"EHLO relay.test", "250-fake\r\n250 8BITMIME"},
        {"MAIL FROM:<fax@lan>", "250 Ok"},
        {"RCPT TO:<a@example.com>", "250 Ok"},
        {"RCPT TO:<b@example.com>", "250 Ok"},
        {"DATA", "354 go"},
        {".", "250 2.0.0 Ok: queued as D2"},
        {"QUIT", "221 Bye"},
        {NULL, NULL},
    };
    static const unsigned notify[] = {0x2 | 0x4 /* FAILURE,DELAY */, 0x8 /* NEVER */};
    static const char *const orcpt[] = {"rfc822;Alice+x=y@example.com", NULL};
    struct smtpc_msg m = {.id = 1,
                          .sender = "fax@lan",
                          .rcpts = rcpts2,
                          .nrcpts = 2,
                          .body = "x\r\n",
                          .len = 3,
                          .dsn_ret = 1 /* FULL */,
                          .dsn_envid = "id 42+=",
                          .dsn_notify = notify,
                          .dsn_orcpt = orcpt};
    struct cfg_upstream up;
    struct outcome o;
    struct fake f;

    fake_start(&f, offered);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 2;
    deliver_msg(&up, NULL, &m, on_done, &o);
    cr_assert(eq(int, o.ncalls, 1));
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(strstr(f.lines->data, "MAIL FROM:<fax@lan> RET=FULL ENVID=id+2042+2B+3D\n") != NULL,
              "%s", f.lines->data);
    cr_assert(strstr(f.lines->data, "RCPT TO:<a@example.com> NOTIFY=FAILURE,DELAY "
                                    "ORCPT=rfc822;Alice+2Bx+3Dy@example.com\n") != NULL,
              "%s", f.lines->data);
    cr_assert(strstr(f.lines->data, "RCPT TO:<b@example.com> NOTIFY=NEVER\n") != NULL, "%s",
              f.lines->data);
    fake_stop(&f);

    fake_start(&f, plain);
    up = upstream(f.port, CFG_TLS_NONE);
    memset(&o, 0, sizeof(o));
    o.nrcpts = 2;
    deliver_msg(&up, NULL, &m, on_done, &o);
    cr_assert(eq(int, o.ncalls, 1));
    cr_assert(eq(int, (int)o.status, SMTPC_SENT), "%s", o.reply);
    cr_assert(strstr(f.lines->data, "MAIL FROM:<fax@lan>\n") != NULL, "%s", f.lines->data);
    cr_assert(strstr(f.lines->data, "RCPT TO:<a@example.com>\n") != NULL, "%s", f.lines->data);
    cr_assert(strstr(f.lines->data, "RCPT TO:<b@example.com>\n") != NULL, "%s", f.lines->data);
    cr_assert(strstr(f.lines->data, "NOTIFY") == NULL && strstr(f.lines->data, "RET=") == NULL);
    fake_stop(&f);
}
