/*
 * metrics - the registry, its Prometheus text renderer and the instrumentation calls.
 *
 * Happy path: an event point calls metrics_on_*(), which finds (or, the first time,
 * allocates) the series for its label values in the global registry and adds to it; at
 * GET /metrics the daemon's collect callback sets the gauges read elsewhere, then
 * metrics_render() writes every metric in table order.
 *
 * Failure modes: a registry that is not installed makes every metrics_on_*() a no-op; a
 * metric with METRICS_SERIES_MAX series drops new label combinations (counted); a label
 * value longer than METRICS_LABEL_MAX - 1 bytes is truncated.  Nothing here can fail the
 * mail path.
 */
#include "relayd/metrics.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"
#include "relayd/smtpc.h"
#include "spool/spool.h"

#define METRICS_UPSTREAMS_MAX 64

struct metrics_def {
    const char *name;
    const char *help;
    enum metrics_type type;
    int nlabels;
    const char *labels[METRICS_LABELS_MAX];
};

/* One row per enum metrics_id, in that order. */
static const struct metrics_def metrics_defs[METRICS_COUNT] = {
    [METRICS_RECEIVED] = {"relayd_messages_received_total",
                          "Messages accepted and committed to the spool (250 sent).",
                          METRICS_T_COUNTER,
                          1,
                          {"listener"}},
    [METRICS_DELIVERED] = {"relayd_recipients_delivered_total",
                           "Recipients an upstream accepted.",
                           METRICS_T_COUNTER,
                           1,
                           {"upstream"}},
    [METRICS_DEFERRED] = {"relayd_recipients_deferred_total",
                          "Recipients deferred by a delivery attempt, by verdict cause.",
                          METRICS_T_COUNTER,
                          2,
                          {"upstream", "reason"}},
    [METRICS_BOUNCED] = {"relayd_recipients_bounced_total",
                         "Recipients an upstream refused permanently, by verdict cause.",
                         METRICS_T_COUNTER,
                         2,
                         {"upstream", "reason"}},
    [METRICS_EXPIRED] = {"relayd_messages_expired_total",
                         "Messages failed because max_lifetime passed.",
                         METRICS_T_COUNTER,
                         0,
                         {NULL}},
    [METRICS_REJECTED] = {"relayd_smtpd_rejected_total",
                          "Inbound refusals, by listener and the reason of the reject: log line.",
                          METRICS_T_COUNTER,
                          2,
                          {"listener", "reason"}},
    [METRICS_TLS_FAILURES] = {"relayd_tls_failures_total",
                              "TLS failures, inbound (per listener) and outbound (per upstream).",
                              METRICS_T_COUNTER,
                              3,
                              {"direction", "peer", "reason"}},
    [METRICS_AUTH_FAILURES] = {"relayd_auth_failures_total",
                               "AUTH failures, inbound (per listener) and outbound (per upstream).",
                               METRICS_T_COUNTER,
                               3,
                               {"direction", "peer", "reason"}},
    [METRICS_QUEUE] =
        {"relayd_queue_messages", "Messages in the spool by state.", METRICS_T_GAUGE, 1, {"state"}},
    [METRICS_OLDEST_AGE] = {"relayd_queue_oldest_message_age_seconds",
                            "Age of the oldest message in the spool (0 when empty).",
                            METRICS_T_GAUGE,
                            0,
                            {NULL}},
    [METRICS_SESSIONS] =
        {"relayd_smtpd_sessions", "Inbound SMTP sessions in progress.", METRICS_T_GAUGE, 0, {NULL}},
    [METRICS_OUT_CONNS] = {"relayd_upstream_connections",
                           "Outbound sessions open or opening.",
                           METRICS_T_GAUGE,
                           1,
                           {"upstream"}},
    [METRICS_UP_HEALTHY] = {"relayd_upstream_healthy",
                            "1 when the upstream is healthy, 0 while a configuration fault holds "
                            "its mail.",
                            METRICS_T_GAUGE,
                            1,
                            {"upstream"}},
    [METRICS_OAUTH2_TTL] = {"relayd_oauth2_token_expiry_seconds",
                            "Seconds the upstream's OAuth 2.0 access token is still valid (-1: "
                            "none).",
                            METRICS_T_GAUGE,
                            1,
                            {"upstream"}},
    [METRICS_SPOOL_BYTES] = {"relayd_spool_bytes",
                             "Sum of the message sizes in the spool.",
                             METRICS_T_GAUGE,
                             0,
                             {NULL}},
    [METRICS_SPOOL_COMMITS] = {"relayd_spool_commits_total",
                               "Spool transactions committed (fsyncs) by this process.",
                               METRICS_T_COUNTER,
                               0,
                               {NULL}},
    [METRICS_SPOOL_FAULT] = {"relayd_spool_fault",
                             "1 while the last spool write failed (disk error, spool full).",
                             METRICS_T_GAUGE,
                             0,
                             {NULL}},
    [METRICS_ACCEPTING] =
        {"relayd_accepting", "1 when accepting mail, 0 while drained.", METRICS_T_GAUGE, 0, {NULL}},
    [METRICS_LATENCY] = {"relayd_delivery_latency_seconds",
                         "Seconds from arrival to delivery, per recipient delivered.",
                         METRICS_T_HISTOGRAM,
                         0,
                         {NULL}},
    [METRICS_DROPPED] = {"relayd_metrics_dropped_total",
                         "Label combinations not recorded (too many series).",
                         METRICS_T_COUNTER,
                         0,
                         {NULL}},
};

