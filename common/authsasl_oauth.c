/*
 * authsasl_oauth - XOAUTH2 and OAUTHBEARER (RFC 7628) as in-process Cyrus SASL client
 * mechanisms, so that smtpc authenticates with a bearer token through the same authsasl
 * interface as with a password.  Part of the authsasl module (authsasl_int.h).
 *
 * The "password" given to authsasl_client_new() is the access token; the authentication
 * id (SASL_CB_AUTHNAME) is the mailbox.  First step, the initial response:
 *   XOAUTH2      "user=" mailbox ^A "auth=Bearer " token ^A ^A   (Google's and Microsoft's
 *                documented framing)
 *   OAUTHBEARER  "n,a=" saslname "," ^A "host=" server ^A "auth=Bearer " token ^A ^A
 *                (RFC 7628 3.1; saslname escapes ',' and '=' as RFC 5801 says)
 * If the server answers with a 334 challenge instead of 235, that is an error report (a
 * JSON document, RFC 7628 3.2.2); the client ends the exchange with an empty response
 * (XOAUTH2) or a single ^A (OAUTHBEARER, RFC 7628 3.2.3) and the server then sends 535.
 *
 * Neither mechanism protects the token: both are flagged as plaintext mechanisms, so
 * Cyrus refuses them on a session without TLS (SASL_SEC_NOPLAINTEXT), like PLAIN.
 * The token is wiped from our buffers on dispose.
 */
#include <sasl/sasl.h>
#include <sasl/saslplug.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/authsasl.h"
#include "common/authsasl_int.h"

enum oauth_kind { OAUTH_XOAUTH2, OAUTH_OAUTHBEARER };

struct oauth_ctx {
    enum oauth_kind kind;
    int step;
    char *out;
    size_t outlen;
    const sasl_utils_t *utils;
};

static int oauth_new(void *glob, sasl_client_params_t *params, void **ctxp)
{
    struct oauth_ctx *c = params->utils->malloc(sizeof(*c));

    if (c == NULL)
        return SASL_NOMEM;
    memset(c, 0, sizeof(*c));
    c->kind = (enum oauth_kind)(size_t)glob;
    c->utils = params->utils;
    *ctxp = c;
    return SASL_OK;
}

static void oauth_wipe(struct oauth_ctx *c)
{
    if (c->out != NULL) {
        explicit_bzero(c->out, c->outlen);
        c->utils->free(c->out);
        c->out = NULL;
    }
}

static void oauth_dispose(void *ctx, const sasl_utils_t *utils)
{
    struct oauth_ctx *c = ctx;

    if (c == NULL)
        return;
    oauth_wipe(c);
    utils->free(c);
}

static int get_authname(const sasl_utils_t *u, const char **name)
{
    sasl_getsimple_t *cb = NULL;
    void *ctx = NULL;
    int rc;

    rc = u->getcallback(u->conn, SASL_CB_AUTHNAME, (sasl_callback_ft *)&cb, &ctx);
    if (rc != SASL_OK || cb == NULL)
        return rc != SASL_OK ? rc : SASL_FAIL;
    return cb(ctx, SASL_CB_AUTHNAME, name, NULL);
}

static int get_token(const sasl_utils_t *u, sasl_secret_t **secret)
{
    sasl_getsecret_t *cb = NULL;
    void *ctx = NULL;
    int rc;

    rc = u->getcallback(u->conn, SASL_CB_PASS, (sasl_callback_ft *)&cb, &ctx);
    if (rc != SASL_OK || cb == NULL)
        return rc != SASL_OK ? rc : SASL_FAIL;
    return cb(u->conn, ctx, SASL_CB_PASS, secret);
}

/* Appends n bytes of p at *len in c->out (sized by the caller). */
static void put(struct oauth_ctx *c, size_t *len, const void *p, size_t n)
{
    memcpy(c->out + *len, p, n);
    *len += n;
}

