/*
 * oauth2_http - libcurl on libuv for the token manager: one multi handle, a uv_poll_t per
 * socket (CURLMOPT_SOCKETFUNCTION) and one uv_timer_t (CURLMOPT_TIMERFUNCTION): curl's
 * "multi-uv" pattern.  oauth2__http_start() puts an account's request in flight; its end
 * calls oauth2__acct_success() or oauth2__acct_fail().  oauth2_http_post() is the blocking
 * POST of relayctl's device-code flow.  See oauth2_int.h.
 */
#include "relayd/oauth2_int.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/json.h"
#include "common/log.h"
#include "common/xalloc.h"

/* ---- libcurl on libuv ---- */

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    struct o2_req *r = arg;

    if (buf_append(r->body, p, size * n) != 0)
        return 0; /* too large: curl fails the transfer with CURLE_WRITE_ERROR */
    return size * n;
}

/* Applies the options common to every request to the token endpoint. */
static void easy_common(CURL *e, const struct cfg_upstream *up, char *errbuf)
{
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (up->oauth2_ca_file != NULL) {
        curl_easy_setopt(e, CURLOPT_CAINFO, up->oauth2_ca_file);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, O2_CONNECT_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_TIMEOUT, O2_REQUEST_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_USERAGENT, O2_USER_AGENT);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    errbuf[0] = '\0';
}

/* "TLS: ..." or "network: ..." for a failed transfer, into out. */
static void curl_failure(CURLcode rc, const char *errbuf, const char *host, char *out,
                         size_t outlen)
{
    const char *kind = "";

    switch (rc) {
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
    snprintf(out, outlen, "token endpoint %s: %s%s%s%s", host, kind, curl_easy_strerror(rc),
             errbuf[0] != '\0' ? ": " : "", errbuf);
    oauth2__sanitize(out, outlen > 400 ? 400 : outlen - 1);
}

static void url_host(const char *url, char *out, size_t outlen)
{
    const char *h = strstr(url, "://");

    h = h != NULL ? h + 3 : url;
    snprintf(out, outlen, "%.*s", (int)strcspn(h, "/?#"), h);
}

void oauth2__req_free(struct o2_req *r)
{
    if (r->easy != NULL)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    if (r->post != NULL) {
        explicit_bzero(r->post, r->postlen);
        free(r->post);
    }
    if (r->body != NULL) {
        explicit_bzero(r->body->data, r->body->cap);
        buf_free(r->body);
    }
    free(r);
}

static void req_done(struct oauth2 *o, CURL *easy, CURLcode rc)
{
    struct o2_req *r = NULL;
    struct o2_acct *a;
    struct oauth2_resp resp;
    char why[500];
    long status = 0;

    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&r);
    curl_multi_remove_handle(o->multi, easy);
    a = r->a;
    if (a != NULL)
        a->req = NULL;
    if (a == NULL) {
        oauth2__req_free(r);
        return;
    }
    if (rc != CURLE_OK) {
        if (rc == CURLE_WRITE_ERROR)
            snprintf(why, sizeof why, "token endpoint %s: reply larger than %d bytes", r->host,
                     O2_BODY_MAX);
        else
            curl_failure(rc, r->errbuf, r->host, why, sizeof why);
        oauth2__req_free(r);
        oauth2__acct_fail(a, "%s", why);
        return;
    }
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    if (oauth2_resp_parse(status, r->body->data, r->body->len, &resp, why, sizeof why) != 0) {
        char host[128];

        snprintf(host, sizeof host, "%s", r->host);
        oauth2_resp_clear(&resp);
        oauth2__req_free(r);
        oauth2__acct_fail(a, "token endpoint %s said %s", host, why);
        return;
    }
    oauth2__req_free(r);
    oauth2__acct_success(a, &resp);
    oauth2_resp_clear(&resp);
}

static void check_multi(struct oauth2 *o)
{
    CURLMsg *m;
    int pending;

    while ((m = curl_multi_info_read(o->multi, &pending)) != NULL)
        if (m->msg == CURLMSG_DONE)
            req_done(o, m->easy_handle, m->data.result);
}

