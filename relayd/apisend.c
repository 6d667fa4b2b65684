/*
 * apisend - the HTTP API transports (Microsoft Graph, Gmail API); see apisend.h.
 *
 * States of a session (changed only in as_enter(), which logs old -> new at debug level):
 *   OPENING   READY is sent from the loop (the timer at 0 ms)
 *   IDLE      no message; the timer is the idle timeout
 *   TOKEN     waiting for oauth2_token_get() (a ticket, since that wait cannot be cancelled)
 *   SENDING   the request is in flight (offered: the API may have the message)
 *   CLOSING   the HTTP client and the timer are closing; CLOSED follows, then free
 * A probe runs TOKEN -> SENDING (the GET, for Graph then the GET of Drafts) -> done ->
 * CLOSING, without events.
 */
#include "relayd/apisend.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/buf.h"
#include "common/json.h"
#include "common/log.h"
#include "common/xalloc.h"
#include "relayd/apimime.h"
#include "relayd/http.h"
#include "relayd/oauth2.h"
#include "relayd/verdict.h"

enum as_state {
    AS_OPENING,
    AS_IDLE,
    AS_TOKEN,
    AS_SENDING,
    AS_CLOSING,
};

static const char *const as_state_names[] = {"opening", "idle", "token", "sending", "closing"};

/* Graph's large-message path: the steps after the token (as_large_*()). */
enum as_lstep {
    L_LIST,         /* GET drafts tagged with this queue id (left by a crash) */
    L_DELETE_STALE, /* DELETE each of them */
    L_DRAFT,        /* POST messages: the draft, base64 MIME (without the attachments) */
    L_PATCH,        /* PATCH the draft: PR_DELETE_AFTER_SUBMIT (save_to_sent_items = no) */
    L_ATTACH,       /* POST attachments: a fileAttachment under 3 MB */
    L_SESSION,      /* POST attachments/createUploadSession */
    L_PUT,          /* PUT a chunk to the upload URL (no Authorization) */
    L_SEND,         /* POST messages/{id}/send: the only step that may deliver */
    L_CLEANUP,      /* DELETE the draft after a failure, then report the failure */
};

static const char *const as_lstep_names[] = {
    "list drafts", "delete stale draft",  "create draft", "set delete-after-submit",
    "attachment",  "createUploadSession", "upload",       "send",
    "delete draft"};

/* Graph takes a fileAttachment of up to 3 MB in one POST; larger ones go through an upload
 * session in chunks that are multiples of 320 KiB. */
#define AS_GRAPH_ATTACH_MAX (3L * 1024 * 1024)
#define AS_GRAPH_CHUNK (10 * 320 * 1024)
#define AS_MAX_STALE 16
/* The MAPI property of an internet header: the draft's X-Relayd-Queue-Id: header. */
#define AS_QID_PROP "String {00020386-0000-0000-C000-000000000046} Name X-Relayd-Queue-Id"
/* PR_DELETE_AFTER_SUBMIT: Exchange deletes the draft once it is sent instead of moving it to
 * Sent Items; Graph's MIME calls have no other way to keep Sent Items clean. */
#define AS_NO_SENT_ITEMS                                                                           \
    "{\"singleValueExtendedProperties\":[{\"id\":\"Boolean 0x0E01\",\"value\":\"true\"}]}"

/* oauth2_token_get() cannot be cancelled: its callback finds a NULL a after an abort. */
struct as_ticket {
    struct apisend *a;
};

struct apisend {
    uv_loop_t *loop;
    const struct cfg_upstream *up;
    struct oauth2 *oauth2;
    struct http *http;
    uv_timer_t timer;
    enum as_state state;
    int is_probe;
    int probe_drafts; /* the probe's second GET (Graph's Drafts folder) is in flight */
    int nopen;        /* the timer and the HTTP client, until closed */
    int aborting;
    /* session */
    smtpc_event_fn ev;
    void *ev_arg;
    /* probe */
    smtpc_step_fn step;
    /* the message (or the probe) in progress */
    const struct smtpc_msg *msg;
    smtpc_done_fn done;
    void *done_arg;
    struct as_ticket *ticket;
    struct http_req *req;
    char fail_now[300]; /* a failure found inside send(): finished from the timer */
    char mailbox[320];
    const char *how;  /* "fixed", "sender", "map" */
    const char *call; /* "sendMail", "raw", "media", "GET mailbox" */
    char note[200];
    char *body;
    size_t bodylen;
    char *url;
    char *authz;
    long retry_after;
    /* Graph's draft path (save_to_sent_items = no, or over sendMail's 4 MB) */
    int large;   /* 1 on the draft path */
    int patched; /* PR_DELETE_AFTER_SUBMIT set on the draft */
    enum as_lstep lstep;
    struct apimime_split split;
    size_t att_i, put_off, put_len;
    char draft_id[512];
    char *upload_url;
    char *stale[AS_MAX_STALE];
    size_t nstale, stale_i;
    char range[96];
    /* the failure a cleanup reports once the draft is deleted */
    enum verdict_cause lf_cause;
    enum verdict_scope lf_scope;
    const char *lf_action;
    char lf_reply[1024];
    int can_failover; /* the route has an upstream after this one (apisend_set_failover()) */
};

static void as_timer_fire(uv_timer_t *t);
static void as_on_answer(void *arg, const struct http_response *res);
static void as_large_answer(struct apisend *a, const struct http_response *res);
static void as_large_start(struct apisend *a, const char *copy, size_t copylen, int split);

static const char *as_api(const struct apisend *a)
{
    return a->up->transport == CFG_TRANSPORT_GRAPH ? "graph" : "gmail";
}

static void as_enter(struct apisend *a, enum as_state st)
{
    log_debug(2, "apisend: upstream %s: %s -> %s", a->up->name, as_state_names[a->state],
              as_state_names[st]);
    a->state = st;
}

/* ---- pure pieces ---- */

