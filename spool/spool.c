/*
 * Why one file of this length: every function here runs inside, or opens, an LMDB
 * transaction over the same sub-databases and keeps the same invariants (schedule keys,
 * byte and state counters); the writer thread (spool_writer.c), the record layout
 * (spool_codec.c) and the device history (spool_devices.c) are apart already.
 *
 * spool - the LMDB environment, queue ids, reads and the record-level writes; see spool.h
 * and spool/DESIGN.md.  The writer thread lives in spool_writer.c, the byte layout in
 * spool_codec.c.
 *
 * Invariants kept by every write transaction:
 *  - a message is in "sched" iff its state is QUEUED or DEFERRED, under the key
 *    (next_attempt, id) stored in its envelope;
 *  - meta "bytes" is the sum of the body sizes of all messages;
 *  - meta "last_id" is >= every id ever stored, so ids keep increasing across restarts
 *    even when the newest messages were delivered and deleted.
 *
 * Happy path and failure modes: the map starts at opts->map_bytes and doubles on
 * MDB_MAP_FULL (the transaction is aborted, the map grown with no transaction live in
 * this process, and the whole transaction redone).  MDB_MAP_RESIZED (relayctl or another
 * process grew it) re-adopts the size from the file and retries.  ENOSPC from the disk
 * becomes SPOOL_EFULL so the daemon answers 452; other LMDB errors become SPOOL_EIO and
 * are logged with LMDB's text.
 *
 * Unlocked reads: a read-only open by a user who may read data.mdb but not write lock.mdb
 * (LMDB keeps its reader table there) falls back to MDB_NOLOCK.  Such a reader is
 * invisible to the writer, which may then recycle pages the reader still walks.  LMDB
 * recycles a page only once no reader can see it, judged by the oldest registered reader;
 * with none registered, pages of snapshot S are freed at the earliest by commit S+1 and
 * reused at the earliest by transaction S+3 (the freeing transaction's own id must be below
 * the oldest snapshot, S+2, before its pages are taken).  So every unlocked read is checked
 * afterwards (read_end): if more than one commit happened since its snapshot, its result
 * is thrown away and the read redone.  XXX After READ_TRIES redos (seconds of constant
 * commits) the last result is returned as it is; a torn read never writes anything.
 */
#include "spool/spool.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/time.h>
#include <time.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "spool/spool_int.h"

#define RETRY_MAX 40       /* MAP_FULL/MAP_RESIZED retries: 2^40 times the map is enough */
#define READ_AGAIN (-3999) /* internal: an unlocked read overlapped commits; redo it */
#define READ_TRIES 200

const char *spool_strerror(int rc)
{
    switch (rc) {
    case 0:
        return "success";
    case SPOOL_ENOTFOUND:
        return "no such message";
    case SPOOL_EFULL:
        return "spool full";
    case SPOOL_EVERSION:
        return "unknown spool schema version";
    case SPOOL_ECORRUPT:
        return "corrupt spool record";
    case SPOOL_EIO:
        return "spool I/O error";
    case SPOOL_ECLOSED:
        return "spool writer stopped";
    default:
        if (rc < 0 && rc > -4096)
            return strerror(-rc);
        return "unknown spool error";
    }
}

static const char *const state_names[] = {
    [SPOOL_QUEUED] = "queued",
    [SPOOL_DEFERRED] = "deferred",
    [SPOOL_HELD] = "held",
    [SPOOL_FAILED] = "failed",
};

const char *spool_state_name(enum spool_state st)
{
    if (st < SPOOL_QUEUED || st > SPOOL_FAILED)
        return "unknown";
    return state_names[st];
}

int spool_state_parse(const char *name)
{
    for (int i = SPOOL_QUEUED; i <= SPOOL_FAILED; i++)
        if (name != NULL && strcasecmp(name, state_names[i]) == 0)
            return i;
    return -1;
}

static int is_scheduled(enum spool_state st)
{
    return st == SPOOL_QUEUED || st == SPOOL_DEFERRED;
}

int spool__from_mdb(int rc, const char *what)
{
    if (rc == 0 || (rc <= SPOOL_ENOTFOUND && rc >= SPOOL_ECLOSED))
        return rc;
    if (rc == MDB_NOTFOUND)
        return SPOOL_ENOTFOUND;
    if (rc == ENOSPC || rc == -ENOSPC || rc == MDB_MAP_FULL) {
        log_error("spool: %s: %s", what, rc == MDB_MAP_FULL ? mdb_strerror(rc) : strerror(ENOSPC));
        return SPOOL_EFULL;
    }
    if (rc < 0 && rc > -4096) /* already -errno from our own checks */
        return rc;
    log_error("spool: %s: %s", what, mdb_strerror(rc));
    if (rc == MDB_CORRUPTED || rc == MDB_PAGE_NOTFOUND || rc == MDB_INVALID ||
        rc == MDB_VERSION_MISMATCH || rc == MDB_INCOMPATIBLE)
        return SPOOL_ECORRUPT;
    return SPOOL_EIO;
}

/* ---- transactions and the map ---- */

static int map_set(struct spool *sp, size_t size)
{
    int rc;

    pthread_rwlock_wrlock(&sp->maplock);
    rc = mdb_env_set_mapsize(sp->env, size);
    pthread_rwlock_unlock(&sp->maplock);
    return rc;
}

int spool__map_grow(struct spool *sp)
{
    MDB_envinfo info;
    int rc;

    pthread_rwlock_wrlock(&sp->maplock);
    /* Another thread may have grown it while we waited; doubling again is harmless. */
    mdb_env_info(sp->env, &info);
    rc = mdb_env_set_mapsize(sp->env, info.me_mapsize * 2);
    pthread_rwlock_unlock(&sp->maplock);
    if (rc == 0)
        log_info("spool: map grown to %zu MiB", info.me_mapsize * 2 >> 20);
    return rc;
}

int spool__txn_begin(struct spool *sp, unsigned flags, MDB_txn **txn)
{
    int rc;

    for (int i = 0; i < RETRY_MAX; i++) {
        pthread_rwlock_rdlock(&sp->maplock);
        rc = mdb_txn_begin(sp->env, NULL, flags, txn);
        if (rc == 0)
            return 0;
        pthread_rwlock_unlock(&sp->maplock);
        if (rc != MDB_MAP_RESIZED)
            return rc;
        /* Another process grew the map: adopt the size recorded in the file. */
        if ((rc = map_set(sp, 0)) != 0)
            return rc;
    }
    return MDB_MAP_RESIZED;
}

void spool__txn_abort(struct spool *sp, MDB_txn *txn)
{
    mdb_txn_abort(txn);
    pthread_rwlock_unlock(&sp->maplock);
}

int spool__txn_commit(struct spool *sp, MDB_txn *txn)
{
    int rc = mdb_txn_commit(txn); /* frees txn, even on failure */

    pthread_rwlock_unlock(&sp->maplock);
    return rc;
}

