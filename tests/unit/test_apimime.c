/* Unit tests for relayd/apimime.c (the copy of a message an HTTP mail API gets). */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <gmime/gmime.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "relayd/apimime.h"

#define CRLF "\r\n"

/* The body (what follows the first empty line) of a message, for the byte-identity check. */
static const char *body_of(const char *m)
{
    const char *a = strstr(m, "\r\n\r\n"), *b = strstr(m, "\n\n");

    if (a != NULL && (b == NULL || a < b))
        return a + 4;
    return b != NULL ? b + 2 : m + strlen(m);
}

static int same_addr(const char *a, const char *b)
{
    const char *da = strrchr(a, '@'), *db = strrchr(b, '@');

    return da != NULL && db != NULL && da - a == db - b && memcmp(a, b, (size_t)(da - a)) == 0 &&
           strcasecmp(da, db) == 0;
}

static void collect(InternetAddressList *l, const char **v, size_t *n, size_t max)
{
    for (int i = 0; l != NULL && i < internet_address_list_length(l); i++) {
        InternetAddress *ia = internet_address_list_get_address(l, i);
        if (INTERNET_ADDRESS_IS_GROUP(ia))
            collect(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(ia)), v, n, max);
        else if (*n < max)
            v[(*n)++] = internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(ia));
    }
}

/* What a provider reading the copy with a MIME library (GMime here) delivers to: To, Cc and
 * Bcc must name exactly the envelope recipients.  Returns "" or what is wrong. */
static const char *provider_view(const char *copy, size_t len, const char *const *rcpts,
                                 size_t nrcpts, char *why, size_t whylen)
{
    static const GMimeAddressType types[] = {GMIME_ADDRESS_TYPE_TO, GMIME_ADDRESS_TYPE_CC,
                                             GMIME_ADDRESS_TYPE_BCC};
    GMimeStream *st = g_mime_stream_mem_new_with_buffer(copy, len);
    GMimeParser *p = g_mime_parser_new_with_stream(st);
    GMimeMessage *m = g_mime_parser_construct_message(p, NULL);
    const char *got[32];
    size_t ngot = 0;

    why[0] = '\0';
    if (m == NULL) {
        snprintf(why, whylen, "GMime cannot parse the copy");
        goto unref;
    }
    for (size_t t = 0; t < 3; t++)
        collect(g_mime_message_get_addresses(m, types[t]), got, &ngot, 32);
    for (size_t r = 0; r < nrcpts && why[0] == '\0'; r++) {
        size_t k = 0;
        while (k < ngot && !same_addr(got[k], rcpts[r]))
            k++;
        if (k == ngot)
            snprintf(why, whylen, "envelope recipient %s not in To/Cc/Bcc", rcpts[r]);
    }
    for (size_t k = 0; k < ngot && why[0] == '\0'; k++) {
        size_t r = 0;
        while (r < nrcpts && !same_addr(got[k], rcpts[r]))
            r++;
        if (r == nrcpts)
            snprintf(why, whylen, "%s is in To/Cc/Bcc but not in the envelope", got[k]);
    }
    g_object_unref(m);
unref:
    g_object_unref(p);
    g_object_unref(st);
    return why;
}

/* The API copy: Bcc for envelope-only recipients, header recipients outside the envelope
 * left out, every other byte identical. */
