/*
 * smtpd - the inbound SMTP server: listeners and per-connection sessions.
 *
 * Happy path: accept; on a proxy_protocol listener read the PROXY header first (PROXY
 * state, nothing sent); on an implicit-TLS listener run the handshake (TLS_HANDSHAKE);
 * then check the client against the listener's allow list and the connection limits, 220
 * greeting, HELO/EHLO (optional: legacy clients skip it), STARTTLS and AUTH when
 * configured, MAIL, RCPT..., DATA, lines collected (bare LF and CRLF alike, dot-unstuffed,
 * stored with CRLF) until ".", the message is repaired (msgfix) and handed to the spool
 * writer; COMMIT_WAIT until the durable commit completes; only then "250 2.0.0 Ok: queued
 * as ID".  Pipelined commands that arrived meanwhile stay buffered and are handled after
 * the 250 (Postfix: drain all input).
 *
 * States: PROXY -> [TLS_HANDSHAKE] -> CMD <-> AUTH (334 sent, waiting for the client's
 * answer) -> AUTH_DELAY (a failed login: the 535 waits 1-3 s on the session timer) ->
 * CMD <-> DATA -> COMMIT_WAIT -> CMD ... -> QUIT -> CLOSING.  STARTTLS goes CMD ->
 * TLS_HANDSHAKE -> CMD with HELO, transaction and AUTH state reset (RFC 3207 4.2).
 * The one timer is re-armed on every state change with that state's timeout.
 *
 * Failure modes: a client outside the allow list gets 554 5.7.1 and is disconnected; over
 * max_connections (total or per client address) 421 4.7.0; a malformed or missing PROXY
 * header closes the connection without a word; an over-long command line gets 500 5.5.2
 * and the session resynchronises at the next line end; a message over max_message_size
 * is read to its end and refused with 552 5.3.4 without keeping the excess; when the
 * messages held by all sessions pass max_memory, 451 4.3.1; a client that disconnects
 * mid-DATA leaves nothing in the spool; a spool that is full gets 452 4.3.1; timeouts get
 * 421 4.4.2 and a close; max_errors protocol errors get 421 4.7.0 and a close.
 *
 * TLS credentials are refcounted (struct smtpd_cred): a listener holds one reference, each
 * session that started TLS another, so a SIGHUP reload swaps the listener's credentials
 * while sessions in progress keep theirs until they close.
 *
 * Lifetime: a session is freed only when its TCP/TLS stream and its timer are closed and
 * no spool commit is outstanding (refs reaches 0).  Never free inside its own callback.
 */
#include "relayd/smtpd.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include "common/addr.h"
#include "common/authsasl.h"
#include "common/buf.h"
#include "common/log.h"
#include "common/netaddr.h"
#include "common/proxyproto.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "common/xtext.h"
#include "relayd/msgfix.h"
#include "relayd/route.h"

#define SMTPD_INPUT_MAX (256 * 1024) /* input held while not reading commands */
#define SMTPD_DATA_CHUNK (64 * 1024)   /* flush a partial DATA line beyond this */
#define SMTPD_PROXY_TIMEOUT_MS 10000   /* for the PROXY header */
#define SMTPD_PROXY_MAX (PROXYPROTO_V2_HDR + 65535)
#define SMTPD_AUTH_DELAY_MS 1000       /* first failed login; grows by this per failure */
#define SMTPD_AUTH_DELAY_MAX_MS 3000
#define SMTPD_ENVID_MAX 100            /* RFC 3461 4.4 */

enum smtpd_state {
    SMTPD_S_PROXY,
    SMTPD_S_TLS_HANDSHAKE,
    SMTPD_S_CMD,
    SMTPD_S_AUTH,
    SMTPD_S_AUTH_DELAY,
    SMTPD_S_DATA,
    SMTPD_S_COMMIT_WAIT,
    SMTPD_S_QUIT,
    SMTPD_S_CLOSING,
};

static const char *const smtpd_state_names[] = {
    "PROXY", "TLS_HANDSHAKE", "CMD", "AUTH", "AUTH_DELAY", "DATA", "COMMIT_WAIT", "QUIT",
    "CLOSING",
};

#define SMTPD_F_HELO 0x1      /* HELO or EHLO seen */
#define SMTPD_F_EHLO 0x2      /* EHLO (ESMTP) */
#define SMTPD_F_SKIPLINE 0x4  /* discarding the rest of an over-long command line */
#define SMTPD_F_AUTHED 0x8    /* AUTH succeeded */
#define SMTPD_F_NEEDHELO 0x10 /* after STARTTLS: a new EHLO before MAIL */
#define SMTPD_F_GREETED 0x20  /* the 220 (or a reject) was sent */
#define SMTPD_F_COUNTED 0x40  /* counted in srv->nsessions */

struct smtpd_tx {
    char *sender;
    char **rcpts;
    size_t nrcpts, cap;
    struct buf *data; /* the message as received: CRLF lines, unstuffed */
    int too_big;      /* went over max_message_size: read to the end, then 552 */
    int no_mem;       /* went over the server's max_memory: read to the end, then 451 */
    int mid_line;     /* the last chunk appended ended inside a line */
    int last_dot;     /* the last complete line ended in '.' (see smtpd_data_glued_dot) */
    /* RFC 3461 DSN parameters, kept in the spool (spool.h) and passed upstream when it
     * offers DSN; ENVID and ORCPT are stored xtext-decoded. */
    char ret[8];         /* "FULL", "HDRS" or "" */
    char *envid;         /* decoded, or NULL */
    int ndsn_rcpts;      /* recipients with NOTIFY or ORCPT */
    unsigned *notify;    /* per recipient: SPOOL_NOTIFY_* bits, 0: not given */
    char **orcpt;        /* per recipient: "rfc822;addr" decoded, or NULL */
};

/* Server TLS credentials shared by a listener and the sessions that use them. */
struct smtpd_cred {
    struct tlsio_cred *cred;
    int refs;
};

struct smtpd_listener {
    struct smtpd_server *srv;
    const struct cfg_listener *cfg;
    uv_tcp_t tcp;
    int bound;
    struct smtpd_cred *cred; /* tls != none */
};

struct smtpd_session {
    uint64_t id;
    struct smtpd_server *srv;
    struct smtpd_listener *l;
    const struct cfg_listener *lcfg;
    enum smtpd_state state;
    unsigned flags;
    struct tlsio *io;
    uv_timer_t timer;
    struct sockaddr_storage addr; /* the client (from the PROXY header when there is one) */
    char peer[64];
    char *helo;
    struct smtpd_tx *tx;
    struct smtpd_cred *cred;      /* held while TLS may be in use */
    struct authsasl_server *sasl; /* for the current TLS state; NULL until needed */
    char *auth_user;
    int auth_failures;
    int debug;                    /* debug_peers matched: log the dialogue */
    size_t mem;                   /* bytes of srv->mem_used that are ours */
    int refs;                     /* alive + open handles + outstanding commits */
    int errors;
    int close_after_drain;        /* QUIT or a fatal reply: close once the reply is sent */
    const char *close_why;        /* for the disconnect line; NULL: "quit" */
    int input_paused;             /* reads stopped while we are not taking commands */
    struct smtpd_session *prev, *next;
};

struct smtpd_server {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct spool *sp;
    void (*on_spooled)(void *arg, uint64_t id);
    void *on_spooled_arg;
    struct smtpd_listener *listeners;
    int nlisteners;
    struct smtpd_session *sessions;
    uint64_t next_session_id;
    int nsessions;         /* sessions counted against max_connections */
    size_t mem_used;       /* message bytes held by all sessions */
    int open;              /* listeners bound and not yet closed + sessions not yet freed */
    int stopping;
    void (*stop_done)(void *arg);
    void *stop_arg;
};

/* A commit in flight: the session it answers to, and the queue id. */
struct smtpd_commit {
    struct smtpd_session *s;
    uint64_t id;
};

static void smtpd_session_close(struct smtpd_session *s, const char *why);
static void smtpd_drain_input(struct smtpd_session *s);
static void smtpd_on_timeout(uv_timer_t *t);
static void smtpd_greet(struct smtpd_session *s);
static void smtpd_proxy_input(struct smtpd_session *s);

/* ---- small helpers ---- */

static struct smtpd_cred *smtpd_cred_ref(struct smtpd_cred *c)
{
    if (c != NULL)
        c->refs++;
    return c;
}

static struct smtpd_cred *smtpd_cred_unref(struct smtpd_cred *c)
{
    if (c != NULL && --c->refs == 0) {
        tlsio_cred_free(c->cred);
        free(c);
    }
    return NULL;
}

static void smtpd_server_maybe_done(struct smtpd_server *srv)
{
    if (srv->stopping && srv->open == 0 && srv->stop_done != NULL) {
        void (*done)(void *) = srv->stop_done;
        srv->stop_done = NULL;
        done(srv->stop_arg);
    }
}

/* The dialogue, for debug_peers at info level (else at -vv); AUTH data masked. */
static void smtpd_trace(struct smtpd_session *s, char dir, const char *line, int n)
{
    if (s->debug)
        log_info("session=%llu: %c %.*s", (unsigned long long)s->id, dir, n, line);
    else
        log_debug(2, "session=%llu: %c %.*s", (unsigned long long)s->id, dir, n, line);
}

