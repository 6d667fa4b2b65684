/*
 * metrics - counters, gauges and histograms for monitoring, rendered as Prometheus text
 * exposition format 0.0.4 (served by relayd/metrics_http.c at GET /metrics).
 *
 * The set of metrics is fixed (enum metrics_id, one row each in metrics.c's table: name,
 * help, type, label names); a series is one combination of label values, found by a
 * linear search (there are a handful of listeners and upstreams) and allocated the first
 * time it is seen, never again: an increment costs a few string compares and no
 * allocation.  Series per metric are capped (METRICS_SERIES_MAX): beyond it new label
 * combinations are dropped (and counted in relayd_metrics_dropped_total), never memory.
 *
 * The daemon has one registry, installed with metrics_set_global(); the one-line
 * instrumentation calls in smtpd, sched, pool and upstream (metrics_on_*()) use it and do
 * nothing while none is installed (unit tests of those modules, relayctl).  Everything
 * runs on the loop thread: no locks.
 *
 * Gauges that are cheap to read where they live (queue sizes, spool bytes, upstream
 * health, OAuth 2.0 token expiry) are set just before rendering by the daemon's collect
 * callback (main.c); the others are kept up to date by the events.
 *
 * /healthz is decided by the pure metrics_health() from what the registry and the
 * daemon know (tests/unit/test_metrics.c).
 *
 * Errors: none expected; OOM dies in xmalloc().  Ownership: metrics_new() allocates,
 * metrics_free() releases; label values are copied (truncated at METRICS_LABEL_MAX - 1).
 */
#ifndef RELAYD_METRICS_H
#define RELAYD_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "config/cfg.h"

#define METRICS_LABELS_MAX 3   /* label names per metric */
#define METRICS_LABEL_MAX 64   /* bytes per label value, NUL included */
#define METRICS_SERIES_MAX 256 /* series per metric */
#define METRICS_BUCKETS 9      /* latency histogram: 1 5 15 60 300 900 3600 21600 86400 s */

enum metrics_id {
    METRICS_RECEIVED,      /* counter {listener} */
    METRICS_DELIVERED,     /* counter {upstream} (recipients) */
    METRICS_DEFERRED,      /* counter {upstream, reason} */
    METRICS_BOUNCED,       /* counter {upstream, reason} */
    METRICS_EXPIRED,       /* counter (messages failed for max_lifetime) */
    METRICS_REJECTED,      /* counter {listener, reason} */
    METRICS_TLS_FAILURES,  /* counter {direction, peer, reason} */
    METRICS_AUTH_FAILURES, /* counter {direction, peer, reason} */
    METRICS_QUEUE,         /* gauge {state} */
    METRICS_OLDEST_AGE,    /* gauge */
    METRICS_SESSIONS,      /* gauge: inbound sessions */
    METRICS_OUT_CONNS,     /* gauge {upstream} */
    METRICS_UP_HEALTHY,    /* gauge {upstream} */
    METRICS_OAUTH2_TTL,    /* gauge {upstream} */
    METRICS_SPOOL_BYTES,   /* gauge */
    METRICS_SPOOL_COMMITS, /* counter */
    METRICS_SPOOL_FAULT,   /* gauge: 1 while the last spool write failed */
    METRICS_ACCEPTING,     /* gauge: 0 while drained */
    METRICS_LATENCY,       /* histogram: arrival to delivered, seconds */
    METRICS_DROPPED,       /* counter: series not created (METRICS_SERIES_MAX) */
    METRICS_COUNT
};

enum metrics_type { METRICS_T_COUNTER, METRICS_T_GAUGE, METRICS_T_HISTOGRAM };

struct metrics;

struct metrics *metrics_new(void);
struct metrics *metrics_free(struct metrics *m); /* returns NULL; NULL is fine */

/* The registry the metrics_on_*() calls use, or NULL (they do nothing). */
void metrics_set_global(struct metrics *m);
struct metrics *metrics_global(void);