static const double metrics_bounds[METRICS_BUCKETS] = {1, 5, 15, 60, 300, 900, 3600, 21600, 86400};

struct metrics_series {
    char labels[METRICS_LABELS_MAX][METRICS_LABEL_MAX];
    double value; /* counter, gauge; histogram: the sum */
    uint64_t count;
    uint64_t buckets[METRICS_BUCKETS]; /* not cumulative; the renderer adds them up */
};

struct metrics_up {
    char name[METRICS_LABEL_MAX];
    int healthy;
    char reason[256];
};

struct metrics {
    struct metrics_series *series[METRICS_COUNT];
    int nseries[METRICS_COUNT], cap[METRICS_COUNT];
    int spool_fault;
    char spool_why[256];
    struct metrics_up ups[METRICS_UPSTREAMS_MAX];
    int nups;
};

static struct metrics *metrics_g;

struct metrics *metrics_new(void)
{
    return xcalloc(1, sizeof(struct metrics));
}

struct metrics *metrics_free(struct metrics *m)
{
    int i;

    if (m == NULL)
        return NULL;
    if (metrics_g == m)
        metrics_g = NULL;
    for (i = 0; i < METRICS_COUNT; i++)
        free(m->series[i]);
    free(m);
    return NULL;
}

void metrics_set_global(struct metrics *m)
{
    metrics_g = m;
}

struct metrics *metrics_global(void)
{
    return metrics_g;
}

static int series_match(const struct metrics_series *s, int n, const char *const *labels)
{
    int i;

    for (i = 0; i < n; i++) {
        const char *v = labels != NULL && labels[i] != NULL ? labels[i] : "";

        if (strncmp(s->labels[i], v, METRICS_LABEL_MAX - 1) != 0)
            return 0;
    }
    return 1;
}

static struct metrics_series *series_find(const struct metrics *m, enum metrics_id id,
                                          const char *const *labels)
{
    int n = metrics_defs[id].nlabels, i;

    for (i = 0; i < m->nseries[id]; i++)
        if (series_match(&m->series[id][i], n, labels))
            return &m->series[id][i];
    return NULL;
}

/* The series, allocated the first time; NULL past METRICS_SERIES_MAX. */
static struct metrics_series *series_get(struct metrics *m, enum metrics_id id,
                                         const char *const *labels)
{
    struct metrics_series *s = series_find(m, id, labels);
    int n = metrics_defs[id].nlabels, i;

    if (s != NULL)
        return s;
    if (m->nseries[id] >= METRICS_SERIES_MAX) {
        if (id != METRICS_DROPPED)
            metrics_add(m, METRICS_DROPPED, NULL, 1);
        return NULL;
    }
    if (m->nseries[id] == m->cap[id]) {
        m->cap[id] = m->cap[id] == 0 ? 4 : m->cap[id] * 2;
        m->series[id] = xrealloc(m->series[id], (size_t)m->cap[id] * sizeof(*s));
    }
    s = &m->series[id][m->nseries[id]++];
    memset(s, 0, sizeof(*s));
    for (i = 0; i < n; i++)
        snprintf(s->labels[i], sizeof s->labels[i], "%s",
                 labels != NULL && labels[i] != NULL ? labels[i] : "");
    return s;
}

