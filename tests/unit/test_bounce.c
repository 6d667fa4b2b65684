/* Unit tests for relayd/bounce: RFC 3464 delivery status notifications. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "relayd/bounce.h"

#define ORIG                                                                                       \
    "Received: from fax.lan ([10.0.0.7])\r\n\tby relay.test with SMTP id 0190A3F2C1D4\r\n"         \
    "From: Fax <fax@lan.test>\r\n"                                                                 \
    "To: <good@example.com>, <bad@example.com>\r\n"                                                \
    "Subject: scan 42\r\n"                                                                         \
    "Message-ID: <scan-42@lan.test>\r\n"                                                           \
    "\r\n"                                                                                         \
    "SECRET BODY LINE\r\n"                                                                         \
    "\r\n"                                                                                         \
    "more body\r\n"

static const struct bounce_rcpt one_failed[] = {
    {"bad@example.com", "550 5.1.1 <bad@example.com>: Recipient address rejected: User unknown",
     NULL, "mail.provider.test", 1700000000, NULL},
};

static struct bounce_info info(enum bounce_kind kind, const struct bounce_rcpt *r, size_t n,
                               const char *orig)
{
    struct bounce_info bi;

    memset(&bi, 0, sizeof(bi));
    bi.kind = kind;
    bi.hostname = "relay.test";
    bi.queue_id = 0x0190A3F2C1D4ULL;
    bi.dsn_id = 0x0190A3F2C1E0ULL;
    bi.sender = "fax@lan.test";
    bi.to = "fax@lan.test";
    bi.arrived = 1700000000 - 3600;
    bi.now = 1700000000;
    bi.retry_until = kind == BOUNCE_DELAYED ? 1700000000 + 86400 : 0;
    bi.rcpts = r;
    bi.nrcpts = n;
    bi.orig = orig;
    bi.orig_len = orig != NULL ? strlen(orig) : 0;
    return bi;
}

static char *build(const struct bounce_info *bi, size_t *len)
{
    char *out = NULL;
    size_t n = 0;

    bounce_build(bi, &out, &n);
    cr_assert(out != NULL);
    cr_assert(eq(sz, strlen(out), n), "NUL inside the notification");
    if (len != NULL)
        *len = n;
    return out;
}

/* Every line ends in CRLF (no bare CR or LF) and none is longer than 998 characters. */
static void assert_lines(const char *m)
{
    const char *p = m;

    while (*p != '\0') {
        const char *lf = strchr(p, '\n');
        cr_assert(lf != NULL, "last line without CRLF");
        cr_assert(lf > p && lf[-1] == '\r', "bare LF at offset %zu", (size_t)(lf - m));
        cr_assert(memchr(p, '\r', (size_t)(lf - p - 1)) == NULL, "bare CR");
        cr_assert(lf - p - 1 <= 998, "line longer than 998");
        p = lf + 1;
    }
}

/* The boundary from the top-level Content-Type. */
static void boundary_of(const char *m, char *out, size_t outlen)
{
    const char *b = strstr(m, "boundary=\"");
    cr_assert(b != NULL);
    b += strlen("boundary=\"");
    size_t n = strcspn(b, "\"");
    cr_assert(n > 0 && n < outlen && n <= 70, "RFC 2046: 1..70 characters");
    memcpy(out, b, n);
    out[n] = '\0';
}

/* Splits the body into its parts; returns how many (up to max), each malloc'd. */
static int parts_of(const char *m, char **parts, int max, int *closed)
{
    char boundary[128], delim[140], close[140];
    const char *hdr_end = strstr(m, "\r\n\r\n");
    const char *p;
    int n = 0;

    boundary_of(m, boundary, sizeof boundary);
    snprintf(delim, sizeof delim, "\r\n--%s\r\n", boundary);
    snprintf(close, sizeof close, "\r\n--%s--\r\n", boundary);
    cr_assert(hdr_end != NULL);
    p = strstr(hdr_end, delim);
    *closed = 0;
    while (p != NULL && n < max) {
        const char *start = p + strlen(delim);
        const char *next = strstr(start, delim);
        const char *end = next;
        if (next == NULL) {
            end = strstr(start, close);
            cr_assert(end != NULL, "no closing delimiter");
            *closed = strcmp(end + strlen(close), "") == 0;
        }
        parts[n++] = strndup(start, (size_t)(end - start));
        p = next;
    }
    return n;
}

