/*
 * bounce - RFC 3464 delivery status notifications; see bounce.h.
 *
 * The message is assembled part by part into bufs, then a boundary is chosen that occurs
 * in none of the parts (RFC 2046 5.1.1), then everything is joined.  Text from outside
 * (upstream replies, addresses) goes through clean() before it is written anywhere, so a
 * reply cannot add header lines or MIME structure of its own.
 */
#include "relayd/bounce.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/buf.h"
#include "common/xalloc.h"
#include "spool/spool.h"

#define BOUNCE_FOLD 78 /* RFC 5322 2.1.1: SHOULD stay within 78 characters */
#define BOUNCE_WRAP 72 /* text part lines */

/* RFC 5322 3.3 date-time in local time with its offset. */
static void fmt_date(int64_t t, char *out, size_t outlen)
{
    time_t tt = (time_t)t;
    struct tm tm;

    localtime_r(&tt, &tm);
    if (strftime(out, outlen, "%a, %d %b %Y %H:%M:%S %z", &tm) == 0)
        snprintf(out, outlen, "Thu, 01 Jan 1970 00:00:00 +0000");
}

/* text reduced to printable ASCII on one line: controls and whitespace runs become one
 * space, other bytes '?', cut to max characters ("..." marks the cut).  malloc'd. */
static char *clean(const char *text, size_t max)
{
    size_t n = text != NULL ? strlen(text) : 0, o = 0, i;
    char *out = xmalloc(n + 4);
    int space = 1; /* drop leading white space */

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];

        if (c <= ' ' || c == 0x7f) {
            if (!space)
                out[o++] = ' ';
            space = 1;
            continue;
        }
        out[o++] = c < 0x80 ? (char)c : '?';
        space = 0;
    }
    while (o > 0 && out[o - 1] == ' ')
        o--;
    if (o > max) {
        o = max;
        memcpy(out + o, "...", 3);
        o += 3;
    }
    out[o] = '\0';
    return out;
}

/* An SMTP reply: three digits, then a space, a dash or the end. */
static int is_smtp_reply(const char *r)
{
    return r != NULL && r[0] >= '2' && r[0] <= '5' && isdigit((unsigned char)r[1]) &&
           isdigit((unsigned char)r[2]) && (r[3] == ' ' || r[3] == '-' || r[3] == '\0');
}

char *bounce_status(const char *reply, enum bounce_kind kind, char out[16])
{
    snprintf(out, 16, "%s", kind == BOUNCE_FAILED ? "5.0.0" : "4.0.0");
    if (!is_smtp_reply(reply))
        return out;
    if (reply[0] == '4' || reply[0] == '5')
        snprintf(out, 16, "%c.0.0", reply[0]);
    if (reply[3] != '\0') {
        /* RFC 3463 2: class "." subject "." detail; subject and detail 1..3 digits. */
        const char *p = reply + 4;
        size_t a, b;

        while (*p == ' ')
            p++;
        if (p[0] == reply[0] && p[1] == '.') {
            a = strspn(p + 2, "0123456789");
            if (a >= 1 && a <= 3 && p[2 + a] == '.') {
                b = strspn(p + 3 + a, "0123456789");
                if (b >= 1 && b <= 3 && (p[3 + a + b] == ' ' || p[3 + a + b] == '\0'))
                    snprintf(out, 16, "%.*s", (int)(3 + a + b), p);
            }
        }
    }
    return out;
}

/* "Name: value" folded at spaces to BOUNCE_FOLD columns (continuations start with a space);
 * value is clean text. */
static void header_folded(struct buf *b, const char *name, const char *value)
{
    size_t col = strlen(name) + 2;
    const char *p = value;

    buf_printf(b, "%s:", name);
    while (*p != '\0') {
        size_t w = strcspn(p, " ");

        if (col + 1 + w > BOUNCE_FOLD && col > strlen(name) + 2) {
            buf_puts(b, "\r\n");
            col = 0;
        }
        buf_puts(b, " ");
        buf_append(b, p, w);
        col += 1 + w;
        p += w;
        while (*p == ' ')
            p++;
    }
    buf_puts(b, "\r\n");
}