void metrics_add(struct metrics *m, enum metrics_id id, const char *const *labels, double v)
{
    struct metrics_series *s;

    if (m != NULL && (s = series_get(m, id, labels)) != NULL)
        s->value += v;
}

void metrics_set(struct metrics *m, enum metrics_id id, const char *const *labels, double v)
{
    struct metrics_series *s;

    if (m != NULL && (s = series_get(m, id, labels)) != NULL)
        s->value = v;
}

void metrics_observe(struct metrics *m, enum metrics_id id, const char *const *labels, double v)
{
    struct metrics_series *s;
    int b;

    if (m == NULL || metrics_defs[id].type != METRICS_T_HISTOGRAM ||
        (s = series_get(m, id, labels)) == NULL)
        return;
    s->value += v;
    s->count++;
    for (b = 0; b < METRICS_BUCKETS; b++)
        if (v <= metrics_bounds[b]) {
            s->buckets[b]++;
            break;
        }
}

double metrics_get(const struct metrics *m, enum metrics_id id, const char *const *labels)
{
    const struct metrics_series *s = m != NULL ? series_find(m, id, labels) : NULL;

    if (s == NULL)
        return 0;
    return metrics_defs[id].type == METRICS_T_HISTOGRAM ? (double)s->count : s->value;
}

void metrics_clear(struct metrics *m, enum metrics_id id)
{
    if (m != NULL)
        m->nseries[id] = 0;
}

/* ---- Rendering ---- */

int metrics_escape(struct buf *out, const char *s, int help)
{
    const char *p;
    int rc = 0;

    for (p = s; *p != '\0' && rc == 0; p++) {
        if (*p == '\\')
            rc = buf_puts(out, "\\\\");
        else if (*p == '\n')
            rc = buf_puts(out, "\\n");
        else if (*p == '"' && !help)
            rc = buf_puts(out, "\\\"");
        else
            rc = buf_append(out, p, 1);
    }
    return rc;
}

/* {a="x",b="y"} with extra (le="5") last; nothing when there are no labels at all. */
static int render_labels(struct buf *out, const struct metrics_def *d,
                         const struct metrics_series *s, const char *extra_name,
                         const char *extra_value)
{
    int i, rc = 0, first = 1;

    if (d->nlabels == 0 && extra_name == NULL)
        return 0;
    rc |= buf_puts(out, "{");
    for (i = 0; i < d->nlabels; i++) {
        rc |= buf_printf(out, "%s%s=\"", first ? "" : ",", d->labels[i]);
        rc |= metrics_escape(out, s != NULL ? s->labels[i] : "", 0);
        rc |= buf_puts(out, "\"");
        first = 0;
    }
    if (extra_name != NULL)
        rc |= buf_printf(out, "%s%s=\"%s\"", first ? "" : ",", extra_name, extra_value);
    rc |= buf_puts(out, "}");
    return rc;
}

static int render_value(struct buf *out, double v)
{
    return buf_printf(out, " %.15g\n", v);
}

static int render_series(struct buf *out, const struct metrics_def *d,
                         const struct metrics_series *s)
{
    char le[32];
    uint64_t cum = 0;
    int b, rc = 0;

    if (d->type != METRICS_T_HISTOGRAM) {
        rc |= buf_puts(out, d->name);
        rc |= render_labels(out, d, s, NULL, NULL);
        return rc | render_value(out, s != NULL ? s->value : 0);
    }
    for (b = 0; b <= METRICS_BUCKETS; b++) {
        if (b < METRICS_BUCKETS) {
            cum += s != NULL ? s->buckets[b] : 0;
            snprintf(le, sizeof le, "%.15g", metrics_bounds[b]);
        } else {
            cum = s != NULL ? s->count : 0;
            snprintf(le, sizeof le, "+Inf");
        }
        rc |= buf_printf(out, "%s_bucket", d->name);
        rc |= render_labels(out, d, s, "le", le);
        rc |= render_value(out, (double)cum);
    }
    rc |= buf_printf(out, "%s_sum", d->name);
    rc |= render_labels(out, d, s, NULL, NULL);
    rc |= render_value(out, s != NULL ? s->value : 0);
    rc |= buf_printf(out, "%s_count", d->name);
    rc |= render_labels(out, d, s, NULL, NULL);
    rc |= render_value(out, s != NULL ? (double)s->count : 0);
    return rc;
}

