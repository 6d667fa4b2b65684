/*
 * buf - the one growable byte buffer; see buf.h.
 */
#include "common/buf.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "common/xalloc.h"

struct buf *buf_new(size_t max)
{
    struct buf *b = xcalloc(1, sizeof(*b));

    b->max = max;
    b->cap = 64;
    b->data = xmalloc(b->cap);
    b->data[0] = '\0';
    return b;
}

struct buf *buf_free(struct buf *b)
{
    if (b != NULL) {
        free(b->data);
        free(b);
    }
    return NULL;
}

int buf_reserve(struct buf *b, size_t n)
{
    size_t need, cap;

    if (n > SIZE_MAX - b->len - 1)
        return -ENOSPC;
    if (b->max != 0 && b->len + n > b->max)
        return -ENOSPC;
    need = b->len + n + 1;
    if (need <= b->cap)
        return 0;
    cap = b->cap;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    /* Never more than the limit allows: doubling would turn a 35 MB message into 64 MB. */
    if (b->max != 0 && cap > b->max + 1)
        cap = b->max + 1;
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
    return 0;
}

int buf_append(struct buf *b, const void *p, size_t n)
{
    int rc;

    if ((rc = buf_reserve(b, n)) != 0)
        return rc;
    if (n > 0)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    b->data[b->len] = '\0';
    return 0;
}

int buf_puts(struct buf *b, const char *s)
{
    return buf_append(b, s, strlen(s));
}

int buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    va_list ap2;
    int n, rc;

    va_copy(ap2, ap);
    n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0)
        return -EINVAL;
    if ((rc = buf_reserve(b, (size_t)n)) != 0)
        return rc;
    vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap);
    b->len += (size_t)n;
    return 0;
}

int buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = buf_vprintf(b, fmt, ap);
    va_end(ap);
    return rc;
}

void buf_reset(struct buf *b)
{
    b->len = 0;
    b->data[0] = '\0';
}

char *buf_steal(struct buf *b, size_t *len)
{
    char *data = b->data;

    *len = b->len;
    b->cap = 64;
    b->len = 0;
    b->data = xmalloc(b->cap);
    b->data[0] = '\0';
    return data;
}

void buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        buf_reset(b);
        return;
    }
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
    b->data[b->len] = '\0';
}

size_t buf_getline(const struct buf *b, const char **line, size_t *n)
{
    const char *lf = memchr(b->data, '\n', b->len);
    size_t len;

    if (lf == NULL)
        return 0;
    len = (size_t)(lf - b->data);
    *line = b->data;
    *n = (len > 0 && b->data[len - 1] == '\r') ? len - 1 : len;
    return len + 1;
}
