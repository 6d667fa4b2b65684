/*
 * test_apisend - the pure pieces of the HTTP API transports: which mailbox sends, the API's
 * copy of a message (envelope-only recipients as Bcc:), the provider's error code and text
 * from Graph's and Gmail's error bodies.  No loop, no network (the
 * requests themselves are covered by tests/e2e/t_api_*.sh).
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdlib.h>
#include <string.h>

#include "config/cfg.h"
#include "relayd/apisend.h"
#include "relayd/verdict.h"

TestSuite(apisend, .timeout = 10);

static struct cfg_map_entry map_entries[] = {
    {"scanner@lan", "scans@corp.example"},
    {"@fax.lan", "fax@corp.example"},
};

struct mailbox_case {
    const char *label;
    const char *mailbox; /* the key */
    int with_map;
    const char *sender;
    int want_rc;
    const char *want, *want_how;
};

static const struct mailbox_case mailbox_cases[] = {
    {"fixed", "fax@corp.example", 0, "dev@lan", 0, "fax@corp.example", "fixed"},
    {"username when mailbox is not set", NULL, 0, "dev@lan", 0, "relay@corp.example", "fixed"},
    {"the envelope sender", "sender", 0, "scanner@corp.example", 0, "scanner@corp.example",
     "sender"},
    {"null sender with mailbox = sender", "sender", 0, "", -1, "", "sender"},
    {"map: exact address", "fax@corp.example", 1, "scanner@lan", 0, "scans@corp.example", "map"},
    {"map: domain", "sender", 1, "a@fax.lan", 0, "fax@corp.example", "map"},
    {"map misses: fixed", "fax@corp.example", 1, "other@lan", 0, "fax@corp.example", "fixed"},
    {"map with the null sender: fixed", "fax@corp.example", 1, "", 0, "fax@corp.example", "fixed"},
};

/* mailbox_map first, then mailbox (an address or "sender"), else username. */
Test(apisend, mailbox)
{
    for (size_t i = 0; i < sizeof(mailbox_cases) / sizeof(mailbox_cases[0]); i++) {
        const struct mailbox_case *c = &mailbox_cases[i];
        struct cfg_upstream up = {
            .name = "m365", .username = "relay@corp.example", .mailbox = (char *)c->mailbox};
        char out[320];
        const char *how = NULL;
        int rc;

        if (c->with_map)
            up.mailbox_map = (struct cfg_map){map_entries, 2};
        rc = apisend_mailbox(&up, c->sender, out, sizeof out, &how);
        cr_expect(eq(int, rc, c->want_rc), "%s: rc", c->label);
        cr_expect(eq(str, out, (char *)c->want), "%s: mailbox", c->label);
        cr_expect(eq(str, (char *)how, (char *)c->want_how), "%s: how", c->label);
    }
}

struct prepare_case {
    const char *label;
    const char *msg;
    const char *rcpts[4];
    const char *want; /* the API's copy */
    const char *want_note_part;
};

static const struct prepare_case prepare_cases[] = {
    {"every recipient in To/Cc",
     "To: a@x.example\r\nCc: b@x.example\r\n\r\nbody\r\n",
     {"a@x.example", "b@x.example"},
     "To: a@x.example\r\nCc: b@x.example\r\n\r\nbody\r\n",
     ""},
    {"one only in the envelope",
     "To: a@x.example\r\n\r\nbody\r\n",
     {"a@x.example", "hidden@y.example"},
     "To: a@x.example\r\nBcc: hidden@y.example\r\n\r\nbody\r\n",
     "bcc +1"},
    {"a header recipient outside the envelope is left out",
     "To: a@x.example, b@x.example\r\n\r\nbody\r\n",
     {"a@x.example"},
     "To: a@x.example\r\n\r\nbody\r\n",
     "b@x.example"},
};

/* The API's copy names exactly the envelope recipients (apimime), the body unchanged. */
Test(apisend, prepare)
{
    for (size_t i = 0; i < sizeof(prepare_cases) / sizeof(prepare_cases[0]); i++) {
        const struct prepare_case *c = &prepare_cases[i];
        size_t n = 0, outlen;
        char *out, note[200];

        while (n < 4 && c->rcpts[n] != NULL)
            n++;
        apisend_prepare(c->msg, strlen(c->msg), c->rcpts, n, &out, &outlen, note, sizeof note);
        cr_expect(eq(sz, outlen, strlen(c->want)), "%s: length", c->label);
        cr_expect(eq(str, out, (char *)c->want), "%s: copy", c->label);
        /* "" means no note at all (nothing changed), not "any note". */
        if (c->want_note_part[0] == '\0')
            cr_expect(eq(str, note, ""), "%s: note %s", c->label, note);
        else
            cr_expect(strstr(note, c->want_note_part) != NULL, "%s: note %s", c->label, note);
        free(out);
    }
}

