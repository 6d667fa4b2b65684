/*
 * smtpc - the outbound SMTP client; see smtpc.h.
 *
 * One struct smtpc per delivery attempt, driven by tlsio events and one timer:
 *
 *   RESOLVE -> CONNECT (each address in turn) -> [TLS_IMPLICIT] -> GREETING -> EHLO
 *     -> [STARTTLS -> TLS_HANDSHAKE -> EHLO] -> [AUTH ...] -> MAIL -> RCPT ... -> DATA
 *     -> BODY (written in chunks, each after TLSIO_DRAINED) -> DOT -> QUIT -> CLOSING
 *
 * Commands are not pipelined: every command waits for its reply, re-arming the timer with
 * command_timeout (RFC 5321 4.5.3.2 suggests minutes; the operator chooses).
 *
 * Failure modes: anything that ends the attempt goes through finish(), which records the
 * result once (the first reason wins, so a dropped connection during QUIT never turns a
 * delivered message into a deferred one), sends QUIT when the dialogue is still in step,
 * and closes.  Never a cleartext fallback after STARTTLS was required, never AUTH before
 * TLS unless tls = none and allow_plaintext_auth.  TLS verification and AUTH refusals set
 * config_fault: retrying will not help until the operator fixes something.
 *
 * Ownership and the one call of done: the client frees itself once the tlsio, the timer
 * and any pending getaddrinfo have all reported back.  done runs right before that free,
 * or synchronously inside smtpc_abort(); done_called keeps it to exactly once.
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

/* Message body bytes handed to tlsio per write; the next chunk waits for TLSIO_DRAINED so
 * a large message is never copied whole into write requests. */
#define SMTPC_BODY_CHUNK (128 * 1024)
/* A reply line longer than this is not SMTP (RFC 5321 4.5.3.1.5 says 512). */
#define SMTPC_LINE_MAX 8192
/* Reply text kept per reply (multi-line replies are joined). */
#define SMTPC_REPLY_MAX 2048
/* How long to wait for the reply to QUIT: the outcome is known already. */
#define SMTPC_QUIT_TIMEOUT 10

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
    SMTPC_S_MAIL,
    SMTPC_S_RCPT,
    SMTPC_S_DATA,
    SMTPC_S_BODY,
    SMTPC_S_DOT,
    SMTPC_S_QUIT,
    SMTPC_S_CLOSING,
};

/* EHLO keywords we use. */
#define SMTPC_E_STARTTLS 0x01
#define SMTPC_E_AUTH 0x02
#define SMTPC_E_SIZE 0x04
#define SMTPC_E_PIPELINING 0x08
#define SMTPC_E_8BITMIME 0x10

enum smtpc_rcpt_state {
    SMTPC_R_UNTRIED,
    SMTPC_R_ACCEPTED,
    SMTPC_R_DEFER,
    SMTPC_R_FAIL,
};

struct smtpc {
    uv_loop_t *loop;
    const struct cfg_upstream *up;
    struct tlsio_cred *cred;
    char *helo;
    const struct smtpc_msg *msg;
    smtpc_done_fn done;
    void *arg;
    char qid[17];
    enum smtpc_state state;
    const char *cmd; /* last command sent, for "timeout waiting for reply to X" */
    int connect_timeout, command_timeout;

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

    unsigned ext; /* SMTPC_E_* from the last EHLO */
    char auth_mechs[256];
    struct authsasl *sasl;
    const char *mech;

    struct buf *reply; /* reply being assembled */
    int reply_lines;
    int body_8bit;
    size_t body_off;
    int body_bol, body_cr; /* at beginning of line; previous byte was CR */

    size_t nrcpts;    /* msg->nrcpts: msg may be gone once done has run */
    size_t rcpt_next; /* next recipient for RCPT */
    size_t naccepted;
    enum smtpc_rcpt_state *rstate;
    char **rreply;

    struct smtpc_result res;
    int have_result;
    int done_called;
};

