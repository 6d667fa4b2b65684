/*
 * http - an asynchronous HTTPS client on the libuv loop: libcurl's multi interface driven
 * by a uv_poll_t per socket and one uv_timer_t (curl's "multi-uv" pattern), so no call
 * blocks the loop.  Used by the HTTP API transports (relayd/apisend.h).
 *
 * One struct http per user (a delivery session, a probe): its multi handle keeps the
 * connections it opened for the next request (HTTP keep-alive).  A request has a method,
 * a URL, headers, a body from memory (the caller keeps it until done), the CA file to
 * verify the server with (NULL: the system store), timeouts and a cap on the answer.
 * done(arg, res) runs exactly once from the loop (or inside http_abort()), never inside
 * http_request().  Only https:// is spoken; redirects are not followed.
 *
 * Errors: http_request() returns a negative value when curl cannot take the request (no
 * done then); a transfer that fails gives res->status 0 and res->error in words ("TLS: ...",
 * "network: ...", "answer larger than N bytes").  Out of memory dies.
 * Ownership: http_new() allocates; http_close() aborts what is in flight and closes the
 * handles, then closed(arg) runs from the loop and the struct is freed.
 */
#ifndef RELAYD_HTTP_H
#define RELAYD_HTTP_H

#include <stddef.h>
#include <uv.h>

struct http;
struct http_req;

struct http_request {
    const char *method;         /* "GET", "POST", "PUT", "DELETE" */
    const char *url;            /* https:// */
    const char *const *headers; /* NULL-terminated "Name: value" lines, or NULL */
    const void *body;           /* NULL: none; kept by the caller until done */
    size_t bodylen;
    const char *ca_file;  /* NULL: the system trust store */
    long connect_timeout; /* seconds; 0: 30 */
    long timeout;         /* seconds for the whole request; 0: 300 */
    size_t max_answer;    /* bytes of answer kept; 0: 1 MiB */
};

struct http_response {
    long status;      /* HTTP status, 0 when there was no answer */
    const char *body; /* the answer (NUL-terminated), "" when none */
    size_t len;
    long retry_after; /* seconds from Retry-After, or -1 */
    char error[300];  /* status 0: why, in words; else "" */
};

typedef void (*http_done_fn)(void *arg, const struct http_response *res);

struct http *http_new(uv_loop_t *loop);
/* 0 (*out set when out is not NULL: valid until done runs), or -1. */
int http_request(struct http *h, const struct http_request *rq, http_done_fn done, void *arg,
                 struct http_req **out);
/* Aborts r: its done runs now with status 0 and error "aborted". */
void http_abort(struct http_req *r);
/* Requests in flight of h. */
int http_pending(const struct http *h);
/* Aborts every request (their done runs now), closes the handles; closed(arg) runs from the
 * loop when they are, then h is freed.  closed may be NULL. */
void http_close(struct http *h, void (*closed)(void *arg), void *arg);
/* What every request of relayd's asserts, on a libcurl easy handle (a CURL *): https only,
 * no redirects, the peer and its name verified with ca_file (NULL: the system store), TLS 1.2
 * or later, no signals.  http_request() applies it; a blocking caller applies it too. */
void http_easy_secure(void *easy, const char *ca_file);
/* A failed transfer (rc: its CURLcode, errbuf: curl's CURLOPT_ERRORBUFFER) in words into out:
 * "TLS: " for a certificate or handshake failure, else other, then curl's text and detail. */
void http_curl_error(int rc, const char *errbuf, const char *other, char *out, size_t outlen);

#endif
