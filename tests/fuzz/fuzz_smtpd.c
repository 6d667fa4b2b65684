/*
 * libFuzzer target: the inbound SMTP session (relayd/smtpd.c) end to end, command parser,
 * AUTH, DATA, limits and the PROXY header included, with no test seam in smtpd.c.
 *
 * Once per process it starts the real smtpd server on a private libuv loop: a spool in a
 * temporary directory (no fsync), and two listeners on loopback ports, one plain
 * (debug_peers, AUTH, STARTTLS when a certificate is given, small limits, bare_lf =
 * normalize, glued_dot) and one behind proxy_protocol = any (sender/recipient domain
 * checks, accept-any AUTH, bare_lf = reject).  Each input is one
 * client connection: the first byte picks the listener, the rest is written to the socket
 * as the client's whole stream, then our side is shut down, and the loop runs until relayd
 * closes the connection.  The properties checked are the sanitizers' (no crash, no overflow,
 * no leak, no undefined behaviour) plus one of our own: after the client's EOF a session
 * must end within 30 s (a hang aborts; relayd's own timeouts here are 5 and 10 s).
 *
 * One input costs a TCP connection on loopback (about 0.1-1 ms), far slower than a pure
 * function, but it fuzzes the real state machine rather than a copy of it.
 *
 * Environment (tests/fuzz/run.sh sets them): FUZZ_SMTPD_CERT and FUZZ_SMTPD_KEY (PEM files:
 * enable STARTTLS), FUZZ_SMTPD_SASLDB (a sasldb: real Cyrus AUTH; else accept-any),
 * FUZZ_TMPDIR (where the spool directory goes, default /tmp; it is not removed).  When
 * relayd does not know the listener keys yet, a minimal configuration is used instead.
 * Run with -close_fd_mask=2: relayd logs every session on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/authsasl.h"
#include "common/log.h"
#include "common/tlsio.h"
#include "config/cfg.h"
#include "relayd/smtpd.h"
#include "spool/spool.h"

static struct {
    int ready;
    uv_loop_t loop;
    uv_async_t wake;
    struct cfg cfg;
    struct spool *sp;
    struct smtpd_server *srv;
    int port[2];
    char dir[256];
} F;

static void fuzz_die(const char *what)
{
    fprintf(stderr, "fuzz_smtpd: %s\n", what);
    fprintf(stdout, "fuzz_smtpd: %s\n", what);
    fflush(stdout);
    abort();
}

static void fuzz_spool_wake(void *arg)
{
    uv_async_send(arg);
}

static void fuzz_on_wake(uv_async_t *a)
{
    (void)a;
    spool_writer_reap(F.sp);
}

/* A port on 127.0.0.1 that nothing listens on right now. */
static int fuzz_free_port(void)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;

    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof(sin)) != 0 ||
        getsockname(fd, (struct sockaddr *)&sin, &len) != 0)
        fuzz_die("cannot find a free port");
    port = ntohs(sin.sin_port);
    close(fd);
    return port;
}

