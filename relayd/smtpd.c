/*
 * smtpd - the inbound SMTP server: listeners and per-connection sessions.
 *
 * Happy path: accept, check the client against the listener's allow list, 220 greeting,
 * HELO/EHLO (optional: legacy clients skip it), MAIL, RCPT..., DATA, lines collected
 * (bare LF and CRLF alike, dot-unstuffed, stored with CRLF) until ".", the message is
 * repaired (msgfix) and handed to the spool writer; COMMIT_WAIT until the durable commit
 * completes; only then "250 2.0.0 Ok: queued as ID".  Pipelined commands that arrived
 * meanwhile stay buffered and are handled after the 250 (Postfix: drain all input).
 *
 * Failure modes: a client outside the allow list gets 554 5.7.1 and is disconnected; an
 * over-long command line gets 500 5.5.2 and the session resynchronises at the next line
 * end; a message over max_message_size is read to its end and refused with 552 5.3.4
 * without keeping the excess; a client that disconnects mid-DATA leaves nothing in the
 * spool; a spool that is full gets 452 4.3.1; timeouts get 421 4.4.2 and a close.
 *
 * Lifetime: a session is freed only when its TCP/TLS stream and its timer are closed and
 * no spool commit is outstanding (refs reaches 0).  Never free inside its own callback.
 */
#include "relayd/smtpd.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/addr.h"
#include "common/buf.h"
#include "common/log.h"
#include "common/netaddr.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/msgfix.h"

#define SMTPD_LINE_MAX 4096           /* RFC 5321 says 512; legacy clients send more */
#define SMTPD_DATA_CHUNK (64 * 1024)  /* flush a partial DATA line beyond this */
#define SMTPD_MAX_ERRORS 20           /* protocol errors before we hang up */
#define SMTPD_TIMEOUT_CMD_MS (300 * 1000)  /* RFC 5321 4.5.3.2.7 */
#define SMTPD_TIMEOUT_DATA_MS (300 * 1000) /* RFC 5321 4.5.3.2.7 */

enum smtpd_state {
    SMTPD_S_CMD,
    SMTPD_S_DATA,
    SMTPD_S_COMMIT_WAIT,
    SMTPD_S_QUIT,
    SMTPD_S_CLOSING,
};

static const char *const smtpd_state_names[] = {"CMD", "DATA", "COMMIT_WAIT", "QUIT", "CLOSING"};

#define SMTPD_F_HELO 0x1     /* HELO or EHLO seen */
#define SMTPD_F_EHLO 0x2     /* EHLO (ESMTP) */
#define SMTPD_F_SKIPLINE 0x4 /* discarding the rest of an over-long command line */

struct smtpd_tx {
    char *sender;
    char **rcpts;
    size_t nrcpts, cap;
    struct buf *data;  /* the message as received: CRLF lines, unstuffed */
    int too_big;       /* went over max_message_size: read to the end, then 552 */
    int mid_line;      /* the last chunk appended ended inside a line */
};

struct smtpd_listener {
    struct smtpd_server *srv;
    const struct cfg_listener *cfg;
    uv_tcp_t tcp;
    int bound;
};

struct smtpd_session {
    uint64_t id;
    struct smtpd_server *srv;
    const struct cfg_listener *lcfg;
    enum smtpd_state state;
    unsigned flags;
    struct tlsio *io;
    uv_timer_t timer;
    char peer[64];
    char *helo;
    struct smtpd_tx *tx;
    int refs;              /* alive + open handles + outstanding commits */
    int errors;
    int close_after_drain; /* QUIT or a fatal reply: close once the reply is sent */
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

/* ---- small helpers ---- */

static void smtpd_server_maybe_done(struct smtpd_server *srv)
{
    if (srv->stopping && srv->open == 0 && srv->stop_done != NULL) {
        void (*done)(void *) = srv->stop_done;
        srv->stop_done = NULL;
        done(srv->stop_arg);
    }
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
    log_debug(2, "%llu: > %.*s", (unsigned long long)s->id, n, line);
    line[n++] = '\r';
    line[n++] = '\n';
    tlsio_write(s->io, line, (size_t)n);
}

static void smtpd_enter_state(struct smtpd_session *s, enum smtpd_state st)
{
    uint64_t timeout = st == SMTPD_S_DATA ? SMTPD_TIMEOUT_DATA_MS : SMTPD_TIMEOUT_CMD_MS;

    log_debug(3, "%llu: state %s -> %s", (unsigned long long)s->id, smtpd_state_names[s->state],
              smtpd_state_names[st]);
    s->state = st;
    if (st != SMTPD_S_CLOSING)
        uv_timer_start(&s->timer, smtpd_on_timeout, timeout, timeout);
}

static struct smtpd_tx *smtpd_tx_free(struct smtpd_tx *tx)
{
    size_t i;

