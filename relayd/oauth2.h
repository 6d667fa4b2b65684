/*
 * oauth2 - OAuth 2.0 access tokens for upstreams with auth = xoauth2 | oauthbearer.
 *
 * relayd obtains tokens itself: from the provider's token endpoint with libcurl (GnuTLS
 * build) driven by the libuv loop (never blocking it), through the client-credentials
 * grant (Microsoft 365 app-only), the refresh-token grant (Google, Microsoft delegated;
 * a rotated refresh token is written back atomically, mode 0600) or the JWT-bearer grant
 * (Google service accounts, assertion signed RS256 through tlsio); or from
 * oauth2_token_command, a program that prints a token.
 *
 * One account per upstream: the token is cached with its expiry and refreshed ahead of it
 * (oauth2_refresh_margin, default 10 minutes; never more than half the token's lifetime).
 * A token is handed out only until half the margin is left (5 minutes by default), so the
 * upstream never sees a token about to expire (Microsoft's "501 5.5.127 ... Token will
 * expire soon").  At most one request per account is in flight; every delivery shares it.
 * A failed refresh is retried with a backoff (2 s doubling to 5 minutes) and its reason is
 * kept for oauth2_last_error(): what the endpoint said (invalid_grant, invalid_client and
 * their descriptions, the HTTP status) or the TLS/network error.  Each refresh is logged
 * ("oauth2: upstream NAME: token refreshed, expires in N s"); tokens never are.
 *
 * The hook into delivery (smtpc), at AUTH time:
 *   token = oauth2_token_peek(o, up)    NULL: defer with config_fault, reason
 *                                        oauth2_last_error(o, up)
 *   authsasl_client_new(host, up->username, token, ...) and authsasl_client_start() with
 *   the mechanism oauth2_mechanism(up) ("XOAUTH2" or "OAUTHBEARER") as the only preference
 *   after a 535 to that AUTH: oauth2_invalidate(o, up) (forces one refresh).
 *
 * Errors: expected failures are reported as text (oauth2_last_error(), err buffers);
 * out of memory dies (xalloc); misuse (unknown upstream) returns NULL / an error text.
 * Ownership: oauth2_new() allocates; oauth2_stop() closes its handles (done runs from the
 * loop); oauth2_free() after that.  cfg must outlive the manager.
 */
#ifndef RELAYD_OAUTH2_H
#define RELAYD_OAUTH2_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/buf.h"
#include "common/json.h"
#include "config/cfg.h"

struct oauth2;

/* Milliseconds on some monotonic scale; tests inject their own. */
typedef uint64_t (*oauth2_clock_fn)(void *arg);
/* Result of oauth2_token_get(): token NULL with err, or a valid token (not to be kept). */
typedef void (*oauth2_token_cb)(void *arg, const char *token, const char *err);

/* A manager for every upstream of cfg with auth = xoauth2 | oauthbearer (none: it does
 * nothing).  The daemon hands it to the scheduler, which hands it to the pool and every
 * SMTP session (sched_new(), pool_new(), smtpc_session_open()). */
struct oauth2 *oauth2_new(uv_loop_t *loop, const struct cfg *cfg);
/* Tests: replace the clock (default uv_now-independent CLOCK_MONOTONIC in ms). */
void oauth2_set_clock(struct oauth2 *o, oauth2_clock_fn fn, void *arg);
/* Requests a token for every account now, so the first delivery finds one. */
void oauth2_start(struct oauth2 *o);
/* Aborts requests and commands in flight (their waiters get an error), closes every
 * handle; done(arg) runs from the loop once all are closed. */
void oauth2_stop(struct oauth2 *o, void (*done)(void *arg), void *arg);
/* Frees (after oauth2_stop()'s done, or when nothing was ever started); returns NULL. */
struct oauth2 *oauth2_free(struct oauth2 *o);

/*
 * A currently valid access token for up, or NULL (none yet, refresh failing, or up does not
 * use OAuth 2.0: see oauth2_last_error()).  Synchronous; starts a refresh when one is due.
 * The token stays valid until control returns to the loop: copy it (authsasl_client_new()
 * does).
 */
const char *oauth2_token_peek(struct oauth2 *o, const struct cfg_upstream *up);
/* After the upstream refused the token (535): drop it and refresh once.  A token that was
 * itself issued because of a 535 and is refused again is not refreshed at once: the
 * reason names the likely cause (mailbox or app permissions) and the backoff applies. */
void oauth2_invalidate(struct oauth2 *o, const struct cfg_upstream *up);
/* Why oauth2_token_peek() returned NULL, "oauth2: ..." (never a token); "" when no error.
 * Valid until control returns to the loop. */
const char *oauth2_last_error(struct oauth2 *o, const struct cfg_upstream *up);
/* Waits for a valid token (starting a refresh when needed); cb runs once, from the loop,
 * never inside this call.  0, or -1 when up does not use OAuth 2.0. */
int oauth2_token_get(struct oauth2 *o, const struct cfg_upstream *up, oauth2_token_cb cb,
                     void *arg);
/* Seconds the current token of up still has, or -1 when there is none.  For reports. */
long oauth2_token_ttl(struct oauth2 *o, const struct cfg_upstream *up);

/* "XOAUTH2" or "OAUTHBEARER" for auth = xoauth2 | oauthbearer, else NULL. */
const char *oauth2_mechanism(const struct cfg_upstream *up);

/* "client_credentials", "refresh_token", "jwt_bearer": for reports. */
const char *oauth2_grant_name(enum cfg_grant g);

/* For relayctl's device-code flow: appends "k=v" (v URL-encoded) to the form in b. */
void oauth2_form_add(struct buf *b, const char *k, const char *v);
/* One blocking POST of form to url with up's TLS settings (relayctl only: never on the
 * loop): 0 with the parsed JSON object in *j whatever the HTTP status (in *status); -1 with
 * a sentence in err (TLS, network, not JSON). */
int oauth2_http_post(const struct cfg_upstream *up, const char *url, const char *form, long *status,
                     struct json_obj **j, char *err, size_t errlen);

/* ---- pieces exposed for unit tests ---- */

/* A token endpoint's answer.  Strings malloc'd or NULL; oauth2_resp_clear() wipes them. */
struct oauth2_resp {
    char *access_token;
    char *refresh_token;
    long expires_in; /* seconds; 0 when absent */
    char *error;     /* RFC 6749 5.2 */
    char *error_description;
};
/* Reads an endpoint's reply.  0 with an access token; otherwise -1 and a sentence in err
 * saying what the endpoint said: "invalid_grant: AADSTS70008: ... (HTTP 400)",
 * "HTTP 503 with no OAuth error", "HTTP 200 without access_token". */
int oauth2_resp_parse(long http_status, const char *body, size_t len, struct oauth2_resp *r,
                      char *err, size_t errlen);
void oauth2_resp_clear(struct oauth2_resp *r);

/* Writes data plus a newline to path atomically (temporary file 0600 in the same
 * directory, fsync, rename, fsync of the directory).  0, or -1 with text in err. */
int oauth2_file_write(const char *path, const char *data, char *err, size_t errlen);

#endif