int metrics_render(const struct metrics *m, struct buf *out)
{
    static const char *const types[] = {"counter", "gauge", "histogram"};
    int id, i, rc = 0;

    for (id = 0; id < METRICS_COUNT; id++) {
        const struct metrics_def *d = &metrics_defs[id];

        rc |= buf_printf(out, "# HELP %s ", d->name);
        rc |= metrics_escape(out, d->help, 1);
        rc |= buf_printf(out, "\n# TYPE %s %s\n", d->name, types[d->type]);
        /* A metric without labels always has its one series, 0 until something happens;
         * one with labels shows only the combinations seen. */
        if (d->nlabels == 0 && m->nseries[id] == 0)
            rc |= render_series(out, d, NULL);
        for (i = 0; i < m->nseries[id]; i++)
            rc |= render_series(out, d, &m->series[id][i]);
    }
    return rc != 0 ? -ENOSPC : 0;
}

/* ---- Health ---- */

void metrics_spool_fault(struct metrics *m, int fault, const char *why)
{
    if (m == NULL)
        return;
    m->spool_fault = fault != 0;
    snprintf(m->spool_why, sizeof m->spool_why, "%s", fault && why != NULL ? why : "");
    metrics_set(m, METRICS_SPOOL_FAULT, NULL, m->spool_fault);
}

void metrics_upstream_health(struct metrics *m, const char *upstream, int healthy,
                             const char *reason)
{
    const char *lab[1] = {upstream};
    struct metrics_up *u = NULL;
    int i;

    if (m == NULL)
        return;
    for (i = 0; i < m->nups && u == NULL; i++)
        if (strncmp(m->ups[i].name, upstream, sizeof m->ups[i].name - 1) == 0)
            u = &m->ups[i];
    if (u == NULL && m->nups < METRICS_UPSTREAMS_MAX) {
        u = &m->ups[m->nups++];
        snprintf(u->name, sizeof u->name, "%s", upstream);
    }
    if (u != NULL) {
        u->healthy = healthy != 0;
        snprintf(u->reason, sizeof u->reason, "%s", !healthy && reason != NULL ? reason : "");
    }
    metrics_set(m, METRICS_UP_HEALTHY, lab, healthy != 0);
}

static int up_configured(const struct cfg *cfg, const char *name)
{
    int i;

    if (cfg == NULL)
        return 1;
    for (i = 0; i < cfg->nupstreams; i++)
        if (strncmp(cfg->upstreams[i].name, name, METRICS_LABEL_MAX - 1) == 0)
            return 1;
    return 0;
}

static const struct metrics_up *up_find(const struct metrics *m, const char *name)
{
    int i;

    for (i = 0; i < m->nups; i++)
        if (strncmp(m->ups[i].name, name, sizeof m->ups[i].name - 1) == 0)
            return &m->ups[i];
    return NULL;
}

void metrics_health_gauges(struct metrics *m, const struct cfg *cfg)
{
    int i;

    metrics_clear(m, METRICS_UP_HEALTHY);
    for (i = 0; i < cfg->nupstreams; i++) {
        const struct metrics_up *u = up_find(m, cfg->upstreams[i].name);
        const char *lab[1] = {cfg->upstreams[i].name};

        metrics_set(m, METRICS_UP_HEALTHY, lab, u == NULL || u->healthy);
    }
}

void metrics_health_fill(const struct metrics *m, const struct cfg *cfg,
                         struct metrics_health_in *in)
{
    int i;

    in->spool_fault = m->spool_fault;
    in->spool_why = m->spool_why;
    in->up_unhealthy = NULL;
    in->up_reason = NULL;
    for (i = 0; i < m->nups; i++)
        if (!m->ups[i].healthy && up_configured(cfg, m->ups[i].name)) {
            in->up_unhealthy = m->ups[i].name;
            in->up_reason = m->ups[i].reason;
            break;
        }
}