/* Ends a read transaction: 0, or READ_AGAIN when an unlocked read may have seen recycled
 * pages (see the file header). */
static int read_end(struct spool *sp, MDB_txn *txn)
{
    MDB_envinfo info;
    size_t snap;

    if (!sp->unlocked) {
        spool__txn_abort(sp, txn);
        return 0;
    }
    snap = mdb_txn_id(txn);
    spool__txn_abort(sp, txn);
    mdb_env_info(sp->env, &info);
    return info.me_last_txnid > snap + 1 ? READ_AGAIN : 0;
}

/* A short, growing pause before an unlocked read is redone. */
static void read_pause(int tries)
{
    struct timespec ts = {0, (long)(tries < 20 ? tries + 1 : 20) * 1000000L};

    nanosleep(&ts, NULL);
}

static int get_u64(struct spool *sp, MDB_txn *txn, const char *name, uint64_t *v)
{
    MDB_val k = {strlen(name), (void *)name}, d;
    int rc;

    *v = 0;
    if ((rc = mdb_get(txn, sp->meta, &k, &d)) != 0)
        return rc == MDB_NOTFOUND ? 0 : rc;
    if (d.mv_size != 8)
        return SPOOL_ECORRUPT;
    *v = spool__get_be64(d.mv_data);
    return 0;
}

static int put_u64(struct spool *sp, MDB_txn *txn, const char *name, uint64_t v)
{
    unsigned char b[8];
    MDB_val k = {strlen(name), (void *)name}, d = {8, b};

    spool__be64(b, v);
    return mdb_put(txn, sp->meta, &k, &d, 0);
}

/* ---- counters (meta "counts": what spool_stats() reports without a scan) ---- */

enum { CNT_MESSAGES, CNT_STATE0, CNT_PENDING = CNT_STATE0 + 5, CNT_N };

static int counts_get(struct spool *sp, MDB_txn *txn, uint64_t c[CNT_N])
{
    MDB_val k = {6, "counts"}, d;
    int rc;

    memset(c, 0, sizeof(uint64_t) * CNT_N);
    if ((rc = mdb_get(txn, sp->meta, &k, &d)) != 0)
        return rc;
    if (d.mv_size != 8 * CNT_N)
        return SPOOL_ECORRUPT;
    for (int i = 0; i < CNT_N; i++)
        c[i] = spool__get_be64((unsigned char *)d.mv_data + 8 * i);
    return 0;
}

static int counts_put(struct spool *sp, MDB_txn *txn, const uint64_t c[CNT_N])
{
    unsigned char b[8 * CNT_N];
    MDB_val k = {6, "counts"}, d = {sizeof b, b};

    for (int i = 0; i < CNT_N; i++)
        spool__be64(b + 8 * i, c[i]);
    return mdb_put(txn, sp->meta, &k, &d, 0);
}

static void counts_of(const struct spool_msg *m, int64_t sign, int64_t delta[CNT_N])
{
    delta[CNT_MESSAGES] += sign;
    if (m->state >= SPOOL_QUEUED && m->state <= SPOOL_FAILED)
        delta[CNT_STATE0 + m->state] += sign;
    for (size_t i = 0; i < m->nrcpts; i++)
        delta[CNT_PENDING] += sign * (m->rcpts[i].status == SPOOL_RCPT_PENDING);
}

/* The counters move from what before counted to what after counts (either may be NULL:
 * a new or a removed message), in the same transaction as the change itself. */
static int counts_move(struct spool *sp, MDB_txn *txn, const struct spool_msg *before,
                       const struct spool_msg *after)
{
    int64_t delta[CNT_N] = {0};
    uint64_t c[CNT_N];
    int rc;

    if (!sp->have_counts)
        return 0;
    if (before != NULL)
        counts_of(before, -1, delta);
    if (after != NULL)
        counts_of(after, 1, delta);
    if (memcmp(delta, (int64_t[CNT_N]){0}, sizeof delta) == 0)
        return 0; /* a new due time only (parking, retry): nothing to count */
    if ((rc = counts_get(sp, txn, c)) != 0 && rc != MDB_NOTFOUND)
        return rc;
    for (int i = 0; i < CNT_N; i++)
        c[i] = (int64_t)c[i] + delta[i] < 0 ? 0 : (uint64_t)((int64_t)c[i] + delta[i]);
    return counts_put(sp, txn, c);
}

/* Counts every message into c (one scan; an unreadable record counts as a message only). */
static int counts_scan(struct spool *sp, MDB_txn *txn, uint64_t c[CNT_N])
{
    int64_t delta[CNT_N] = {0};
    MDB_cursor *cur;
    MDB_val k, d;
    int rc, op = MDB_FIRST;

    if ((rc = mdb_cursor_open(txn, sp->msg, &cur)) != 0)
        return rc;
    while ((rc = mdb_cursor_get(cur, &k, &d, op)) == 0) {
        struct spool_msg m;

        op = MDB_NEXT;
        if (spool__decode_msg(d.mv_data, d.mv_size, 0, &m) != 0) {
            delta[CNT_MESSAGES]++; /* unreadable: counted as a message only */
            continue;
        }
        counts_of(&m, 1, delta);
        spool__msg_clear(&m);
    }
    mdb_cursor_close(cur);
    if (rc != MDB_NOTFOUND)
        return rc;
    for (int i = 0; i < CNT_N; i++)
        c[i] = (uint64_t)delta[i];
    return 0;
}

/* Counts every message again and stores the counters (a spool from before the counters,
 * or after a quarantine). */
static int counts_rebuild(struct spool *sp, MDB_txn *txn)
{
    uint64_t c[CNT_N];
    int rc;

    if ((rc = counts_scan(sp, txn, c)) != 0)
        return rc;
    return counts_put(sp, txn, c);
}

/* ---- open / close ---- */

