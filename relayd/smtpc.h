/*
 * smtpc - the outbound SMTP client: delivers one message to one upstream.
 *
 * Happy path: resolve, connect, 220, EHLO, STARTTLS (or implicit TLS), verify, EHLO again,
 * AUTH through authsasl, MAIL, RCPT for each recipient, DATA with dot-stuffing, QUIT.
 *
 * Failure modes and how they are reported (status of the whole attempt):
 *   SMTPC_DEFER  network errors, timeouts, 4xx, TLS failures (never a cleartext fallback,
 *                never AUTH before TLS unless tls = none and allow_plaintext_auth),
 *                authentication failures (a configuration problem: see config_fault)
 *   SMTPC_FAIL   5xx to MAIL or DATA
 *   SMTPC_SENT   DATA accepted (then per-recipient results say who got it)
 * Per recipient: SENT, DEFER (4xx to RCPT) or FAIL (5xx to RCPT).
 *
 * Ownership: smtpc_deliver() allocates the client; it frees itself after calling done
 * exactly once.  msg (and the strings it points to), up and cred must stay valid until done
 * runs.  The struct smtpc pointer is invalid once done has been called.
 */
#ifndef RELAYD_SMTPC_H
#define RELAYD_SMTPC_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "common/tlsio.h"
#include "config/cfg.h"

enum smtpc_status {
    SMTPC_SENT,
    SMTPC_DEFER,
    SMTPC_FAIL,
};

struct smtpc_msg {
    uint64_t id;            /* queue id, for logs */
    const char *sender;     /* "" for <> */
    const char *const *rcpts;
    size_t nrcpts;
    const char *body;       /* CRLF lines, not dot-stuffed */
    size_t len;
};

struct smtpc_result {
    enum smtpc_status status;
    int config_fault;       /* 1: TLS verification or authentication failed: the relay's
                               configuration, not the message, is at fault */
    char reply[512];        /* the reply or the reason in words, e.g.
                               "250 2.0.0 Ok: queued as 3B1F0",
                               "connect to 127.0.0.1:1587: connection refused",
                               "TLS: certificate signer not trusted",
                               "AUTH PLAIN: 535 5.7.8 Error: authentication failed" */
    char tls[128];          /* "TLSv1.3 with cipher ..." or "" when cleartext */
    enum smtpc_status *rcpt_status; /* nrcpts entries */
    char **rcpt_reply;              /* nrcpts entries, may be NULL */
};

struct smtpc;
typedef void (*smtpc_done_fn)(void *arg, const struct smtpc_result *res);

/*
 * Starts delivering msg to up.  helo is our EHLO name (copied).  cred is the client
 * credential for up (from tlsio_cred_client_new(up->ca_file, up->tls_priority)), or NULL
 * for tls = none.  done(arg, res) is called exactly once, from the loop or from
 * smtpc_abort(), never inside this call;
 * res is valid only during the call.  Returns 0, or a negative UV_E* when the attempt
 * could not even start: then done is never called and nothing needs freeing.
 */
int smtpc_deliver(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                  const char *helo, const struct smtpc_msg *msg, smtpc_done_fn done, void *arg,
                  struct smtpc **out);
/* Aborts (shutdown): the connection is dropped and done runs with SMTPC_DEFER (or with the
 * result already known, e.g. SENT when only QUIT was outstanding) before this returns.
 * Call it only before done has run (c is gone afterwards); from inside done it is a no-op. */
void smtpc_abort(struct smtpc *c);

/*
 * "Test Connection": connects to up, EHLO, STARTTLS/implicit TLS, verifies the
 * certificate, authenticates, QUIT, without sending mail.  step(arg, ok, text) is called
 * once per step as it completes ("connect to 127.0.0.1:587: ok", "TLS: certificate signer
 * not trusted"); done(arg, res) once at the end (res->status SMTPC_SENT means every step
 * passed).  Used by relayctl test-upstream and the upstream health probe.
 */
typedef void (*smtpc_step_fn)(void *arg, int ok, const char *text);
int smtpc_probe(uv_loop_t *loop, const struct cfg_upstream *up, struct tlsio_cred *cred,
                const char *helo, smtpc_step_fn step, smtpc_done_fn done, void *arg,
                struct smtpc **out);

#endif
