/*
 * spool_state - the "state" sub-database: each upstream's run-time state (spool.h).
 *
 * Happy path: the daemon notes an upstream's state when it changed, at most once a second
 * per upstream (spool_upstate_note(), loop thread); the note replaces the one pending for
 * that name (devlock).  The writer takes the pending notes with each batch
 * (spool__state_take()) and writes them in the same transaction as the mail
 * (spool__state_apply()); with no mail it wakes for them within SPOOL_STATE_FLUSH seconds,
 * and once more at stop.  At start the daemon reads each upstream's record
 * (spool_upstate_get()).
 *
 * Failure modes: a failed commit loses the notes taken for it (the next change notes
 * again); a record that does not decode is not restored (the upstream starts afresh) and
 * is overwritten by the next note.  Records of upstreams no longer configured stay
 * (a few hundred bytes each) and are ignored.
 *
 * Record (see spool/DESIGN.md "Upstream state"), version 1: i64 saved, u8 unhealthy,
 * i64 since, str reason, str action, i64 paused_until, i64 next_pause, u32
 * failed_sessions, i64 next_cohort_pause, u32 nsent + i64 each, u32 nbuckets + (i64
 * minute, u32 count) each.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/xalloc.h"
#include "spool/spool_int.h"

#define STATE_V1 1
#define STATE_NAME_MAX 255

struct spool__statepend {
    struct spool__statepend *next;
    struct spool_upstate st;
};

static char *dup_or_null(const char *s)
{
    return s != NULL ? xstrdup(s) : NULL;
}

void spool_upstate_clear(struct spool_upstate *st)
{
    free(st->name);
    free(st->reason);
    free(st->action);
    free(st->sent);
    free(st->buckets);
    memset(st, 0, sizeof(*st));
}

struct spool_upstate *spool_upstate_free(struct spool_upstate *st)
{
    if (st != NULL) {
        spool_upstate_clear(st);
        free(st);
    }
    return NULL;
}

static void copy(struct spool_upstate *dst, const struct spool_upstate *src)
{
    *dst = *src;
    dst->name = xstrndup(src->name, STATE_NAME_MAX);
    dst->reason = dup_or_null(src->reason);
    dst->action = dup_or_null(src->action);
    if (dst->nsent > SPOOL_STATE_SENT_MAX)
        dst->nsent = SPOOL_STATE_SENT_MAX;
    if (dst->nbuckets > SPOOL_STATE_SENT_MAX)
        dst->nbuckets = SPOOL_STATE_SENT_MAX;
    dst->sent = xcalloc(dst->nsent + 1, sizeof(*dst->sent));
    if (dst->nsent > 0)
        memcpy(dst->sent, src->sent + (src->nsent - dst->nsent), dst->nsent * sizeof(*dst->sent));
    dst->buckets = xcalloc(dst->nbuckets + 1, sizeof(*dst->buckets));
    if (dst->nbuckets > 0)
        memcpy(dst->buckets, src->buckets, dst->nbuckets * sizeof(*dst->buckets));
}

/* ---- records ---- */

static void encode(const struct spool_upstate *st, struct buf *out)
{
    spool__rec_start(out, STATE_V1);
    spool__put_u64(out, (uint64_t)st->saved);
    spool__put_u8(out, st->unhealthy ? 1 : 0);
    spool__put_u64(out, (uint64_t)st->since);
    spool__put_str(out, st->reason);
    spool__put_str(out, st->action);
    spool__put_u64(out, (uint64_t)st->paused_until);
    spool__put_u64(out, (uint64_t)st->next_pause);
    spool__put_u32(out, st->failed_sessions < 0 ? 0 : (uint32_t)st->failed_sessions);
    spool__put_u64(out, (uint64_t)st->next_cohort_pause);
    spool__put_u32(out, (uint32_t)st->nsent);
    for (size_t i = 0; i < st->nsent; i++)
        spool__put_u64(out, (uint64_t)st->sent[i]);
    spool__put_u32(out, (uint32_t)st->nbuckets);
    for (size_t i = 0; i < st->nbuckets; i++) {
        spool__put_u64(out, (uint64_t)st->buckets[i].minute);
        spool__put_u32(out, st->buckets[i].count);
    }
    spool__rec_finish(out);
}

void *spool_upstate_encode(const struct spool_upstate *st, size_t *len)
{
    struct buf *b = buf_new(0);
    void *p;

    encode(st, b);
    *len = b->len;
    p = xmalloc(b->len);
    memcpy(p, b->data, b->len);
    buf_free(b);
    return p;
}

int spool_upstate_decode(const void *p, size_t n, const char *name, struct spool_upstate *st)
{
    struct spool__rd r;
    uint32_t k;
    unsigned v;

    memset(st, 0, sizeof(*st));
    if (spool__rec_header(&r, p, n, STATE_V1, STATE_V1, &v) != 0)
        return SPOOL_ECORRUPT;
    st->name = xstrdup(name);
    st->saved = (int64_t)spool__get_u64(&r);
    st->unhealthy = (int)spool__get_u8(&r);
    st->since = (int64_t)spool__get_u64(&r);
    st->reason = spool__get_str(&r);
    st->action = spool__get_str(&r);
    st->paused_until = (int64_t)spool__get_u64(&r);
    st->next_pause = (int64_t)spool__get_u64(&r);
    st->failed_sessions = (int)spool__get_u32(&r);
    st->next_cohort_pause = (int64_t)spool__get_u64(&r);
    k = spool__get_u32(&r);
    if (r.bad || k > (r.n - r.off) / 8)
        goto corrupt; /* a bound before allocating */
    st->sent = xcalloc((size_t)k + 1, sizeof(*st->sent));
    for (st->nsent = 0; st->nsent < k; st->nsent++)
        st->sent[st->nsent] = (int64_t)spool__get_u64(&r);
    k = spool__get_u32(&r);
    if (r.bad || k > (r.n - r.off) / 12)
        goto corrupt;
    st->buckets = xcalloc((size_t)k + 1, sizeof(*st->buckets));
    for (st->nbuckets = 0; st->nbuckets < k; st->nbuckets++) {
        st->buckets[st->nbuckets].minute = (int64_t)spool__get_u64(&r);
        st->buckets[st->nbuckets].count = spool__get_u32(&r);
    }
    if (r.bad || r.off != r.n || st->unhealthy > 1)
        goto corrupt;
    return 0;
corrupt:
    spool_upstate_clear(st);
    return SPOOL_ECORRUPT;
}

