/*
 * log - one line per event on stderr (systemd captures it), Postfix msg_* style.
 *
 * Lines look like "relayd[123]: 0190A3F2C1D4: from=<fax@lan> size=1532 nrcpt=1": the
 * program name and pid, then (for mail events) the queue id, then key=value pairs or
 * plain words that say why.  Never log passwords or AUTH data.
 *
 * log_fatal() exits(1) (configuration or start-up problems); log_panic() aborts (bugs).
 */
#ifndef COMMON_LOG_H
#define COMMON_LOG_H

#define LOG_FMT(a, b) __attribute__((format(printf, a, b)))

/* Sets the program name shown in each line (default "relayd"). */
void log_init(const char *progname);
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
