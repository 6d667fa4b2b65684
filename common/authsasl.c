/*
 * authsasl - SMTP AUTH through Cyrus SASL, client and server sides; see authsasl.h.
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
#include <time.h>

#include "common/authsasl_int.h"
#include "common/log.h"
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
    if (authsasl__oauth_register(err, errlen) != 0)
        return AUTHSASL_FAIL;
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

/* Both sides: no anonymous logins, no SASL security layer (TLS or nothing), and plaintext
 * mechanisms (PLAIN, LOGIN) only when plain_ok (TLS is up, or the admin said so). */
static int set_sec_props(sasl_conn_t *conn, int plain_ok)
{
    sasl_security_properties_t props;

    memset(&props, 0, sizeof(props));
    props.max_ssf = 0;
    props.maxbufsize = 0;
    props.security_flags = SASL_SEC_NOANONYMOUS | (plain_ok ? 0 : SASL_SEC_NOPLAINTEXT);
    return sasl_setprop(conn, SASL_SEC_PROPS, &props);
}

static int new_conn(struct authsasl *a, int secure, int allow_plain, char *err, size_t errlen)
{
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
    if ((rc = set_sec_props(a->conn, secure || allow_plain)) != SASL_OK) {
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
            if (!ranked(offer[i]) && strcasecmp(offer[i], "ANONYMOUS") != 0 &&
                !authsasl__is_token_mech(offer[i])) /* a password is no bearer token */
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

/* ==== Server side ====
 *
 * Happy path: authsasl_server_new() opens a Cyrus server connection whose GETOPT callback
 * answers every option from the listener's configuration; _start() and _step() decode the
 * client's base64, feed Cyrus, and encode its challenge.  The mechanisms offered are the
 * configured list, in its order, narrowed to what Cyrus can do under the current security
 * properties (no PLAIN/LOGIN without TLS unless allowed).
 *
 * accept-any runs the PLAIN, LOGIN and CRAM-MD5 dialogues here, without Cyrus, and
 * accepts whatever arrives.  For the log we pick the user name out of what the client
 * sent (PLAIN's authcid, LOGIN's first answer, CRAM-MD5's name): never the password.
 */

#define AUTHSASL_MECHS_MAX 256

struct authsasl_server {
    sasl_conn_t *conn;          /* NULL in accept-any mode */
    sasl_callback_t callbacks[3];
    char *hostname, *sasldb, *mech_list;
    int accept_any;
    char mechs[AUTHSASL_MECHS_MAX]; /* what we advertise now */
    char mech[32];              /* current exchange */
    int step;                   /* client answers received so far */
    char user[256];
    int plain_ok;
    int used;                   /* conn has seen an exchange: make a new one for the next */
};

static int server_initialised;

/* Cyrus's own messages ("Password verification failed") go to the debug log only: the
 * session logs each failure itself, once, with the client's address. */
static int server_log(void *context, int level, const char *message)
{
    (void)context;
    if (level <= SASL_LOG_ERR)
        log_warn("SASL: %s", message);
    else
        log_debug(2, "SASL: %s", message);
    return SASL_OK;
}

static int server_getopt(void *context, const char *plugin, const char *option,
                         const char **result, unsigned *len)
{
    struct authsasl_server *a = context;

    (void)plugin;
    *result = NULL;
    if (a == NULL)
        return SASL_FAIL;
    if (strcmp(option, "pwcheck_method") == 0)
        *result = "auxprop";
    else if (strcmp(option, "auxprop_plugin") == 0)
        *result = "sasldb";
    else if (strcmp(option, "sasldb_path") == 0)
        *result = a->sasldb;
    else if (strcmp(option, "mech_list") == 0)
        *result = a->mech_list;
    else if (strcmp(option, "log_level") == 0)
        *result = "1";
    if (*result == NULL)
        return SASL_FAIL;
    if (len != NULL)
        *len = (unsigned)strlen(*result);
    return SASL_OK;
}

int authsasl_server_init(char *err, size_t errlen)
{
    static sasl_callback_t global[] = {
        {SASL_CB_LOG, CB(server_log), NULL},
        {SASL_CB_LIST_END, NULL, NULL},
    };
    int rc;

    if (server_initialised)
        return 0;
    if ((rc = sasl_server_init(global, "relayd")) != SASL_OK) {
        snprintf(err, errlen, "SASL server initialisation failed: %s",
                 sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
    server_initialised = 1;
    return 0;
}

static int accept_any_mech(const char *m)
{
    return strcasecmp(m, "PLAIN") == 0 || strcasecmp(m, "LOGIN") == 0 ||
           strcasecmp(m, "CRAM-MD5") == 0;
}

/* The configured mechanisms, in order, that are in avail (NULL: the accept-any three). */
static void server_filter(struct authsasl_server *a, const char *avail, int plain_ok)
{
    char *cfg = xstrdup(a->mech_list), *w[AUTHSASL_MAX_MECHS];
    char *av = xstrdup(avail != NULL ? avail : ""), *aw[AUTHSASL_MAX_MECHS];
    size_t n = split(cfg, w, AUTHSASL_MAX_MECHS), na = split(av, aw, AUTHSASL_MAX_MECHS), i;
    size_t used = 0;

    a->mechs[0] = '\0';
    for (i = 0; i < n; i++) {
        int ok = avail != NULL ? in_list(aw, na, w[i]) : accept_any_mech(w[i]);

        if (!ok || (!plain_ok && is_plaintext_mech(w[i])))
            continue;
        if (used + strlen(w[i]) + 2 > sizeof(a->mechs))
            break;
        used += (size_t)snprintf(a->mechs + used, sizeof(a->mechs) - used, "%s%s",
                                 used ? " " : "", w[i]);
    }
    for (char *c = a->mechs; *c != '\0'; c++)
        if (*c >= 'a' && *c <= 'z')
            *c = (char)(*c - 'a' + 'A');
    free(cfg);
    free(av);
}

/* A fresh Cyrus server connection: Cyrus refuses a second exchange on a used one. */
static int server_conn(struct authsasl_server *a, char *err, size_t errlen)
{
    int rc;

    if (a->conn != NULL)
        sasl_dispose(&a->conn);
    a->used = 0;
    rc = sasl_server_new("smtp", a->hostname, NULL, NULL, NULL, a->callbacks, 0, &a->conn);
    if (rc != SASL_OK) {
        a->conn = NULL;
        snprintf(err, errlen, "SASL server: %s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_TEMP;
    }
    if ((rc = set_sec_props(a->conn, a->plain_ok)) != SASL_OK) {
        snprintf(err, errlen, "SASL server: %s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_TEMP;
    }
    return 0;
}

int authsasl_server_new(const struct authsasl_server_opts *o, struct authsasl_server **out,
                        char *err, size_t errlen)
{
    struct authsasl_server *a = xcalloc(1, sizeof(*a));
    const char *list = NULL;
    unsigned plen = 0;
    int count = 0, rc;

    *out = NULL;
    a->hostname = xstrdup(o->hostname != NULL ? o->hostname : "localhost");
    a->sasldb = xstrdup(o->sasldb != NULL ? o->sasldb : "/etc/sasldb2");
    a->mech_list = xstrdup(o->mechs != NULL ? o->mechs : "PLAIN LOGIN CRAM-MD5");
    a->accept_any = o->accept_any;
    a->plain_ok = o->secure || o->allow_plain;
    if (a->accept_any) {
        server_filter(a, NULL, a->plain_ok);
        *out = a;
        return 0;
    }
    a->callbacks[0] = (sasl_callback_t){SASL_CB_GETOPT, CB(server_getopt), a};
    a->callbacks[1] = (sasl_callback_t){SASL_CB_LOG, CB(server_log), a};
    a->callbacks[2] = (sasl_callback_t){SASL_CB_LIST_END, NULL, NULL};
    if ((rc = server_conn(a, err, errlen)) != 0) {
        authsasl_server_free(a);
        return rc;
    }
    rc = sasl_listmech(a->conn, NULL, "", " ", "", &list, &plen, &count);
    server_filter(a, rc == SASL_OK ? list : "", a->plain_ok);
    *out = a;
    return 0;
}

const char *authsasl_server_mechs(const struct authsasl_server *a)
{
    return a->mechs;
}

const char *authsasl_server_username(const struct authsasl_server *a)
{
    return a->user;
}

const char *authsasl_server_mech(const struct authsasl_server *a)
{
    return a->mech;
}

/* Decodes base64 ("=" alone: empty) into a malloc'd buffer; 0 or -1. */
static int decode64(const char *in, char **out, unsigned *outlen)
{
    size_t inlen = strlen(in);
    unsigned max = (unsigned)(inlen / 4 * 3 + 4);

    *out = xmalloc(max);
    *outlen = 0;
    if (strcmp(in, "=") == 0 || inlen == 0)
        return 0;
    if (inlen > 65536 || sasl_decode64(in, (unsigned)inlen, *out, max, outlen) != SASL_OK) {
        free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

static void set_user(struct authsasl_server *a, const char *p, size_t n)
{
    size_t i, j = 0;

    /* Printable characters only: this goes into a log line. */
    for (i = 0; i < n && j + 1 < sizeof(a->user); i++)
        if ((unsigned char)p[i] >= 0x20 && p[i] != 0x7f)
            a->user[j++] = p[i];
    a->user[j] = '\0';
}

/* Learns the attempted user name from client data, by mechanism and step. */
static void note_user(struct authsasl_server *a, int step, const char *d, unsigned n)
{
    if (strcasecmp(a->mech, "PLAIN") == 0) {
        /* authzid NUL authcid NUL password */
        const char *nul = memchr(d, '\0', n), *nul2;

        if (nul != NULL) {
            nul2 = memchr(nul + 1, '\0', (size_t)(d + n - nul - 1));
            set_user(a, nul + 1, nul2 != NULL ? (size_t)(nul2 - nul - 1) : 0);
        }
    } else if (strcasecmp(a->mech, "LOGIN") == 0) {
        if (step == 0)
            set_user(a, d, n);
    } else if (strcasecmp(a->mech, "CRAM-MD5") == 0) {
        const char *sp = memchr(d, ' ', n);

        set_user(a, d, sp != NULL ? (size_t)(sp - d) : n);
    }
}

static int from_sasl(struct authsasl_server *a, int rc, const char *out, unsigned outlen,
                     char **challenge_b64, char *err, size_t errlen)
{
    const char *u = NULL;

    switch (rc) {
    case SASL_OK:
        if (sasl_getprop(a->conn, SASL_USERNAME, (const void **)&u) == SASL_OK && u != NULL)
            set_user(a, u, strlen(u));
        return AUTHSASL_DONE;
    case SASL_CONTINUE:
        *challenge_b64 = encode64(out != NULL ? out : "", out != NULL ? outlen : 0);
        return AUTHSASL_MORE;
    case SASL_NOMECH:
    case SASL_TOOWEAK:
    case SASL_ENCRYPT:
        snprintf(err, errlen, "mechanism %s is not available", a->mech);
        return AUTHSASL_NOMECH;
    case SASL_TRYAGAIN:
    case SASL_UNAVAIL:
    case SASL_NOMEM:
        snprintf(err, errlen, "%s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_TEMP;
    default:
        snprintf(err, errlen, "%s", sasl_errstring(rc, NULL, NULL));
        return AUTHSASL_FAIL;
    }
}

/* accept-any: "<random.time@hostname>" as the CRAM-MD5 challenge (RFC 2195). */
static char *cram_challenge(const struct authsasl_server *a)
{
    char text[300];

    snprintf(text, sizeof(text), "<%u.%lld@%s>", (unsigned)rand(), (long long)time(NULL),
             a->hostname);
    return encode64(text, (unsigned)strlen(text));
}

static int any_step(struct authsasl_server *a, const char *d, unsigned n, int have,
                    char **challenge_b64)
{
    if (have)
        note_user(a, a->step, d, n);
    if (strcasecmp(a->mech, "PLAIN") == 0) {
        if (!have) {
            *challenge_b64 = xstrdup("");
            return AUTHSASL_MORE;
        }
        return AUTHSASL_DONE;
    }
    if (strcasecmp(a->mech, "LOGIN") == 0) {
        if (!have) {
            *challenge_b64 = encode64("Username:", 9);
            return AUTHSASL_MORE;
        }
        if (++a->step == 1) {
            *challenge_b64 = encode64("Password:", 9);
            return AUTHSASL_MORE;
        }
        return AUTHSASL_DONE;
    }
    /* CRAM-MD5: the challenge first, whatever the client sent with AUTH. */
    if (a->step++ == 0) {
        *challenge_b64 = cram_challenge(a);
        return AUTHSASL_MORE;
    }
    return AUTHSASL_DONE;
}

int authsasl_server_start(struct authsasl_server *a, const char *mech, const char *initial_b64,
                          char **challenge_b64, char *err, size_t errlen)
{
    char *w[AUTHSASL_MAX_MECHS], *list = xstrdup(a->mechs), *dec = NULL;
    const char *out = NULL;
    unsigned declen = 0, outlen = 0;
    int offered, rc;

    *challenge_b64 = NULL;
    a->user[0] = '\0';
    a->step = 0;
    snprintf(a->mech, sizeof(a->mech), "%s", mech);
    offered = in_list(w, split(list, w, AUTHSASL_MAX_MECHS), mech);
    free(list);
    if (!offered) {
        snprintf(err, errlen, "mechanism %s is not offered", a->mech);
        return AUTHSASL_NOMECH;
    }
    if (initial_b64 != NULL && decode64(initial_b64, &dec, &declen) != 0) {
        snprintf(err, errlen, "malformed base64 in the initial response");
        return AUTHSASL_FORM;
    }
    if (a->accept_any) {
        if (strcasecmp(a->mech, "CRAM-MD5") == 0)
            rc = any_step(a, NULL, 0, 0, challenge_b64);
        else
            rc = any_step(a, dec, declen, initial_b64 != NULL, challenge_b64);
        free(dec);
        return rc;
    }
    if (a->used && (rc = server_conn(a, err, errlen)) != 0) {
        free(dec);
        return rc;
    }
    a->used = 1;
    if (dec != NULL)
        note_user(a, a->step++, dec, declen);
    rc = sasl_server_start(a->conn, a->mech, dec, initial_b64 != NULL ? declen : 0, &out,
                           &outlen);
    if (dec != NULL)
        explicit_bzero(dec, declen);
    free(dec);
    return from_sasl(a, rc, out, outlen, challenge_b64, err, errlen);
}

int authsasl_server_step(struct authsasl_server *a, const char *resp_b64, char **challenge_b64,
                         char *err, size_t errlen)
{
    char *dec = NULL;
    const char *out = NULL;
    unsigned declen = 0, outlen = 0;
    int rc;

    *challenge_b64 = NULL;
    if (a->mech[0] == '\0') {
        snprintf(err, errlen, "no authentication in progress");
        return AUTHSASL_FAIL;
    }
    if (decode64(resp_b64, &dec, &declen) != 0) {
        snprintf(err, errlen, "malformed base64 in the response");
        return AUTHSASL_FORM;
    }
    if (a->accept_any) {
        rc = any_step(a, dec, declen, 1, challenge_b64);
        free(dec);
        return rc;
    }
    /* An empty user name can never log in, and Cyrus's LOGIN mechanism leaks memory on
     * that path (once per attempt, so a client could repeat it): refuse it here. */
    if (strcasecmp(a->mech, "LOGIN") == 0 && a->step == 0 && declen == 0) {
        free(dec);
        snprintf(err, errlen, "empty user name");
        return AUTHSASL_FAIL;
    }
    /* LOGIN: only the first answer is the user name; the second is the password. */
    note_user(a, a->step++, dec, declen);
    rc = sasl_server_step(a->conn, dec, declen, &out, &outlen);
    explicit_bzero(dec, declen);
    free(dec);
    return from_sasl(a, rc, out, outlen, challenge_b64, err, errlen);
}

struct authsasl_server *authsasl_server_free(struct authsasl_server *a)
{
    if (a != NULL) {
        if (a->conn != NULL)
            sasl_dispose(&a->conn);
        free(a->hostname);
        free(a->sasldb);
        free(a->mech_list);
        free(a);
    }
    return NULL;
}
