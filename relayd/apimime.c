/*
 * apimime - the copy of a message that an HTTP mail API gets; see apimime.h for the
 * envelope design.
 *
 * apimime_for_api() works on the raw bytes: the header section is cut into fields by hand
 * (a field is its first line plus the continuation lines that start with SP or HT), and only
 * the To/Cc/Bcc fields that must change are rebuilt; every other byte is copied.  Address
 * lists are split by a small tokenizer that knows quoted strings, comments, angle brackets
 * and groups: the addresses only have to be found and compared, never decoded, so the
 * display names of the addresses kept are copied as written.  GMime parses whole messages
 * (apimime_graph_split) and the From: list (apimime_from_address); it never re-serializes
 * the copy apimime_for_api() makes.
 */
#include "relayd/apimime.h"

#include <ctype.h>
#include <gmime/gmime.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/xalloc.h"

/* Where the generated address lists fold (RFC 5322 2.1.1 recommends 78 characters). */
#define APIMIME_FOLD 78

static int gmime_ready;

void apimime_init(void)
{
    if (gmime_ready)
        return;
    g_mime_init();
    gmime_ready = 1;
}

void apimime_shutdown(void)
{
    if (!gmime_ready)
        return;
    g_mime_shutdown();
    gmime_ready = 0;
}

static void seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- growing output --------------------------------------------------------------- */

struct out {
    char *data;
    size_t len, cap;
};

static void out_add(struct out *o, const void *p, size_t n)
{
    if (n == 0)
        return;
    if (o->len + n + 1 > o->cap) {
        size_t cap = o->cap ? o->cap : 256;
        while (cap < o->len + n + 1) {
            if (cap > ((size_t)-1) / 2)
                abort(); /* cannot happen with sizes that fit in memory */
            cap *= 2;
        }
        o->data = xrealloc(o->data, cap);
        o->cap = cap;
    }
    memcpy(o->data + o->len, p, n);
    o->len += n;
    o->data[o->len] = '\0';
}

static void out_str(struct out *o, const char *s)
{
    out_add(o, s, strlen(s));
}

/* ---- the header section ----------------------------------------------------------- */

enum hkind { H_OTHER, H_TO, H_CC, H_BCC, H_FROM };

struct hfield {
    size_t start;    /* first byte of the field name */
    size_t colon;    /* offset of the ':' */
    size_t end;      /* after the last line's terminator (or the end of the message) */
    size_t body_end; /* end minus that terminator */
    enum hkind kind;
};

struct header {
    struct hfield *f;
    size_t n, cap;
    size_t end;      /* where the header section ends: the blank line or the body */
    const char *eol; /* the message's line ending: "\r\n" or "\n" */
};

static enum hkind kind_of(const char *name, size_t n)
{
    if (n == 2 && strncasecmp(name, "To", 2) == 0)
        return H_TO;
    if (n == 2 && strncasecmp(name, "Cc", 2) == 0)
        return H_CC;
    if (n == 3 && strncasecmp(name, "Bcc", 3) == 0)
        return H_BCC;
    if (n == 4 && strncasecmp(name, "From", 4) == 0)
        return H_FROM;
    return H_OTHER;
}

/* The offset of the ':' ending a field name on the line [p, e), or 0 when the line is not
 * a field (RFC 5322 3.6.8: printable US-ASCII but ':'; obs-optional allows WSP before the
 * colon). */
static size_t field_colon(const char *msg, size_t p, size_t e)
{
    size_t i = p;

    while (i < e && (unsigned char)msg[i] > 32 && (unsigned char)msg[i] < 127 && msg[i] != ':')
        i++;
    if (i == p)
        return 0;
    while (i < e && (msg[i] == ' ' || msg[i] == '\t'))
        i++;
    return i < e && msg[i] == ':' ? i : 0;
}

/* Cuts the header section of msg into fields.  The section ends at the first empty line or
 * at the first line that is neither a field nor a continuation (then that line is body). */
