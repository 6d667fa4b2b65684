/*
 * cfg - relayd's configuration file; see cfg.h.
 *
 * Happy path: cfg_load() fills a private struct cfg with the [relayd] defaults, lets inih
 * tokenise the file through our own line reader, and converts each "key = value" with the
 * key table of the current section (name, type, offsetof, bounds, default text: Postfix
 * and nginx style).  A section gets its table defaults the moment its header is read, so
 * the tables are the only place defaults live.  After the last line, cross-key rules run
 * (required keys, open relay, cleartext passwords, route -> upstream), and only then is
 * the result handed to the caller.
 *
 * Failure modes: the first problem wins; it is formatted "FILE:LINE: [type name] key: why"
 * into the caller's buffer, everything built so far is freed and *cfg is zeroed.
 *
 * Why our own reader: Debian's libinih is built without INI_HANDLER_LINENO, so the handler
 * cannot learn the line number; the reader counts lines instead (inih reads one line per
 * reader call).  The reader also recognises section headers itself, because inih only
 * reports a section when a key inside it is seen: an empty [listener x] or a repeated
 * [upstream a] would otherwise go unnoticed.
 */
#include "config/cfg.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/xalloc.h"

/* Same text as TLSIO_DEFAULT_PRIORITY in common/tlsio.h; copied so that the config library
 * does not depend on the TLS module's header. */
#define CFG_TLS_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
/* A listener bound to loopback without "allow" accepts loopback clients only. */
#define CFG_ALLOW_LOOPBACK "127.0.0.0/8, ::1"
/* The listener of the built-in configuration (cfg_default()). */
#define CFG_BUILTIN_LISTEN "127.0.0.1:2525"
#define CFG_BUILTIN_SPOOL "./spool"
/* Port for tls = implicit when no port is given (RFC 8314 3.3 submissions). */
#define CFG_IMPLICIT_PORT 465
/* A password file is a password, not a document. */
#define CFG_SECRET_MAX 1024

#define KB 1024L
#define MB (1024L * KB)
#define GB (1024L * MB)
#define MINUTE 60L
#define HOUR (60L * MINUTE)
#define DAY (24L * HOUR)

enum cfg_type {
    CFG_T_STRING,   /* char *, any non-empty text */
    CFG_T_HOST,     /* char *, a host name or IP address */
    CFG_T_DOMAINS,  /* char *, comma/space list of domains, kept as written */
    CFG_T_FILE,     /* char *, a path that must be readable */
    CFG_T_SECRET,   /* char * path at off, char * contents at off2: mode 0600 or stricter */
    CFG_T_INT,      /* int within min..max */
    CFG_T_SIZE,     /* long bytes, suffix k/m/g, within min..max */
    CFG_T_DURATION, /* int seconds, suffix s/m/h/d, within min..max */
    CFG_T_BOOL,     /* int 0/1 */
    CFG_T_TLS,      /* enum cfg_tls */
    CFG_T_AUTH,     /* enum cfg_auth */
    CFG_T_PROXY,    /* enum cfg_proxy */
    CFG_T_NETLIST,  /* struct netaddr_list */
    CFG_T_HOSTPORT, /* char * IP address at off, int port at off2 */
    CFG_T_MAP,      /* char * path at off, struct cfg_map at off2 (cfg_map.c) */
};

struct cfg_key {
    const char *name;
    enum cfg_type type;
    size_t off;
    long min, max;
    const char *dflt; /* NULL: unset (or computed, see the comment at the entry) */
    size_t off2;
};

#define CFG_KEYS_MAX 64

static const struct cfg_key relayd_keys[] = {
    /* NULL: gethostname() at load. */
    {"hostname", CFG_T_HOST, offsetof(struct cfg, hostname), 0, 0, NULL, 0},
    {"spool", CFG_T_STRING, offsetof(struct cfg, spool_dir), 0, 0, "/var/spool/relayd", 0},
    {"max_message_size", CFG_T_SIZE, offsetof(struct cfg, max_message_size), KB, GB, "35M", 0},
    {"max_recipients", CFG_T_INT, offsetof(struct cfg, max_recipients), 1, 100000, "1000", 0},
    {"retry_first", CFG_T_DURATION, offsetof(struct cfg, retry_first), 1, DAY, "60s", 0},
    {"retry_max", CFG_T_DURATION, offsetof(struct cfg, retry_max), 1, 7 * DAY, "1h", 0},
    {"max_lifetime", CFG_T_DURATION, offsetof(struct cfg, max_lifetime), MINUTE, 100 * DAY, "5d",
     0},
    {"workers", CFG_T_INT, offsetof(struct cfg, workers), 1, 1024, "4", 0},
    /* Message lifecycle and bounces (sched.c, bounce.c). */
    {"retry_factor", CFG_T_INT, offsetof(struct cfg, retry_factor), 1, 10, "2", 0},
    /* 0: no delay warning. */
    {"delay_warning", CFG_T_DURATION, offsetof(struct cfg, delay_warning), 0, 100 * DAY, "0", 0},
    /* NULL: the envelope sender. */
    {"bounce_to", CFG_T_STRING, offsetof(struct cfg, bounce_to), 0, 0, NULL, 0},
    {"bounces", CFG_T_BOOL, offsetof(struct cfg, bounces), 0, 1, "yes", 0},
    {"failed_retention", CFG_T_DURATION, offsetof(struct cfg, failed_retention), MINUTE,
     365 * DAY, "7d", 0},
    {"upstream_probe_interval", CFG_T_DURATION, offsetof(struct cfg, upstream_probe_interval), 1,
     HOUR, "60s", 0},
    /* On stop, a delivery whose final dot was sent waits this long for its reply. */
    {"stop_grace", CFG_T_DURATION, offsetof(struct cfg, stop_grace), 0, 10 * MINUTE, "10s", 0},
    {"max_connections", CFG_T_INT, offsetof(struct cfg, max_connections), 1, 100000, "200", 0},
    {"max_connections_per_client", CFG_T_INT, offsetof(struct cfg, max_connections_per_client), 1,
     100000, "20", 0},
    {"max_memory", CFG_T_SIZE, offsetof(struct cfg, max_memory), MB, 1024 * GB, "256M", 0},
    /* The spool refuses new mail (452 4.3.1) past either limit; 0 turns a limit off. */
    {"spool_max_size", CFG_T_SIZE, offsetof(struct cfg, spool_max_size), 0, 16384 * GB, "0", 0},
    {"spool_reserve", CFG_T_SIZE, offsetof(struct cfg, spool_reserve), 0, 16384 * GB, "100M", 0},
    /* Loses acknowledged mail on a power failure or kernel crash; benchmarks only. */
    {"unsafe_no_fsync", CFG_T_BOOL, offsetof(struct cfg, unsafe_no_fsync), 0, 1, "no", 0},
};

static const struct cfg_key listener_keys[] = {
    /* Required. */
    {"listen", CFG_T_HOSTPORT, offsetof(struct cfg_listener, host), 1, 65535, NULL,
     offsetof(struct cfg_listener, port)},
    /* NULL: CFG_ALLOW_LOOPBACK when listen is loopback, else an error (open relay). */
    {"allow", CFG_T_NETLIST, offsetof(struct cfg_listener, allow), 0, 0, NULL, 0},
    {"tls", CFG_T_TLS, offsetof(struct cfg_listener, tls), 0, 0, "none", 0},
    /* Required when tls is not none. */
    {"cert", CFG_T_FILE, offsetof(struct cfg_listener, cert), 0, 0, NULL, 0},
    {"key", CFG_T_FILE, offsetof(struct cfg_listener, key), 0, 0, NULL, 0},
    {"tls_priority", CFG_T_STRING, offsetof(struct cfg_listener, tls_priority), 0, 0,
     CFG_TLS_PRIORITY, 0},
    {"auth", CFG_T_AUTH, offsetof(struct cfg_listener, auth), 0, 0, "off", 0},
    /* Must exist when auth is optional or required. */
    {"sasldb", CFG_T_STRING, offsetof(struct cfg_listener, sasldb), 0, 0, "/etc/sasldb2", 0},
    {"auth_mechanisms", CFG_T_STRING, offsetof(struct cfg_listener, auth_mechanisms), 0, 0,
     "PLAIN LOGIN CRAM-MD5", 0},
    {"auth_plaintext", CFG_T_BOOL, offsetof(struct cfg_listener, auth_plaintext), 0, 1, "no", 0},
    {"sender_domains", CFG_T_DOMAINS, offsetof(struct cfg_listener, sender_domains), 0, 0, NULL,
     0},
    {"recipient_domains", CFG_T_DOMAINS, offsetof(struct cfg_listener, recipient_domains), 0, 0,
     NULL, 0},
    {"proxy_protocol", CFG_T_PROXY, offsetof(struct cfg_listener, proxy_protocol), 0, 0, "no", 0},
    {"debug_peers", CFG_T_NETLIST, offsetof(struct cfg_listener, debug_peers), 0, 0, NULL, 0},
    {"proxy_trusted", CFG_T_NETLIST, offsetof(struct cfg_listener, proxy_trusted), 0, 0,
     "127.0.0.0/8, ::1", 0},
    {"add_date", CFG_T_BOOL, offsetof(struct cfg_listener, add_date), 0, 1, "yes", 0},
    {"add_message_id", CFG_T_BOOL, offsetof(struct cfg_listener, add_message_id), 0, 1, "yes", 0},
    {"add_from", CFG_T_BOOL, offsetof(struct cfg_listener, add_from), 0, 1, "yes", 0},
    {"add_received", CFG_T_BOOL, offsetof(struct cfg_listener, add_received), 0, 1, "yes", 0},
    {"command_timeout", CFG_T_DURATION, offsetof(struct cfg_listener, command_timeout), 1, HOUR,
     "300s", 0},
    {"data_timeout", CFG_T_DURATION, offsetof(struct cfg_listener, data_timeout), 1, HOUR, "300s",
     0},
    {"max_line_length", CFG_T_INT, offsetof(struct cfg_listener, max_line_length), 512, 65536,
     "2048", 0},
    {"max_errors", CFG_T_INT, offsetof(struct cfg_listener, max_errors), 1, 10000, "20", 0},
};

