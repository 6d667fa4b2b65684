/*
 * smtpc - the outbound SMTP client; see smtpc.h.
 *
 * Why one file of this length: it is one state machine (connect, TLS, AUTH, the pipelined
 * transaction, the body, QUIT) whose states share the connection, the timer and the reply
 * queue; split, every part would need the whole struct smtpc and its transitions.  The
 * policy it applies lives elsewhere (relayd/verdict.c), and so does its I/O (common/tlsio.c).
 *
 * One struct smtpc per connection, driven by tlsio events and one timer:
 *
 *   RESOLVE -> CONNECT (each address in turn) -> [TLS_IMPLICIT] -> GREETING -> EHLO
 *     -> [STARTTLS -> TLS_HANDSHAKE -> EHLO] -> [AUTH ...] -> IDLE
 *   IDLE -> TX (replies to [RSET] MAIL RCPT... DATA, in order) -> BODY (written in chunks,
 *     each after TLSIO_DRAINED) -> DOT (reply to the final dot) -> IDLE ... -> QUIT -> CLOSING
 *
 * Every change of state goes through smtpc_enter_state(), which logs "old -> new" (debug
 * level 3) and re-arms the one timer with that state's timeout (smtpc_state_timeout()):
 * connect_timeout for CONNECT, command_timeout for a command's reply (and the TLS
 * handshake, and each body chunk), data_timeout for the reply to the final dot (RFC 5321
 * 4.5.3.2: 5 and 10 minutes suggested; the operator chooses), idle_timeout while IDLE, a
 * short one for QUIT; none while resolving.  Waiting again in the same state (the next
 * pipelined reply, the next AUTH step) re-enters it to re-arm.
 *
 * Replies are matched to commands through a queue of expectations (RFC 2920: replies come
 * in the order of the commands), so the same code runs a transaction pipelined (one write
 * for RSET, MAIL, every RCPT and DATA) or in lock step.
 *
 * Two modes share the machine.  SESSION (smtpc_session_open(), relayd/pool.c): events for
 * set-up, each transaction's done as soon as its last reply is in, QUIT when the owner
 * says so or after idle_timeout.  PROBE (smtpc_probe()): set-up only, each step reported,
 * then QUIT; done once everything is closed.
 *
 * Failure modes: anything that ends the connection goes through smtpc_fail(), which records the
 * result (the first reason wins, so a dropped connection during QUIT never turns a
 * delivered message into a deferred one), hands it to the transaction or reports the set-up
 * failure, sends QUIT when the dialogue is still in step, and closes.  A transaction that
 * fails while the dialogue stays in step (MAIL refused, every RCPT refused, DATA refused)
 * ends through smtpc_tx_end() and leaves the session usable.  A 421 at any step closes.  Never a
 * cleartext fallback after STARTTLS was required, never AUTH before TLS unless tls = none
 * and allow_plaintext_auth.  TLS verification, pin and AUTH refusals set config_fault.
 *
 * Ownership: the client frees itself once the tlsio, the timer and any pending getaddrinfo
 * have all reported back; SMTPC_EV_CLOSED (session) or done (probe) runs right before that
 * free, or done synchronously inside smtpc_abort().
 */
#include "relayd/smtpc.h"

#include <inttypes.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/authsasl.h"
#include "common/buf.h"
#include "common/log.h"
#include "common/xalloc.h"
#include "common/xtext.h"
#include "relayd/oauth2.h"
#include "spool/spool.h"

/* Message body bytes handed to tlsio per write; the next chunk waits for TLSIO_DRAINED so
 * a large message is never copied whole into write requests. */
#define SMTPC_BODY_CHUNK (128 * 1024)
/* A reply line longer than this is not SMTP (RFC 5321 4.5.3.1.5 says 512). */
#define SMTPC_LINE_MAX 8192
/* Reply text kept per reply (multi-line replies are joined). */
#define SMTPC_REPLY_MAX 2048
/* How long to wait for the reply to QUIT: the outcome is known already. */
#define SMTPC_QUIT_TIMEOUT 10
/* Used when the configuration says nothing (tests build cfg_upstream by hand). */
#define SMTPC_IDLE_TIMEOUT_DEFAULT 30

enum smtpc_mode {
    SMTPC_M_SESSION,
    SMTPC_M_PROBE,
};

enum smtpc_state {
    SMTPC_S_RESOLVE,
    SMTPC_S_CONNECT,
    SMTPC_S_TLS_IMPLICIT,
    SMTPC_S_GREETING,
    SMTPC_S_EHLO,
    SMTPC_S_HELO,
    SMTPC_S_STARTTLS,
    SMTPC_S_TLS_HANDSHAKE,
    SMTPC_S_AUTH,
    SMTPC_S_IDLE,
    SMTPC_S_TXCHECK, /* a transaction refused before sending anything; ends from the timer */
    SMTPC_S_TX,
    SMTPC_S_BODY,
    SMTPC_S_DOT, /* the final dot sent, its reply awaited */
    SMTPC_S_QUIT,
    SMTPC_S_CLOSING,
};

static const char *const smtpc_state_names[] = {
    "RESOLVE", "CONNECT", "TLS_IMPLICIT", "GREETING", "EHLO", "HELO", "STARTTLS", "TLS_HANDSHAKE",
    "AUTH",    "IDLE",    "TXCHECK",      "TX",       "BODY", "DOT",  "QUIT",     "CLOSING",
};

/* EHLO keywords we use. */
#define SMTPC_E_STARTTLS 0x01
#define SMTPC_E_AUTH 0x02
#define SMTPC_E_SIZE 0x04
#define SMTPC_E_PIPELINING 0x08
#define SMTPC_E_8BITMIME 0x10
#define SMTPC_E_SMTPUTF8 0x20
#define SMTPC_E_DSN 0x40

/* smtpc_fail() flags. */
#define SMTPC_F_QUIT 0x01  /* the dialogue is in step: say QUIT before closing */
#define SMTPC_F_FAULT 0x02 /* the relay's configuration is at fault */
#define SMTPC_F_STALE 0x04 /* connection trouble: a reused session may be stale */

enum smtpc_rcpt_state {
    SMTPC_R_UNTRIED,
    SMTPC_R_ACCEPTED,
    SMTPC_R_DEFER,
    SMTPC_R_FAIL,
};

/* What the next reply answers. */
enum smtpc_expect {
    SMTPC_X_RSET,
    SMTPC_X_MAIL,
    SMTPC_X_RCPT,
    SMTPC_X_DATA,
    SMTPC_X_DOT,
    SMTPC_X_DOT_DISCARD, /* the dot sent after an unwanted 354: its reply changes nothing */
};

struct smtpc_tx {
    const struct smtpc_msg *msg;
    smtpc_done_fn done;
    void *arg;
    size_t nrcpts;
    enum smtpc_rcpt_state *rstate;
    char **rreply;                  /* its RCPT reply, owned */
    struct verdict *rverdict;       /* the verdict on its RCPT reply (DEFER, FAIL) */
    struct smtpc_rcpt_result *rres; /* what done sees */
    struct smtpc_result res;
    int have_result;
    int reused;    /* the session carried a transaction before this one */
    int pipelined; /* everything up to DATA was sent in one group */
    int offered;   /* the final dot was sent: a retry could duplicate */
    int mail_failed;
    size_t rcpt_next, rcpt_replies, naccepted;
    char last_rcpt_reply[SMTPC_REPLY_MAX];
    enum smtpc_expect *expect; /* queue of nrcpts + 4 */
    size_t xhead, xtail;
    size_t body_off;
    int body_bol, body_cr, body_8bit;
};

struct smtpc {
    enum smtpc_mode mode;
    uv_loop_t *loop;
    const struct cfg_upstream *up;
    struct tlsio_cred *cred;
    struct oauth2 *oauth2; /* token manager (auth = xoauth2 | oauthbearer), or NULL */
    char *helo;
    char qid[24];
    char sid[24]; /* session tag for logs when no message is in transit */
    enum smtpc_state state;
    const char *cmd; /* last command sent, for "timeout waiting for reply to X" */
    int connect_timeout, command_timeout, dot_timeout, idle_timeout;

    smtpc_event_fn ev;  /* SESSION */
    smtpc_done_fn done; /* PROBE */
    smtpc_step_fn step; /* PROBE */
    void *arg;

    uv_getaddrinfo_t gai;
    int gai_pending;
    struct addrinfo *ai, *ai_next;
    char peer[INET6_ADDRSTRLEN + 10];
    char lasterr[256]; /* why the last connect attempt failed */

    struct tlsio *io; /* current connection, NULL once closed */
    int nios;         /* tlsios not yet reported closed */
    uv_timer_t timer;
    int timer_closed;
    int tls_up;
    int ready; /* set-up finished */
    int ntx;   /* transactions started */

