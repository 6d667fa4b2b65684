/*
 * metrics_http - the HTTP endpoint for /metrics and /healthz; see metrics_http.h.
 *
 * Happy path: accept -> allow check -> read until the end of the request head -> parse the
 * request line -> render the answer into one buffer -> one write -> close.
 *
 * Failure modes: a client outside metrics_allow gets 403; a head over METRICS_HTTP_REQ_MAX
 * 431; a malformed request line 400; a method other than GET or HEAD 405; silence for
 * METRICS_HTTP_TIMEOUT_MS a close.  Past METRICS_HTTP_CONNS connections at once a new one
 * is closed at accept.  Nothing here touches mail.
 *
 * Ownership: the server owns its connections (a list); each connection owns its read
 * buffer and its answer; a connection is freed from the close callback of its last
 * handle, the server once its listener and every connection are closed.
 */
#include "relayd/metrics_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/netaddr.h"
#include "common/xalloc.h"

struct mh_conn {
    LIST_ENTRY(mh_conn) link;
    struct metrics_http *h;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    char in[METRICS_HTTP_REQ_MAX];
    size_t inlen;
    struct buf *out;
    int handles; /* open handles: freed at 0 */
    int closing;
};

struct metrics_http {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct metrics *m;
    struct metrics_http_hooks hooks;
    uv_tcp_t listener;
    LIST_HEAD(, mh_conn) conns;
    int nconns;
    int open; /* the listener + connections not yet freed */
    int stopping;
};

static void mh_maybe_free(struct metrics_http *h)
{
    if (h->stopping && h->open == 0)
        free(h);
}

static void mh_on_listener_closed(uv_handle_t *hd)
{
    struct metrics_http *h = hd->data;

    h->open--;
    mh_maybe_free(h);
}

static void mh_conn_on_closed(uv_handle_t *hd)
{
    struct mh_conn *c = hd->data;
    struct metrics_http *h = c->h;

    if (--c->handles > 0)
        return;
    LIST_REMOVE(c, link);
    h->nconns--;
    buf_free(c->out);
    free(c);
    h->open--;
    mh_maybe_free(h);
}

static void mh_conn_close(struct mh_conn *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, mh_conn_on_closed);
    uv_close((uv_handle_t *)&c->tcp, mh_conn_on_closed);
}

static void mh_on_written(uv_write_t *wr, int status)
{
    struct mh_conn *c = wr->data;

    (void)status;
    mh_conn_close(c);
}

static const char *mh_reason(int code)
{
    switch (code) {
    case 200:
        return "OK";
    case 400:
        return "Bad Request";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 431:
        return "Request Header Fields Too Large";
    case 503:
        return "Service Unavailable";
    default:
        return "Error";
    }
}

/* The whole answer in c->out, written at once; the connection closes after it. */
static void mh_reply(struct mh_conn *c, int code, const char *ctype, const char *body,
                     size_t bodylen, int head_only)
{
    uv_buf_t b;

    buf_reset(c->out);
    buf_printf(c->out,
               "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
               "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
               code, mh_reason(code), ctype, bodylen, code == 405 ? "Allow: GET, HEAD\r\n" : "");
    if (!head_only)
        buf_append(c->out, body, bodylen);
    uv_read_stop((uv_stream_t *)&c->tcp);
    b = uv_buf_init(c->out->data, (unsigned)c->out->len);
    c->wr.data = c;
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, mh_on_written) != 0)
        mh_conn_close(c);
}

static void mh_reply_text(struct mh_conn *c, int code, const char *text, int head_only)
{
    char line[600];
    int n = snprintf(line, sizeof line, "%s\n", text);

    mh_reply(c, code, "text/plain; charset=utf-8", line,
             n < 0                     ? 0
             : (size_t)n < sizeof line ? (size_t)n
                                       : sizeof line - 1,
             head_only);
}

int metrics_http_parse(const char *req, size_t len, char *path, size_t pathlen)
{
    const char *end = memchr(req, '\n', len), *sp1, *sp2;
    size_t n;
    int head = 0;

    path[0] = '\0';
    if (end == NULL)
        return 400;
    if (end > req && end[-1] == '\r')
        end--;
    sp1 = memchr(req, ' ', (size_t)(end - req));
    if (sp1 == NULL)
        return 400;
    sp2 = memchr(sp1 + 1, ' ', (size_t)(end - sp1 - 1));
    if (sp2 == NULL || end - sp2 - 1 < 8 || strncmp(sp2 + 1, "HTTP/1.", 7) != 0)
        return 400;
    if ((size_t)(sp1 - req) == 4 && strncmp(req, "HEAD", 4) == 0)
        head = 1;
    else if ((size_t)(sp1 - req) != 3 || strncmp(req, "GET", 3) != 0)
        return 405;
    n = (size_t)(sp2 - sp1 - 1);
    /* The query string does not matter ("/metrics?x=1" is /metrics). */
    {
        const char *q = memchr(sp1 + 1, '?', n);

        if (q != NULL)
            n = (size_t)(q - sp1 - 1);
    }
    if (n == 0 || n >= pathlen)
        return n == 0 ? 400 : 404;
    memcpy(path, sp1 + 1, n);
    path[n] = '\0';
    return head ? 1 : 0;
}

