/*
 * testlib - what the unit tests share: temporary directories, the certtool PKI, a bounded
 * loop runner and the loop teardown that reports leaked handles.
 *
 * Every helper asserts (Criterion) instead of returning an error: a set-up that fails is
 * the test's failure.  Ownership: directories made by testlib_tmpdir() are the test's; it
 * removes them with testlib_rmtree() in its teardown.
 */
#ifndef TESTS_LIB_TESTLIB_H
#define TESTS_LIB_TESTLIB_H

#include <stddef.h>
#include <uv.h>

/* mkdtemp("/tmp/NAME.XXXXXX") into dir (dirlen >= strlen(NAME) + 12). */
void testlib_tmpdir(char *dir, size_t dirlen, const char *name);
/* rm -rf dir. */
void testlib_rmtree(const char *dir);
/* dir/name with text in it. */
void testlib_write_file(const char *dir, const char *name, const char *text);
/* The whole of the source tree's file rel (e.g. "README.md"), NUL-terminated; free() it. */
char *testlib_source_read(const char *rel);
/* The unit tests' PKI in dir (tests/lib/pki.sh DIR unit): ca.pem/.key ("Test CA"),
 * ca2.pem/.key (an unrelated CA), srv.pem/.key (localhost and 127.0.0.1, signed by ca). */
void testlib_pki(const char *dir);

/* The spool writer's wake callback for tests whose own thread plays the event loop
 * (spool_writer_start(sp, testlib_spool_wake, NULL)); counts in testlib_spool_wakes. */
struct spool;
void testlib_spool_wake(void *arg);
extern int testlib_spool_wakes;
/* Runs sp's completions (spool_writer_reap()) until *count reaches want, waiting for
 * testlib_spool_wake between tries; asserts it got there within 20 s. */
void testlib_spool_reap_until(struct spool *sp, const int *count, int want);

/* Closes loop; when handles are still open (a leak), closes them, runs the loop once more
 * and closes it again so the next test starts clean.  Returns uv_loop_close()'s first
 * result: the teardown asserts it is 0. */
int testlib_loop_close(uv_loop_t *loop);

/* Runs loop one iteration at a time until cond holds or max iterations have run (raft's
 * LOOP_RUN_UNTIL): a test never hangs on a callback that does not come. */
#define TESTLIB_LOOP_RUN_UNTIL(loop, cond, max)                                                    \
    do {                                                                                           \
        for (long testlib_i_ = 0; testlib_i_ < (max) && !(cond); testlib_i_++)                     \
            uv_run((loop), UV_RUN_ONCE);                                                           \
    } while (0)

#endif