static void smtpc_io_cb(struct tlsio *io, enum tlsio_event ev, void *arg);
static void smtpc_finish(struct smtpc *c, enum smtpc_status st, int quit, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void smtpc_try_connect(struct smtpc *c);
static void smtpc_send_mail(struct smtpc *c);

/* ---- Lifetime ---- */

static void smtpc_fill_results(struct smtpc *c)
{
    size_t i;

    for (i = 0; i < c->msg->nrcpts; i++) {
        switch (c->rstate[i]) {
        case SMTPC_R_UNTRIED:
        case SMTPC_R_ACCEPTED:
            /* Recipients the server took (or never saw) share the fate of the message. */
            c->res.rcpt_status[i] = c->res.status;
            free(c->rreply[i]);
            c->rreply[i] = xstrdup(c->res.reply);
            break;
        case SMTPC_R_DEFER:
            c->res.rcpt_status[i] = SMTPC_DEFER;
            break;
        case SMTPC_R_FAIL:
            c->res.rcpt_status[i] = SMTPC_FAIL;
            break;
        }
    }
    c->res.rcpt_reply = c->rreply;
}

static void smtpc_call_done(struct smtpc *c)
{
    if (c->done_called)
        return;
    c->done_called = 1;
    if (!c->have_result) {
        c->res.status = SMTPC_DEFER;
        snprintf(c->res.reply, sizeof(c->res.reply), "delivery ended without a result");
    }
    smtpc_fill_results(c);
    log_debug(1, "%s: smtpc done: status=%d reply=%s", c->qid, (int)c->res.status, c->res.reply);
    c->done(c->arg, &c->res);
}

static void smtpc_maybe_free(struct smtpc *c)
{
    size_t i;

    if (c->state != SMTPC_S_CLOSING || c->nios > 0 || !c->timer_closed || c->gai_pending)
        return;
    smtpc_call_done(c);
    if (c->ai != NULL)
        uv_freeaddrinfo(c->ai);
    authsasl_free(c->sasl);
    buf_free(c->reply);
    for (i = 0; i < c->nrcpts; i++)
        free(c->rreply[i]);
    free(c->rreply);
    free(c->rstate);
    free(c->res.rcpt_status);
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
    c->state = SMTPC_S_CLOSING;
    smtpc_drop_io(c);
    uv_close((uv_handle_t *)&c->timer, smtpc_timer_closed);
}

/* ---- Sending ---- */

static void smtpc_arm(struct smtpc *c, int seconds);

static void smtpc_lost(struct smtpc *c, const char *why)
{
    if (c->cmd == NULL)
        smtpc_finish(c, SMTPC_DEFER, 0, "connection lost while waiting for greeting%s%s",
                     why != NULL ? ": " : "", why != NULL ? why : "");
    else
        smtpc_finish(c, SMTPC_DEFER, 0, "connection lost after %s%s%s", c->cmd,
                     why != NULL ? ": " : "", why != NULL ? why : "");
}

/* Sends one command line; logged is what the debug log shows instead (AUTH payloads). */
static void smtpc_send(struct smtpc *c, enum smtpc_state st, const char *cmd, const char *logged,
                       const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void smtpc_send(struct smtpc *c, enum smtpc_state st, const char *cmd, const char *logged,
                       const char *fmt, ...)
{
    struct buf *b = buf_new(0);
    va_list ap;
    int rc;

    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
    log_debug(1, "%s: > %s", c->qid, logged != NULL ? logged : b->data);
    buf_puts(b, "\r\n");
    c->state = st;
    c->cmd = cmd;
    rc = tlsio_write(c->io, b->data, b->len);
    buf_free(b);
    if (rc < 0) {
        smtpc_lost(c, tlsio_errstr(c->io));
        return;
    }
    smtpc_arm(c, c->command_timeout);
}

/*
 * Ends the attempt.  The first result recorded wins.  quit: the dialogue is in step (we
 * just read a complete reply), so say QUIT politely before closing.
 */
static void smtpc_finish(struct smtpc *c, enum smtpc_status st, int quit, const char *fmt, ...)
{
    va_list ap;

    if (!c->have_result) {
        c->have_result = 1;
        c->res.status = st;
        va_start(ap, fmt);
        vsnprintf(c->res.reply, sizeof(c->res.reply), fmt, ap);
        va_end(ap);
    }
    if (c->state == SMTPC_S_CLOSING || c->state == SMTPC_S_QUIT)
        quit = 0;
    if (quit && c->io != NULL) {
        smtpc_send(c, SMTPC_S_QUIT, "QUIT", NULL, "QUIT");
        if (c->state == SMTPC_S_QUIT) {
            smtpc_arm(c, c->command_timeout < SMTPC_QUIT_TIMEOUT ? c->command_timeout
                                                                 : SMTPC_QUIT_TIMEOUT);
            return;
        }
    }
    smtpc_close(c);
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
        smtpc_finish(c, SMTPC_DEFER, 0, "TLS: timeout during handshake with %s", c->peer);
        break;
    case SMTPC_S_GREETING:
        smtpc_finish(c, SMTPC_DEFER, 0, "timeout waiting for greeting from %s", c->peer);
        break;
    case SMTPC_S_BODY:
        smtpc_finish(c, SMTPC_DEFER, 0, "timeout sending message body to %s", c->peer);
        break;
    case SMTPC_S_QUIT:
        smtpc_close(c);
        break;
    case SMTPC_S_DOT:
        smtpc_finish(c, SMTPC_DEFER, 0, "timeout waiting for reply to end of data");
        break;
    default:
        smtpc_finish(c, SMTPC_DEFER, 0, "timeout waiting for reply to %s",
                     c->cmd != NULL ? c->cmd : "command");
        break;
    }
}

static void smtpc_arm(struct smtpc *c, int seconds)
{
    if (c->state == SMTPC_S_CLOSING)
        return;
    uv_timer_start(&c->timer, smtpc_timeout, (uint64_t)(seconds > 0 ? seconds : 1) * 1000, 0);
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
        c->state = SMTPC_S_CONNECT;
        log_debug(1, "%s: connecting to %s (%s)", c->qid, c->peer, c->up->host);
        if ((rc = tlsio_connect(c->io, ai->ai_addr)) < 0) {
            snprintf(c->lasterr, sizeof(c->lasterr), "connect to %s: %s", c->peer, uv_strerror(rc));
            smtpc_drop_io(c);
            continue;
        }
        smtpc_arm(c, c->connect_timeout);
        return;
    }
    smtpc_finish(c, SMTPC_DEFER, 0, "%s",
                 c->lasterr[0] != '\0' ? c->lasterr : "no usable address for upstream");
}