int apisend_mailbox(const struct cfg_upstream *up, const char *sender, char *out, size_t outlen,
                    const char **how)
{
    const char *m;

    out[0] = '\0';
    if (sender != NULL && sender[0] != '\0' && up->mailbox_map.n > 0 &&
        (m = cfg_map_lookup(&up->mailbox_map, sender)) != NULL) {
        *how = "map";
        snprintf(out, outlen, "%s", m);
        return 0;
    }
    if (up->mailbox != NULL && strcmp(up->mailbox, "sender") == 0) {
        *how = "sender";
        if (sender == NULL || sender[0] == '\0')
            return -1;
        snprintf(out, outlen, "%s", sender);
        return 0;
    }
    *how = "fixed";
    m = up->mailbox != NULL ? up->mailbox : up->username;
    if (m == NULL || strchr(m, '@') == NULL)
        return -1;
    snprintf(out, outlen, "%s", m);
    return 0;
}

static int addr_char(int c)
{
    return isalnum(c) || (c != '\0' && strchr(".!#$%&'*+/=?^_`{|}~-", c) != NULL) || c >= 0x80;
}

/* 1 when addr (lower case) appears in hay (lower case) as a whole address. */
static int has_addr(const char *hay, const char *addr)
{
    size_t n = strlen(addr);
    const char *p;

    if (n == 0)
        return 0;
    for (p = hay; (p = strstr(p, addr)) != NULL; p++) {
        if ((p == hay || !addr_char((unsigned char)p[-1])) && !addr_char((unsigned char)p[n]))
            return 1;
    }
    return 0;
}

/* The fallback when apimime cannot read the message: envelope-only recipients as Bcc: in
 * front, nothing left out. */
static void prepare_bcc_only(const char *msg, size_t len, const char *const *rcpts, size_t nrcpts,
                             char **out, size_t *outlen, char *note, size_t notelen)
{
    struct buf *hay = buf_new(len + 1), *bcc = buf_new(0); /* no cap: every recipient must fit */
    size_t i = 0, nadd = 0;
    int in_rcpt_field = 0;

    /* The To/Cc/Bcc fields of the header, unfolded and lower-cased. */
    while (i < len) {
        const char *line = msg + i, *eol = memchr(line, '\n', len - i);
        size_t ll = eol != NULL ? (size_t)(eol - line) + 1 : len - i;

        if (ll <= 2 && (line[0] == '\r' || line[0] == '\n'))
            break; /* the empty line: end of the header */
        if (line[0] == ' ' || line[0] == '\t') {
            /* a continuation of the field before */
        } else {
            in_rcpt_field = (ll > 3 && strncasecmp(line, "to:", 3) == 0) ||
                            (ll > 3 && strncasecmp(line, "cc:", 3) == 0) ||
                            (ll > 4 && strncasecmp(line, "bcc:", 4) == 0);
        }
        if (in_rcpt_field) {
            for (size_t k = 0; k < ll; k++) {
                char c = (char)tolower((unsigned char)line[k]);
                buf_append(hay, c == '\r' || c == '\n' ? " " : &c, 1);
            }
        }
        i += ll;
    }
    buf_append(hay, "", 1);
    for (i = 0; i < nrcpts; i++) {
        char *lc = xstrdup(rcpts[i]);

        for (char *c = lc; *c != '\0'; c++)
            *c = (char)tolower((unsigned char)*c);
        if (!has_addr(hay->data, lc)) {
            buf_append(bcc, nadd == 0 ? "Bcc: " : ",\r\n ", nadd == 0 ? 5 : 4);
            buf_append(bcc, rcpts[i], strlen(rcpts[i]));
            nadd++;
        }
        free(lc);
    }
    note[0] = '\0';
    if (nadd > 0) {
        buf_append(bcc, "\r\n", 2);
        snprintf(note, notelen, "bcc +%zu", nadd);
    }
    *outlen = bcc->len + len;
    *out = xmalloc(*outlen + 1);
    memcpy(*out, bcc->data, bcc->len);
    memcpy(*out + bcc->len, msg, len);
    (*out)[*outlen] = '\0';
    buf_free(hay);
    buf_free(bcc);
}

void apisend_prepare(const char *msg, size_t len, const char *const *rcpts, size_t nrcpts,
                     char **out, size_t *outlen, char *note, size_t notelen)
{
    char err[200], bnote[64];

    if (apimime_for_api(msg, len, rcpts, nrcpts, out, outlen, note, notelen, err, sizeof err) == 0)
        return;
    prepare_bcc_only(msg, len, rcpts, nrcpts, out, outlen, bnote, sizeof bnote);
    snprintf(note, notelen, "%s%sheader recipients not filtered: %s", bnote,
             bnote[0] != '\0' ? ", " : "", err);
}

/* The first string value of "key" in body (escapes kept as the next character); 1 if found. */
static int json_str_after(const char *body, size_t len, const char *key, char *out, size_t outlen)
{
    size_t kl = strlen(key), i, o;

    for (i = 0; i + kl + 2 < len; i++) {
        size_t j;

        if (body[i] != '"' || strncmp(body + i + 1, key, kl) != 0 || body[i + 1 + kl] != '"')
            continue;
        j = i + kl + 2;
        while (j < len && isspace((unsigned char)body[j]))
            j++;
        if (j >= len || body[j] != ':')
            continue;
        j++;
        while (j < len && isspace((unsigned char)body[j]))
            j++;
        if (j >= len || body[j] != '"')
            continue;
        for (j++, o = 0; j < len && body[j] != '"'; j++) {
            if (body[j] == '\\' && j + 1 < len)
                j++;
            if (o + 1 < outlen && (unsigned char)body[j] >= 0x20)
                out[o++] = body[j];
        }
        out[o] = '\0';
        return 1;
    }
    return 0;
}

void apisend_error_parse(const char *body, size_t len, char *code, size_t codelen, char *msg,
                         size_t msglen)
{
    code[0] = msg[0] = '\0';
    if (body == NULL)
        return;
    if (!json_str_after(body, len, "code", code, codelen) &&
        !json_str_after(body, len, "reason", code, codelen))
        json_str_after(body, len, "status", code, codelen);
    json_str_after(body, len, "message", msg, msglen);
}

