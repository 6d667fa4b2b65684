/*
 * reqsrv - one request, one reply, then close; see reqsrv.h.
 */
#include "relayd/reqsrv.h"

#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "common/log.h"
#include "common/xalloc.h"

struct reqsrv_conn {
    LIST_ENTRY(reqsrv_conn) link;
    struct reqsrv *s;
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } io;
    uv_timer_t timer;
    uv_write_t wr;
    char *in; /* limits.max_request bytes */
    size_t inlen;
    struct buf *out;
    int handles; /* open handles: freed at 0 */
    int closing;
};

struct reqsrv {
    uv_loop_t *loop;
    int pipe;
    struct reqsrv_ops ops;
    struct reqsrv_limits lim;
    union {
        uv_tcp_t tcp;
        uv_pipe_t pipe;
    } listener;
    LIST_HEAD(, reqsrv_conn) conns;
    int nconns;
    int open; /* the listener + connections not yet freed */
    int stopping;
};

static uv_stream_t *conn_stream(struct reqsrv_conn *c)
{
    return (uv_stream_t *)&c->io;
}

static void reqsrv_maybe_free(struct reqsrv *s)
{
    if (s->stopping && s->open == 0)
        free(s);
}

static void reqsrv_on_listener_closed(uv_handle_t *h)
{
    struct reqsrv *s = h->data;

    s->open--;
    reqsrv_maybe_free(s);
}

static void reqsrv_conn_on_closed(uv_handle_t *h)
{
    struct reqsrv_conn *c = h->data;
    struct reqsrv *s = c->s;

    if (--c->handles > 0)
        return;
    LIST_REMOVE(c, link);
    s->nconns--;
    buf_free(c->out);
    free(c->in);
    free(c);
    s->open--;
    reqsrv_maybe_free(s);
}

static void reqsrv_conn_close(struct reqsrv_conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, reqsrv_conn_on_closed);
    uv_close((uv_handle_t *)&c->io, reqsrv_conn_on_closed);
}

static void reqsrv_on_written(uv_write_t *wr, int status)
{
    (void)status;
    reqsrv_conn_close(wr->data);
}

/* c->out is the whole reply: one write, then close. */
static void reqsrv_reply(struct reqsrv_conn *c)
{
    uv_buf_t b = uv_buf_init(c->out->data, (unsigned)c->out->len);

    uv_read_stop(conn_stream(c));
    c->wr.data = c;
    if (c->out->len == 0 || uv_write(&c->wr, conn_stream(c), &b, 1, reqsrv_on_written) != 0)
        reqsrv_conn_close(c);
}

static void reqsrv_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct reqsrv_conn *c = h->data;

    (void)hint;
    *b = uv_buf_init(c->in + c->inlen, (unsigned)(c->s->lim.max_request - c->inlen));
}

static void reqsrv_on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct reqsrv_conn *c = st->data;
    struct reqsrv *s = c->s;
    int whole;

    (void)b;
    if (n < 0) {
        reqsrv_conn_close(c);
        return;
    }
    c->inlen += (size_t)n;
    whole = s->ops.complete(c->in, c->inlen);
    if (!whole && c->inlen < s->lim.max_request)
        return;
    s->ops.handle(s->ops.arg, c->in, c->inlen, !whole, c->out);
    reqsrv_reply(c);
}

static void reqsrv_on_timeout(uv_timer_t *t)
{
    reqsrv_conn_close(t->data);
}

static void reqsrv_on_connection(uv_stream_t *server, int status)
{
    struct reqsrv *s = server->data;
    struct reqsrv_conn *c;
    int rc;

    if (status < 0) {
        log_warn("%s: accept: %s", s->ops.name, uv_strerror(status));
        return;
    }
    c = xcalloc(1, sizeof(*c));
    c->s = s;
    c->in = xmalloc(s->lim.max_request);
    c->out = buf_new(0);
    if (s->pipe)
        uv_pipe_init(s->loop, &c->io.pipe, 0);
    else
        uv_tcp_init(s->loop, &c->io.tcp);
    uv_timer_init(s->loop, &c->timer);
    conn_stream(c)->data = c->timer.data = c;
    c->handles = 2;
    LIST_INSERT_HEAD(&s->conns, c, link);
    s->nconns++;
    s->open++;
    if (uv_accept(server, conn_stream(c)) != 0 || s->nconns > s->lim.max_conns) {
        reqsrv_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, reqsrv_on_timeout, s->lim.timeout_ms, 0);
    rc = s->ops.admit != NULL ? s->ops.admit(s->ops.arg, conn_stream(c), c->out) : 0;
    if (rc < 0)
        reqsrv_conn_close(c);
    else if (rc > 0)
        reqsrv_reply(c);
    else
        uv_read_start(conn_stream(c), reqsrv_alloc, reqsrv_on_read);
}

struct reqsrv *reqsrv_new(uv_loop_t *loop, int pipe, const struct reqsrv_ops *ops,
                          const struct reqsrv_limits *limits)
{
    struct reqsrv *s = xcalloc(1, sizeof(*s));

    s->loop = loop;
    s->pipe = pipe;
    s->ops = *ops;
    s->lim = *limits;
    LIST_INIT(&s->conns);
    if (pipe)
        uv_pipe_init(loop, &s->listener.pipe, 0);
    else
        uv_tcp_init(loop, &s->listener.tcp);
    reqsrv_listener(s)->data = s;
    s->open = 1;
    return s;
}

uv_stream_t *reqsrv_listener(struct reqsrv *s)
{
    return (uv_stream_t *)&s->listener;
}

int reqsrv_listen(struct reqsrv *s, int backlog)
{
    return uv_listen(reqsrv_listener(s), backlog, reqsrv_on_connection);
}

void reqsrv_stop(struct reqsrv *s)
{
    struct reqsrv_conn *c;

    if (s == NULL || s->stopping)
        return;
    s->stopping = 1;
    LIST_FOREACH(c, &s->conns, link)
    reqsrv_conn_close(c);
    uv_close((uv_handle_t *)reqsrv_listener(s), reqsrv_on_listener_closed);
}
