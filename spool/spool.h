/*
 * spool - relayd's durable mail queue in LMDB; the only module that touches LMDB.
 *
 * The promise: a message handed to spool_put_async() exists for the scheduler (and is
 * acknowledged to the client) only once the write transaction holding all of it has been
 * committed durably.  Writes from the daemon go through one writer thread that batches
 * every ready job into one transaction, so concurrent sessions share one fsync (group
 * commit) and the event loop never blocks on fsync.  Reads are short LMDB read
 * transactions and may run on any thread; relayctl uses the same API from another
 * process (LMDB's multi-process locking keeps both safe).
 *
 * Layout and record encoding are documented in spool/DESIGN.md.
 *
 * Errors: expected failures return a negative SPOOL_E* code (or -errno) and put text for
 * the operator into err when an err buffer is taken; spool_strerror() names each code.
 * Ownership: structs returned by spool_msg_get() are the caller's (spool_msg_free());
 * callers never see LMDB types: values are copied out before the transaction ends.
 */
#ifndef SPOOL_SPOOL_H
#define SPOOL_SPOOL_H

#include <stddef.h>
#include <stdint.h>

#define SPOOL_ENOTFOUND (-3001) /* no such message */
#define SPOOL_EFULL     (-3002) /* spool size limit or disk reserve reached: answer 452 4.3.1 */
#define SPOOL_EVERSION  (-3003) /* unknown schema version: refuse, never rewrite */
#define SPOOL_ECORRUPT  (-3004) /* a record that does not decode */
#define SPOOL_EIO       (-3005) /* LMDB or file system error; text in err / the log */
#define SPOOL_ECLOSED   (-3006) /* writer stopped */

const char *spool_strerror(int rc);

enum spool_state {
    SPOOL_QUEUED = 1, /* waiting for its first attempt */
    SPOOL_DEFERRED,   /* an attempt failed temporarily; next_attempt says when again */
    SPOOL_HELD,       /* kept until an operator releases it (or no upstream configured) */
    SPOOL_FAILED,     /* permanent failure, kept for inspection */
};
const char *spool_state_name(enum spool_state st); /* "queued", "deferred", ... */
int spool_state_parse(const char *name);           /* enum value or -1 */

enum spool_rcpt_status {
    SPOOL_RCPT_PENDING = 0,
    SPOOL_RCPT_SENT,
    SPOOL_RCPT_FAILED,
};

/* RFC 3461 DSN parameters as the client gave them (0 / NULL: not given).  Stored decoded
 * (xtext undone); whoever puts them on the wire again encodes them. */
#define SPOOL_RET_FULL 1 /* MAIL RET=FULL */
#define SPOOL_RET_HDRS 2 /* MAIL RET=HDRS */
#define SPOOL_NOTIFY_SUCCESS 0x1 /* RCPT NOTIFY=SUCCESS,FAILURE,DELAY or NOTIFY=NEVER */
#define SPOOL_NOTIFY_FAILURE 0x2
#define SPOOL_NOTIFY_DELAY   0x4
#define SPOOL_NOTIFY_NEVER   0x8

struct spool_rcpt {
    char *addr;
    enum spool_rcpt_status status;
    char *reply;        /* last server reply for this recipient, or NULL */
    unsigned dsn_notify; /* SPOOL_NOTIFY_* bits; 0: NOTIFY not given */
    char *dsn_orcpt;    /* ORCPT as given, decoded: "rfc822;user@example.com"; NULL: none */
};

struct spool_attempt {
    int64_t when;   /* unix seconds */
    char *upstream; /* upstream name, or NULL */
    char *result;   /* "deferred: connect to 127.0.0.1:1587: connection refused" */
};

struct spool_msg {
    uint64_t id;               /* queue id: see spool_id_new() */
    enum spool_state state;
    int64_t arrived;           /* unix seconds */
    int64_t next_attempt;      /* unix seconds; 0 for held/failed */
    int attempts;
    uint64_t size;             /* body bytes */
    char *sender;              /* envelope sender, "" for <> */
    char *client;              /* client address, "10.0.0.7" */
    char *helo;                /* HELO/EHLO name or NULL */
    char *listener;            /* listener name or NULL */
    char *last_error;          /* NULL until an attempt fails */
    char *dsn_envid;           /* MAIL ENVID=, decoded; NULL: not given */
    int dsn_ret;               /* MAIL RET=: SPOOL_RET_FULL, SPOOL_RET_HDRS; 0: not given */
    struct spool_rcpt *rcpts;
    size_t nrcpts;
    /* Time spent waiting on a configuration fault of the relay (recipients with a CONFIG
     * verdict, held for the administrator) does not count toward max_lifetime: */
    int64_t config_wait;       /* seconds of such waits that ended, accumulated */
    int64_t config_since;      /* unix seconds the current wait began; 0: not waiting */
    struct spool_attempt *attempts_log; /* filled only with SPOOL_GET_HISTORY */
    size_t nattempts_log;
};

