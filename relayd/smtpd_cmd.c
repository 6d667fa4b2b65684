/*
 * smtpd_cmd - the inbound server's commands: HELO/EHLO, MAIL (with RFC 1870/3461/4954
 * parameters), RCPT, DATA (the 354), RSET, NOOP, VRFY, HELP, QUIT, STARTTLS and AUTH
 * (RFC 4954, through authsasl), and the dispatcher with its command table.
 *
 * Each command runs on a complete line inside smtpd__drain_input() (replies corked) and
 * either replies and stays in CMD or moves the session on (DATA, AUTH, TLS_HANDSHAKE,
 * QUIT).  Refusals go through smtpd__refuse_log() so that each names the setting that
 * would change it.  Never logs AUTH data: lines after a refused or aborted AUTH that are
 * not commands are masked (SMTPD_F_MASK).  Error tier: replies; nothing here fails.
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
#include "relayd/smtpd_int.h"

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
    o.hostname = s->cfg->hostname;
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
    const struct cfg *cfg = s->cfg;
    const struct cfg_listener *lc = s->lcfg;
    struct authsasl_server *sasl;

    while (*arg == ' ')
        arg++;
    if (*arg == '\0') {
        smtpd__reply(s, "501 5.5.4 Syntax: %s hostname", ehlo ? "EHLO" : "HELO");
        smtpd__error(s);
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
    smtpd__tx_reset(s); /* RFC 5321 4.1.4: HELO/EHLO resets the transaction */
    s->flags |= SMTPD_F_HELO;
    s->flags &= ~SMTPD_F_NEEDHELO;
    if (!ehlo) {
        s->flags &= ~SMTPD_F_EHLO;
        smtpd__reply(s, "250 %s", cfg->hostname);
        return;
    }
    s->flags |= SMTPD_F_EHLO;
    /* Commands run corked (smtpd__drain_input): the whole reply goes out in one write. */
    smtpd__reply(s, "250-%s", cfg->hostname);
    smtpd__reply(s, "250-PIPELINING");
    smtpd__reply(s, "250-SIZE %ld", cfg->max_message_size);
    smtpd__reply(s, "250-8BITMIME");
    smtpd__reply(s, "250-DSN");
    smtpd__reply(s, "250-SMTPUTF8");
    if (lc->tls == CFG_TLS_STARTTLS && !tlsio_is_tls(s->io))
        smtpd__reply(s, "250-STARTTLS");
    /* RFC 4954 3: not after a successful AUTH; and only mechanisms allowed right now. */
    if (!(s->flags & SMTPD_F_AUTHED) && (sasl = smtpd_sasl(s)) != NULL &&
        authsasl_server_mechs(sasl)[0] != '\0')
        smtpd__reply(s, "250-AUTH %s", authsasl_server_mechs(sasl));
    smtpd__reply(s, "250 ENHANCEDSTATUSCODES");
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

        if (size > (unsigned long long)s->cfg->max_message_size) {
            smtpd__refuse_log(s, SMTPD_R_TOO_BIG, "MAIL SIZE=%llu over max_message_size %ld", size,
                             s->cfg->max_message_size);
            smtpd__reply(s, "552 5.3.4 Message size exceeds fixed limit of %ld bytes",
                        s->cfg->max_message_size);
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
        char *dec = xtext_decode(v, vlen); /* NULL for "+00" */

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
        smtpd__reply(s, "501 5.5.4 Bad value in parameter %.*s", (int)(n > 80 ? 80 : n), p);
        return -1;
    }
    smtpd__reply(s, "555 5.5.4 Unsupported option: %.*s", (int)(n > 80 ? 80 : n), p);
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
        if ((dec = xtext_decode(semi + 1, vlen - (size_t)(semi + 1 - v))) == NULL)
            goto bad;
        free(*orcpt);
        *orcpt = xasprintf("%.*s;%s", (int)(semi - v), v, dec);
        free(dec);
        *dsn = 1;
        return 0;
    }
    smtpd__reply(s, "555 5.5.4 Unsupported option: %.*s", (int)(n > 80 ? 80 : n), p);
    return -1;
bad:
    smtpd__reply(s, "501 5.5.4 Bad value in parameter %.*s", (int)(n > 80 ? 80 : n), p);
    return -1;
}