static const struct cfg_key upstream_keys[] = {
    /* Required. */
    {"host", CFG_T_HOST, offsetof(struct cfg_upstream, host), 0, 0, NULL, 0},
    /* CFG_IMPLICIT_PORT instead when tls = implicit and no port is given. */
    {"port", CFG_T_INT, offsetof(struct cfg_upstream, port), 1, 65535, "587", 0},
    {"tls", CFG_T_TLS, offsetof(struct cfg_upstream, tls), 0, 0, "starttls", 0},
    {"ca_file", CFG_T_FILE, offsetof(struct cfg_upstream, ca_file), 0, 0, NULL, 0},
    {"tls_name", CFG_T_HOST, offsetof(struct cfg_upstream, tls_name), 0, 0, NULL, 0},
    {"tls_priority", CFG_T_STRING, offsetof(struct cfg_upstream, tls_priority), 0, 0,
     CFG_TLS_PRIORITY, 0},
    {"username", CFG_T_STRING, offsetof(struct cfg_upstream, username), 0, 0, NULL, 0},
    {"password_file", CFG_T_SECRET, offsetof(struct cfg_upstream, password_file), 0, 0, NULL,
     offsetof(struct cfg_upstream, password)},
    {"mechanisms", CFG_T_STRING, offsetof(struct cfg_upstream, mechanisms), 0, 0, NULL, 0},
    {"allow_plaintext_auth", CFG_T_BOOL, offsetof(struct cfg_upstream, allow_plaintext_auth), 0, 1,
     "no", 0},
    {"connect_timeout", CFG_T_DURATION, offsetof(struct cfg_upstream, connect_timeout), 1, HOUR,
     "30s", 0},
    {"command_timeout", CFG_T_DURATION, offsetof(struct cfg_upstream, command_timeout), 1, HOUR,
     "300s", 0},
    /* RFC 5321 4.5.3.2.6: the reply to the end of data may take 10 minutes. */
    {"data_timeout", CFG_T_DURATION, offsetof(struct cfg_upstream, data_timeout), 1, HOUR, "600s",
     0},
    {"max_connections", CFG_T_INT, offsetof(struct cfg_upstream, max_connections), 1, 1000, "4",
     0},
    {"idle_timeout", CFG_T_DURATION, offsetof(struct cfg_upstream, idle_timeout), 1, HOUR, "30s",
     0},
    {"reuse", CFG_T_BOOL, offsetof(struct cfg_upstream, reuse), 0, 1, "yes", 0},
    /* Checked in check_upstream(): sha256//BASE64 of the SubjectPublicKeyInfo, ';' between. */
    {"tls_pin", CFG_T_STRING, offsetof(struct cfg_upstream, tls_pin), 0, 0, NULL, 0},
    {"max_messages_per_minute", CFG_T_INT, offsetof(struct cfg_upstream, max_messages_per_minute),
     0, 1000000, "0", 0},
    {"max_recipients_per_day", CFG_T_INT, offsetof(struct cfg_upstream, max_recipients_per_day), 0,
     100000000, "0", 0},
    /* OAuth 2.0 (relayd/oauth2.h).  Enumerations and presets: check_upstream_oauth2(). */
    {"auth", CFG_T_STRING, offsetof(struct cfg_upstream, auth), 0, 0, "password", 0},
    {"provider", CFG_T_STRING, offsetof(struct cfg_upstream, provider), 0, 0, NULL, 0},
    {"tenant", CFG_T_STRING, offsetof(struct cfg_upstream, tenant), 0, 0, NULL, 0},
    {"token_endpoint", CFG_T_STRING, offsetof(struct cfg_upstream, token_endpoint), 0, 0, NULL, 0},
    {"device_endpoint", CFG_T_STRING, offsetof(struct cfg_upstream, device_endpoint), 0, 0, NULL,
     0},
    /* NULL: inferred from the files given (see check_upstream_oauth2()). */
    {"oauth2_grant", CFG_T_STRING, offsetof(struct cfg_upstream, oauth2_grant), 0, 0, NULL, 0},
    {"client_id", CFG_T_STRING, offsetof(struct cfg_upstream, client_id), 0, 0, NULL, 0},
    {"client_secret_file", CFG_T_SECRET, offsetof(struct cfg_upstream, client_secret_file), 0, 0,
     NULL, offsetof(struct cfg_upstream, client_secret)},
    /* Paths only: relayd reads (and rewrites) them at run time; modes checked at load. */
    {"refresh_token_file", CFG_T_STRING, offsetof(struct cfg_upstream, refresh_token_file), 0, 0,
     NULL, 0},
    {"service_account_file", CFG_T_STRING, offsetof(struct cfg_upstream, service_account_file), 0,
     0, NULL, 0},
    {"scope", CFG_T_STRING, offsetof(struct cfg_upstream, scope), 0, 0, NULL, 0},
    {"oauth2_ca_file", CFG_T_FILE, offsetof(struct cfg_upstream, oauth2_ca_file), 0, 0, NULL, 0},
    {"oauth2_token_command", CFG_T_STRING, offsetof(struct cfg_upstream, oauth2_token_command), 0,
     0, NULL, 0},
    {"oauth2_refresh_margin", CFG_T_DURATION, offsetof(struct cfg_upstream, oauth2_refresh_margin),
     0, DAY, "10m", 0},
};

static const struct cfg_key route_keys[] = {
    /* Required; must name an [upstream]. */
    {"upstream", CFG_T_STRING, offsetof(struct cfg_route, upstream_name), 0, 0, NULL, 0},
    {"failover", CFG_T_STRING, offsetof(struct cfg_route, failover_names), 0, 0, NULL, 0},
    {"sender_domain", CFG_T_DOMAINS, offsetof(struct cfg_route, sender_domain), 0, 0, NULL, 0},
    {"recipient_domain", CFG_T_DOMAINS, offsetof(struct cfg_route, recipient_domain), 0, 0, NULL,
     0},
    /* Checked in check_route(): addresses, @domains or domains. */
    {"sender", CFG_T_STRING, offsetof(struct cfg_route, sender), 0, 0, NULL, 0},
    {"client", CFG_T_NETLIST, offsetof(struct cfg_route, client), 0, 0, NULL, 0},
    /* Checked in check_route(): names of [listener] sections. */
    {"listener", CFG_T_STRING, offsetof(struct cfg_route, listener), 0, 0, NULL, 0},
    {"rewrite_sender", CFG_T_STRING, offsetof(struct cfg_route, rewrite_sender), 0, 0, NULL, 0},
    {"rewrite_sender_map", CFG_T_MAP, offsetof(struct cfg_route, rewrite_sender_map_file), 0, 0,
     NULL, offsetof(struct cfg_route, rewrite_sender_map)},
    {"rewrite_from", CFG_T_BOOL, offsetof(struct cfg_route, rewrite_from), 0, 1, "no", 0},
    {"keep_reply_to", CFG_T_BOOL, offsetof(struct cfg_route, keep_reply_to), 0, 1, "yes", 0},
    {"recipient_map", CFG_T_MAP, offsetof(struct cfg_route, recipient_map_file), 0, 0, NULL,
     offsetof(struct cfg_route, recipient_map)},
};

enum cfg_kind { CFG_K_RELAYD, CFG_K_LISTENER, CFG_K_UPSTREAM, CFG_K_ROUTE };

struct cfg_secdef {
    const char *type;
    enum cfg_kind kind;
    const struct cfg_key *keys;
    size_t nkeys;
};


static const struct cfg_secdef secdefs[] = {
    {"relayd", CFG_K_RELAYD, relayd_keys, NELEM(relayd_keys)},
    {"listener", CFG_K_LISTENER, listener_keys, NELEM(listener_keys)},
    {"upstream", CFG_K_UPSTREAM, upstream_keys, NELEM(upstream_keys)},
    {"route", CFG_K_ROUTE, route_keys, NELEM(route_keys)},
};

static const char *const tls_names[] = {
    [CFG_TLS_NONE] = "none",
    [CFG_TLS_STARTTLS] = "starttls",
    [CFG_TLS_IMPLICIT] = "implicit",
};

/* One section as read from the file: where it is and on which line each key was set. */
struct cfg_sec {
    const struct cfg_secdef *def;
    int index; /* into the cfg array of its kind; unused for [relayd] */
    int line;
    int seen[CFG_KEYS_MAX];
};

struct cfg_parse {
    struct cfg *cfg;
    const char *path;
    FILE *fp;
    char *line;
    size_t linecap;
    int lineno;
    struct cfg_sec *secs;
    int nsecs;
    int cur;               /* index into secs, -1 before the first section */
    struct cfg_sec relayd; /* [relayd] is optional: this stands in when it is absent */
    int failed;
    int err_line;
    char *err;
    size_t errlen;
};

static const char *const auth_names[] = {
    [CFG_AUTH_OFF] = "off",
    [CFG_AUTH_OPTIONAL] = "optional",
    [CFG_AUTH_REQUIRED] = "required",
    [CFG_AUTH_ACCEPT_ANY] = "accept-any",
};

