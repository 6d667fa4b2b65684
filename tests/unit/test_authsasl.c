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
