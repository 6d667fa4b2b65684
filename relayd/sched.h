/*
 * sched - the delivery scheduler: picks due messages from the spool and hands them to
 * smtpc, at most [relayd] workers at a time, and records every result in the spool.
 *
 * It polls the spool's schedule index once a second (so `relayctl retry` takes effect
 * within a second, and so does mail another process queued) and at once when smtpd
 * reports a new message.  Which messages are in delivery is known only in memory: after
 * a crash nothing is "in delivery", so everything due is simply tried again.
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
/* Loads TLS credentials for every upstream and starts the timer; 0 or negative + err. */
int sched_start(struct sched *sc, char *err, size_t errlen);
/* A new message is in the spool: look for due work now. */
void sched_kick(struct sched *sc);
/* Aborts deliveries in progress (they stay queued) and stops; done(arg) when idle. */
void sched_stop(struct sched *sc, void (*done)(void *arg), void *arg);
void sched_free(struct sched *sc);

/* Next retry delay in seconds after attempts failures: first * 2^(attempts-1), capped,
 * with +-10% jitter so that a queue of deferred mail does not retry in lock step. */
int64_t sched_backoff(int attempts, int first, int max, unsigned rnd);

#endif