static void header_parse(const char *msg, size_t len, struct header *h)
{
    size_t p = 0;
    int eol_known = 0;

    memset(h, 0, sizeof(*h));
    h->eol = "\r\n";
    while (p < len) {
        const char *nl = memchr(msg + p, '\n', len - p);
        size_t e = nl ? (size_t)(nl - msg) + 1 : len; /* after the terminator */
        size_t content_end = e;

        if (nl) {
            content_end = e - 1;
            if (content_end > p && msg[content_end - 1] == '\r')
                content_end--;
            if (!eol_known) {
                h->eol = content_end < e - 1 ? "\r\n" : "\n";
                eol_known = 1;
            }
        }
        if (content_end == p)
            break; /* the empty line */
        if ((msg[p] == ' ' || msg[p] == '\t') && h->n > 0) {
            h->f[h->n - 1].end = e;
            h->f[h->n - 1].body_end = content_end;
        } else {
            size_t colon = field_colon(msg, p, content_end);
            size_t nend = colon;

            if (colon == 0)
                break;
            while (nend > p && (msg[nend - 1] == ' ' || msg[nend - 1] == '\t'))
                nend--;
            if (h->n == h->cap) {
                h->cap = h->cap ? h->cap * 2 : 32;
                h->f = xrealloc(h->f, h->cap * sizeof(*h->f));
            }
            h->f[h->n].start = p;
            h->f[h->n].colon = colon;
            h->f[h->n].end = e;
            h->f[h->n].body_end = content_end;
            h->f[h->n].kind = kind_of(msg + p, nend - p);
            h->n++;
        }
        p = e;
    }
    h->end = p;
}

/* ---- address lists ---------------------------------------------------------------- */

enum ekind { E_MAILBOX, E_GROUP_OPEN, E_GROUP_CLOSE };

struct elem {
    enum ekind kind;
    size_t s, e; /* the raw text, trimmed (mailbox, or a group's "display-name:") */
    char *addr;  /* E_MAILBOX: the bare address, malloc'd ("" when none was found) */
    int keep;
    int broken; /* an unterminated quote, comment or angle-addr: never kept, since text
                 * written after it would be swallowed (an added Bcc address, say) */
};

struct alist {
    struct elem *v;
    size_t n, cap;
};

static void alist_push(struct alist *l, enum ekind kind, size_t s, size_t e, char *addr)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->v = xrealloc(l->v, l->cap * sizeof(*l->v));
    }
    l->v[l->n].kind = kind;
    l->v[l->n].s = s;
    l->v[l->n].e = e;
    l->v[l->n].addr = addr;
    l->v[l->n].keep = 1;
    l->v[l->n].broken = 0;
    l->n++;
}