const char *apisend_graph_action(const char *step, long status, const struct verdict *v)
{
    /* The calls on drafts (Microsoft's permission tables for "Create message", "Update
     * message", "Create attachment", "Create uploadSession", "List messages", "Delete
     * message"): Mail.ReadWrite.  sendMail and sending a draft need Mail.Send only. */
    static const char *const draft_steps[] = {
        "list drafts", "delete stale draft",  "create draft", "set delete-after-submit",
        "attachment",  "createUploadSession", "delete draft",
    };

    if (status != 403 || step == NULL || v->cause != VERDICT_CONFIG ||
        v->scope != VERDICT_SCOPE_SESSION)
        return v->action;
    for (size_t i = 0; i < sizeof(draft_steps) / sizeof(draft_steps[0]); i++)
        if (strcmp(step, draft_steps[i]) == 0)
            return APISEND_ACT_READWRITE;
    return v->action;
}

/* ---- results ---- */

/* Calls done with one verdict for every recipient; then the session is idle again (or the
 * probe closes). */
static void as_close(struct apisend *a);

static void as_finish(struct apisend *a, enum verdict_cause cause, enum verdict_scope scope,
                      const char *action, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static void as_finish(struct apisend *a, enum verdict_cause cause, enum verdict_scope scope,
                      const char *action, const char *fmt, ...)
{
    struct smtpc_result r;
    struct smtpc_rcpt_result *rr = NULL;
    smtpc_done_fn done = a->done;
    void *arg = a->done_arg;
    va_list ap;
    size_t i, n = a->msg != NULL ? a->msg->nrcpts : 0;

    memset(&r, 0, sizeof r);
    va_start(ap, fmt);
    vsnprintf(r.reply, sizeof r.reply, fmt, ap);
    va_end(ap);
    r.cause = cause;
    r.status = cause == VERDICT_SENT        ? SMTPC_SENT
               : cause == VERDICT_PERMANENT ? SMTPC_FAIL
                                            : SMTPC_DEFER;
    r.up = a->up;
    snprintf(r.tls, sizeof r.tls, "HTTPS");
    snprintf(r.action, sizeof r.action, "%s", action != NULL ? action : "");
    r.config_fault = cause == VERDICT_CONFIG && scope == VERDICT_SCOPE_SESSION;
    r.throttled = cause == VERDICT_SLOWDOWN;
    r.session_transient = cause == VERDICT_TRANSIENT && scope == VERDICT_SCOPE_SESSION;
    if (n > 0) {
        rr = xcalloc(n, sizeof(*rr));
        for (i = 0; i < n; i++)
            rr[i] = (struct smtpc_rcpt_result){
                r.status, cause, r.reply, r.action[0] != '\0' ? r.action : NULL, a->up, r.tls};
        r.rcpt = rr;
        r.nrcpts = n;
    }
    if (a->msg != NULL)
        log_info("%012llX: upstream %s: %s (mailbox %s)%s%s%s", (unsigned long long)a->msg->id,
                 a->up->name, r.reply, a->how, a->note[0] != '\0' ? " (" : "", a->note,
                 a->note[0] != '\0' ? ")" : "");
    a->msg = NULL;
    a->done = NULL;
    a->req = NULL;
    free(a->body);
    free(a->url);
    if (a->authz != NULL) {
        explicit_bzero(a->authz, strlen(a->authz));
        free(a->authz);
    }
    a->body = a->url = a->authz = NULL;
    apimime_split_free(&a->split);
    free(a->upload_url);
    a->upload_url = NULL;
    for (i = 0; i < a->nstale; i++)
        free(a->stale[i]);
    a->nstale = a->stale_i = a->att_i = 0;
    a->draft_id[0] = '\0';
    a->large = a->patched = 0;
    if (a->state != AS_CLOSING)
        as_enter(a, AS_IDLE);
    if (done != NULL)
        done(arg, &r);
    free(rr);
    if (a->is_probe) {
        as_close(a);
        return;
    }
    /* done may have quit the session. */
    if (a->state == AS_IDLE && !a->aborting) {
        uv_timer_start(&a->timer, as_timer_fire,
                       (uint64_t)(a->up->idle_timeout > 0 ? a->up->idle_timeout : 30) * 1000, 0);
        a->ev(a->ev_arg, NULL, SMTPC_EV_IDLE, NULL);
    }
}

/* A message over the API's hard limit: the route's next upstream takes it (a CONFIG verdict
 * about this message, which the pool fails over), else it fails for good. */
static void as_too_large(struct apisend *a, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void as_too_large(struct apisend *a, const char *fmt, ...)
{
    char reply[600];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reply, sizeof reply, fmt, ap);
    va_end(ap);
    if (a->can_failover)
        as_finish(a, VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE,
                  "the message is too large for this API: the route's next upstream takes it", "%s",
                  reply);
    else
        as_finish(a, VERDICT_PERMANENT, VERDICT_SCOPE_MESSAGE, NULL, "%s", reply);
}

/* ---- the request ---- */

static char *as_path_escape(const char *s)
{
    struct buf *b = buf_new(strlen(s) * 3 + 1);
    char *out;
    size_t n;

    for (; *s != '\0'; s++) {
        unsigned char c = (unsigned char)*s;

        if (isalnum(c) || strchr("@.-_+", c) != NULL) {
            buf_append(b, s, 1);
        } else {
            char hex[4];
            snprintf(hex, sizeof hex, "%%%02X", c);
            buf_append(b, hex, 3);
        }
    }
    out = buf_steal(b, &n);
    buf_free(b);
    return out;
}

/* A Graph probe's second GET: one message id of the Drafts folder.  Creating a draft cannot
 * be tried without leaving one behind, but reading drafts needs a Mail.Read* permission,
 * which Mail.Send alone lacks: a 403 here means the draft path (save_to_sent_items = no, or
 * a message over ~3 MB) will be refused for want of Mail.ReadWrite. */
static void as_probe_drafts(struct apisend *a)
{
    char *m = as_path_escape(a->mailbox);
    const char *hdrs[3] = {a->authz, "Accept: application/json", NULL};
    struct http_request rq;

    a->probe_drafts = 1;
    free(a->url);
    a->url = xasprintf("%s/v1.0/users/%s/mailFolders/drafts/messages?%%24top=1&%%24select=id",
                       a->up->api_url, m);
    free(m);
    memset(&rq, 0, sizeof rq);
    rq.method = "GET";
    rq.url = a->url;
    rq.headers = hdrs;
    rq.ca_file = a->up->ca_file;
    rq.connect_timeout = a->up->connect_timeout;
    rq.timeout = a->up->command_timeout;
    rq.max_answer = 64 * 1024;
    if (http_request(a->http, &rq, as_on_answer, a, &a->req) != 0)
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_SESSION, NULL,
                  "graph GET drafts of %s: libcurl refused the request", a->mailbox);
}

