/*
 * proxyproto - the HAProxy PROXY protocol header, versions 1 (text) and 2 (binary).
 *
 * A load balancer in front of relayd prepends one header to each connection naming the
 * real client; relayd reads it before its greeting and uses that address for allow lists,
 * limits, logs and Received: headers.  Spec: haproxy doc/proxy-protocol.txt.
 *
 * Pure functions over a byte buffer: no allocation, no I/O, safe on any input (fuzzed).
 * Errors: negative PROXYPROTO_E* codes; proxyproto_strerror() has words for the log.
 */
#ifndef COMMON_PROXYPROTO_H
#define COMMON_PROXYPROTO_H

#include <stddef.h>
#include <sys/socket.h>

#define PROXYPROTO_V1_MAX 107 /* whole v1 line including CRLF (spec section 2.1) */
#define PROXYPROTO_V2_HDR 16  /* fixed part of a v2 header */

#define PROXYPROTO_ESIG (-1)     /* no PROXY header at all: the client spoke first */
#define PROXYPROTO_EV1 (-2)      /* malformed v1 line */
#define PROXYPROTO_EV2 (-3)      /* malformed v2 header */
#define PROXYPROTO_ETOOLONG (-4) /* v1 line without CRLF within 107 bytes */

struct proxyproto_result {
    int version; /* 1 or 2 */
    /* 1 when the header carries no client address (v1 "PROXY UNKNOWN", v2 LOCAL, v2
     * UNSPEC or AF_UNIX): use the connection's own addresses. */
    int local;
    struct sockaddr_storage src; /* the real client (when !local) */
    struct sockaddr_storage dst; /* the address the client connected to (when !local) */
};

/*
 * Parses the header at the start of buf.  Returns the header's length (> 0; the bytes
 * after it are the client's SMTP stream) with *res filled in, 0 when buf holds a valid
 * but incomplete prefix (read more and call again with all bytes so far), or a negative
 * PROXYPROTO_E* code.  res is written only on success.
 */
int proxyproto_parse(const void *buf, size_t len, struct proxyproto_result *res);

/* Words for a PROXYPROTO_E* code ("malformed PROXY v1 header"). */
const char *proxyproto_strerror(int rc);

#endif
