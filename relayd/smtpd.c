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
#include "common/xtext.h"
#include "relayd/msgfix.h"
#include "relayd/metrics.h"
#include "relayd/smtpd_int.h"
#include "relayd/smtpd_policy.h"

static const char *const smtpd_state_names[] = {
    "PROXY", "TLS_HANDSHAKE", "CMD", "AUTH", "AUTH_DELAY", "DATA", "COMMIT_WAIT", "QUIT",
    "CLOSING",
};

static void smtpd_on_timeout(uv_timer_t *t);
static void smtpd_greet(struct smtpd_session *s);
static void smtpd_proxy_input(struct smtpd_session *s);

/* ---- small helpers ---- */

size_t *smtpd_server_memory(struct smtpd_server *srv)
{
    return &srv->mem_used;
}

struct smtpd_cred *smtpd__cred_ref(struct smtpd_cred *c)
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
void smtpd__trace(struct smtpd_session *s, char dir, const char *line, int n)
{
    if (s->debug)
        log_info("session=%llu: %c %.*s", (unsigned long long)s->id, dir, n, line);
    else
        log_debug(2, "session=%llu: %c %.*s", (unsigned long long)s->id, dir, n, line);
}

void smtpd__reply(struct smtpd_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

void smtpd__enter_state(struct smtpd_session *s, enum smtpd_state st);

/* Writes the gathered replies in one piece; past SMTPD_OUTPUT_MAX unread bytes the session
 * stops reading (and handling) commands until TLSIO_DRAINED, under write_timeout. */
void smtpd__flush(struct smtpd_session *s)
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
        smtpd__enter_state(s, s->state); /* re-arms the timer with write_timeout */
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
    smtpd__flush(s);
    s->cork = buf_free(s->cork);
}

void smtpd__reply(struct smtpd_session *s, const char *fmt, ...)
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
        smtpd__trace(s, '>', "334 ****", 8);
    else
        smtpd__trace(s, '>', line, n);
    if (line[0] >= '1' && line[0] <= '5')
        s->last_code = (line[0] - '0') * 100;
    line[n++] = '\r';
    line[n++] = '\n';
    if (s->cork != NULL) {
        buf_append(s->cork, line, (size_t)n);
        if (s->cork->len > SMTPD_OUTPUT_MAX)
            smtpd__flush(s);
        return;
    }
    tlsio_write(s->io, line, (size_t)n);
    smtpd__flush(s);
}

void smtpd__enter_state(struct smtpd_session *s, enum smtpd_state st)
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
void smtpd__mem_sync(struct smtpd_session *s)
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

struct smtpd_tx *smtpd__tx_free(struct smtpd_tx *tx)
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

void smtpd__tx_reset(struct smtpd_session *s)
{
    s->tx = smtpd__tx_free(s->tx);
    smtpd__mem_sync(s);
}

void smtpd__session_unref(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;

    if (--s->refs > 0)
        return;
    smtpd__tx_reset(s);
    free(s->helo);
    free(s->auth_user);
    s->sasl = authsasl_server_free(s->sasl);
    s->cork = buf_free(s->cork);
    /* The tlsio (and its GnuTLS session) is gone by now: the credentials may go too. */
    s->cred = smtpd_cred_unref(s->cred);
    s->lcred = smtpd_cred_unref(s->lcred);
    s->gen = cfg_gen_unref(s->gen); /* the last session of an old generation frees it */
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
    smtpd__session_unref(h->data);
}

static void smtpd_on_io_closed(void *arg)
{
    smtpd__session_unref(arg);
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
    metrics_on_session(1);
}

static void smtpd_uncount(struct smtpd_session *s)
{
    struct smtpd_client **c, *dead;

    if (s->flags & SMTPD_F_COUNTED) {
        s->flags &= ~SMTPD_F_COUNTED;
        s->srv->nsessions--;
        metrics_on_session(-1);
        c = smtpd_client_slot(s->srv, s->peer);
        if (*c != NULL && --(*c)->n == 0) {
            dead = *c;
            *c = dead->next;
            free(dead);
        }
    }
}

/* What relayctl devices shows: every client, its refusals (reason and text, or NULL) and
 * the messages it got accepted. */
