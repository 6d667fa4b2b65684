/*
 * xtext - RFC 3461 4 xtext; see xtext.h.
 */
#include "common/xtext.h"

#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

char *xtext_encode(const char *s)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t n = s != NULL ? strlen(s) : 0, o = 0;
    char *out = xmalloc(3 * n + 1);

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];

        if (c < 33 || c > 126 || c == '+' || c == '=') {
            out[o++] = '+';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
    return out;
}

static int xdigit_val(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

char *xtext_decode(const char *p, size_t n)
{
    char *out = xmalloc(n + 1);
    size_t o = 0;

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];

        if (c == '+') {
            int hi = i + 2 < n ? xdigit_val(p[i + 1]) : -1;
            int lo = hi >= 0 ? xdigit_val(p[i + 2]) : -1;

            if (lo < 0 || (hi == 0 && lo == 0))
                goto bad;
            out[o++] = (char)(hi << 4 | lo);
            i += 2;
        } else if (c < 33 || c > 126 || c == '=') {
            goto bad;
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
    return out;
bad:
    free(out);
    return NULL;
}