static int open_dbs(struct spool *sp, char *err, size_t errlen)
{
    unsigned dflags = sp->opts.readonly ? 0 : MDB_CREATE;
    MDB_txn *txn;
    MDB_val k = {6, "schema"}, d;
    uint64_t last;
    unsigned char sv[4];
    MDB_cursor *cur;
    int rc;

    if ((rc = spool__txn_begin(sp, sp->opts.readonly ? MDB_RDONLY : 0, &txn)) != 0)
        goto fail;
    if ((rc = mdb_dbi_open(txn, "meta", dflags, &sp->meta)) != 0)
        goto missing;
    /* Check the schema before touching anything else, so a newer spool stays untouched. */
    rc = mdb_get(txn, sp->meta, &k, &d);
    if (rc == 0) {
        uint32_t v = d.mv_size == 4 ? spool__get_be32(d.mv_data) : 0;

        if (v != SPOOL_SCHEMA) {
            snprintf(err, errlen, "spool %s has schema version %u; this relayd understands %u",
                     sp->dir, v, SPOOL_SCHEMA);
            rc = SPOOL_EVERSION;
            goto txn_abort;
        }
    } else if (rc == MDB_NOTFOUND && !sp->opts.readonly) {
        spool__be32(sv, SPOOL_SCHEMA);
        d.mv_size = 4;
        d.mv_data = sv;
        if ((rc = mdb_put(txn, sp->meta, &k, &d, MDB_NOOVERWRITE)) != 0)
            goto mdb_fail;
    } else {
        goto missing;
    }
    if ((rc = mdb_dbi_open(txn, "msg", dflags, &sp->msg)) != 0 ||
        (rc = mdb_dbi_open(txn, "body", dflags, &sp->body)) != 0 ||
        (rc = mdb_dbi_open(txn, "sched", dflags, &sp->sched)) != 0 ||
        (rc = mdb_dbi_open(txn, "attempt", dflags, &sp->attempt)) != 0)
        goto missing;
    sp->have_bad = mdb_dbi_open(txn, "bad", dflags, &sp->bad) == 0;
    if (!sp->opts.readonly) {
        uint64_t c[CNT_N];

        /* A spool from before the counters is counted once, now. */
        if ((rc = counts_get(sp, txn, c)) == MDB_NOTFOUND)
            rc = counts_rebuild(sp, txn);
        if (rc != 0)
            goto mdb_fail;
        sp->have_counts = 1;
    } else {
        uint64_t c[CNT_N];

        sp->have_counts = counts_get(sp, txn, c) == 0;
    }
    if ((rc = spool__devices_open(sp, txn, dflags)) != 0)
        goto mdb_fail;
    if ((rc = spool__state_open(sp, txn, dflags)) != 0)
        goto mdb_fail;
    if ((rc = get_u64(sp, txn, "last_id", &last)) != 0)
        goto mdb_fail;
    if ((rc = mdb_cursor_open(txn, sp->msg, &cur)) != 0)
        goto mdb_fail;
    if (mdb_cursor_get(cur, &k, &d, MDB_LAST) == 0 && k.mv_size == 8 &&
        spool__get_be64(k.mv_data) > last)
        last = spool__get_be64(k.mv_data);
    mdb_cursor_close(cur);
    sp->last_id = last;
    /* Committing a read-only txn is what makes its dbi handles usable afterwards. */
    if ((rc = spool__txn_commit(sp, txn)) != 0)
        goto fail;
    return 0;
missing:
    if (rc == MDB_NOTFOUND) {
        snprintf(err, errlen, "spool %s: not a relayd spool (no %s database)", sp->dir,
                 sp->opts.readonly ? "initialised" : "meta");
        rc = SPOOL_ECORRUPT;
        goto txn_abort;
    }
mdb_fail:
    snprintf(err, errlen, "spool %s: %s", sp->dir,
             rc < 0 && rc > -4096   ? strerror(-rc)
             : rc == SPOOL_ECORRUPT ? "corrupt meta record"
                                    : mdb_strerror(rc));
    rc = rc == SPOOL_ECORRUPT ? rc : SPOOL_EIO;
txn_abort:
    spool__txn_abort(sp, txn);
    return rc;
fail:
    snprintf(err, errlen, "spool %s: %s", sp->dir, mdb_strerror(rc));
    return SPOOL_EIO;
}

static void spool_free(struct spool *sp)
{
    if (sp->env != NULL)
        mdb_env_close(sp->env);
    pthread_rwlock_destroy(&sp->maplock);
    pthread_mutex_destroy(&sp->idlock);
    pthread_mutex_destroy(&sp->qlock);
    pthread_cond_destroy(&sp->qcond);
    spool__devices_free(sp->devpend);
    spool__state_free(sp->statepend);
    pthread_mutex_destroy(&sp->devlock);
    free(sp->dir);
    free(sp);
}

int spool_open(const char *dir, const struct spool_opts *opts, struct spool **out, char *err,
               size_t errlen)
{
    struct spool *sp = xcalloc(1, sizeof(*sp));
    pthread_rwlockattr_t ra;
    unsigned flags = MDB_NOTLS;
    MDB_envinfo info;
    size_t want;
    int rc;

    *out = NULL;
    if (errlen > 0)
        err[0] = '\0';
    sp->dir = xstrdup(dir);
    if (opts != NULL)
        sp->opts = *opts;
    pthread_rwlockattr_init(&ra);
    /* Writer preference: a map resize must not starve behind a stream of readers. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&sp->maplock, &ra);
    pthread_rwlockattr_destroy(&ra);
    pthread_mutex_init(&sp->idlock, NULL);
    pthread_mutex_init(&sp->qlock, NULL);
    pthread_cond_init(&sp->qcond, NULL);
    pthread_mutex_init(&sp->devlock, NULL);
    sp->queue_tail = &sp->queue;
    sp->done_tail = &sp->done;

    if (!sp->opts.readonly && mkdir(dir, 0700) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "spool %s: cannot create: %s", dir, strerror(errno));
        rc = -errno;
        goto fail;
    }
    if ((rc = mdb_env_create(&sp->env)) != 0)
        goto mdb_fail;
    if ((rc = mdb_env_set_maxdbs(sp->env, 8)) != 0)
        goto mdb_fail;
    /* Many sessions may read at once (each read is short, but on any thread). */
    if ((rc = mdb_env_set_maxreaders(sp->env, 254)) != 0)
        goto mdb_fail;
    if (sp->opts.readonly)
        flags |= MDB_RDONLY;
    if (sp->opts.unsafe_nosync)
        flags |= MDB_NOSYNC | MDB_NOMETASYNC;
    rc = mdb_env_open(sp->env, dir, flags, 0600);
    if (rc == EACCES && sp->opts.readonly) {
        /* data.mdb may be readable while lock.mdb is not writable: read unlocked. */
        mdb_env_close(sp->env);
        sp->env = NULL;
        if ((rc = mdb_env_create(&sp->env)) != 0 || (rc = mdb_env_set_maxdbs(sp->env, 8)) != 0)
            goto mdb_fail;
        if ((rc = mdb_env_open(sp->env, dir, flags | MDB_NOLOCK, 0600)) == 0)
            sp->unlocked = 1;
    }
    if (rc != 0)
        goto mdb_fail;
    /* Set the size after open so an existing larger map (from the file) is kept. */
    want = sp->opts.map_bytes ? sp->opts.map_bytes : SPOOL_MAP_DEFAULT;
    mdb_env_info(sp->env, &info);
    if (!sp->opts.readonly && info.me_mapsize < want &&
        (rc = mdb_env_set_mapsize(sp->env, want)) != 0)
        goto mdb_fail;
    if ((rc = open_dbs(sp, err, errlen)) != 0)
        goto fail;
    *out = sp;
    return 0;
mdb_fail:
    snprintf(err, errlen, "spool %s: %s", dir, mdb_strerror(rc));
    rc = rc == ENOENT ? -ENOENT : rc == EACCES ? -EACCES : SPOOL_EIO;
fail:
    spool_free(sp);
    return rc;
}