static void smtpd_device_note(struct smtpd_session *s, const char *reason, const char *text,
                              uint32_t accepted)
{
    struct spool_device_event ev;

    memset(&ev, 0, sizeof(ev));
    ev.client = s->peer;
    ev.helo = s->helo;
    ev.listener = s->lcfg->name;
    ev.when = (int64_t)time(NULL);
    ev.accepted = accepted;
    ev.reason = reason;
    ev.reason_text = text;
    spool_device_note(s->srv->sp, &ev);
}

/* Refusals: one info line each with the client, the listener, the reason and the setting
 * that would change it (README "Every refusal explained"). */
void smtpd__refuse_log(struct smtpd_session *s, enum smtpd_refusal r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void smtpd__refuse_log(struct smtpd_session *s, enum smtpd_refusal r, const char *fmt, ...)
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
    metrics_on_reject(s->lcfg->name, ri->name);
    smtpd_device_note(s, ri->name, what, 0);
}

/* The one exit: logs one line, drops the uncommitted transaction, closes every handle. */
void smtpd__session_close(struct smtpd_session *s, const char *why)
{
    char summary[256];

    if (s->state == SMTPD_S_CLOSING)
        return;
    smtpd_uncork(s); /* a last reply (221, 421) goes out before the close */
    if (strcmp(s->peer, "unknown") != 0 && !(s->flags & SMTPD_F_PROBE))
        smtpd_device_note(s, NULL, NULL, (uint32_t)s->counts.ok[SMTPD_V_DATA]);
    /* Postfix style: every command the client gave, "ok/total" where some failed.  A load
     * balancer's health check (every few seconds) is not an event worth a line. */
    smtpd_policy_summary(&s->counts, summary, sizeof(summary));
    if (s->flags & SMTPD_F_PROBE)
        log_debug(1, "disconnect from %s session=%llu%s (%s) (PROXY LOCAL: health check)",
                  s->peer, (unsigned long long)s->id, summary, why);
    else
        log_info("disconnect from %s session=%llu%s (%s)", s->peer, (unsigned long long)s->id,
                 summary, why);
    smtpd__enter_state(s, SMTPD_S_CLOSING);
    smtpd_uncount(s);
    /* A transaction in COMMIT_WAIT belongs to the spool writer now; see smtpd_commit_done (smtpd_data.c). */
    smtpd__tx_reset(s);
    uv_timer_stop(&s->timer);
    s->refs += 2;
    uv_close((uv_handle_t *)&s->timer, smtpd_on_handle_closed);
    tlsio_close(s->io, smtpd_on_io_closed, s);
    smtpd__session_unref(s); /* the "alive" reference */
}

/* After a final reply: closes once it is written; why goes into the disconnect line. */
void smtpd__reject_close(struct smtpd_session *s, const char *why)
{
    s->close_why = why;
    s->close_after_drain = 1;
    smtpd_uncount(s);
    smtpd__enter_state(s, SMTPD_S_QUIT);
}

int smtpd__error(struct smtpd_session *s)
{
    if (++s->errors < s->lcfg->max_errors)
        return 0;
    smtpd__reply(s, "421 4.7.0 %s Error: too many errors", s->cfg->hostname);
    smtpd__refuse_log(s, SMTPD_R_TOO_MANY_ERRORS, "%d protocol errors (max_errors %d)", s->errors,
                     s->lcfg->max_errors);
    smtpd__reject_close(s, "too many errors");
    return -1;
}

/* ---- input ---- */

/* A bare LF where bare_lf = reject: 550 and close, as Postfix's
 * smtpd_forbid_bare_newline = reject does. */