Test(apimime, for_api)
{
    static const struct {
        const char *label, *in;
        const char *rcpts[4]; /* NULL-terminated */
        const char *want, *want_note;
    } t[] = {
        {"nothing to change",
         "From: fax@corp.example" CRLF "To: a@x.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "From: fax@corp.example" CRLF "To: a@x.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         ""},
        {"bcc added for envelope-only recipients",
         "To: a@x.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example", "b@y.example", "c@z.example"},
         "To: a@x.example" CRLF "Subject: s" CRLF "Bcc: b@y.example, c@z.example" CRLF CRLF
         "b" CRLF,
         "bcc +2"},
        {"bcc extended when present",
         "To: a@x.example" CRLF "Bcc: h@y.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example", "h@y.example", "n@z.example"},
         "To: a@x.example" CRLF "Bcc: h@y.example, n@z.example" CRLF "Subject: s" CRLF CRLF
         "b" CRLF,
         "bcc +1"},
        {"header recipient not in the envelope left out",
         "To: a@x.example, \"Bee\" <b@x.example>" CRLF "Cc: a2@x.example" CRLF CRLF "b" CRLF,
         {"a@x.example", "a2@x.example"},
         "To: a@x.example" CRLF "Cc: a2@x.example" CRLF CRLF "b" CRLF,
         "header recipients not in the envelope left out: b@x.example"},
        {"To left empty becomes undisclosed-recipients, Cc left empty is dropped",
         "Subject: s" CRLF "To: b@x.example" CRLF "Cc: c@x.example" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "Subject: s" CRLF "To: undisclosed-recipients:;" CRLF "Bcc: a@x.example" CRLF CRLF
         "b" CRLF,
         "bcc +1; header recipients not in the envelope left out: b@x.example, c@x.example"},
        {"no To at all",
         "From: fax@corp.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "From: fax@corp.example" CRLF "Subject: s" CRLF "Bcc: a@x.example" CRLF CRLF "b" CRLF,
         "bcc +1"},
        {"bare LF input keeps bare LF",
         "To: a@x.example\nSubject: s\n\nline\n",
         {"a@x.example", "b@y.example"},
         "To: a@x.example\nSubject: s\nBcc: b@y.example\n\nline\n",
         "bcc +1"},
        {"folded To with encoded names: untouched when all are envelope recipients",
         "To: =?UTF-8?B?U2Nhbm5lciBLw7Zsbg==?= <a@x.example>," CRLF
         "\t\"Doe, Jane\" <j@x.example>" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"j@x.example", "a@x.example"},
         "To: =?UTF-8?B?U2Nhbm5lciBLw7Zsbg==?= <a@x.example>," CRLF
         "\t\"Doe, Jane\" <j@x.example>" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         ""},
        {"folded To rebuilt: the kept address keeps its display name as written",
         "To: =?UTF-8?B?U2Nhbm5lciBLw7Zsbg==?= <a@x.example>," CRLF
         "\t\"Doe, Jane\" <j@x.example>" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "To: =?UTF-8?B?U2Nhbm5lciBLw7Zsbg==?= <a@x.example>" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         "header recipients not in the envelope left out: j@x.example"},
        {"angle brackets with spaces",
         "To: < a@x.example >" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "To: < a@x.example >" CRLF CRLF "b" CRLF,
         ""},
        {"group: members outside the envelope left out",
         "To: Team: a@x.example, b@y.example;, c@z.example" CRLF CRLF "b" CRLF,
         {"a@x.example", "c@z.example"},
         "To: Team: a@x.example;, c@z.example" CRLF CRLF "b" CRLF,
         "header recipients not in the envelope left out: b@y.example"},
        {"empty group kept untouched, recipient added",
         "To: undisclosed-recipients:;" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "To: undisclosed-recipients:;" CRLF "Bcc: a@x.example" CRLF CRLF "b" CRLF,
         "bcc +1"},
        {"domain compared without case, local part exactly",
         "To: a@X.EXAMPLE, B@x.example" CRLF CRLF "b" CRLF,
         {"a@x.example", "b@x.example"},
         "To: a@X.EXAMPLE" CRLF "Bcc: b@x.example" CRLF CRLF "b" CRLF,
         "bcc +1; header recipients not in the envelope left out: B@x.example"},
        {"several To and Cc lines",
         "To: a@x.example" CRLF "Cc: c@x.example" CRLF "To: b@x.example" CRLF CRLF "b" CRLF,
         {"a@x.example", "b@x.example", "c@x.example"},
         "To: a@x.example" CRLF "Cc: c@x.example" CRLF "To: b@x.example" CRLF CRLF "b" CRLF,
         ""},
        {"header-like lines in the body are body",
         "To: a@x.example" CRLF CRLF "To: evil@x.example" CRLF "Bcc: x@y" CRLF,
         {"a@x.example", "n@x.example"},
         "To: a@x.example" CRLF "Bcc: n@x.example" CRLF CRLF "To: evil@x.example" CRLF
         "Bcc: x@y" CRLF,
         "bcc +1"},
        {"an envelope recipient twice is added once",
         "To: a@x.example" CRLF CRLF "b" CRLF,
         {"a@x.example", "n@x.example", "n@X.example"},
         "To: a@x.example" CRLF "Bcc: n@x.example" CRLF CRLF "b" CRLF,
         "bcc +1"},
        {"headers only, last line without a terminator",
         "To: a@x.example" CRLF "Subject: s",
         {"a@x.example", "n@x.example"},
         "To: a@x.example" CRLF "Subject: s" CRLF "Bcc: n@x.example" CRLF,
         "bcc +1"},
        {"headers only, the last line rebuilt",
         "Subject: s" CRLF "To: b@x.example",
         {"a@x.example"},
         "Subject: s" CRLF "To: undisclosed-recipients:;" CRLF "Bcc: a@x.example" CRLF,
         "bcc +1; header recipients not in the envelope left out: b@x.example"},
        {"an unterminated comment is not kept: the address goes to Bcc instead",
         "To: a@x.example (the fax" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "To: undisclosed-recipients:;" CRLF "Bcc: a@x.example" CRLF CRLF "b" CRLF,
         "bcc +1; header recipients not in the envelope left out: a@x.example"},
        {"comments and a quoted local part",
         "To: (the fax) \"j doe\"@x.example (home), k@x.example" CRLF CRLF "b" CRLF,
         {"\"j doe\"@x.example"},
         "To: (the fax) \"j doe\"@x.example (home)" CRLF CRLF "b" CRLF,
         "header recipients not in the envelope left out: k@x.example"},
        {"Bcc left empty and nothing to add is dropped",
         "To: a@x.example" CRLF "Bcc: z@x.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         {"a@x.example"},
         "To: a@x.example" CRLF "Subject: s" CRLF CRLF "b" CRLF,
         "header recipients not in the envelope left out: z@x.example"},
        {"many added recipients fold",
         "To: a@x.example" CRLF CRLF "b" CRLF,
         {"a-long-mailbox-name-1@example.com", "a-long-mailbox-name-2@example.com",
          "a-long-mailbox-name-3@example.com"},
         "To: undisclosed-recipients:;" CRLF
         "Bcc: a-long-mailbox-name-1@example.com, a-long-mailbox-name-2@example.com," CRLF
         " a-long-mailbox-name-3@example.com" CRLF CRLF "b" CRLF,
         "bcc +3; header recipients not in the envelope left out: a@x.example"},
    };

    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        size_t n = 0, outlen = 0;
        char *out = NULL, note[256], err[128] = "";
        int rc;

        while (n < 4 && t[i].rcpts[n] != NULL)
            n++;
        rc = apimime_for_api(t[i].in, strlen(t[i].in), t[i].rcpts, n, &out, &outlen, note,
                             sizeof note, err, sizeof err);
        cr_assert(rc == 0, "%s: rc %d: %s", t[i].label, rc, err);
        cr_expect(outlen == strlen(out), "%s: outlen", t[i].label);
        cr_expect(strcmp(out, t[i].want) == 0, "%s:\n--- got\n%s\n--- want\n%s", t[i].label, out,
                  t[i].want);
        cr_expect(strcmp(note, t[i].want_note) == 0, "%s: note \"%s\"", t[i].label, note);
        cr_expect(strcmp(body_of(out), body_of(t[i].in)) == 0, "%s: body changed", t[i].label);
        {
            char why[256];
            apimime_init();
            cr_expect(provider_view(out, outlen, t[i].rcpts, n, why, sizeof why)[0] == '\0',
                      "%s: %s", t[i].label, why);
        }
        free(out);
    }
}