void spool_close(struct spool *sp)
{
    if (sp == NULL)
        return;
    spool__writer_stop(sp);
    spool_free(sp);
}

/* ---- queue ids ---- */

uint64_t spool_id_new(struct spool *sp)
{
    struct timeval tv;
    uint64_t ms, id;

    gettimeofday(&tv, NULL);
    ms = (uint64_t)tv.tv_sec * 1000 + (uint64_t)tv.tv_usec / 1000;
    pthread_mutex_lock(&sp->idlock);
    /* More than one message per millisecond (or a clock step back) borrows from the
     * future; the ids stay unique and sorted by arrival. */
    id = ms > sp->last_id ? ms : sp->last_id + 1;
    sp->last_id = id;
    pthread_mutex_unlock(&sp->idlock);
    return id;
}

char *spool_id_str(uint64_t id, char out[17])
{
    snprintf(out, 17, "%012llX", (unsigned long long)id);
    return out;
}

int spool_id_parse(const char *text, uint64_t *id)
{
    uint64_t v = 0;
    size_t n = 0;

    if (text == NULL)
        return -EINVAL;
    for (; text[n] != '\0'; n++) {
        int c = text[n], d;

        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -EINVAL;
        if (n >= 16)
            return -EINVAL;
        v = (v << 4) | (uint64_t)d;
    }
    if (n == 0 || v == 0)
        return -EINVAL;
    *id = v;
    return 0;
}

/* ---- reads ---- */

static void id_key(unsigned char k[8], MDB_val *key, uint64_t id)
{
    spool__be64(k, id);
    key->mv_size = 8;
    key->mv_data = k;
}

