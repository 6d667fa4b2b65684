/*
 * test_authsasl - mechanism choice and the PLAIN/LOGIN dialogues against Cyrus SASL's
 * client plugins (libsasl2-modules), no server needed.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdlib.h>
#include <string.h>

#include "common/authsasl.h"

static struct authsasl *a;
static char err[256];

static void setup(void)
{
    cr_assert(eq(int, authsasl_client_init(err, sizeof(err)), 0), "%s", err);
    cr_assert(
        eq(int, authsasl_client_new("relay.example.com", "user", "pass", &a, err, sizeof(err)), 0));
    err[0] = '\0';
}

static void teardown(void)
{
    a = authsasl_free(a);
}

TestSuite(authsasl, .init = setup, .fini = teardown, .timeout = 10);

/* PLAIN is picked first from "PLAIN LOGIN" and its initial response is \0user\0pass. */
Test(authsasl, plain_initial_response)
{
    const char *mech;
    char *resp;

    cr_assert(
        eq(int, authsasl_client_start(a, "PLAIN LOGIN", NULL, 1, 0, &mech, &resp, err, sizeof(err)),
           AUTHSASL_MORE),
        "%s", err);
    cr_assert(eq(str, (char *)mech, "PLAIN"));
    cr_assert_not_null(resp);
    cr_assert(eq(str, resp, "AHVzZXIAcGFzcw==")); /* base64("\0user\0pass") */
    free(resp);
}

/* LOGIN answers the Username: and Password: challenges in base64. */
Test(authsasl, login_steps)
{
    const char *mech;
    char *resp;

    cr_assert(
        eq(int,
           authsasl_client_start(a, "PLAIN LOGIN", "LOGIN", 1, 0, &mech, &resp, err, sizeof(err)),
           AUTHSASL_MORE),
        "%s", err);
    cr_assert(eq(str, (char *)mech, "LOGIN"));
    cr_assert_null(resp);
    cr_assert(ge(int, authsasl_client_step(a, "VXNlcm5hbWU6", &resp, err, sizeof(err)), 0));
    cr_assert(eq(str, resp, "dXNlcg==")); /* "user" */
    free(resp);
    cr_assert(ge(int, authsasl_client_step(a, "UGFzc3dvcmQ6", &resp, err, sizeof(err)), 0));
    cr_assert(eq(str, resp, "cGFzcw==")); /* "pass" */
    free(resp);
}

/* A preference the server cannot satisfy fails, naming the preferred mechanism. */
Test(authsasl, pref_not_offered)
{
    const char *mech;
    char *resp;

    cr_assert(eq(
        int,
        authsasl_client_start(a, "PLAIN LOGIN", "CRAM-MD5", 1, 0, &mech, &resp, err, sizeof(err)),
        AUTHSASL_FAIL));
    cr_assert_null(mech);
    cr_assert_null(resp);
    cr_assert_not_null(strstr(err, "CRAM-MD5"), "%s", err);
}

/* Without TLS, PLAIN and LOGIN are refused unless explicitly allowed. */
Test(authsasl, plaintext_needs_tls)
{
    const char *mech;
    char *resp;

    cr_assert(
        eq(int, authsasl_client_start(a, "PLAIN LOGIN", NULL, 0, 0, &mech, &resp, err, sizeof(err)),
           AUTHSASL_FAIL));
    cr_assert_not_null(strstr(err, "without TLS"), "%s", err);
    cr_assert_null(strstr(err, "pass"), "%s", err);
    cr_assert(
        eq(int, authsasl_client_start(a, "PLAIN LOGIN", NULL, 0, 1, &mech, &resp, err, sizeof(err)),
           AUTHSASL_MORE),
        "%s", err);
    cr_assert(eq(str, (char *)mech, "PLAIN"));
    free(resp);
}