/* What apimime_for_api() refuses, and a note too small for the phrase. */
Test(apimime, for_api_errors)
{
    const char *r[] = {"a@x.example", "b@x.example"};
    char *out = (char *)"x", note[8], err[128];
    size_t outlen = 9;
    const char *m = "To: c@x.example" CRLF CRLF "b" CRLF;

    cr_expect(apimime_for_api("", 0, r, 1, &out, &outlen, note, sizeof note, err, sizeof err) ==
              -1);
    cr_expect(out == NULL && outlen == 0);
    cr_expect(eq(str, err, "empty message"));
    cr_expect(apimime_for_api(m, strlen(m), r, 0, &out, &outlen, note, sizeof note, err,
                              sizeof err) == -1);
    cr_expect(eq(str, err, "no envelope recipients"));
    cr_expect(apimime_for_api(CRLF "body" CRLF, 6, r, 1, &out, &outlen, note, sizeof note, err,
                              sizeof err) == -1);
    cr_expect(eq(str, err, "no header section"));
    cr_assert(apimime_for_api(m, strlen(m), r, 2, &out, &outlen, note, sizeof note, err,
                              sizeof err) == 0);
    cr_expect(eq(str, note, "bcc +2;"), "note truncated: %s", note);
    free(out);
    cr_assert(apimime_for_api(m, strlen(m), r, 2, &out, &outlen, NULL, 0, err, sizeof err) == 0);
    free(out);
}