static const char *const proxy_names[] = {
    [CFG_PROXY_NO] = "no",
    [CFG_PROXY_V1] = "v1",
    [CFG_PROXY_V2] = "v2",
    [CFG_PROXY_ANY] = "any",
};

const char *cfg_tls_name(enum cfg_tls tls)
{
    if ((unsigned)tls >= NELEM(tls_names))
        return "?";
    return tls_names[tls];
}

const char *cfg_auth_name(enum cfg_auth auth)
{
    if ((unsigned)auth >= NELEM(auth_names))
        return "?";
    return auth_names[auth];
}

const char *cfg_proxy_name(enum cfg_proxy proxy)
{
    if ((unsigned)proxy >= NELEM(proxy_names))
        return "?";
    return proxy_names[proxy];
}

/* ---- helpers ---- */

#define FIELD(obj, off, type) ((type *)(void *)((char *)(obj) + (off)))

static void *sec_obj(struct cfg *cfg, const struct cfg_sec *s)
{
    switch (s->def->kind) {
    case CFG_K_RELAYD:
        return cfg;
    case CFG_K_LISTENER:
        return &cfg->listeners[s->index];
    case CFG_K_UPSTREAM:
        return &cfg->upstreams[s->index];
    case CFG_K_ROUTE:
        return &cfg->routes[s->index];
    }
    log_panic("cfg: bad section kind %d", (int)s->def->kind);
}

static const char *sec_name(struct cfg *cfg, const struct cfg_sec *s)
{
    switch (s->def->kind) {
    case CFG_K_RELAYD:
        return NULL;
    case CFG_K_LISTENER:
        return cfg->listeners[s->index].name;
    case CFG_K_UPSTREAM:
        return cfg->upstreams[s->index].name;
    case CFG_K_ROUTE:
        return cfg->routes[s->index].name;
    }
    return NULL;
}

static const struct cfg_key *key_find(const struct cfg_secdef *def, const char *name, int *idx)
{
    size_t i;

    for (i = 0; i < def->nkeys; i++) {
        if (strcasecmp(def->keys[i].name, name) == 0) {
            *idx = (int)i;
            return &def->keys[i];
        }
    }
    return NULL;
}

static int key_index(const struct cfg_secdef *def, const char *name)
{
    int idx = -1;

    if (key_find(def, name, &idx) == NULL)
        log_panic("cfg: no key %s in [%s]", name, def->type);
    return idx;
}

/*
 * Records the first error only: "FILE:LINE: [type name] key: why".  line 0 leaves the
 * line out (file-wide problems), s NULL the section, key NULL the key.
 */
static void perr(struct cfg_parse *p, int line, const struct cfg_sec *s, const char *key,
                 const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void perr(struct cfg_parse *p, int line, const struct cfg_sec *s, const char *key,
                 const char *fmt, ...)
{
    char why[512], where[64] = "", sect[160] = "", keyp[80] = "";
    const char *name;
    va_list ap;

    if (p->failed)
        return;
    p->failed = 1;
    p->err_line = line;
    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    if (line > 0)
        snprintf(where, sizeof where, ":%d", line);
    if (s != NULL) {
        name = sec_name(p->cfg, s);
        snprintf(sect, sizeof sect, "[%s%s%s] ", s->def->type, name ? " " : "", name ? name : "");
    }
    if (key != NULL)
        snprintf(keyp, sizeof keyp, "%s: ", key);
    snprintf(p->err, p->errlen, "%s%s: %s%s%s", p->path, where, sect, keyp, why);
}

/* The value as written, shortened for messages. */
#define VAL(v) (int)(strlen(v) > 60 ? 60 : strlen(v)), (v)

static void fmt_duration(long secs, char *out, size_t outlen)
{
    if (secs != 0 && secs % DAY == 0)
        snprintf(out, outlen, "%ldd", secs / DAY);
    else if (secs != 0 && secs % HOUR == 0)
        snprintf(out, outlen, "%ldh", secs / HOUR);
    else if (secs != 0 && secs % MINUTE == 0)
        snprintf(out, outlen, "%ldm", secs / MINUTE);
    else
        snprintf(out, outlen, "%lds", secs);
}

static void fmt_size(long bytes, char *out, size_t outlen)
{
    if (bytes != 0 && bytes % GB == 0)
        snprintf(out, outlen, "%ldG", bytes / GB);
    else if (bytes != 0 && bytes % MB == 0)
        snprintf(out, outlen, "%ldM", bytes / MB);
    else if (bytes != 0 && bytes % KB == 0)
        snprintf(out, outlen, "%ldK", bytes / KB);
    else
        snprintf(out, outlen, "%ld", bytes);
}

/*
 * A decimal number with an optional one-letter unit from units/mults.  0, or -1 when the
 * text is not such a number, -ERANGE when it does not fit a long.
 */
static int parse_scaled(const char *v, const char *units, const long *mults, long *out)
{
    char *end;
    long n;
    const char *u;

    if (!isdigit((unsigned char)*v) && *v != '-')
        return -1;
    errno = 0;
    n = strtol(v, &end, 10);
    if (end == v)
        return -1;
    if (errno == ERANGE)
        return -ERANGE;
    if (*end != '\0') {
        if (units == NULL || end[1] != '\0' || (u = strchr(units, *end)) == NULL)
            return -1;
        if (n > LONG_MAX / mults[u - units] || n < LONG_MIN / mults[u - units])
            return -ERANGE;
        n *= mults[u - units];
    }
    *out = n;
    return 0;
}

static int host_ok(const char *v)
{
    const char *c;

    if (strlen(v) > 253)
        return 0;
    for (c = v; *c != '\0'; c++)
        if (!isalnum((unsigned char)*c) && strchr(".-_:", *c) == NULL)
            return 0;
    return 1;
}

/* "0.0.0.0:25", "[::1]:2525", "[::]:25": an IP address (so that we can judge it) and port. */
static int parse_hostport(const char *v, char **host, int *port, char *why, size_t whylen)
{
    char addr[INET6_ADDRSTRLEN + 1];
    unsigned char bin[16];
    const char *colon, *h = v;
    size_t hlen;
    long n;

    if (*v == '[') {
        const char *close = strchr(v, ']');

        if (close == NULL || close[1] != ':')
            goto bad;
        h = v + 1;
        hlen = (size_t)(close - h);
        colon = close + 1;
        if (hlen >= sizeof addr)
            goto bad_addr;
        memcpy(addr, h, hlen);
        addr[hlen] = '\0';
        if (inet_pton(AF_INET6, addr, bin) != 1)
            goto bad_addr;
    } else {
        colon = strrchr(v, ':');
        if (colon == NULL || strchr(v, ':') != colon)
            goto bad;
        hlen = (size_t)(colon - v);
        if (hlen >= sizeof addr)
            goto bad_addr;
        memcpy(addr, v, hlen);
        addr[hlen] = '\0';
        if (inet_pton(AF_INET, addr, bin) != 1)
            goto bad_addr;
    }
    if (parse_scaled(colon + 1, NULL, NULL, &n) != 0 || n < 1 || n > 65535) {
        snprintf(why, whylen, "port %s is not in 1..65535", colon + 1);
        return -1;
    }
    *host = xstrdup(addr);
    *port = (int)n;
    return 0;

bad_addr:
    snprintf(why, whylen,
             "%.*s: not an IP address (a host name cannot be judged for open "
             "relaying; write 0.0.0.0, 127.0.0.1, [::] or [::1])",
             (int)hlen, h);
    return -1;
bad:
    snprintf(why, whylen, "'%.*s' is not ADDRESS:PORT (e.g. 0.0.0.0:25 or [::1]:2525)", VAL(v));
    return -1;
}

/* Reads a password file, refusing one that others could read (see cfg.h). */
int cfg_secret_read(const char *path, size_t max, char **out, char *why, size_t whylen)
{
    char *data;
    struct stat st;
    size_t len = 0;
    ssize_t n;
    int fd, rc = -1;

    *out = NULL;
    if ((fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY)) < 0) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        return -1;
    }
    if (fstat(fd, &st) != 0) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        goto close_fd;
    }
    if (!S_ISREG(st.st_mode)) {
        snprintf(why, whylen, "%s: not a regular file", path);
        goto close_fd;
    }
    if ((st.st_mode & (S_IRGRP | S_IROTH)) != 0) {
        snprintf(why, whylen, "%s: mode %04o is readable by group or others; chmod 600 it", path,
                 (unsigned)(st.st_mode & 07777));
        goto close_fd;
    }
    data = xmalloc(max + 1);
    while (len < max + 1 && (n = read(fd, data + len, max + 1 - len)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            snprintf(why, whylen, "%s: %s", path, strerror(errno));
            goto wipe;
        }
        len += (size_t)n;
    }
    if (len > max) {
        snprintf(why, whylen, "%s: longer than %zu bytes; it should hold just the secret", path,
                 max);
        goto wipe;
    }
    while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r'))
        len--;
    if (len == 0) {
        snprintf(why, whylen, "%s: is empty", path);
        goto wipe;
    }
    *out = xstrndup(data, len);
    rc = 0;
wipe:
    explicit_bzero(data, max + 1);
    free(data);
close_fd:
    close(fd);
    return rc;
}

static int read_secret(const char *path, char **out, char *why, size_t whylen)
{
    return cfg_secret_read(path, CFG_SECRET_MAX, out, why, whylen);
}