static void smtpc_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *ai)
{
    struct smtpc *c = req->data;

    c->gai_pending = 0;
    c->ai = ai;
    if (c->state == SMTPC_S_CLOSING) {
        smtpc_maybe_free(c);
        return;
    }
    if (status < 0) {
        smtpc_finish(c, SMTPC_DEFER, 0, "host lookup for %s failed: %s", c->up->host,
                     uv_strerror(status));
        return;
    }
    c->ai_next = ai;
    smtpc_try_connect(c);
}

/* ---- Replies ---- */

static void smtpc_ehlo_line(struct smtpc *c, const char *text)
{
    const char *args;
    size_t kwlen = strcspn(text, " =");

    args = text + kwlen;
    while (*args == ' ' || *args == '=')
        args++;
    if (kwlen == 8 && strncasecmp(text, "STARTTLS", 8) == 0) {
        c->ext |= SMTPC_E_STARTTLS;
    } else if (kwlen == 4 && strncasecmp(text, "AUTH", 4) == 0) {
        /* "AUTH=" is the pre-RFC 4954 spelling some servers still send as well. */
        size_t used = strlen(c->auth_mechs);
        c->ext |= SMTPC_E_AUTH;
        snprintf(c->auth_mechs + used, sizeof(c->auth_mechs) - used, "%s%s", used > 0 ? " " : "",
                 args);
    } else if (kwlen == 4 && strncasecmp(text, "SIZE", 4) == 0) {
        c->ext |= SMTPC_E_SIZE;
    } else if (kwlen == 10 && strncasecmp(text, "PIPELINING", 10) == 0) {
        c->ext |= SMTPC_E_PIPELINING;
    } else if (kwlen == 8 && strncasecmp(text, "8BITMIME", 8) == 0) {
        c->ext |= SMTPC_E_8BITMIME;
    }
}