static void alist_free(struct alist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i].addr);
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static int is_fws(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

static int is_atext(unsigned char c)
{
    return c >= 128 || isalnum(c) || strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

/* Steps over m[*i] inside a comment (*depth > 0) that ends before e: a quoted-pair is
 * skipped whole, nested parentheses counted. */
static void comment_step(const char *m, size_t *i, size_t e, int *depth)
{
    if (m[*i] == '\\' && *i + 1 < e)
        (*i)++;
    else if (m[*i] == '(')
        (*depth)++;
    else if (m[*i] == ')')
        (*depth)--;
}

/* [s, e) is a phrase (RFC 5322 3.2.5, obs-phrase; 8-bit text as RFC 6532 allows): words,
 * comments, white space and dots after the first word.  With lenient (a display name), it
 * may also be empty or one bare dot-atom@dot-atom (devices write "fax@corp.example
 * <fax@corp.example>"; MIME libraries take that, but not other uses of '@'). */
static int is_phrase(const char *m, size_t s, size_t e, int lenient)
{
    int words = 0, depth = 0;

    while (s < e && is_fws(m[s]))
        s++;
    while (e > s && is_fws(m[e - 1]))
        e--;
    if (lenient && memchr(m + s, '@', e - s) != NULL) {
        const char *at = memchr(m + s, '@', e - s);
        size_t a = (size_t)(at - m);
        if (memchr(at + 1, '@', e - a - 1) != NULL || a == s || a + 1 == e)
            return 0;
        for (size_t i = s; i < e; i++) {
            unsigned char c = (unsigned char)m[i];
            if (i == a)
                continue;
            if (c == '.') {
                if (i == s || i + 1 == e || i == a + 1 || i + 1 == a || m[i + 1] == '.')
                    return 0;
            } else if (!is_atext(c)) {
                return 0;
            }
        }
        return 1;
    }
    for (size_t i = s; i < e; i++) {
        unsigned char c = (unsigned char)m[i];
        if (depth > 0) {
            comment_step(m, &i, e, &depth);
        } else if (c == '(') {
            depth = 1;
        } else if (c == '"') {
            for (i++; i < e && m[i] != '"'; i++)
                if (m[i] == '\\')
                    i++;
            words++;
        } else if (c == '.') {
            if (words == 0)
                return 0;
        } else if (is_atext(c)) {
            words++;
        } else if (!is_fws((char)c)) {
            return 0;
        }
    }
    /* A display name may be only CFWS ("(fax) <a@b>"), a group's name may not. */
    return depth == 0 && (words > 0 || lenient);
}

/* The bare address of one mailbox's raw text [s, e): the angle-addr's contents when there
 * is one ("< a@b >" -> "a@b", an obs-route "@r1,@r2:" dropped), else the addr-spec with
 * comments and white space removed.  Quoted strings are kept as written. */
static char *mailbox_addr(const char *m, size_t s, size_t e)
{
    struct out o = {0};
    size_t i, as = s, ae = e;
    int depth = 0, quoted = 0, angle = 0, colon = 0;

    /* Find a top-level '<' (outside quotes and comments). */
    for (i = s; i < e; i++) {
        char c = m[i];
        if (quoted) {
            if (c == '\\' && i + 1 < e)
                i++;
            else if (c == '"')
                quoted = 0;
        } else if (depth > 0) {
            comment_step(m, &i, e, &depth);
        } else if (c == '"') {
            quoted = 1;
        } else if (c == '(') {
            depth = 1;
        } else if (c == ':') {
            colon = 1;
        } else if (c == '<') {
            angle = 1;
            as = i + 1;
            ae = as;
            while (ae < e && m[ae] != '>')
                ae++;
            break;
        }
    }
    if (angle) {
        /* name-addr: no ':' in the display name, nothing but CFWS after the '>' (a MIME
         * library reads "x: <a@b>" as a group, "<a@b> junk" as two mailboxes). */
        size_t k = ae + 1;
        depth = 0;
        for (; k < e && !colon; k++) {
            if (depth > 0) {
                comment_step(m, &k, e, &depth);
            } else if (m[k] == '(') {
                depth = 1;
            } else if (!is_fws(m[k])) {
                colon = 1;
            }
        }
        if (colon || (as - 1 > s && !is_phrase(m, s, as - 1, 1)))
            return xstrdup("");
        /* obs-route: "@a,@b:user@dom" */
        k = as;
        while (k < ae && is_fws(m[k]))
            k++;
        if (k < ae && m[k] == '@') {
            const char *c = memchr(m + k, ':', ae - k);
            if (c != NULL)
                as = (size_t)(c - m) + 1;
        }
    }
    /* White space and comments may stand only next to a '.' or the '@' (obs-local-part,
     * obs-domain): "a@x.exam ple" is not one address, and a reader that stops at the space
     * would not see the one this would make of it.  Such text gives no address. */
    depth = quoted = 0;
    int gap = 0, bad = 0;
    for (i = as; i < ae && !bad; i++) {
        char c = m[i];
        if (quoted) {
            out_add(&o, &c, 1);
            if (c == '\\' && i + 1 < ae) {
                out_add(&o, &m[++i], 1);
            } else if (c == '"') {
                quoted = 0;
            }
        } else if (depth > 0) {
            comment_step(m, &i, ae, &depth);
        } else if (c == '(' || is_fws(c)) {
            depth = c == '(';
            gap = 1;
        } else {
            if (gap && o.len > 0 && c != '.' && c != '@' && o.data[o.len - 1] != '.' &&
                o.data[o.len - 1] != '@')
                bad = 1;
            gap = 0;
            if (c == '"')
                quoted = 1;
            out_add(&o, &c, 1);
        }
    }
    if (bad)
        o.len = 0;
    if (o.data != NULL && o.len == 0)
        o.data[0] = '\0';
    return o.data ? o.data : xstrdup("");
}

static void push_item(struct alist *l, const char *m, size_t s, size_t e)
{
    while (s < e && is_fws(m[s]))
        s++;
    while (e > s && is_fws(m[e - 1]))
        e--;
    if (s == e)
        return; /* "a, , b": an empty list element (RFC 5322 obs-addr-list) */
    alist_push(l, E_MAILBOX, s, e, mailbox_addr(m, s, e));
}

/* Splits the address list [s, e) of msg into mailboxes and groups.  A ':' opens a group only
 * after a phrase (RFC 5322 3.4: display-name ":"): "a@: b@x" is no group, as a MIME library
 * would read it. */
static void alist_parse(const char *m, size_t s, size_t e, struct alist *l)
{
    size_t i, start = s;
    int depth = 0, quoted = 0, angle = 0, group = 0, special = 0;

    memset(l, 0, sizeof(*l));
    for (i = s; i < e; i++) {
        char c = m[i];
        if (quoted) {
            if (c == '\\' && i + 1 < e)
                i++;
            else if (c == '"')
                quoted = 0;
            continue;
        }
        if (depth > 0) {
            comment_step(m, &i, e, &depth);
            continue;
        }
        if (c == '"') {
            quoted = 1;
        } else if (c == '(') {
            depth = 1;
        } else if (angle) {
            if (c == '>')
                angle = 0;
        } else if (c == '<') {
            angle = 1;
            special = 1;
        } else if (c == '@' || c == '>' || c == '[' || c == ']') {
            special = 1;
        } else if (c == ',') {
            push_item(l, m, start, i);
            start = i + 1;
            special = 0;
        } else if (c == ':' && !group && !special && is_phrase(m, start, i, 0)) {
            size_t gs = start;
            while (gs < i && is_fws(m[gs]))
                gs++;
            alist_push(l, E_GROUP_OPEN, gs, i + 1, NULL);
            group = 1;
            start = i + 1;
        } else if (c == ';' && group) {
            push_item(l, m, start, i);
            alist_push(l, E_GROUP_CLOSE, i, i + 1, NULL);
            group = 0;
            start = i + 1;
            special = 0;
        }
    }
    {
        size_t before = l->n;
        push_item(l, m, start, e);
        if (l->n > before && (quoted || depth > 0 || angle))
            l->v[l->n - 1].broken = 1;
    }
    if (group)
        alist_push(l, E_GROUP_CLOSE, e, e, NULL); /* an unterminated group: close it */
}

/* Envelope and header addresses are the same mailbox: the local part exactly, the domain
 * without regard to case (RFC 5321 2.4). */
static int addr_same(const char *a, const char *b)
{
    const char *da = strrchr(a, '@'), *db = strrchr(b, '@');

    if (da == NULL || db == NULL)
        return da == db && strcmp(a, b) == 0;
    if (da - a != db - b || memcmp(a, b, (size_t)(da - a)) != 0)
        return 0;
    return strcasecmp(da, db) == 0;
}

/* ---- writing address lists -------------------------------------------------------- */

struct writer {
    struct out *o;
    const char *eol;
    size_t col;
    int first; /* nothing written after the field name yet */
    int sep;   /* the next item needs ", " before it */
};

static void w_item(struct writer *w, const char *p, size_t n, int sep_before)
{
    if (sep_before) {
        if (w->col + 2 + n > APIMIME_FOLD) {
            out_str(w->o, ",");
            out_str(w->o, w->eol);
            out_str(w->o, " ");
            w->col = 1;
        } else {
            out_str(w->o, ", ");
            w->col += 2;
        }
    } else if (!w->first && w->col + 1 + n > APIMIME_FOLD) {
        out_str(w->o, w->eol);
        out_str(w->o, " ");
        w->col = 1;
    } else {
        out_str(w->o, " ");
        w->col++;
    }
    out_add(w->o, p, n);
    w->col += n;
    w->first = 0;
}

/* Writes the elements kept of l; returns the number of mailboxes written. */
static size_t w_list(struct writer *w, const char *m, const struct alist *l)
{
    size_t written = 0;
    size_t i, j;

    for (i = 0; i < l->n; i++) {
        const struct elem *el = &l->v[i];
        if (el->kind == E_MAILBOX) {
            if (!el->keep)
                continue;
            w_item(w, m + el->s, el->e - el->s, w->sep);
            w->sep = 1;
            written++;
        } else if (el->kind == E_GROUP_OPEN) {
            size_t kept = 0;
            int sep_in = 0;
            for (j = i + 1; j < l->n && l->v[j].kind == E_MAILBOX; j++)
                kept += l->v[j].keep;
            if (kept == 0) { /* a group left empty goes with its members */
                i = j;
                continue;
            }
            w_item(w, m + el->s, el->e - el->s, w->sep);
            for (j = i + 1; j < l->n && l->v[j].kind == E_MAILBOX; j++) {
                if (!l->v[j].keep)
                    continue;
                w_item(w, m + l->v[j].s, l->v[j].e - l->v[j].s, sep_in);
                sep_in = 1;
                written++;
            }
            out_str(w->o, ";");
            w->col++;
            w->sep = 1;
            i = j; /* the E_GROUP_CLOSE */
        }
    }
    return written;
}

/* ---- apimime_for_api -------------------------------------------------------------- */

static void note_add(char *note, size_t notelen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void note_add(char *note, size_t notelen, const char *fmt, ...)
{
    size_t used;
    va_list ap;

    if (note == NULL || notelen == 0)
        return;
    used = strnlen(note, notelen);
    if (used + 1 >= notelen)
        return;
    va_start(ap, fmt);
    vsnprintf(note + used, notelen - used, fmt, ap);
    va_end(ap);
}

/* Text that gave no address, for the log: quoted, white space folded to one space, control
 * characters as '?', at most 40 bytes. */
static void note_raw(struct out *o, const char *p, size_t n)
{
    int sp = 0;

    out_str(o, "\"");
    for (size_t i = 0; i < n && i < 40; i++) {
        char c = p[i];
        if (is_fws(c)) {
            sp = 1;
            continue;
        }
        if (sp)
            out_str(o, " ");
        sp = 0;
        if ((unsigned char)c < 32 || c == 127 || c == '"')
            c = c == '"' ? '\'' : '?';
        out_add(o, &c, 1);
    }
    out_str(o, n > 40 ? "...\"" : "\"");
}

int apimime_for_api(const char *msg, size_t len, const char *const *rcpts, size_t nrcpts,
                    char **out, size_t *outlen, char *note, size_t notelen, char *err,
                    size_t errlen)
{
    struct header h;
    struct alist *lists = NULL;
    struct out o = {0};
    struct out dropped = {0};
    unsigned char *found = NULL;
    size_t i, k, ndropped = 0, nadd = 0, bcc_field = (size_t)-1;
    int rc = -1;

    *out = NULL;
    *outlen = 0;
    if (note && notelen)
        note[0] = '\0';
    if (len == 0) {
        seterr(err, errlen, "empty message");
        return -1;
    }
    if (nrcpts == 0) {
        seterr(err, errlen, "no envelope recipients");
        return -1;
    }
    header_parse(msg, len, &h);
    if (h.n == 0) {
        seterr(err, errlen, "no header section");
        goto free_header;
    }
    /* A NUL ends a header for C-string readers (MIME libraries, the providers' parsers may
     * be among them): they would not see the recipients this function sees. */
    if (memchr(msg, '\0', h.end) != NULL) {
        seterr(err, errlen, "NUL byte in the header section");
        goto free_header;
    }
    lists = xcalloc(h.n, sizeof(*lists));
    found = xcalloc(nrcpts, 1);

    /* Which header recipients are envelope recipients, and which envelope recipients the
     * headers name. */
    for (i = 0; i < h.n; i++) {
        struct hfield *f = &h.f[i];
        if (f->kind != H_TO && f->kind != H_CC && f->kind != H_BCC)
            continue;
        if (f->kind == H_BCC && bcc_field == (size_t)-1)
            bcc_field = i;
        alist_parse(msg, f->colon + 1, f->body_end, &lists[i]);
        for (k = 0; k < lists[i].n; k++) {
            struct elem *el = &lists[i].v[k];
            int match = 0;
            if (el->kind != E_MAILBOX)
                continue;
            for (size_t r = 0; r < nrcpts && !el->broken; r++) {
                if (rcpts[r] != NULL && addr_same(el->addr, rcpts[r])) {
                    found[r] = 1;
                    match = 1;
                }
            }
            if (!match) {
                el->keep = 0;
                if (ndropped++)
                    out_str(&dropped, ", ");
                if (el->addr[0] != '\0')
                    out_str(&dropped, el->addr);
                else
                    note_raw(&dropped, msg + el->s, el->e - el->s);
            }
        }
    }
    /* Envelope recipients to add to Bcc (each once, even if the envelope repeats it). */
    for (size_t r = 0; r < nrcpts; r++) {
        if (rcpts[r] == NULL || rcpts[r][0] == '\0') {
            found[r] = 1;
            continue;
        }
        for (size_t q = 0; q < r && !found[r]; q++)
            if (!found[q] && addr_same(rcpts[q], rcpts[r]))
                found[r] = 2; /* a duplicate of an earlier one that is added */
        if (!found[r])
            nadd++;
    }

    /* Copy, rebuilding the fields that change. */
    out_add(&o, msg, h.f[0].start);
    for (i = 0; i < h.n; i++) {
        struct hfield *f = &h.f[i];
        struct alist *l = &lists[i];
        int changed = 0, extend = (i == bcc_field && nadd > 0);
        struct writer w;
        size_t written;

        if (f->kind == H_TO || f->kind == H_CC || f->kind == H_BCC)
            for (k = 0; k < l->n; k++)
                if (l->v[k].kind == E_MAILBOX && !l->v[k].keep)
                    changed = 1;
        if (!changed && !extend) {
            out_add(&o, msg + f->start, f->end - f->start);
            continue;
        }
        /* The field name as written, then the list. */
        memset(&w, 0, sizeof(w));
        w.o = &o;
        w.eol = h.eol;
        w.first = 1;
        {
            size_t mark = o.len;
            out_add(&o, msg + f->start, f->colon + 1 - f->start);
            w.col = f->colon + 1 - f->start;
            written = w_list(&w, msg, l);
            if (extend) {
                for (size_t r = 0; r < nrcpts; r++) {
                    if (found[r])
                        continue;
                    w_item(&w, rcpts[r], strlen(rcpts[r]), w.sep);
                    w.sep = 1;
                    written++;
                }
            }
            if (written == 0) {
                if (f->kind == H_TO) {
                    out_str(&o, " undisclosed-recipients:;");
                } else {
                    o.len = mark; /* an empty Cc:/Bcc: is dropped */
                    o.data[o.len] = '\0';
                    continue;
                }
            }
        }
        out_str(&o, h.eol);
    }
    if (bcc_field == (size_t)-1 && nadd > 0) {
        struct writer w;

        /* The last field may have had no terminator (a message that ends in its header). */
        if (o.len > 0 && o.data[o.len - 1] != '\n')
            out_str(&o, h.eol);
        memset(&w, 0, sizeof(w));
        w.o = &o;
        w.eol = h.eol;
        w.first = 1;
        out_str(&o, "Bcc:");
        w.col = 4;
        for (size_t r = 0; r < nrcpts; r++) {
            if (found[r])
                continue;
            w_item(&w, rcpts[r], strlen(rcpts[r]), w.sep);
            w.sep = 1;
        }
        out_str(&o, h.eol);
    }
    out_add(&o, msg + h.end, len - h.end);
    if (o.data == NULL)
        o.data = xstrdup("");

    if (nadd > 0)
        note_add(note, notelen, "bcc +%zu", nadd);
    if (ndropped > 0)
        note_add(note, notelen, "%sheader recipients not in the envelope left out: %s",
                 nadd > 0 ? "; " : "", dropped.data);
    *out = o.data;
    *outlen = o.len;
    o.data = NULL;
    rc = 0;

    for (i = 0; i < h.n; i++)
        alist_free(&lists[i]);
free_header:
    free(lists);
    free(found);
    free(dropped.data);
    free(o.data);
    free(h.f);
    return rc;
}

/* ---- apimime_from_address --------------------------------------------------------- */

static int set_addr(const char *a, char *out, size_t outlen)
{
    size_t n = strlen(a);
    char *at;

    if (n == 0 || (at = strrchr(a, '@')) == NULL || at == a || at[1] == '\0' || n >= outlen)
        return -1;
    memcpy(out, a, n + 1);
    for (char *p = out + (at - a) + 1; *p; p++)
        *p = (char)tolower((unsigned char)*p);
    return 0;
}

/* The first mailbox of a GMime address list, descending into groups. */
static const char *first_mailbox(InternetAddressList *l, int depth)
{
    int n = internet_address_list_length(l);

    for (int i = 0; i < n; i++) {
        InternetAddress *ia = internet_address_list_get_address(l, i);
        if (INTERNET_ADDRESS_IS_MAILBOX(ia)) {
            const char *a = internet_address_mailbox_get_addr(INTERNET_ADDRESS_MAILBOX(ia));
            if (a != NULL && strchr(a, '@') != NULL)
                return a;
        } else if (INTERNET_ADDRESS_IS_GROUP(ia) && depth == 0) {
            const char *a =
                first_mailbox(internet_address_group_get_members(INTERNET_ADDRESS_GROUP(ia)), 1);
            if (a != NULL)
                return a;
        }
    }
    return NULL;
}

int apimime_from_address(const char *msg, size_t len, char *out, size_t outlen)
{
    struct header h;
    struct hfield *f = NULL;
    struct out v = {0};
    int rc = -1;

    if (out == NULL || outlen == 0)
        return -1;
    out[0] = '\0';
    header_parse(msg, len, &h);
    for (size_t i = 0; i < h.n && f == NULL; i++)
        if (h.f[i].kind == H_FROM)
            f = &h.f[i];
    if (f == NULL)
        goto free_header;
    /* Unfold (RFC 5322 2.2.3) and drop NULs, which GMime's C strings cannot carry. */
    for (size_t i = f->colon + 1; i < f->body_end; i++)
        if (msg[i] != '\r' && msg[i] != '\n' && msg[i] != '\0')
            out_add(&v, &msg[i], 1);
    if (v.data == NULL)
        goto free_header;

    apimime_init();
    {
        InternetAddressList *l = internet_address_list_parse(NULL, v.data);
        if (l != NULL) {
            const char *a = first_mailbox(l, 0);
            if (a != NULL)
                rc = set_addr(a, out, outlen);
            g_object_unref(l);
        }
    }
    if (rc != 0) {
        /* What GMime could not make sense of ("< fax@corp >" from some devices, a bare
         * local part with a comment): the first element the tokenizer finds. */
        struct alist l;
        alist_parse(v.data, 0, v.len, &l);
        for (size_t k = 0; k < l.n && rc != 0; k++)
            if (l.v[k].kind == E_MAILBOX)
                rc = set_addr(l.v[k].addr, out, outlen);
        alist_free(&l);
    }
    if (rc != 0)
        out[0] = '\0';
free_header:
    free(v.data);
    free(h.f);
    return rc;
}

/* ---- apimime_graph_split ---------------------------------------------------------- */

struct attlist {
    struct apimime_attachment *v;
    size_t n, cap;
};

static int is_body_part(GMimeObject *o)
{
    GMimeContentType *ct = g_mime_object_get_content_type(o);
    const char *disp = g_mime_object_get_disposition(o);

    if (!GMIME_IS_PART(o) || GMIME_IS_MESSAGE_PART(o))
        return 0;
    if (disp != NULL && g_ascii_strcasecmp(disp, "attachment") == 0)
        return 0;
    if (g_mime_part_get_filename(GMIME_PART(o)) != NULL)
        return 0;
    return ct == NULL || g_mime_content_type_is_type(ct, "text", "plain") ||
           g_mime_content_type_is_type(ct, "text", "html");
}

static void bytes_of(GMimeStream *s, unsigned char **data, size_t *len)
{
    GByteArray *ba = g_mime_stream_mem_get_byte_array(GMIME_STREAM_MEM(s));

    *len = ba ? ba->len : 0;
    *data = xmalloc(*len + 1);
    if (*len)
        memcpy(*data, ba->data, *len);
    (*data)[*len] = '\0';
}

static void att_take(struct attlist *al, GMimeObject *o, GMimeFormatOptions *fmt)
{
    struct apimime_attachment *a;
    GMimeContentType *ct = g_mime_object_get_content_type(o);
    const char *disp = g_mime_object_get_disposition(o);
    const char *cid = g_mime_object_get_content_id(o);
    const char *name = NULL;
    GMimeStream *s = g_mime_stream_mem_new();

    if (al->n == al->cap) {
        al->cap = al->cap ? al->cap * 2 : 4;
        al->v = xrealloc(al->v, al->cap * sizeof(*al->v));
    }
    a = &al->v[al->n++];
    memset(a, 0, sizeof(*a));
    if (GMIME_IS_PART(o)) {
        GMimeDataWrapper *dw = g_mime_part_get_content(GMIME_PART(o));
        name = g_mime_part_get_filename(GMIME_PART(o));
        if (dw != NULL)
            g_mime_data_wrapper_write_to_stream(dw, s); /* decodes base64/QP */
    } else if (GMIME_IS_MESSAGE_PART(o)) {
        GMimeMessage *inner = g_mime_message_part_get_message(GMIME_MESSAGE_PART(o));
        name = g_mime_object_get_content_disposition_parameter(o, "filename");
        if (name == NULL)
            name = g_mime_object_get_content_type_parameter(o, "name");
        if (inner != NULL)
            g_mime_object_write_to_stream(GMIME_OBJECT(inner), fmt, s);
    }
    bytes_of(s, &a->data, &a->len);
    g_object_unref(s);
    a->name = xstrdup(name != NULL && name[0] != '\0' ? name : "attachment");
    if (ct != NULL) {
        char *mt = g_mime_content_type_get_mime_type(ct);
        a->content_type = xstrdup(mt ? mt : "application/octet-stream");
        g_free(mt);
    } else {
        a->content_type = xstrdup("application/octet-stream");
    }
    a->content_id = cid != NULL && cid[0] != '\0' ? xstrdup(cid) : NULL;
    /* Graph's isInline: shown in the body, referenced by cid: (multipart/related). */
    a->is_inline = disp != NULL ? g_ascii_strcasecmp(disp, "inline") == 0 : a->content_id != NULL;
}

/* Takes the attachments out of the multipart mp (recursively); returns whether mp is left
 * without any part. */
static int strip(GMimeMultipart *mp, struct attlist *al, GMimeFormatOptions *fmt, int depth)
{
    int n = g_mime_multipart_get_count(mp);
    unsigned char *drop = n > 0 ? xcalloc((size_t)n, 1) : NULL;

    for (int i = 0; i < n; i++) {
        GMimeObject *c = g_mime_multipart_get_part(mp, i);
        if (GMIME_IS_MULTIPART(c)) {
            /* GMime bounds nesting itself; this bound only keeps the stack small. */
            if (depth < 64 && strip(GMIME_MULTIPART(c), al, fmt, depth + 1))
                drop[i] = 1;
        } else if (!is_body_part(c)) {
            att_take(al, c, fmt);
            drop[i] = 1;
        }
    }
    for (int i = n - 1; i >= 0; i--) {
        if (drop[i]) {
            GMimeObject *c = g_mime_multipart_remove_at(mp, i);
            if (c != NULL)
                g_object_unref(c);
        }
    }
    free(drop);
    return g_mime_multipart_get_count(mp) == 0;
}

int apimime_graph_split(const char *msg, size_t len, struct apimime_split *out, char *err,
                        size_t errlen)
{
    GMimeStream *in = NULL, *ds = NULL;
    GMimeParser *parser = NULL;
    GMimeMessage *m = NULL;
    GMimeObject *root;
    GMimeFormatOptions *fmt = NULL;
    struct attlist al = {0};
    int empty = 0;
    int rc = -1;

    memset(out, 0, sizeof(*out));
    if (len == 0) {
        seterr(err, errlen, "empty message");
        return -1;
    }
    apimime_init();
    in = g_mime_stream_mem_new_with_buffer(msg, len);
    parser = g_mime_parser_new_with_stream(in);
    m = g_mime_parser_construct_message(parser, NULL);
    if (m == NULL) {
        seterr(err, errlen, "MIME parser: not a message");
        goto unref;
    }
    fmt = g_mime_format_options_new();
    g_mime_format_options_set_newline_format(fmt, GMIME_NEWLINE_FORMAT_DOS);

    root = g_mime_message_get_mime_part(m);
    if (root == NULL) {
        empty = 1;
    } else if (GMIME_IS_MULTIPART(root)) {
        empty = strip(GMIME_MULTIPART(root), &al, fmt, 0);
    } else if (!is_body_part(root)) {
        att_take(&al, root, fmt);
        empty = 1;
    }
    if (empty) {
        /* Graph wants a body: an empty text/plain one where only attachments were. */
        GMimeTextPart *tp = g_mime_text_part_new_with_subtype("plain");
        g_mime_text_part_set_text(tp, "");
        g_mime_message_set_mime_part(m, GMIME_OBJECT(tp));
        g_object_unref(tp);
    }
    ds = g_mime_stream_mem_new();
    if (g_mime_object_write_to_stream(GMIME_OBJECT(m), fmt, ds) < 0) {
        seterr(err, errlen, "MIME writer: cannot write the draft");
        goto free_att;
    }
    {
        unsigned char *d;
        bytes_of(ds, &d, &out->draft_len);
        out->draft = (char *)d;
    }
    out->att = al.v;
    out->natt = al.n;
    al.v = NULL;
    al.n = 0;
    rc = 0;

free_att:
    for (size_t i = 0; i < al.n; i++) {
        free(al.v[i].name);
        free(al.v[i].content_type);
        free(al.v[i].content_id);
        free(al.v[i].data);
    }
    free(al.v);
unref:
    if (fmt != NULL)
        g_mime_format_options_free(fmt);
    if (ds != NULL)
        g_object_unref(ds);
    if (m != NULL)
        g_object_unref(m);
    g_object_unref(parser);
    g_object_unref(in);
    return rc;
}

void apimime_split_free(struct apimime_split *s)
{
    if (s == NULL)
        return;
    for (size_t i = 0; i < s->natt; i++) {
        free(s->att[i].name);
        free(s->att[i].content_type);
        free(s->att[i].content_id);
        free(s->att[i].data);
    }
    free(s->att);
    free(s->draft);
    memset(s, 0, sizeof(*s));
}

/* ---- base64 ----------------------------------------------------------------------- */

size_t apimime_base64_len(size_t len)
{
    return (len + 2) / 3 * 4;
}

static char *b64(const unsigned char *in, size_t len, size_t *outlen, const char *alpha, int pad)
{
    size_t n = apimime_base64_len(len);
    char *o, *p;
    size_t i;

    if (len > ((size_t)-1) / 2)
        abort(); /* no such buffer can exist */
    o = xmalloc(n + 1);
    p = o;
    for (i = 0; i + 2 < len; i += 3) {
        unsigned v = (unsigned)in[i] << 16 | (unsigned)in[i + 1] << 8 | in[i + 2];
        *p++ = alpha[v >> 18 & 63];
        *p++ = alpha[v >> 12 & 63];
        *p++ = alpha[v >> 6 & 63];
        *p++ = alpha[v & 63];
    }
    if (i < len) {
        unsigned v = (unsigned)in[i] << 16 | (i + 1 < len ? (unsigned)in[i + 1] << 8 : 0);
        *p++ = alpha[v >> 18 & 63];
        *p++ = alpha[v >> 12 & 63];
        if (i + 1 < len)
            *p++ = alpha[v >> 6 & 63];
        else if (pad)
            *p++ = '=';
        if (pad)
            *p++ = '=';
    }
    *p = '\0';
    if (outlen)
        *outlen = (size_t)(p - o);
    return o;
}

char *apimime_base64(const void *in, size_t len, size_t *outlen)
{
    return b64(in, len, outlen, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
               1);
}

char *apimime_base64url(const void *in, size_t len, size_t *outlen)
{
    return b64(in, len, outlen, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
               0);
}
