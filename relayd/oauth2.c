/*
 * oauth2 - OAuth 2.0 token manager; see oauth2.h.
 *
 * Happy path: oauth2_start() kicks every account; a kick builds the grant's POST (or
 * spawns oauth2_token_command) and adds it to one libcurl multi handle driven by libuv
 * (CURLMOPT_SOCKETFUNCTION -> one uv_poll_t per socket, CURLMOPT_TIMERFUNCTION -> one
 * uv_timer_t: curl's "multi-uv" pattern).  The answer is parsed by a small JSON reader;
 * the token is stored with refresh_at (expiry - margin) and stale_at (expiry - margin/2),
 * and the account's timer is armed for refresh_at.  Deliveries peek synchronously.
 *
 * Failure modes: network, TLS and HTTP failures and OAuth errors become one sentence in
 * the account's lasterr, are logged once per attempt, and arm a retry with backoff.  A
 * token past stale_at is never handed out, so a failing endpoint holds mail (deliveries
 * defer with config_fault) rather than bouncing it.  Rotated refresh tokens are written
 * back atomically before the new access token is used; a write failure is logged and the
 * rotated token is kept in memory, so the next refresh can still write it.
 *
 * Secrets: client secrets, refresh tokens, assertions and access tokens live in malloc'd
 * buffers that are wiped before free; none of them reaches a log line or an error text.
 */
#include "relayd/oauth2.h"

#include <curl/curl.h>
#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <libgen.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"

/* Replies larger than this are not token responses. */
#define O2_BODY_MAX (64 * 1024)
#define O2_CONNECT_TIMEOUT 10L
#define O2_REQUEST_TIMEOUT 30L
#define O2_COMMAND_TIMEOUT_MS 30000
/* Lifetime assumed for a bare token printed by oauth2_token_command. */
#define O2_DEFAULT_LIFETIME 3600
#define O2_BACKOFF_FIRST_MS 2000
#define O2_BACKOFF_MAX_MS (300 * 1000)
#define O2_SECRET_MAX (64 * 1024)
#define O2_JSON_DEPTH 32
#define O2_USER_AGENT "relayd-oauth2/0.1"
#define O2_GRANT_JWT "urn:ietf:params:oauth:grant-type:jwt-bearer"
#define O2_GRANT_DEVICE "urn:ietf:params:oauth:grant-type:device_code"

#define O2_CONTAINER(p, type, member) ((type *)(void *)((char *)(p) - offsetof(type, member)))

struct o2_acct;

struct o2_waiter {
    oauth2_token_cb cb;
    void *arg;
    struct o2_waiter *next;
};

/* One HTTP request in flight (curl easy handle in the multi). */
struct o2_req {
    struct o2_acct *a;
    CURL *easy;
    struct curl_slist *hdrs;
    char *post;
    size_t postlen;
    struct buf *body;
    char errbuf[CURL_ERROR_SIZE];
    char host[128];
};

/* One oauth2_token_command run. */
struct o2_cmd {
    struct o2_acct *a; /* NULL once abandoned (stop) */
    struct oauth2 *o;
    uv_process_t proc;
    uv_pipe_t out;
    uv_timer_t timer;
    struct buf *body;
    int nopen;
    int exited, eof, timed_out;
    int64_t status;
    int signal;
};

struct o2_acct {
    struct oauth2 *o;
    const struct cfg_upstream *up;
    char *token;
    uint64_t expires_at, refresh_at, stale_at; /* ms on o's clock */
    int after_535;     /* the current token was fetched because of a 535 */
    int forced;        /* the request in flight was forced by a 535 */
    char *rotated;     /* a rotated refresh token not yet written to the file */
    struct o2_req *req;
    struct o2_cmd *cmd;
    uv_timer_t timer;
    uint64_t next_try;
    int failures;
    char lasterr[600];
    struct o2_waiter *waiters;
};

struct o2_sock {
    uv_poll_t poll;
    curl_socket_t fd;
    struct oauth2 *o;
};

struct oauth2 {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct o2_acct *accts;
    int naccts;
    CURLM *multi;
    uv_timer_t curl_timer;
    uv_timer_t defer; /* runs waiters of oauth2_token_get() that need not wait */
    oauth2_clock_fn clock;
    void *clock_arg;
    int started, stopping;
    int open_handles;
    void (*stopped)(void *arg);
    void *stopped_arg;
    char errtmp[600];
};

static struct oauth2 *o2_current;

