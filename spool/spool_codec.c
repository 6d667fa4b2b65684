/*
 * spool_codec - the byte layout of spool records (see spool/DESIGN.md).
 *
 * Every record starts with a version byte and the total record length (u32 BE), then
 * fixed-width integers in big-endian and strings as u32 BE length + bytes, with length
 * 0xFFFFFFFF meaning NULL.  Decoding checks every length against the value size, so a
 * truncated or foreign record gives SPOOL_ECORRUPT instead of reading past the end.
 *
 * Envelope records come in two versions: 1 (the original layout) and 2 (adds the RFC 3461
 * DSN parameters).  Both decode; a version-1 record reads as "no DSN parameters given".
 * The encoder writes version 1 whenever the message carries no DSN parameter, so a spool
 * of ordinary mail stays readable by a relayd that predates version 2.  Attempt records
 * are version 1 only.  Version 3 is version 2 with, at the end, the time the message waited
 * on configuration faults (i64 config_wait, i64 config_since); it is written only when one
 * of them is not 0, and versions 1 and 2 read as 0 for both.
 */
#include <stdlib.h>
#include <string.h>

#include "common/xalloc.h"
#include "spool/spool_int.h"

#define MSG_V1 1 /* = SPOOL_REC_VERSION: no DSN fields */
#define MSG_V2 2 /* + u8 dsn_ret, str dsn_envid; per recipient + u8 notify, str orcpt */
#define MSG_V3 3 /* version 2 + i64 config_wait, i64 config_since after the recipients */

void spool__be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

