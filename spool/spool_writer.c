/*
 * spool_writer - the writer thread: group commit for spool_put_async() and
 * spool_update_async().
 *
 * Happy path: the loop thread deep-copies a job onto sp->queue and signals; the writer
 * takes every queued job at once, applies each in a nested transaction of one write
 * transaction, commits (one fsync for the whole batch), moves the jobs to sp->done and
 * calls wake(); spool_writer_reap() on the loop thread then runs the done callbacks.
 *
 * Failure modes: a failure specific to one job (SPOOL_EFULL for a put, SPOOL_ENOTFOUND for
 * an update of a message relayctl deleted) aborts only that job's nested transaction; the
 * others still commit.  MDB_MAP_FULL aborts the batch, grows the map and redoes the whole
 * batch.  A failed commit fails every job of the batch that had succeeded, so no done
 * callback ever reports success for data that is not durable.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "spool/spool_int.h"

enum job_kind { JOB_PUT, JOB_UPDATE, JOB_RESCHEDULE, JOB_QUARANTINE };

/* One write transaction takes at most this many jobs and this many bytes of new mail: a
 * burst of ready jobs never makes one huge commit that holds every completion back. */
#define BATCH_JOBS 1024
#define BATCH_BYTES (64u << 20)

struct spool_job {
    struct spool_job *next;
    enum job_kind kind;
    int rc;
    spool_done_fn done;
    void *arg;
    /* JOB_PUT */
    struct spool_msg *msg;
    char *body;
    size_t len;
    /* JOB_UPDATE: u points into the owned copies below */
    struct spool_update u;
    char *last_error, *upstream, *result;
    size_t *rcpt_index;
    enum spool_rcpt_status *rcpt_status;
    char **rcpt_reply;
    struct spool_newmsg *puts;
    /* JOB_RESCHEDULE: ids/whens[0..n); JOB_QUARANTINE: ids[0] and result (why) */
    uint64_t *ids;
    int64_t *whens;
    size_t n;
};

static void job_free(struct spool_job *j)
{
    for (size_t i = 0; i < j->u.nputs; i++) {
        spool_msg_free((struct spool_msg *)j->puts[i].msg);
        free((char *)j->puts[i].body);
    }
    free(j->puts);
    free(j->ids);
    free(j->whens);
    spool_msg_free(j->msg);
    free(j->body);
    free(j->last_error);
    free(j->upstream);
    free(j->result);
    if (j->rcpt_reply != NULL)
        for (size_t i = 0; i < j->u.nrcpts; i++)
            free(j->rcpt_reply[i]);
    free(j->rcpt_reply);
    free(j->rcpt_index);
    free(j->rcpt_status);
    free(j);
}

static char *dup_or_null(const char *s)
{
    return s != NULL ? xstrdup(s) : NULL;
}

static void wake(struct spool *sp)
{
    /* Called under the lock: spool_close() clears sp->wake, because by then the daemon
     * may have closed the uv_async it signals.  wake must be quick and must not call
     * into the spool (uv_async_send() is both). */
    pthread_mutex_lock(&sp->qlock);
    if (sp->wake != NULL)
        sp->wake(sp->wake_arg);
    pthread_mutex_unlock(&sp->qlock);
}

static void submit(struct spool *sp, struct spool_job *j)
{
    int closed;

    pthread_mutex_lock(&sp->qlock);
    closed = !sp->started || sp->stopping;
    if (closed) {
        j->rc = SPOOL_ECLOSED;
        *sp->done_tail = j;
        sp->done_tail = &j->next;
    } else {
        *sp->queue_tail = j;
        sp->queue_tail = &j->next;
        pthread_cond_signal(&sp->qcond);
    }
    pthread_mutex_unlock(&sp->qlock);
    if (closed)
        wake(sp);
}

void spool_put_async(struct spool *sp, const struct spool_msg *msg, char *body, size_t len,
                     spool_done_fn done, void *arg)
{
    struct spool_job *j = xcalloc(1, sizeof(*j));

    j->kind = JOB_PUT;
    j->done = done;
    j->arg = arg;
    j->msg = spool__msg_dup(msg);
    j->body = body;
    j->len = len;
    submit(sp, j);
}