/* Without a preference, CRAM-MD5 beats PLAIN and answers the challenge with an HMAC. */
Test(authsasl, cram_md5_ranked_first)
{
    const char *mech;
    char *resp;

    cr_assert(eq(int,
                 authsasl_client_start(a, "LOGIN PLAIN CRAM-MD5", NULL, 1, 0, &mech, &resp, err,
                                       sizeof(err)),
                 AUTHSASL_MORE),
              "%s", err);
    cr_assert(eq(str, (char *)mech, "CRAM-MD5"));
    cr_assert_null(resp);
    /* RFC 2195's example challenge; the answer is "user <hex digest>" in base64. */
    cr_assert(ge(int,
                 authsasl_client_step(a,
                                      "PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1j"
                                      "aS5uZXQ+",
                                      &resp, err, sizeof(err)),
                 0),
              "%s", err);
    /* base64("user " + hex(HMAC-MD5("pass", challenge))), computed independently. */
    cr_assert(eq(str, resp, "dXNlciAyMjRmOGFmMWJmOWJjZjI2ZjRlZjAzMjllMDYxNDA1Yw=="));
    free(resp);
}

/* Garbage in a 334 challenge is an error, not a crash. */
Test(authsasl, bad_challenge)
{
    const char *mech;
    char *resp;

    cr_assert(eq(int, authsasl_client_start(a, "LOGIN", NULL, 1, 0, &mech, &resp, err, sizeof(err)),
                 AUTHSASL_MORE),
              "%s", err);
    cr_assert(
        eq(int, authsasl_client_step(a, "!!!notbase64", &resp, err, sizeof(err)), AUTHSASL_FAIL));
    cr_assert_null(resp);
}

/* ---- server side: a private sasldb made with saslpasswd2, one account ---- */

#include <stdio.h>
#include <unistd.h>

static char srv_dir[64], srv_db[128];
static struct authsasl_server *srv;

static void srv_setup(void)
{
    char cmd[512];

    snprintf(srv_dir, sizeof(srv_dir), "/tmp/test_authsasl.XXXXXX");
    cr_assert_not_null(mkdtemp(srv_dir));
    snprintf(srv_db, sizeof(srv_db), "%s/sasldb2", srv_dir);
    snprintf(cmd, sizeof(cmd),
             "printf %%s s3cret | saslpasswd2 -p -c -f %s -u example.com alice", srv_db);
    cr_assert(eq(int, system(cmd), 0), "saslpasswd2 failed (sasl2-bin installed?)");
    cr_assert(eq(int, authsasl_server_init(err, sizeof(err)), 0), "%s", err);
    /* The client side too, for CRAM-MD5 answers. */
    cr_assert(eq(int, authsasl_client_init(err, sizeof(err)), 0), "%s", err);
    err[0] = '\0';
}

static void srv_teardown(void)
{
    char cmd[256];

    srv = authsasl_server_free(srv);
    a = authsasl_free(a);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", srv_dir);
    if (system(cmd) != 0)
        cr_log_warn("could not remove %s", srv_dir);
}

TestSuite(authsasl_server, .init = srv_setup, .fini = srv_teardown, .timeout = 20);

static void srv_new(int secure, int allow_plain, int accept_any)
{
    struct authsasl_server_opts o = {
        .hostname = "example.com",
        .sasldb = srv_db,
        .mechs = "PLAIN LOGIN CRAM-MD5",
        .secure = secure,
        .allow_plain = allow_plain,
        .accept_any = accept_any,
    };

    cr_assert(eq(int, authsasl_server_new(&o, &srv, err, sizeof(err)), 0), "%s", err);
}

static char *b64(const char *s, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = malloc(n / 3 * 4 + 8), *o = out;
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        unsigned v = (unsigned char)s[i] << 16 | (unsigned char)s[i + 1] << 8 |
                     (unsigned char)s[i + 2];
        *o++ = tab[v >> 18];
        *o++ = tab[(v >> 12) & 63];
        *o++ = tab[(v >> 6) & 63];
        *o++ = tab[v & 63];
    }
    if (i < n) {
        unsigned v = (unsigned char)s[i] << 16 | (i + 1 < n ? (unsigned char)s[i + 1] << 8 : 0);
        *o++ = tab[v >> 18];
        *o++ = tab[(v >> 12) & 63];
        *o++ = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    *o = '\0';
    return out;
}

