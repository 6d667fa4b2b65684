/*
 * xtext - RFC 3461 4 "xtext", the encoding of the DSN parameters ENVID and ORCPT on the
 * wire: smtpd decodes what devices send, smtpc encodes what goes upstream.
 *
 * Errors: xtext_decode() returns NULL for text that is not xtext; out of memory dies
 * (xalloc).  Ownership: both return a malloc'd string the caller frees.
 */
#ifndef COMMON_XTEXT_H
#define COMMON_XTEXT_H

#include <stddef.h>

/* s with '+', '=' and every byte outside 33..126 as "+XX" (upper-case hex); NULL s
 * encodes as "". */
char *xtext_encode(const char *s);
/* The n bytes at p decoded; NULL when they are not xtext (a byte outside 33..126, '=', '+'
 * not followed by two upper-case hex digits) or decode to a NUL byte. */
char *xtext_decode(const char *p, size_t n);

#endif