static void as_probe_drafts_answer(struct apisend *a, const struct http_response *res,
                                   const char *code, const char *text, const struct verdict *v)
{
    char line[700];
    int need = !a->up->save_to_sent_items; /* every message takes the draft path */

    if (res->status >= 200 && res->status < 300) {
        if (a->step != NULL)
            a->step(a->done_arg, 1,
                    "drafts: readable (HTTP 200); creating and sending a draft is checked by "
                    "the first delivery");
        as_finish(a, VERDICT_SENT, VERDICT_SCOPE_SESSION, NULL,
                  "graph API reachable, token accepted, drafts readable");
        return;
    }
    snprintf(line, sizeof line, "drafts: GET %s Drafts: HTTP %ld%s%s%s%s", a->mailbox, res->status,
             code[0] != '\0' ? " " : "", code, text[0] != '\0' ? ": " : "", text);
    if (res->status == 403 && !need) {
        if (a->step != NULL) {
            snprintf(line, sizeof line,
                     "drafts: not readable (HTTP 403): without Mail.ReadWrite only messages under "
                     "~3 MB can be sent (save_to_sent_items = yes: sendMail)");
            a->step(a->done_arg, 1, line);
        }
        as_finish(a, VERDICT_SENT, VERDICT_SCOPE_SESSION, NULL,
                  "graph API reachable, token accepted");
        return;
    }
    if (a->step != NULL)
        a->step(a->done_arg, 0, line);
    as_finish(a, v->cause, v->scope, apisend_graph_action("list drafts", res->status, v),
              "graph GET %s Drafts: HTTP %ld%s%s%s%s%s", a->mailbox, res->status,
              code[0] != '\0' ? " " : "", code, text[0] != '\0' ? ": " : "", text,
              res->status == 403 ? " (save_to_sent_items = no delivers through drafts)" : "");
}

static void as_on_answer(void *arg, const struct http_response *res)
{
    struct apisend *a = arg;
    char code[128], text[300];
    struct verdict v;
    int graph = a->up->transport == CFG_TRANSPORT_GRAPH;

    a->req = NULL;
    if (a->aborting) {
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_MESSAGE, NULL, "%s", SMTPC_ABORTED);
        return;
    }
    if (a->large) {
        as_large_answer(a, res);
        return;
    }
    if (res->status == 0) {
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_SESSION, NULL, "%s %s as %s: %s", as_api(a),
                  a->call, a->mailbox, res->error);
        return;
    }
    apisend_error_parse(res->body, res->len, code, sizeof code, text, sizeof text);
    verdict_http(graph, res->status, code, text, &v);
    a->retry_after = v.cause == VERDICT_SLOWDOWN && res->retry_after > 0 ? res->retry_after : 0;
    if (res->status == 401 && a->oauth2 != NULL)
        oauth2_invalidate(a->oauth2, a->up); /* the next attempt fetches a new token */
    if (a->is_probe && a->probe_drafts) {
        as_probe_drafts_answer(a, res, code, text, &v);
        return;
    }
    if (a->is_probe) {
        /* The GET of the mailbox: 403 means the app may not read it, which relayd does not
         * need (Mail.Send / gmail.send cannot read anything): the token itself works. */
        if (res->status == 403 && a->step != NULL)
            a->step(a->done_arg, 1,
                    "mailbox: not readable with this app's permissions (HTTP 403); sending is "
                    "checked by the first delivery");
        else if (a->step != NULL) {
            char line[600];

            snprintf(line, sizeof line, "GET %s: HTTP %ld%s%s%s%s", a->mailbox, res->status,
                     code[0] != '\0' ? " " : "", code, text[0] != '\0' ? ": " : "", text);
            a->step(a->done_arg, res->status < 300, line);
        }
        if ((res->status < 300 || res->status == 403) && graph)
            as_probe_drafts(a); /* then the Drafts folder, which the draft path needs */
        else if (res->status < 300 || res->status == 403)
            as_finish(a, VERDICT_SENT, VERDICT_SCOPE_SESSION, NULL,
                      "%s API reachable, token accepted", as_api(a));
        else
            as_finish(a, v.cause, v.scope, v.action, "%s GET %s: HTTP %ld%s%s%s%s", as_api(a),
                      a->mailbox, res->status, code[0] != '\0' ? " " : "", code,
                      text[0] != '\0' ? ": " : "", text);
        return;
    }
    if (v.cause == VERDICT_SENT)
        as_finish(a, v.cause, v.scope, NULL, "%s %s as %s: HTTP %ld%s", as_api(a), a->call,
                  a->mailbox, res->status, graph ? " (saved to Sent Items)" : "");
    else
        as_finish(a, v.cause, v.scope, v.action, "%s %s as %s: HTTP %ld%s%s%s%s%s", as_api(a),
                  a->call, a->mailbox, res->status, code[0] != '\0' ? " " : "", code,
                  text[0] != '\0' ? ": " : "", text,
                  a->retry_after > 0 ? " (Retry-After honoured)" : "");
}

/* ---- Graph's large-message path ---- */

/* Starts one request of the large path; url and body (may be NULL) are taken over. */
static void as_large_http(struct apisend *a, enum as_lstep step, const char *method, char *url,
                          char *body, const void *data, size_t len, const char *ctype)
{
    const char *hdrs[5];
    char ct[96];
    struct http_request rq;
    int n = 0;

    free(a->url);
    free(a->body);
    a->url = url;
    a->body = body;
    a->lstep = step;
    if (step != L_PUT)
        hdrs[n++] = a->authz; /* an upload URL refuses one */
    hdrs[n++] = "Accept: application/json";
    if (ctype != NULL) {
        snprintf(ct, sizeof ct, "Content-Type: %s", ctype);
        hdrs[n++] = ct;
    }
    if (step == L_PUT)
        hdrs[n++] = a->range;
    hdrs[n] = NULL;
    memset(&rq, 0, sizeof rq);
    rq.method = method;
    rq.url = a->url;
    rq.headers = hdrs;
    rq.body = body != NULL ? body : data;
    rq.bodylen = body != NULL ? strlen(body) : len;
    rq.ca_file = a->up->ca_file;
    rq.connect_timeout = a->up->connect_timeout;
    rq.timeout = a->up->data_timeout;
    rq.max_answer = 256 * 1024;
    /* An upload URL carries its own credential in the query: never logged. */
    log_debug(1, "%012llX: graph %s: %s %.*s", (unsigned long long)a->msg->id, as_lstep_names[step],
              method, (int)(step == L_PUT ? strcspn(a->url, "?") : strlen(a->url)), a->url);
    if (http_request(a->http, &rq, as_on_answer, a, &a->req) != 0)
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_SESSION, NULL,
                  "graph %s as %s: libcurl refused the request", a->call, a->mailbox);
}

