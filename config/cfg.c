/*
 * cfg - relayd's configuration file; see cfg.h.
 *
 * The module is three files (cfg_int.h says what they share): cfg_keys.c holds the key
 * tables, this file reads, converts and prints, cfg_check.c holds the rules across keys.
 *
 * Happy path: cfg_load() fills a private struct cfg with the [relayd] defaults, lets inih
 * tokenise the file through our own line reader, and converts each "key = value" with the
 * key table of the current section (name, type, offsetof, bounds, default text: Postfix
 * and nginx style; cfg_keys.c).  A section gets its table defaults the moment its header is
 * read, so the tables are the only place defaults live.  After the last line, the rules
 * across keys run (cfg__check_all(): required keys, open relay, cleartext passwords,
 * route -> upstream), and only then is the result handed to the caller.
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
#include "config/cfg_int.h"

/* ---- helpers ---- */

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

int cfg__key_index(const struct cfg_secdef *def, const char *name)
{
    int idx = -1;

    if (key_find(def, name, &idx) == NULL)
        log_panic("cfg: no key %s in [%s]", name, def->type);
    return idx;
}

void cfg__perr(struct cfg_parse *p, int line, const struct cfg_sec *s, const char *key,
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

void cfg__fmt_duration(long secs, char *out, size_t outlen)
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

int cfg__host_ok(const char *v)
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
    case CFG_T_UPAUTH:
    case CFG_T_GRANT:
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
        if (!cfg__host_ok(v)) {
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
                !cfg__host_ok(dom)) {
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
            cfg__fmt_duration(k->min, lo, sizeof lo);
            cfg__fmt_duration(k->max, hi, sizeof hi);
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
    case CFG_T_AUTH:
    case CFG_T_PROXY:
    case CFG_T_UPAUTH:
    case CFG_T_GRANT: {
        const struct cfg_enum *e = &cfg__enums[k->type];

        for (i = 0; i < e->n; i++) {
            if (e->names[i] != NULL && strcasecmp(v, e->names[i]) == 0) {
                *FIELD(obj, k->off, int) = (int)i; /* every enum cfg_* is int-sized */
                return 0;
            }
        }
        snprintf(why, whylen, "'%.*s' is not one of %s", VAL(v), e->choices);
        return -1;
    }
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

const struct cfg_sec *cfg__sec_find(struct cfg_parse *p, const struct cfg_secdef *def,
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
        keys_default(&cfg__secdefs[CFG_K_LISTENER], l);
        return cfg->nlisteners++;
    }
    case CFG_K_UPSTREAM: {
        struct cfg_upstream *u;

        cfg->upstreams = xrealloc(cfg->upstreams, (size_t)(cfg->nupstreams + 1) * sizeof *u);
        u = &cfg->upstreams[cfg->nupstreams];
        memset(u, 0, sizeof *u);
        u->name = xstrdup(name);
        u->line = line;
        keys_default(&cfg__secdefs[CFG_K_UPSTREAM], u);
        return cfg->nupstreams++;
    }
    case CFG_K_ROUTE: {
        struct cfg_route *r;

        cfg->routes = xrealloc(cfg->routes, (size_t)(cfg->nroutes + 1) * sizeof *r);
        r = &cfg->routes[cfg->nroutes];
        memset(r, 0, sizeof *r);
        r->name = xstrdup(name);
        r->line = line;
        keys_default(&cfg__secdefs[CFG_K_ROUTE], r);
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
        cfg__perr(p, p->lineno, NULL, NULL, "section header is too long");
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

    for (i = 0; i < cfg__nsecdefs; i++)
        if (strcasecmp(type, cfg__secdefs[i].type) == 0)
            def = &cfg__secdefs[i];
    if (def == NULL) {
        cfg__perr(p, p->lineno, NULL, NULL,
                  "[%s] unknown section type '%s' (expected relayd, "
                  "listener NAME, upstream NAME or route NAME)",
                  orig, type);
        return;
    }
    if (def->kind == CFG_K_RELAYD && *name != '\0') {
        cfg__perr(p, p->lineno, NULL, NULL, "[%s] takes no name: write [relayd]", orig);
        return;
    }
    if (def->kind != CFG_K_RELAYD && !name_ok(name)) {
        cfg__perr(
            p, p->lineno, NULL, NULL,
            *name == '\0'
                ? "[%s] needs a name: [%s NAME]"
                : "[%s] the name may contain only letters, digits, '.', '_' and '-' (%s NAME)",
            orig, def->type);
        return;
    }
    if ((dup = cfg__sec_find(p, def, name)) != NULL) {
        cfg__perr(p, p->lineno, dup, NULL, "duplicate section (first on line %d)", dup->line);
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
        cfg__perr(p, p->lineno, NULL, NULL,
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
        cfg__perr(p, p->lineno, NULL, name,
                  "outside any section (start with [relayd], [listener "
                  "NAME], [upstream NAME] or [route NAME])");
        return 0;
    }
    s = &p->secs[p->cur];
    if ((k = key_find(s->def, name, &idx)) == NULL) {
        cfg__perr(p, p->lineno, s, name, "unknown key");
        return 0;
    }
    if (s->seen[idx] != 0) {
        cfg__perr(p, p->lineno, s, k->name, "set twice (first on line %d)", s->seen[idx]);
        return 0;
    }
    s->seen[idx] = p->lineno;
    if (key_set(k, sec_obj(p->cfg, s), value, why, sizeof why) != 0) {
        cfg__perr(p, p->lineno, s, k->name, "%s", why);
        return 0;
    }
    return 1;
}

/* ---- public ---- */

void cfg_default(struct cfg *cfg, const char *spool_dir)
{
    const struct cfg_secdef *ldef = &cfg__secdefs[CFG_K_LISTENER];
    struct cfg_parse p;
    struct cfg_listener *l;
    char why[256];
    int i;

    memset(cfg, 0, sizeof *cfg);
    memset(&p, 0, sizeof p);
    p.cfg = cfg;
    p.relayd.def = &cfg__secdefs[CFG_K_RELAYD];
    p.err = why;
    p.errlen = sizeof why;
    p.path = "(built-in default)";
    keys_default(&cfg__secdefs[CFG_K_RELAYD], cfg);
    free(cfg->spool_dir);
    cfg->spool_dir = xstrdup(spool_dir != NULL ? spool_dir : CFG_BUILTIN_SPOOL);
    cfg->path = xstrdup(p.path);

    i = obj_new(cfg, CFG_K_LISTENER, "default", 0);
    l = &cfg->listeners[i];
    if (key_set(&ldef->keys[cfg__key_index(ldef, "listen")], l, CFG_BUILTIN_LISTEN, why,
                sizeof why) != 0 ||
        key_set(&ldef->keys[cfg__key_index(ldef, "allow")], l, CFG_ALLOW_LOOPBACK, why,
                sizeof why) != 0)
        log_panic("cfg: built-in listener: %s", why);
    cfg__check_all(&p);
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
    p.relayd.def = &cfg__secdefs[CFG_K_RELAYD];
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
    keys_default(&cfg__secdefs[CFG_K_RELAYD], &tmp);

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
        cfg__perr(&p, rc, NULL, NULL, "syntax error: expected [section], key = value or a comment");
    }
    if (!p.failed)
        cfg__check_all(&p);
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
    keys_free(&cfg__secdefs[CFG_K_RELAYD], cfg);
    for (i = 0; i < cfg->nlisteners; i++) {
        keys_free(&cfg__secdefs[CFG_K_LISTENER], &cfg->listeners[i]);
        free(cfg->listeners[i].name);
    }
    for (i = 0; i < cfg->nupstreams; i++) {
        keys_free(&cfg__secdefs[CFG_K_UPSTREAM], &cfg->upstreams[i]);
        free(cfg->upstreams[i].name);
    }
    for (i = 0; i < cfg->nroutes; i++) {
        keys_free(&cfg__secdefs[CFG_K_ROUTE], &cfg->routes[i]);
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
            cfg__fmt_duration(*FIELD(o, k->off, int), tmp, sizeof tmp);
            fprintf(out, "%s = %s\n", k->name, tmp);
            break;
        case CFG_T_BOOL:
            fprintf(out, "%s = %s\n", k->name, *FIELD(o, k->off, int) ? "yes" : "no");
            break;
        case CFG_T_TLS:
        case CFG_T_AUTH:
        case CFG_T_PROXY:
        case CFG_T_UPAUTH:
        case CFG_T_GRANT:
            s = cfg__enum_name(k->type, *FIELD(o, k->off, int));
            /* An inferred value (oauth2_grant) has no name when it cannot be written. */
            if (strcmp(s, "?") == 0)
                fprintf(out, "; %s is not set\n", k->name);
            else
                fprintf(out, "%s = %s\n", k->name, s);
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
    dump_keys(&cfg__secdefs[CFG_K_RELAYD], cfg, out);
    for (i = 0; i < cfg->nlisteners; i++) {
        fprintf(out, "\n[listener %s]\n", cfg->listeners[i].name);
        dump_keys(&cfg__secdefs[CFG_K_LISTENER], &cfg->listeners[i], out);
    }
    for (i = 0; i < cfg->nupstreams; i++) {
        fprintf(out, "\n[upstream %s]\n", cfg->upstreams[i].name);
        dump_keys(&cfg__secdefs[CFG_K_UPSTREAM], &cfg->upstreams[i], out);
    }
    for (i = 0; i < cfg->nroutes; i++) {
        fprintf(out, "\n[route %s]\n", cfg->routes[i].name);
        dump_keys(&cfg__secdefs[CFG_K_ROUTE], &cfg->routes[i], out);
    }
}

/* ---- Generations ---- */

struct cfg_gen *cfg_gen_new(struct cfg *cfg, unsigned long n)
{
    struct cfg_gen *g = xcalloc(1, sizeof(*g));

    g->cfg = *cfg;
    memset(cfg, 0, sizeof(*cfg));
    g->n = n;
    g->refs = 1;
    return g;
}

struct cfg_gen *cfg_gen_ref(struct cfg_gen *g)
{
    if (g != NULL)
        g->refs++;
    return g;
}

struct cfg_gen *cfg_gen_unref(struct cfg_gen *g)
{
    if (g != NULL && --g->refs == 0) {
        cfg_free(&g->cfg);
        free(g);
    }
    return NULL;
}
