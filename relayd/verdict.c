/*
 * verdict - what an upstream's reply means; see verdict.h.
 *
 * First the provider table (data: one row per known reply, first match wins), then the
 * generic rules of RFC 5321 by stage.  A row matches when every pattern it has matches:
 * the basic reply code (0: any), the enhanced status code as a whole token ("5.7.9" does
 * not match "5.7.90") and a piece of text (case-insensitive).  To teach relayd a new
 * provider reply, add a row and a case to tests/unit/test_verdict.c.
 */
#include "relayd/verdict.h"

#include <ctype.h>
#include <stddef.h>
#include <string.h>
#include <strings.h>

#include "common/xalloc.h"

/* Whom a table row is about. */
enum row_scope {
    ROW_SESSION, /* the connection or the account: every message is affected alike */
    ROW_SENDER,  /* this sender (or this recipient at RCPT): the message, not the upstream */
    ROW_STAGE,   /* as the stage says (RCPT: the recipient, MAIL/DATA/dot: the message) */
};

struct reply_row {
    int code;           /* basic reply code, 0: any */
    const char *status; /* enhanced status code token, NULL: any */
    const char *text;   /* case-insensitive substring, NULL: any */
    enum verdict_cause cause;
    enum row_scope scope;
    const char *action;
};

#define ACT_SEND_AS                                                                                \
    "the account relayd logs in with may not send as this sender: rewrite the sender to the "      \
    "account's own address (rewrite_sender on the route) or grant the account \"Send As\" "        \
    "permission for that address"
#define ACT_CREDENTIALS                                                                            \
    "the upstream refused the username or password: check username and password_file"
#define ACT_QUOTA                                                                                  \
    "the provider's sending quota is used up: lower max_messages_per_minute or "                   \
    "max_recipients_per_day for this upstream (Microsoft 365 allows 30 messages a minute and "     \
    "10,000 recipients a day per mailbox); mail stays queued meanwhile"
#define ACT_RELAY                                                                                  \
    "the upstream does not relay for relayd: authenticate (username and password_file) or ask "    \
    "the provider to allow relaying from this address (Microsoft 365: an inbound connector)"

