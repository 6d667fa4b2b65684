/* Unit tests for relayd/metrics.c: the registry, the Prometheus text renderer and the
 * /healthz decision. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "relayd/metrics.h"
#include "relayd/metrics_http.h"
#include "relayd/smtpc.h"
#include "spool/spool.h"

static char *render(const struct metrics *m)
{
    struct buf *b = buf_new(0);
    size_t len;
    char *s;

    cr_assert(metrics_render(m, b) == 0);
    s = buf_steal(b, &len);
    buf_free(b);
    return s;
}

/* Label values and HELP text are escaped as exposition format 0.0.4 says. */
Test(metrics, escape)
{
    static const struct {
        const char *label, *in;
        int help;
        const char *want;
    } cases[] = {
        {"plain", "smtp", 0, "smtp"},
        {"quote", "a\"b", 0, "a\\\"b"},
        {"backslash", "a\\b", 0, "a\\\\b"},
        {"newline", "a\nb", 0, "a\\nb"},
        {"help keeps quotes", "a\"b\\c\nd", 1, "a\"b\\\\c\\nd"},
        {"empty", "", 0, ""},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct buf *b = buf_new(0);

        cr_assert(metrics_escape(b, cases[i].in, cases[i].help) == 0);
        cr_expect(strcmp(b->data, cases[i].want) == 0, "%s: got %s", cases[i].label, b->data);
        buf_free(b);
    }
}

/* Every metric has HELP and TYPE; counters, labelled series and the histogram render as
 * expected (cumulative buckets, +Inf = count, _sum). */
Test(metrics, render)
{
    struct metrics *m = metrics_new();
    const char *smtp[1] = {"smtp"}, *odd[1] = {"we\"ird"};
    const char *up[2] = {"provider", "permanent"};
    static const struct {
        const char *label, *want;
    } lines[] = {
        {"help", "# HELP relayd_messages_received_total Messages accepted"},
        {"type", "# TYPE relayd_messages_received_total counter\n"},
        {"counter", "\nrelayd_messages_received_total{listener=\"smtp\"} 3\n"},
        {"escaped label", "\nrelayd_messages_received_total{listener=\"we\\\"ird\"} 1\n"},
        {"two labels",
         "\nrelayd_recipients_bounced_total{upstream=\"provider\",reason=\"permanent\"} 1\n"},
        {"unlabelled zero", "\nrelayd_messages_expired_total 0\n"},
        {"gauge negative", "\nrelayd_smtpd_sessions -1\n"},
        {"histogram type", "# TYPE relayd_delivery_latency_seconds histogram\n"},
        {"bucket 1", "\nrelayd_delivery_latency_seconds_bucket{le=\"1\"} 1\n"},
        {"bucket 5", "\nrelayd_delivery_latency_seconds_bucket{le=\"5\"} 1\n"},
        {"bucket 60", "\nrelayd_delivery_latency_seconds_bucket{le=\"60\"} 2\n"},
        {"bucket 86400", "\nrelayd_delivery_latency_seconds_bucket{le=\"86400\"} 2\n"},
        {"bucket inf", "\nrelayd_delivery_latency_seconds_bucket{le=\"+Inf\"} 3\n"},
        {"sum", "\nrelayd_delivery_latency_seconds_sum 100031\n"},
        {"count", "\nrelayd_delivery_latency_seconds_count 3\n"},
        {"big", "\nrelayd_spool_bytes 12345678901\n"},
    };
    char *s;

    metrics_add(m, METRICS_RECEIVED, smtp, 1);
    metrics_add(m, METRICS_RECEIVED, smtp, 2);
    metrics_add(m, METRICS_RECEIVED, odd, 1);
    metrics_add(m, METRICS_BOUNCED, up, 1);
    metrics_add(m, METRICS_SESSIONS, NULL, -1);
    metrics_observe(m, METRICS_LATENCY, NULL, 1);
    metrics_observe(m, METRICS_LATENCY, NULL, 30);
    metrics_observe(m, METRICS_LATENCY, NULL, 100000);
    metrics_set(m, METRICS_SPOOL_BYTES, NULL, 12345678901.0);
    s = render(m);
    for (size_t i = 0; i < sizeof lines / sizeof lines[0]; i++)
        cr_expect(strstr(s, lines[i].want) != NULL, "%s: %s not in\n%s", lines[i].label,
                  lines[i].want, s);
    cr_expect(metrics_get(m, METRICS_RECEIVED, smtp) == 3);
    cr_expect(metrics_get(m, METRICS_LATENCY, NULL) == 3);
    /* Every metric name appears in a HELP and a TYPE line, once each. */
    cr_expect(strstr(s, "# TYPE relayd_metrics_dropped_total counter") != NULL);
    free(s);
    metrics_free(m);
}