static void smtpd_bare_lf_refuse(struct smtpd_session *s, const char *where)
{
    smtpd__refuse_log(s, SMTPD_R_BARE_LF, "a line of %s ended in a bare LF (no CR)", where);
    smtpd__reply(s, "550 5.5.2 Error: bare <LF> received");
    smtpd__reject_close(s, "bare LF refused");
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
void smtpd__drain_input(struct smtpd_session *s)
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
                end = smtpd__data_line(s, p, crlf ? len - 1 : len, crlf);
                p += len + 1;
                avail -= len + 1;
            }
            if (s->state != SMTPD_S_DATA)
                break;
            if (end) {
                smtpd__data_end(s);
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
                smtpd__data_append(s, p, take);
                s->tx->mid_line = 1;
                s->tx->last_dot = 0; /* the data no longer ends in ".\r\n" */
                s->in_off += take;
            }
            break;
        }
        if ((lf = memchr(p, '\n', avail)) == NULL) {
            if (avail > maxline) {
                if (!(s->flags & SMTPD_F_SKIPLINE)) {
                    smtpd__trace(s, '<', "(line too long)", 15);
                    smtpd__refuse_log(s, SMTPD_R_LINE_TOO_LONG, "a command line over %zu bytes",
                                     maxline);
                    smtpd__reply(s, "500 5.5.2 Error: line too long");
                    s->flags |= SMTPD_F_SKIPLINE;
                    if (s->state == SMTPD_S_AUTH) {
                        s->flags |= SMTPD_F_MASK;
                        smtpd__enter_state(s, SMTPD_S_CMD);
                    }
                    if (smtpd__error(s) != 0)
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
            smtpd__trace(s, '<', "(line too long)", 15);
            smtpd__refuse_log(s, SMTPD_R_LINE_TOO_LONG, "a command line of %zu bytes (max %zu)",
                             n, maxline);
            smtpd__reply(s, "500 5.5.2 Error: line too long");
            if (s->state == SMTPD_S_AUTH) {
                s->flags |= SMTPD_F_MASK;
                smtpd__enter_state(s, SMTPD_S_CMD);
            }
            if (smtpd__error(s) != 0)
                break;
            continue;
        }
        s->cmd_crlf = crlf;
        cmd = xmalloc(n + 1);
        memcpy(cmd, p, n);
        cmd[n] = '\0';
        smtpd__dispatch(s, cmd, n);
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
        smtpd__drain_input(s);
        break;
    case TLSIO_DRAINED:
        if (s->out_blocked && !s->close_after_drain) {
            /* The client read its replies: take its commands again. */
            s->out_blocked = 0;
            smtpd__enter_state(s, s->state);
            smtpd__drain_input(s);
            break;
        }
        if (s->close_after_drain)
            smtpd__session_close(s, s->close_why != NULL ? s->close_why : "quit");
        break;
    case TLSIO_EOF:
        if (s->state == SMTPD_S_COMMIT_WAIT) {
            /* A half-close after the final dot: the client may still read our 250, and
             * dropping it now invites a duplicate.  smtpd_commit_done (smtpd_data.c) closes. */
            s->peer_eof = 1;
            log_debug(1, "session=%llu: client %s closed its side while its message is being "
                      "committed", (unsigned long long)s->id, s->peer);
            break;
        }
        smtpd__session_close(s, s->state == SMTPD_S_DATA ? "lost connection during DATA"
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

            smtpd__refuse_log(s, SMTPD_R_TLS_FAILED, "TLS handshake failed: %s; client offered: "
                             "%s; hint: %s", tlsio_errstr(io),
                             tlsio_client_versions(io)[0] != '\0' ? tlsio_client_versions(io)
                                                                  : "(no ClientHello)",
                             smtpd_policy_tls_hint(tlsio_client_versions(io), tlsio_errstr(io),
                                                   hint, sizeof(hint)));
        }
        smtpd__session_close(s, tlsio_errstr(io));
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
        smtpd__tx_reset(s);
        s->sasl = authsasl_server_free(s->sasl); /* plaintext mechanisms may be allowed now */
        smtpd__enter_state(s, SMTPD_S_CMD);
        smtpd__drain_input(s);
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

    if (srv->draining) {
        log_info("connect from %s listener=%s session=%llu: refused: draining (relayctl resume)",
                 s->peer, lc->name, (unsigned long long)s->id);
        metrics_on_reject(lc->name, "draining");
        if (plain)
            smtpd__reply(s, "421 4.3.2 %s not accepting mail now (draining), try another server",
                        srv->cfg->hostname);
        goto refused;
    }
    if (!netaddr_list_match(&lc->allow, (struct sockaddr *)&s->addr)) {
        smtpd__refuse_log(s, SMTPD_R_NOT_ALLOWED, "connect from %s: not in the allow list",
                         s->peer);
        if (plain)
            smtpd__reply(s, "554 5.7.1 %s: access denied to %s", srv->cfg->hostname, s->peer);
        goto refused;
    }
    if (srv->nsessions >= srv->cfg->max_connections) {
        smtpd__refuse_log(s, SMTPD_R_MAX_CONN, "too many connections (%d, max_connections)",
                         srv->nsessions);
        if (plain)
            smtpd__reply(s, "421 4.7.0 %s Error: too many connections", srv->cfg->hostname);
        goto refused;
    }
    if ((n = smtpd_client_count(s)) >= srv->cfg->max_connections_per_client) {
        smtpd__refuse_log(s, SMTPD_R_MAX_CONN_CLIENT, "too many connections from this client "
                         "(%d, max_connections_per_client)", n);
        if (plain)
            smtpd__reply(s, "421 4.7.0 %s Error: too many connections from your address",
                        srv->cfg->hostname);
        goto refused;
    }
    smtpd_count(s);
    s->debug = lc->debug_peers.n > 0 && netaddr_list_match(&lc->debug_peers,
                                                            (struct sockaddr *)&s->addr);
    s->bare_lf = smtpd_policy_bare_lf_mode(
        lc->bare_lf_mode, lc->bare_lf_accept.n > 0 &&
                              netaddr_list_match(&lc->bare_lf_accept, (struct sockaddr *)&s->addr));
    if (s->flags & SMTPD_F_PROBE)
        log_debug(1, "connect from %s listener=%s session=%llu (PROXY LOCAL: health check)",
                  s->peer, lc->name, (unsigned long long)s->id);
    else
        log_info("connect from %s listener=%s session=%llu%s", s->peer, lc->name,
                 (unsigned long long)s->id, s->debug ? " debug=yes" : "");
    return 0;
refused:
    s->flags |= SMTPD_F_GREETED;
    if (plain) {
        smtpd__enter_state(s, SMTPD_S_CMD);
        smtpd__reject_close(s, "rejected");
    } else {
        smtpd__session_close(s, "rejected");
    }
    return -1;
}

/* The 220, once admitted and (on implicit-TLS listeners) with TLS up. */
static void smtpd_greet(struct smtpd_session *s)
{
    s->flags |= SMTPD_F_GREETED;
    smtpd__enter_state(s, SMTPD_S_CMD);
    smtpd__reply(s, "220 %s ESMTP relayd", s->cfg->hostname);
}

/* After the PROXY header (or right after accept): admission, then TLS first on implicit
 * listeners, under handshake_timeout. */
static void smtpd_session_begin(struct smtpd_session *s)
{
    tlsio_read_start(s->io);
    if (smtpd_admit(s) != 0)
        return;
    if (s->lcfg->tls == CFG_TLS_IMPLICIT) {
        s->cred = smtpd__cred_ref(s->lcred);
        /* Whatever is in the input now followed a PROXY header in the same segment: it is
         * the client's ClientHello, so keep it (nothing else can precede implicit TLS). */
        if (tlsio_starttls_keep(s->io, s->cred->cred, 1, NULL) != 0) {
            smtpd__session_close(s, tlsio_errstr(s->io));
            return;
        }
        smtpd__enter_state(s, SMTPD_S_TLS_HANDSHAKE);
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
            smtpd__session_close(s, "PROXY header too long");
        return; /* wait for more; the state timer bounds the wait */
    }
    if (rc < 0) {
        log_warn("listener %s: connection from %s: %s; closing", lc->name, s->peer,
                 proxyproto_strerror(rc));
        smtpd__session_close(s, proxyproto_strerror(rc));
        return;
    }
    if ((lc->proxy_protocol == CFG_PROXY_V1 && res.version != 1) ||
        (lc->proxy_protocol == CFG_PROXY_V2 && res.version != 2)) {
        log_warn("listener %s: connection from %s: PROXY v%d header, but the listener expects "
                 "%s; closing", lc->name, s->peer, res.version,
                 cfg_proxy_name(lc->proxy_protocol));
        smtpd__session_close(s, "wrong PROXY protocol version");
        return;
    }
    buf_consume(in, (size_t)rc);
    if (res.local) {
        s->flags |= SMTPD_F_PROBE; /* HAProxy's check-send-proxy: no client behind it */
    } else {
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
        smtpd__session_close(s, "timeout waiting for the PROXY header");
        return;
    case SMTPD_S_AUTH_DELAY:
        smtpd__reply(s, "535 5.7.8 Authentication credentials invalid");
        smtpd__enter_state(s, SMTPD_S_CMD);
        if (smtpd__error(s) == 0)
            smtpd__drain_input(s);
        return;
    case SMTPD_S_TLS_HANDSHAKE:
        smtpd__refuse_log(s, SMTPD_R_TLS_FAILED, "no TLS handshake within handshake_timeout "
                         "(%d s); client offered: %s", s->lcfg->handshake_timeout,
                         tlsio_client_versions(s->io)[0] != '\0' ? tlsio_client_versions(s->io)
                                                                  : "(no ClientHello)");
        smtpd__session_close(s, "timeout during TLS handshake");
        return;
    case SMTPD_S_DATA:
        if (!s->out_blocked && smtpd__data_glued_dot(s))
            return;
        break;
    default:
        break;
    }
    if (s->out_blocked) {
        smtpd__refuse_log(s, SMTPD_R_WRITE_TIMEOUT, "%zu bytes of replies unread for %d s",
                         tlsio_pending_write(s->io), s->lcfg->write_timeout);
        smtpd__session_close(s, "write timeout");
        return;
    }
    smtpd__refuse_log(s, SMTPD_R_TIMEOUT, "no %s within %d s",
                     s->state == SMTPD_S_DATA ? "DATA input" : "command",
                     s->state == SMTPD_S_DATA ? s->lcfg->data_timeout : s->lcfg->command_timeout);
    smtpd__reply(s, "421 4.4.2 %s Error: timeout exceeded", s->cfg->hostname);
    smtpd__session_close(s, s->state == SMTPD_S_DATA ? "timeout during DATA" : "timeout");
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
    s->cfg = srv->cfg;
    s->gen = cfg_gen_ref(srv->gen);
    s->lcfg = l->cfg;
    s->lcred = smtpd__cred_ref(l->cred);
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
        smtpd__session_close(s, "accept failed");
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
            smtpd__session_close(s, "untrusted proxy");
            return;
        }
        smtpd__enter_state(s, SMTPD_S_PROXY);
        if (tlsio_read_start(s->io) != 0)
            smtpd__session_close(s, tlsio_errstr(s->io));
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

/* Whether a reload changes anything of a listener kept on its socket (for the log line). */
static int smtpd_listener_changed(const struct cfg_listener *a, const struct cfg_listener *b)
{
#define STR_DIFF(f) ((a->f == NULL) != (b->f == NULL) || (a->f != NULL && strcmp(a->f, b->f) != 0))
#define NET_DIFF(f)                                                                                \
    (a->f.n != b->f.n || (a->f.n > 0 && memcmp(a->f.nets, b->f.nets, a->f.n * sizeof(*a->f.nets))))
    return STR_DIFF(name) || STR_DIFF(cert) || STR_DIFF(key) || STR_DIFF(tls_priority) ||
           STR_DIFF(sasldb) || STR_DIFF(auth_mechanisms) || STR_DIFF(sender_domains) ||
           STR_DIFF(recipient_domains) || STR_DIFF(bare_lf) || NET_DIFF(allow) ||
           NET_DIFF(debug_peers) || NET_DIFF(proxy_trusted) || NET_DIFF(bare_lf_accept) ||
           a->tls != b->tls || a->auth != b->auth || a->auth_plaintext != b->auth_plaintext ||
           a->proxy_protocol != b->proxy_protocol || a->add_date != b->add_date ||
           a->add_message_id != b->add_message_id || a->add_from != b->add_from ||
           a->add_received != b->add_received || a->command_timeout != b->command_timeout ||
           a->data_timeout != b->data_timeout || a->max_line_length != b->max_line_length ||
           a->max_errors != b->max_errors || a->glued_dot != b->glued_dot ||
           a->handshake_timeout != b->handshake_timeout || a->write_timeout != b->write_timeout;
#undef STR_DIFF
#undef NET_DIFF
}

static void smtpd_on_listener_closed(uv_handle_t *h)
{
    struct smtpd_listener *l = h->data;
    struct smtpd_server *srv = l->srv;

    smtpd_cred_unref(l->cred);
    free(l);
    srv->open--;
    smtpd_server_maybe_done(srv);
}

/* Stops accepting on l; its sessions go on.  l is freed by the close callback. */
static void smtpd_listener_close(struct smtpd_listener *l)
{
    if (l->bound) {
        l->bound = 0;
        uv_close((uv_handle_t *)&l->tcp, smtpd_on_listener_closed);
    } else {
        smtpd_cred_unref(l->cred);
        free(l);
    }
}

/* A new listener for lc, bound and listening; NULL with text in err. */
static struct smtpd_listener *smtpd_listener_open(struct smtpd_server *srv,
                                                  const struct cfg_listener *lc, char *err,
                                                  size_t errlen)
{
    struct smtpd_listener *l = xcalloc(1, sizeof(*l));
    struct sockaddr_storage ss;
    int rc;

    l->srv = srv;
    l->cfg = lc;
    if (lc->tls != CFG_TLS_NONE && smtpd_cred_load(lc, &l->cred, err, errlen) != 0)
        goto fail;
    if (strchr(lc->host, ':') != NULL)
        rc = uv_ip6_addr(lc->host, lc->port, (struct sockaddr_in6 *)&ss);
    else
        rc = uv_ip4_addr(lc->host, lc->port, (struct sockaddr_in *)&ss);
    if (rc != 0) {
        snprintf(err, errlen, "listener %s: bad address %s: %s", lc->name, lc->host,
                 uv_strerror(rc));
        goto fail;
    }
    uv_tcp_init(srv->loop, &l->tcp);
    l->tcp.data = l;
    l->bound = 1;
    srv->open++;
    if ((rc = uv_tcp_bind(&l->tcp, (struct sockaddr *)&ss, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)&l->tcp, lc->listen_backlog, smtpd_on_connection)) != 0) {
        snprintf(err, errlen, "listener %s: listen on %s:%d: %s", lc->name, lc->host, lc->port,
                 uv_strerror(rc));
        goto fail;
    }
    log_info("listener %s: listening on %s:%d tls=%s auth=%s%s", lc->name, lc->host, lc->port,
             cfg_tls_name(lc->tls), cfg_auth_name(lc->auth),
             lc->proxy_protocol != CFG_PROXY_NO ? " proxy_protocol=yes" : "");
    return l;
fail:
    smtpd_listener_close(l);
    return NULL;
}

