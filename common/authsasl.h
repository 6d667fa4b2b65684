/*
 * authsasl - SMTP AUTH through Cyrus SASL; the only module that includes <sasl/sasl.h>.
 *
 * Speaks base64 at its edges, so SMTP code passes 334 challenges and AUTH arguments
 * through untouched.  Never logs or returns secrets in error text.
 *
 * Results: AUTHSASL_DONE, AUTHSASL_MORE (send the response, expect another 334), or a
 * negative AUTHSASL_FAIL with operator text in err.
 */
#ifndef COMMON_AUTHSASL_H
#define COMMON_AUTHSASL_H

#include <stddef.h>

#define AUTHSASL_DONE 0
#define AUTHSASL_MORE 1
#define AUTHSASL_FAIL (-1)   /* client: could not authenticate; server: bad credentials */
#define AUTHSASL_FORM (-2)   /* server: the client's data is not valid base64 */
#define AUTHSASL_NOMECH (-3) /* server: mechanism not offered (now) */
#define AUTHSASL_TEMP (-4)   /* server: temporary failure (account store unavailable) */

struct authsasl;

/* Process-wide client set-up (sasl_client_init); once, before authsasl_client_new(). */
int authsasl_client_init(char *err, size_t errlen);

/* A client for one SMTP session to host; user and password are copied. */
int authsasl_client_new(const char *host, const char *user, const char *password,
                        struct authsasl **out, char *err, size_t errlen);

/*
 * Picks a mechanism from server_mechs (the EHLO AUTH list, space separated).  With pref
 * (space separated, e.g. "CRAM-MD5 PLAIN") only those are allowed, best first; never a
 * mechanism the server did not offer.  secure says whether TLS protects the session
 * (plaintext mechanisms need it unless allow_plain is set).  On success *mech is the
 * chosen name (owned by a) and *resp_b64 the malloc'd base64 initial response, or NULL
 * when the mechanism has none ("=" stands for an empty one).
 */
int authsasl_client_start(struct authsasl *a, const char *server_mechs, const char *pref,
                          int secure, int allow_plain, const char **mech, char **resp_b64,
                          char *err, size_t errlen);
/* Answers one 334 challenge (base64 text after "334 "); *resp_b64 malloc'd. */
int authsasl_client_step(struct authsasl *a, const char *challenge_b64, char **resp_b64,
                         char *err, size_t errlen);
struct authsasl *authsasl_free(struct authsasl *a); /* returns NULL */

/*
 * Server side (inbound AUTH, RFC 4954).  Accounts live in a Cyrus sasldb file (made with
 * saslpasswd2); relayd passes every SASL option itself (pwcheck_method auxprop, sasldb,
 * sasldb_path, mech_list), so no /etc/sasl2 file is needed.  A user name without "@realm"
 * is looked up in the realm named by hostname.  In accept-any mode Cyrus is not involved:
 * PLAIN, LOGIN and CRAM-MD5 dialogues run to the end and any credentials succeed.
 *
 * One struct authsasl_server per SMTP session and security state: make a new one after
 * STARTTLS.  Strings passed in are copied.
 */
struct authsasl_server;

/* Process-wide server set-up (sasl_server_init "relayd"); once, before any server_new. */
int authsasl_server_init(char *err, size_t errlen);

struct authsasl_server_opts {
    const char *hostname;  /* server FQDN; default realm */
    const char *sasldb;    /* sasldb file */
    const char *mechs;     /* allowed mechanisms, space separated ("PLAIN LOGIN CRAM-MD5") */
    int secure;            /* TLS protects the session */
    int allow_plain;       /* PLAIN/LOGIN even without TLS */
    int accept_any;        /* any credentials succeed (no Cyrus) */
};

int authsasl_server_new(const struct authsasl_server_opts *o, struct authsasl_server **out,
                        char *err, size_t errlen);
/* The mechanisms to advertise now, space separated ("" when none); owned by a. */
const char *authsasl_server_mechs(const struct authsasl_server *a);
/*
 * Starts an exchange for "AUTH mech [initial]".  initial_b64 is NULL when the client sent
 * no initial response ("=" is an empty one).  On AUTHSASL_MORE *challenge_b64 is the
 * malloc'd base64 text to send after "334 " (possibly "").  Returns AUTHSASL_DONE,
 * AUTHSASL_MORE, or a negative AUTHSASL_* code with text for the log in err (never a
 * password).  A new start abandons any exchange in progress.
 */
int authsasl_server_start(struct authsasl_server *a, const char *mech, const char *initial_b64,
                          char **challenge_b64, char *err, size_t errlen);
/* Continues with the client's line (base64; "" or "=" for an empty response). */
int authsasl_server_step(struct authsasl_server *a, const char *resp_b64, char **challenge_b64,
                         char *err, size_t errlen);
/* After AUTHSASL_DONE: the authenticated user.  Otherwise: the user name the client tried,
 * when known (for the log), or "".  Owned by a. */
const char *authsasl_server_username(const struct authsasl_server *a);
/* The mechanism of the current or last exchange ("" before any); owned by a. */
const char *authsasl_server_mech(const struct authsasl_server *a);
struct authsasl_server *authsasl_server_free(struct authsasl_server *a); /* returns NULL */

#endif
