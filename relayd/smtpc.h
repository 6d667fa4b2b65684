/*
 * smtpc - the outbound SMTP client.
 *
 * Two ways to use it:
 *   smtpc_session_open() + smtpc_session_send()...  a session (connect, EHLO, TLS, AUTH)
 *                          that carries several transactions (MAIL..DATA), RSET between
 *                          them, closed with QUIT by smtpc_session_quit() or after
 *                          idle_timeout (relayd/pool.c; one message on its own connection
 *                          is open, send, quit);
 *   smtpc_probe()          the set-up only, every step reported (relayctl test-upstream
 *                          and the health probe).
 *
 * Happy path: resolve, connect, 220, EHLO, STARTTLS (or implicit TLS), verify (chain, name,
 * tls_pin), EHLO again, AUTH through authsasl, then per message: [RSET,] MAIL, RCPT for
 * each recipient, DATA (MAIL, the RCPTs and DATA in one group when PIPELINING is offered,
 * RFC 2920), the body with dot-stuffing; QUIT at the end.  MAIL carries SIZE (when
 * offered), BODY=8BITMIME (8-bit body, when offered) and SMTPUTF8 (non-ASCII envelope);
 * when DSN is offered, MAIL carries RET=/ENVID= and RCPT NOTIFY=/ORCPT= as the message has
 * them (RFC 3461, xtext-encoded), and nothing of the kind otherwise.
 * Before sending, a message larger than the upstream's SIZE fails ("message size N
 * exceeds upstream limit M"), and so does a non-ASCII envelope when SMTPUTF8 is not
 * offered: retrying would not help.
 *
 * Failure modes and how they are reported: every reply, and every failure without one,
 * goes through verdict_reply() (relayd/verdict.h) with the stage it answers, and each
 * recipient ends with its own status and cause:
 *   SMTPC_DEFER  network errors, timeouts, 4xx, TLS failures (never a cleartext fallback,
 *                never AUTH before TLS unless tls = none and allow_plaintext_auth), and
 *                every CONFIG or SLOWDOWN verdict (never bounced)
 *   SMTPC_FAIL   a PERMANENT verdict: 5xx to MAIL, DATA or the dot, or to its own RCPT
 *   SMTPC_SENT   the final dot accepted, for the recipients the server accepted
 * Verdicts of session scope also set config_fault / throttled / session_transient.
 *
 * Ownership: smtpc_session_open() and smtpc_probe() allocate the client; it frees itself
 * right after SMTPC_EV_CLOSED (session) or done (probe), and the struct smtpc pointer is
 * invalid from then on.  up, cred and oauth2 must stay valid until then; msg (and the
 * strings it points to) until its transaction's done has run.
 */
#ifndef RELAYD_SMTPC_H
#define RELAYD_SMTPC_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/tlsio.h"
#include "config/cfg.h"
#include "relayd/verdict.h"

enum smtpc_status {
    SMTPC_SENT,
    SMTPC_DEFER,
    SMTPC_FAIL,
};

struct smtpc_msg {
    uint64_t id;        /* queue id, for logs */
    const char *sender; /* "" for <> */
    const char *const *rcpts;
    size_t nrcpts;
    const char *body; /* CRLF lines, not dot-stuffed */
    size_t len;
    /* RFC 3461 DSN parameters, sent only when the upstream offers DSN (0 / NULL: none). */
    int dsn_ret;                  /* SPOOL_RET_FULL / SPOOL_RET_HDRS */
    const char *dsn_envid;        /* decoded; smtpc sends it as xtext */
    const unsigned *dsn_notify;   /* NULL or nrcpts entries of SPOOL_NOTIFY_* bits */
    const char *const *dsn_orcpt; /* NULL or nrcpts entries ("rfc822;addr", decoded) */
};

/* One recipient's outcome; relayd/verdict.h says what each cause means. */
struct smtpc_rcpt_result {
    enum smtpc_status status;      /* SENT, DEFER or FAIL */
    enum verdict_cause cause;      /* why (VERDICT_SENT for SENT) */
    const char *reply;             /* its own RCPT reply when refused, else the transaction's */
    const char *action;            /* what the administrator must do, or NULL */
    const struct cfg_upstream *up; /* the upstream that gave this verdict */
    const char *tls;               /* "TLSv1.3 with cipher ..." or "" */
};

struct smtpc_result {
    enum smtpc_status status; /* of the transaction: SENT when the final dot got 2xx */
    enum verdict_cause cause; /* why */
    /* Verdicts about the upstream itself (session scope), never about one message: */
    int config_fault;               /* relay configuration fault (TLS verification, AUTH
                                       refused, connection-level policy): the upstream is
                                       unhealthy until a probe succeeds */
    int throttled;                  /* the upstream asked us to slow down (rate limit,
                                       account quota): pause it */
    int session_transient;          /* a temporary session-level failure (421, refused or
                                       lost before the session was ready): counts toward the
                                       dead-upstream cohort (upstream.h) */
    char reply[512];                /* the reply or the reason in words, e.g.
                                       "250 2.0.0 Ok: queued as 3B1F0",
                                       "connect to 127.0.0.1:1587: connection refused",
                                       "TLS: certificate signer not trusted",
                                       "AUTH PLAIN: 535 5.7.8 Error: authentication failed" */
    char tls[128];                  /* "TLSv1.3 with cipher ..." or "" when cleartext */
    char action[256];               /* what the operator must do (relayd/verdict.c), or "" */
    size_t nrcpts;                  /* entries in rcpt */
    struct smtpc_rcpt_result *rcpt; /* per recipient of the message; NULL for probes and
                                       session set-up failures */
    int setup;                      /* 1: the session failed before it could carry mail (resolve,
                                       connect, greeting, EHLO, TLS, AUTH): another upstream may work */
    const struct cfg_upstream *up;  /* the upstream that produced this result */
    int stale;                      /* 1: a reused session broke before the message was offered
                                       (RSET refused or connection lost before the body's end): it
                                       can be retried at once on a new session */
};