/* The first From: address: encoded names, comments, groups, obs-syntax, device quirks. */
Test(apimime, from_address)
{
    static const struct {
        const char *label, *in, *want; /* want NULL: -1 */
    } t[] = {
        {"utf-8 B", "From: =?UTF-8?B?U2Nhbm5lciBLw7Zsbg==?= <scanner@X.Example>" CRLF CRLF,
         "scanner@x.example"},
        {"iso-8859-1 Q", "From: =?iso-8859-1?Q?J=F6rg_M=FCller?= <Joerg@Corp.Example>" CRLF CRLF,
         "Joerg@corp.example"},
        {"comment", "From: fax@corp.example (Fax machine)" CRLF CRLF, "fax@corp.example"},
        {"angle brackets with spaces", "From: < fax@CORP.example >" CRLF CRLF, "fax@corp.example"},
        {"group", "From: Team: a@x.example, b@y.example;" CRLF CRLF, "a@x.example"},
        {"folded", "Subject: s" CRLF "From: \"Long Name\"" CRLF " <l@x.example>" CRLF CRLF,
         "l@x.example"},
        {"obs-phrase", "From: Joe Q. Public <joe@x.example>" CRLF CRLF, "joe@x.example"},
        {"upper-case name, bare LF", "FROM: Upper@EXAMPLE.com\n\n", "Upper@example.com"},
        {"Resent-From is not From", "Resent-From: r@x.example" CRLF "From: f@x.example" CRLF CRLF,
         "f@x.example"},
        {"no From", "To: a@x.example" CRLF CRLF, NULL},
        {"empty group", "From: undisclosed-recipients:;" CRLF CRLF, NULL},
        {"no domain", "From: fax" CRLF CRLF, NULL},
        {"From in the body only", "To: a@x" CRLF CRLF "From: f@x.example" CRLF, NULL},
    };
    char out[128];

    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        int rc = apimime_from_address(t[i].in, strlen(t[i].in), out, sizeof out);
        if (t[i].want == NULL) {
            cr_expect(rc == -1, "%s: rc %d (%s)", t[i].label, rc, out);
        } else {
            cr_expect(rc == 0, "%s: rc %d", t[i].label, rc);
            cr_expect(strcmp(out, t[i].want) == 0, "%s: got %s", t[i].label, out);
        }
    }
    /* Too small a buffer is "none", not a truncated address. */
    cr_expect(apimime_from_address("From: a@x.example\r\n\r\n", 21, out, 5) == -1);
}