/* Releases what a key owns in obj and leaves it unset. */
static void key_clear(const struct cfg_key *k, void *obj)
{
    char **sp;

    switch (k->type) {
    case CFG_T_MAP:
        cfg_map_free(FIELD(obj, k->off2, struct cfg_map));
        sp = FIELD(obj, k->off, char *);
        free(*sp);
        *sp = NULL;
        break;
    case CFG_T_SECRET:
        sp = FIELD(obj, k->off2, char *);
        if (*sp != NULL) {
            explicit_bzero(*sp, strlen(*sp));
            free(*sp);
            *sp = NULL;
        }
        /* The path, like any string: */
        /* fall through */
    case CFG_T_STRING:
    case CFG_T_HOST:
    case CFG_T_DOMAINS:
    case CFG_T_FILE:
    case CFG_T_HOSTPORT:
        sp = FIELD(obj, k->off, char *);
        free(*sp);
        *sp = NULL;
        break;
    case CFG_T_NETLIST:
        netaddr_list_free(FIELD(obj, k->off, struct netaddr_list));
        break;
    case CFG_T_INT:
    case CFG_T_DURATION:
    case CFG_T_BOOL:
    case CFG_T_TLS:
    case CFG_T_AUTH:
    case CFG_T_PROXY:
    case CFG_T_SIZE:
        break;
    }
}

/*
 * Converts v for key k into obj (after releasing any earlier value).  0, or -1 with the
 * reason in why.
 */
static int key_set(const struct cfg_key *k, void *obj, const char *v, char *why, size_t whylen)
{
    static const long size_mult[] = {KB, KB, MB, MB, GB, GB};
    static const long dur_mult[] = {1, MINUTE, HOUR, DAY};
    char lo[32], hi[32];
    long n = 0;
    int rc;
    size_t i;

    if (*v == '\0') {
        snprintf(why, whylen, "empty value");
        return -1;
    }
    key_clear(k, obj);
    switch (k->type) {
    case CFG_T_HOST:
        if (!host_ok(v)) {
            snprintf(why, whylen, "'%.*s' is not a host name or address", VAL(v));
            return -1;
        }
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    case CFG_T_DOMAINS: {
        const char *p = v;

        while (*(p += strspn(p, ", \t")) != '\0') {
            size_t len = strcspn(p, ", \t");
            char dom[256];

            snprintf(dom, sizeof dom, "%.*s", (int)len, p);
            if (len >= sizeof dom || strchr(dom, '@') != NULL || strchr(dom, ':') != NULL ||
                !host_ok(dom)) {
                snprintf(why, whylen, "'%.*s' is not a domain", (int)(len > 60 ? 60 : len), p);
                return -1;
            }
            p += len;
        }
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    }
    case CFG_T_STRING:
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    case CFG_T_FILE: {
        struct stat st;

        if (stat(v, &st) != 0 || access(v, R_OK) != 0) {
            snprintf(why, whylen, "%.*s: %s", VAL(v), strerror(errno));
            return -1;
        }
        if (!S_ISREG(st.st_mode)) {
            snprintf(why, whylen, "%.*s: not a regular file", VAL(v));
            return -1;
        }
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    }
    case CFG_T_SECRET:
        if (read_secret(v, FIELD(obj, k->off2, char *), why, whylen) != 0)
            return -1;
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    case CFG_T_MAP:
        if (cfg_map_load(v, FIELD(obj, k->off2, struct cfg_map), why, whylen) != 0)
            return -1;
        *FIELD(obj, k->off, char *) = xstrdup(v);
        return 0;
    case CFG_T_INT:
        rc = parse_scaled(v, NULL, NULL, &n);
        if (rc == -1) {
            snprintf(why, whylen, "'%.*s' is not a number", VAL(v));
            return -1;
        }
        if (rc != 0 || n < k->min || n > k->max) {
            snprintf(why, whylen, "%.*s is not in %ld..%ld", VAL(v), k->min, k->max);
            return -1;
        }
        *FIELD(obj, k->off, int) = (int)n;
        return 0;
    case CFG_T_SIZE:
        rc = parse_scaled(v, "kKmMgG", size_mult, &n);
        if (rc == -1) {
            snprintf(why, whylen, "'%.*s' is not a size (bytes, or with K, M or G)", VAL(v));
            return -1;
        }
        if (rc != 0 || n < k->min || n > k->max) {
            fmt_size(k->min, lo, sizeof lo);
            fmt_size(k->max, hi, sizeof hi);
            snprintf(why, whylen, "%.*s is not in %s..%s", VAL(v), lo, hi);
            return -1;
        }
        *FIELD(obj, k->off, long) = n;
        return 0;
    case CFG_T_DURATION:
        rc = parse_scaled(v, "smhd", dur_mult, &n);
        if (rc == -1) {
            snprintf(why, whylen, "'%.*s' is not a duration (seconds, or with s, m, h or d)",
                     VAL(v));
            return -1;
        }
        if (rc != 0 || n < k->min || n > k->max) {
            fmt_duration(k->min, lo, sizeof lo);
            fmt_duration(k->max, hi, sizeof hi);
            snprintf(why, whylen, "%.*s is not in %s..%s", VAL(v), lo, hi);
            return -1;
        }
        *FIELD(obj, k->off, int) = (int)n;
        return 0;
    case CFG_T_BOOL: {
        static const char *const yes[] = {"yes", "true", "on", "1"};
        static const char *const no[] = {"no", "false", "off", "0"};

        for (i = 0; i < NELEM(yes); i++) {
            if (strcasecmp(v, yes[i]) == 0 || strcasecmp(v, no[i]) == 0) {
                *FIELD(obj, k->off, int) = strcasecmp(v, yes[i]) == 0;
                return 0;
            }
        }
        snprintf(why, whylen, "'%.*s' is not yes/no, true/false, on/off or 1/0", VAL(v));
        return -1;
    }
    case CFG_T_TLS:
        for (i = 0; i < NELEM(tls_names); i++) {
            if (strcasecmp(v, tls_names[i]) == 0) {
                *FIELD(obj, k->off, enum cfg_tls) = (enum cfg_tls)i;
                return 0;
            }
        }
        snprintf(why, whylen, "'%.*s' is not one of starttls, implicit, none", VAL(v));
        return -1;
    case CFG_T_AUTH:
        for (i = 0; i < NELEM(auth_names); i++) {
            if (strcasecmp(v, auth_names[i]) == 0) {
                *FIELD(obj, k->off, enum cfg_auth) = (enum cfg_auth)i;
                return 0;
            }
        }
        snprintf(why, whylen, "'%.*s' is not one of off, optional, required, accept-any", VAL(v));
        return -1;
    case CFG_T_PROXY:
        for (i = 0; i < NELEM(proxy_names); i++) {
            if (strcasecmp(v, proxy_names[i]) == 0) {
                *FIELD(obj, k->off, enum cfg_proxy) = (enum cfg_proxy)i;
                return 0;
            }
        }
        snprintf(why, whylen, "'%.*s' is not one of no, v1, v2, any", VAL(v));
        return -1;
    case CFG_T_NETLIST:
        if (netaddr_list_parse(v, FIELD(obj, k->off, struct netaddr_list), why, whylen) != 0)
            return -1;
        return 0;
    case CFG_T_HOSTPORT:
        return parse_hostport(v, FIELD(obj, k->off, char *), FIELD(obj, k->off2, int), why, whylen);
    }
    log_panic("cfg: bad key type %d", (int)k->type);
}

/* Applies the table defaults of a section; a bad default is a bug in the table. */
static void keys_default(const struct cfg_secdef *def, void *obj)
{
    char why[256];
    size_t i;

    for (i = 0; i < def->nkeys; i++) {
        if (def->keys[i].dflt != NULL &&
            key_set(&def->keys[i], obj, def->keys[i].dflt, why, sizeof why) != 0)
            log_panic("cfg: default of [%s] %s: %s", def->type, def->keys[i].name, why);
    }
}

static void keys_free(const struct cfg_secdef *def, void *obj)
{
    size_t i;

    for (i = 0; i < def->nkeys; i++)
        key_clear(&def->keys[i], obj);
}

/* ---- sections ---- */

static int name_ok(const char *name)
{
    const char *c;

    for (c = name; *c != '\0'; c++)
        if (!isalnum((unsigned char)*c) && strchr("._-", *c) == NULL)
            return 0;
    return *name != '\0';
}

static const struct cfg_sec *sec_find(struct cfg_parse *p, const struct cfg_secdef *def,
                                      const char *name)
{
    const char *other;
    int i;

    for (i = 0; i < p->nsecs; i++) {
        if (p->secs[i].def != def)
            continue;
        other = sec_name(p->cfg, &p->secs[i]);
        if (def->kind == CFG_K_RELAYD || strcmp(other, name) == 0)
            return &p->secs[i];
    }
    return NULL;
}

/* A new, defaulted object for [type name]; returns its index in the cfg array. */
static int obj_new(struct cfg *cfg, enum cfg_kind kind, const char *name, int line)
{
    switch (kind) {
    case CFG_K_LISTENER: {
        struct cfg_listener *l;

        cfg->listeners = xrealloc(cfg->listeners, (size_t)(cfg->nlisteners + 1) * sizeof *l);
        l = &cfg->listeners[cfg->nlisteners];
        memset(l, 0, sizeof *l);
        l->name = xstrdup(name);
        l->line = line;
        keys_default(&secdefs[CFG_K_LISTENER], l);
        return cfg->nlisteners++;
    }
    case CFG_K_UPSTREAM: {
        struct cfg_upstream *u;

        cfg->upstreams = xrealloc(cfg->upstreams, (size_t)(cfg->nupstreams + 1) * sizeof *u);
        u = &cfg->upstreams[cfg->nupstreams];
        memset(u, 0, sizeof *u);
        u->name = xstrdup(name);
        u->line = line;
        keys_default(&secdefs[CFG_K_UPSTREAM], u);
        return cfg->nupstreams++;
    }
    case CFG_K_ROUTE: {
        struct cfg_route *r;

        cfg->routes = xrealloc(cfg->routes, (size_t)(cfg->nroutes + 1) * sizeof *r);
        r = &cfg->routes[cfg->nroutes];
        memset(r, 0, sizeof *r);
        r->name = xstrdup(name);
        r->line = line;
        keys_default(&secdefs[CFG_K_ROUTE], r);
        return cfg->nroutes++;
    }
    case CFG_K_RELAYD:
        break;
    }
    return -1;
}