    unsigned ext; /* SMTPC_E_* from the last EHLO */
    unsigned long size_limit;
    char auth_mechs[256];
    char ehlo_kw[256]; /* keywords, for the probe's report */
    struct authsasl *sasl;
    const char *mech;

    struct buf *reply; /* reply being assembled */
    int reply_lines;

    struct smtpc_tx *tx;     /* transaction in progress */
    struct smtpc_result res; /* set-up result (session failure, probe outcome) */
    int have_result;
    int done_called;
};

static void smtpc_io_cb(struct tlsio *io, enum tlsio_event ev, void *arg);
static void smtpc_fail(struct smtpc *c, enum smtpc_status st, int flags, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void smtpc_try_connect(struct smtpc *c);
static void smtpc_ready(struct smtpc *c);
static void smtpc_tx_send_next(struct smtpc *c);
static void smtpc_timeout(uv_timer_t *t);

static const char *smtpc_tag(const struct smtpc *c)
{
    return c->tx != NULL && c->state >= SMTPC_S_IDLE ? c->qid : c->sid;
}

static void smtpc_step(struct smtpc *c, int ok, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void smtpc_step(struct smtpc *c, int ok, const char *fmt, ...)
{
    char text[600];
    va_list ap;

    if (c->mode != SMTPC_M_PROBE || c->step == NULL)
        return;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    c->step(c->arg, ok, text);
}

/* At least a second: a timeout the configuration leaves at 0 (tests build cfg_upstream by
 * hand) must not fire at once. */
static int smtpc_secs(int secs)
{
    return secs > 0 ? secs : 1;
}

/* How long state st may last, in seconds; 0: end from the loop at once; -1: no timer. */
static int smtpc_state_timeout(const struct smtpc *c, enum smtpc_state st)
{
    switch (st) {
    case SMTPC_S_RESOLVE:
    case SMTPC_S_CLOSING:
        return -1;
    case SMTPC_S_TXCHECK:
        return 0; /* a refused transaction ends from the loop, never inside
                     smtpc_session_send() */
    case SMTPC_S_CONNECT:
        return smtpc_secs(c->connect_timeout);
    case SMTPC_S_DOT:
        return smtpc_secs(c->dot_timeout);
    case SMTPC_S_IDLE:
        return smtpc_secs(c->idle_timeout);
    case SMTPC_S_QUIT:
        /* The outcome is known already: no need to wait long. */
        return smtpc_secs(c->command_timeout) < SMTPC_QUIT_TIMEOUT ? smtpc_secs(c->command_timeout)
                                                                   : SMTPC_QUIT_TIMEOUT;
    default:
        return smtpc_secs(c->command_timeout);
    }
}

/*
 * Every state change: logs old -> new and re-arms the timer with the new state's timeout.
 * Entering the state c is in again re-arms the timer (one more reply to wait for).
 */
static void smtpc_enter_state(struct smtpc *c, enum smtpc_state st)
{
    int secs = smtpc_state_timeout(c, st);

    if (st != c->state)
        log_debug(3, "%s: smtpc state %s -> %s", smtpc_tag(c), smtpc_state_names[c->state],
                  smtpc_state_names[st]);
    c->state = st;
    if (secs < 0)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, smtpc_timeout, (uint64_t)secs * 1000, 0);
}

/* The stage of the dialogue the next reply (or a failure now) answers. */
static enum verdict_stage smtpc_stage(const struct smtpc *c)
{
    const struct smtpc_tx *tx = c->tx;

    switch (c->state) {
    case SMTPC_S_RESOLVE:
    case SMTPC_S_CONNECT:
    case SMTPC_S_TLS_IMPLICIT:
        return VERDICT_AT_CONNECT;
    case SMTPC_S_GREETING:
        return VERDICT_AT_GREETING;
    case SMTPC_S_EHLO:
    case SMTPC_S_HELO:
        return VERDICT_AT_EHLO;
    case SMTPC_S_STARTTLS:
    case SMTPC_S_TLS_HANDSHAKE:
        return VERDICT_AT_STARTTLS;
    case SMTPC_S_AUTH:
        return VERDICT_AT_AUTH;
    case SMTPC_S_BODY:
    case SMTPC_S_DOT:
        return VERDICT_AT_DOT;
    case SMTPC_S_TX:
        if (tx != NULL && tx->xhead < tx->xtail) {
            switch (tx->expect[tx->xhead]) {
            case SMTPC_X_RSET:
            case SMTPC_X_MAIL:
                return VERDICT_AT_MAIL;
            case SMTPC_X_RCPT:
                return VERDICT_AT_RCPT;
            case SMTPC_X_DATA:
                return VERDICT_AT_DATA;
            case SMTPC_X_DOT:
            case SMTPC_X_DOT_DISCARD:
                return VERDICT_AT_DOT;
            }
        }
        return VERDICT_AT_MAIL;
    default:
        return c->ready ? VERDICT_AT_MAIL : VERDICT_AT_CONNECT;
    }
}

/*
 * Records verdict v on res: status, cause and action, and the session-level flags when
 * the verdict is about the upstream.  hint is what the caller knows of the failure:
 * SMTPC_DEFER means "never permanent" (a confused RSET, a lost connection).
 */
static void smtpc_result_set(struct smtpc_result *res, const struct verdict *v,
                             enum smtpc_status hint)
{
    enum verdict_cause cause = v->cause;

    if (cause == VERDICT_SENT && hint != SMTPC_SENT)
        cause = hint == SMTPC_FAIL ? VERDICT_PERMANENT : VERDICT_TRANSIENT;
    if (cause == VERDICT_PERMANENT && hint == SMTPC_DEFER)
        cause = VERDICT_TRANSIENT;
    res->cause = cause;
    res->status = cause == VERDICT_SENT        ? SMTPC_SENT
                  : cause == VERDICT_PERMANENT ? SMTPC_FAIL
                                               : SMTPC_DEFER;
    if (v->action != NULL && res->action[0] == '\0')
        snprintf(res->action, sizeof(res->action), "%s", v->action);
    if (v->scope == VERDICT_SCOPE_SESSION) {
        res->config_fault |= cause == VERDICT_CONFIG;
        res->throttled |= cause == VERDICT_SLOWDOWN;
        res->session_transient |= cause == VERDICT_TRANSIENT;
    }
}

/* ---- Transactions ---- */

static struct smtpc_tx *smtpc_tx_new(const struct smtpc_msg *msg, smtpc_done_fn done, void *arg)
{
    struct smtpc_tx *tx = xcalloc(1, sizeof(*tx));
    size_t i;

    tx->msg = msg;
    tx->done = done;
    tx->arg = arg;
    tx->nrcpts = msg->nrcpts;
    tx->rstate = xcalloc(msg->nrcpts + 1, sizeof(*tx->rstate));
    tx->rreply = xcalloc(msg->nrcpts + 1, sizeof(*tx->rreply));
    tx->rverdict = xcalloc(msg->nrcpts + 1, sizeof(*tx->rverdict));
    tx->rres = xcalloc(msg->nrcpts + 1, sizeof(*tx->rres));
    tx->expect = xcalloc(msg->nrcpts + 4, sizeof(*tx->expect));
    for (i = 0; i < msg->len && !tx->body_8bit; i++)
        tx->body_8bit = (unsigned char)msg->body[i] >= 0x80;
    return tx;
}

static void smtpc_tx_free(struct smtpc_tx *tx)
{
    size_t i;

    if (tx == NULL)
        return;
    for (i = 0; i < tx->nrcpts; i++)
        free(tx->rreply[i]);
    free(tx->rreply);
    free(tx->rstate);
    free(tx->rverdict);
    free(tx->rres);
    free(tx->expect);
    free(tx);
}

/*
 * Records the transaction's result, the verdict on reply text (code, 0 when there was no
 * reply) at stage; the first one wins.  hint as for smtpc_result_set().
 */
static void smtpc_tx_result(struct smtpc *c, struct smtpc_tx *tx, enum verdict_stage stage,
                            int code, const char *text, enum smtpc_status hint)
{
    struct verdict v;

    if (tx->have_result)
        return;
    tx->have_result = 1;
    verdict_reply(stage, code, text, &v);
    smtpc_result_set(&tx->res, &v, hint);
    snprintf(tx->res.reply, sizeof(tx->res.reply), "%s", text);
    snprintf(tx->res.tls, sizeof(tx->res.tls), "%s", c->res.tls);
    tx->res.up = c->up;
}

/* Records a result decided without a reply (a local check, or the session's own). */
static void smtpc_tx_result_as(struct smtpc *c, struct smtpc_tx *tx, enum verdict_cause cause,
                               const char *text)
{
    struct verdict v = {cause, VERDICT_SCOPE_MESSAGE, NULL};

    if (tx->have_result)
        return;
    tx->have_result = 1;
    smtpc_result_set(&tx->res, &v, cause == VERDICT_SENT ? SMTPC_SENT : SMTPC_FAIL);
    snprintf(tx->res.reply, sizeof(tx->res.reply), "%s", text);
    snprintf(tx->res.tls, sizeof(tx->res.tls), "%s", c->res.tls);
    tx->res.up = c->up;
}

/* Gives tx the session's result (the session failed while tx was in progress). */
static void smtpc_tx_result_from_session(struct smtpc *c, struct smtpc_tx *tx)
{
    if (tx->have_result)
        return;
    tx->have_result = 1;
    tx->res.status = c->res.status;
    tx->res.cause = c->res.cause;
    tx->res.config_fault |= c->res.config_fault;
    tx->res.throttled |= c->res.throttled;
    tx->res.session_transient |= c->res.session_transient;
    tx->res.setup = c->res.setup;
    snprintf(tx->res.reply, sizeof(tx->res.reply), "%s", c->res.reply);
    snprintf(tx->res.tls, sizeof(tx->res.tls), "%s", c->res.tls);
    if (tx->res.action[0] == '\0')
        snprintf(tx->res.action, sizeof(tx->res.action), "%s", c->res.action);
    tx->res.up = c->up;
}

/* The per-recipient view of a finished transaction. */
static void smtpc_tx_fill(struct smtpc *c, struct smtpc_tx *tx)
{
    size_t i;

    for (i = 0; i < tx->nrcpts; i++) {
        struct smtpc_rcpt_result *r = &tx->rres[i];

        r->up = c->up;
        r->tls = tx->res.tls;
        switch (tx->rstate[i]) {
        case SMTPC_R_UNTRIED:
        case SMTPC_R_ACCEPTED:
            /* Recipients the server took (or never saw) share the fate of the message. */
            r->status = tx->res.status;
            r->cause = tx->res.cause;
            r->reply = tx->res.reply;
            r->action = tx->res.action[0] != '\0' ? tx->res.action : NULL;
            break;
        case SMTPC_R_DEFER:
        case SMTPC_R_FAIL:
            r->status = tx->rstate[i] == SMTPC_R_FAIL ? SMTPC_FAIL : SMTPC_DEFER;
            r->cause = tx->rverdict[i].cause;
            r->reply = tx->rreply[i];
            r->action = tx->rverdict[i].action;
            break;
        }
    }
    tx->res.nrcpts = tx->nrcpts;
    tx->res.rcpt = tx->rres;
}

/* Hands a finished transaction to its owner. */
static void smtpc_tx_deliver(struct smtpc *c)
{
    struct smtpc_tx *tx = c->tx;

    if (tx == NULL)
        return;
    c->tx = NULL;
    smtpc_tx_fill(c, tx);
    log_debug(1, "%s: smtpc transaction done: status=%d reply=%s", c->qid, (int)tx->res.status,
              tx->res.reply);
    tx->done(tx->arg, &tx->res);
    smtpc_tx_free(tx);
}

/* The transaction ended with the dialogue in step (its result recorded): the session
 * carries on. */
static void smtpc_tx_end(struct smtpc *c)
{
    c->cmd = NULL;
    smtpc_enter_state(c, SMTPC_S_IDLE);
    smtpc_tx_deliver(c);
    /* c may be closing now (the owner may have quit it); tell it otherwise. */
    if (c->state == SMTPC_S_IDLE && c->ev != NULL)
        c->ev(c->arg, c, SMTPC_EV_IDLE, NULL);
}

/* ---- Lifetime ---- */

static void smtpc_call_done(struct smtpc *c)
{
    const struct smtpc_result *res = &c->res;

    if (c->done_called)
        return;
    c->done_called = 1;
    if (c->mode == SMTPC_M_SESSION) {
        if (c->ev != NULL)
            c->ev(c->arg, c, SMTPC_EV_CLOSED, NULL);
        return;
    }
    if (!c->have_result) {
        c->res.status = SMTPC_DEFER;
        snprintf(c->res.reply, sizeof(c->res.reply), "probe ended without a result");
    }
    log_debug(1, "%s: smtpc done: status=%d reply=%s", smtpc_tag(c), (int)res->status, res->reply);
    c->done(c->arg, res);
}

static void smtpc_maybe_free(struct smtpc *c)
{
    if (c->state != SMTPC_S_CLOSING || c->nios > 0 || !c->timer_closed || c->gai_pending)
        return;
    smtpc_call_done(c);
    if (c->ai != NULL)
        uv_freeaddrinfo(c->ai);
    authsasl_free(c->sasl);
    buf_free(c->reply);
    smtpc_tx_free(c->tx);
    free(c->helo);
    free(c);
}

static void smtpc_io_closed(void *arg)
{
    struct smtpc *c = arg;

    c->nios--;
    smtpc_maybe_free(c);
}

static void smtpc_timer_closed(uv_handle_t *h)
{
    struct smtpc *c = h->data;

    c->timer_closed = 1;
    smtpc_maybe_free(c);
}

static void smtpc_drop_io(struct smtpc *c)
{
    if (c->io != NULL) {
        tlsio_close(c->io, smtpc_io_closed, c);
        c->io = NULL;
    }
}

static void smtpc_close(struct smtpc *c)
{
    if (c->state == SMTPC_S_CLOSING)
        return;
    smtpc_enter_state(c, SMTPC_S_CLOSING);
    smtpc_drop_io(c);
    uv_close((uv_handle_t *)&c->timer, smtpc_timer_closed);
}

/* ---- Sending ---- */

static void smtpc_lost(struct smtpc *c, const char *why)
{
    if (c->cmd == NULL && !c->ready)
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_STALE, "connection lost while waiting for greeting%s%s",
                   why != NULL ? ": " : "", why != NULL ? why : "");
    else if (c->cmd == NULL)
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_STALE, "connection closed by the server%s%s",
                   why != NULL ? ": " : "", why != NULL ? why : "");
    else
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_STALE, "connection lost after %s%s%s", c->cmd,
                   why != NULL ? ": " : "", why != NULL ? why : "");
}