void spool_update_async(struct spool *sp, const struct spool_update *u, spool_done_fn done,
                        void *arg)
{
    struct spool_job *j = xcalloc(1, sizeof(*j));
    size_t n = u->nrcpts;

    j->kind = JOB_UPDATE;
    j->done = done;
    j->arg = arg;
    j->u = *u;
    j->last_error = dup_or_null(u->last_error);
    j->upstream = dup_or_null(u->upstream);
    j->result = dup_or_null(u->result);
    j->rcpt_index = xcalloc(n ? n : 1, sizeof(*j->rcpt_index));
    j->rcpt_status = xcalloc(n ? n : 1, sizeof(*j->rcpt_status));
    j->rcpt_reply = xcalloc(n ? n : 1, sizeof(*j->rcpt_reply));
    for (size_t i = 0; i < n; i++) {
        j->rcpt_index[i] = u->rcpt_index[i];
        /* No status array: leave the status as it is (PENDING stays PENDING). */
        j->rcpt_status[i] = u->rcpt_status != NULL ? u->rcpt_status[i] : SPOOL_RCPT_PENDING;
        j->rcpt_reply[i] = u->rcpt_reply != NULL ? dup_or_null(u->rcpt_reply[i]) : NULL;
    }
    j->u.last_error = j->last_error;
    j->u.upstream = j->upstream;
    j->u.result = j->result;
    j->u.rcpt_index = j->rcpt_index;
    j->u.rcpt_status = u->rcpt_status != NULL ? j->rcpt_status : NULL;
    j->u.rcpt_reply = (const char *const *)j->rcpt_reply;
    if (u->nputs > 0) {
        j->puts = xcalloc(u->nputs, sizeof(*j->puts));
        for (size_t i = 0; i < u->nputs; i++) {
            char *b = xmalloc(u->puts[i].len + 1);

            memcpy(b, u->puts[i].body, u->puts[i].len);
            j->puts[i].msg = spool__msg_dup(u->puts[i].msg);
            j->puts[i].body = b;
            j->puts[i].len = u->puts[i].len;
        }
    }
    j->u.puts = j->puts;
    submit(sp, j);
}

void spool_reschedule_async(struct spool *sp, const uint64_t *ids, const int64_t *whens, size_t n,
                            spool_done_fn done, void *arg)
{
    struct spool_job *j = xcalloc(1, sizeof(*j));

    j->kind = JOB_RESCHEDULE;
    j->done = done;
    j->arg = arg;
    j->ids = xcalloc(n + 1, sizeof(*j->ids));
    j->whens = xcalloc(n + 1, sizeof(*j->whens));
    memcpy(j->ids, ids, n * sizeof(*ids));
    memcpy(j->whens, whens, n * sizeof(*whens));
    j->n = n;
    submit(sp, j);
}

void spool_quarantine_async(struct spool *sp, uint64_t id, const char *why, spool_done_fn done,
                            void *arg)
{
    struct spool_job *j = xcalloc(1, sizeof(*j));

    j->kind = JOB_QUARANTINE;
    j->done = done;
    j->arg = arg;
    j->ids = xcalloc(1, sizeof(*j->ids));
    j->ids[0] = id;
    j->n = 1;
    j->result = xstrdup(why);
    submit(sp, j);
}

void spool_fault_updates(struct spool *sp, int n)
{
    __atomic_store_n(&sp->fail_updates, n, __ATOMIC_SEQ_CST);
}

