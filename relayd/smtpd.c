/*
 * smtpd - the inbound SMTP server: listeners and per-connection sessions.
 *
 * Happy path: accept; on a proxy_protocol listener read the PROXY header first (PROXY
 * state, nothing sent); then admission (smtpd_admit): the allow list and the connection
 * limits, counted at once, before anything costly; on an implicit-TLS listener the
 * handshake follows (TLS_HANDSHAKE, under handshake_timeout); 220 greeting, HELO/EHLO
 * (optional: legacy clients skip it), STARTTLS and AUTH when configured, MAIL, RCPT...,
 * DATA, lines collected (bare LF as bare_lf says, dot-unstuffed, stored with CRLF) until
 * ".", the message is repaired (msgfix) and handed to the spool writer; COMMIT_WAIT until
 * the durable commit completes; only then "250 2.0.0 Ok: queued as ID".  Pipelined commands
 * that arrived meanwhile stay buffered and are handled after the 250 (Postfix: drain all
 * input), parsed by offset and consumed once per batch, their replies corked into one
 * write.
 *
 * States: PROXY -> [TLS_HANDSHAKE] -> CMD <-> AUTH (334 sent, waiting for the client's
 * answer) -> AUTH_DELAY (a failed login: the 535 waits 1-3 s on the session timer) ->
 * CMD <-> DATA -> COMMIT_WAIT -> CMD ... -> QUIT -> CLOSING.  STARTTLS goes CMD ->
 * TLS_HANDSHAKE -> CMD with HELO, transaction and AUTH state reset (RFC 3207 4.2).
 * The one timer is re-armed on every state change with that state's timeout, or with
 * write_timeout while the client leaves our replies unread.
 *
 * Failure modes: every refusal goes through smtpd_refuse_log() (one info line naming the
 * setting, smtpd_policy.h, and a note for relayctl devices).  A client outside the allow
 * list gets 554 5.7.1 and is disconnected; over max_connections (total or per client
 * address) 421 4.7.0 (on implicit-TLS listeners both are disconnected without a word,
 * before any handshake); a malformed or missing PROXY header closes the connection without
 * a word; an over-long command line gets 500 5.5.2 and the session resynchronises at the
 * next line end; a message over max_message_size is read to its end and refused with 552
 * 5.3.4 without keeping the excess; when what all sessions hold passes max_memory, 451
 * 4.3.1; a bare LF with bare_lf = reject gets 550 5.5.2 and a close; more than
 * SMTPD_OUTPUT_MAX unread reply bytes stop the reading of commands until drained (closed
 * after write_timeout); a client that disconnects mid-DATA leaves nothing in the spool; one
 * that half-closes during COMMIT_WAIT still gets its 250; a spool that is full gets 452
 * 4.3.1; timeouts get 421 4.4.2 and a close (glued_dot listeners first try the alarm-panel
 * rescue); max_errors protocol errors get 421 4.7.0 and a close.  A stop closes every
 * session except those in COMMIT_WAIT, which get their 250 (then 421) first.
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
#include "relayd/bounce.h"
#include "relayd/msgfix.h"
#include "relayd/smtpd_policy.h"

#define SMTPD_INPUT_MAX (256 * 1024) /* input held while not reading commands */
#define SMTPD_DATA_CHUNK (64 * 1024)   /* flush a partial DATA line beyond this */
#define SMTPD_PROXY_TIMEOUT_MS 10000   /* for the PROXY header */
#define SMTPD_PROXY_MAX (PROXYPROTO_V2_HDR + 65535)
#define SMTPD_AUTH_DELAY_MS 1000       /* first failed login; grows by this per failure */
#define SMTPD_AUTH_DELAY_MAX_MS 3000
#define SMTPD_ENVID_MAX 100            /* RFC 3461 4.4 */
/* Replies the client has not read yet: past this we stop reading its commands until the
 * kernel took them (an EHLO loop that never reads once grew relayd to 4.5 GB). */
#define SMTPD_OUTPUT_MAX (64 * 1024)
#define SMTPD_CLIENT_BUCKETS 4096      /* per-address session counts (power of two) */

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
#define SMTPD_F_MASK 0x80     /* after a refused or aborted AUTH: unknown lines are masked */

struct smtpd_tx {
    char *sender;
    char **rcpts;
    size_t nrcpts, cap;
    struct buf *data; /* the message as received: CRLF lines, unstuffed */
    int too_big;      /* went over max_message_size: read to the end, then 552 */
    int no_mem;       /* went over the server's max_memory: read to the end, then 451 */
    int mid_line;     /* the last chunk appended ended inside a line */
    int last_dot;     /* the last complete line ended in '.' (see smtpd_data_glued_dot) */
    int prev_crlf;    /* the last complete line (or the DATA command) ended in CRLF */
    size_t rcpt_bytes; /* memory held by the recipient list, for max_memory */
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
    int out_blocked;              /* over SMTPD_OUTPUT_MAX unread replies: not reading */
    size_t in_off;                /* input handled but not yet consumed (see drain_input) */
    struct buf *cork;             /* replies gathered for one write, or NULL */
    int last_code;                /* of the last reply, for the command counters */
    int cmd_crlf;                 /* the last command line ended in CRLF */
    int peer_eof;                 /* the client half-closed while its commit was pending */
    size_t commit_mem;            /* bytes of the message the spool writer holds for us */
    enum cfg_bare_lf bare_lf;     /* the listener's bare_lf for this client */
    int bare_lf_logged;           /* a bare-LF end of DATA was logged in this session */
    struct smtpd_counts counts;   /* for the disconnect line */
    struct smtpd_session *prev, *next;
};