/* Plaintext mechanisms are offered only with TLS or when explicitly allowed. */
Test(authsasl_server, mechs_follow_tls)
{
    srv_new(1, 0, 0);
    cr_assert(eq(str, (char *)authsasl_server_mechs(srv), "PLAIN LOGIN CRAM-MD5"));
    srv = authsasl_server_free(srv);
    srv_new(0, 0, 0);
    cr_assert(eq(str, (char *)authsasl_server_mechs(srv), "CRAM-MD5"));
    srv = authsasl_server_free(srv);
    srv_new(0, 1, 0);
    cr_assert(eq(str, (char *)authsasl_server_mechs(srv), "PLAIN LOGIN CRAM-MD5"));
}

/* PLAIN with an initial response: right password 235, wrong password fails and the log
 * may name the user but the error text never carries the password. */
Test(authsasl_server, plain_initial)
{
    char *ch, *ir;

    srv_new(1, 0, 0);
    ir = b64("\0alice@example.com\0s3cret", 25);
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", ir, &ch, err, sizeof(err)),
                 AUTHSASL_DONE), "%s", err);
    free(ir);
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "alice@example.com"));

    ir = b64("\0alice@example.com\0wrongpw", 26);
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", ir, &ch, err, sizeof(err)),
                 AUTHSASL_FAIL));
    free(ir);
    cr_assert_null(ch);
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "alice@example.com"));
    cr_assert_null(strstr(err, "wrongpw"), "%s", err);
}

/* PLAIN without an initial response: "334 " (empty challenge), then the credentials; a bare
 * user name is looked up in the hostname's realm. */
Test(authsasl_server, plain_no_initial)
{
    char *ch, *resp;

    srv_new(1, 0, 0);
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE), "%s", err);
    cr_assert(eq(str, ch, ""));
    free(ch);
    resp = b64("\0alice\0s3cret", 13);
    cr_assert(eq(int, authsasl_server_step(srv, resp, &ch, err, sizeof(err)), AUTHSASL_DONE),
              "%s", err);
    free(resp);
}

/* LOGIN prompts exactly VXNlcm5hbWU6 and UGFzc3dvcmQ6 (printers depend on it); the
 * password is never taken for the user name. */
Test(authsasl_server, login_prompts)
{
    char *ch, *u = b64("alice@example.com", 17), *p = b64("s3cret", 6), *bad = b64("nope", 4);

    srv_new(1, 0, 0);
    cr_assert(eq(int, authsasl_server_start(srv, "login", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE), "%s", err);
    cr_assert(eq(str, ch, "VXNlcm5hbWU6"));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, u, &ch, err, sizeof(err)), AUTHSASL_MORE));
    cr_assert(eq(str, ch, "UGFzc3dvcmQ6"));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, p, &ch, err, sizeof(err)), AUTHSASL_DONE), "%s",
              err);

    /* With the user name as initial response, then a wrong password. */
    cr_assert(eq(int, authsasl_server_start(srv, "LOGIN", u, &ch, err, sizeof(err)),
                 AUTHSASL_MORE), "%s", err);
    cr_assert(eq(str, ch, "UGFzc3dvcmQ6"));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, bad, &ch, err, sizeof(err)), AUTHSASL_FAIL));
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "alice@example.com"));
    free(u);
    free(p);
    free(bad);
}