uint64_t spool__get_be64(const unsigned char *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

void spool__be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

uint32_t spool__get_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

void spool__sched_key(unsigned char k[16], int64_t when, uint64_t id)
{
    spool__be64(k, when < 0 ? 0 : (uint64_t)when);
    spool__be64(k + 8, id);
}

/* ---- encoding ---- */

void spool__put_u8(struct buf *b, unsigned v)
{
    unsigned char c = (unsigned char)v;

    buf_append(b, &c, 1);
}

void spool__put_u32(struct buf *b, uint32_t v)
{
    unsigned char p[4];

    spool__be32(p, v);
    buf_append(b, p, 4);
}

void spool__put_u64(struct buf *b, uint64_t v)
{
    unsigned char p[8];

    spool__be64(p, v);
    buf_append(b, p, 8);
}

void spool__put_str(struct buf *b, const char *s)
{
    size_t n;

    if (s == NULL) {
        spool__put_u32(b, SPOOL_STR_NULL);
        return;
    }
    n = strlen(s);
    if (n >= SPOOL_STR_NULL)
        n = SPOOL_STR_NULL - 1; /* cannot happen for SMTP data; keep the record decodable */
    spool__put_u32(b, (uint32_t)n);
    buf_append(b, s, n);
}

/* Writes the header with a placeholder length; spool__rec_finish() patches it. */
void spool__rec_start(struct buf *b, unsigned version)
{
    buf_reset(b);
    spool__put_u8(b, version);
    spool__put_u32(b, 0);
}

void spool__rec_finish(struct buf *b)
{
    spool__be32((unsigned char *)b->data + 1, (uint32_t)b->len);
}

/* Whether m needs a version-2 record: any DSN parameter given. */
static int has_dsn(const struct spool_msg *m)
{
    if (m->dsn_ret != 0 || m->dsn_envid != NULL)
        return 1;
    for (size_t i = 0; i < m->nrcpts; i++)
        if (m->rcpts[i].dsn_notify != 0 || m->rcpts[i].dsn_orcpt != NULL)
            return 1;
    return 0;
}

void spool__encode_msg(const struct spool_msg *m, struct buf *out)
{
    unsigned v = m->config_wait != 0 || m->config_since != 0 ? MSG_V3
                 : has_dsn(m)                                ? MSG_V2
                                                             : MSG_V1;

    spool__rec_start(out, v);
    spool__put_u8(out, (unsigned)m->state);
    spool__put_u64(out, (uint64_t)m->arrived);
    spool__put_u64(out, (uint64_t)m->next_attempt);
    spool__put_u32(out, m->attempts < 0 ? 0 : (uint32_t)m->attempts);
    spool__put_u64(out, m->size);
    spool__put_str(out, m->sender);
    spool__put_str(out, m->client);
    spool__put_str(out, m->helo);
    spool__put_str(out, m->listener);
    spool__put_str(out, m->last_error);
    if (v >= MSG_V2) {
        spool__put_u8(out, (unsigned)m->dsn_ret & 0xff);
        spool__put_str(out, m->dsn_envid);
    }
    spool__put_u32(out, (uint32_t)m->nrcpts);
    for (size_t i = 0; i < m->nrcpts; i++) {
        spool__put_str(out, m->rcpts[i].addr);
        spool__put_u8(out, (unsigned)m->rcpts[i].status);
        spool__put_str(out, m->rcpts[i].reply);
        if (v >= MSG_V2) {
            spool__put_u8(out, m->rcpts[i].dsn_notify & 0xff);
            spool__put_str(out, m->rcpts[i].dsn_orcpt);
        }
    }
    if (v >= MSG_V3) {
        spool__put_u64(out, (uint64_t)m->config_wait);
        spool__put_u64(out, (uint64_t)m->config_since);
    }
    spool__rec_finish(out);
}

void spool__encode_attempt(const struct spool_attempt *a, struct buf *out)
{
    spool__rec_start(out, SPOOL_REC_VERSION);
    spool__put_u64(out, (uint64_t)a->when);
    spool__put_str(out, a->upstream);
    spool__put_str(out, a->result);
    spool__rec_finish(out);
}

/* ---- decoding ---- */

static int need(struct spool__rd *r, size_t k)
{
    if (r->bad || r->n - r->off < k) {
        r->bad = 1;
        return 0;
    }
    return 1;
}

unsigned spool__get_u8(struct spool__rd *r)
{
    if (!need(r, 1))
        return 0;
    return r->p[r->off++];
}

uint32_t spool__get_u32(struct spool__rd *r)
{
    uint32_t v;

    if (!need(r, 4))
        return 0;
    v = spool__get_be32(r->p + r->off);
    r->off += 4;
    return v;
}

uint64_t spool__get_u64(struct spool__rd *r)
{
    uint64_t v;

    if (!need(r, 8))
        return 0;
    v = spool__get_be64(r->p + r->off);
    r->off += 8;
    return v;
}

char *spool__get_str(struct spool__rd *r)
{
    uint32_t n = spool__get_u32(r);
    char *s;

    if (r->bad || n == SPOOL_STR_NULL)
        return NULL;
    if (!need(r, n))
        return NULL;
    s = xstrndup((const char *)r->p + r->off, n);
    r->off += n;
    return s;
}

/* Checks the version (min..max) and length; leaves r positioned after the header and
 * the version in *version. */
int spool__rec_header(struct spool__rd *r, const void *p, size_t n, unsigned min, unsigned max,
                      unsigned *version)
{
    r->p = p;
    r->n = n;
    r->off = 0;
    r->bad = 0;
    *version = spool__get_u8(r);
    if (*version < min || *version > max)
        return SPOOL_ECORRUPT;
    if (spool__get_u32(r) != n || r->bad)
        return SPOOL_ECORRUPT;
    return 0;
}

int spool__decode_msg(const void *p, size_t n, uint64_t id, struct spool_msg *m)
{
    struct spool__rd r;
    uint32_t nr;
    unsigned v;
    size_t min_rcpt;

    memset(m, 0, sizeof(*m));
    if (spool__rec_header(&r, p, n, MSG_V1, MSG_V3, &v) != 0)
        return SPOOL_ECORRUPT;
    m->id = id;
    m->state = (enum spool_state)spool__get_u8(&r);
    m->arrived = (int64_t)spool__get_u64(&r);
    m->next_attempt = (int64_t)spool__get_u64(&r);
    m->attempts = (int)spool__get_u32(&r);
    m->size = spool__get_u64(&r);
    m->sender = spool__get_str(&r);
    m->client = spool__get_str(&r);
    m->helo = spool__get_str(&r);
    m->listener = spool__get_str(&r);
    m->last_error = spool__get_str(&r);
    if (v >= MSG_V2) {
        m->dsn_ret = (int)spool__get_u8(&r);
        m->dsn_envid = spool__get_str(&r);
    }
    nr = spool__get_u32(&r);
    /* Each recipient takes at least 9 bytes (14 in version 2): a bound before allocating. */
    min_rcpt = v >= MSG_V2 ? 14 : 9;
    if (r.bad || nr > (r.n - r.off) / min_rcpt)
        goto corrupt;
    m->rcpts = xcalloc(nr ? nr : 1, sizeof(*m->rcpts));
    m->nrcpts = nr;
    for (uint32_t i = 0; i < nr; i++) {
        m->rcpts[i].addr = spool__get_str(&r);
        m->rcpts[i].status = (enum spool_rcpt_status)spool__get_u8(&r);
        m->rcpts[i].reply = spool__get_str(&r);
        if (v >= MSG_V2) {
            m->rcpts[i].dsn_notify = spool__get_u8(&r);
            m->rcpts[i].dsn_orcpt = spool__get_str(&r);
        }
        if (m->rcpts[i].addr == NULL)
            r.bad = 1;
    }
    if (v >= MSG_V3) {
        m->config_wait = (int64_t)spool__get_u64(&r);
        m->config_since = (int64_t)spool__get_u64(&r);
    }
    if (r.bad || r.off != r.n || m->sender == NULL || m->state < SPOOL_QUEUED ||
        m->state > SPOOL_FAILED || m->dsn_ret < 0 || m->dsn_ret > SPOOL_RET_HDRS)
        goto corrupt;
    return 0;
corrupt:
    spool__msg_clear(m);
    return SPOOL_ECORRUPT;
}

int spool__decode_attempt(const void *p, size_t n, struct spool_attempt *a)
{
    struct spool__rd r;
    unsigned v;

    memset(a, 0, sizeof(*a));
    if (spool__rec_header(&r, p, n, SPOOL_REC_VERSION, SPOOL_REC_VERSION, &v) != 0)
        return SPOOL_ECORRUPT;
    a->when = (int64_t)spool__get_u64(&r);
    a->upstream = spool__get_str(&r);
    a->result = spool__get_str(&r);
    if (r.bad || r.off != r.n) {
        free(a->upstream);
        free(a->result);
        memset(a, 0, sizeof(*a));
        return SPOOL_ECORRUPT;
    }
    return 0;
}

/* ---- struct spool_msg helpers ---- */

void spool__msg_clear(struct spool_msg *m)
{
    free(m->sender);
    free(m->client);
    free(m->helo);
    free(m->listener);
    free(m->last_error);
    free(m->dsn_envid);
    for (size_t i = 0; i < m->nrcpts; i++) {
        free(m->rcpts[i].addr);
        free(m->rcpts[i].reply);
        free(m->rcpts[i].dsn_orcpt);
    }
    free(m->rcpts);
    for (size_t i = 0; i < m->nattempts_log; i++) {
        free(m->attempts_log[i].upstream);
        free(m->attempts_log[i].result);
    }
    free(m->attempts_log);
    memset(m, 0, sizeof(*m));
}

static char *dup_or_null(const char *s)
{
    return s != NULL ? xstrdup(s) : NULL;
}

struct spool_msg *spool__msg_dup(const struct spool_msg *m)
{
    struct spool_msg *c = xcalloc(1, sizeof(*c));

    *c = *m;
    c->sender = xstrdup(m->sender != NULL ? m->sender : "");
    c->client = dup_or_null(m->client);
    c->helo = dup_or_null(m->helo);
    c->listener = dup_or_null(m->listener);
    c->last_error = dup_or_null(m->last_error);
    c->dsn_envid = dup_or_null(m->dsn_envid);
    c->rcpts = xcalloc(m->nrcpts ? m->nrcpts : 1, sizeof(*c->rcpts));
    for (size_t i = 0; i < m->nrcpts; i++) {
        c->rcpts[i].addr = xstrdup(m->rcpts[i].addr != NULL ? m->rcpts[i].addr : "");
        c->rcpts[i].status = m->rcpts[i].status;
        c->rcpts[i].reply = dup_or_null(m->rcpts[i].reply);
        c->rcpts[i].dsn_notify = m->rcpts[i].dsn_notify;
        c->rcpts[i].dsn_orcpt = dup_or_null(m->rcpts[i].dsn_orcpt);
    }
    c->attempts_log = NULL;
    c->nattempts_log = 0;
    return c;
}
