/*
 * route - per-message matching over the loaded configuration; see route.h.
 *
 * Lists ("a.example, b.example", "scan@lan @fax.lan lan.example", "lan scan") are kept as
 * written at load and scanned here, comma/space separated: they are short, and matching
 * happens once per recipient per delivery round.
 */
#include "relayd/route.h"

#include <arpa/inet.h>
#include <string.h>
#include <strings.h>

#include "common/netaddr.h"

/* The domain of an address ("user@Example.COM" -> "Example.COM"), or NULL. */
static const char *domain_of(const char *addr, size_t *len)
{
    const char *at;

    if (addr == NULL || (at = strrchr(addr, '@')) == NULL || at[1] == '\0')
        return NULL;
    *len = strcspn(at + 1, ">");
    return at + 1;
}

static int domain_listed(const char *list, const char *dom, size_t domlen)
{
    const char *p = list;
    size_t len;

    if (list == NULL || dom == NULL)
        return 0;
    while (*(p += strspn(p, ", \t")) != '\0') {
        len = strcspn(p, ", \t");
        if (len == domlen && strncasecmp(p, dom, len) == 0)
            return 1;
        p += len;
    }
    return 0;
}

/* The sender is listed in r's sender (as address, "@domain" or domain) or sender_domain. */
static int sender_listed(const struct cfg_route *r, const char *sender, const char *sdom,
                         size_t slen)
{
    const char *p = r->sender;
    size_t len;

    if (domain_listed(r->sender_domain, sdom, slen))
        return 1;
    while (p != NULL && sender != NULL && *(p += strspn(p, ", \t")) != '\0') {
        len = strcspn(p, ", \t");
        if (memchr(p, '@', len) == NULL) {
            if (len == slen && sdom != NULL && strncasecmp(p, sdom, len) == 0)
                return 1;
        } else if (*p == '@') {
            if (len - 1 == slen && sdom != NULL && strncasecmp(p + 1, sdom, slen) == 0)
                return 1;
        } else if (strlen(sender) == len && strncasecmp(p, sender, len) == 0) {
            return 1;
        }
        p += len;
    }
    return 0;
}

static int client_listed(const struct netaddr_list *l, const char *client)
{
    struct sockaddr_in sin;
    struct sockaddr_in6 sin6;

    if (client == NULL)
        return 0;
    memset(&sin, 0, sizeof sin);
    memset(&sin6, 0, sizeof sin6);
    if (inet_pton(AF_INET, client, &sin.sin_addr) == 1) {
        sin.sin_family = AF_INET;
        return netaddr_list_match(l, (struct sockaddr *)&sin);
    }
    if (inet_pton(AF_INET6, client, &sin6.sin6_addr) == 1) {
        sin6.sin6_family = AF_INET6;
        return netaddr_list_match(l, (struct sockaddr *)&sin6);
    }
    return 0;
}

static int name_listed(const char *list, const char *name)
{
    const char *p = list;
    size_t len;

    if (list == NULL || name == NULL)
        return 0;
    while (*(p += strspn(p, ", \t")) != '\0') {
        len = strcspn(p, ", \t");
        if (len == strlen(name) && strncmp(p, name, len) == 0)
            return 1;
        p += len;
    }
    return 0;
}

const struct cfg_route *route_match(const struct cfg *cfg, const char *sender, const char *rcpt,
                                    const char *client_addr, const char *listener)
{
    const struct cfg_route *dflt = NULL;
    size_t slen = 0, rlen = 0;
    const char *sdom = domain_of(sender, &slen), *rdom = domain_of(rcpt, &rlen);
    int i;

    for (i = 0; i < cfg->nroutes; i++) {
        const struct cfg_route *r = &cfg->routes[i];

        if (strcmp(r->name, "default") == 0) {
            dflt = r;
            continue;
        }
        /* Every matcher kind the route sets must match; a route sets at least one. */
        if ((r->sender != NULL || r->sender_domain != NULL) &&
            !sender_listed(r, sender, sdom, slen))
            continue;
        if (r->recipient_domain != NULL && !domain_listed(r->recipient_domain, rdom, rlen))
            continue;
        if (r->client.n > 0 && !client_listed(&r->client, client_addr))
            continue;
        if (r->listener != NULL && !name_listed(r->listener, listener))
            continue;
        return r;
    }
    return dflt;
}

int route_domain_listed(const char *list, const char *addr)
{
    size_t len = 0;
    const char *dom = domain_of(addr, &len);

    return domain_listed(list, dom, len);
}