int smtpd_server_listen(struct smtpd_server *srv, char *err, size_t errlen)
{
    return smtpd_server_reconfigure(srv, srv->cfg, NULL, NULL, err, errlen);
}

/*
 * Listeners are matched by address (host and port): a kept one stays on its socket (no
 * connection refused during a reload) and takes the new settings and freshly loaded TLS
 * credentials; the others are opened, and old ones left over closed.  Everything that can
 * fail (certificates, bind) is done before anything changes, so a failure leaves the
 * server as it was.
 */
int smtpd_server_reconfigure(struct smtpd_server *srv, const struct cfg *cfg, struct cfg_gen *gen,
                             struct smtpd_reconf *st, char *err, size_t errlen)
{
    int n = cfg->nlisteners, i, j, rc = 0;
    struct smtpd_listener **next = xcalloc((size_t)n + 1, sizeof(*next));
    struct smtpd_cred **creds = xcalloc((size_t)n + 1, sizeof(*creds));
    int *kept = xcalloc((size_t)srv->nlisteners + 1, sizeof(*kept));
    struct smtpd_reconf counts = {0, 0, 0};

    for (i = 0; i < n; i++) {
        const struct cfg_listener *lc = &cfg->listeners[i];

        if ((lc->auth == CFG_AUTH_OPTIONAL || lc->auth == CFG_AUTH_REQUIRED) &&
            (rc = authsasl_server_init(err, errlen)) != 0)
            goto undo;
    }
    /* Prepare: match, load credentials, bind what is new. */
    for (i = 0; i < n; i++) {
        const struct cfg_listener *lc = &cfg->listeners[i];

        for (j = 0; j < srv->nlisteners; j++) {
            const struct cfg_listener *oc = srv->listeners[j]->cfg;

            if (!kept[j] && oc->port == lc->port && strcmp(oc->host, lc->host) == 0)
                break;
        }
        if (j < srv->nlisteners) {
            kept[j] = 1;
            next[i] = srv->listeners[j];
            if (lc->tls != CFG_TLS_NONE && (rc = smtpd_cred_load(lc, &creds[i], err, errlen)) != 0)
                goto undo;
            continue;
        }
        if ((next[i] = smtpd_listener_open(srv, lc, err, errlen)) == NULL) {
            rc = -1;
            goto undo;
        }
        counts.added++;
    }
    /* Commit: nothing below fails. */
    for (i = 0; i < n; i++) {
        struct smtpd_listener *l = next[i];
        const struct cfg_listener *lc = &cfg->listeners[i];

        if (l->cfg == lc)
            continue; /* opened above */
        if (smtpd_listener_changed(l->cfg, lc)) {
            counts.changed++;
            log_info("listener %s: new settings on %s:%d tls=%s auth=%s", lc->name, lc->host,
                     lc->port, cfg_tls_name(lc->tls), cfg_auth_name(lc->auth));
        }
        /* Sessions already using the old credentials keep their reference. */
        smtpd_cred_unref(l->cred);
        l->cred = creds[i];
        l->cfg = lc;
    }
    for (j = 0; j < srv->nlisteners; j++) {
        if (kept[j])
            continue;
        counts.removed++;
        log_info("listener %s: closed (%s:%d); its sessions finish", srv->listeners[j]->cfg->name,
                 srv->listeners[j]->cfg->host, srv->listeners[j]->cfg->port);
        smtpd_listener_close(srv->listeners[j]);
    }
    free(srv->listeners);
    srv->listeners = next;
    srv->nlisteners = n;
    srv->cfg = cfg;
    cfg_gen_ref(gen);
    cfg_gen_unref(srv->gen);
    srv->gen = gen;
    if (st != NULL)
        *st = counts;
    free(creds);
    free(kept);
    return 0;
undo:
    for (i = 0; i < n; i++) {
        smtpd_cred_unref(creds[i]);
        if (next[i] != NULL && next[i]->cfg == &cfg->listeners[i])
            smtpd_listener_close(next[i]);
    }
    free(next);
    free(creds);
    free(kept);
    return rc != 0 ? rc : -1;
}