/* Writes b (one or more command lines, already CRLF-terminated); 0 or -1 (then failed). */
static int smtpc_write(struct smtpc *c, struct buf *b)
{
    int rc = tlsio_write(c->io, b->data, b->len);

    if (rc < 0) {
        smtpc_lost(c, tlsio_errstr(c->io));
        return -1;
    }
    return 0;
}

/* Sends one command line; logged is what the debug log shows instead (AUTH payloads). */
static void smtpc_send(struct smtpc *c, enum smtpc_state st, const char *cmd, const char *logged,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void smtpc_send(struct smtpc *c, enum smtpc_state st, const char *cmd, const char *logged,
                       const char *fmt, ...)
{
    struct buf *b = buf_new(0);
    va_list ap;

    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
    log_debug(1, "%s: > %s", smtpc_tag(c), logged != NULL ? logged : b->data);
    buf_puts(b, "\r\n");
    smtpc_enter_state(c, st);
    c->cmd = cmd;
    smtpc_write(c, b); /* on failure c is closing */
    buf_free(b);
}

/*
 * Ends the connection.  The first result recorded wins: a transaction in progress gets it
 * (SESSION: its done runs now), a set-up failure is reported (SMTPC_EV_FAILED, the probe's
 * failed step).  SMTPC_F_QUIT: the dialogue is in step (we just read a complete reply), so say
 * QUIT politely before closing.
 */
static void smtpc_fail(struct smtpc *c, enum smtpc_status st, int flags, const char *fmt, ...)
{
    char text[sizeof(c->res.reply)];
    int was_ready = c->ready, first = !c->have_result;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (!c->have_result) {
        struct verdict v;

        c->have_result = 1;
        if (flags & SMTPC_F_FAULT) {
            /* TLS verification, a missing STARTTLS, AUTH impossible: relayd's setup. */
            v.cause = VERDICT_CONFIG;
            v.scope = VERDICT_SCOPE_SESSION;
            v.action = verdict_action(text);
        } else {
            verdict_reply(smtpc_stage(c), verdict_reply_code(text), text, &v);
        }
        smtpc_result_set(&c->res, &v, st);
        snprintf(c->res.reply, sizeof(c->res.reply), "%s", text);
        c->res.setup = !was_ready;
    }
    if (c->tx != NULL && c->state != SMTPC_S_CLOSING) {
        struct smtpc_tx *tx = c->tx;
        if (!tx->have_result) {
            smtpc_tx_result_from_session(c, tx);
            /* Nothing was delivered and the session had worked before: retry at once. */
            tx->res.stale = tx->reused && !tx->offered && (flags & SMTPC_F_STALE) != 0;
        }
    }
    if (c->state == SMTPC_S_CLOSING || c->state == SMTPC_S_QUIT)
        flags &= ~SMTPC_F_QUIT;
    if ((flags & SMTPC_F_QUIT) && c->io != NULL) {
        smtpc_send(c, SMTPC_S_QUIT, "QUIT", NULL, "QUIT");
        if (c->state != SMTPC_S_QUIT)
            smtpc_close(c);
    } else {
        smtpc_close(c);
    }
    if (!first)
        return;
    if (c->mode == SMTPC_M_PROBE && c->res.status != SMTPC_SENT)
        smtpc_step(c, 0, "%s", c->res.reply);
    if (c->mode == SMTPC_M_SESSION) {
        if (c->tx != NULL) {
            smtpc_tx_deliver(c);
        } else if (!was_ready && c->ev != NULL) {
            log_debug(1, "%s: session set-up failed: %s", c->sid, c->res.reply);
            c->ev(c->arg, c, SMTPC_EV_FAILED, &c->res);
        }
    }
}

/* ---- Timer ---- */

static void smtpc_timeout(uv_timer_t *t)
{
    struct smtpc *c = t->data;

    switch (c->state) {
    case SMTPC_S_CONNECT:
        snprintf(c->lasterr, sizeof(c->lasterr), "timeout connecting to %s", c->peer);
        smtpc_drop_io(c);
        smtpc_try_connect(c);
        break;
    case SMTPC_S_TLS_IMPLICIT:
    case SMTPC_S_TLS_HANDSHAKE:
        smtpc_fail(c, SMTPC_DEFER, 0, "TLS: timeout during handshake with %s", c->peer);
        break;
    case SMTPC_S_GREETING:
        smtpc_fail(c, SMTPC_DEFER, 0, "timeout waiting for greeting from %s", c->peer);
        break;
    case SMTPC_S_BODY:
        smtpc_fail(c, SMTPC_DEFER, 0, "timeout sending message body to %s", c->peer);
        break;
    case SMTPC_S_QUIT:
        smtpc_step(c, 1, "QUIT: no reply (closed)");
        smtpc_close(c);
        break;
    case SMTPC_S_IDLE:
        /* Idle long enough: say goodbye (RFC 5321 4.1.1.10). */
        log_debug(1, "%s: idle for %ds, closing", c->sid, c->idle_timeout);
        smtpc_send(c, SMTPC_S_QUIT, "QUIT", NULL, "QUIT");
        break;
    case SMTPC_S_TXCHECK:
        smtpc_tx_end(c);
        break;
    default:
        smtpc_fail(c, SMTPC_DEFER, 0, "timeout waiting for reply to %s",
                   c->cmd != NULL ? c->cmd : "command");
        break;
    }
}

/* ---- Connecting ---- */

static void smtpc_format_peer(struct smtpc *c, const struct sockaddr *sa)
{
    char host[INET6_ADDRSTRLEN] = "?";

    if (sa->sa_family == AF_INET6) {
        uv_ip6_name((const struct sockaddr_in6 *)sa, host, sizeof(host));
        snprintf(c->peer, sizeof(c->peer), "[%s]:%d", host, c->up->port);
    } else {
        uv_ip4_name((const struct sockaddr_in *)sa, host, sizeof(host));
        snprintf(c->peer, sizeof(c->peer), "%s:%d", host, c->up->port);
    }
}

static void smtpc_try_connect(struct smtpc *c)
{
    struct addrinfo *ai;
    int rc;

    while ((ai = c->ai_next) != NULL) {
        c->ai_next = ai->ai_next;
        if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
            continue;
        smtpc_format_peer(c, ai->ai_addr);
        c->io = tlsio_new(c->loop, smtpc_io_cb, c);
        c->nios++;
        smtpc_enter_state(c, SMTPC_S_CONNECT);
        log_debug(1, "%s: connecting to %s (%s)", smtpc_tag(c), c->peer, c->up->host);
        if (c->up->tls_pin != NULL)
            tlsio_set_pin(c->io, c->up->tls_pin);
        if ((rc = tlsio_connect(c->io, ai->ai_addr)) < 0) {
            snprintf(c->lasterr, sizeof(c->lasterr), "connect to %s: %s", c->peer, uv_strerror(rc));
            smtpc_drop_io(c);
            continue;
        }
        return;
    }
    smtpc_fail(c, SMTPC_DEFER, 0, "%s",
               c->lasterr[0] != '\0' ? c->lasterr : "no usable address for upstream");
}

static void smtpc_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct smtpc *c = req->data;
    struct addrinfo *p;
    int n = 0;

    c->gai_pending = 0;
    c->ai = ai;
    if (c->state == SMTPC_S_CLOSING) {
        smtpc_maybe_free(c);
        return;
    }
    if (status < 0) {
        smtpc_fail(c, SMTPC_DEFER, 0, "host lookup for %s failed: %s", c->up->host,
                   uv_strerror(status));
        return;
    }
    for (p = ai; p != NULL; p = p->ai_next)
        n++;
    smtpc_step(c, 1, "resolve %s: %d address%s", c->up->host, n, n == 1 ? "" : "es");
    c->ai_next = ai;
    smtpc_try_connect(c);
}

