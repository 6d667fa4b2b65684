/*
 * test_http - the asynchronous HTTPS client on a private loop: a refused connection and a
 * non-https URL end with status 0 and a reason, an abort and a close end requests in flight
 * with "aborted" exactly once, and every handle is closed afterwards.  (Answers from a real
 * server are covered by tests/e2e/t_api_*.sh against api_server.py.)
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <curl/curl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "relayd/http.h"
#include "tests/lib/testlib.h"

static uv_loop_t loop;

static void setup(void)
{
    cr_assert(eq(int, uv_loop_init(&loop), 0));
}

static void teardown(void)
{
    cr_assert(eq(int, testlib_loop_close(&loop), 0));
}

TestSuite(http, .init = setup, .fini = teardown, .timeout = 20);

struct result {
    int calls;
    long status;
    char error[300];
};

static void on_done(void *arg, const struct http_response *res)
{
    struct result *r = arg;

    r->calls++;
    r->status = res->status;
    snprintf(r->error, sizeof r->error, "%s", res->error);
}

static int closed_calls;

static void on_closed(void *arg)
{
    (void)arg;
    closed_calls++;
}

/* A port with a bound socket that does not listen: connections to it are refused. */
static int refusing_port(int *fd)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    socklen_t len = sizeof sa;

    *fd = socket(AF_INET, SOCK_STREAM, 0);
    cr_assert(ge(int, *fd, 0));
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(eq(int, bind(*fd, (struct sockaddr *)&sa, sizeof sa), 0));
    cr_assert(eq(int, getsockname(*fd, (struct sockaddr *)&sa, &len), 0));
    return ntohs(sa.sin_port);
}

/* A refused connection: status 0, "network: ...", done once; the client closes cleanly. */
Test(http, refused)
{
    struct http *h = http_new(&loop);
    struct result r = {0};
    char url[64];
    int fd, port = refusing_port(&fd);
    struct http_request rq = {.method = "GET", .url = url, .connect_timeout = 5, .timeout = 5};

    snprintf(url, sizeof url, "https://127.0.0.1:%d/x", port);
    closed_calls = 0;
    cr_assert(eq(int, http_request(h, &rq, on_done, &r, NULL), 0));
    cr_expect(eq(int, r.calls, 0), "done ran inside http_request()");
    TESTLIB_LOOP_RUN_UNTIL(&loop, r.calls > 0, 1000);
    cr_expect(eq(int, r.calls, 1));
    cr_expect(eq(long, r.status, 0));
    cr_expect(strncmp(r.error, "network: ", 9) == 0, "error: %s", r.error);
    cr_expect(eq(int, http_pending(h), 0));
    http_close(h, on_closed, NULL);
    TESTLIB_LOOP_RUN_UNTIL(&loop, closed_calls > 0, 100);
    cr_expect(eq(int, closed_calls, 1));
    close(fd);
}

/* Only https:// is spoken. */
Test(http, not_https)
{
    struct http *h = http_new(&loop);
    struct result r = {0};
    struct http_request rq = {
        .method = "POST", .url = "http://127.0.0.1:1/x", .body = "a", .bodylen = 1};

    closed_calls = 0;
    cr_assert(eq(int, http_request(h, &rq, on_done, &r, NULL), 0));
    TESTLIB_LOOP_RUN_UNTIL(&loop, r.calls > 0, 1000);
    cr_expect(eq(int, r.calls, 1));
    cr_expect(eq(long, r.status, 0));
    cr_expect(strstr(r.error, "ot supported") != NULL || strstr(r.error, "disabled") != NULL,
              "error: %s", r.error);
    http_close(h, on_closed, NULL);
    TESTLIB_LOOP_RUN_UNTIL(&loop, closed_calls > 0, 100);
}

/* http_abort() and http_close() end requests in flight with "aborted", once each. */
Test(http, abort_and_close)
{
    struct http *h = http_new(&loop);
    struct result r1 = {0}, r2 = {0};
    struct http_req *req = NULL;
    /* 192.0.2.1 (TEST-NET-1) does not answer: the requests stay in flight. */
    struct http_request rq = {
        .method = "GET", .url = "https://192.0.2.1/x", .connect_timeout = 10, .timeout = 10};

    closed_calls = 0;
    cr_assert(eq(int, http_request(h, &rq, on_done, &r1, &req), 0));
    cr_assert(eq(int, http_request(h, &rq, on_done, &r2, NULL), 0));
    cr_expect(eq(int, http_pending(h), 2));
    /* No loop run before the abort: the transfers have not even started (and cannot have
     * failed on their own). */
    http_abort(req);
    cr_expect(eq(int, r1.calls, 1));
    cr_expect(eq(str, r1.error, "aborted"));
    cr_expect(eq(int, http_pending(h), 1));
    http_close(h, on_closed, NULL);
    cr_expect(eq(int, r2.calls, 1));
    cr_expect(eq(str, r2.error, "aborted"));
    TESTLIB_LOOP_RUN_UNTIL(&loop, closed_calls > 0, 100);
    cr_expect(eq(int, closed_calls, 1));
    cr_expect(eq(int, r1.calls, 1));
    cr_expect(eq(int, r2.calls, 1));
}

/* One wording for a failed transfer, the async client's and the blocking POST's: "TLS: "
 * for a certificate or handshake failure, else the caller's word, then curl's detail. */
Test(http, curl_error_words)
{
    char out[300];

    http_curl_error(CURLE_PEER_FAILED_VERIFICATION, "self-signed", "network: ", out, sizeof out);
    cr_expect(strncmp(out, "TLS: ", 5) == 0 && strstr(out, ": self-signed") != NULL, "%s", out);
    http_curl_error(CURLE_COULDNT_CONNECT, "", "network: ", out, sizeof out);
    cr_expect(eq(str, out, "network: Couldn't connect to server"));
    http_curl_error(CURLE_COULDNT_CONNECT, "", "", out, sizeof out);
    cr_expect(eq(str, out, "Couldn't connect to server"));
}