static void smtpd_cmd_mail(struct smtpd_session *s, const char *arg)
{
    const struct cfg_listener *lc = s->lcfg;
    const char *path = smtpd_skip_keyword(arg, "FROM"), *params, *p;
    struct smtpd_tx *tx;
    char err[128], *addr;

    if (s->tx != NULL) {
        smtpd__reply(s, "503 5.5.1 Error: nested MAIL command");
        smtpd__error(s);
        return;
    }
    if (lc->auth == CFG_AUTH_REQUIRED && !(s->flags & SMTPD_F_AUTHED)) {
        smtpd__refuse_log(s, SMTPD_R_AUTH_REQUIRED, "MAIL before a successful AUTH (auth = "
                         "required)");
        smtpd__reply(s, "530 5.7.0 Authentication required");
        smtpd__error(s);
        return;
    }
    if (path == NULL) {
        smtpd__reply(s, "501 5.5.4 Syntax: MAIL FROM:<address>");
        smtpd__error(s);
        return;
    }
    if (addr_path_parse(path, &addr, &params, err, sizeof(err)) != 0) {
        smtpd__reply(s, "501 5.1.7 Bad sender address syntax: %s", err);
        smtpd__error(s);
        return;
    }
    tx = xcalloc(1, sizeof(*tx));
    tx->sender = addr;
    for (p = params; p != NULL && *p != '\0';) {
        size_t n = strcspn(p, " ");

        if (smtpd_mail_param(s, tx, p, n) != 0) {
            smtpd__tx_free(tx);
            smtpd__error(s);
            return;
        }
        p += n;
        p += strspn(p, " ");
    }
    /* The null sender has no domain to judge: bounces from devices stay possible. */
    if (lc->sender_domains != NULL && addr[0] != '\0' &&
        !route_domain_listed(lc->sender_domains, addr)) {
        smtpd__refuse_log(s, SMTPD_R_SENDER_DOMAIN, "MAIL FROM:<%s>: domain not in "
                         "sender_domains", addr);
        smtpd__reply(s, "553 5.7.1 <%s>: Sender address rejected: domain not allowed here", addr);
        smtpd__tx_free(tx);
        smtpd__error(s);
        return;
    }
    s->tx = tx;
    smtpd__reply(s, "250 2.1.0 Ok");
}