/* ---- Set-up replies ---- */

static void smtpc_ehlo_line(struct smtpc *c, const char *text)
{
    const char *args;
    size_t kwlen = strcspn(text, " =");
    size_t used = strlen(c->ehlo_kw);

    snprintf(c->ehlo_kw + used, sizeof(c->ehlo_kw) - used, "%s%.*s", used > 0 ? " " : "",
             (int)kwlen, text);
    args = text + kwlen;
    while (*args == ' ' || *args == '=')
        args++;
    if (kwlen == 8 && strncasecmp(text, "STARTTLS", 8) == 0) {
        c->ext |= SMTPC_E_STARTTLS;
    } else if (kwlen == 4 && strncasecmp(text, "AUTH", 4) == 0) {
        /* "AUTH=" is the pre-RFC 4954 spelling some servers still send as well. */
        size_t n = strlen(c->auth_mechs);
        c->ext |= SMTPC_E_AUTH;
        snprintf(c->auth_mechs + n, sizeof(c->auth_mechs) - n, "%s%s", n > 0 ? " " : "", args);
    } else if (kwlen == 4 && strncasecmp(text, "SIZE", 4) == 0) {
        /* RFC 1870: "SIZE" alone or "SIZE 0" means no fixed limit. */
        c->ext |= SMTPC_E_SIZE;
        c->size_limit = strtoul(args, NULL, 10);
    } else if (kwlen == 10 && strncasecmp(text, "PIPELINING", 10) == 0) {
        c->ext |= SMTPC_E_PIPELINING;
    } else if (kwlen == 8 && strncasecmp(text, "8BITMIME", 8) == 0) {
        c->ext |= SMTPC_E_8BITMIME;
    } else if (kwlen == 8 && strncasecmp(text, "SMTPUTF8", 8) == 0) {
        c->ext |= SMTPC_E_SMTPUTF8;
    } else if (kwlen == 3 && strncasecmp(text, "DSN", 3) == 0) {
        c->ext |= SMTPC_E_DSN;
    }
}

static void smtpc_send_ehlo(struct smtpc *c)
{
    c->ext = 0;
    c->size_limit = 0;
    c->auth_mechs[0] = '\0';
    c->ehlo_kw[0] = '\0';
    smtpc_send(c, SMTPC_S_EHLO, "EHLO", NULL, "EHLO %s", c->helo);
}

