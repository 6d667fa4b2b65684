/*
 * proxyproto - PROXY protocol v1/v2 header parser; see proxyproto.h.
 *
 * v1 is one CRLF-terminated ASCII line of at most 107 bytes:
 *   "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"  or  "PROXY UNKNOWN ...\r\n".
 * Fields are separated by exactly one space; ports are decimal without leading zeros.
 * v2 is a 16-byte fixed part (12-byte signature, version/command, family/transport,
 * big-endian length) followed by that many bytes: the addresses, then TLVs, which we skip.
 *
 * Everything is checked against len before it is read; nothing is trusted.
 */
#include "common/proxyproto.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <string.h>

static const unsigned char v2_sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                         0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};
static const char v1_sig[] = "PROXY ";

/* One space-free field of at most max-1 characters from *p (up to end) into out. */
static int v1_field(const char **p, const char *end, char *out, size_t max)
{
    size_t n = 0;

    while (*p < end && **p != ' ') {
        if (n + 1 >= max || **p < 0x21 || **p > 0x7E) /* no NUL, CR or controls */
            return -1;
        out[n++] = *(*p)++;
    }
    out[n] = '\0';
    return n > 0 ? 0 : -1;
}

static int v1_port(const char *s, unsigned *port)
{
    unsigned long v = 0;
    size_t i, n = strlen(s);

    if (n == 0 || n > 5 || (n > 1 && s[0] == '0'))
        return -1;
    for (i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (unsigned long)(s[i] - '0');
    }
    if (v > 65535)
        return -1;
    *port = (unsigned)v;
    return 0;
}

static int v1_addr(int family, const char *text, unsigned port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;

        if (inet_pton(AF_INET, text, &sin->sin_addr) != 1)
            return -1;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

        if (inet_pton(AF_INET6, text, &sin6->sin6_addr) != 1)
            return -1;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
    }
    return 0;
}

static int parse_v1(const char *buf, size_t len, struct proxyproto_result *res)
{
    const char *crlf, *p, *end;
    char proto[8], src[48], dst[48], sport[8], dport[8];
    unsigned sp, dp;
    size_t scan = len < PROXYPROTO_V1_MAX ? len : PROXYPROTO_V1_MAX;
    int family;

    crlf = memmem(buf, scan, "\r\n", 2);
    if (crlf == NULL) {
        /* A bare LF ends nothing here: the spec demands CRLF. */
        if (memchr(buf, '\n', scan) != NULL)
            return PROXYPROTO_EV1;
        return len < PROXYPROTO_V1_MAX ? 0 : PROXYPROTO_ETOOLONG;
    }
    /* A bare LF before the CRLF is an error too, whatever the line says (and whether or
     * not the CRLF has arrived yet: a shorter read must not change the verdict). */
    if (memchr(buf, '\n', (size_t)(crlf - buf)) != NULL)
        return PROXYPROTO_EV1;
    p = buf + sizeof(v1_sig) - 1;
    end = crlf;
    if (v1_field(&p, end, proto, sizeof(proto)) != 0)
        return PROXYPROTO_EV1;
    if (strcmp(proto, "UNKNOWN") == 0) {
        /* The rest of the line is to be ignored (spec 2.1). */
        memset(res, 0, sizeof(*res));
        res->version = 1;
        res->local = 1;
        return (int)(crlf - buf + 2);
    }
    if (strcmp(proto, "TCP4") == 0)
        family = AF_INET;
    else if (strcmp(proto, "TCP6") == 0)
        family = AF_INET6;
    else
        return PROXYPROTO_EV1;
    if (p >= end || *p++ != ' ' || v1_field(&p, end, src, sizeof(src)) != 0 || p >= end ||
        *p++ != ' ' || v1_field(&p, end, dst, sizeof(dst)) != 0 || p >= end || *p++ != ' ' ||
        v1_field(&p, end, sport, sizeof(sport)) != 0 || p >= end || *p++ != ' ' ||
        v1_field(&p, end, dport, sizeof(dport)) != 0 || p != end)
        return PROXYPROTO_EV1;
    if (v1_port(sport, &sp) != 0 || v1_port(dport, &dp) != 0)
        return PROXYPROTO_EV1;
    memset(res, 0, sizeof(*res));
    if (v1_addr(family, src, sp, &res->src) != 0 || v1_addr(family, dst, dp, &res->dst) != 0)
        return PROXYPROTO_EV1;
    res->version = 1;
    return (int)(crlf - buf + 2);
}

