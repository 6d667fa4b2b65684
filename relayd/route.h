/*
 * route - which [route] a message's recipient takes, and the domain lists of [listener]
 * sender_domains / recipient_domains: the per-message matching over a loaded struct cfg.
 *
 * Pure functions of the configuration and the envelope: no I/O, no allocation, no errors
 * (a NULL route means "hold").  The configuration library (config/) validates the route
 * keys at load; matching them against mail is the daemon's, here.
 */
#ifndef RELAYD_ROUTE_H
#define RELAYD_ROUTE_H

#include "config/cfg.h"

/*
 * The route for one recipient of a message: the first route other than "default", in file
 * order, all of whose given matcher kinds match: sender (sender and sender_domain together:
 * the sender is listed as an address, "@domain" or domain), recipient_domain, client (the
 * client address is inside one of the networks) and listener (named); else the route named
 * "default"; else NULL (hold).  Domains compare case-insensitively, exactly (no
 * subdomains).  sender may be "" or NULL; client_addr (textual IPv4/IPv6) and listener may
 * be NULL (unknown): a route that needs them does not match.  Points into cfg.
 */
const struct cfg_route *route_match(const struct cfg *cfg, const char *sender, const char *rcpt,
                                    const char *client_addr, const char *listener);

/* 1 when addr's domain is in list (comma/space separated, case-insensitive, exact). */
int route_domain_listed(const char *list, const char *addr);

#endif
