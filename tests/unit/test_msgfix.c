/* Unit tests for relayd/msgfix: header repair before spooling. */
#include <criterion/criterion.h>
#include <string.h>

#include "relayd/msgfix.h"

static struct msgfix_opts fix_opts(void)
{
    struct msgfix_opts o;

    memset(&o, 0, sizeof(o));
    o.hostname = "relay.test";
    o.received = "Received: from fax (10.0.0.7)\r\n\tby relay.test; date";
    o.sender = "fax@lan.example";
    o.queue_id = "0190A3F2C1D4";
    o.now = 1700000000;
    o.add_date = o.add_message_id = o.add_from = 1;
    return o;
}

static char *fix(const char *raw, struct msgfix_opts *o, struct msgfix_report *rep)
{
    struct buf *out = buf_new(0);
    size_t len;
    char *s;

    cr_assert_eq(msgfix_build(raw, strlen(raw), o, out, rep), 0);
    s = buf_steal(out, &len);
    buf_free(out);
    return s;
}

/* A TNCS alarm (To/From/Subject, then body with no separator) gets Date, Message-ID and an
 * empty line before its body; the body is untouched. */
Test(msgfix, tncs_alarm_without_separator)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    char *s = fix("To: tncsuser@example.net\r\nFrom: tncs@example.net\r\nSubject: Alarm\r\n"
                  "Alarm-Major TNCSserver mod1 \"Communication Status\" Alarm\r\n",
                  &o, &rep);

    cr_expect(rep.added_date && rep.added_message_id && rep.added_separator);
    cr_expect(!rep.added_from);
    cr_expect(strncmp(s, "Received: from fax (10.0.0.7)\r\n\tby relay.test; date\r\nTo: ", 56) ==
              0, "%s", s);
    cr_expect(strstr(s, "Message-ID: <0190A3F2C1D4.relayd@relay.test>\r\n") != NULL, "%s", s);
    cr_expect(strstr(s, "\r\n\r\nAlarm-Major TNCSserver mod1 \"Communication Status\" Alarm\r\n") !=
                  NULL,
              "%s", s);
    free(s);
}

/* A complete message gets only the Received header. */
Test(msgfix, complete_message_untouched)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    const char *raw = "From: a@b\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                      "message-id: <x@y>\r\n\r\nbody\r\n.. not a dot\r\n";
    char *s = fix(raw, &o, &rep);

    cr_expect(!rep.added_date && !rep.added_message_id && !rep.added_from && !rep.added_separator);
    cr_expect_str_eq(strstr(s, "From: a@b"), raw);
    free(s);
}

/* Missing From: comes from the envelope sender; <> gives MAILER-DAEMON. */
Test(msgfix, adds_from)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    char *s = fix("Subject: x\r\n\r\nbody\r\n", &o, &rep);

    cr_expect(rep.added_from);
    cr_expect(strstr(s, "From: <fax@lan.example>\r\n") != NULL, "%s", s);
    free(s);
    o.sender = "";
    s = fix("Subject: x\r\n\r\nbody\r\n", &o, &rep);
    cr_expect(strstr(s, "From: MAILER-DAEMON@relay.test\r\n") != NULL, "%s", s);
    free(s);
}

/* Repairs can be switched off; folded headers are recognised as headers. */
Test(msgfix, switches_and_folding)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    char *s;

    o.add_date = o.add_message_id = o.add_from = 0;
    o.received = NULL;
    s = fix("Subject: a\r\n  folded\r\nX-Y : obsolete spacing\r\n\r\nbody\r\n", &o, &rep);
    cr_expect_str_eq(s, "Subject: a\r\n  folded\r\nX-Y : obsolete spacing\r\n\r\nbody\r\n");
    free(s);
}

/* An empty message still gets a header section. */
Test(msgfix, empty_message)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    char *s = fix("", &o, &rep);

    cr_expect(strstr(s, "Date: ") != NULL);
    cr_expect(strcmp(s + strlen(s) - 4, "\r\n\r\n") == 0, "%s", s);
    free(s);
}

/* The output limit is honoured. */
Test(msgfix, enospc)
{
    struct msgfix_opts o = fix_opts();
    struct msgfix_report rep;
    struct buf *out = buf_new(16);

    cr_expect_neq(msgfix_build("Subject: x\r\n\r\nbody\r\n", 19, &o, out, &rep), 0);
    buf_free(out);
}
