/*
 * buf - the one growable byte buffer (Postfix VSTRING style: the handle never moves).
 *
 * Every buffer fed by a peer has a hard maximum; appending past it fails with -ENOSPC
 * and leaves the buffer unchanged, so the caller can answer with a clear 5xx instead of
 * using more memory.  The data is always NUL-terminated as a safety net (the NUL is not
 * counted in len).  Ownership: whoever calls buf_new() calls buf_free().
 */
#ifndef COMMON_BUF_H
#define COMMON_BUF_H

#include <stdarg.h>
#include <stddef.h>

struct buf {
    char *data;
    size_t len; /* bytes in use, excluding the trailing NUL */
    size_t cap; /* bytes allocated, including room for the NUL */
    size_t max; /* hard limit on len; 0 = unlimited */
};

/* A new empty buffer that refuses to grow beyond max bytes (0: no limit). */
struct buf *buf_new(size_t max);
/* Frees b (NULL is fine); returns NULL so callers can write b = buf_free(b). */
struct buf *buf_free(struct buf *b);

/* Appends n bytes; 0, or -ENOSPC past max (buffer unchanged). */
int buf_append(struct buf *b, const void *p, size_t n);
int buf_puts(struct buf *b, const char *s);
int buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int buf_vprintf(struct buf *b, const char *fmt, va_list ap);
/* Makes sure n more bytes fit without reallocation; 0 or -ENOSPC. */
int buf_reserve(struct buf *b, size_t n);

void buf_reset(struct buf *b);
/* Hands the data over to the caller (free() it) and leaves b empty and usable. */
char *buf_steal(struct buf *b, size_t *len);
/* Drops the first n bytes (n > len drops everything). */
void buf_consume(struct buf *b, size_t n);

/*
 * Finds the first complete line (ending in LF, CRLF or bare LF alike).  On success
 * *line points into b (valid until b is changed), *n is its length without the line
 * ending, and the return value is the number of bytes to buf_consume() for it.
 * Returns 0 when no complete line is buffered.
 */
size_t buf_getline(const struct buf *b, const char **line, size_t *n);

#endif
