/*
 * ctl_diag - relayctl test-upstream and send-test; see ctl_diag.h.
 *
 * test-upstream: happy path = credentials from the upstream's ca_file/tls_priority, one
 * smtpc_probe() on a private loop run to completion (smtpc's own connect and command
 * timeouts bound it), the steps printed as they complete, then the verdict.  A failure
 * names the step and the reason smtpc gives, and a line of advice matched on that reason.
 *
 * send-test: a plain blocking SMTP client (the listener is relayd itself, on this host)
 * with socket timeouts, then a bounded poll of the spool opened read-only.  The message
 * takes relayd's normal path: listener, repair, spool, route, upstream; a route that would
 * send it elsewhere than NAME is warned about before sending.
 */
#include "relayd/ctl/ctl_diag.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/authsasl.h"
#include "common/buf.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "relayd/apisend.h"
#include "relayd/ctl/ctl.h"
#include "relayd/ctl/ctl_oauth2.h"
#include "relayd/oauth2.h"
#include "relayd/route.h"
#include "relayd/smtpc.h"
#include "spool/spool.h"

#define DIAG_SMTP_TIMEOUT 30 /* seconds per command of send-test's SMTP dialogue */
#define DIAG_DEFAULT_WAIT 30 /* seconds send-test watches the spool */

static const struct cfg_upstream *find_upstream(const struct cfg *cfg, const char *name)
{
    int i;

    for (i = 0; i < cfg->nupstreams; i++)
        if (strcmp(cfg->upstreams[i].name, name) == 0)
            return &cfg->upstreams[i];
    return NULL;
}

static void no_such_upstream(const struct cfg *cfg, const char *name, FILE *out)
{
    int i;

    fprintf(out, "no [upstream %s] in %s", name, cfg->path ? cfg->path : "the configuration");
    for (i = 0; i < cfg->nupstreams; i++)
        fprintf(out, "%s%s", i == 0 ? " (configured: " : ", ", cfg->upstreams[i].name);
    fputs(cfg->nupstreams > 0 ? ")\n" : "\n", out);
}

/* ---- test-upstream ---- */

struct probe_state {
    FILE *out;
    int done;
    enum smtpc_status status;
    int config_fault;
    char reply[512];
    char tls[128];
    char action[256];
    char failed_step[512];
};

static void probe_step(void *arg, int ok, const char *text)
{
    struct probe_state *ps = arg;
    size_t n = strlen(text);

    /* smtpc may say "connect to 127.0.0.1:587: ok"; the tag already says so. */
    if (ok && n > 4 && strcmp(text + n - 4, ": ok") == 0)
        n -= 4;
    fprintf(ps->out, "[%s] %.*s\n", ok ? " ok " : "FAIL", (int)n, text);
    fflush(ps->out);
    if (!ok && ps->failed_step[0] == '\0')
        snprintf(ps->failed_step, sizeof ps->failed_step, "%.*s", (int)n, text);
}

static void probe_done(void *arg, const struct smtpc_result *res)
{
    struct probe_state *ps = arg;

    ps->done = 1;
    ps->status = res->status;
    ps->config_fault = res->config_fault;
    snprintf(ps->reply, sizeof ps->reply, "%s", res->reply);
    snprintf(ps->tls, sizeof ps->tls, "%s", res->tls);
    snprintf(ps->action, sizeof ps->action, "%s", res->action);
}

static int has(const char *text, const char *word)
{
    return strcasestr(text, word) != NULL;
}

/* The step a failure belongs to, from smtpc's reason text. */
static const char *fail_stage(const char *why)
{
    if (has(why, "STARTTLS"))
        return "STARTTLS";
    if (has(why, "certificate") || has(why, "TLS") || has(why, "handshake"))
        return "TLS";
    if (has(why, "AUTH") || has(why, "authentication") || has(why, "535") || has(why, "SASL"))
        return "AUTH";
    if (has(why, "connect") || has(why, "resolve") || has(why, "refused") ||
        has(why, "unreachable"))
        return "connect";
    if (has(why, "EHLO") || has(why, "HELO"))
        return "EHLO";
    if (has(why, "greeting") || has(why, "220"))
        return "greeting";
    return NULL;
}

