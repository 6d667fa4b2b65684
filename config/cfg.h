/*
 * cfg - relayd's configuration: one INI file, validated at load into struct cfg.
 *
 * inih only tokenises; cfg converts every value, checks bounds, enums and files, and
 * reports the first problem as "FILE:LINE: [section name] key: what is wrong".  Defaults
 * live in the key tables of cfg.c and nowhere else.  cfg_load() touches no spool and no
 * network.  Secrets (password_file contents) are read at load time and never printed:
 * cfg_dump() masks them.
 *
 * Errors: expected failures return CFG_EINVAL (or -errno) with text in err.
 * Ownership: struct cfg owns every string in it; cfg_free() releases all of it.
 */
#ifndef CONFIG_CFG_H
#define CONFIG_CFG_H

#include <stdio.h>

#include "common/netaddr.h"

#define CFG_EINVAL (-2000)

enum cfg_tls {
    CFG_TLS_NONE,
    CFG_TLS_STARTTLS,
    CFG_TLS_IMPLICIT,
};

struct cfg_listener {
    char *name;                 /* from [listener NAME] */
    char *host;                 /* "0.0.0.0", "::", "127.0.0.1" */
    int port;
    struct netaddr_list allow;  /* client networks allowed to connect */
    int line;                   /* where the section starts, for messages */
};

struct cfg_upstream {
    char *name;                 /* from [upstream NAME] */
    char *host;
    int port;                   /* default 587 (465 when tls = implicit) */
    enum cfg_tls tls;           /* default starttls */
    char *ca_file;              /* NULL: system trust store */
    char *tls_name;             /* name to verify instead of host; NULL: host */
    char *tls_priority;         /* GnuTLS priority string; default below */
    char *username;             /* NULL: no AUTH */
    char *password_file;
    char *password;             /* contents of password_file, trailing newline removed */
    char *mechanisms;           /* SASL preference, e.g. "PLAIN LOGIN"; NULL: any offered */
    int allow_plaintext_auth;   /* AUTH without TLS only with tls = none and this set */
    int connect_timeout;        /* seconds */
    int command_timeout;        /* seconds, RFC 5321 4.5.3.2 */
    int line;
};

struct cfg_route {
    char *name;                 /* from [route NAME]; "default" is the fallback */
    char *upstream_name;
    struct cfg_upstream *upstream; /* resolved at load */
    char *failover_names;       /* "backup1, backup2": tried in order when upstream fails */
    struct cfg_upstream **failover; /* resolved at load; nfailover entries */
    int nfailover;
    char *sender_domain;        /* comma/space list matched by cfg_route_find(); NULL: none */
    char *recipient_domain;     /* same, for recipient domains; NULL: none */
    int line;
};

struct cfg {
    char *path;                 /* file loaded, or "(built-in default)" */
    char *hostname;             /* [relayd] hostname; default: gethostname() */
    char *spool_dir;            /* [relayd] spool */
    long max_message_size;      /* [relayd] max_message_size, bytes; default 35 MB */
    int max_recipients;         /* [relayd] max_recipients; default 1000 */
    int retry_first;            /* [relayd] retry_first, seconds; default 60 */
    int retry_max;              /* [relayd] retry_max, seconds; default 3600 */
    int max_lifetime;           /* [relayd] max_lifetime, seconds; default 5 days */
    int workers;                /* [relayd] workers: concurrent deliveries; default 4 */
    struct cfg_listener *listeners;
    int nlisteners;
    struct cfg_upstream *upstreams;
    int nupstreams;
    struct cfg_route *routes;
    int nroutes;
};

/* Built-in default: one listener on 127.0.0.1:2525 allowing loopback, spool_dir as given
 * (NULL: "./spool"), no upstream, no route. */
void cfg_default(struct cfg *cfg, const char *spool_dir);

/* Loads and validates path into *cfg.  0, or CFG_EINVAL / -errno with "FILE:LINE: ..." in
 * err; on failure *cfg holds nothing that needs freeing. */
int cfg_load(const char *path, struct cfg *cfg, char *err, size_t errlen);

/* Prints the effective configuration, INI syntax, secrets masked. */
void cfg_dump(const struct cfg *cfg, FILE *out);

void cfg_free(struct cfg *cfg);

/* The route for a message, or NULL when no route (then: hold).  The first route other than
 * "default", in file order, whose recipient_domain lists rcpt's domain or whose
 * sender_domain lists sender's domain (case-insensitive, exact) wins; else the route named
 * "default"; else NULL.  sender may be "" (null reverse-path).  The result points into cfg. */
const struct cfg_route *cfg_route_find(const struct cfg *cfg, const char *sender,
                                       const char *rcpt);

const char *cfg_tls_name(enum cfg_tls tls);

#endif
