/*
 * rewrite - per-route address and header rewriting for providers that insist on their own
 * account as the sender (Microsoft 365 "SendAsDenied", Gmail rewriting From: itself).
 *
 * Pure functions of the route's configuration ([route NAME] rewrite_sender,
 * rewrite_sender_map, rewrite_from, keep_reply_to, recipient_map; maps are loaded and
 * validated by cfg_load()):
 *   - the envelope sender: rewrite_sender_map first (exact address, then "@domain"), else
 *     rewrite_sender; the null reverse-path <> is never rewritten (bounces stay bounces);
 *   - recipients: only through an explicit recipient_map, never otherwise;
 *   - headers, only when rewrite_from = yes and the sender was rewritten: the From: address
 *     becomes the new sender (the display name is kept), and the original From: is added as
 *     Reply-To: unless the message has one or keep_reply_to = no.  Nothing else in the
 *     header changes, line endings are kept, and the body is copied byte for byte.
 *
 * Where it is called (the delivery path, once per attempt and route): see sched.c.
 *
 * Errors: none expected; the functions report whether they changed anything.
 * Ownership: strings returned through char ** are malloc'd and the caller's to free().
 */
#ifndef RELAYD_REWRITE_H
#define RELAYD_REWRITE_H

#include <stddef.h>

#include "common/buf.h"
#include "config/cfg.h"

/* The envelope sender for route r.  1 and a malloc'd address in *new_sender when it is
 * rewritten, 0 (and *new_sender NULL) when it stays as it is. */
int rewrite_envelope(const struct cfg_route *r, const char *sender, char **new_sender);

/* The recipient for route r: 1 and a malloc'd address in *new_rcpt when recipient_map maps
 * rcpt, else 0 (*new_rcpt NULL). */
int rewrite_recipient(const struct cfg_route *r, const char *rcpt, char **new_rcpt);

/* 1 when rewrite_headers() would change a message whose sender was rewritten. */
int rewrite_wants_headers(const struct cfg_route *r);

/*
 * Appends to out the message msg (len bytes, header and body) with its From: rewritten to
 * new_from and, per keep_reply_to, a Reply-To: holding the original From: (orig_from, the
 * original envelope sender, stands in when the message has no From:).  Returns 1 when the
 * header was changed, 0 when msg was copied unchanged (rewrite_from = no, new_from NULL),
 * -ENOSPC when out's maximum was reached.
 */
int rewrite_headers(const struct cfg_route *r, const char *orig_from, const char *new_from,
                    const char *msg, size_t len, struct buf *out);

#endif