/* An empty user name for LOGIN: the password that follows is not logged as the user. */
Test(authsasl_server, login_empty_user_not_password)
{
    char *ch, *p = b64("s3cret", 6);

    srv_new(1, 0, 0);
    cr_assert(eq(int, authsasl_server_start(srv, "LOGIN", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE));
    free(ch);
    if (authsasl_server_step(srv, "", &ch, err, sizeof(err)) == AUTHSASL_MORE) {
        free(ch);
        authsasl_server_step(srv, p, &ch, err, sizeof(err));
        free(ch);
    }
    cr_assert_null(strstr(authsasl_server_username(srv), "s3cret"));
    free(p);
}

/* CRAM-MD5 against the sasldb, answered by our own client side: right and wrong. */
Test(authsasl_server, cram_md5)
{
    static const char *const pw[] = {"s3cret", "wrong"};

    for (int i = 0; i < 2; i++) {
        const char *mech;
        char *ch, *resp;

        srv_new(0, 0, 0); /* CRAM-MD5 needs no TLS */
        cr_assert(eq(int, authsasl_client_new("example.com", "alice@example.com", pw[i], &a, err,
                                              sizeof(err)), 0));
        cr_assert(eq(int, authsasl_client_start(a, "CRAM-MD5", NULL, 0, 0, &mech, &resp, err,
                                                sizeof(err)), AUTHSASL_MORE), "%s", err);
        cr_assert_null(resp);
        cr_assert(eq(int, authsasl_server_start(srv, "CRAM-MD5", NULL, &ch, err, sizeof(err)),
                     AUTHSASL_MORE), "%s", err);
        cr_assert(ge(int, authsasl_client_step(a, ch, &resp, err, sizeof(err)), 0), "%s", err);
        free(ch);
        cr_assert(eq(int, authsasl_server_step(srv, resp, &ch, err, sizeof(err)),
                     i == 0 ? AUTHSASL_DONE : AUTHSASL_FAIL), "%s %s", pw[i], err);
        free(resp);
        cr_assert(eq(str, (char *)authsasl_server_username(srv), "alice@example.com"));
        srv = authsasl_server_free(srv);
        a = authsasl_free(a);
    }
}

/* Bad base64 is a syntax error; a mechanism not offered (PLAIN without TLS) is refused. */
Test(authsasl_server, form_and_nomech)
{
    char *ch;

    srv_new(0, 0, 0);
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", "AHVzZXI", &ch, err, sizeof(err)),
                 AUTHSASL_NOMECH));
    cr_assert(eq(int, authsasl_server_start(srv, "CRAM-MD5", "!!!", &ch, err, sizeof(err)),
                 AUTHSASL_FORM));
    cr_assert(eq(int, authsasl_server_start(srv, "DIGEST-MD5", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_NOMECH));
    cr_assert(eq(int, authsasl_server_start(srv, "CRAM-MD5", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, "%%%", &ch, err, sizeof(err)), AUTHSASL_FORM));
}

/* accept-any: every mechanism completes with any credentials; LOGIN prompts are exact and
 * the CRAM-MD5 challenge is <random.time@hostname>. */
Test(authsasl_server, accept_any)
{
    char *ch, *ir = b64("\0dev\0whatever", 13), *u = b64("fax", 3);

    srv_new(1, 0, 1);
    cr_assert(eq(str, (char *)authsasl_server_mechs(srv), "PLAIN LOGIN CRAM-MD5"));
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", ir, &ch, err, sizeof(err)),
                 AUTHSASL_DONE));
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "dev"));
    cr_assert(eq(int, authsasl_server_start(srv, "PLAIN", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE));
    cr_assert(eq(str, ch, ""));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, ir, &ch, err, sizeof(err)), AUTHSASL_DONE));

    cr_assert(eq(int, authsasl_server_start(srv, "LOGIN", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE));
    cr_assert(eq(str, ch, "VXNlcm5hbWU6"));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, u, &ch, err, sizeof(err)), AUTHSASL_MORE));
    cr_assert(eq(str, ch, "UGFzc3dvcmQ6"));
    free(ch);
    cr_assert(eq(int, authsasl_server_step(srv, "", &ch, err, sizeof(err)), AUTHSASL_DONE));
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "fax"));

    cr_assert(eq(int, authsasl_server_start(srv, "CRAM-MD5", NULL, &ch, err, sizeof(err)),
                 AUTHSASL_MORE));
    cr_assert(gt(sz, strlen(ch), 0));
    free(ch);
    free(u);
    u = b64("fax 0123456789abcdef0123456789abcdef", 36);
    cr_assert(eq(int, authsasl_server_step(srv, u, &ch, err, sizeof(err)), AUTHSASL_DONE));
    cr_assert(eq(str, (char *)authsasl_server_username(srv), "fax"));
    free(u);
    free(ir);
}
