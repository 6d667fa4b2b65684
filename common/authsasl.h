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
#define AUTHSASL_FAIL (-1)

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

#endif
