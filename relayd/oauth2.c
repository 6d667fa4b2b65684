/*
 * oauth2 - OAuth 2.0 token manager; see oauth2.h.
 *
 * Happy path: oauth2_start() kicks every account; a kick builds the grant's POST (or
 * spawns oauth2_token_command) and puts it on the manager's asynchronous HTTP client
 * (relayd/http.h: libcurl's multi interface on the loop).  The answer is parsed by a small
 * JSON reader;
 * the token is stored with refresh_at (expiry - margin) and stale_at (expiry - margin/2),
 * and the account's timer is armed for refresh_at.  Deliveries peek synchronously.
 *
 * Failure modes: network, TLS and HTTP failures and OAuth errors become one sentence in
 * the account's lasterr, are logged once per attempt, and arm a retry with backoff.  A
 * token past stale_at is never handed out, so a failing endpoint holds mail (deliveries
 * defer with config_fault) rather than bouncing it.  Rotated refresh tokens are written
 * back atomically before the new access token is used; a write failure is logged and the
 * rotated token is kept in memory, so the next refresh can still write it.
 *
 * Secrets: client secrets, refresh tokens, assertions and access tokens live in malloc'd
 * buffers that are wiped before free; none of them reaches a log line or an error text.
 */
#include "relayd/oauth2_int.h"

#include <curl/curl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "relayd/http.h"

static void acct_kick(struct o2_acct *a);

/* ---- small helpers ---- */