static const char split_msg[] =
    "From: fax@corp.example" CRLF "To: a@x.example" CRLF "Subject: scan" CRLF
    "MIME-Version: 1.0" CRLF "Content-Type: multipart/mixed; boundary=\"b1\"" CRLF CRLF
    "preamble" CRLF "--b1" CRLF "Content-Type: multipart/related; boundary=\"b2\"" CRLF CRLF
    "--b2" CRLF "Content-Type: text/html; charset=utf-8" CRLF CRLF
    "<p>scan <img src=\"cid:logo@corp\"></p>" CRLF "--b2" CRLF "Content-Type: image/png" CRLF
    "Content-ID: <logo@corp>" CRLF "Content-Transfer-Encoding: base64" CRLF CRLF "iVBORw0KGgo=" CRLF
    "--b2--" CRLF "--b1" CRLF "Content-Type: application/pdf; name=\"scan.pdf\"" CRLF
    "Content-Disposition: attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf" CRLF
    "Content-Transfer-Encoding: base64" CRLF CRLF "JVBERi0xLjQKJcfsj6IK" CRLF "--b1" CRLF
    "Content-Type: text/plain; charset=utf-8" CRLF
    "Content-Disposition: attachment; filename=\"=?UTF-8?Q?notiz_=C3=BC.txt?=\"" CRLF
    "Content-Transfer-Encoding: quoted-printable" CRLF CRLF "a=3Db" CRLF "--b1--" CRLF;

/* The Graph draft split: a text/html body stays, the inline image, the PDF (RFC 2231 name)
 * and a text attachment (RFC 2047 name) come out decoded. */
Test(apimime, graph_split)
{
    struct apimime_split s;
    char err[128] = "";

    cr_assert(apimime_graph_split(split_msg, sizeof split_msg - 1, &s, err, sizeof err) == 0, "%s",
              err);
    cr_assert(eq(sz, s.natt, 3));
    cr_expect(eq(str, s.att[0].name, "attachment"));
    cr_expect(eq(str, s.att[0].content_type, "image/png"));
    cr_expect(s.att[0].content_id != NULL && strcmp(s.att[0].content_id, "logo@corp") == 0);
    cr_expect(s.att[0].is_inline == 1);
    cr_expect(s.att[0].len == 8 && memcmp(s.att[0].data, "\x89PNG\r\n\x1a\n", 8) == 0);
    cr_expect(eq(str, s.att[1].name, "r\xc3\xa9sum\xc3\xa9.pdf"));
    cr_expect(eq(str, s.att[1].content_type, "application/pdf"));
    cr_expect(s.att[1].content_id == NULL && s.att[1].is_inline == 0);
    cr_expect(s.att[1].len == 15 &&
              memcmp(s.att[1].data, "%PDF-1.4\n%\xc7\xec\x8f\xa2\n", 15) == 0);
    cr_expect(eq(str, s.att[2].name, "notiz \xc3\xbc.txt"));
    cr_expect(eq(str, s.att[2].content_type, "text/plain"));
    cr_expect(s.att[2].len == 3 && memcmp(s.att[2].data, "a=b", 3) == 0, "%zu %.*s", s.att[2].len,
              (int)s.att[2].len, s.att[2].data);
    /* The draft: headers and the HTML body, none of the attachments. */
    cr_assert(s.draft != NULL && s.draft_len == strlen(s.draft));
    cr_expect(strstr(s.draft, "Subject: scan\r\n") != NULL, "%s", s.draft);
    cr_expect(strstr(s.draft, "To: a@x.example\r\n") != NULL, "%s", s.draft);
    cr_expect(strstr(s.draft, "<p>scan <img src=\"cid:logo@corp\"></p>") != NULL, "%s", s.draft);
    cr_expect(strstr(s.draft, "iVBORw0KGgo") == NULL && strstr(s.draft, "JVBERi0") == NULL &&
                  strstr(s.draft, "a=3Db") == NULL,
              "%s", s.draft);
    cr_expect(strstr(s.draft, "\n") == NULL || strstr(s.draft, "\r\n") != NULL);
    apimime_split_free(&s);
    cr_expect(s.draft == NULL && s.att == NULL && s.natt == 0);
    apimime_split_free(NULL);
}

