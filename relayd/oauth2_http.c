/*
 * oauth2_http - the token manager's HTTP: oauth2__http_start() puts an account's request in
 * flight on the manager's asynchronous client (relayd/http.h: libcurl's multi interface on
 * the libuv loop); its end calls oauth2__acct_success() or oauth2__acct_fail().
 * oauth2_http_post() is the blocking POST of relayctl's device-code flow (never on the loop).
 * See oauth2_int.h.
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
#include "relayd/http.h"

/* ---- the token request, on relayd/http.h ---- */

static void url_host(const char *url, char *out, size_t outlen)
{
    const char *h = strstr(url, "://");

    h = h != NULL ? h + 3 : url;
    snprintf(out, outlen, "%.*s", (int)strcspn(h, "/?#"), h);
}

void oauth2__req_free(struct o2_req *r)
{
    if (r->post != NULL) {
        explicit_bzero(r->post, r->postlen);
        free(r->post);
    }
    free(r);
}

/* The end of an account's request (http.c's done): success or failure of the account. */
static void req_done(void *arg, const struct http_response *res)
{
    struct o2_req *r = arg;
    struct o2_acct *a = r->a;
    struct oauth2_resp resp;
    char why[500], host[128];

    r->hr = NULL;
    if (a == NULL) { /* abandoned (stop) */
        oauth2__req_free(r);
        return;
    }
    a->req = NULL;
    snprintf(host, sizeof host, "%s", r->host);
    oauth2__req_free(r);
    if (res->status == 0) {
        snprintf(why, sizeof why, "token endpoint %s: %s", host, res->error);
        oauth2__sanitize(why, 400);
        oauth2__acct_fail(a, "%s", why);
        return;
    }
    if (oauth2_resp_parse(res->status, res->body, res->len, &resp, why, sizeof why) != 0) {
        oauth2_resp_clear(&resp);
        oauth2__acct_fail(a, "token endpoint %s said %s", host, why);
        return;
    }
    oauth2__acct_success(a, &resp);
    oauth2_resp_clear(&resp);
}

void oauth2__req_abandon(struct o2_req *r)
{
    r->a = NULL;
    if (r->hr != NULL)
        http_abort(r->hr); /* req_done frees r */
}

void oauth2__http_start(struct o2_acct *a)
{
    struct oauth2 *o = a->o;
    struct o2_req *r = xcalloc(1, sizeof(*r));
    static const char *const hdrs[] = {"Accept: application/json", NULL};
    struct http_request rq;
    char why[500], *url = NULL;

    r->a = a;
    if (oauth2__token_request(a, &url, &r->post, why, sizeof why) != 0) {
        oauth2__req_free(r);
        oauth2__acct_fail(a, "%s", why);
        return;
    }
    r->postlen = strlen(r->post);
    url_host(url, r->host, sizeof r->host);
    memset(&rq, 0, sizeof rq);
    rq.method = "POST"; /* libcurl sends the form as application/x-www-form-urlencoded */
    rq.url = url;
    rq.headers = hdrs;
    rq.body = r->post;
    rq.bodylen = r->postlen;
    rq.ca_file = a->up->oauth2_ca_file;
    rq.connect_timeout = O2_CONNECT_TIMEOUT;
    rq.timeout = O2_REQUEST_TIMEOUT;
    rq.max_answer = O2_BODY_MAX;
    log_debug(1, "oauth2: upstream %s: requesting a token (%s) from %s", a->up->name,
              oauth2_grant_name(a->up->grant), r->host);
    a->req = r;
    if (http_request(o->http, &rq, req_done, r, &r->hr) != 0) {
        a->req = NULL;
        oauth2__req_free(r);
        free(url);
        oauth2__acct_fail(a, "libcurl refused the token request");
        return;
    }
    free(url);
}

/* ---- the blocking POST of relayctl ---- */

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    struct buf *b = arg;

    if (buf_append(b, p, size * n) != 0)
        return 0; /* too large: curl fails the transfer with CURLE_WRITE_ERROR */
    return size * n;
}

/* Applies the options common to every blocking request to the token endpoint. */
static void easy_common(CURL *e, const struct cfg_upstream *up, char *errbuf)
{
    http_easy_secure(e, up->oauth2_ca_file);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, O2_CONNECT_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_TIMEOUT, O2_REQUEST_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_USERAGENT, O2_USER_AGENT);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    errbuf[0] = '\0';
}

/* "token endpoint HOST: ..." for a failed blocking transfer, into out. */
static void curl_failure(CURLcode rc, const char *errbuf, const char *host, char *out,
                         size_t outlen)
{
    char why[CURL_ERROR_SIZE + 128];

    http_curl_error(rc, errbuf, "", why, sizeof why);
    snprintf(out, outlen, "token endpoint %s: %s", host, why);
    oauth2__sanitize(out, outlen > 400 ? 400 : outlen - 1);
}

int oauth2_http_post(const struct cfg_upstream *up, const char *url, const char *post, long *status,
                     struct json_obj **j, char *err, size_t errlen)
{
    CURL *e = curl_easy_init();
    struct {
        struct curl_slist *hdrs;
        struct buf *body;
        char errbuf[CURL_ERROR_SIZE];
    } r;
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
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r.body);
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
