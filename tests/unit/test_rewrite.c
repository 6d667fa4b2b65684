/*
 * test_rewrite - envelope sender, recipient and From:/Reply-To: rewriting per route.
 *
 * Routes are built by hand (struct cfg_route) except where a map file is involved; the
 * header cases compare whole messages, so any byte the rewrite should not touch is pinned.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "config/cfg.h"
#include "relayd/rewrite.h"

static struct cfg_map_entry sender_entries[] = {
    {"scanner@lan", "scan-account@corp.example"},
    {"@fax.lan", "fax@corp.example"},
};
static struct cfg_map_entry rcpt_entries[] = {
    {"ops@lan", "ops-team@corp.example"},
};

/* rewrite_sender alone: every non-null sender becomes it; <> stays <>. */
Test(rewrite, envelope_fixed)
{
    struct cfg_route r = {.name = "m365", .rewrite_sender = "scanner@corp.example"};
    char *out;

    cr_expect(eq(int, rewrite_envelope(&r, "fax@lan", &out), 1));
    cr_expect(eq(str, out, "scanner@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_envelope(&r, "", &out), 0));
    cr_expect(eq(ptr, out, NULL));
    cr_expect(eq(int, rewrite_envelope(&r, NULL, &out), 0));
    /* Already the account: nothing to do. */
    cr_expect(eq(int, rewrite_envelope(&r, "Scanner@Corp.Example", &out), 0));
    cr_expect(eq(ptr, out, NULL));
}

/* The map wins; unmapped senders fall back to rewrite_sender, or stay without it. */
Test(rewrite, envelope_map)
{
    struct cfg_route r = {.name = "m365", .rewrite_sender_map = {sender_entries, 2}};
    char *out;

    cr_expect(eq(int, rewrite_envelope(&r, "scanner@lan", &out), 1));
    cr_expect(eq(str, out, "scan-account@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_envelope(&r, "room7@fax.lan", &out), 1));
    cr_expect(eq(str, out, "fax@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_envelope(&r, "ups@lan", &out), 0));
    cr_expect(eq(ptr, out, NULL));

    r.rewrite_sender = "relay@corp.example";
    cr_expect(eq(int, rewrite_envelope(&r, "ups@lan", &out), 1));
    cr_expect(eq(str, out, "relay@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_envelope(&r, "scanner@lan", &out), 1));
    cr_expect(eq(str, out, "scan-account@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_envelope(NULL, "scanner@lan", &out), 0));
}

/* Recipients change only through recipient_map. */
Test(rewrite, recipients_only_when_mapped)
{
    struct cfg_route plain = {.name = "p", .rewrite_sender = "relay@corp.example"};
    struct cfg_route mapped = {.name = "m", .recipient_map = {rcpt_entries, 1}};
    char *out;

    cr_expect(eq(int, rewrite_recipient(&plain, "ops@lan", &out), 0));
    cr_expect(eq(ptr, out, NULL));
    cr_expect(eq(int, rewrite_recipient(&mapped, "OPS@lan", &out), 1));
    cr_expect(eq(str, out, "ops-team@corp.example"));
    free(out);
    cr_expect(eq(int, rewrite_recipient(&mapped, "boss@lan", &out), 0));
}

struct hdr_case {
    const char *label;
    int keep_reply_to;
    const char *in;
    const char *want;
    int want_rc;
};

static const struct hdr_case hdr_cases[] = {
    {"display name kept, Reply-To added", 1,
     "Received: from fax\r\n\tby relay\r\nFrom: \"Scanner 3rd floor\" <scanner@lan>\r\n"
     "Subject: scan\r\n\r\nFrom: not a header\r\nbody\r\n",
     "Received: from fax\r\n\tby relay\r\nFrom: \"Scanner 3rd floor\" "
     "<scan-account@corp.example>\r\nReply-To: \"Scanner 3rd floor\" <scanner@lan>\r\n"
     "Subject: scan\r\n\r\nFrom: not a header\r\nbody\r\n",
     1},
    {"bare address", 1, "from: scanner@lan\r\nSubject: x\r\n\r\nbody\r\n",
     "From: <scan-account@corp.example>\r\nReply-To: scanner@lan\r\nSubject: x\r\n\r\nbody\r\n",
     1},
    {"existing Reply-To is kept", 1,
     "Reply-To: helpdesk@corp.example\r\nFrom: <scanner@lan>\r\n\r\nbody\r\n",
     "Reply-To: helpdesk@corp.example\r\nFrom: <scan-account@corp.example>\r\n\r\nbody\r\n", 1},
    {"keep_reply_to = no", 0, "From: Fax <scanner@lan>\r\n\r\nbody\r\n",
     "From: Fax <scan-account@corp.example>\r\n\r\nbody\r\n", 1},
    {"folded From:", 1, "From: \"Long\r\n name\" <scanner@lan>\r\nTo: a@b\r\n\r\nx\r\n",
     "From: \"Long name\" <scan-account@corp.example>\r\nReply-To: \"Long\r\n name\" "
     "<scanner@lan>\r\nTo: a@b\r\n\r\nx\r\n",
     1},
    {"LF-only message stays LF", 1, "From: <scanner@lan>\nSubject: s\n\nbody\n",
     "From: <scan-account@corp.example>\nReply-To: <scanner@lan>\nSubject: s\n\nbody\n", 1},
    {"several mailboxes: no display name", 1, "From: A <a@lan>, B <b@lan>\r\n\r\nb\r\n",
     "From: <scan-account@corp.example>\r\nReply-To: A <a@lan>, B <b@lan>\r\n\r\nb\r\n", 1},
    {"no From: at all", 1, "Subject: s\r\n\r\nbody\r\n",
     "Subject: s\r\nFrom: <scan-account@corp.example>\r\nReply-To: <scanner@lan>\r\n\r\nbody\r\n",
     1},
    {"no body separator", 1, "From: <scanner@lan>\r\nSubject: s\r\n",
     "From: <scan-account@corp.example>\r\nReply-To: <scanner@lan>\r\nSubject: s\r\n", 1},
    {"quoted display name with <", 1, "From: \"a <b>\" <scanner@lan>\r\n\r\nx",
     "From: \"a <b>\" <scan-account@corp.example>\r\nReply-To: \"a <b>\" <scanner@lan>\r\n\r\nx",
     1},
};

/* rewrite_headers(): From: replaced, Reply-To: per keep_reply_to, everything else intact. */
Test(rewrite, headers)
{
    size_t i;

    for (i = 0; i < sizeof hdr_cases / sizeof hdr_cases[0]; i++) {
        const struct hdr_case *c = &hdr_cases[i];
        struct cfg_route r = {.name = "m365",
                              .rewrite_sender = "scan-account@corp.example",
                              .rewrite_from = 1,
                              .keep_reply_to = c->keep_reply_to};
        struct buf *out = buf_new(0);
        int rc = rewrite_headers(&r, "scanner@lan", "scan-account@corp.example", c->in,
                                 strlen(c->in), out);

        cr_expect(eq(int, rc, c->want_rc), "%s", c->label);
        cr_expect(eq(str, out->data, (char *)c->want), "%s", c->label);
        buf_free(out);
    }
}

/* rewrite_from = no, or no new sender: a byte-for-byte copy. */
Test(rewrite, headers_untouched)
{
    static const char msg[] = "From: <scanner@lan>\r\n\r\nbody\r\n";
    struct cfg_route r = {.name = "p", .rewrite_sender = "x@corp.example"};
    struct buf *out = buf_new(0);

    cr_expect(eq(int, rewrite_headers(&r, "scanner@lan", "x@corp.example", msg, strlen(msg), out),
                 0));
    cr_expect(eq(str, out->data, (char *)msg));
    buf_reset(out);
    r.rewrite_from = 1;
    cr_expect(eq(int, rewrite_headers(&r, "scanner@lan", NULL, msg, strlen(msg), out), 0));
    cr_expect(eq(str, out->data, (char *)msg));
    buf_free(out);
}

/* A buffer limit is reported, not overrun. */
Test(rewrite, headers_enospc)
{
    static const char msg[] = "From: <scanner@lan>\r\n\r\nbody\r\n";
    struct cfg_route r = {.name = "p", .rewrite_from = 1, .keep_reply_to = 1};
    struct buf *out = buf_new(16);

    cr_expect(eq(int, rewrite_headers(&r, "scanner@lan", "x@corp.example", msg, strlen(msg), out),
                 -ENOSPC));
    cr_expect(le(sz, out->len, 16));
    buf_free(out);
}

/* From a real configuration: map file plus rewrite_from, end to end through cfg_load(). */
Test(rewrite, from_config)
{
    char map[] = "/tmp/test_rewrite.map.XXXXXX", conf[] = "/tmp/test_rewrite.conf.XXXXXX";
    char err[512] = "", *text = NULL, *ns = NULL;
    struct buf *out = buf_new(0);
    struct cfg cfg;
    FILE *f;
    int fd;

    cr_assert(ge(int, fd = mkstemp(map), 0));
    f = fdopen(fd, "w");
    fputs("scanner@lan scan-account@corp.example\n", f);
    fclose(f);
    cr_assert(ge(int, fd = mkstemp(conf), 0));
    f = fdopen(fd, "w");
    fprintf(f,
            "[listener lan]\nlisten = 127.0.0.1:25\n[upstream m365]\nhost = smtp.office365.com\n"
            "[route default]\nupstream = m365\nrewrite_sender_map = %s\nrewrite_from = yes\n",
            map);
    fclose(f);
    cr_assert(eq(int, cfg_load(conf, &cfg, err, sizeof err), 0), "%s", err);
    cr_expect(eq(int, cfg.routes[0].keep_reply_to, 1));
    cr_expect(eq(int, rewrite_envelope(&cfg.routes[0], "scanner@lan", &ns), 1));
    text = "From: Scanner <scanner@lan>\r\n\r\nbody\r\n";
    cr_expect(eq(int, rewrite_headers(&cfg.routes[0], "scanner@lan", ns, text, strlen(text), out),
                 1));
    cr_expect(eq(str, out->data,
                 "From: Scanner <scan-account@corp.example>\r\nReply-To: Scanner <scanner@lan>\r\n"
                 "\r\nbody\r\n"));
    free(ns);
    buf_free(out);
    cfg_free(&cfg);
    unlink(map);
    unlink(conf);
}