/* A text-only message is all draft; a message that is only a PDF gets an empty text body. */
Test(apimime, graph_split_edges)
{
    static const char text[] =
        "From: f@x.example" CRLF "To: a@x.example" CRLF "Subject: hello" CRLF CRLF "just text" CRLF;
    static const char pdf[] =
        "From: f@x.example" CRLF "To: a@x.example" CRLF "Content-Type: application/pdf" CRLF
        "Content-Transfer-Encoding: base64" CRLF CRLF "JVBERi0xLjQKJcfsj6IK" CRLF;
    struct apimime_split s;
    char err[128] = "";

    cr_assert(apimime_graph_split(text, sizeof text - 1, &s, err, sizeof err) == 0, "%s", err);
    cr_expect(eq(sz, s.natt, 0));
    cr_expect(strstr(s.draft, "just text") != NULL, "%s", s.draft);
    apimime_split_free(&s);

    cr_assert(apimime_graph_split(pdf, sizeof pdf - 1, &s, err, sizeof err) == 0, "%s", err);
    cr_assert(eq(sz, s.natt, 1));
    cr_expect(eq(str, s.att[0].name, "attachment"));
    cr_expect(eq(str, s.att[0].content_type, "application/pdf"));
    cr_expect(s.att[0].len == 15);
    cr_expect(strstr(s.draft, "text/plain") != NULL, "%s", s.draft);
    cr_expect(strstr(s.draft, "JVBERi0") == NULL, "%s", s.draft);
    apimime_split_free(&s);

    /* The draft of the API copy keeps the Bcc apimime_for_api() added, folding and all. */
    {
        static const char *const r[] = {"a@x.example", "hidden@y.example"};
        char *copy, note[64];
        size_t copylen;
        cr_assert(apimime_for_api(pdf, sizeof pdf - 1, r, 2, &copy, &copylen, note, sizeof note,
                                  err, sizeof err) == 0);
        cr_assert(apimime_graph_split(copy, copylen, &s, err, sizeof err) == 0, "%s", err);
        cr_expect(strstr(s.draft, "\r\nBcc: hidden@y.example\r\n") != NULL, "%s", s.draft);
        cr_expect(s.natt == 1 && s.att[0].len == 15);
        apimime_split_free(&s);
        free(copy);
    }

    cr_expect(apimime_graph_split("", 0, &s, err, sizeof err) == -1);
    cr_expect(eq(str, err, "empty message"));
}

/* RFC 4648 section 10 test vectors, and the two alphabets' difference. */
Test(apimime, base64)
{
    static const struct {
        const char *in, *b64, *url;
    } t[] = {
        {"", "", ""},
        {"f", "Zg==", "Zg"},
        {"fo", "Zm8=", "Zm8"},
        {"foo", "Zm9v", "Zm9v"},
        {"foob", "Zm9vYg==", "Zm9vYg"},
        {"fooba", "Zm9vYmE=", "Zm9vYmE"},
        {"foobar", "Zm9vYmFy", "Zm9vYmFy"},
        {"\xfb\xff", "+/8=", "-_8"},
        {"\xfb\xef\xbe", "++++", "----"},
    };

    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
        size_t n = 99;
        char *b = apimime_base64(t[i].in, strlen(t[i].in), &n);
        cr_expect(strcmp(b, t[i].b64) == 0 && n == strlen(t[i].b64), "base64(%s) = %s", t[i].in, b);
        free(b);
        b = apimime_base64url(t[i].in, strlen(t[i].in), &n);
        cr_expect(strcmp(b, t[i].url) == 0 && n == strlen(t[i].url), "base64url(%s) = %s", t[i].in,
                  b);
        free(b);
    }
    {
        char *b = apimime_base64("\0\0\0", 3, NULL);
        cr_expect(eq(str, b, "AAAA"));
        free(b);
    }
}
