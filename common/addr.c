/*
 * addr - tolerant SMTP path parsing; see addr.h.
 */
#include "common/addr.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "common/xalloc.h"

static int addr_fail(char *err, size_t errlen, const char *why)
{
    snprintf(err, errlen, "%s", why);
    return -EINVAL;
}

int addr_path_parse(const char *arg, char **addr, const char **params, char *err, size_t errlen)
{
    const char *p = arg, *start, *end, *rest;
    int quoted = 0;

    *addr = NULL;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '<') {
        /* Find the closing bracket outside quotes; spaces inside are tolerated. */
        start = ++p;
        for (; *p != '\0'; p++) {
            if (*p == '\\' && quoted && p[1] != '\0')
                p++;
            else if (*p == '"')
                quoted = !quoted;
            else if (*p == '>' && !quoted)
                break;
        }
        if (*p != '>')
            return addr_fail(err, errlen, "unbalanced angle brackets or quotes in address");
        end = p;
        rest = p + 1;
    } else {
        /* No brackets: the address runs to the first space outside quotes. */
        start = p;
        for (; *p != '\0'; p++) {
            if (*p == '\\' && quoted && p[1] != '\0')
                p++;
            else if (*p == '"')
                quoted = !quoted;
            else if ((*p == ' ' || *p == '\t') && !quoted)
                break;
        }
        if (quoted)
            return addr_fail(err, errlen, "unbalanced quotes in address");
        end = p;
        rest = p;
    }
    while (start < end && (*start == ' ' || *start == '\t'))
        start++;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    /* RFC 5321 4.1.2: drop an obsolete source route "@a,@b:user@c". */
    if (start < end && *start == '@') {
        const char *colon = memchr(start, ':', (size_t)(end - start));
        if (colon == NULL)
            return addr_fail(err, errlen, "malformed source route in address");
        start = colon + 1;
    }
    if ((size_t)(end - start) > ADDR_MAX)
        return addr_fail(err, errlen, "address too long");
    quoted = 0;
    for (p = start; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x20 || c == 0x7f)
            return addr_fail(err, errlen, "control character in address");
        if (c == '"')
            quoted = !quoted;
        else if ((c == '<' || c == '>') && !quoted)
            return addr_fail(err, errlen, "stray angle bracket in address");
    }
    if (*rest != '\0' && *rest != ' ' && *rest != '\t')
        return addr_fail(err, errlen, "garbage after address");
    while (*rest == ' ' || *rest == '\t')
        rest++;
    *addr = xstrndup(start, (size_t)(end - start));
    *params = rest;
    return 0;
}

const char *addr_domain(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at != NULL ? at + 1 : "";
}