static void smtpc_start_auth(struct smtpc *c)
{
    const struct cfg_upstream *up = c->up;
    int allow_plain = up->tls == CFG_TLS_NONE && up->allow_plaintext_auth;
    const char *secret = up->password != NULL ? up->password : "";
    const char *pref = up->mechanisms;
    char err[256], logged[80];
    char *resp = NULL;

    /* RFC 4954 section 4: credentials only under TLS, unless the operator insists. */
    if (!c->tls_up && !allow_plain) {
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_FAULT,
                   "refusing to send AUTH without TLS (tls = none needs allow_plaintext_auth)");
        return;
    }
    if (!(c->ext & SMTPC_E_AUTH)) {
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_FAULT, "upstream does not offer AUTH");
        return;
    }
    if (up->upauth != CFG_UPAUTH_PASSWORD) {
        /* OAuth 2.0: the token is the secret, the mechanism the only one allowed. */
        if (c->oauth2 == NULL || (secret = oauth2_token_peek(c->oauth2, up)) == NULL) {
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_FAULT, "AUTH: %s",
                       c->oauth2 != NULL ? oauth2_last_error(c->oauth2, up)
                                         : "no OAuth 2.0 token manager");
            return;
        }
        pref = oauth2_mechanism(up);
    }
    if (authsasl_client_init(err, sizeof(err)) != 0 ||
        authsasl_client_new(up->host, up->username, secret, &c->sasl, err, sizeof(err)) != 0 ||
        authsasl_client_start(c->sasl, c->auth_mechs, pref, c->tls_up, allow_plain, &c->mech, &resp,
                              err, sizeof(err)) < 0) {
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_FAULT, "AUTH: %s", err);
        return;
    }
    snprintf(logged, sizeof(logged), "AUTH %s%s", c->mech, resp != NULL ? " ***" : "");
    if (resp != NULL)
        smtpc_send(c, SMTPC_S_AUTH, "AUTH", logged, "AUTH %s %s", c->mech, resp);
    else
        smtpc_send(c, SMTPC_S_AUTH, "AUTH", logged, "AUTH %s", c->mech);
    if (resp != NULL) {
        explicit_bzero(resp, strlen(resp));
        free(resp);
    }
}

static void smtpc_auth_reply(struct smtpc *c, int code, const char *text)
{
    char err[256];
    char *resp = NULL;

    if (code == 235) {
        smtpc_step(c, 1, "AUTH %s as %s: %s", c->mech, c->up->username, text);
        smtpc_ready(c);
        return;
    }
    if (code == 334) {
        const char *chal = strlen(text) > 4 ? text + 4 : "";
        if (authsasl_client_step(c->sasl, chal, &resp, err, sizeof(err)) < 0) {
            /* Mid-exchange the dialogue is out of step for QUIT: just drop it. */
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_FAULT, "AUTH %s: %s", c->mech, err);
            return;
        }
        smtpc_send(c, SMTPC_S_AUTH, "AUTH", "***", "%s", resp);
        explicit_bzero(resp, strlen(resp));
        free(resp);
        return;
    }
    /* The token was refused (revoked, expired early): fetch a new one, once. */
    if (code == 535 && c->up->upauth != CFG_UPAUTH_PASSWORD)
        oauth2_invalidate(c->oauth2, c->up);
    /* A 4xx is the server's trouble (RFC 4954 454: temporary failure), not ours. */
    smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | (code / 100 == 5 ? SMTPC_F_FAULT : 0), "AUTH %s: %s",
               c->mech, text);
}

static void smtpc_after_ehlo(struct smtpc *c)
{
    if (c->up->tls == CFG_TLS_STARTTLS && !c->tls_up) {
        if (!(c->ext & SMTPC_E_STARTTLS)) {
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_FAULT,
                       "upstream does not offer STARTTLS; refusing to send in cleartext");
            return;
        }
        smtpc_send(c, SMTPC_S_STARTTLS, "STARTTLS", NULL, "STARTTLS");
        return;
    }
    if (c->up->username != NULL) {
        smtpc_start_auth(c);
        return;
    }
    if (c->mode == SMTPC_M_PROBE)
        smtpc_step(c, 1, "AUTH: not configured (no username)");
    smtpc_ready(c);
}

static void smtpc_starttls(struct smtpc *c, int implicit)
{
    const char *name = c->up->tls_name != NULL ? c->up->tls_name : c->up->host;

    smtpc_enter_state(c, implicit ? SMTPC_S_TLS_IMPLICIT : SMTPC_S_TLS_HANDSHAKE);
    if (c->cred == NULL) {
        smtpc_fail(c, SMTPC_DEFER, SMTPC_F_FAULT, "TLS: no client credentials for upstream %s",
                   c->up->name != NULL ? c->up->name : c->up->host);
        return;
    }
    if (tlsio_starttls(c->io, c->cred, 0, name) < 0)
        smtpc_fail(c, SMTPC_DEFER, 0, "TLS: %s", tlsio_errstr(c->io));
}

/* Set-up is done: the session can carry mail. */
static void smtpc_ready(struct smtpc *c)
{
    c->ready = 1;
    c->cmd = NULL;
    smtpc_enter_state(c, SMTPC_S_IDLE);
    switch (c->mode) {
    case SMTPC_M_PROBE:
        c->have_result = 1;
        c->res.status = SMTPC_SENT;
        snprintf(c->res.reply, sizeof(c->res.reply), "every step passed");
        smtpc_send(c, SMTPC_S_QUIT, "QUIT", NULL, "QUIT");
        break;
    case SMTPC_M_SESSION:
        log_debug(1, "%s: session ready with %s%s%s", c->sid, c->peer, c->tls_up ? ", " : "",
                  c->res.tls);
        if (c->ev != NULL)
            c->ev(c->arg, c, SMTPC_EV_READY, NULL);
        break;
    }
}

/* ---- Transaction: commands ---- */

static int smtpc_has_8bit(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s >= 0x80)
            return 1;
    return 0;
}

static void smtpc_expect_add(struct smtpc_tx *tx, enum smtpc_expect x)
{
    tx->expect[tx->xtail++] = x;
}

static const char *smtpc_expect_name(enum smtpc_expect x)
{
    static const char *const names[] = {"RSET", "MAIL",        "RCPT",
                                        "DATA", "end of data", "end of data"};
    return names[x];
}

static void smtpc_add_mail(struct smtpc *c, struct smtpc_tx *tx, struct buf *b, int utf8)
{
    const struct smtpc_msg *m = tx->msg;
    size_t start = b->len;

    buf_printf(b, "MAIL FROM:<%s>", m->sender);
    if (tx->body_8bit && (c->ext & SMTPC_E_8BITMIME))
        buf_puts(b, " BODY=8BITMIME");
    /* RFC 6531 3.4: SMTPUTF8 only when the envelope needs it. */
    if (utf8)
        buf_puts(b, " SMTPUTF8");
    /* RFC 1870: announce the size so the server can refuse before we send it all. */
    if (c->ext & SMTPC_E_SIZE)
        buf_printf(b, " SIZE=%zu", m->len);
    /* RFC 3461 4.3, 4.4: pass the sender's DSN wishes on when the upstream takes them;
     * when it does not, they end here (5.2.2: the DSN duty ends with the relaying). */
    if (c->ext & SMTPC_E_DSN) {
        if (m->dsn_ret == SPOOL_RET_FULL || m->dsn_ret == SPOOL_RET_HDRS)
            buf_puts(b, m->dsn_ret == SPOOL_RET_FULL ? " RET=FULL" : " RET=HDRS");
        if (m->dsn_envid != NULL && m->dsn_envid[0] != '\0') {
            char *x = xtext_encode(m->dsn_envid);

            buf_printf(b, " ENVID=%s", x);
            free(x);
        }
    }
    log_debug(1, "%s: > %s", c->qid, b->data + start);
    buf_puts(b, "\r\n");
    smtpc_expect_add(tx, SMTPC_X_MAIL);
}

/* " NOTIFY=FAILURE,DELAY" for the SPOOL_NOTIFY_* bits (nothing for 0). */
static void smtpc_add_notify(struct buf *b, unsigned bits)
{
    static const struct {
        unsigned bit;
        const char *word;
    } w[] = {{SPOOL_NOTIFY_NEVER, "NEVER"},
             {SPOOL_NOTIFY_SUCCESS, "SUCCESS"},
             {SPOOL_NOTIFY_FAILURE, "FAILURE"},
             {SPOOL_NOTIFY_DELAY, "DELAY"}};
    int n = 0;

    if (bits & SPOOL_NOTIFY_NEVER)
        bits = SPOOL_NOTIFY_NEVER; /* RFC 3461 4.1: NEVER stands alone */
    for (size_t i = 0; i < sizeof w / sizeof w[0]; i++)
        if (bits & w[i].bit)
            buf_printf(b, "%s%s", n++ == 0 ? " NOTIFY=" : ",", w[i].word);
}

static void smtpc_add_rcpt(struct smtpc *c, struct smtpc_tx *tx, struct buf *b)
{
    const struct smtpc_msg *m = tx->msg;
    size_t k = tx->rcpt_next++;
    size_t start = b->len;

    buf_printf(b, "RCPT TO:<%s>", m->rcpts[k]);
    if (c->ext & SMTPC_E_DSN) {
        const char *orcpt = m->dsn_orcpt != NULL ? m->dsn_orcpt[k] : NULL;
        const char *semi = orcpt != NULL ? strchr(orcpt, ';') : NULL;

        if (m->dsn_notify != NULL)
            smtpc_add_notify(b, m->dsn_notify[k]);
        if (semi != NULL && semi > orcpt) {
            /* RFC 3461 4.2: addr-type ";" xtext. */
            char *x = xtext_encode(semi + 1);

            buf_printf(b, " ORCPT=%.*s;%s", (int)(semi - orcpt), orcpt, x);
            free(x);
        }
    }
    log_debug(1, "%s: > %s", c->qid, b->data + start);
    buf_puts(b, "\r\n");
    smtpc_expect_add(tx, SMTPC_X_RCPT);
}