/*
 * Handles a "[type name]" line; text is what lies between the brackets.  Sections are
 * looked at here rather than in the inih handler so that empty and repeated sections are
 * seen too.
 */
static void sec_begin(struct cfg_parse *p, const char *text, size_t len)
{
    char buf[256], orig[256], *type, *name, *end;
    const struct cfg_secdef *def = NULL;
    const struct cfg_sec *dup;
    struct cfg_sec *s;
    size_t i;

    p->cur = -1;
    if (len >= sizeof buf) {
        perr(p, p->lineno, NULL, NULL, "section header is too long");
        return;
    }
    memcpy(buf, text, len);
    buf[len] = '\0';
    memcpy(orig, buf, len + 1); /* as written, for messages */
    type = buf + strspn(buf, " \t");
    end = type + strcspn(type, " \t");
    name = end + strspn(end, " \t");
    *end = '\0';
    for (end = name + strlen(name); end > name && isspace((unsigned char)end[-1]); end--)
        end[-1] = '\0';

    for (i = 0; i < NELEM(secdefs); i++)
        if (strcasecmp(type, secdefs[i].type) == 0)
            def = &secdefs[i];
    if (def == NULL) {
        perr(p, p->lineno, NULL, NULL,
             "[%s] unknown section type '%s' (expected relayd, "
             "listener NAME, upstream NAME or route NAME)",
             orig, type);
        return;
    }
    if (def->kind == CFG_K_RELAYD && *name != '\0') {
        perr(p, p->lineno, NULL, NULL, "[%s] takes no name: write [relayd]", orig);
        return;
    }
    if (def->kind != CFG_K_RELAYD && !name_ok(name)) {
        perr(p, p->lineno, NULL, NULL,
             *name == '\0'
                 ? "[%s] needs a name: [%s NAME]"
                 : "[%s] the name may contain only letters, digits, '.', '_' and '-' (%s NAME)",
             orig, def->type);
        return;
    }
    if ((dup = sec_find(p, def, name)) != NULL) {
        perr(p, p->lineno, dup, NULL, "duplicate section (first on line %d)", dup->line);
        return;
    }

    p->secs = xrealloc(p->secs, (size_t)(p->nsecs + 1) * sizeof *p->secs);
    s = &p->secs[p->nsecs];
    memset(s, 0, sizeof *s);
    s->def = def;
    s->line = p->lineno;
    s->index = obj_new(p->cfg, def->kind, name, p->lineno);
    p->cur = p->nsecs++;
}

/*
 * inih's line reader.  One call = one physical line, so p->lineno is the line inih is
 * about to parse.  Stops the parse after the first error (returns NULL).
 */
static char *cfg_reader(char *str, int num, void *stream)
{
    struct cfg_parse *p = stream;
    const char *t, *close;
    ssize_t n;

    if (p->failed || (n = getline(&p->line, &p->linecap, p->fp)) < 0)
        return NULL;
    p->lineno++;
    /* inih needs room for CR, LF and NUL; longer lines would be split into two lines. */
    if ((size_t)n + 1 > (size_t)num || memchr(p->line, '\0', (size_t)n) != NULL) {
        perr(p, p->lineno, NULL, NULL,
             (size_t)n + 1 > (size_t)num ? "line is longer than %d characters"
                                         : "line contains a NUL byte",
             num - 3);
        return NULL;
    }
    memcpy(str, p->line, (size_t)n + 1);

    t = p->line;
    if (p->lineno == 1 && memcmp(t, "\xEF\xBB\xBF", 3) == 0)
        t += 3;
    t += strspn(t, " \t\r\n");
    if (*t == '[') {
        /* Same rule as inih: a ';' after whitespace starts a comment, even before ']'. */
        for (close = t + 1; *close != '\0' && *close != ']'; close++)
            if (*close == ';' && isspace((unsigned char)close[-1]))
                break;
        if (*close == ']')
            sec_begin(p, t + 1, (size_t)(close - t - 1));
    }
    return str;
}

static int cfg_handler(void *user, const char *section, const char *name, const char *value)
{
    struct cfg_parse *p = user;
    const struct cfg_key *k;
    struct cfg_sec *s;
    char why[512];
    int idx;

    (void)section; /* the reader keeps track of sections, see sec_begin() */
    if (p->failed)
        return 0;
    if (p->cur < 0) {
        perr(p, p->lineno, NULL, name,
             "outside any section (start with [relayd], [listener "
             "NAME], [upstream NAME] or [route NAME])");
        return 0;
    }
    s = &p->secs[p->cur];
    if ((k = key_find(s->def, name, &idx)) == NULL) {
        perr(p, p->lineno, s, name, "unknown key");
        return 0;
    }
    if (s->seen[idx] != 0) {
        perr(p, p->lineno, s, k->name, "set twice (first on line %d)", s->seen[idx]);
        return 0;
    }
    s->seen[idx] = p->lineno;
    if (key_set(k, sec_obj(p->cfg, s), value, why, sizeof why) != 0) {
        perr(p, p->lineno, s, k->name, "%s", why);
        return 0;
    }
    return 1;
}

/* ---- rules across keys ---- */

/* The line a key was set on, or else the section's line. */
static int key_line(const struct cfg_sec *s, const char *key)
{
    int line = s->seen[key_index(s->def, key)];

    return line != 0 ? line : s->line;
}

static void check_relayd(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg *cfg = p->cfg;
    char a[32], b[32];

    if (cfg->retry_max < cfg->retry_first) {
        fmt_duration(cfg->retry_max, a, sizeof a);
        fmt_duration(cfg->retry_first, b, sizeof b);
        perr(p, key_line(s, "retry_max"), s, "retry_max", "%s is less than retry_first (%s)", a, b);
    }
    if (cfg->bounce_to != NULL) {
        const char *at = strrchr(cfg->bounce_to, '@');
        const char *c;

        for (c = cfg->bounce_to; *c != '\0' && (unsigned char)*c > ' ' && *c != '<' && *c != '>' &&
                                 *c != ',' && *c != 0x7f;
             c++)
            ;
        if (*c != '\0' || at == NULL || at == cfg->bounce_to || at[1] == '\0')
            perr(p, key_line(s, "bounce_to"), s, "bounce_to",
                 "'%.60s' is not a mail address (user@domain, no brackets)", cfg->bounce_to);
    }
}

/* TLS files, the sasldb, and no cleartext passwords by accident.  0 or -1 (reported). */
/* 1 when the list names PLAIN or LOGIN (mechanisms that send the password as it is). */
static int cfg_mechs_have_plaintext(const char *mechs)
{
    const char *p = mechs != NULL ? mechs : "PLAIN LOGIN";

    while (*p != '\0') {
        size_t n;

        p += strspn(p, ", \t");
        n = strcspn(p, ", \t");
        if (n == 5 && (strncasecmp(p, "PLAIN", 5) == 0 || strncasecmp(p, "LOGIN", 5) == 0))
            return 1;
        p += n;
    }
    return 0;
}

static int check_listener_tls_auth(struct cfg_parse *p, const struct cfg_sec *s,
                                   const struct cfg_listener *l)
{
    struct stat st;

    if (l->tls != CFG_TLS_NONE && (l->cert == NULL || l->key == NULL)) {
        perr(p, key_line(s, "tls"), s, l->cert == NULL ? "cert" : "key",
             "required with tls = %s (PEM file)", cfg_tls_name(l->tls));
        return -1;
    }
    if ((l->auth == CFG_AUTH_OPTIONAL || l->auth == CFG_AUTH_REQUIRED) &&
        (stat(l->sasldb, &st) != 0 || access(l->sasldb, R_OK) != 0)) {
        perr(p, key_line(s, "sasldb"), s, "sasldb",
             "%.*s: %s (create accounts with: saslpasswd2 -c -f %.*s -u DOMAIN USER)",
             VAL(l->sasldb), strerror(errno), VAL(l->sasldb));
        return -1;
    }
    /* CRAM-MD5 (and the like) never send the password itself: a fax machine that offers
     * only that may log in without TLS; PLAIN and LOGIN may not, unless said so. */
    if (l->tls == CFG_TLS_NONE && l->auth != CFG_AUTH_OFF && !l->auth_plaintext &&
        cfg_mechs_have_plaintext(l->auth_mechanisms)) {
        perr(p, key_line(s, "auth"), s, "auth",
             "%s on a listener with tls = none would have clients send passwords in "
             "cleartext; set tls = starttls or implicit (with cert and key), or auth_plaintext "
             "= yes for devices that cannot do TLS",
             cfg_auth_name(l->auth));
        return -1;
    }
    return 0;
}

