/*
 * test_upstream - the provider reply table, rate windows on a test clock, throttle
 * back-off and health state.  No loop, no network: every time is passed in.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <criterion/redirect.h>
#include <string.h>

#include "relayd/upstream.h"

TestSuite(upstream, .timeout = 10);

struct reply_case {
    const char *label;
    const char *reply;
    const char *want_action_part; /* NULL: no action */
    int want_fault;
    int want_throttle;
};

static const struct reply_case reply_cases[] = {
    {"m365 basic auth off",
     "535 5.7.30 Basic authentication is not supported for Client Submission",
     "switch the upstream to OAuth2", 1, 0},
    {"m365 send as denied",
     "554 5.2.252 SendAsDenied; dev@corp.example not allowed to send as fax@lan; STOREDRV",
     "Send As", 1, 0},
    {"send as denied without the code", "550 SendAsDenied", "Send As", 1, 0},
    {"m365 smtp auth disabled",
     "AUTH LOGIN: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
     "for the Tenant",
     "Authenticated SMTP", 1, 0},
    {"m365 tls version", "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade",
     "tls_priority", 1, 0},
    {"google app password",
     "AUTH PLAIN: 534-5.7.9 Application-specific password required. Learn more at "
     "https://support.google.com/mail/?p=InvalidSecondFactor",
     "app password", 1, 0},
    {"google bad password", "535-5.7.8 Username and Password not accepted.", "app password", 1, 0},
    {"postfix auth failed", "AUTH PLAIN: 535 5.7.8 Error: authentication failed",
     "check username and password_file", 1, 0},
    {"postfix sender login mismatch",
     "553 5.7.1 <fax@lan>: Sender address rejected: not owned by user dev", "Send As", 1, 0},
    {"google rate limit", "421-4.7.28 Our system has detected an unusual rate", "rate-limiting", 0,
     1},
    {"m365 concurrency", "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
     "max_connections", 0, 1},
    {"plain 421 only defers", "421 4.3.2 Service shutting down", NULL, 0, 0},
    {"4xx rate words throttle", "450 4.7.1 Error: too many messages, slow down", NULL, 0, 1},
    {"too many recipients is not a throttle", "452 4.5.3 Error: too many recipients", NULL, 0, 0},
    {"ordinary 4xx", "451 4.3.0 try later", NULL, 0, 0},
    {"ordinary 5xx", "550 5.1.1 <b@example.com>: Recipient address rejected", NULL, 0, 0},
    {"token, not prefix: 5.7.90", "550 5.7.90 something else", NULL, 0, 0},
    {"success", "250 2.0.0 Ok: queued as 3B1F0", NULL, 0, 0},
};

/* Each known provider reply maps to its action, fault and throttle flags. */
Test(upstream, reply_table)
{
    size_t i;

    for (i = 0; i < sizeof(reply_cases) / sizeof(reply_cases[0]); i++) {
        const struct reply_case *c = &reply_cases[i];
        struct upstream_reply_info info;

        upstream_reply_classify(c->reply, &info);
        if (c->want_action_part == NULL)
            cr_expect_null(info.action, "%s: %s", c->label, info.action);
        else
            cr_expect_not_null(info.action != NULL ? strstr(info.action, c->want_action_part)
                                                   : NULL,
                               "%s: action %s", c->label, info.action);
        cr_expect(eq(int, info.config_fault, c->want_fault), "%s", c->label);
        cr_expect(eq(int, info.throttle, c->want_throttle), "%s", c->label);
    }
    cr_assert_null(upstream_reply_action(NULL));
    cr_assert_not_null(upstream_reply_action("550 5.7.30 Basic authentication"));
}

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
    upstream_throttle_clear(u);
    t += 3600000;
    upstream_throttle(u, t);
    cr_assert(eq(u64, upstream_paused_until(u, t), t + 60000));
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
                           upstream_reply_action("535 5.7.139"), 2000);
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