static void smtpd_reply(struct smtpd_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void smtpd_reply(struct smtpd_session *s, const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    int n;

    if (s->state == SMTPD_S_CLOSING)
        return;
    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line) - 2, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof(line) - 3)
        n = (int)sizeof(line) - 3;
    if (strncmp(line, "334 ", 4) == 0)
        smtpd_trace(s, '>', "334 ****", 8);
    else
        smtpd_trace(s, '>', line, n);
    line[n++] = '\r';
    line[n++] = '\n';
    tlsio_write(s->io, line, (size_t)n);
}

static void smtpd_enter_state(struct smtpd_session *s, enum smtpd_state st)
{
    const struct cfg_listener *lc = s->lcfg;
    uint64_t timeout;

    log_debug(3, "session=%llu: state %s -> %s", (unsigned long long)s->id,
              smtpd_state_names[s->state], smtpd_state_names[st]);
    s->state = st;
    switch (st) {
    case SMTPD_S_CLOSING:
        return;
    case SMTPD_S_PROXY:
        uv_timer_start(&s->timer, smtpd_on_timeout, SMTPD_PROXY_TIMEOUT_MS, 0);
        return;
    case SMTPD_S_AUTH_DELAY:
        timeout = (uint64_t)SMTPD_AUTH_DELAY_MS * (uint64_t)s->auth_failures;
        if (timeout > SMTPD_AUTH_DELAY_MAX_MS)
            timeout = SMTPD_AUTH_DELAY_MAX_MS;
        uv_timer_start(&s->timer, smtpd_on_timeout, timeout, 0);
        return;
    case SMTPD_S_DATA:
        timeout = (uint64_t)lc->data_timeout * 1000;
        break;
    default:
        timeout = (uint64_t)lc->command_timeout * 1000;
        break;
    }
    uv_timer_start(&s->timer, smtpd_on_timeout, timeout, timeout);
}

/* Brings srv->mem_used in line with what this session's transaction holds now. */
static void smtpd_mem_sync(struct smtpd_session *s)
{
    size_t now = s->tx != NULL && s->tx->data != NULL ? s->tx->data->cap : 0;

    s->srv->mem_used = s->srv->mem_used - s->mem + now;
    s->mem = now;
}

static struct smtpd_tx *smtpd_tx_free(struct smtpd_tx *tx)
{
    size_t i;

    if (tx == NULL)
        return NULL;
    free(tx->sender);
    for (i = 0; i < tx->nrcpts; i++)
        free(tx->rcpts[i]);
    for (i = 0; i < tx->nrcpts; i++)
        free(tx->orcpt[i]);
    free(tx->rcpts);
    free(tx->notify);
    free(tx->orcpt);
    free(tx->envid);
    buf_free(tx->data);
    free(tx);
    return NULL;
}

static void smtpd_tx_reset(struct smtpd_session *s)
{
    s->tx = smtpd_tx_free(s->tx);
    smtpd_mem_sync(s);
}

static void smtpd_session_unref(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;

    if (--s->refs > 0)
        return;
    smtpd_tx_reset(s);
    free(s->helo);
    free(s->auth_user);
    s->sasl = authsasl_server_free(s->sasl);
    /* The tlsio (and its GnuTLS session) is gone by now: the credentials may go too. */
    s->cred = smtpd_cred_unref(s->cred);
    if (s->prev != NULL)
        s->prev->next = s->next;
    else
        srv->sessions = s->next;
    if (s->next != NULL)
        s->next->prev = s->prev;
    free(s);
    srv->open--;
    smtpd_server_maybe_done(srv);
}

static void smtpd_on_handle_closed(uv_handle_t *h)
{
    smtpd_session_unref(h->data);
}

static void smtpd_on_io_closed(void *arg)
{
    smtpd_session_unref(arg);
}

/* A session that is closing or has said its last word no longer counts against the
 * connection limits: a client that sends QUIT and reconnects at once must not find its
 * old session still counted while the 221 is being flushed. */
static void smtpd_uncount(struct smtpd_session *s)
{
    if (s->flags & SMTPD_F_COUNTED) {
        s->flags &= ~SMTPD_F_COUNTED;
        s->srv->nsessions--;
    }
}

/* The one exit: logs one line, drops the uncommitted transaction, closes every handle. */
static void smtpd_session_close(struct smtpd_session *s, const char *why)
{
    if (s->state == SMTPD_S_CLOSING)
        return;
    log_info("disconnect from %s session=%llu: %s", s->peer, (unsigned long long)s->id, why);
    smtpd_enter_state(s, SMTPD_S_CLOSING);
    smtpd_uncount(s);
    /* A transaction in COMMIT_WAIT belongs to the spool writer now; see smtpd_commit_done. */
    smtpd_tx_reset(s);
    uv_timer_stop(&s->timer);
    s->refs += 2;
    uv_close((uv_handle_t *)&s->timer, smtpd_on_handle_closed);
    tlsio_close(s->io, smtpd_on_io_closed, s);
    smtpd_session_unref(s); /* the "alive" reference */
}

/* After a final reply: closes once it is written; why goes into the disconnect line. */
static void smtpd_reject_close(struct smtpd_session *s, const char *why)
{
    s->close_why = why;
    s->close_after_drain = 1;
    smtpd_uncount(s);
    smtpd_enter_state(s, SMTPD_S_QUIT);
}

static int smtpd_error(struct smtpd_session *s)
{
    if (++s->errors < s->lcfg->max_errors)
        return 0;
    smtpd_reply(s, "421 4.7.0 %s Error: too many errors", s->srv->cfg->hostname);
    log_warn("session=%llu: client %s: too many errors (%d)", (unsigned long long)s->id, s->peer,
             s->errors);
    smtpd_reject_close(s, "too many errors");
    return -1;
}

static int smtpd_is_plain_mech(const char *m)
{
    return strcasecmp(m, "PLAIN") == 0 || strcasecmp(m, "LOGIN") == 0;
}

/* The SASL server for the current TLS state, made on first use; NULL when AUTH is off or
 * the account store cannot be used. */
static struct authsasl_server *smtpd_sasl(struct smtpd_session *s)
{
    const struct cfg_listener *lc = s->lcfg;
    struct authsasl_server_opts o;
    char err[256];

    if (lc->auth == CFG_AUTH_OFF)
        return NULL;
    if (s->sasl != NULL)
        return s->sasl;
    memset(&o, 0, sizeof(o));
    o.hostname = s->srv->cfg->hostname;
    o.sasldb = lc->sasldb;
    o.mechs = lc->auth_mechanisms;
    o.secure = tlsio_is_tls(s->io);
    o.allow_plain = lc->auth_plaintext;
    o.accept_any = lc->auth == CFG_AUTH_ACCEPT_ANY;
    if (authsasl_server_new(&o, &s->sasl, err, sizeof(err)) != 0)
        log_error("listener %s: AUTH unavailable: %s", lc->name, err);
    return s->sasl;
}

/* ---- commands ---- */

/* "FROM:" / "TO:" after the verb, tolerating spaces around the colon. */
static const char *smtpd_skip_keyword(const char *arg, const char *kw)
{
    size_t n = strlen(kw);

    while (*arg == ' ')
        arg++;
    if (strncasecmp(arg, kw, n) != 0)
        return NULL;
    arg += n;
    while (*arg == ' ')
        arg++;
    if (*arg != ':')
        return NULL;
    return arg + 1;
}

static void smtpd_cmd_helo(struct smtpd_session *s, const char *arg, int ehlo)
{
    const struct cfg *cfg = s->srv->cfg;
    const struct cfg_listener *lc = s->lcfg;
    struct authsasl_server *sasl;

    while (*arg == ' ')
        arg++;
    if (*arg == '\0') {
        smtpd_reply(s, "501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
        smtpd_error(s);
        return;
    }
    free(s->helo);
    /* The name goes into Received: and the logs: no control characters (a CR would start
     * a header line of the client's choosing) and no more than a host name's length. */
    s->helo = xstrndup(arg, strcspn(arg, " \t"));
    if (strlen(s->helo) > 255)
        s->helo[255] = '\0';
    for (char *p = s->helo; *p != '\0'; p++)
        if ((unsigned char)*p < 0x21 || (unsigned char)*p == 0x7f)
            *p = '?';
    smtpd_tx_reset(s); /* RFC 5321 4.1.4: HELO/EHLO resets the transaction */
    s->flags |= SMTPD_F_HELO;
    s->flags &= ~SMTPD_F_NEEDHELO;
    if (!ehlo) {
        s->flags &= ~SMTPD_F_EHLO;
        smtpd_reply(s, "250 %s", cfg->hostname);
        return;
    }
    s->flags |= SMTPD_F_EHLO;
    smtpd_reply(s, "250-%s", cfg->hostname);
    smtpd_reply(s, "250-PIPELINING");
    smtpd_reply(s, "250-SIZE %ld", cfg->max_message_size);
    smtpd_reply(s, "250-8BITMIME");
    smtpd_reply(s, "250-DSN");
    smtpd_reply(s, "250-SMTPUTF8");
    if (lc->tls == CFG_TLS_STARTTLS && !tlsio_is_tls(s->io))
        smtpd_reply(s, "250-STARTTLS");
    /* RFC 4954 3: not after a successful AUTH; and only mechanisms allowed right now. */
    if (!(s->flags & SMTPD_F_AUTHED) && (sasl = smtpd_sasl(s)) != NULL &&
        authsasl_server_mechs(sasl)[0] != '\0')
        smtpd_reply(s, "250-AUTH %s", authsasl_server_mechs(sasl));
    smtpd_reply(s, "250 ENHANCEDSTATUSCODES");
}

static int smtpd_hexdigit(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F');
}

/* RFC 3461 4.4 / RFC 1891 xtext: printable ASCII except '+' and '=', or "+XX". */
static int smtpd_xtext_ok(const char *p, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];

        if (c == '+') {
            if (i + 2 >= n || !smtpd_hexdigit(p[i + 1]) || !smtpd_hexdigit(p[i + 2]))
                return 0;
            i += 2;
        } else if (c < 33 || c > 126 || c == '=') {
            return 0;
        }
    }
    return 1;
}