/* Plain text wrapped at BOUNCE_WRAP columns; the first line starts with first, every
 * further line with indent. */
static void text_wrapped(struct buf *b, const char *first, const char *indent, const char *text)
{
    size_t col = 0;
    const char *p = text;
    int lines = 0;

    while (*p != '\0') {
        size_t w = strcspn(p, " ");

        if (col > 0 && col + 1 + w > BOUNCE_WRAP) {
            buf_puts(b, "\r\n");
            col = 0;
        }
        if (col == 0) {
            const char *in = lines++ == 0 ? first : indent;
            buf_puts(b, in);
            col = strlen(in);
        } else {
            buf_puts(b, " ");
            col++;
        }
        buf_append(b, p, w);
        col += w;
        p += w;
        while (*p == ' ')
            p++;
    }
    if (col > 0)
        buf_puts(b, "\r\n");
}

/* The original's header section, CRLF, up to BOUNCE_HEADERS_MAX bytes (whole lines).
 * Sets *eight_bit when it holds bytes above 127. */
static void orig_headers(struct buf *b, const char *orig, size_t len, int *eight_bit)
{
    size_t pos = 0;

    *eight_bit = 0;
    while (orig != NULL && pos < len) {
        const char *line = orig + pos;
        const char *nl = memchr(line, '\n', len - pos);
        size_t n = nl != NULL ? (size_t)(nl - line) : len - pos;
        size_t next = pos + n + (nl != NULL);

        if (n > 0 && line[n - 1] == '\r')
            n--;
        if (n == 0)
            break; /* the empty line: end of the header section */
        if (b->len + n + 2 > BOUNCE_HEADERS_MAX)
            break;
        for (size_t i = 0; i < n; i++)
            *eight_bit |= (unsigned char)line[i] >= 0x80;
        buf_append(b, line, n);
        buf_puts(b, "\r\n");
        pos = next;
    }
}

static void text_part(struct buf *b, const struct bounce_info *in, int full)
{
    char qid[17], date[64], *s;
    size_t i;

    spool_id_str(in->queue_id, qid);
    buf_printf(b, "This is the mail relay at %s.\r\n\r\n", in->hostname);
    if (in->kind == BOUNCE_FAILED) {
        text_wrapped(b, "", "",
                     "Your message could not be delivered to one or more of its recipients. "
                     "The mail server it was passed to refused it, or it could not be "
                     "delivered within the time the relay keeps trying. Nothing more will be "
                     "tried for the recipients listed below; check the addresses, and send "
                     "the message again if it is still needed.");
    } else {
        text_wrapped(b, "", "",
                     "Your message has not been delivered yet to the recipients listed below. "
                     "The relay is still trying; you do not need to send it again. You will "
                     "hear from it again only if it has to give up.");
    }
    buf_puts(b, "\r\n");
    buf_printf(b, "  Queue ID:  %s\r\n", qid);
    s = clean(in->sender, 200);
    buf_printf(b, "  Sender:    <%s>\r\n", s);
    free(s);
    fmt_date(in->arrived, date, sizeof date);
    buf_printf(b, "  Arrived:   %s\r\n", date);
    if (in->kind == BOUNCE_DELAYED && in->retry_until > 0) {
        fmt_date(in->retry_until, date, sizeof date);
        buf_printf(b, "  Gives up:  %s\r\n", date);
    }
    buf_puts(b, "\r\n");
    for (i = 0; i < in->nrcpts; i++) {
        const struct bounce_rcpt *r = &in->rcpts[i];
        char *addr = clean(r->addr, 300), *reply = clean(r->reply, BOUNCE_DIAG_MAX);
        char *line;

        if (reply[0] == '\0')
            line = xasprintf("<%s>: %s", addr,
                             in->kind == BOUNCE_FAILED ? "could not be delivered"
                                                       : "not delivered yet");
        else if (r->remote_mta != NULL && is_smtp_reply(r->reply))
            line = xasprintf("<%s>: the mail server %s answered: %s", addr, r->remote_mta, reply);
        else
            line = xasprintf("<%s>: %s", addr, reply);
        text_wrapped(b, "", "    ", line);
        buf_puts(b, "\r\n");
        free(line);
        free(addr);
        free(reply);
    }
    buf_puts(b, full ? "The delivery report and your message are attached.\r\n"
                     : "The delivery report and the headers of your message are attached.\r\n");
}

