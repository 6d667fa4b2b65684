/*
 * test_upstream - rate windows on a test clock, throttle back-off, the failed-cohort rule
 * and health state (the provider reply table is tests/unit/test_verdict.c).  No loop, no network: every time is passed in.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <criterion/redirect.h>
#include <string.h>

#include "relayd/upstream.h"
#include "relayd/verdict.h"

TestSuite(upstream, .timeout = 10);

static struct cfg_upstream cfg_with(int per_minute, int per_day)
{
    struct cfg_upstream c;

    memset(&c, 0, sizeof(c));
    c.name = "m365";
    c.host = "smtp.office365.com";
    c.max_messages_per_minute = per_minute;
    c.max_recipients_per_day = per_day;
    return c;
}

/* 3 messages a minute: the 4th waits until the first leaves the 60 s window. */
Test(upstream, messages_per_minute_window)
{
    struct cfg_upstream c = cfg_with(3, 0);
    struct upstream *u = upstream_new(&c);
    uint64_t t0 = 1000000, wait = 0;

    cr_assert(eq(int, upstream_rate_wait(u, 1, t0, &wait), 0));
    upstream_rate_take(u, 1, t0);
    upstream_rate_take(u, 1, t0 + 10000);
    upstream_rate_take(u, 1, t0 + 20000);
    cr_assert(eq(int, upstream_rate_wait(u, 1, t0 + 30000, &wait), 1));
    cr_assert(eq(u64, wait, 30000));
    cr_assert(eq(int, upstream_rate_wait(u, 1, t0 + 60000, &wait), 0));
    upstream_rate_take(u, 1, t0 + 60000);
    /* Now the window holds t0+10s, t0+20s, t0+60s: next slot at t0+70s. */
    cr_assert(eq(int, upstream_rate_wait(u, 1, t0 + 61000, &wait), 1));
    cr_assert(eq(u64, wait, 9000));
    u = upstream_free(u);
}

/* 10 recipients a day over a rolling 24 h; one message over the limit alone still goes. */
Test(upstream, recipients_per_day_window)
{
    struct cfg_upstream c = cfg_with(0, 10);
    struct upstream *u = upstream_new(&c);
    uint64_t t0 = 5 * 86400000ULL, wait = 0;
    int msgs;
    long rcpts;

    upstream_rate_take(u, 6, t0);
    upstream_rate_take(u, 3, t0 + 3600000);
    cr_assert(eq(int, upstream_rate_wait(u, 1, t0 + 7200000, &wait), 0));
    cr_assert(eq(int, upstream_rate_wait(u, 2, t0 + 7200000, &wait), 1));
    /* The first 6 leave the window a day after their minute. */
    cr_assert(eq(u64, wait, 86400000ULL - 7200000));
    cr_assert(eq(int, upstream_rate_wait(u, 2, t0 + 86400000ULL, &wait), 0));
    upstream_rate_usage(u, t0 + 86400000ULL, &msgs, &rcpts);
    cr_assert(eq(long, rcpts, 3));
    u = upstream_free(u);

    u = upstream_new(&c);
    cr_assert(eq(int, upstream_rate_wait(u, 50, t0, &wait), 0), "an empty window lets it go");
    u = upstream_free(u);
}

/* No limits: never waits. */
Test(upstream, unlimited)
{
    struct cfg_upstream c = cfg_with(0, 0);
    struct upstream *u = upstream_new(&c);
    int i;

    for (i = 0; i < 1000; i++)
        upstream_rate_take(u, 100, 1000 + (uint64_t)i);
    cr_assert(eq(int, upstream_rate_wait(u, 100, 2000, NULL), 0));
    u = upstream_free(u);
}

/* Throttling pauses 60 s, doubling per throttle, capped at an hour, reset by a success;
 * concurrent throttles during a pause count once. */
Test(upstream, throttle_backoff)
{
    struct cfg_upstream c = cfg_with(0, 0);
    struct upstream *u = upstream_new(&c);
    uint64_t t = 1000000, wait;
    int i;

    upstream_throttle(u, t);
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 60000));
    upstream_throttle(u, t + 1000); /* another worker, same pause */
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 60000));
    cr_assert(eq(int, upstream_rate_wait(u, 1, t + 1000, &wait), 1));
    cr_assert(eq(u64, wait, 59000));
    t += 60000;
    cr_assert(eq(u64, upstream_paused_until(u, t), 0));
    upstream_throttle(u, t);
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 120000));
    for (i = 0; i < 10; i++) {
        t = upstream_paused_until(u, t);
        upstream_throttle(u, t);
    }
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 3600000));
    upstream_session_ok(u, t); /* a message went through: the doubling starts over */
    t += 3600000;
    upstream_throttle(u, t);
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 60000));
    u = upstream_free(u);
}

