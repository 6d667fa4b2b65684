/*
 * log - one line per event on stderr; see log.h.
 */
#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char log_prog[32] = "relayd";
static int log_level;

void log_init(const char *progname)
{
    snprintf(log_prog, sizeof(log_prog), "%s", progname);
}

void log_set_verbose(int level)
{
    log_level = level;
}

int log_verbose(void)
{
    return log_level;
}

static void log_vline(const char *tag, const char *fmt, va_list ap)
{
    char line[4096];
    int n;

    /* Build the whole line first so concurrent writers never interleave within it. */
    n = snprintf(line, sizeof(line), "%s[%ld]: %s", log_prog, (long)getpid(), tag);
    if (n < 0 || (size_t)n >= sizeof(line))
        n = 0;
    vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    n = (int)strlen(line);
    line[n++] = '\n';
    fwrite(line, 1, (size_t)n, stderr);
    fflush(stderr);
}

#define LOG_BODY(tag)                                                                              \
    va_list ap;                                                                                    \
    va_start(ap, fmt);                                                                             \
    log_vline(tag, fmt, ap);                                                                       \
    va_end(ap)

void log_info(const char *fmt, ...)
{
    LOG_BODY("");
}

void log_warn(const char *fmt, ...)
{
    LOG_BODY("warning: ");
}

void log_error(const char *fmt, ...)
{
    LOG_BODY("error: ");
}

void log_debug(int level, const char *fmt, ...)
{
    if (level > log_level)
        return;
    LOG_BODY("debug: ");
}

void log_fatal(const char *fmt, ...)
{
    LOG_BODY("fatal: ");
    exit(1);
}

void log_panic(const char *fmt, ...)
{
    LOG_BODY("panic: ");
    abort();
}