struct spool_opts {
    int readonly;            /* relayctl's read-only commands: needs only read permission */
    int unsafe_nosync;       /* [relayd] unsafe_no_fsync: lose mail on power failure */
    uint64_t max_bytes;      /* spool size limit; 0: none */
    uint64_t reserve_bytes;  /* free disk to keep; 0: none */
    uint64_t map_bytes;      /* initial LMDB map size; 0: 64 MiB (grows by doubling) */
};

struct spool;

/* Opens (creating when absent and not readonly) the spool in directory dir. */
int spool_open(const char *dir, const struct spool_opts *opts, struct spool **out, char *err,
               size_t errlen);
/* Stops the writer (finishing queued jobs: they are committed, but done callbacks not yet
 * reaped are dropped, never called) and closes.  NULL is fine. */
void spool_close(struct spool *sp);

/* Queue ids: unix milliseconds of arrival, made unique and increasing; printed as 12
 * upper-case hex digits ("0190A3F2C1D4"), so they sort by arrival and read aloud. */
uint64_t spool_id_new(struct spool *sp);
char *spool_id_str(uint64_t id, char out[17]);
int spool_id_parse(const char *text, uint64_t *id);

/* ---- Writes from the daemon: asynchronous, group-committed. ---- */

/* done runs on the thread that calls spool_writer_reap(), after the durable commit (rc 0)
 * or its failure (rc < 0, e.g. SPOOL_EFULL). */
typedef void (*spool_done_fn)(void *arg, int rc);

/* Starts the writer thread.  wake(wake_arg) is called from the writer thread whenever
 * finished jobs wait for spool_writer_reap() (the daemon passes uv_async_send); it must be
 * quick and must not call into the spool.  It is never called once spool_close() began. */
int spool_writer_start(struct spool *sp, void (*wake)(void *), void *wake_arg);
/* Commits every queued job and stops the writer thread; its completions stay for one last
 * spool_writer_reap().  Later writes fail with SPOOL_ECLOSED.  Safe to call twice. */
void spool_writer_stop(struct spool *sp);
/* Runs the done callbacks of finished jobs, on the caller's thread. */
void spool_writer_reap(struct spool *sp);

/* Stores a new message: msg (deep-copied now; msg->id from spool_id_new(), state QUEUED or
 * HELD) and its body (taken over: the spool frees it with free()). */
void spool_put_async(struct spool *sp, const struct spool_msg *msg, char *body, size_t len,
                     spool_done_fn done, void *arg);

/* A new message written in the same transaction as an update: the notification about
 * a delivery exists if and only if the delivery's outcome was recorded. */
struct spool_newmsg {
    const struct spool_msg *msg; /* id from spool_id_new(), state QUEUED */
    const char *body;
    size_t len;
};

/* The result of one delivery attempt. */
struct spool_update {
    uint64_t id;
    enum spool_state state;  /* new state (ignored when every recipient is done) */
    int64_t next_attempt;    /* for SPOOL_QUEUED/SPOOL_DEFERRED */
    int count_attempt;       /* 1: attempts += 1 */
    const char *last_error;  /* NULL: unchanged */
    const char *upstream;    /* for the attempt log */
    const char *result;      /* attempt log line; NULL: no entry */
    size_t nrcpts;           /* per-recipient updates, by index into msg->rcpts */
    const size_t *rcpt_index;
    const enum spool_rcpt_status *rcpt_status;
    const char *const *rcpt_reply;
    int set_config_wait;     /* 1: config_wait and config_since become the values below */
    int64_t config_wait, config_since;
    int if_scheduled;        /* 1 (a delivery's outcome): the new state applies only while the
                                message is still QUEUED or DEFERRED, so a hold or a failure an
                                operator made meanwhile stays; recipient results and the
                                attempt log are recorded either way */
    const struct spool_newmsg *puts; /* stored with the update, only if it applies (the
                                        message still exists); deep-copied */
    size_t nputs;
};
/* Applies u (deep-copied now).  When afterwards no recipient is PENDING and none FAILED,
 * the message is removed from the spool entirely (delivered).  SPOOL_ENOTFOUND: the
 * message was deleted meanwhile (nothing is written, u->puts neither). */
void spool_update_async(struct spool *sp, const struct spool_update *u, spool_done_fn done,
                        void *arg);

/* Moves each of ids[0..n) that is still QUEUED or DEFERRED to next_attempt whens[i], in
 * one transaction (missing, held or failed ones are left alone).  Copies the arrays. */
