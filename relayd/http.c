/*
 * http - an asynchronous HTTPS client on the libuv loop; see http.h.
 *
 * The multi-uv pattern: CURLMOPT_SOCKETFUNCTION gives each socket a
 * uv_poll_t, CURLMOPT_TIMERFUNCTION drives one uv_timer_t; after every socket action the
 * finished transfers are collected (check_done()) and their done called.  open counts the
 * uv handles not yet closed; http_close() frees the struct when it reaches 0.
 */
#include "relayd/http.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/xalloc.h"

#define HTTP_USER_AGENT "relayd/0.1"
#define HTTP_CONTAINER(p, type, member) ((type *)(void *)((char *)(p)-offsetof(type, member)))

struct http_req {
    struct http *h;
    CURL *easy;
    struct curl_slist *hdrs;
    struct buf *answer;
    size_t max_answer;
    int too_large;
    http_done_fn done;
    void *arg;
    char errbuf[CURL_ERROR_SIZE];
    LIST_ENTRY(http_req) link;
};

struct http_sock {
    uv_poll_t poll;
    curl_socket_t fd;
    struct http *h;
};

struct http {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    LIST_HEAD(, http_req) reqs;
    int npending;
    int open; /* uv handles not yet closed */
    int closing;
    void (*closed)(void *arg);
    void *closed_arg;
};

static void handle_closed(uv_handle_t *uh)
{
    struct http *h = uh->data;

    if (uh->type == UV_POLL)
        free(HTTP_CONTAINER(uh, struct http_sock, poll));
    if (--h->open == 0 && h->closing) {
        void (*fn)(void *) = h->closed;
        void *arg = h->closed_arg;

        free(h);
        if (fn != NULL)
            fn(arg);
    }
}

static size_t on_answer(char *p, size_t size, size_t n, void *arg)
{
    struct http_req *r = arg;

    if (r->answer->len + size * n > r->max_answer) {
        r->too_large = 1;
        return 0; /* curl fails the transfer with CURLE_WRITE_ERROR */
    }
    buf_append(r->answer, p, size * n);
    return size * n;
}

static void req_free(struct http_req *r)
{
    curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    /* Answers may hold secrets (access tokens): wiped before they are freed. */
    explicit_bzero(r->answer->data, r->answer->len);
    buf_free(r->answer);
    free(r);
}

void http_curl_error(int rc, const char *errbuf, const char *other, char *out, size_t outlen)
{
    const char *kind = other;

    switch ((CURLcode)rc) {
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
        kind = "TLS: ";
        break;
    default:
        break;
    }
    snprintf(out, outlen, "%s%s%s%s", kind, curl_easy_strerror((CURLcode)rc),
             errbuf[0] != '\0' ? ": " : "", errbuf);
}

/* Takes r out of the multi and calls its done with what the transfer gave. */
static void req_end(struct http_req *r, CURLcode rc, const char *aborted)
{
    struct http *h = r->h;
    struct http_response res;
    curl_off_t ra = -1;

    memset(&res, 0, sizeof res);
    res.retry_after = -1;
    curl_multi_remove_handle(h->multi, r->easy);
    LIST_REMOVE(r, link);
    h->npending--;
    if (aborted != NULL) {
        snprintf(res.error, sizeof res.error, "%s", aborted);
    } else if (rc != CURLE_OK) {
        if (r->too_large)
            snprintf(res.error, sizeof res.error, "answer larger than %zu bytes", r->max_answer);
        else
            http_curl_error(rc, r->errbuf, "network: ", res.error, sizeof res.error);
    } else {
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &res.status);
        if (curl_easy_getinfo(r->easy, CURLINFO_RETRY_AFTER, &ra) == CURLE_OK && ra > 0)
            res.retry_after = (long)ra;
    }
    buf_append(r->answer, "", 1); /* NUL for the caller's string functions */
    res.body = r->answer->data;
    res.len = r->answer->len - 1;
    r->done(r->arg, &res);
    req_free(r);
}