/* The reply of a transaction that a stop aborted: nothing was decided about the message. */
#define SMTPC_ABORTED "delivery aborted (shutting down)"

struct smtpc;
struct oauth2;
typedef void (*smtpc_done_fn)(void *arg, const struct smtpc_result *res);

/*
 * Rules shared by every result: a reply the provider table marks as the relay's own fault
 * (AUTH refused, "send as denied", a TLS version refused) is a CONFIG verdict and never
 * SMTPC_FAIL, only SMTPC_DEFER; so is a throttling or quota reply (SLOWDOWN).  A 421 at
 * any step closes the connection and defers the message.  Per recipient, 2xx/4xx/5xx to
 * RCPT give SENT (if DATA then succeeds), DEFER and FAIL independently, each with its own
 * verdict: "553 ... not owned by user" on one RCPT holds that recipient only.
 */

/*
 * "Test Connection": connects to up, EHLO, STARTTLS/implicit TLS, verifies the
 * certificate, authenticates, QUIT, without sending mail.  cred is the client credential
 * for up (from tlsio_cred_client_new(up->ca_file, up->tls_priority)), or NULL for
 * tls = none.  oauth2 is the token manager for auth = xoauth2 | oauthbearer upstreams
 * (NULL: none; then such an upstream fails at AUTH with a CONFIG verdict).  helo is our
 * EHLO name (copied).  step(arg, ok, text) is called
 * once per step as it completes ("connect to 127.0.0.1:587: ok", "TLS: certificate signer
 * not trusted"); done(arg, res) once at the end (res->status SMTPC_SENT means every step
 * passed).  Used by relayctl test-upstream and the upstream health probe.
 */
typedef void (*smtpc_step_fn)(void *arg, int ok, const char *text);
int smtpc_probe(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                struct oauth2 *oauth2, const char *helo, smtpc_step_fn step, smtpc_done_fn done,
                void *arg, struct smtpc **out);
/* Aborts a probe (shutdown): the connection is dropped and done runs with SMTPC_DEFER (or
 * with the result already known, e.g. SENT when only QUIT was outstanding) before this
 * returns.  Call it only before done has run (c is gone afterwards); from inside done it is
 * a no-op.  On a session it is smtpc_session_abort(). */
void smtpc_abort(struct smtpc *c);

/* ---- Sessions: one connection, several transactions (used by relayd/pool.c) ---- */

enum smtpc_event {
    SMTPC_EV_READY,  /* set-up done: the session is idle, smtpc_session_send() may follow */
    SMTPC_EV_FAILED, /* set-up failed; res says why (res->setup = 1); SMTPC_EV_CLOSED follows */
    SMTPC_EV_IDLE,   /* a transaction ended and the session can carry another one */
    SMTPC_EV_CLOSED, /* the connection is gone; c is freed right after this callback */
};
/* res is non-NULL for SMTPC_EV_FAILED only, and valid during the call only. */
typedef void (*smtpc_event_fn)(void *arg, struct smtpc *c, enum smtpc_event ev,
                               const struct smtpc_result *res);

/*
 * Opens a session to up: resolve, connect, greeting, EHLO, TLS, AUTH.  ev(arg, c, ...) gets
 * SMTPC_EV_READY or SMTPC_EV_FAILED once, SMTPC_EV_IDLE after each transaction that left
 * the session usable, and SMTPC_EV_CLOSED exactly once at the end, always from the loop.
 * An idle session closes itself (QUIT) after up->idle_timeout seconds, or when the server
 * drops it.  Returns 0 (*out set), or a negative UV_E* when it could not start (no event).
 * up, cred, oauth2 and helo (copied) as for smtpc_probe().
 */
int smtpc_session_open(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                       struct oauth2 *oauth2, const char *helo, smtpc_event_fn ev, void *arg,
                       struct smtpc **out);
/* 1 when c is idle: set up, no transaction, not closing. */
int smtpc_session_idle(const struct smtpc *c);
/*
 * Runs one transaction on an idle session ([RSET,] MAIL, RCPT..., DATA, body).  done(arg,
 * res) is called exactly once, from the loop (or from smtpc_session_abort()), never inside
 * this call; msg must stay valid until then.  Afterwards SMTPC_EV_IDLE follows when the
 * session can carry another message, SMTPC_EV_CLOSED otherwise.  0, or UV_EBUSY when c is
 * not idle (done is then never called).
 */
int smtpc_session_send(struct smtpc *c, const struct smtpc_msg *msg, smtpc_done_fn done, void *arg);
/* Says QUIT (when idle) and closes; SMTPC_EV_CLOSED follows from the loop.  A transaction
 * in progress is aborted as by smtpc_session_abort(). */
void smtpc_session_quit(struct smtpc *c);
/* Drops the connection now.  A transaction in progress gets done(SMTPC_DEFER, "delivery
 * aborted (shutting down)") before this returns; no SMTPC_EV_FAILED; SMTPC_EV_CLOSED
 * follows from the loop.  Safe to call twice. */
void smtpc_session_abort(struct smtpc *c);
/* Transactions started on this session so far (0 for a fresh one). */
int smtpc_session_count(const struct smtpc *c);
/* 1 while a transaction's final dot has been sent and its reply is awaited: aborting now
 * could leave the message delivered upstream but recorded as not (a duplicate later). */
int smtpc_session_offered(const struct smtpc *c);

#endif
