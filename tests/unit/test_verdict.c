/*
 * test_verdict - what an upstream's reply means: the real replies of Microsoft 365, Google,
 * Amazon SES and Postfix, at the stage they come at, each with the cause, whom it is about
 * and the operator's action.  Pure: no loop, no network.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <string.h>

#include "relayd/verdict.h"

TestSuite(verdict, .timeout = 10);

#define R VERDICT_SCOPE_RECIPIENT
#define M VERDICT_SCOPE_MESSAGE
#define S VERDICT_SCOPE_SESSION

struct verdict_case {
    const char *label;
    enum verdict_stage stage;
    const char *reply; /* code taken from the text (0 when it has none) */
    enum verdict_cause want_cause;
    enum verdict_scope want_scope;
    const char *want_action_part; /* NULL: no action */
};

static const struct verdict_case cases[] = {
    /* Success. */
    {"queued", VERDICT_AT_DOT, "250 2.0.0 Ok: queued as 3B1F0", VERDICT_SENT, M, NULL},
    {"rcpt ok", VERDICT_AT_RCPT, "250 2.1.5 Ok", VERDICT_SENT, R, NULL},
    /* Microsoft 365. */
    {"m365 basic auth off", VERDICT_AT_AUTH,
     "535 5.7.30 Basic authentication is not supported for Client Submission", VERDICT_CONFIG, S,
     "switch the upstream to OAuth2"},
    {"m365 smtp auth disabled", VERDICT_AT_AUTH,
     "AUTH LOGIN: 535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
     "for the Tenant",
     VERDICT_CONFIG, S, "Authenticated SMTP"},
    {"m365 send as denied after data: this message, not the upstream", VERDICT_AT_DOT,
     "554 5.2.252 SendAsDenied; dev@corp.example not allowed to send as fax@lan; STOREDRV",
     VERDICT_CONFIG, M, "Send As"},
    {"send as denied without the code", VERDICT_AT_MAIL, "550 SendAsDenied", VERDICT_CONFIG, M,
     "Send As"},
    {"m365 tls version", VERDICT_AT_EHLO,
     "421 4.7.66 TLS 1.0 and 1.1 are not supported. Please upgrade", VERDICT_CONFIG, S,
     "tls_priority"},
    {"m365 concurrency", VERDICT_AT_MAIL,
     "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded", VERDICT_SLOWDOWN, S,
     "max_connections"},
    {"m365 submission quota at the dot", VERDICT_AT_DOT,
     "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", VERDICT_SLOWDOWN,
     S, "quota"},
    {"m365 client not authenticated", VERDICT_AT_MAIL,
     "530 5.7.57 Client not authenticated to send mail", VERDICT_CONFIG, S, "authentication"},
    {"m365 421 4.7.0 is one session, not a pause", VERDICT_AT_RCPT,
     "421 4.7.0 Service not available, closing transmission channel", VERDICT_TRANSIENT, S, NULL},
    {"m365 mailbox full on one rcpt", VERDICT_AT_RCPT,
     "452 4.2.2 The recipient's mailbox is full and can't accept messages now", VERDICT_TRANSIENT,
     R, NULL},
    {"m365 unknown recipient", VERDICT_AT_RCPT,
     "550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
     VERDICT_PERMANENT, R, NULL},
    /* Google. */
    {"google app password", VERDICT_AT_AUTH,
     "AUTH PLAIN: 534-5.7.9 Application-specific password required. Learn more at "
     "https://support.google.com/mail/?p=InvalidSecondFactor",
     VERDICT_CONFIG, S, "app password"},
    {"google bad password", VERDICT_AT_AUTH, "535-5.7.8 Username and Password not accepted.",
     VERDICT_CONFIG, S, "app password"},
    {"google rate limit", VERDICT_AT_GREETING, "421-4.7.28 Our system has detected an unusual rate",
     VERDICT_SLOWDOWN, S, "rate-limiting"},
    {"google daily limit", VERDICT_AT_DOT, "550 5.4.5 Daily user sending limit exceeded",
     VERDICT_SLOWDOWN, S, "quota"},
    {"google over quota mailbox on rcpt", VERDICT_AT_RCPT,
     "452 4.2.2 The email account that you tried to reach is over quota.", VERDICT_TRANSIENT, R,
     NULL},
    {"google mailbox quota exceeded is about one mailbox", VERDICT_AT_RCPT,
     "452 4.2.2 mailbox quota exceeded", VERDICT_TRANSIENT, R, NULL},
    /* Amazon SES. */
    {"ses unverified sender", VERDICT_AT_DOT,
     "554 Message rejected: Email address is not verified. The following identities failed the "
     "check in region EU-WEST-1: fax@lan",
     VERDICT_CONFIG, M, "verified"},
    {"ses max rate", VERDICT_AT_MAIL, "454 Throttling failure: Maximum sending rate exceeded.",
     VERDICT_SLOWDOWN, S, "sending rate"},
    {"ses daily quota", VERDICT_AT_MAIL, "454 Throttling failure: Daily message quota exceeded.",
     VERDICT_SLOWDOWN, S, "quota"},
    {"ses bad credentials", VERDICT_AT_AUTH, "535 Authentication Credentials Invalid",
     VERDICT_CONFIG, S, "password"},
    /* Postfix. */
    {"postfix auth failed", VERDICT_AT_AUTH, "AUTH PLAIN: 535 5.7.8 Error: authentication failed",
     VERDICT_CONFIG, S, "check username and password_file"},
    {"postfix sender login mismatch on rcpt: that recipient only", VERDICT_AT_RCPT,
     "553 5.7.1 <fax@lan>: Sender address rejected: not owned by user dev", VERDICT_CONFIG, R,
     "Send As"},
    {"postfix relay access denied", VERDICT_AT_RCPT,
     "554 5.7.1 <a@example.net>: Relay access denied", VERDICT_CONFIG, R, "relay"},
    {"postfix starttls first", VERDICT_AT_MAIL, "530 5.7.0 Must issue a STARTTLS command first",
     VERDICT_CONFIG, S, "tls = starttls"},
    {"postfix unknown user", VERDICT_AT_RCPT,
     "550 5.1.1 <b@example.com>: Recipient address rejected: User unknown", VERDICT_PERMANENT, R,
     NULL},
    {"postfix greylist", VERDICT_AT_RCPT,
     "450 4.2.0 <b@example.com>: Recipient address rejected: Greylisted", VERDICT_TRANSIENT, R,
     NULL},
    {"postfix too many recipients", VERDICT_AT_RCPT, "452 4.5.3 Error: too many recipients",
     VERDICT_TRANSIENT, R, NULL},
    {"postfix rate words after data", VERDICT_AT_DOT,
     "450 4.7.1 Error: too many messages, slow down", VERDICT_SLOWDOWN, S, NULL},
    {"postfix rate words on one rcpt stay with it", VERDICT_AT_RCPT,
     "450 4.7.1 <b@x>: Recipient address rejected: rate limit for this mailbox", VERDICT_TRANSIENT,
     R, NULL},
    {"postfix message too big", VERDICT_AT_DOT, "552 5.3.4 Error: message file too big",
     VERDICT_PERMANENT, M, NULL},
    {"postfix queue file write error", VERDICT_AT_DOT, "451 4.3.0 Error: queue file write error",
     VERDICT_TRANSIENT, M, NULL},
    {"postfix sender domain unknown", VERDICT_AT_MAIL,
     "553 5.1.8 <fax@nowhere.invalid>: Sender address rejected: Domain not found",
     VERDICT_PERMANENT, M, NULL},
    /* Generic and local. */
    {"bare 421 shutting down", VERDICT_AT_DOT, "421 4.3.2 Service shutting down", VERDICT_TRANSIENT,
     S, NULL},
    {"greeting blocked", VERDICT_AT_GREETING, "554 5.7.1 Your IP is listed", VERDICT_CONFIG, S,
     NULL},
    {"connection refused", VERDICT_AT_CONNECT, "connect to 127.0.0.1:1587: connection refused",
     VERDICT_TRANSIENT, S, NULL},
    {"lost during data", VERDICT_AT_DOT, "connection lost while sending message body",
     VERDICT_TRANSIENT, M, NULL},
    {"token, not prefix: 5.7.90", VERDICT_AT_RCPT, "550 5.7.90 something else", VERDICT_PERMANENT,
     R, NULL},
};