void http_easy_secure(void *easy, const char *ca_file)
{
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(easy, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(easy, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(easy, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(easy, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (ca_file != NULL) {
        curl_easy_setopt(easy, CURLOPT_CAINFO, ca_file);
        curl_easy_setopt(easy, CURLOPT_CAPATH, NULL);
    }
}

static void check_done(struct http *h)
{
    CURLMsg *m;
    int pending;

    while ((m = curl_multi_info_read(h->multi, &pending)) != NULL) {
        if (m->msg == CURLMSG_DONE) {
            struct http_req *r = NULL;
            CURL *e = m->easy_handle;
            CURLcode rc = m->data.result;

            curl_easy_getinfo(e, CURLINFO_PRIVATE, (char **)&r);
            req_end(r, rc, NULL);
        }
    }
}

static void on_poll(uv_poll_t *p, int status, int events)
{
    struct http_sock *s = HTTP_CONTAINER(p, struct http_sock, poll);
    struct http *h = s->h;
    int flags = 0, running;

    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(h->multi, s->fd, flags, &running);
    check_done(h);
}

static int on_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct http *h = userp;
    struct http_sock *s = socketp;
    int events = 0;

    (void)e;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            uv_poll_stop(&s->poll);
            if (!h->closing)
                curl_multi_assign(h->multi, fd, NULL);
            uv_close((uv_handle_t *)&s->poll, handle_closed);
        }
        return 0;
    }
    if (h->closing)
        return 0;
    if (s == NULL) {
        s = xcalloc(1, sizeof(*s));
        s->fd = fd;
        s->h = h;
        if (uv_poll_init_socket(h->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = h;
        h->open++;
        curl_multi_assign(h->multi, fd, s);
    }
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void on_timeout(uv_timer_t *t)
{
    struct http *h = t->data;
    int running;

    curl_multi_socket_action(h->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(h);
}

static int on_timer(CURLM *m, long timeout_ms, void *userp)
{
    struct http *h = userp;

    (void)m;
    if (h->closing)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&h->timer);
    else
        uv_timer_start(&h->timer, on_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

struct http *http_new(uv_loop_t *loop)
{
    struct http *h = xcalloc(1, sizeof(*h));

    h->loop = loop;
    if ((h->multi = curl_multi_init()) == NULL)
        log_panic("http: cannot create a libcurl multi handle");
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETFUNCTION, on_socket);
    curl_multi_setopt(h->multi, CURLMOPT_SOCKETDATA, h);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERFUNCTION, on_timer);
    curl_multi_setopt(h->multi, CURLMOPT_TIMERDATA, h);
    uv_timer_init(loop, &h->timer);
    h->timer.data = h;
    h->open = 1;
    LIST_INIT(&h->reqs);
    return h;
}

int http_request(struct http *h, const struct http_request *rq, http_done_fn done, void *arg,
                 struct http_req **out)
{
    struct http_req *r;
    size_t i;

    if (h->closing)
        return -1;
    r = xcalloc(1, sizeof(*r));
    r->h = h;
    r->done = done;
    r->arg = arg;
    r->max_answer = rq->max_answer > 0 ? rq->max_answer : 1024 * 1024;
    r->answer = buf_new(r->max_answer + 1);
    if ((r->easy = curl_easy_init()) == NULL) {
        buf_free(r->answer);
        free(r);
        return -1;
    }
    for (i = 0; rq->headers != NULL && rq->headers[i] != NULL; i++)
        r->hdrs = curl_slist_append(r->hdrs, rq->headers[i]);
    /* libcurl would add "Expect: 100-continue" to large bodies: one round trip more. */
    r->hdrs = curl_slist_append(r->hdrs, "Expect:");
    http_easy_secure(r->easy, rq->ca_file);
    curl_easy_setopt(r->easy, CURLOPT_CONNECTTIMEOUT,
                     rq->connect_timeout > 0 ? rq->connect_timeout : 30L);
    curl_easy_setopt(r->easy, CURLOPT_TIMEOUT, rq->timeout > 0 ? rq->timeout : 300L);
    curl_easy_setopt(r->easy, CURLOPT_USERAGENT, HTTP_USER_AGENT);
    curl_easy_setopt(r->easy, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(r->easy, CURLOPT_URL, rq->url);
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(r->easy, CURLOPT_CUSTOMREQUEST, rq->method);
    if (strcmp(rq->method, "GET") == 0) {
        curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    } else if (strcmp(rq->method, "DELETE") == 0) {
        curl_easy_setopt(r->easy, CURLOPT_NOBODY, 0L);
    } else {
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, rq->body != NULL ? rq->body : "");
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE,
                         (curl_off_t)(rq->body != NULL ? rq->bodylen : 0));
    }
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_answer);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, (char *)r);
    if (curl_multi_add_handle(h->multi, r->easy) != CURLM_OK) {
        req_free(r);
        return -1;
    }
    LIST_INSERT_HEAD(&h->reqs, r, link);
    h->npending++;
    if (out != NULL)
        *out = r;
    return 0;
}

void http_abort(struct http_req *r)
{
    req_end(r, CURLE_OK, "aborted");
}

int http_pending(const struct http *h)
{
    return h->npending;
}

void http_close(struct http *h, void (*closed)(void *arg), void *arg)
{
    struct http_req *r;

    if (h->closing)
        return;
    while ((r = LIST_FIRST(&h->reqs)) != NULL)
        http_abort(r);
    h->closing = 1;
    h->closed = closed;
    h->closed_arg = arg;
    uv_timer_stop(&h->timer);
    /* The connection cache's sockets: curl says CURL_POLL_REMOVE for those it watches
     * (on_socket closes their polls), then closes them. */
    curl_multi_cleanup(h->multi);
    h->multi = NULL;
    uv_close((uv_handle_t *)&h->timer, handle_closed);
}
