/*
 * test_netaddr - CIDR parsing, matching (IPv4, IPv6, IPv4-mapped) and formatting.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>

#include "common/netaddr.h"

/* A sockaddr for a literal address; the storage is the caller's. */
static const struct sockaddr *sa_of(const char *text, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (strchr(text, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;

        sin6->sin6_family = AF_INET6;
        cr_assert(eq(int, inet_pton(AF_INET6, text, &sin6->sin6_addr), 1), "%s", text);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;

        sin->sin_family = AF_INET;
        cr_assert(eq(int, inet_pton(AF_INET, text, &sin->sin_addr), 1), "%s", text);
    }
    return (const struct sockaddr *)ss;
}

struct parse_case {
    const char *label;
    const char *text;
    int want_rc;
    const char *want_str; /* netaddr_net_str() of the result, or the error text */
};

static const struct parse_case parse_cases[] = {
    {"v4 net", "10.0.0.0/8", 0, "10.0.0.0/8"},
    {"v4 host", "192.168.1.7", 0, "192.168.1.7/32"},
    {"v4 host bits cleared", "10.1.2.3/8", 0, "10.0.0.0/8"},
    {"v4 /0", "0.0.0.0/0", 0, "0.0.0.0/0"},
    {"v4 odd prefix", "172.31.255.255/12", 0, "172.16.0.0/12"},
    {"v6 host", "::1", 0, "::1/128"},
    {"v6 net", "fd00:1:2::/48", 0, "fd00:1:2::/48"},
    {"v6 host bits cleared", "fe80::1234/10", 0, "fe80::/10"},
    {"mapped net becomes v4", "::ffff:10.0.0.0/104", 0, "10.0.0.0/8"},
    {"mapped host becomes v4", "::ffff:192.0.2.1", 0, "192.0.2.1/32"},
    {"v4 prefix too long", "10.0.0.0/33", -EINVAL, "10.0.0.0/33: prefix length is not in 0..32"},
    {"v6 prefix too long", "::/129", -EINVAL, "::/129: prefix length is not in 0..128"},
    {"empty prefix", "10.0.0.0/", -EINVAL, "10.0.0.0/: prefix length is not in 0..32"},
    {"signed prefix", "10.0.0.0/+8", -EINVAL, "10.0.0.0/+8: prefix length is not in 0..32"},
    {"hex prefix", "10.0.0.0/0x8", -EINVAL, "10.0.0.0/0x8: prefix length is not in 0..32"},
    {"host name", "localhost", -EINVAL, "localhost: not an IPv4 or IPv6 address"},
    {"short v4", "10.0.0/8", -EINVAL, "10.0.0/8: not an IPv4 or IPv6 address"},
    {"empty", "", -EINVAL, ": not an IPv4 or IPv6 address"},
    {"only prefix", "/8", -EINVAL, "/8: not an IPv4 or IPv6 address"},
};

/* Every accepted form normalises as documented; every rejected one says why. */
Test(netaddr, net_parse)
{
    size_t i;

    for (i = 0; i < sizeof parse_cases / sizeof parse_cases[0]; i++) {
        const struct parse_case *c = &parse_cases[i];
        struct netaddr_net net;
        char err[128] = "", out[64];
        int rc = netaddr_net_parse(c->text, &net, err, sizeof err);

        cr_expect(eq(int, rc, c->want_rc), "%s", c->label);
        if (rc == 0)
            cr_expect(eq(str, netaddr_net_str(&net, out, sizeof out), (char *)c->want_str), "%s",
                      c->label);
        else
            cr_expect(eq(str, err, (char *)c->want_str), "%s", c->label);
    }
}

struct match_case {
    const char *label;
    const char *net;
    const char *addr;
    int want;
};

static const struct match_case match_cases[] = {
    {"v4 inside", "10.0.0.0/8", "10.255.1.2", 1},
    {"v4 outside", "10.0.0.0/8", "11.0.0.1", 0},
    {"v4 /12 edge in", "172.16.0.0/12", "172.31.255.255", 1},
    {"v4 /12 edge out", "172.16.0.0/12", "172.32.0.0", 0},
    {"v4 host", "192.168.1.7", "192.168.1.7", 1},
    {"v4 host other", "192.168.1.7", "192.168.1.8", 0},
    {"v4 /0 any", "0.0.0.0/0", "203.0.113.9", 1},
    {"mapped client, v4 net", "10.0.0.0/8", "::ffff:10.0.0.7", 1},
    {"mapped client outside", "10.0.0.0/8", "::ffff:11.0.0.7", 0},
    {"mapped net, v4 client", "::ffff:10.0.0.0/104", "10.9.9.9", 1},
    {"v6 inside", "fd00::/8", "fd12:3456::1", 1},
    {"v6 outside", "fd00::/8", "fe80::1", 0},
    {"v6 loopback", "::1", "::1", 1},
    {"v6 net, v4 client", "::/0", "10.0.0.1", 0},
    {"v4 net, v6 client", "0.0.0.0/0", "2001:db8::1", 0},
    {"v6 /0 any", "::/0", "2001:db8::1", 1},
};

/* Matching honours the prefix and the family, with IPv4-mapped clients treated as IPv4. */
Test(netaddr, net_match)
{
    size_t i;

    for (i = 0; i < sizeof match_cases / sizeof match_cases[0]; i++) {
        const struct match_case *c = &match_cases[i];
        struct sockaddr_storage ss;
        struct netaddr_net net;
        char err[128];

        cr_assert(eq(int, netaddr_net_parse(c->net, &net, err, sizeof err), 0), "%s", c->label);
        cr_expect(eq(int, netaddr_net_match(&net, sa_of(c->addr, &ss)), c->want), "%s", c->label);
    }
}

/* A list splits on commas and spaces and matches any of its members. */
Test(netaddr, list_parse_match)
{
    struct netaddr_list l;
    struct sockaddr_storage ss;
    char err[128];

    cr_assert(
        eq(int,
           netaddr_list_parse(" 10.0.0.0/8,192.168.0.0/16 ,, fd00::/8\t::1 ", &l, err, sizeof err),
           0),
        "%s", err);
    cr_assert(eq(sz, l.n, 4));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("192.168.3.4", &ss)), 1));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("::ffff:10.1.1.1", &ss)), 1));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("::1", &ss)), 1));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("fd99::1", &ss)), 1));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("8.8.8.8", &ss)), 0));
    cr_expect(eq(int, netaddr_list_match(&l, sa_of("2001:db8::1", &ss)), 0));
    netaddr_list_free(&l);
    cr_expect(eq(ptr, l.nets, NULL));
    cr_expect(eq(sz, l.n, 0));
    netaddr_list_free(&l); /* twice is harmless */
}

