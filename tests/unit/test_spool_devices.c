/* Unit tests for spool/spool_devices: the device history behind "relayctl devices". */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "spool/spool.h"
#include "tests/lib/testlib.h"

static char tdir[64];
static char sdir[96];

static void setup(void)
{
    testlib_tmpdir(tdir, sizeof(tdir), "test_spool_devices");
    snprintf(sdir, sizeof(sdir), "%s/spool", tdir);
}

static void teardown(void)
{
    testlib_rmtree(tdir);
}

TestSuite(spool_devices, .init = setup, .fini = teardown, .timeout = 120);

static void no_wake(void *arg)
{
    (void)arg;
}

static struct spool *open_rw(void)
{
    struct spool *sp;
    char err[256];

    cr_assert_eq(spool_open(sdir, NULL, &sp, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(spool_writer_start(sp, no_wake, NULL), 0);
    return sp;
}

static void note(struct spool *sp, const char *client, const char *helo, uint32_t accepted,
                 const char *reason, const char *text, int64_t when)
{
    struct spool_device_event ev = {client, helo, "lan", when, accepted, reason, text};

    spool_device_note(sp, &ev);
}

/* Events merge per client, are written at stop (no mail needed) and survive a reopen,
 * also read-only (relayctl); the most recently seen device comes first. */
Test(spool_devices, merge_persist_reopen)
{
    struct spool_opts ro = {.readonly = 1};
    struct spool_device *d;
    struct spool *sp = open_rw();
    char err[256];
    size_t n;

    note(sp, "10.0.0.7", "fax", 0, "auth_mechanism", "AUTH CRAM-MD5: not offered", 1000);
    note(sp, "10.0.0.7", NULL, 0, "auth_mechanism", "AUTH CRAM-MD5: not offered again", 1005);
    note(sp, "10.0.0.9", "panel", 2, NULL, NULL, 2000);
    spool_close(sp); /* the writer commits what is pending */

    sp = open_rw();
    note(sp, "10.0.0.7", "fax2", 1, NULL, NULL, 3000);
    spool_close(sp);

    cr_assert_eq(spool_open(sdir, &ro, &sp, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(spool_devices_list(sp, &d, &n), 0);
    cr_assert_eq(n, 2);
    cr_expect_str_eq(d[0].client, "10.0.0.7");
    cr_expect_str_eq(d[0].helo, "fax2");
    cr_expect_str_eq(d[0].listener, "lan");
    cr_expect_eq(d[0].first_seen, 1000);
    cr_expect_eq(d[0].last_seen, 3000);
    cr_expect_eq(d[0].accepted, 1);
    cr_assert_eq(d[0].nreasons, 1);
    cr_expect_str_eq(d[0].reasons[0].name, "auth_mechanism");
    cr_expect_eq(d[0].reasons[0].count, 2);
    cr_expect_eq(d[0].reasons[0].last_when, 1005);
    cr_expect_str_eq(d[0].reasons[0].last_text, "AUTH CRAM-MD5: not offered again");
    cr_expect_str_eq(d[1].client, "10.0.0.9");
    cr_expect_eq(d[1].accepted, 2);
    cr_expect_eq(d[1].nreasons, 0);
    spool_devices_free(d, n);
    spool_close(sp);
}

/* A spool without the devices sub-database (an old one) lists nothing, read-only. */
Test(spool_devices, empty_spool)
{
    struct spool_opts ro = {.readonly = 1};
    struct spool_device *d;
    struct spool *sp;
    char err[256];
    size_t n = 99;

    sp = open_rw();
    spool_close(sp);
    cr_assert_eq(spool_open(sdir, &ro, &sp, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(spool_devices_list(sp, &d, &n), 0);
    cr_expect_eq(n, 0);
    spool_devices_free(d, n);
    spool_close(sp);
}

/* Bounded: at most SPOOL_DEVICE_REASONS reasons per device (the oldest goes) and
 * SPOOL_DEVICES_MAX devices (the least recently seen goes). */
Test(spool_devices, bounded)
{
    struct spool_device *d;
    struct spool *sp = open_rw();
    char name[32], addr[32];
    size_t n, i;
    int j;

    for (j = 0; j < SPOOL_DEVICE_REASONS + 5; j++) {
        snprintf(name, sizeof(name), "reason%d", j);
        note(sp, "10.9.9.9", "x", 0, name, "text", 100 + j);
    }
    spool_close(sp);
    for (i = 0; i < SPOOL_DEVICES_MAX;) {
        sp = open_rw();
        for (j = 0; j < 4000 && i < SPOOL_DEVICES_MAX; j++, i++) {
            snprintf(addr, sizeof(addr), "10.1.%zu.%zu", i / 256, i % 256);
            note(sp, addr, "dev", 0, NULL, NULL, 1000 + (int64_t)i);
        }
        spool_close(sp);
    }
    cr_assert_eq(spool_open(sdir, NULL, &sp, NULL, 0), 0);
    cr_assert_eq(spool_devices_list(sp, &d, &n), 0);
    cr_expect_eq(n, SPOOL_DEVICES_MAX);
    /* 10.9.9.9 was seen least recently (t=136): it went to make room. */
    for (i = 0; i < n; i++)
        cr_expect_neq(strcmp(d[i].client, "10.9.9.9"), 0);
    spool_devices_free(d, n);
    spool_close(sp);

    /* The reason bound, on a device recorded alone. */
    testlib_rmtree(sdir);
    sp = open_rw();
    for (j = 0; j < SPOOL_DEVICE_REASONS + 5; j++) {
        snprintf(name, sizeof(name), "reason%d", j);
        note(sp, "10.9.9.9", "x", 0, name, "text", 100 + j);
    }
    spool_close(sp);
    cr_assert_eq(spool_open(sdir, NULL, &sp, NULL, 0), 0);
    cr_assert_eq(spool_devices_list(sp, &d, &n), 0);
    cr_assert_eq(n, 1);
    cr_expect_eq(d[0].nreasons, SPOOL_DEVICE_REASONS);
    for (i = 0; i < d[0].nreasons; i++)
        cr_expect_neq(strcmp(d[0].reasons[i].name, "reason0"), 0, "the oldest reason stayed");
    spool_devices_free(d, n);
    spool_close(sp);
}

/* With no mail, pending events are still committed within SPOOL_DEVICES_FLUSH seconds
 * while the writer runs (one commit for all of them, not one per event). */
Test(spool_devices, flushed_without_mail)
{
    struct spool_opts ro = {.readonly = 1};
    struct spool_device *d = NULL;
    struct spool *sp = open_rw(), *rd;
    struct spool_stats st;
    size_t n = 0;
    int i;

    for (i = 0; i < 50; i++)
        note(sp, "10.0.0.1", "dev", 0, "not_allowed", "connect: not in allow", 10 + i);
    cr_assert_eq(spool_open(sdir, &ro, &rd, NULL, 0), 0);
    for (i = 0; i < 4 * (SPOOL_DEVICES_FLUSH + 5) && n == 0; i++) {
        usleep(250000);
        spool_devices_free(d, n);
        /* A read-only handle opened before the sub-database existed cannot see it: reopen. */
        spool_close(rd);
        cr_assert_eq(spool_open(sdir, &ro, &rd, NULL, 0), 0);
        cr_assert_eq(spool_devices_list(rd, &d, &n), 0);
    }
    cr_assert_eq(n, 1, "device events were not committed without mail");
    cr_expect_eq(d[0].reasons[0].count, 50);
    spool_devices_free(d, n);
    cr_assert_eq(spool_stats(sp, &st), 0);
    cr_expect_eq(st.commits, 1);
    spool_close(rd);
    spool_close(sp);
}
