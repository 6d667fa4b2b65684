/*
 * log - one line per event on stderr (systemd captures it), Postfix msg_* style.
 *
 * Lines look like "relayd[123]: 0190A3F2C1D4: from=<fax@lan> size=1532 nrcpt=1": the
 * program name and pid, then (for mail events) the queue id, then key=value pairs or
 * plain words that say why.  Never log passwords or AUTH data.
 *
 * Under systemd, when stderr is the journal ($JOURNAL_STREAM names stderr's device and
 * inode), each line starts with its syslog priority as journald reads it: "<3>" error and
 * fatal, "<2>" panic, "<4>" warning, "<6>" info, "<7>" debug, and the "relayd[PID]: " is
 * left out (journald records and shows both itself); the rest is the same (relayd prints
 * no time stamp: journald and a terminal's user have their own).  On a
 * terminal, a pipe or a file lines stay plain.
 *
 * log_fatal() exits(1) (configuration or start-up problems); log_panic() aborts (bugs).
 */
#ifndef COMMON_LOG_H
#define COMMON_LOG_H

#define LOG_FMT(a, b) __attribute__((format(printf, a, b)))

#include <stdarg.h>
#include <stddef.h>

/* Sets the program name shown in each line (default "relayd") and looks whether stderr is
 * the journal. */
void log_init(const char *progname);
/* 1 when fd is the stream journal_stream ("DEV:INODE", $JOURNAL_STREAM) names, else 0. */
int log_is_journal(int fd, const char *journal_stream);
/* Forces the "<N>" prefixes on (1) or off (0), whatever log_init() found; for tests. */
void log_set_journal(int on);

/* Syslog priorities of the prefixes (sd-daemon.h's SD_ERR ...). */
enum {
    LOG_PRIO_CRIT = 2,
    LOG_PRIO_ERR = 3,
    LOG_PRIO_WARNING = 4,
    LOG_PRIO_INFO = 6,
    LOG_PRIO_DEBUG = 7
};
/* Formats one line, newline included, as it is written; returns its length (< len). */
size_t log_format(char *line, size_t len, int prio, const char *tag, const char *fmt, va_list ap);
/* 0 = info and above; each -v raises it by one. */
void log_set_verbose(int level);
int log_verbose(void);

void log_info(const char *fmt, ...) LOG_FMT(1, 2);
void log_warn(const char *fmt, ...) LOG_FMT(1, 2);
void log_error(const char *fmt, ...) LOG_FMT(1, 2);
void log_debug(int level, const char *fmt, ...) LOG_FMT(2, 3);
_Noreturn void log_fatal(const char *fmt, ...) LOG_FMT(1, 2);
_Noreturn void log_panic(const char *fmt, ...) LOG_FMT(1, 2);

#endif