static void smtpc_send_ehlo(struct smtpc *c)
{
    c->ext = 0;
    c->auth_mechs[0] = '\0';
    smtpc_send(c, SMTPC_S_EHLO, "EHLO", NULL, "EHLO %s", c->helo);
}

static void smtpc_start_auth(struct smtpc *c)
{
    const struct cfg_upstream *up = c->up;
    int allow_plain = up->tls == CFG_TLS_NONE && up->allow_plaintext_auth;
    char err[256], logged[80];
    char *resp = NULL;

    /* RFC 4954 section 4: credentials only under TLS, unless the operator insists. */
    if (!c->tls_up && !allow_plain) {
        smtpc_finish(c, SMTPC_DEFER, 1,
                     "refusing to send AUTH without TLS (tls = none needs "
                     "allow_plaintext_auth)");
        c->res.config_fault = 1;
        return;
    }
    if (!(c->ext & SMTPC_E_AUTH)) {
        smtpc_finish(c, SMTPC_DEFER, 1, "upstream does not offer AUTH");
        c->res.config_fault = 1;
        return;
    }
    if (authsasl_client_init(err, sizeof(err)) != 0 ||
        authsasl_client_new(up->host, up->username, up->password != NULL ? up->password : "",
                            &c->sasl, err, sizeof(err)) != 0 ||
        authsasl_client_start(c->sasl, c->auth_mechs, up->mechanisms, c->tls_up, allow_plain,
                              &c->mech, &resp, err, sizeof(err)) < 0) {
        smtpc_finish(c, SMTPC_DEFER, 1, "AUTH: %s", err);
        c->res.config_fault = 1;
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
        smtpc_send_mail(c);
        return;
    }
    if (code == 334) {
        const char *chal = strlen(text) > 4 ? text + 4 : "";
        if (authsasl_client_step(c->sasl, chal, &resp, err, sizeof(err)) < 0) {
            /* Mid-exchange the dialogue is out of step for QUIT: just drop it. */
            smtpc_finish(c, SMTPC_DEFER, 0, "AUTH %s: %s", c->mech, err);
            c->res.config_fault = 1;
            return;
        }
        smtpc_send(c, SMTPC_S_AUTH, "AUTH", "***", "%s", resp);
        explicit_bzero(resp, strlen(resp));
        free(resp);
        return;
    }
    smtpc_finish(c, SMTPC_DEFER, 1, "AUTH %s: %s", c->mech, text);
    /* A 4xx is the server's trouble (RFC 4954 454: temporary failure), not ours. */
    if (code / 100 == 5)
        c->res.config_fault = 1;
}

static void smtpc_after_ehlo(struct smtpc *c)
{
    if (c->up->tls == CFG_TLS_STARTTLS && !c->tls_up) {
        if (!(c->ext & SMTPC_E_STARTTLS)) {
            smtpc_finish(c, SMTPC_DEFER, 1,
                         "upstream does not offer STARTTLS; refusing to send in cleartext");
            c->res.config_fault = 1;
            return;
        }
        smtpc_send(c, SMTPC_S_STARTTLS, "STARTTLS", NULL, "STARTTLS");
        return;
    }
    if (c->up->username != NULL) {
        smtpc_start_auth(c);
        return;
    }
    smtpc_send_mail(c);
}