/* One line of advice for the operator, matched on the reason. */
static const char *fail_advice(const struct cfg_upstream *up, const char *why)
{
    if (has(why, "not trusted") || has(why, "signer") || has(why, "issuer"))
        return "the upstream's certificate chain is not trusted here: set ca_file to the CA "
               "that signed it, or install that CA in the system trust store";
    if (has(why, "name") && has(why, "certificate"))
        return "the certificate is not for the name relayd expects (host, or tls_name when "
               "set): connect by the provider's real host name or set tls_name";
    if (has(why, "expired") || has(why, "not yet valid") || has(why, "activated"))
        return "the upstream's certificate is outside its validity dates: the provider must "
               "renew it (or this host's clock is wrong)";
    if (has(why, "STARTTLS"))
        return "the upstream does not offer STARTTLS here, so relayd sends neither password "
               "nor mail: use the submission port 587 (tls = starttls) or 465 (tls = implicit)";
    if (has(why, "535") || has(why, "authentication failed") || has(why, "credentials"))
        return up->username != NULL
                   ? "the upstream refused the username or password: check username and "
                     "password_file (Microsoft 365: SMTP AUTH must be enabled for the mailbox; "
                     "Gmail: an app password, not the account password)"
                   : "the upstream wants authentication: set username and password_file";
    if (has(why, "AUTH") && (has(why, "not offer") || has(why, "no AUTH") || has(why, "mechan")))
        return "the upstream offers no SASL mechanism relayd may use: check mechanisms, and "
               "that the port is a submission port";
    if (has(why, "refused"))
        return "nothing accepts connections there: check host and port (587 submission, "
               "465 implicit TLS) and any firewall";
    if (has(why, "timed out") || has(why, "timeout"))
        return "no answer in time: a firewall may drop the traffic, or the port is wrong";
    if (has(why, "resolve") || has(why, "not known") || has(why, "name or service"))
        return "the host name does not resolve: check host and this host's DNS";
    if (has(why, "421") || has(why, "4."))
        return "the upstream is refusing for now (temporary): relayd keeps mail queued and "
               "retries";
    return NULL;
}

