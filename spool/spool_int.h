/*
 * spool_int.h - internals shared by spool.c, spool_codec.c and spool_writer.c.
 *
 * Map-size discipline: mdb_env_set_mapsize() needs that no transaction of this process is
 * live (with MDB_NOTLS LMDB cannot check that for read transactions itself).  Every
 * transaction therefore runs with sp->maplock held shared (spool__txn_begin/end), and
 * resizing takes it exclusively.  Nobody takes the lock twice: callbacks never run while
 * a transaction is open.
 */
#ifndef SPOOL_SPOOL_INT_H
#define SPOOL_SPOOL_INT_H

#include <lmdb.h>
#include <pthread.h>
#include <stdint.h>

#include "common/buf.h"
#include "spool/spool.h"

#define SPOOL_SCHEMA 1u
#define SPOOL_REC_VERSION 1
#define SPOOL_MAP_DEFAULT (64ull << 20)

struct spool_job;

struct spool {
    char *dir;
    struct spool_opts opts;
    MDB_env *env;
    MDB_dbi meta, msg, body, sched, attempt;
    MDB_dbi bad;      /* envelopes set aside by spool_quarantine_async() */
    int have_bad;     /* a read-only open of an older spool may not have it */
    int have_counts;  /* meta "counts" is kept (always, once opened for writing) */
    int fail_updates; /* spool_fault_updates(): updates still to fail (writer thread) */
    int unlocked;     /* read-only without lock.mdb (MDB_NOLOCK): reads are validated */

    pthread_rwlock_t maplock; /* shared around every txn, exclusive to resize the map */

    pthread_mutex_t idlock;
    uint64_t last_id;

    /* Writer thread: jobs flow queue -> (one txn) -> done -> spool_writer_reap(). */
    pthread_mutex_t qlock;
    pthread_cond_t qcond;
    pthread_t thread;
    int started, stopping;
    struct spool_job *queue, **queue_tail;
    struct spool_job *done, **done_tail;
    void (*wake)(void *);
    void *wake_arg;
    uint64_t commits, committed_jobs; /* under qlock */

    /* Devices (spool_devices.c): the sub-database, and events not yet committed. */
    MDB_dbi devices;
    int have_devices;               /* 0: a read-only spool without the sub-database */
    pthread_mutex_t devlock;        /* guards devpend; never held with qlock taken after */
    struct spool__devpend *devpend; /* pending events merged per client */
    size_t ndevpend;
    int64_t devpend_since; /* when the oldest pending event was noted */
    /* Upstream state (spool_state.c): the sub-database and records not yet committed
     * (guarded by devlock too). */
    MDB_dbi state;
    int have_state;
    struct spool__statepend *statepend;
    int64_t statepend_since;
};

/* ---- spool.c ---- */
int spool__txn_begin(struct spool *sp, unsigned flags, MDB_txn **txn);
void spool__txn_abort(struct spool *sp, MDB_txn *txn);
int spool__txn_commit(struct spool *sp, MDB_txn *txn);
/* Doubles the map (exclusive lock); call with no transaction open in this thread. */
int spool__map_grow(struct spool *sp);
/* MDB_* / errno -> SPOOL_E*, logging the LMDB text. */
int spool__from_mdb(int rc, const char *what);

/* Operations inside an open write transaction; 0 or a negative code (an MDB_* code,
 * positive, is passed through for MDB_MAP_FULL so the caller can grow and retry). */
int spool__txn_put(struct spool *sp, MDB_txn *txn, const struct spool_msg *m, const char *body,
                   size_t len);
int spool__txn_update(struct spool *sp, MDB_txn *txn, const struct spool_update *u);
int spool__txn_delete(struct spool *sp, MDB_txn *txn, uint64_t id);
int spool__txn_reschedule(struct spool *sp, MDB_txn *txn, uint64_t id, int64_t when);
int spool__txn_quarantine(struct spool *sp, MDB_txn *txn, uint64_t id, const char *why);

/* ---- spool_codec.c ---- */
void spool__be64(unsigned char *p, uint64_t v);
uint64_t spool__get_be64(const unsigned char *p);
void spool__be32(unsigned char *p, uint32_t v);
uint32_t spool__get_be32(const unsigned char *p);
/* sched key: next_attempt (BE, as unsigned; negatives clamp to 0) + id. */
void spool__sched_key(unsigned char k[16], int64_t when, uint64_t id);

/* The pieces every record is made of (DESIGN.md "Records"): a header (u8 version, u32
 * total length), big-endian integers, strings as u32 length + bytes (SPOOL_STR_NULL:
 * NULL).  Readers set bad on a short or malformed record and return 0 / NULL from then on. */
#define SPOOL_STR_NULL 0xFFFFFFFFu
struct spool__rd {
    const unsigned char *p;
    size_t n, off;
    int bad;
};
void spool__rec_start(struct buf *b, unsigned version);
void spool__rec_finish(struct buf *b); /* patches the total length */
void spool__put_u8(struct buf *b, unsigned v);
void spool__put_u32(struct buf *b, uint32_t v);
void spool__put_u64(struct buf *b, uint64_t v);
void spool__put_str(struct buf *b, const char *s);
/* Reads the header of the record p[0..n): version within min..max (into *version) and a
 * length equal to n; 0 or SPOOL_ECORRUPT. */
int spool__rec_header(struct spool__rd *r, const void *p, size_t n, unsigned min, unsigned max,
                      unsigned *version);
unsigned spool__get_u8(struct spool__rd *r);
uint32_t spool__get_u32(struct spool__rd *r);
uint64_t spool__get_u64(struct spool__rd *r);
char *spool__get_str(struct spool__rd *r); /* malloc'd, or NULL */

void spool__encode_msg(const struct spool_msg *m, struct buf *out);
/* Fills *m (zeroed first); strings allocated; on failure *m holds nothing to free. */
int spool__decode_msg(const void *p, size_t n, uint64_t id, struct spool_msg *m);
void spool__encode_attempt(const struct spool_attempt *a, struct buf *out);
int spool__decode_attempt(const void *p, size_t n, struct spool_attempt *a);
/* Frees the members of m (not m itself). */
void spool__msg_clear(struct spool_msg *m);
/* A deep copy (no history). */
struct spool_msg *spool__msg_dup(const struct spool_msg *m);

/* ---- spool_devices.c ---- */
struct spool__devpend;
/* Opens (creates unless read-only) the "devices" sub-database inside open_dbs()'s txn. */
int spool__devices_open(struct spool *sp, MDB_txn *txn, unsigned dflags);
/* Takes every pending event (the caller owns the list; NULL when none). */
struct spool__devpend *spool__devices_take(struct spool *sp);
/* Folds a taken list into the records, inside the writer's transaction; 0 or MDB_* code. */
int spool__devices_apply(struct spool *sp, MDB_txn *txn, const struct spool__devpend *list);
void spool__devices_free(struct spool__devpend *list);

/* ---- spool_state.c ---- */
struct spool__statepend;
int spool__state_open(struct spool *sp, MDB_txn *txn, unsigned dflags);
struct spool__statepend *spool__state_take(struct spool *sp);
int spool__state_apply(struct spool *sp, MDB_txn *txn, const struct spool__statepend *list);
void spool__state_free(struct spool__statepend *list);

/* ---- spool_writer.c ---- */
/* A note (device event, upstream state) became pending with nothing pending before: wakes
 * the writer so that it sleeps no longer than the note's flush deadline.  Without devlock. */
void spool__writer_nudge(struct spool *sp);
void spool__writer_stop(struct spool *sp);

#endif
