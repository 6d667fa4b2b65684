/*
 * authsasl - SMTP AUTH client through Cyrus SASL; see authsasl.h.
 *
 * Mechanism choice is ours, not the library's: candidates are the server's offer, narrowed
 * and ordered by the configured preference (or a built-in ranking), minus plaintext
 * mechanisms on an unprotected session; each is tried with sasl_client_start() in turn
 * until one starts, so "PLAIN LOGIN" really means PLAIN first (Postfix
 * smtp_sasl_mechanism_filter).  No SASL security layer is negotiated (maxbufsize 0): TLS
 * protects the session or nothing does.
 *
 * Secrets: the password lives in a sasl_secret_t owned by struct authsasl and is wiped on
 * free.  Error text comes from sasl_errstring(), never sasl_errdetail(), and never
 * includes what was sent.
 */
#include "common/authsasl.h"

#include <sasl/sasl.h>
#include <sasl/saslutil.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/xalloc.h"

/* Used when no preference is configured: strongest first; anything else the server
 * offers is tried after these, in the server's order. */
static const char *const authsasl_ranking[] = {
    "SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "DIGEST-MD5", "PLAIN", "LOGIN", NULL,
};

#define AUTHSASL_MAX_MECHS 32
/* Cyrus stores every callback as int (*)(void); void (*)(void) converts without warnings. */
#define CB(fn) ((int (*)(void))(void (*)(void))(fn))

struct authsasl {
    sasl_conn_t *conn;
    char *host;
    char *user;
    sasl_secret_t *secret;
    size_t secret_size;
    sasl_callback_t callbacks[4];
    char mech[64];
};

static int authsasl_initialised;