    if (tx == NULL)
        return NULL;
    free(tx->sender);
    for (i = 0; i < tx->nrcpts; i++)
        free(tx->rcpts[i]);
    free(tx->rcpts);
    buf_free(tx->data);
    free(tx);
    return NULL;
}

static void smtpd_session_unref(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;

    if (--s->refs > 0)
        return;
    s->tx = smtpd_tx_free(s->tx);
    free(s->helo);
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

/* The one exit: logs one line, drops the uncommitted transaction, closes every handle. */
static void smtpd_session_close(struct smtpd_session *s, const char *why)
{
    if (s->state == SMTPD_S_CLOSING)
        return;
    log_info("disconnect from %s session=%llu: %s", s->peer, (unsigned long long)s->id, why);
    smtpd_enter_state(s, SMTPD_S_CLOSING);
    /* A transaction in COMMIT_WAIT belongs to the spool writer now; see smtpd_commit_done. */
    s->tx = smtpd_tx_free(s->tx);
    uv_timer_stop(&s->timer);
    s->refs += 2;
    uv_close((uv_handle_t *)&s->timer, smtpd_on_handle_closed);
    tlsio_close(s->io, smtpd_on_io_closed, s);
    smtpd_session_unref(s); /* the "alive" reference */
}

static void smtpd_on_timeout(uv_timer_t *t)
{
    struct smtpd_session *s = t->data;

    smtpd_reply(s, "421 4.4.2 %s Error: timeout exceeded", s->srv->cfg->hostname);
    smtpd_session_close(s, s->state == SMTPD_S_DATA ? "timeout during DATA" : "timeout");
}

static int smtpd_error(struct smtpd_session *s)
{
    if (++s->errors < SMTPD_MAX_ERRORS)
        return 0;
    smtpd_reply(s, "421 4.7.0 %s Error: too many errors", s->srv->cfg->hostname);
    s->close_after_drain = 1;
    smtpd_enter_state(s, SMTPD_S_QUIT);
    return -1;
}

static void smtpd_tx_reset(struct smtpd_session *s)
{
    s->tx = smtpd_tx_free(s->tx);
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

    while (*arg == ' ')
        arg++;
    if (*arg == '\0') {
        smtpd_reply(s, "501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
        smtpd_error(s);
        return;
    }
    free(s->helo);
    s->helo = xstrndup(arg, strcspn(arg, " "));
    smtpd_tx_reset(s); /* RFC 5321 4.1.4: HELO/EHLO resets the transaction */
    s->flags |= SMTPD_F_HELO;
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
    smtpd_reply(s, "250-SMTPUTF8");
    smtpd_reply(s, "250 ENHANCEDSTATUSCODES");
}

static void smtpd_cmd_mail(struct smtpd_session *s, const char *arg)
{
    const char *path = smtpd_skip_keyword(arg, "FROM"), *params;
    char err[128], *addr;

    if (s->tx != NULL) {
        smtpd_reply(s, "503 5.5.1 Error: nested MAIL command");
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
    /* RFC 1870: refuse early when the client announces a size we will not take. */
    for (const char *p = params; p != NULL && *p != '\0';) {
        if (strncasecmp(p, "SIZE=", 5) == 0) {
            unsigned long long size = strtoull(p + 5, NULL, 10);
            if (size > (unsigned long long)s->srv->cfg->max_message_size) {
                smtpd_reply(s, "552 5.3.4 Message size exceeds fixed limit of %ld bytes",
                            s->srv->cfg->max_message_size);
                free(addr);
                return;
            }
        }
        p = strchr(p, ' ');
        while (p != NULL && *p == ' ')
            p++;
    }
    s->tx = xcalloc(1, sizeof(*s->tx));
    s->tx->sender = addr;
    smtpd_reply(s, "250 2.1.0 Ok");
}

static void smtpd_cmd_rcpt(struct smtpd_session *s, const char *arg)
{
    const char *path = smtpd_skip_keyword(arg, "TO"), *params;
    struct smtpd_tx *tx = s->tx;
    char err[128], *addr;

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
    if (tx->nrcpts >= (size_t)s->srv->cfg->max_recipients) {
        free(addr);
        smtpd_reply(s, "452 4.5.3 Error: too many recipients");
        return;
    }
    if (tx->nrcpts == tx->cap) {
        tx->cap = tx->cap ? tx->cap * 2 : 4;
        tx->rcpts = xrealloc(tx->rcpts, tx->cap * sizeof(*tx->rcpts));
    }
    tx->rcpts[tx->nrcpts++] = addr;
    smtpd_reply(s, "250 2.1.5 Ok");
}

static void smtpd_cmd_data(struct smtpd_session *s, const char *arg)
{
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
    /* The limit is enforced while streaming; the excess is never held in memory. */
    s->tx->data = buf_new((size_t)s->srv->cfg->max_message_size);
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
    smtpd_reply(s, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP");
}

static void smtpd_cmd_quit(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd_reply(s, "221 2.0.0 Bye");
    s->close_after_drain = 1;
    smtpd_enter_state(s, SMTPD_S_QUIT);
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
    {"EHLO", smtpd_cmd_ehlo}, {"HELO", smtpd_cmd_helo1}, {"MAIL", smtpd_cmd_mail},
    {"RCPT", smtpd_cmd_rcpt}, {"DATA", smtpd_cmd_data},  {"RSET", smtpd_cmd_rset},
    {"NOOP", smtpd_cmd_noop}, {"VRFY", smtpd_cmd_vrfy},  {"HELP", smtpd_cmd_help},
    {"QUIT", smtpd_cmd_quit}, {NULL, NULL},
};

static void smtpd_dispatch(struct smtpd_session *s, const char *line, size_t n)
{
    char cmd[SMTPD_LINE_MAX + 1];
    const struct smtpd_cmd *c;
    size_t verblen;

    memcpy(cmd, line, n);
    cmd[n] = '\0';
    /* Trailing spaces are common from legacy devices and never meaningful. */
    while (n > 0 && (cmd[n - 1] == ' ' || cmd[n - 1] == '\t'))
        cmd[--n] = '\0';
    if (memchr(cmd, '\0', n) != NULL) {
        smtpd_reply(s, "500 5.5.2 Error: NUL character in command");
        smtpd_error(s);
        return;
    }
    log_debug(2, "%llu: < %s", (unsigned long long)s->id, cmd);
    verblen = strcspn(cmd, " ");
    for (c = smtpd_cmd_table; c->verb != NULL; c++) {
        if (verblen == 4 && strncasecmp(cmd, c->verb, 4) == 0) {
            c->fn(s, cmd + verblen);
            return;
        }
    }
    if (verblen == 0) {
        smtpd_reply(s, "500 5.5.2 Error: empty command");
    } else {
        smtpd_reply(s, "502 5.5.2 Error: command not recognized");
    }
    smtpd_error(s);
}

/* ---- DATA ---- */

static void smtpd_data_append(struct smtpd_session *s, const char *p, size_t n)
{
    struct smtpd_tx *tx = s->tx;

    if (tx->too_big)
        return;
    if (buf_append(tx->data, p, n) != 0) {
        tx->too_big = 1;
        /* Keep nothing of an over-size message. */
        buf_free(tx->data);
        tx->data = buf_new(1);
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
    buf_printf(out, "\tby %s (relayd) with %s%s id %s", cfg->hostname, proto,
               tlsio_is_tls(s->io) ? "S" : "", qid);
    if (s->tx->nrcpts == 1)
        buf_printf(out, "\r\n\tfor <%s>", s->tx->rcpts[0]);
    buf_printf(out, "; %s", msgfix_date(time(NULL), date, sizeof(date)));
}

static void smtpd_data_end(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;
    struct smtpd_tx *tx = s->tx;
    struct spool_msg msg;
    struct spool_rcpt *rcpts;
    struct msgfix_opts fix;
    struct msgfix_report rep;
    struct buf *received, *out;
    char qid[17];
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
    memset(&msg, 0, sizeof(msg));
    msg.id = spool_id_new(srv->sp);
    spool_id_str(msg.id, qid);

    received = buf_new(0);
    smtpd_received(s, qid, received);
    memset(&fix, 0, sizeof(fix));
    fix.hostname = srv->cfg->hostname;
    fix.received = received->data;
    fix.sender = tx->sender;
    fix.queue_id = qid;
    fix.now = time(NULL);
    fix.add_date = fix.add_message_id = fix.add_from = 1;
    out = buf_new(0);
    msgfix_build(tx->data->data, tx->data->len, &fix, out, &rep);
    buf_free(received);

    rcpts = xcalloc(tx->nrcpts, sizeof(*rcpts));
    for (i = 0; i < tx->nrcpts; i++) {
        rcpts[i].addr = tx->rcpts[i];
        if (cfg_route_find(srv->cfg, tx->sender, tx->rcpts[i]) == NULL)
            held = 1;
    }
    msg.state = held ? SPOOL_HELD : SPOOL_QUEUED;
    msg.arrived = time(NULL);
    msg.next_attempt = held ? 0 : msg.arrived;
    msg.sender = tx->sender;
    msg.client = s->peer;
    msg.helo = s->helo;
    msg.listener = s->lcfg->name;
    msg.rcpts = rcpts;
    msg.nrcpts = tx->nrcpts;
    body = buf_steal(out, &len);
    msg.size = len;
    buf_free(out);

    log_info("%s: from=<%s> size=%zu nrcpt=%zu client=%s helo=%s%s%s%s", qid, tx->sender, len,
             tx->nrcpts, s->peer, s->helo ? s->helo : "none",
             rep.added_date ? " added=Date" : "", rep.added_message_id ? " added=Message-ID" : "",
             rep.added_from ? " added=From" : "");
    if (held)
        log_info("%s: held: no upstream route is configured for its recipients", qid);

    /* Keep the id for the completion; the transaction's data is no longer needed. */
    buf_free(tx->data);
    tx->data = NULL;
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
    smtpd_data_append(s, line, n);
    smtpd_data_append(s, "\r\n", 2);
    return 0;
}

/* ---- input ---- */

static void smtpd_drain_input(struct smtpd_session *s)
{
    struct buf *in;
    const char *line;
    size_t n, used;

    while (s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA) {
        in = tlsio_input(s->io);
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
            } else if (s->state == SMTPD_S_CMD && in->len > SMTPD_LINE_MAX) {
                if (!(s->flags & SMTPD_F_SKIPLINE)) {
                    smtpd_reply(s, "500 5.5.2 Error: line too long");
                    s->flags |= SMTPD_F_SKIPLINE;
                    if (smtpd_error(s) != 0)
                        return;
                }
                buf_consume(in, in->len);
            }
            return;
        }
        if (s->state == SMTPD_S_DATA) {
            int end = smtpd_data_line(s, line, n);
            buf_consume(in, used);
            if (end)
                smtpd_data_end(s);
            continue;
        }
        if (s->flags & SMTPD_F_SKIPLINE) {
            s->flags &= ~SMTPD_F_SKIPLINE; /* resynchronised at the end of the long line */
            buf_consume(in, used);
            continue;
        }
        if (n > SMTPD_LINE_MAX) {
            smtpd_reply(s, "500 5.5.2 Error: line too long");
            buf_consume(in, used);
            if (smtpd_error(s) != 0)
                return;
            continue;
        }
        smtpd_dispatch(s, line, n);
        buf_consume(in, used);
    }
}

static void smtpd_on_io(struct tlsio *io, enum tlsio_event ev, void *arg)
{
    struct smtpd_session *s = arg;

    (void)io;
    switch (ev) {
    case TLSIO_DATAIN:
        if (s->state == SMTPD_S_CMD || s->state == SMTPD_S_DATA)
            uv_timer_again(&s->timer);
        smtpd_drain_input(s);
        break;
    case TLSIO_DRAINED:
        if (s->close_after_drain)
            smtpd_session_close(s, s->state == SMTPD_S_QUIT ? "quit" : "rejected");
        break;
    case TLSIO_EOF:
        smtpd_session_close(s, s->state == SMTPD_S_DATA ? "lost connection during DATA"
                               : s->state == SMTPD_S_COMMIT_WAIT
                                   ? "lost connection while committing"
                                   : "lost connection");
        break;
    case TLSIO_ERROR:
        smtpd_session_close(s, tlsio_errstr(io));
        break;
    case TLSIO_CONNECTED:
    case TLSIO_TLSREADY:
        break;
    }
}

/* ---- listeners ---- */

static void smtpd_on_connection(uv_stream_t *server, int status)
{
    struct smtpd_listener *l = server->data;
    struct smtpd_server *srv = l->srv;
    struct smtpd_session *s;
    struct sockaddr_storage ss;

    if (status < 0) {
        log_warn("listener %s: accept: %s", l->cfg->name, uv_strerror(status));
        return;
    }
    s = xcalloc(1, sizeof(*s));
    s->id = ++srv->next_session_id;
    s->srv = srv;
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
    if (tlsio_peer(s->io, &ss) == 0)
        netaddr_sockaddr_str((struct sockaddr *)&ss, s->peer, sizeof(s->peer));
    else
        snprintf(s->peer, sizeof(s->peer), "unknown");
    uv_timer_start(&s->timer, smtpd_on_timeout, SMTPD_TIMEOUT_CMD_MS, SMTPD_TIMEOUT_CMD_MS);
    tlsio_read_start(s->io);
    if (!netaddr_list_match(&l->cfg->allow, (struct sockaddr *)&ss)) {
        log_warn("reject: connect from %s to listener %s: client address is not in its allow list",
                 s->peer, l->cfg->name);
        smtpd_reply(s, "554 5.7.1 %s: access denied to %s", srv->cfg->hostname, s->peer);
        s->close_after_drain = 1;
        smtpd_enter_state(s, SMTPD_S_QUIT);
        return;
    }
    log_info("connect from %s listener=%s session=%llu", s->peer, l->cfg->name,
             (unsigned long long)s->id);
    smtpd_reply(s, "220 %s ESMTP relayd", srv->cfg->hostname);
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

int smtpd_server_listen(struct smtpd_server *srv, char *err, size_t errlen)
{
    const struct cfg *cfg = srv->cfg;
    struct sockaddr_storage ss;
    int i, rc;

    srv->listeners = xcalloc((size_t)cfg->nlisteners, sizeof(*srv->listeners));
    srv->nlisteners = cfg->nlisteners;
    for (i = 0; i < cfg->nlisteners; i++) {
        struct smtpd_listener *l = &srv->listeners[i];
        const struct cfg_listener *lc = &cfg->listeners[i];

        l->srv = srv;
        l->cfg = lc;
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
        log_info("listener %s: listening on %s:%d", lc->name, lc->host, lc->port);
    }
    return 0;
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
            smtpd_reply(s, "421 4.3.2 %s Service shutting down", srv->cfg->hostname);
            smtpd_session_close(s, "shutdown");
        }
    }
    srv->open--;
    smtpd_server_maybe_done(srv);
}

void smtpd_server_free(struct smtpd_server *srv)
{
    if (srv == NULL)
        return;
    free(srv->listeners);
    free(srv);
}
