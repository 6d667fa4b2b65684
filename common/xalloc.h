/*
 * xalloc - allocation that cannot fail.
 *
 * Running out of memory is not an expected failure for relayd: nothing is acknowledged
 * to a client before it is durable in the spool, so dying (and being restarted by the
 * service manager) loses nothing.  These wrappers log and abort instead of returning NULL.
 * There is no allocation fault hook: an allocation failure aborts, so there is no recovery
 * path to test.
 */
#ifndef COMMON_XALLOC_H
#define COMMON_XALLOC_H

#include <stddef.h>

void *xmalloc(size_t n);
void *xcalloc(size_t count, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* asprintf() that cannot fail. */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Entries of a fixed-size array (tables of keys, replies, names). */
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

#endif