static int fuzz_load(const char *path, int full, char *err, size_t errlen)
{
    const char *cert = getenv("FUZZ_SMTPD_CERT"), *key = getenv("FUZZ_SMTPD_KEY");
    const char *sasldb = getenv("FUZZ_SMTPD_SASLDB");
    FILE *f = fopen(path, "w");

    if (f == NULL)
        fuzz_die("cannot write the configuration");
    fprintf(f,
            "[relayd]\nhostname = fuzz.test\nspool = %s/spool\nmax_message_size = 16k\n"
            "max_recipients = 5\n%s",
            F.dir, full ? "max_connections = 1000\nmax_connections_per_client = 1000\n" : "");
    fprintf(f, "\n[listener plain]\nlisten = 127.0.0.1:%d\nallow = 127.0.0.0/8\n", F.port[0]);
    if (full) {
        fprintf(f, "max_line_length = 512\nmax_errors = 10\ndebug_peers = 127.0.0.0/8\n"
                   "auth = optional\nauth_plaintext = yes\ncommand_timeout = 5s\n"
                   "data_timeout = 5s\nbare_lf = normalize\nglued_dot = yes\n"
                   "write_timeout = 5s\nhandshake_timeout = 5s\n");
        if (sasldb != NULL)
            fprintf(f, "sasldb = %s\n", sasldb);
        else
            fprintf(f, "auth = accept-any\n");
        if (cert != NULL && key != NULL)
            fprintf(f, "tls = starttls\ncert = %s\nkey = %s\n", cert, key);
    }
    fprintf(f, "\n[listener proxy]\nlisten = 127.0.0.1:%d\nallow = 0.0.0.0/0, ::/0\n", F.port[1]);
    if (full)
        fprintf(f, "proxy_protocol = any\nsender_domains = example.net\n"
                   "recipient_domains = example.com\nauth = accept-any\n"
                   "auth_plaintext = yes\nadd_message_id = no\nmax_errors = 5\n"
                   "command_timeout = 5s\ndata_timeout = 5s\nbare_lf = reject\n");
    fclose(f);
    return cfg_load(path, &F.cfg, err, errlen);
}

static void fuzz_setup(void)
{
    struct spool_opts so;
    const char *tmp = getenv("FUZZ_TMPDIR");
    char path[320], err[1024];

    signal(SIGPIPE, SIG_IGN);
    snprintf(F.dir, sizeof(F.dir), "%s/relayd-fuzz-smtpd.XXXXXX", tmp != NULL ? tmp : "/tmp");
    if (mkdtemp(F.dir) == NULL)
        fuzz_die("mkdtemp failed");
    snprintf(path, sizeof(path), "%s/relayd.conf", F.dir);
    F.port[0] = fuzz_free_port();
    F.port[1] = fuzz_free_port();
    if (fuzz_load(path, 1, err, sizeof(err)) != 0) {
        fprintf(stdout, "fuzz_smtpd: full listener configuration refused (%s); "
                        "fuzzing with the minimal one\n", err);
        if (fuzz_load(path, 0, err, sizeof(err)) != 0)
            fuzz_die(err);
    }
    if (tlsio_global_init(err, sizeof(err)) != 0 || authsasl_server_init(err, sizeof(err)) != 0)
        fuzz_die(err);
    memset(&so, 0, sizeof(so));
    so.unsafe_nosync = 1;
    if (spool_open(F.cfg.spool_dir, &so, &F.sp, err, sizeof(err)) != 0)
        fuzz_die(err);
    uv_loop_init(&F.loop);
    uv_async_init(&F.loop, &F.wake, fuzz_on_wake);
    if (spool_writer_start(F.sp, fuzz_spool_wake, &F.wake) != 0)
        fuzz_die("cannot start the spool writer");
    F.srv = smtpd_server_new(&F.loop, &F.cfg, F.sp, NULL, NULL);
    if (smtpd_server_listen(F.srv, err, sizeof(err)) != 0)
        fuzz_die(err);
    fprintf(stdout, "fuzz_smtpd: relayd smtpd on 127.0.0.1:%d and :%d, spool %s\n", F.port[0],
            F.port[1], F.dir);
    fflush(stdout);
    F.ready = 1;
}

static double fuzz_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/*
 * Connections whose session had not ended 0.1 s after our EOF: relayd may legitimately keep
 * one a little longer (a reply still flushing, a slowed-down AUTH failure).  They are
 * watched while later inputs run; one still open FUZZ_HANG_SECONDS after its EOF is a hang
 * and aborts.
 */
#define FUZZ_LINGER_MAX 256
#define FUZZ_HANG_SECONDS 30.0
static struct {
    int fd;
    double eof_at;
} lingering[FUZZ_LINGER_MAX];
static int nlingering;

