/* Unit tests for relayd/sched: retry backoff and the failed_retention purge. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "relayd/sched.h"
#include "tests/lib/testlib.h"

/* Backoff doubles from retry_first, stays within +-10%, and is capped at retry_max. */
Test(sched, backoff)
{
    for (unsigned rnd = 0; rnd < 2001; rnd += 250) {
        int64_t d1 = sched_backoff(1, 60, 3600, rnd);
        int64_t d3 = sched_backoff(3, 60, 3600, rnd);
        int64_t d20 = sched_backoff(20, 60, 3600, rnd);
        cr_expect(d1 >= 54 && d1 <= 66, "%lld", (long long)d1);
        cr_expect(d3 >= 216 && d3 <= 264, "%lld", (long long)d3);
        cr_expect(d20 >= 3240 && d20 <= 3960, "%lld", (long long)d20);
    }
    cr_expect_geq(sched_backoff(1, 0, 0, 0), 1);
}

struct backoff_case {
    const char *label;
    int attempts, first, factor, max;
    int64_t want; /* without jitter (rnd = 1000) */
};

/* retry_factor: first * factor^(attempts-1), capped; factor 1 is a constant interval. */
Test(sched, backoff_factor)
{
    static const struct backoff_case cases[] = {
        {"first attempt", 1, 60, 3, 3600, 60},
        {"factor 3, second", 2, 60, 3, 3600, 180},
        {"factor 3, third", 3, 60, 3, 3600, 540},
        {"factor 3, capped", 5, 60, 3, 3600, 3600},
        {"factor 1", 7, 300, 1, 3600, 300},
        {"factor 10", 3, 10, 10, 100000, 1000},
        {"factor 10, huge attempts", 1000000, 10, 10, 7 * 86400, 7 * 86400},
        {"factor 2 = sched_backoff", 4, 60, 2, 3600, 480},
        {"zero attempts", 0, 60, 2, 3600, 60},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct backoff_case *c = &cases[i];
        int64_t mid = sched_backoff_factor(c->attempts, c->first, c->factor, c->max, 1000);
        int64_t lo = sched_backoff_factor(c->attempts, c->first, c->factor, c->max, 0);
        int64_t hi = sched_backoff_factor(c->attempts, c->first, c->factor, c->max, 2000);
        cr_expect(eq(i64, mid, c->want), "%s", c->label);
        cr_expect(lo >= c->want - c->want / 10 - 1 && lo < c->want, "%s: %lld", c->label,
                  (long long)lo);
        cr_expect(hi <= c->want + c->want / 10 + 1 && hi > c->want, "%s: %lld", c->label,
                  (long long)hi);
    }
    cr_expect(eq(i64, sched_backoff(4, 60, 3600, 1000), 480));
}

/* ---- failed_retention ---- */

static char tdir[64];

static void on_done(void *arg, int rc)
{
    int *r = arg;
    *r = rc == 0 ? 1 : -1;
}

/* Stores a message that arrived age seconds ago, then sets its state. */
static uint64_t put_aged(struct spool *sp, int64_t age, enum spool_state st)
{
    struct spool_msg m;
    struct spool_rcpt r = {.addr = "a@example.org", .status = SPOOL_RCPT_PENDING};
    int done = 0;

    memset(&m, 0, sizeof(m));
    /* Queue ids are arrival times in milliseconds: the purge relies on it. */
    m.id = spool_id_new(sp) - (uint64_t)age * 1000;
    m.state = SPOOL_QUEUED;
    m.arrived = time(NULL) - age;
    m.next_attempt = m.arrived;
    m.sender = "fax@lan";
    m.client = "10.0.0.7";
    m.rcpts = &r;
    m.nrcpts = 1;
    spool_put_async(sp, &m, strdup("Subject: x\r\n\r\nx\r\n"), 17, on_done, &done);
    testlib_spool_reap_until(sp, &done, 1);
    cr_assert(eq(int, done, 1));
    if (st != SPOOL_QUEUED)
        cr_assert(eq(int, spool_msg_set_state(sp, m.id, st), 0));
    return m.id;
}