/* A bad member fails the whole list, leaves it empty and names the member. */
Test(netaddr, list_parse_errors)
{
    struct netaddr_list l = {NULL, 0};
    char err[128];

    cr_expect(eq(int, netaddr_list_parse("10.0.0.0/8, 10.0.0.0/40", &l, err, sizeof err), -EINVAL));
    cr_expect(eq(str, err, "10.0.0.0/40: prefix length is not in 0..32"));
    cr_expect(eq(sz, l.n, 0));
    cr_expect(eq(ptr, l.nets, NULL));
    cr_expect(eq(int, netaddr_list_parse(" , ", &l, err, sizeof err), -EINVAL));
    cr_expect(eq(str, err, "no networks given"));
    cr_expect(eq(int, netaddr_list_parse("10.0.0.0/8 lan", &l, err, sizeof err), -EINVAL));
    cr_expect(eq(str, err, "lan: not an IPv4 or IPv6 address"));
    cr_expect(eq(sz, l.n, 0));
}

/* An empty or NULL list matches nobody; unknown families match nothing. */
Test(netaddr, match_edges)
{
    struct netaddr_list empty = {NULL, 0};
    struct sockaddr_storage ss;
    struct sockaddr unix_sa = {.sa_family = AF_UNIX};
    struct netaddr_net net;
    char err[64];

    cr_expect(eq(int, netaddr_list_match(&empty, sa_of("127.0.0.1", &ss)), 0));
    cr_expect(eq(int, netaddr_list_match(NULL, sa_of("127.0.0.1", &ss)), 0));
    cr_assert(eq(int, netaddr_net_parse("0.0.0.0/0", &net, err, sizeof err), 0));
    cr_expect(eq(int, netaddr_net_match(&net, &unix_sa), 0));
    cr_expect(eq(int, netaddr_net_match(&net, NULL), 0));
}

struct private_case {
    const char *addr;
    int want;
};

static const struct private_case private_cases[] = {
    {"127.0.0.1", 1},       {"127.9.9.9", 1},      {"10.1.2.3", 1},    {"172.16.0.1", 1},
    {"172.31.9.9", 1},      {"172.32.0.1", 0},     {"192.168.0.1", 1}, {"169.254.1.1", 1},
    {"8.8.8.8", 0},         {"0.0.0.0", 0},        {"::", 0},          {"::1", 1},
    {"fd00::1", 1},         {"fc00::1", 1},        {"fe80::1", 1},     {"2001:db8::1", 0},
    {"::ffff:10.0.0.1", 1}, {"::ffff:8.8.8.8", 0},
};

/* Loopback and private ranges (RFC 1918, ULA, link-local) are recognised; wildcards are not. */
Test(netaddr, private_or_loopback)
{
    size_t i;

    for (i = 0; i < sizeof private_cases / sizeof private_cases[0]; i++) {
        struct sockaddr_storage ss;

        cr_expect(eq(int, netaddr_is_private_or_loopback(sa_of(private_cases[i].addr, &ss)),
                     private_cases[i].want),
                  "%s", private_cases[i].addr);
    }
}

/* Addresses print in their usual form, IPv4-mapped ones as IPv4. */
Test(netaddr, sockaddr_str)
{
    struct sockaddr_storage ss;
    struct sockaddr unix_sa = {.sa_family = AF_UNIX};
    char out[INET6_ADDRSTRLEN];

    cr_expect(eq(str, netaddr_sockaddr_str(sa_of("10.0.0.7", &ss), out, sizeof out), "10.0.0.7"));
    cr_expect(eq(str, netaddr_sockaddr_str(sa_of("::1", &ss), out, sizeof out), "::1"));
    cr_expect(
        eq(str, netaddr_sockaddr_str(sa_of("::ffff:10.0.0.7", &ss), out, sizeof out), "10.0.0.7"));
    cr_expect(
        eq(str, netaddr_sockaddr_str(sa_of("2001:db8::5", &ss), out, sizeof out), "2001:db8::5"));
    cr_expect(eq(str, netaddr_sockaddr_str(&unix_sa, out, sizeof out), "?"));
}