/* The fault hook: 1 when this update is to fail. */
static int fault_now(struct spool *sp)
{
    int n = __atomic_load_n(&sp->fail_updates, __ATOMIC_SEQ_CST);

    while (n > 0) {
        if (__atomic_compare_exchange_n(&sp->fail_updates, &n, n - 1, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

static int job_apply(struct spool *sp, MDB_txn *txn, struct spool_job *j)
{
    int rc = 0;

    switch (j->kind) {
    case JOB_PUT:
        return spool__txn_put(sp, txn, j->msg, j->body, j->len);
    case JOB_UPDATE:
        if (fault_now(sp))
            return SPOOL_EIO;
        return spool__txn_update(sp, txn, &j->u);
    case JOB_RESCHEDULE:
        if (fault_now(sp))
            return SPOOL_EIO;
        for (size_t i = 0; i < j->n && rc == 0; i++)
            rc = spool__txn_reschedule(sp, txn, j->ids[i], j->whens[i]);
        return rc;
    case JOB_QUARANTINE:
        return spool__txn_quarantine(sp, txn, j->ids[0], j->result);
    }
    return -EINVAL;
}

/* Applies and commits one batch (devs: device events riding along, see spool_devices.c;
 * batch may be NULL when only they are due); sets each job's rc.  1 when it committed. */
static int batch_commit(struct spool *sp, struct spool_job *batch,
                        const struct spool__devpend *devs, const struct spool__statepend *ups)
{
    struct spool_job *j;
    MDB_txn *txn, *child;
    int rc = 0;

    for (int attempt = 0; attempt < 40; attempt++) {
        if ((rc = spool__txn_begin(sp, 0, &txn)) != 0)
            break;
        for (j = batch; j != NULL; j = j->next) {
            if ((rc = mdb_txn_begin(sp->env, txn, 0, &child)) != 0)
                break;
            if ((rc = job_apply(sp, child, j)) == 0) {
                rc = mdb_txn_commit(child);
            } else {
                mdb_txn_abort(child);
            }
            if (rc == MDB_MAP_FULL)
                break;
            j->rc = spool__from_mdb(rc, j->kind == JOB_PUT ? "store message" : "update message");
            rc = 0;
        }
        if (rc == 0 && devs != NULL && (rc = mdb_txn_begin(sp->env, txn, 0, &child)) == 0) {
            /* Device history never costs mail: its failure only loses these events. */
            if ((rc = spool__devices_apply(sp, child, devs)) == 0)
                rc = mdb_txn_commit(child);
            else
                mdb_txn_abort(child);
            if (rc != 0 && rc != MDB_MAP_FULL) {
                log_warn("spool: device history not updated: %s", mdb_strerror(rc));
                rc = 0;
            }
        }
        if (rc == 0 && ups != NULL && (rc = mdb_txn_begin(sp->env, txn, 0, &child)) == 0) {
            /* Upstream state never costs mail either (spool_state.c). */
            if ((rc = spool__state_apply(sp, child, ups)) == 0)
                rc = mdb_txn_commit(child);
            else
                mdb_txn_abort(child);
            if (rc != 0 && rc != MDB_MAP_FULL) {
                log_warn("spool: upstream state not updated: %s", mdb_strerror(rc));
                rc = 0;
            }
        }
        if (rc != 0) {
            spool__txn_abort(sp, txn);
        } else {
            rc = spool__txn_commit(sp, txn);
            if (rc == 0)
                return 1;
        }
        if (rc != MDB_MAP_FULL)
            break;
        if ((rc = spool__map_grow(sp)) != 0)
            break;
    }
    rc = spool__from_mdb(rc, "commit");
    for (j = batch; j != NULL; j = j->next)
        j->rc = j->rc != 0 ? j->rc : rc;
    return 0;
}

/* Takes the next batch off the queue (under qlock): every ready job, up to the bounds. */
static struct spool_job *take_batch(struct spool *sp)
{
    struct spool_job *batch = sp->queue, **pp = &sp->queue;
    size_t jobs = 0, bytes = 0;

    while (*pp != NULL && jobs < BATCH_JOBS && (jobs == 0 || bytes < BATCH_BYTES)) {
        bytes += (*pp)->len;
        jobs++;
        pp = &(*pp)->next;
    }
    sp->queue = *pp;
    *pp = NULL;
    if (sp->queue == NULL)
        sp->queue_tail = &sp->queue;
    return batch;
}

/* 0 with no note pending, else the absolute time (unix s) by which the notes must be
 * written: device events within SPOOL_DEVICES_FLUSH, upstream state within
 * SPOOL_STATE_FLUSH of the first pending one. */
static int64_t notes_due(struct spool *sp)
{
    int64_t due = 0, sdue;

    pthread_mutex_lock(&sp->devlock);
    if (sp->devpend_since != 0)
        due = sp->devpend_since + SPOOL_DEVICES_FLUSH;
    if (sp->statepend_since != 0) {
        sdue = sp->statepend_since + SPOOL_STATE_FLUSH;
        if (due == 0 || sdue < due)
            due = sdue;
    }
    pthread_mutex_unlock(&sp->devlock);
    return due;
}

void spool__writer_nudge(struct spool *sp)
{
    pthread_mutex_lock(&sp->qlock);
    pthread_cond_signal(&sp->qcond);
    pthread_mutex_unlock(&sp->qlock);
}

static void *writer_main(void *arg)
{
    struct spool *sp = arg;

    for (;;) {
        struct spool_job *batch, **last;
        struct spool__devpend *devs;
        struct spool__statepend *ups;
        uint64_t ok = 0;
        int64_t due;
        int committed, stopping;

        pthread_mutex_lock(&sp->qlock);
        while (sp->queue == NULL && !sp->stopping) {
            /* Notes wait for mail's commit, or their flush deadline at most. */
            due = notes_due(sp);
            if (due == 0) {
                pthread_cond_wait(&sp->qcond, &sp->qlock);
            } else {
                struct timespec ts = {(time_t)due, 0};

                if (due <= (int64_t)time(NULL) ||
                    pthread_cond_timedwait(&sp->qcond, &sp->qlock, &ts) == ETIMEDOUT)
                    break;
            }
        }
        batch = take_batch(sp);
        stopping = sp->stopping;
        pthread_mutex_unlock(&sp->qlock);
        devs = spool__devices_take(sp);
        ups = spool__state_take(sp);
        if (batch == NULL && devs == NULL && ups == NULL) {
            if (stopping)
                break; /* stopping, and every queued job is done */
            continue;
        }

        committed = batch_commit(sp, batch, devs, ups);
        spool__devices_free(devs);
        spool__state_free(ups);
        if (batch == NULL) {
            pthread_mutex_lock(&sp->qlock);
            sp->commits += committed;
            pthread_mutex_unlock(&sp->qlock);
            continue;
        }
        for (last = &batch; *last != NULL; last = &(*last)->next)
            ok += (*last)->rc == 0;

        pthread_mutex_lock(&sp->qlock);
        sp->commits += committed;
        sp->committed_jobs += committed ? ok : 0;
        *sp->done_tail = batch;
        sp->done_tail = last;
        pthread_mutex_unlock(&sp->qlock);
        wake(sp);
    }
    return NULL;
}

int spool_writer_start(struct spool *sp, void (*wakefn)(void *), void *wake_arg)
{
    int rc;

    if (sp->opts.readonly)
        return -EROFS;
    pthread_mutex_lock(&sp->qlock);
    if (sp->started) {
        pthread_mutex_unlock(&sp->qlock);
        return -EALREADY;
    }
    sp->wake = wakefn;
    sp->wake_arg = wake_arg;
    if ((rc = pthread_create(&sp->thread, NULL, writer_main, sp)) != 0) {
        pthread_mutex_unlock(&sp->qlock);
        log_error("spool: cannot start writer thread: %s", strerror(rc));
        return -rc;
    }
    sp->started = 1;
    pthread_mutex_unlock(&sp->qlock);
    return 0;
}

void spool_writer_reap(struct spool *sp)
{
    struct spool_job *list, *next;

    pthread_mutex_lock(&sp->qlock);
    list = sp->done;
    sp->done = NULL;
    sp->done_tail = &sp->done;
    pthread_mutex_unlock(&sp->qlock);
    for (; list != NULL; list = next) {
        next = list->next;
        if (list->done != NULL)
            list->done(list->arg, list->rc);
        job_free(list);
    }
}

void spool_writer_stop(struct spool *sp)
{
    int started;

    pthread_mutex_lock(&sp->qlock);
    started = sp->started && !sp->stopping;
    sp->stopping = 1;
    sp->wake = NULL; /* nobody is woken any more; the loop may be gone */
    pthread_cond_signal(&sp->qcond);
    pthread_mutex_unlock(&sp->qlock);
    if (started)
        pthread_join(sp->thread, NULL);
}

void spool__writer_stop(struct spool *sp)
{
    struct spool_job *j, *next;

    spool_writer_stop(sp);
    /* Unreaped completions are dropped: their callers may already be gone. */
    for (j = sp->done; j != NULL; j = next) {
        next = j->next;
        job_free(j);
    }
    sp->done = NULL;
    sp->done_tail = &sp->done;
}