void spool_reschedule_async(struct spool *sp, const uint64_t *ids, const int64_t *whens, size_t n,
                            spool_done_fn done, void *arg);

/* Sets aside message id, whose envelope does not decode: the original bytes move to the
 * "bad" database (nothing is lost), and a readable HELD envelope without recipients takes
 * their place with why in last_error, so relayctl shows it and the schedule no longer
 * offers it. */
void spool_quarantine_async(struct spool *sp, uint64_t id, const char *why, spool_done_fn done,
                            void *arg);

/* Test hook (fault injection): the next n updates and reschedules fail with SPOOL_EIO as a
 * failing disk would make them.  relayd sets it from RELAYD_TEST_FAIL_UPDATES. */
void spool_fault_updates(struct spool *sp, int n);

/* ---- Reads (any thread) ---- */

#define SPOOL_GET_HISTORY 0x1 /* also load attempts_log */
int spool_msg_get(struct spool *sp, uint64_t id, unsigned flags, struct spool_msg **out);
struct spool_msg *spool_msg_free(struct spool_msg *msg); /* returns NULL */
/* A malloc'd copy of the body in *data (caller frees). */
int spool_body_get(struct spool *sp, uint64_t id, char **data, size_t *len);

/* Up to max ids of QUEUED/DEFERRED messages with next_attempt <= now, oldest first. */
int spool_due(struct spool *sp, int64_t now, uint64_t *ids, size_t max, size_t *n);
/* Calls fn for every message in id order (no history); stops early when fn returns != 0. */
int spool_foreach(struct spool *sp, int (*fn)(const struct spool_msg *msg, void *arg), void *arg);

/* ---- Synchronous writes for relayctl and start-up (one durable commit each) ---- */

/* hold / release (to QUEUED, due now) / retry (due now) / delete. */
int spool_msg_set_state(struct spool *sp, uint64_t id, enum spool_state state);
int spool_msg_retry(struct spool *sp, uint64_t id);
int spool_msg_delete(struct spool *sp, uint64_t id);
/* Deletes every message in state that arrived before arrived_before (unix seconds; 0: any
 * time), in one durable transaction; *removed (may be NULL) gets how many.  relayctl purge. */
int spool_purge(struct spool *sp, enum spool_state state, int64_t arrived_before, size_t *removed);
/* The same, at most max messages (0: all), their ids in ids[] (max entries; may be NULL):
 * the daemon's failed_retention clean-up, one commit per pass, logged by id. */
int spool_purge_ids(struct spool *sp, enum spool_state state, int64_t arrived_before,
                    uint64_t *ids, size_t max, size_t *removed);

/* 0 when a message of len bytes would fit now under max_bytes and reserve_bytes, else
 * SPOOL_EFULL: lets a session refuse early (at MAIL, with SIZE=) instead of after DATA.
 * The writer checks again at commit; this is advice, not a reservation. */
int spool_room(struct spool *sp, uint64_t len);

/* ---- Statistics (relayctl stats, benchmarks) ---- */

struct spool_stats {
    uint64_t messages;        /* messages in the spool */
    uint64_t by_state[5];     /* indexed by enum spool_state (0 unused) */
    uint64_t recipients;      /* recipients still PENDING */
    uint64_t bytes;           /* sum of body sizes */
    int64_t oldest_arrival;   /* unix seconds; 0 when empty */
    uint64_t map_bytes;       /* current LMDB map size */
    uint64_t used_bytes;      /* LMDB pages in use */
    uint64_t commits;         /* writer transactions committed (= fsyncs) by this process */
    uint64_t committed_jobs;  /* puts/updates committed by the writer in this process */
};
/* Fills st from counters kept in meta by every write (O(1); a spool written by an older
 * relayd is counted once when relayd opens it, or scanned by a read-only reader). */
int spool_stats(struct spool *sp, struct spool_stats *st);

/* ---- Bulk operator writes (relayctl) ---- */

/* Makes every QUEUED or DEFERRED message due now (retry --all), in transactions of a few
 * thousand messages each; *n (may be NULL) gets how many. */
int spool_retry_all(struct spool *sp, size_t *n);

/* ---- Devices: every inbound client seen, for "relayctl devices" (spool_devices.c) ----
 *
 * One record per client address in the "devices" sub-database: last HELO name and
 * listener, first and last seen, messages accepted, and refusals by reason with the last
 * one's text and time.  The daemon notes events in memory (spool_device_note(), cheap,
 * any thread); the writer thread folds them into the next batch transaction it commits
 * anyway, or, when no mail arrives, into one transaction of their own at most every
 * SPOOL_DEVICES_FLUSH seconds (and at stop): never an extra fsync per session.  So a
 * crash may lose the last few seconds of device history, never mail.  Bounded: at most
 * SPOOL_DEVICES_MAX records (the least recently seen goes) and SPOOL_DEVICE_REASONS
 * reasons per record. */