static int parse_v2(const unsigned char *buf, size_t len, struct proxyproto_result *res)
{
    unsigned cmd, fam, proto;
    size_t body, total;

    if (len < PROXYPROTO_V2_HDR)
        return 0;
    if ((buf[12] >> 4) != 2)
        return PROXYPROTO_EV2;
    cmd = buf[12] & 0x0F;
    fam = buf[13] >> 4;
    proto = buf[13] & 0x0F;
    body = (size_t)buf[14] << 8 | buf[15];
    total = PROXYPROTO_V2_HDR + body;
    if (cmd > 1 || fam > 3 || proto > 2)
        return PROXYPROTO_EV2;
    if (len < total)
        return 0;

    memset(res, 0, sizeof(*res));
    res->version = 2;
    /* LOCAL: a health check from the proxy itself; the connection's addresses count. */
    if (cmd == 0 || fam == 0 || fam == 3) {
        res->local = 1;
        return (int)total;
    }
    if (proto != 1) /* SMTP runs over a stream; DGRAM or UNSPEC transport makes no sense */
        return PROXYPROTO_EV2;
    if (fam == 1) {
        struct sockaddr_in *s = (struct sockaddr_in *)&res->src;
        struct sockaddr_in *d = (struct sockaddr_in *)&res->dst;

        if (body < 12)
            return PROXYPROTO_EV2;
        s->sin_family = d->sin_family = AF_INET;
        memcpy(&s->sin_addr, buf + 16, 4);
        memcpy(&d->sin_addr, buf + 20, 4);
        memcpy(&s->sin_port, buf + 24, 2);
        memcpy(&d->sin_port, buf + 26, 2);
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&res->src;
        struct sockaddr_in6 *d = (struct sockaddr_in6 *)&res->dst;

        if (body < 36)
            return PROXYPROTO_EV2;
        s->sin6_family = d->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, buf + 16, 16);
        memcpy(&d->sin6_addr, buf + 32, 16);
        memcpy(&s->sin6_port, buf + 48, 2);
        memcpy(&d->sin6_port, buf + 50, 2);
    }
    /* TLVs (ALPN, authority, CRC32C, SSL info...) follow up to total: not needed here. */
    return (int)total;
}

int proxyproto_parse(const void *buf, size_t len, struct proxyproto_result *res)
{
    const unsigned char *b = buf;
    size_t n;

    if (len == 0)
        return 0;
    if (b[0] == v2_sig[0]) {
        n = len < sizeof(v2_sig) ? len : sizeof(v2_sig);
        if (memcmp(b, v2_sig, n) != 0)
            return PROXYPROTO_ESIG;
        if (len < sizeof(v2_sig))
            return 0;
        return parse_v2(b, len, res);
    }
    n = len < sizeof(v1_sig) - 1 ? len : sizeof(v1_sig) - 1;
    if (memcmp(b, v1_sig, n) != 0)
        return PROXYPROTO_ESIG;
    if (len < sizeof(v1_sig) - 1)
        return 0;
    return parse_v1(buf, len, res);
}

const char *proxyproto_strerror(int rc)
{
    switch (rc) {
    case PROXYPROTO_ESIG:
        return "no PROXY protocol header (the client spoke first)";
    case PROXYPROTO_EV1:
        return "malformed PROXY v1 header";
    case PROXYPROTO_EV2:
        return "malformed PROXY v2 header";
    case PROXYPROTO_ETOOLONG:
        return "PROXY v1 header without CRLF within 107 bytes";
    default:
        return rc >= 0 ? "no error" : "unknown PROXY protocol error";
    }
}