/* 1 when relayd has closed fd (EOF or reset), after draining what it sent. */
static int fuzz_closed_by_peer(int fd, int *progress)
{
    char junk[16384];
    ssize_t n;

    for (;;) {
        n = recv(fd, junk, sizeof(junk), 0);
        if (n > 0) {
            *progress = 1;
            continue;
        }
        return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
}

static void fuzz_watch_lingering(double now)
{
    int i, progress = 0;

    for (i = 0; i < nlingering;) {
        if (fuzz_closed_by_peer(lingering[i].fd, &progress)) {
            close(lingering[i].fd);
            lingering[i] = lingering[--nlingering];
            continue;
        }
        if (now - lingering[i].eof_at > FUZZ_HANG_SECONDS)
            fuzz_die("a session did not end within 30 s of the client's EOF");
        i++;
    }
}

/*
 * A non-blocking connect, with relayd's loop pumped while it completes: relayd runs on this
 * thread, so a blocking connect into a full listen backlog (or a moment without a free
 * ephemeral port after tens of thousands of inputs) would wait for an accept that cannot
 * happen.  Bounded: 300 tries, each up to 2 s, at least 100 ms apart.
 */
static int fuzz_connect(const struct sockaddr_in *sin)
{
    char why[160];
    int tries, fd, err = 0;

    for (tries = 0; tries < 300; tries++) {
        double start = fuzz_now();
        socklen_t len = sizeof(err);

        if ((fd = socket(AF_INET, SOCK_STREAM, 0)) < 0)
            fuzz_die("socket() failed");
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
        if (connect(fd, (const struct sockaddr *)sin, sizeof(*sin)) == 0)
            return fd;
        err = errno;
        while (err == EINPROGRESS && fuzz_now() - start < 2.0) {
            struct pollfd p = {fd, POLLOUT, 0};

            uv_run(&F.loop, UV_RUN_NOWAIT);
            if (poll(&p, 1, 10) > 0) {
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err == 0)
                    return fd;
            }
        }
        close(fd);
        for (int i = 0; i < 10; i++) { /* let sessions close, ports free up */
            uv_run(&F.loop, UV_RUN_NOWAIT);
            poll(NULL, 0, 10);
        }
    }
    snprintf(why, sizeof(why), "cannot connect to the smtpd listener: %s", strerror(err));
    fuzz_die(why);
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sockaddr_in sin;
    size_t off = 0;
    int fd, i;
    double now, eof_at = 0;

    if (!F.ready)
        fuzz_setup();
    if (size < 1)
        return 0;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sin.sin_port = htons((uint16_t)F.port[data[0] & 1]);
    data++;
    size--;

    fd = fuzz_connect(&sin);

    for (;;) {
        ssize_t n;
        int progress = 0;

        if (off < size) {
            n = send(fd, data + off, size - off, MSG_NOSIGNAL);
            if (n > 0) {
                off += (size_t)n;
                progress = 1;
            } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                off = size; /* relayd hung up on us (EPIPE, ECONNRESET) */
            }
        }
        now = fuzz_now();
        if (off == size && eof_at == 0) {
            shutdown(fd, SHUT_WR);
            eof_at = now;
        }
        uv_run(&F.loop, UV_RUN_NOWAIT);
        if (fuzz_closed_by_peer(fd, &progress)) {
            close(fd);
            break; /* relayd ended the session */
        }
        fuzz_watch_lingering(now);
        if (eof_at != 0 && now - eof_at > 0.1 && nlingering < FUZZ_LINGER_MAX) {
            lingering[nlingering].fd = fd;
            lingering[nlingering].eof_at = eof_at;
            nlingering++;
            break;
        }
        if (eof_at != 0 && now - eof_at > FUZZ_HANG_SECONDS)
            fuzz_die("the session did not end within 30 s of the client's EOF");
        if (!progress) {
            struct pollfd p[2] = {{fd, POLLIN, 0}, {uv_backend_fd(&F.loop), POLLIN, 0}};
            int wait = uv_backend_timeout(&F.loop); /* 0: callbacks are due now */

            if (off < size)
                p[0].events |= POLLOUT;
            poll(p, 2, wait >= 0 && wait < 20 ? wait : 20);
        }
    }
    /* Let the session's close callbacks run so that the next input starts clean. */
    for (i = 0; i < 4; i++)
        uv_run(&F.loop, UV_RUN_NOWAIT);
    return 0;
}