/* Sessions counted per client address (max_connections_per_client) without walking
 * every session at each accept: with 10,000 sessions that walk stalled the loop. */
struct smtpd_client {
    char peer[64];
    int n;
    struct smtpd_client *next;
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
    struct smtpd_client *clients[SMTPD_CLIENT_BUCKETS];
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

static void smtpd_enter_state(struct smtpd_session *s, enum smtpd_state st);

/* Writes the gathered replies in one piece; past SMTPD_OUTPUT_MAX unread bytes the session
 * stops reading (and handling) commands until TLSIO_DRAINED, under write_timeout. */
static void smtpd_flush(struct smtpd_session *s)
{
    if (s->cork != NULL && s->cork->len > 0 && s->state != SMTPD_S_CLOSING) {
        tlsio_write(s->io, s->cork->data, s->cork->len);
        buf_reset(s->cork);
    }
    if (s->state != SMTPD_S_CLOSING && !s->out_blocked &&
        tlsio_pending_write(s->io) > SMTPD_OUTPUT_MAX) {
        s->out_blocked = 1;
        s->input_paused = 1;
        tlsio_read_stop(s->io);
        smtpd_enter_state(s, s->state); /* re-arms the timer with write_timeout */
    }
}

/* Replies are gathered from here to smtpd_uncork() (EHLO's lines, a pipelined batch). */
static void smtpd_cork(struct smtpd_session *s)
{
    if (s->cork == NULL)
        s->cork = buf_new(0);
}

static void smtpd_uncork(struct smtpd_session *s)
{
    smtpd_flush(s);
    s->cork = buf_free(s->cork);
}

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
    if (line[0] >= '1' && line[0] <= '5')
        s->last_code = (line[0] - '0') * 100;
    line[n++] = '\r';
    line[n++] = '\n';
    if (s->cork != NULL) {
        buf_append(s->cork, line, (size_t)n);
        if (s->cork->len > SMTPD_OUTPUT_MAX)
            smtpd_flush(s);
        return;
    }
    tlsio_write(s->io, line, (size_t)n);
    smtpd_flush(s);
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
    case SMTPD_S_TLS_HANDSHAKE:
        timeout = (uint64_t)lc->handshake_timeout * 1000;
        break;
    case SMTPD_S_DATA:
        timeout = (uint64_t)lc->data_timeout * 1000;
        break;
    default:
        timeout = (uint64_t)lc->command_timeout * 1000;
        break;
    }
    if (s->out_blocked)
        timeout = (uint64_t)lc->write_timeout * 1000;
    uv_timer_start(&s->timer, smtpd_on_timeout, timeout, timeout);
}