/* .../users/{m}/messages[/{draft id}]REST */
static char *as_msg_url(struct apisend *a, const char *rest)
{
    char *m = as_path_escape(a->mailbox), *id = as_path_escape(a->draft_id);
    char *url = xasprintf("%s/v1.0/users/%s/messages%s%s%s", a->up->api_url, m,
                          a->draft_id[0] != '\0' ? "/" : "", id, rest);

    free(m);
    free(id);
    return url;
}

/* A failure: the draft (if any) is deleted first, then the failure is reported. */
static void as_large_fail(struct apisend *a, enum verdict_cause cause, enum verdict_scope scope,
                          const char *action, const char *reply)
{
    if (a->draft_id[0] == '\0' || a->lstep == L_CLEANUP) {
        as_finish(a, cause, scope, action, "%s", reply);
        return;
    }
    a->lf_cause = cause;
    a->lf_scope = scope;
    a->lf_action = action;
    snprintf(a->lf_reply, sizeof a->lf_reply, "%s", reply);
    as_large_http(a, L_CLEANUP, "DELETE", as_msg_url(a, ""), NULL, NULL, 0, NULL);
}

/* Appends ,"isInline":...,"contentId":... for att. */
static void as_att_common(struct buf *b, const struct apimime_attachment *att)
{
    buf_append(b, "\"name\":", 7);
    json_quote(b, att->name);
    buf_append(b, ",\"contentType\":", 15);
    json_quote(b, att->content_type);
    if (att->is_inline)
        buf_append(b, ",\"isInline\":true", 16);
    else
        buf_append(b, ",\"isInline\":false", 17);
    if (att->content_id != NULL) {
        buf_append(b, ",\"contentId\":", 13);
        json_quote(b, att->content_id);
    }
}

static void as_large_attachment(struct apisend *a)
{
    const struct apimime_attachment *att = &a->split.att[a->att_i];
    struct buf *b = buf_new(0); /* no cap: a long file name must not cut the JSON short */
    enum as_lstep step = L_SESSION;
    const char *rest = "/attachments/createUploadSession";
    char *json;
    size_t n;

    if (att->len < (size_t)AS_GRAPH_ATTACH_MAX) {
        char *b64 = apimime_base64(att->data, att->len, &n);

        buf_reserve(b, n + 4096);
        buf_puts(b, "{\"@odata.type\":\"#microsoft.graph.fileAttachment\",");
        as_att_common(b, att);
        buf_puts(b, ",\"contentBytes\":\"");
        buf_append(b, b64, n);
        buf_puts(b, "\"}");
        free(b64);
        step = L_ATTACH;
        rest = "/attachments";
    } else {
        buf_puts(b, "{\"AttachmentItem\":{\"attachmentType\":\"file\",");
        as_att_common(b, att);
        buf_printf(b, ",\"size\":%zu}}", att->len);
    }
    json = buf_steal(b, &n);
    buf_free(b);
    as_large_http(a, step, "POST", as_msg_url(a, rest), json, NULL, 0, "application/json");
}

static void as_large_chunk(struct apisend *a)
{
    const struct apimime_attachment *att = &a->split.att[a->att_i];
    size_t n = att->len - a->put_off;

    if (n > AS_GRAPH_CHUNK)
        n = AS_GRAPH_CHUNK;
    a->put_len = n;
    snprintf(a->range, sizeof a->range, "Content-Range: bytes %zu-%zu/%zu", a->put_off,
             a->put_off + n - 1, att->len);
    as_large_http(a, L_PUT, "PUT", xstrdup(a->upload_url), NULL, att->data + a->put_off, n,
                  "application/octet-stream");
}

/* The step after a successful one. */
static void as_large_next(struct apisend *a)
{
    if (a->stale_i < a->nstale) {
        /* A draft an earlier attempt left (relayd was stopped mid-upload): deleted first. */
        snprintf(a->draft_id, sizeof a->draft_id, "%s", a->stale[a->stale_i++]);
        log_info("%012llX: upstream %s: deleting draft %s left by an earlier attempt",
                 (unsigned long long)a->msg->id, a->up->name, a->draft_id);
        as_large_http(a, L_DELETE_STALE, "DELETE", as_msg_url(a, ""), NULL, NULL, 0, NULL);
        a->draft_id[0] = '\0';
        return;
    }
    if (a->draft_id[0] == '\0') {
        struct buf *mime = buf_new(0);
        char *b64;

        buf_printf(mime, "X-Relayd-Queue-Id: %012llX\r\n", (unsigned long long)a->msg->id);
        buf_append(mime, a->split.draft, a->split.draft_len);
        b64 = apimime_base64(mime->data, mime->len, NULL);
        buf_free(mime);
        as_large_http(a, L_DRAFT, "POST", as_msg_url(a, ""), b64, NULL, 0, "text/plain");
        return;
    }
    if (!a->up->save_to_sent_items && !a->patched) {
        as_large_http(a, L_PATCH, "PATCH", as_msg_url(a, ""), xstrdup(AS_NO_SENT_ITEMS), NULL, 0,
                      "application/json");
        return;
    }
    if (a->att_i < a->split.natt) {
        as_large_attachment(a);
        return;
    }
    as_large_http(a, L_SEND, "POST", as_msg_url(a, "/send"), NULL, "", 0, "text/plain");
}

