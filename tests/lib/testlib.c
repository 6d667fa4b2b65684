/*
 * testlib - shared set-up of the unit tests; see testlib.h.
 */
#include "tests/lib/testlib.h"

#include <pthread.h>
#include <time.h>

#include "spool/spool.h"

#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>

void testlib_tmpdir(char *dir, size_t dirlen, const char *name)
{
    if ((size_t)snprintf(dir, dirlen, "/tmp/%s.XXXXXX", name) >= dirlen)
        cr_fatal("testlib_tmpdir: %s: name too long", name);
    cr_assert_not_null(mkdtemp(dir), "mkdtemp %s", dir);
}

void testlib_rmtree(const char *dir)
{
    char cmd[512];

    if ((size_t)snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir) >= sizeof cmd)
        cr_fatal("testlib_rmtree: %s: name too long", dir);
    cr_assert(eq(int, system(cmd), 0), "%s", cmd);
}

void testlib_write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof path, "%s/%s", dir, name);
    cr_assert_not_null(f = fopen(path, "w"), "%s", path);
    fputs(text, f);
    cr_assert(eq(int, fclose(f), 0), "%s", path);
}

char *testlib_source_read(const char *rel)
{
    char path[512];
    char *text;
    long len;
    FILE *f;

    if ((size_t)snprintf(path, sizeof path, "%s/%s", TESTLIB_SOURCE_DIR, rel) >= sizeof path)
        cr_fatal("testlib_source_read: %s: name too long", rel);
    cr_assert_not_null(f = fopen(path, "r"), "%s", path);
    cr_assert(eq(int, fseek(f, 0, SEEK_END), 0), "%s", path);
    cr_assert(ge(long, len = ftell(f), 0), "%s", path);
    rewind(f);
    cr_assert_not_null(text = malloc((size_t)len + 1));
    cr_assert(eq(sz, fread(text, 1, (size_t)len, f), (size_t)len), "%s", path);
    text[len] = '\0';
    fclose(f);
    return text;
}

void testlib_pki(const char *dir)
{
    char cmd[1024];

    if ((size_t)snprintf(cmd, sizeof cmd, "bash '%s/tests/lib/pki.sh' '%s' unit",
                         TESTLIB_SOURCE_DIR, dir) >= sizeof cmd)
        cr_fatal("testlib_pki: %s: name too long", dir);
    cr_assert(eq(int, system(cmd), 0), "%s", cmd);
}

static void close_cb_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

int testlib_loop_close(uv_loop_t *loop)
{
    int rc = uv_loop_close(loop);

    if (rc != 0) {
        uv_walk(loop, close_cb_walk, NULL);
        uv_run(loop, UV_RUN_DEFAULT);
        uv_loop_close(loop);
    }
    return rc;
}

static pthread_mutex_t testlib_wmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t testlib_wcond = PTHREAD_COND_INITIALIZER;
int testlib_spool_wakes;

void testlib_spool_wake(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&testlib_wmu);
    testlib_spool_wakes++;
    pthread_cond_signal(&testlib_wcond);
    pthread_mutex_unlock(&testlib_wmu);
}

void testlib_spool_reap_until(struct spool *sp, const int *count, int want)
{
    for (int i = 0; i < 2000 && *count < want; i++) {
        struct timespec ts;

        spool_writer_reap(sp);
        if (*count >= want)
            break;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10 * 1000 * 1000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_mutex_lock(&testlib_wmu);
        pthread_cond_timedwait(&testlib_wcond, &testlib_wmu, &ts);
        pthread_mutex_unlock(&testlib_wmu);
    }
    cr_assert(count[0] >= want, "spool callbacks did not arrive (%d of %d)", count[0], want);
}