int ctl_diag_test_upstream(const struct cfg *cfg, const char *name, FILE *out)
{
    const struct cfg_upstream *up = find_upstream(cfg, name);
    struct probe_state ps;
    struct tlsio_cred *cred = NULL;
    struct smtpc *client = NULL;
    struct oauth2 *oauth = NULL;
    uv_loop_t loop;
    char err[512];
    const char *stage, *advice;
    int rc;

    if (up == NULL) {
        no_such_upstream(cfg, name, out);
        return CTL_EXIT_FAIL;
    }
    if (up->transport != CFG_TRANSPORT_SMTP)
        fprintf(out, "testing upstream %s: transport = %s, %s, mailbox %s\n", up->name,
                up->transport == CFG_TRANSPORT_GRAPH ? "graph" : "gmail", up->api_url,
                up->mailbox != NULL ? up->mailbox : up->username);
    else
        fprintf(out, "testing upstream %s: %s:%d, tls = %s%s%s\n", up->name, up->host, up->port,
                cfg_tls_name(up->tls), up->username ? ", user " : ", no authentication",
                up->username ? up->username : "");
    fflush(out);
    if (tlsio_global_init(err, sizeof err) != 0 || authsasl_client_init(err, sizeof err) != 0) {
        fprintf(out, "[FAIL] %s\nverdict: FAILED: %s\n", err, err);
        return CTL_EXIT_FAIL;
    }
    if (up->tls != CFG_TLS_NONE &&
        tlsio_cred_client_new(up->ca_file, up->tls_priority, &cred, err, sizeof err) != 0) {
        fprintf(out, "[FAIL] TLS credentials: %s\nverdict: FAILED at TLS: %s\n", err, err);
        return CTL_EXIT_FAIL;
    }
    memset(&ps, 0, sizeof ps);
    ps.out = out;
    if ((rc = uv_loop_init(&loop)) != 0) {
        fprintf(out, "verdict: FAILED: event loop: %s\n", uv_strerror(rc));
        tlsio_cred_free(cred);
        return CTL_EXIT_FAIL;
    }
    if (up->upauth != CFG_UPAUTH_PASSWORD) {
        /* The token is a step of its own: most OAuth2 trouble shows here, not at AUTH. */
        char text[512];

        rc = ctl_oauth2_probe_token(&loop, cfg, up, &oauth, text, sizeof text);
        fprintf(out, "[%s] %s\n", rc == 0 ? " ok " : "FAIL", text);
        fflush(out);
    }
    if (up->transport != CFG_TRANSPORT_SMTP) {
        /* Graph / Gmail API: the token, then GET the mailbox (relayd/apisend.h). */
        struct apisend *api = NULL;

        rc = apisend_probe(&loop, up, oauth, probe_step, probe_done, &ps, &api);
    } else {
        rc = smtpc_probe(&loop, up, cred, oauth, cfg->hostname, probe_step, probe_done, &ps,
                         &client);
    }
    if (rc != 0) {
        ps.done = 1;
        ps.status = SMTPC_DEFER;
        snprintf(ps.reply, sizeof ps.reply, "could not start: %s", uv_strerror(rc));
    }
    /* smtpc's connect and command timeouts bound this run.  The token manager's refresh
     * timer would keep the loop alive for ever: run until the probe is done, then stop it. */
    while (!ps.done && uv_run(&loop, UV_RUN_ONCE) != 0)
        ;
    uv_run(&loop, UV_RUN_NOWAIT);
    if (oauth != NULL) {
        oauth2_stop(oauth, NULL, NULL);
        uv_run(&loop, UV_RUN_DEFAULT);
        oauth = oauth2_free(oauth);
    }
    if (uv_loop_close(&loop) != 0) {
        /* A handle left open is smtpc's bug; run once more so nothing leaks. */
        uv_run(&loop, UV_RUN_NOWAIT);
        uv_loop_close(&loop);
    }
    tlsio_cred_free(cred);

    if (!ps.done) {
        fprintf(out, "verdict: FAILED: the probe ended without a result\n");
        return CTL_EXIT_FAIL;
    }
    if (ps.status == SMTPC_SENT && up->transport != CFG_TRANSPORT_SMTP) {
        fprintf(out,
                "verdict: upstream %s works: %s API over HTTPS (TLS verified), token accepted\n",
                up->name, up->transport == CFG_TRANSPORT_GRAPH ? "Microsoft Graph" : "Gmail");
        return CTL_EXIT_OK;
    }
    if (ps.status == SMTPC_SENT) {
        fprintf(out, "verdict: upstream %s works: %s%s%s%s, %s%s\n", up->name,
                up->tls == CFG_TLS_NONE ? "cleartext (tls = none)" : "TLS verified",
                ps.tls[0] ? " (" : "", ps.tls, ps.tls[0] ? ")" : "",
                up->username ? "authenticated as " : "no authentication configured",
                up->username ? up->username : "");
        return CTL_EXIT_OK;
    }
    {
        const char *why = ps.reply[0] ? ps.reply : ps.failed_step;

        stage = fail_stage(ps.failed_step[0] ? ps.failed_step : why);
        if (stage == NULL)
            stage = fail_stage(why);
        /* "FAILED at TLS: certificate ...", not "FAILED at TLS: TLS: certificate ...". */
        if (stage != NULL && strncmp(why, stage, strlen(stage)) == 0 &&
            strncmp(why + strlen(stage), ": ", 2) == 0)
            why += strlen(stage) + 2;
        if (stage != NULL)
            fprintf(out, "verdict: FAILED at %s: %s\n", stage, why);
        else
            fprintf(out, "verdict: FAILED: %s\n", why);
        /* The provider reply table's advice first (it knows Microsoft 365's and Gmail's
         * replies), else ours from the reason. */
        if (ps.action[0] != '\0')
            fprintf(out, "what to do: %s\n", ps.action);
        else if ((advice = fail_advice(up, why)) != NULL ||
                 (advice = fail_advice(up, ps.failed_step)) != NULL)
            fprintf(out, "what to do: %s\n", advice);
        if (ps.config_fault)
            fprintf(out,
                    "note: this is a configuration problem; relayd keeps mail for %s "
                    "queued (it does not bounce it) until it is fixed\n",
                    up->name);
    }
    return CTL_EXIT_FAIL;
}