static void acct_kick(struct o2_acct *a);
static void acct_fail(struct o2_acct *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void acct_success(struct o2_acct *a, struct oauth2_resp *r);

/* ---- small helpers ---- */

static uint64_t mono_ms(void *arg)
{
    struct timespec ts;

    (void)arg;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t now_ms(struct oauth2 *o)
{
    return o->clock(o->clock_arg);
}

static void wipe_free(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

/* Printable ASCII only, at most max bytes: provider text goes into logs. */
static void sanitize(char *s, size_t max)
{
    size_t i;

    for (i = 0; s[i] != '\0'; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            s[i] = ' ';
    if (i > max)
        strcpy(s + max - 3, "...");
}

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* base64url without padding (RFC 7515 2), appended to b. */
static void b64url(struct buf *b, const unsigned char *p, size_t n)
{
    size_t i;
    char q[4];

    for (i = 0; i + 2 < n; i += 3) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
        q[2] = b64url_chars[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
        q[3] = b64url_chars[p[i + 2] & 63];
        buf_append(b, q, 4);
    }
    if (n - i == 1) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[(p[i] & 3) << 4];
        buf_append(b, q, 2);
    } else if (n - i == 2) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
        q[2] = b64url_chars[(p[i + 1] & 15) << 2];
        buf_append(b, q, 3);
    }
}

/* A JSON string literal of s, appended to b. */
static void json_quote(struct buf *b, const char *s)
{
    buf_puts(b, "\"");
    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;

        if (c == '"' || c == '\\')
            buf_printf(b, "\\%c", c);
        else if (c < 0x20)
            buf_printf(b, "\\u%04x", c);
        else
            buf_append(b, s, 1);
    }
    buf_puts(b, "\"");
}

/* ---- JSON: just enough for token responses and service account keys ---- */

struct oauth2_json {
    size_t n;
    char **keys;
    char **vals;
};

struct jp {
    const char *s, *end;
    char *err;
    size_t errlen;
    int failed;
};

static void jp_fail(struct jp *p, const char *what)
{
    if (!p->failed)
        snprintf(p->err, p->errlen, "malformed JSON: %s", what);
    p->failed = 1;
}

static void jp_ws(struct jp *p)
{
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r'))
        p->s++;
}

static int hex4(const char *s, unsigned *v)
{
    int i;

    *v = 0;
    for (i = 0; i < 4; i++) {
        char c = s[i];

        *v <<= 4;
        if (c >= '0' && c <= '9')
            *v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            *v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            *v |= (unsigned)(c - 'A' + 10);
        else
            return -1;
    }
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp)
{
    char u[4];

    if (cp < 0x80) {
        u[0] = (char)cp;
        buf_append(b, u, 1);
    } else if (cp < 0x800) {
        u[0] = (char)(0xC0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3F));
        buf_append(b, u, 2);
    } else if (cp < 0x10000) {
        u[0] = (char)(0xE0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[2] = (char)(0x80 | (cp & 0x3F));
        buf_append(b, u, 3);
    } else {
        u[0] = (char)(0xF0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
        u[3] = (char)(0x80 | (cp & 0x3F));
        buf_append(b, u, 4);
    }
}

/* A string at p->s (the opening quote); decoded into out when out is not NULL. */
static void jp_string(struct jp *p, struct buf *out)
{
    unsigned cp, lo;

    p->s++;
    while (p->s < p->end && *p->s != '"') {
        unsigned char c = (unsigned char)*p->s;

        if (c < 0x20)
            return jp_fail(p, "control character in a string");
        if (c != '\\') {
            if (out != NULL)
                buf_append(out, p->s, 1);
            p->s++;
            continue;
        }
        if (++p->s >= p->end)
            break;
        switch (*p->s) {
        case '"': case '\\': case '/':
            if (out != NULL)
                buf_append(out, p->s, 1);
            break;
        case 'b': if (out != NULL) buf_puts(out, "\b"); break;
        case 'f': if (out != NULL) buf_puts(out, "\f"); break;
        case 'n': if (out != NULL) buf_puts(out, "\n"); break;
        case 'r': if (out != NULL) buf_puts(out, "\r"); break;
        case 't': if (out != NULL) buf_puts(out, "\t"); break;
        case 'u':
            if (p->end - p->s < 5 || hex4(p->s + 1, &cp) != 0)
                return jp_fail(p, "bad \\u escape");
            p->s += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (p->end - p->s < 7 || p->s[1] != '\\' || p->s[2] != 'u' ||
                    hex4(p->s + 3, &lo) != 0 || lo < 0xDC00 || lo > 0xDFFF)
                    return jp_fail(p, "unpaired surrogate");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                p->s += 6;
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return jp_fail(p, "unpaired surrogate");
            }
            if (cp == 0)
                return jp_fail(p, "NUL in a string");
            if (out != NULL)
                put_utf8(out, cp);
            break;
        default:
            return jp_fail(p, "bad escape");
        }
        p->s++;
    }
    if (p->s >= p->end)
        return jp_fail(p, "unterminated string");
    p->s++;
}

static void jp_number(struct jp *p)
{
    const char *s = p->s;

    if (s < p->end && *s == '-')
        s++;
    if (s >= p->end || *s < '0' || *s > '9')
        return jp_fail(p, "bad number");
    if (*s == '0')
        s++;
    else
        while (s < p->end && *s >= '0' && *s <= '9')
            s++;
    if (s < p->end && *s == '.') {
        if (++s >= p->end || *s < '0' || *s > '9')
            return jp_fail(p, "bad number");
        while (s < p->end && *s >= '0' && *s <= '9')
            s++;
    }
    if (s < p->end && (*s == 'e' || *s == 'E')) {
        s++;
        if (s < p->end && (*s == '+' || *s == '-'))
            s++;
        if (s >= p->end || *s < '0' || *s > '9')
            return jp_fail(p, "bad number");
        while (s < p->end && *s >= '0' && *s <= '9')
            s++;
    }
    p->s = s;
}

static int jp_word(struct jp *p, const char *w)
{
    size_t n = strlen(w);

    if ((size_t)(p->end - p->s) < n || memcmp(p->s, w, n) != 0)
        return 0;
    p->s += n;
    return 1;
}

static void jp_value(struct jp *p, int depth);

/* An object or array at p->s; members are skipped (we only keep the top level). */
static void jp_container(struct jp *p, int depth)
{
    char close = *p->s == '{' ? '}' : ']';
    int first = 1;

    if (depth > O2_JSON_DEPTH)
        return jp_fail(p, "nested too deeply");
    p->s++;
    for (;;) {
        jp_ws(p);
        if (p->s >= p->end)
            return jp_fail(p, "unterminated object or array");
        if (*p->s == close && first) {
            p->s++;
            return;
        }
        if (close == '}') {
            if (*p->s != '"')
                return jp_fail(p, "member name expected");
            jp_string(p, NULL);
            jp_ws(p);
            if (p->failed || p->s >= p->end || *p->s != ':')
                return jp_fail(p, "':' expected");
            p->s++;
        }
        jp_value(p, depth + 1);
        if (p->failed)
            return;
        jp_ws(p);
        if (p->s < p->end && *p->s == ',') {
            p->s++;
            first = 0;
            continue;
        }
        if (p->s < p->end && *p->s == close) {
            p->s++;
            return;
        }
        return jp_fail(p, "',' or end of object or array expected");
    }
}

static void jp_value(struct jp *p, int depth)
{
    jp_ws(p);
    if (p->s >= p->end)
        return jp_fail(p, "value expected");
    if (*p->s == '"')
        jp_string(p, NULL);
    else if (*p->s == '{' || *p->s == '[')
        jp_container(p, depth);
    else if (*p->s == '-' || (*p->s >= '0' && *p->s <= '9'))
        jp_number(p);
    else if (!jp_word(p, "true") && !jp_word(p, "false") && !jp_word(p, "null"))
        jp_fail(p, "value expected");
}

struct oauth2_json *oauth2_json_free(struct oauth2_json *j)
{
    size_t i;

    if (j == NULL)
        return NULL;
    for (i = 0; i < j->n; i++) {
        free(j->keys[i]);
        wipe_free(j->vals[i]);
    }
    free(j->keys);
    free(j->vals);
    free(j);
    return NULL;
}

struct oauth2_json *oauth2_json_parse(const char *text, size_t len, char *err, size_t errlen)
{
    struct jp p = {text, text + len, err, errlen, 0};
    struct oauth2_json *j = xcalloc(1, sizeof(*j));
    struct buf *key = buf_new(0), *val = buf_new(0);
    size_t i;

    jp_ws(&p);
    if (p.s >= p.end || *p.s != '{') {
        jp_fail(&p, "not an object");
        goto done;
    }
    p.s++;
    jp_ws(&p);
    if (p.s < p.end && *p.s == '}') {
        p.s++;
        goto trailer;
    }
    for (;;) {
        const char *vstart;

        jp_ws(&p);
        if (p.s >= p.end || *p.s != '"') {
            jp_fail(&p, "member name expected");
            goto done;
        }
        buf_reset(key);
        jp_string(&p, key);
        jp_ws(&p);
        if (p.failed || p.s >= p.end || *p.s != ':') {
            jp_fail(&p, "':' expected");
            goto done;
        }
        p.s++;
        jp_ws(&p);
        for (i = 0; i < j->n; i++)
            if (strcmp(j->keys[i], key->data) == 0 || strlen(key->data) != key->len) {
                jp_fail(&p, "duplicate member name");
                goto done;
            }
        vstart = p.s;
        buf_reset(val);
        if (p.s < p.end && *p.s == '"') {
            jp_string(&p, val);
            if (!p.failed && strlen(val->data) != val->len)
                jp_fail(&p, "NUL in a string");
        } else {
            jp_value(&p, 2);
            if (!p.failed && (*vstart == '-' || (*vstart >= '0' && *vstart <= '9') ||
                              *vstart == 't' || *vstart == 'f'))
                buf_append(val, vstart, (size_t)(p.s - vstart));
            else
                vstart = NULL; /* null, object, array: not kept */
        }
        if (p.failed)
            goto done;
        if (vstart != NULL) {
            j->keys = xrealloc(j->keys, (j->n + 1) * sizeof(*j->keys));
            j->vals = xrealloc(j->vals, (j->n + 1) * sizeof(*j->vals));
            j->keys[j->n] = xstrdup(key->data);
            j->vals[j->n] = xstrdup(val->data);
            j->n++;
        }
        jp_ws(&p);
        if (p.s < p.end && *p.s == ',') {
            p.s++;
            continue;
        }
        if (p.s < p.end && *p.s == '}') {
            p.s++;
            break;
        }
        jp_fail(&p, "',' or '}' expected");
        goto done;
    }
trailer:
    jp_ws(&p);
    if (p.s != p.end)
        jp_fail(&p, "text after the object");
done:
    explicit_bzero(val->data, val->cap);
    buf_free(val);
    buf_free(key);
    if (p.failed)
        return oauth2_json_free(j);
    return j;
}

const char *oauth2_json_get(const struct oauth2_json *j, const char *key)
{
    size_t i;

    for (i = 0; j != NULL && i < j->n; i++)
        if (strcmp(j->keys[i], key) == 0)
            return j->vals[i];
    return NULL;
}

/* ---- token responses ---- */

void oauth2_resp_clear(struct oauth2_resp *r)
{
    wipe_free(r->access_token);
    wipe_free(r->refresh_token);
    free(r->error);
    free(r->error_description);
    memset(r, 0, sizeof(*r));
}

static char *dup_or_null(const char *s)
{
    return s != NULL && *s != '\0' ? xstrdup(s) : NULL;
}

int oauth2_resp_parse(long http_status, const char *body, size_t len, struct oauth2_resp *r,
                      char *err, size_t errlen)
{
    char jerr[128];
    struct oauth2_json *j;
    const char *v, *type;

    memset(r, 0, sizeof(*r));
    j = oauth2_json_parse(body, len, jerr, sizeof jerr);
    if (j == NULL) {
        if (http_status == 200)
            snprintf(err, errlen, "HTTP 200 but the body is no token response (%s)", jerr);
        else
            snprintf(err, errlen, "HTTP %ld with no OAuth error in the body", http_status);
        return -1;
    }
    r->access_token = dup_or_null(oauth2_json_get(j, "access_token"));
    r->refresh_token = dup_or_null(oauth2_json_get(j, "refresh_token"));
    r->error = dup_or_null(oauth2_json_get(j, "error"));
    r->error_description = dup_or_null(oauth2_json_get(j, "error_description"));
    /* A number, or (older Microsoft endpoints) a string holding one. */
    if ((v = oauth2_json_get(j, "expires_in")) != NULL)
        r->expires_in = strtol(v, NULL, 10);
    type = oauth2_json_get(j, "token_type");
    if (r->error != NULL) {
        sanitize(r->error, 64);
        if (r->error_description != NULL)
            sanitize(r->error_description, 300);
        snprintf(err, errlen, "%s%s%s (HTTP %ld)", r->error, r->error_description ? ": " : "",
                 r->error_description ? r->error_description : "", http_status);
        goto fail;
    }
    if (http_status != 200) {
        snprintf(err, errlen, "HTTP %ld with no OAuth error in the body", http_status);
        goto fail;
    }
    if (r->access_token == NULL) {
        snprintf(err, errlen, "HTTP 200 without access_token");
        goto fail;
    }
    if (type != NULL && strcasecmp(type, "Bearer") != 0) {
        snprintf(err, errlen, "token_type is '%.20s', not Bearer", type);
        goto fail;
    }
    if (strpbrk(r->access_token, "\x01 \t\r\n") != NULL) {
        snprintf(err, errlen, "the access token contains spaces or control characters");
        goto fail;
    }
    oauth2_json_free(j);
    return 0;
fail:
    oauth2_json_free(j);
    wipe_free(r->access_token);
    r->access_token = NULL;
    return -1;
}

/* ---- atomic file write ---- */

int oauth2_file_write(const char *path, const char *data, char *err, size_t errlen)
{
    char *tmp = xasprintf("%s.tmpXXXXXX", path), *dircopy = xstrdup(path);
    size_t len = strlen(data), off = 0;
    ssize_t n;
    int fd, dfd, rc = -1;

    if ((fd = mkstemp(tmp)) < 0) { /* mkstemp creates 0600 */
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto free_names;
    }
    while (off < len + 1) {
        const char *p = off < len ? data + off : "\n";
        size_t want = off < len ? len - off : 1;

        if ((n = write(fd, p, want)) < 0) {
            if (errno == EINTR)
                continue;
            snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
            goto unlink_tmp;
        }
        off += (size_t)n;
    }
    if (fchmod(fd, 0600) != 0 || fsync(fd) != 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto unlink_tmp;
    }
    if (close(fd) != 0) {
        fd = -1;
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto unlink_tmp;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "rename to %s: %s", path, strerror(errno));
        goto unlink_tmp;
    }
    /* The rename itself must survive a crash. */
    if ((dfd = open(dirname(dircopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    rc = 0;
    goto free_names;
unlink_tmp:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
free_names:
    free(tmp);
    free(dircopy);
    return rc;
}

/* ---- requests: building the grant's POST ---- */

static void form_add(struct buf *b, CURL *e, const char *k, const char *v)
{
    char *ev = curl_easy_escape(e, v, 0);

    if (b->len > 0)
        buf_puts(b, "&");
    buf_printf(b, "%s=%s", k, ev != NULL ? ev : "");
    if (ev != NULL) {
        explicit_bzero(ev, strlen(ev));
        curl_free(ev);
    }
}

static const char *grant_name(enum cfg_grant g)
{
    switch (g) {
    case CFG_GRANT_CLIENT_CREDENTIALS: return "client_credentials";
    case CFG_GRANT_REFRESH_TOKEN: return "refresh_token";
    case CFG_GRANT_JWT_BEARER: return "jwt_bearer";
    case CFG_GRANT_COMMAND: return "oauth2_token_command";
    case CFG_GRANT_NONE: break;
    }
    return "none";
}

static int is_google(const struct cfg_upstream *up)
{
    return up->provider != NULL && strcasecmp(up->provider, "google") == 0;
}

/* The current refresh token: a rotated one not yet written, else the file's. */
static int refresh_token_read(struct o2_acct *a, char **out, char *err, size_t errlen)
{
    char why[400];

    if (a->rotated != NULL) {
        *out = xstrdup(a->rotated);
        return 0;
    }
    if (cfg_secret_read(a->up->refresh_token_file, O2_SECRET_MAX, out, why, sizeof why) != 0) {
        if (access(a->up->refresh_token_file, F_OK) != 0 && errno == ENOENT)
            snprintf(err, errlen, "refresh_token_file %s does not exist: run relayctl oauth2 "
                     "authorize %s", a->up->refresh_token_file, a->up->name);
        else
            snprintf(err, errlen, "refresh_token_file %s", why);
        return -1;
    }
    return 0;
}

/*
 * The JWT assertion for a Google service account (RFC 7523; Google's "Using OAuth 2.0 for
 * Server to Server Applications"): iss = client_email, sub = the mailbox, aud = the token
 * endpoint, scope, iat/exp an hour apart; signed RS256.  *endpoint gets the token endpoint
 * (token_endpoint, else the key's token_uri).  0 or -1 with text.
 */
static int jwt_assertion(const struct cfg_upstream *up, char **assertion, char **endpoint,
                         char *err, size_t errlen)
{
    char why[400], *key = NULL;
    struct oauth2_json *j = NULL;
    const char *email, *pem, *uri;
    struct buf *hdr = buf_new(0), *claims = buf_new(0), *out = buf_new(0);
    unsigned char *sig = NULL;
    size_t siglen = 0;
    time_t now = time(NULL);
    int rc = -1;

    *assertion = NULL;
    *endpoint = NULL;
    if (cfg_secret_read(up->service_account_file, O2_SECRET_MAX, &key, why, sizeof why) != 0) {
        snprintf(err, errlen, "service_account_file %s", why);
        goto done;
    }
    if ((j = oauth2_json_parse(key, strlen(key), why, sizeof why)) == NULL) {
        snprintf(err, errlen, "service_account_file %s: %s", up->service_account_file, why);
        goto done;
    }
    email = oauth2_json_get(j, "client_email");
    pem = oauth2_json_get(j, "private_key");
    uri = up->token_endpoint != NULL ? up->token_endpoint : oauth2_json_get(j, "token_uri");
    if (email == NULL || pem == NULL || uri == NULL) {
        snprintf(err, errlen, "service_account_file %s: no %s (is it a service account key?)",
                 up->service_account_file, email == NULL ? "client_email"
                                           : pem == NULL ? "private_key" : "token_uri");
        goto done;
    }
    if (strncasecmp(uri, "https://", 8) != 0) {
        snprintf(err, errlen, "service_account_file: token_uri is not an https:// URL");
        goto done;
    }
    buf_puts(claims, "{\"iss\":");
    json_quote(claims, email);
    buf_puts(claims, ",\"sub\":");
    json_quote(claims, up->username);
    buf_puts(claims, ",\"scope\":");
    json_quote(claims, up->scope);
    buf_puts(claims, ",\"aud\":");
    json_quote(claims, uri);
    buf_printf(claims, ",\"iat\":%lld,\"exp\":%lld}", (long long)now, (long long)now + 3600);
    buf_puts(hdr, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}");
    b64url(out, (const unsigned char *)hdr->data, hdr->len);
    buf_puts(out, ".");
    b64url(out, (const unsigned char *)claims->data, claims->len);
    if (tlsio_rs256_sign(pem, out->data, out->len, &sig, &siglen, why, sizeof why) != 0) {
        snprintf(err, errlen, "service_account_file %s: %s", up->service_account_file, why);
        goto done;
    }
    buf_puts(out, ".");
    b64url(out, sig, siglen);
    {
        size_t alen;

        *assertion = buf_steal(out, &alen);
    }
    *endpoint = xstrdup(uri);
    rc = 0;
done:
    free(sig);
    oauth2_json_free(j);
    wipe_free(key);
    buf_free(hdr);
    buf_free(claims);
    buf_free(out);
    return rc;
}

/*
 * The token request for up's grant: *url and *post (form body, secret: wipe it).
 * 0, or -1 with text in err.
 */
static int token_request(struct o2_acct *a, CURL *e, char **url, char **post, char *err,
                         size_t errlen)
{
    const struct cfg_upstream *up = a->up;
    struct buf *b = buf_new(0);
    char *rt = NULL, *assertion = NULL, *endpoint = NULL;

    *url = NULL;
    *post = NULL;
    switch (up->grant) {
    case CFG_GRANT_CLIENT_CREDENTIALS:
        /* Microsoft identity platform, client credentials with a shared secret. */
        form_add(b, e, "client_id", up->client_id);
        form_add(b, e, "scope", up->scope);
        form_add(b, e, "client_secret", up->client_secret);
        form_add(b, e, "grant_type", "client_credentials");
        *url = xstrdup(up->token_endpoint);
        break;
    case CFG_GRANT_REFRESH_TOKEN:
        if (refresh_token_read(a, &rt, err, errlen) != 0)
            goto fail;
        form_add(b, e, "client_id", up->client_id);
        /* Google refreshes without scope; Microsoft wants the scope again (v2.0). */
        if (up->scope != NULL && !is_google(up))
            form_add(b, e, "scope", up->scope);
        form_add(b, e, "refresh_token", rt);
        form_add(b, e, "grant_type", "refresh_token");
        if (up->client_secret != NULL)
            form_add(b, e, "client_secret", up->client_secret);
        wipe_free(rt);
        *url = xstrdup(up->token_endpoint);
        break;
    case CFG_GRANT_JWT_BEARER:
        if (jwt_assertion(up, &assertion, &endpoint, err, errlen) != 0)
            goto fail;
        form_add(b, e, "grant_type", O2_GRANT_JWT);
        form_add(b, e, "assertion", assertion);
        wipe_free(assertion);
        *url = endpoint;
        break;
    case CFG_GRANT_NONE:
    case CFG_GRANT_COMMAND:
        snprintf(err, errlen, "no token endpoint grant configured");
        goto fail;
    }
    {
        size_t plen;

        *post = buf_steal(b, &plen);
    }
    buf_free(b);
    return 0;
fail:
    explicit_bzero(b->data, b->cap);
    buf_free(b);
    return -1;
}

/* ---- libcurl on libuv ---- */

static size_t on_body(char *p, size_t size, size_t n, void *arg)
{
    struct o2_req *r = arg;

    if (buf_append(r->body, p, size * n) != 0)
        return 0; /* too large: curl fails the transfer with CURLE_WRITE_ERROR */
    return size * n;
}

/* Applies the options common to every request to the token endpoint. */
static void easy_common(CURL *e, const struct cfg_upstream *up, char *errbuf)
{
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    curl_easy_setopt(e, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (up->oauth2_ca_file != NULL) {
        curl_easy_setopt(e, CURLOPT_CAINFO, up->oauth2_ca_file);
        curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    }
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, O2_CONNECT_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_TIMEOUT, O2_REQUEST_TIMEOUT);
    curl_easy_setopt(e, CURLOPT_USERAGENT, O2_USER_AGENT);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    errbuf[0] = '\0';
}

/* "TLS: ..." or "network: ..." for a failed transfer, into out. */
static void curl_failure(CURLcode rc, const char *errbuf, const char *host, char *out,
                         size_t outlen)
{
    const char *kind = "";

    switch (rc) {
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
        kind = "TLS: ";
        break;
    default:
        break;
    }
    snprintf(out, outlen, "token endpoint %s: %s%s%s%s", host, kind, curl_easy_strerror(rc),
             errbuf[0] != '\0' ? ": " : "", errbuf);
    sanitize(out, outlen > 400 ? 400 : outlen - 1);
}

static void url_host(const char *url, char *out, size_t outlen)
{
    const char *h = strstr(url, "://");

    h = h != NULL ? h + 3 : url;
    snprintf(out, outlen, "%.*s", (int)strcspn(h, "/?#"), h);
}

static void req_free(struct o2_req *r)
{
    if (r->easy != NULL)
        curl_easy_cleanup(r->easy);
    curl_slist_free_all(r->hdrs);
    if (r->post != NULL) {
        explicit_bzero(r->post, r->postlen);
        free(r->post);
    }
    if (r->body != NULL) {
        explicit_bzero(r->body->data, r->body->cap);
        buf_free(r->body);
    }
    free(r);
}

static void req_done(struct oauth2 *o, CURL *easy, CURLcode rc)
{
    struct o2_req *r = NULL;
    struct o2_acct *a;
    struct oauth2_resp resp;
    char why[500];
    long status = 0;

    curl_easy_getinfo(easy, CURLINFO_PRIVATE, (char **)&r);
    curl_multi_remove_handle(o->multi, easy);
    a = r->a;
    if (a != NULL)
        a->req = NULL;
    if (a == NULL) {
        req_free(r);
        return;
    }
    if (rc != CURLE_OK) {
        if (rc == CURLE_WRITE_ERROR)
            snprintf(why, sizeof why, "token endpoint %s: reply larger than %d bytes", r->host,
                     O2_BODY_MAX);
        else
            curl_failure(rc, r->errbuf, r->host, why, sizeof why);
        req_free(r);
        acct_fail(a, "%s", why);
        return;
    }
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    if (oauth2_resp_parse(status, r->body->data, r->body->len, &resp, why, sizeof why) != 0) {
        char host[128];

        snprintf(host, sizeof host, "%s", r->host);
        oauth2_resp_clear(&resp);
        req_free(r);
        acct_fail(a, "token endpoint %s said %s", host, why);
        return;
    }
    req_free(r);
    acct_success(a, &resp);
    oauth2_resp_clear(&resp);
}

static void check_multi(struct oauth2 *o)
{
    CURLMsg *m;
    int pending;

    while ((m = curl_multi_info_read(o->multi, &pending)) != NULL)
        if (m->msg == CURLMSG_DONE)
            req_done(o, m->easy_handle, m->data.result);
}

static void handle_closed(uv_handle_t *h)
{
    struct oauth2 *o = h->data;

    if (h->type == UV_POLL)
        free(O2_CONTAINER(h, struct o2_sock, poll));
    if (--o->open_handles == 0 && o->stopping && o->stopped != NULL) {
        void (*fn)(void *) = o->stopped;

        o->stopped = NULL;
        fn(o->stopped_arg);
    }
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct o2_sock *s = O2_CONTAINER(h, struct o2_sock, poll);
    struct oauth2 *o = s->o;
    int flags = 0, running;

    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    curl_multi_socket_action(o->multi, s->fd, flags, &running);
    check_multi(o);
}

static int on_curl_socket(CURL *e, curl_socket_t fd, int what, void *userp, void *socketp)
{
    struct oauth2 *o = userp;
    struct o2_sock *s = socketp;
    int events = 0;

    (void)e;
    if (what == CURL_POLL_REMOVE) {
        if (s != NULL) {
            uv_poll_stop(&s->poll);
            curl_multi_assign(o->multi, fd, NULL);
            uv_close((uv_handle_t *)&s->poll, handle_closed);
        }
        return 0;
    }
    if (s == NULL) {
        s = xcalloc(1, sizeof(*s));
        s->fd = fd;
        s->o = o;
        if (uv_poll_init_socket(o->loop, &s->poll, fd) != 0) {
            free(s);
            return -1;
        }
        s->poll.data = o;
        o->open_handles++;
        curl_multi_assign(o->multi, fd, s);
    }
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

static void on_curl_timeout(uv_timer_t *t)
{
    struct oauth2 *o = t->data;
    int running;

    curl_multi_socket_action(o->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi(o);
}

static int on_curl_timer(CURLM *m, long timeout_ms, void *userp)
{
    struct oauth2 *o = userp;

    (void)m;
    if (o->stopping)
        return 0;
    if (timeout_ms < 0)
        uv_timer_stop(&o->curl_timer);
    else
        uv_timer_start(&o->curl_timer, on_curl_timeout, (uint64_t)timeout_ms, 0);
    return 0;
}

static void start_http(struct o2_acct *a)
{
    struct oauth2 *o = a->o;
    struct o2_req *r = xcalloc(1, sizeof(*r));
    char why[500], *url = NULL;
    CURLMcode mc;

    r->a = a;
    r->body = buf_new(O2_BODY_MAX);
    if ((r->easy = curl_easy_init()) == NULL) {
        req_free(r);
        acct_fail(a, "cannot create a libcurl handle");
        return;
    }
    if (token_request(a, r->easy, &url, &r->post, why, sizeof why) != 0) {
        req_free(r);
        acct_fail(a, "%s", why);
        return;
    }
    r->postlen = strlen(r->post);
    url_host(url, r->host, sizeof r->host);
    easy_common(r->easy, a->up, r->errbuf);
    r->hdrs = curl_slist_append(NULL, "Accept: application/json");
    curl_easy_setopt(r->easy, CURLOPT_URL, url);
    curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, r->post);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE, (long)r->postlen);
    curl_easy_setopt(r->easy, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(r->easy, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_PRIVATE, (char *)r);
    free(url);
    log_debug(1, "oauth2: upstream %s: requesting a token (%s) from %s", a->up->name,
              grant_name(a->up->grant), r->host);
    a->req = r;
    if ((mc = curl_multi_add_handle(o->multi, r->easy)) != CURLM_OK) {
        a->req = NULL;
        req_free(r);
        acct_fail(a, "libcurl: %s", curl_multi_strerror(mc));
    }
}

/* ---- oauth2_token_command ---- */

static void cmd_closed(uv_handle_t *h)
{
    struct o2_cmd *c = h->data;
    struct oauth2 *o = c->o;

    if (--c->nopen > 0)
        return;
    if (c->body != NULL) {
        explicit_bzero(c->body->data, c->body->cap);
        buf_free(c->body);
    }
    free(c);
    if (--o->open_handles == 0 && o->stopping && o->stopped != NULL) {
        void (*fn)(void *) = o->stopped;

        o->stopped = NULL;
        fn(o->stopped_arg);
    }
}

static void cmd_close(struct o2_cmd *c)
{
    uv_timer_stop(&c->timer);
    if (!uv_is_closing((uv_handle_t *)&c->timer))
        uv_close((uv_handle_t *)&c->timer, cmd_closed);
    if (!uv_is_closing((uv_handle_t *)&c->out))
        uv_close((uv_handle_t *)&c->out, cmd_closed);
    if (!uv_is_closing((uv_handle_t *)&c->proc))
        uv_close((uv_handle_t *)&c->proc, cmd_closed);
}

/* Both the exit and the end of output have been seen: judge the run. */
static void cmd_finish(struct o2_cmd *c)
{
    struct o2_acct *a = c->a;
    struct oauth2_resp resp;
    char why[500], *p, *nl;

    if (!(c->exited && c->eof) && !c->timed_out)
        return;
    if (a == NULL) {
        cmd_close(c);
        return;
    }
    a->cmd = NULL;
    c->a = NULL;
    memset(&resp, 0, sizeof resp);
    if (c->timed_out) {
        cmd_close(c);
        acct_fail(a, "oauth2_token_command did not finish within %d s",
                  O2_COMMAND_TIMEOUT_MS / 1000);
        return;
    }
    if (c->signal != 0 || c->status != 0) {
        if (c->signal != 0)
            snprintf(why, sizeof why, "oauth2_token_command was killed by signal %d", c->signal);
        else
            snprintf(why, sizeof why, "oauth2_token_command exited with status %lld",
                     (long long)c->status);
        cmd_close(c);
        acct_fail(a, "%s", why);
        return;
    }
    p = c->body->data + strspn(c->body->data, " \t\r\n");
    if (*p == '{') {
        if (oauth2_resp_parse(200, p, strlen(p), &resp, why, sizeof why) != 0) {
            oauth2_resp_clear(&resp);
            cmd_close(c);
            acct_fail(a, "oauth2_token_command printed %s", why);
            return;
        }
    } else {
        if ((nl = strpbrk(p, "\r\n")) != NULL)
            *nl = '\0';
        if (*p == '\0' || strpbrk(p, " \t\x01") != NULL) {
            cmd_close(c);
            acct_fail(a, "oauth2_token_command printed no token (one line, no spaces)");
            return;
        }
        resp.access_token = xstrdup(p);
        resp.expires_in = O2_DEFAULT_LIFETIME;
    }
    cmd_close(c);
    acct_success(a, &resp);
    oauth2_resp_clear(&resp);
}

static void cmd_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    static char scratch[4096];

    (void)h;
    (void)suggested;
    b->base = scratch;
    b->len = sizeof scratch;
}

static void cmd_read(uv_stream_t *s, ssize_t n, const uv_buf_t *b)
{
    struct o2_cmd *c = s->data;

    if (n > 0) {
        if (buf_append(c->body, b->base, (size_t)n) != 0)
            buf_reset(c->body); /* too much: not a token; judged as no token */
        explicit_bzero(b->base, (size_t)n);
        return;
    }
    if (n < 0) {
        uv_read_stop(s);
        c->eof = 1;
        cmd_finish(c);
    }
}

static void cmd_exit(uv_process_t *p, int64_t status, int sig)
{
    struct o2_cmd *c = p->data;

    c->exited = 1;
    c->status = status;
    c->signal = sig;
    cmd_finish(c);
}

static void cmd_timeout(uv_timer_t *t)
{
    struct o2_cmd *c = t->data;

    c->timed_out = 1;
    if (!c->exited)
        uv_process_kill(&c->proc, SIGKILL);
    cmd_finish(c);
}

static void start_command(struct o2_acct *a)
{
    struct oauth2 *o = a->o;
    struct o2_cmd *c = xcalloc(1, sizeof(*c));
    uv_process_options_t opts;
    uv_stdio_container_t stdio[3];
    char *args[4], *env[64], *e_up, *e_user;
    extern char **environ;
    size_t n = 0, i;
    int rc;

    c->a = a;
    c->o = o;
    c->body = buf_new(O2_BODY_MAX);
    uv_pipe_init(o->loop, &c->out, 0);
    c->out.data = c;
    uv_timer_init(o->loop, &c->timer);
    c->timer.data = c;
    c->proc.data = c;
    e_up = xasprintf("RELAYD_UPSTREAM=%s", a->up->name);
    e_user = xasprintf("RELAYD_USERNAME=%s", a->up->username);
    for (i = 0; environ[i] != NULL && n < 60; i++)
        if (strncmp(environ[i], "RELAYD_", 7) != 0)
            env[n++] = environ[i];
    env[n++] = e_up;
    env[n++] = e_user;
    env[n] = NULL;
    args[0] = "/bin/sh";
    args[1] = "-c";
    args[2] = a->up->oauth2_token_command;
    args[3] = NULL;
    memset(&opts, 0, sizeof opts);
    stdio[0].flags = UV_IGNORE;
    stdio[1].flags = UV_CREATE_PIPE | UV_WRITABLE_PIPE;
    stdio[1].data.stream = (uv_stream_t *)&c->out;
    stdio[2].flags = UV_INHERIT_FD; /* its complaints go to relayd's log */
    stdio[2].data.fd = 2;
    opts.file = args[0];
    opts.args = args;
    opts.env = env;
    opts.stdio = stdio;
    opts.stdio_count = 3;
    opts.exit_cb = cmd_exit;
    rc = uv_spawn(o->loop, &c->proc, &opts);
    free(e_up);
    free(e_user);
    c->nopen = 3;
    o->open_handles++;
    if (rc != 0) {
        c->a = NULL;
        cmd_close(c);
        acct_fail(a, "oauth2_token_command: cannot start /bin/sh: %s", uv_strerror(rc));
        return;
    }
    a->cmd = c;
    uv_read_start((uv_stream_t *)&c->out, cmd_alloc, cmd_read);
    uv_timer_start(&c->timer, cmd_timeout, O2_COMMAND_TIMEOUT_MS, 0);
}

/* ---- accounts ---- */

static void acct_timer_cb(uv_timer_t *t);

static void acct_arm(struct o2_acct *a, uint64_t at)
{
    uint64_t now = now_ms(a->o);

    if (a->o->stopping)
        return;
    uv_timer_start(&a->timer, acct_timer_cb, at > now ? at - now : 0, 0);
}

static void acct_notify(struct o2_acct *a, const char *token, const char *err)
{
    struct o2_waiter *w = a->waiters, *next;

    a->waiters = NULL;
    for (; w != NULL; w = next) {
        next = w->next;
        w->cb(w->arg, token, err);
        free(w);
    }
}

static void acct_drop_token(struct o2_acct *a)
{
    wipe_free(a->token);
    a->token = NULL;
    a->after_535 = 0;
}

static void acct_success(struct o2_acct *a, struct oauth2_resp *r)
{
    const struct cfg_upstream *up = a->up;
    uint64_t now = now_ms(a->o), life, margin;
    char why[400];

    if (r->refresh_token != NULL && up->grant == CFG_GRANT_REFRESH_TOKEN) {
        char *cur = NULL;

        /* Rotation (Microsoft always, Google sometimes): the old one may stop working. */
        if (refresh_token_read(a, &cur, why, sizeof why) != 0 || strcmp(cur, r->refresh_token)) {
            wipe_free(a->rotated);
            a->rotated = xstrdup(r->refresh_token);
            if (oauth2_file_write(up->refresh_token_file, a->rotated, why, sizeof why) != 0) {
                log_error("oauth2: upstream %s: cannot store the rotated refresh token: %s "
                          "(kept in memory; relayd retries at the next refresh)",
                          up->name, why);
            } else {
                log_info("oauth2: upstream %s: refresh token rotated, written to %s", up->name,
                         up->refresh_token_file);
                wipe_free(a->rotated);
                a->rotated = NULL;
            }
        }
        wipe_free(cur);
    }
    acct_drop_token(a);
    a->token = r->access_token;
    r->access_token = NULL;
    a->after_535 = a->forced;
    a->forced = 0;
    life = (uint64_t)(r->expires_in > 0 ? r->expires_in : O2_DEFAULT_LIFETIME) * 1000;
    margin = (uint64_t)up->oauth2_refresh_margin * 1000;
    if (margin > life / 2)
        margin = life / 2;
    a->expires_at = now + life;
    a->refresh_at = a->expires_at - margin;
    a->stale_at = a->expires_at - margin / 2;
    a->failures = 0;
    a->next_try = 0;
    a->lasterr[0] = '\0';
    log_info("oauth2: upstream %s: token refreshed, expires in %llu s", up->name,
             (unsigned long long)(life / 1000));
    acct_arm(a, a->refresh_at);
    acct_notify(a, a->token, NULL);
}

static void acct_fail(struct o2_acct *a, const char *fmt, ...)
{
    uint64_t backoff = O2_BACKOFF_FIRST_MS;
    char why[500];
    va_list ap;
    int i;

    va_start(ap, fmt);
    vsnprintf(why, sizeof why, fmt, ap);
    va_end(ap);
    a->forced = 0;
    a->failures++;
    for (i = 1; i < a->failures && backoff < O2_BACKOFF_MAX_MS; i++)
        backoff *= 2;
    if (backoff > O2_BACKOFF_MAX_MS)
        backoff = O2_BACKOFF_MAX_MS;
    a->next_try = now_ms(a->o) + backoff;
    snprintf(a->lasterr, sizeof a->lasterr, "oauth2: %s", why);
    log_warn("oauth2: upstream %s: token refresh failed (%s, next try in %llu s): %s",
             a->up->name, grant_name(a->up->grant), (unsigned long long)(backoff / 1000), why);
    acct_arm(a, a->next_try);
    acct_notify(a, NULL, a->lasterr);
}

static void acct_kick(struct o2_acct *a)
{
    if (a->req != NULL || a->cmd != NULL || a->o->stopping)
        return;
    if (a->up->grant == CFG_GRANT_COMMAND)
        start_command(a);
    else
        start_http(a);
}

static void acct_timer_cb(uv_timer_t *t)
{
    struct o2_acct *a = t->data;
    uint64_t now = now_ms(a->o);

    if (a->token != NULL && now < a->refresh_at) {
        acct_arm(a, a->refresh_at); /* a clock that moved slower than the timer */
        return;
    }
    acct_kick(a);
}

static struct o2_acct *acct_find(struct oauth2 *o, const struct cfg_upstream *up)
{
    int i;

    if (o == NULL || up == NULL)
        return NULL;
    for (i = 0; i < o->naccts; i++)
        if (o->accts[i].up == up || strcmp(o->accts[i].up->name, up->name) == 0)
            return &o->accts[i];
    return NULL;
}

/* ---- public ---- */

struct oauth2 *oauth2_new(uv_loop_t *loop, const struct cfg *cfg)
{
    struct oauth2 *o = xcalloc(1, sizeof(*o));
    int i, n = 0;

    o->loop = loop;
    o->cfg = cfg;
    o->clock = mono_ms;
    for (i = 0; i < cfg->nupstreams; i++)
        if (cfg->upstreams[i].upauth != CFG_UPAUTH_PASSWORD)
            n++;
    o->accts = n > 0 ? xcalloc((size_t)n, sizeof(*o->accts)) : NULL;
    for (i = 0; i < cfg->nupstreams; i++) {
        struct o2_acct *a;

        if (cfg->upstreams[i].upauth == CFG_UPAUTH_PASSWORD)
            continue;
        a = &o->accts[o->naccts++];
        a->o = o;
        a->up = &cfg->upstreams[i];
        snprintf(a->lasterr, sizeof a->lasterr, "oauth2: no token yet (requesting one)");
    }
    o2_current = o;
    return o;
}

struct oauth2 *oauth2_instance(void)
{
    return o2_current;
}

void oauth2_set_clock(struct oauth2 *o, oauth2_clock_fn fn, void *arg)
{
    o->clock = fn != NULL ? fn : mono_ms;
    o->clock_arg = arg;
}

/* Lazily: relayctl and tests that never ask for a token need no handles. */
static void ensure_started(struct oauth2 *o)
{
    int i;

    if (o->started || o->stopping)
        return;
    o->started = 1;
    curl_global_init(CURL_GLOBAL_DEFAULT);
    o->multi = curl_multi_init();
    curl_multi_setopt(o->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(o->multi, CURLMOPT_SOCKETDATA, o);
    curl_multi_setopt(o->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(o->multi, CURLMOPT_TIMERDATA, o);
    uv_timer_init(o->loop, &o->curl_timer);
    o->curl_timer.data = o;
    uv_timer_init(o->loop, &o->defer);
    o->defer.data = o;
    o->open_handles += 2;
    for (i = 0; i < o->naccts; i++) {
        uv_timer_init(o->loop, &o->accts[i].timer);
        o->accts[i].timer.data = &o->accts[i];
        o->open_handles++;
    }
}

void oauth2_start(struct oauth2 *o)
{
    int i;

    if (o->naccts == 0)
        return;
    ensure_started(o);
    for (i = 0; i < o->naccts; i++)
        acct_kick(&o->accts[i]);
}

void oauth2_stop(struct oauth2 *o, void (*done)(void *arg), void *arg)
{
    int i;

    o->stopping = 1;
    o->stopped = done;
    o->stopped_arg = arg;
    if (!o->started) {
        o->stopped = NULL;
        if (done != NULL)
            done(arg);
        return;
    }
    o->open_handles++; /* hold: no done before everything below was issued */
    for (i = 0; i < o->naccts; i++) {
        struct o2_acct *a = &o->accts[i];

        if (a->req != NULL) {
            curl_multi_remove_handle(o->multi, a->req->easy);
            req_free(a->req);
            a->req = NULL;
        }
        if (a->cmd != NULL) {
            a->cmd->a = NULL;
            if (!a->cmd->exited)
                uv_process_kill(&a->cmd->proc, SIGKILL);
            cmd_close(a->cmd);
            a->cmd = NULL;
        }
        acct_notify(a, NULL, "oauth2: relayd is stopping");
        a->timer.data = o;
        uv_close((uv_handle_t *)&a->timer, handle_closed);
    }
    curl_multi_cleanup(o->multi); /* removes its sockets through on_curl_socket */
    o->multi = NULL;
    uv_close((uv_handle_t *)&o->curl_timer, handle_closed);
    uv_close((uv_handle_t *)&o->defer, handle_closed);
    if (--o->open_handles == 0 && o->stopped != NULL) {
        o->stopped = NULL;
        done(arg);
    }
}

struct oauth2 *oauth2_free(struct oauth2 *o)
{
    int i;

    if (o == NULL)
        return NULL;
    for (i = 0; i < o->naccts; i++) {
        acct_drop_token(&o->accts[i]);
        wipe_free(o->accts[i].rotated);
    }
    free(o->accts);
    if (o->started)
        curl_global_cleanup();
    if (o2_current == o)
        o2_current = NULL;
    free(o);
    return NULL;
}

const char *oauth2_mechanism(const struct cfg_upstream *up)
{
    switch (up->upauth) {
    case CFG_UPAUTH_XOAUTH2: return "XOAUTH2";
    case CFG_UPAUTH_OAUTHBEARER: return "OAUTHBEARER";
    case CFG_UPAUTH_PASSWORD: break;
    }
    return NULL;
}

const char *oauth2_token_peek(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);
    uint64_t now;

    if (a == NULL || o->stopping)
        return NULL;
    ensure_started(o);
    now = now_ms(o);
    if (a->token != NULL && now < a->stale_at) {
        if (now >= a->refresh_at)
            acct_kick(a); /* the timer may not have run yet */
        return a->token;
    }
    if (a->token != NULL)
        acct_drop_token(a); /* in its last margin/2: the refresh did not make it in time */
    if (now >= a->next_try)
        acct_kick(a);
    return NULL;
}

void oauth2_invalidate(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);

    if (a == NULL || o->stopping)
        return;
    ensure_started(o);
    if (a->token == NULL)
        return; /* already dropped (another delivery saw the 535) */
    if (a->after_535) {
        acct_drop_token(a);
        acct_fail(a, "upstream %s refused a token issued right after an earlier 535: check "
                  "that mailbox %s may send through it (Microsoft 365: SMTP AUTH enabled, "
                  "SMTP.SendAsApp/SMTP.Send and the mailbox permission granted)",
                  up->name, up->username);
        return;
    }
    log_warn("oauth2: upstream %s: the upstream refused the token; refreshing once", up->name);
    acct_drop_token(a);
    a->forced = 1;
    a->next_try = 0;
    acct_kick(a);
}

const char *oauth2_last_error(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);

    if (a == NULL) {
        if (o == NULL)
            return "oauth2: no token manager";
        snprintf(o->errtmp, sizeof o->errtmp, "oauth2: upstream %s does not use OAuth 2.0",
                 up != NULL ? up->name : "?");
        return o->errtmp;
    }
    if (a->lasterr[0] == '\0' && (a->req != NULL || a->cmd != NULL))
        return "oauth2: token refresh in progress";
    if (a->lasterr[0] == '\0' && a->token == NULL)
        return "oauth2: no valid token";
    return a->lasterr;
}

long oauth2_token_ttl(struct oauth2 *o, const struct cfg_upstream *up)
{
    struct o2_acct *a = acct_find(o, up);
    uint64_t now;

    if (a == NULL || a->token == NULL)
        return -1;
    now = now_ms(o);
    return a->expires_at > now ? (long)((a->expires_at - now) / 1000) : 0;
}

static void on_defer(uv_timer_t *t)
{
    struct oauth2 *o = t->data;
    uint64_t now = now_ms(o);
    int i;

    for (i = 0; i < o->naccts; i++) {
        struct o2_acct *a = &o->accts[i];

        if (a->waiters == NULL)
            continue;
        if (a->token != NULL && now < a->stale_at)
            acct_notify(a, a->token, NULL);
        else if (a->req == NULL && a->cmd == NULL && a->failures > 0)
            acct_notify(a, NULL, a->lasterr); /* backing off: say why now */
    }
}

int oauth2_token_get(struct oauth2 *o, const struct cfg_upstream *up, oauth2_token_cb cb,
                     void *arg)
{
    struct o2_acct *a = acct_find(o, up);
    struct o2_waiter *w;

    if (a == NULL || o->stopping)
        return -1;
    w = xcalloc(1, sizeof(*w));
    w->cb = cb;
    w->arg = arg;
    w->next = a->waiters;
    a->waiters = w;
    /* Either a token is there, or a request is (or is not, when backing off): the
     * deferred check answers the first and last case, the request's end the other. */
    (void)oauth2_token_peek(o, up);
    uv_timer_start(&o->defer, on_defer, 0, 0);
    return 0;
}

/* ---- relayctl oauth2 ---- */

struct cli_get {
    int done;
    int ok;
    char err[600];
};

static void cli_got(void *arg, const char *token, const char *err)
{
    struct cli_get *g = arg;

    g->done = 1;
    g->ok = token != NULL;
    if (err != NULL)
        snprintf(g->err, sizeof g->err, "%s", err);
}

static void cli_stopped(void *arg)
{
    (void)arg;
}

static int cli_token(const struct cfg *cfg, const struct cfg_upstream *up)
{
    uv_loop_t loop;
    struct oauth2 *o;
    struct cli_get g = {0, 0, ""};
    long ttl;
    int i;

    uv_loop_init(&loop);
    o = oauth2_new(&loop, cfg);
    ensure_started(o);
    if (oauth2_token_get(o, up, cli_got, &g) == 0) {
        /* Bounded: the request has its own 30 s timeout, the command its own. */
        for (i = 0; i < 600 && !g.done; i++)
            uv_run(&loop, UV_RUN_ONCE);
    }
    ttl = oauth2_token_ttl(o, up);
    oauth2_stop(o, cli_stopped, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    oauth2_free(o);
    if (!g.ok) {
        fprintf(stderr, "relayctl: oauth2 token %s: %s\n", up->name,
                g.err[0] ? g.err : "oauth2: no answer");
        return 1;
    }
    printf("oauth2: upstream %s: token ok (grant %s, %s as %s, expires in %ld s)\n", up->name,
           grant_name(up->grant), oauth2_mechanism(up), up->username, ttl);
    return 0;
}

int oauth2_probe_token(uv_loop_t *loop, const struct cfg *cfg, const struct cfg_upstream *up,
                       struct oauth2 **out, char *text, size_t textlen)
{
    struct cli_get g = {0, 0, ""};
    int i;

    *out = oauth2_new(loop, cfg);
    ensure_started(*out);
    if (oauth2_token_get(*out, up, cli_got, &g) != 0) {
        snprintf(text, textlen, "oauth2: upstream %s does not use OAuth 2.0", up->name);
        return -1;
    }
    for (i = 0; i < 600 && !g.done; i++)
        uv_run(loop, UV_RUN_ONCE);
    if (!g.ok) {
        snprintf(text, textlen, "%s", g.err[0] ? g.err : "oauth2: no answer");
        return -1;
    }
    snprintf(text, textlen, "oauth2: token ok (grant %s, %s as %s, expires in %ld s)",
             grant_name(up->grant), oauth2_mechanism(up), up->username,
             oauth2_token_ttl(*out, up));
    return 0;
}

/* One blocking POST for the device flow; 0 with the parsed JSON in *j (any status). */
static int cli_post(const struct cfg_upstream *up, const char *url, const char *post,
                    long *status, struct oauth2_json **j, char *err, size_t errlen)
{
    CURL *e = curl_easy_init();
    struct o2_req r;
    char jerr[128], host[128];
    CURLcode rc;

    memset(&r, 0, sizeof r);
    *j = NULL;
    if (e == NULL) {
        snprintf(err, errlen, "cannot create a libcurl handle");
        return -1;
    }
    r.body = buf_new(O2_BODY_MAX);
    url_host(url, host, sizeof host);
    easy_common(e, up, r.errbuf);
    r.hdrs = curl_slist_append(NULL, "Accept: application/json");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r.hdrs);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, post);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &r);
    rc = curl_easy_perform(e);
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, status);
    curl_easy_cleanup(e);
    curl_slist_free_all(r.hdrs);
    if (rc != CURLE_OK) {
        curl_failure(rc, r.errbuf, host, err, errlen);
        buf_free(r.body);
        return -1;
    }
    *j = oauth2_json_parse(r.body->data, r.body->len, jerr, sizeof jerr);
    explicit_bzero(r.body->data, r.body->cap);
    buf_free(r.body);
    if (*j == NULL) {
        snprintf(err, errlen, "%s answered HTTP %ld without JSON (%s)", host, *status, jerr);
        return -1;
    }
    return 0;
}

