/*
 * log - one line per event on stderr; see log.h.
 */
#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char log_prog[32] = "relayd";
static int log_level;
static int log_journal; /* stderr is the journal: "<N>" prefixes */

int log_is_journal(int fd, const char *journal_stream)
{
    unsigned long long dev, ino;
    struct stat st;
    char end;

    if (journal_stream == NULL || sscanf(journal_stream, "%llu:%llu%c", &dev, &ino, &end) != 2 ||
        fstat(fd, &st) != 0)
        return 0;
    /* systemd sets JOURNAL_STREAM for the service's stderr; a child whose stderr was
     * redirected elsewhere inherits the variable but not the stream. */
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_set_journal(int on)
{
    log_journal = on;
}

void log_init(const char *progname)
{
    snprintf(log_prog, sizeof(log_prog), "%s", progname);
    log_journal = log_is_journal(STDERR_FILENO, getenv("JOURNAL_STREAM"));
}

void log_set_verbose(int level)
{
    log_level = level;
}

int log_verbose(void)
{
    return log_level;
}

size_t log_format(char *line, size_t len, int prio, const char *tag, const char *fmt, va_list ap)
{
    int n;

    if (len < 2)
        return 0;
    /* journald records the program and the pid itself (SYSLOG_IDENTIFIER, _PID) and shows
     * them before the message: ours would appear twice in journalctl's output. */
    if (log_journal)
        n = snprintf(line, len, "<%d>%s", prio, tag);
    else
        n = snprintf(line, len, "%s[%ld]: %s", log_prog, (long)getpid(), tag);
    if (n < 0 || (size_t)n >= len - 1)
        n = 0;
    vsnprintf(line + n, len - (size_t)n - 1, fmt, ap);
    n = (int)strlen(line);
    /* One event, one line: a newline inside a value would start a second journal entry
     * (or a forged one). */
    for (char *p = line; *p != '\0'; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    line[n++] = '\n';
    line[n] = '\0';
    return (size_t)n;
}

static void log_vline(int prio, const char *tag, const char *fmt, va_list ap)
{
    char line[4096];
    size_t n;

    /* Build the whole line first so concurrent writers never interleave within it. */
    n = log_format(line, sizeof line, prio, tag, fmt, ap);
    fwrite(line, 1, n, stderr);
    fflush(stderr);
}

#define LOG_BODY(prio, tag)                                                                        \
    va_list ap;                                                                                    \
    va_start(ap, fmt);                                                                             \
    log_vline(prio, tag, fmt, ap);                                                                 \
    va_end(ap)

void log_info(const char *fmt, ...)
{
    LOG_BODY(LOG_PRIO_INFO, "");
}

void log_warn(const char *fmt, ...)
{
    LOG_BODY(LOG_PRIO_WARNING, "warning: ");
}

void log_error(const char *fmt, ...)
{
    LOG_BODY(LOG_PRIO_ERR, "error: ");
}

void log_debug(int level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    LOG_BODY(LOG_PRIO_DEBUG, "debug: ");
}

void log_fatal(const char *fmt, ...)
{
    LOG_BODY(LOG_PRIO_ERR, "fatal: ");
    exit(1);
}

void log_panic(const char *fmt, ...)
{
    LOG_BODY(LOG_PRIO_CRIT, "panic: ");
    abort();
}