void oauth2__handle_closed(uv_handle_t *h)
{
    struct oauth2 *o = h->data;

    if (h->type == UV_POLL)
        free(O2_CONTAINER(h, struct o2_sock, poll));
    if (--o->open_handles == 0 && o->stopping && o->stopped != NULL) {
        void (*fn)(void *) = o->stopped;

        o->stopped = NULL;
        fn(o->stopped_arg);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct o2_sock *s = O2_CONTAINER(h, struct o2_sock, poll);
    struct oauth2 *o = s->o;
    int flags = 0, running;

    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(o->multi, s->fd, flags, &running);
    check_multi(o);
}

int oauth2__on_curl_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct oauth2 *o = userp;
    struct o2_sock *s = socketp;
    int events = 0;

    (void)e;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            uv_poll_stop(&s->poll);
            curl_multi_assign(o->multi, fd, NULL);
            uv_close((uv_handle_t *)&s->poll, oauth2__handle_closed);
        }
        return 0;
    }
    if (s == NULL) {
        s = xcalloc(1, sizeof(*s));
        s->fd = fd;
        s->o = o;
        if (uv_poll_init_socket(o->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = o;
        o->open_handles++;
        curl_multi_assign(o->multi, fd, s);
    }
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void on_curl_timeout(uv_timer_t *t)
{
    struct oauth2 *o = t->data;
    int running;

    curl_multi_socket_action(o->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi(o);
}

int oauth2__on_curl_timer(CURLM *m, long timeout_ms, void *userp)
{
    struct oauth2 *o = userp;

    (void)m;
    if (o->stopping)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&o->curl_timer);
    else
        uv_timer_start(&o->curl_timer, on_curl_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

void oauth2__http_start(struct o2_acct *a)
{
    struct oauth2 *o = a->o;
    struct o2_req *r = xcalloc(1, sizeof(*r));
    char why[500], *url = NULL;
    CURLMcode mc;

    r->a = a;
    r->body = buf_new(O2_BODY_MAX);
    if ((r->easy = curl_easy_init()) == NULL) {
        oauth2__req_free(r);
        oauth2__acct_fail(a, "cannot create a libcurl handle");
        return;
    }
    if (oauth2__token_request(a, r->easy, &url, &r->post, why, sizeof why) != 0) {
        oauth2__req_free(r);
        oauth2__acct_fail(a, "%s", why);
        return;
    }
    r->postlen = strlen(r->post);
    url_host(url, r->host, sizeof r->host);
    easy_common(r->easy, a->up, r->errbuf);
    r->hdrs = curl_slist_append(NULL, "Accept: application/json");
    curl_easy_setopt(r->easy, CURLOPT_URL, url);
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, r->post);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE, (long)r->postlen);
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, (char *)r);
    free(url);
    log_debug(1, "oauth2: upstream %s: requesting a token (%s) from %s", a->up->name,
              oauth2_grant_name(a->up->grant), r->host);
    a->req = r;
    if ((mc = curl_multi_add_handle(o->multi, r->easy)) != CURLM_OK) {
        a->req = NULL;
        oauth2__req_free(r);
        oauth2__acct_fail(a, "libcurl: %s", curl_multi_strerror(mc));
    }
}

int oauth2_http_post(const struct cfg_upstream *up, const char *url, const char *post, long *status,
                     struct json_obj **j, char *err, size_t errlen)
{
    CURL *e = curl_easy_init();
    struct o2_req r;
    char jerr[128], host[128];
    CURLcode rc;

    memset(&r, 0, sizeof r);
    *j = NULL;
    if (e == NULL) {
        snprintf(err, errlen, "cannot create a libcurl handle");
        return -1;
    }
    r.body = buf_new(O2_BODY_MAX);
    url_host(url, host, sizeof host);
    easy_common(e, up, r.errbuf);
    r.hdrs = curl_slist_append(NULL, "Accept: application/json");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r.hdrs);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, post);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &r);
    rc = curl_easy_perform(e);
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(e);
    curl_slist_free_all(r.hdrs);
    if (rc != CURLE_OK) {
        curl_failure(rc, r.errbuf, host, err, errlen);
        buf_free(r.body);
        return -1;
    }
    *j = json_obj_parse(r.body->data, r.body->len, jerr, sizeof jerr);
    explicit_bzero(r.body->data, r.body->cap);
    buf_free(r.body);
    if (*j == NULL) {
        snprintf(err, errlen, "%s answered HTTP %ld without JSON (%s)", host, *status, jerr);
        return -1;
    }
    return 0;
}