static const struct reply_row reply_table[] = {
    /* Microsoft 365 / Exchange Online. */
    {0, "5.7.30", NULL, VERDICT_CONFIG, ROW_SESSION,
     "Microsoft 365 has basic authentication disabled for this tenant: switch the upstream to "
     "OAuth2 (auth = xoauth2)"},
    {0, "5.2.252", NULL, VERDICT_CONFIG, ROW_SENDER, ACT_SEND_AS},
    {0, NULL, "SendAsDenied", VERDICT_CONFIG, ROW_SENDER, ACT_SEND_AS},
    {0, "5.7.60", NULL, VERDICT_CONFIG, ROW_SENDER, ACT_SEND_AS},
    {0, "5.7.139", NULL, VERDICT_CONFIG, ROW_SESSION,
     "SMTP AUTH is disabled for this mailbox or the tenant (security defaults): enable "
     "Authenticated SMTP for the mailbox in the Microsoft 365 admin center and turn security "
     "defaults off, or switch the upstream to OAuth2"},
    {0, "4.7.66", NULL, VERDICT_CONFIG, ROW_SESSION,
     "the upstream refuses the TLS version relayd offered: allow TLS 1.2 or later in "
     "tls_priority (the default does)"},
    {0, "5.7.57", NULL, VERDICT_CONFIG, ROW_SESSION,
     "the upstream only accepts mail after authentication: set username and password_file"},
    {0, "5.7.64", NULL, VERDICT_CONFIG, ROW_SESSION,
     "Microsoft 365 does not recognise relayd's connection as the tenant's (TenantAttribution): "
     "check the inbound connector (certificate or IP address) or authenticate"},
    {0, "5.7.3", "Authentication unsuccessful", VERDICT_CONFIG, ROW_SESSION, ACT_CREDENTIALS},
    {0, NULL, "SubmissionQuotaExceeded", VERDICT_SLOWDOWN, ROW_SESSION, ACT_QUOTA},
    {432, "4.3.2", NULL, VERDICT_SLOWDOWN, ROW_SESSION,
     "the upstream limits concurrent sessions per mailbox: lower max_connections for this "
     "upstream (Microsoft 365 allows 3)"},
    /* Google Workspace / Gmail. */
    {534, "5.7.9", NULL, VERDICT_CONFIG, ROW_SESSION,
     "Google requires an app password for this account: create one (Google Account > Security "
     "> App passwords) and put it in password_file, or switch the upstream to OAuth2"},
    {0, "5.7.8", "Username and Password not accepted", VERDICT_CONFIG, ROW_SESSION,
     ACT_CREDENTIALS " (Google accounts with 2-step verification need an app password)"},
    {0, "4.7.28", NULL, VERDICT_SLOWDOWN, ROW_SESSION,
     "Google is rate-limiting this sender: lower max_messages_per_minute for this upstream"},
    {0, "5.4.5", NULL, VERDICT_SLOWDOWN, ROW_SESSION, ACT_QUOTA},
    /* Amazon SES. */
    {0, NULL, "Email address is not verified", VERDICT_CONFIG, ROW_SENDER,
     "Amazon SES sends only from verified identities: verify the sender's address or domain in "
     "SES, or rewrite the sender to a verified one (rewrite_sender on the route)"},
    {0, NULL, "Maximum sending rate exceeded", VERDICT_SLOWDOWN, ROW_SESSION,
     "Amazon SES is over the account's sending rate: lower max_messages_per_minute for this "
     "upstream or ask AWS for a higher rate"},
    {0, NULL, "Daily message quota exceeded", VERDICT_SLOWDOWN, ROW_SESSION, ACT_QUOTA},
    /* Postfix and generic RFC 4954 / RFC 3207 replies. */
    {0, NULL, "not owned by user", VERDICT_CONFIG, ROW_SENDER, ACT_SEND_AS},
    {0, NULL, "Relay access denied", VERDICT_CONFIG, ROW_SENDER, ACT_RELAY},
    {530, NULL, "STARTTLS", VERDICT_CONFIG, ROW_SESSION,
     "the upstream requires TLS before anything else: set tls = starttls or implicit"},
    {534, NULL, NULL, VERDICT_CONFIG, ROW_SESSION,
     "the upstream considers the authentication mechanism too weak: allow a stronger one in "
     "mechanisms (e.g. SCRAM-SHA-256 or PLAIN over TLS)"},
    {535, NULL, NULL, VERDICT_CONFIG, ROW_SESSION, ACT_CREDENTIALS},
    {538, NULL, NULL, VERDICT_CONFIG, ROW_SESSION,
     "the upstream requires encryption for this authentication mechanism: use tls = starttls "
     "or implicit"},
    {530, NULL, NULL, VERDICT_CONFIG, ROW_SESSION,
     "the upstream requires authentication: set username and password_file"},
    /* Too many recipients for one transaction is about the message, not a reason to slow
     * down (RFC 5321 4.5.3.1.10): the rest go in a later round. */
    {452, "4.5.3", NULL, VERDICT_TRANSIENT, ROW_STAGE, NULL},
};

/* Words in a 4xx outside RCPT that mean "slow down" even without a table row.  Not
 * "exceeded" or a bare "too many": "mailbox quota exceeded" and "too many recipients"
 * are about one mailbox or one message. */
static const char *const slowdown_words[] = {
    "rate limit",   "ratelimit",         "rate-limit",           "throttl",
    "slow down",    "too many messages", "too many connections", "too many concurrent",
    "sending rate",
};

static int is_code_char(char c)
{
    return isdigit((unsigned char)c) || c == '.';
}

/* 1 when tok occurs in s as a whole dotted-number token. */
static int has_token(const char *s, const char *tok)
{
    size_t n = strlen(tok);
    const char *p = s;

    while ((p = strstr(p, tok)) != NULL) {
        if ((p == s || !is_code_char(p[-1])) && !is_code_char(p[n]))
            return 1;
        p++;
    }
    return 0;
}