static void smtpd_cmd_rcpt(struct smtpd_session *s, const char *arg)
{
    const struct cfg_listener *lc = s->lcfg;
    const char *path = smtpd_skip_keyword(arg, "TO"), *params, *p;
    struct smtpd_tx *tx = s->tx;
    char err[128], *addr, *orcpt = NULL;
    unsigned notify = 0;
    int dsn = 0;

    if (path == NULL) {
        smtpd__reply(s, "501 5.5.4 Syntax: RCPT TO:<address>");
        smtpd__error(s);
        return;
    }
    if (addr_path_parse(path, &addr, &params, err, sizeof(err)) != 0) {
        smtpd__reply(s, "501 5.1.3 Bad recipient address syntax: %s", err);
        smtpd__error(s);
        return;
    }
    if (addr[0] == '\0') {
        free(addr);
        smtpd__reply(s, "501 5.1.3 Bad recipient address syntax: empty address");
        smtpd__error(s);
        return;
    }
    for (p = params; p != NULL && *p != '\0';) {
        size_t n = strcspn(p, " ");

        if (smtpd_rcpt_param(s, p, n, &dsn, &notify, &orcpt) != 0) {
            free(addr);
            free(orcpt);
            smtpd__error(s);
            return;
        }
        p += n;
        p += strspn(p, " ");
    }
    if (lc->recipient_domains != NULL && !route_domain_listed(lc->recipient_domains, addr)) {
        smtpd__refuse_log(s, SMTPD_R_RCPT_DOMAIN, "RCPT TO:<%s>: relay access denied (domain "
                         "not in recipient_domains)", addr);
        smtpd__reply(s, "554 5.7.1 <%s>: Relay access denied", addr);
        free(addr);
        free(orcpt);
        smtpd__error(s);
        return;
    }
    if (tx->nrcpts >= (size_t)s->cfg->max_recipients) {
        smtpd__refuse_log(s, SMTPD_R_TOO_MANY_RCPTS, "RCPT TO:<%s>: more than max_recipients "
                         "(%d)", addr, s->cfg->max_recipients);
        free(addr);
        free(orcpt);
        smtpd__reply(s, "452 4.5.3 Error: too many recipients");
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
    smtpd__mem_sync(s);
    smtpd__reply(s, "250 2.1.5 Ok");
}

static void smtpd_cmd_data(struct smtpd_session *s, const char *arg)
{
    struct smtpd_server *srv = s->srv;

    (void)arg;
    if (s->tx->nrcpts == 0) {
        smtpd__reply(s, "554 5.5.1 Error: no valid recipients");
        smtpd__error(s);
        return;
    }
    if (srv->mem_used >= (size_t)srv->cfg->max_memory) {
        smtpd__refuse_log(s, SMTPD_R_MEMORY, "DATA deferred: sessions hold %zu bytes "
                         "(max_memory %ld)", srv->mem_used, srv->cfg->max_memory);
        smtpd__reply(s, "451 4.3.1 Insufficient system resources, try again later");
        return;
    }
    /* The limit is enforced while streaming; the excess is never held in memory. */
    s->tx->data = buf_new((size_t)s->cfg->max_message_size);
    s->tx->prev_crlf = s->cmd_crlf;
    smtpd__mem_sync(s);
    smtpd__reply(s, "354 End data with <CR><LF>.<CR><LF>");
    smtpd__enter_state(s, SMTPD_S_DATA);
}

static void smtpd_cmd_rset(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd__tx_reset(s);
    smtpd__reply(s, "250 2.0.0 Ok");
}

static void smtpd_cmd_noop(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd__reply(s, "250 2.0.0 Ok");
}

static void smtpd_cmd_vrfy(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd__reply(s, "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery");
}

static void smtpd_cmd_help(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd__reply(s, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP%s%s",
                s->lcfg->tls == CFG_TLS_STARTTLS ? " STARTTLS" : "",
                s->lcfg->auth != CFG_AUTH_OFF ? " AUTH" : "");
}

static void smtpd_cmd_quit(struct smtpd_session *s, const char *arg)
{
    (void)arg;
    smtpd__reply(s, "221 2.0.0 Bye");
    smtpd__reject_close(s, NULL);
}

static void smtpd_cmd_starttls(struct smtpd_session *s, const char *arg)
{
    while (*arg == ' ')
        arg++;
    if (s->lcfg->tls != CFG_TLS_STARTTLS || s->lcred == NULL) {
        smtpd__reply(s, "502 5.5.1 Error: command not implemented");
        smtpd__error(s);
        return;
    }
    if (tlsio_is_tls(s->io)) {
        smtpd__reply(s, "503 5.5.1 Error: TLS already active");
        smtpd__error(s);
        return;
    }
    if (*arg != '\0') {
        smtpd__reply(s, "501 5.5.4 Syntax: STARTTLS");
        smtpd__error(s);
        return;
    }
    smtpd__reply(s, "220 2.0.0 Ready to start TLS");
    smtpd__flush(s); /* in cleartext, before the handshake starts */
    s->cred = smtpd__cred_ref(s->lcred);
    /* tlsio drops any plaintext pipelined after STARTTLS (RFC 3207 4). */
    if (tlsio_starttls(s->io, s->cred->cred, 1, NULL) != 0) {
        smtpd__session_close(s, tlsio_errstr(s->io));
        return;
    }
    smtpd__enter_state(s, SMTPD_S_TLS_HANDSHAKE);
}

/* ---- AUTH (RFC 4954) ---- */

static void smtpd_auth_result(struct smtpd_session *s, int rc, char *challenge, const char *err)
{
    struct authsasl_server *sasl = s->sasl;
    const char *user = authsasl_server_username(sasl);

    switch (rc) {
    case AUTHSASL_MORE:
        smtpd__reply(s, "334 %s", challenge);
        if (s->state != SMTPD_S_AUTH)
            smtpd__enter_state(s, SMTPD_S_AUTH);
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
        smtpd__reply(s, "235 2.7.0 Authentication successful");
        smtpd__enter_state(s, SMTPD_S_CMD);
        break;
    case AUTHSASL_FORM:
        s->flags |= SMTPD_F_MASK;
        smtpd__reply(s, "501 5.5.2 Cannot decode AUTH data");
        smtpd__enter_state(s, SMTPD_S_CMD);
        smtpd__error(s);
        break;
    case AUTHSASL_NOMECH:
        s->flags |= SMTPD_F_MASK;
        smtpd__refuse_log(s, SMTPD_R_AUTH_MECH, "AUTH %s: not offered (auth_mechanisms = %s%s)",
                         authsasl_server_mech(sasl), s->lcfg->auth_mechanisms,
                         !tlsio_is_tls(s->io) ? ", without TLS" : "");
        smtpd__reply(s, "504 5.5.4 Unrecognized authentication type");
        smtpd__enter_state(s, SMTPD_S_CMD);
        smtpd__error(s);
        break;
    case AUTHSASL_TEMP:
        s->flags |= SMTPD_F_MASK;
        log_error("session=%llu: authentication unavailable: client=%s mechanism=%s: %s",
                  (unsigned long long)s->id, s->peer, authsasl_server_mech(sasl), err);
        smtpd__reply(s, "454 4.7.0 Temporary authentication failure");
        smtpd__enter_state(s, SMTPD_S_CMD);
        break;
    default:
        /* Never the password; the reply waits (AUTH_DELAY) to slow down guessing. */
        s->auth_failures++;
        s->flags |= SMTPD_F_MASK;
        smtpd__refuse_log(s, SMTPD_R_AUTH_FAILED, "AUTH %s for user %s failed: %s",
                         authsasl_server_mech(sasl), user[0] != '\0' ? user : "(unknown)", err);
        smtpd__enter_state(s, SMTPD_S_AUTH_DELAY);
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
        smtpd__refuse_log(s, SMTPD_R_AUTH_OFF, "AUTH on a listener with auth = off");
        smtpd__reply(s, "502 5.5.1 Error: authentication not enabled");
        smtpd__error(s);
        return;
    }
    if (s->flags & SMTPD_F_AUTHED) {
        smtpd__reply(s, "503 5.5.1 Error: already authenticated");
        smtpd__error(s);
        return;
    }
    if (s->tx != NULL) {
        smtpd__reply(s, "503 5.5.1 Error: MAIL transaction in progress");
        smtpd__error(s);
        return;
    }
    n = strcspn(arg, " \t");
    if (n == 0 || n >= sizeof(mech)) {
        smtpd__reply(s, "501 5.5.4 Syntax: AUTH mechanism");
        smtpd__error(s);
        return;
    }
    memcpy(mech, arg, n);
    mech[n] = '\0';
    initial = arg + n;
    while (*initial == ' ' || *initial == '\t')
        initial++;
    if ((sasl = smtpd_sasl(s)) == NULL) {
        smtpd__refuse_log(s, SMTPD_R_AUTH_UNAVAILABLE, "AUTH %s: the account store cannot be "
                         "used (see the error logged before)", mech);
        smtpd__reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    /* RFC 4954 6: 538 when the mechanism would be fine over TLS. */
    if (smtpd_is_plain_mech(mech) && !tlsio_is_tls(s->io) && !lc->auth_plaintext) {
        smtpd__refuse_log(s, SMTPD_R_AUTH_NEEDS_TLS, "AUTH %s without TLS (listener tls = %s, "
                         "auth_plaintext = no)", mech, cfg_tls_name(lc->tls));
        smtpd__reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        smtpd__error(s);
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
    smtpd__reply(s, "%s", reply);
    s->sasl = authsasl_server_free(s->sasl);
    smtpd__enter_state(s, SMTPD_S_CMD);
    smtpd__error(s);
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

/* What a command needs before it runs; checked once, in smtpd__dispatch (Postfix
 * smtpd_cmd_table). */
#define SMTPD_C_NEEDS_TX 0x1       /* a MAIL transaction: else 503 "need MAIL command" */
#define SMTPD_C_HELO_AFTER_TLS 0x2 /* not between STARTTLS and the new EHLO (RFC 3207 4.2) */

struct smtpd_cmd {
    const char *verb;
    void (*fn)(struct smtpd_session *s, const char *arg);
    enum smtpd_verb counter; /* for the disconnect line */
    unsigned flags;          /* SMTPD_C_* */
};

static const struct smtpd_cmd smtpd_cmd_table[] = {
    {"EHLO", smtpd_cmd_ehlo, SMTPD_V_EHLO, 0},
    {"HELO", smtpd_cmd_helo1, SMTPD_V_HELO, 0},
    {"MAIL", smtpd_cmd_mail, SMTPD_V_MAIL, SMTPD_C_HELO_AFTER_TLS},
    {"RCPT", smtpd_cmd_rcpt, SMTPD_V_RCPT, SMTPD_C_NEEDS_TX},
    {"DATA", smtpd_cmd_data, SMTPD_V_DATA, SMTPD_C_NEEDS_TX},
    {"RSET", smtpd_cmd_rset, SMTPD_V_RSET, 0},
    {"NOOP", smtpd_cmd_noop, SMTPD_V_NOOP, 0},
    {"VRFY", smtpd_cmd_vrfy, SMTPD_V_VRFY, 0},
    {"HELP", smtpd_cmd_help, SMTPD_V_HELP, 0},
    {"QUIT", smtpd_cmd_quit, SMTPD_V_QUIT, 0},
    {"AUTH", smtpd_cmd_auth, SMTPD_V_AUTH, 0},
    {"STARTTLS", smtpd_cmd_starttls, SMTPD_V_STARTTLS, 0},
    {NULL, NULL, SMTPD_V_UNKNOWN, 0},
};

/* The table's preconditions; 0, or -1 after the refusal. */
static int smtpd_cmd_allowed(struct smtpd_session *s, const struct smtpd_cmd *c)
{
    if ((c->flags & SMTPD_C_HELO_AFTER_TLS) && (s->flags & SMTPD_F_NEEDHELO)) {
        smtpd__reply(s, "503 5.5.1 Error: send EHLO again after STARTTLS");
        smtpd__error(s);
        return -1;
    }
    if ((c->flags & SMTPD_C_NEEDS_TX) && s->tx == NULL) {
        smtpd__reply(s, "503 5.5.1 Error: need MAIL command");
        smtpd__error(s);
        return -1;
    }
    return 0;
}

static const struct smtpd_cmd *smtpd_cmd_find(const char *cmd, size_t verblen)
{
    const struct smtpd_cmd *c;

    for (c = smtpd_cmd_table; c->verb != NULL; c++)
        if (verblen == strlen(c->verb) && strncasecmp(cmd, c->verb, verblen) == 0)
            return c;
    return NULL;
}

/* One command line (without its line ending); cmd is a private copy we may change. */
void smtpd__dispatch(struct smtpd_session *s, char *cmd, size_t n)
{
    const struct smtpd_cmd *c;
    size_t verblen;

    if (memchr(cmd, '\0', n) != NULL) {
        smtpd__trace(s, '<', "(line with NUL)", 15);
        if (s->state == SMTPD_S_AUTH) {
            smtpd_auth_abort(s, "501 5.5.2 Error: NUL character in authentication data");
            return;
        }
        s->counts.total[SMTPD_V_UNKNOWN]++;
        smtpd__reply(s, "500 5.5.2 Error: NUL character in command");
        smtpd__error(s);
        return;
    }
    /* Trailing spaces are common from legacy devices and never meaningful. */
    while (n > 0 && (cmd[n - 1] == ' ' || cmd[n - 1] == '\t'))
        cmd[--n] = '\0';
    if (s->state == SMTPD_S_AUTH) {
        smtpd__trace(s, '<', "****", 4);
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
        smtpd__trace(s, '<', masked, m);
    } else if (c == NULL && (s->flags & SMTPD_F_MASK)) {
        /* After a refused or aborted AUTH a device's pipelined answers (base64, or even a
         * password typed as is) arrive as "commands": never log them. */
        smtpd__trace(s, '<', "**** (not a command, after AUTH)", 32);
    } else {
        if (c != NULL)
            s->flags &= ~SMTPD_F_MASK;
        smtpd__trace(s, '<', cmd, (int)n);
    }
    if (c != NULL) {
        s->counts.total[c->counter]++;
        s->last_code = 0;
        if (smtpd_cmd_allowed(s, c) != 0)
            return;
        c->fn(s, cmd + verblen);
        /* AUTH and DATA count as done at 235 and at the 250 after the commit. */
        if (c->counter != SMTPD_V_AUTH && c->counter != SMTPD_V_DATA && s->last_code > 0 &&
            s->last_code < 400)
            s->counts.ok[c->counter]++;
        return;
    }
    s->counts.total[SMTPD_V_UNKNOWN]++;
    if (verblen == 0)
        smtpd__reply(s, "500 5.5.2 Error: empty command");
    else
        smtpd__reply(s, "502 5.5.2 Error: command not recognized");
    smtpd__error(s);
}
