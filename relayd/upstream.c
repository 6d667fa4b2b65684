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

struct upstream {
    const struct cfg_upstream *cfg;
    int unhealthy;
    uint64_t since;
    char reason[512];
    char action[512];
    uint64_t paused_until;
    uint64_t told_until; /* the upstream's own Retry-After: not ended by a working session */
    uint64_t next_pause; /* 0: UPSTREAM_THROTTLE_FIRST_MS */
    int failed_sessions; /* temporary session-level failures since the last success */
    uint64_t next_cohort_pause; /* 0: the first one */
    /* Send times of the last max_messages_per_minute messages, oldest at head. */
    uint64_t *sent;
    int nsent, head;
    /* Recipients per minute over the last day, indexed by minute % DAY_MINUTES. */
    uint64_t *bucket_minute;
    uint32_t *bucket_count;
};

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
    log_warn("upstream %s: pausing all deliveries to it for %llus",
             u->cfg->name, (unsigned long long)(pause / 1000));
}

void upstream_pause_for(struct upstream *u, uint64_t ms, uint64_t now_ms)
{
    if (ms < 1000)
        ms = 1000;
    if (u->paused_until >= now_ms + ms)
        return;
    u->paused_until = u->told_until = now_ms + ms;
    log_warn("upstream %s: pausing all deliveries to it for %llus (Retry-After)", u->cfg->name,
             (unsigned long long)(ms / 1000));
}

int upstream_session_failed(struct upstream *u, int cohort, uint64_t first_ms, uint64_t max_ms,
                            uint64_t now_ms)
{
    uint64_t pause;

    if (cohort < 1)
        cohort = 1;
    if (++u->failed_sessions < cohort || u->paused_until > now_ms)
        return 0;
    /* Postfix's dead-destination rule: a whole cohort failed with no success among them;
     * more sessions now would only add to the upstream's trouble.  The pause follows the
     * retry schedule (a destination that is down, not one asking to slow down). */
    pause = u->next_cohort_pause != 0 ? u->next_cohort_pause : first_ms;
    if (pause > max_ms)
        pause = max_ms;
    u->failed_sessions = 0;
    u->paused_until = now_ms + pause;
    u->next_cohort_pause = pause * 2;
    log_warn("upstream %s: %d sessions in a row failed temporarily; pausing all deliveries to "
             "it for %llus",
             u->cfg->name, cohort, (unsigned long long)(pause / 1000));
    return 1;
}

void upstream_session_ok(struct upstream *u, uint64_t now_ms)
{
    u->failed_sessions = 0;
    u->next_pause = 0;
    u->next_cohort_pause = 0;
    if (u->paused_until > now_ms && u->told_until > now_ms) {
        /* A probe that works says nothing against the Retry-After the API gave. */
        u->paused_until = u->told_until;
        return;
    }
    if (u->paused_until > now_ms) {
        log_info("upstream %s: a session worked; the pause ends now", u->cfg->name);
        u->paused_until = 0;
    }
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