static void as_large_answer(struct apisend *a, const struct http_response *res)
{
    char code[128], text[300], reply[1024], id[512];
    struct verdict v;

    if (res->status == 0 || res->status >= 300) {
        if (a->lstep == L_CLEANUP) {
            as_finish(a, a->lf_cause, a->lf_scope, a->lf_action, "%s", a->lf_reply);
            return;
        }
        if (a->lstep == L_DELETE_STALE && res->status == 404) {
            as_large_next(a); /* gone already */
            return;
        }
        if (res->status == 0) {
            snprintf(reply, sizeof reply, "graph %s (%s) as %s: %s", a->call,
                     as_lstep_names[a->lstep], a->mailbox, res->error);
            as_large_fail(a, VERDICT_TRANSIENT, VERDICT_SCOPE_SESSION, NULL, reply);
            return;
        }
        apisend_error_parse(res->body, res->len, code, sizeof code, text, sizeof text);
        verdict_http(1, res->status, code, text, &v);
        a->retry_after = v.cause == VERDICT_SLOWDOWN && res->retry_after > 0 ? res->retry_after : 0;
        if (res->status == 401 && a->oauth2 != NULL)
            oauth2_invalidate(a->oauth2, a->up);
        snprintf(reply, sizeof reply, "graph %s (%s) as %s: HTTP %ld%s%s%s%s", a->call,
                 as_lstep_names[a->lstep], a->mailbox, res->status, code[0] != '\0' ? " " : "",
                 code, text[0] != '\0' ? ": " : "", text);
        as_large_fail(a, v.cause, v.scope,
                      apisend_graph_action(as_lstep_names[a->lstep], res->status, &v), reply);
        return;
    }
    switch (a->lstep) {
    case L_LIST: {
        /* {"value":[{"id":"..."},...]}: every "id" member is a draft left by this message. */
        const char *p = res->body, *end = res->body + res->len;

        while (a->nstale < AS_MAX_STALE && p < end && (p = strstr(p, "\"id\"")) != NULL &&
               json_str_after(p, (size_t)(end - p), "id", id, sizeof id)) {
            a->stale[a->nstale++] = xstrdup(id);
            p += 4;
        }
        break;
    }
    case L_DELETE_STALE:
        break;
    case L_DRAFT:
        if (!json_str_after(res->body, res->len, "id", a->draft_id, sizeof a->draft_id) ||
            a->draft_id[0] == '\0') {
            snprintf(reply, sizeof reply,
                     "graph %s (create draft) as %s: HTTP %ld without a draft id", a->call,
                     a->mailbox, res->status);
            as_large_fail(a, VERDICT_TRANSIENT, VERDICT_SCOPE_MESSAGE, NULL, reply);
            return;
        }
        break;
    case L_PATCH:
        a->patched = 1;
        break;
    case L_ATTACH:
        a->att_i++;
        break;
    case L_SESSION: {
        char url[2048];

        if (!json_str_after(res->body, res->len, "uploadUrl", url, sizeof url) ||
            strncmp(url, "https://", 8) != 0) {
            snprintf(reply, sizeof reply,
                     "graph draft+upload (createUploadSession) as %s: no https uploadUrl",
                     a->mailbox);
            as_large_fail(a, VERDICT_TRANSIENT, VERDICT_SCOPE_MESSAGE, NULL, reply);
            return;
        }
        free(a->upload_url);
        a->upload_url = xstrdup(url);
        a->put_off = 0;
        as_large_chunk(a);
        return;
    }
    case L_PUT:
        a->put_off += a->put_len;
        if (a->put_off < a->split.att[a->att_i].len) {
            as_large_chunk(a);
            return;
        }
        a->att_i++;
        break;
    case L_SEND: {
        size_t total = 0, i;

        for (i = 0; i < a->split.natt; i++)
            total += a->split.att[i].len;
        if (a->split.natt > 0)
            as_finish(a, VERDICT_SENT, VERDICT_SCOPE_MESSAGE, NULL,
                      "graph %s as %s: HTTP %ld (%zu attachment%s, %zu bytes; %s)", a->call,
                      a->mailbox, res->status, a->split.natt, a->split.natt == 1 ? "" : "s", total,
                      a->patched ? "not saved to Sent Items" : "saved to Sent Items");
        else
            as_finish(a, VERDICT_SENT, VERDICT_SCOPE_MESSAGE, NULL, "graph %s as %s: HTTP %ld (%s)",
                      a->call, a->mailbox, res->status,
                      a->patched ? "not saved to Sent Items" : "saved to Sent Items");
        return;
    }
    case L_CLEANUP:
        as_finish(a, a->lf_cause, a->lf_scope, a->lf_action, "%s", a->lf_reply);
        return;
    }
    as_large_next(a);
}

static void as_large_start(struct apisend *a, const char *copy, size_t copylen, int split)
{
    char err[300], *m, *url, *flt, *q;

    a->large = 1;
    a->patched = 0;
    a->call = split ? "draft+upload" : "draft";
    a->draft_id[0] = '\0';
    if (!split) {
        /* Under sendMail's 4 MB: the whole copy is the draft, no attachments to add. */
        a->split.draft = xmalloc(copylen + 1);
        memcpy(a->split.draft, copy, copylen);
        a->split.draft[copylen] = '\0';
        a->split.draft_len = copylen;
    } else if (apimime_graph_split(copy, copylen, &a->split, err, sizeof err) != 0) {
        as_finish(a, VERDICT_PERMANENT, VERDICT_SCOPE_MESSAGE, NULL,
                  "graph draft+upload as %s: cannot split the message into a draft and "
                  "attachments: %s",
                  a->mailbox, err);
        return;
    }
    for (size_t i = 0; i < a->split.natt; i++) {
        if (a->split.att[i].len > (size_t)APISEND_GRAPH_ATTACH_MAX) {
            as_too_large(a,
                         "graph draft+upload as %s: attachment %s too large for the Graph API "
                         "(%zu bytes; it takes 150 MB)",
                         a->mailbox, a->split.att[i].name, a->split.att[i].len);
            return;
        }
    }
    as_enter(a, AS_SENDING);
    /* First the drafts an earlier attempt of this message may have left. */
    flt = xasprintf("singleValueExtendedProperties/Any(ep: ep/id eq '" AS_QID_PROP
                    "' and ep/value eq '%012llX')",
                    (unsigned long long)a->msg->id);
    q = as_path_escape(flt);
    m = as_path_escape(a->mailbox);
    url = xasprintf("%s/v1.0/users/%s/mailFolders/drafts/messages?%%24filter=%s&%%24select=id",
                    a->up->api_url, m, q);
    free(flt);
    free(q);
    free(m);
    as_large_http(a, L_LIST, "GET", url, NULL, NULL, 0, NULL);
}