/* New label combinations past METRICS_SERIES_MAX are dropped and counted, not stored. */
Test(metrics, series_cap)
{
    struct metrics *m = metrics_new();
    char name[32];
    const char *lab[1] = {name};

    for (int i = 0; i < METRICS_SERIES_MAX + 5; i++) {
        snprintf(name, sizeof name, "l%d", i);
        metrics_add(m, METRICS_RECEIVED, lab, 1);
    }
    cr_expect(metrics_get(m, METRICS_DROPPED, NULL) == 5);
    snprintf(name, sizeof name, "l%d", METRICS_SERIES_MAX + 1);
    cr_expect(metrics_get(m, METRICS_RECEIVED, lab) == 0);
    snprintf(name, sizeof name, "l0");
    metrics_add(m, METRICS_RECEIVED, lab, 1);
    cr_expect(metrics_get(m, METRICS_RECEIVED, lab) == 2);
    metrics_free(m);
}

/* The instrumentation calls do nothing without a global registry, and count with one. */
Test(metrics, instrumentation)
{
    struct metrics *m = metrics_new();
    const char *smtp[1] = {"smtp"}, *prov[1] = {"prov"};
    const char *rej[2] = {"smtp", "tls_failed"};
    const char *tls[3] = {"inbound", "smtp", "tls_failed"};
    const char *auth[3] = {"outbound", "prov", "config"};
    const char *def[2] = {"prov", "transient"};

    metrics_on_spool_write(0, "smtp"); /* no registry: nothing */
    metrics_set_global(m);
    metrics_on_spool_write(0, "smtp");
    metrics_on_spool_write(0, NULL);
    cr_expect(metrics_get(m, METRICS_RECEIVED, smtp) == 1);
    metrics_on_reject("smtp", "tls_failed");
    cr_expect(metrics_get(m, METRICS_REJECTED, rej) == 1);
    cr_expect(metrics_get(m, METRICS_TLS_FAILURES, tls) == 1);
    metrics_on_rcpt("prov", SMTPC_SENT, "sent", 3);
    metrics_on_rcpt("prov", SMTPC_DEFER, "transient", 3);
    cr_expect(metrics_get(m, METRICS_DELIVERED, (const char *[]){"prov", "sent"}) == 1);
    cr_expect(metrics_get(m, METRICS_DEFERRED, def) == 1);
    metrics_on_session_result("prov", "AUTH PLAIN: 535 5.7.8 no", 1, 1);
    metrics_on_session_result("prov", "250 ok", 0, 0);
    cr_expect(metrics_get(m, METRICS_AUTH_FAILURES, auth) == 1);
    metrics_on_conn("prov", 1);
    metrics_on_conn("prov", 1);
    metrics_on_conn("prov", -1);
    cr_expect(metrics_get(m, METRICS_OUT_CONNS, prov) == 1);
    metrics_set_global(NULL);
    metrics_free(m);
}

/* /healthz: what fails it, in order of precedence, and the reason it gives. */
Test(metrics, health)
{
    static const struct {
        const char *label;
        struct metrics_health_in in;
        int want;
        const char *want_why;
    } cases[] = {
        {"ok", {0, 0, NULL, NULL, NULL, 10, 3600}, 200, "ok"},
        {"empty queue", {0, 0, NULL, NULL, NULL, 0, 3600}, 200, "ok"},
        {"no age limit", {0, 0, NULL, NULL, NULL, 999999, 0}, 200, "ok"},
        {"age at limit", {0, 0, NULL, NULL, NULL, 3600, 3600}, 200, "ok"},
        {"too old", {0, 0, NULL, NULL, NULL, 3601, 3600}, 503, "oldest message queued 3601s ago"},
        {"upstream",
         {0, 0, NULL, "prov", "AUTH PLAIN: 535", 0, 0},
         503,
         "upstream prov unhealthy: AUTH PLAIN: 535"},
        {"spool", {0, 1, "spool full", "prov", "x", 0, 0}, 503, "spool unwritable: spool full"},
        {"draining wins", {1, 1, "spool full", "prov", "x", 99999, 1}, 503, "draining"},
    };
    char why[256];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int code = metrics_health(&cases[i].in, why, sizeof why);

        cr_expect(code == cases[i].want, "%s: %d", cases[i].label, code);
        cr_expect(strncmp(why, cases[i].want_why, strlen(cases[i].want_why)) == 0, "%s: %s",
                  cases[i].label, why);
        cr_expect(strchr(why, '\n') == NULL, "%s: one line", cases[i].label);
    }
}