struct error_case {
    const char *label;
    const char *body;
    const char *want_code, *want_msg;
};

static const struct error_case error_cases[] = {
    {"graph",
     "{\"error\":{\"code\":\"ErrorAccessDenied\",\"message\":\"Access is denied.\","
     "\"innerError\":{\"date\":\"2026-01-01T00:00:00\",\"request-id\":\"x\"}}}",
     "ErrorAccessDenied", "Access is denied."},
    {"gmail",
     "{\n  \"error\": {\n    \"code\": 403,\n    \"message\": \"Request had insufficient "
     "authentication scopes.\",\n    \"errors\": [{\"message\": \"Insufficient "
     "Permission\", \"domain\": \"global\", \"reason\": \"insufficientPermissions\"}],"
     "\n    \"status\": \"PERMISSION_DENIED\"\n  }\n}",
     "insufficientPermissions", "Request had insufficient authentication scopes."},
    {"gmail without errors[]",
     "{\"error\":{\"code\":429,\"message\":\"slow\",\"status\":"
     "\"RESOURCE_EXHAUSTED\"}}",
     "RESOURCE_EXHAUSTED", "slow"},
    {"escaped quote", "{\"error\":{\"code\":\"E\",\"message\":\"say \\\"no\\\"\"}}", "E",
     "say \"no\""},
    {"not JSON", "<html>Bad Gateway</html>", "", ""},
    {"empty", "", "", ""},
};

/* The provider's code and text, from Graph's and Gmail's error shapes. */
Test(apisend, error_parse)
{
    for (size_t i = 0; i < sizeof(error_cases) / sizeof(error_cases[0]); i++) {
        const struct error_case *c = &error_cases[i];
        char code[64], msg[128];

        apisend_error_parse(c->body, strlen(c->body), code, sizeof code, msg, sizeof msg);
        cr_expect(eq(str, code, (char *)c->want_code), "%s: code", c->label);
        cr_expect(eq(str, msg, (char *)c->want_msg), "%s: message", c->label);
    }
}

/* The action for a refused Graph request: a 403 on a call on drafts names Mail.ReadWrite
 * (Mail.Send covers sendMail and the final send only); anything else keeps verdict_http()'s. */
struct action_case {
    const char *step;
    long status;
    const char *code;
    int want_readwrite;
};

static const struct action_case action_cases[] = {
    {"create draft", 403, "ErrorAccessDenied", 1},
    {"list drafts", 403, "ErrorAccessDenied", 1},
    {"set delete-after-submit", 403, "ErrorAccessDenied", 1},
    {"attachment", 403, "ErrorAccessDenied", 1},
    {"createUploadSession", 403, "ErrorAccessDenied", 1},
    {"delete stale draft", 403, "", 1},
    {"sendMail", 403, "ErrorAccessDenied", 0},
    {"send", 403, "ErrorAccessDenied", 0},
    {"upload", 403, "", 0},
    {"create draft", 401, "InvalidAuthenticationToken", 0},
    {"create draft", 403, "ErrorSendAsDenied", 0}, /* a message's Send As, not the app */
    {"create draft", 500, "", 0},
    {NULL, 403, "ErrorAccessDenied", 0},
};

Test(apisend, graph_action)
{
    for (size_t i = 0; i < sizeof(action_cases) / sizeof(action_cases[0]); i++) {
        const struct action_case *c = &action_cases[i];
        struct verdict v;
        const char *got;

        verdict_http(1, c->status, c->code, "", &v);
        got = apisend_graph_action(c->step, c->status, &v);
        if (c->want_readwrite) {
            cr_expect_str_eq(got, APISEND_ACT_READWRITE, "%s %ld %s", c->step, c->status, c->code);
            cr_expect(strstr(got, "Mail.ReadWrite") != NULL);
        } else {
            cr_expect(got == v.action, "%s %ld %s: want verdict_http's action",
                      c->step != NULL ? c->step : "(null)", c->status, c->code);
        }
    }
}