/* One "KEY[=VALUE]" of MAIL parameters; 0 or -1 after replying. */
static int smtpd_mail_param(struct smtpd_session *s, struct smtpd_tx *tx, const char *p,
                            size_t n)
{
    const char *eq = memchr(p, '=', n);
    size_t klen = eq != NULL ? (size_t)(eq - p) : n;
    const char *v = eq != NULL ? eq + 1 : NULL;
    size_t vlen = eq != NULL ? n - klen - 1 : 0;

    if (klen == 4 && strncasecmp(p, "SIZE", 4) == 0 && v != NULL && vlen > 0 && vlen < 20 &&
        strspn(v, "0123456789") >= vlen) {
        /* RFC 1870: refuse early when the client announces a size we will not take. */
        unsigned long long size = strtoull(v, NULL, 10);

        if (size > (unsigned long long)s->srv->cfg->max_message_size) {
            smtpd_reply(s, "552 5.3.4 Message size exceeds fixed limit of %ld bytes",
                        s->srv->cfg->max_message_size);
            return -1;
        }
        return 0;
    }
    if (klen == 4 && strncasecmp(p, "BODY", 4) == 0 && v != NULL &&
        ((vlen == 4 && strncasecmp(v, "7BIT", 4) == 0) ||
         (vlen == 8 && strncasecmp(v, "8BITMIME", 8) == 0)))
        return 0;
    if (klen == 8 && strncasecmp(p, "SMTPUTF8", 8) == 0 && v == NULL)
        return 0;
    if (klen == 3 && strncasecmp(p, "RET", 3) == 0 && v != NULL &&
        ((vlen == 4 && strncasecmp(v, "FULL", 4) == 0) ||
         (vlen == 4 && strncasecmp(v, "HDRS", 4) == 0))) {
        snprintf(tx->ret, sizeof(tx->ret), "%.4s", v);
        return 0;
    }
    if (klen == 5 && strncasecmp(p, "ENVID", 5) == 0 && v != NULL && vlen > 0 &&
        vlen <= SMTPD_ENVID_MAX && smtpd_xtext_ok(v, vlen)) {
        char *dec = bounce_xtext_decode(v, vlen); /* NULL for "+00" */

        if (dec != NULL) {
            free(tx->envid);
            tx->envid = dec;
            return 0;
        }
    }
    /* RFC 4954 5: MAIL FROM AUTH=<mailbox>; we trust our own AUTH state instead. */
    if (klen == 4 && strncasecmp(p, "AUTH", 4) == 0 && v != NULL && vlen > 0)
        return 0;
    if (v != NULL && (klen == 4 || klen == 3 || klen == 5 || klen == 8) &&
        (strncasecmp(p, "SIZE", klen) == 0 || strncasecmp(p, "BODY", klen) == 0 ||
         strncasecmp(p, "RET", klen) == 0 || strncasecmp(p, "ENVID", klen) == 0)) {
        smtpd_reply(s, "501 5.5.4 Bad value in parameter %.*s", (int)(n > 80 ? 80 : n), p);
        return -1;
    }
    smtpd_reply(s, "555 5.5.4 Unsupported option: %.*s", (int)(n > 80 ? 80 : n), p);
    return -1;
}

/* One RCPT parameter: NOTIFY= (into *notify) and ORCPT= (into *orcpt, decoded, replacing
 * what was there) of RFC 3461; 0 or -1 after replying. */
static int smtpd_rcpt_param(struct smtpd_session *s, const char *p, size_t n, int *dsn,
                            unsigned *notify, char **orcpt)
{
    const char *eq = memchr(p, '=', n);
    size_t klen = eq != NULL ? (size_t)(eq - p) : n;
    const char *v = eq != NULL ? eq + 1 : NULL;
    size_t vlen = eq != NULL ? n - klen - 1 : 0;

    if (klen == 6 && strncasecmp(p, "NOTIFY", 6) == 0 && v != NULL && vlen > 0) {
        char val[64], *save = NULL, *w;
        int never = 0, other = 0;
        unsigned bits = 0;

        if (vlen >= sizeof(val))
            goto bad;
        memcpy(val, v, vlen);
        val[vlen] = '\0';
        if (val[0] == ',' || val[vlen - 1] == ',')
            goto bad;
        for (w = strtok_r(val, ",", &save); w != NULL; w = strtok_r(NULL, ",", &save)) {
            if (strcasecmp(w, "NEVER") == 0)
                bits |= SPOOL_NOTIFY_NEVER;
            else if (strcasecmp(w, "SUCCESS") == 0)
                bits |= SPOOL_NOTIFY_SUCCESS;
            else if (strcasecmp(w, "FAILURE") == 0)
                bits |= SPOOL_NOTIFY_FAILURE;
            else if (strcasecmp(w, "DELAY") == 0)
                bits |= SPOOL_NOTIFY_DELAY;
            else
                goto bad;
        }
        never = (bits & SPOOL_NOTIFY_NEVER) != 0;
        other = (bits & ~SPOOL_NOTIFY_NEVER) != 0;
        if (never && other) /* RFC 3461 4.1 */
            goto bad;
        *dsn = 1;
        *notify = bits;
        return 0;
    }
    if (klen == 5 && strncasecmp(p, "ORCPT", 5) == 0 && v != NULL) {
        const char *semi = memchr(v, ';', vlen);
        char *dec;

        /* addr-type is an atom: in practice "rfc822", "utf-8", "x400", "unknown". */
        if (semi == NULL || semi == v || vlen > 500 ||
            strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-") !=
                (size_t)(semi - v) ||
            !smtpd_xtext_ok(semi + 1, vlen - (size_t)(semi + 1 - v)))
            goto bad;
        /* RFC 3461 4.2: addr-type ";" xtext; kept as "addr-type;address", decoded. */
        if ((dec = bounce_xtext_decode(semi + 1, vlen - (size_t)(semi + 1 - v))) == NULL)
            goto bad;
        free(*orcpt);
        *orcpt = xasprintf("%.*s;%s", (int)(semi - v), v, dec);
        free(dec);
        *dsn = 1;
        return 0;
    }
    smtpd_reply(s, "555 5.5.4 Unsupported option: %.*s", (int)(n > 80 ? 80 : n), p);
    return -1;
bad:
    smtpd_reply(s, "501 5.5.4 Bad value in parameter %.*s", (int)(n > 80 ? 80 : n), p);
    return -1;
}

static void smtpd_cmd_mail(struct smtpd_session *s, const char *arg)
{
    const struct cfg_listener *lc = s->lcfg;
    const char *path = smtpd_skip_keyword(arg, "FROM"), *params, *p;
    struct smtpd_tx *tx;
    char err[128], *addr;

    if (s->tx != NULL) {
        smtpd_reply(s, "503 5.5.1 Error: nested MAIL command");
        smtpd_error(s);
        return;
    }
    if (s->flags & SMTPD_F_NEEDHELO) {
        smtpd_reply(s, "503 5.5.1 Error: send EHLO again after STARTTLS");
        smtpd_error(s);
        return;
    }
    if (lc->auth == CFG_AUTH_REQUIRED && !(s->flags & SMTPD_F_AUTHED)) {
        smtpd_reply(s, "530 5.7.0 Authentication required");
        smtpd_error(s);
        return;
    }
    if (path == NULL) {
        smtpd_reply(s, "501 5.5.4 Syntax: MAIL FROM:<address>");
        smtpd_error(s);
        return;
    }
    if (addr_path_parse(path, &addr, &params, err, sizeof(err)) != 0) {
        smtpd_reply(s, "501 5.1.7 Bad sender address syntax: %s", err);
        smtpd_error(s);
        return;
    }
    tx = xcalloc(1, sizeof(*tx));
    tx->sender = addr;
    for (p = params; p != NULL && *p != '\0';) {
        size_t n = strcspn(p, " ");

        if (smtpd_mail_param(s, tx, p, n) != 0) {
            smtpd_tx_free(tx);
            smtpd_error(s);
            return;
        }
        p += n;
        p += strspn(p, " ");
    }
    /* The null sender has no domain to judge: bounces from devices stay possible. */
    if (lc->sender_domains != NULL && addr[0] != '\0' &&
        !route_domain_listed(lc->sender_domains, addr)) {
        log_info("NOQUEUE: reject: MAIL from %s: sender <%s> is not in sender_domains of "
                 "listener %s", s->peer, addr, lc->name);
        smtpd_reply(s, "553 5.7.1 <%s>: Sender address rejected: domain not allowed here", addr);
        smtpd_tx_free(tx);
        smtpd_error(s);
        return;
    }
    s->tx = tx;
    smtpd_reply(s, "250 2.1.0 Ok");
}

