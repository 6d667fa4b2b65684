/*
 * netaddr - IPv4/IPv6 networks in CIDR notation, and matching client addresses; see netaddr.h.
 *
 * Invariants: a parsed struct netaddr_net has its host bits cleared, and an IPv6 network
 * inside ::ffff:0:0/96 is stored as the IPv4 network it denotes.  Client addresses are
 * normalised the same way before matching, so "::ffff:10.0.0.7" (what a dual-stack socket
 * reports for an IPv4 peer) matches "10.0.0.0/8", and "::ffff:10.0.0.0/104" means 10/8.
 *
 * Errors: -EINVAL with operator text in err.  Only netaddr_list_parse() allocates.
 */
#include "common/netaddr.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

static const uint8_t mapped_prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

/* Clears every bit past the prefix length. */
static void clear_host_bits(uint8_t *addr, unsigned prefix, size_t len)
{
    size_t i;

    for (i = 0; i < len; i++) {
        if (prefix >= 8) {
            prefix -= 8;
            continue;
        }
        addr[i] &= (uint8_t)(0xff << (8 - prefix));
        prefix = 0;
    }
}

/* 1 when the first prefix bits of a and b are equal. */
static int prefix_equal(const uint8_t *a, const uint8_t *b, unsigned prefix)
{
    size_t whole = prefix / 8;
    unsigned rest = prefix % 8;
    uint8_t mask;

    if (memcmp(a, b, whole) != 0)
        return 0;
    if (rest == 0)
        return 1;
    mask = (uint8_t)(0xff << (8 - rest));
    return (a[whole] & mask) == (b[whole] & mask);
}

/*
 * Reduces a socket address to family + bytes, turning IPv4-mapped IPv6 into IPv4.
 * Returns 0, or -1 for families we do not know.
 */
static int sockaddr_bytes(const struct sockaddr *sa, int *family, uint8_t addr[16])
{
    if (sa == NULL)
        return -1;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;

        *family = AF_INET;
        memcpy(addr, &sin->sin_addr, 4);
        return 0;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        const uint8_t *b = sin6->sin6_addr.s6_addr;

        if (memcmp(b, mapped_prefix, sizeof mapped_prefix) == 0) {
            *family = AF_INET;
            memcpy(addr, b + 12, 4);
        } else {
            *family = AF_INET6;
            memcpy(addr, b, 16);
        }
        return 0;
    }
    return -1;
}

int netaddr_net_parse(const char *text, struct netaddr_net *net, char *err, size_t errlen)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *slash = strchr(text, '/');
    size_t hostlen = slash != NULL ? (size_t)(slash - text) : strlen(text);
    unsigned maxprefix, prefix;
    struct netaddr_net n;

    memset(&n, 0, sizeof n);
    if (hostlen == 0 || hostlen >= sizeof host)
        goto bad_addr;
    memcpy(host, text, hostlen);
    host[hostlen] = '\0';
    if (inet_pton(AF_INET, host, n.addr) == 1) {
        n.family = AF_INET;
        maxprefix = 32;
    } else if (inet_pton(AF_INET6, host, n.addr) == 1) {
        n.family = AF_INET6;
        maxprefix = 128;
    } else {
        goto bad_addr;
    }

    prefix = maxprefix;
    if (slash != NULL) {
        const char *p = slash + 1;
        unsigned long v = 0;

        /* Digits only: strtoul() would accept "+8", " 8" and "0x8". */
        if (*p == '\0' || strlen(p) > 3)
            goto bad_prefix;
        for (; *p != '\0'; p++) {
            if (!isdigit((unsigned char)*p))
                goto bad_prefix;
            v = v * 10 + (unsigned long)(*p - '0');
        }
        if (v > maxprefix)
            goto bad_prefix;
        prefix = (unsigned)v;
    }

    if (n.family == AF_INET6 && prefix >= 96 &&
        memcmp(n.addr, mapped_prefix, sizeof mapped_prefix) == 0) {
        memmove(n.addr, n.addr + 12, 4);
        memset(n.addr + 4, 0, 12);
        n.family = AF_INET;
        prefix -= 96;
    }
    n.prefix = prefix;
    clear_host_bits(n.addr, prefix, sizeof n.addr);
    *net = n;
    return 0;