static void check_listener(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_listener *l = &p->cfg->listeners[s->index];
    struct sockaddr_storage ss;
    char why[256];
    int i;

    if (l->host == NULL) {
        perr(p, s->line, s, "listen", "required (e.g. listen = 127.0.0.1:25)");
        return;
    }
    for (i = 0; i < s->index; i++) {
        const struct cfg_listener *o = &p->cfg->listeners[i];

        if (strcmp(o->host, l->host) == 0 && o->port == l->port) {
            perr(p, key_line(s, "listen"), s, "listen", "same address as [listener %s]", o->name);
            return;
        }
    }
    if (check_listener_tls_auth(p, s, l) != 0)
        return;
    if (l->allow.n > 0)
        return;

    memset(&ss, 0, sizeof ss);
    if (strchr(l->host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

        sin6->sin6_family = AF_INET6;
        inet_pton(AF_INET6, l->host, &sin6->sin6_addr);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

        sin->sin_family = AF_INET;
        inet_pton(AF_INET, l->host, &sin->sin_addr);
    }
    /* Only a loopback listener may go without an allow list: anything else could be an
     * open relay the moment the host gets a public address or a port forward. */
    {
        struct netaddr_list lo;

        if (netaddr_list_parse(CFG_ALLOW_LOOPBACK, &lo, why, sizeof why) != 0)
            log_panic("cfg: %s: %s", CFG_ALLOW_LOOPBACK, why);
        if (netaddr_list_match(&lo, (struct sockaddr *)&ss)) {
            l->allow = lo;
            return;
        }
        netaddr_list_free(&lo);
    }
    perr(p, key_line(s, "listen"), s, "allow",
         "%s %s with no allow list: this would be an open "
         "relay; add allow = <your client networks>",
         l->host,
         netaddr_is_private_or_loopback((struct sockaddr *)&ss) ? "binds a non-loopback address"
                                                                : "binds a public address");
}

/* tls_pin: "sha256//BASE64" (curl's --pinnedpubkey; "sha256/" accepted too) of a 32-byte
 * SHA-256, several separated by ';', ',' or spaces.  0, or -1 with the reason in why. */
static int pin_list_ok(const char *list, char *why, size_t whylen)
{
    const char *q = list;
    int n = 0;

    while (*q != '\0') {
        size_t len, i;
        const char *b;

        q += strspn(q, ";, \t");
        if (*q == '\0')
            break;
        len = strcspn(q, ";, \t");
        if (len < 7 || strncasecmp(q, "sha256/", 7) != 0) {
            snprintf(why, whylen, "\"%.*s\" must start with sha256// (sha256//BASE64 of the "
                     "certificate's public key)", (int)(len > 60 ? 60 : len), q);
            return -1;
        }
        b = q + 7 + (len > 7 && q[7] == '/');
        i = len - (size_t)(b - q);
        /* 32 bytes are 44 base64 characters, the last one '='. */
        if (i != 44 || b[43] != '=' || strspn(b, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                                 "0123456789+/") != 43) {
            snprintf(why, whylen, "\"%.*s\" is not a base64 SHA-256 (44 characters ending in =)",
                     (int)(len > 60 ? 60 : len), q);
            return -1;
        }
        q += len;
        n++;
    }
    if (n == 0) {
        snprintf(why, whylen, "no pin given");
        return -1;
    }
    return 0;
}

/* Provider presets for [upstream] provider (README "OAuth 2.0"). */
#define CFG_MS_LOGIN "https://login.microsoftonline.com/"
#define CFG_MS_SCOPE_APP "https://outlook.office365.com/.default"
#define CFG_MS_SCOPE_DELEGATED "https://outlook.office.com/SMTP.Send offline_access"
#define CFG_GOOGLE_TOKEN "https://oauth2.googleapis.com/token"
#define CFG_GOOGLE_DEVICE "https://oauth2.googleapis.com/device/code"
#define CFG_GOOGLE_SCOPE "https://mail.google.com/"
/* A Google service account key holds a 2048-bit PEM key and a few names: ~2.4 kB. */
#define CFG_SA_MAX (64 * 1024)
/* Microsoft's refresh tokens run to a few kB. */
#define CFG_RT_MAX (64 * 1024)

/* Fails the load when path exists and others could read it (or it is no regular file);
 * a missing file is fine when may_be_missing (relayctl oauth2 authorize creates it). */
static int oauth2_file_ok(struct cfg_parse *p, const struct cfg_sec *s, const char *key,
                          const char *path, size_t max, int may_be_missing)
{
    char why[300], *data = NULL;

    if (may_be_missing && access(path, F_OK) != 0 && errno == ENOENT)
        return 0;
    if (cfg_secret_read(path, max, &data, why, sizeof why) != 0) {
        perr(p, key_line(s, key), s, key, "%s", why);
        return -1;
    }
    explicit_bzero(data, strlen(data));
    free(data);
    return 0;
}

static int https_url_ok(struct cfg_parse *p, const struct cfg_sec *s, const char *key,
                        const char *v)
{
    if (v != NULL && (strncasecmp(v, "https://", 8) != 0 || strpbrk(v, " \t\r\n") != NULL)) {
        perr(p, key_line(s, key), s, key, "'%.*s' is not an https:// URL", VAL(v));
        return -1;
    }
    return 0;
}

/* auth = xoauth2 | oauthbearer: the token source must be complete and its secrets private.
 * Presets of provider fill token_endpoint, device_endpoint and scope when not given. */
static void check_upstream_oauth2(struct cfg_parse *p, const struct cfg_sec *s)
{
    static const char *const grants[] = {
        [CFG_GRANT_CLIENT_CREDENTIALS] = "client_credentials",
        [CFG_GRANT_REFRESH_TOKEN] = "refresh_token",
        [CFG_GRANT_JWT_BEARER] = "jwt_bearer",
    };
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];
    int ms, google;
    size_t i;

    if (strcasecmp(u->auth, "xoauth2") == 0)
        u->upauth = CFG_UPAUTH_XOAUTH2;
    else if (strcasecmp(u->auth, "oauthbearer") == 0)
        u->upauth = CFG_UPAUTH_OAUTHBEARER;
    else if (strcasecmp(u->auth, "password") == 0) {
        perr(p, key_line(s, "auth"), s, "auth",
             "OAuth 2.0 keys are set but auth = password; set auth = xoauth2 or oauthbearer");
        return;
    } else {
        perr(p, key_line(s, "auth"), s, "auth", "'%.*s' is not one of password, xoauth2, "
             "oauthbearer", VAL(u->auth));
        return;
    }
    if (u->username == NULL) {
        perr(p, s->line, s, "username", "required with auth = %s (the mailbox to send as)",
             u->auth);
        return;
    }
    if (u->password_file != NULL) {
        perr(p, key_line(s, "password_file"), s, "password_file",
             "not used with auth = %s: remove it (there is no password fallback)", u->auth);
        return;
    }
    if (u->tls == CFG_TLS_NONE && !u->allow_plaintext_auth) {
        perr(p, key_line(s, "tls"), s, "tls", "none with auth = %s would send the token in "
             "cleartext; use starttls or implicit", u->auth);
        return;
    }
    ms = u->provider != NULL && strcasecmp(u->provider, "microsoft") == 0;
    google = u->provider != NULL && strcasecmp(u->provider, "google") == 0;
    if (u->provider != NULL && !ms && !google) {
        perr(p, key_line(s, "provider"), s, "provider", "'%.*s' is not one of microsoft, google",
             VAL(u->provider));
        return;
    }
    if (u->oauth2_token_command != NULL) {
        if (u->oauth2_grant != NULL || u->client_id != NULL || u->refresh_token_file != NULL ||
            u->client_secret_file != NULL || u->service_account_file != NULL) {
            perr(p, key_line(s, "oauth2_token_command"), s, "oauth2_token_command",
                 "the command is the token source: remove oauth2_grant, client_id and the "
                 "secrets files");
            return;
        }
        u->grant = CFG_GRANT_COMMAND;
        return;
    }
    if (u->oauth2_grant == NULL) {
        u->grant = u->service_account_file != NULL ? CFG_GRANT_JWT_BEARER
                   : u->refresh_token_file != NULL ? CFG_GRANT_REFRESH_TOKEN
                                                   : CFG_GRANT_CLIENT_CREDENTIALS;
        u->oauth2_grant = xstrdup(grants[u->grant]);
    } else {
        for (i = 1; i < NELEM(grants); i++)
            if (strcasecmp(u->oauth2_grant, grants[i]) == 0)
                u->grant = (enum cfg_grant)i;
        if (u->grant == CFG_GRANT_NONE) {
            perr(p, key_line(s, "oauth2_grant"), s, "oauth2_grant",
                 "'%.*s' is not one of client_credentials, refresh_token, jwt_bearer",
                 VAL(u->oauth2_grant));
            return;
        }
    }
    if (ms && u->tenant == NULL) {
        perr(p, s->line, s, "tenant",
             "required with provider = microsoft (your tenant id or domain, e.g. contoso.com)");
        return;
    }
    if (ms && u->token_endpoint == NULL)
        u->token_endpoint = xasprintf(CFG_MS_LOGIN "%s/oauth2/v2.0/token", u->tenant);
    if (ms && u->device_endpoint == NULL)
        u->device_endpoint = xasprintf(CFG_MS_LOGIN "%s/oauth2/v2.0/devicecode", u->tenant);
    if (ms && u->scope == NULL)
        u->scope = xstrdup(u->grant == CFG_GRANT_CLIENT_CREDENTIALS ? CFG_MS_SCOPE_APP
                                                                    : CFG_MS_SCOPE_DELEGATED);
    if (google && u->token_endpoint == NULL)
        u->token_endpoint = xstrdup(CFG_GOOGLE_TOKEN);
    if (google && u->device_endpoint == NULL)
        u->device_endpoint = xstrdup(CFG_GOOGLE_DEVICE);
    if (google && u->scope == NULL)
        u->scope = xstrdup(CFG_GOOGLE_SCOPE);
    if (https_url_ok(p, s, "token_endpoint", u->token_endpoint) != 0 ||
        https_url_ok(p, s, "device_endpoint", u->device_endpoint) != 0)
        return;
    switch (u->grant) {
    case CFG_GRANT_JWT_BEARER:
        if (u->service_account_file == NULL) {
            perr(p, s->line, s, "service_account_file", "required with oauth2_grant = jwt_bearer");
            return;
        }
        if (u->scope == NULL)
            u->scope = xstrdup(CFG_GOOGLE_SCOPE);
        oauth2_file_ok(p, s, "service_account_file", u->service_account_file, CFG_SA_MAX, 0);
        return; /* token_endpoint may come from the key's token_uri */
    case CFG_GRANT_REFRESH_TOKEN:
        if (u->refresh_token_file == NULL) {
            perr(p, s->line, s, "refresh_token_file", "required with oauth2_grant = refresh_token "
                 "(relayctl oauth2 authorize %s creates it)", u->name);
            return;
        }
        if (oauth2_file_ok(p, s, "refresh_token_file", u->refresh_token_file, CFG_RT_MAX, 1) != 0)
            return;
        break;
    case CFG_GRANT_CLIENT_CREDENTIALS:
        if (u->client_secret_file == NULL) {
            perr(p, s->line, s, "client_secret_file", "required with oauth2_grant = "
                 "client_credentials");
            return;
        }
        break;
    case CFG_GRANT_NONE:
    case CFG_GRANT_COMMAND:
        break;
    }
    if (u->client_id == NULL) {
        perr(p, s->line, s, "client_id", "required with oauth2_grant = %s", u->oauth2_grant);
        return;
    }
    if (u->token_endpoint == NULL) {
        perr(p, s->line, s, "token_endpoint", "required (or provider = microsoft | google)");
        return;
    }
}

