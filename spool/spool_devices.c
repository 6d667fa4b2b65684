/*
 * spool_devices - the "devices" sub-database: every inbound client seen (spool.h).
 *
 * Happy path: the daemon calls spool_device_note() on its loop thread for each refusal
 * and at the end of each session; the event is merged into an in-memory pending entry
 * per client (devlock).  The writer thread takes the pending entries together with each
 * batch of jobs (spool__devices_take) and folds them into the records inside the same
 * write transaction (spool__devices_apply), so they ride along with the fsync the mail
 * needs anyway.  With no mail, the writer wakes at most every SPOOL_DEVICES_FLUSH
 * seconds for them, and once more at stop.
 *
 * Failure modes: more than SPOOL__DEVPEND_MAX distinct clients pending at once (a flood
 * of refused addresses between two commits): further new clients are not recorded until
 * the next commit (counted in the log, never an allocation without bound).  A record that
 * does not decode is replaced by the new facts.  A failed commit loses the events taken
 * for it (device history, never mail).
 *
 * Records: see spool/DESIGN.md "Devices".  Ownership: spool_devices_list() hands out
 * copies the caller frees with spool_devices_free(); pending entries belong to the spool
 * until taken, then to the writer, which frees them after the commit.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "common/xalloc.h"
#include "spool/spool_int.h"

#define DEV_V1 1
#define SPOOL__DEVPEND_MAX 4096
#define DEV_TEXT_MAX 400 /* refusal text kept per reason */
#define DEV_NAME_MAX 255 /* HELO names, listener and reason names */

struct spool__devpend {
    struct spool__devpend *next;
    struct spool_device d; /* the facts to merge; first_seen = first event noted */
};

static char *dup_cut(const char *s, size_t max)
{
    return s != NULL ? xstrndup(s, max) : NULL;
}

static void reasons_free(struct spool_device_reason *r, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(r[i].name);
        free(r[i].last_text);
    }
    free(r);
}

static void device_clear(struct spool_device *d)
{
    free(d->client);
    free(d->helo);
    free(d->listener);
    reasons_free(d->reasons, d->nreasons);
    memset(d, 0, sizeof(*d));
}

/* Adds count refusals called name (latest at when with text) to d; the oldest reason goes
 * when d already holds SPOOL_DEVICE_REASONS. */
static void reason_merge(struct spool_device *d, const char *name, uint64_t count, int64_t when,
                         const char *text)
{
    struct spool_device_reason *r = NULL;
    size_t i, oldest = 0;

    for (i = 0; i < d->nreasons; i++) {
        if (strcmp(d->reasons[i].name, name) == 0) {
            r = &d->reasons[i];
            break;
        }
        if (d->reasons[i].last_when < d->reasons[oldest].last_when)
            oldest = i;
    }
    if (r == NULL) {
        if (d->nreasons >= SPOOL_DEVICE_REASONS) {
            r = &d->reasons[oldest];
            free(r->name);
            free(r->last_text);
        } else {
            d->reasons = xrealloc(d->reasons, (d->nreasons + 1) * sizeof(*d->reasons));
            r = &d->reasons[d->nreasons++];
        }
        memset(r, 0, sizeof(*r));
        r->name = dup_cut(name, DEV_NAME_MAX);
    }
    r->count += count;
    if (when >= r->last_when) {
        r->last_when = when;
        free(r->last_text);
        r->last_text = dup_cut(text != NULL ? text : "", DEV_TEXT_MAX);
    }
}

static void replace(char **dst, const char *src)
{
    if (src != NULL) {
        free(*dst);
        *dst = dup_cut(src, DEV_NAME_MAX);
    }
}

/* Merges the facts of src (newer) into dst. */
static void device_merge(struct spool_device *dst, const struct spool_device *src)
{
    if (dst->first_seen == 0 || (src->first_seen != 0 && src->first_seen < dst->first_seen))
        dst->first_seen = src->first_seen;
    if (src->last_seen > dst->last_seen)
        dst->last_seen = src->last_seen;
    dst->accepted += src->accepted;
    replace(&dst->helo, src->helo);
    replace(&dst->listener, src->listener);
    for (size_t i = 0; i < src->nreasons; i++)
        reason_merge(dst, src->reasons[i].name, src->reasons[i].count, src->reasons[i].last_when,
                     src->reasons[i].last_text);
}