static int oauth_first(struct oauth_ctx *c, sasl_client_params_t *params, const char **out,
                       unsigned *outlen, sasl_out_params_t *oparams)
{
    const sasl_utils_t *u = params->utils;
    const char *user = NULL, *host = params->serverFQDN != NULL ? params->serverFQDN : "";
    sasl_secret_t *tok = NULL;
    size_t ulen, max, len = 0, i;
    int rc;

    if ((rc = get_authname(u, &user)) != SASL_OK || user == NULL || *user == '\0') {
        u->seterror(u->conn, 0, "no mailbox (username) for the bearer token");
        return rc != SASL_OK ? rc : SASL_BADPARAM;
    }
    if ((rc = get_token(u, &tok)) != SASL_OK || tok == NULL || tok->len == 0) {
        u->seterror(u->conn, 0, "no access token");
        return rc != SASL_OK ? rc : SASL_BADPARAM;
    }
    /* A token or mailbox with ^A in it would change the framing: refuse it. */
    ulen = strlen(user);
    if (memchr(tok->data, '\x01', tok->len) != NULL || strchr(user, '\x01') != NULL ||
        memchr(tok->data, '\0', tok->len) != NULL)
        return SASL_BADPARAM;
    if ((rc = params->canon_user(u->conn, user, 0, SASL_CU_AUTHID | SASL_CU_AUTHZID, oparams)) !=
        SASL_OK)
        return rc;
    /* Worst case: every mailbox byte escaped to 3 bytes, plus the fixed text. */
    max = 3 * ulen + strlen(host) + tok->len + 64;
    oauth_wipe(c);
    if ((c->out = u->malloc(max)) == NULL)
        return SASL_NOMEM;
    c->outlen = max;
    if (c->kind == OAUTH_XOAUTH2) {
        put(c, &len, "user=", 5);
        put(c, &len, user, ulen);
        put(c, &len, "\x01", 1);
    } else {
        /* gs2-header: "n,a=" saslname ","; RFC 5801 4: ',' -> "=2C", '=' -> "=3D". */
        put(c, &len, "n,a=", 4);
        for (i = 0; i < ulen; i++) {
            if (user[i] == ',')
                put(c, &len, "=2C", 3);
            else if (user[i] == '=')
                put(c, &len, "=3D", 3);
            else
                put(c, &len, &user[i], 1);
        }
        put(c, &len, ",\x01", 2);
        if (*host != '\0') {
            put(c, &len, "host=", 5);
            put(c, &len, host, strlen(host));
            put(c, &len, "\x01", 1);
        }
    }
    put(c, &len, "auth=Bearer ", 12);
    put(c, &len, tok->data, tok->len);
    put(c, &len, "\x01\x01", 2);
    *out = c->out;
    *outlen = (unsigned)len;
    return SASL_CONTINUE;
}

static int oauth_step(void *ctx, sasl_client_params_t *params, const char *in, unsigned inlen,
                      sasl_interact_t **prompt, const char **out, unsigned *outlen,
                      sasl_out_params_t *oparams)
{
    struct oauth_ctx *c = ctx;

    (void)in;
    (void)inlen;
    (void)prompt;
    *out = NULL;
    *outlen = 0;
    if (c->step++ == 0)
        return oauth_first(c, params, out, outlen, oparams);
    /* A challenge after our token is the server's error report; end the exchange so that
     * it sends its final 535 (RFC 7628 3.2.3; Google's XOAUTH2 wants an empty line). */
    oauth_wipe(c);
    if (c->kind == OAUTH_OAUTHBEARER) {
        *out = "\x01";
        *outlen = 1;
    }
    oparams->doneflag = 1;
    oparams->mech_ssf = 0;
    oparams->maxoutbuf = 0;
    oparams->encode = NULL;
    oparams->decode = NULL;
    oparams->param_version = 0;
    return SASL_OK;
}

static void oauth_free_glob(void *glob, const sasl_utils_t *utils)
{
    (void)glob;
    (void)utils;
}

static sasl_client_plug_t oauth_plugs[] = {
    {
        .mech_name = "XOAUTH2",
        .max_ssf = 0,
        .security_flags = SASL_SEC_NOANONYMOUS | SASL_SEC_PASS_CREDENTIALS,
        .features = SASL_FEAT_WANT_CLIENT_FIRST | SASL_FEAT_ALLOWS_PROXY,
        .glob_context = (void *)(size_t)OAUTH_XOAUTH2,
        .mech_new = oauth_new,
        .mech_step = oauth_step,
        .mech_dispose = oauth_dispose,
        .mech_free = oauth_free_glob,
    },
    {
        .mech_name = "OAUTHBEARER",
        .max_ssf = 0,
        .security_flags = SASL_SEC_NOANONYMOUS | SASL_SEC_PASS_CREDENTIALS,
        .features = SASL_FEAT_WANT_CLIENT_FIRST | SASL_FEAT_ALLOWS_PROXY,
        .glob_context = (void *)(size_t)OAUTH_OAUTHBEARER,
        .mech_new = oauth_new,
        .mech_step = oauth_step,
        .mech_dispose = oauth_dispose,
        .mech_free = oauth_free_glob,
    },
};

static int oauth_plug_init(const sasl_utils_t *utils, int max_version, int *out_version,
                           sasl_client_plug_t **pluglist, int *plugcount)
{
    (void)utils;
    if (max_version < SASL_CLIENT_PLUG_VERSION)
        return SASL_BADVERS;
    *out_version = SASL_CLIENT_PLUG_VERSION;
    *pluglist = oauth_plugs;
    *plugcount = (int)(sizeof(oauth_plugs) / sizeof(oauth_plugs[0]));
    return SASL_OK;
}

int authsasl__oauth_register(char *err, size_t errlen)
{
    int rc = sasl_client_add_plugin("relayd-oauth", oauth_plug_init);

    if (rc != SASL_OK) {
        snprintf(err, errlen, "SASL: cannot register XOAUTH2/OAUTHBEARER: %s",
                 sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    return 0;
}

int authsasl__is_token_mech(const char *mech)
{
    return strcasecmp(mech, "XOAUTH2") == 0 || strcasecmp(mech, "OAUTHBEARER") == 0;
}
