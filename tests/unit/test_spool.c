/*
 * test_spool - the LMDB spool: ids, group-committed writes, update semantics, the
 * schedule index, limits, map growth and concurrent readers/writers.
 *
 * Each test gets its own spool directory under /tmp, removed in teardown.  Writes go
 * through the real writer thread; the test thread plays the event loop: wake() signals a
 * condition variable and the test calls spool_writer_reap().
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <errno.h>
#include <lmdb.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "spool/spool.h"
#include "tests/lib/testlib.h"

static char tdir[64];
static char sdir[96];

static void setup(void)
{
    testlib_tmpdir(tdir, sizeof(tdir), "test_spool");
    snprintf(sdir, sizeof(sdir), "%s/spool", tdir);
}

static void teardown(void)
{
    testlib_rmtree(tdir);
}

TestSuite(spool, .init = setup, .fini = teardown, .timeout = 60);

/* ---- the test thread as event loop ---- */

struct result {
    int called;
    int rc;
};

static void on_done(void *arg, int rc)
{
    struct result *r = arg;

    r->called++;
    r->rc = rc;
}

/* Reaps until *count reaches want (bounded: 20 s). */
static void reap_until(struct spool *sp, const int *count, int want)
{
    testlib_spool_reap_until(sp, count, want);
}

static struct spool *open_rw(const struct spool_opts *o)
{
    struct spool_opts def = {0};
    struct spool *sp = NULL;
    char err[256];
    int rc = spool_open(sdir, o ? o : &def, &sp, err, sizeof(err));

    cr_assert(eq(int, rc, 0), "spool_open: %s", err);
    cr_assert(eq(int, spool_writer_start(sp, testlib_spool_wake, NULL), 0));
    return sp;
}

static void fill_msg(struct spool_msg *m, struct spool_rcpt *r, uint64_t id, const char *sender)
{
    memset(m, 0, sizeof(*m));
    m->id = id;
    m->state = SPOOL_QUEUED;
    m->arrived = time(NULL);
    m->next_attempt = m->arrived;
    m->sender = (char *)sender;
    m->client = "10.0.0.7";
    m->helo = "fax.lan";
    m->listener = "lan";
    r[0] = (struct spool_rcpt){"a@example.org", SPOOL_RCPT_PENDING, NULL, 0, NULL};
    r[1] = (struct spool_rcpt){"b@example.org", SPOOL_RCPT_PENDING, NULL, 0, NULL};
    m->rcpts = r;
    m->nrcpts = 2;
}

/* Stores a 2-recipient message synchronously (put + reap); returns the callback rc. */
static int put_one(struct spool *sp, uint64_t id, int64_t next_attempt, enum spool_state st,
                   size_t len)
{
    struct spool_msg m;
    struct spool_rcpt r[2];
    struct result res = {0};
    char *body = malloc(len ? len : 1);

    memset(body, 'x', len);
    fill_msg(&m, r, id, "fax@lan");
    m.next_attempt = next_attempt;
    m.state = st;
    spool_put_async(sp, &m, body, len, on_done, &res);
    reap_until(sp, &res.called, 1);
    return res.rc;
}

static int update_one(struct spool *sp, const struct spool_update *u)
{
    struct result res = {0};

    spool_update_async(sp, u, on_done, &res);
    reap_until(sp, &res.called, 1);
    return res.rc;
}

/* ---- tests ---- */

/* Opening creates the directory (0700) and the spool; it reopens cleanly. */
Test(spool, open_close)
{
    struct spool *sp = open_rw(NULL);
    struct stat st;

    spool_close(sp);
    cr_assert(eq(int, stat(sdir, &st), 0));
    cr_assert(eq(int, st.st_mode & 0777, 0700));
    sp = open_rw(NULL);
    spool_close(sp);
    spool_close(NULL);
}

/* Readonly open of a missing spool fails with a message instead of creating it. */
Test(spool, readonly_missing)
{
    struct spool_opts o = {.readonly = 1};
    struct spool *sp = NULL;
    char err[256] = "";

    cr_assert(ne(int, spool_open(sdir, &o, &sp, err, sizeof(err)), 0));
    cr_assert(sp == NULL);
    cr_assert(strstr(err, sdir) != NULL, "%s", err);
    cr_assert(ne(int, access(sdir, F_OK), 0));
}

/* Ids print as 12 upper-case hex digits and parse case-insensitively. */
Test(spool, id_format)
{
    char s[17];
    uint64_t id;

    cr_assert(eq(str, spool_id_str(0x190A3F2C1D4ull, s), "0190A3F2C1D4"));
    cr_assert(eq(int, spool_id_parse("0190a3f2c1d4", &id), 0));
    cr_assert(eq(u64, id, 0x190A3F2C1D4ull));
    cr_assert(eq(int, spool_id_parse("0190A3F2C1D4", &id), 0));
    cr_assert(eq(u64, id, 0x190A3F2C1D4ull));
    cr_assert(ne(int, spool_id_parse("", &id), 0));
    cr_assert(ne(int, spool_id_parse("0190A3F2C1DZ", &id), 0));
    cr_assert(ne(int, spool_id_parse("00112233445566778899", &id), 0));
}

/* Ids strictly increase within the process and across a restart, even when the clock
 * is behind the newest stored id. */
Test(spool, id_monotonic)
{
    struct spool *sp = open_rw(NULL);
    uint64_t prev = 0, future;
    struct timeval tv;

    for (int i = 0; i < 10000; i++) {
        uint64_t id = spool_id_new(sp);

        cr_assert(gt(u64, id, prev));
        prev = id;
    }
    gettimeofday(&tv, NULL);
    cr_assert(ge(u64, prev + 1000, (uint64_t)tv.tv_sec * 1000), "ids are unix milliseconds");
    future = prev + 3600 * 1000;
    cr_assert(eq(int, put_one(sp, future, 0, SPOOL_QUEUED, 10), 0));
    spool_close(sp);
    sp = open_rw(NULL);
    cr_assert(gt(u64, spool_id_new(sp), future));
    spool_close(sp);
}

