/*
 * oauth2_int - what the files of the OAuth 2.0 token manager share (libuv's uv__ style):
 * the manager and account structs and the oauth2__ functions that cross files.  Nothing
 * outside relayd/oauth2*.c includes this; the public interface is oauth2.h.
 *
 *   oauth2.c        accounts: token cache, refresh timers, backoff, waiters; the public API
 *   oauth2_grant.c  the grant's POST, the JWT assertion, the token-response parser, the
 *                   atomic refresh-token write
 *   oauth2_http.c   the token request on relayd/http.h, and the blocking POST for relayctl
 *   oauth2_cmd.c    oauth2_token_command (uv_spawn)
 *
 * An account has at most one request (a->req) or command (a->cmd) in flight; its end calls
 * oauth2__acct_success() or oauth2__acct_fail(), which own what happens next.
 */
#ifndef RELAYD_OAUTH2_INT_H
#define RELAYD_OAUTH2_INT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/queue.h>
#include <uv.h>

#include "common/buf.h"
#include "common/json.h"
#include "config/cfg.h"
#include "relayd/oauth2.h"

/* Replies larger than this are not token responses. */
#define O2_BODY_MAX (64 * 1024)
#define O2_CONNECT_TIMEOUT 10L
#define O2_REQUEST_TIMEOUT 30L
#define O2_COMMAND_TIMEOUT_MS 30000
/* Lifetime assumed for a bare token printed by oauth2_token_command. */
#define O2_DEFAULT_LIFETIME 3600
#define O2_BACKOFF_FIRST_MS 2000
#define O2_BACKOFF_MAX_MS (300 * 1000)
#define O2_SECRET_MAX (64 * 1024)
#define O2_USER_AGENT "relayd-oauth2/0.1"
#define O2_GRANT_JWT "urn:ietf:params:oauth:grant-type:jwt-bearer"

#define O2_CONTAINER(p, type, member) ((type *)(void *)((char *)(p)-offsetof(type, member)))

struct o2_acct;

struct o2_waiter {
    oauth2_token_cb cb;
    void *arg;
    SLIST_ENTRY(o2_waiter) link;
};
SLIST_HEAD(o2_waiters, o2_waiter);

/* One token request in flight on the manager's HTTP client (relayd/http.h). */
struct o2_req {
    struct o2_acct *a; /* NULL once abandoned (stop) */
    struct http_req *hr;
    char *post;
    size_t postlen;
    char host[128];
};

/* One oauth2_token_command run. */
struct o2_cmd {
    struct o2_acct *a; /* NULL once abandoned (stop) */
    struct oauth2 *o;
    uv_process_t proc;
    uv_pipe_t out;
    uv_timer_t timer;
    struct buf *body;
    int nopen;
    int exited, eof, timed_out;
    int64_t status;
    int signal;
};

struct o2_acct {
    struct oauth2 *o;
    const struct cfg_upstream *up;
    char *token;
    uint64_t expires_at, refresh_at, stale_at; /* ms on o's clock */
    int after_535;                             /* the current token was fetched because of a 535 */
    int forced;                                /* the request in flight was forced by a 535 */
    char *rotated; /* a rotated refresh token not yet written to the file */
    struct o2_req *req;
    struct o2_cmd *cmd;
    uv_timer_t timer;
    uint64_t next_try;
    int failures;
    char lasterr[600];
    struct o2_waiters waiters; /* oauth2_token_get() callers; zeroed = empty */
};

struct oauth2 {
    uv_loop_t *loop;
    struct o2_acct *accts;
    int naccts;
    struct http *http; /* the token requests (relayd/http.h) */
    uv_timer_t defer;  /* runs waiters of oauth2_token_get() that need not wait */
    oauth2_clock_fn clock;
    void *clock_arg;
    int started, stopping;
    int open_handles;
    void (*stopped)(void *arg);
    void *stopped_arg;
    char errtmp[600];
};

/* oauth2.c */
void oauth2__acct_fail(struct o2_acct *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Takes the token (and a rotated refresh token) out of r. */
void oauth2__acct_success(struct o2_acct *a, struct oauth2_resp *r);
void oauth2__wipe_free(char *s);
/* Printable ASCII only, at most max bytes: provider text goes into logs. */
void oauth2__sanitize(char *s, size_t max);

/* oauth2_grant.c */
int oauth2__refresh_token_read(struct o2_acct *a, char **out, char *err, size_t errlen);
/* The account's token request: endpoint URL and POST body (malloc'd), or -1 with err. */
int oauth2__token_request(struct o2_acct *a, char **url, char **post, char *err, size_t errlen);

/* oauth2_http.c */
void oauth2__http_start(struct o2_acct *a);
void oauth2__req_free(struct o2_req *r);
/* Forgets r (the account is stopping): its end frees it without a word to the account. */
void oauth2__req_abandon(struct o2_req *r);

/* oauth2.c */
void oauth2__handle_closed(uv_handle_t *h);

/* oauth2_cmd.c */
void oauth2__cmd_start(struct o2_acct *a);
void oauth2__cmd_close(struct o2_cmd *c);

#endif