static void smtpc_send_group(struct smtpc *c, struct buf *b)
{
    smtpc_enter_state(c, SMTPC_S_TX);
    c->cmd = smtpc_expect_name(c->tx->expect[c->tx->xhead]);
    smtpc_write(c, b); /* on failure c is closing */
    buf_free(b);
}

/* Checks the message against what the upstream offers, then sends the first command (or,
 * with PIPELINING, everything up to DATA). */
static void smtpc_tx_send_next(struct smtpc *c)
{
    struct smtpc_tx *tx = c->tx;
    const struct smtpc_msg *m = tx->msg;
    const char *need8 = NULL;
    struct buf *b;
    size_t i;

    snprintf(c->qid, sizeof(c->qid), "%012" PRIX64, m->id);
    tx->reused = c->ntx++ > 0;
    if (smtpc_has_8bit(m->sender))
        need8 = m->sender;
    for (i = 0; i < m->nrcpts && need8 == NULL; i++)
        if (smtpc_has_8bit(m->rcpts[i]))
            need8 = m->rcpts[i];
    /* Retrying would not help: the message is at fault here, not the upstream. */
    if (m->nrcpts == 0)
        smtpc_tx_result_as(c, tx, VERDICT_PERMANENT, "no recipients");
    else if (c->size_limit > 0 && m->len > c->size_limit)
        smtpc_tx_result_as(c, tx, VERDICT_PERMANENT, "");
    else if (need8 != NULL && !(c->ext & SMTPC_E_SMTPUTF8))
        smtpc_tx_result_as(c, tx, VERDICT_PERMANENT, "");
    if (tx->have_result) {
        /* Say why in words; nothing was sent, the session stays in step. */
        if (c->size_limit > 0 && m->len > c->size_limit && m->nrcpts > 0)
            snprintf(tx->res.reply, sizeof(tx->res.reply),
                     "message size %zu exceeds upstream limit %lu", m->len, c->size_limit);
        else if (m->nrcpts > 0)
            snprintf(tx->res.reply, sizeof(tx->res.reply),
                     "upstream does not offer SMTPUTF8, needed for the address <%.200s>", need8);
        smtpc_enter_state(c, SMTPC_S_TXCHECK);
        return;
    }
    b = buf_new(0);
    tx->pipelined = (c->ext & SMTPC_E_PIPELINING) != 0;
    if (tx->reused) {
        /* A fresh transaction state whatever the last one left behind (RFC 5321 4.1.1.5). */
        log_debug(1, "%s: > RSET", c->qid);
        buf_puts(b, "RSET\r\n");
        smtpc_expect_add(tx, SMTPC_X_RSET);
        if (!tx->pipelined) {
            smtpc_send_group(c, b);
            return;
        }
    }
    smtpc_add_mail(c, tx, b, need8 != NULL);
    if (tx->pipelined) {
        /* RFC 2920 3.1: MAIL, RCPT... and DATA may go in one group, DATA last. */
        while (tx->rcpt_next < m->nrcpts)
            smtpc_add_rcpt(c, tx, b);
        log_debug(1, "%s: > DATA", c->qid);
        buf_puts(b, "DATA\r\n");
        smtpc_expect_add(tx, SMTPC_X_DATA);
    }
    smtpc_send_group(c, b);
}

/* Writes the next chunk of the dot-stuffed body (RFC 5321 4.5.2), then ".". */
static void smtpc_send_body(struct smtpc *c)
{
    struct smtpc_tx *tx = c->tx;
    const char *p = tx->msg->body;
    size_t len = tx->msg->len, i;
    struct buf *b = buf_new(0);
    int rc, last;

    buf_reserve(b, SMTPC_BODY_CHUNK + SMTPC_BODY_CHUNK / 2);
    for (i = tx->body_off; i < len && b->len < SMTPC_BODY_CHUNK; i++) {
        char ch = p[i];

        if (tx->body_bol && ch == '.')
            buf_append(b, ".", 1);
        if (ch == '\r' && (i + 1 == len || p[i + 1] != '\n')) {
            /* A bare CR goes out as CRLF, so that "<CR>.<CR><LF>" in a body can never look
             * like the end of data to an upstream that takes a bare CR as a line ending
             * (SMTP smuggling); the dot after it is stuffed like any line's. */
            buf_append(b, "\r\n", 2);
            tx->body_bol = 1;
            tx->body_cr = 0;
            continue;
        }
        /* RFC 5321 2.3.8: bare LF is not a line ending on the wire. */
        if (ch == '\n' && !tx->body_cr)
            buf_append(b, "\r", 1);
        buf_append(b, &ch, 1);
        tx->body_bol = ch == '\n';
        tx->body_cr = ch == '\r';
    }
    tx->body_off = i;
    last = tx->body_off == len;
    if (last) {
        if (!tx->body_bol)
            buf_puts(b, "\r\n");
        buf_puts(b, ".\r\n");
        log_debug(1, "%s: > (%zu bytes of message) .", c->qid, len);
        tx->offered = 1;
        smtpc_expect_add(tx, SMTPC_X_DOT);
        c->cmd = "end of data";
    }
    smtpc_enter_state(c, last ? SMTPC_S_DOT : SMTPC_S_BODY);
    rc = tlsio_write(c->io, b->data, b->len);
    buf_free(b);
    if (rc < 0)
        smtpc_fail(c, SMTPC_DEFER, 0, "connection lost while sending message body: %s",
                   tlsio_errstr(c->io));
}

/* ---- Transaction: replies ---- */

/* A reply to RCPT: that recipient's own verdict.  Only a reply about the session (530
 * "authentication required", an account's quota) touches the upstream. */
static void smtpc_tx_rcpt_reply(struct smtpc *c, struct smtpc_tx *tx, int code, const char *text)
{
    size_t i = tx->rcpt_replies++;
    struct verdict *v;

    (void)c;
    /* After a refused MAIL the RCPT replies (503) say nothing about the recipients. */
    if (i >= tx->nrcpts || tx->mail_failed)
        return;
    free(tx->rreply[i]);
    tx->rreply[i] = xstrdup(text);
    snprintf(tx->last_rcpt_reply, sizeof(tx->last_rcpt_reply), "%s", text);
    v = &tx->rverdict[i];
    verdict_reply(VERDICT_AT_RCPT, code, text, v);
    if (v->cause == VERDICT_SENT) {
        tx->rstate[i] = SMTPC_R_ACCEPTED;
        tx->naccepted++;
        return;
    }
    /* A 5xx that is the relay's own fault ("sender not owned by user") waits, never
     * bounces: only PERMANENT fails. */
    tx->rstate[i] = v->cause == VERDICT_PERMANENT ? SMTPC_R_FAIL : SMTPC_R_DEFER;
    if (v->scope == VERDICT_SCOPE_SESSION) {
        tx->res.config_fault |= v->cause == VERDICT_CONFIG;
        tx->res.throttled |= v->cause == VERDICT_SLOWDOWN;
    }
}

/* Nobody accepted: the transaction's own result says so (every recipient keeps its own
 * verdict); it is PERMANENT only when every recipient failed for good. */
static void smtpc_tx_result_nobody(struct smtpc *c, struct smtpc_tx *tx)
{
    size_t i, nfail = 0;
    enum verdict_cause cause = VERDICT_TRANSIENT;

    for (i = 0; i < tx->nrcpts; i++) {
        if (tx->rstate[i] == SMTPC_R_FAIL)
            nfail++;
        else if (tx->rstate[i] == SMTPC_R_DEFER && cause == VERDICT_TRANSIENT)
            cause = tx->rverdict[i].cause;
    }
    smtpc_tx_result_as(c, tx, nfail == tx->nrcpts ? VERDICT_PERMANENT : cause, tx->last_rcpt_reply);
}

/* Sends the next command in lock step (no PIPELINING). */
static void smtpc_tx_lockstep(struct smtpc *c, struct smtpc_tx *tx)
{
    struct buf *b = buf_new(0);

    if (tx->rcpt_next < tx->nrcpts) {
        smtpc_add_rcpt(c, tx, b);
    } else {
        log_debug(1, "%s: > DATA", c->qid);
        buf_puts(b, "DATA\r\n");
        smtpc_expect_add(tx, SMTPC_X_DATA);
    }
    smtpc_send_group(c, b);
}

