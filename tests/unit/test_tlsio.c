/*
 * test_tlsio - tlsio on a private loop: plaintext, STARTTLS, verification failures.
 *
 * Each test makes a throw-away PKI with certtool (CA, server cert for localhost and
 * 127.0.0.1, and an unrelated second CA), runs a server and a client tlsio over 127.0.0.1,
 * and bounds the loop with a timer guard.  Teardown asserts uv_loop_close() == 0.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/tlsio.h"
#include "tests/lib/testlib.h"

static char dir[64];
static uv_loop_t loop;

static void setup(void)
{
    char err[256];

    testlib_tmpdir(dir, sizeof(dir), "test_tlsio");
    testlib_pki(dir);
    cr_assert(eq(int, tlsio_global_init(err, sizeof(err)), 0));
    cr_assert(eq(int, uv_loop_init(&loop), 0));
}

static void teardown(void)
{
    /* Everything the test opened must already be closed; report leaks, then clean up. */
    int rc = testlib_loop_close(&loop);

    testlib_rmtree(dir);
    cr_assert(eq(int, rc, 0), "handles leaked on the test loop");
}

TestSuite(tlsio, .init = setup, .fini = teardown, .timeout = 30);

/* ---- A tiny STARTTLS dialogue: server "220 hi", client "STARTTLS", server "220 go",
 * both start TLS, client "ping", server "pong", client closes. ---- */

struct side {
    struct tlsio *io;
    int step;
    int events[TLSIO_ERROR + 1];
    char err[256];
    char desc[128];
    char got[256];
    int closed;
};

struct dialogue {
    uv_tcp_t listener;
    struct tlsio_cred *scred, *ccred;
    const char *servername;
    const char *pin; /* tls_pin for the client, or NULL */
    int implicit;
    /* PROXY then TLS: the client sends a PROXY line and its ClientHello back to back; the
     * server reads the line as plaintext and then calls tlsio_starttls_keep(). */
    int proxy_keep;
    uv_timer_t delay;    /* proxy_keep: the server starts reading once both are in */
    size_t behind_proxy; /* bytes in the server's input right behind the PROXY line */
    struct side srv, cli;
    int done;
};

static void side_closed(void *arg)
{
    struct side *s = arg;
    s->closed = 1;
}

static int take_line(struct tlsio *io, char *out, size_t outlen)
{
    const char *line;
    size_t n, used;

    if ((used = buf_getline(tlsio_input(io), &line, &n)) == 0)
        return 0;
    snprintf(out, outlen, "%.*s", (int)n, line);
    buf_consume(tlsio_input(io), used);
    return 1;
}

static void finish_side(struct side *s, struct tlsio *io)
{
    if (io == s->io && !s->closed)
        tlsio_close(io, side_closed, s);
}

static void srv_cb(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct dialogue *d = arg;
    struct side *s = &d->srv;
    char line[256];

    s->events[ev]++;
    switch (ev) {
    case TLSIO_DATAIN:
        while (take_line(io, line, sizeof(line))) {
            if (s->step == 0 && d->proxy_keep && strncmp(line, "PROXY ", 6) == 0) {
                d->behind_proxy = tlsio_input(io)->len;
                cr_assert(eq(int, tlsio_starttls_keep(io, d->scred, 1, NULL), 0), "%s",
                          tlsio_errstr(io));
                cr_assert(eq(sz, tlsio_input(io)->len, 0));
                s->step = 1;
            } else if (s->step == 0 && strcmp(line, "STARTTLS") == 0) {
                tlsio_write(io, "220 go\r\n", 8);
                cr_assert(eq(int, tlsio_starttls(io, d->scred, 1, NULL), 0));
                s->step = 1;
            } else if (s->step == 1 && strcmp(line, "ping") == 0) {
                snprintf(s->got, sizeof(s->got), "%s", line);
                tlsio_write(io, "pong\r\n", 6);
                s->step = 2;
            }
        }
        break;
    case TLSIO_TLSREADY:
        tlsio_describe(io, s->desc, sizeof(s->desc));
        break;
    case TLSIO_EOF:
    case TLSIO_ERROR:
        if (ev == TLSIO_ERROR)
            snprintf(s->err, sizeof(s->err), "%s", tlsio_errstr(io));
        /* The callback closing its own io is the normal way out. */
        finish_side(s, io);
        break;
    default:
        break;
    }
}

