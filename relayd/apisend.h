/*
 * apisend - the HTTP API transports: an upstream with transport = graph delivers through
 * Microsoft Graph (POST /v1.0/users/{mailbox}/sendMail, the MIME message base64-encoded),
 * one with transport = gmail through the Gmail API (POST /gmail/v1/users/{mailbox}/
 * messages/send with {"raw": base64url}, or the media upload endpoint for messages over
 * 5 MB, up to 35 MB).  The same shape as smtpc's sessions and probes, so the pool (failover,
 * rate shaping, pauses, health) and relayctl test-upstream use it unchanged:
 *   apisend_session_open()  a "session": one HTTP client (relayd/http.h) whose connections
 *                           are kept alive between messages; READY from the loop at once
 *   apisend_session_send()  one message: the sending mailbox (mailbox_map, then mailbox:
 *                           an address or "sender", else username), an OAuth 2.0 token
 *                           (oauth2_token_get()), the API's copy of the message, one request;
 *                           for Graph with save_to_sent_items = yes and under 4 MB sendMail;
 *                           else the draft path: stale drafts of this queue id deleted, a
 *                           draft (over 4 MB split: attachments added after, as a
 *                           fileAttachment < 3 MB, else an upload session), PATCHed with
 *                           PR_DELETE_AFTER_SUBMIT unless save_to_sent_items, then send; a
 *                           failure deletes the draft (only the final send can duplicate,
 *                           as SMTP's final dot)
 *   apisend_probe()         token, then GET the mailbox (Graph /v1.0/users/{m}, Gmail
 *                           /gmail/v1/users/{m}/profile); a 403 there only says the app may
 *                           not read the mailbox (relayd needs Mail.Send, plus
 *                           Mail.ReadWrite for the draft path / gmail.send only); for Graph
 *                           then GET one id of the Drafts folder: a 403 there fails the probe
 *                           with save_to_sent_items = no (Mail.ReadWrite is missing), and is
 *                           only reported with yes (messages over ~3 MB would be held)
 *
 * Envelope semantics: Graph and Gmail deliver to the addresses in To/Cc/Bcc, not to an
 * envelope.  The API's copy (apimime_for_api(), relayd/apimime.h) names exactly the envelope
 * recipients: envelope-only ones in a Bcc: header, header recipients outside the envelope
 * left out.
 *
 * Every answer goes through verdict_http() (relayd/verdict.h): 401/403 are CONFIG
 * (config_fault: the upstream turns unhealthy, the action says what to grant), 429/503/504
 * SLOWDOWN (throttled; apisend_retry_after() gives the pause the API asked for), 4xx
 * PERMANENT with the provider's text in the reply (and the DSN), 5xx and network failures
 * TRANSIENT.  Every recipient of a message gets the message's verdict (the APIs accept or
 * refuse a message as a whole).
 *
 * Errors: negative returns when a session cannot start; everything about a message is in
 * its result.  Ownership: as smtpc's: the struct frees itself right after SMTPC_EV_CLOSED
 * (session) or done (probe); up and oauth2 outlive it; msg until its done has run.
 */
#ifndef RELAYD_APISEND_H
#define RELAYD_APISEND_H

#include <stddef.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/smtpc.h"

struct apisend;
struct oauth2;

/* Largest request body of Graph's sendMail (4 MB), and the Gmail API's limits. */
#define APISEND_GRAPH_MAX (4L * 1024 * 1024)
#define APISEND_GMAIL_RAW_MAX (5L * 1024 * 1024)
#define APISEND_GMAIL_MAX (35L * 1024 * 1024)
/* An attachment through a Graph upload session. */
#define APISEND_GRAPH_ATTACH_MAX (150L * 1024 * 1024)

/* As smtpc_probe(); c in the done/step callbacks is not used. */
int apisend_probe(uv_loop_t *loop, const struct cfg_upstream *up, struct oauth2 *oauth2,
                  smtpc_step_fn step, smtpc_done_fn done, void *arg, struct apisend **out);
/* Aborts a probe: done runs now with SMTPC_DEFER. */
void apisend_probe_abort(struct apisend *a);

/* As smtpc_session_open(); ev gets NULL for its struct smtpc argument. */
int apisend_session_open(uv_loop_t *loop, const struct cfg_upstream *up, struct oauth2 *oauth2,
                         smtpc_event_fn ev, void *arg, struct apisend **out);
int apisend_session_idle(const struct apisend *a);
int apisend_session_send(struct apisend *a, const struct smtpc_msg *msg, smtpc_done_fn done,
                         void *arg);
void apisend_session_quit(struct apisend *a);
void apisend_session_abort(struct apisend *a);
/* 1 while the final request (the one that sends) is in flight. */
int apisend_session_offered(const struct apisend *a);
/* has_next: the route has an upstream after this one for the next message.  A message over
 * the API's hard limit (Gmail 35 MB, a Graph attachment over 150 MB) then gets a CONFIG
 * verdict about that message, so that the pool hands it to that upstream (an SMTP one, say);
 * without one it fails (PERMANENT, with the reason in the DSN). */
void apisend_set_failover(struct apisend *a, int has_next);
/* Seconds of the last Retry-After the API sent (429, 503), or 0. */
long apisend_retry_after(const struct apisend *a);

/* ---- pure pieces, exposed for unit tests ---- */

/* The sending mailbox for sender (the envelope sender, "" for <>) on up: mailbox_map first,
 * then mailbox (an address, or "sender"), else username.  *how is "map", "sender" or
 * "fixed".  0, or -1 when there is none (the null sender with mailbox = sender). */
int apisend_mailbox(const struct cfg_upstream *up, const char *sender, char *out, size_t outlen,
                    const char **how);
/* The API's copy of msg (malloc'd into *out): apimime_for_api() (relayd/apimime.h:
 * envelope-only recipients added in Bcc:, header recipients outside the envelope left out),
 * or, for a message apimime cannot read, the envelope-only recipients in a Bcc: in front and
 * nothing left out.  note says what changed for the log ("bcc +2", or ""). */
void apisend_prepare(const char *msg, size_t len, const char *const *rcpts, size_t nrcpts,
                     char **out, size_t *outlen, char *note, size_t notelen);
/* The provider's error code and message from an error answer: Graph's
 * {"error":{"code":"ErrorAccessDenied","message":"..."}}, Gmail's {"error":{"code":403,
 * "message":"...","errors":[{"reason":"insufficientPermissions"}],"status":"..."}} (code
 * becomes the reason, else the status).  Empty strings when absent. */
void apisend_error_parse(const char *body, size_t len, char *code, size_t codelen, char *msg,
                         size_t msglen);

/* The action for a refused Graph request at step (a draft-path step name such as "create
 * draft", "attachment", "createUploadSession", or "sendMail"/"send"): a 403 on a call that
 * works on drafts means the app lacks Mail.ReadWrite (Mail.Send covers sendMail and sending
 * a draft only), so APISEND_ACT_READWRITE; otherwise v->action (verdict_http()'s). */
#define APISEND_ACT_READWRITE                                                                      \
    "grant the app registration the Microsoft Graph application permission Mail.ReadWrite (as "    \
    "well as Mail.Send) with admin consent: relayd sends through drafts with "                     \
    "save_to_sent_items = no and for messages over about 3 MB; make sure the application access "  \
    "policy includes this mailbox; or set save_to_sent_items = yes, which needs Mail.Send only "   \
    "for messages under about 3 MB"
struct verdict;
const char *apisend_graph_action(const char *step, long status, const struct verdict *v);

#endif