/* An HTTP API's Retry-After: that long exactly (at least 1 s), not shortened by a working
 * probe, not lengthening a longer pause, and the throttle doubling left alone. */
Test(upstream, pause_for_retry_after)
{
    struct cfg_upstream c = cfg_with(0, 0);
    struct upstream *u = upstream_new(&c);
    uint64_t t = 1000000;

    cr_redirect_stderr();
    upstream_pause_for(u, 3000, t);
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 3000));
    upstream_session_ok(u, t + 1000); /* the health probe worked */
    cr_assert(eq(u64, upstream_paused_until(u, t + 1000), t + 3000));
    upstream_pause_for(u, 1000, t + 1000); /* shorter: the longer pause stays */
    cr_assert(eq(u64, upstream_paused_until(u, t + 1000), t + 3000));
    cr_assert(eq(u64, upstream_paused_until(u, t + 3000), 0));
    upstream_pause_for(u, 10, t + 5000); /* at least a second */
    cr_assert(eq(u64, upstream_paused_until(u, t + 5000), t + 6000));
    upstream_throttle(u, t + 7000); /* the doubling starts at its first step */
    cr_assert(eq(u64, upstream_paused_until(u, t + 7000), t + 67000));
    upstream_session_ok(u, t + 8000); /* a throttle pause ends with a working session */
    cr_assert(eq(u64, upstream_paused_until(u, t + 8000), 0));
    u = upstream_free(u);
}

/* Postfix's dead-destination rule: one 421 among working sessions pauses nothing; a whole
 * cohort failing in a row does; a session that works ends the pause and the doubling. */
Test(upstream, failed_cohort)
{
    struct cfg_upstream c = cfg_with(0, 0);
    struct upstream *u = upstream_new(&c);
    uint64_t t = 1000000;

    cr_redirect_stderr();
    cr_assert(eq(int, upstream_session_failed(u, 4, 60000, 3600000, t), 0));
    upstream_session_ok(u, t);
    for (int i = 0; i < 3; i++)
        cr_assert(eq(int, upstream_session_failed(u, 4, 60000, 3600000, t), 0));
    cr_assert(eq(u64, upstream_paused_until(u, t), 0));
    cr_assert(eq(int, upstream_session_failed(u, 4, 60000, 3600000, t), 1));
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 60000));
    /* A session already under way succeeds: the pause ends at once. */
    upstream_session_ok(u, t + 1000);
    cr_assert(eq(u64, upstream_paused_until(u, t + 1000), 0));
    /* The next failed cohort starts from 60 s again, not 120 s. */
    for (int i = 0; i < 3; i++)
        upstream_session_failed(u, 4, 60000, 3600000, t + 2000);
    cr_assert(eq(int, upstream_session_failed(u, 4, 60000, 3600000, t + 2000), 1));
    cr_assert(eq(u64, upstream_paused_until(u, t + 2000), t + 2000 + 60000));
    u = upstream_free(u);
}

/* Health: reason and action kept, status line says both, healthy again clears them. */
Test(upstream, health_and_status)
{
    struct cfg_upstream c = cfg_with(30, 10000);
    struct upstream *u = upstream_new(&c);
    char line[512];

    cr_redirect_stderr();
    cr_assert(eq(int, upstream_is_healthy(u), 1));
    upstream_rate_take(u, 2, 1000);
    upstream_status(u, 2000, line, sizeof(line));
    cr_assert(eq(str, line, "healthy, 1/30 messages this minute, 2/10000 recipients in 24h"));
    upstream_set_unhealthy(u, "AUTH PLAIN: 535 5.7.139 Authentication unsuccessful",
                           verdict_action("535 5.7.139"), 2000);
    cr_assert(eq(int, upstream_is_healthy(u), 0));
    upstream_status(u, 12000, line, sizeof(line));
    cr_assert(eq(int, strncmp(line, "unhealthy for 10s: AUTH PLAIN: 535 5.7.139", 42), 0), "%s",
              line);
    cr_assert_not_null(strstr(line, "; action: SMTP AUTH is disabled"));
    upstream_set_healthy(u, 20000);
    cr_assert(eq(str, (char *)upstream_reason(u), ""));
    cr_assert(eq(str, (char *)upstream_action(u), ""));
    /* A tiny buffer is never overrun and still terminated. */
    cr_assert(gt(int, upstream_status(u, 20000, line, 5), 4));
    cr_assert(eq(str, line, "heal"));
    u = upstream_free(u);
}