/* Only FAILED messages older than the retention go; the ids say which; max is honoured. */
Test(sched, purge_failed, .timeout = 60)
{
    struct spool_opts o = {0};
    struct spool *sp = NULL;
    struct spool_msg *m;
    uint64_t old_failed, old_failed2, new_failed, old_held, old_queued, ids[4];
    char err[256], sdir[96];
    size_t n = 0;

    testlib_tmpdir(tdir, sizeof(tdir), "test_sched");
    snprintf(sdir, sizeof sdir, "%s/spool", tdir);
    cr_assert(eq(int, spool_open(sdir, &o, &sp, err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, spool_writer_start(sp, testlib_spool_wake, NULL), 0));

    old_failed = put_aged(sp, 8 * 86400, SPOOL_FAILED);
    old_failed2 = put_aged(sp, 9 * 86400, SPOOL_FAILED);
    new_failed = put_aged(sp, 86400, SPOOL_FAILED);
    old_held = put_aged(sp, 30 * 86400, SPOOL_HELD);
    old_queued = put_aged(sp, 30 * 86400, SPOOL_QUEUED);

    /* max 1: one of the two old failed ones. */
    cr_assert(eq(int, sched_purge_failed(sp, time(NULL), 7 * 86400, ids, 1, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_expect(ids[0] == old_failed || ids[0] == old_failed2);
    cr_assert(eq(int, sched_purge_failed(sp, time(NULL), 7 * 86400, ids, 4, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_assert(eq(int, sched_purge_failed(sp, time(NULL), 7 * 86400, ids, 4, &n), 0));
    cr_expect(eq(sz, n, 0));

    cr_expect(eq(int, spool_msg_get(sp, old_failed, 0, &m), SPOOL_ENOTFOUND));
    cr_expect(eq(int, spool_msg_get(sp, old_failed2, 0, &m), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_msg_get(sp, new_failed, 0, &m), 0));
    spool_msg_free(m);
    cr_assert(eq(int, spool_msg_get(sp, old_held, 0, &m), 0));
    spool_msg_free(m);
    cr_assert(eq(int, spool_msg_get(sp, old_queued, 0, &m), 0));
    spool_msg_free(m);

    spool_writer_stop(sp);
    spool_writer_reap(sp);
    spool_close(sp);
    testlib_rmtree(tdir);
}

/* ---- The round's outcome ---- */

#define P SPOOL_RCPT_PENDING
#define S SPOOL_RCPT_SENT
#define F SPOOL_RCPT_FAILED
#define NOW 1000000
#define WAIT (NOW + 600)

struct round_case {
    const char *label;
    int64_t age; /* seconds since arrival */
    int attempts;
    size_t n;
    struct sched_round_rcpt r[3]; /* before, in_round, cause, routed, wait_until */
    enum spool_state want_state;
    int want_delivered, want_count, want_expired;
    int64_t want_next;                  /* -1: a backoff from NOW; 0: none */
    enum spool_rcpt_status want_after[3];
};

static const struct round_case round_cases[] = {
    {"all sent: removed", 10, 0, 2,
     {{P, 1, VERDICT_SENT, 1, 0, P, 0}, {P, 1, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_QUEUED, 1, 0, 0, 0, {S, S}},
    {"550 + 250: failed, counted", 10, 0, 2,
     {{P, 1, VERDICT_PERMANENT, 1, 0, P, 0}, {P, 1, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_FAILED, 0, 1, 0, 0, {F, S}},
    {"553 not owned by user + 250: the refused one waits, uncounted", 10, 0, 2,
     {{P, 1, VERDICT_CONFIG, 1, WAIT, P, 0}, {P, 1, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_DEFERRED, 0, 0, 0, WAIT, {P, S}},
    {"452 quota + 250: backoff, counted", 10, 0, 2,
     {{P, 1, VERDICT_TRANSIENT, 1, 0, P, 0}, {P, 1, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_DEFERRED, 0, 1, 0, -1, {P, S}},
    {"slow-down waits for the pause, uncounted", 10, 3, 1,
     {{P, 1, VERDICT_SLOWDOWN, 1, NOW + 60, P, 0}},
     SPOOL_DEFERRED, 0, 0, 0, NOW + 60, {P}},
    {"transient past max_lifetime: expired", 100, 9, 1,
     {{P, 1, VERDICT_TRANSIENT, 1, 0, P, 0}},
     SPOOL_FAILED, 0, 1, 1, 0, {F}},
    {"a pause past max_lifetime also expires", 100, 9, 1,
     {{P, 1, VERDICT_SLOWDOWN, 1, NOW + 60, P, 0}},
     SPOOL_FAILED, 0, 0, 1, 0, {F}},
    {"the relay's own fault never expires mail", 100, 9, 1,
     {{P, 1, VERDICT_CONFIG, 1, WAIT, P, 0}},
     SPOOL_DEFERRED, 0, 0, 0, WAIT, {P}},
    {"a stop before the second group: due now", 10, 0, 2,
     {{P, 1, VERDICT_SENT, 1, 0, P, 0}, {P, 0, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_DEFERRED, 0, 0, 0, NOW, {S, P}},
    {"no route for what is left: held", 10, 0, 2,
     {{P, 1, VERDICT_SENT, 1, 0, P, 0}, {P, 0, VERDICT_SENT, 0, 0, P, 0}},
     SPOOL_HELD, 0, 0, 0, 0, {S, P}},
    {"failed in an earlier round, rest sent: failed", 10, 1, 2,
     {{F, 0, VERDICT_SENT, 0, 0, P, 0}, {P, 1, VERDICT_SENT, 1, 0, P, 0}},
     SPOOL_FAILED, 0, 0, 0, 0, {F, S}},
    {"transient and config: the sooner of backoff and wait", 10, 0, 2,
     {{P, 1, VERDICT_TRANSIENT, 1, 0, P, 0}, {P, 1, VERDICT_CONFIG, 1, NOW + 5, P, 0}},
     SPOOL_DEFERRED, 0, 1, 0, NOW + 5, {P, P}},
};

/* max_lifetime (100 here) counts the age less the time spent waiting on configuration
 * faults: the waits that ended (config_wait) and the one in progress (config_since). */
struct config_wait_case {
    const char *label;
    int64_t age, config_wait, config_since; /* since: seconds before NOW, 0: none */
    enum verdict_cause cause;
    int want_expired;
    int64_t want_config_wait;
    int want_config_since_now; /* out.config_since == NOW (else 0) */
};

static const struct config_wait_case config_wait_cases[] = {
    {"old, never waited on config: expires", 150, 0, 0, VERDICT_TRANSIENT, 1, 0, 0},
    {"old, but 60 s of it waited on config: lives", 150, 60, 0, VERDICT_TRANSIENT, 0, 60, 0},
    {"the wait in progress counts too", 150, 0, 70, VERDICT_TRANSIENT, 0, 70, 0},
    {"ended waits and the one in progress add up", 150, 20, 20, VERDICT_TRANSIENT, 1, 40, 0},
    {"a slow-down after a config wait: the wait still counts", 150, 60, 0, VERDICT_SLOWDOWN, 0,
     60, 0},
    {"config again: the clock stays stopped from now", 150, 0, 100, VERDICT_CONFIG, 0, 100, 1},
    {"config for the first time: the wait begins now", 10, 0, 0, VERDICT_CONFIG, 0, 0, 1},
    {"sent after a wait: nothing expires", 500, 0, 450, VERDICT_SENT, 0, 450, 0},
};

/* Waiting on a configuration fault does not age a message (table). */
Test(sched, round_decide_config_wait)
{
    struct cfg cfg;

    memset(&cfg, 0, sizeof(cfg));
    cfg.max_lifetime = 100;
    cfg.retry_first = 60;
    cfg.retry_factor = 2;
    cfg.retry_max = 3600;
    for (size_t i = 0; i < sizeof(config_wait_cases) / sizeof(config_wait_cases[0]); i++) {
        const struct config_wait_case *c = &config_wait_cases[i];
        struct sched_round_rcpt r[1] = {{P, 1, c->cause, 1, WAIT, P, 0}};
        struct sched_round_in in = {&cfg, NOW, NOW - c->age, 1, 1000, c->config_wait,
                                    c->config_since > 0 ? NOW - c->config_since : 0};
        struct sched_outcome out;

        sched_round_decide(&in, r, 1, &out);
        cr_expect(eq(int, out.expired, c->want_expired), "%s: expired", c->label);
        cr_expect(eq(i64, out.config_wait, c->want_config_wait), "%s: config_wait", c->label);
        cr_expect(eq(i64, out.config_since, c->want_config_since_now ? NOW : 0),
                  "%s: config_since", c->label);
    }
    cr_expect(eq(i64, sched_age(NOW, NOW - 500, 100, NOW - 50), 350));
    cr_expect(eq(i64, sched_age(NOW, NOW - 500, 0, 0), 500));
}

/* Each recipient's verdict gives the message's state, next attempt and whether the
 * attempt counts (table). */
Test(sched, round_decide)
{
    struct cfg cfg;

    memset(&cfg, 0, sizeof(cfg));
    cfg.max_lifetime = 100;
    cfg.retry_first = 60;
    cfg.retry_factor = 2;
    cfg.retry_max = 3600;
    for (size_t i = 0; i < sizeof(round_cases) / sizeof(round_cases[0]); i++) {
        const struct round_case *c = &round_cases[i];
        struct sched_round_rcpt r[3];
        struct sched_round_in in = {&cfg, NOW, NOW - c->age, c->attempts, 1000, 0, 0};
        struct sched_outcome out;

        memcpy(r, c->r, sizeof(r));
        sched_round_decide(&in, r, c->n, &out);
        cr_expect(eq(int, (int)out.state, (int)c->want_state), "%s: state", c->label);
        cr_expect(eq(int, out.delivered, c->want_delivered), "%s: delivered", c->label);
        cr_expect(eq(int, out.count_attempt, c->want_count), "%s: count", c->label);
        cr_expect(eq(int, out.expired, c->want_expired), "%s: expired", c->label);
        if (c->want_next == -1)
            cr_expect(eq(i64, out.next_attempt,
                         NOW + sched_backoff_factor(c->attempts + 1, 60, 2, 3600, 1000)),
                      "%s: next", c->label);
        else if (c->want_next > 0)
            cr_expect(eq(i64, out.next_attempt, c->want_next), "%s: next", c->label);
        for (size_t k = 0; k < c->n; k++)
            cr_expect(eq(int, (int)r[k].after, (int)c->want_after[k]), "%s: after[%zu]",
                      c->label, k);
    }
}