static void status_part(struct buf *b, const struct bounce_info *in)
{
    char qid[17], date[64], st[16], *s;
    size_t i;

    spool_id_str(in->queue_id, qid);
    /* RFC 3464 2.2: per-message fields; 2.2.1: the ENVID the sender gave, first. */
    if (in->envid != NULL) {
        s = clean(in->envid, 200);
        buf_printf(b, "Original-Envelope-Id: %s\r\n", s);
        free(s);
    }
    buf_printf(b, "Reporting-MTA: dns; %s\r\n", in->hostname);
    buf_printf(b, "X-Relayd-Queue-ID: %s\r\n", qid);
    s = clean(in->sender, 300);
    buf_printf(b, "X-Relayd-Sender: rfc822; %s\r\n", s);
    free(s);
    fmt_date(in->arrived, date, sizeof date);
    buf_printf(b, "Arrival-Date: %s\r\n", date);
    /* RFC 3464 2.3: one block per recipient, each after an empty line. */
    for (i = 0; i < in->nrcpts; i++) {
        const struct bounce_rcpt *r = &in->rcpts[i];
        char *addr = clean(r->addr, 300), *reply = clean(r->reply, BOUNCE_DIAG_MAX);

        buf_puts(b, "\r\n");
        if (r->orcpt != NULL && strchr(r->orcpt, ';') != NULL) {
            /* RFC 3464 2.3.1: the ORCPT parameter as given (decoded), before Final-. */
            s = clean(r->orcpt, 500);
            buf_printf(b, "Original-Recipient: %s\r\n", s);
            free(s);
        }
        buf_printf(b, "Final-Recipient: rfc822; %s\r\n", addr);
        buf_printf(b, "Action: %s\r\n", in->kind == BOUNCE_FAILED ? "failed" : "delayed");
        if (r->status != NULL) {
            s = clean(r->status, 15);
            buf_printf(b, "Status: %s\r\n", s);
            free(s);
        } else {
            buf_printf(b, "Status: %s\r\n", bounce_status(r->reply, in->kind, st));
        }
        if (r->remote_mta != NULL) {
            s = clean(r->remote_mta, 255);
            buf_printf(b, "Remote-MTA: dns; %s\r\n", s);
            free(s);
        }
        if (reply[0] != '\0') {
            /* RFC 3464 2.3.6: "smtp" for an SMTP reply; anything else is our own words. */
            char *v = xasprintf("%s; %s", is_smtp_reply(r->reply) ? "smtp" : "X-Relayd", reply);

            header_folded(b, "Diagnostic-Code", v);
            free(v);
        }
        if (r->last_attempt > 0) {
            fmt_date(r->last_attempt, date, sizeof date);
            buf_printf(b, "Last-Attempt-Date: %s\r\n", date);
        }
        if (in->kind == BOUNCE_DELAYED && in->retry_until > 0) {
            fmt_date(in->retry_until, date, sizeof date);
            buf_printf(b, "Will-Retry-Until: %s\r\n", date);
        }
        free(addr);
        free(reply);
    }
}

static int contains(const struct buf *b, const char *s)
{
    return memmem(b->data, b->len, s, strlen(s)) != NULL;
}

/* RFC 3461 4.3: the whole original goes back for RET=FULL in a failure notification, when
 * it is not too large. */
static int want_full(const struct bounce_info *in)
{
    return in->kind == BOUNCE_FAILED && in->dsn_ret == SPOOL_RET_FULL && in->orig != NULL &&
           in->orig_len > 0 && in->orig_len <= BOUNCE_FULL_MAX;
}