static uint64_t mono_ms(void *arg)
{
    struct timespec ts;

    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_ms(struct oauth2 *o)
{
    return o->clock(o->clock_arg);
}

void oauth2__wipe_free(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

/* Printable ASCII only, at most max bytes: provider text goes into logs. */
void oauth2__sanitize(char *s, size_t max)
{
    size_t i;

    for (i = 0; s[i] != '\0'; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            s[i] = ' ';
    if (i > max)
        strcpy(s + max - 3, "...");
}

/* ---- accounts ---- */

static void acct_timer_cb(uv_timer_t *t);

static void acct_arm(struct o2_acct *a, uint64_t at)
{
    uint64_t now = now_ms(a->o);

    if (a->o->stopping)
        return;
    uv_timer_start(&a->timer, acct_timer_cb, at > now ? at - now : 0, 0);
}

static void acct_notify(struct o2_acct *a, const char *token, const char *err)
{
    struct o2_waiters list = a->waiters; /* callbacks may add new waiters */
    struct o2_waiter *w;

    SLIST_INIT(&a->waiters);
    while ((w = SLIST_FIRST(&list)) != NULL) {
        SLIST_REMOVE_HEAD(&list, link);
        w->cb(w->arg, token, err);
        free(w);
    }
}

static void acct_drop_token(struct o2_acct *a)
{
    oauth2__wipe_free(a->token);
    a->token = NULL;
    a->after_535 = 0;
}

void oauth2__acct_success(struct o2_acct *a, struct oauth2_resp *r)
{
    const struct cfg_upstream *up = a->up;
    uint64_t now = now_ms(a->o), life, margin;
    char why[400];

    if (r->refresh_token != NULL && up->grant == CFG_GRANT_REFRESH_TOKEN) {
        char *cur = NULL;

        /* Rotation (Microsoft always, Google sometimes): the old one may stop working. */
        if (oauth2__refresh_token_read(a, &cur, why, sizeof why) != 0 ||
            strcmp(cur, r->refresh_token)) {
            oauth2__wipe_free(a->rotated);
            a->rotated = xstrdup(r->refresh_token);
            if (oauth2_file_write(up->refresh_token_file, a->rotated, why, sizeof why) != 0) {
                log_error("oauth2: upstream %s: cannot store the rotated refresh token: %s "
                          "(kept in memory; relayd retries at the next refresh)",
                          up->name, why);
            } else {
                log_info("oauth2: upstream %s: refresh token rotated, written to %s", up->name,
                         up->refresh_token_file);
                oauth2__wipe_free(a->rotated);
                a->rotated = NULL;
            }
        }
        oauth2__wipe_free(cur);
    }
    acct_drop_token(a);
    a->token = r->access_token;
    r->access_token = NULL;
    a->after_535 = a->forced;
    a->forced = 0;
    life = (uint64_t)(r->expires_in > 0 ? r->expires_in : O2_DEFAULT_LIFETIME) * 1000;
    margin = (uint64_t)up->oauth2_refresh_margin * 1000;
    if (margin > life / 2)
        margin = life / 2;
    a->expires_at = now + life;
    a->refresh_at = a->expires_at - margin;
    a->stale_at = a->expires_at - margin / 2;
    a->failures = 0;
    a->next_try = 0;
    a->lasterr[0] = '\0';
    log_info("oauth2: upstream %s: token refreshed, expires in %llu s", up->name,
             (unsigned long long)(life / 1000));
    acct_arm(a, a->refresh_at);
    acct_notify(a, a->token, NULL);
}

void oauth2__acct_fail(struct o2_acct *a, const char *fmt, ...)
{
    uint64_t backoff = O2_BACKOFF_FIRST_MS;
    char why[500];
    va_list ap;
    int i;

    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    a->forced = 0;
    a->failures++;
    for (i = 1; i < a->failures && backoff < O2_BACKOFF_MAX_MS; i++)
        backoff *= 2;
    if (backoff > O2_BACKOFF_MAX_MS)
        backoff = O2_BACKOFF_MAX_MS;
    a->next_try = now_ms(a->o) + backoff;
    snprintf(a->lasterr, sizeof a->lasterr, "oauth2: %s", why);
    log_warn("oauth2: upstream %s: token refresh failed (%s, next try in %llu s): %s", a->up->name,
             oauth2_grant_name(a->up->grant), (unsigned long long)(backoff / 1000), why);
    acct_arm(a, a->next_try);
    acct_notify(a, NULL, a->lasterr);
}

static void acct_kick(struct o2_acct *a)
{
    if (a->req != NULL || a->cmd != NULL || a->o->stopping)
        return;
    if (a->up->grant == CFG_GRANT_COMMAND)
        oauth2__cmd_start(a);
    else
        oauth2__http_start(a);
}

static void acct_timer_cb(uv_timer_t *t)
{
    struct o2_acct *a = t->data;
    uint64_t now = now_ms(a->o);

    if (a->token != NULL && now < a->refresh_at) {
        acct_arm(a, a->refresh_at); /* a clock that moved slower than the timer */
        return;
    }
    acct_kick(a);
}

static struct o2_acct *acct_find(struct oauth2 *o, const struct cfg_upstream *up)
{
    int i;

    if (o == NULL || up == NULL)
        return NULL;
    for (i = 0; i < o->naccts; i++)
        if (o->accts[i].up == up || strcmp(o->accts[i].up->name, up->name) == 0)
            return &o->accts[i];
    return NULL;
}

/* ---- public ---- */

struct oauth2 *oauth2_new(uv_loop_t *loop, const struct cfg *cfg)
{
    struct oauth2 *o = xcalloc(1, sizeof(*o));
    int i, n = 0;

    o->loop = loop;
    o->clock = mono_ms;
    for (i = 0; i < cfg->nupstreams; i++)
        if (cfg->upstreams[i].upauth != CFG_UPAUTH_PASSWORD)
            n++;
    o->accts = n > 0 ? xcalloc((size_t)n, sizeof(*o->accts)) : NULL;
    for (i = 0; i < cfg->nupstreams; i++) {
        struct o2_acct *a;

        if (cfg->upstreams[i].upauth == CFG_UPAUTH_PASSWORD)
            continue;
        a = &o->accts[o->naccts++];
        a->o = o;
        a->up = &cfg->upstreams[i];
        snprintf(a->lasterr, sizeof a->lasterr, "oauth2: no token yet (requesting one)");
    }
    return o;
}

void oauth2_set_clock(struct oauth2 *o, oauth2_clock_fn fn, void *arg)
{
    o->clock = fn != NULL ? fn : mono_ms;
    o->clock_arg = arg;
}

/* Lazily: relayctl and tests that never ask for a token need no handles. */
static void ensure_started(struct oauth2 *o)
{
    int i;

    if (o->started || o->stopping)
        return;
    o->started = 1;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    o->http = http_new(o->loop);
    uv_timer_init(o->loop, &o->defer);
    o->defer.data = o;
    o->open_handles += 2;
    for (i = 0; i < o->naccts; i++) {
        uv_timer_init(o->loop, &o->accts[i].timer);
        o->accts[i].timer.data = &o->accts[i];
        o->open_handles++;
    }
}

/* One handle (a timer, the HTTP client) is closed; the last one ends oauth2_stop(). */
static void one_closed(struct oauth2 *o)
{
    if (--o->open_handles == 0 && o->stopping && o->stopped != NULL) {
        void (*fn)(void *) = o->stopped;

        o->stopped = NULL;
        fn(o->stopped_arg);
    }
}

void oauth2__handle_closed(uv_handle_t *h)
{
    one_closed(h->data);
}

static void http_closed(void *arg)
{
    one_closed(arg);
}

void oauth2_start(struct oauth2 *o)
{
    int i;

    if (o->naccts == 0)
        return;
    ensure_started(o);
    for (i = 0; i < o->naccts; i++)
        acct_kick(&o->accts[i]);
}

void oauth2_stop(struct oauth2 *o, void (*done)(void *arg), void *arg)
{
    int i;

    o->stopping = 1;
    o->stopped = done;
    o->stopped_arg = arg;
    if (!o->started) {
        o->stopped = NULL;
        if (done != NULL)
            done(arg);
        return;
    }
    o->open_handles++; /* hold: no done before everything below was issued */
    for (i = 0; i < o->naccts; i++) {
        struct o2_acct *a = &o->accts[i];

        if (a->req != NULL) {
            struct o2_req *r = a->req;

            a->req = NULL;
            oauth2__req_abandon(r);
        }
        if (a->cmd != NULL) {
            a->cmd->a = NULL;
            if (!a->cmd->exited)
                uv_process_kill(&a->cmd->proc, SIGKILL);
            oauth2__cmd_close(a->cmd);
            a->cmd = NULL;
        }
        acct_notify(a, NULL, "oauth2: relayd is stopping");
        a->timer.data = o;
        uv_close((uv_handle_t *)&a->timer, oauth2__handle_closed);
    }
    http_close(o->http, http_closed, o);
    o->http = NULL;
    uv_close((uv_handle_t *)&o->defer, oauth2__handle_closed);
    if (--o->open_handles == 0 && o->stopped != NULL) {
        o->stopped = NULL;
        done(arg);
    }
}

struct oauth2 *oauth2_free(struct oauth2 *o)
{
    int i;

    if (o == NULL)
        return NULL;
    for (i = 0; i < o->naccts; i++) {
        acct_drop_token(&o->accts[i]);
        oauth2__wipe_free(o->accts[i].rotated);
    }
    free(o->accts);
    if (o->started)
        curl_global_cleanup();
    free(o);
    return NULL;
}

const char *oauth2_mechanism(const struct cfg_upstream *up)
{
    switch (up->upauth) {
    case CFG_UPAUTH_XOAUTH2:
        return "XOAUTH2";
    case CFG_UPAUTH_OAUTHBEARER:
        return "OAUTHBEARER";
    case CFG_UPAUTH_PASSWORD:
        break;
    }
    return NULL;
}

const char *oauth2_token_peek(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);
    uint64_t now;

    if (a == NULL || o->stopping)
        return NULL;
    ensure_started(o);
    now = now_ms(o);
    if (a->token != NULL && now < a->stale_at) {
        if (now >= a->refresh_at)
            acct_kick(a); /* the timer may not have run yet */
        return a->token;
    }
    if (a->token != NULL)
        acct_drop_token(a); /* in its last margin/2: the refresh did not make it in time */
    if (now >= a->next_try)
        acct_kick(a);
    return NULL;
}

void oauth2_invalidate(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);

    if (a == NULL || o->stopping)
        return;
    ensure_started(o);
    if (a->token == NULL)
        return; /* already dropped (another delivery saw the 535) */
    if (a->after_535) {
        acct_drop_token(a);
        oauth2__acct_fail(a,
                          "upstream %s refused a token issued right after an earlier 535: check "
                          "that mailbox %s may send through it (Microsoft 365: SMTP AUTH enabled, "
                          "SMTP.SendAsApp/SMTP.Send and the mailbox permission granted)",
                          up->name, up->username);
        return;
    }
    log_warn("oauth2: upstream %s: the upstream refused the token; refreshing once", up->name);
    acct_drop_token(a);
    a->forced = 1;
    a->next_try = 0;
    acct_kick(a);
}

const char *oauth2_last_error(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);

    if (a == NULL) {
        if (o == NULL)
            return "oauth2: no token manager";
        snprintf(o->errtmp, sizeof o->errtmp, "oauth2: upstream %s does not use OAuth 2.0",
                 up != NULL ? up->name : "?");
        return o->errtmp;
    }
    if (a->lasterr[0] == '\0' && (a->req != NULL || a->cmd != NULL))
        return "oauth2: token refresh in progress";
    if (a->lasterr[0] == '\0' && a->token == NULL)
        return "oauth2: no valid token";
    return a->lasterr;
}