static int load_history(struct spool *sp, MDB_txn *txn, struct spool_msg *m)
{
    unsigned char kb[12];
    MDB_val k = {12, kb}, d;
    MDB_cursor *cur;
    size_t cap = 0;
    int rc, op = MDB_SET_RANGE;

    spool__be64(kb, m->id);
    spool__be32(kb + 8, 0);
    if ((rc = mdb_cursor_open(txn, sp->attempt, &cur)) != 0)
        return rc;
    while ((rc = mdb_cursor_get(cur, &k, &d, op)) == 0) {
        op = MDB_NEXT;
        if (k.mv_size != 12 || spool__get_be64(k.mv_data) != m->id)
            break;
        if (m->nattempts_log == cap) {
            cap = cap ? cap * 2 : 8;
            m->attempts_log = xrealloc(m->attempts_log, cap * sizeof(*m->attempts_log));
        }
        if ((rc = spool__decode_attempt(d.mv_data, d.mv_size,
                                        &m->attempts_log[m->nattempts_log])) != 0)
            break;
        m->nattempts_log++;
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND || rc == 0 ? 0 : rc;
}

/* Decodes the envelope of id inside txn into *m. */
static int msg_load(struct spool *sp, MDB_txn *txn, uint64_t id, struct spool_msg *m)
{
    unsigned char kb[8];
    MDB_val k, d;
    int rc;

    id_key(kb, &k, id);
    if ((rc = mdb_get(txn, sp->msg, &k, &d)) != 0)
        return rc;
    return spool__decode_msg(d.mv_data, d.mv_size, id, m);
}

int spool_msg_get(struct spool *sp, uint64_t id, unsigned flags, struct spool_msg **out)
{
    struct spool_msg *m = xcalloc(1, sizeof(*m));
    MDB_txn *txn;
    int rc;

    *out = NULL;
    for (int tries = 0;; tries++) {
        if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
            goto fail;
        if ((rc = msg_load(sp, txn, id, m)) == 0 && (flags & SPOOL_GET_HISTORY))
            rc = load_history(sp, txn, m);
        if (read_end(sp, txn) != READ_AGAIN || tries == READ_TRIES)
            break;
        spool__msg_clear(m);
        read_pause(tries);
    }
    if (rc != 0)
        goto fail;
    *out = m;
    return 0;
fail:
    spool_msg_free(m);
    return spool__from_mdb(rc, "read message");
}

struct spool_msg *spool_msg_free(struct spool_msg *msg)
{
    if (msg != NULL) {
        spool__msg_clear(msg);
        free(msg);
    }
    return NULL;
}

int spool_body_get(struct spool *sp, uint64_t id, char **data, size_t *len)
{
    unsigned char kb[8];
    MDB_val k, d;
    MDB_txn *txn;
    int rc;

    for (int tries = 0;; tries++) {
        *data = NULL;
        *len = 0;
        if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
            return spool__from_mdb(rc, "read body");
        id_key(kb, &k, id);
        if ((rc = mdb_get(txn, sp->body, &k, &d)) == 0) {
            *data = xmalloc(d.mv_size + 1);
            memcpy(*data, d.mv_data, d.mv_size);
            (*data)[d.mv_size] = '\0'; /* a safety net for callers that parse headers */
            *len = d.mv_size;
        }
        if (read_end(sp, txn) != READ_AGAIN || tries == READ_TRIES)
            break;
        free(*data);
        read_pause(tries);
    }
    if (rc != 0) {
        free(*data);
        *data = NULL;
        *len = 0;
    }
    return spool__from_mdb(rc, "read body");
}

int spool_due(struct spool *sp, int64_t now, uint64_t *ids, size_t max, size_t *n)
{
    MDB_cursor *cur;
    MDB_txn *txn;
    MDB_val k, d;
    int rc, op = MDB_FIRST;

    for (int tries = 0;; tries++, read_pause(tries)) {
        *n = 0;
        op = MDB_FIRST;
        if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
            return spool__from_mdb(rc, "scan schedule");
        if ((rc = mdb_cursor_open(txn, sp->sched, &cur)) != 0)
            goto txn_end;
        while (*n < max && (rc = mdb_cursor_get(cur, &k, &d, op)) == 0) {
            op = MDB_NEXT;
            if (k.mv_size != 16) {
                rc = SPOOL_ECORRUPT;
                break;
            }
            if ((int64_t)spool__get_be64(k.mv_data) > now)
                break;
            ids[(*n)++] = spool__get_be64((unsigned char *)k.mv_data + 8);
        }
        if (rc == MDB_NOTFOUND)
            rc = 0;
        mdb_cursor_close(cur);
    txn_end:
        if (read_end(sp, txn) != READ_AGAIN || tries == READ_TRIES)
            break;
    }
    return spool__from_mdb(rc, "scan schedule");
}

#define FOREACH_CHUNK 256

int spool_foreach(struct spool *sp, int (*fn)(const struct spool_msg *msg, void *arg), void *arg)
{
    struct spool_msg *chunk = xcalloc(FOREACH_CHUNK, sizeof(*chunk));
    uint64_t next = 0;
    int rc = 0, stop = 0, more = 1, tries = 0;

    /* Read in chunks and call fn outside the transaction: fn may then call into the
     * spool (even write), and a slow fn does not pin old pages for long. */
    while (more && !stop && rc == 0) {
        unsigned char kb[8];
        MDB_cursor *cur;
        MDB_txn *txn;
        MDB_val k, d;
        size_t n = 0;
        uint64_t chunk_start = next;

        if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
            break;
        if ((rc = mdb_cursor_open(txn, sp->msg, &cur)) != 0) {
            spool__txn_abort(sp, txn);
            break;
        }
        id_key(kb, &k, next);
        for (int op = MDB_SET_RANGE; n < FOREACH_CHUNK; op = MDB_NEXT) {
            if ((rc = mdb_cursor_get(cur, &k, &d, op)) != 0)
                break;
            if (k.mv_size != 8) {
                rc = SPOOL_ECORRUPT;
                break;
            }
            rc = spool__decode_msg(d.mv_data, d.mv_size, spool__get_be64(k.mv_data), &chunk[n]);
            if (rc != 0)
                break;
            next = chunk[n].id + 1;
            n++;
        }
        mdb_cursor_close(cur);
        if (read_end(sp, txn) == READ_AGAIN && tries++ < READ_TRIES) {
            /* Redo this chunk from its start. */
            for (size_t i = 0; i < n; i++)
                spool__msg_clear(&chunk[i]);
            next = chunk_start;
            rc = 0;
            read_pause(tries);
            continue;
        }
        if (rc == MDB_NOTFOUND) {
            rc = 0;
            more = 0;
        }
        for (size_t i = 0; i < n; i++) {
            if (!stop && rc == 0 && fn(&chunk[i], arg) != 0)
                stop = 1;
            spool__msg_clear(&chunk[i]);
        }
    }
    free(chunk);
    return spool__from_mdb(rc, "scan messages");
}

int spool_stats(struct spool *sp, struct spool_stats *st)
{
    MDB_envinfo info;
    MDB_stat ms;
    MDB_cursor *cur;
    MDB_txn *txn;
    MDB_val k, d;
    uint64_t c[CNT_N];
    int rc, tries = 0;

again:
    memset(st, 0, sizeof(*st));
    if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
        return spool__from_mdb(rc, "stats");
    mdb_env_info(sp->env, &info);
    mdb_env_stat(sp->env, &ms);
    st->map_bytes = info.me_mapsize;
    st->used_bytes = (uint64_t)(info.me_last_pgno + 1) * ms.ms_psize;
    if ((rc = get_u64(sp, txn, "bytes", &st->bytes)) != 0)
        goto txn_end;
    /* A read-only reader of a spool from before the counters counts for itself. */
    if ((!sp->have_counts || counts_get(sp, txn, c) != 0) && (rc = counts_scan(sp, txn, c)) != 0)
        goto txn_end;
    st->messages = c[CNT_MESSAGES];
    for (int i = SPOOL_QUEUED; i <= SPOOL_FAILED; i++)
        st->by_state[i] = c[CNT_STATE0 + i];
    st->recipients = c[CNT_PENDING];
    /* Ids are arrival times: the first message is the oldest. */
    if ((rc = mdb_cursor_open(txn, sp->msg, &cur)) != 0)
        goto txn_end;
    if ((rc = mdb_cursor_get(cur, &k, &d, MDB_FIRST)) == 0) {
        struct spool_msg m;

        if (spool__decode_msg(d.mv_data, d.mv_size, 0, &m) == 0) {
            st->oldest_arrival = m.arrived;
            spool__msg_clear(&m);
        } else if (k.mv_size == 8) {
            st->oldest_arrival = (int64_t)(spool__get_be64(k.mv_data) / 1000);
        }
    }
    if (rc == MDB_NOTFOUND)
        rc = 0;
    mdb_cursor_close(cur);
txn_end:
    if (read_end(sp, txn) == READ_AGAIN && tries++ < READ_TRIES) {
        read_pause(tries);
        goto again;
    }
    pthread_mutex_lock(&sp->qlock);
    st->commits = sp->commits;
    st->committed_jobs = sp->committed_jobs;
    pthread_mutex_unlock(&sp->qlock);
    return spool__from_mdb(rc, "stats");
}

/* ---- record-level writes, inside a write transaction ---- */

static int sched_del(struct spool *sp, MDB_txn *txn, const struct spool_msg *m)
{
    unsigned char kb[16];
    MDB_val k = {16, kb};
    int rc;

    if (!is_scheduled(m->state))
        return 0;
    spool__sched_key(kb, m->next_attempt, m->id);
    rc = mdb_del(txn, sp->sched, &k, NULL);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

static int sched_add(struct spool *sp, MDB_txn *txn, const struct spool_msg *m)
{
    unsigned char kb[16];
    MDB_val k = {16, kb}, d = {0, ""};

    if (!is_scheduled(m->state))
        return 0;
    spool__sched_key(kb, m->next_attempt, m->id);
    return mdb_put(txn, sp->sched, &k, &d, 0);
}

static int msg_store(struct spool *sp, MDB_txn *txn, const struct spool_msg *m, unsigned flags)
{
    struct buf *b = buf_new(0);
    unsigned char kb[8];
    MDB_val k, d;
    int rc;

    spool__encode_msg(m, b);
    id_key(kb, &k, m->id);
    d.mv_size = b->len;
    d.mv_data = b->data;
    rc = mdb_put(txn, sp->msg, &k, &d, flags);
    buf_free(b);
    return rc;
}

static int check_room(struct spool *sp, MDB_txn *txn, size_t len)
{
    uint64_t bytes;
    struct statvfs vfs;
    int rc;

    if (sp->opts.max_bytes != 0) {
        if ((rc = get_u64(sp, txn, "bytes", &bytes)) != 0)
            return rc;
        if (bytes + len > sp->opts.max_bytes)
            return SPOOL_EFULL;
    }
    if (sp->opts.reserve_bytes != 0 && statvfs(sp->dir, &vfs) == 0 &&
        (uint64_t)vfs.f_bavail * vfs.f_frsize < sp->opts.reserve_bytes + len)
        return SPOOL_EFULL;
    return 0;
}

int spool__txn_put(struct spool *sp, MDB_txn *txn, const struct spool_msg *m, const char *body,
                   size_t len)
{
    struct spool_msg copy = *m;
    unsigned char kb[8];
    MDB_val k, d = {len, (void *)body};
    uint64_t bytes, last;
    int rc;

    if (m->id == 0)
        return -EINVAL;
    if ((rc = check_room(sp, txn, len)) != 0)
        return rc;
    copy.size = len;
    copy.attempts_log = NULL;
    copy.nattempts_log = 0;
    if ((rc = msg_store(sp, txn, &copy, MDB_NOOVERWRITE)) != 0)
        return rc == MDB_KEYEXIST ? -EEXIST : rc;
    id_key(kb, &k, m->id);
    if ((rc = mdb_put(txn, sp->body, &k, &d, 0)) != 0)
        return rc;
    if ((rc = sched_add(sp, txn, &copy)) != 0)
        return rc;
    if ((rc = get_u64(sp, txn, "bytes", &bytes)) != 0 ||
        (rc = put_u64(sp, txn, "bytes", bytes + len)) != 0)
        return rc;
    if ((rc = get_u64(sp, txn, "last_id", &last)) != 0)
        return rc;
    if (m->id > last && (rc = put_u64(sp, txn, "last_id", m->id)) != 0)
        return rc;
    return counts_move(sp, txn, NULL, &copy);
}

/* Removes every record of the message whose envelope is m. */
static int msg_remove(struct spool *sp, MDB_txn *txn, const struct spool_msg *m)
{
    unsigned char kb[12];
    MDB_val k, d;
    MDB_cursor *cur;
    uint64_t bytes;
    int rc;

    id_key(kb, &k, m->id);
    if ((rc = mdb_del(txn, sp->msg, &k, NULL)) != 0)
        return rc;
    if ((rc = mdb_del(txn, sp->body, &k, NULL)) != 0 && rc != MDB_NOTFOUND)
        return rc;
    if ((rc = sched_del(sp, txn, m)) != 0)
        return rc;
    if ((rc = get_u64(sp, txn, "bytes", &bytes)) != 0 ||
        (rc = put_u64(sp, txn, "bytes", bytes > m->size ? bytes - m->size : 0)) != 0)
        return rc;
    if ((rc = counts_move(sp, txn, m, NULL)) != 0)
        return rc;
    if ((rc = mdb_cursor_open(txn, sp->attempt, &cur)) != 0)
        return rc;
    for (;;) {
        /* Seek afresh after each delete rather than rely on where the cursor is left. */
        spool__be64(kb, m->id);
        spool__be32(kb + 8, 0);
        k.mv_size = 12;
        k.mv_data = kb;
        rc = mdb_cursor_get(cur, &k, &d, MDB_SET_RANGE);
        if (rc != 0 || k.mv_size != 12 || spool__get_be64(k.mv_data) != m->id)
            break;
        if ((rc = mdb_cursor_del(cur, 0)) != 0)
            break;
    }
    mdb_cursor_close(cur);
    return rc == MDB_NOTFOUND ? 0 : rc;
}

int spool__txn_delete(struct spool *sp, MDB_txn *txn, uint64_t id)
{
    struct spool_msg m;
    int rc;

    if ((rc = msg_load(sp, txn, id, &m)) != 0)
        return rc;
    rc = msg_remove(sp, txn, &m);
    spool__msg_clear(&m);
    return rc;
}

static int attempt_append(struct spool *sp, MDB_txn *txn, uint64_t id, const char *upstream,
                          const char *result)
{
    struct spool_attempt a = {time(NULL), (char *)upstream, (char *)result};
    unsigned char kb[12];
    MDB_val k = {12, kb}, d;
    MDB_cursor *cur;
    uint32_t seq = 0;
    struct buf *b;
    int rc;

    /* The next sequence number: one past the last record of this id. */
    if ((rc = mdb_cursor_open(txn, sp->attempt, &cur)) != 0)
        return rc;
    spool__be64(kb, id + 1);
    spool__be32(kb + 8, 0);
    rc = mdb_cursor_get(cur, &k, &d, MDB_SET_RANGE);
    rc = mdb_cursor_get(cur, &k, &d, rc == 0 ? MDB_PREV : MDB_LAST);
    if (rc == 0 && k.mv_size == 12 && spool__get_be64(k.mv_data) == id)
        seq = spool__get_be32((unsigned char *)k.mv_data + 8) + 1;
    mdb_cursor_close(cur);
    if (rc != 0 && rc != MDB_NOTFOUND)
        return rc;
    b = buf_new(0);
    spool__encode_attempt(&a, b);
    spool__be64(kb, id);
    spool__be32(kb + 8, seq);
    k.mv_size = 12;
    k.mv_data = kb;
    d.mv_size = b->len;
    d.mv_data = b->data;
    rc = mdb_put(txn, sp->attempt, &k, &d, 0);
    buf_free(b);
    return rc;
}

/* Stores m, which txn loaded and the caller changed: before is what was stored (state,
 * next_attempt, recipient statuses).  m gets state and next_attempt (QUEUED/DEFERRED
 * only), its schedule key and the counters move along: the one way a stored envelope
 * changes. */
static int msg_change(struct spool *sp, MDB_txn *txn, struct spool_msg *m,
                      const struct spool_msg *before, enum spool_state state, int64_t next_attempt)
{
    int rc;

    if ((rc = sched_del(sp, txn, before)) != 0)
        return rc;
    m->state = state;
    m->next_attempt = is_scheduled(state) ? next_attempt : 0;
    if ((rc = sched_add(sp, txn, m)) != 0)
        return rc;
    if ((rc = counts_move(sp, txn, before, m)) != 0)
        return rc;
    return msg_store(sp, txn, m, 0);
}

/* A new state and due time for m (as loaded in txn), its recipients as they are. */
static int msg_move(struct spool *sp, MDB_txn *txn, struct spool_msg *m, enum spool_state state,
                    int64_t next_attempt)
{
    struct spool_msg before = *m;

    return msg_change(sp, txn, m, &before, state, next_attempt);
}

int spool__txn_update(struct spool *sp, MDB_txn *txn, const struct spool_update *u)
{
    struct spool_msg m, before;
    enum spool_state state;
    size_t pending = 0, failed = 0;
    int rc;

    if ((rc = msg_load(sp, txn, u->id, &m)) != 0)
        return rc;
    /* Counting needs what the record said before: states and recipient statuses. */
    before = m;
    before.rcpts = xcalloc(m.nrcpts + 1, sizeof(*before.rcpts));
    for (size_t i = 0; i < m.nrcpts; i++)
        before.rcpts[i].status = m.rcpts[i].status;
    for (size_t i = 0; i < u->nrcpts; i++) {
        struct spool_rcpt *r;

        if (u->rcpt_index[i] >= m.nrcpts) {
            rc = -EINVAL;
            goto out;
        }
        r = &m.rcpts[u->rcpt_index[i]];
        if (u->rcpt_status != NULL)
            r->status = u->rcpt_status[i];
        if (u->rcpt_reply != NULL && u->rcpt_reply[i] != NULL) {
            free(r->reply);
            r->reply = xstrdup(u->rcpt_reply[i]);
        }
    }
    if (u->count_attempt)
        m.attempts++;
    if (u->set_config_wait) {
        m.config_wait = u->config_wait;
        m.config_since = u->config_since;
    }
    if (u->last_error != NULL) {
        free(m.last_error);
        m.last_error = xstrdup(u->last_error);
    }
    for (size_t i = 0; i < m.nrcpts; i++) {
        pending += m.rcpts[i].status == SPOOL_RCPT_PENDING;
        failed += m.rcpts[i].status == SPOOL_RCPT_FAILED;
    }
    for (size_t i = 0; i < u->nputs && rc == 0; i++)
        rc = spool__txn_put(sp, txn, u->puts[i].msg, u->puts[i].body, u->puts[i].len);
    if (rc != 0)
        goto out;
    if (pending == 0 && failed == 0) {
        rc = msg_remove(sp, txn, &before); /* delivered: nothing to keep */
        goto out;
    }
    if (u->result != NULL && (rc = attempt_append(sp, txn, u->id, u->upstream, u->result)) != 0)
        goto out;
    state = u->state;
    if (u->if_scheduled && !is_scheduled(before.state))
        state = before.state; /* an operator's hold (or a failure) made meanwhile wins */
    if (pending == 0)
        state = SPOOL_FAILED;
    if (state < SPOOL_QUEUED || state > SPOOL_FAILED) {
        rc = -EINVAL;
        goto out;
    }
    rc = msg_change(sp, txn, &m, &before, state, u->next_attempt);
out:
    free(before.rcpts);
    spool__msg_clear(&m);
    return rc;
}

int spool__txn_reschedule(struct spool *sp, MDB_txn *txn, uint64_t id, int64_t when)
{
    struct spool_msg m;
    int rc;

    if ((rc = msg_load(sp, txn, id, &m)) != 0)
        return rc == MDB_NOTFOUND ? 0 : rc; /* delivered or deleted meanwhile */
    if (is_scheduled(m.state) && m.next_attempt != when)
        rc = msg_move(sp, txn, &m, m.state, when);
    spool__msg_clear(&m);
    return rc;
}

int spool__txn_quarantine(struct spool *sp, MDB_txn *txn, uint64_t id, const char *why)
{
    unsigned char kb[8];
    MDB_val k, d;
    MDB_cursor *cur;
    struct spool_msg m;
    int rc, op = MDB_FIRST;

    if (!sp->have_bad)
        return SPOOL_EIO;
    id_key(kb, &k, id);
    if ((rc = mdb_get(txn, sp->msg, &k, &d)) != 0)
        return rc;
    if ((rc = mdb_put(txn, sp->bad, &k, &d, 0)) != 0)
        return rc;
    /* Its schedule entry is keyed by a time only the unreadable record knows: find it. */
    if ((rc = mdb_cursor_open(txn, sp->sched, &cur)) != 0)
        return rc;
    while ((rc = mdb_cursor_get(cur, &k, &d, op)) == 0) {
        op = MDB_NEXT;
        if (k.mv_size == 16 && spool__get_be64((unsigned char *)k.mv_data + 8) == id &&
            (rc = mdb_cursor_del(cur, 0)) != 0)
            break;
    }
    mdb_cursor_close(cur);
    if (rc != MDB_NOTFOUND)
        return rc;
    memset(&m, 0, sizeof(m));
    m.id = id;
    m.state = SPOOL_HELD;
    m.arrived = (int64_t)(id / 1000);
    m.sender = "";
    m.client = "";
    m.last_error = (char *)why;
    if ((rc = msg_store(sp, txn, &m, 0)) != 0)
        return rc;
    return counts_rebuild(sp, txn);
}

/* ---- synchronous writes (relayctl, start-up) ---- */

struct sync_op {
    enum { OP_STATE, OP_RETRY, OP_DELETE, OP_PURGE, OP_RETRY_IDS } kind;
    uint64_t id;
    enum spool_state state;
    int64_t before;  /* OP_PURGE: arrived earlier than this; 0: any time */
    size_t *removed; /* OP_PURGE, OP_RETRY_IDS: how many were done */
    uint64_t *ids;   /* OP_PURGE, OP_RETRY_IDS: the candidates; OP_PURGE leaves the ones
                        removed at the front */
    size_t max;      /* entries in ids */
};

/* Deletes the messages op->ids[0..op->max) that are still in op->state (read again inside
 * the write transaction: a message retried a moment ago by someone else stays). */
static int purge_apply(struct spool *sp, MDB_txn *txn, const struct sync_op *op)
{
    size_t n = 0;
    int rc = 0;

    *op->removed = 0;
    for (size_t i = 0; i < op->max && rc == 0; i++) {
        struct spool_msg m;

        if ((rc = msg_load(sp, txn, op->ids[i], &m)) != 0) {
            rc = rc == MDB_NOTFOUND || rc == SPOOL_ECORRUPT ? 0 : rc;
            continue;
        }
        if (m.state == op->state && (op->before == 0 || m.arrived < op->before)) {
            if ((rc = msg_remove(sp, txn, &m)) == 0)
                op->ids[n++] = m.id;
        }
        spool__msg_clear(&m);
    }
    if (rc == 0)
        *op->removed = n;
    return rc;
}

/* Retry --all: every scheduled message in ids[0..max) becomes due now. */
static int retry_ids_apply(struct spool *sp, MDB_txn *txn, const struct sync_op *op)
{
    int64_t now = time(NULL);
    size_t n = 0;
    int rc = 0;

    for (size_t i = 0; i < op->max && rc == 0; i++) {
        struct spool_msg m;

        if ((rc = msg_load(sp, txn, op->ids[i], &m)) != 0) {
            rc = rc == MDB_NOTFOUND || rc == SPOOL_ECORRUPT ? 0 : rc;
            continue;
        }
        if (is_scheduled(m.state)) {
            rc = msg_move(sp, txn, &m, m.state, now);
            n++;
        }
        spool__msg_clear(&m);
    }
    if (rc == 0)
        *op->removed = n;
    return rc;
}

static int sync_apply(struct spool *sp, MDB_txn *txn, const struct sync_op *op)
{
    struct spool_msg m;
    int rc;

    if (op->kind == OP_DELETE)
        return spool__txn_delete(sp, txn, op->id);
    if (op->kind == OP_PURGE)
        return purge_apply(sp, txn, op);
    if (op->kind == OP_RETRY_IDS)
        return retry_ids_apply(sp, txn, op);
    if ((rc = msg_load(sp, txn, op->id, &m)) != 0)
        return rc;
    if (op->kind == OP_RETRY && m.state == SPOOL_FAILED) {
        struct spool_msg before = m;

        before.rcpts = xcalloc(m.nrcpts + 1, sizeof(*before.rcpts));
        for (size_t i = 0; i < m.nrcpts; i++) {
            before.rcpts[i].status = m.rcpts[i].status;
            if (m.rcpts[i].status == SPOOL_RCPT_FAILED)
                m.rcpts[i].status = SPOOL_RCPT_PENDING;
        }
        rc = msg_change(sp, txn, &m, &before, SPOOL_QUEUED, time(NULL));
        free(before.rcpts);
    } else {
        rc = msg_move(sp, txn, &m, op->kind == OP_RETRY ? SPOOL_QUEUED : op->state, time(NULL));
    }
    spool__msg_clear(&m);
    return rc;
}

static int sync_write(struct spool *sp, const struct sync_op *op)
{
    MDB_txn *txn;
    int rc = 0;

    if (sp->opts.readonly)
        return -EROFS;
    for (int i = 0; i < RETRY_MAX; i++) {
        if ((rc = spool__txn_begin(sp, 0, &txn)) != 0)
            break;
        if ((rc = sync_apply(sp, txn, op)) != 0) {
            spool__txn_abort(sp, txn);
        } else {
            rc = spool__txn_commit(sp, txn);
        }
        if (rc != MDB_MAP_FULL)
            break;
        if ((rc = spool__map_grow(sp)) != 0)
            break;
    }
    return spool__from_mdb(rc, "write");
}

int spool_msg_set_state(struct spool *sp, uint64_t id, enum spool_state state)
{
    struct sync_op op = {.kind = OP_STATE, .id = id, .state = state};

    if (state < SPOOL_QUEUED || state > SPOOL_FAILED)
        return -EINVAL;
    return sync_write(sp, &op);
}

int spool_msg_retry(struct spool *sp, uint64_t id)
{
    struct sync_op op = {.kind = OP_RETRY, .id = id, .state = SPOOL_QUEUED};

    return sync_write(sp, &op);
}

int spool_msg_delete(struct spool *sp, uint64_t id)
{
    struct sync_op op = {.kind = OP_DELETE, .id = id};

    return sync_write(sp, &op);
}

int spool_purge(struct spool *sp, enum spool_state state, int64_t arrived_before, size_t *removed)
{
    return spool_purge_ids(sp, state, arrived_before, NULL, 0, removed);
}

/*
 * Up to max ids (0: no limit) of messages in state, arrived before arrived_before (0: any
 * time), from a read transaction: the scan never holds the write lock.  Ids are arrival
 * times, so the walk stops at the first id past the cutoff.  With want_state 0 every
 * scheduled (QUEUED or DEFERRED) message is taken.
 */
static int collect_ids(struct spool *sp, int want_state, int64_t arrived_before, size_t max,
                       uint64_t **ids, size_t *n)
{
    uint64_t cutoff = arrived_before > 0 ? (uint64_t)arrived_before * 1000 : UINT64_MAX;
    size_t cap = 0;
    MDB_cursor *cur;
    MDB_txn *txn;
    MDB_val k, d;
    int rc, op, tries = 0;

again:
    *n = 0;
    op = MDB_FIRST;
    if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
        return rc;
    if ((rc = mdb_cursor_open(txn, sp->msg, &cur)) != 0)
        goto txn_end;
    while ((max == 0 || *n < max) && (rc = mdb_cursor_get(cur, &k, &d, op)) == 0) {
        struct spool_msg m;
        int take;

        op = MDB_NEXT;
        if (k.mv_size != 8)
            continue;
        /* A little slack: ids borrowed from the future stay within a second or so. */
        if (arrived_before > 0 && spool__get_be64(k.mv_data) >= cutoff + 60000)
            break;
        if (spool__decode_msg(d.mv_data, d.mv_size, spool__get_be64(k.mv_data), &m) != 0)
            continue;
        take = want_state == 0 ? is_scheduled(m.state)
                               : (int)m.state == want_state &&
                                     (arrived_before == 0 || m.arrived < arrived_before);
        if (take) {
            if (*n == cap) {
                cap = cap ? cap * 2 : 256;
                *ids = xrealloc(*ids, cap * sizeof(**ids));
            }
            (*ids)[(*n)++] = m.id;
        }
        spool__msg_clear(&m);
    }
    if (rc == MDB_NOTFOUND)
        rc = 0;
    mdb_cursor_close(cur);
txn_end:
    if (read_end(sp, txn) == READ_AGAIN && tries++ < READ_TRIES) {
        read_pause(tries);
        goto again;
    }
    return rc;
}

/* Messages per write transaction of a bulk operation: short commits, no long write lock. */
#define BULK_CHUNK 4096

int spool_purge_ids(struct spool *sp, enum spool_state state, int64_t arrived_before, uint64_t *ids,
                    size_t max, size_t *removed)
{
    uint64_t *cand = NULL;
    size_t ncand = 0, done = 0, dummy;
    int rc;

    removed = removed != NULL ? removed : &dummy;
    *removed = 0;
    if (state < SPOOL_QUEUED || state > SPOOL_FAILED)
        return -EINVAL;
    if (sp->opts.readonly)
        return -EROFS;
    if ((rc = collect_ids(sp, state, arrived_before, max, &cand, &ncand)) != 0) {
        free(cand);
        return spool__from_mdb(rc, "scan for purge");
    }
    for (size_t off = 0; off < ncand && rc == 0; off += BULK_CHUNK) {
        size_t chunk = ncand - off < BULK_CHUNK ? ncand - off : BULK_CHUNK, got = 0;
        struct sync_op op = {.kind = OP_PURGE,
                             .state = state,
                             .before = arrived_before,
                             .ids = cand + off,
                             .max = chunk,
                             .removed = &got};

        if ((rc = sync_write(sp, &op)) == 0) {
            if (ids != NULL)
                memcpy(ids + done, cand + off, got * sizeof(*ids));
            done += got;
        }
    }
    *removed = done;
    free(cand);
    return rc;
}

int spool_retry_all(struct spool *sp, size_t *n)
{
    uint64_t *cand = NULL;
    size_t ncand = 0, done = 0;
    int rc;

    if (n != NULL)
        *n = 0;
    if (sp->opts.readonly)
        return -EROFS;
    if ((rc = collect_ids(sp, 0, 0, 0, &cand, &ncand)) != 0) {
        free(cand);
        return spool__from_mdb(rc, "scan for retry");
    }
    for (size_t off = 0; off < ncand && rc == 0; off += BULK_CHUNK) {
        size_t chunk = ncand - off < BULK_CHUNK ? ncand - off : BULK_CHUNK, got = 0;
        struct sync_op op = {
            .kind = OP_RETRY_IDS, .ids = cand + off, .max = chunk, .removed = &got};

        if ((rc = sync_write(sp, &op)) == 0)
            done += got;
    }
    if (n != NULL)
        *n = done;
    free(cand);
    return rc;
}

int spool_room(struct spool *sp, uint64_t len)
{
    MDB_txn *txn;
    int rc;

    if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
        return spool__from_mdb(rc, "check room");
    rc = check_room(sp, txn, len);
    spool__txn_abort(sp, txn); /* one number: a torn read is as good as a stale one */
    return spool__from_mdb(rc, "check room");
}