/* Top-level header: who, what, and the MIME type of a delivery report. */
Test(bounce, header)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, ORIG);
    char *m = build(&bi, NULL);
    const char *end = strstr(m, "\r\n\r\n");

    cr_assert(end != NULL);
    cr_expect(strncmp(m, "From: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n", 55) == 0);
    cr_expect(strstr(m, "\r\nTo: <fax@lan.test>\r\n") != NULL);
    cr_expect(strstr(m, "\r\nSubject: Undelivered Mail Returned to Sender\r\n") != NULL);
    cr_expect(strstr(m, "\r\nDate: ") != NULL);
    cr_expect(strstr(m, "\r\nMessage-ID: <0190A3F2C1E0.0190A3F2C1D4.dsn@relay.test>\r\n") != NULL);
    cr_expect(strstr(m, "\r\nAuto-Submitted: auto-replied\r\n") != NULL);
    cr_expect(strstr(m, "\r\nMIME-Version: 1.0\r\n") != NULL);
    cr_expect(strstr(m, "\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n"
                        "\tboundary=\"") != NULL);
    /* Every header line of the notification itself stays within 78 characters. */
    for (const char *p = m; p < end;) {
        const char *lf = strchr(p, '\n');
        cr_expect(lf - p - 1 <= 78, "%.*s", (int)(lf - p), p);
        p = lf + 1;
    }
    assert_lines(m);
    free(m);
}

/* Three parts in order: text, delivery-status, headers; the closing delimiter ends it. */
Test(bounce, structure)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, ORIG);
    char *m = build(&bi, NULL), *parts[4];
    int closed, n = parts_of(m, parts, 4, &closed);

    cr_assert(eq(int, n, 3));
    cr_expect(closed, "something after the closing delimiter");
    cr_expect(strstr(parts[0], "Content-Type: text/plain; charset=us-ascii\r\n\r\n") != NULL);
    cr_expect(strstr(parts[1], "Content-Type: message/delivery-status\r\n\r\n") != NULL);
    cr_expect(strstr(parts[2], "Content-Type: text/rfc822-headers\r\n") != NULL);
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* The human-readable part says which recipient failed, why, the queue id and our name. */
Test(bounce, text_part)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, ORIG);
    char *m = build(&bi, NULL), *parts[4];
    int closed, n = parts_of(m, parts, 4, &closed);

    cr_assert(eq(int, n, 3));
    cr_expect(strstr(parts[0], "relay.test") != NULL);
    cr_expect(strstr(parts[0], "0190A3F2C1D4") != NULL);
    cr_expect(strstr(parts[0], "<bad@example.com>: the mail server mail.provider.test answered:") !=
                  NULL,
              "%s", parts[0]);
    cr_expect(strstr(parts[0], "User unknown") != NULL);
    cr_expect(strstr(parts[0], "could not be delivered") != NULL);
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* The machine-readable part: per-message fields, then one block per recipient. */
Test(bounce, delivery_status)
{
    static const struct bounce_rcpt r[] = {
        {"bad@example.com", "550 5.1.1 <bad@example.com>: User unknown", NULL, "mx.test",
         1700000000, NULL},
        {"gone@example.net", "554 transaction failed", NULL, "mx.test", 1700000000, NULL},
        {"slow@example.org", "connect to 127.0.0.1:1587: connection refused", "4.4.7", NULL, 0,
         NULL},
    };
    struct bounce_info bi = info(BOUNCE_FAILED, r, 3, ORIG);
    char *m = build(&bi, NULL), *parts[4];
    int closed, n = parts_of(m, parts, 4, &closed);
    const char *ds;

    cr_assert(eq(int, n, 3));
    ds = strstr(parts[1], "\r\n\r\n");
    cr_assert(ds != NULL);
    ds += 4;
#define WANT_DS "Reporting-MTA: dns; relay.test\r\nX-Relayd-Queue-ID: 0190A3F2C1D4\r\n"
    cr_expect(strncmp(ds, WANT_DS, strlen(WANT_DS)) == 0, "%s", ds);
    cr_expect(strstr(ds, "\r\nX-Relayd-Sender: rfc822; fax@lan.test\r\n") != NULL);
    cr_expect(strstr(ds, "\r\nArrival-Date: ") != NULL);
    cr_expect(strstr(ds, "\r\n\r\nFinal-Recipient: rfc822; bad@example.com\r\n"
                         "Action: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.test\r\n"
                         "Diagnostic-Code: smtp; 550 5.1.1 <bad@example.com>: User unknown\r\n"
                         "Last-Attempt-Date: ") != NULL,
              "%s", ds);
    cr_expect(strstr(ds, "\r\n\r\nFinal-Recipient: rfc822; gone@example.net\r\n"
                         "Action: failed\r\nStatus: 5.0.0\r\n") != NULL);
    cr_expect(strstr(ds, "\r\n\r\nFinal-Recipient: rfc822; slow@example.org\r\n"
                         "Action: failed\r\nStatus: 4.4.7\r\n"
                         "Diagnostic-Code: X-Relayd; connect to 127.0.0.1:1587: connection "
                         "refused\r\n") != NULL,
              "%s", ds);
    /* No Remote-MTA for the recipient no server was reached for. */
    cr_expect(strstr(strstr(ds, "slow@example.org"), "Remote-MTA") == NULL);
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* The third part is the original's header section exactly, and never its body. */
Test(bounce, headers_only)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, ORIG);
    char *m = build(&bi, NULL), *parts[4];
    int closed, n = parts_of(m, parts, 4, &closed);
    const char *h;
    size_t hdrlen = (size_t)(strstr(ORIG, "\r\n\r\n") - ORIG) + 2;

    cr_assert(eq(int, n, 3));
    h = strstr(parts[2], "\r\n\r\n");
    cr_assert(h != NULL);
    h += 4;
    cr_expect(strlen(h) == hdrlen && strncmp(h, ORIG, hdrlen) == 0, "got [%s]", h);
    cr_expect(strstr(m, "SECRET BODY LINE") == NULL, "the body was returned");
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* Bare LF line ends in the original become CRLF; no original at all gives an empty part. */
Test(bounce, headers_lf_and_none)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, "Subject: lf\nX-A: b\n\nbody\n");
    char *m = build(&bi, NULL);

    cr_expect(strstr(m, "\r\n\r\nSubject: lf\r\nX-A: b\r\n\r\n--") != NULL, "%s", m);
    cr_expect(strstr(m, "body") == NULL);
    assert_lines(m);
    free(m);

    bi = info(BOUNCE_FAILED, one_failed, 1, NULL);
    m = build(&bi, NULL);
    cr_expect(strstr(m, "Content-Type: text/rfc822-headers\r\n\r\n\r\n--") != NULL);
    assert_lines(m);
    free(m);
}