/* Ids keep increasing after the newest message was delivered (meta last_id). */
Test(spool, id_after_delete)
{
    struct spool *sp = open_rw(NULL);
    uint64_t future = spool_id_new(sp) + 3600 * 1000;

    cr_assert(eq(int, put_one(sp, future, 0, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, spool_msg_delete(sp, future), 0));
    spool_close(sp);
    sp = open_rw(NULL);
    cr_assert(gt(u64, spool_id_new(sp), future));
    spool_close(sp);
}

/* A put round-trips: envelope, recipients and body. */
Test(spool, put_get)
{
    struct spool *sp = open_rw(NULL);
    struct spool_msg m, *g;
    struct spool_rcpt r[2];
    struct result res = {0};
    const char *text = "Subject: hi\r\n\r\nbody\r\n";
    char *body = strdup(text), *data;
    size_t len;
    uint64_t id = spool_id_new(sp);

    fill_msg(&m, r, id, "");
    r[1].reply = "250 earlier";
    spool_put_async(sp, &m, body, strlen(text), on_done, &res);
    reap_until(sp, &res.called, 1);
    cr_assert(eq(int, res.rc, 0));

    cr_assert(eq(int, spool_msg_get(sp, id, SPOOL_GET_HISTORY, &g), 0));
    cr_assert(eq(u64, g->id, id));
    cr_assert(eq(int, g->state, SPOOL_QUEUED));
    cr_assert(eq(str, g->sender, ""));
    cr_assert(eq(str, g->client, "10.0.0.7"));
    cr_assert(eq(str, g->helo, "fax.lan"));
    cr_assert(eq(str, g->listener, "lan"));
    cr_assert(g->last_error == NULL);
    cr_assert(eq(u64, g->size, strlen(text)));
    cr_assert(eq(sz, g->nrcpts, 2));
    cr_assert(eq(str, g->rcpts[0].addr, "a@example.org"));
    cr_assert(g->rcpts[0].reply == NULL);
    cr_assert(eq(str, g->rcpts[1].addr, "b@example.org"));
    cr_assert(eq(str, g->rcpts[1].reply, "250 earlier"));
    cr_assert(eq(sz, g->nattempts_log, 0));
    g = spool_msg_free(g);
    cr_assert(g == NULL);

    cr_assert(eq(int, spool_body_get(sp, id, &data, &len), 0));
    cr_assert(eq(sz, len, strlen(text)));
    cr_assert(eq(int, memcmp(data, text, len), 0));
    free(data);
    cr_assert(eq(int, spool_msg_get(sp, id + 1, 0, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_body_get(sp, id + 1, &data, &len), SPOOL_ENOTFOUND));
    spool_close(sp);
}

/* Partial delivery keeps the pending recipient and reschedules; all sent deletes. */
Test(spool, update_partial_then_done)
{
    struct spool *sp = open_rw(NULL);
    uint64_t id = spool_id_new(sp), ids[8];
    int64_t now = time(NULL);
    size_t idx0 = 0, idx1 = 1, n;
    enum spool_rcpt_status sent = SPOOL_RCPT_SENT;
    const char *reply0 = "250 2.0.0 ok", *reply1 = "451 try later";
    enum spool_rcpt_status pend = SPOOL_RCPT_PENDING;
    struct spool_update u = {
        .id = id,
        .state = SPOOL_DEFERRED,
        .next_attempt = now + 60,
        .count_attempt = 1,
        .last_error = "451 try later",
        .upstream = "provider",
        .result = "deferred: 451 try later",
        .nrcpts = 1,
        .rcpt_index = &idx0,
        .rcpt_status = &sent,
        .rcpt_reply = &reply0,
    };
    struct spool_msg *g;
    char *data;
    size_t len;

    cr_assert(eq(int, put_one(sp, id, now, SPOOL_QUEUED, 100), 0));
    cr_assert(eq(int, update_one(sp, &u), 0));
    /* The second recipient's reply is recorded with a second update. */
    u.rcpt_index = &idx1;
    u.rcpt_status = &pend;
    u.rcpt_reply = &reply1;
    u.count_attempt = 0;
    u.result = NULL;
    cr_assert(eq(int, update_one(sp, &u), 0));

    cr_assert(eq(int, spool_msg_get(sp, id, SPOOL_GET_HISTORY, &g), 0));
    cr_assert(eq(int, g->state, SPOOL_DEFERRED));
    cr_assert(eq(i64, g->next_attempt, now + 60));
    cr_assert(eq(int, g->attempts, 1));
    cr_assert(eq(str, g->last_error, "451 try later"));
    cr_assert(eq(int, g->rcpts[0].status, SPOOL_RCPT_SENT));
    cr_assert(eq(str, g->rcpts[0].reply, "250 2.0.0 ok"));
    cr_assert(eq(int, g->rcpts[1].status, SPOOL_RCPT_PENDING));
    cr_assert(eq(str, g->rcpts[1].reply, "451 try later"));
    cr_assert(eq(sz, g->nattempts_log, 1));
    cr_assert(eq(str, g->attempts_log[0].upstream, "provider"));
    cr_assert(eq(str, g->attempts_log[0].result, "deferred: 451 try later"));
    spool_msg_free(g);

    cr_assert(eq(int, spool_due(sp, now, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 0));
    cr_assert(eq(int, spool_due(sp, now + 60, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_assert(eq(u64, ids[0], id));

    /* Second attempt delivers the rest: the message disappears entirely. */
    u.rcpt_status = &sent;
    u.result = "sent";
    u.count_attempt = 1;
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_get(sp, id, SPOOL_GET_HISTORY, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_body_get(sp, id, &data, &len), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_due(sp, now + 1000, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 0));
    /* A later update of the gone message reports it, without disturbing anything. */
    cr_assert(eq(int, update_one(sp, &u), SPOOL_ENOTFOUND));
    spool_close(sp);
}

/* A permanent failure of a recipient leaves the message FAILED and unscheduled; retry
 * makes it QUEUED, due now, with the failed recipient pending again. */
Test(spool, update_failed_then_retry)
{
    struct spool *sp = open_rw(NULL);
    uint64_t id = spool_id_new(sp), ids[8];
    int64_t now = time(NULL);
    size_t idx[2] = {0, 1}, n;
    enum spool_rcpt_status st[2] = {SPOOL_RCPT_SENT, SPOOL_RCPT_FAILED};
    struct spool_update u = {
        .id = id,
        .state = SPOOL_DEFERRED,
        .next_attempt = now + 60,
        .count_attempt = 1,
        .last_error = "550 no such user",
        .result = "failed: 550 no such user",
        .nrcpts = 2,
        .rcpt_index = idx,
        .rcpt_status = st,
    };
    struct spool_msg *g;

    cr_assert(eq(int, put_one(sp, id, now, SPOOL_QUEUED, 100), 0));
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_assert(eq(int, g->state, SPOOL_FAILED));
    cr_assert(eq(i64, g->next_attempt, 0));
    cr_assert(eq(int, g->rcpts[1].status, SPOOL_RCPT_FAILED));
    spool_msg_free(g);
    cr_assert(eq(int, spool_due(sp, now + 100000, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 0));

    cr_assert(eq(int, spool_msg_retry(sp, id), 0));
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_assert(eq(int, g->state, SPOOL_QUEUED));
    cr_assert(eq(int, g->rcpts[0].status, SPOOL_RCPT_SENT));
    cr_assert(eq(int, g->rcpts[1].status, SPOOL_RCPT_PENDING));
    spool_msg_free(g);
    cr_assert(eq(int, spool_due(sp, time(NULL), ids, 8, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_assert(eq(int, spool_msg_retry(sp, id + 1), SPOOL_ENOTFOUND));
    spool_close(sp);
}

/* spool_due returns QUEUED/DEFERRED messages by next_attempt, not id; hold and release
 * take them out of and back into the schedule. */
Test(spool, due_order_and_hold)
{
    struct spool *sp = open_rw(NULL);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp), c = spool_id_new(sp);
    uint64_t d = spool_id_new(sp), ids[8];
    size_t n;

    cr_assert(eq(int, put_one(sp, a, 300, SPOOL_QUEUED, 1), 0));
    cr_assert(eq(int, put_one(sp, b, 100, SPOOL_QUEUED, 1), 0));
    cr_assert(eq(int, put_one(sp, c, 200, SPOOL_QUEUED, 1), 0));
    cr_assert(eq(int, put_one(sp, d, 0, SPOOL_HELD, 1), 0));
    cr_assert(eq(int, spool_due(sp, 250, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 2));
    cr_assert(eq(u64, ids[0], b));
    cr_assert(eq(u64, ids[1], c));
    cr_assert(eq(int, spool_due(sp, 1000, ids, 2, &n), 0));
    cr_assert(eq(sz, n, 2), "max is respected");
    cr_assert(eq(int, spool_due(sp, 1000, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 3));
    cr_assert(eq(u64, ids[2], a));

    cr_assert(eq(int, spool_msg_set_state(sp, b, SPOOL_HELD), 0));
    cr_assert(eq(int, spool_due(sp, 1000, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 2));
    cr_assert(eq(int, spool_msg_set_state(sp, d, SPOOL_QUEUED), 0)); /* release: due now */
    cr_assert(eq(int, spool_due(sp, 1000, ids, 8, &n), 0));
    cr_assert(eq(sz, n, 2), "released message is due now, not at 1000");
    cr_assert(eq(int, spool_due(sp, time(NULL), ids, 8, &n), 0));
    cr_assert(eq(sz, n, 3));
    cr_assert(eq(u64, ids[2], d));
    spool_close(sp);
}

static int count_cb(const struct spool_msg *m, void *arg)
{
    (void)m;
    (*(int *)arg)++;
    return 0;
}

static int stop_cb(const struct spool_msg *m, void *arg)
{
    (void)m;
    return ++(*(int *)arg) == 3;
}

/* foreach visits every message in id order (across its internal chunks) and stops early. */
Test(spool, foreach)
{
    struct spool *sp = open_rw(NULL);
    int n = 0;

    for (int i = 0; i < 300; i++) {
        struct spool_msg m;
        struct spool_rcpt r[2];

        fill_msg(&m, r, spool_id_new(sp), "x@y");
        spool_put_async(sp, &m, strdup("b"), 1, NULL, NULL);
    }
    spool_close(sp); /* commits every queued job */
    sp = open_rw(NULL);
    cr_assert(eq(int, spool_foreach(sp, count_cb, &n), 0));
    cr_assert(eq(int, n, 300));
    n = 0;
    cr_assert(eq(int, spool_foreach(sp, stop_cb, &n), 0));
    cr_assert(eq(int, n, 3));
    spool_close(sp);
}

/* A spool with an unknown schema version is refused and left untouched. */
Test(spool, schema_version_refused)
{
    struct spool *sp = open_rw(NULL);
    struct spool_opts o = {0};
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    MDB_val k = {6, "schema"}, d;
    unsigned char v[4] = {0, 0, 0, 99};
    char err[256] = "", want[256];

    spool_close(sp);
    cr_assert(eq(int, mdb_env_create(&env), 0));
    mdb_env_set_maxdbs(env, 8);
    mdb_env_set_mapsize(env, 64 << 20);
    cr_assert(eq(int, mdb_env_open(env, sdir, 0, 0600), 0));
    cr_assert(eq(int, mdb_txn_begin(env, NULL, 0, &txn), 0));
    cr_assert(eq(int, mdb_dbi_open(txn, "meta", 0, &dbi), 0));
    d.mv_size = 4;
    d.mv_data = v;
    cr_assert(eq(int, mdb_put(txn, dbi, &k, &d, 0), 0));
    cr_assert(eq(int, mdb_txn_commit(txn), 0));
    mdb_env_close(env);

    cr_assert(eq(int, spool_open(sdir, &o, &sp, err, sizeof(err)), SPOOL_EVERSION));
    snprintf(want, sizeof(want), "spool %s has schema version 99; this relayd understands 1", sdir);
    cr_assert(eq(str, err, want));
    o.readonly = 1;
    cr_assert(eq(int, spool_open(sdir, &o, &sp, err, sizeof(err)), SPOOL_EVERSION));

    cr_assert(eq(int, mdb_env_create(&env), 0));
    mdb_env_set_maxdbs(env, 8);
    cr_assert(eq(int, mdb_env_open(env, sdir, MDB_RDONLY, 0600), 0));
    cr_assert(eq(int, mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0));
    cr_assert(eq(int, mdb_dbi_open(txn, "meta", 0, &dbi), 0));
    cr_assert(eq(int, mdb_get(txn, dbi, &k, &d), 0));
    cr_assert(eq(int, ((unsigned char *)d.mv_data)[3], 99), "never rewritten");
    mdb_txn_abort(txn);
    mdb_env_close(env);
}

/* The map grows past its initial size; every message stays readable. */
Test(spool, map_growth)
{
    struct spool_opts o = {.map_bytes = 2 << 20};
    struct spool *sp = open_rw(&o);
    struct spool_stats st;
    uint64_t ids[12];
    char *data;
    size_t len;

    for (int i = 0; i < 12; i++) {
        ids[i] = spool_id_new(sp);
        cr_assert(eq(int, put_one(sp, ids[i], 0, SPOOL_QUEUED, 1 << 20), 0), "put %d", i);
    }
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(gt(u64, st.map_bytes, 12ull << 20));
    cr_assert(eq(u64, st.messages, 12));
    cr_assert(eq(u64, st.bytes, 12ull << 20));
    for (int i = 0; i < 12; i++) {
        cr_assert(eq(int, spool_body_get(sp, ids[i], &data, &len), 0));
        cr_assert(eq(sz, len, 1 << 20));
        cr_assert(eq(int, data[len - 1], 'x'));
        free(data);
    }
    spool_close(sp);
    /* A readonly open adopts the grown size from the file. */
    o.readonly = 1;
    {
        char err[256];

        cr_assert(eq(int, spool_open(sdir, &o, &sp, err, sizeof(err)), 0), "%s", err);
        cr_assert(eq(int, spool_body_get(sp, ids[11], &data, &len), 0));
        free(data);
        spool_close(sp);
    }
}

/* max_bytes refuses new messages with SPOOL_EFULL (alone in its batch), while earlier
 * messages stay intact and updates/deletes still work. */
Test(spool, max_bytes)
{
    struct spool_opts o = {.max_bytes = 3000};
    struct spool *sp = open_rw(&o);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp), c = spool_id_new(sp);
    struct spool_msg m, *g;
    struct spool_rcpt r[2];
    struct result ra = {0}, rb = {0};
    size_t idx = 0;
    enum spool_rcpt_status sent = SPOOL_RCPT_SENT;
    struct spool_update u = {
        .id = a,
        .state = SPOOL_DEFERRED,
        .next_attempt = 5,
        .nrcpts = 1,
        .rcpt_index = &idx,
        .rcpt_status = &sent,
        .result = "partial",
    };

    cr_assert(eq(int, put_one(sp, a, 0, SPOOL_QUEUED, 1000), 0));
    /* One batch: the first fits, the second does not. */
    fill_msg(&m, r, b, "x@y");
    spool_put_async(sp, &m, calloc(1, 1500), 1500, on_done, &ra);
    fill_msg(&m, r, c, "x@y");
    spool_put_async(sp, &m, calloc(1, 1500), 1500, on_done, &rb);
    reap_until(sp, &rb.called, 1);
    reap_until(sp, &ra.called, 1);
    cr_assert(eq(int, ra.rc, 0));
    cr_assert(eq(int, rb.rc, SPOOL_EFULL));
    cr_assert(eq(int, spool_msg_get(sp, c, 0, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_msg_get(sp, a, 0, &g), 0));
    cr_assert(eq(u64, g->size, 1000));
    spool_msg_free(g);
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_set_state(sp, a, SPOOL_HELD), 0));
    cr_assert(eq(int, spool_msg_delete(sp, a), 0));
    cr_assert(eq(int, spool_msg_delete(sp, a), SPOOL_ENOTFOUND));
    cr_assert(eq(int, put_one(sp, c, 0, SPOOL_QUEUED, 1400), 0), "room again");
    spool_close(sp);
}

/* spool_room() answers as the writer would: max_bytes and the disk reserve. */
Test(spool, room)
{
    struct spool_opts o = {.max_bytes = 3000};
    struct spool *sp = open_rw(&o);

    cr_assert(eq(int, spool_room(sp, 3000), 0));
    cr_assert(eq(int, spool_room(sp, 3001), SPOOL_EFULL));
    cr_assert(eq(int, put_one(sp, spool_id_new(sp), 0, SPOOL_QUEUED, 1000), 0));
    cr_assert(eq(int, spool_room(sp, 2000), 0));
    cr_assert(eq(int, spool_room(sp, 2001), SPOOL_EFULL));
    spool_close(sp);
    /* A reserve larger than any disk refuses everything, even an empty message. */
    o = (struct spool_opts){.reserve_bytes = UINT64_MAX / 4};
    sp = open_rw(&o);
    cr_assert(eq(int, spool_room(sp, 0), SPOOL_EFULL));
    cr_assert(eq(int, put_one(sp, spool_id_new(sp), 0, SPOOL_QUEUED, 10), SPOOL_EFULL));
    spool_close(sp);
}

/* purge removes failed messages only (optionally only old ones), in one commit, and
 * keeps the byte count right. */
Test(spool, purge_failed)
{
    struct spool *sp = open_rw(NULL);
    uint64_t q = spool_id_new(sp), f1 = spool_id_new(sp), f2 = spool_id_new(sp),
             h = spool_id_new(sp);
    struct spool_stats st;
    struct spool_msg *g;
    size_t n = 99;

    cr_assert(eq(int, put_one(sp, q, 0, SPOOL_QUEUED, 100), 0));
    cr_assert(eq(int, put_one(sp, f1, 0, SPOOL_QUEUED, 200), 0));
    cr_assert(eq(int, put_one(sp, f2, 0, SPOOL_QUEUED, 300), 0));
    cr_assert(eq(int, put_one(sp, h, 0, SPOOL_HELD, 400), 0));
    cr_assert(eq(int, spool_msg_set_state(sp, f1, SPOOL_FAILED), 0));
    cr_assert(eq(int, spool_msg_set_state(sp, f2, SPOOL_FAILED), 0));
    /* Nothing arrived before 1970-01-01T00:00:10Z. */
    cr_assert(eq(int, spool_purge(sp, SPOOL_FAILED, 10, &n), 0));
    cr_assert(eq(sz, n, 0));
    cr_assert(eq(int, spool_purge(sp, 0, 0, &n), -EINVAL));
    cr_assert(eq(int, spool_purge(sp, SPOOL_FAILED, 0, &n), 0));
    cr_assert(eq(sz, n, 2));
    cr_assert(eq(int, spool_msg_get(sp, f1, 0, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_msg_get(sp, f2, 0, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, 2));
    cr_assert(eq(u64, st.bytes, 500));
    cr_assert(eq(u64, st.by_state[SPOOL_FAILED], 0));
    cr_assert(eq(int, spool_purge(sp, SPOOL_FAILED, 0, NULL), 0), "nothing left is fine");
    spool_close(sp);
}

struct wr {
    struct spool *sp;
    int n;
    struct result *res;
};

static void *writer_thread(void *arg)
{
    struct wr *w = arg;

    for (int i = 0; i < w->n; i++) {
        struct spool_msg m;
        struct spool_rcpt r[2];

        fill_msg(&m, r, spool_id_new(w->sp), "t@lan");
        spool_put_async(w->sp, &m, strdup("Subject: t\r\n\r\nx\r\n"), 17, on_done, &w->res[i]);
    }
    return NULL;
}

/* Several threads put concurrently; every message commits exactly once. */
Test(spool, concurrent_writers)
{
    enum { T = 4, N = 50 };
    struct spool *sp = open_rw(NULL);
    static struct result res[T][N];
    pthread_t th[T];
    struct wr w[T];
    int total = 0, n = 0;

    for (int t = 0; t < T; t++) {
        w[t] = (struct wr){sp, N, res[t]};
        cr_assert(eq(int, pthread_create(&th[t], NULL, writer_thread, &w[t]), 0));
    }
    for (int t = 0; t < T; t++)
        pthread_join(th[t], NULL);
    for (int i = 0; i < 10000 && total < T * N; i++) {
        spool_writer_reap(sp);
        total = 0;
        for (int t = 0; t < T; t++)
            for (int j = 0; j < N; j++) {
                total += res[t][j].called;
                cr_assert(eq(int, res[t][j].rc, 0));
            }
        usleep(1000);
    }
    cr_assert(eq(int, total, T *N));
    cr_assert(eq(int, spool_foreach(sp, count_cb, &n), 0));
    cr_assert(eq(int, n, T *N));
    spool_close(sp);
}

/* N puts submitted together share fsyncs: fewer commits than messages. */
Test(spool, group_commit)
{
    enum { N = 100 };
    struct spool *sp = open_rw(NULL);
    struct spool_stats st;

    for (int i = 0; i < N; i++) {
        struct spool_msg m;
        struct spool_rcpt r[2];

        fill_msg(&m, r, spool_id_new(sp), "g@lan");
        spool_put_async(sp, &m, strdup("x"), 1, NULL, NULL);
    }
    spool_close(sp); /* finishes every queued job */
    sp = open_rw(NULL);
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, N));
    spool_close(sp);

    /* The same, counted within one process lifetime. */
    sp = open_rw(NULL);
    {
        static struct result res[N];
        int called = 0;

        for (int i = 0; i < N; i++) {
            struct spool_msg m;
            struct spool_rcpt r[2];

            fill_msg(&m, r, spool_id_new(sp), "g@lan");
            spool_put_async(sp, &m, strdup("x"), 1, on_done, &res[i]);
        }
        for (int i = 0; i < 10000 && called < N; i++) {
            spool_writer_reap(sp);
            called = 0;
            for (int j = 0; j < N; j++)
                called += res[j].called;
            usleep(1000);
        }
        cr_assert(eq(int, called, N));
        cr_assert(eq(int, spool_stats(sp, &st), 0));
        cr_assert(eq(u64, st.committed_jobs, N));
        cr_assert(lt(u64, st.commits, N), "commits=%llu", (unsigned long long)st.commits);
        cr_assert(eq(u64, st.messages, 2 * N));
    }
    spool_close(sp);
}

/* Another process opens the spool read-only and reads while this one keeps writing;
 * a map growth by the writer is adopted by the reader. */
Test(spool, readonly_while_writing)
{
    struct spool_opts o = {.map_bytes = 1 << 20};
    struct spool *sp = open_rw(&o);
    uint64_t first = spool_id_new(sp);
    pid_t pid;
    int status;

    cr_assert(eq(int, put_one(sp, first, 0, SPOOL_QUEUED, 100), 0));
    pid = fork();
    cr_assert(ne(int, pid, -1));
    if (pid == 0) {
        struct spool_opts ro = {.readonly = 1};
        struct spool *r;
        char err[256];
        int bad = 0;

        usleep(10000);
        if (spool_open(sdir, &ro, &r, err, sizeof(err)) != 0)
            _exit(10);
        for (int i = 0; i < 200; i++) {
            struct spool_msg *g;
            int n = 0;

            if (spool_msg_get(r, first, 0, &g) != 0)
                bad = 11;
            spool_msg_free(g);
            if (spool_foreach(r, count_cb, &n) != 0 || n < 1)
                bad = 12;
            usleep(1000);
        }
        if (spool_msg_set_state(r, first, SPOOL_HELD) != -EROFS)
            bad = 13;
        spool_close(r);
        _exit(bad);
    }
    for (int i = 0; i < 40; i++)
        cr_assert(eq(int, put_one(sp, spool_id_new(sp), 0, SPOOL_QUEUED, 64 << 10), 0));
    cr_assert(eq(int, waitpid(pid, &status, 0), pid));
    cr_assert(eq(int, WIFEXITED(status) ? 1 : 0, 1));
    cr_assert(eq(int, WEXITSTATUS(status), 0));
    spool_close(sp);
}

/* A reader without write access to lock.mdb reads unlocked (MDB_NOLOCK) and still sees
 * consistent data while the writer stores and deletes (recycling pages) underneath. */
Test(spool, unlocked_reader_while_writing)
{
    struct spool_opts o = {.map_bytes = 1 << 20};
    struct spool *sp;
    uint64_t first;
    char path[160];
    pid_t pid;
    int status;

    if (geteuid() != 0)
        cr_skip_test("needs root to drop to another user");
    sp = open_rw(&o);
    first = spool_id_new(sp);
    cr_assert(eq(int, put_one(sp, first, 0, SPOOL_QUEUED, 100), 0));
    cr_assert(eq(int, chmod(tdir, 0755), 0));
    cr_assert(eq(int, chmod(sdir, 0755), 0));
    snprintf(path, sizeof(path), "%s/data.mdb", sdir);
    cr_assert(eq(int, chmod(path, 0644), 0));
    snprintf(path, sizeof(path), "%s/lock.mdb", sdir);
    cr_assert(eq(int, chmod(path, 0644), 0));
    pid = fork();
    cr_assert(ne(int, pid, -1));
    if (pid == 0) {
        struct spool_opts ro = {.readonly = 1};
        struct spool *r;
        char err[256];
        int bad = 0;

        if (setgid(65534) != 0 || setuid(65534) != 0)
            _exit(9);
        if (spool_open(sdir, &ro, &r, err, sizeof(err)) != 0)
            _exit(10);
        for (int i = 0; i < 300 && !bad; i++) {
            struct spool_msg *g;
            struct spool_stats st;
            char *body;
            size_t len;
            int n = 0;

            if (spool_msg_get(r, first, 0, &g) != 0 || strcmp(g->sender, "fax@lan") != 0)
                bad = 11;
            spool_msg_free(g);
            if (spool_body_get(r, first, &body, &len) != 0 || len != 100)
                bad = 12;
            free(body);
            if (spool_foreach(r, count_cb, &n) != 0 || n < 1)
                bad = 13;
            if (spool_stats(r, &st) != 0 || st.messages < 1)
                bad = 14;
        }
        if (spool_msg_set_state(r, first, SPOOL_HELD) != -EROFS)
            bad = 15;
        spool_close(r);
        _exit(bad);
    }
    /* Store and delete, so that freed pages are reused while the child reads. */
    for (int i = 0; i < 60; i++) {
        uint64_t id = spool_id_new(sp);

        cr_assert(eq(int, put_one(sp, id, 0, SPOOL_QUEUED, 32 << 10), 0));
        if (i % 2)
            cr_assert(eq(int, spool_msg_delete(sp, id), 0));
    }
    cr_assert(eq(int, waitpid(pid, &status, 0), pid));
    cr_assert(eq(int, WIFEXITED(status) ? 1 : 0, 1));
    cr_assert(eq(int, WEXITSTATUS(status), 0));
    spool_close(sp);
}

/* Writes after close or before start fail with SPOOL_ECLOSED through the callback. */
Test(spool, not_started)
{
    struct spool_opts o = {0};
    struct spool *sp;
    struct spool_msg m;
    struct spool_rcpt r[2];
    struct result res = {0};
    char err[256];

    cr_assert(eq(int, spool_open(sdir, &o, &sp, err, sizeof(err)), 0));
    fill_msg(&m, r, spool_id_new(sp), "x@y");
    spool_put_async(sp, &m, strdup("x"), 1, on_done, &res);
    spool_writer_reap(sp);
    cr_assert(eq(int, res.called, 1));
    cr_assert(eq(int, res.rc, SPOOL_ECLOSED));
    spool_close(sp);
}

/* State names and error strings. */
Test(spool, names)
{
    cr_assert(eq(str, (char *)spool_state_name(SPOOL_DEFERRED), "deferred"));
    cr_assert(eq(int, spool_state_parse("HELD"), SPOOL_HELD));
    cr_assert(eq(int, spool_state_parse("nope"), -1));
    cr_assert(eq(str, (char *)spool_strerror(SPOOL_EFULL), "spool full"));
}

/* ---- RFC 3461 DSN fields and envelope record versions ---- */

/* The raw envelope record of id, via LMDB directly (spool closed): malloc'd copy. */
static unsigned char *raw_record(uint64_t id, size_t *len)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    unsigned char kb[8], *out;
    MDB_val k = {8, kb}, d;

    for (int i = 0; i < 8; i++)
        kb[i] = (unsigned char)(id >> (56 - 8 * i));
    cr_assert(eq(int, mdb_env_create(&env), 0));
    mdb_env_set_maxdbs(env, 8);
    cr_assert(eq(int, mdb_env_open(env, sdir, MDB_RDONLY, 0600), 0));
    cr_assert(eq(int, mdb_txn_begin(env, NULL, MDB_RDONLY, &txn), 0));
    cr_assert(eq(int, mdb_dbi_open(txn, "msg", 0, &dbi), 0));
    cr_assert(eq(int, mdb_get(txn, dbi, &k, &d), 0));
    out = malloc(d.mv_size);
    memcpy(out, d.mv_data, d.mv_size);
    *len = d.mv_size;
    mdb_txn_abort(txn);
    mdb_env_close(env);
    return out;
}

/* Replaces the envelope record of id (spool closed). */
static void put_raw_record(uint64_t id, const void *p, size_t len)
{
    MDB_env *env;
    MDB_txn *txn;
    MDB_dbi dbi;
    unsigned char kb[8];
    MDB_val k = {8, kb}, d = {len, (void *)p};

    for (int i = 0; i < 8; i++)
        kb[i] = (unsigned char)(id >> (56 - 8 * i));
    cr_assert(eq(int, mdb_env_create(&env), 0));
    mdb_env_set_maxdbs(env, 8);
    mdb_env_set_mapsize(env, 64 << 20);
    cr_assert(eq(int, mdb_env_open(env, sdir, 0, 0600), 0));
    cr_assert(eq(int, mdb_txn_begin(env, NULL, 0, &txn), 0));
    cr_assert(eq(int, mdb_dbi_open(txn, "msg", 0, &dbi), 0));
    cr_assert(eq(int, mdb_put(txn, dbi, &k, &d, 0), 0));
    cr_assert(eq(int, mdb_txn_commit(txn), 0));
    mdb_env_close(env);
}

/* The version-1 envelope encoder as it was before DSN fields existed (DESIGN.md). */
struct v1buf {
    unsigned char b[1024];
    size_t n;
};
static void v1_u8(struct v1buf *w, unsigned v)
{
    w->b[w->n++] = (unsigned char)v;
}
static void v1_u32(struct v1buf *w, uint32_t v)
{
    for (int i = 3; i >= 0; i--)
        v1_u8(w, (v >> (8 * i)) & 0xff);
}
static void v1_u64(struct v1buf *w, uint64_t v)
{
    v1_u32(w, (uint32_t)(v >> 32));
    v1_u32(w, (uint32_t)v);
}
static void v1_str(struct v1buf *w, const char *s)
{
    if (s == NULL) {
        v1_u32(w, 0xFFFFFFFFu);
        return;
    }
    v1_u32(w, (uint32_t)strlen(s));
    memcpy(w->b + w->n, s, strlen(s));
    w->n += strlen(s);
}
static void v1_encode(struct v1buf *w, const struct spool_msg *m)
{
    w->n = 0;
    v1_u8(w, 1);
    v1_u32(w, 0);
    v1_u8(w, (unsigned)m->state);
    v1_u64(w, (uint64_t)m->arrived);
    v1_u64(w, (uint64_t)m->next_attempt);
    v1_u32(w, (uint32_t)m->attempts);
    v1_u64(w, m->size);
    v1_str(w, m->sender);
    v1_str(w, m->client);
    v1_str(w, m->helo);
    v1_str(w, m->listener);
    v1_str(w, m->last_error);
    v1_u32(w, (uint32_t)m->nrcpts);
    for (size_t i = 0; i < m->nrcpts; i++) {
        v1_str(w, m->rcpts[i].addr);
        v1_u8(w, (unsigned)m->rcpts[i].status);
        v1_str(w, m->rcpts[i].reply);
    }
    for (int i = 0; i < 4; i++)
        w->b[1 + i] = (unsigned char)(w->n >> (24 - 8 * i));
}

/* DSN parameters survive put, get, an update and a reopen; the record is version 2, and a
 * message without any stays version 1. */
Test(spool, dsn_round_trip)
{
    struct spool *sp = open_rw(NULL);
    struct spool_msg m, *g;
    struct spool_rcpt r[2];
    struct result res = {0};
    size_t idx[1] = {0}, len;
    enum spool_rcpt_status st[1] = {SPOOL_RCPT_SENT};
    const char *rep[1] = {"250 ok"};
    struct spool_update u;
    uint64_t id = spool_id_new(sp), plain = 0;
    unsigned char *raw;
    char *body = strdup("x\r\n");

    fill_msg(&m, r, id, "fax@lan");
    m.dsn_ret = SPOOL_RET_FULL;
    m.dsn_envid = "env 42+=\xc3\xa9";
    r[0].dsn_notify = SPOOL_NOTIFY_FAILURE | SPOOL_NOTIFY_DELAY;
    r[0].dsn_orcpt = "rfc822;A@example.org";
    r[1].dsn_notify = SPOOL_NOTIFY_NEVER;
    spool_put_async(sp, &m, body, 3, on_done, &res);
    reap_until(sp, &res.called, 1);
    cr_assert(eq(int, res.rc, 0));

    memset(&u, 0, sizeof(u));
    u.id = id;
    u.state = SPOOL_DEFERRED;
    u.next_attempt = time(NULL) + 60;
    u.nrcpts = 1;
    u.rcpt_index = idx;
    u.rcpt_status = st;
    u.rcpt_reply = rep;
    cr_assert(eq(int, update_one(sp, &u), 0));
    plain = spool_id_new(sp);
    cr_assert(eq(int, put_one(sp, plain, time(NULL), SPOOL_QUEUED, 5), 0));
    spool_close(sp);

    sp = open_rw(NULL);
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_expect(eq(int, g->dsn_ret, SPOOL_RET_FULL));
    cr_expect(eq(str, g->dsn_envid, "env 42+=\xc3\xa9"));
    cr_expect(eq(u32, g->rcpts[0].dsn_notify, SPOOL_NOTIFY_FAILURE | SPOOL_NOTIFY_DELAY));
    cr_expect(eq(str, g->rcpts[0].dsn_orcpt, "rfc822;A@example.org"));
    cr_expect(eq(int, (int)g->rcpts[0].status, SPOOL_RCPT_SENT));
    cr_expect(eq(u32, g->rcpts[1].dsn_notify, SPOOL_NOTIFY_NEVER));
    cr_expect(g->rcpts[1].dsn_orcpt == NULL);
    spool_msg_free(g);
    cr_assert(eq(int, spool_msg_get(sp, plain, 0, &g), 0));
    cr_expect(eq(int, g->dsn_ret, 0));
    cr_expect(g->dsn_envid == NULL && g->rcpts[0].dsn_orcpt == NULL);
    cr_expect(eq(u32, g->rcpts[0].dsn_notify, 0));
    spool_msg_free(g);
    spool_close(sp);

    raw = raw_record(id, &len);
    cr_expect(eq(int, raw[0], 2), "a message with DSN parameters: record version 2");
    free(raw);
    raw = raw_record(plain, &len);
    cr_expect(eq(int, raw[0], 1), "no DSN parameters: still record version 1");
    free(raw);
}

/* A record written by the version-1 encoder (before DSN fields) still reads, as "no DSN
 * parameters", and can be updated; a truncated version-2 record is corrupt. */
Test(spool, dsn_old_record_version)
{
    struct spool *sp = open_rw(NULL);
    struct spool_msg m, *g;
    struct spool_rcpt r[2];
    struct v1buf w;
    uint64_t id = spool_id_new(sp), id2;
    unsigned char *raw;
    size_t len;

    cr_assert(eq(int, put_one(sp, id, time(NULL), SPOOL_QUEUED, 5), 0));
    id2 = spool_id_new(sp);
    cr_assert(eq(int, put_one(sp, id2, time(NULL), SPOOL_QUEUED, 5), 0));
    spool_close(sp);

    /* Overwrite the first with an old-encoder record that differs visibly. */
    fill_msg(&m, r, id, "old@lan");
    m.last_error = "deferred: old";
    m.attempts = 3;
    r[1].status = SPOOL_RCPT_FAILED;
    r[1].reply = "550 gone";
    v1_encode(&w, &m);
    put_raw_record(id, w.b, w.n);

    sp = open_rw(NULL);
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_expect(eq(str, g->sender, "old@lan"));
    cr_expect(eq(str, g->last_error, "deferred: old"));
    cr_expect(eq(int, g->attempts, 3));
    cr_expect(eq(str, g->rcpts[1].reply, "550 gone"));
    cr_expect(eq(int, (int)g->rcpts[1].status, SPOOL_RCPT_FAILED));
    cr_expect(eq(int, g->dsn_ret, 0));
    cr_expect(g->dsn_envid == NULL);
    for (size_t i = 0; i < g->nrcpts; i++)
        cr_expect(g->rcpts[i].dsn_notify == 0 && g->rcpts[i].dsn_orcpt == NULL);
    spool_msg_free(g);
    cr_assert(eq(int, spool_msg_set_state(sp, id, SPOOL_HELD), 0));
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_expect(eq(int, (int)g->state, SPOOL_HELD));
    cr_expect(eq(str, g->rcpts[1].reply, "550 gone"));
    spool_msg_free(g);
    spool_close(sp);
    raw = raw_record(id, &len);
    cr_expect(eq(int, raw[0], 1));
    free(raw);

    /* Version 2 header over a version-1 body: the DSN fields are missing -> corrupt. */
    v1_encode(&w, &m);
    w.b[0] = 2;
    put_raw_record(id2, w.b, w.n);
    /* A version nobody wrote yet. */
    w.b[0] = 3;
    put_raw_record(id, w.b, w.n);
    sp = open_rw(NULL);
    cr_expect(eq(int, spool_msg_get(sp, id2, 0, &g), SPOOL_ECORRUPT));
    cr_expect(eq(int, spool_msg_get(sp, id, 0, &g), SPOOL_ECORRUPT));
    spool_close(sp);
}

/* Steady traffic does not grow the spool: pages freed by delivered messages are used again
 * (LMDB's free list), so after the first rounds the high-water mark stays put. */
Test(spool, freed_pages_reused)
{
    struct spool *sp = open_rw(NULL);
    struct spool_stats st;
    uint64_t after_warmup = 0;
    size_t idx[2] = {0, 1};
    enum spool_rcpt_status sent[2] = {SPOOL_RCPT_SENT, SPOOL_RCPT_SENT};

    for (int round = 0; round < 30; round++) {
        uint64_t ids[20];

        for (int i = 0; i < 20; i++) {
            ids[i] = spool_id_new(sp);
            cr_assert(eq(int, put_one(sp, ids[i], time(NULL), SPOOL_QUEUED, 20 * 1024), 0));
        }
        for (int i = 0; i < 20; i++) {
            struct spool_update u = {.id = ids[i], .state = SPOOL_QUEUED, .nrcpts = 2,
                                     .rcpt_index = idx, .rcpt_status = sent};
            cr_assert(eq(int, update_one(sp, &u), 0));
        }
        cr_assert(eq(int, spool_stats(sp, &st), 0));
        cr_assert(eq(u64, st.messages, 0)); /* delivered: gone */
        if (round == 4)
            after_warmup = st.used_bytes;
    }
    /* 30 rounds x 20 x 20 KB went through; the file's high-water mark barely moved. */
    cr_expect(st.used_bytes <= after_warmup + after_warmup / 4, "grew from %llu to %llu bytes",
              (unsigned long long)after_warmup, (unsigned long long)st.used_bytes);
    spool_close(sp);
}

/* ---- Delivery outcomes (issue #9) ---- */

/* Counters follow every write: puts, updates, holds, retries, deletes (stats is O(1)). */
Test(spool, stats_counters)
{
    struct spool *sp = open_rw(NULL);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp), c = spool_id_new(sp);
    size_t idx[1] = {0};
    enum spool_rcpt_status sent[1] = {SPOOL_RCPT_SENT};
    struct spool_update u;
    struct spool_stats st;

    cr_assert(eq(int, put_one(sp, a, 0, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, put_one(sp, b, 0, SPOOL_QUEUED, 20), 0));
    cr_assert(eq(int, put_one(sp, c, 0, SPOOL_HELD, 30), 0));
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, 3));
    cr_assert(eq(u64, st.by_state[SPOOL_QUEUED], 2));
    cr_assert(eq(u64, st.by_state[SPOOL_HELD], 1));
    cr_assert(eq(u64, st.recipients, 6));
    cr_assert(st.oldest_arrival != 0);
    /* One recipient of a sent, a deferred. */
    memset(&u, 0, sizeof(u));
    u.id = a;
    u.state = SPOOL_DEFERRED;
    u.next_attempt = 5;
    u.nrcpts = 1;
    u.rcpt_index = idx;
    u.rcpt_status = sent;
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_set_state(sp, b, SPOOL_FAILED), 0));
    cr_assert(eq(int, spool_msg_retry(sp, b), 0));
    cr_assert(eq(int, spool_msg_delete(sp, c), 0));
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, 2));
    cr_assert(eq(u64, st.by_state[SPOOL_DEFERRED], 1));
    cr_assert(eq(u64, st.by_state[SPOOL_QUEUED], 1));
    cr_assert(eq(u64, st.by_state[SPOOL_HELD], 0));
    cr_assert(eq(u64, st.recipients, 3));
    cr_assert(eq(u64, st.bytes, 30));
    spool_close(sp);
    /* Reopened read-only: the same figures, from the counters. */
    {
        struct spool_opts ro = {.readonly = 1};
        char err[256];

        cr_assert(eq(int, spool_open(sdir, &ro, &sp, err, sizeof err), 0), "%s", err);
        cr_assert(eq(int, spool_stats(sp, &st), 0));
        cr_assert(eq(u64, st.messages, 2));
        cr_assert(eq(u64, st.recipients, 3));
        spool_close(sp);
    }
}

/* A delivery's outcome (if_scheduled) keeps an operator's hold made meanwhile but records
 * the recipients; its notification is stored in the same transaction, and not at all when
 * the message was deleted meanwhile. */
Test(spool, conditional_update_with_notification)
{
    struct spool *sp = open_rw(NULL);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp);
    size_t idx[2] = {0, 1};
    enum spool_rcpt_status st2[2] = {SPOOL_RCPT_SENT, SPOOL_RCPT_PENDING};
    const char *rep[2] = {"250 ok", "451 later"};
    struct spool_msg dsn, *g;
    struct spool_rcpt dr = {"sender@lan", SPOOL_RCPT_PENDING, NULL, 0, NULL};
    struct spool_newmsg nm;
    struct spool_update u;
    struct spool_stats st;

    cr_assert(eq(int, put_one(sp, a, 0, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, put_one(sp, b, 0, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, spool_msg_set_state(sp, a, SPOOL_HELD), 0)); /* relayctl hold */
    memset(&dsn, 0, sizeof(dsn));
    dsn.id = spool_id_new(sp);
    dsn.state = SPOOL_QUEUED;
    dsn.sender = "";
    dsn.client = "127.0.0.1";
    dsn.rcpts = &dr;
    dsn.nrcpts = 1;
    nm.msg = &dsn;
    nm.body = "Subject: dsn\r\n\r\nx\r\n";
    nm.len = strlen(nm.body);
    memset(&u, 0, sizeof(u));
    u.id = a;
    u.state = SPOOL_DEFERRED;
    u.next_attempt = 1;
    u.if_scheduled = 1;
    u.nrcpts = 2;
    u.rcpt_index = idx;
    u.rcpt_status = st2;
    u.rcpt_reply = rep;
    u.puts = &nm;
    u.nputs = 1;
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_get(sp, a, 0, &g), 0));
    cr_assert(eq(int, (int)g->state, SPOOL_HELD), "the hold must win");
    cr_assert(eq(int, (int)g->rcpts[0].status, SPOOL_RCPT_SENT), "the result must be kept");
    spool_msg_free(g);
    cr_assert(eq(int, spool_msg_get(sp, dsn.id, 0, &g), 0));
    spool_msg_free(g);
    /* Deleted meanwhile: nothing is written, and no notification either. */
    cr_assert(eq(int, spool_msg_delete(sp, b), 0));
    u.id = b;
    dsn.id = spool_id_new(sp);
    cr_assert(eq(int, update_one(sp, &u), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_msg_get(sp, dsn.id, 0, &g), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, 2));
    spool_close(sp);
}

/* Reschedule moves only what is still scheduled; retry --all makes every scheduled message
 * due in a few transactions; the fault hook fails updates as a failing disk would. */
Test(spool, reschedule_retry_all_fault)
{
    struct spool *sp = open_rw(NULL);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp), ids[2];
    int64_t whens[2] = {5000, 5000};
    struct result res = {0};
    struct spool_update u;
    size_t n = 0;

    cr_assert(eq(int, put_one(sp, a, 100, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, put_one(sp, b, 100, SPOOL_HELD, 10), 0));
    ids[0] = a;
    ids[1] = b;
    spool_reschedule_async(sp, ids, whens, 2, on_done, &res);
    reap_until(sp, &res.called, 1);
    cr_assert(eq(int, res.rc, 0));
    cr_assert(eq(int, spool_due(sp, 4999, ids, 2, &n), 0));
    cr_assert(eq(sz, n, 0));
    cr_assert(eq(int, spool_due(sp, 5000, ids, 2, &n), 0));
    cr_assert(eq(sz, n, 1), "the held message must not be scheduled");
    cr_assert(eq(int, spool_retry_all(sp, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_assert(eq(int, spool_due(sp, time(NULL), ids, 2, &n), 0));
    cr_assert(eq(sz, n, 1));
    spool_fault_updates(sp, 1);
    memset(&u, 0, sizeof(u));
    u.id = a;
    u.state = SPOOL_DEFERRED;
    cr_assert(eq(int, update_one(sp, &u), SPOOL_EIO));
    cr_assert(eq(int, update_one(sp, &u), 0), "only the next one fails");
    spool_close(sp);
}

/* An envelope that does not decode is set aside: held with the reason, its original
 * bytes kept in "bad", its schedule entry gone, the counters right. */
Test(spool, quarantine)
{
    struct spool *sp = open_rw(NULL);
    uint64_t a = spool_id_new(sp), b = spool_id_new(sp), ids[4];
    static const unsigned char junk[] = {9, 0xff, 0xff};
    struct result res = {0};
    struct spool_stats st;
    struct spool_msg *g;
    size_t n = 0;

    cr_assert(eq(int, put_one(sp, a, 100, SPOOL_QUEUED, 10), 0));
    cr_assert(eq(int, put_one(sp, b, 200, SPOOL_QUEUED, 10), 0));
    spool_close(sp);
    put_raw_record(a, junk, sizeof junk);
    sp = open_rw(NULL);
    cr_assert(eq(int, spool_msg_get(sp, a, 0, &g), SPOOL_ECORRUPT));
    spool_quarantine_async(sp, a, "unreadable envelope record", on_done, &res);
    reap_until(sp, &res.called, 1);
    cr_assert(eq(int, res.rc, 0));
    cr_assert(eq(int, spool_msg_get(sp, a, 0, &g), 0));
    cr_assert(eq(int, (int)g->state, SPOOL_HELD));
    cr_assert(eq(str, g->last_error, "unreadable envelope record"));
    spool_msg_free(g);
    cr_assert(eq(int, spool_due(sp, 1000, ids, 4, &n), 0));
    cr_assert(eq(sz, n, 1));
    cr_assert(eq(u64, ids[0], b));
    cr_assert(eq(int, spool_stats(sp, &st), 0));
    cr_assert(eq(u64, st.messages, 2));
    cr_assert(eq(u64, st.by_state[SPOOL_HELD], 1));
    spool_close(sp);
}

/* The time a message waited on configuration faults (config_wait, config_since) is set by
 * a delivery's update, survives a reopen in a version-3 record, and goes back to version
 * 1 when it is 0 again; an old version-1 record reads as 0 for both. */
Test(spool, config_wait_round_trip)
{
    struct spool *sp = open_rw(NULL);
    struct spool_msg m, *g;
    struct spool_rcpt r[2];
    struct spool_update u;
    struct v1buf w;
    uint64_t id = spool_id_new(sp), old;
    unsigned char *raw;
    size_t len;

    cr_assert(eq(int, put_one(sp, id, time(NULL), SPOOL_QUEUED, 5), 0));
    old = spool_id_new(sp);
    cr_assert(eq(int, put_one(sp, old, time(NULL), SPOOL_QUEUED, 5), 0));
    memset(&u, 0, sizeof(u));
    u.id = id;
    u.state = SPOOL_DEFERRED;
    u.next_attempt = time(NULL) + 60;
    u.set_config_wait = 1;
    u.config_wait = 3600;
    u.config_since = 1700000000;
    cr_assert(eq(int, update_one(sp, &u), 0));
    spool_close(sp);
    fill_msg(&m, r, old, "old@lan");
    v1_encode(&w, &m);
    put_raw_record(old, w.b, w.n);

    sp = open_rw(NULL);
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_expect(eq(i64, g->config_wait, 3600));
    cr_expect(eq(i64, g->config_since, 1700000000));
    cr_expect(eq(int, (int)g->state, SPOOL_DEFERRED));
    spool_msg_free(g);
    cr_assert(eq(int, spool_msg_get(sp, old, 0, &g), 0));
    cr_expect(eq(i64, g->config_wait, 0));
    cr_expect(eq(i64, g->config_since, 0));
    spool_msg_free(g);
    /* An update without set_config_wait keeps the values. */
    u.set_config_wait = 0;
    u.next_attempt = time(NULL) + 120;
    cr_assert(eq(int, update_one(sp, &u), 0));
    cr_assert(eq(int, spool_msg_get(sp, id, 0, &g), 0));
    cr_expect(eq(i64, g->config_wait, 3600));
    spool_msg_free(g);
    spool_close(sp);
    raw = raw_record(id, &len);
    cr_expect(eq(int, raw[0], 3), "a message with config_wait: record version 3");
    free(raw);

    sp = open_rw(NULL);
    u.set_config_wait = 1;
    u.config_wait = 0;
    u.config_since = 0;
    cr_assert(eq(int, update_one(sp, &u), 0));
    spool_close(sp);
    raw = raw_record(id, &len);
    cr_expect(eq(int, raw[0], 1), "config_wait back to 0: record version 1 again");
    free(raw);
}

/* ---- Upstream state records ---- */

/* A state record encodes and decodes to the same values; a truncated one is corrupt. */
Test(spool, upstate_record_round_trip)
{
    int64_t sent[2] = {1700000001000, 1700000002000};
    struct spool_upstate_bucket b[1] = {{28333333, 17}};
    struct spool_upstate st = {"m365", 1700000003000, 1, 1700000000000, "AUTH: 535", NULL,
                               1700000060000, 120000, 2, 0, sent, 2, b, 1};
    struct spool_upstate got;
    size_t len;
    unsigned char *p = spool_upstate_encode(&st, &len);

    cr_assert(eq(int, spool_upstate_decode(p, len, "m365", &got), 0));
    cr_expect(eq(str, got.name, "m365"));
    cr_expect(eq(int, got.unhealthy, 1));
    cr_expect(eq(i64, got.since, 1700000000000));
    cr_expect(eq(str, got.reason, "AUTH: 535"));
    cr_expect(got.action == NULL);
    cr_expect(eq(i64, got.paused_until, 1700000060000));
    cr_expect(eq(i64, got.next_pause, 120000));
    cr_expect(eq(int, got.failed_sessions, 2));
    cr_assert(eq(sz, got.nsent, 2));
    cr_expect(eq(i64, got.sent[1], 1700000002000));
    cr_assert(eq(sz, got.nbuckets, 1));
    cr_expect(eq(i64, got.buckets[0].minute, 28333333));
    cr_expect(eq(u32, got.buckets[0].count, 17));
    spool_upstate_clear(&got);
    p[1] = p[2] = p[3] = 0;
    p[4] = (unsigned char)(len - 1);
    cr_expect(eq(int, spool_upstate_decode(p, len - 1, "m365", &got), SPOOL_ECORRUPT));
    free(p);
}

/* Noted state is written by the writer (no mail needed) and read back after a reopen;
 * the latest note per name wins; an unknown name is SPOOL_ENOTFOUND. */
Test(spool, upstate_note_and_get)
{
    struct spool *sp = open_rw(NULL);
    struct spool_upstate st, *got = NULL, *list = NULL;
    size_t n = 0;

    memset(&st, 0, sizeof(st));
    st.name = "m365";
    st.paused_until = 1;
    spool_upstate_note(sp, &st);
    st.paused_until = 1700000060000;
    st.reason = "throttled";
    spool_upstate_note(sp, &st);
    st.name = "gmail";
    spool_upstate_note(sp, &st);
    spool_close(sp); /* the writer's stop writes what is pending */

    sp = open_rw(NULL);
    cr_assert(eq(int, spool_upstate_get(sp, "m365", &got), 0));
    cr_expect(eq(i64, got->paused_until, 1700000060000));
    cr_expect(eq(str, got->reason, "throttled"));
    got = spool_upstate_free(got);
    cr_expect(eq(int, spool_upstate_get(sp, "nonesuch", &got), SPOOL_ENOTFOUND));
    cr_assert(eq(int, spool_upstate_list(sp, &list, &n), 0));
    cr_expect(eq(sz, n, 2));
    spool_upstate_list_free(list, n);
    spool_close(sp);
}