/* Builds the request for the message (or the probe's GET) and starts it. */
static void as_request(struct apisend *a, const char *token)
{
    int graph = a->up->transport == CFG_TRANSPORT_GRAPH;
    char *m = as_path_escape(a->mailbox), *copy = NULL;
    const char *hdrs[4] = {NULL, NULL, NULL, NULL};
    struct http_request rq;
    size_t copylen = 0, b64len;
    const char *method = "POST";

    a->authz = xasprintf("Authorization: Bearer %s", token);
    hdrs[0] = a->authz;
    hdrs[1] = "Accept: application/json";
    if (a->is_probe) {
        method = "GET";
        a->url = graph ? xasprintf("%s/v1.0/users/%s", a->up->api_url, m)
                       : xasprintf("%s/gmail/v1/users/%s/profile", a->up->api_url, m);
    } else {
        apisend_prepare(a->msg->body, a->msg->len, a->msg->rcpts, a->msg->nrcpts, &copy, &copylen,
                        a->note, sizeof a->note);
        if (graph) {
            a->call = "sendMail";
            b64len = apimime_base64_len(copylen);
            if (b64len > (size_t)APISEND_GRAPH_MAX || !a->up->save_to_sent_items) {
                /* A draft (marked to be deleted after submission unless Sent Items keeps a
                 * copy), over the 4 MB request limit with its attachments uploaded, then
                 * send.  64: the draft's X-Relayd-Queue-Id: line, base64-encoded. */
                int split = b64len + 64 > (size_t)APISEND_GRAPH_MAX;

                free(m);
                as_large_start(a, copy, copylen, split);
                free(copy);
                return;
            }
            a->body = apimime_base64(copy, copylen, &a->bodylen);
            a->url = xasprintf("%s/v1.0/users/%s/sendMail", a->up->api_url, m);
            hdrs[2] = "Content-Type: text/plain";
        } else if (copylen <= (size_t)APISEND_GMAIL_RAW_MAX) {
            char *b64 = apimime_base64url(copy, copylen, &b64len);

            a->call = "raw";
            a->body = xasprintf("{\"raw\":\"%s\"}", b64);
            a->bodylen = strlen(a->body);
            free(b64);
            a->url = xasprintf("%s/gmail/v1/users/%s/messages/send", a->up->api_url, m);
            hdrs[2] = "Content-Type: application/json";
        } else if (copylen <= (size_t)APISEND_GMAIL_MAX) {
            a->call = "media";
            a->body = copy;
            a->bodylen = copylen;
            copy = NULL;
            a->url = xasprintf("%s/upload/gmail/v1/users/%s/messages/send?uploadType=media",
                               a->up->api_url, m);
            hdrs[2] = "Content-Type: message/rfc822";
        } else {
            free(copy);
            free(m);
            a->call = "media";
            as_too_large(a,
                         "gmail media as %s: message too large for the Gmail API (%zu bytes; "
                         "it takes 35 MB)",
                         a->mailbox, copylen);
            return;
        }
        free(copy);
    }
    free(m);
    memset(&rq, 0, sizeof rq);
    rq.method = method;
    rq.url = a->url;
    rq.headers = hdrs;
    rq.body = a->body;
    rq.bodylen = a->bodylen;
    rq.ca_file = a->up->ca_file;
    rq.connect_timeout = a->up->connect_timeout;
    rq.timeout = a->is_probe ? a->up->command_timeout : a->up->data_timeout;
    rq.max_answer = 64 * 1024;
    as_enter(a, AS_SENDING);
    if (http_request(a->http, &rq, as_on_answer, a, &a->req) != 0)
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_SESSION, NULL,
                  "%s %s as %s: libcurl refused the request", as_api(a), a->call, a->mailbox);
}

static void as_on_token(void *arg, const char *token, const char *err)
{
    struct as_ticket *t = arg;
    struct apisend *a = t->a;

    free(t);
    if (a == NULL)
        return; /* aborted meanwhile */
    a->ticket = NULL;
    if (token == NULL) {
        if (a->is_probe && a->step != NULL)
            a->step(a->done_arg, 0, err != NULL ? err : "oauth2: no token");
        as_finish(a, VERDICT_CONFIG, VERDICT_SCOPE_SESSION, NULL, "%s %s as %s: %s", as_api(a),
                  a->call, a->mailbox, err != NULL ? err : "oauth2: no token");
        return;
    }
    if (a->is_probe && a->step != NULL) {
        char line[200];

        snprintf(line, sizeof line, "token (%s): ok, valid for %lds",
                 oauth2_grant_name(a->up->grant), oauth2_token_ttl(a->oauth2, a->up));
        a->step(a->done_arg, 1, line);
    }
    if (a->is_probe && a->mailbox[0] == '\0') {
        if (a->step != NULL)
            a->step(a->done_arg, 1,
                    "mailbox: taken from each message's sender (mailbox = sender); not checked");
        as_finish(a, VERDICT_SENT, VERDICT_SCOPE_SESSION, NULL, "%s token obtained", as_api(a));
        return;
    }
    as_request(a, token);
}

