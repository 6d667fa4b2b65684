/*
 * reqsrv - a small server of one request, one reply, then close: the shape the control
 * socket (relayd/control.c, a unix socket) and the /metrics endpoint (relayd/metrics_http.c,
 * TCP) share.
 *
 * Happy path: accept -> admit (optional: the client's address) -> read until ops->complete
 * says the request is whole -> ops->handle renders the reply into a buffer -> one write ->
 * close.
 *
 * Failure modes: a request that fills max_request bytes without being complete is handed
 * to ops->handle with too_long = 1 (its reply says so); silence for timeout_ms closes; past
 * max_conns connections at once a new one is closed at accept; a read or write error
 * closes.  Nothing here blocks the loop.
 *
 * Ownership: the server owns its listener and its connections; a connection is freed from
 * the close callback of its last handle, the server (after reqsrv_stop()) once its
 * listener and every connection are closed.
 */
#ifndef RELAYD_REQSRV_H
#define RELAYD_REQSRV_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/buf.h"

struct reqsrv;

struct reqsrv_ops {
    /* 1 when in[0..len) holds a whole request, 0 to read more. */
    int (*complete)(const char *in, size_t len);
    /* At accept, or NULL: 0 to read the request; 1 to send out at once and close; -1 to
     * close without a word. */
    int (*admit)(void *arg, uv_stream_t *client, struct buf *out);
    /* The reply to the request in req[0..len) (too_long: the request did not fit). */
    void (*handle)(void *arg, const char *req, size_t len, int too_long, struct buf *out);
    void *arg;
    const char *name; /* for the log: "control", "metrics" */
};

struct reqsrv_limits {
    size_t max_request;  /* bytes */
    uint64_t timeout_ms; /* for the whole exchange */
    int max_conns;       /* at once */
};

/* A server whose listener is a unix socket (pipe = 1) or TCP (0); ops and limits are
 * copied.  Bind reqsrv_listener() (uv_pipe_bind / uv_tcp_bind), then reqsrv_listen(). */
struct reqsrv *reqsrv_new(uv_loop_t *loop, int pipe, const struct reqsrv_ops *ops,
                          const struct reqsrv_limits *limits);
uv_stream_t *reqsrv_listener(struct reqsrv *s);
/* 0 or a negative UV_E* code. */
int reqsrv_listen(struct reqsrv *s, int backlog);
/* Closes the listener and every connection; the server is freed once they are closed.
 * Also the way to drop a server whose bind or listen failed.  NULL is fine. */
void reqsrv_stop(struct reqsrv *s);

#endif