int verdict_reply_code(const char *s)
{
    const char *p;

    if (s == NULL)
        return 0;
    for (p = s; *p != '\0'; p++) {
        if ((p == s || p[-1] == ' ') && p[0] >= '2' && p[0] <= '5' &&
            isdigit((unsigned char)p[1]) && isdigit((unsigned char)p[2]) &&
            (p[3] == ' ' || p[3] == '-' || p[3] == '\0'))
            return (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    }
    return 0;
}

static const struct reply_row *table_find(int code, const char *reply)
{
    size_t i;

    if (reply == NULL)
        return NULL;
    for (i = 0; i < NELEM(reply_table); i++) {
        const struct reply_row *r = &reply_table[i];

        if (r->code != 0 && r->code != code)
            continue;
        if (r->status != NULL && !has_token(reply, r->status))
            continue;
        if (r->text != NULL && strcasestr(reply, r->text) == NULL)
            continue;
        return r;
    }
    return NULL;
}

/* Whom a reply at stage is about when nothing more specific is known. */
static enum verdict_scope stage_scope(enum verdict_stage stage)
{
    if (stage <= VERDICT_AT_AUTH)
        return VERDICT_SCOPE_SESSION;
    return stage == VERDICT_AT_RCPT ? VERDICT_SCOPE_RECIPIENT : VERDICT_SCOPE_MESSAGE;
}

static int says_slow_down(const char *reply)
{
    size_t i;

    for (i = 0; i < NELEM(slowdown_words); i++)
        if (strcasestr(reply, slowdown_words[i]) != NULL)
            return 1;
    return 0;
}

void verdict_reply(enum verdict_stage stage, int code, const char *reply, struct verdict *v)
{
    const struct reply_row *row;
    const char *text = reply != NULL ? reply : "";

    v->cause = VERDICT_TRANSIENT;
    v->scope = stage_scope(stage);
    v->action = NULL;
    if (code >= 200 && code < 400) {
        v->cause = VERDICT_SENT;
        return;
    }
    if ((row = table_find(code, text)) != NULL) {
        v->cause = row->cause;
        v->action = row->action;
        if (row->scope == ROW_SESSION)
            v->scope = VERDICT_SCOPE_SESSION;
        return;
    }
    if (code == 0) {
        /* No reply: refused, lost, timed out.  Before the session could carry mail it is
         * about the upstream; during a transaction it only defers that message. */
        return;
    }
    if (code == 421) {
        /* RFC 5321 3.8: the server is closing the channel.  It speaks of this session:
         * a pause needs words that name a rate, or a failing cohort (upstream.c). */
        v->scope = VERDICT_SCOPE_SESSION;
        v->cause = says_slow_down(text) ? VERDICT_SLOWDOWN : VERDICT_TRANSIENT;
        return;
    }
    if (code / 100 == 4) {
        if (stage != VERDICT_AT_RCPT && says_slow_down(text)) {
            v->cause = VERDICT_SLOWDOWN;
            v->scope = VERDICT_SCOPE_SESSION;
        }
        return;
    }
    /* 5xx.  Before MAIL a permanent refusal is connection-level policy (a blocked
     * address, TLS or EHLO refused): relayd's setup must change, the mail is not at
     * fault.  From MAIL on it is about the message or the recipient. */
    v->cause = stage <= VERDICT_AT_AUTH ? VERDICT_CONFIG : VERDICT_PERMANENT;
}

/* ---- HTTP APIs ---- */

#define ACT_GRAPH_GRANT                                                                            \
    "grant the app registration the Microsoft Graph application permission Mail.Send with admin "  \
    "consent (Entra admin center > App registrations > API permissions), and make sure the "       \
    "application access policy (New-ApplicationAccessPolicy / RBAC for Applications) includes "    \
    "this mailbox"
#define ACT_GRAPH_TOKEN                                                                            \
    "Microsoft Graph refused the access token: check tenant, client_id and the secret or "         \
    "certificate, and that scope is https://graph.microsoft.com/.default (app-only)"
#define ACT_GMAIL_GRANT                                                                            \
    "grant the service account's client id domain-wide delegation with the scope "                 \
    "https://www.googleapis.com/auth/gmail.send (Google Admin console > Security > API "           \
    "controls), "                                                                                  \
    "or authorize the account with that scope; the mailbox must be a Workspace user with Gmail on"
#define ACT_GMAIL_TOKEN                                                                            \
    "the Gmail API refused the access token: check the service account key or the refresh token"
#define ACT_MAILBOX                                                                                \
    "the sending mailbox does not exist, has no Exchange Online / Gmail licence or is not "        \
    "enabled for the API: check mailbox (or mailbox_map, or the envelope sender with "             \
    "mailbox = sender)"
#define ACT_API_SEND_AS                                                                            \
    "the mailbox may not send as this From: address: grant it \"Send As\" for that address, or "   \
    "set rewrite_from = yes on the route"

struct http_row {
    long status;      /* 0: any */
    const char *code; /* case-insensitive substring of code or message, NULL: any */
    enum verdict_cause cause;
    enum verdict_scope scope;
    int graph; /* -1: either API, 1: Graph, 0: Gmail */
    const char *action;
};

static const struct http_row http_table[] = {
    {0, "ErrorSendAsDenied", VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, -1, ACT_API_SEND_AS},
    {0, "ErrorInvalidUser", VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, -1, ACT_MAILBOX},
    {0, "MailboxNotEnabledForRESTAPI", VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, -1, ACT_MAILBOX},
    {0, "MailboxNotFound", VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, -1, ACT_MAILBOX},
    {0, "failedPrecondition", VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, 0, ACT_MAILBOX},
    {0, "ApplicationThrottled", VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {0, "MailboxConcurrency", VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {0, "rateLimitExceeded", VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {0, "userRateLimitExceeded", VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {0, "ErrorQuotaExceeded", VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, ACT_QUOTA},
    {401, NULL, VERDICT_CONFIG, VERDICT_SCOPE_SESSION, 1, ACT_GRAPH_TOKEN},
    {401, NULL, VERDICT_CONFIG, VERDICT_SCOPE_SESSION, 0, ACT_GMAIL_TOKEN},
    {403, NULL, VERDICT_CONFIG, VERDICT_SCOPE_SESSION, 1, ACT_GRAPH_GRANT},
    {403, NULL, VERDICT_CONFIG, VERDICT_SCOPE_SESSION, 0, ACT_GMAIL_GRANT},
    {404, NULL, VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, -1, ACT_MAILBOX},
    {408, NULL, VERDICT_TRANSIENT, VERDICT_SCOPE_MESSAGE, -1, NULL},
    {413, NULL, VERDICT_PERMANENT, VERDICT_SCOPE_MESSAGE, -1, NULL},
    {429, NULL, VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {503, NULL, VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
    {504, NULL, VERDICT_SLOWDOWN, VERDICT_SCOPE_SESSION, -1, NULL},
};

/* s (may be NULL) contains needle, case aside. */
static int icontains(const char *s, const char *needle)
{
    return s != NULL && strcasestr(s, needle) != NULL;
}

void verdict_http(int graph, long status, const char *code, const char *message, struct verdict *v)
{
    v->action = NULL;
    if (status >= 200 && status < 300) {
        v->cause = VERDICT_SENT;
        v->scope = VERDICT_SCOPE_MESSAGE;
        return;
    }
    if (status == 0) {
        v->cause = VERDICT_TRANSIENT;
        v->scope = VERDICT_SCOPE_SESSION;
        return;
    }
    for (size_t i = 0; i < NELEM(http_table); i++) {
        const struct http_row *r = &http_table[i];

        if (r->status != 0 && r->status != status)
            continue;
        if (r->graph >= 0 && r->graph != (graph != 0))
            continue;
        if (r->code != NULL && !icontains(code, r->code) && !icontains(message, r->code))
            continue;
        v->cause = r->cause;
        v->scope = r->scope;
        v->action = r->action;
        return;
    }
    v->scope = VERDICT_SCOPE_MESSAGE;
    v->cause = status >= 400 && status < 500 ? VERDICT_PERMANENT : VERDICT_TRANSIENT;
}

const char *verdict_action(const char *reply)
{
    const struct reply_row *row = table_find(verdict_reply_code(reply), reply);

    return row != NULL ? row->action : NULL;
}

const char *verdict_status_word(enum verdict_cause cause)
{
    switch (cause) {
    case VERDICT_SENT:
        return "sent";
    case VERDICT_PERMANENT:
        return "bounced";
    default:
        return "deferred";
    }
}

const char *verdict_cause_name(enum verdict_cause cause)
{
    static const char *const names[] = {
        [VERDICT_SENT] = "sent",           [VERDICT_PERMANENT] = "permanent",
        [VERDICT_TRANSIENT] = "transient", [VERDICT_CONFIG] = "config",
        [VERDICT_SLOWDOWN] = "slowdown",
    };

    return (unsigned)cause < NELEM(names) ? names[cause] : "unknown";
}