/* ---- The registry (labels: as many values as the metric has label names; NULL = "") ---- */

void metrics_add(struct metrics *m, enum metrics_id id, const char *const *labels, double v);
void metrics_set(struct metrics *m, enum metrics_id id, const char *const *labels, double v);
/* A histogram observation (METRICS_LATENCY). */
void metrics_observe(struct metrics *m, enum metrics_id id, const char *const *labels, double v);
/* The value of a series, 0 when it does not exist (tests, health). */
double metrics_get(const struct metrics *m, enum metrics_id id, const char *const *labels);
/* Drops every series of id (a gauge set afresh by the collect callback). */
void metrics_clear(struct metrics *m, enum metrics_id id);

/* Appends the whole registry in Prometheus text format 0.0.4 to out; 0 or -ENOSPC. */
int metrics_render(const struct metrics *m, struct buf *out);
/* Appends s with the escaping of a label value (\\, \", \n) or, help = 1, of HELP text
 * (\\, \n). */
int metrics_escape(struct buf *out, const char *s, int help);

/* ---- Health ---- */

/* What the last spool write said (a failed write or a full spool makes /healthz fail
 * until one succeeds); why is copied.  Kept with the registry. */
void metrics_spool_fault(struct metrics *m, int fault, const char *why);
/* Health per upstream, with the reason while unhealthy (copied, truncated). */
void metrics_upstream_health(struct metrics *m, const char *upstream, int healthy,
                             const char *reason);

struct metrics_health_in {
    int draining;             /* relayctl drain */
    int spool_fault;          /* the last spool write failed, or the spool is full */
    const char *spool_why;    /* its reason */
    const char *up_unhealthy; /* the first unhealthy upstream's name, or NULL */
    const char *up_reason;    /* its reason */
    int64_t oldest_age;       /* seconds, 0 when the queue is empty */
    int64_t max_age;          /* health_max_age; 0: no limit */
};
/* 200 with "ok", or 503 with a one-line reason in why (pure). */
int metrics_health(const struct metrics_health_in *in, char *why, size_t whylen);
/* Fills the registry's part of in (spool fault, the first unhealthy upstream among those
 * cfg configures: one a reload removed no longer counts; cfg NULL: any); the strings stay
 * valid until the next change of m. */
void metrics_health_fill(const struct metrics *m, const struct cfg *cfg,
                         struct metrics_health_in *in);
/* Sets relayd_upstream_healthy afresh for the upstreams cfg configures (1 when nothing
 * was heard about one yet), so that series of upstreams a reload removed go away. */
void metrics_health_gauges(struct metrics *m, const struct cfg *cfg);

/* ---- Instrumentation: one call at each event point, a no-op without a global registry ---- */

/* smtpd: a spool put finished (rc 0 or SPOOL_E*); counted as received on listener when
 * rc is 0 and listener is not NULL (sched's result writes pass NULL). */
void metrics_on_spool_write(int rc, const char *listener);
/* smtpd: a refusal logged as "reject: ... reason=NAME"; tls_* and auth_* reasons also
 * count as inbound TLS and AUTH failures. */
void metrics_on_reject(const char *listener, const char *reason);
/* smtpd: an admitted session starts (+1) or ends (-1). */
void metrics_on_session(int delta);
/* sched: one recipient's verdict from an upstream; status is enum smtpc_status, cause the
 * verdict_cause_name(), age the seconds since arrival. */
void metrics_on_rcpt(const char *upstream, int status, const char *cause, int64_t age);
/* sched: a message failed for max_lifetime. */
void metrics_on_expired(void);
/* pool: a session to upstream opened (+1) or closed (-1). */
void metrics_on_conn(const char *upstream, int delta);
/* pool: what a finished session or transaction said (reply text, config fault): TLS and
 * AUTH failures by reason. */
void metrics_on_session_result(const char *upstream, const char *reply, int config_fault,
                               int setup);
/* upstream: health changed. */
void metrics_on_health(const char *upstream, int healthy, const char *reason);

#endif
