/*
 * addr - tolerant parsing of SMTP reverse-paths and forward-paths (RFC 5321 4.1.2).
 *
 * Legacy devices send "MAIL FROM: < user@example.net >", "RCPT TO:user@example.net",
 * trailing spaces and quoted local parts.  addr_path_parse() accepts all of these and
 * returns the bare address plus whatever ESMTP parameters follow, and refuses what could
 * hurt us downstream: control characters, unbalanced brackets or quotes, absurd lengths.
 *
 * Errors: -EINVAL with a reply-ready reason in err ("unbalanced angle brackets").
 */
#ifndef COMMON_ADDR_H
#define COMMON_ADDR_H

#include <stddef.h>

#define ADDR_MAX 512 /* RFC 5321 4.5.3.1.3 allows 256 for a path; be generous */

/*
 * arg is the text after "MAIL FROM:" / "RCPT TO:" (leading spaces allowed).  On success
 * *addr is a malloc'd bare address ("" for the null path "<>"; source routes dropped)
 * and *params points into arg at the ESMTP parameters (possibly ""), spaces skipped.
 */
int addr_path_parse(const char *arg, char **addr, const char **params, char *err,
                    size_t errlen);

/* The domain part of an address (after the last '@'), or "" when it has none. */
const char *addr_domain(const char *addr);

#endif