/* The message (or probe) starts: mailbox, then the token. */
static void as_start(struct apisend *a, const char *sender)
{
    as_enter(a, AS_TOKEN);
    a->note[0] = '\0';
    a->retry_after = 0;
    a->call = a->is_probe                               ? "GET mailbox"
              : a->up->transport == CFG_TRANSPORT_GRAPH ? "sendMail"
                                                        : "send";
    if (apisend_mailbox(a->up, sender, a->mailbox, sizeof a->mailbox, &a->how) != 0 &&
        a->is_probe) {
        a->mailbox[0] = '\0'; /* taken from each message: the probe checks the token only */
    } else if (a->mailbox[0] == '\0') {
        snprintf(a->mailbox, sizeof a->mailbox, "?");
        snprintf(a->fail_now, sizeof a->fail_now,
                 "no sending mailbox for sender <%s> (mailbox = %s): set mailbox_map or a fixed "
                 "mailbox",
                 sender != NULL ? sender : "", a->up->mailbox != NULL ? a->up->mailbox : "");
        uv_timer_start(&a->timer, as_timer_fire, 0, 0);
        return;
    }
    if (a->oauth2 == NULL) {
        snprintf(a->fail_now, sizeof a->fail_now, "no OAuth 2.0 token manager");
        uv_timer_start(&a->timer, as_timer_fire, 0, 0);
        return;
    }
    a->ticket = xcalloc(1, sizeof(*a->ticket));
    a->ticket->a = a;
    if (oauth2_token_get(a->oauth2, a->up, as_on_token, a->ticket) != 0) {
        free(a->ticket);
        a->ticket = NULL;
        snprintf(a->fail_now, sizeof a->fail_now, "upstream %s has no OAuth 2.0 account",
                 a->up->name);
        uv_timer_start(&a->timer, as_timer_fire, 0, 0);
    }
}

static void as_timer_fire(uv_timer_t *t)
{
    struct apisend *a = t->data;

    switch (a->state) {
    case AS_OPENING:
        as_enter(a, AS_IDLE);
        uv_timer_start(&a->timer, as_timer_fire,
                       (uint64_t)(a->up->idle_timeout > 0 ? a->up->idle_timeout : 30) * 1000, 0);
        a->ev(a->ev_arg, NULL, SMTPC_EV_READY, NULL);
        break;
    case AS_IDLE:
        as_close(a); /* idle timeout */
        break;
    case AS_TOKEN:
        if (a->fail_now[0] != '\0') {
            char why[300];

            snprintf(why, sizeof why, "%s", a->fail_now);
            a->fail_now[0] = '\0';
            if (a->is_probe && a->step != NULL)
                a->step(a->done_arg, 0, why);
            as_finish(a, VERDICT_CONFIG, VERDICT_SCOPE_MESSAGE, NULL, "%s %s: %s", as_api(a),
                      a->call, why);
        }
        break;
    case AS_SENDING:
    case AS_CLOSING:
        break;
    }
}

/* ---- closing ---- */

static void as_closed_one(struct apisend *a)
{
    if (--a->nopen > 0)
        return;
    if (!a->is_probe)
        a->ev(a->ev_arg, NULL, SMTPC_EV_CLOSED, NULL);
    free(a);
}

static void as_timer_closed(uv_handle_t *h)
{
    as_closed_one(h->data);
}

static void as_http_closed(void *arg)
{
    as_closed_one(arg);
}

/* Ends what is in progress (done with "aborted") and closes the handles. */
static void as_close(struct apisend *a)
{
    if (a->state == AS_CLOSING)
        return;
    a->aborting = 1;
    if (a->ticket != NULL) {
        a->ticket->a = NULL; /* as_on_token() frees it */
        a->ticket = NULL;
    }
    if (a->req != NULL)
        http_abort(a->req); /* as_on_answer() -> as_finish() */
    else if (a->msg != NULL || (a->is_probe && a->done != NULL))
        as_finish(a, VERDICT_TRANSIENT, VERDICT_SCOPE_MESSAGE, NULL, "%s", SMTPC_ABORTED);
    if (a->state == AS_CLOSING)
        return; /* a probe's as_finish() closed it */
    as_enter(a, AS_CLOSING);
    uv_timer_stop(&a->timer);
    http_close(a->http, as_http_closed, a);
    uv_close((uv_handle_t *)&a->timer, as_timer_closed);
}

/* ---- public ---- */

static struct apisend *as_new(uv_loop_t *loop, const struct cfg_upstream *up, struct oauth2 *o)
{
    struct apisend *a = xcalloc(1, sizeof(*a));

    a->loop = loop;
    a->up = up;
    a->oauth2 = o;
    a->http = http_new(loop);
    uv_timer_init(loop, &a->timer);
    a->timer.data = a;
    a->nopen = 2;
    a->how = "fixed";
    a->call = "";
    return a;
}

int apisend_probe(uv_loop_t *loop, const struct cfg_upstream *up, struct oauth2 *oauth2,
                  smtpc_step_fn step, smtpc_done_fn done, void *arg, struct apisend **out)
{
    struct apisend *a;

    if (up->transport == CFG_TRANSPORT_SMTP)
        return UV_EINVAL;
    a = as_new(loop, up, oauth2);
    a->is_probe = 1;
    a->step = step;
    a->done = done;
    a->done_arg = arg;
    a->state = AS_IDLE;
    as_start(a, NULL);
    if (out != NULL)
        *out = a;
    return 0;
}

void apisend_probe_abort(struct apisend *a)
{
    as_close(a);
}

int apisend_session_open(uv_loop_t *loop, const struct cfg_upstream *up, struct oauth2 *oauth2,
                         smtpc_event_fn ev, void *arg, struct apisend **out)
{
    struct apisend *a;

    if (up->transport == CFG_TRANSPORT_SMTP)
        return UV_EINVAL;
    a = as_new(loop, up, oauth2);
    a->ev = ev;
    a->ev_arg = arg;
    a->state = AS_OPENING;
    uv_timer_start(&a->timer, as_timer_fire, 0, 0);
    *out = a;
    return 0;
}

int apisend_session_idle(const struct apisend *a)
{
    return a->state == AS_IDLE;
}

int apisend_session_send(struct apisend *a, const struct smtpc_msg *msg, smtpc_done_fn done,
                         void *arg)
{
    if (a->state != AS_IDLE)
        return UV_EBUSY;
    uv_timer_stop(&a->timer);
    a->msg = msg;
    a->done = done;
    a->done_arg = arg;
    as_start(a, msg->sender);
    return 0;
}

void apisend_session_quit(struct apisend *a)
{
    as_close(a);
}

void apisend_session_abort(struct apisend *a)
{
    as_close(a);
}

int apisend_session_offered(const struct apisend *a)
{
    return a->state == AS_SENDING && (!a->large || a->lstep == L_SEND);
}

void apisend_set_failover(struct apisend *a, int has_next)
{
    a->can_failover = has_next;
}

long apisend_retry_after(const struct apisend *a)
{
    return a->retry_after;
}
