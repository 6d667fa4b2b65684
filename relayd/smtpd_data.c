/*
 * smtpd_data - DATA: lines appended within max_message_size and max_memory, the end of
 * the message as bare_lf says, the glued-dot rescue (glued_dot listeners), repair
 * (msgfix), the Received: header, the hand-over to the spool writer and the completion
 * that sends the 250 only after the durable commit.
 *
 * Ownership: the message buffer belongs to the session's transaction until smtpd__data_end
 * hands the repaired body to spool_put_async() (the writer owns it then; its size stays
 * charged to the session as commit_mem until the completion).  The completion looks at the
 * session it was started for; the session holds a reference until then, so it is never
 * freed under a pending commit.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/xtext.h"
#include "common/addr.h"
#include "common/authsasl.h"
#include "common/buf.h"
#include "common/log.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/route.h"
#include "relayd/msgfix.h"
#include "relayd/metrics.h"
#include "relayd/smtpd_int.h"

/* ---- DATA ---- */

void smtpd__data_append(struct smtpd_session *s, const char *p, size_t n)
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
    smtpd__mem_sync(s);
    if (srv->mem_used > (size_t)srv->cfg->max_memory) {
        /* Over the global bound: drop this message now, answer 451 at its end. */
        tx->no_mem = 1;
        buf_free(tx->data);
        tx->data = buf_new(1);
        smtpd__mem_sync(s);
    }
}

static void smtpd_commit_done(void *arg, int rc);

static void smtpd_received(struct smtpd_session *s, const char *qid, struct buf *out)
{
    const struct cfg *cfg = s->cfg;
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

void smtpd__data_end(struct smtpd_session *s)
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
        smtpd__refuse_log(s, SMTPD_R_TOO_BIG, "message from <%s> over max_message_size %ld",
                         tx->sender, s->cfg->max_message_size);
        smtpd__reply(s, "552 5.3.4 Error: message exceeds fixed limit of %ld bytes",
                    s->cfg->max_message_size);
        smtpd__tx_reset(s);
        smtpd__enter_state(s, SMTPD_S_CMD);
        return;
    }
    if (tx->no_mem) {
        smtpd__refuse_log(s, SMTPD_R_MEMORY, "message from <%s> dropped: sessions passed "
                         "max_memory (%ld) while it was received", tx->sender,
                         srv->cfg->max_memory);
        smtpd__reply(s, "451 4.3.1 Insufficient system resources, try again later");
        smtpd__tx_reset(s);
        smtpd__enter_state(s, SMTPD_S_CMD);
        return;
    }
    memset(&msg, 0, sizeof(msg));
    msg.id = spool_id_new(srv->sp);
    spool_id_str(msg.id, qid);

    received = buf_new(0);
    smtpd_received(s, qid, received);
    memset(&fix, 0, sizeof(fix));
    fix.hostname = s->cfg->hostname;
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
        if (route_match(s->cfg, tx->sender, tx->rcpts[i], s->peer, lc->name) == NULL)
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
        char *envid = tx->envid != NULL ? xtext_encode(tx->envid) : NULL;

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
    smtpd__mem_sync(s);
    s->refs++;
    smtpd__enter_state(s, SMTPD_S_COMMIT_WAIT);
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
    metrics_on_spool_write(rc, s->lcfg->name);
    s->commit_mem = 0;
    smtpd__mem_sync(s);
    if (s->state == SMTPD_S_CLOSING) {
        /* The client left before our 250; if it resends, the upstream gets it twice. */
        if (rc == 0) {
            log_warn("%s: client %s disconnected before the reply; message kept", qid, s->peer);
            if (s->srv->on_spooled != NULL)
                s->srv->on_spooled(s->srv->on_spooled_arg, c->id);
        }
        free(c);
        smtpd__session_unref(s);
        return;
    }
    if (rc == 0) {
        s->counts.ok[SMTPD_V_DATA]++;
        smtpd__reply(s, "250 2.0.0 Ok: queued as %s", qid);
        if (s->srv->on_spooled != NULL)
            s->srv->on_spooled(s->srv->on_spooled_arg, c->id);
    } else if (rc == SPOOL_EFULL) {
        smtpd__refuse_log(s, SMTPD_R_SPOOL_FULL, "%s: rejected: spool is full (%s)", qid,
                         spool_strerror(rc));
        smtpd__reply(s, "452 4.3.1 Insufficient system storage");
    } else {
        log_error("%s: spool write failed: %s", qid, spool_strerror(rc));
        smtpd__reply(s, "451 4.3.0 Error: local error in processing");
    }
    free(c);
    smtpd__tx_reset(s);
    smtpd__enter_state(s, SMTPD_S_CMD);
    smtpd__session_unref(s); /* still held by "alive" */
    if (s->srv->stopping) {
        /* The stop waited for this commit so that the client got its 250 (no duplicate). */
        smtpd__reply(s, "421 4.3.2 %s Service shutting down", s->cfg->hostname);
        smtpd__session_close(s, "shutdown");
        return;
    }
    smtpd__drain_input(s);
    if (s->peer_eof && s->state != SMTPD_S_CLOSING) {
        /* The client half-closed while we committed: it had its 250 (and the replies to
         * whatever it pipelined before closing); now it is gone. */
        smtpd__session_close(s, s->close_after_drain && s->close_why == NULL
                                   ? "quit"
                                   : "lost connection after the reply to DATA");
    }
}

/* One DATA line (without its line ending; crlf: it ended in CRLF, not a bare LF);
 * returns 1 at the end of the message. */
int smtpd__data_line(struct smtpd_session *s, const char *line, size_t n, int crlf)
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
    smtpd__data_append(s, line, n);
    smtpd__data_append(s, "\r\n", 2);
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
int smtpd__data_glued_dot(struct smtpd_session *s)
{
    struct smtpd_tx *tx = s->tx;
    struct buf *in = tlsio_input(s->io);

    if (!s->lcfg->glued_dot || tx == NULL || tx->too_big || tx->no_mem || tx->data == NULL)
        return 0;
    if (in->len > 0 && in->data[in->len - 1] == '.' && memchr(in->data, '\n', in->len) == NULL) {
        /* A last line without any line end: everything but the dot is the line. */
        smtpd__data_line(s, in->data, in->len - 1, 1);
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
    smtpd__data_end(s);
    return 1;
}
