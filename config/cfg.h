/*
 * cfg - relayd's configuration: one INI file, validated at load into struct cfg.
 *
 * inih only tokenises; cfg converts every value, checks bounds, enums and files, and
 * reports the first problem as "FILE:LINE: [section name] key: what is wrong".  Defaults
 * live in the key tables (config/cfg_keys.c) and nowhere else.  cfg_load() touches no spool and no
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

enum cfg_auth {
    CFG_AUTH_OFF,
    CFG_AUTH_OPTIONAL,
    CFG_AUTH_REQUIRED,
    CFG_AUTH_ACCEPT_ANY,        /* any credentials get 235: for devices that insist */
};

/* [upstream] auth: how relayd authenticates to the upstream. */
enum cfg_upauth {
    CFG_UPAUTH_PASSWORD,
    CFG_UPAUTH_XOAUTH2,
    CFG_UPAUTH_OAUTHBEARER,
};

/* [upstream] oauth2_grant: where OAuth 2.0 access tokens come from. */
enum cfg_grant {
    CFG_GRANT_NONE,             /* auth = password */
    CFG_GRANT_CLIENT_CREDENTIALS,
    CFG_GRANT_REFRESH_TOKEN,
    CFG_GRANT_JWT_BEARER,
    CFG_GRANT_COMMAND,          /* oauth2_token_command */
};

/* [upstream] transport: how an upstream is spoken to. */
enum cfg_transport {
    CFG_TRANSPORT_SMTP,
    CFG_TRANSPORT_GRAPH, /* Microsoft Graph: POST /v1.0/users/{mailbox}/sendMail */
    CFG_TRANSPORT_GMAIL, /* Gmail API: POST /gmail/v1/users/{mailbox}/messages/send */
};

enum cfg_proxy {
    CFG_PROXY_NO,
    CFG_PROXY_V1,
    CFG_PROXY_V2,
    CFG_PROXY_ANY,
};

/* [listener] bare_lf: what a bare LF (without CR) means in DATA (README "Bare LF"). */
enum cfg_bare_lf {
    CFG_BARE_LF_ACCEPT,    /* a line end, and LF.LF ends DATA (legacy devices; default) */
    CFG_BARE_LF_NORMALIZE, /* a line end, but only CRLF.CRLF ends DATA (no smuggling) */
    CFG_BARE_LF_REJECT,    /* the message is refused with 550 5.5.2 */
};

struct cfg_listener {
    char *name;                 /* from [listener NAME] */
    char *host;                 /* "0.0.0.0", "::", "127.0.0.1" */
    int port;
    struct netaddr_list allow;  /* client networks allowed to connect */
    enum cfg_tls tls;           /* none | starttls | implicit; default none */
    char *cert, *key;           /* PEM files; required when tls != none */
    char *tls_priority;         /* GnuTLS priority string */
    enum cfg_auth auth;         /* default off */
    char *sasldb;               /* Cyrus sasldb file; default /etc/sasldb2 */
    char *auth_mechanisms;      /* default "PLAIN LOGIN CRAM-MD5" */
    int auth_plaintext;         /* PLAIN/LOGIN without TLS; default no */
    char *sender_domains;       /* comma/space list; NULL: any sender */
    char *recipient_domains;    /* comma/space list; NULL: any recipient */
    enum cfg_proxy proxy_protocol; /* default no */
    struct netaddr_list debug_peers; /* clients whose dialogue is logged */
    struct netaddr_list proxy_trusted; /* proxies whose PROXY header is believed */
    int add_date, add_message_id, add_from, add_received; /* repairs; default yes */
    int command_timeout;        /* seconds; RFC 5321 4.5.3.2.7: 5 minutes */
    int data_timeout;           /* seconds; same */
    int max_line_length;        /* command line bytes; default 2048 */
    int max_errors;             /* protocol errors before we hang up; default 20 */
    /* Inbound hardening and diagnosability (issue #10). */
    char *bare_lf;              /* "accept" (default) | "normalize" | "reject" */
    enum cfg_bare_lf bare_lf_mode; /* from bare_lf */
    struct netaddr_list bare_lf_accept; /* clients that get "accept" whatever bare_lf says */
    int glued_dot;              /* at data_timeout take "text." as the end of DATA; default no */
    int handshake_timeout;      /* seconds for a TLS handshake; default 10 */
    int write_timeout;          /* seconds a client may leave our replies unread; default 60 */
    int listen_backlog;         /* listen(2) backlog; default 4096 (capped by somaxconn) */
    int line;                   /* where the section starts, for messages */
};