#define SPOOL_DEVICES_MAX 10000
#define SPOOL_DEVICE_REASONS 32
#define SPOOL_DEVICES_FLUSH 5 /* seconds a device-only change may wait for a commit */

/* One event about one client.  Strings are copied; NULL helo/listener keep what is known. */
struct spool_device_event {
    const char *client;       /* address, as logged ("10.0.0.7", "2001:db8::7") */
    const char *helo;         /* last HELO/EHLO name, or NULL */
    const char *listener;     /* listener name, or NULL */
    int64_t when;             /* unix seconds */
    uint32_t accepted;        /* messages accepted in this event */
    const char *reason;       /* refusal tag ("auth_needs_tls"), or NULL */
    const char *reason_text;  /* the refusal's log text, or NULL */
};
void spool_device_note(struct spool *sp, const struct spool_device_event *ev);

struct spool_device_reason {
    char *name;
    uint64_t count;
    int64_t last_when;
    char *last_text;
};

struct spool_device {
    char *client, *helo, *listener;
    int64_t first_seen, last_seen;
    uint64_t accepted;
    size_t nreasons;
    struct spool_device_reason *reasons;
};

/* Every device record, most recently seen first (one read transaction); the caller frees
 * with spool_devices_free().  A spool that never had a device gives 0 records. */
int spool_devices_list(struct spool *sp, struct spool_device **out, size_t *n);
void spool_devices_free(struct spool_device *d, size_t n);

/* ---- Upstream state: kept across restarts (spool_state.c) ----
 *
 * What the daemon knows about each upstream at run time (relayd/upstream.h: health, the
 * throttle pause, the rate windows), one record per upstream name in the "state"
 * sub-database, so a restart inside a provider's rate-limit window, or while an upstream
 * is held on a configuration fault, does not start afresh.  Like the device history it
 * is noted in memory (spool_upstate_note(): the latest state per name replaces the one
 * pending) and rides along with the next mail commit, or gets a transaction of its own
 * within SPOOL_STATE_FLUSH seconds (and at stop): never an fsync per message.  All times
 * are wall-clock unix milliseconds. */

#define SPOOL_STATE_FLUSH 1  /* seconds a state change may wait for a commit */
#define SPOOL_STATE_SENT_MAX 100000 /* send times and buckets kept per record, at most */

struct spool_upstate_bucket {
    int64_t minute; /* unix minutes */
    uint32_t count; /* recipients sent in it */
};

struct spool_upstate {
    char *name;              /* the upstream's name: the key */
    int64_t saved;           /* when noted */
    int unhealthy;
    int64_t since;           /* unhealthy since; 0 when healthy */
    char *reason, *action;   /* NULL when none */
    int64_t paused_until;    /* 0: not paused */
    int64_t next_pause;      /* ms: the next throttle pause (its doubling); 0: the first */
    int failed_sessions;     /* the failed-session cohort so far */
    int64_t next_cohort_pause; /* ms; 0: the first */
    int64_t *sent;           /* send times in the last minute, oldest first */
    size_t nsent;
    struct spool_upstate_bucket *buckets; /* recipients per minute, last 24 hours */
    size_t nbuckets;
};

/* Deep-copies st into the pending set (replacing a pending one of the same name). */
void spool_upstate_note(struct spool *sp, const struct spool_upstate *st);
/* The record of upstream name: 0 with *out (spool_upstate_free()), SPOOL_ENOTFOUND, or an
 * error.  A record that does not decode is SPOOL_ENOTFOUND (it is simply not restored). */
int spool_upstate_get(struct spool *sp, const char *name, struct spool_upstate **out);
/* Every record, by name (relayctl upstreams); free with spool_upstate_list_free(). */
int spool_upstate_list(struct spool *sp, struct spool_upstate **out, size_t *n);
void spool_upstate_list_free(struct spool_upstate *list, size_t n);
/* Frees the members (not st itself). */
void spool_upstate_clear(struct spool_upstate *st);
struct spool_upstate *spool_upstate_free(struct spool_upstate *st); /* returns NULL */
/* The record format (tests): encode into a malloc'd buffer; decode 0 or SPOOL_ECORRUPT
 * (then *st holds nothing to free). */
void *spool_upstate_encode(const struct spool_upstate *st, size_t *len);
int spool_upstate_decode(const void *p, size_t len, const char *name, struct spool_upstate *st);

#endif