/* Huge header sections are cut at a line boundary. */
Test(bounce, headers_limited)
{
    size_t n = 20000, i;
    char *orig = malloc(n * 13 + 16), *p = orig, *m;
    struct bounce_info bi;
    size_t len;

    for (i = 0; i < n; i++)
        p += sprintf(p, "X-H: %06zu\r\n", i);
    strcpy(p, "\r\nbody\r\n");
    bi = info(BOUNCE_FAILED, one_failed, 1, orig);
    m = build(&bi, &len);
    cr_expect(len < BOUNCE_HEADERS_MAX + 8192, "%zu", len);
    cr_expect(strstr(m, "X-H: 000000\r\n") != NULL);
    cr_expect(strstr(m, "X-H: 019999") == NULL);
    assert_lines(m);
    free(m);
    free(orig);
}

/* A long reply is folded within 78 columns and cut at BOUNCE_DIAG_MAX with "...". */
Test(bounce, long_reply_folded)
{
    char reply[3000], *m, *parts[4];
    struct bounce_rcpt r = {"bad@example.com", reply, NULL, "mx.test", 0, NULL};
    struct bounce_info bi;
    int closed, n;
    const char *dc, *p;
    size_t total = 0;

    strcpy(reply, "550 5.7.1");
    while (strlen(reply) < sizeof(reply) - 20)
        strcat(reply, " policy words");
    bi = info(BOUNCE_FAILED, &r, 1, ORIG);
    m = build(&bi, NULL);
    assert_lines(m);
    n = parts_of(m, parts, 4, &closed);
    cr_assert(eq(int, n, 3));
    dc = strstr(parts[1], "Diagnostic-Code: smtp; 550 5.7.1 policy");
    cr_assert(dc != NULL, "%s", parts[1]);
    /* Lines of the field: the first, then continuations beginning with a space. */
    p = dc;
    for (;;) {
        const char *lf = strstr(p, "\r\n");
        cr_assert(lf != NULL);
        cr_expect(lf - p <= 78, "folded line of %d", (int)(lf - p));
        total += (size_t)(lf - p);
        p = lf + 2;
        if (*p != ' ')
            break;
    }
    cr_expect(total < BOUNCE_DIAG_MAX + 60, "%zu", total);
    cr_expect(strstr(parts[1], "...\r\n") != NULL, "no cut mark");
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* Replies cannot smuggle header lines or MIME structure: controls become spaces, 8-bit '?'. */
Test(bounce, reply_injection)
{
    struct bounce_rcpt r = {"bad@example.com",
                            "550 no\r\nX-Evil: 1\r\n\r\n--=_relayd_ and \xc3\xa9t\xc3\xa9", NULL,
                            "mx.test", 0, NULL};
    struct bounce_info bi = info(BOUNCE_FAILED, &r, 1, ORIG);
    char *m = build(&bi, NULL);

    cr_expect(strstr(m, "\r\nX-Evil") == NULL);
    cr_expect(strstr(m, "550 no X-Evil: 1 --=_relayd_ and ??t??") != NULL, "%s", m);
    assert_lines(m);
    free(m);
}

/* The boundary is never a line of the content, even when the original tries. */
Test(bounce, boundary_unique)
{
    char orig[512], boundary[128], *m;
    struct bounce_info bi;

    snprintf(orig, sizeof orig,
             "X-Trap: =_relayd_0190A3F2C1E0_0190A3F2C1D4_0\r\nSubject: t\r\n\r\nbody\r\n");
    bi = info(BOUNCE_FAILED, one_failed, 1, orig);
    m = build(&bi, NULL);
    boundary_of(m, boundary, sizeof boundary);
    cr_expect(strcmp(boundary, "=_relayd_0190A3F2C1E0_0190A3F2C1D4_0") != 0);
    cr_expect(strstr(m, "X-Trap: =_relayd_0190A3F2C1E0_0190A3F2C1D4_0\r\n") != NULL);
    free(m);
}

/* A delay warning: its own subject, Action: delayed, Will-Retry-Until, 4.x.x status. */
Test(bounce, delayed)
{
    static const struct bounce_rcpt r[] = {
        {"slow@example.com", "451 4.3.0 try later", NULL, "mx.test", 1700000000, NULL},
        {"down@example.com", "connect to 127.0.0.1:1587: connection refused", NULL, "mx.test",
         1700000000, NULL},
    };
    struct bounce_info bi = info(BOUNCE_DELAYED, r, 2, ORIG);
    char *m = build(&bi, NULL);

    cr_expect(strstr(m, "\r\nSubject: Delayed Mail (still being retried)\r\n") != NULL);
    cr_expect(strstr(m, "Action: delayed\r\nStatus: 4.3.0\r\n") != NULL);
    cr_expect(strstr(m, "Action: delayed\r\nStatus: 4.0.0\r\n") != NULL);
    cr_expect(strstr(m, "Action: failed") == NULL);
    cr_expect(strstr(m, "Will-Retry-Until: ") != NULL);
    cr_expect(strstr(m, "not been delivered yet") != NULL);
    cr_expect(strstr(m, "Gives up:") != NULL);
    assert_lines(m);
    free(m);
}

struct status_case {
    const char *label, *reply;
    enum bounce_kind kind;
    const char *want;
};

/* Status codes: enhanced code when it matches the class, else the basic code's class. */
Test(bounce, status)
{
    static const struct status_case cases[] = {
        {"enhanced", "550 5.1.1 <x@y>: User unknown", BOUNCE_FAILED, "5.1.1"},
        {"enhanced 3 digits", "554 5.7.123 nope", BOUNCE_FAILED, "5.7.123"},
        {"enhanced at end", "550 5.2.2", BOUNCE_FAILED, "5.2.2"},
        {"multiline dash", "550-5.1.1 first line", BOUNCE_FAILED, "5.1.1"},
        {"basic only", "554 transaction failed", BOUNCE_FAILED, "5.0.0"},
        {"class mismatch", "550 4.1.1 odd", BOUNCE_FAILED, "5.0.0"},
        {"bad enhanced", "550 5.1234.1 odd", BOUNCE_FAILED, "5.0.0"},
        {"no space after", "550 5.1.1x", BOUNCE_FAILED, "5.0.0"},
        {"4xx failed", "451 4.3.0 later", BOUNCE_FAILED, "4.3.0"},
        {"4xx basic", "421 closing", BOUNCE_DELAYED, "4.0.0"},
        {"not smtp failed", "connect: refused", BOUNCE_FAILED, "5.0.0"},
        {"not smtp delayed", "TLS: certificate expired", BOUNCE_DELAYED, "4.0.0"},
        {"null", NULL, BOUNCE_FAILED, "5.0.0"},
        {"short", "55", BOUNCE_DELAYED, "4.0.0"},
        {"2xx", "250 ok", BOUNCE_FAILED, "5.0.0"},
    };
    char out[16];

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        cr_expect(eq(str, bounce_status(cases[i].reply, cases[i].kind, out), (char *)cases[i].want),
                  "%s", cases[i].label);
}

/* ENVID becomes Original-Envelope-Id (first per-message field), ORCPT Original-Recipient
 * (before Final-Recipient); both cleaned of controls. */
Test(bounce, envid_orcpt)
{
    struct bounce_rcpt r[] = {
        {"bad@example.com", "550 5.1.1 unknown", NULL, "mx.test", 0, "rfc822;Bad@Example.COM"},
        {"x@example.com", "550 no", NULL, "mx.test", 0, NULL},
    };
    struct bounce_info bi = info(BOUNCE_FAILED, r, 2, ORIG);
    char *m, *parts[4];
    int closed, n;

    bi.envid = "fax-42\r\nX-Evil: 1";
    m = build(&bi, NULL);
    n = parts_of(m, parts, 4, &closed);
    cr_assert(eq(int, n, 3));
    cr_expect(strncmp(parts[1], "Content-Description: Delivery report\r\n"
                                "Content-Type: message/delivery-status\r\n\r\n"
                                "Original-Envelope-Id: fax-42 X-Evil: 1\r\n"
                                "Reporting-MTA: dns; relay.test\r\n",
                      strlen("Content-Description: Delivery report\r\n"
                             "Content-Type: message/delivery-status\r\n\r\n"
                             "Original-Envelope-Id: fax-42 X-Evil: 1\r\n"
                             "Reporting-MTA: dns; relay.test\r\n")) == 0,
              "%s", parts[1]);
    cr_expect(strstr(parts[1], "\r\n\r\nOriginal-Recipient: rfc822;Bad@Example.COM\r\n"
                               "Final-Recipient: rfc822; bad@example.com\r\n") != NULL,
              "%s", parts[1]);
    cr_expect(strstr(parts[1], "\r\n\r\nFinal-Recipient: rfc822; x@example.com\r\n") != NULL);
    cr_expect(strstr(m, "Original-Recipient") == strstr(m, "Original-Recipient: rfc822;Bad"));
    assert_lines(m);
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);
}