/* ---- pending notes ---- */

void spool_upstate_note(struct spool *sp, const struct spool_upstate *st)
{
    struct spool__statepend *p;
    int was_empty;

    if (sp == NULL || st->name == NULL || sp->opts.readonly)
        return;
    pthread_mutex_lock(&sp->devlock);
    for (p = sp->statepend; p != NULL; p = p->next)
        if (strcmp(p->st.name, st->name) == 0)
            break;
    if (p == NULL) {
        p = xcalloc(1, sizeof(*p));
        p->next = sp->statepend;
        sp->statepend = p;
    } else {
        spool_upstate_clear(&p->st);
    }
    copy(&p->st, st);
    was_empty = sp->statepend_since == 0;
    if (was_empty)
        sp->statepend_since = (int64_t)time(NULL);
    pthread_mutex_unlock(&sp->devlock);
    if (was_empty)
        spool__writer_nudge(sp); /* it may sleep without a deadline: give it one */
}

struct spool__statepend *spool__state_take(struct spool *sp)
{
    struct spool__statepend *list;

    pthread_mutex_lock(&sp->devlock);
    list = sp->statepend;
    sp->statepend = NULL;
    sp->statepend_since = 0;
    pthread_mutex_unlock(&sp->devlock);
    return list;
}

void spool__state_free(struct spool__statepend *list)
{
    struct spool__statepend *next;

    for (; list != NULL; list = next) {
        next = list->next;
        spool_upstate_clear(&list->st);
        free(list);
    }
}

int spool__state_open(struct spool *sp, MDB_txn *txn, unsigned dflags)
{
    int rc = mdb_dbi_open(txn, "state", dflags, &sp->state);

    if (rc == MDB_NOTFOUND && sp->opts.readonly)
        return 0; /* a spool no relayd with upstream state has written to yet */
    if (rc == 0)
        sp->have_state = 1;
    return rc;
}

int spool__state_apply(struct spool *sp, MDB_txn *txn, const struct spool__statepend *list)
{
    struct buf *out = buf_new(0);
    int rc = 0;

    for (; list != NULL && rc == 0; list = list->next) {
        MDB_val k = {strlen(list->st.name), list->st.name}, v;

        encode(&list->st, out);
        v.mv_size = out->len;
        v.mv_data = out->data;
        rc = mdb_put(txn, sp->state, &k, &v, 0);
    }
    buf_free(out);
    return rc;
}

/* ---- reads ---- */

int spool_upstate_get(struct spool *sp, const char *name, struct spool_upstate **out)
{
    MDB_txn *txn;
    MDB_val k = {strlen(name), (void *)name}, v;
    struct spool_upstate st;
    int rc;

    *out = NULL;
    if (!sp->have_state)
        return SPOOL_ENOTFOUND;
    if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
        return spool__from_mdb(rc, "read upstream state");
    rc = mdb_get(txn, sp->state, &k, &v);
    if (rc == 0)
        rc = spool_upstate_decode(v.mv_data, v.mv_size, name, &st) == 0 ? 0 : MDB_NOTFOUND;
    spool__txn_abort(sp, txn);
    if (rc == MDB_NOTFOUND)
        return SPOOL_ENOTFOUND;
    if (rc != 0)
        return spool__from_mdb(rc, "read upstream state");
    *out = xmalloc(sizeof(**out));
    **out = st;
    return 0;
}

int spool_upstate_list(struct spool *sp, struct spool_upstate **out, size_t *n)
{
    struct spool_upstate *list = NULL;
    size_t cnt = 0, cap = 0;
    MDB_cursor *cur;
    MDB_txn *txn;
    MDB_val k, v;
    int rc;

    *out = NULL;
    *n = 0;
    if (!sp->have_state)
        return 0;
    if ((rc = spool__txn_begin(sp, MDB_RDONLY, &txn)) != 0)
        return spool__from_mdb(rc, "read upstream state");
    if ((rc = mdb_cursor_open(txn, sp->state, &cur)) != 0) {
        spool__txn_abort(sp, txn);
        return spool__from_mdb(rc, "read upstream state");
    }
    for (rc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); rc == 0;
         rc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
        char name[STATE_NAME_MAX + 1];

        if (k.mv_size > STATE_NAME_MAX)
            continue;
        memcpy(name, k.mv_data, k.mv_size);
        name[k.mv_size] = '\0';
        if (cnt == cap) {
            cap = cap ? cap * 2 : 8;
            list = xrealloc(list, cap * sizeof(*list));
        }
        if (spool_upstate_decode(v.mv_data, v.mv_size, name, &list[cnt]) == 0)
            cnt++;
    }
    mdb_cursor_close(cur);
    spool__txn_abort(sp, txn);
    *out = list;
    *n = cnt;
    return rc == MDB_NOTFOUND ? 0 : spool__from_mdb(rc, "read upstream state");
}

void spool_upstate_list_free(struct spool_upstate *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        spool_upstate_clear(&list[i]);
    free(list);
}