static void smtpc_send_mail(struct smtpc *c)
{
    char size[32] = "";
    const char *body = "";

    if (c->body_8bit && (c->ext & SMTPC_E_8BITMIME))
        body = " BODY=8BITMIME";
    /* RFC 1870: announce the size so the server can refuse before we send it all. */
    if (c->ext & SMTPC_E_SIZE)
        snprintf(size, sizeof(size), " SIZE=%zu", c->msg->len);
    smtpc_send(c, SMTPC_S_MAIL, "MAIL", NULL, "MAIL FROM:<%s>%s%s", c->msg->sender, body, size);
}

static void smtpc_send_rcpt(struct smtpc *c)
{
    const char *r = c->msg->rcpts[c->rcpt_next++];

    smtpc_send(c, SMTPC_S_RCPT, "RCPT", NULL, "RCPT TO:<%s>", r);
}

static void smtpc_rcpt_reply(struct smtpc *c, int code, const char *text)
{
    size_t i = c->rcpt_next - 1, nfail = 0;

    free(c->rreply[i]);
    c->rreply[i] = xstrdup(text);
    if (code / 100 == 2) {
        c->rstate[i] = SMTPC_R_ACCEPTED;
        c->naccepted++;
    } else if (code / 100 == 5) {
        c->rstate[i] = SMTPC_R_FAIL;
    } else {
        c->rstate[i] = SMTPC_R_DEFER;
    }
    if (c->rcpt_next < c->msg->nrcpts) {
        smtpc_send_rcpt(c);
        return;
    }
    if (c->naccepted > 0) {
        smtpc_send(c, SMTPC_S_DATA, "DATA", NULL, "DATA");
        return;
    }
    for (i = 0; i < c->msg->nrcpts; i++)
        nfail += c->rstate[i] == SMTPC_R_FAIL;
    /* Nobody accepted: the message fails only if every recipient failed for good. */
    smtpc_finish(c, nfail == c->msg->nrcpts ? SMTPC_FAIL : SMTPC_DEFER, 1, "%s", text);
}

/* Writes the next chunk of the dot-stuffed body (RFC 5321 4.5.2), then ".". */
static void smtpc_send_body(struct smtpc *c)
{
    const char *p = c->msg->body;
    size_t len = c->msg->len, i;
    struct buf *b = buf_new(0);
    int rc, last;

    buf_reserve(b, SMTPC_BODY_CHUNK + SMTPC_BODY_CHUNK / 2);
    for (i = c->body_off; i < len && b->len < SMTPC_BODY_CHUNK; i++) {
        char ch = p[i];

        if (c->body_bol && ch == '.')
            buf_append(b, ".", 1);
        /* RFC 5321 2.3.8: bare LF is not a line ending on the wire. */
        if (ch == '\n' && !c->body_cr)
            buf_append(b, "\r", 1);
        buf_append(b, &ch, 1);
        c->body_bol = ch == '\n';
        c->body_cr = ch == '\r';
    }
    c->body_off = i;
    last = c->body_off == len;
    if (last) {
        if (!c->body_bol)
            buf_puts(b, "\r\n");
        buf_puts(b, ".\r\n");
        log_debug(1, "%s: > (%zu bytes of message) .", c->qid, len);
        c->state = SMTPC_S_DOT;
        c->cmd = "end of data";
    }
    rc = tlsio_write(c->io, b->data, b->len);
    buf_free(b);
    if (rc < 0) {
        smtpc_finish(c, SMTPC_DEFER, 0, "connection lost while sending message body: %s",
                     tlsio_errstr(c->io));
        return;
    }
    smtpc_arm(c, c->command_timeout);
}

static void smtpc_starttls(struct smtpc *c, int implicit)
{
    const char *name = c->up->tls_name != NULL ? c->up->tls_name : c->up->host;

    c->state = implicit ? SMTPC_S_TLS_IMPLICIT : SMTPC_S_TLS_HANDSHAKE;
    if (c->cred == NULL) {
        smtpc_finish(c, SMTPC_DEFER, 0, "TLS: no client credentials for upstream %s",
                     c->up->name != NULL ? c->up->name : c->up->host);
        c->res.config_fault = 1;
        return;
    }
    if (tlsio_starttls(c->io, c->cred, 0, name) < 0) {
        smtpc_finish(c, SMTPC_DEFER, 0, "TLS: %s", tlsio_errstr(c->io));
        return;
    }
    smtpc_arm(c, c->command_timeout);
}