static void smtpd_cmd_rcpt(struct smtpd_session *s, const char *arg)
{
    const struct cfg_listener *lc = s->lcfg;
    const char *path = smtpd_skip_keyword(arg, "TO"), *params, *p;
    struct smtpd_tx *tx = s->tx;
    char err[128], *addr, *orcpt = NULL;
    unsigned notify = 0;
    int dsn = 0;

    if (tx == NULL) {
        smtpd_reply(s, "503 5.5.1 Error: need MAIL command");
        smtpd_error(s);
        return;
    }
    if (path == NULL) {
        smtpd_reply(s, "501 5.5.4 Syntax: RCPT TO:<address>");
        smtpd_error(s);
        return;
    }
    if (addr_path_parse(path, &addr, &params, err, sizeof(err)) != 0) {
        smtpd_reply(s, "501 5.1.3 Bad recipient address syntax: %s", err);
        smtpd_error(s);
        return;
    }
    if (addr[0] == '\0') {
        free(addr);
        smtpd_reply(s, "501 5.1.3 Bad recipient address syntax: empty address");
        smtpd_error(s);
        return;
    }
    for (p = params; p != NULL && *p != '\0';) {
        size_t n = strcspn(p, " ");

        if (smtpd_rcpt_param(s, p, n, &dsn, &notify, &orcpt) != 0) {
            free(addr);
            free(orcpt);
            smtpd_error(s);
            return;
        }
        p += n;
        p += strspn(p, " ");
    }
    if (lc->recipient_domains != NULL && !route_domain_listed(lc->recipient_domains, addr)) {
        log_info("NOQUEUE: reject: RCPT from %s: <%s>: relay access denied (not in "
                 "recipient_domains of listener %s)", s->peer, addr, lc->name);
        smtpd_reply(s, "554 5.7.1 <%s>: Relay access denied", addr);
        free(addr);
        free(orcpt);
        smtpd_error(s);
        return;
    }
    if (tx->nrcpts >= (size_t)s->srv->cfg->max_recipients) {
        free(addr);
        free(orcpt);
        smtpd_reply(s, "452 4.5.3 Error: too many recipients");
        return;
    }
    if (tx->nrcpts == tx->cap) {
        tx->cap = tx->cap ? tx->cap * 2 : 4;
        tx->rcpts = xrealloc(tx->rcpts, tx->cap * sizeof(*tx->rcpts));
        tx->notify = xrealloc(tx->notify, tx->cap * sizeof(*tx->notify));
        tx->orcpt = xrealloc(tx->orcpt, tx->cap * sizeof(*tx->orcpt));
    }
    tx->notify[tx->nrcpts] = notify;
    tx->orcpt[tx->nrcpts] = orcpt;
    tx->rcpts[tx->nrcpts++] = addr;
    tx->ndsn_rcpts += dsn;
    smtpd_reply(s, "250 2.1.5 Ok");
}

static void smtpd_cmd_data(struct smtpd_session *s, const char *arg)
{
    struct smtpd_server *srv = s->srv;

    (void)arg;
    if (s->tx == NULL) {
        smtpd_reply(s, "503 5.5.1 Error: need MAIL command");
        smtpd_error(s);
        return;
    }
    if (s->tx->nrcpts == 0) {
        smtpd_reply(s, "554 5.5.1 Error: no valid recipients");
        smtpd_error(s);
        return;
    }
    if (srv->mem_used >= (size_t)srv->cfg->max_memory) {
        log_warn("NOQUEUE: DATA from %s deferred: messages in flight hold %zu bytes "
                 "(max_memory %ld)", s->peer, srv->mem_used, srv->cfg->max_memory);
        smtpd_reply(s, "451 4.3.1 Insufficient system resources, try again later");
        return;
    }
    /* The limit is enforced while streaming; the excess is never held in memory. */
    s->tx->data = buf_new((size_t)srv->cfg->max_message_size);
    smtpd_mem_sync(s);
    smtpd_reply(s, "354 End data with <CR><LF>.<CR><LF>");
    smtpd_enter_state(s, SMTPD_S_DATA);
}

static void smtpd_cmd_rset(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_tx_reset(s);
    smtpd_reply(s, "250 2.0.0 Ok");
}

static void smtpd_cmd_noop(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_reply(s, "250 2.0.0 Ok");
}

static void smtpd_cmd_vrfy(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_reply(s, "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery");
}

static void smtpd_cmd_help(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_reply(s, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP%s%s",
                s->lcfg->tls == CFG_TLS_STARTTLS ? " STARTTLS" : "",
                s->lcfg->auth != CFG_AUTH_OFF ? " AUTH" : "");
}

static void smtpd_cmd_quit(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_reply(s, "221 2.0.0 Bye");
    smtpd_reject_close(s, NULL);
}

static void smtpd_cmd_starttls(struct smtpd_session *s, const char *arg)
{
    struct smtpd_listener *l = s->l;

    while (*arg == ' ')
        arg++;
    if (s->lcfg->tls != CFG_TLS_STARTTLS || l->cred == NULL) {
        smtpd_reply(s, "502 5.5.1 Error: command not implemented");
        smtpd_error(s);
        return;
    }
    if (tlsio_is_tls(s->io)) {
        smtpd_reply(s, "503 5.5.1 Error: TLS already active");
        smtpd_error(s);
        return;
    }
    if (*arg != '\0') {
        smtpd_reply(s, "501 5.5.4 Syntax: STARTTLS");
        smtpd_error(s);
        return;
    }
    smtpd_reply(s, "220 2.0.0 Ready to start TLS");
    s->cred = smtpd_cred_ref(l->cred);
    /* tlsio drops any plaintext pipelined after STARTTLS (RFC 3207 4). */
    if (tlsio_starttls(s->io, s->cred->cred, 1, NULL) != 0) {
        smtpd_session_close(s, tlsio_errstr(s->io));
        return;
    }
    smtpd_enter_state(s, SMTPD_S_TLS_HANDSHAKE);
}

/* ---- AUTH (RFC 4954) ---- */

static void smtpd_auth_result(struct smtpd_session *s, int rc, char *challenge, const char *err)
{
    struct authsasl_server *sasl = s->sasl;
    const char *user = authsasl_server_username(sasl);

    switch (rc) {
    case AUTHSASL_MORE:
        smtpd_reply(s, "334 %s", challenge);
        if (s->state != SMTPD_S_AUTH)
            smtpd_enter_state(s, SMTPD_S_AUTH);
        break;
    case AUTHSASL_DONE:
        s->flags |= SMTPD_F_AUTHED;
        free(s->auth_user);
        s->auth_user = xstrdup(user);
        log_info("session=%llu: client=%s sasl_method=%s sasl_username=%s%s",
                 (unsigned long long)s->id, s->peer, authsasl_server_mech(sasl), user,
                 s->lcfg->auth == CFG_AUTH_ACCEPT_ANY ? " (accept-any)" : "");
        smtpd_reply(s, "235 2.7.0 Authentication successful");
        smtpd_enter_state(s, SMTPD_S_CMD);
        break;
    case AUTHSASL_FORM:
        smtpd_reply(s, "501 5.5.2 Cannot decode AUTH data");
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_error(s);
        break;
    case AUTHSASL_NOMECH:
        smtpd_reply(s, "504 5.5.4 Unrecognized authentication type");
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_error(s);
        break;
    case AUTHSASL_TEMP:
        log_error("session=%llu: authentication unavailable: client=%s mechanism=%s: %s",
                  (unsigned long long)s->id, s->peer, authsasl_server_mech(sasl), err);
        smtpd_reply(s, "454 4.7.0 Temporary authentication failure");
        smtpd_enter_state(s, SMTPD_S_CMD);
        break;
    default:
        /* Never the password; the reply waits (AUTH_DELAY) to slow down guessing. */
        s->auth_failures++;
        log_warn("session=%llu: authentication failed: client=%s user=%s mechanism=%s: %s",
                 (unsigned long long)s->id, s->peer, user[0] != '\0' ? user : "(unknown)",
                 authsasl_server_mech(sasl), err);
        smtpd_enter_state(s, SMTPD_S_AUTH_DELAY);
        break;
    }
    free(challenge);
}