static int cli_authorize(const struct cfg_upstream *up)
{
    struct buf *b = buf_new(0);
    struct oauth2_json *j = NULL;
    CURL *esc = curl_easy_init();
    char err[600], *device_code = NULL;
    const char *v, *uri;
    long status = 0, interval, expires;
    time_t deadline;
    int rc = 1;

    if (up->grant != CFG_GRANT_REFRESH_TOKEN) {
        fprintf(stderr, "relayctl: oauth2 authorize %s: needs oauth2_grant = refresh_token "
                "(this upstream uses %s)\n", up->name, grant_name(up->grant));
        goto done;
    }
    if (up->device_endpoint == NULL) {
        fprintf(stderr, "relayctl: oauth2 authorize %s: no device_endpoint (set it, or "
                "provider = microsoft | google)\n", up->name);
        goto done;
    }
    /* RFC 8628 3.1: the device authorization request. */
    form_add(b, esc, "client_id", up->client_id);
    form_add(b, esc, "scope", up->scope != NULL ? up->scope : "");
    if (cli_post(up, up->device_endpoint, b->data, &status, &j, err, sizeof err) != 0) {
        fprintf(stderr, "relayctl: oauth2 authorize %s: device endpoint: %s\n", up->name, err);
        goto done;
    }
    if (status != 200 || oauth2_json_get(j, "device_code") == NULL) {
        v = oauth2_json_get(j, "error_description");
        fprintf(stderr, "relayctl: oauth2 authorize %s: device endpoint said %s%s%.300s "
                "(HTTP %ld)\n", up->name,
                oauth2_json_get(j, "error") ? oauth2_json_get(j, "error") : "no device_code",
                v ? ": " : "", v ? v : "", status);
        goto done;
    }
    device_code = xstrdup(oauth2_json_get(j, "device_code"));
    /* Google says verification_url, RFC 8628 and Microsoft verification_uri. */
    uri = oauth2_json_get(j, "verification_uri");
    if (uri == NULL)
        uri = oauth2_json_get(j, "verification_url");
    interval = (v = oauth2_json_get(j, "interval")) != NULL ? strtol(v, NULL, 10) : 5;
    expires = (v = oauth2_json_get(j, "expires_in")) != NULL ? strtol(v, NULL, 10) : 900;
    if (interval < 1)
        interval = 1;
    if (interval > 60)
        interval = 60;
    if (expires < 1 || expires > 3600)
        expires = 900;
    printf("To authorize relayd for upstream %s, sign in as %s:\n"
           "  open   %s\n"
           "  enter  %s\n"
           "Waiting up to %ld s (polling every %ld s)...\n",
           up->name, up->username, uri != NULL ? uri : "(no verification URI given)",
           oauth2_json_get(j, "user_code") ? oauth2_json_get(j, "user_code") : "(none)",
           expires, interval);
    fflush(stdout);
    j = oauth2_json_free(j);
    deadline = time(NULL) + expires;
    while (time(NULL) < deadline) {
        struct timespec ts = {interval, 0};

        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        buf_reset(b);
        /* RFC 8628 3.4. */
        form_add(b, esc, "grant_type", O2_GRANT_DEVICE);
        form_add(b, esc, "device_code", device_code);
        form_add(b, esc, "client_id", up->client_id);
        if (up->client_secret != NULL)
            form_add(b, esc, "client_secret", up->client_secret);
        if (cli_post(up, up->token_endpoint, b->data, &status, &j, err, sizeof err) != 0) {
            fprintf(stderr, "relayctl: oauth2 authorize %s: %s\n", up->name, err);
            goto done;
        }
        v = oauth2_json_get(j, "error");
        if (v != NULL && strcmp(v, "authorization_pending") == 0) {
            j = oauth2_json_free(j);
            continue;
        }
        if (v != NULL && strcmp(v, "slow_down") == 0) {
            interval += 5; /* RFC 8628 3.5 */
            j = oauth2_json_free(j);
            continue;
        }
        if (v != NULL || status != 200) {
            const char *d = oauth2_json_get(j, "error_description");

            fprintf(stderr, "relayctl: oauth2 authorize %s: token endpoint said %.64s%s%.300s "
                    "(HTTP %ld)\n", up->name, v != NULL ? v : "no token", d ? ": " : "",
                    d ? d : "", status);
            goto done;
        }
        if ((v = oauth2_json_get(j, "refresh_token")) == NULL) {
            fprintf(stderr, "relayctl: oauth2 authorize %s: the answer has no refresh_token "
                    "(Microsoft: scope needs offline_access)\n", up->name);
            goto done;
        }
        if (oauth2_file_write(up->refresh_token_file, v, err, sizeof err) != 0) {
            fprintf(stderr, "relayctl: oauth2 authorize %s: %s\n", up->name, err);
            goto done;
        }
        printf("Authorized.  Refresh token stored in %s (mode 0600); relayd uses it from its "
               "next token refresh on.\n", up->refresh_token_file);
        rc = 0;
        goto done;
    }
    fprintf(stderr, "relayctl: oauth2 authorize %s: nobody signed in within %ld s\n", up->name,
            expires);
done:
    oauth2_json_free(j);
    wipe_free(device_code);
    explicit_bzero(b->data, b->cap);
    buf_free(b);
    if (esc != NULL)
        curl_easy_cleanup(esc);
    return rc;
}