/* The original whole, CRLF-terminated; sets *eight_bit when it holds bytes above 127. */
static void orig_full(struct buf *b, const char *orig, size_t len, int *eight_bit)
{
    *eight_bit = 0;
    for (size_t i = 0; i < len && !*eight_bit; i++)
        *eight_bit = (unsigned char)orig[i] >= 0x80;
    buf_append(b, orig, len);
    if (len < 2 || orig[len - 2] != '\r' || orig[len - 1] != '\n')
        buf_puts(b, "\r\n");
}

void bounce_build(const struct bounce_info *in, char **out, size_t *len)
{
    struct buf *msg = buf_new(0), *text = buf_new(0), *status = buf_new(0), *hdrs = buf_new(0);
    char qid[17], dsnid[17], date[64], boundary[80], *to;
    int eight_bit, n = 0, full = want_full(in);

    spool_id_str(in->queue_id, qid);
    spool_id_str(in->dsn_id, dsnid);
    text_part(text, in, full);
    status_part(status, in);
    if (full)
        orig_full(hdrs, in->orig, in->orig_len, &eight_bit);
    else
        orig_headers(hdrs, in->orig, in->orig_len, &eight_bit);
    do {
        snprintf(boundary, sizeof boundary, "=_relayd_%s_%s_%d", dsnid, qid, n++);
    } while (contains(text, boundary) || contains(status, boundary) || contains(hdrs, boundary));

    fmt_date(in->now, date, sizeof date);
    to = clean(in->to, 300);
    buf_printf(msg, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", in->hostname);
    buf_printf(msg, "To: <%s>\r\n", to);
    buf_printf(msg, "Subject: %s\r\n",
               in->kind == BOUNCE_FAILED ? "Undelivered Mail Returned to Sender"
                                         : "Delayed Mail (still being retried)");
    buf_printf(msg, "Date: %s\r\n", date);
    buf_printf(msg, "Message-ID: <%s.%s.dsn@%s>\r\n", dsnid, qid, in->hostname);
    /* RFC 3834 5: never answered automatically. */
    buf_puts(msg, "Auto-Submitted: auto-replied\r\n");
    buf_puts(msg, "MIME-Version: 1.0\r\n");
    buf_printf(msg,
               "Content-Type: multipart/report; report-type=delivery-status;\r\n"
               "\tboundary=\"%s\"\r\n",
               boundary);
    buf_printf(msg, "Content-Transfer-Encoding: %s\r\n", eight_bit ? "8bit" : "7bit");
    buf_puts(msg, "\r\n");
    buf_puts(msg, "This is a MIME-encapsulated message.\r\n\r\n");

    buf_printf(msg, "--%s\r\n", boundary);
    buf_puts(msg, "Content-Description: Notification\r\n");
    buf_puts(msg, "Content-Type: text/plain; charset=us-ascii\r\n\r\n");
    buf_append(msg, text->data, text->len);
    buf_puts(msg, "\r\n");

    buf_printf(msg, "--%s\r\n", boundary);
    buf_puts(msg, "Content-Description: Delivery report\r\n");
    buf_puts(msg, "Content-Type: message/delivery-status\r\n\r\n");
    buf_append(msg, status->data, status->len);
    buf_puts(msg, "\r\n");

    buf_printf(msg, "--%s\r\n", boundary);
    if (full) {
        buf_puts(msg, "Content-Description: Undelivered Message\r\n");
        buf_puts(msg, "Content-Type: message/rfc822\r\n");
    } else {
        buf_puts(msg, "Content-Description: Undelivered Message Headers\r\n");
        buf_puts(msg, "Content-Type: text/rfc822-headers\r\n");
    }
    if (eight_bit)
        buf_puts(msg, "Content-Transfer-Encoding: 8bit\r\n");
    buf_puts(msg, "\r\n");
    buf_append(msg, hdrs->data, hdrs->len);
    buf_puts(msg, "\r\n");
    buf_printf(msg, "--%s--\r\n", boundary);

    free(to);
    buf_free(text);
    buf_free(status);
    buf_free(hdrs);
    *out = buf_steal(msg, len);
    buf_free(msg);
}