int metrics_health(const struct metrics_health_in *in, char *why, size_t whylen)
{
    /* Draining first: a load balancer must take the node out whatever else is true. */
    if (in->draining) {
        snprintf(why, whylen, "draining: not accepting mail (relayctl resume)");
        return 503;
    }
    if (in->spool_fault) {
        snprintf(why, whylen, "spool unwritable: %s",
                 in->spool_why != NULL && in->spool_why[0] ? in->spool_why : "write failed");
        return 503;
    }
    if (in->up_unhealthy != NULL) {
        snprintf(why, whylen, "upstream %s unhealthy: %s", in->up_unhealthy,
                 in->up_reason != NULL && in->up_reason[0] ? in->up_reason : "unknown");
        return 503;
    }
    if (in->max_age > 0 && in->oldest_age > in->max_age) {
        snprintf(why, whylen, "oldest message queued %llds ago (health_max_age = %llds)",
                 (long long)in->oldest_age, (long long)in->max_age);
        return 503;
    }
    snprintf(why, whylen, "ok");
    return 200;
}

/* ---- Instrumentation ---- */

void metrics_on_spool_write(int rc, const char *listener)
{
    const char *lab[1] = {listener};

    if (metrics_g == NULL)
        return;
    if (rc == SPOOL_ENOTFOUND) /* a message removed meanwhile: the spool wrote fine */
        rc = 0;
    if (rc == 0 && listener != NULL)
        metrics_add(metrics_g, METRICS_RECEIVED, lab, 1);
    if ((rc != 0) != metrics_g->spool_fault)
        metrics_spool_fault(metrics_g, rc != 0, rc != 0 ? spool_strerror(rc) : NULL);
}

void metrics_on_reject(const char *listener, const char *reason)
{
    const char *lab[2] = {listener, reason};
    const char *fl[3] = {"inbound", listener, reason};

    if (metrics_g == NULL)
        return;
    metrics_add(metrics_g, METRICS_REJECTED, lab, 1);
    if (strncmp(reason, "tls", 3) == 0)
        metrics_add(metrics_g, METRICS_TLS_FAILURES, fl, 1);
    else if (strcmp(reason, "auth_failed") == 0 || strcmp(reason, "auth_unavailable") == 0)
        metrics_add(metrics_g, METRICS_AUTH_FAILURES, fl, 1);
}

void metrics_on_session(int delta)
{
    metrics_add(metrics_g, METRICS_SESSIONS, NULL, delta);
}

void metrics_on_rcpt(const char *upstream, int status, const char *cause, int64_t age)
{
    const char *lab[2] = {upstream, cause};

    if (metrics_g == NULL)
        return;
    switch (status) {
    case SMTPC_SENT:
        metrics_add(metrics_g, METRICS_DELIVERED, lab, 1);
        metrics_observe(metrics_g, METRICS_LATENCY, NULL, (double)(age > 0 ? age : 0));
        break;
    case SMTPC_FAIL:
        metrics_add(metrics_g, METRICS_BOUNCED, lab, 1);
        break;
    default:
        metrics_add(metrics_g, METRICS_DEFERRED, lab, 1);
        break;
    }
}

void metrics_on_expired(void)
{
    metrics_add(metrics_g, METRICS_EXPIRED, NULL, 1);
}

void metrics_on_conn(const char *upstream, int delta)
{
    const char *lab[1] = {upstream};

    metrics_add(metrics_g, METRICS_OUT_CONNS, lab, delta);
}

void metrics_on_session_result(const char *upstream, const char *reply, int config_fault, int setup)
{
    /* config: the relay's own configuration must change (verification, a refused
     * password); temporary: the upstream may do better next time. */
    const char *fl[3] = {"outbound", upstream, config_fault ? "config" : "temporary"};

    if (metrics_g == NULL || reply == NULL || !setup)
        return;
    /* smtpc's words: "TLS: certificate signer not trusted", "STARTTLS: 454 ...", "upstream
     * does not offer STARTTLS; ...", "AUTH PLAIN: 535 5.7.8 ...": a set-up failure at
     * those stages. */
    if (strncmp(reply, "TLS", 3) == 0 || strstr(reply, "STARTTLS") != NULL) {
        metrics_add(metrics_g, METRICS_TLS_FAILURES, fl, 1);
    } else if (strncmp(reply, "AUTH", 4) == 0) {
        metrics_add(metrics_g, METRICS_AUTH_FAILURES, fl, 1);
    }
}

void metrics_on_health(const char *upstream, int healthy, const char *reason)
{
    metrics_upstream_health(metrics_g, upstream, healthy, reason);
}