static void cli_cb(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct dialogue *d = arg;
    struct side *s = &d->cli;
    char line[256];

    s->events[ev]++;
    switch (ev) {
    case TLSIO_CONNECTED:
        cr_assert(eq(int, tlsio_read_start(io), 0));
        cr_assert(eq(int, tlsio_set_pin(io, d->pin), 0));
        if (d->proxy_keep) {
            static const char hdr[] = "PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\n";

            tlsio_write(io, hdr, sizeof(hdr) - 1);
            cr_assert(eq(int, tlsio_starttls(io, d->ccred, 0, d->servername), 0));
            s->step = 1;
        } else if (d->implicit) {
            cr_assert(eq(int, tlsio_starttls(io, d->ccred, 0, d->servername), 0));
            s->step = 1;
        }
        break;
    case TLSIO_DATAIN:
        while (take_line(io, line, sizeof(line))) {
            if (s->step == 0 && strcmp(line, "220 hi") == 0) {
                tlsio_write(io, "STARTTLS\r\n", 10);
            } else if (s->step == 0 && strcmp(line, "220 go") == 0) {
                cr_assert(eq(int, tlsio_starttls(io, d->ccred, 0, d->servername), 0));
                s->step = 1;
            } else if (s->step == 1) {
                snprintf(s->got, sizeof(s->got), "%s", line);
                tlsio_close(io, side_closed, s);
                d->done = 1;
                return;
            }
        }
        break;
    case TLSIO_TLSREADY:
        tlsio_describe(io, s->desc, sizeof(s->desc));
        cr_assert(eq(int, tlsio_is_tls(io), 1));
        tlsio_write(io, "ping\r\n", 6);
        break;
    case TLSIO_EOF:
    case TLSIO_ERROR:
        if (ev == TLSIO_ERROR)
            snprintf(s->err, sizeof(s->err), "%s", tlsio_errstr(io));
        tlsio_close(io, side_closed, s);
        d->done = 1;
        break;
    default:
        break;
    }
}

static void delayed_read(uv_timer_t *t)
{
    struct dialogue *d = t->data;

    cr_assert(eq(int, tlsio_read_start(d->srv.io), 0));
}

static void on_accept(uv_stream_t *l, int status)
{
    struct dialogue *d = l->data;
    struct tlsio *io;

    cr_assert(eq(int, status, 0));
    io = tlsio_new(&loop, srv_cb, d);
    cr_assert(eq(int, uv_accept(l, tlsio_stream(io)), 0));
    d->srv.io = io;
    if (d->proxy_keep) {
        /* Both the PROXY line and the ClientHello are in the socket when reading starts,
         * so the first read holds both, as from a proxy that sends them in one segment. */
        uv_timer_start(&d->delay, delayed_read, 100, 0);
        return;
    }
    cr_assert(eq(int, tlsio_read_start(io), 0));
    if (d->implicit) {
        cr_assert(eq(int, tlsio_starttls(io, d->scred, 1, NULL), 0));
        d->srv.step = 1;
    } else {
        tlsio_write(io, "220 hi\r\n", 8);
    }
}

static void guard_cb(uv_timer_t *t)
{
    (void)t;
    cr_fail("loop guard expired");
}