/* One complete (possibly multi-line) reply in the current state. */
static void smtpc_reply(struct smtpc *c, int code, const char *text)
{
    int cls = code / 100;

    uv_timer_stop(&c->timer);
    switch (c->state) {
    case SMTPC_S_GREETING:
        if (cls == 2)
            smtpc_send_ehlo(c);
        else
            smtpc_finish(c, SMTPC_DEFER, 1, "%s", text);
        break;
    case SMTPC_S_EHLO:
        if (cls == 2)
            smtpc_after_ehlo(c);
        else if (cls == 5 && c->up->tls == CFG_TLS_NONE && !c->tls_up)
            smtpc_send(c, SMTPC_S_HELO, "HELO", NULL, "HELO %s", c->helo);
        else
            smtpc_finish(c, SMTPC_DEFER, 1, "%s", text);
        break;
    case SMTPC_S_HELO:
        if (cls == 2)
            smtpc_after_ehlo(c);
        else
            smtpc_finish(c, SMTPC_DEFER, 1, "%s", text);
        break;
    case SMTPC_S_STARTTLS:
        if (code == 220)
            smtpc_starttls(c, 0);
        else
            smtpc_finish(c, SMTPC_DEFER, 1, "STARTTLS: %s", text);
        break;
    case SMTPC_S_AUTH:
        smtpc_auth_reply(c, code, text);
        break;
    case SMTPC_S_MAIL:
        if (cls == 2)
            smtpc_send_rcpt(c);
        else
            smtpc_finish(c, cls == 5 ? SMTPC_FAIL : SMTPC_DEFER, 1, "%s", text);
        break;
    case SMTPC_S_RCPT:
        smtpc_rcpt_reply(c, code, text);
        break;
    case SMTPC_S_DATA:
        if (code == 354) {
            c->state = SMTPC_S_BODY;
            c->cmd = "DATA";
            c->body_off = 0;
            c->body_bol = 1;
            c->body_cr = 0;
            smtpc_send_body(c);
        } else {
            smtpc_finish(c, cls == 5 ? SMTPC_FAIL : SMTPC_DEFER, 1, "%s", text);
        }
        break;
    case SMTPC_S_BODY:
        /* The server spoke while we were still sending: it gave up on the message. */
        smtpc_finish(c, cls == 5 ? SMTPC_FAIL : SMTPC_DEFER, 0, "%s", text);
        break;
    case SMTPC_S_DOT:
        if (cls == 2)
            smtpc_finish(c, SMTPC_SENT, 1, "%s", text);
        else
            smtpc_finish(c, cls == 5 ? SMTPC_FAIL : SMTPC_DEFER, 1, "%s", text);
        break;
    case SMTPC_S_QUIT:
        smtpc_close(c);
        break;
    default:
        smtpc_finish(c, SMTPC_DEFER, 0, "unexpected reply from server: %s", text);
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
                smtpc_finish(c, SMTPC_DEFER, 0, "reply line too long from %s", c->peer);
            return;
        }
        if (n > SMTPC_LINE_MAX)
            n = SMTPC_LINE_MAX;
        memcpy(text, line, n);
        text[n] = '\0';
        buf_consume(in, used);
        log_debug(1, "%s: < %s", c->qid, text);
        /* RFC 5321 4.2: three digits, then space (last line) or hyphen (more follow). */
        if (n < 3 || text[0] < '2' || text[0] > '5' || text[1] < '0' || text[1] > '9' ||
            text[2] < '0' || text[2] > '9' || (n > 3 && text[3] != ' ' && text[3] != '-')) {
            smtpc_finish(c, SMTPC_DEFER, 0, "malformed reply from %s: %.200s", c->peer, text);
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
    uv_timer_stop(&c->timer);
    c->tls_up = 1;
    tlsio_describe(c->io, c->res.tls, sizeof(c->res.tls));
    log_debug(1, "%s: TLS with %s: %s", c->qid, c->peer, c->res.tls);
    if (c->state == SMTPC_S_TLS_IMPLICIT) {
        c->state = SMTPC_S_GREETING;
        smtpc_arm(c, c->command_timeout);
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
        uv_timer_stop(&c->timer);
        log_debug(1, "%s: connected to %s", c->qid, c->peer);
        if (tlsio_read_start(io) < 0) {
            smtpc_finish(c, SMTPC_DEFER, 0, "connect to %s: %s", c->peer, tlsio_errstr(io));
            return;
        }
        if (c->up->tls == CFG_TLS_IMPLICIT) {
            smtpc_starttls(c, 1);
        } else {
            c->state = SMTPC_S_GREETING;
            smtpc_arm(c, c->command_timeout);
        }
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
            smtpc_finish(c, SMTPC_DEFER, 0, "TLS: %s",
                         ev == TLSIO_EOF ? "connection closed by peer during handshake"
                                         : tlsio_errstr(io));
            if (ev == TLSIO_ERROR && tlsio_verify_failed(io))
                c->res.config_fault = 1;
            break;
        case SMTPC_S_QUIT:
            smtpc_close(c);
            break;
        case SMTPC_S_BODY:
            smtpc_finish(c, SMTPC_DEFER, 0, "connection lost while sending message body%s%s",
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

int smtpc_deliver(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                  const char *helo, const struct smtpc_msg *msg, smtpc_done_fn done, void *arg,
                  struct smtpc **out)
{
    struct smtpc *c = xcalloc(1, sizeof(*c));
    struct addrinfo hints;
    char port[16];
    size_t i;
    int rc;

    c->loop = loop;
    c->up = up;
    c->cred = cred;
    c->helo = xstrdup(helo != NULL && *helo != '\0' ? helo : "localhost");
    c->msg = msg;
    c->nrcpts = msg->nrcpts;
    c->done = done;
    c->arg = arg;
    c->connect_timeout = up->connect_timeout;
    c->command_timeout = up->command_timeout;
    snprintf(c->qid, sizeof(c->qid), "%012" PRIX64, msg->id);
    c->reply = buf_new(0);
    c->rstate = xcalloc(msg->nrcpts + 1, sizeof(*c->rstate));
    c->rreply = xcalloc(msg->nrcpts + 1, sizeof(*c->rreply));
    c->res.rcpt_status = xcalloc(msg->nrcpts + 1, sizeof(*c->res.rcpt_status));
    for (i = 0; i < msg->len && !c->body_8bit; i++)
        c->body_8bit = (unsigned char)msg->body[i] >= 0x80;

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    snprintf(port, sizeof(port), "%d", up->port);
    c->gai.data = c;
    rc = uv_getaddrinfo(loop, &c->gai, smtpc_resolved, up->host, port, &hints);
    if (rc < 0) {
        buf_free(c->reply);
        free(c->rstate);
        free(c->rreply);
        free(c->res.rcpt_status);
        free(c->helo);
        free(c);
        return rc;
    }
    c->gai_pending = 1;
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->state = SMTPC_S_RESOLVE;
    if (msg->nrcpts == 0)
        smtpc_finish(c, SMTPC_FAIL, 0, "no recipients");
    if (out != NULL)
        *out = c;
    return 0;
}

void smtpc_abort(struct smtpc *c)
{
    if (c == NULL || c->done_called)
        return;
    if (!c->have_result) {
        c->have_result = 1;
        c->res.status = SMTPC_DEFER;
        snprintf(c->res.reply, sizeof(c->res.reply), "delivery aborted (shutting down)");
    }
    if (c->gai_pending)
        uv_cancel((uv_req_t *)&c->gai);
    smtpc_close(c);
    smtpc_call_done(c);
}
