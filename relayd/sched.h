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
 * HELD when no route leads anywhere.  A failure that is the relay's own fault (TLS
 * verification, authentication: the result's config_fault) neither counts as an attempt
 * nor expires nor bounces the message: it waits while the pool probes the upstream every
 * upstream_probe_interval, and is due again as soon as a probe succeeds.
 */
#ifndef RELAYD_SCHED_H
#define RELAYD_SCHED_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/cfg.h"
#include "spool/spool.h"

struct sched;

struct sched *sched_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp);
/* Starts the pool (TLS credentials for every upstream) and the timer; 0 or negative + err. */
int sched_start(struct sched *sc, char *err, size_t errlen);
/* A new message is in the spool: look for due work now. */
void sched_kick(struct sched *sc);
/* After SIGHUP re-read the upstream secrets: probe unhealthy upstreams now; mail waiting
 * for one becomes due as soon as its probe succeeds. */
void sched_reload(struct sched *sc);
/* Aborts deliveries in progress (they stay queued) and stops; done(arg) when idle. */
void sched_stop(struct sched *sc, void (*done)(void *arg), void *arg);
void sched_free(struct sched *sc);

/* Next retry delay in seconds after attempts failures: first * 2^(attempts-1), capped,
 * with +-10% jitter so that a queue of deferred mail does not retry in lock step. */
int64_t sched_backoff(int attempts, int first, int max, unsigned rnd);
/* The same with [relayd] retry_factor: first * factor^(attempts-1), capped at max, +-10%
 * jitter (rnd % 2001 picks it), never below 1. */
int64_t sched_backoff_factor(int attempts, int first, int factor, int max, unsigned rnd);

/*
 * Deletes FAILED messages that arrived more than retention seconds before now, at most max
 * of them, and puts their ids into ids[0..*n).  Synchronous (one durable commit): the
 * daemon runs it on libuv's thread pool, never on the loop.  0 or SPOOL_E*.
 */
int sched_purge_failed(struct spool *sp, int64_t now, int64_t retention, uint64_t *ids, size_t max,
                       size_t *n);

#endif