static void smtpd_cmd_auth(struct smtpd_session *s, const char *arg)
{
    const struct cfg_listener *lc = s->lcfg;
    struct authsasl_server *sasl;
    char mech[32], err[256] = "", *challenge = NULL;
    const char *initial;
    size_t n;
    int rc;

    while (*arg == ' ')
        arg++;
    if (lc->auth == CFG_AUTH_OFF) {
        smtpd_reply(s, "502 5.5.1 Error: authentication not enabled");
        smtpd_error(s);
        return;
    }
    if (s->flags & SMTPD_F_AUTHED) {
        smtpd_reply(s, "503 5.5.1 Error: already authenticated");
        smtpd_error(s);
        return;
    }
    if (s->tx != NULL) {
        smtpd_reply(s, "503 5.5.1 Error: MAIL transaction in progress");
        smtpd_error(s);
        return;
    }
    n = strcspn(arg, " ");
    if (n == 0 || n >= sizeof(mech)) {
        smtpd_reply(s, "501 5.5.4 Syntax: AUTH mechanism");
        smtpd_error(s);
        return;
    }
    memcpy(mech, arg, n);
    mech[n] = '\0';
    initial = arg + n;
    while (*initial == ' ')
        initial++;
    if ((sasl = smtpd_sasl(s)) == NULL) {
        smtpd_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    /* RFC 4954 6: 538 when the mechanism would be fine over TLS. */
    if (smtpd_is_plain_mech(mech) && !tlsio_is_tls(s->io) && !lc->auth_plaintext) {
        smtpd_reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        smtpd_error(s);
        return;
    }
    rc = authsasl_server_start(sasl, mech, *initial != '\0' ? initial : NULL, &challenge, err,
                               sizeof(err));
    smtpd_auth_result(s, rc, challenge, err);
}

/* The client's answer to a 334. */
/* Ends an AUTH exchange early.  The SASL context goes too: Cyrus's LOGIN mechanism keeps
 * (and leaks) state from a step it never finished, and a new AUTH starts from scratch. */
static void smtpd_auth_abort(struct smtpd_session *s, const char *reply)
{
    smtpd_reply(s, "%s", reply);
    s->sasl = authsasl_server_free(s->sasl);
    smtpd_enter_state(s, SMTPD_S_CMD);
    smtpd_error(s);
}

static void smtpd_auth_line(struct smtpd_session *s, const char *line)
{
    char err[256] = "", *challenge = NULL;
    int rc;

    if (strcmp(line, "*") == 0) {
        smtpd_auth_abort(s, "501 5.7.0 Authentication aborted");
        return;
    }
    rc = authsasl_server_step(s->sasl, line, &challenge, err, sizeof(err));
    smtpd_auth_result(s, rc, challenge, err);
}

static void smtpd_cmd_ehlo(struct smtpd_session *s, const char *arg)
{
    smtpd_cmd_helo(s, arg, 1);
}

static void smtpd_cmd_helo1(struct smtpd_session *s, const char *arg)
{
    smtpd_cmd_helo(s, arg, 0);
}

struct smtpd_cmd {
    const char *verb;
    void (*fn)(struct smtpd_session *s, const char *arg);
};

static const struct smtpd_cmd smtpd_cmd_table[] = {
    {"EHLO", smtpd_cmd_ehlo},         {"HELO", smtpd_cmd_helo1}, {"MAIL", smtpd_cmd_mail},
    {"RCPT", smtpd_cmd_rcpt},         {"DATA", smtpd_cmd_data},  {"RSET", smtpd_cmd_rset},
    {"NOOP", smtpd_cmd_noop},         {"VRFY", smtpd_cmd_vrfy},  {"HELP", smtpd_cmd_help},
    {"QUIT", smtpd_cmd_quit},         {"AUTH", smtpd_cmd_auth},
    {"STARTTLS", smtpd_cmd_starttls}, {NULL, NULL},
};

/* One command line (without its line ending); cmd is a private copy we may change. */
static void smtpd_dispatch(struct smtpd_session *s, char *cmd, size_t n)
{
    const struct smtpd_cmd *c;
    size_t verblen;

    if (memchr(cmd, '\0', n) != NULL) {
        smtpd_trace(s, '<', "(line with NUL)", 15);
        if (s->state == SMTPD_S_AUTH) {
            smtpd_auth_abort(s, "501 5.5.2 Error: NUL character in authentication data");
            return;
        }
        smtpd_reply(s, "500 5.5.2 Error: NUL character in command");
        smtpd_error(s);
        return;
    }
    /* Trailing spaces are common from legacy devices and never meaningful. */
    while (n > 0 && (cmd[n - 1] == ' ' || cmd[n - 1] == '\t'))
        cmd[--n] = '\0';
    if (s->state == SMTPD_S_AUTH) {
        smtpd_trace(s, '<', "****", 4);
        smtpd_auth_line(s, cmd);
        return;
    }
    verblen = strcspn(cmd, " ");
    if (verblen == 4 && strncasecmp(cmd, "AUTH", 4) == 0) {
        /* "AUTH PLAIN ****": the mechanism, never the credentials. */
        const char *mech = cmd + verblen + strspn(cmd + verblen, " ");
        size_t mlen = strcspn(mech, " ");
        char masked[64];
        int m = snprintf(masked, sizeof(masked), "%.*s %.*s%s", (int)verblen, cmd,
                         (int)(mlen > 32 ? 32 : mlen), mech, mech[mlen] != '\0' ? " ****" : "");
        smtpd_trace(s, '<', masked, m);
    } else {
        smtpd_trace(s, '<', cmd, (int)n);
    }
    for (c = smtpd_cmd_table; c->verb != NULL; c++) {
        if (verblen == strlen(c->verb) && strncasecmp(cmd, c->verb, verblen) == 0) {
            c->fn(s, cmd + verblen);
            return;
        }
    }
    if (verblen == 0)
        smtpd_reply(s, "500 5.5.2 Error: empty command");
    else
        smtpd_reply(s, "502 5.5.2 Error: command not recognized");
    smtpd_error(s);
}

/* ---- DATA ---- */

static void smtpd_data_append(struct smtpd_session *s, const char *p, size_t n)
{
    struct smtpd_server *srv = s->srv;
    struct smtpd_tx *tx = s->tx;

    if (tx->too_big || tx->no_mem)
        return;
    if (buf_append(tx->data, p, n) != 0) {
        tx->too_big = 1;
        /* Keep nothing of an over-size message. */
        buf_free(tx->data);
        tx->data = buf_new(1);
    }
    smtpd_mem_sync(s);
    if (srv->mem_used > (size_t)srv->cfg->max_memory) {
        /* Over the global bound: drop this message now, answer 451 at its end. */
        tx->no_mem = 1;
        buf_free(tx->data);
        tx->data = buf_new(1);
        smtpd_mem_sync(s);
    }
}

static void smtpd_commit_done(void *arg, int rc);

static void smtpd_received(struct smtpd_session *s, const char *qid, struct buf *out)
{
    const struct cfg *cfg = s->srv->cfg;
    char date[64], tls[128];
    const char *proto = (s->flags & SMTPD_F_EHLO) ? "ESMTP" : "SMTP";

    tlsio_describe(s->io, tls, sizeof(tls));
    /* No reverse DNS lookup: devices on a LAN rarely have PTR records, and the address is
     * what an administrator searches for. */
    buf_printf(out, "Received: from %s ([%s])\r\n", s->helo ? s->helo : "unknown", s->peer);
    if (tls[0] != '\0')
        buf_printf(out, "\t(using %s)\r\n", tls);
    /* RFC 3848: ESMTPS, ESMTPA, ESMTPSA. */
    buf_printf(out, "\tby %s (relayd) with %s%s%s id %s", cfg->hostname, proto,
               tlsio_is_tls(s->io) ? "S" : "", (s->flags & SMTPD_F_AUTHED) ? "A" : "", qid);
    if (s->tx->nrcpts == 1)
        buf_printf(out, "\r\n\tfor <%s>", s->tx->rcpts[0]);
    buf_printf(out, "; %s", msgfix_date(time(NULL), date, sizeof(date)));
}

static void smtpd_data_end(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;
    const struct cfg_listener *lc = s->lcfg;
    struct smtpd_tx *tx = s->tx;
    struct spool_msg msg;
    struct spool_rcpt *rcpts;
    struct msgfix_opts fix;
    struct msgfix_report rep;
    struct buf *received, *out;
    char qid[17], dsn[160] = "";
    char *body;
    size_t len, i;
    int held = 0;

    if (tx->too_big) {
        smtpd_reply(s, "552 5.3.4 Error: message exceeds fixed limit of %ld bytes",
                    srv->cfg->max_message_size);
        smtpd_tx_reset(s);
        smtpd_enter_state(s, SMTPD_S_CMD);
        return;
    }
    if (tx->no_mem) {
        log_warn("NOQUEUE: message from %s dropped: messages in flight passed max_memory (%ld)",
                 s->peer, srv->cfg->max_memory);
        smtpd_reply(s, "451 4.3.1 Insufficient system resources, try again later");
        smtpd_tx_reset(s);
        smtpd_enter_state(s, SMTPD_S_CMD);
        return;
    }
    memset(&msg, 0, sizeof(msg));
    msg.id = spool_id_new(srv->sp);
    spool_id_str(msg.id, qid);

    received = buf_new(0);
    smtpd_received(s, qid, received);
    memset(&fix, 0, sizeof(fix));
    fix.hostname = srv->cfg->hostname;
    fix.received = lc->add_received ? received->data : NULL;
    fix.sender = tx->sender;
    fix.queue_id = qid;
    fix.now = time(NULL);
    fix.add_date = lc->add_date;
    fix.add_message_id = lc->add_message_id;
    fix.add_from = lc->add_from;
    out = buf_new(0);
    msgfix_build(tx->data->data, tx->data->len, &fix, out, &rep);
    buf_free(received);

    rcpts = xcalloc(tx->nrcpts, sizeof(*rcpts));
    for (i = 0; i < tx->nrcpts; i++) {
        rcpts[i].addr = tx->rcpts[i];
        rcpts[i].dsn_notify = tx->notify[i];
        rcpts[i].dsn_orcpt = tx->orcpt[i];
        if (route_match(srv->cfg, tx->sender, tx->rcpts[i], s->peer, lc->name) == NULL)
            held = 1;
    }
    msg.state = held ? SPOOL_HELD : SPOOL_QUEUED;
    msg.arrived = time(NULL);
    msg.next_attempt = held ? 0 : msg.arrived;
    msg.sender = tx->sender;
    msg.client = s->peer;
    msg.helo = s->helo;
    msg.listener = lc->name;
    msg.rcpts = rcpts;
    msg.nrcpts = tx->nrcpts;
    msg.dsn_ret = strcasecmp(tx->ret, "FULL") == 0   ? SPOOL_RET_FULL
                  : strcasecmp(tx->ret, "HDRS") == 0 ? SPOOL_RET_HDRS
                                                     : 0;
    msg.dsn_envid = tx->envid;
    body = buf_steal(out, &len);
    msg.size = len;
    buf_free(out);

    if (tx->ret[0] != '\0' || tx->envid != NULL || tx->ndsn_rcpts > 0) {
        /* Logged as xtext, as sent: one word whatever the client put in it. */
        char *envid = tx->envid != NULL ? bounce_xtext_encode(tx->envid) : NULL;

        snprintf(dsn, sizeof(dsn), " dsn_ret=%s dsn_envid=%.100s dsn_rcpts=%d",
                 tx->ret[0] ? tx->ret : "-", envid ? envid : "-", tx->ndsn_rcpts);
        free(envid);
    }
    log_info("%s: from=<%s> size=%zu nrcpt=%zu client=%s helo=%s%s%s%s%s%s%s%s", qid,
             tx->sender, len, tx->nrcpts, s->peer, s->helo ? s->helo : "none",
             s->auth_user != NULL ? " sasl_username=" : "", s->auth_user ? s->auth_user : "",
             rep.added_date ? " added=Date" : "", rep.added_message_id ? " added=Message-ID" : "",
             rep.added_from ? " added=From" : "", tlsio_is_tls(s->io) ? " tls=yes" : "", dsn);
    if (held)
        log_info("%s: held: no upstream route is configured for its recipients", qid);

    /* Keep the id for the completion; the transaction's data is no longer needed. */
    buf_free(tx->data);
    tx->data = NULL;
    smtpd_mem_sync(s);
    s->refs++;
    smtpd_enter_state(s, SMTPD_S_COMMIT_WAIT);
    /* Postfix's "persist before reply": the 250 is sent from smtpd_commit_done. */
    struct smtpd_commit *c = xmalloc(sizeof(*c));
    c->s = s;
    c->id = msg.id;
    spool_put_async(srv->sp, &msg, body, len, smtpd_commit_done, c);
    free(rcpts);
}

static void smtpd_commit_done(void *arg, int rc)
{
    struct smtpd_commit *c = arg;
    struct smtpd_session *s = c->s;
    char qid[17];

    spool_id_str(c->id, qid);
    if (s->state == SMTPD_S_CLOSING) {
        /* The client left before our 250; if it resends, the upstream gets it twice. */
        if (rc == 0) {
            log_warn("%s: client %s disconnected before the reply; message kept", qid, s->peer);
            if (s->srv->on_spooled != NULL)
                s->srv->on_spooled(s->srv->on_spooled_arg, c->id);
        }
        free(c);
        smtpd_session_unref(s);
        return;
    }
    if (rc == 0) {
        smtpd_reply(s, "250 2.0.0 Ok: queued as %s", qid);
        if (s->srv->on_spooled != NULL)
            s->srv->on_spooled(s->srv->on_spooled_arg, c->id);
    } else if (rc == SPOOL_EFULL) {
        log_warn("%s: rejected: spool is full (%s)", qid, spool_strerror(rc));
        smtpd_reply(s, "452 4.3.1 Insufficient system storage");
    } else {
        log_error("%s: spool write failed: %s", qid, spool_strerror(rc));
        smtpd_reply(s, "451 4.3.0 Error: local error in processing");
    }
    free(c);
    smtpd_tx_reset(s);
    smtpd_enter_state(s, SMTPD_S_CMD);
    smtpd_session_unref(s); /* still held by "alive" */
    smtpd_drain_input(s);
}

/* One DATA line (without its line ending); returns 1 at the end of the message. */
static int smtpd_data_line(struct smtpd_session *s, const char *line, size_t n)
{
    struct smtpd_tx *tx = s->tx;

    if (!tx->mid_line) {
        if (n == 1 && line[0] == '.')
            return 1;
        if (n > 0 && line[0] == '.') { /* RFC 5321 4.5.2 dot-unstuffing */
            line++;
            n--;
        }
    }
    tx->mid_line = 0;
    tx->last_dot = n > 0 && line[n - 1] == '.';
    smtpd_data_append(s, line, n);
    smtpd_data_append(s, "\r\n", 2);
    return 0;
}

/*
 * The data timeout struck.  Some alarm panels (TNCS) end DATA with the dot glued to the
 * last line, "ALARM 8.\r\n" or even "ALARM 8." with no line end, and then wait for our
 * reply.  Rather than lose the alarm with a 421, take such a last line as the end of the
 * message, without its dot.  XXX Heuristic, but only at the timeout: a client that really
 * stalled after a sentence would have got a 421 and lost the message anyway.
 * Returns 1 when the message was ended here.
 */
static int smtpd_data_glued_dot(struct smtpd_session *s)
{
    struct smtpd_tx *tx = s->tx;
    struct buf *in = tlsio_input(s->io);

    if (tx == NULL || tx->too_big || tx->no_mem || tx->data == NULL)
        return 0;
    if (in->len > 0 && in->data[in->len - 1] == '.' && memchr(in->data, '\n', in->len) == NULL) {
        /* A last line without any line end: everything but the dot is the line. */
        smtpd_data_line(s, in->data, in->len - 1);
        buf_consume(in, in->len);
    } else if (in->len == 0 && tx->last_dot && tx->data->len >= 3) {
        /* "text.\r\n": drop the dot, keep the CRLF. */
        tx->data->data[tx->data->len - 3] = '\r';
        tx->data->data[tx->data->len - 2] = '\n';
        tx->data->len--;
        tx->data->data[tx->data->len] = '\0';
    } else {
        return 0;
    }
    log_warn("session=%llu: client %s: no end of DATA after a last line ending in '.' within "
             "data_timeout; taking that dot as the end of the message",
             (unsigned long long)s->id, s->peer);
    smtpd_data_end(s);
    return 1;
}

/* ---- input ---- */

static void smtpd_drain_input(struct smtpd_session *s)
{
    size_t maxline = (size_t)s->lcfg->max_line_length;
    struct buf *in;
    const char *line;
    char *cmd;
    size_t n, used;

    if (s->input_paused &&
        (s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA || s->state == SMTPD_S_AUTH)) {
        s->input_paused = 0;
        tlsio_read_start(s->io);
    }
    while (s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA || s->state == SMTPD_S_AUTH) {
        in = tlsio_input(s->io);
        if (s->state == SMTPD_S_DATA) {
            /* Every complete line in one pass, consumed once at the end: consuming line by
             * line would move the rest of the buffer each time (quadratic in short lines). */
            size_t off = 0;
            int end = 0;

            while (!end) {
                const char *p = in->data + off, *lf = memchr(p, '\n', in->len - off);
                size_t len;

                if (lf == NULL)
                    break;
                len = (size_t)(lf - p);
                end = smtpd_data_line(s, p, len > 0 && p[len - 1] == '\r' ? len - 1 : len);
                off += len + 1;
            }
            buf_consume(in, off);
            if (end) {
                smtpd_data_end(s);
                continue;
            }
        }
        used = buf_getline(in, &line, &n);
        if (used == 0) {
            if (s->state == SMTPD_S_DATA && in->len > SMTPD_DATA_CHUNK) {
                /* A very long line: store what we have, keeping a trailing CR for CRLF. */
                size_t take = in->len - (in->data[in->len - 1] == '\r' ? 1 : 0);
                if (!s->tx->mid_line && in->data[0] == '.') {
                    buf_consume(in, 1);
                    take--;
                }
                smtpd_data_append(s, in->data, take);
                s->tx->mid_line = 1;
                buf_consume(in, take);
            } else if (s->state != SMTPD_S_DATA && in->len > maxline) {
                if (!(s->flags & SMTPD_F_SKIPLINE)) {
                    smtpd_trace(s, '<', "(line too long)", 15);
                    smtpd_reply(s, "500 5.5.2 Error: line too long");
                    s->flags |= SMTPD_F_SKIPLINE;
                    if (s->state == SMTPD_S_AUTH)
                        smtpd_enter_state(s, SMTPD_S_CMD);
                    if (smtpd_error(s) != 0)
                        return;
                }
                buf_consume(in, in->len);
            }
            return;
        }
        if (s->flags & SMTPD_F_SKIPLINE) {
            s->flags &= ~SMTPD_F_SKIPLINE; /* resynchronised at the end of the long line */
            buf_consume(in, used);
            continue;
        }
        if (n > maxline) {
            smtpd_trace(s, '<', "(line too long)", 15);
            smtpd_reply(s, "500 5.5.2 Error: line too long");
            buf_consume(in, used);
            if (s->state == SMTPD_S_AUTH)
                smtpd_enter_state(s, SMTPD_S_CMD);
            if (smtpd_error(s) != 0)
                return;
            continue;
        }
        /* Consumed before it runs: STARTTLS replaces the input buffer's contents. */
        cmd = xmalloc(n + 1);
        memcpy(cmd, line, n);
        cmd[n] = '\0';
        buf_consume(in, used);
        smtpd_dispatch(s, cmd, n);
        free(cmd);
    }
}

static void smtpd_on_io(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct smtpd_session *s = arg;
    char tls[128];

    switch (ev) {
    case TLSIO_DATAIN:
        if (s->state == SMTPD_S_PROXY) {
            smtpd_proxy_input(s);
            break;
        }
        if (s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA || s->state == SMTPD_S_AUTH) {
            uv_timer_again(&s->timer);
        } else if (tlsio_input(io)->len > SMTPD_INPUT_MAX && !s->input_paused) {
            /* Waiting (for a commit, a slowed-down AUTH reply, a flush): pipelined input
             * stays in the kernel instead of our memory until we read commands again. */
            tlsio_read_stop(io);
            s->input_paused = 1;
        }
        smtpd_drain_input(s);
        break;
    case TLSIO_DRAINED:
        if (s->close_after_drain)
            smtpd_session_close(s, s->close_why != NULL ? s->close_why : "quit");
        break;
    case TLSIO_EOF:
        smtpd_session_close(s, s->state == SMTPD_S_DATA ? "lost connection during DATA"
                               : s->state == SMTPD_S_COMMIT_WAIT
                                   ? "lost connection while committing"
                               : s->state == SMTPD_S_TLS_HANDSHAKE
                                   ? "lost connection during TLS handshake"
                               : s->state == SMTPD_S_PROXY
                                   ? "lost connection during PROXY header"
                                   : "lost connection");
        break;
    case TLSIO_ERROR:
        smtpd_session_close(s, tlsio_errstr(io));
        break;
    case TLSIO_TLSREADY:
        log_info("session=%llu: client=%s TLS established: %s", (unsigned long long)s->id,
                 s->peer, tlsio_describe(io, tls, sizeof(tls)));
        if (!(s->flags & SMTPD_F_GREETED)) {
            smtpd_greet(s); /* implicit TLS */
            break;
        }
        /* RFC 3207 4.2: forget everything learnt in cleartext. */
        free(s->helo);
        s->helo = NULL;
        s->flags &= ~(SMTPD_F_HELO | SMTPD_F_EHLO | SMTPD_F_AUTHED);
        s->flags |= SMTPD_F_NEEDHELO;
        free(s->auth_user);
        s->auth_user = NULL;
        smtpd_tx_reset(s);
        s->sasl = authsasl_server_free(s->sasl); /* plaintext mechanisms may be allowed now */
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_drain_input(s);
        break;
    case TLSIO_CONNECTED:
        break;
    }
}

/* ---- connection set-up: limits, allow list, greeting ---- */

static int smtpd_client_count(const struct smtpd_session *s)
{
    const struct smtpd_session *o;
    int n = 0;

    for (o = s->srv->sessions; o != NULL; o = o->next)
        if ((o->flags & SMTPD_F_COUNTED) && strcmp(o->peer, s->peer) == 0)
            n++;
    return n;
}

/* Called once the real client is known and, on implicit-TLS listeners, TLS is up. */
static void smtpd_greet(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;
    const struct cfg_listener *lc = s->lcfg;
    int n;

    s->flags |= SMTPD_F_GREETED;
    smtpd_enter_state(s, SMTPD_S_CMD);
    if (!netaddr_list_match(&lc->allow, (struct sockaddr *)&s->addr)) {
        log_warn("reject: connect from %s to listener %s: client address is not in its allow list",
                 s->peer, lc->name);
        smtpd_reply(s, "554 5.7.1 %s: access denied to %s", srv->cfg->hostname, s->peer);
        smtpd_reject_close(s, "rejected: not in the allow list");
        return;
    }
    if (srv->nsessions >= srv->cfg->max_connections) {
        log_warn("reject: connect from %s to listener %s: too many connections (%d, "
                 "max_connections)", s->peer, lc->name, srv->nsessions);
        smtpd_reply(s, "421 4.7.0 %s Error: too many connections", srv->cfg->hostname);
        smtpd_reject_close(s, "rejected: max_connections");
        return;
    }
    if ((n = smtpd_client_count(s)) >= srv->cfg->max_connections_per_client) {
        log_warn("reject: connect from %s to listener %s: too many connections from this "
                 "client (%d, max_connections_per_client)", s->peer, lc->name, n);
        smtpd_reply(s, "421 4.7.0 %s Error: too many connections from your address",
                    srv->cfg->hostname);
        smtpd_reject_close(s, "rejected: max_connections_per_client");
        return;
    }
    s->flags |= SMTPD_F_COUNTED;
    srv->nsessions++;
    s->debug = lc->debug_peers.n > 0 && netaddr_list_match(&lc->debug_peers,
                                                            (struct sockaddr *)&s->addr);
    log_info("connect from %s listener=%s session=%llu%s", s->peer, lc->name,
             (unsigned long long)s->id, s->debug ? " debug=yes" : "");
    smtpd_reply(s, "220 %s ESMTP relayd", srv->cfg->hostname);
}

/* After the PROXY header (or right after accept): TLS first on implicit listeners. */
static void smtpd_session_begin(struct smtpd_session *s)
{
    struct smtpd_listener *l = s->l;

    tlsio_read_start(s->io);
    if (s->lcfg->tls == CFG_TLS_IMPLICIT) {
        s->cred = smtpd_cred_ref(l->cred);
        /* Whatever is in the input now followed a PROXY header in the same segment: it is
         * the client's ClientHello, so keep it (nothing else can precede implicit TLS). */
        if (tlsio_starttls_keep(s->io, s->cred->cred, 1, NULL) != 0) {
            smtpd_session_close(s, tlsio_errstr(s->io));
            return;
        }
        smtpd_enter_state(s, SMTPD_S_TLS_HANDSHAKE);
        return;
    }
    smtpd_greet(s);
}

/* PROXY state: the header arrives as plaintext through tlsio like any input.  Once it is
 * complete it is consumed; what follows it stays in the input, for the plain session (the
 * client's first commands) or for the handshake (implicit TLS: tlsio_starttls_keep). */
static void smtpd_proxy_input(struct smtpd_session *s)
{
    const struct cfg_listener *lc = s->lcfg;
    struct buf *in = tlsio_input(s->io);
    struct proxyproto_result res;
    int rc;

    rc = proxyproto_parse(in->data, in->len, &res);
    if (rc == 0) {
        if (in->len >= SMTPD_PROXY_MAX)
            smtpd_session_close(s, "PROXY header too long");
        return; /* wait for more; the state timer bounds the wait */
    }
    if (rc < 0) {
        log_warn("listener %s: connection from %s: %s; closing", lc->name, s->peer,
                 proxyproto_strerror(rc));
        smtpd_session_close(s, proxyproto_strerror(rc));
        return;
    }
    if ((lc->proxy_protocol == CFG_PROXY_V1 && res.version != 1) ||
        (lc->proxy_protocol == CFG_PROXY_V2 && res.version != 2)) {
        log_warn("listener %s: connection from %s: PROXY v%d header, but the listener expects "
                 "%s; closing", lc->name, s->peer, res.version,
                 cfg_proxy_name(lc->proxy_protocol));
        smtpd_session_close(s, "wrong PROXY protocol version");
        return;
    }
    buf_consume(in, (size_t)rc);
    if (!res.local) {
        char proxy[64];

        snprintf(proxy, sizeof(proxy), "%s", s->peer);
        s->addr = res.src;
        netaddr_sockaddr_str((struct sockaddr *)&s->addr, s->peer, sizeof(s->peer));
        log_debug(1, "session=%llu: PROXY v%d: client %s via %s", (unsigned long long)s->id,
                  res.version, s->peer, proxy);
    }
    smtpd_session_begin(s);
}

static void smtpd_on_timeout(uv_timer_t *t)
{
    struct smtpd_session *s = t->data;

    switch (s->state) {
    case SMTPD_S_PROXY:
        log_warn("listener %s: connection from %s: no PROXY header within %d s; closing",
                 s->lcfg->name, s->peer, SMTPD_PROXY_TIMEOUT_MS / 1000);
        smtpd_session_close(s, "timeout waiting for the PROXY header");
        return;
    case SMTPD_S_AUTH_DELAY:
        smtpd_reply(s, "535 5.7.8 Authentication credentials invalid");
        smtpd_enter_state(s, SMTPD_S_CMD);
        if (smtpd_error(s) == 0)
            smtpd_drain_input(s);
        return;
    case SMTPD_S_TLS_HANDSHAKE:
        smtpd_session_close(s, "timeout during TLS handshake");
        return;
    case SMTPD_S_DATA:
        if (smtpd_data_glued_dot(s))
            return;
        break;
    default:
        break;
    }
    smtpd_reply(s, "421 4.4.2 %s Error: timeout exceeded", s->srv->cfg->hostname);
    smtpd_session_close(s, s->state == SMTPD_S_DATA ? "timeout during DATA" : "timeout");
}

/* ---- listeners ---- */

static void smtpd_on_connection(uv_stream_t *server, int status)
{
    struct smtpd_listener *l = server->data;
    struct smtpd_server *srv = l->srv;
    struct smtpd_session *s;

    if (status < 0) {
        log_warn("listener %s: accept: %s", l->cfg->name, uv_strerror(status));
        return;
    }
    s = xcalloc(1, sizeof(*s));
    s->id = ++srv->next_session_id;
    s->srv = srv;
    s->l = l;
    s->lcfg = l->cfg;
    s->refs = 1;
    s->state = SMTPD_S_CMD;
    s->io = tlsio_new(srv->loop, smtpd_on_io, s);
    uv_timer_init(srv->loop, &s->timer);
    s->timer.data = s;
    s->next = srv->sessions;
    if (s->next != NULL)
        s->next->prev = s;
    srv->sessions = s;
    srv->open++;
    if (uv_accept(server, tlsio_stream(s->io)) != 0) {
        snprintf(s->peer, sizeof(s->peer), "unknown");
        smtpd_session_close(s, "accept failed");
        return;
    }
    if (tlsio_peer(s->io, &s->addr) == 0)
        netaddr_sockaddr_str((struct sockaddr *)&s->addr, s->peer, sizeof(s->peer));
    else
        snprintf(s->peer, sizeof(s->peer), "unknown");
    if (l->cfg->proxy_protocol != CFG_PROXY_NO) {
        /* The header names the client, and the allow list then judges that name: only a
         * proxy we trust may speak it, or anyone could claim an allowed address. */
        if (!netaddr_list_match(&l->cfg->proxy_trusted, (struct sockaddr *)&s->addr)) {
            log_warn("reject: connect from %s to listener %s: not in proxy_trusted, so its "
                     "PROXY header is not believed",
                     s->peer, l->cfg->name);
            smtpd_session_close(s, "untrusted proxy");
            return;
        }
        smtpd_enter_state(s, SMTPD_S_PROXY);
        if (tlsio_read_start(s->io) != 0)
            smtpd_session_close(s, tlsio_errstr(s->io));
        return;
    }
    smtpd_session_begin(s);
}

struct smtpd_server *smtpd_server_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp,
                                      void (*on_spooled)(void *arg, uint64_t id), void *arg)
{
    struct smtpd_server *srv = xcalloc(1, sizeof(*srv));

    srv->loop = loop;
    srv->cfg = cfg;
    srv->sp = sp;
    srv->on_spooled = on_spooled;
    srv->on_spooled_arg = arg;
    return srv;
}

