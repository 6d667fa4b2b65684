/*
 * metrics_http - the monitoring endpoint: a tiny HTTP/1.0 and 1.1 server on the loop for
 * [relayd] metrics = address:port.
 *
 *   GET /metrics  200, Prometheus text exposition 0.0.4 (relayd/metrics.h)
 *   GET /healthz  200 "ok" or 503 with a one-line reason (metrics_health())
 *   other paths   404;  other methods 405
 *
 * One request per connection (Connection: close).  A request is bounded in size
 * (METRICS_HTTP_REQ_MAX, else 431) and time (METRICS_HTTP_TIMEOUT_MS, then the connection
 * is closed), and at most METRICS_HTTP_CONNS connections are served at once (more are
 * closed at accept).  A client outside [relayd] metrics_allow gets 403 and nothing else.
 *
 * Errors: metrics_http_start() returns a negative UV_E* with text in err; the rest logs.
 * Ownership: metrics_http_start() allocates; metrics_http_stop() closes every handle and
 * the server frees itself once they are closed (before uv_run() returns).
 */
#ifndef RELAYD_METRICS_HTTP_H
#define RELAYD_METRICS_HTTP_H

#include <stddef.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/metrics.h"

#define METRICS_HTTP_REQ_MAX 4096
#define METRICS_HTTP_TIMEOUT_MS 10000
#define METRICS_HTTP_CONNS 16

struct metrics_http;

struct metrics_http_hooks {
    /* Sets the gauges read elsewhere (queue, spool, health, tokens) just before /metrics. */
    void (*collect)(void *arg, struct metrics *m);
    /* 200 or 503 with a one-line reason in why, for /healthz. */
    int (*health)(void *arg, char *why, size_t whylen);
    void *arg;
};

/* Listens on cfg->metrics_host:metrics_port; m and hooks must outlive the server; cfg
 * must until metrics_http_set_cfg() gives another one. */
int metrics_http_start(uv_loop_t *loop, const struct cfg *cfg, struct metrics *m,
                       const struct metrics_http_hooks *hooks, struct metrics_http **out, char *err,
                       size_t errlen);
/* A reload's new configuration: metrics_allow from it applies to the next request (the
 * address stays: a new metrics address takes a restart). */
void metrics_http_set_cfg(struct metrics_http *h, const struct cfg *cfg);
/* Closes the listener and every connection; NULL is fine. */
void metrics_http_stop(struct metrics_http *h);

/* ---- The daemon's hooks (metrics_collect.c) ---- */

struct smtpd_server;
struct spool;
struct oauth2;

/* What the daemon's collect and health hooks read; every pointer outlives the server. */
struct metrics_sources {
    const struct cfg *cfg;
    struct spool *sp;
    struct smtpd_server *smtpd;
    struct oauth2 *oauth2; /* or NULL */
};
/* metrics_http_hooks.collect with a struct metrics_sources as arg: queue per state, the
 * oldest message's age, spool bytes and commits, accepting, OAuth 2.0 token expiry. */
void metrics_collect(void *arg, struct metrics *m);
/* metrics_http_hooks.health with a struct metrics_sources as arg (metrics_health()). */
int metrics_healthz(void *arg, char *why, size_t whylen);

/* The request line of the head in req (pure, for tests): 0 for GET, 1 for HEAD, with the
 * path (without a query string) in path; else the HTTP status to answer: 400 malformed,
 * 404 a path too long, 405 another method. */
int metrics_http_parse(const char *req, size_t len, char *path, size_t pathlen);

#endif
