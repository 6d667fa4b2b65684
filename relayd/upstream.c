/*
 * upstream - run-time state of one upstream; see upstream.h.
 *
 * The provider reply table is data: one row per known reply, matched in order, first match
 * wins.  A row matches when every pattern it has matches: the basic reply code (0: any),
 * the enhanced status code as a whole token ("5.7.9" does not match "5.7.90") and a piece
 * of text (case-insensitive).  To teach relayd a new provider reply, add a row.
 */
#include "relayd/upstream.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/log.h"
#include "common/xalloc.h"

#define MINUTE_MS 60000ULL
#define DAY_MINUTES 1440

struct reply_row {
    int code;           /* basic reply code, 0: any */
    const char *status; /* enhanced status code token, NULL: any */
    const char *text;   /* case-insensitive substring, NULL: any */
    int config_fault;
    int throttle;
    const char *action;
};

#define ACT_SEND_AS                                                                                \
    "the account relayd logs in with may not send as this sender: rewrite the sender to the "      \
    "account's own address (rewrite_sender on the route) or grant the account \"Send As\" "        \
    "permission for that address"
#define ACT_CREDENTIALS                                                                            \
    "the upstream refused the username or password: check username and password_file"
#define ACT_QUOTA                                                                                  \
    "the provider's sending quota is used up: lower max_messages_per_minute or "                   \
    "max_recipients_per_day for this upstream (Microsoft 365 allows 30 messages a minute and "     \
    "10,000 recipients a day per mailbox); mail stays queued meanwhile"