static void check_upstream(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];
    char why[160];

    if (u->host == NULL) {
        perr(p, s->line, s, "host", "required (e.g. host = smtp.example.com)");
        return;
    }
    if (u->tls_pin != NULL && pin_list_ok(u->tls_pin, why, sizeof why) != 0) {
        perr(p, key_line(s, "tls_pin"), s, "tls_pin", "%s", why);
        return;
    }
    if (u->tls_pin != NULL && u->tls == CFG_TLS_NONE) {
        perr(p, key_line(s, "tls_pin"), s, "tls_pin", "needs tls = starttls or implicit");
        return;
    }
    if (u->tls == CFG_TLS_IMPLICIT && s->seen[key_index(s->def, "port")] == 0)
        u->port = CFG_IMPLICIT_PORT;
    if (strcmp(u->auth, "password") != 0 || u->oauth2_grant != NULL || u->token_endpoint != NULL ||
        u->provider != NULL || u->oauth2_token_command != NULL) {
        check_upstream_oauth2(p, s);
        return;
    }
    if (u->username != NULL && u->password_file == NULL) {
        perr(p, key_line(s, "username"), s, "password_file", "required when username is set");
        return;
    }
    if (u->username == NULL && u->password_file != NULL) {
        perr(p, key_line(s, "password_file"), s, "username", "required when password_file is set");
        return;
    }
    if (u->tls == CFG_TLS_NONE && u->username != NULL && !u->allow_plaintext_auth) {
        perr(p, key_line(s, "tls"), s, "tls",
             "none with username set would send the password "
             "in cleartext; use starttls or implicit (or allow_plaintext_auth = yes)");
        return;
    }
}

/* sender: "user@domain", "@domain" or "domain" entries; listener: [listener] names. */
static void route_check_matchers(struct cfg_parse *p, const struct cfg_sec *s,
                                 const struct cfg_route *r)
{
    const char *v, *at;
    size_t len;
    int i, found;

    for (v = r->sender; v != NULL && *(v += strspn(v, ", \t")) != '\0'; v += len) {
        char a[321];

        len = strcspn(v, ", \t");
        snprintf(a, sizeof a, "%.*s", (int)len, v);
        at = strrchr(a, '@');
        if (len >= sizeof a || (at != NULL && !host_ok(at + 1)) || (at == NULL && !host_ok(a)) ||
            (at != NULL && at[1] == '\0') || strchr(a, ':') != NULL ||
            strpbrk(a, "<>\"") != NULL) {
            perr(p, key_line(s, "sender"), s, "sender",
                 "'%.*s' is not an address, @domain or domain", (int)(len > 60 ? 60 : len), v);
            return;
        }
    }
    for (v = r->listener; v != NULL && *(v += strspn(v, ", \t")) != '\0'; v += len) {
        len = strcspn(v, ", \t");
        for (i = 0, found = 0; i < p->cfg->nlisteners && !found; i++)
            found = strlen(p->cfg->listeners[i].name) == len &&
                    strncmp(p->cfg->listeners[i].name, v, len) == 0;
        if (!found) {
            perr(p, key_line(s, "listener"), s, "listener", "no [listener %.*s] section",
                 (int)(len > 60 ? 60 : len), v);
            return;
        }
    }
}

static void route_check_rewrite(struct cfg_parse *p, const struct cfg_sec *s,
                                const struct cfg_route *r)
{
    const char *v = r->rewrite_sender, *at;

    if (v != NULL) {
        at = strrchr(v, '@');
        if (at == NULL || at == v || !host_ok(at + 1) || at[1] == '\0' ||
            strpbrk(v, " \t<>,;\"") != NULL) {
            perr(p, key_line(s, "rewrite_sender"), s, "rewrite_sender",
                 "'%.*s' is not an address (e.g. scanner@corp.example)", VAL(v));
            return;
        }
    }
    if (r->rewrite_from && r->rewrite_sender == NULL && r->rewrite_sender_map_file == NULL)
        perr(p, key_line(s, "rewrite_from"), s, "rewrite_from",
             "yes needs rewrite_sender or rewrite_sender_map (the address to put in From:)");
}

static void check_route(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_route *r = &p->cfg->routes[s->index];
    int i;

    if (r->upstream_name == NULL) {
        perr(p, s->line, s, "upstream", "required (the name of an [upstream NAME] section)");
        return;
    }
    for (i = 0; i < p->cfg->nupstreams && r->upstream == NULL; i++)
        if (strcmp(p->cfg->upstreams[i].name, r->upstream_name) == 0)
            r->upstream = &p->cfg->upstreams[i];
    if (r->upstream == NULL) {
        perr(p, key_line(s, "upstream"), s, "upstream", "no [upstream %s] section",
             r->upstream_name);
        return;
    }
    if (r->failover_names != NULL) {
        char *names = xstrdup(r->failover_names), *save = NULL, *name;
        for (name = strtok_r(names, ", \t", &save); name != NULL;
             name = strtok_r(NULL, ", \t", &save)) {
            struct cfg_upstream *up = NULL;
            for (i = 0; i < p->cfg->nupstreams && up == NULL; i++)
                if (strcmp(p->cfg->upstreams[i].name, name) == 0)
                    up = &p->cfg->upstreams[i];
            if (up == NULL) {
                perr(p, key_line(s, "failover"), s, "failover", "no [upstream %s] section", name);
                break;
            }
            r->failover = xrealloc(r->failover, (size_t)(r->nfailover + 1) * sizeof(*r->failover));
            r->failover[r->nfailover++] = up;
        }
        free(names);
    }
    if (p->failed)
        return;
    route_check_matchers(p, s, r);
    if (!p->failed)
        route_check_rewrite(p, s, r);
    if (p->failed)
        return;
    if (strcmp(r->name, "default") == 0) {
        if (r->sender_domain != NULL || r->recipient_domain != NULL)
            perr(p, key_line(s, r->sender_domain ? "sender_domain" : "recipient_domain"), s,
                 r->sender_domain ? "sender_domain" : "recipient_domain",
                 "the default route matches everything; put domains in another route");
        else if (r->sender != NULL || r->client.n > 0 || r->listener != NULL) {
            const char *k = r->sender ? "sender" : r->client.n > 0 ? "client" : "listener";

            perr(p, key_line(s, k), s, k,
                 "the default route matches everything; put matchers in another route");
        }
    } else if (r->sender_domain == NULL && r->recipient_domain == NULL && r->sender == NULL &&
               r->client.n == 0 && r->listener == NULL) {
        perr(p, s->line, s, NULL,
             "matches nothing: set sender_domain or recipient_domain, or "
             "name it [route default]");
    }
}

static void check_all(struct cfg_parse *p)
{
    const struct cfg_sec *relayd = sec_find(p, &secdefs[CFG_K_RELAYD], NULL);
    char host[256];
    int i;

    if (p->cfg->hostname == NULL) {
        if (gethostname(host, sizeof host) != 0 || host[0] == '\0')
            snprintf(host, sizeof host, "localhost");
        host[sizeof host - 1] = '\0';
        p->cfg->hostname = xstrdup(host);
    }
    check_relayd(p, relayd != NULL ? relayd : &p->relayd);
    for (i = 0; i < p->nsecs && !p->failed; i++) {
        switch (p->secs[i].def->kind) {
        case CFG_K_LISTENER:
            check_listener(p, &p->secs[i]);
            break;
        case CFG_K_UPSTREAM:
            check_upstream(p, &p->secs[i]);
            break;
        case CFG_K_ROUTE:
            check_route(p, &p->secs[i]);
            break;
        case CFG_K_RELAYD:
            break;
        }
    }
    if (!p->failed && p->cfg->nlisteners == 0)
        perr(p, 0, NULL, NULL, "no [listener NAME] section: relayd would accept no mail");
}

/* ---- public ---- */

