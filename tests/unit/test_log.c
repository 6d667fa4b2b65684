/* Unit tests for common/log.c: plain lines, journald priority prefixes and when they apply. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

static size_t fmt(char *line, size_t len, int prio, const char *tag, const char *f, ...)
{
    va_list ap;
    size_t n;

    va_start(ap, f);
    n = log_format(line, len, prio, tag, f, ap);
    va_end(ap);
    return n;
}

/* Each level's prefix under the journal, none elsewhere; the text is the same. */
Test(log, prefixes)
{
    static const struct {
        const char *label;
        int journal, prio;
        const char *tag, *want_prefix;
    } cases[] = {
        {"plain info", 0, LOG_PRIO_INFO, "", ""},
        {"plain warning", 0, LOG_PRIO_WARNING, "warning: ", ""},
        {"journal info", 1, LOG_PRIO_INFO, "", "<6>"},
        {"journal warning", 1, LOG_PRIO_WARNING, "warning: ", "<4>"},
        {"journal error", 1, LOG_PRIO_ERR, "error: ", "<3>"},
        {"journal debug", 1, LOG_PRIO_DEBUG, "debug: ", "<7>"},
        {"journal panic", 1, LOG_PRIO_CRIT, "panic: ", "<2>"},
    };
    char line[256], want[256];

    log_init("relayd");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        log_set_journal(cases[i].journal);
        size_t n = fmt(line, sizeof line, cases[i].prio, cases[i].tag, "%s: id=%d", "0190A3F2", 7);
        /* Under the journal "relayd[PID]: " is journald's to add. */
        if (cases[i].journal)
            snprintf(want, sizeof want, "%s%s0190A3F2: id=7\n", cases[i].want_prefix, cases[i].tag);
        else
            snprintf(want, sizeof want, "relayd[%ld]: %s0190A3F2: id=7\n", (long)getpid(),
                     cases[i].tag);
        cr_expect(eq(str, line, want), "%s", cases[i].label);
        cr_expect(eq(sz, n, strlen(want)), "%s", cases[i].label);
    }
    log_set_journal(0);
}

/* One event stays one line: newlines in a value are blanked; a long line is cut but still
 * ends with its newline. */
Test(log, one_line)
{
    char line[64], big[200];

    log_set_journal(1);
    fmt(line, sizeof line, LOG_PRIO_INFO, "", "reply=%s", "250 ok\r\nforged");
    cr_expect(strchr(line, '\n') == line + strlen(line) - 1, "%s", line);
    cr_expect(strstr(line, "250 ok  forged") != NULL, "%s", line);
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    size_t n = fmt(line, sizeof line, LOG_PRIO_INFO, "", "%s", big);
    cr_expect(n < sizeof line);
    cr_expect(line[n - 1] == '\n' && line[n] == '\0');
    log_set_journal(0);
}

/* JOURNAL_STREAM must name this very descriptor's device and inode. */
Test(log, journal_detect)
{
    struct stat st;
    char env[64];
    int fds[2];

    cr_assert(pipe(fds) == 0);
    cr_assert(fstat(fds[1], &st) == 0);
    snprintf(env, sizeof env, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    cr_expect(eq(int, log_is_journal(fds[1], env), 1));
    cr_expect(eq(int, log_is_journal(fds[1], NULL), 0));
    cr_expect(eq(int, log_is_journal(fds[1], ""), 0));
    cr_expect(eq(int, log_is_journal(fds[1], "1:2"), 0));
    cr_expect(eq(int, log_is_journal(fds[1], "garbage"), 0));
    snprintf(env, sizeof env, "%llu:%llux", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
    cr_expect(eq(int, log_is_journal(fds[1], env), 0));
    close(fds[0]);
    close(fds[1]);
}
