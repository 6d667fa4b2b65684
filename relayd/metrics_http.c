/*
 * metrics_http - the HTTP endpoint for /metrics and /healthz; see metrics_http.h.
 *
 * Happy path (relayd/reqsrv.c does the I/O): accept -> allow check -> read until the end
 * of the request head -> parse the request line -> render the answer into one buffer ->
 * one write -> close.
 *
 * Failure modes: a client outside metrics_allow gets 403; a head over METRICS_HTTP_REQ_MAX
 * 431; a malformed request line 400; a method other than GET or HEAD 405; silence for
 * METRICS_HTTP_TIMEOUT_MS a close.  Past METRICS_HTTP_CONNS connections at once a new one
 * is closed at accept.  Nothing here touches mail.
 *
 * Ownership: struct metrics_http owns its reqsrv (the listener and the connections).
 */
#include "relayd/metrics_http.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/netaddr.h"
#include "common/xalloc.h"
#include "relayd/reqsrv.h"

struct metrics_http {
    const struct cfg *cfg;
    struct metrics *m;
    struct metrics_http_hooks hooks;
    struct reqsrv *srv;
};

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

/* The whole answer, written at once; the connection closes after it. */
static void mh_reply(struct buf *out, int code, const char *ctype, const char *body, size_t bodylen,
                     int head_only)
{
    buf_printf(out,
               "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n%s"
               "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
               code, mh_reason(code), ctype, bodylen, code == 405 ? "Allow: GET, HEAD\r\n" : "");
    if (!head_only)
        buf_append(out, body, bodylen);
}

static void mh_reply_text(struct buf *out, int code, const char *text, int head_only)
{
    char line[600];
    int n = snprintf(line, sizeof line, "%s\n", text);

    mh_reply(out, code, "text/plain; charset=utf-8", line,
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

/* The end of the head: an empty line (CRLF CRLF, or bare LF LF from a hand-typed request).
 * The body of a GET, if any, is ignored. */
static int mh_complete(const char *in, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++)
        if ((in[i] == '\n' && in[i + 1] == '\n') ||
            (i + 3 < len && memcmp(in + i, "\r\n\r\n", 4) == 0))
            return 1;
    return 0;
}

static void mh_handle(void *arg, const char *req, size_t len, int too_long, struct buf *out)
{
    struct metrics_http *h = arg;
    char path[256], why[512];
    int rc, head;

    if (too_long) {
        mh_reply_text(out, 431, "request too large", 0);
        return;
    }
    rc = metrics_http_parse(req, len, path, sizeof path);
    head = rc == 1;
    if (rc > 1) {
        mh_reply_text(out, rc, mh_reason(rc), 0);
        return;
    }
    if (strcmp(path, "/metrics") == 0) {
        struct buf *b = buf_new(0);

        if (h->hooks.collect != NULL)
            h->hooks.collect(h->hooks.arg, h->m);
        metrics_render(h->m, b);
        mh_reply(out, 200, "text/plain; version=0.0.4; charset=utf-8", b->data, b->len, head);
        buf_free(b);
    } else if (strcmp(path, "/healthz") == 0) {
        int code = h->hooks.health != NULL ? h->hooks.health(h->hooks.arg, why, sizeof why) : 200;

        if (h->hooks.health == NULL)
            snprintf(why, sizeof why, "ok");
        mh_reply_text(out, code, why, head);
    } else {
        mh_reply_text(out, 404, "not found: try /metrics or /healthz", head);
    }
}

/* Only metrics_allow may ask; anyone else gets 403 (and one log line). */
static int mh_admit(void *arg, uv_stream_t *client, struct buf *out)
{
    struct metrics_http *h = arg;
    struct sockaddr_storage ss;
    int sslen = sizeof ss;
    char peer[64];

    if (uv_tcp_getpeername((uv_tcp_t *)client, (struct sockaddr *)&ss, &sslen) != 0)
        return -1;
    if (netaddr_list_match(&h->cfg->metrics_allow, (struct sockaddr *)&ss))
        return 0;
    log_info("metrics: connection from %s refused: not in metrics_allow",
             netaddr_sockaddr_str((struct sockaddr *)&ss, peer, sizeof peer));
    mh_reply_text(out, 403, "forbidden: not in metrics_allow", 0);
    return 1;
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
    h->cfg = cfg;
    h->m = m;
    h->hooks = *hooks;
    {
        struct reqsrv_ops ops = {mh_complete, mh_admit, mh_handle, h, "metrics"};
        struct reqsrv_limits lim = {METRICS_HTTP_REQ_MAX, METRICS_HTTP_TIMEOUT_MS,
                                    METRICS_HTTP_CONNS};

        h->srv = reqsrv_new(loop, 0, &ops, &lim);
    }
    if ((rc = uv_tcp_bind((uv_tcp_t *)reqsrv_listener(h->srv), (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = reqsrv_listen(h->srv, 16)) != 0) {
        snprintf(err, errlen, "metrics %s:%d: %s", cfg->metrics_host, cfg->metrics_port,
                 uv_strerror(rc));
        reqsrv_stop(h->srv);
        free(h);
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
    if (h == NULL)
        return;
    reqsrv_stop(h->srv); /* freed once its handles are closed */
    free(h);
}

void metrics_http_set_cfg(struct metrics_http *h, const struct cfg *cfg)
{
    h->cfg = cfg;
}