/* RET=FULL: a failure notification returns the whole message as message/rfc822; a delay
 * notification, RET=HDRS and an original over BOUNCE_FULL_MAX get the headers only. */
Test(bounce, ret_full)
{
    struct bounce_info bi = info(BOUNCE_FAILED, one_failed, 1, ORIG);
    char *m, *parts[4], *big;
    int closed, n;
    size_t blen = BOUNCE_FULL_MAX + 10;

    bi.dsn_ret = 1; /* SPOOL_RET_FULL */
    m = build(&bi, NULL);
    n = parts_of(m, parts, 4, &closed);
    cr_assert(eq(int, n, 3));
    cr_expect(closed);
    cr_expect(strncmp(parts[2], "Content-Description: Undelivered Message\r\n"
                                "Content-Type: message/rfc822\r\n\r\n" ORIG,
                      strlen("Content-Description: Undelivered Message\r\n"
                             "Content-Type: message/rfc822\r\n\r\n" ORIG)) == 0,
              "%s", parts[2]);
    cr_expect(strstr(parts[0], "your message are attached") != NULL);
    assert_lines(m);
    for (int i = 0; i < n; i++)
        free(parts[i]);
    free(m);

    bi.dsn_ret = 2; /* HDRS */
    m = build(&bi, NULL);
    cr_expect(strstr(m, "SECRET BODY LINE") == NULL);
    cr_expect(strstr(m, "Content-Type: text/rfc822-headers") != NULL);
    free(m);

    bi = info(BOUNCE_DELAYED, one_failed, 1, ORIG);
    bi.dsn_ret = 1;
    m = build(&bi, NULL);
    cr_expect(strstr(m, "SECRET BODY LINE") == NULL);
    free(m);

    big = malloc(blen + 1);
    memset(big, 'b', blen);
    memcpy(big, "Subject: big\r\n\r\n", 16);
    for (size_t i = 100; i < blen; i += 100)
        memcpy(big + i - 2, "\r\n", 2);
    big[blen] = '\0';
    bi = info(BOUNCE_FAILED, one_failed, 1, big);
    bi.dsn_ret = 1;
    m = build(&bi, NULL);
    cr_expect(strstr(m, "Content-Type: text/rfc822-headers") != NULL);
    cr_expect(strstr(m, "Subject: big\r\n") != NULL);
    cr_expect(strstr(m, "bbbbbbbbbb") == NULL);
    free(m);
    free(big);
}