bad_prefix:
    snprintf(err, errlen, "%s: prefix length is not in 0..%u", text, maxprefix);
    return -EINVAL;
bad_addr:
    snprintf(err, errlen, "%s: not an IPv4 or IPv6 address", text);
    return -EINVAL;
}

int netaddr_list_parse(const char *text, struct netaddr_list *list, char *err, size_t errlen)
{
    static const char seps[] = ", \t";
    struct netaddr_list l = {NULL, 0};
    size_t cap = 0;
    const char *p = text;
    char tok[128];
    int rc;

    list->nets = NULL;
    list->n = 0;
    for (;;) {
        size_t len;

        p += strspn(p, seps);
        if (*p == '\0')
            break;
        len = strcspn(p, seps);
        if (len >= sizeof tok) {
            snprintf(err, errlen, "%.*s...: not an IPv4 or IPv6 network", 40, p);
            rc = -EINVAL;
            goto free_list;
        }
        memcpy(tok, p, len);
        tok[len] = '\0';
        p += len;
        if (l.n == cap) {
            cap = cap == 0 ? 4 : cap * 2;
            l.nets = xrealloc(l.nets, cap * sizeof *l.nets);
        }
        if ((rc = netaddr_net_parse(tok, &l.nets[l.n], err, errlen)) != 0)
            goto free_list;
        l.n++;
    }
    if (l.n == 0) {
        snprintf(err, errlen, "no networks given");
        rc = -EINVAL;
        goto free_list;
    }
    *list = l;
    return 0;

free_list:
    netaddr_list_free(&l);
    return rc;
}

void netaddr_list_free(struct netaddr_list *list)
{
    if (list == NULL)
        return;
    free(list->nets);
    list->nets = NULL;
    list->n = 0;
}

int netaddr_net_match(const struct netaddr_net *net, const struct sockaddr *sa)
{
    uint8_t addr[16];
    int family;

    if (net == NULL || sockaddr_bytes(sa, &family, addr) != 0)
        return 0;
    if (family != net->family)
        return 0;
    return prefix_equal(addr, net->addr, net->prefix);
}

int netaddr_list_match(const struct netaddr_list *list, const struct sockaddr *sa)
{
    size_t i;

    if (list == NULL)
        return 0;
    for (i = 0; i < list->n; i++)
        if (netaddr_net_match(&list->nets[i], sa))
            return 1;
    return 0;
}

char *netaddr_sockaddr_str(const struct sockaddr *sa, char *out, size_t outlen)
{
    uint8_t addr[16];
    int family;

    if (outlen == 0)
        return out;
    if (sockaddr_bytes(sa, &family, addr) != 0 || inet_ntop(family, addr, out, outlen) == NULL)
        snprintf(out, outlen, "?");
    return out;
}

int netaddr_is_private_or_loopback(const struct sockaddr *sa)
{
    static const struct {
        int family;
        uint8_t addr[16];
        unsigned prefix;
    } ranges[] = {
        {AF_INET, {127}, 8},          /* loopback, RFC 1122 */
        {AF_INET, {10}, 8},           /* RFC 1918 */
        {AF_INET, {172, 16}, 12},     /* RFC 1918 */
        {AF_INET, {192, 168}, 16},    /* RFC 1918 */
        {AF_INET, {169, 254}, 16},    /* link-local, RFC 3927 */
        {AF_INET6, {[15] = 1}, 128},  /* ::1 */
        {AF_INET6, {0xfc}, 7},        /* ULA, RFC 4193 */
        {AF_INET6, {0xfe, 0x80}, 10}, /* link-local, RFC 4291 */
    };
    uint8_t addr[16];
    int family;
    size_t i;

    if (sockaddr_bytes(sa, &family, addr) != 0)
        return 0;
    for (i = 0; i < sizeof ranges / sizeof ranges[0]; i++)
        if (ranges[i].family == family && prefix_equal(addr, ranges[i].addr, ranges[i].prefix))
            return 1;
    return 0;
}

char *netaddr_net_str(const struct netaddr_net *net, char *out, size_t outlen)
{
    char host[INET6_ADDRSTRLEN];

    if (outlen == 0)
        return out;
    if (inet_ntop(net->family, net->addr, host, sizeof host) == NULL)
        snprintf(out, outlen, "?");
    else
        snprintf(out, outlen, "%s/%u", host, net->prefix);
    return out;
}