static int smtpd_cred_load(const struct cfg_listener *lc, struct smtpd_cred **out, char *err,
                           size_t errlen)
{
    struct tlsio_cred *cred;
    char why[512];
    int rc;

    rc = tlsio_cred_server_new(lc->cert, lc->key, lc->tls_priority, &cred, why, sizeof(why));
    if (rc != 0) {
        snprintf(err, errlen, "listener %s: TLS: %s", lc->name, why);
        return rc;
    }
    *out = xcalloc(1, sizeof(**out));
    (*out)->cred = cred;
    (*out)->refs = 1;
    return 0;
}

int smtpd_server_listen(struct smtpd_server *srv, char *err, size_t errlen)
{
    const struct cfg *cfg = srv->cfg;
    struct sockaddr_storage ss;
    int i, rc;

    srv->listeners = xcalloc((size_t)cfg->nlisteners, sizeof(*srv->listeners));
    srv->nlisteners = cfg->nlisteners;
    for (i = 0; i < cfg->nlisteners; i++) {
        const struct cfg_listener *lc = &cfg->listeners[i];

        if ((lc->auth == CFG_AUTH_OPTIONAL || lc->auth == CFG_AUTH_REQUIRED) &&
            authsasl_server_init(err, errlen) != 0)
            return -1;
    }
    for (i = 0; i < cfg->nlisteners; i++) {
        struct smtpd_listener *l = &srv->listeners[i];
        const struct cfg_listener *lc = &cfg->listeners[i];

        l->srv = srv;
        l->cfg = lc;
        if (lc->tls != CFG_TLS_NONE && (rc = smtpd_cred_load(lc, &l->cred, err, errlen)) != 0)
            return rc;
        if (strchr(lc->host, ':') != NULL)
            rc = uv_ip6_addr(lc->host, lc->port, (struct sockaddr_in6 *)&ss);
        else
            rc = uv_ip4_addr(lc->host, lc->port, (struct sockaddr_in *)&ss);
        if (rc != 0) {
            snprintf(err, errlen, "listener %s: bad address %s: %s", lc->name, lc->host,
                     uv_strerror(rc));
            return rc;
        }
        uv_tcp_init(srv->loop, &l->tcp);
        l->tcp.data = l;
        l->bound = 1;
        srv->open++;
        if ((rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, 0)) != 0 ||
            (rc = uv_listen((uv_stream_t *)&l->tcp, 128, smtpd_on_connection)) != 0) {
            snprintf(err, errlen, "listener %s: listen on %s:%d: %s", lc->name, lc->host,
                     lc->port, uv_strerror(rc));
            return rc;
        }
        log_info("listener %s: listening on %s:%d tls=%s auth=%s%s", lc->name, lc->host,
                 lc->port, cfg_tls_name(lc->tls), cfg_auth_name(lc->auth),
                 lc->proxy_protocol != CFG_PROXY_NO ? " proxy_protocol=yes" : "");
    }
    return 0;
}

