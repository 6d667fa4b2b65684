/* Loop tests of relayd/smtpd against a real spool: what happens while a message's commit
 * is pending.  The spool writer is held back by taking the spool's map lock exclusively
 * (the writer takes it shared around every transaction), so "commit pending" is a state
 * the test controls rather than a race. */
#include <criterion/criterion.h>

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/smtpd.h"
#include "spool/spool_int.h"
#include "tests/lib/testlib.h"

static char tdir[64];
static uv_loop_t loop;
static uv_async_t wake;
static struct cfg cfg;
static struct spool *sp;
static struct smtpd_server *srv;
static int port, stopped;

static void on_wake(uv_async_t *a)
{
    (void)a;
    spool_writer_reap(sp);
}

static void wake_fn(void *arg)
{
    uv_async_send(arg);
}

static int free_port(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0), p;

    cr_assert(fd >= 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    p = ntohs(sa.sin_port);
    close(fd);
    return p;
}

static void setup(void)
{
    char dir[96], err[256];

    testlib_tmpdir(tdir, sizeof(tdir), "test_smtpd_loop");
    snprintf(dir, sizeof(dir), "%s/spool", tdir);
    cr_assert_eq(uv_loop_init(&loop), 0);
    cr_assert_eq(uv_async_init(&loop, &wake, on_wake), 0);
    cr_assert_eq(spool_open(dir, NULL, &sp, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(spool_writer_start(sp, wake_fn, &wake), 0);
    cfg_default(&cfg, dir);
    port = free_port();
    cfg.listeners[0].port = port;
    srv = smtpd_server_new(&loop, &cfg, sp, NULL, NULL);
    cr_assert_eq(smtpd_server_listen(srv, err, sizeof(err)), 0, "%s", err);
    stopped = 0;
}

static void on_stopped(void *arg)
{
    (void)arg;
    stopped = 1;
}

static void teardown(void)
{
    if (!stopped)
        smtpd_server_stop(srv, on_stopped, NULL);
    for (int i = 0; i < 1000 && !stopped; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    smtpd_server_free(srv);
    spool_writer_stop(sp);
    spool_writer_reap(sp);
    uv_close((uv_handle_t *)&wake, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_expect_eq(uv_loop_close(&loop), 0, "handles left open");
    spool_close(sp);
    cfg_free(&cfg);
    testlib_rmtree(tdir);
}

TestSuite(smtpd_loop, .init = setup, .fini = teardown, .timeout = 60);

static int client_connect(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK),
                             .sin_port = htons((uint16_t)port)};
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    cr_assert(fd >= 0);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
        cr_assert_eq(errno, EINPROGRESS);
    return fd;
}

/* Runs the loop (bounded) and reads what the server sent into got, until want appears (or
 * the server closes, when want is NULL).  Returns 1 when it did. */
static int pump(int fd, char *got, size_t cap, const char *want, int rounds)
{
    size_t len = strlen(got);

    for (int i = 0; i < rounds; i++) {
        ssize_t n;

        uv_run(&loop, UV_RUN_NOWAIT);
        n = recv(fd, got + len, cap - len - 1, 0);
        if (n > 0) {
            len += (size_t)n;
            got[len] = '\0';
        } else if (n == 0 && want == NULL) {
            return 1;
        }
        if (want != NULL && strstr(got, want) != NULL)
            return 1;
        usleep(1000);
    }
    return 0;
}

static void send_all(int fd, const char *s)
{
    cr_assert_eq(send(fd, s, strlen(s), 0), (ssize_t)strlen(s));
}

/* Until the final dot: the session is then waiting for the commit (the writer is held). */
static int start_message(char *got, size_t cap)
{
    int fd = client_connect();

    cr_assert(pump(fd, got, cap, "220 ", 2000), "no greeting: %s", got);
    send_all(fd, "HELO t\r\nMAIL FROM:<a@lan.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n");
    cr_assert(pump(fd, got, cap, "354 ", 2000), "no 354: %s", got);
    cr_assert_eq(pthread_rwlock_wrlock(&sp->maplock), 0);
    send_all(fd, "Subject: t\r\n\r\nbody\r\n.\r\n");
    /* Give the session time to hand the message over; no reply may come meanwhile. */
    cr_assert_not(pump(fd, got, cap, "250 2.0.0", 100), "replied before the commit: %s", got);
    return fd;
}

/* A stop while a commit is pending waits for it: the client gets its 250, then 421
 * (before: 421 at once while the message was committed anyway, and it sent it again). */
Test(smtpd_loop, stop_lets_the_commit_answer)
{
    char got[4096] = "";
    int fd = start_message(got, sizeof(got));

    smtpd_server_stop(srv, on_stopped, NULL);
    cr_assert_not(pump(fd, got, sizeof(got), "421", 50), "421 before the commit: %s", got);
    cr_expect_not(stopped, "the server stopped with a commit pending");
    pthread_rwlock_unlock(&sp->maplock);
    cr_assert(pump(fd, got, sizeof(got), "421", 5000), "no 250 and 421: %s", got);
    cr_assert(strstr(got, "250 2.0.0 Ok: queued as ") != NULL, "%s", got);
    cr_expect(strstr(got, "250 2.0.0 Ok: queued") < strstr(got, "421"), "%s", got);
    for (int i = 0; i < 2000 && !stopped; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    cr_expect(stopped);
    close(fd);
}

/* A client that half-closes while its commit is pending still gets the 250, then the
 * session ends (before: closed at the EOF, no 250: a duplicate when the device retries). */
Test(smtpd_loop, half_close_gets_the_250)
{
    char got[4096] = "";
    int fd = start_message(got, sizeof(got));

    cr_assert_eq(shutdown(fd, SHUT_WR), 0);
    cr_assert_not(pump(fd, got, sizeof(got), "250 2.0.0", 50), "%s", got);
    pthread_rwlock_unlock(&sp->maplock);
    cr_assert(pump(fd, got, sizeof(got), "250 2.0.0 Ok: queued as ", 5000), "no 250: %s", got);
    cr_assert(pump(fd, got, sizeof(got), NULL, 5000), "the session did not end");
    close(fd);
}