/* The registry's health state: a failed spool write until one succeeds, and the first
 * unhealthy upstream with its reason. */
Test(metrics, health_fill)
{
    struct metrics *m = metrics_new();
    struct metrics_health_in in;

    metrics_set_global(m);
    metrics_on_health("a", 1, NULL);
    metrics_on_health("b", 1, NULL);
    memset(&in, 0, sizeof in);
    metrics_health_fill(m, NULL, &in);
    cr_expect(in.up_unhealthy == NULL && in.spool_fault == 0);
    metrics_on_health("b", 0, "TLS: certificate signer not trusted");
    metrics_on_spool_write(SPOOL_EFULL, "smtp");
    metrics_health_fill(m, NULL, &in);
    cr_expect(in.up_unhealthy != NULL && strcmp(in.up_unhealthy, "b") == 0);
    cr_expect(strcmp(in.up_reason, "TLS: certificate signer not trusted") == 0);
    cr_expect(in.spool_fault == 1 && in.spool_why[0] != '\0');
    cr_expect(metrics_get(m, METRICS_UP_HEALTHY, (const char *[]){"b"}) == 0);
    metrics_on_health("b", 1, NULL);
    metrics_on_spool_write(0, NULL);
    metrics_health_fill(m, NULL, &in);
    cr_expect(in.up_unhealthy == NULL && in.spool_fault == 0);
    metrics_set_global(NULL);
    metrics_free(m);
}

/* The request line of /metrics and /healthz: methods, paths, query strings, garbage. */
Test(metrics, http_parse)
{
    static const struct {
        const char *label, *req;
        int want;
        const char *want_path;
    } cases[] = {
        {"get", "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 0, "/metrics"},
        {"http 1.0 bare lf", "GET /healthz HTTP/1.0\n\n", 0, "/healthz"},
        {"head", "HEAD /healthz HTTP/1.1\r\n\r\n", 1, "/healthz"},
        {"query", "GET /metrics?name[]=x HTTP/1.1\r\n\r\n", 0, "/metrics"},
        {"post", "POST /metrics HTTP/1.1\r\n\r\n", 405, ""},
        {"lower case", "get /metrics HTTP/1.1\r\n\r\n", 405, ""},
        {"http 2", "GET /metrics HTTP/2\r\n\r\n", 400, ""},
        {"no version", "GET /metrics\r\n\r\n", 400, ""},
        {"no line end", "GET /metrics HTTP/1.1", 400, ""},
        {"empty path", "GET  HTTP/1.1\r\n\r\n", 400, ""},
        {"garbage", "\x16\x03\x01\x02\x00\n\n", 400, ""},
    };
    char path[32];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc = metrics_http_parse(cases[i].req, strlen(cases[i].req), path, sizeof path);

        cr_expect(rc == cases[i].want, "%s: %d", cases[i].label, rc);
        cr_expect(strcmp(path, cases[i].want_path) == 0, "%s: path %s", cases[i].label, path);
    }
    /* A path longer than the caller's buffer is not found, never truncated into another. */
    cr_expect(metrics_http_parse("GET /metrics-and-then-some-more-text HTTP/1.1\n\n", 47, path,
                                 sizeof path) == 404);
}

/* After a reload removed an unhealthy upstream, it no longer fails /healthz nor shows. */
Test(metrics, health_removed_upstream)
{
    struct metrics *m = metrics_new();
    struct cfg_upstream ups[1];
    struct cfg cfg;
    struct metrics_health_in in;
    char name[] = "kept";

    memset(&cfg, 0, sizeof cfg);
    memset(ups, 0, sizeof ups);
    ups[0].name = name;
    cfg.upstreams = ups;
    cfg.nupstreams = 1;
    metrics_upstream_health(m, "gone", 0, "AUTH PLAIN: 535");
    memset(&in, 0, sizeof in);
    metrics_health_fill(m, NULL, &in);
    cr_expect(in.up_unhealthy != NULL);
    metrics_health_fill(m, &cfg, &in);
    cr_expect(in.up_unhealthy == NULL);
    metrics_health_gauges(m, &cfg);
    cr_expect(metrics_get(m, METRICS_UP_HEALTHY, (const char *[]){"kept"}) == 1);
    cr_expect(metrics_get(m, METRICS_UP_HEALTHY, (const char *[]){"gone"}) == 0);
    {
        struct buf *b = buf_new(0);

        metrics_render(m, b);
        cr_expect(strstr(b->data, "upstream=\"gone\"") == NULL);
        buf_free(b);
    }
    metrics_free(m);
}