/* Each reply, at its stage, gets its cause, scope and action. */
Test(verdict, provider_replies)
{
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const struct verdict_case *c = &cases[i];
        struct verdict v;

        verdict_reply(c->stage, verdict_reply_code(c->reply), c->reply, &v);
        cr_expect(eq(int, (int)v.cause, (int)c->want_cause), "%s: cause %s", c->label,
                  verdict_cause_name(v.cause));
        cr_expect(eq(int, (int)v.scope, (int)c->want_scope), "%s: scope %d", c->label,
                  (int)v.scope);
        if (c->want_action_part == NULL)
            cr_expect_null(v.action, "%s: %s", c->label, v.action);
        else
            cr_expect_not_null(v.action != NULL ? strstr(v.action, c->want_action_part) : NULL,
                               "%s: action %s", c->label, v.action);
    }
}

struct http_case {
    const char *label;
    int graph;
    long status;
    const char *code, *message;
    enum verdict_cause want_cause;
    enum verdict_scope want_scope;
    const char *want_action_part; /* NULL: no action */
};

static const struct http_case http_cases[] = {
    {"graph accepted", 1, 202, NULL, NULL, VERDICT_SENT, M, NULL},
    {"gmail sent", 0, 200, NULL, NULL, VERDICT_SENT, M, NULL},
    {"network failure", 1, 0, NULL, "connection refused", VERDICT_TRANSIENT, S, NULL},
    {"graph token refused", 1, 401, "InvalidAuthenticationToken", "Access token is empty.",
     VERDICT_CONFIG, S, "client_id"},
    {"graph access denied (no Mail.Send)", 1, 403, "ErrorAccessDenied",
     "Access is denied. Check credentials and try again.", VERDICT_CONFIG, S, "Mail.Send"},
    {"graph outside the application access policy", 1, 403, "ErrorAccessDenied",
     "Access to OData is disabled: Blocked by tenant configured AppOnly AccessPolicy settings.",
     VERDICT_CONFIG, S, "application access policy"},
    {"gmail insufficient permissions", 0, 403, "insufficientPermissions",
     "Request had insufficient authentication scopes.", VERDICT_CONFIG, S, "gmail.send"},
    {"gmail token refused", 0, 401, "UNAUTHENTICATED", NULL, VERDICT_CONFIG, S, "refresh token"},
    {"graph send as denied: this message", 1, 403, "ErrorSendAsDenied",
     "The user account which was used to submit this request does not have the right to send "
     "mail on behalf of the specified sending account.",
     VERDICT_CONFIG, M, "Send As"},
    {"graph no such mailbox", 1, 404, "ErrorInvalidUser",
     "The requested user 'fax@corp.example' is invalid.", VERDICT_CONFIG, M, "mailbox"},
    {"graph mailbox not licensed", 1, 404, "MailboxNotEnabledForRESTAPI",
     "The mailbox is either inactive, soft-deleted, or is hosted on-premise.", VERDICT_CONFIG, M,
     "licence"},
    {"graph throttled", 1, 429, "ApplicationThrottled",
     "Application is over its MailboxConcurrency limit.", VERDICT_SLOWDOWN, S, NULL},
    {"gmail rate limit", 0, 429, "rateLimitExceeded", NULL, VERDICT_SLOWDOWN, S, NULL},
    {"service unavailable", 1, 503, NULL, NULL, VERDICT_SLOWDOWN, S, NULL},
    {"gateway timeout", 0, 504, NULL, NULL, VERDICT_SLOWDOWN, S, NULL},
    {"graph invalid recipients", 1, 400, "ErrorInvalidRecipients",
     "At least one recipient is not valid.", VERDICT_PERMANENT, M, NULL},
    {"gmail invalid argument", 0, 400, "INVALID_ARGUMENT", "Invalid To header", VERDICT_PERMANENT,
     M, NULL},
    {"too large", 1, 413, "ErrorRequestEntityTooLarge", NULL, VERDICT_PERMANENT, M, NULL},
    {"internal server error", 1, 500, "InternalServerError", NULL, VERDICT_TRANSIENT, M, NULL},
    {"bad gateway", 0, 502, NULL, NULL, VERDICT_TRANSIENT, M, NULL},
    {"request timeout", 1, 408, NULL, NULL, VERDICT_TRANSIENT, M, NULL},
};