/* Brings srv->mem_used in line with what this session's transaction holds now. */
static void smtpd_mem_sync(struct smtpd_session *s)
{
    size_t now = s->commit_mem;

    /* What this session really holds: the message being received (allocated size), the
     * one the spool writer has not committed yet, the recipients, and the input and
     * output buffers (max_memory, README "Limits"). */
    if (s->tx != NULL) {
        now += s->tx->rcpt_bytes;
        if (s->tx->data != NULL)
            now += s->tx->data->cap;
    }
    if (s->state != SMTPD_S_CLOSING && s->io != NULL)
        now += tlsio_input(s->io)->len + tlsio_pending_write(s->io);

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
    s->cork = buf_free(s->cork);
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
static struct smtpd_client **smtpd_client_slot(struct smtpd_server *srv, const char *peer)
{
    struct smtpd_client **c;
    uint32_t h = 2166136261u; /* FNV-1a */
    const char *p;

    for (p = peer; *p != '\0'; p++)
        h = (h ^ (unsigned char)*p) * 16777619u;
    for (c = &srv->clients[h & (SMTPD_CLIENT_BUCKETS - 1)]; *c != NULL; c = &(*c)->next)
        if (strcmp((*c)->peer, peer) == 0)
            break;
    return c;
}

/* Sessions from this address that count against max_connections_per_client. */
static int smtpd_client_count(const struct smtpd_session *s)
{
    struct smtpd_client **c = smtpd_client_slot(s->srv, s->peer);

    return *c != NULL ? (*c)->n : 0;
}

static void smtpd_count(struct smtpd_session *s)
{
    struct smtpd_client **c = smtpd_client_slot(s->srv, s->peer);

    if (*c == NULL) {
        *c = xcalloc(1, sizeof(**c));
        snprintf((*c)->peer, sizeof((*c)->peer), "%s", s->peer);
    }
    (*c)->n++;
    s->flags |= SMTPD_F_COUNTED;
    s->srv->nsessions++;
}

static void smtpd_uncount(struct smtpd_session *s)
{
    struct smtpd_client **c, *dead;

    if (s->flags & SMTPD_F_COUNTED) {
        s->flags &= ~SMTPD_F_COUNTED;
        s->srv->nsessions--;
        c = smtpd_client_slot(s->srv, s->peer);
        if (*c != NULL && --(*c)->n == 0) {
            dead = *c;
            *c = dead->next;
            free(dead);
        }
    }
}

/* What relayctl devices shows: every client, its last refusal and its accepted mail. */
static void smtpd_device_note(struct smtpd_session *s, const char *reason, const char *text)
{
    struct spool_device_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.client = s->peer;
    ev.helo = s->helo;
    ev.listener = s->lcfg->name;
    ev.when = (int64_t)time(NULL);
    ev.reason = reason;
    ev.reason_text = text;
    spool_device_note(s->srv->sp, &ev);
}

/* Refusals: one info line each with the client, the listener, the reason and the setting
 * that would change it (README "Every refusal explained"). */
static void smtpd_refuse_log(struct smtpd_session *s, enum smtpd_refusal r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void smtpd_refuse_log(struct smtpd_session *s, enum smtpd_refusal r, const char *fmt, ...)
{
    const struct smtpd_refusal_info *ri = smtpd_policy_refusal(r);
    char what[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    log_info("reject: session=%llu client=%s listener=%s helo=%s reason=%s: %s; setting: %s "
             "(%s)", (unsigned long long)s->id, s->peer, s->lcfg->name,
             s->helo != NULL ? s->helo : "none", ri->name, what, ri->setting, ri->fix);
    smtpd_device_note(s, ri->name, what);
}

/* The one exit: logs one line, drops the uncommitted transaction, closes every handle. */
static void smtpd_session_close(struct smtpd_session *s, const char *why)
{
    char summary[256];

    if (s->state == SMTPD_S_CLOSING)
        return;
    smtpd_uncork(s); /* a last reply (221, 421) goes out before the close */
    if (strcmp(s->peer, "unknown") != 0) {
        struct spool_device_event ev;

        memset(&ev, 0, sizeof(ev));
        ev.client = s->peer;
        ev.helo = s->helo;
        ev.listener = s->lcfg->name;
        ev.when = (int64_t)time(NULL);
        ev.accepted = s->counts.ok[SMTPD_V_DATA];
        spool_device_note(s->srv->sp, &ev);
    }
    /* Postfix style: every command the client gave, "ok/total" where some failed. */
    log_info("disconnect from %s session=%llu%s (%s)", s->peer, (unsigned long long)s->id,
             smtpd_policy_summary(&s->counts, summary, sizeof(summary)), why);
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
    smtpd_refuse_log(s, SMTPD_R_TOO_MANY_ERRORS, "%d protocol errors (max_errors %d)", s->errors,
                     s->lcfg->max_errors);
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
    /* Commands run corked (smtpd_drain_input): the whole reply goes out in one write. */
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
            smtpd_refuse_log(s, SMTPD_R_TOO_BIG, "MAIL SIZE=%llu over max_message_size %ld", size,
                             s->srv->cfg->max_message_size);
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
        smtpd_refuse_log(s, SMTPD_R_AUTH_REQUIRED, "MAIL before a successful AUTH (auth = "
                         "required)");
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
        !cfg_domain_listed(lc->sender_domains, addr)) {
        smtpd_refuse_log(s, SMTPD_R_SENDER_DOMAIN, "MAIL FROM:<%s>: domain not in "
                         "sender_domains", addr);
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
    if (lc->recipient_domains != NULL && !cfg_domain_listed(lc->recipient_domains, addr)) {
        smtpd_refuse_log(s, SMTPD_R_RCPT_DOMAIN, "RCPT TO:<%s>: relay access denied (domain "
                         "not in recipient_domains)", addr);
        smtpd_reply(s, "554 5.7.1 <%s>: Relay access denied", addr);
        free(addr);
        free(orcpt);
        smtpd_error(s);
        return;
    }
    if (tx->nrcpts >= (size_t)s->srv->cfg->max_recipients) {
        smtpd_refuse_log(s, SMTPD_R_TOO_MANY_RCPTS, "RCPT TO:<%s>: more than max_recipients "
                         "(%d)", addr, s->srv->cfg->max_recipients);
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
    /* Charged against max_memory: strings and array slots (not malloc's own overhead). */
    tx->rcpt_bytes += strlen(addr) + 1 + (orcpt != NULL ? strlen(orcpt) + 1 : 0) +
                      sizeof(*tx->rcpts) + sizeof(*tx->notify) + sizeof(*tx->orcpt);
    tx->notify[tx->nrcpts] = notify;
    tx->orcpt[tx->nrcpts] = orcpt;
    tx->rcpts[tx->nrcpts++] = addr;
    tx->ndsn_rcpts += dsn;
    smtpd_mem_sync(s);
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
        smtpd_refuse_log(s, SMTPD_R_MEMORY, "DATA deferred: sessions hold %zu bytes "
                         "(max_memory %ld)", srv->mem_used, srv->cfg->max_memory);
        smtpd_reply(s, "451 4.3.1 Insufficient system resources, try again later");
        return;
    }
    /* The limit is enforced while streaming; the excess is never held in memory. */
    s->tx->data = buf_new((size_t)srv->cfg->max_message_size);
    s->tx->prev_crlf = s->cmd_crlf;
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
    smtpd_flush(s); /* in cleartext, before the handshake starts */
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
        s->flags &= ~SMTPD_F_MASK;
        s->counts.ok[SMTPD_V_AUTH]++;
        free(s->auth_user);
        s->auth_user = xstrdup(user);
        log_info("session=%llu: client=%s sasl_method=%s sasl_username=%s%s",
                 (unsigned long long)s->id, s->peer, authsasl_server_mech(sasl), user,
                 s->lcfg->auth == CFG_AUTH_ACCEPT_ANY ? " (accept-any)" : "");
        smtpd_reply(s, "235 2.7.0 Authentication successful");
        smtpd_enter_state(s, SMTPD_S_CMD);
        break;
    case AUTHSASL_FORM:
        s->flags |= SMTPD_F_MASK;
        smtpd_reply(s, "501 5.5.2 Cannot decode AUTH data");
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_error(s);
        break;
    case AUTHSASL_NOMECH:
        s->flags |= SMTPD_F_MASK;
        smtpd_refuse_log(s, SMTPD_R_AUTH_MECH, "AUTH %s: not offered (auth_mechanisms = %s%s)",
                         authsasl_server_mech(sasl), s->lcfg->auth_mechanisms,
                         !tlsio_is_tls(s->io) ? ", without TLS" : "");
        smtpd_reply(s, "504 5.5.4 Unrecognized authentication type");
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_error(s);
        break;
    case AUTHSASL_TEMP:
        s->flags |= SMTPD_F_MASK;
        log_error("session=%llu: authentication unavailable: client=%s mechanism=%s: %s",
                  (unsigned long long)s->id, s->peer, authsasl_server_mech(sasl), err);
        smtpd_reply(s, "454 4.7.0 Temporary authentication failure");
        smtpd_enter_state(s, SMTPD_S_CMD);
        break;
    default:
        /* Never the password; the reply waits (AUTH_DELAY) to slow down guessing. */
        s->auth_failures++;
        s->flags |= SMTPD_F_MASK;
        smtpd_refuse_log(s, SMTPD_R_AUTH_FAILED, "AUTH %s for user %s failed: %s",
                         authsasl_server_mech(sasl), user[0] != '\0' ? user : "(unknown)", err);
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

    while (*arg == ' ' || *arg == '\t')
        arg++;
    /* Whatever goes wrong below, lines the client pipelined behind this AUTH may be its
     * credentials: they are masked in the trace until a known command comes. */
    s->flags |= SMTPD_F_MASK;
    if (lc->auth == CFG_AUTH_OFF) {
        smtpd_refuse_log(s, SMTPD_R_AUTH_OFF, "AUTH on a listener with auth = off");
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
    n = strcspn(arg, " \t");
    if (n == 0 || n >= sizeof(mech)) {
        smtpd_reply(s, "501 5.5.4 Syntax: AUTH mechanism");
        smtpd_error(s);
        return;
    }
    memcpy(mech, arg, n);
    mech[n] = '\0';
    initial = arg + n;
    while (*initial == ' ' || *initial == '\t')
        initial++;
    if ((sasl = smtpd_sasl(s)) == NULL) {
        smtpd_refuse_log(s, SMTPD_R_AUTH_UNAVAILABLE, "AUTH %s: the account store cannot be "
                         "used (see the error logged before)", mech);
        smtpd_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    /* RFC 4954 6: 538 when the mechanism would be fine over TLS. */
    if (smtpd_is_plain_mech(mech) && !tlsio_is_tls(s->io) && !lc->auth_plaintext) {
        smtpd_refuse_log(s, SMTPD_R_AUTH_NEEDS_TLS, "AUTH %s without TLS (listener tls = %s, "
                         "auth_plaintext = no)", mech, cfg_tls_name(lc->tls));
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
    s->flags |= SMTPD_F_MASK;
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
    enum smtpd_verb counter; /* for the disconnect line */
};

static const struct smtpd_cmd smtpd_cmd_table[] = {
    {"EHLO", smtpd_cmd_ehlo, SMTPD_V_EHLO},
    {"HELO", smtpd_cmd_helo1, SMTPD_V_HELO},
    {"MAIL", smtpd_cmd_mail, SMTPD_V_MAIL},
    {"RCPT", smtpd_cmd_rcpt, SMTPD_V_RCPT},
    {"DATA", smtpd_cmd_data, SMTPD_V_DATA},
    {"RSET", smtpd_cmd_rset, SMTPD_V_RSET},
    {"NOOP", smtpd_cmd_noop, SMTPD_V_NOOP},
    {"VRFY", smtpd_cmd_vrfy, SMTPD_V_VRFY},
    {"HELP", smtpd_cmd_help, SMTPD_V_HELP},
    {"QUIT", smtpd_cmd_quit, SMTPD_V_QUIT},
    {"AUTH", smtpd_cmd_auth, SMTPD_V_AUTH},
    {"STARTTLS", smtpd_cmd_starttls, SMTPD_V_STARTTLS},
    {NULL, NULL, SMTPD_V_UNKNOWN},
};

static const struct smtpd_cmd *smtpd_cmd_find(const char *cmd, size_t verblen)
{
    const struct smtpd_cmd *c;

    for (c = smtpd_cmd_table; c->verb != NULL; c++)
        if (verblen == strlen(c->verb) && strncasecmp(cmd, c->verb, verblen) == 0)
            return c;
    return NULL;
}

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
        s->counts.total[SMTPD_V_UNKNOWN]++;
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
    /* RFC 5321 says SP; some devices send a TAB ("AUTH\tPLAIN ..."). */
    verblen = strcspn(cmd, " \t");
    c = smtpd_cmd_find(cmd, verblen);
    if (c != NULL && c->counter == SMTPD_V_AUTH) {
        /* "AUTH PLAIN ****": the mechanism, never the credentials. */
        const char *mech = cmd + verblen + strspn(cmd + verblen, " \t");
        size_t mlen = strcspn(mech, " \t");
        char masked[64];
        int m = snprintf(masked, sizeof(masked), "%.*s %.*s%s", (int)verblen, cmd,
                         (int)(mlen > 32 ? 32 : mlen), mech, mech[mlen] != '\0' ? " ****" : "");
        smtpd_trace(s, '<', masked, m);
    } else if (c == NULL && (s->flags & SMTPD_F_MASK)) {
        /* After a refused or aborted AUTH a device's pipelined answers (base64, or even a
         * password typed as is) arrive as "commands": never log them. */
        smtpd_trace(s, '<', "**** (not a command, after AUTH)", 32);
    } else {
        if (c != NULL)
            s->flags &= ~SMTPD_F_MASK;
        smtpd_trace(s, '<', cmd, (int)n);
    }
    if (c != NULL) {
        s->counts.total[c->counter]++;
        s->last_code = 0;
        c->fn(s, cmd + verblen);
        /* AUTH and DATA count as done at 235 and at the 250 after the commit. */
        if (c->counter != SMTPD_V_AUTH && c->counter != SMTPD_V_DATA && s->last_code > 0 &&
            s->last_code < 400)
            s->counts.ok[c->counter]++;
        return;
    }
    s->counts.total[SMTPD_V_UNKNOWN]++;
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
               tlsio_is_tls(s->io) ? "S" : "",
               /* accept-any verified nothing: RFC 3848's "A" would claim it did. */
               (s->flags & SMTPD_F_AUTHED) && s->lcfg->auth != CFG_AUTH_ACCEPT_ANY ? "A" : "",
               qid);
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
        smtpd_refuse_log(s, SMTPD_R_TOO_BIG, "message from <%s> over max_message_size %ld",
                         tx->sender, srv->cfg->max_message_size);
        smtpd_reply(s, "552 5.3.4 Error: message exceeds fixed limit of %ld bytes",
                    srv->cfg->max_message_size);
        smtpd_tx_reset(s);
        smtpd_enter_state(s, SMTPD_S_CMD);
        return;
    }
    if (tx->no_mem) {
        smtpd_refuse_log(s, SMTPD_R_MEMORY, "message from <%s> dropped: sessions passed "
                         "max_memory (%ld) while it was received", tx->sender,
                         srv->cfg->max_memory);
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
        if (cfg_route_match(srv->cfg, tx->sender, tx->rcpts[i], s->peer, lc->name) == NULL)
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
    s->commit_mem = len; /* the spool writer holds the body until the commit completes */
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
    s->commit_mem = 0;
    smtpd_mem_sync(s);
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
        s->counts.ok[SMTPD_V_DATA]++;
        smtpd_reply(s, "250 2.0.0 Ok: queued as %s", qid);
        if (s->srv->on_spooled != NULL)
            s->srv->on_spooled(s->srv->on_spooled_arg, c->id);
    } else if (rc == SPOOL_EFULL) {
        smtpd_refuse_log(s, SMTPD_R_SPOOL_FULL, "%s: rejected: spool is full (%s)", qid,
                         spool_strerror(rc));
        smtpd_reply(s, "452 4.3.1 Insufficient system storage");
    } else {
        log_error("%s: spool write failed: %s", qid, spool_strerror(rc));
        smtpd_reply(s, "451 4.3.0 Error: local error in processing");
    }
    free(c);
    smtpd_tx_reset(s);
    smtpd_enter_state(s, SMTPD_S_CMD);
    smtpd_session_unref(s); /* still held by "alive" */
    if (s->srv->stopping) {
        /* The stop waited for this commit so that the client got its 250 (no duplicate). */
        smtpd_reply(s, "421 4.3.2 %s Service shutting down", s->srv->cfg->hostname);
        smtpd_session_close(s, "shutdown");
        return;
    }
    smtpd_drain_input(s);
    if (s->peer_eof && s->state != SMTPD_S_CLOSING) {
        /* The client half-closed while we committed: it had its 250 (and the replies to
         * whatever it pipelined before closing); now it is gone. */
        smtpd_session_close(s, s->close_after_drain && s->close_why == NULL
                                   ? "quit"
                                   : "lost connection after the reply to DATA");
    }
}

/* One DATA line (without its line ending; crlf: it ended in CRLF, not a bare LF);
 * returns 1 at the end of the message. */
static int smtpd_data_line(struct smtpd_session *s, const char *line, size_t n, int crlf)
{
    struct smtpd_tx *tx = s->tx;

    if (!tx->mid_line) {
        if (n == 1 && line[0] == '.') {
            enum smtpd_eod eod = smtpd_policy_dot(s->bare_lf, tx->prev_crlf, crlf);

            if (eod == SMTPD_EOD_END_BARE && !s->bare_lf_logged) {
                s->bare_lf_logged = 1;
                log_info("session=%llu: client=%s listener=%s: end of DATA with a bare LF "
                         "accepted (bare_lf = accept; set bare_lf = normalize where clients "
                         "pass user text through)", (unsigned long long)s->id, s->peer,
                         s->lcfg->name);
            }
            if (eod != SMTPD_EOD_DATA)
                return 1;
            /* A lone dot that does not end the message is message text. */
        } else if (n > 0 && line[0] == '.') { /* RFC 5321 4.5.2 dot-unstuffing */
            line++;
            n--;
        }
    }
    tx->mid_line = 0;
    tx->prev_crlf = crlf;
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

    if (!s->lcfg->glued_dot || tx == NULL || tx->too_big || tx->no_mem || tx->data == NULL)
        return 0;
    if (in->len > 0 && in->data[in->len - 1] == '.' && memchr(in->data, '\n', in->len) == NULL) {
        /* A last line without any line end: everything but the dot is the line. */
        smtpd_data_line(s, in->data, in->len - 1, 1);
        buf_consume(in, in->len);
    } else if (in->len == 0 && tx->last_dot && !tx->mid_line && tx->data->len >= 3 &&
               memcmp(tx->data->data + tx->data->len - 3, ".\r\n", 3) == 0) {
        /* "text.\r\n": drop the dot, keep the CRLF. */
        tx->data->data[tx->data->len - 3] = '\r';
        tx->data->data[tx->data->len - 2] = '\n';
        tx->data->len--;
        tx->data->data[tx->data->len] = '\0';
    } else {
        return 0;
    }
    log_warn("session=%llu: client %s: no end of DATA after a last line ending in '.' within "
             "data_timeout; taking that dot as the end of the message (glued_dot = yes)",
             (unsigned long long)s->id, s->peer);
    smtpd_data_end(s);
    return 1;
}

/* ---- input ---- */

/* A bare LF where bare_lf = reject: 550 and close, as Postfix's
 * smtpd_forbid_bare_newline = reject does. */
static void smtpd_bare_lf_refuse(struct smtpd_session *s, const char *where)
{
    smtpd_refuse_log(s, SMTPD_R_BARE_LF, "a line of %s ended in a bare LF (no CR)", where);
    smtpd_reply(s, "550 5.5.2 Error: bare <LF> received");
    smtpd_reject_close(s, "bare LF refused");
}

static int smtpd_readable(const struct smtpd_session *s)
{
    return s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA || s->state == SMTPD_S_AUTH;
}

/*
 * Handles every complete line buffered (Postfix: drain all input), by offset: s->in_off
 * advances over what was handled and the input is consumed once at the end.  Consuming
 * line by line moved the rest of the buffer each time: ~320 KB of pipelined NOOPs cost
 * gigabytes of copying.  Replies are corked and written once per batch (or whenever
 * SMTPD_OUTPUT_MAX gathered); past that many unread bytes the loop stops until drained.
 */
static void smtpd_drain_input(struct smtpd_session *s)
{
    size_t maxline = (size_t)s->lcfg->max_line_length;
    struct buf *in;
    const char *p, *lf;
    char *cmd;
    size_t avail, len, n;
    int crlf;

    if (s->input_paused && !s->out_blocked && smtpd_readable(s)) {
        s->input_paused = 0;
        tlsio_read_start(s->io);
    }
    smtpd_cork(s);
    in = tlsio_input(s->io);
    while (smtpd_readable(s) && !s->out_blocked) {
        p = in->data + s->in_off;
        avail = in->len - s->in_off;
        if (s->state == SMTPD_S_DATA) {
            int end = 0;

            while (!end && (lf = memchr(p, '\n', avail)) != NULL) {
                len = (size_t)(lf - p);
                crlf = len > 0 && p[len - 1] == '\r';
                s->in_off += len + 1;
                if (!crlf && s->bare_lf == CFG_BARE_LF_REJECT) {
                    smtpd_bare_lf_refuse(s, "DATA");
                    break;
                }
                end = smtpd_data_line(s, p, crlf ? len - 1 : len, crlf);
                p += len + 1;
                avail -= len + 1;
            }
            if (s->state != SMTPD_S_DATA)
                break;
            if (end) {
                smtpd_data_end(s);
                continue;
            }
            if (avail > SMTPD_DATA_CHUNK) {
                /* A very long line: store what we have, keeping a trailing CR for CRLF. */
                size_t take = avail - (p[avail - 1] == '\r' ? 1 : 0);

                if (!s->tx->mid_line && p[0] == '.') {
                    p++;
                    take--;
                    s->in_off++;
                }
                smtpd_data_append(s, p, take);
                s->tx->mid_line = 1;
                s->tx->last_dot = 0; /* the data no longer ends in ".\r\n" */
                s->in_off += take;
            }
            break;
        }
        if ((lf = memchr(p, '\n', avail)) == NULL) {
            if (avail > maxline) {
                if (!(s->flags & SMTPD_F_SKIPLINE)) {
                    smtpd_trace(s, '<', "(line too long)", 15);
                    smtpd_refuse_log(s, SMTPD_R_LINE_TOO_LONG, "a command line over %zu bytes",
                                     maxline);
                    smtpd_reply(s, "500 5.5.2 Error: line too long");
                    s->flags |= SMTPD_F_SKIPLINE;
                    if (s->state == SMTPD_S_AUTH) {
                        s->flags |= SMTPD_F_MASK;
                        smtpd_enter_state(s, SMTPD_S_CMD);
                    }
                    if (smtpd_error(s) != 0)
                        break;
                }
                s->in_off = in->len;
            }
            break;
        }
        len = (size_t)(lf - p);
        crlf = len > 0 && p[len - 1] == '\r';
        n = crlf ? len - 1 : len;
        s->in_off += len + 1;
        if (s->flags & SMTPD_F_SKIPLINE) {
            s->flags &= ~SMTPD_F_SKIPLINE; /* resynchronised at the end of the long line */
            continue;
        }
        if (!crlf && s->bare_lf == CFG_BARE_LF_REJECT) {
            smtpd_bare_lf_refuse(s, "a command");
            break;
        }
        if (n > maxline) {
            smtpd_trace(s, '<', "(line too long)", 15);
            smtpd_refuse_log(s, SMTPD_R_LINE_TOO_LONG, "a command line of %zu bytes (max %zu)",
                             n, maxline);
            smtpd_reply(s, "500 5.5.2 Error: line too long");
            if (s->state == SMTPD_S_AUTH) {
                s->flags |= SMTPD_F_MASK;
                smtpd_enter_state(s, SMTPD_S_CMD);
            }
            if (smtpd_error(s) != 0)
                break;
            continue;
        }
        s->cmd_crlf = crlf;
        cmd = xmalloc(n + 1);
        memcpy(cmd, p, n);
        cmd[n] = '\0';
        smtpd_dispatch(s, cmd, n);
        free(cmd);
        if (s->state == SMTPD_S_CLOSING)
            return; /* the io is closed: its input is gone */
        if (in->len < s->in_off)
            s->in_off = 0; /* STARTTLS discarded the cleartext input (RFC 3207 4) */
    }
    if (s->state == SMTPD_S_CLOSING)
        return;
    buf_consume(in, s->in_off);
    s->in_off = 0;
    smtpd_uncork(s);
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
        if (s->out_blocked && !s->close_after_drain) {
            /* The client read its replies: take its commands again. */
            s->out_blocked = 0;
            smtpd_enter_state(s, s->state);
            smtpd_drain_input(s);
            break;
        }
        if (s->close_after_drain)
            smtpd_session_close(s, s->close_why != NULL ? s->close_why : "quit");
        break;
    case TLSIO_EOF:
        if (s->state == SMTPD_S_COMMIT_WAIT) {
            /* A half-close after the final dot: the client may still read our 250, and
             * dropping it now invites a duplicate.  smtpd_commit_done closes. */
            s->peer_eof = 1;
            log_debug(1, "session=%llu: client %s closed its side while its message is being "
                      "committed", (unsigned long long)s->id, s->peer);
            break;
        }
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
        if (s->state == SMTPD_S_TLS_HANDSHAKE) {
            char hint[256];

            smtpd_refuse_log(s, SMTPD_R_TLS_FAILED, "TLS handshake failed: %s; client offered: "
                             "%s; hint: %s", tlsio_errstr(io),
                             tlsio_client_versions(io)[0] != '\0' ? tlsio_client_versions(io)
                                                                  : "(no ClientHello)",
                             smtpd_policy_tls_hint(tlsio_client_versions(io), tlsio_errstr(io),
                                                   hint, sizeof(hint)));
        }
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

/*
 * Admission, once the real client is known (after the PROXY header, if any) and before
 * anything costly: the allow list and the connection limits, so that on an implicit-TLS
 * listener nobody outside allow (and nobody over the limits) gets a handshake, a private
 * key operation or an uncounted session.  0, or -1 when the session is being refused.
 */
static int smtpd_admit(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;
    const struct cfg_listener *lc = s->lcfg;
    int plain = lc->tls != CFG_TLS_IMPLICIT; /* a plaintext reply can be understood */
    int n;

    if (!netaddr_list_match(&lc->allow, (struct sockaddr *)&s->addr)) {
        smtpd_refuse_log(s, SMTPD_R_NOT_ALLOWED, "connect from %s: not in the allow list",
                         s->peer);
        if (plain)
            smtpd_reply(s, "554 5.7.1 %s: access denied to %s", srv->cfg->hostname, s->peer);
        goto refused;
    }
    if (srv->nsessions >= srv->cfg->max_connections) {
        smtpd_refuse_log(s, SMTPD_R_MAX_CONN, "too many connections (%d, max_connections)",
                         srv->nsessions);
        if (plain)
            smtpd_reply(s, "421 4.7.0 %s Error: too many connections", srv->cfg->hostname);
        goto refused;
    }
    if ((n = smtpd_client_count(s)) >= srv->cfg->max_connections_per_client) {
        smtpd_refuse_log(s, SMTPD_R_MAX_CONN_CLIENT, "too many connections from this client "
                         "(%d, max_connections_per_client)", n);
        if (plain)
            smtpd_reply(s, "421 4.7.0 %s Error: too many connections from your address",
                        srv->cfg->hostname);
        goto refused;
    }
    smtpd_count(s);
    s->debug = lc->debug_peers.n > 0 && netaddr_list_match(&lc->debug_peers,
                                                            (struct sockaddr *)&s->addr);
    s->bare_lf = smtpd_policy_bare_lf_mode(
        lc->bare_lf_mode, lc->bare_lf_accept.n > 0 &&
                              netaddr_list_match(&lc->bare_lf_accept, (struct sockaddr *)&s->addr));
    log_info("connect from %s listener=%s session=%llu%s", s->peer, lc->name,
             (unsigned long long)s->id, s->debug ? " debug=yes" : "");
    return 0;
refused:
    s->flags |= SMTPD_F_GREETED;
    if (plain) {
        smtpd_enter_state(s, SMTPD_S_CMD);
        smtpd_reject_close(s, "rejected");
    } else {
        smtpd_session_close(s, "rejected");
    }
    return -1;
}

/* The 220, once admitted and (on implicit-TLS listeners) with TLS up. */
static void smtpd_greet(struct smtpd_session *s)
{
    s->flags |= SMTPD_F_GREETED;
    smtpd_enter_state(s, SMTPD_S_CMD);
    smtpd_reply(s, "220 %s ESMTP relayd", s->srv->cfg->hostname);
}

/* After the PROXY header (or right after accept): admission, then TLS first on implicit
 * listeners, under handshake_timeout. */
static void smtpd_session_begin(struct smtpd_session *s)
{
    struct smtpd_listener *l = s->l;

    tlsio_read_start(s->io);
    if (smtpd_admit(s) != 0)
        return;
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
        smtpd_refuse_log(s, SMTPD_R_TLS_FAILED, "no TLS handshake within handshake_timeout "
                         "(%d s); client offered: %s", s->lcfg->handshake_timeout,
                         tlsio_client_versions(s->io)[0] != '\0' ? tlsio_client_versions(s->io)
                                                                  : "(no ClientHello)");
        smtpd_session_close(s, "timeout during TLS handshake");
        return;
    case SMTPD_S_DATA:
        if (!s->out_blocked && smtpd_data_glued_dot(s))
            return;
        break;
    default:
        break;
    }
    if (s->out_blocked) {
        smtpd_refuse_log(s, SMTPD_R_WRITE_TIMEOUT, "%zu bytes of replies unread for %d s",
                         tlsio_pending_write(s->io), s->lcfg->write_timeout);
        smtpd_session_close(s, "write timeout");
        return;
    }
    smtpd_refuse_log(s, SMTPD_R_TIMEOUT, "no %s within %d s",
                     s->state == SMTPD_S_DATA ? "DATA input" : "command",
                     s->state == SMTPD_S_DATA ? s->lcfg->data_timeout : s->lcfg->command_timeout);
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
            (rc = uv_listen((uv_stream_t *)&l->tcp, lc->listen_backlog, smtpd_on_connection)) !=
                0) {
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
        if (s->state == SMTPD_S_COMMIT_WAIT) {
            /* Its message is being committed: it gets its 250 first (smtpd_commit_done),
             * or it would send it again and the upstream would get it twice. */
            continue;
        }
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
    for (i = 0; i < SMTPD_CLIENT_BUCKETS; i++) {
        while (srv->clients[i] != NULL) {
            struct smtpd_client *c = srv->clients[i];

            srv->clients[i] = c->next;
            free(c);
        }
    }
    free(srv->listeners);
    free(srv);
}