/* ---- send-test ---- */

struct smtp_conn {
    int fd;
    struct buf *in;
    FILE *out;
};

/* Reads one (possibly multi-line) reply; returns its code (0 on error) and its text, the
 * lines joined by spaces, in text. */
static int smtp_reply(struct smtp_conn *c, char *text, size_t textlen)
{
    const char *line;
    size_t n, used;
    char chunk[1024];
    ssize_t got;

    text[0] = '\0';
    for (;;) {
        while ((used = buf_getline(c->in, &line, &n)) > 0) {
            int last = n < 4 || line[3] != '-';
            size_t tl = strlen(text);

            snprintf(text + tl, textlen - tl, "%s%.*s", tl ? " " : "", (int)n, line);
            if (last) {
                int code = n >= 3 ? atoi(line) : 0;

                buf_consume(c->in, used);
                return code >= 200 && code <= 599 ? code : 0;
            }
            buf_consume(c->in, used);
        }
        got = read(c->fd, chunk, sizeof chunk);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            snprintf(text, textlen, "%s",
                     got == 0                                  ? "connection closed by relayd"
                     : errno == EAGAIN || errno == EWOULDBLOCK ? "timed out"
                                                               : strerror(errno));
            return 0;
        }
        if (buf_append(c->in, chunk, (size_t)got) != 0) {
            snprintf(text, textlen, "reply too long");
            return 0;
        }
    }
}

