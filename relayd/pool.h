/*
 * pool - the outbound worker pool: sessions to every upstream, reused across messages, with
 * limits, failover, rate shaping, throttling and health (relayd/upstream.h).
 *
 * For each upstream: at most max_connections sessions (smtpc_session_open()); a message
 * goes to an idle session of its upstream if there is one (RSET first), else to a new
 * session while under the limit, else it waits in memory, first in first out.  An idle
 * session says QUIT after idle_timeout (reuse = no: after every message).  A message over
 * the upstream's rate (max_messages_per_minute, max_recipients_per_day) or during a
 * throttle pause waits in that queue until the window opens; pool_would_accept() tells the
 * scheduler to leave further mail in the spool meanwhile.
 *
 * Failover: a route's upstream, then its failover list in order.  The next one is tried
 * when a session cannot be set up (resolve, connect, greeting, EHLO, TLS, AUTH: including
 * 4xx at connect or AUTH), or when the upstream is unhealthy to begin with: then with every
 * recipient.  After a transaction, only the recipients with a CONFIG verdict (a relay
 * configuration fault: "553 not owned by user", an AUTH refusal) go on to the next
 * upstream; a recipient an upstream accepted, refused for good or deferred is never
 * offered again in the same delivery (no duplicate, no second opinion on a 550).
 *
 * Health follows causes (relayd/verdict.h): a session-level CONFIG verdict
 * (res->config_fault: TLS verification or pin, AUTH refused, connection-level policy)
 * marks the upstream unhealthy with the reason and the action (logged by upstream.c); its
 * queued mail moves to a failover upstream or finishes as CONFIG; every [relayd]
 * upstream_probe_interval an smtpc_probe() runs, and its success makes the upstream
 * healthy again.  A session-level SLOWDOWN (res->throttled) pauses the whole upstream; a
 * temporary session failure (res->session_transient: a 421, a refused connection) counts
 * toward a failed cohort of max_connections sessions, which pauses it too
 * (upstream_session_failed()); a session that works ends a pause.  A recipient's own
 * reply never changes the upstream's health.
 *
 * Errors: negative UV_E* returns; OOM dies.  Ownership: pool_new() allocates; pool_free()
 * releases, after pool_stop() has called its done.  State is in memory only.
 */
#ifndef RELAYD_POOL_H
#define RELAYD_POOL_H

#include <stddef.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/smtpc.h"

struct pool;
struct upstream;

struct oauth2;

/* cfg (and oauth2, the token manager for OAuth 2.0 upstreams, or NULL) must outlive the
 * pool; helo is cfg->hostname. */
struct pool *pool_new(uv_loop_t *loop, const struct cfg *cfg, struct oauth2 *oauth2);
/* Loads the TLS client credentials of every upstream (ca_file or the system store, the
 * tls_priority); 0, or negative with "upstream NAME: why" in err. */
int pool_start(struct pool *p, char *err, size_t errlen);

/*
 * Delivers msg on route (route->upstream, then route->failover[] in order; see above).
 * Contract:
 *   - returns 0 and calls done(arg, res) exactly once, always from the loop (never inside
 *     this call) or synchronously from pool_stop(); or returns a negative UV_E* (UV_ECANCELED
 *     while stopping) and never calls done;
 *   - msg and everything it points to must stay valid until done has run;
 *   - res and its arrays are valid only during the call; res->rcpt has msg->nrcpts
 *     entries, each with its own status, cause (relayd/verdict.h), reply, action and the
 *     upstream that gave it (after a failover they differ from recipient to recipient);
 *   - a recipient whose cause is CONFIG waits for the administrator (do not count the
 *     attempt, do not bounce); when its upstream is unhealthy (pool_would_accept() says no)
 *     it is due again when a probe succeeds (pool_set_on_healthy()).
 */
int pool_deliver(struct pool *p, const struct cfg_route *route, const struct smtpc_msg *msg,
                 smtpc_done_fn done, void *arg);

/* 1 when a message on route could go now.  0 when every upstream of route is unhealthy,
 * paused or at its rate limit (leave the mail in the spool), or the pool is stopping; then
 * *wait_ms (if not NULL) is how long until the first of them opens, or 0 when all are
 * unhealthy (only a probe can tell: pool_set_on_healthy()). */
int pool_would_accept(struct pool *p, const struct cfg_route *route, uint64_t *wait_ms);

/*
 * Stops: every message queued or in transit gets done(SMTPC_DEFER, "delivery aborted
 * (shutting down)") before this returns (they stay queued in the spool); idle sessions say
 * QUIT; done(arg) runs from the loop once every handle is closed.
 */
void pool_stop(struct pool *p, void (*done)(void *arg), void *arg);
void pool_free(struct pool *p);

/* fn(arg, up) runs when a probe finds an unhealthy upstream working again (the scheduler
 * then wakes the mail that waited for it). */
void pool_set_on_healthy(struct pool *p, void (*fn)(void *arg, const struct cfg_upstream *up),
                         void *arg);
/* Probes every unhealthy upstream now (after a reload with new credentials). */
void pool_reprobe(struct pool *p);

/* The run-time state of up (health, rates), for logs and relayctl; NULL if unknown. */
/* The full reload: every upstream of p takes the run-time state of the upstream of the
 * same name in from (health, pauses, rate windows: upstream_carry()); upstreams renamed or
 * removed leave theirs behind.  Call before p gets its first request. */
void pool_carry(struct pool *p, const struct pool *from);
struct upstream *pool_upstream(struct pool *p, const struct cfg_upstream *up);
/* Counters for tests and stats. */
struct pool_stats {
    int sessions;      /* open or opening */
    int idle;          /* idle sessions */
    int queued;        /* messages waiting in memory */
    long opened;       /* sessions opened since start */
    long transactions; /* messages handed to sessions since start */
};
void pool_get_stats(const struct pool *p, struct pool_stats *st);

#endif