static void mh_handle(struct mh_conn *c)
{
    struct metrics_http *h = c->h;
    char path[256], why[512];
    int rc = metrics_http_parse(c->in, c->inlen, path, sizeof path), head = rc == 1;

    if (rc > 1) {
        mh_reply_text(c, rc, mh_reason(rc), 0);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        struct buf *b = buf_new(0);

        if (h->hooks.collect != NULL)
            h->hooks.collect(h->hooks.arg, h->m);
        metrics_render(h->m, b);
        mh_reply(c, 200, "text/plain; version=0.0.4; charset=utf-8", b->data, b->len, head);
        buf_free(b);
    } else if (strcmp(path, "/healthz") == 0) {
        int code = h->hooks.health != NULL ? h->hooks.health(h->hooks.arg, why, sizeof why) : 200;

        if (h->hooks.health == NULL)
            snprintf(why, sizeof why, "ok");
        mh_reply_text(c, code, why, head);
    } else {
        mh_reply_text(c, 404, "not found: try /metrics or /healthz", head);
    }
}

static void mh_alloc(uv_handle_t *hd, size_t hint, uv_buf_t *b)
{
    struct mh_conn *c = hd->data;

    (void)hint;
    *b = uv_buf_init(c->in + c->inlen, (unsigned)(sizeof c->in - c->inlen));
}

static void mh_on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct mh_conn *c = st->data;

    (void)b;
    if (n < 0) {
        mh_conn_close(c);
        return;
    }
    c->inlen += (size_t)n;
    /* The end of the head: an empty line (CRLF CRLF, or bare LF LF from a hand-typed
     * request).  The body of a GET, if any, is ignored. */
    for (size_t i = 0; i + 1 < c->inlen; i++)
        if ((c->in[i] == '\n' && c->in[i + 1] == '\n') ||
            (i + 3 < c->inlen && memcmp(c->in + i, "\r\n\r\n", 4) == 0)) {
            mh_handle(c);
            return;
        }
    if (c->inlen == sizeof c->in)
        mh_reply_text(c, 431, "request too large", 0);
}

static void mh_on_timeout(uv_timer_t *t)
{
    mh_conn_close(t->data);
}

static void mh_on_connection(uv_stream_t *server, int status)
{
    struct metrics_http *h = server->data;
    struct sockaddr_storage ss;
    int sslen = sizeof ss;
    struct mh_conn *c;

    if (status < 0) {
        log_warn("metrics: accept: %s", uv_strerror(status));
        return;
    }
    c = xcalloc(1, sizeof(*c));
    c->h = h;
    c->out = buf_new(0);
    uv_tcp_init(h->loop, &c->tcp);
    uv_timer_init(h->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->handles = 2;
    LIST_INSERT_HEAD(&h->conns, c, link);
    h->nconns++;
    h->open++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 || h->nconns > METRICS_HTTP_CONNS ||
        uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &sslen) != 0) {
        mh_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, mh_on_timeout, METRICS_HTTP_TIMEOUT_MS, 0);
    if (!netaddr_list_match(&h->cfg->metrics_allow, (struct sockaddr *)&ss)) {
        char peer[64];

        log_info("metrics: connection from %s refused: not in metrics_allow",
                 netaddr_sockaddr_str((struct sockaddr *)&ss, peer, sizeof peer));
        mh_reply_text(c, 403, "forbidden: not in metrics_allow", 0);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, mh_alloc, mh_on_read);
}

int metrics_http_start(uv_loop_t *loop, const struct cfg *cfg, struct metrics *m,
                       const struct metrics_http_hooks *hooks, struct metrics_http **out, char *err,
                       size_t errlen)
{
    struct metrics_http *h;
    struct sockaddr_storage ss;
    int rc;

    *out = NULL;
    if ((rc = uv_ip4_addr(cfg->metrics_host, cfg->metrics_port, (struct sockaddr_in *)&ss)) != 0 &&
        (rc = uv_ip6_addr(cfg->metrics_host, cfg->metrics_port, (struct sockaddr_in6 *)&ss)) != 0) {
        snprintf(err, errlen, "metrics %s:%d: not an IP address", cfg->metrics_host,
                 cfg->metrics_port);
        return rc;
    }
    h = xcalloc(1, sizeof(*h));
    h->loop = loop;
    h->cfg = cfg;
    h->m = m;
    h->hooks = *hooks;
    LIST_INIT(&h->conns);
    uv_tcp_init(loop, &h->listener);
    h->listener.data = h;
    h->open = 1;
    if ((rc = uv_tcp_bind(&h->listener, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&h->listener, 16, mh_on_connection)) != 0) {
        snprintf(err, errlen, "metrics %s:%d: %s", cfg->metrics_host, cfg->metrics_port,
                 uv_strerror(rc));
        h->stopping = 1;
        uv_close((uv_handle_t *)&h->listener, mh_on_listener_closed);
        return rc;
    }
    log_info("metrics: serving /metrics and /healthz on %s%s%s:%d",
             strchr(cfg->metrics_host, ':') ? "[" : "", cfg->metrics_host,
             strchr(cfg->metrics_host, ':') ? "]" : "", cfg->metrics_port);
    *out = h;
    return 0;
}

void metrics_http_stop(struct metrics_http *h)
{
    struct mh_conn *c;

    if (h == NULL || h->stopping)
        return;
    h->stopping = 1;
    LIST_FOREACH(c, &h->conns, link)
    mh_conn_close(c);
    uv_close((uv_handle_t *)&h->listener, mh_on_listener_closed);
}

void metrics_http_set_cfg(struct metrics_http *h, const struct cfg *cfg)
{
    h->cfg = cfg;
}
