/*
 * cfg_int.h - what the files of the cfg module share (cfg.c, cfg_keys.c, cfg_check.c); not
 * for use outside config/.
 *
 *   cfg_keys.c   the key tables (one per section type: name, type, offsetof, bounds,
 *                default text) and the enumerations' names
 *   cfg.c        reading: inih, converting each value with its key's row, sections,
 *                cfg_load(), cfg_default(), cfg_dump(), cfg_free(), secrets
 *   cfg_check.c  the rules across keys, run once the whole file is read (cfg__check_all())
 */
#ifndef CONFIG_CFG_INT_H
#define CONFIG_CFG_INT_H

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "config/cfg.h"

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
    CFG_T_UPAUTH,   /* enum cfg_upauth */
    CFG_T_GRANT,    /* enum cfg_grant; NULL default: CFG_GRANT_NONE (not set) */
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

/* The enumerations' names (cfg_keys.c), by key type: names[value] is what the file says
 * (NULL: a value that cannot be written, e.g. CFG_GRANT_COMMAND, inferred from other keys);
 * choices is the list for messages. */
struct cfg_enum {
    const char *const *names;
    size_t n;
    const char *choices;
};

enum cfg_kind { CFG_K_RELAYD, CFG_K_LISTENER, CFG_K_UPSTREAM, CFG_K_ROUTE };

struct cfg_secdef {
    const char *type;
    enum cfg_kind kind;
    const struct cfg_key *keys;
    size_t nkeys;
};
/* The section types and their key tables, in CFG_K_* order (cfg_keys.c). */
extern const struct cfg_secdef cfg__secdefs[];
extern const size_t cfg__nsecdefs;
/* By key type (CFG_T_MAP is the last); names NULL for types that are not enumerations. */
extern const struct cfg_enum cfg__enums[CFG_T_MAP + 1];

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

#define FIELD(obj, off, type) ((type *)(void *)((char *)(obj) + (off)))
/* The value as written, shortened for messages. */
#define VAL(v) (int)(strlen(v) > 60 ? 60 : strlen(v)), (v)

/* The name of an enumeration's value (an enum-typed key), or "?". */
const char *cfg__enum_name(enum cfg_type type, int value);

/* cfg.c */
/* Records the first error only: "FILE:LINE: [type name] key: why".  line 0 leaves the line
 * out (file-wide problems), s NULL the section, key NULL the key. */
void cfg__perr(struct cfg_parse *p, int line, const struct cfg_sec *s, const char *key,
               const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The index of key name in def's table; a missing key is a bug (log_panic). */
int cfg__key_index(const struct cfg_secdef *def, const char *name);
/* The section [def->type name] read so far, or NULL. */
const struct cfg_sec *cfg__sec_find(struct cfg_parse *p, const struct cfg_secdef *def,
                                    const char *name);
/* 1 when v is made of host name / address characters and not too long. */
int cfg__host_ok(const char *v);
/* "2h", "90s": the shortest exact form, as cfg_dump() writes it. */
void cfg__fmt_duration(long secs, char *out, size_t outlen);

/* cfg_check.c */
/* The rules across keys, after the last line: required keys, open relay, cleartext
 * passwords, TLS pins, OAuth 2.0 presets, route -> upstream.  Errors through cfg__perr(). */
void cfg__check_all(struct cfg_parse *p);

#endif