void spool_device_note(struct spool *sp, const struct spool_device_event *ev)
{
    struct spool__devpend *p;
    struct spool_device d;
    int was_empty;

    if (sp == NULL || ev->client == NULL || sp->opts.readonly)
        return;
    memset(&d, 0, sizeof(d));
    d.first_seen = d.last_seen = ev->when;
    d.accepted = ev->accepted;
    d.helo = (char *)ev->helo;
    d.listener = (char *)ev->listener;
    pthread_mutex_lock(&sp->devlock);
    for (p = sp->devpend; p != NULL; p = p->next)
        if (strcmp(p->d.client, ev->client) == 0)
            break;
    if (p == NULL) {
        if (sp->ndevpend >= SPOOL__DEVPEND_MAX) {
            pthread_mutex_unlock(&sp->devlock);
            return; /* XXX dropped until the next commit; see the file comment */
        }
        p = xcalloc(1, sizeof(*p));
        p->d.client = dup_cut(ev->client, DEV_NAME_MAX);
        p->next = sp->devpend;
        sp->devpend = p;
        sp->ndevpend++;
    }
    d.nreasons = 0;
    device_merge(&p->d, &d);
    if (ev->reason != NULL)
        reason_merge(&p->d, ev->reason, 1, ev->when, ev->reason_text);
    was_empty = sp->devpend_since == 0;
    if (was_empty)
        sp->devpend_since = (int64_t)time(NULL);
    pthread_mutex_unlock(&sp->devlock);
    if (was_empty)
        spool__writer_nudge(sp); /* it may sleep without a deadline: give it one */
}

struct spool__devpend *spool__devices_take(struct spool *sp)
{
    struct spool__devpend *list;

    pthread_mutex_lock(&sp->devlock);
    list = sp->devpend;
    sp->devpend = NULL;
    sp->ndevpend = 0;
    sp->devpend_since = 0;
    pthread_mutex_unlock(&sp->devlock);
    return list;
}

void spool__devices_free(struct spool__devpend *list)
{
    struct spool__devpend *next;

    for (; list != NULL; list = next) {
        next = list->next;
        device_clear(&list->d);
        free(list);
    }
}

/* ---- records ---- */

static void encode(const struct spool_device *d, struct buf *out)
{
    spool__rec_start(out, DEV_V1);
    spool__put_u64(out, (uint64_t)d->first_seen);
    spool__put_u64(out, (uint64_t)d->last_seen);
    spool__put_u64(out, d->accepted);
    spool__put_str(out, d->helo);
    spool__put_str(out, d->listener);
    spool__put_u32(out, (uint32_t)d->nreasons);
    for (size_t i = 0; i < d->nreasons; i++) {
        spool__put_str(out, d->reasons[i].name);
        spool__put_u64(out, d->reasons[i].count);
        spool__put_u64(out, (uint64_t)d->reasons[i].last_when);
        spool__put_str(out, d->reasons[i].last_text);
    }
    spool__rec_finish(out);
}

/* 0, or SPOOL_ECORRUPT with *d holding nothing to free. */
static int decode(const void *p, size_t n, const char *client, struct spool_device *d)
{
    struct spool__rd r;
    uint32_t nreasons;
    unsigned v;

    memset(d, 0, sizeof(*d));
    if (spool__rec_header(&r, p, n, DEV_V1, DEV_V1, &v) != 0)
        return SPOOL_ECORRUPT;
    d->client = xstrdup(client);
    d->first_seen = (int64_t)spool__get_u64(&r);
    d->last_seen = (int64_t)spool__get_u64(&r);
    d->accepted = spool__get_u64(&r);
    d->helo = spool__get_str(&r);
    d->listener = spool__get_str(&r);
    nreasons = spool__get_u32(&r);
    if (!r.bad && nreasons > SPOOL_DEVICE_REASONS)
        r.bad = 1;
    if (!r.bad && nreasons > 0)
        d->reasons = xcalloc(nreasons, sizeof(*d->reasons));
    for (uint32_t i = 0; i < nreasons && !r.bad; i++) {
        struct spool_device_reason *x = &d->reasons[d->nreasons++];

        x->name = spool__get_str(&r);
        x->count = spool__get_u64(&r);
        x->last_when = (int64_t)spool__get_u64(&r);
        x->last_text = spool__get_str(&r);
        if (x->name == NULL)
            r.bad = 1;
    }
    if (r.bad || r.off != n) {
        device_clear(d);
        return SPOOL_ECORRUPT;
    }
    return 0;
}

int spool__devices_open(struct spool *sp, MDB_txn *txn, unsigned dflags)
{
    int rc = mdb_dbi_open(txn, "devices", dflags, &sp->devices);

    if (rc == MDB_NOTFOUND && sp->opts.readonly)
        return 0; /* a spool no relayd with devices has written to yet */
    if (rc == 0)
        sp->have_devices = 1;
    return rc;
}