/* A two-column map file ("device@lan  account@corp.example", '#' comments), loaded and
 * validated at cfg_load().  Keys are full addresses or "@domain"; values full addresses. */
struct cfg_map_entry {
    char *from;
    char *to;
};
struct cfg_map {
    struct cfg_map_entry *e;
    int n;
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
    int data_timeout;           /* seconds for the reply to the final dot (4.5.3.2.6); 600 */
    /* Outbound delivery engine (relayd/pool.c, relayd/upstream.c). */
    int max_connections;        /* sessions open at once to this upstream; default 4 */
    int idle_timeout;           /* seconds an unused session stays open; default 30 */
    int reuse;                  /* several messages per session; default yes */
    char *tls_pin;              /* "sha256//BASE64[;sha256//BASE64...]"; NULL: no pin */
    int max_messages_per_minute; /* 0 (default): unlimited */
    int max_recipients_per_day; /* 0 (default): unlimited; rolling 24 hours (kept in the spool) */
    /* OAuth 2.0 upstream authentication (relayd/oauth2.h).  With auth = xoauth2 or
     * oauthbearer, username is the mailbox and password_file is not used.  Presets from
     * provider are resolved at load: token_endpoint, device_endpoint and scope are set. */
    enum cfg_upauth upauth;     /* auth = password (default) | xoauth2 | oauthbearer */
    char *provider;             /* "microsoft" | "google"; NULL: none */
    char *tenant;               /* Microsoft tenant (id or domain) */
    char *token_endpoint;       /* https URL */
    char *device_endpoint;      /* https URL, for relayctl oauth2 authorize */
    enum cfg_grant grant;       /* oauth2_grant = client_credentials | refresh_token |
                                   jwt_bearer; NONE when not set, then inferred at load
                                   (COMMAND with oauth2_token_command) */
    char *client_id;
    char *client_secret_file;
    char *client_secret;        /* contents of client_secret_file */
    char *refresh_token_file;   /* read and rewritten at run time; mode 0600 */
    char *service_account_file; /* Google JSON key (jwt_bearer); mode 0600 */
    char *scope;
    char *oauth2_ca_file;       /* NULL: system trust store */
    char *oauth2_token_command; /* /bin/sh -c; prints a token (or a JSON token response) */
    int oauth2_refresh_margin;  /* seconds before expiry to refresh; default 600 */
    /* HTTP API transports (relayd/apisend.h): transport = graph | gmail delivers through
     * Microsoft Graph sendMail or the Gmail API instead of SMTP; host, port and the TLS
     * keys other than ca_file are not used then. */
    char *transport_name;       /* transport = smtp (default) | graph | gmail */
    enum cfg_transport transport; /* from transport_name, set by cfg_check.c */
    char *mailbox;              /* the sending mailbox: an address, or "sender" (the rewritten
                                   envelope sender); NULL: username */
    char *mailbox_map_file;     /* envelope sender -> mailbox, tried before mailbox */
    struct cfg_map mailbox_map;
    int save_to_sent_items;     /* Graph saveToSentItems; default no */
    char *api_url;              /* base URL; NULL: the provider's (set by cfg_check.c) */
    int line;
};

