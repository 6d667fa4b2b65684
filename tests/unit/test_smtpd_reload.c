/* Loop tests of the full reload's inbound side (smtpd_server_reconfigure()) and of the
 * configuration generations (cfg_gen_*): listeners added, kept and removed; a listener that
 * cannot bind changes nothing; a session in progress keeps its generation alive. */
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
#include "tests/lib/testlib.h"

static char tdir[64];
static uv_loop_t loop;
static struct smtpd_server *srv;
static int stopped;

static int free_port(int *keep_fd)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0), p;

    cr_assert(fd >= 0);
    cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    cr_assert_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    p = ntohs(sa.sin_port);
    if (keep_fd != NULL) {
        cr_assert_eq(listen(fd, 1), 0);
        *keep_fd = fd; /* the port stays in use */
    } else {
        close(fd);
    }
    return p;
}

/* A generation from an INI text with one [listener NAME] per port given (0 ends). */
static struct cfg_gen *gen_with(unsigned long n, const int *ports, const char *const *names)
{
    char text[2048], err[512];
    struct cfg cfg;
    size_t len;

    len = (size_t)snprintf(text, sizeof(text),
                           "[relayd]\nhostname = relay.test\nspool = %s/spool\n", tdir);
    for (int i = 0; ports[i] != 0; i++)
        len += (size_t)snprintf(text + len, sizeof(text) - len,
                                "\n[listener %s]\nlisten = 127.0.0.1:%d\nallow = 127.0.0.0/8\n",
                                names[i], ports[i]);
    testlib_write_file(tdir, "relayd.conf", text);
    snprintf(text, sizeof(text), "%s/relayd.conf", tdir);
    cr_assert_eq(cfg_load(text, &cfg, err, sizeof(err)), 0, "%s", err);
    return cfg_gen_new(&cfg, n);
}

static void setup(void)
{
    testlib_tmpdir(tdir, sizeof(tdir), "test_smtpd_reload");
    cr_assert_eq(uv_loop_init(&loop), 0);
    stopped = 0;
}

static void on_stopped(void *arg)
{
    (void)arg;
    stopped = 1;
}

static void teardown(void)
{
    if (srv != NULL) {
        if (!stopped)
            smtpd_server_stop(srv, on_stopped, NULL);
        for (int i = 0; i < 1000 && !stopped; i++)
            uv_run(&loop, UV_RUN_NOWAIT);
        smtpd_server_free(srv);
        srv = NULL;
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    cr_expect_eq(uv_loop_close(&loop), 0, "handles left open");
    testlib_rmtree(tdir);
}

TestSuite(smtpd_reload, .init = setup, .fini = teardown, .timeout = 60);

static int client_connect(int port)
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

/* Runs the loop (bounded) until the server sent want on fd.  1 when it did. */
static int pump(int fd, const char *want)
{
    char got[1024] = "";
    size_t len = 0;

    for (int i = 0; i < 2000; i++) {
        ssize_t n;

        uv_run(&loop, UV_RUN_NOWAIT);
        n = recv(fd, got + len, sizeof(got) - len - 1, 0);
        if (n > 0) {
            len += (size_t)n;
            got[len] = '\0';
        } else if (n == 0) {
            return 0;
        }
        if (strstr(got, want) != NULL)
            return 1;
        usleep(1000);
    }
    return 0;
}

/* Generations are counted: the last unref frees (ASan and the leak checker watch). */
Test(smtpd_reload, gen_refcount)
{
    int ports[] = {free_port(NULL), 0};
    const char *names[] = {"lan"};
    struct cfg_gen *g = gen_with(7, ports, names);

    cr_expect_eq(g->n, 7);
    cr_expect_eq(g->refs, 1);
    cr_expect(cfg_gen_ref(g) == g);
    cr_expect_eq(g->refs, 2);
    cr_expect(cfg_gen_unref(g) == NULL);
    cr_expect_eq(g->refs, 1);
    cr_expect(cfg_gen_ref(NULL) == NULL && cfg_gen_unref(NULL) == NULL);
    cfg_gen_unref(g);
}

/* A listener added takes connections, one kept stays on its socket (its session in
 * progress keeps generation 1 alive), one removed stops accepting; a reload whose new
 * listener cannot bind changes nothing at all. */
Test(smtpd_reload, listeners_added_kept_removed)
{
    int busy_fd, a = free_port(NULL), b = free_port(NULL), busy = free_port(&busy_fd);
    int p1[] = {a, 0}, p2[] = {a, b, 0}, p3[] = {b, busy, 0}, p4[] = {a, 0};
    const char *n1[] = {"lan"}, *n2[] = {"lan", "extra"}, *n3[] = {"extra", "busy"};
    struct cfg_gen *g1 = gen_with(1, p1, n1), *g2, *g3, *g4;
    struct smtpd_reconf st;
    char err[512];
    int fa, fb, fa2;

    srv = smtpd_server_new(&loop, &g1->cfg, NULL, NULL, NULL);
    cr_assert_eq(smtpd_server_reconfigure(srv, &g1->cfg, g1, &st, err, sizeof(err)), 0, "%s", err);
    cr_expect_eq(st.added, 1);
    fa = client_connect(a);
    cr_assert(pump(fa, "220 relay.test"), "no greeting on the first listener");
    cfg_gen_ref(g1); /* the test's own look at it */

    g2 = gen_with(2, p2, n2);
    cr_assert_eq(smtpd_server_reconfigure(srv, &g2->cfg, g2, &st, err, sizeof(err)), 0, "%s", err);
    cr_expect(st.added == 1 && st.removed == 0 && st.changed == 0, "+%d -%d ~%d", st.added,
              st.removed, st.changed);
    cfg_gen_unref(g1); /* the daemon's reference goes: the server and the session hold it */
    cr_expect_eq(g1->refs, 2, "the test's and the session's");
    fb = client_connect(b);
    cr_assert(pump(fb, "220 relay.test"), "the added listener does not greet");
    close(fb);

    /* busy is taken: the reload fails, and a (kept on its socket so far) is not closed. */
    g3 = gen_with(3, p3, n3);
    cr_expect_neq(smtpd_server_reconfigure(srv, &g3->cfg, g3, &st, err, sizeof(err)), 0);
    cr_expect(strstr(err, "listener busy: listen on") != NULL, "%s", err);
    cfg_gen_unref(g3);
    fa2 = client_connect(a);
    cr_assert(pump(fa2, "220 relay.test"), "a failed reload closed a listener");
    close(fa2);

    g4 = gen_with(4, p4, n1);
    cr_assert_eq(smtpd_server_reconfigure(srv, &g4->cfg, g4, &st, err, sizeof(err)), 0, "%s", err);
    cr_expect(st.added == 0 && st.removed == 1, "+%d -%d", st.added, st.removed);
    cfg_gen_unref(g2);
    cfg_gen_unref(g4); /* the server holds g4 now */
    for (int i = 0; i < 100; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    fb = client_connect(b);
    cr_expect_not(pump(fb, "220"), "the removed listener still greets");
    close(fb);

    /* The session of generation 1 is still served, and frees it when it ends. */
    cr_assert_eq(send(fa, "QUIT\r\n", 6, 0), 6);
    cr_assert(pump(fa, "221 "), "the session of generation 1 was not served");
    close(fa);
    for (int i = 0; i < 200 && g1->refs > 1; i++)
        uv_run(&loop, UV_RUN_NOWAIT), usleep(1000);
    cr_expect_eq(g1->refs, 1, "the ended session let go of generation 1");
    cfg_gen_unref(g1);
    close(busy_fd);
}
