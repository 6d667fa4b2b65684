/*
 * json - a small JSON reader (one object of scalars: token responses, service account
 * keys) and the one JSON string writer (relayctl's --json output, JWT claims); see json.h.
 */
#include "common/json.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"

#define JSON_DEPTH_MAX 32

/* Values may be secrets (tokens): wiped before free. */
static void wipe_free(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

/* ---- writer ---- */

/* Length of a valid UTF-8 sequence at s (max n bytes), or 0 when invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    size_t len;
    uint32_t cp;

    if (s[0] < 0x80)
        return 1;
    if ((s[0] & 0xE0) == 0xC0) {
        len = 2;
        cp = s[0] & 0x1F;
    } else if ((s[0] & 0xF0) == 0xE0) {
        len = 3;
        cp = s[0] & 0x0F;
    } else if ((s[0] & 0xF8) == 0xF0) {
        len = 4;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    /* Reject overlong forms, surrogates and values past U+10FFFF. */
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        return 0;
    return len;
}

void json_quote_n(struct buf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;

    buf_puts(b, "\"");
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        size_t k;

        switch (c) {
        case '"':
            buf_puts(b, "\\\"");
            break;
        case '\\':
            buf_puts(b, "\\\\");
            break;
        case '\n':
            buf_puts(b, "\\n");
            break;
        case '\r':
            buf_puts(b, "\\r");
            break;
        case '\t':
            buf_puts(b, "\\t");
            break;
        default:
            if (c < 0x20 || c == 0x7F) {
                buf_printf(b, "\\u%04x", c);
            } else if ((k = utf8_len(p + i, n - i)) == 0) {
                buf_puts(b, "\\ufffd");
            } else {
                buf_append(b, s + i, k);
                i += k;
                continue;
            }
        }
        i++;
    }
    buf_puts(b, "\"");
}

void json_quote(struct buf *b, const char *s)
{
    if (s == NULL)
        buf_puts(b, "null");
    else
        json_quote_n(b, s, strlen(s));
}

void json_fput_n(FILE *out, const char *s, size_t n)
{
    struct buf *b = buf_new(0);

    json_quote_n(b, s, n);
    fwrite(b->data, 1, b->len, out);
    buf_free(b);
}

void json_fput(FILE *out, const char *s)
{
    if (s == NULL)
        fputs("null", out);
    else
        json_fput_n(out, s, strlen(s));
}

/* ---- reader: just enough for token responses and service account keys ---- */

struct json_obj {
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
        case '"':
        case '\\':
        case '/':
            if (out != NULL)
                buf_append(out, p->s, 1);
            break;
        case 'b':
            if (out != NULL)
                buf_puts(out, "\b");
            break;
        case 'f':
            if (out != NULL)
                buf_puts(out, "\f");
            break;
        case 'n':
            if (out != NULL)
                buf_puts(out, "\n");
            break;
        case 'r':
            if (out != NULL)
                buf_puts(out, "\r");
            break;
        case 't':
            if (out != NULL)
                buf_puts(out, "\t");
            break;
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

    if (depth > JSON_DEPTH_MAX)
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

struct json_obj *json_obj_free(struct json_obj *j)
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

struct json_obj *json_obj_parse(const char *text, size_t len, char *err, size_t errlen)
{
    struct jp p = {text, text + len, err, errlen, 0};
    struct json_obj *j = xcalloc(1, sizeof(*j));
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
        return json_obj_free(j);
    return j;
}

const char *json_obj_get(const struct json_obj *j, const char *key)
{
    size_t i;

    for (i = 0; j != NULL && i < j->n; i++)
        if (strcmp(j->keys[i], key) == 0)
            return j->vals[i];
    return NULL;
}
