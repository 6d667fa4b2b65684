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
    CFG_T_NETLIST,  /* struct netaddr_list */
    CFG_T_HOSTPORT, /* char * IP address at off, int port at off2 */
};

struct cfg_key {
    const char *name;
    enum cfg_type type;
    size_t off;
    long min, max;
    const char *dflt; /* NULL: unset (or computed, see the comment at the entry) */
    size_t off2;
};

#define CFG_KEYS_MAX 16

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
};

static const struct cfg_key listener_keys[] = {
    /* Required. */
    {"listen", CFG_T_HOSTPORT, offsetof(struct cfg_listener, host), 1, 65535, NULL,
     offsetof(struct cfg_listener, port)},
    /* NULL: CFG_ALLOW_LOOPBACK when listen is loopback, else an error (open relay). */
    {"allow", CFG_T_NETLIST, offsetof(struct cfg_listener, allow), 0, 0, NULL, 0},
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
};

static const struct cfg_key route_keys[] = {
    /* Required; must name an [upstream]. */
    {"upstream", CFG_T_STRING, offsetof(struct cfg_route, upstream_name), 0, 0, NULL, 0},
    {"failover", CFG_T_STRING, offsetof(struct cfg_route, failover_names), 0, 0, NULL, 0},
    {"sender_domain", CFG_T_DOMAINS, offsetof(struct cfg_route, sender_domain), 0, 0, NULL, 0},
    {"recipient_domain", CFG_T_DOMAINS, offsetof(struct cfg_route, recipient_domain), 0, 0, NULL,
     0},
};

enum cfg_kind { CFG_K_RELAYD, CFG_K_LISTENER, CFG_K_UPSTREAM, CFG_K_ROUTE };

struct cfg_secdef {
    const char *type;
    enum cfg_kind kind;
    const struct cfg_key *keys;
    size_t nkeys;
};

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

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

const char *cfg_tls_name(enum cfg_tls tls)
{
    if ((unsigned)tls >= NELEM(tls_names))
        return "?";
    return tls_names[tls];
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

/* Reads a password file, refusing one that others could read. */
static int read_secret(const char *path, char **out, char *why, size_t whylen)
{
    char data[CFG_SECRET_MAX + 1];
    struct stat st;
    size_t len = 0;
    ssize_t n;
    int fd, rc = -1;

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
    while (len < sizeof data && (n = read(fd, data + len, sizeof data - len)) != 0) {
        if (n < 0) {
            if (errno == EINTR)
                continue;
            snprintf(why, whylen, "%s: %s", path, strerror(errno));
            goto wipe;
        }
        len += (size_t)n;
    }
    if (len > CFG_SECRET_MAX) {
        snprintf(why, whylen, "%s: longer than %d bytes; it should hold just the password", path,
                 CFG_SECRET_MAX);
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
    explicit_bzero(data, sizeof data);
close_fd:
    close(fd);
    return rc;
}

/* Releases what a key owns in obj and leaves it unset. */
static void key_clear(const struct cfg_key *k, void *obj)
{
    char **sp;

    switch (k->type) {
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

static void check_upstream(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];

    if (u->host == NULL) {
        perr(p, s->line, s, "host", "required (e.g. host = smtp.example.com)");
        return;
    }
    if (u->tls == CFG_TLS_IMPLICIT && s->seen[key_index(s->def, "port")] == 0)
        u->port = CFG_IMPLICIT_PORT;
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
    if (strcmp(r->name, "default") == 0) {
        if (r->sender_domain != NULL || r->recipient_domain != NULL)
            perr(p, key_line(s, r->sender_domain ? "sender_domain" : "recipient_domain"), s,
                 r->sender_domain ? "sender_domain" : "recipient_domain",
                 "the default route matches everything; put domains in another route");
    } else if (r->sender_domain == NULL && r->recipient_domain == NULL) {
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

const struct cfg_route *cfg_route_find(const struct cfg *cfg, const char *sender, const char *rcpt)
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
        if (domain_listed(r->recipient_domain, rdom, rlen) ||
            domain_listed(r->sender_domain, sdom, slen))
            return r;
    }
    return dflt;
}
