/*
 * authsasl_int.h - shared between the files of the authsasl module only (authsasl.c,
 * authsasl_oauth.c).  Not for other modules.
 */
#ifndef COMMON_AUTHSASL_INT_H
#define COMMON_AUTHSASL_INT_H

#include <stddef.h>

/* Registers relayd's in-process client mechanisms XOAUTH2 and OAUTHBEARER with Cyrus
 * (sasl_client_add_plugin); call once, right after sasl_client_init().  0 or
 * AUTHSASL_FAIL with text in err. */
int authsasl__oauth_register(char *err, size_t errlen);

/* 1 when mech is a bearer-token mechanism: it must be asked for explicitly (auth =
 * xoauth2 | oauthbearer), never picked from a server's offer for a password account. */
int authsasl__is_token_mech(const char *mech);

#endif