static const struct reply_row reply_table[] = {
    /* Microsoft 365 / Exchange Online. */
    {0, "5.7.30", NULL, 1, 0,
     "Microsoft 365 has basic authentication disabled for this tenant: switch the upstream to "
     "OAuth2 (auth = xoauth2)"},
    {0, "5.2.252", NULL, 1, 0, ACT_SEND_AS},
    {0, NULL, "SendAsDenied", 1, 0, ACT_SEND_AS},
    {0, "5.7.60", NULL, 1, 0, ACT_SEND_AS},
    {0, "5.7.139", NULL, 1, 0,
     "SMTP AUTH is disabled for this mailbox or the tenant (security defaults): enable "
     "Authenticated SMTP for the mailbox in the Microsoft 365 admin center and turn security "
     "defaults off, or switch the upstream to OAuth2"},
    {0, "4.7.66", NULL, 1, 0,
     "the upstream refuses the TLS version relayd offered: allow TLS 1.2 or later in "
     "tls_priority (the default does)"},
    {0, "5.7.57", NULL, 1, 0,
     "the upstream only accepts mail after authentication: set username and password_file"},
    {0, "5.7.3", "Authentication unsuccessful", 1, 0, ACT_CREDENTIALS},
    {0, NULL, "SubmissionQuotaExceeded", 0, 1, ACT_QUOTA},
    {432, "4.3.2", NULL, 0, 1,
     "the upstream limits concurrent sessions per mailbox: lower max_connections for this "
     "upstream (Microsoft 365 allows 3)"},
    /* Google Workspace / Gmail. */
    {534, "5.7.9", NULL, 1, 0,
     "Google requires an app password for this account: create one (Google Account > Security "
     "> App passwords) and put it in password_file, or switch the upstream to OAuth2"},
    {0, "5.7.8", "Username and Password not accepted", 1, 0,
     ACT_CREDENTIALS " (Google accounts with 2-step verification need an app password)"},
    {0, "4.7.28", NULL, 0, 1,
     "Google is rate-limiting this sender: lower max_messages_per_minute for this upstream"},
    {0, "5.4.5", NULL, 0, 1, ACT_QUOTA},
    /* Postfix and generic RFC 4954 / RFC 3207 replies. */
    {0, NULL, "not owned by user", 1, 0, ACT_SEND_AS},
    {530, NULL, "STARTTLS", 1, 0,
     "the upstream requires TLS before anything else: set tls = starttls or implicit"},
    {534, NULL, NULL, 1, 0,
     "the upstream considers the authentication mechanism too weak: allow a stronger one in "
     "mechanisms (e.g. SCRAM-SHA-256 or PLAIN over TLS)"},
    {535, NULL, NULL, 1, 0, ACT_CREDENTIALS},
    {538, NULL, NULL, 1, 0,
     "the upstream requires encryption for this authentication mechanism: use tls = starttls "
     "or implicit"},
    {530, NULL, NULL, 1, 0, "the upstream requires authentication: set username and password_file"},
    /* Too many recipients for one message is about the message, not a reason to slow down. */
    {452, "4.5.3", NULL, 0, 0, NULL},
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* Words in a 4xx that mean "slow down" even without a table row. */
static const char *const throttle_words[] = {
    "rate limit", "ratelimit", "rate-limit", "too many", "throttl", "exceeded", "slow down",
};

struct upstream {
    const struct cfg_upstream *cfg;
    int unhealthy;
    uint64_t since;
    char reason[512];
    char action[512];
    uint64_t paused_until;
    uint64_t next_pause; /* 0: UPSTREAM_THROTTLE_FIRST_MS */
    /* Send times of the last max_messages_per_minute messages, oldest at head. */
    uint64_t *sent;
    int nsent, head;
    /* Recipients per minute over the last day, indexed by minute % DAY_MINUTES. */
    uint64_t *bucket_minute;
    uint32_t *bucket_count;
};

/* ---- The reply table ---- */

static int is_code_char(char c)
{
    return isdigit((unsigned char)c) || c == '.';
}

/* 1 when tok occurs in s as a whole dotted-number token. */
static int has_token(const char *s, const char *tok)
{
    size_t n = strlen(tok);
    const char *p = s;

    while ((p = strstr(p, tok)) != NULL) {
        if ((p == s || !is_code_char(p[-1])) && !is_code_char(p[n]))
            return 1;
        p++;
    }
    return 0;
}

/* The first SMTP reply code in s: three digits at the start or after a space, followed by
 * a space, a hyphen or the end; 0 when there is none. */
static int reply_code(const char *s)
{
    const char *p;

    for (p = s; *p != '\0'; p++) {
        if ((p == s || p[-1] == ' ') && p[0] >= '2' && p[0] <= '5' &&
            isdigit((unsigned char)p[1]) && isdigit((unsigned char)p[2]) &&
            (p[3] == ' ' || p[3] == '-' || p[3] == '\0'))
            return (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    }
    return 0;
}

int upstream_reply_classify(const char *reply, struct upstream_reply_info *info)
{
    int code = reply != NULL ? reply_code(reply) : 0;
    size_t i;

    memset(info, 0, sizeof(*info));
    if (reply == NULL)
        return 0;
    for (i = 0; i < NELEM(reply_table); i++) {
        const struct reply_row *r = &reply_table[i];

        if (r->code != 0 && r->code != code)
            continue;
        if (r->status != NULL && !has_token(reply, r->status))
            continue;
        if (r->text != NULL && strcasestr(reply, r->text) == NULL)
            continue;
        info->action = r->action;
        info->config_fault = r->config_fault;
        info->throttle = r->throttle;
        return 1;
    }
    /* RFC 5321 4.2.3: 421 means the service is closing.  Providers shed load with
     * 421 4.7.x (RFC 3463: security or policy) or say so in words; a bare 421 (a timeout,
     * a restart) only defers the message at hand, it does not pause the upstream. */
    if (code / 100 == 4) {
        info->throttle = code == 421 && strstr(reply, " 4.7.") != NULL;
        for (i = 0; i < NELEM(throttle_words) && !info->throttle; i++)
            info->throttle = strcasestr(reply, throttle_words[i]) != NULL;
    }
    return 0;
}

const char *upstream_reply_action(const char *reply)
{
    struct upstream_reply_info info;

    upstream_reply_classify(reply, &info);
    return info.action;
}

/* ---- Lifetime ---- */

struct upstream *upstream_new(const struct cfg_upstream *cfg)
{
    struct upstream *u = xcalloc(1, sizeof(*u));

    u->cfg = cfg;
    if (cfg->max_messages_per_minute > 0)
        u->sent = xcalloc((size_t)cfg->max_messages_per_minute, sizeof(*u->sent));
    if (cfg->max_recipients_per_day > 0) {
        u->bucket_minute = xcalloc(DAY_MINUTES, sizeof(*u->bucket_minute));
        u->bucket_count = xcalloc(DAY_MINUTES, sizeof(*u->bucket_count));
    }
    return u;
}

struct upstream *upstream_free(struct upstream *u)
{
    if (u != NULL) {
        free(u->sent);
        free(u->bucket_minute);
        free(u->bucket_count);
        free(u);
    }
    return NULL;
}

const struct cfg_upstream *upstream_cfg(const struct upstream *u)
{
    return u->cfg;
}

/* ---- Health ---- */

int upstream_is_healthy(const struct upstream *u)
{
    return !u->unhealthy;
}

void upstream_set_unhealthy(struct upstream *u, const char *reason, const char *action,
                            uint64_t now_ms)
{
    int changed = !u->unhealthy || strcmp(u->reason, reason) != 0;

    if (!u->unhealthy)
        u->since = now_ms;
    u->unhealthy = 1;
    snprintf(u->reason, sizeof(u->reason), "%s", reason);
    snprintf(u->action, sizeof(u->action), "%s", action != NULL ? action : "");
    if (changed)
        log_warn("upstream %s: unhealthy, its mail is held until a probe succeeds: %s%s%s",
                 u->cfg->name, u->reason, u->action[0] != '\0' ? "; the administrator must: " : "",
                 u->action);
}

void upstream_set_healthy(struct upstream *u, uint64_t now_ms)
{
    if (u->unhealthy)
        log_info("upstream %s: healthy again after %llus; held mail is delivered now", u->cfg->name,
                 (unsigned long long)((now_ms - u->since) / 1000));
    u->unhealthy = 0;
    u->reason[0] = '\0';
    u->action[0] = '\0';
}

const char *upstream_reason(const struct upstream *u)
{
    return u->reason;
}

const char *upstream_action(const struct upstream *u)
{
    return u->action;
}

/* ---- Throttling ---- */

void upstream_throttle(struct upstream *u, uint64_t now_ms)
{
    uint64_t pause = u->next_pause != 0 ? u->next_pause : UPSTREAM_THROTTLE_FIRST_MS;

    /* Several workers hearing the same 421 at once count as one. */
    if (u->paused_until > now_ms)
        return;
    u->paused_until = now_ms + pause;
    u->next_pause = pause * 2 > UPSTREAM_THROTTLE_MAX_MS ? UPSTREAM_THROTTLE_MAX_MS : pause * 2;
    log_warn("upstream %s: asked to slow down; pausing all deliveries to it for %llus",
             u->cfg->name, (unsigned long long)(pause / 1000));
}

void upstream_throttle_clear(struct upstream *u)
{
    u->next_pause = 0;
}

uint64_t upstream_paused_until(const struct upstream *u, uint64_t now_ms)
{
    return u->paused_until > now_ms ? u->paused_until : 0;
}

/* ---- Rate shaping ---- */

static long rcpts_in_day(const struct upstream *u, uint64_t now_min, uint64_t *oldest_min)
{
    long sum = 0;
    int i;

    *oldest_min = UINT64_MAX;
    for (i = 0; i < DAY_MINUTES; i++) {
        if (u->bucket_count[i] == 0 || u->bucket_minute[i] + DAY_MINUTES <= now_min)
            continue;
        sum += u->bucket_count[i];
        if (u->bucket_minute[i] < *oldest_min)
            *oldest_min = u->bucket_minute[i];
    }
    return sum;
}

int upstream_rate_wait(const struct upstream *u, size_t nrcpts, uint64_t now_ms, uint64_t *wait_ms)
{
    uint64_t wait = 0;
    int limit = u->cfg->max_messages_per_minute;

    if (u->paused_until > now_ms)
        wait = u->paused_until - now_ms;
    if (limit > 0 && u->nsent == limit) {
        uint64_t oldest = u->sent[u->head];
        if (oldest + MINUTE_MS > now_ms && oldest + MINUTE_MS - now_ms > wait)
            wait = oldest + MINUTE_MS - now_ms;
    }
    if (u->cfg->max_recipients_per_day > 0) {
        uint64_t now_min = now_ms / MINUTE_MS, oldest_min;
        long used = rcpts_in_day(u, now_min, &oldest_min);
        if (used > 0 && used + (long)nrcpts > u->cfg->max_recipients_per_day) {
            /* The oldest minute leaves the window at its end plus a day. */
            uint64_t free_at = (oldest_min + DAY_MINUTES) * MINUTE_MS;
            if (free_at > now_ms && free_at - now_ms > wait)
                wait = free_at - now_ms;
        }
    }
    if (wait_ms != NULL)
        *wait_ms = wait;
    return wait > 0;
}

void upstream_rate_take(struct upstream *u, size_t nrcpts, uint64_t now_ms)
{
    int limit = u->cfg->max_messages_per_minute;

    if (limit > 0) {
        if (u->nsent < limit) {
            u->sent[(u->head + u->nsent) % limit] = now_ms;
            u->nsent++;
        } else {
            u->sent[u->head] = now_ms; /* the oldest leaves, the newest takes its place */
            u->head = (u->head + 1) % limit;
        }
    }
    if (u->cfg->max_recipients_per_day > 0) {
        uint64_t now_min = now_ms / MINUTE_MS;
        int i = (int)(now_min % DAY_MINUTES);
        if (u->bucket_minute[i] != now_min) {
            u->bucket_minute[i] = now_min;
            u->bucket_count[i] = 0;
        }
        u->bucket_count[i] += (uint32_t)nrcpts;
    }
}

void upstream_rate_usage(const struct upstream *u, uint64_t now_ms, int *msgs_minute,
                         long *rcpts_day)
{
    uint64_t oldest;
    int i, n = 0;

    for (i = 0; i < u->nsent; i++)
        n += u->sent[(u->head + i) % u->cfg->max_messages_per_minute] + MINUTE_MS > now_ms;
    *msgs_minute = n;
    *rcpts_day = u->bucket_count != NULL ? rcpts_in_day(u, now_ms / MINUTE_MS, &oldest) : 0;
}

/* ---- Summary ---- */

int upstream_status(const struct upstream *u, uint64_t now_ms, char *out, size_t outlen)
{
    struct buf_like {
        char *p;
        size_t left;
        int total;
    } b = {out, outlen, 0};
    int n, msgs;
    long rcpts;

#define ADD(...)                                                                                   \
    do {                                                                                           \
        n = snprintf(b.p, b.left, __VA_ARGS__);                                                    \
        b.total += n;                                                                              \
        if (n > 0 && (size_t)n < b.left) {                                                         \
            b.p += n;                                                                              \
            b.left -= (size_t)n;                                                                   \
        } else if (b.left > 0) {                                                                   \
            b.p += b.left - 1;                                                                     \
            b.left = 1;                                                                            \
        }                                                                                          \
    } while (0)

    if (outlen > 0)
        out[0] = '\0';
    if (u->unhealthy) {
        ADD("unhealthy for %llus: %s", (unsigned long long)((now_ms - u->since) / 1000), u->reason);
        if (u->action[0] != '\0')
            ADD("; action: %s", u->action);
    } else {
        ADD("healthy");
    }
    if (u->paused_until > now_ms)
        ADD(", paused for %llus after a throttling reply",
            (unsigned long long)((u->paused_until - now_ms + 999) / 1000));
    upstream_rate_usage(u, now_ms, &msgs, &rcpts);
    if (u->cfg->max_messages_per_minute > 0)
        ADD(", %d/%d messages this minute", msgs, u->cfg->max_messages_per_minute);
    if (u->cfg->max_recipients_per_day > 0)
        ADD(", %ld/%d recipients in 24h", rcpts, u->cfg->max_recipients_per_day);
#undef ADD
    return b.total;
}
