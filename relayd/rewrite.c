/*
 * rewrite - per-route envelope and header rewriting; see rewrite.h.
 *
 * The header is walked field by field (a field is its first line plus any continuation
 * lines that start with a space or tab, RFC 5322 2.2.3).  Each From: field is replaced as a
 * whole; everything else, including the bytes of the original From: value that go into
 * Reply-To:, is copied as it was, with the line ending the message uses.  The body is never
 * looked at.
 */
#include "relayd/rewrite.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/xalloc.h"

int rewrite_envelope(const struct cfg_route *r, const char *sender, char **new_sender)
{
    const char *to = NULL;

    *new_sender = NULL;
    /* <> marks bounces and other notifications (RFC 5321 4.5.5): never give them an
     * address that could receive a bounce back. */
    if (r == NULL || sender == NULL || *sender == '\0')
        return 0;
    if (r->rewrite_sender_map.n > 0)
        to = cfg_map_lookup(&r->rewrite_sender_map, sender);
    if (to == NULL)
        to = r->rewrite_sender;
    if (to == NULL || strcasecmp(to, sender) == 0)
        return 0;
    *new_sender = xstrdup(to);
    return 1;
}

int rewrite_recipient(const struct cfg_route *r, const char *rcpt, char **new_rcpt)
{
    const char *to;

    *new_rcpt = NULL;
    if (r == NULL || r->recipient_map.n == 0 || rcpt == NULL)
        return 0;
    if ((to = cfg_map_lookup(&r->recipient_map, rcpt)) == NULL || strcasecmp(to, rcpt) == 0)
        return 0;
    *new_rcpt = xstrdup(to);
    return 1;
}

int rewrite_wants_headers(const struct cfg_route *r)
{
    return r != NULL && r->rewrite_from;
}

/* Length of the header field starting at p (continuation lines included, final line
 * ending included); end is the end of the header section. */
static size_t field_len(const char *p, const char *end)
{
    const char *q = p, *nl;

    for (;;) {
        nl = memchr(q, '\n', (size_t)(end - q));
        if (nl == NULL)
            return (size_t)(end - p);
        q = nl + 1;
        if (q >= end || (*q != ' ' && *q != '\t'))
            return (size_t)(q - p);
    }
}

static int field_is(const char *f, size_t flen, const char *name)
{
    size_t n = strlen(name);

    return flen > n && strncasecmp(f, name, n) == 0 && f[n] == ':';
}

/* The value of field f (after "Name:" and leading blanks, without the final line ending). */
static void field_value(const char *f, size_t flen, const char **v, size_t *vlen)
{
    const char *colon = memchr(f, ':', flen), *end = f + flen;

    *v = colon + 1;
    while (*v < end && (**v == ' ' || **v == '\t'))
        (*v)++;
    while (end > *v && (end[-1] == '\n' || end[-1] == '\r'))
        end--;
    *vlen = (size_t)(end - *v);
}

/* The display name of a From: value ("Scanner 3rd floor" <scan@lan> -> "Scanner 3rd
 * floor"), unfolded, or "" when there is none or the field lists several mailboxes. */
static char *display_name(const char *v, size_t vlen)
{
    char *u = xmalloc(vlen + 1), *lt = NULL;
    size_t i, n = 0;
    int quoted = 0, angle = 0, commas = 0;

    for (i = 0; i < vlen; i++)
        if (v[i] != '\r' && v[i] != '\n')
            u[n++] = v[i];
    u[n] = '\0';
    for (i = 0; i < n; i++) {
        if (u[i] == '\\' && quoted && i + 1 < n) {
            i++;
        } else if (u[i] == '"') {
            quoted = !quoted;
        } else if (!quoted && u[i] == '<') {
            if (lt == NULL)
                lt = u + i;
            angle = 1;
        } else if (!quoted && u[i] == '>') {
            angle = 0;
        } else if (!quoted && !angle && u[i] == ',') {
            commas++;
        }
    }
    if (lt == NULL || commas > 0) {
        u[0] = '\0';
        return u;
    }
    while (lt > u && (lt[-1] == ' ' || lt[-1] == '\t'))
        lt--;
    *lt = '\0';
    n = strspn(u, " \t");
    memmove(u, u + n, strlen(u + n) + 1);
    return u;
}

int rewrite_headers(const struct cfg_route *r, const char *orig_from, const char *new_from,
                    const char *msg, size_t len, struct buf *out)
{
    const char *hend, *p, *from_v = NULL, *eol = "\r\n";
    size_t flen, from_vlen = 0, i;
    int has_reply_to = 0, rc = 0, rewritten = 0;

    if (!rewrite_wants_headers(r) || new_from == NULL || *new_from == '\0')
        return buf_append(out, msg, len) != 0 ? -ENOSPC : 0;

    /* The header ends at the first empty line; without one, everything is header. */
    hend = msg + len;
    for (p = msg; p < msg + len;) {
        const char *nl = memchr(p, '\n', (size_t)(msg + len - p));

        if (p[0] == '\n' || (p[0] == '\r' && p + 1 < msg + len && p[1] == '\n')) {
            hend = p;
            break;
        }
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    for (p = msg; p < hend; p += flen) {
        flen = field_len(p, hend);
        if (field_is(p, flen, "Reply-To"))
            has_reply_to = 1;
        if (field_is(p, flen, "From") && from_v == NULL)
            field_value(p, flen, &from_v, &from_vlen);
    }
    /* The message's own line ending, so that a CRLF spool stays CRLF. */
    for (i = 0; i < len; i++) {
        if (msg[i] == '\n') {
            eol = i > 0 && msg[i - 1] == '\r' ? "\r\n" : "\n";
            break;
        }
    }

    for (p = msg; p < hend; p += flen) {
        flen = field_len(p, hend);
        if (!field_is(p, flen, "From")) {
            rc |= buf_append(out, p, flen);
            continue;
        }
        {
            const char *v;
            size_t vlen;
            char *dn;

            field_value(p, flen, &v, &vlen);
            dn = display_name(v, vlen);
            rc |= buf_printf(out, "From: %s%s<%s>%s", dn, *dn ? " " : "", new_from, eol);
            free(dn);
            if (!rewritten && r->keep_reply_to && !has_reply_to && vlen > 0) {
                rc |= buf_puts(out, "Reply-To: ");
                rc |= buf_append(out, v, vlen);
                rc |= buf_puts(out, eol);
            }
            rewritten = 1;
        }
    }
    if (!rewritten) {
        /* No From: at all (msgfix normally adds one): say who sent it all the same. */
        rc |= buf_printf(out, "From: <%s>%s", new_from, eol);
        if (r->keep_reply_to && !has_reply_to && orig_from != NULL && *orig_from != '\0')
            rc |= buf_printf(out, "Reply-To: <%s>%s", orig_from, eol);
    }
    rc |= buf_append(out, hend, (size_t)(msg + len - hend));
    return rc != 0 ? -ENOSPC : 1;
}