int authsasl_client_init(char *err, size_t errlen)
{
    int rc;

    if (authsasl_initialised)
        return 0;
    if ((rc = sasl_client_init(NULL)) != SASL_OK) {
        snprintf(err, errlen, "SASL client initialisation failed: %s",
                 sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    authsasl_initialised = 1;
    return 0;
}

static int get_user(void *context, int id, const char **result, unsigned *len)
{
    struct authsasl *a = context;

    if (id != SASL_CB_USER && id != SASL_CB_AUTHNAME)
        return SASL_BADPARAM;
    /* The authorisation id (SASL_CB_USER) is empty: act as ourselves. */
    *result = id == SASL_CB_USER ? "" : a->user;
    if (len != NULL)
        *len = (unsigned)strlen(*result);
    return SASL_OK;
}

static int get_secret(sasl_conn_t *conn, void *context, int id, sasl_secret_t **psecret)
{
    struct authsasl *a = context;

    (void)conn;
    if (id != SASL_CB_PASS)
        return SASL_BADPARAM;
    *psecret = a->secret;
    return SASL_OK;
}

int authsasl_client_new(const char *host, const char *user, const char *password,
                        struct authsasl **out, char *err, size_t errlen)
{
    struct authsasl *a;
    size_t plen = strlen(password);

    (void)err;
    (void)errlen;
    a = xcalloc(1, sizeof(*a));
    a->host = xstrdup(host);
    a->user = xstrdup(user);
    a->secret_size = sizeof(sasl_secret_t) + plen + 1;
    a->secret = xcalloc(1, a->secret_size);
    a->secret->len = plen;
    memcpy(a->secret->data, password, plen);
    a->callbacks[0] = (sasl_callback_t){SASL_CB_USER, CB(get_user), a};
    a->callbacks[1] = (sasl_callback_t){SASL_CB_AUTHNAME, CB(get_user), a};
    a->callbacks[2] = (sasl_callback_t){SASL_CB_PASS, CB(get_secret), a};
    a->callbacks[3] = (sasl_callback_t){SASL_CB_LIST_END, NULL, NULL};
    *out = a;
    return 0;
}

static int is_plaintext_mech(const char *mech)
{
    return strcasecmp(mech, "PLAIN") == 0 || strcasecmp(mech, "LOGIN") == 0;
}

/* Splits a space separated list in place; returns the number of words. */
static size_t split(char *s, char **words, size_t max)
{
    size_t n = 0;
    char *save = NULL, *w;

    for (w = strtok_r(s, " \t", &save); w != NULL && n < max; w = strtok_r(NULL, " \t", &save))
        words[n++] = w;
    return n;
}

static int in_list(char *const *words, size_t n, const char *w)
{
    size_t i;

    for (i = 0; i < n; i++)
        if (strcasecmp(words[i], w) == 0)
            return 1;
    return 0;
}

static int ranked(const char *mech)
{
    size_t i;

    for (i = 0; authsasl_ranking[i] != NULL; i++)
        if (strcasecmp(authsasl_ranking[i], mech) == 0)
            return 1;
    return 0;
}

static char *encode64(const char *data, unsigned len)
{
    unsigned max = 4 * ((len + 2) / 3) + 1, outlen = 0;
    char *out = xmalloc(max);

    if (sasl_encode64(data, len, out, max, &outlen) != SASL_OK)
        out[0] = '\0'; /* cannot happen: max is exact */
    return out;
}

static int new_conn(struct authsasl *a, int secure, int allow_plain, char *err, size_t errlen)
{
    sasl_security_properties_t props;
    int rc;

    if (a->conn != NULL) {
        sasl_dispose(&a->conn);
        a->conn = NULL;
    }
    rc = sasl_client_new("smtp", a->host, NULL, NULL, a->callbacks, 0, &a->conn);
    if (rc != SASL_OK) {
        snprintf(err, errlen, "SASL: %s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    memset(&props, 0, sizeof(props));
    props.max_ssf = 0;
    props.maxbufsize = 0; /* no security layer: TLS or nothing */
    props.security_flags = SASL_SEC_NOANONYMOUS;
    if (!secure && !allow_plain)
        props.security_flags |= SASL_SEC_NOPLAINTEXT;
    if ((rc = sasl_setprop(a->conn, SASL_SEC_PROPS, &props)) != SASL_OK) {
        snprintf(err, errlen, "SASL: %s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    return 0;
}

int authsasl_client_start(struct authsasl *a, const char *server_mechs, const char *pref,
                          int secure, int allow_plain, const char **mech, char **resp_b64,
                          char *err, size_t errlen)
{
    char *offer_s = xstrdup(server_mechs != NULL ? server_mechs : "");
    char *pref_s = xstrdup(pref != NULL ? pref : "");
    char *offer[AUTHSASL_MAX_MECHS], *prefw[AUTHSASL_MAX_MECHS];
    const char *cand[AUTHSASL_MAX_MECHS];
    size_t noffer, npref, ncand = 0, i;
    const char *out = NULL, *chosen = NULL;
    unsigned outlen = 0;
    int rc = AUTHSASL_FAIL, src;

    *mech = NULL;
    *resp_b64 = NULL;
    noffer = split(offer_s, offer, AUTHSASL_MAX_MECHS);
    npref = split(pref_s, prefw, AUTHSASL_MAX_MECHS);

    /* Candidates in order of preference, each one the server offers. */
    if (npref > 0) {
        for (i = 0; i < npref; i++)
            if (in_list(offer, noffer, prefw[i]))
                cand[ncand++] = prefw[i];
    } else {
        for (i = 0; authsasl_ranking[i] != NULL; i++)
            if (in_list(offer, noffer, authsasl_ranking[i]))
                cand[ncand++] = authsasl_ranking[i];
        for (i = 0; i < noffer && ncand < AUTHSASL_MAX_MECHS; i++)
            if (!ranked(offer[i]) && strcasecmp(offer[i], "ANONYMOUS") != 0)
                cand[ncand++] = offer[i];
    }
    if (ncand == 0) {
        if (noffer == 0)
            snprintf(err, errlen, "server offers no SASL mechanisms");
        else
            snprintf(err, errlen, "server does not offer %s (it offers %s)", pref, server_mechs);
        goto done;
    }
    /* RFC 4954 section 4: plaintext passwords only inside TLS, unless explicitly allowed. */
    if (!secure && !allow_plain) {
        size_t j = 0;
        for (i = 0; i < ncand; i++) {
            if (!is_plaintext_mech(cand[i]))
                cand[j++] = cand[i];
        }
        ncand = j;
        if (ncand == 0) {
            snprintf(err, errlen,
                     "refusing plaintext SASL mechanisms (%s) on a session without TLS",
                     server_mechs);
            goto done;
        }
    }
    for (i = 0; i < ncand; i++) {
        sasl_interact_t *interact = NULL;

        if (new_conn(a, secure, allow_plain, err, errlen) != 0)
            goto done;
        src = sasl_client_start(a->conn, cand[i], &interact, &out, &outlen, &chosen);
        if (src == SASL_OK || src == SASL_CONTINUE)
            break;
        snprintf(err, errlen, "SASL mechanism %s: %s", cand[i],
                 src == SASL_INTERACT ? "needs information we cannot give"
                                      : sasl_errstring(src, NULL, NULL));
    }
    if (i == ncand)
        goto done; /* err names the last failure */
    snprintf(a->mech, sizeof(a->mech), "%s", chosen != NULL ? chosen : cand[i]);
    *mech = a->mech;
    /* No initial response when the mechanism has none yet (LOGIN waits for a 334). */
    if (out != NULL && outlen > 0)
        *resp_b64 = encode64(out, outlen);
    rc = AUTHSASL_MORE;
done:
    free(offer_s);
    free(pref_s);
    return rc;
}

int authsasl_client_step(struct authsasl *a, const char *challenge_b64, char **resp_b64, char *err,
                         size_t errlen)
{
    size_t inlen = strlen(challenge_b64);
    unsigned declen = 0, outlen = 0;
    char *dec = xmalloc(inlen / 4 * 3 + 4);
    sasl_interact_t *interact = NULL;
    const char *out = NULL;
    int rc;

    *resp_b64 = NULL;
    if (a->conn == NULL) {
        snprintf(err, errlen, "SASL: no authentication in progress");
        free(dec);
        return AUTHSASL_FAIL;
    }
    rc = sasl_decode64(challenge_b64, (unsigned)inlen, dec, (unsigned)(inlen / 4 * 3 + 4), &declen);
    if (rc != SASL_OK) {
        snprintf(err, errlen, "server sent a malformed SASL challenge");
        free(dec);
        return AUTHSASL_FAIL;
    }
    rc = sasl_client_step(a->conn, dec, declen, &interact, &out, &outlen);
    free(dec);
    if (rc != SASL_OK && rc != SASL_CONTINUE) {
        snprintf(err, errlen, "SASL mechanism %s: %s", a->mech,
                 rc == SASL_INTERACT ? "needs information we cannot give"
                                     : sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    *resp_b64 = out != NULL && outlen > 0 ? encode64(out, outlen) : xstrdup("");
    return rc == SASL_OK ? AUTHSASL_DONE : AUTHSASL_MORE;
}

struct authsasl *authsasl_free(struct authsasl *a)
{
    if (a != NULL) {
        if (a->conn != NULL)
            sasl_dispose(&a->conn);
        /* Do not leave the password lying around in freed memory. */
        explicit_bzero(a->secret, a->secret_size);
        free(a->secret);
        free(a->host);
        free(a->user);
        free(a);
    }
    return NULL;
}
