/*
 * verdict - what an upstream's reply means: the one place that turns an SMTP reply (or a
 * local failure such as a refused connection) into a cause, relayd's policy in the spirit
 * of Postfix's smtp_trouble.c.  Pure functions: no I/O, no state, no clock.
 *
 * Every recipient of a delivery round ends with one cause:
 *   VERDICT_SENT       the upstream took it (2xx to the final dot for an accepted RCPT);
 *   VERDICT_PERMANENT  the message or the recipient is at fault (5xx): fail it, notify;
 *   VERDICT_TRANSIENT  try again later with backoff (4xx, network, timeouts): counted;
 *   VERDICT_CONFIG     relayd's own configuration is at fault (credentials, TLS, "send
 *                      as denied"): wait without counting or expiring, tell the
 *                      administrator what to change;
 *   VERDICT_SLOWDOWN   the upstream asks relayd to slow down (rate limits, quotas of the
 *                      sending account): wait without counting.
 *
 * Scope says whom the verdict is about.  VERDICT_SCOPE_SESSION: the upstream itself
 * (TLS, AUTH, connection-level policy, 421): it drives health (CONFIG -> unhealthy),
 * pauses (SLOWDOWN) and the dead-destination cohort (TRANSIENT).  VERDICT_SCOPE_MESSAGE:
 * one transaction (MAIL, DATA, the final dot: every recipient of it).
 * VERDICT_SCOPE_RECIPIENT: one RCPT.  A per-recipient reply never pauses or fails the
 * upstream: "452 4.2.2 mailbox full" is about one mailbox, "553 5.7.1 ... not owned by
 * user" about one sender and recipient.
 *
 * Errors: none.  Ownership: action strings are static.
 */
#ifndef RELAYD_VERDICT_H
#define RELAYD_VERDICT_H

/* The step of the dialogue a reply answers. */
enum verdict_stage {
    VERDICT_AT_CONNECT, /* resolve, connect, implicit TLS: no reply (code 0) */
    VERDICT_AT_GREETING,
    VERDICT_AT_EHLO,     /* EHLO / HELO */
    VERDICT_AT_STARTTLS, /* STARTTLS and the handshake after it */
    VERDICT_AT_AUTH,
    VERDICT_AT_MAIL, /* MAIL FROM (and RSET before it) */
    VERDICT_AT_RCPT,
    VERDICT_AT_DATA, /* DATA (before the body) */
    VERDICT_AT_DOT,  /* the body and the reply to its final dot */
};

enum verdict_cause {
    VERDICT_SENT = 0,
    VERDICT_PERMANENT,
    VERDICT_TRANSIENT,
    VERDICT_CONFIG,
    VERDICT_SLOWDOWN,
};

enum verdict_scope {
    VERDICT_SCOPE_RECIPIENT,
    VERDICT_SCOPE_MESSAGE,
    VERDICT_SCOPE_SESSION,
};

struct verdict {
    enum verdict_cause cause;
    enum verdict_scope scope;
    const char *action; /* what the administrator must do, or NULL */
};

/*
 * The verdict on reply (the whole reply text, "553 5.7.1 <a@x>: Sender address rejected:
 * not owned by user dev"; it may carry a prefix such as "AUTH PLAIN: ") received at stage.
 * code is the reply's basic code, or 0 when there was no reply (connection refused or
 * lost, timeout, TLS handshake failure: then reply says why in words).  Known provider
 * replies come from a table (Microsoft 365, Google, SES, Postfix); see verdict.c.
 */
void verdict_reply(enum verdict_stage stage, int code, const char *reply, struct verdict *v);

/*
 * The verdict on an HTTP API's answer (Microsoft Graph, Gmail API; relayd/apisend.h).
 * status is the HTTP status (0: no answer: connection refused or lost, timeout, TLS
 * failure), code the provider's error code from the JSON body ("ErrorAccessDenied",
 * "ErrorInvalidRecipients", Gmail's "insufficientPermissions" reason or status
 * "PERMISSION_DENIED"; NULL or "" when none), message its text (NULL: none).
 *   2xx                      SENT
 *   401, 403                 CONFIG (session: the token, the app's permission or the
 *                            application access policy), action says what to grant
 *   404 ErrorInvalidUser...  CONFIG (message: this sending mailbox does not exist or has
 *                            no mailbox licence: the mapping or the sender is wrong)
 *   408, 500, 502, 0         TRANSIENT (retry with backoff)
 *   429, 503, 504            SLOWDOWN (session: pause the upstream for Retry-After)
 *   413                      PERMANENT (too large for this API)
 *   other 4xx                PERMANENT (the provider's text goes into the DSN)
 *   other 5xx                TRANSIENT
 * graph: 1 for Microsoft Graph, 0 for Gmail (the actions name their consoles).
 */
void verdict_http(int graph, long status, const char *code, const char *message, struct verdict *v);

/* The first SMTP reply code in text (three digits at the start or after a space, then a
 * space, '-' or the end), or 0. */
int verdict_reply_code(const char *text);

/* The operator action for a reply at any stage, or NULL (logs, relayctl test-upstream). */
const char *verdict_action(const char *reply);

/* The status word of relayd's log lines, Postfix's: "sent", "bounced" (PERMANENT),
 * "deferred" (TRANSIENT, CONFIG, SLOWDOWN). */
const char *verdict_status_word(enum verdict_cause cause);
/* The cause's name for logs and relayctl: "sent", "permanent", "transient", "config",
 * "slowdown". */
const char *verdict_cause_name(enum verdict_cause cause);

#endif