long oauth2_token_ttl(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);
    uint64_t now;

    if (a == NULL || a->token == NULL)
        return -1;
    now = now_ms(o);
    return a->expires_at > now ? (long)((a->expires_at - now) / 1000) : 0;
}

static void on_defer(uv_timer_t *t)
{
    struct oauth2 *o = t->data;
    uint64_t now = now_ms(o);
    int i;

    for (i = 0; i < o->naccts; i++) {
        struct o2_acct *a = &o->accts[i];

        if (SLIST_EMPTY(&a->waiters))
            continue;
        if (a->token != NULL && now < a->stale_at)
            acct_notify(a, a->token, NULL);
        else if (a->req == NULL && a->cmd == NULL && a->failures > 0)
            acct_notify(a, NULL, a->lasterr); /* backing off: say why now */
    }
}

int oauth2_token_get(struct oauth2 *o, const struct cfg_upstream *up, oauth2_token_cb cb, void *arg)
{
    struct o2_acct *a = acct_find(o, up);
    struct o2_waiter *w;

    if (a == NULL || o->stopping)
        return -1;
    w = xcalloc(1, sizeof(*w));
    w->cb = cb;
    w->arg = arg;
    SLIST_INSERT_HEAD(&a->waiters, w, link);
    /* Either a token is there, or a request is (or is not, when backing off): the
     * deferred check answers the first and last case, the request's end the other. */
    (void)oauth2_token_peek(o, up);
    uv_timer_start(&o->defer, on_defer, 0, 0);
    return 0;
}