/* Pipelined: the group's next reply is awaited; it gets its own command_timeout. */
static void smtpc_tx_wait(struct smtpc *c, struct smtpc_tx *tx)
{
    c->cmd = smtpc_expect_name(tx->expect[tx->xhead]);
    smtpc_enter_state(c, SMTPC_S_TX);
}

static void smtpc_tx_reply(struct smtpc *c, int code, const char *text)
{
    struct smtpc_tx *tx = c->tx;
    int cls = code / 100;
    enum smtpc_expect x;

    if (tx->xhead == tx->xtail) {
        smtpc_fail(c, SMTPC_DEFER, 0, "unexpected reply from server: %s", text);
        return;
    }
    x = tx->expect[tx->xhead++];
    switch (x) {
    case SMTPC_X_RSET:
        if (cls != 2) {
            /* The session is confused: start over on a new one. */
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT | SMTPC_F_STALE, "RSET: %s", text);
            return;
        }
        if (!tx->pipelined) {
            struct buf *b = buf_new(0);
            int utf8 = smtpc_has_8bit(tx->msg->sender);
            for (size_t i = 0; i < tx->nrcpts && !utf8; i++)
                utf8 = smtpc_has_8bit(tx->msg->rcpts[i]);
            smtpc_add_mail(c, tx, b, utf8);
            smtpc_send_group(c, b);
        } else {
            smtpc_tx_wait(c, tx);
        }
        return;
    case SMTPC_X_MAIL:
        if (cls != 2) {
            tx->mail_failed = 1;
            smtpc_tx_result(c, tx, VERDICT_AT_MAIL, code, text, SMTPC_FAIL);
            if (!tx->pipelined)
                smtpc_tx_end(c);
            else
                smtpc_tx_wait(c, tx);
            return;
        }
        if (!tx->pipelined)
            smtpc_tx_lockstep(c, tx);
        else
            smtpc_tx_wait(c, tx);
        return;
    case SMTPC_X_RCPT:
        smtpc_tx_rcpt_reply(c, tx, code, text);
        if (tx->pipelined) {
            smtpc_tx_wait(c, tx);
            return;
        }
        if (tx->rcpt_next < tx->nrcpts || tx->naccepted > 0) {
            smtpc_tx_lockstep(c, tx);
        } else {
            smtpc_tx_result_nobody(c, tx);
            smtpc_tx_end(c);
        }
        return;
    case SMTPC_X_DATA:
        if (code == 354 && !tx->mail_failed && tx->naccepted > 0) {
            c->cmd = "DATA";
            tx->body_off = 0;
            tx->body_bol = 1;
            tx->body_cr = 0;
            smtpc_send_body(c);
            return;
        }
        if (code == 354) {
            /* RFC 2920 3.1: DATA accepted with nobody to deliver to; end it empty. */
            log_debug(1, "%s: > . (nobody accepted)", c->qid);
            tlsio_write(c->io, ".\r\n", 3);
            smtpc_expect_add(tx, SMTPC_X_DOT_DISCARD);
            c->cmd = "end of data";
            smtpc_enter_state(c, SMTPC_S_TX);
            return;
        }
        if (tx->naccepted == 0 && !tx->mail_failed)
            smtpc_tx_result_nobody(c, tx);
        else
            smtpc_tx_result(c, tx, VERDICT_AT_DATA, code, text,
                            cls == 5 ? SMTPC_FAIL : SMTPC_DEFER);
        smtpc_tx_end(c); /* a refused MAIL's result came first */
        return;
    case SMTPC_X_DOT:
        smtpc_tx_result(c, tx, VERDICT_AT_DOT, code, text,
                        cls == 2   ? SMTPC_SENT
                        : cls == 5 ? SMTPC_FAIL
                                   : SMTPC_DEFER);
        smtpc_tx_end(c);
        return;
    case SMTPC_X_DOT_DISCARD:
        if (!tx->mail_failed)
            smtpc_tx_result_nobody(c, tx);
        smtpc_tx_end(c);
        return;
    }
}

/* One complete (possibly multi-line) reply in the current state. */
static void smtpc_reply(struct smtpc *c, int code, const char *text)
{
    int cls = code / 100;

    /* The wait is over; whatever waits next enters its state, which re-arms the timer. */
    uv_timer_stop(&c->timer);
    /* RFC 5321 3.8: 421 at any point: the server is closing the channel. */
    if (code == 421 && c->state != SMTPC_S_QUIT) {
        smtpc_fail(c, SMTPC_DEFER, 0, "%s", text);
        return;
    }
    switch (c->state) {
    case SMTPC_S_GREETING:
        if (cls == 2) {
            smtpc_step(c, 1, "greeting from %s: %s", c->peer, text);
            smtpc_send_ehlo(c);
        } else {
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT, "%s", text);
        }
        break;
    case SMTPC_S_EHLO:
        if (cls == 2) {
            smtpc_step(c, 1, "EHLO %s: %s", c->helo, c->ehlo_kw[0] ? c->ehlo_kw : "no extensions");
            smtpc_after_ehlo(c);
        } else if (cls == 5 && c->up->tls == CFG_TLS_NONE && !c->tls_up) {
            smtpc_send(c, SMTPC_S_HELO, "HELO", NULL, "HELO %s", c->helo);
        } else {
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT, "%s", text);
        }
        break;
    case SMTPC_S_HELO:
        if (cls == 2)
            smtpc_after_ehlo(c);
        else
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT, "%s", text);
        break;
    case SMTPC_S_STARTTLS:
        if (code == 220)
            smtpc_starttls(c, 0);
        else
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_QUIT, "STARTTLS: %s", text);
        break;
    case SMTPC_S_AUTH:
        smtpc_auth_reply(c, code, text);
        break;
    case SMTPC_S_TX:
    case SMTPC_S_DOT:
        smtpc_tx_reply(c, code, text);
        break;
    case SMTPC_S_BODY:
        /* The server spoke while we were still sending: it gave up on the message. */
        smtpc_fail(c, cls == 5 ? SMTPC_FAIL : SMTPC_DEFER, 0, "%s", text);
        break;
    case SMTPC_S_QUIT:
        smtpc_step(c, 1, "QUIT: %s", text);
        smtpc_close(c);
        break;
    case SMTPC_S_IDLE:
        /* Unsolicited while idle (a server's own idle timeout): just close. */
        log_debug(1, "%s: closing idle session after: %s", c->sid, text);
        smtpc_close(c);
        break;
    default:
        smtpc_fail(c, SMTPC_DEFER, 0, "unexpected reply from server: %s", text);
        break;
    }
}

static void smtpc_input(struct smtpc *c)
{
    struct tlsio *io = c->io;
    struct buf *in = tlsio_input(io);
    const char *line;
    size_t n, used;

    while (c->io == io && c->state != SMTPC_S_CLOSING) {
        char text[SMTPC_LINE_MAX + 1];
        int code, last;

        if ((used = buf_getline(in, &line, &n)) == 0) {
            if (in->len > SMTPC_LINE_MAX)
                smtpc_fail(c, SMTPC_DEFER, 0, "reply line too long from %s", c->peer);
            return;
        }
        if (n > SMTPC_LINE_MAX)
            n = SMTPC_LINE_MAX;
        memcpy(text, line, n);
        text[n] = '\0';
        buf_consume(in, used);
        log_debug(1, "%s: < %s", smtpc_tag(c), text);
        /* RFC 5321 4.2: three digits, then space (last line) or hyphen (more follow). */
        if (n < 3 || text[0] < '2' || text[0] > '5' || text[1] < '0' || text[1] > '9' ||
            text[2] < '0' || text[2] > '9' || (n > 3 && text[3] != ' ' && text[3] != '-')) {
            smtpc_fail(c, SMTPC_DEFER, 0, "malformed reply from %s: %.200s", c->peer, text);
            return;
        }
        code = atoi(text);
        last = n == 3 || text[3] == ' ';
        if (c->reply_lines == 0) {
            buf_reset(c->reply);
            buf_append(c->reply, text, n);
        } else if (c->reply->len < SMTPC_REPLY_MAX && n > 4) {
            buf_append(c->reply, " ", 1);
            buf_append(c->reply, text + 4, n - 4);
        }
        if (c->state == SMTPC_S_EHLO && c->reply_lines > 0 && n > 4)
            smtpc_ehlo_line(c, text + 4);
        c->reply_lines++;
        if (!last)
            continue;
        c->reply_lines = 0;
        smtpc_reply(c, code, c->reply->data);
        /* smtpc_reply() may have started TLS (input discarded) or closed the connection. */
    }
}