int oauth2_cli(const struct cfg *cfg, int argc, char **argv)
{
    const struct cfg_upstream *up = NULL;
    int i, rc;

    if (argc != 2 || (strcmp(argv[0], "authorize") != 0 && strcmp(argv[0], "token") != 0)) {
        fprintf(stderr, "usage: relayctl [-c FILE] oauth2 authorize|token UPSTREAM\n");
        return 2;
    }
    for (i = 0; i < cfg->nupstreams && up == NULL; i++)
        if (strcmp(cfg->upstreams[i].name, argv[1]) == 0)
            up = &cfg->upstreams[i];
    if (up == NULL) {
        fprintf(stderr, "relayctl: oauth2 %s %s: no [upstream %s] in %s\n", argv[0], argv[1],
                argv[1], cfg->path != NULL ? cfg->path : "the configuration");
        return 1;
    }
    if (up->upauth == CFG_UPAUTH_PASSWORD) {
        fprintf(stderr, "relayctl: oauth2 %s %s: the upstream uses auth = password\n", argv[0],
                up->name);
        return 1;
    }
    if (strcmp(argv[0], "token") == 0)
        return cli_token(cfg, up);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = cli_authorize(up);
    curl_global_cleanup();
    return rc;
}

int oauth2_cli_main(const char *config, int argc, char **argv)
{
    struct cfg cfg;
    char err[1024];
    int rc;

    if ((rc = cfg_load(config, &cfg, err, sizeof err)) != 0) {
        fprintf(stderr, "relayctl: %s\n", err[0] ? err : strerror(-rc));
        return 1;
    }
    rc = oauth2_cli(&cfg, argc, argv);
    cfg_free(&cfg);
    return rc;
}
