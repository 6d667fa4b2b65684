/*
 * sched - the delivery scheduler: picks due messages from the spool and hands them to the
 * pool (relayd/pool.h: sessions, failover, health, rates), at most [relayd] workers at a
 * time, and records every result in the spool.
 *
 * It polls the spool's schedule index once a second (so `relayctl retry` takes effect
 * within a second, and so does mail another process queued) and at once when smtpd
 * reports a new message.  Which messages are in delivery is known only in memory: after
 * a crash nothing is "in delivery", so everything due is simply tried again (recipients
 * already recorded as sent are never sent again: results are written per recipient).
 *
 * Lifecycle of a message: QUEUED -> (attempt) -> removed when every recipient is sent;
 * DEFERRED with exponential backoff while some are pending; FAILED when some were refused
 * permanently or max_lifetime passed (an RFC 3464 notification goes to the sender or
 * bounce_to, see bounce.h; FAILED messages are deleted failed_retention after arrival);
 * HELD when no route leads anywhere.  Each recipient has its own verdict
 * (relayd/verdict.h).  A failure that is the relay's own fault (CONFIG: TLS verification,
 * authentication, "send as denied") neither counts as an attempt nor expires nor bounces:
 * when the upstream is unhealthy the mail waits while the pool probes it every
 * upstream_probe_interval, and is due again as soon as a probe succeeds; a fault about one
 * recipient or sender retries on the ordinary schedule, uncounted.  A slow-down waits for
 * the pause or the rate window, uncounted.
 */
#ifndef RELAYD_SCHED_H
#define RELAYD_SCHED_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/verdict.h"
#include "spool/spool.h"

/* A message that waits for an unhealthy upstream is looked at again after this long even
 * if no probe says the upstream works again (after a restart, say). */
#define SCHED_PARK_SECONDS 600

struct sched;

struct oauth2;

/* cfg, sp and oauth2 (the token manager, or NULL) must outlive the scheduler. */
struct sched *sched_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp,
                        struct oauth2 *oauth2);
/* Bodies of deliveries in progress are counted in *used, the counter max_memory bounds
 * for the inbound sessions too (smtpd_server_memory()): one budget for both sides.
 * Without it the scheduler keeps a counter of its own, bounded by max_memory alone. */
void sched_share_memory(struct sched *sc, size_t *used);
/* Starts the pool (TLS credentials for every upstream) and the timer; 0 or negative + err. */
int sched_start(struct sched *sc, char *err, size_t errlen);
/* A new message is in the spool: look for due work now. */
void sched_kick(struct sched *sc);
/*
 * The full reload (SIGHUP): cfg (with oauth2, the token manager made for it) takes over the
 * deliveries once none is in progress: those in progress finish on the configuration they
 * started with, and no new one starts meanwhile.  Upstream state carries over by name
 * (pool_carry()).  The new pool is started now, so its failure (a CA file) is returned
 * here, negative with text in err, and changes nothing; so is a reload while another is
 * still taking over.  done(arg, 1) runs once the old pool is gone (the old cfg and oauth2
 * may go then), done(arg, 0) when the reload was dropped (sched_reconfigure_cancel() or a
 * stop: cfg and oauth2 may go).
 */
int sched_reconfigure(struct sched *sc, const struct cfg *cfg, struct oauth2 *oauth2,
                      void (*done)(void *arg, int swapped), void *arg, char *err, size_t errlen);
void sched_reconfigure_cancel(struct sched *sc);
/* Aborts deliveries in progress (they stay queued) and stops; done(arg) when idle. */
void sched_stop(struct sched *sc, void (*done)(void *arg), void *arg);
void sched_free(struct sched *sc);

/* Next retry delay in seconds after attempts failures: first * 2^(attempts-1), capped,
 * with +-10% jitter so that a queue of deferred mail does not retry in lock step. */
int64_t sched_backoff(int attempts, int first, int max, unsigned rnd);
/* The same with [relayd] retry_factor: first * factor^(attempts-1), capped at max, +-10%
 * jitter (rnd % 2001 picks it), never below 1. */
int64_t sched_backoff_factor(int attempts, int first, int factor, int max, unsigned rnd);

/* ---- The round's outcome (pure; tests/unit/test_sched.c) ---- */

/* One recipient of a message at the end of a delivery round. */
struct sched_round_rcpt {
    enum spool_rcpt_status before; /* in the spool when the round started */
    int in_round;                  /* it got a verdict in this round */
    enum verdict_cause cause;      /* that verdict */
    int routed;                    /* a route leads somewhere now */
    int64_t wait_until;            /* CONFIG / SLOWDOWN: when its route may take it */
    /* Out: */
    enum spool_rcpt_status after;
    int expired;                   /* failed now because max_lifetime passed */
};

struct sched_round_in {
    const struct cfg *cfg; /* max_lifetime, retry_first, retry_factor, retry_max */
    int64_t now, arrived;
    int attempts;          /* counted so far */
    unsigned rnd;          /* backoff jitter */
    /* Time the message waited on configuration faults (spool_msg): it does not age. */
    int64_t config_wait;   /* seconds of waits that ended */
    int64_t config_since;  /* the wait in progress began then; 0: none */
};

struct sched_outcome {
    enum spool_state state; /* QUEUED with delivered = 1: the spool removes it */
    int64_t next_attempt;   /* DEFERRED: when it is due again */
    int count_attempt;      /* an upstream judged the message in this round */
    int delivered;          /* every recipient sent */
    int expired;            /* some recipient failed now for max_lifetime */
    int noroute;            /* held: what is pending has no route */
    /* What the spool records for the next round: the wait in progress (if any) ended
     * now, and a new one begins now when every pending recipient waits on CONFIG. */
    int64_t config_wait, config_since;
};

/* The age that counts toward max_lifetime: now - arrived, less the time spent waiting on
 * configuration faults (config_wait, and the wait in progress since config_since). */
int64_t sched_age(int64_t now, int64_t arrived, int64_t config_wait, int64_t config_since);

/*
 * The message's new state after a round.  Per recipient: SENT is done, PERMANENT fails,
 * TRANSIENT retries with backoff (and fails once max_lifetime passed), SLOWDOWN waits
 * until wait_until (and ages), CONFIG waits until wait_until without aging (the relay's
 * own fault must not expire mail: the time the message spends waiting with only CONFIG
 * recipients pending is left out of its age, sched_age(), at every later round too).  The attempt counts only when an upstream judged the
 * message (PERMANENT or TRANSIENT).  Pending recipients the round never reached are due
 * now; pending ones without a route hold the message when nothing else is pending.
 */
void sched_round_decide(const struct sched_round_in *in, struct sched_round_rcpt *r, size_t n,
                        struct sched_outcome *out);

/*
 * Deletes FAILED messages that arrived more than retention seconds before now, at most max
 * of them, and puts their ids into ids[0..*n).  Synchronous (one durable commit): the
 * daemon runs it on libuv's thread pool, never on the loop.  0 or SPOOL_E*.
 */
int sched_purge_failed(struct spool *sp, int64_t now, int64_t retention, uint64_t *ids, size_t max,
                       size_t *n);

#endif
