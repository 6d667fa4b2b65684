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
#include "relayd/metrics.h"

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
    unsigned changes, saved; /* for upstream_state_save(): changed since the last save */
};

/* ---- Lifetime ---- */

struct upstream *upstream_new(const struct cfg_upstream *cfg)
{
    struct upstream *u = xcalloc(1, sizeof(*u));

    u->cfg = cfg;
    metrics_on_health(cfg->name, 1, NULL);
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

/* ---- Reload ---- */

void upstream_carry(struct upstream *u, const struct upstream *from)
{
    int i, flimit = from->cfg->max_messages_per_minute, limit = u->cfg->max_messages_per_minute;

    u->unhealthy = from->unhealthy;
    u->since = from->since;
    memcpy(u->reason, from->reason, sizeof(u->reason));
    memcpy(u->action, from->action, sizeof(u->action));
    u->paused_until = from->paused_until;
    u->told_until = from->told_until; /* a Retry-After outlives a reload */
    u->next_pause = from->next_pause;
    u->failed_sessions = from->failed_sessions;
    u->next_cohort_pause = from->next_cohort_pause;
    u->changes = u->saved + (from->changes != from->saved); /* unsaved news stay unsaved */
    /* Oldest first, so that a smaller limit keeps the newest send times. */
    if (u->sent != NULL && from->sent != NULL) {
        for (i = 0; i < from->nsent; i++) {
            uint64_t t = from->sent[(from->head + i) % flimit];

            if (u->nsent < limit) {
                u->sent[(u->head + u->nsent) % limit] = t;
                u->nsent++;
            } else {
                u->sent[u->head] = t;
                u->head = (u->head + 1) % limit;
            }
        }
    }
    if (u->bucket_count != NULL && from->bucket_count != NULL) {
        memcpy(u->bucket_minute, from->bucket_minute, DAY_MINUTES * sizeof(*u->bucket_minute));
        memcpy(u->bucket_count, from->bucket_count, DAY_MINUTES * sizeof(*u->bucket_count));
    }
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
    u->changes += changed;
    snprintf(u->reason, sizeof(u->reason), "%s", reason);
    snprintf(u->action, sizeof(u->action), "%s", action != NULL ? action : "");
    metrics_on_health(u->cfg->name, 0, u->reason);
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
    u->changes += u->unhealthy;
    u->unhealthy = 0;
    metrics_on_health(u->cfg->name, 1, NULL);
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
    u->changes++;
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
    u->changes++;
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
    if (u->failed_sessions != 0 || u->next_pause != 0 || u->next_cohort_pause != 0 ||
        u->paused_until > now_ms)
        u->changes++;
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

    if (limit > 0 || u->cfg->max_recipients_per_day > 0)
        u->changes++;
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

/* ---- Kept across restarts ---- */

int upstream_state_dirty(const struct upstream *u)
{
    return u->changes != u->saved;
}

void upstream_state_save(struct upstream *u, uint64_t now_ms, int64_t wall_ms,
                         struct spool_upstate *st)
{
    int64_t off = wall_ms - (int64_t)now_ms; /* monotonic -> wall clock */
    int limit = u->cfg->max_messages_per_minute;

    memset(st, 0, sizeof(*st));
    st->name = xstrdup(u->cfg->name);
    st->saved = wall_ms;
    st->unhealthy = u->unhealthy;
    if (u->unhealthy) {
        st->since = (int64_t)u->since + off;
        st->reason = xstrdup(u->reason);
        st->action = u->action[0] != '\0' ? xstrdup(u->action) : NULL;
    }
    st->paused_until = u->paused_until > now_ms ? (int64_t)u->paused_until + off : 0;
    st->next_pause = (int64_t)u->next_pause;
    st->failed_sessions = u->failed_sessions;
    st->next_cohort_pause = (int64_t)u->next_cohort_pause;
    st->sent = xcalloc((size_t)u->nsent + 1, sizeof(*st->sent));
    for (int i = 0; i < u->nsent; i++) {
        uint64_t t = u->sent[(u->head + i) % limit];

        if (t + MINUTE_MS > now_ms)
            st->sent[st->nsent++] = (int64_t)t + off;
    }
    st->buckets = xcalloc(u->bucket_count != NULL ? DAY_MINUTES + 1 : 1, sizeof(*st->buckets));
    for (int i = 0; u->bucket_count != NULL && i < DAY_MINUTES; i++) {
        if (u->bucket_count[i] == 0 || u->bucket_minute[i] + DAY_MINUTES <= now_ms / MINUTE_MS)
            continue;
        st->buckets[st->nbuckets].minute =
            ((int64_t)u->bucket_minute[i] * (int64_t)MINUTE_MS + off) / (int64_t)MINUTE_MS;
        st->buckets[st->nbuckets++].count = u->bucket_count[i];
    }
    u->saved = u->changes;
}

/* A wall-clock time (ms) on the monotonic scale, never below 0. */
static uint64_t to_mono(int64_t wall, uint64_t now_ms, int64_t wall_ms)
{
    int64_t t = wall - (wall_ms - (int64_t)now_ms);

    return t > 0 ? (uint64_t)t : 0;
}

void upstream_state_load(struct upstream *u, const struct spool_upstate *st, uint64_t now_ms,
                         int64_t wall_ms)
{
    int limit = u->cfg->max_messages_per_minute;
    char what[768];
    size_t i;
    int n = 0;

    what[0] = '\0';
    if (st->unhealthy) {
        u->unhealthy = 1;
        u->since = to_mono(st->since, now_ms, wall_ms);
        snprintf(u->reason, sizeof(u->reason), "%s", st->reason != NULL ? st->reason : "");
        snprintf(u->action, sizeof(u->action), "%s", st->action != NULL ? st->action : "");
        n += snprintf(what + n, sizeof(what) - (size_t)n, "unhealthy since %llds ago: %s; ",
                      (long long)((wall_ms - st->since) / 1000), u->reason);
    }
    if (st->paused_until > wall_ms) {
        u->paused_until = now_ms + (uint64_t)(st->paused_until - wall_ms);
        n += snprintf(what + n, sizeof(what) - (size_t)n, "paused for %llds more; ",
                      (long long)((st->paused_until - wall_ms + 999) / 1000));
    }
    u->next_pause = st->next_pause > 0 ? (uint64_t)st->next_pause : 0;
    u->failed_sessions = st->failed_sessions;
    u->next_cohort_pause = st->next_cohort_pause > 0 ? (uint64_t)st->next_cohort_pause : 0;
    for (i = 0; limit > 0 && i < st->nsent; i++) {
        if (st->sent[i] + (int64_t)MINUTE_MS <= wall_ms)
            continue; /* out of the window already */
        if (u->nsent < limit) {
            u->sent[(u->head + u->nsent) % limit] = to_mono(st->sent[i], now_ms, wall_ms);
            u->nsent++;
        } else {
            u->sent[u->head] = to_mono(st->sent[i], now_ms, wall_ms);
            u->head = (u->head + 1) % limit;
        }
    }
    for (i = 0; u->bucket_count != NULL && i < st->nbuckets; i++) {
        int64_t m = st->buckets[i].minute * (int64_t)MINUTE_MS - (wall_ms - (int64_t)now_ms);
        uint64_t mm;
        int k;

        if (st->buckets[i].minute + DAY_MINUTES <= wall_ms / (int64_t)MINUTE_MS || m < 0)
            continue; /* out of the day's window */
        mm = (uint64_t)m / MINUTE_MS;
        k = (int)(mm % DAY_MINUTES);
        if (u->bucket_minute[k] != mm) {
            u->bucket_minute[k] = mm;
            u->bucket_count[k] = 0;
        }
        u->bucket_count[k] += st->buckets[i].count;
    }
    if (limit > 0 || u->bucket_count != NULL) {
        int msgs;
        long rcpts;

        upstream_rate_usage(u, now_ms, &msgs, &rcpts);
        if (msgs > 0 || rcpts > 0)
            snprintf(what + n, sizeof(what) - (size_t)n,
                     "%d message%s in the last minute, %ld recipient%s in the last 24 hours; ",
                     msgs, msgs == 1 ? "" : "s", rcpts, rcpts == 1 ? "" : "s");
    }
    if (what[0] != '\0') {
        what[strlen(what) - 2] = '\0'; /* the last "; " */
        log_info("upstream %s: state from before the restart: %s", u->cfg->name, what);
    }
    u->saved = u->changes;
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
