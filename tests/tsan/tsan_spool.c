/*
 * tsan_spool - the spool writer thread under ThreadSanitizer (contrib/build.sh --tsan).
 *
 * Criterion cannot run under TSan (its fork arena fails to map: Snaipe/Criterion#274), so
 * this is a plain program that drives the spool the way relayd does and exits non-zero on
 * a wrong result; TSan (halt_on_error=1) exits 66 on a data race.  The loop thread submits
 * puts and updates and reaps completions from a uv_async_t woken by the writer thread (the
 * daemon's path: smtpd -> spool_put_async, spool_writer -> uv_async_send -> reap), two
 * producer threads submit puts at the same time (unit test concurrent_writers), and a
 * reader thread scans and reads messages while they are written, updated and deleted.
 * Everything is bounded: the run ends after NPUT messages per producer or 60 seconds.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "spool/spool.h"

#define NPUT 200 /* messages per producer */
#define NPROD 3  /* the loop thread and two more */
#define DEADLINE_S 60

static struct spool *sp;
static uv_async_t wake_async;
static atomic_int puts_done, updates_done, failures, kept;
static atomic_int stop_reader;

static void fail(const char *what)
{
    fprintf(stderr, "tsan_spool: FAIL: %s\n", what);
    atomic_fetch_add(&failures, 1);
}

static void wake(void *arg)
{
    (void)arg;
    uv_async_send(&wake_async); /* from the writer thread */
}

static void fill(struct spool_msg *m, struct spool_rcpt *r, uint64_t id)
{
    memset(m, 0, sizeof(*m));
    m->id = id;
    m->state = SPOOL_QUEUED;
    m->arrived = time(NULL);
    m->next_attempt = m->arrived;
    m->sender = "fax@lan";
    m->client = "10.0.0.7";
    m->helo = "fax.lan";
    m->listener = "lan";
    r[0] = (struct spool_rcpt){"a@example.org", SPOOL_RCPT_PENDING, NULL, 0, NULL};
    m->rcpts = r;
    m->nrcpts = 1;
}

static void on_update(void *arg, int rc)
{
    (void)arg;
    if (rc != 0)
        fail("update");
    atomic_fetch_add(&updates_done, 1);
}

/* Runs on the loop thread (reap): every stored message gets one delivery result, so the
 * writer also deletes while others are being written and read. */
static void on_put(void *arg, int rc)
{
    uint64_t id = (uint64_t)(uintptr_t)arg;
    static const size_t idx[1] = {0};
    static const enum spool_rcpt_status st[1] = {SPOOL_RCPT_SENT};
    static const char *const reply[1] = {"250 ok"};
    struct spool_update u = {.id = id,
                             .state = SPOOL_QUEUED,
                             .count_attempt = 1,
                             .upstream = "provider",
                             .result = "sent",
                             .nrcpts = 1,
                             .rcpt_index = idx,
                             .rcpt_status = st,
                             .rcpt_reply = reply};

    if (rc != 0)
        fail("put");
    atomic_fetch_add(&puts_done, 1);
    if (id % 2 == 0) {
        spool_update_async(sp, &u, on_update, NULL);
    } else {
        atomic_fetch_add(&updates_done, 1);
        atomic_fetch_add(&kept, 1);
    }
}

static void put_one(void)
{
    struct spool_msg m;
    struct spool_rcpt r[1];
    uint64_t id = spool_id_new(sp);
    char *body = strdup("Subject: t\r\n\r\nbody\r\n");

    fill(&m, r, id);
    spool_put_async(sp, &m, body, strlen(body), on_put, (void *)(uintptr_t)id);
}

static void *producer(void *arg)
{
    (void)arg;
    for (int i = 0; i < NPUT; i++)
        put_one();
    return NULL;
}

static int count_cb(const struct spool_msg *m, void *arg)
{
    (void)m;
    (*(int *)arg)++;
    return 0;
}

static void *reader(void *arg)
{
    (void)arg;
    while (!atomic_load(&stop_reader)) {
        int n = 0;
        struct spool_stats st;
        uint64_t ids[16];
        size_t k = 0;

        if (spool_foreach(sp, count_cb, &n) != 0)
            fail("foreach");
        if (spool_stats(sp, &st) != 0)
            fail("stats");
        if (spool_due(sp, time(NULL) + 10, ids, 16, &k) != 0)
            fail("due");
        for (size_t i = 0; i < k; i++) {
            struct spool_msg *m = NULL;

            (void)spool_msg_get(sp, ids[i], SPOOL_GET_HISTORY, &m); /* may be gone */
            spool_msg_free(m);
        }
        usleep(1000);
    }
    return NULL;
}

static void on_wake(uv_async_t *a)
{
    (void)a;
    spool_writer_reap(sp);
    if (atomic_load(&updates_done) >= NPUT * NPROD)
        uv_stop(a->loop);
}

static void on_deadline(uv_timer_t *t)
{
    fail("deadline: not every completion arrived");
    uv_stop(t->loop);
}

int main(int argc, char **argv)
{
    char dir[] = "/tmp/tsan_spool.XXXXXX", sdir[64], err[256], cmd[128];
    struct spool_opts o = {0};
    pthread_t prod[NPROD - 1], rd;
    uv_loop_t loop;
    uv_timer_t deadline;
    int n = 0;

    (void)argc;
    (void)argv;
    if (mkdtemp(dir) == NULL)
        return 2;
    snprintf(sdir, sizeof sdir, "%s/spool", dir);
    uv_loop_init(&loop);
    uv_async_init(&loop, &wake_async, on_wake);
    uv_timer_init(&loop, &deadline);
    uv_timer_start(&deadline, on_deadline, DEADLINE_S * 1000, 0);
    if (spool_open(sdir, &o, &sp, err, sizeof err) != 0 ||
        spool_writer_start(sp, wake, NULL) != 0) {
        fprintf(stderr, "tsan_spool: %s\n", err);
        return 2;
    }
    pthread_create(&rd, NULL, reader, NULL);
    for (int i = 0; i < NPROD - 1; i++)
        pthread_create(&prod[i], NULL, producer, NULL);
    producer(NULL); /* the loop thread is a producer too, before it starts reaping */
    uv_run(&loop, UV_RUN_DEFAULT);
    for (int i = 0; i < NPROD - 1; i++)
        pthread_join(prod[i], NULL);
    atomic_store(&stop_reader, 1);
    pthread_join(rd, NULL);
    spool_writer_stop(sp);
    spool_writer_reap(sp);
    if (spool_foreach(sp, count_cb, &n) != 0 || n != atomic_load(&kept))
        fail("what is left: every odd id (the even ones were delivered)");
    spool_close(sp);
    uv_close((uv_handle_t *)&wake_async, NULL);
    uv_close((uv_handle_t *)&deadline, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0)
        fail("handles left on the loop");
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0)
        fail("rm");
    printf("tsan_spool: %d puts, %d results, %d messages left, %d failures\n",
           atomic_load(&puts_done), atomic_load(&updates_done), n, atomic_load(&failures));
    return atomic_load(&failures) == 0 ? 0 : 1;
}