void cfg_default(struct cfg *cfg, const char *spool_dir)
{
    struct cfg_parse p;
    struct cfg_listener *l;
    char why[256];
    int i;

    memset(cfg, 0, sizeof *cfg);
    memset(&p, 0, sizeof p);
    p.cfg = cfg;
    p.relayd.def = &secdefs[CFG_K_RELAYD];
    p.err = why;
    p.errlen = sizeof why;
    p.path = "(built-in default)";
    keys_default(&secdefs[CFG_K_RELAYD], cfg);
    free(cfg->spool_dir);
    cfg->spool_dir = xstrdup(spool_dir != NULL ? spool_dir : CFG_BUILTIN_SPOOL);
    cfg->path = xstrdup(p.path);

    i = obj_new(cfg, CFG_K_LISTENER, "default", 0);
    l = &cfg->listeners[i];
    if (key_set(&listener_keys[key_index(&secdefs[CFG_K_LISTENER], "listen")], l,
                CFG_BUILTIN_LISTEN, why, sizeof why) != 0 ||
        key_set(&listener_keys[key_index(&secdefs[CFG_K_LISTENER], "allow")], l, CFG_ALLOW_LOOPBACK,
                why, sizeof why) != 0)
        log_panic("cfg: built-in listener: %s", why);
    check_all(&p);
    if (p.failed)
        log_panic("cfg: built-in configuration: %s", why);
}

int cfg_load(const char *path, struct cfg *cfg, char *err, size_t errlen)
{
    struct cfg_parse p;
    struct cfg tmp;
    int rc, saved;

    memset(cfg, 0, sizeof *cfg);
    memset(&tmp, 0, sizeof tmp);
    memset(&p, 0, sizeof p);
    p.cfg = &tmp;
    p.path = path;
    p.cur = -1;
    p.relayd.def = &secdefs[CFG_K_RELAYD];
    p.err = err;
    p.errlen = errlen;
    if (errlen > 0)
        err[0] = '\0';

    if ((p.fp = fopen(path, "re")) == NULL) {
        saved = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(saved));
        return -saved;
    }
    tmp.path = xstrdup(path);
    keys_default(&secdefs[CFG_K_RELAYD], &tmp);

    /* XXX Debian's inih exposes its compile-time options as variables.  Continuation lines
     * would turn an indented "port = 25" into part of the previous value; refuse them. */
    ini_allow_multiline = false;
    rc = ini_parse_stream(cfg_reader, &p, cfg_handler, &p);
    if (!p.failed && ferror(p.fp)) {
        saved = errno;
        snprintf(err, errlen, "%s: %s", path, strerror(saved));
        rc = -saved;
        goto free_tmp;
    }
    if (rc == -2) {
        snprintf(err, errlen, "%s: out of memory", path);
        rc = -ENOMEM;
        goto free_tmp;
    }
    /* inih's own complaints (no '=', no ']') are reported by line only. */
    if (rc > 0 && (!p.failed || rc < p.err_line)) {
        p.failed = 0;
        p.lineno = rc;
        perr(&p, rc, NULL, NULL, "syntax error: expected [section], key = value or a comment");
    }
    if (!p.failed)
        check_all(&p);
    if (p.failed) {
        rc = CFG_EINVAL;
        goto free_tmp;
    }
    fclose(p.fp);
    free(p.line);
    free(p.secs);
    *cfg = tmp;
    return 0;

free_tmp:
    fclose(p.fp);
    free(p.line);
    free(p.secs);
    cfg_free(&tmp);
    return rc;
}

void cfg_free(struct cfg *cfg)
{
    int i;

    if (cfg == NULL)
        return;
    keys_free(&secdefs[CFG_K_RELAYD], cfg);
    for (i = 0; i < cfg->nlisteners; i++) {
        keys_free(&secdefs[CFG_K_LISTENER], &cfg->listeners[i]);
        free(cfg->listeners[i].name);
    }
    for (i = 0; i < cfg->nupstreams; i++) {
        keys_free(&secdefs[CFG_K_UPSTREAM], &cfg->upstreams[i]);
        free(cfg->upstreams[i].name);
    }
    for (i = 0; i < cfg->nroutes; i++) {
        keys_free(&secdefs[CFG_K_ROUTE], &cfg->routes[i]);
        free(cfg->routes[i].failover);
        free(cfg->routes[i].name);
    }
    free(cfg->listeners);
    free(cfg->upstreams);
    free(cfg->routes);
    free(cfg->path);
    memset(cfg, 0, sizeof *cfg);
}

static void dump_keys(const struct cfg_secdef *def, const void *obj, FILE *out)
{
    char tmp[64];
    size_t i, j;

    for (i = 0; i < def->nkeys; i++) {
        const struct cfg_key *k = &def->keys[i];
        void *o = (void *)(uintptr_t)obj;
        const char *s;

        switch (k->type) {
        case CFG_T_STRING:
        case CFG_T_HOST:
        case CFG_T_DOMAINS:
        case CFG_T_FILE:
        case CFG_T_SECRET:
            s = *FIELD(o, k->off, char *);
            if (s == NULL) {
                fprintf(out, "; %s is not set\n", k->name);
                break;
            }
            fprintf(out, "%s = %s\n", k->name, s);
            /* The secret itself is never printed, not even its length. */
            if (k->type == CFG_T_SECRET && *FIELD(o, k->off2, char *) != NULL)
                fprintf(out, "; password: ******** (read from %s)\n", k->name);
            break;
        case CFG_T_MAP:
            s = *FIELD(o, k->off, char *);
            if (s == NULL)
                fprintf(out, "; %s is not set\n", k->name);
            else
                fprintf(out, "%s = %s\n; %d entries\n", k->name, s,
                        FIELD(o, k->off2, struct cfg_map)->n);
            break;
        case CFG_T_INT:
            fprintf(out, "%s = %d\n", k->name, *FIELD(o, k->off, int));
            break;
        case CFG_T_SIZE:
            fmt_size(*FIELD(o, k->off, long), tmp, sizeof tmp);
            fprintf(out, "%s = %s\n", k->name, tmp);
            break;
        case CFG_T_DURATION:
            fmt_duration(*FIELD(o, k->off, int), tmp, sizeof tmp);
            fprintf(out, "%s = %s\n", k->name, tmp);
            break;
        case CFG_T_BOOL:
            fprintf(out, "%s = %s\n", k->name, *FIELD(o, k->off, int) ? "yes" : "no");
            break;
        case CFG_T_TLS:
            fprintf(out, "%s = %s\n", k->name, cfg_tls_name(*FIELD(o, k->off, enum cfg_tls)));
            break;
        case CFG_T_AUTH:
            fprintf(out, "%s = %s\n", k->name, cfg_auth_name(*FIELD(o, k->off, enum cfg_auth)));
            break;
        case CFG_T_PROXY:
            fprintf(out, "%s = %s\n", k->name, cfg_proxy_name(*FIELD(o, k->off, enum cfg_proxy)));
            break;
        case CFG_T_NETLIST: {
            const struct netaddr_list *l = FIELD(o, k->off, struct netaddr_list);
            char net[64];

            if (l->n == 0) {
                fprintf(out, "; %s is not set\n", k->name);
                break;
            }
            fprintf(out, "%s =", k->name);
            for (j = 0; j < l->n; j++)
                fprintf(out, "%s %s", j ? "," : "", netaddr_net_str(&l->nets[j], net, sizeof net));
            fputc('\n', out);
            break;
        }
        case CFG_T_HOSTPORT:
            s = *FIELD(o, k->off, char *);
            if (s == NULL)
                fprintf(out, "; %s is not set\n", k->name);
            else
                fprintf(out, strchr(s, ':') ? "%s = [%s]:%d\n" : "%s = %s:%d\n", k->name, s,
                        *FIELD(o, k->off2, int));
            break;
        }
    }
}

void cfg_dump(const struct cfg *cfg, FILE *out)
{
    int i;

    fprintf(out, "# relayd effective configuration from %s (defaults filled in, secrets masked)\n",
            cfg->path != NULL ? cfg->path : "(none)");
    fprintf(out, "\n[relayd]\n");
    dump_keys(&secdefs[CFG_K_RELAYD], cfg, out);
    for (i = 0; i < cfg->nlisteners; i++) {
        fprintf(out, "\n[listener %s]\n", cfg->listeners[i].name);
        dump_keys(&secdefs[CFG_K_LISTENER], &cfg->listeners[i], out);
    }
    for (i = 0; i < cfg->nupstreams; i++) {
        fprintf(out, "\n[upstream %s]\n", cfg->upstreams[i].name);
        dump_keys(&secdefs[CFG_K_UPSTREAM], &cfg->upstreams[i], out);
    }
    for (i = 0; i < cfg->nroutes; i++) {
        fprintf(out, "\n[route %s]\n", cfg->routes[i].name);
        dump_keys(&secdefs[CFG_K_ROUTE], &cfg->routes[i], out);
    }
}

int cfg_reload_secrets(struct cfg *cfg, char *err, size_t errlen)
{
    int i, failed = 0;

    err[0] = '\0';
    for (i = 0; i < cfg->nupstreams; i++) {
        struct cfg_upstream *up = &cfg->upstreams[i];
        char *fresh = NULL, why[512];

        if (up->password_file == NULL)
            continue;
        if (read_secret(up->password_file, &fresh, why, sizeof why) != 0) {
            /* Keep the old secret: a half-written file must not stop delivery. */
            snprintf(err, errlen, "[upstream %s] password_file: %s", up->name, why);
            failed++;
            continue;
        }
        if (up->password != NULL) {
            explicit_bzero(up->password, strlen(up->password));
            free(up->password);
        }
        up->password = fresh;
    }
    return failed ? -1 : 0;
}
