/*
 * msgfix - repair of a received message before it is spooled.
 *
 * Legacy devices send messages without Date: or Message-ID:, sometimes without From:,
 * and sometimes with no empty line between the headers and the body.  Providers reject
 * or mark such mail, so relayd adds what is missing (each repair switchable) and always
 * prepends a Received: trace header.  The body is never changed: input lines already end
 * in CRLF (the session normalised bare LF), and a missing header/body separator is
 * restored the way Postfix's cleanup does it: the first line that is not a header field
 * ends the header section, and an empty line is inserted before it.
 */
#ifndef RELAYD_MSGFIX_H
#define RELAYD_MSGFIX_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "common/buf.h"

struct msgfix_opts {
    const char *hostname;  /* for Message-ID */
    const char *received;  /* complete Received: header, CRLF-folded, no final CRLF; or NULL */
    const char *sender;    /* envelope sender, for a missing From: ("" means <>) */
    const char *queue_id;  /* for Message-ID */
    time_t now;
    int add_date;
    int add_message_id;
    int add_from;
};

/* What msgfix_build() found and added, for the log. */
struct msgfix_report {
    int added_date, added_message_id, added_from, added_separator;
    size_t header_bytes;   /* size of the original header section */
};

/*
 * Writes the repaired message into out (appending).  raw holds CRLF-terminated lines.
 * Returns 0 or -ENOSPC when out's maximum is reached.
 */
int msgfix_build(const char *raw, size_t len, const struct msgfix_opts *o, struct buf *out,
                 struct msgfix_report *rep);

/* RFC 5322 date ("Sun, 22 Nov 2026 16:20:00 +0000") into out; returns out. */
char *msgfix_date(time_t t, char *out, size_t outlen);

#endif
