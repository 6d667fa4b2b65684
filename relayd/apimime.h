/*
 * apimime - the copy of a message that an HTTP mail API gets (Microsoft Graph sendMail and
 * drafts, Gmail messages/send), and the encodings those APIs want.
 *
 * Graph and Gmail deliver to the addresses in the To/Cc/Bcc headers, not to an SMTP
 * envelope.  relayd's contract is that every envelope recipient receives the message once
 * and nobody else, so the API copy is made from the spooled message (the bytes relayd would
 * have sent over SMTP) as follows:
 *
 *  - An envelope recipient not named in To/Cc/Bcc is added to a Bcc: header (the message's
 *    Bcc: is extended, or one is added at the end of the header section).  Providers do not
 *    show Bcc to the other recipients (Gmail strips it, Graph turns it into bccRecipients).
 *  - Design for header recipients that are not envelope recipients (a device that splits one
 *    message per recipient, a list expanded before relayd, a rewrite of the envelope): the
 *    API copy's To:/Cc:/Bcc: keep only envelope recipients.  An address in those headers
 *    that is not an envelope recipient (domain compared case-insensitively, local part
 *    exactly; the envelope is the one after relayd's rewriting) is left out of its header
 *    line.  A To: left empty becomes "To: undisclosed-recipients:;", a Cc: or Bcc: left
 *    empty is dropped.  Otherwise each such address would get one extra copy per envelope
 *    the message was split into.  The note for the delivery log says so ("header recipients
 *    not in the envelope left out: b@x.example").
 *  - Nothing else changes: header lines not concerned keep their exact bytes (folding,
 *    encoding, order), the body is byte-identical, the line ending of added or rebuilt lines
 *    is the message's own (CRLF for spooled bodies; bare LF input is handled too).  A To:/Cc:
 *    line is rebuilt only when an address is left out of it; the addresses kept keep their
 *    display names as written (RFC 2047 words are not decoded).
 *  - Addresses are read as a MIME library (GMime, checked by the unit test) reads them: an
 *    address with an unterminated quote, comment or angle-addr, with white space inside an
 *    atom ("a@x.exam ple"), with a display name that is no phrase ("x@: <a@b>", "@x <a@b>";
 *    "fax@corp.example <fax@corp.example>" is accepted) or with text after its '>' is no
 *    envelope recipient's and is left out (the envelope recipient, if any, goes to Bcc); a
 *    ':' opens a group only after a phrase; a header section holding a NUL byte is refused
 *    (-1): readers would stop at the NUL.
 *
 * Graph's large-message path (more than about 3 MB of MIME) creates a draft and uploads the
 * attachments separately: apimime_graph_split() parses the message with GMime (not by hand)
 * and returns the draft (the message without its attachments) and the decoded attachments.
 *
 * Pure functions: no I/O, no libuv, no logging.  GMime is used inside apimime.c only;
 * apimime_init() (idempotent, also called by the functions that need it) runs g_mime_init().
 * Errors: -1 and one line in err for a message the function cannot handle; out of memory
 * dies (xmalloc).  Returned memory is malloc'd and owned by the caller (free(),
 * apimime_split_free()).
 */
#ifndef RELAYD_APIMIME_H
#define RELAYD_APIMIME_H

#include <stddef.h>

/* g_mime_init() once per process; safe to call again.  apimime_shutdown() undoes it (tests,
 * leak checkers); no apimime function may run after it. */
void apimime_init(void);
void apimime_shutdown(void);

/* The copy of the message an HTTP API gets (Graph sendMail / Gmail send deliver to the
 * addresses in To/Cc/Bcc, not to an envelope).  relayd's contract: every envelope recipient
 * receives it once, nobody else.  Envelope recipients not named in To/Cc/Bcc are added to a
 * Bcc: header (created or extended; not shown to the other recipients by the provider).
 * Header recipients that are not envelope recipients are handled as apimime.h documents
 * (see "design" below).  Header and body bytes not concerned stay byte-identical (the
 * emulator checks: the MIME received, minus the Bcc header relayd added and the To/Cc lines
 * it changed, equals the SMTP body).  Returns 0, *out malloc'd (caller frees) with *outlen;
 * note gets one short phrase for the delivery log ("bcc +2", "" when nothing changed);
 * -1 with err on a message it cannot handle (err says why, one line). */
int apimime_for_api(const char *msg, size_t len, const char *const *rcpts, size_t nrcpts,
                    char **out, size_t *outlen, char *note, size_t notelen, char *err,
                    size_t errlen);

/* The address of the first From: mailbox (RFC 2047 encoded display names, comments, groups,
 * obs-syntax handled), lower-cased domain: for "mailbox = from-header" mapping and logs.
 * 0 or -1 when there is none. */
int apimime_from_address(const char *msg, size_t len, char *out, size_t outlen);

/* Graph's large-message path: the message split into a draft (the MIME without its
 * attachments, which goes to POST /users/{m}/messages as base64 MIME, i.e. Content-Type:
 * text/plain) and the attachments, decoded, for upload sessions.  Parts that are not
 * attachments (text/plain, text/html bodies, multipart structure) stay in the draft.
 * A leaf part is an attachment when its disposition is "attachment", when it has a file
 * name, or when it is not text/plain or text/html (images, PDFs, message/rfc822).  A
 * multipart left empty is removed; a message left without any body gets an empty
 * text/plain one.  The draft is serialized by GMime with CRLF line endings. */
struct apimime_attachment {
    char *name;         /* filename (decoded, RFC 2231/2047), "attachment" when none */
    char *content_type; /* "application/pdf" */
    char *content_id;   /* without <>, or NULL */
    int is_inline;
    unsigned char *data; /* decoded bytes */
    size_t len;
};
struct apimime_split {
    char *draft; /* MIME without the attachments */
    size_t draft_len;
    struct apimime_attachment *att;
    size_t natt;
};
int apimime_graph_split(const char *msg, size_t len, struct apimime_split *out, char *err,
                        size_t errlen);
/* Frees what apimime_graph_split() filled in and zeroes *s; s may be NULL. */
void apimime_split_free(struct apimime_split *s);

/* RFC 4648 base64 of in (no line breaks), malloc'd, NUL-terminated; *outlen without NUL. */
char *apimime_base64(const void *in, size_t len, size_t *outlen);
/* The length apimime_base64() gives for len bytes, without encoding them. */
size_t apimime_base64_len(size_t len);
/* RFC 4648 base64url without padding (Gmail "raw"). */
char *apimime_base64url(const void *in, size_t len, size_t *outlen);

#endif
