/*
 * msgfix - repair of a received message before it is spooled; see msgfix.h.
 */
#include "relayd/msgfix.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

char *msgfix_date(time_t t, char *out, size_t outlen)
{
    struct tm tm;

    localtime_r(&t, &tm);
    /* %a and %b are locale-dependent; relayd never calls setlocale(), so they are "C". */
    strftime(out, outlen, "%a, %d %b %Y %H:%M:%S %z", &tm);
    return out;
}

/* Length of the field name when line is "Name: value" (RFC 5322 2.2 ftext), else 0. */
static size_t msgfix_field_name(const char *line, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)line[i];
        if (c == ':')
            return i;
        if (c <= 32 || c >= 127)
            break;
    }
    /* Tolerate "Name : value" (obsolete syntax, RFC 5322 4.5.2). */
    if (i > 0 && i < n && (line[i] == ' ' || line[i] == '\t')) {
        size_t j = i;
        while (j < n && (line[j] == ' ' || line[j] == '\t'))
            j++;
        if (j < n && line[j] == ':')
            return i;
    }
    return 0;
}

static int msgfix_is(const char *line, size_t namelen, const char *name)
{
    return namelen == strlen(name) && strncasecmp(line, name, namelen) == 0;
}

int msgfix_build(const char *raw, size_t len, const struct msgfix_opts *o, struct buf *out,
                 struct msgfix_report *rep)
{
    const char *p = raw, *end = raw + len, *body;
    int have_date = 0, have_msgid = 0, have_from = 0, separator = 0;
    char date[64];
    int rc;

    memset(rep, 0, sizeof(*rep));
    /* Find the end of the header section. */
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        size_t n = eol != NULL ? (size_t)(eol - p) : (size_t)(end - p);
        size_t name;

        if (n > 0 && p[n - 1] == '\r')
            n--;
        if (n == 0) {
            separator = 1;
            break;
        }
        if ((p[0] == ' ' || p[0] == '\t') && p != raw) {
            /* continuation of the previous field */
        } else if ((name = msgfix_field_name(p, n)) > 0) {
            have_date |= msgfix_is(p, name, "Date");
            have_msgid |= msgfix_is(p, name, "Message-ID");
            have_from |= msgfix_is(p, name, "From");
        } else {
            break; /* first body line: the separator is missing */
        }
        p = eol != NULL ? eol + 1 : end;
    }
    body = p;
    rep->header_bytes = (size_t)(body - raw);

    if (o->received != NULL) {
        if ((rc = buf_puts(out, o->received)) != 0 || (rc = buf_puts(out, "\r\n")) != 0)
            return rc;
    }
    if ((rc = buf_append(out, raw, rep->header_bytes)) != 0)
        return rc;
    /* A header section without a final CRLF (message ends inside it): close the line. */
    if (rep->header_bytes > 0 && raw[rep->header_bytes - 1] != '\n' &&
        (rc = buf_puts(out, "\r\n")) != 0)
        return rc;
    if (o->add_date && !have_date) {
        if ((rc = buf_printf(out, "Date: %s\r\n", msgfix_date(o->now, date, sizeof(date)))) != 0)
            return rc;
        rep->added_date = 1;
    }
    if (o->add_message_id && !have_msgid) {
        if ((rc = buf_printf(out, "Message-ID: <%s.relayd@%s>\r\n", o->queue_id, o->hostname)) != 0)
            return rc;
        rep->added_message_id = 1;
    }
    if (o->add_from && !have_from) {
        const char *from = o->sender[0] != '\0' ? o->sender : NULL;
        if (from != NULL)
            rc = buf_printf(out, "From: <%s>\r\n", from);
        else
            rc = buf_printf(out, "From: MAILER-DAEMON@%s\r\n", o->hostname);
        if (rc != 0)
            return rc;
        rep->added_from = 1;
    }
    if (!separator) {
        rep->added_separator = 1;
        if ((rc = buf_puts(out, "\r\n")) != 0)
            return rc;
    }
    return buf_append(out, body, (size_t)(end - body));
}