static void run_until_closed(struct dialogue *d)
{
    uv_timer_t guard;
    int i;

    uv_timer_init(&loop, &guard);
    uv_timer_start(&guard, guard_cb, 10000, 0);
    /* Bounded: each UV_RUN_ONCE blocks for at most one event or the guard. */
    for (i = 0; i < 100000 && !(d->cli.closed && (d->srv.io == NULL || d->srv.closed)); i++)
        uv_run(&loop, UV_RUN_ONCE);
    if (d->srv.io != NULL && !d->srv.closed)
        tlsio_close(d->srv.io, side_closed, &d->srv);
    uv_close((uv_handle_t *)&d->listener, NULL);
    uv_close((uv_handle_t *)&d->delay, NULL);
    uv_close((uv_handle_t *)&guard, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
}

static void start(struct dialogue *d, const char *ca, const char *servername)
{
    struct sockaddr_storage ss;
    struct sockaddr_in sin;
    char err[256], path[128], key[128];
    int len = sizeof(ss);

    memset(d, 0, sizeof(*d));
    snprintf(path, sizeof(path), "%s/srv.pem", dir);
    snprintf(key, sizeof(key), "%s/srv.key", dir);
    cr_assert(eq(int, tlsio_cred_server_new(path, key, NULL, &d->scred, err, sizeof(err)), 0), "%s",
              err);
    snprintf(path, sizeof(path), "%s/%s", dir, ca);
    cr_assert(eq(int, tlsio_cred_client_new(path, NULL, &d->ccred, err, sizeof(err)), 0), "%s",
              err);
    d->servername = servername;
    uv_timer_init(&loop, &d->delay);
    d->delay.data = d;

    uv_tcp_init(&loop, &d->listener);
    d->listener.data = d;
    uv_ip4_addr("127.0.0.1", 0, &sin);
    cr_assert(eq(int, uv_tcp_bind(&d->listener, (struct sockaddr *)&sin, 0), 0));
    cr_assert(eq(int, uv_listen((uv_stream_t *)&d->listener, 8, on_accept), 0));
    uv_tcp_getsockname(&d->listener, (struct sockaddr *)&ss, &len);

    d->cli.io = tlsio_new(&loop, cli_cb, d);
    cr_assert(eq(int, tlsio_connect(d->cli.io, (struct sockaddr *)&ss), 0));
}

static void stop(struct dialogue *d)
{
    tlsio_cred_free(d->scred);
    tlsio_cred_free(d->ccred);
}

/* STARTTLS after a plaintext exchange; data flows both ways; both sides describe TLS. */
Test(tlsio, starttls_roundtrip)
{
    struct dialogue d;

    start(&d, "ca.pem", "localhost");
    run_until_closed(&d);
    cr_assert(eq(str, d.cli.err, ""));
    cr_assert(eq(str, d.srv.got, "ping"));
    cr_assert(eq(str, d.cli.got, "pong"));
    cr_assert(eq(int, d.cli.events[TLSIO_CONNECTED], 1));
    cr_assert(eq(int, d.cli.events[TLSIO_TLSREADY], 1));
    cr_assert(eq(int, d.srv.events[TLSIO_TLSREADY], 1));
    cr_assert(eq(int, strncmp(d.cli.desc, "TLSv1.3 with cipher ", 20), 0), "%s", d.cli.desc);
    cr_assert(eq(str, d.cli.desc, d.srv.desc));
    /* The client closed after "pong": the server saw the end of the stream. */
    cr_assert(eq(int, d.srv.events[TLSIO_EOF] + d.srv.events[TLSIO_ERROR], 1));
    cr_assert(eq(int, d.cli.closed, 1));
    cr_assert(eq(int, d.srv.closed, 1));
    stop(&d);
}

/* Implicit TLS with an IP-address name verifies against the certificate's IP SAN. */
Test(tlsio, implicit_tls_ip_name)
{
    struct dialogue d;

    start(&d, "ca.pem", "127.0.0.1");
    d.implicit = 1;
    run_until_closed(&d);
    cr_assert(eq(str, d.cli.err, ""));
    cr_assert(eq(str, d.cli.got, "pong"));
    stop(&d);
}

/* A PROXY line and the ClientHello in one segment: the server consumes the line, and
 * tlsio_starttls_keep() hands the bytes behind it to the handshake, which completes. */
Test(tlsio, starttls_keep_after_proxy_line)
{
    struct dialogue d;

    start(&d, "ca.pem", "localhost");
    d.proxy_keep = 1;
    run_until_closed(&d);
    cr_assert(eq(str, d.cli.err, ""));
    cr_assert(eq(str, d.srv.err, ""));
    cr_assert(gt(sz, d.behind_proxy, 0), "the ClientHello did not arrive with the PROXY line");
    cr_assert(eq(int, d.srv.events[TLSIO_TLSREADY], 1));
    cr_assert(eq(int, d.cli.events[TLSIO_TLSREADY], 1));
    cr_assert(eq(str, d.srv.got, "ping"));
    cr_assert(eq(str, d.cli.got, "pong"));
    stop(&d);
}

/* A server certificate from a CA we do not trust is refused in words. */
Test(tlsio, untrusted_signer)
{
    struct dialogue d;

    start(&d, "ca2.pem", "localhost");
    run_until_closed(&d);
    cr_assert(eq(int, d.cli.events[TLSIO_ERROR], 1));
    cr_assert(eq(int, d.cli.events[TLSIO_TLSREADY], 0));
    cr_assert(eq(str, d.cli.err, "certificate signer not trusted"));
    /* The server hears about it as an alert (or a dropped connection). */
    cr_assert(eq(int, d.srv.events[TLSIO_ERROR] + d.srv.events[TLSIO_EOF], 1));
    stop(&d);
}

/* A trusted certificate for another name is refused, naming the name we expected. */
Test(tlsio, name_mismatch)
{
    struct dialogue d;

    start(&d, "ca.pem", "relay.example.com");
    run_until_closed(&d);
    cr_assert(eq(int, d.cli.events[TLSIO_ERROR], 1));
    cr_assert(eq(str, d.cli.err, "certificate name mismatch: expected relay.example.com"));
    cr_assert(eq(int, d.srv.events[TLSIO_ERROR] + d.srv.events[TLSIO_EOF], 1));
    stop(&d);
}

/* Connecting to a closed port gives libuv's words. */
Test(tlsio, connection_refused)
{
    struct sockaddr_storage ss;
    struct sockaddr_in sin;
    struct dialogue d;
    uv_tcp_t tmp;
    int len = sizeof(ss), i;

    memset(&d, 0, sizeof(d));
    /* Find a free port: bind, read it back, close. */
    uv_tcp_init(&loop, &tmp);
    uv_ip4_addr("127.0.0.1", 0, &sin);
    uv_tcp_bind(&tmp, (struct sockaddr *)&sin, 0);
    uv_tcp_getsockname(&tmp, (struct sockaddr *)&ss, &len);
    uv_close((uv_handle_t *)&tmp, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);

    d.cli.io = tlsio_new(&loop, cli_cb, &d);
    cr_assert(eq(int, tlsio_connect(d.cli.io, (struct sockaddr *)&ss), 0));
    for (i = 0; i < 1000 && !d.cli.closed; i++)
        uv_run(&loop, UV_RUN_ONCE);
    cr_assert(eq(str, d.cli.err, "connection refused"));
    cr_assert(eq(int, d.cli.events[TLSIO_CONNECTED], 0));
}

/* Closing twice, and closing before anything happened, is safe and frees once. */
Test(tlsio, close_twice)
{
    struct side s;
    struct dialogue d;

    memset(&s, 0, sizeof(s));
    memset(&d, 0, sizeof(d));
    s.io = tlsio_new(&loop, cli_cb, &d);
    tlsio_close(s.io, side_closed, &s);
    tlsio_close(s.io, side_closed, &s);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_assert(eq(int, s.closed, 1));
}

/* ---- Public-key pinning ---- */

/* The pin we compute for a certificate file is certtool's "pin-sha256" for it. */
Test(tlsio, pin_of_cert_file_matches_certtool)
{
    char pin[64], err[256], cmd[512], want[128] = "";
    FILE *p;

    snprintf(cmd, sizeof(cmd), "%s/srv.pem", dir);
    cr_assert(eq(int, tlsio_pin_of_cert_file(cmd, pin, sizeof(pin), err, sizeof(err)), 0), "%s",
              err);
    snprintf(cmd, sizeof(cmd),
             "certtool --certificate-info --infile %s/srv.pem | sed -n 's/.*pin-sha256:\\(.*\\)/\\1/p'"
             " | head -1",
             dir);
    cr_assert_not_null(p = popen(cmd, "r"));
    cr_assert_not_null(fgets(want, sizeof(want), p));
    pclose(p);
    want[strcspn(want, "\n")] = '\0';
    cr_assert(eq(int, strncmp(pin, "sha256//", 8), 0));
    cr_assert(eq(str, pin + 8, want));
}

/* The right pin (in a list with a backup pin) lets the handshake finish. */
Test(tlsio, pin_match)
{
    struct dialogue d;
    char pin[64], list[200], err[256], path[128];

    snprintf(path, sizeof(path), "%s/srv.pem", dir);
    cr_assert(eq(int, tlsio_pin_of_cert_file(path, pin, sizeof(pin), err, sizeof(err)), 0));
    snprintf(list, sizeof(list), "sha256/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=; %s", pin);
    start(&d, "ca.pem", "localhost");
    d.pin = list;
    run_until_closed(&d);
    cr_assert(eq(str, d.cli.err, ""));
    cr_assert(eq(str, d.cli.got, "pong"));
    stop(&d);
}

/* A trusted certificate whose key is not pinned is refused, naming the key it has. */
Test(tlsio, pin_mismatch)
{
    struct dialogue d;
    char pin[64], want[200], err[256], path[128];

    snprintf(path, sizeof(path), "%s/srv.pem", dir);
    cr_assert(eq(int, tlsio_pin_of_cert_file(path, pin, sizeof(pin), err, sizeof(err)), 0));
    start(&d, "ca.pem", "localhost");
    d.pin = "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    d.implicit = 1;
    run_until_closed(&d);
    snprintf(want, sizeof(want), "certificate public key does not match tls_pin (server key is %s)",
             pin);
    cr_assert(eq(int, d.cli.events[TLSIO_ERROR], 1));
    cr_assert(eq(int, d.cli.events[TLSIO_TLSREADY], 0));
    cr_assert(eq(str, d.cli.err, want));
    stop(&d);
}
