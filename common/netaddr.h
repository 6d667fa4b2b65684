/*
 * netaddr - IPv4/IPv6 networks in CIDR notation, and matching client addresses.
 *
 * Used for listener "allow" lists and "debug_peers".  IPv4-mapped IPv6 clients
 * (::ffff:10.0.0.7) match IPv4 networks.  Pure functions, no allocation except in
 * netaddr_list_parse() (caller frees with netaddr_list_free()).
 */
#ifndef COMMON_NETADDR_H
#define COMMON_NETADDR_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct netaddr_net {
    int family;          /* AF_INET or AF_INET6 */
    uint8_t addr[16];    /* network address, host bits cleared */
    unsigned prefix;     /* 0..32 or 0..128 */
};

struct netaddr_list {
    struct netaddr_net *nets;
    size_t n;
};

/* Parses "10.0.0.0/8", "::1", "192.168.1.7" (no prefix: a host). 0 or -EINVAL, with
 * text for the operator in err ("10.0.0.0/33: prefix length is not in 0..32"). */
int netaddr_net_parse(const char *text, struct netaddr_net *net, char *err, size_t errlen);
/* Parses a comma and/or space separated list; on error the list is left empty. */
int netaddr_list_parse(const char *text, struct netaddr_list *list, char *err, size_t errlen);
void netaddr_list_free(struct netaddr_list *list);

/* 1 when the address is inside the network / any network of the list, else 0. */
int netaddr_net_match(const struct netaddr_net *net, const struct sockaddr *sa);
int netaddr_list_match(const struct netaddr_list *list, const struct sockaddr *sa);

/* "10.0.0.7" / "::1" (IPv4-mapped shown as IPv4) into out; returns out. */
char *netaddr_sockaddr_str(const struct sockaddr *sa, char *out, size_t outlen);
/* 1 when the address is loopback or in a private range (RFC 1918, ULA, link-local). */
int netaddr_is_private_or_loopback(const struct sockaddr *sa);
/* Formats one network back to text ("10.0.0.0/8"). */
char *netaddr_net_str(const struct netaddr_net *net, char *out, size_t outlen);

#endif
