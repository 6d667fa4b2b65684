/*
 * test_proxyproto - PROXY protocol v1/v2 headers: valid, incomplete and malformed.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <netinet/in.h>
#include <string.h>

#include "common/netaddr.h"
#include "common/proxyproto.h"

TestSuite(proxyproto, .timeout = 10);

struct v1_case {
    const char *label;
    const char *in;
    int want_rc;   /* > 0: strlen of the header part; 0 need more; < 0 error */
    int want_local;
    const char *want_src;
    unsigned want_sport;
};

static const struct v1_case v1_cases[] = {
    {"tcp4", "PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\nEHLO x\r\n", 44, 0, "192.0.2.1",
     56324},
    {"tcp6", "PROXY TCP6 2001:db8::7 2001:db8::1 4000 587\r\n", 45, 0, "2001:db8::7", 4000},
    {"unknown", "PROXY UNKNOWN\r\n", 15, 1, NULL, 0},
    {"unknown with junk", "PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", 35, 1, NULL, 0},
    {"port zero", "PROXY TCP4 10.0.0.7 10.0.0.1 0 25\r\n", 35, 0, "10.0.0.7", 0},
    {"empty", "", 0, 0, NULL, 0},
    {"prefix P", "P", 0, 0, NULL, 0},
    {"prefix PROXY", "PROXY", 0, 0, NULL, 0},
    {"no CRLF yet", "PROXY TCP4 192.0.2.1 198.51.1", 0, 0, NULL, 0},
    {"smtp instead", "EHLO client\r\n", PROXYPROTO_ESIG, 0, NULL, 0},
    {"lower case", "proxy TCP4 192.0.2.1 198.51.100.2 1 25\r\n", PROXYPROTO_ESIG, 0, NULL, 0},
    {"bare LF", "PROXY TCP4 192.0.2.1 198.51.100.2 1 25\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"bad proto", "PROXY UDP4 192.0.2.1 198.51.100.2 1 25\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"v6 addr in TCP4", "PROXY TCP4 ::1 ::1 1 25\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"bad addr", "PROXY TCP4 192.0.2.256 198.51.100.2 1 25\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"port too big", "PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n", PROXYPROTO_EV1, 0, NULL,
     0},
    {"leading zero", "PROXY TCP4 192.0.2.1 198.51.100.2 025 25\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"double space", "PROXY TCP4  192.0.2.1 198.51.100.2 1 25\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"missing port", "PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"trailing field", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"trailing space", "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n", PROXYPROTO_EV1, 0, NULL, 0},
    {"empty after PROXY", "PROXY \r\n", PROXYPROTO_EV1, 0, NULL, 0},
};

/* Each v1 line gives its length, the client address, or the right error. */
Test(proxyproto, v1_table)
{
    for (size_t i = 0; i < sizeof(v1_cases) / sizeof(v1_cases[0]); i++) {
        const struct v1_case *c = &v1_cases[i];
        struct proxyproto_result res;
        char addr[64];
        int rc = proxyproto_parse(c->in, strlen(c->in), &res);

        cr_assert(eq(int, rc, c->want_rc), "%s: rc %d", c->label, rc);
        if (rc <= 0)
            continue;
        cr_assert(eq(int, res.version, 1), "%s", c->label);
        cr_assert(eq(int, res.local, c->want_local), "%s", c->label);
        if (c->want_src != NULL) {
            netaddr_sockaddr_str((struct sockaddr *)&res.src, addr, sizeof(addr));
            cr_assert(eq(str, addr, (char *)c->want_src), "%s", c->label);
            cr_assert(eq(uint, ntohs(((struct sockaddr_in *)&res.src)->sin_port),
                         c->want_sport), "%s", c->label);
        }
    }
}

/* A v1 line that has no CRLF within 107 bytes is refused rather than waited for. */
Test(proxyproto, v1_too_long)
{
    char line[200];
    struct proxyproto_result res;

    memset(line, 'x', sizeof(line));
    memcpy(line, "PROXY TCP4 ", 11);
    cr_assert(eq(int, proxyproto_parse(line, 106, &res), 0));
    cr_assert(eq(int, proxyproto_parse(line, 107, &res), PROXYPROTO_ETOOLONG));
    cr_assert(eq(int, proxyproto_parse(line, sizeof(line), &res), PROXYPROTO_ETOOLONG));
}

/* A NUL inside a v1 field is malformed, not a shorter field. */
Test(proxyproto, v1_nul)
{
    static const char in[] = "PROXY TCP4\0 1.2.3.4 1.2.3.4 1 2\r\n";
    struct proxyproto_result res;

    cr_assert(eq(int, proxyproto_parse(in, sizeof(in) - 1, &res), PROXYPROTO_EV1));
}

static const unsigned char sig[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                      0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* A v2 header: signature, ver_cmd, fam, body of blen bytes (addresses then TLVs). */
static size_t v2(unsigned char *out, unsigned ver_cmd, unsigned fam, const void *body,
                 size_t blen)
{
    memcpy(out, sig, 12);
    out[12] = (unsigned char)ver_cmd;
    out[13] = (unsigned char)fam;
    out[14] = (unsigned char)(blen >> 8);
    out[15] = (unsigned char)blen;
    memcpy(out + 16, body, blen);
    return 16 + blen;
}

/* v2 PROXY over TCP/IPv4 with a TLV after the addresses. */
Test(proxyproto, v2_inet_with_tlv)
{
    unsigned char body[12 + 7], hdr[64];
    struct proxyproto_result res;
    char addr[64];
    size_t n;

    memcpy(body, "\xc0\x00\x02\x01" "\xc6\x33\x64\x02" "\xdc\x04" "\x00\x19", 12);
    memcpy(body + 12, "\x02\x00\x04host", 7); /* PP2_TYPE_AUTHORITY */
    n = v2(hdr, 0x21, 0x11, body, sizeof(body));
    memcpy(hdr + n, "EHLO", 4);
    cr_assert(eq(int, proxyproto_parse(hdr, n + 4, &res), (int)n));
    cr_assert(eq(int, res.version, 2));
    cr_assert(eq(int, res.local, 0));
    netaddr_sockaddr_str((struct sockaddr *)&res.src, addr, sizeof(addr));
    cr_assert(eq(str, addr, "192.0.2.1"));
    cr_assert(eq(uint, ntohs(((struct sockaddr_in *)&res.src)->sin_port), 56324));
    netaddr_sockaddr_str((struct sockaddr *)&res.dst, addr, sizeof(addr));
    cr_assert(eq(str, addr, "198.51.100.2"));
    /* Every shorter prefix asks for more. */
    for (size_t i = 0; i < n; i++)
        cr_assert(eq(int, proxyproto_parse(hdr, i, &res), 0), "prefix %zu", i);
}

/* v2 PROXY over TCP/IPv6. */
Test(proxyproto, v2_inet6)
{
    unsigned char body[36], hdr[64];
    struct proxyproto_result res;
    char addr[64];
    size_t n;

    memset(body, 0, sizeof(body));
    inet_pton(AF_INET6, "2001:db8::7", body);
    inet_pton(AF_INET6, "2001:db8::1", body + 16);
    body[32] = 0x0f;
    body[33] = 0xa0;
    body[35] = 25;
    n = v2(hdr, 0x21, 0x21, body, sizeof(body));
    cr_assert(eq(int, proxyproto_parse(hdr, n, &res), (int)n));
    netaddr_sockaddr_str((struct sockaddr *)&res.src, addr, sizeof(addr));
    cr_assert(eq(str, addr, "2001:db8::7"));
    cr_assert(eq(uint, ntohs(((struct sockaddr_in6 *)&res.src)->sin6_port), 4000));
}

struct v2_case {
    const char *label;
    unsigned ver_cmd, fam;
    size_t blen;
    int want; /* 1: ok (length), 2: ok and local, else the error */
};

static const struct v2_case v2_cases[] = {
    {"LOCAL", 0x20, 0x00, 0, 2},
    {"LOCAL with inet body", 0x20, 0x11, 12, 2},
    {"PROXY UNSPEC", 0x21, 0x00, 0, 2},
    {"PROXY unix", 0x21, 0x31, 216, 2},
    {"version 1 in v2", 0x11, 0x11, 12, PROXYPROTO_EV2},
    {"version 3", 0x31, 0x11, 12, PROXYPROTO_EV2},
    {"command 2", 0x22, 0x11, 12, PROXYPROTO_EV2},
    {"family 4", 0x21, 0x41, 12, PROXYPROTO_EV2},
    {"transport 3", 0x21, 0x13, 12, PROXYPROTO_EV2},
    {"dgram", 0x21, 0x12, 12, PROXYPROTO_EV2},
    {"inet body short", 0x21, 0x11, 11, PROXYPROTO_EV2},
    {"inet6 body short", 0x21, 0x21, 35, PROXYPROTO_EV2},
    {"inet ok", 0x21, 0x11, 12, 1},
};

/* v2 commands and families: accepted, LOCAL, or malformed. */
Test(proxyproto, v2_table)
{
    unsigned char body[300], hdr[400];

    memset(body, 0, sizeof(body));
    for (size_t i = 0; i < sizeof(v2_cases) / sizeof(v2_cases[0]); i++) {
        const struct v2_case *c = &v2_cases[i];
        struct proxyproto_result res;
        size_t n = v2(hdr, c->ver_cmd, c->fam, body, c->blen);
        int rc = proxyproto_parse(hdr, n, &res);

        if (c->want > 0) {
            cr_assert(eq(int, rc, (int)n), "%s: rc %d", c->label, rc);
            cr_assert(eq(int, res.local, c->want == 2), "%s", c->label);
        } else {
            cr_assert(eq(int, rc, c->want), "%s: rc %d", c->label, rc);
        }
    }
}

/* A broken signature is "no header", and a partial signature needs more. */
Test(proxyproto, v2_signature)
{
    unsigned char hdr[32];
    struct proxyproto_result res;

    memcpy(hdr, sig, 12);
    cr_assert(eq(int, proxyproto_parse(hdr, 5, &res), 0));
    hdr[7] = 'X';
    cr_assert(eq(int, proxyproto_parse(hdr, 12, &res), PROXYPROTO_ESIG));
    cr_assert(not(eq(str, (char *)proxyproto_strerror(PROXYPROTO_EV2), "no error")));
}