/* Deletes the least recently seen record, to keep at most SPOOL_DEVICES_MAX. */
static int evict_oldest(struct spool *sp, MDB_txn *txn)
{
    MDB_cursor *cur;
    MDB_val k, v, oldk = {0, NULL};
    int64_t oldest = INT64_MAX;
    char key[DEV_NAME_MAX + 1];
    int rc;

    if ((rc = mdb_cursor_open(txn, sp->devices, &cur)) != 0)
        return rc;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        int64_t seen =
            v.mv_size >= 21 ? (int64_t)spool__get_be64((unsigned char *)v.mv_data + 13) : INT64_MIN;

        if (seen < oldest && k.mv_size <= DEV_NAME_MAX) {
            oldest = seen;
            memcpy(key, k.mv_data, k.mv_size);
            oldk.mv_size = k.mv_size;
        }
    }
    mdb_cursor_close(cur);
    if (rc != MDB_NOTFOUND)
        return rc;
    if (oldk.mv_size == 0)
        return 0;
    oldk.mv_data = key;
    return mdb_del(txn, sp->devices, &oldk, NULL);
}

int spool__devices_apply(struct spool *sp, MDB_txn *txn, const struct spool__devpend *list)
{
    struct buf *out = buf_new(0);
    int rc = 0;

    for (; list != NULL && rc == 0; list = list->next) {
        struct spool_device cur;
        MDB_val k = {strlen(list->d.client), list->d.client}, v;
        MDB_stat st;

        rc = mdb_get(txn, sp->devices, &k, &v);
        if (rc == 0 && decode(v.mv_data, v.mv_size, list->d.client, &cur) == 0) {
            device_merge(&cur, &list->d);
        } else if (rc == 0 || rc == MDB_NOTFOUND) {
            if (rc == MDB_NOTFOUND && (rc = mdb_stat(txn, sp->devices, &st)) == 0 &&
                st.ms_entries >= SPOOL_DEVICES_MAX)
                rc = evict_oldest(sp, txn);
            if (rc != 0 && rc != MDB_NOTFOUND)
                break;
            memset(&cur, 0, sizeof(cur));
            cur.client = xstrdup(list->d.client);
            device_merge(&cur, &list->d);
        } else {
            break;
        }
        encode(&cur, out);
        v.mv_size = out->len;
        v.mv_data = out->data;
        rc = mdb_put(txn, sp->devices, &k, &v, 0);
        device_clear(&cur);
    }
    buf_free(out);
    return rc;
}

static int by_last_seen(const void *a, const void *b)
{
    const struct spool_device *x = a, *y = b;

    return x->last_seen < y->last_seen ? 1 : x->last_seen > y->last_seen ? -1 : 0;
}

/* One pass over the records; 0 or an MDB_* code. */
static int list_once(struct spool *sp, MDB_txn *txn, struct spool_device **out, size_t *n)
{
    struct spool_device *d = NULL;
    size_t cnt = 0, cap = 0;
    MDB_cursor *cur;
    MDB_val k, v;
    int rc;

    if ((rc = mdb_cursor_open(txn, sp->devices, &cur)) != 0)
        return rc;
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        char client[DEV_NAME_MAX + 1];

        if (k.mv_size > DEV_NAME_MAX)
            continue;
        memcpy(client, k.mv_data, k.mv_size);
        client[k.mv_size] = '\0';
        if (cnt == cap) {
            cap = cap ? cap * 2 : 16;
            d = xrealloc(d, cap * sizeof(*d));
        }
        if (decode(v.mv_data, v.mv_size, client, &d[cnt]) == 0)
            cnt++;
    }
    mdb_cursor_close(cur);
    *out = d;
    *n = cnt;
    return rc == MDB_NOTFOUND ? 0 : rc;
}

int spool_devices_list(struct spool *sp, struct spool_device **out, size_t *n)
{
    MDB_txn *txn;
    MDB_envinfo info;
    size_t snap;
    int rc, tries;

    *out = NULL;
    *n = 0;
    if (!sp->have_devices)
        return 0;
    for (tries = 0;; tries++) {
        if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
            return spool__from_mdb(rc, "read devices");
        rc = list_once(sp, txn, out, n);
        snap = mdb_txn_id(txn);
        spool__txn_abort(sp, txn);
        if (rc != 0) {
            spool_devices_free(*out, *n);
            *out = NULL;
            *n = 0;
            return spool__from_mdb(rc, "read devices");
        }
        /* Unlocked (MDB_NOLOCK) readers may see pages the writer recycled: redo the read
         * when more than one commit happened since its snapshot (as spool.c's read_end). */
        if (!sp->unlocked)
            break;
        mdb_env_info(sp->env, &info);
        if (info.me_last_txnid <= snap + 1 || tries == 20)
            break;
        spool_devices_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    if (*n > 1)
        qsort(*out, *n, sizeof(**out), by_last_seen);
    return 0;
}

void spool_devices_free(struct spool_device *d, size_t n)
{
    for (size_t i = 0; i < n; i++)
        device_clear(&d[i]);
    free(d);
}