/* What survives a restart: saved on one monotonic clock, loaded on another (a new
 * process), health with its reason, the pause still running and the rate windows come
 * back; what left its window meanwhile does not. */
Test(upstream, state_save_load_across_restart)
{
    struct cfg_upstream c = cfg_with(3, 10);
    struct upstream *u = upstream_new(&c), *v;
    struct spool_upstate st;
    uint64_t t0 = 5000000, t1 = 900000;          /* the two processes' monotonic clocks */
    int64_t wall0 = 1700000000000, wall1 = wall0 + 20000; /* restarted 20 s later */
    uint64_t wait = 0;
    int msgs;
    long rcpts;

    cr_assert(eq(int, upstream_state_dirty(u), 0));
    upstream_rate_take(u, 4, t0 - 70000); /* out of the minute window by the restart */
    upstream_rate_take(u, 2, t0 - 30000);
    upstream_rate_take(u, 1, t0 - 10000);
    upstream_throttle(u, t0);             /* paused 60 s */
    upstream_set_unhealthy(u, "AUTH PLAIN: 535 5.7.8 bad credentials", "fix password_file", t0);
    cr_assert(eq(int, upstream_state_dirty(u), 1));
    upstream_state_save(u, t0, wall0, &st);
    cr_assert(eq(int, upstream_state_dirty(u), 0), "saving marks it clean");
    cr_expect(eq(str, st.name, "m365"));
    cr_expect(eq(i64, st.paused_until, wall0 + 60000));
    cr_expect(eq(int, (int)st.nsent, 2), "send times still inside the minute");
    u = upstream_free(u);

    v = upstream_new(&c);
    upstream_state_load(v, &st, t1, wall1);
    spool_upstate_clear(&st);
    cr_expect(eq(int, upstream_is_healthy(v), 0));
    cr_expect(eq(str, (char *)upstream_reason(v), "AUTH PLAIN: 535 5.7.8 bad credentials"));
    cr_expect(eq(str, (char *)upstream_action(v), "fix password_file"));
    cr_expect(eq(u64, upstream_paused_until(v, t1), t1 + 40000), "40 s of the pause are left");
    upstream_rate_usage(v, t1, &msgs, &rcpts);
    cr_expect(eq(int, msgs, 2), "the sends 50 s and 30 s old are still in the minute");
    cr_expect(eq(long, rcpts, 7), "the day's recipients all come back");
    cr_expect(eq(int, upstream_rate_wait(v, 4, t1 + 50000, &wait), 1), "7 + 4 > 10 a day");
    cr_expect(eq(int, upstream_state_dirty(v), 0), "a loaded state is not saved again");
    v = upstream_free(v);
}

/* A reload carries the state to the new upstream of the same name (upstream_carry()),
 * within the new limits. */
Test(upstream, state_carried_by_reload)
{
    struct cfg_upstream c = cfg_with(3, 0), c2 = cfg_with(2, 0);
    struct upstream *u = upstream_new(&c), *v = upstream_new(&c2);
    uint64_t t0 = 1000000, wait = 0;
    int msgs;
    long rcpts;

    upstream_rate_take(u, 1, t0);
    upstream_rate_take(u, 1, t0 + 1000);
    upstream_rate_take(u, 1, t0 + 2000);
    upstream_throttle(u, t0 + 2000);
    upstream_carry(v, u);
    upstream_rate_usage(v, t0 + 3000, &msgs, &rcpts);
    cr_expect(eq(int, msgs, 2), "the new limit keeps the newest two send times");
    cr_expect(eq(u64, upstream_paused_until(v, t0 + 3000), t0 + 62000));
    cr_expect(eq(int, upstream_rate_wait(v, 1, t0 + 3000, &wait), 1));
    cr_expect(eq(int, upstream_state_dirty(v), 1), "unsaved news stay unsaved");
    u = upstream_free(u);
    v = upstream_free(v);
}

/* A provider's Retry-After pause survives a reload: a working session on the new
 * generation's upstream does not end it early. */
Test(upstream, retry_after_carried_by_reload)
{
    struct cfg_upstream c = cfg_with(0, 0);
    struct upstream *u = upstream_new(&c), *v = upstream_new(&c);
    uint64_t t0 = 1000000;

    upstream_pause_for(u, 30000, t0);
    upstream_carry(v, u);
    upstream_session_ok(v, t0 + 1000);
    cr_expect(eq(u64, upstream_paused_until(v, t0 + 1000), t0 + 30000),
              "the Retry-After still holds after the reload");
    u = upstream_free(u);
    v = upstream_free(v);
}