static void smtpc_tls_ready(struct smtpc *c)
{
    const char *pin;

    c->tls_up = 1;
    tlsio_describe(c->io, c->res.tls, sizeof(c->res.tls));
    pin = tlsio_peer_pin(c->io);
    log_debug(1, "%s: TLS with %s: %s, key %s", smtpc_tag(c), c->peer, c->res.tls, pin);
    smtpc_step(c, 1, "TLS: %s; certificate verified for %s%s; public key %s", c->res.tls,
               c->up->tls_name != NULL ? c->up->tls_name : c->up->host,
               c->up->tls_pin != NULL ? ", matches tls_pin" : "", pin);
    if (c->state == SMTPC_S_TLS_IMPLICIT) {
        smtpc_enter_state(c, SMTPC_S_GREETING);
        return;
    }
    /* RFC 3207 section 4.2: forget everything learnt before TLS and say EHLO again. */
    smtpc_send_ehlo(c);
}

static void smtpc_io_cb(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct smtpc *c = arg;

    if (io != c->io || c->state == SMTPC_S_CLOSING)
        return;
    switch (ev) {
    case TLSIO_CONNECTED:
        log_debug(1, "%s: connected to %s", smtpc_tag(c), c->peer);
        if (tlsio_read_start(io) < 0) {
            smtpc_fail(c, SMTPC_DEFER, 0, "connect to %s: %s", c->peer, tlsio_errstr(io));
            return;
        }
        smtpc_step(c, 1, "connect to %s: ok", c->peer);
        if (c->up->tls == CFG_TLS_IMPLICIT)
            smtpc_starttls(c, 1);
        else
            smtpc_enter_state(c, SMTPC_S_GREETING);
        break;
    case TLSIO_DATAIN:
        smtpc_input(c);
        break;
    case TLSIO_TLSREADY:
        smtpc_tls_ready(c);
        break;
    case TLSIO_DRAINED:
        if (c->state == SMTPC_S_BODY)
            smtpc_send_body(c);
        break;
    case TLSIO_EOF:
    case TLSIO_ERROR:
        switch (c->state) {
        case SMTPC_S_CONNECT:
            snprintf(c->lasterr, sizeof(c->lasterr), "connect to %s: %s", c->peer,
                     tlsio_errstr(io));
            smtpc_drop_io(c);
            smtpc_try_connect(c);
            break;
        case SMTPC_S_TLS_IMPLICIT:
        case SMTPC_S_TLS_HANDSHAKE:
            smtpc_fail(c, SMTPC_DEFER,
                       ev == TLSIO_ERROR && tlsio_verify_failed(io) ? SMTPC_F_FAULT : 0, "TLS: %s",
                       ev == TLSIO_EOF ? "connection closed by peer during handshake"
                                       : tlsio_errstr(io));
            break;
        case SMTPC_S_QUIT:
            smtpc_step(c, 1, "QUIT: connection closed");
            smtpc_close(c);
            break;
        case SMTPC_S_IDLE:
            log_debug(1, "%s: idle session closed by the server", c->sid);
            smtpc_close(c);
            break;
        case SMTPC_S_BODY:
            smtpc_fail(c, SMTPC_DEFER, SMTPC_F_STALE,
                       "connection lost while sending message body%s%s",
                       ev == TLSIO_ERROR ? ": " : "", ev == TLSIO_ERROR ? tlsio_errstr(io) : "");
            break;
        default:
            smtpc_lost(c, ev == TLSIO_ERROR ? tlsio_errstr(io) : NULL);
            break;
        }
        break;
    }
}

/* ---- Public ---- */

static uint64_t smtpc_serial;

static struct smtpc *smtpc_new(uv_loop_t *loop, enum smtpc_mode mode, const struct cfg_upstream *up,
                               struct tlsio_cred *cred, struct oauth2 *oauth2, const char *helo)
{
    struct smtpc *c = xcalloc(1, sizeof(*c));

    c->oauth2 = oauth2;
    c->mode = mode;
    c->loop = loop;
    c->up = up;
    c->cred = cred;
    c->helo = xstrdup(helo != NULL && *helo != '\0' ? helo : "localhost");
    c->connect_timeout = up->connect_timeout;
    c->command_timeout = up->command_timeout;
    c->dot_timeout = up->data_timeout > 0 ? up->data_timeout : c->command_timeout;
    c->idle_timeout = up->idle_timeout > 0 ? up->idle_timeout : SMTPC_IDLE_TIMEOUT_DEFAULT;
    snprintf(c->sid, sizeof(c->sid), "%s#%" PRIu64, up->name != NULL ? up->name : up->host,
             ++smtpc_serial);
    snprintf(c->qid, sizeof(c->qid), "%s", c->sid);
    c->reply = buf_new(0);
    c->res.up = up;
    return c;
}

static int smtpc_begin(struct smtpc *c)
{
    struct addrinfo hints;
    char port[16];
    int rc;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    snprintf(port, sizeof(port), "%d", c->up->port);
    c->gai.data = c;
    rc = uv_getaddrinfo(c->loop, &c->gai, smtpc_resolved, c->up->host, port, &hints);
    if (rc < 0) {
        buf_free(c->reply);
        smtpc_tx_free(c->tx);
        free(c->helo);
        free(c);
        return rc;
    }
    c->gai_pending = 1;
    uv_timer_init(c->loop, &c->timer);
    c->timer.data = c;
    smtpc_enter_state(c, SMTPC_S_RESOLVE);
    return 0;
}

int smtpc_probe(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                struct oauth2 *oauth2, const char *helo, smtpc_step_fn stepfn, smtpc_done_fn done,
                void *arg, struct smtpc **out)
{
    struct smtpc *c = smtpc_new(loop, SMTPC_M_PROBE, up, cred, oauth2, helo);
    int rc;

    c->done = done;
    c->step = stepfn;
    c->arg = arg;
    if ((rc = smtpc_begin(c)) < 0)
        return rc;
    if (out != NULL)
        *out = c;
    return 0;
}

void smtpc_abort(struct smtpc *c)
{
    if (c == NULL || c->done_called)
        return;
    if (c->mode == SMTPC_M_SESSION) {
        smtpc_session_abort(c);
        return;
    }
    if (!c->have_result) {
        c->have_result = 1;
        c->res.status = SMTPC_DEFER;
        snprintf(c->res.reply, sizeof(c->res.reply), SMTPC_ABORTED);
    }
    if (c->gai_pending)
        uv_cancel((uv_req_t *)&c->gai);
    smtpc_close(c);
    smtpc_call_done(c);
}

int smtpc_session_open(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                       struct oauth2 *oauth2, const char *helo, smtpc_event_fn ev, void *arg,
                       struct smtpc **out)
{
    struct smtpc *c = smtpc_new(loop, SMTPC_M_SESSION, up, cred, oauth2, helo);
    int rc;

    c->ev = ev;
    c->arg = arg;
    if ((rc = smtpc_begin(c)) < 0)
        return rc;
    *out = c;
    return 0;
}

int smtpc_session_idle(const struct smtpc *c)
{
    return c->mode == SMTPC_M_SESSION && c->state == SMTPC_S_IDLE && c->tx == NULL;
}

int smtpc_session_count(const struct smtpc *c)
{
    return c->ntx;
}

int smtpc_session_offered(const struct smtpc *c)
{
    return c->tx != NULL && c->tx->offered && !c->tx->have_result && c->state != SMTPC_S_CLOSING;
}

int smtpc_session_send(struct smtpc *c, const struct smtpc_msg *msg, smtpc_done_fn done, void *arg)
{
    if (!smtpc_session_idle(c))
        return UV_EBUSY;
    c->tx = smtpc_tx_new(msg, done, arg);
    /* The first reply cannot arrive before this returns: done always runs from the loop. */
    smtpc_tx_send_next(c);
    return 0;
}

void smtpc_session_abort(struct smtpc *c)
{
    if (c == NULL || c->state == SMTPC_S_CLOSING)
        return;
    if (c->tx != NULL) {
        smtpc_tx_result_as(c, c->tx, VERDICT_TRANSIENT, SMTPC_ABORTED);
        c->have_result = 1;
    }
    c->have_result = 1; /* no SMTPC_EV_FAILED */
    if (c->gai_pending)
        uv_cancel((uv_req_t *)&c->gai);
    smtpc_close(c);
    smtpc_tx_deliver(c);
}

void smtpc_session_quit(struct smtpc *c)
{
    if (c == NULL || c->state == SMTPC_S_CLOSING || c->state == SMTPC_S_QUIT)
        return;
    if (smtpc_session_idle(c)) {
        c->have_result = 1;
        smtpc_send(c, SMTPC_S_QUIT, "QUIT", NULL, "QUIT");
        return;
    }
    smtpc_session_abort(c);
}