int smtpd_server_reload_tls(struct smtpd_server *srv)
{
    char err[512];
    int i, failed = 0;

    for (i = 0; i < srv->nlisteners; i++) {
        struct smtpd_listener *l = &srv->listeners[i];
        struct smtpd_cred *fresh;

        if (l->cfg->tls == CFG_TLS_NONE || l->cred == NULL)
            continue;
        if (smtpd_cred_load(l->cfg, &fresh, err, sizeof(err)) != 0) {
            log_error("%s; keeping the certificate loaded before", err);
            failed++;
            continue;
        }
        /* Sessions already using the old credentials keep their reference. */
        smtpd_cred_unref(l->cred);
        l->cred = fresh;
        log_info("listener %s: TLS certificate reloaded from %s", l->cfg->name, l->cfg->cert);
    }
    return failed ? -1 : 0;
}

static void smtpd_on_listener_closed(uv_handle_t *h)
{
    struct smtpd_listener *l = h->data;

    l->srv->open--;
    smtpd_server_maybe_done(l->srv);
}

void smtpd_server_stop(struct smtpd_server *srv, void (*done)(void *arg), void *arg)
{
    struct smtpd_session *s, *next;
    int i;

    srv->stopping = 1;
    srv->stop_done = done;
    srv->stop_arg = arg;
    srv->open++; /* hold off completion until every close below has been started */
    for (i = 0; i < srv->nlisteners; i++) {
        if (srv->listeners[i].bound) {
            srv->listeners[i].bound = 0;
            uv_close((uv_handle_t *)&srv->listeners[i].tcp, smtpd_on_listener_closed);
        }
    }
    for (s = srv->sessions; s != NULL; s = next) {
        next = s->next;
        if (s->state != SMTPD_S_CLOSING) {
            if (s->flags & SMTPD_F_GREETED)
                smtpd_reply(s, "421 4.3.2 %s Service shutting down", srv->cfg->hostname);
            smtpd_session_close(s, "shutdown");
        }
    }
    srv->open--;
    smtpd_server_maybe_done(srv);
}

void smtpd_server_free(struct smtpd_server *srv)
{
    int i;

    if (srv == NULL)
        return;
    for (i = 0; i < srv->nlisteners; i++)
        srv->listeners[i].cred = smtpd_cred_unref(srv->listeners[i].cred);
    free(srv->listeners);
    free(srv);
}