/* Each HTTP API answer gets its cause, scope and action. */
Test(verdict, http_answers)
{
    for (size_t i = 0; i < sizeof(http_cases) / sizeof(http_cases[0]); i++) {
        const struct http_case *c = &http_cases[i];
        struct verdict v;

        verdict_http(c->graph, c->status, c->code, c->message, &v);
        cr_expect(eq(int, (int)v.cause, (int)c->want_cause), "%s: cause %s", c->label,
                  verdict_cause_name(v.cause));
        cr_expect(eq(int, (int)v.scope, (int)c->want_scope), "%s: scope %d", c->label,
                  (int)v.scope);
        if (c->want_action_part == NULL)
            cr_expect_null(v.action, "%s: %s", c->label, v.action);
        else
            cr_expect_not_null(v.action != NULL ? strstr(v.action, c->want_action_part) : NULL,
                               "%s: action %s", c->label, v.action);
    }
}

/* Reply codes are found after a prefix, and only as whole codes. */
Test(verdict, reply_code)
{
    cr_assert(eq(int, verdict_reply_code("AUTH PLAIN: 535 5.7.8 no"), 535));
    cr_assert(eq(int, verdict_reply_code("534-5.7.9 x"), 534));
    cr_assert(eq(int, verdict_reply_code("connect to 127.0.0.1:1587: refused"), 0));
    cr_assert(eq(int, verdict_reply_code(NULL), 0));
    cr_assert_null(verdict_action(NULL));
    cr_assert_not_null(verdict_action("550 5.7.30 Basic authentication"));
}

/* The words of relayd's log lines. */
Test(verdict, words)
{
    cr_assert(eq(str, (char *)verdict_status_word(VERDICT_SENT), "sent"));
    cr_assert(eq(str, (char *)verdict_status_word(VERDICT_PERMANENT), "bounced"));
    cr_assert(eq(str, (char *)verdict_status_word(VERDICT_CONFIG), "deferred"));
    cr_assert(eq(str, (char *)verdict_cause_name(VERDICT_SLOWDOWN), "slowdown"));
}
