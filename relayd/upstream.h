/*
 * upstream - what relayd knows about each upstream at run time: health, rate shaping,
 * throttle back-off, and the table that turns a provider's reply into an operator action.
 *
 * Health: an upstream is unhealthy after a session-level fault of the relay's own
 * configuration (authentication refused, TLS verification or pin failed, connection-level
 * policy; never a reply about one recipient or sender): its mail is
 * held in the spool without burning attempts, the reason and the action stay here for logs
 * and relayctl, and a probe (smtpc_probe(), run by the pool every
 * [relayd] upstream_probe_interval) makes it healthy again by itself.
 *
 * Rate shaping (max_messages_per_minute: a sliding 60 s window of send times;
 * max_recipients_per_day: a rolling 24 h window in one-minute buckets) and pauses (a
 * session-level SLOWDOWN verdict, relayd/verdict.h, or a failed cohort of sessions pauses
 * the whole upstream for 60 s, doubling up to an hour; a session that works ends it and
 * resets the doubling) are kept in memory and, through the scheduler, in the spool
 * (upstream_state_save() / upstream_state_load(), struct spool_upstate), so a restart
 * keeps the health, the pause and the windows.
 *
 * Every function that depends on time takes now_ms (a monotonic clock in milliseconds,
 * uv_now() in the daemon) so tests control the clock.
 *
 * Errors: none expected; OOM dies in xmalloc().  Ownership: upstream_new() allocates,
 * upstream_free() releases; strings returned point into the upstream and stay valid until
 * the next call that changes its health.
 */
#ifndef RELAYD_UPSTREAM_H
#define RELAYD_UPSTREAM_H

#include <stddef.h>
#include <stdint.h>

#include "config/cfg.h"
#include "spool/spool.h"

/* First pause after a throttling reply, and the cap of its doubling. */
#define UPSTREAM_THROTTLE_FIRST_MS (60 * 1000)
#define UPSTREAM_THROTTLE_MAX_MS (3600 * 1000)

struct upstream;

struct upstream *upstream_new(const struct cfg_upstream *cfg);
struct upstream *upstream_free(struct upstream *u); /* returns NULL; NULL is fine */
const struct cfg_upstream *upstream_cfg(const struct upstream *u);

/* ---- Health ---- */
int upstream_is_healthy(const struct upstream *u);
/* Marks u unhealthy (reason and action copied; action may be NULL); logs a warning saying
 * what the administrator must fix when the state or the reason changes. */
void upstream_set_unhealthy(struct upstream *u, const char *reason, const char *action,
                            uint64_t now_ms);
/* Marks u healthy again (logs once when it was not). */
void upstream_set_healthy(struct upstream *u, uint64_t now_ms);
const char *upstream_reason(const struct upstream *u); /* "" when healthy */
const char *upstream_action(const struct upstream *u); /* "" when none */

/* ---- Throttling ---- */
/* The upstream asked us to slow down: pause it (first 60 s, doubling up to 1 h).  Several
 * sessions hearing it at once count as one. */
void upstream_throttle(struct upstream *u, uint64_t now_ms);
/* The upstream said how long to wait (an HTTP API's Retry-After): pause exactly ms (at least
 * one second) unless a longer pause is in force; the doubling is left as it is, and a
 * session or probe that works (upstream_session_ok()) does not end this pause early. */
void upstream_pause_for(struct upstream *u, uint64_t ms, uint64_t now_ms);
/* A session failed temporarily at session level (421, refused, lost before it was ready).
 * When cohort of them (the pool passes max_connections) failed in a row with no success in
 * between, the upstream is paused: first_ms, doubling up to max_ms (the pool passes
 * retry_first and retry_max), until a session or a probe works; returns 1 then.  One
 * session's 421 while others succeed only defers that session's mail. */
int upstream_session_failed(struct upstream *u, int cohort, uint64_t first_ms, uint64_t max_ms,
                            uint64_t now_ms);
/* A session or a probe worked: the cohort starts over, the pause doubling resets, and a
 * pause in force ends now. */
void upstream_session_ok(struct upstream *u, uint64_t now_ms);
/* 0 when not paused, else the time the pause ends. */
uint64_t upstream_paused_until(const struct upstream *u, uint64_t now_ms);

/* ---- Rate shaping ---- */
/* 0: a message with nrcpts recipients may go now.  1: it must wait; *wait_ms (if not NULL)
 * says how long until the windows (or the throttle pause) may let it go.  A message alone
 * bigger than the daily limit goes when the day's window is empty, rather than never. */
int upstream_rate_wait(const struct upstream *u, size_t nrcpts, uint64_t now_ms, uint64_t *wait_ms);
/* Counts a message with nrcpts recipients as sent now (call when it is handed over). */
void upstream_rate_take(struct upstream *u, size_t nrcpts, uint64_t now_ms);
/* Messages in the last minute and recipients in the last 24 hours. */
void upstream_rate_usage(const struct upstream *u, uint64_t now_ms, int *msgs_minute,
                         long *rcpts_day);

/* ---- Kept across restarts ---- */
/* 1 when u changed since the last upstream_state_save() (or load). */
int upstream_state_dirty(const struct upstream *u);
/* Fills *st (members allocated: spool_upstate_clear()) with u's state, monotonic times
 * turned into wall-clock ones (wall_ms is the wall clock at now_ms); marks u saved. */
void upstream_state_save(struct upstream *u, uint64_t now_ms, int64_t wall_ms,
                         struct spool_upstate *st);
/* Restores a state saved before a restart into u (fresh): health, a pause still running,
 * the doubling, the rate windows (what is still inside them); logs one line saying what
 * it restored. */
void upstream_state_load(struct upstream *u, const struct spool_upstate *st, uint64_t now_ms,
                         int64_t wall_ms);

/* ---- Reload ---- */
/* A reload made a new struct upstream for an upstream of the same name: u takes from's
 * run-time state: health (reason, action, since; a probe decides whether a changed
 * password or host fixed it), the pause and its doubling, the session cohort, and the
 * rate windows (as far as u's limits keep them). */
void upstream_carry(struct upstream *u, const struct upstream *from);

/* ---- Summary ---- */
/* One line for logs and relayctl: "healthy", "healthy, paused for 60s after throttling",
 * "unhealthy since 120s: AUTH PLAIN: 535 ...; action: ...", with rate usage when limited.
 * Returns the length written (snprintf semantics). */
int upstream_status(const struct upstream *u, uint64_t now_ms, char *out, size_t outlen);

#endif