void smtpd_server_stop(struct smtpd_server *srv, void (*done)(void *arg), void *arg)
{
    struct smtpd_session *s, *next;
    int i;

    srv->stopping = 1;
    srv->stop_done = done;
    srv->stop_arg = arg;
    srv->open++; /* hold off completion until every close below has been started */
    for (i = 0; i < srv->nlisteners; i++)
        smtpd_listener_close(srv->listeners[i]); /* freed by its close callback */
    srv->nlisteners = 0;
    for (s = srv->sessions; s != NULL; s = next) {
        next = s->next;
        if (s->state == SMTPD_S_COMMIT_WAIT) {
            /* Its message is being committed: it gets its 250 first (smtpd_commit_done (smtpd_data.c)),
             * or it would send it again and the upstream would get it twice. */
            continue;
        }
        if (s->state != SMTPD_S_CLOSING) {
            if (s->flags & SMTPD_F_GREETED)
                smtpd__reply(s, "421 4.3.2 %s Service shutting down", srv->cfg->hostname);
            smtpd__session_close(s, "shutdown");
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
        smtpd_listener_close(srv->listeners[i]); /* never bound (listen failed): freed now */
    srv->gen = cfg_gen_unref(srv->gen);
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

void smtpd_server_set_accepting(struct smtpd_server *srv, int accepting)
{
    if (srv->draining == !accepting)
        return;
    srv->draining = !accepting;
    log_info("%s: %s", accepting ? "resume" : "drain",
             accepting ? "accepting mail again"
                       : "new connections get 421 4.3.2; sessions in progress finish, "
                         "queued mail is still delivered");
}

int smtpd_server_accepting(const struct smtpd_server *srv)
{
    return !srv->draining;
}