static int smtp_send(struct smtp_conn *c, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t n = write(c->fd, data, len);

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Sends cmd (CRLF added) and reads the reply; prints both; the code or 0. */
static int smtp_cmd(struct smtp_conn *c, const char *cmd, char *text, size_t textlen)
{
    char line[1024];
    int code;

    snprintf(line, sizeof line, "%s\r\n", cmd);
    fprintf(c->out, "  > %s\n", cmd);
    if (smtp_send(c, line, strlen(line)) != 0) {
        snprintf(text, textlen, "write: %s", strerror(errno));
        return 0;
    }
    code = smtp_reply(c, text, textlen);
    fprintf(c->out, "  < %s\n", text);
    return code;
}

static int connect_listener(const struct cfg_listener *l, char *why, size_t whylen)
{
    struct sockaddr_storage ss;
    struct timeval tv = {DIAG_SMTP_TIMEOUT, 0};
    const char *host = l->host;
    socklen_t sslen;
    int fd;

    memset(&ss, 0, sizeof ss);
    /* A wildcard listener is reached on loopback. */
    if (strcmp(host, "0.0.0.0") == 0)
        host = "127.0.0.1";
    else if (strcmp(host, "::") == 0)
        host = "::1";
    if (strchr(host, ':') != NULL) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;

        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)l->port);
        inet_pton(AF_INET6, host, &s6->sin6_addr);
        sslen = sizeof *s6;
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;

        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)l->port);
        inet_pton(AF_INET, host, &s4->sin_addr);
        sslen = sizeof *s4;
    }
    if ((fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
        snprintf(why, whylen, "socket: %s", strerror(errno));
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
        snprintf(why, whylen, "connect to listener %s (%s port %d): %s", l->name, host, l->port,
                 strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* The sender send-test uses: the upstream's account when it is an address (providers
 * insist on it), else postmaster@ our hostname. */
static char *default_sender(const struct cfg *cfg, const struct cfg_upstream *up)
{
    /* An API upstream's fixed mailbox is the one that sends. */
    if (up->transport != CFG_TRANSPORT_SMTP && up->mailbox != NULL && strchr(up->mailbox, '@'))
        return xstrdup(up->mailbox);
    if (up->username != NULL && strchr(up->username, '@') != NULL)
        return xstrdup(up->username);
    return xasprintf("postmaster@%s", cfg->hostname);
}

/* Warns when the route for (from, to) arriving on listener l does not go to up. */
static void check_route(const struct cfg *cfg, const struct cfg_listener *l,
                        const struct cfg_upstream *up, const char *from, const char *to, FILE *out)
{
    const struct cfg_route *r = route_match(cfg, from, to, "127.0.0.1", l->name);
    int i;

    if (r == NULL) {
        fprintf(out,
                "warning: no route matches <%s>: relayd will hold the message instead of "
                "sending it to %s\n",
                to, up->name);
        return;
    }
    if (r->upstream == up) {
        fprintf(out, "route %s sends <%s> to upstream %s\n", r->name, to, up->name);
        return;
    }
    for (i = 0; i < r->nfailover; i++) {
        if (r->failover[i] == up) {
            fprintf(out,
                    "warning: route %s sends <%s> to upstream %s; %s is only its "
                    "failover\n",
                    r->name, to, r->upstream->name, up->name);
            return;
        }
    }
    fprintf(out,
            "warning: route %s sends <%s> to upstream %s, not %s; the test message goes "
            "there\n",
            r->name, to, r->upstream->name, up->name);
}

/* Watches the message in the spool; the exit code. */
static int watch_spool(const struct cfg *cfg, uint64_t id, int wait_secs, FILE *out)
{
    struct spool_opts o = {.readonly = 1};
    struct spool *sp;
    struct spool_msg *m;
    char err[512], qid[17];
    int rc, i, tenths = wait_secs * 10;

    spool_id_str(id, qid);
    if ((rc = spool_open(cfg->spool_dir, &o, &sp, err, sizeof err)) != 0) {
        fprintf(out, "cannot watch the spool: %s\n", err[0] ? err : spool_strerror(rc));
        return CTL_EXIT_FAIL;
    }
    fprintf(out, "waiting up to %d s for the delivery of %s...\n", wait_secs, qid);
    fflush(out);
    for (i = 0; i <= tenths; i++) {
        if (i > 0)
            usleep(100 * 1000);
        rc = spool_msg_get(sp, id, SPOOL_GET_HISTORY, &m);
        if (rc == SPOOL_ENOTFOUND) {
            fprintf(out,
                    "result: delivered: %s left the spool after %.1f s (relayd's log has "
                    "the upstream's reply: grep %s)\n",
                    qid, i / 10.0, qid);
            spool_close(sp);
            return CTL_EXIT_OK;
        }
        if (rc != 0) {
            fprintf(out, "cannot read %s from the spool: %s\n", qid, spool_strerror(rc));
            spool_close(sp);
            return CTL_EXIT_FAIL;
        }
        if (m->state != SPOOL_QUEUED || m->attempts > 0) {
            size_t r;

            if (m->state == SPOOL_QUEUED) {
                /* Still due after an attempt (e.g. partly delivered): keep watching. */
                m = spool_msg_free(m);
                continue;
            }
            fprintf(out, "result: %s after %d attempt(s): %s\n", spool_state_name(m->state),
                    m->attempts, m->last_error ? m->last_error : "(no reason recorded)");
            if (m->nattempts_log > 0) {
                const struct spool_attempt *a = &m->attempts_log[m->nattempts_log - 1];

                fprintf(out, "last attempt: upstream %s: %s\n", a->upstream ? a->upstream : "-",
                        a->result ? a->result : "-");
            }
            for (r = 0; r < m->nrcpts; r++)
                if (m->rcpts[r].reply != NULL)
                    fprintf(out, "  <%s>: %s\n", m->rcpts[r].addr, m->rcpts[r].reply);
            fprintf(out, "(relayctl show %s has the whole history)\n", qid);
            spool_msg_free(m);
            spool_close(sp);
            return CTL_EXIT_FAIL;
        }
        m = spool_msg_free(m);
    }
    fprintf(out, "result: %s is still queued after %d s: is relayd running? (relayctl show %s)\n",
            qid, wait_secs, qid);
    spool_close(sp);
    return CTL_EXIT_FAIL;
}

int ctl_diag_send_test_ex(const struct cfg *cfg, const char *name, const char *to,
                          const char *from_arg, int wait_secs, FILE *out)
{
    const struct cfg_upstream *up = find_upstream(cfg, name);
    const struct cfg_listener *l;
    struct smtp_conn c = {.fd = -1, .in = NULL, .out = out};
    char text[1024], cmd[1200], date[64], why[512], *from = NULL, *msg = NULL;
    const char *qtok;
    uint64_t id = 0;
    time_t now = time(NULL);
    struct tm tm;
    int code, rc = CTL_EXIT_FAIL;

    if (up == NULL) {
        no_such_upstream(cfg, name, out);
        return CTL_EXIT_FAIL;
    }
    if (cfg->nlisteners == 0) {
        fprintf(out, "no [listener] in the configuration: nothing to send through\n");
        return CTL_EXIT_FAIL;
    }
    if (strpbrk(to, "<> \t\r\n") != NULL || strchr(to, '@') == NULL ||
        (from_arg != NULL && (strpbrk(from_arg, "<> \t\r\n") != NULL))) {
        fprintf(out, "'%s' is not an address\n", strchr(to, '@') ? from_arg : to);
        return CTL_EXIT_USAGE;
    }
    l = &cfg->listeners[0];
    from = from_arg != NULL ? xstrdup(from_arg) : default_sender(cfg, up);
    check_route(cfg, l, up, from, to, out);

    fprintf(out, "sending a test message from <%s> to <%s> through listener %s (%s port %d)\n",
            from, to, l->name, l->host, l->port);
    fflush(out);
    if ((c.fd = connect_listener(l, why, sizeof why)) < 0) {
        fprintf(out, "result: %s (is relayd running?)\n", why);
        goto free_from;
    }
    c.in = buf_new(64 * 1024);
    if ((code = smtp_reply(&c, text, sizeof text)) != 220) {
        fprintf(out, "  < %s\nresult: relayd did not greet with 220\n", text);
        goto close_fd;
    }
    fprintf(out, "  < %s\n", text);
    snprintf(cmd, sizeof cmd, "EHLO %s", cfg->hostname);
    if (smtp_cmd(&c, cmd, text, sizeof text) != 250) {
        snprintf(cmd, sizeof cmd, "HELO %s", cfg->hostname);
        if (smtp_cmd(&c, cmd, text, sizeof text) != 250)
            goto refused;
    }
    snprintf(cmd, sizeof cmd, "MAIL FROM:<%s>", from);
    if (smtp_cmd(&c, cmd, text, sizeof text) != 250)
        goto refused;
    snprintf(cmd, sizeof cmd, "RCPT TO:<%s>", to);
    if ((code = smtp_cmd(&c, cmd, text, sizeof text)) != 250 && code != 251)
        goto refused;
    if (smtp_cmd(&c, "DATA", text, sizeof text) != 354)
        goto refused;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    msg = xasprintf("From: <%s>\r\n"
                    "To: <%s>\r\n"
                    "Subject: relayd test message via upstream %s\r\n"
                    "Date: %s\r\n"
                    "Message-ID: <relayd-test.%lld.%d@%s>\r\n"
                    "X-Relayd-Test: %s\r\n"
                    "MIME-Version: 1.0\r\n"
                    "Content-Type: text/plain; charset=us-ascii\r\n"
                    "\r\n"
                    "This is a test message from \"relayctl send-test %s\" on %s.\r\n"
                    "It took relayd's normal path: listener %s, the spool, the route for\r\n"
                    "<%s>, upstream %s (%s port %d).\r\n"
                    ".\r\n",
                    from, to, up->name, date, (long long)now, (int)getpid(), cfg->hostname,
                    up->name, up->name, cfg->hostname, l->name, to, up->name, up->host, up->port);
    fprintf(out, "  > (message: Subject: relayd test message via upstream %s)\n", up->name);
    if (smtp_send(&c, msg, strlen(msg)) != 0) {
        snprintf(text, sizeof text, "write: %s", strerror(errno));
        goto refused;
    }
    code = smtp_reply(&c, text, sizeof text);
    fprintf(out, "  < %s\n", text);
    if (code != 250)
        goto refused;
    smtp_cmd(&c, "QUIT", why, sizeof why);
    /* "250 2.0.0 Ok: queued as 0190A3F2C1D4": the id is the last word. */
    qtok = strrchr(text, ' ');
    if (qtok == NULL || spool_id_parse(qtok + 1, &id) != 0) {
        fprintf(out, "result: accepted, but the reply carries no queue id I can read: %s\n", text);
        goto close_fd;
    }
    fprintf(out, "queued as %s\n", qtok + 1);
    fflush(out);
    close(c.fd);
    c.fd = -1;
    rc = wait_secs > 0 ? watch_spool(cfg, id, wait_secs, out) : CTL_EXIT_OK;
    goto close_fd;

refused:
    fprintf(out, "result: relayd refused the test message: %s\n", text);
close_fd:
    if (c.fd >= 0)
        close(c.fd);
    buf_free(c.in);
free_from:
    free(msg);
    free(from);
    return rc;
}

int ctl_diag_send_test(const struct cfg *cfg, const char *name, const char *to, FILE *out)
{
    return ctl_diag_send_test_ex(cfg, name, to, NULL, DIAG_DEFAULT_WAIT, out);
}

/* ---- relayctl entry ---- */

static int diag_usage(const struct ctl *c)
{
    if (strcmp(c->cmd, "test-upstream") == 0)
        fprintf(stderr, "usage: %s [-c FILE] test-upstream NAME\n", c->prog);
    else
        fprintf(stderr,
                "usage: %s [-c FILE] send-test NAME --to ADDR [--from ADDR] [--wait SECONDS]\n",
                c->prog);
    return CTL_EXIT_USAGE;
}

/* test-upstream NAME and send-test NAME --to ADDR [--from ADDR] [--wait SECONDS]. */
static int diag_command(struct ctl *c, int argc, char **argv)
{
    const char *name = NULL, *to = NULL, *from = NULL;
    int send = strcmp(c->cmd, "send-test") == 0;
    int wait_secs = DIAG_DEFAULT_WAIT, i, rc;
    char err[512];
    struct cfg cfg;

    for (i = 0; i < argc; i++) {
        if (send && i + 1 < argc && strcmp(argv[i], "--to") == 0)
            to = argv[++i];
        else if (send && i + 1 < argc && strcmp(argv[i], "--from") == 0)
            from = argv[++i];
        else if (send && i + 1 < argc && strcmp(argv[i], "--wait") == 0) {
            char *end;
            long v = strtol(argv[++i], &end, 10);

            if (*end != '\0' || v < 0 || v > 3600)
                return diag_usage(c);
            wait_secs = (int)v;
        } else if (argv[i][0] != '-' && name == NULL)
            name = argv[i];
        else
            return diag_usage(c);
    }
    if (name == NULL || (send && to == NULL))
        return diag_usage(c);
    if ((rc = cfg_load(c->config_path, &cfg, err, sizeof err)) != 0) {
        fprintf(stderr, "%s: %s\n", c->prog, err[0] ? err : strerror(-rc));
        return CTL_EXIT_FAIL;
    }
    if (!send)
        rc = ctl_diag_test_upstream(&cfg, name, stdout);
    else
        rc = ctl_diag_send_test_ex(&cfg, name, to, from, wait_secs, stdout);
    cfg_free(&cfg);
    fflush(stdout);
    return rc;
}

int ctl_diag_test_upstream_cmd(struct ctl *c, int argc, char **argv)
{
    return diag_command(c, argc, argv);
}

int ctl_diag_send_test_cmd(struct ctl *c, int argc, char **argv)
{
    return diag_command(c, argc, argv);
}