struct cfg_route {
    char *name;                 /* from [route NAME]; "default" is the fallback */
    char *upstream_name;
    struct cfg_upstream *upstream; /* resolved at load */
    char *failover_names;       /* "backup1, backup2": tried in order when upstream fails */
    struct cfg_upstream **failover; /* resolved at load; nfailover entries */
    int nfailover;
    char *sender_domain;        /* comma/space list matched by route_match(); NULL: none */
    char *recipient_domain;     /* same, for recipient domains; NULL: none */
    char *sender;               /* "scan@lan, @fax.lan, lan.example": addresses, @domains or
                                   domains; one matcher kind with sender_domain; NULL: none */
    struct netaddr_list client; /* client networks (CIDR); n == 0: none */
    char *listener;             /* listener names; NULL: none */
    /* Rewriting (relayd/rewrite.h).  Recipients are never rewritten unless recipient_map
     * maps them. */
    char *rewrite_sender;       /* envelope sender for mail on this route; NULL: kept */
    char *rewrite_sender_map_file;
    struct cfg_map rewrite_sender_map; /* device sender -> account; tried first */
    int rewrite_from;           /* From: gets the rewritten sender (default no) */
    int keep_reply_to;          /* ... and Reply-To: the original From: (default yes) */
    char *recipient_map_file;
    struct cfg_map recipient_map;
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
    int retry_factor;           /* [relayd] retry_factor: backoff multiplier; default 2 */
    int delay_warning;          /* [relayd] delay_warning, seconds; 0 (default): none */
    char *bounce_to;            /* [relayd] bounce_to; NULL: the envelope sender */
    int bounces;                /* [relayd] bounces: send DSNs at all; default yes */
    int failed_retention;       /* [relayd] failed_retention, seconds; default 7 days */
    int upstream_probe_interval; /* [relayd] upstream_probe_interval, seconds; default 60 */
    int stop_grace;              /* [relayd] stop_grace, seconds: a stop lets deliveries that
                                    sent their final dot read the reply; default 10 */
    long spool_max_size;        /* [relayd] spool_max_size, bytes of mail; 0 (default): none */
    long spool_reserve;         /* [relayd] spool_reserve, free disk to keep; default 100M */
    int unsafe_no_fsync;        /* [relayd] unsafe_no_fsync: no fsync at commit; default no */
    char *user;                 /* [relayd] user relayd becomes when started as root */
    char *group;                /* [relayd] group; NULL: the user's primary group */
    int run_as_root;            /* [relayd] run_as_root: stay root when started so; default no */
    int max_connections;        /* [relayd] inbound sessions at once; default 200 */
    int max_connections_per_client; /* [relayd] per client address; default 20 */
    long max_memory;            /* [relayd] message bytes held by sessions; default 256M */
    char *metrics_host;         /* [relayd] metrics: HTTP /metrics and /healthz; NULL: off */
    int metrics_port;
    struct netaddr_list metrics_allow; /* [relayd] metrics_allow; default loopback */
    int health_max_age;         /* [relayd] health_max_age, seconds; 0: no limit; default 1h */
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

/* Map files (config/cfg_map.c).  cfg_map_load(): 0, or -1 with "PATH:LINE: why" in why;
 * *map is empty on failure.  cfg_map_lookup(): the value for addr (exact address first,
 * then "@domain", case-insensitive), or NULL; points into map. */
int cfg_map_load(const char *path, struct cfg_map *map, char *why, size_t whylen);
const char *cfg_map_lookup(const struct cfg_map *map, const char *addr);
void cfg_map_free(struct cfg_map *map);

/* Reads a secrets file (password_file rules: a regular file, not readable by group or
 * others, at most max bytes, trailing newlines removed, not empty) into *out (malloc'd;
 * wipe and free it).  0, or -1 with "PATH: why" in why.  Used at run time for files that
 * relayd rewrites (refresh_token_file) or that are larger than a password. */
int cfg_secret_read(const char *path, size_t max, char **out, char *why, size_t whylen);

/* Configuration generations (the full reload, SIGHUP): a loaded struct cfg that is never
 * changed again, shared by reference.  The daemon holds the current one; every inbound
 * session and the delivery engine hold the one they started with, so a reload never
 * changes the settings under a session or a delivery in progress; the last unref frees it.
 * Single-threaded (the event loop): the count is not atomic. */
struct cfg_gen {
    struct cfg cfg;
    unsigned long n; /* 1 for the configuration loaded at start, +1 per reload */
    int refs;
};

/* Takes over the contents of *cfg (which is left zeroed) with one reference. */
struct cfg_gen *cfg_gen_new(struct cfg *cfg, unsigned long n);
/* One more reference; returns g (NULL is fine). */
struct cfg_gen *cfg_gen_ref(struct cfg_gen *g);
/* Drops one reference, frees g with the last one; returns NULL (NULL is fine). */
struct cfg_gen *cfg_gen_unref(struct cfg_gen *g);

/* Every key of every section type, in table order: fn(arg, "listener", "tls"), ...  The
 * strings are static (test_cfg_doc checks that each one is documented). */
typedef void (*cfg_key_fn)(void *arg, const char *section, const char *key);
void cfg_keys_each(cfg_key_fn fn, void *arg);

const char *cfg_tls_name(enum cfg_tls tls);
const char *cfg_auth_name(enum cfg_auth auth);
const char *cfg_proxy_name(enum cfg_proxy proxy);
const char *cfg_bare_lf_name(enum cfg_bare_lf mode);

#endif
