/*
 * oauth2_grant - what is said to a token endpoint and what it answers: the grant's POST
 * (client credentials, refresh token, JWT bearer with the RS256 assertion signed through
 * tlsio), the token-response parser, and the atomic write of a rotated refresh token.
 * Pure functions of the account's configuration and the endpoint's text; no I/O but reading
 * secrets files and the atomic write.  See oauth2.h and oauth2_int.h.
 */
#include "relayd/oauth2_int.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/json.h"
#include "common/tlsio.h"
#include "common/xalloc.h"

static const char b64url_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* base64url without padding (RFC 7515 2), appended to b. */
static void b64url(struct buf *b, const unsigned char *p, size_t n)
{
    size_t i;
    char q[4];

    for (i = 0; i + 2 < n; i += 3) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
        q[2] = b64url_chars[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
        q[3] = b64url_chars[p[i + 2] & 63];
        buf_append(b, q, 4);
    }
    if (n - i == 1) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[(p[i] & 3) << 4];
        buf_append(b, q, 2);
    } else if (n - i == 2) {
        q[0] = b64url_chars[p[i] >> 2];
        q[1] = b64url_chars[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
        q[2] = b64url_chars[(p[i + 1] & 15) << 2];
        buf_append(b, q, 3);
    }
}

/* ---- token responses ---- */

void oauth2_resp_clear(struct oauth2_resp *r)
{
    oauth2__wipe_free(r->access_token);
    oauth2__wipe_free(r->refresh_token);
    free(r->error);
    free(r->error_description);
    memset(r, 0, sizeof(*r));
}

static char *dup_or_null(const char *s)
{
    return s != NULL && *s != '\0' ? xstrdup(s) : NULL;
}

int oauth2_resp_parse(long http_status, const char *body, size_t len, struct oauth2_resp *r,
                      char *err, size_t errlen)
{
    char jerr[128];
    struct json_obj *j;
    const char *v, *type;

    memset(r, 0, sizeof(*r));
    j = json_obj_parse(body, len, jerr, sizeof jerr);
    if (j == NULL) {
        if (http_status == 200)
            snprintf(err, errlen, "HTTP 200 but the body is no token response (%s)", jerr);
        else
            snprintf(err, errlen, "HTTP %ld with no OAuth error in the body", http_status);
        return -1;
    }
    r->access_token = dup_or_null(json_obj_get(j, "access_token"));
    r->refresh_token = dup_or_null(json_obj_get(j, "refresh_token"));
    r->error = dup_or_null(json_obj_get(j, "error"));
    r->error_description = dup_or_null(json_obj_get(j, "error_description"));
    /* A number, or (older Microsoft endpoints) a string holding one. */
    if ((v = json_obj_get(j, "expires_in")) != NULL)
        r->expires_in = strtol(v, NULL, 10);
    type = json_obj_get(j, "token_type");
    if (r->error != NULL) {
        oauth2__sanitize(r->error, 64);
        if (r->error_description != NULL)
            oauth2__sanitize(r->error_description, 300);
        snprintf(err, errlen, "%s%s%s (HTTP %ld)", r->error, r->error_description ? ": " : "",
                 r->error_description ? r->error_description : "", http_status);
        goto fail;
    }
    if (http_status != 200) {
        snprintf(err, errlen, "HTTP %ld with no OAuth error in the body", http_status);
        goto fail;
    }
    if (r->access_token == NULL) {
        snprintf(err, errlen, "HTTP 200 without access_token");
        goto fail;
    }
    if (type != NULL && strcasecmp(type, "Bearer") != 0) {
        snprintf(err, errlen, "token_type is '%.20s', not Bearer", type);
        goto fail;
    }
    if (strpbrk(r->access_token, "\x01 \t\r\n") != NULL) {
        snprintf(err, errlen, "the access token contains spaces or control characters");
        goto fail;
    }
    json_obj_free(j);
    return 0;
fail:
    json_obj_free(j);
    oauth2__wipe_free(r->access_token);
    r->access_token = NULL;
    return -1;
}

/* ---- atomic file write ---- */

int oauth2_file_write(const char *path, const char *data, char *err, size_t errlen)
{
    char *tmp = xasprintf("%s.tmpXXXXXX", path), *dircopy = xstrdup(path);
    size_t len = strlen(data), off = 0;
    ssize_t n;
    int fd, dfd, rc = -1;

    if ((fd = mkstemp(tmp)) < 0) { /* mkstemp creates 0600 */
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto free_names;
    }
    while (off < len + 1) {
        const char *p = off < len ? data + off : "\n";
        size_t want = off < len ? len - off : 1;

        if ((n = write(fd, p, want)) < 0) {
            if (errno == EINTR)
                continue;
            snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
            goto unlink_tmp;
        }
        off += (size_t)n;
    }
    if (fchmod(fd, 0600) != 0 || fsync(fd) != 0) {
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto unlink_tmp;
    }
    if (close(fd) != 0) {
        fd = -1;
        snprintf(err, errlen, "%s: %s", tmp, strerror(errno));
        goto unlink_tmp;
    }
    fd = -1;
    if (rename(tmp, path) != 0) {
        snprintf(err, errlen, "rename to %s: %s", path, strerror(errno));
        goto unlink_tmp;
    }
    /* The rename itself must survive a crash. */
    if ((dfd = open(dirname(dircopy), O_RDONLY | O_DIRECTORY | O_CLOEXEC)) >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    rc = 0;
    goto free_names;
unlink_tmp:
    if (fd >= 0)
        close(fd);
    unlink(tmp);
free_names:
    free(tmp);
    free(dircopy);
    return rc;
}

/* ---- requests: building the grant's POST ---- */

void oauth2_form_add(struct buf *b, const char *k, const char *v)
{
    char *ev = curl_easy_escape(NULL, v, 0); /* libcurl >= 7.82 escapes without a handle */

    if (b->len > 0)
        buf_puts(b, "&");
    buf_printf(b, "%s=%s", k, ev != NULL ? ev : "");
    if (ev != NULL) {
        explicit_bzero(ev, strlen(ev));
        curl_free(ev);
    }
}

const char *oauth2_grant_name(enum cfg_grant g)
{
    switch (g) {
    case CFG_GRANT_CLIENT_CREDENTIALS:
        return "client_credentials";
    case CFG_GRANT_REFRESH_TOKEN:
        return "refresh_token";
    case CFG_GRANT_JWT_BEARER:
        return "jwt_bearer";
    case CFG_GRANT_COMMAND:
        return "oauth2_token_command";
    case CFG_GRANT_NONE:
        break;
    }
    return "none";
}

static int is_google(const struct cfg_upstream *up)
{
    return up->provider != NULL && strcasecmp(up->provider, "google") == 0;
}

/* The current refresh token: a rotated one not yet written, else the file's. */
int oauth2__refresh_token_read(struct o2_acct *a, char **out, char *err, size_t errlen)
{
    char why[400];

    if (a->rotated != NULL) {
        *out = xstrdup(a->rotated);
        return 0;
    }
    if (cfg_secret_read(a->up->refresh_token_file, O2_SECRET_MAX, out, why, sizeof why) != 0) {
        if (access(a->up->refresh_token_file, F_OK) != 0 && errno == ENOENT)
            snprintf(err, errlen,
                     "refresh_token_file %s does not exist: run relayctl oauth2 "
                     "authorize %s",
                     a->up->refresh_token_file, a->up->name);
        else
            snprintf(err, errlen, "refresh_token_file %s", why);
        return -1;
    }
    return 0;
}

/*
 * The JWT assertion for a Google service account (RFC 7523; Google's "Using OAuth 2.0 for
 * Server to Server Applications"): iss = client_email, sub = the mailbox, aud = the token
 * endpoint, scope, iat/exp an hour apart; signed RS256.  *endpoint gets the token endpoint
 * (token_endpoint, else the key's token_uri).  0 or -1 with text.
 */
static int jwt_assertion(const struct cfg_upstream *up, char **assertion, char **endpoint,
                         char *err, size_t errlen)
{
    char why[400], *key = NULL;
    struct json_obj *j = NULL;
    const char *email, *pem, *uri;
    struct buf *hdr = buf_new(0), *claims = buf_new(0), *out = buf_new(0);
    unsigned char *sig = NULL;
    size_t siglen = 0;
    time_t now = time(NULL);
    int rc = -1;

    *assertion = NULL;
    *endpoint = NULL;
    if (cfg_secret_read(up->service_account_file, O2_SECRET_MAX, &key, why, sizeof why) != 0) {
        snprintf(err, errlen, "service_account_file %s", why);
        goto done;
    }
    if ((j = json_obj_parse(key, strlen(key), why, sizeof why)) == NULL) {
        snprintf(err, errlen, "service_account_file %s: %s", up->service_account_file, why);
        goto done;
    }
    email = json_obj_get(j, "client_email");
    pem = json_obj_get(j, "private_key");
    uri = up->token_endpoint != NULL ? up->token_endpoint : json_obj_get(j, "token_uri");
    if (email == NULL || pem == NULL || uri == NULL) {
        snprintf(err, errlen, "service_account_file %s: no %s (is it a service account key?)",
                 up->service_account_file,
                 email == NULL ? "client_email"
                 : pem == NULL ? "private_key"
                               : "token_uri");
        goto done;
    }
    if (strncasecmp(uri, "https://", 8) != 0) {
        snprintf(err, errlen, "service_account_file: token_uri is not an https:// URL");
        goto done;
    }
    buf_puts(claims, "{\"iss\":");
    json_quote(claims, email);
    buf_puts(claims, ",\"sub\":");
    json_quote(claims, up->username);
    buf_puts(claims, ",\"scope\":");
    json_quote(claims, up->scope);
    buf_puts(claims, ",\"aud\":");
    json_quote(claims, uri);
    buf_printf(claims, ",\"iat\":%lld,\"exp\":%lld}", (long long)now, (long long)now + 3600);
    buf_puts(hdr, "{\"alg\":\"RS256\",\"typ\":\"JWT\"}");
    b64url(out, (const unsigned char *)hdr->data, hdr->len);
    buf_puts(out, ".");
    b64url(out, (const unsigned char *)claims->data, claims->len);
    if (tlsio_rs256_sign(pem, out->data, out->len, &sig, &siglen, why, sizeof why) != 0) {
        snprintf(err, errlen, "service_account_file %s: %s", up->service_account_file, why);
        goto done;
    }
    buf_puts(out, ".");
    b64url(out, sig, siglen);
    {
        size_t alen;

        *assertion = buf_steal(out, &alen);
    }
    *endpoint = xstrdup(uri);
    rc = 0;
done:
    free(sig);
    json_obj_free(j);
    oauth2__wipe_free(key);
    buf_free(hdr);
    buf_free(claims);
    buf_free(out);
    return rc;
}

/*
 * The token request for up's grant: *url and *post (form body, secret: wipe it).
 * 0, or -1 with text in err.
 */
int oauth2__token_request(struct o2_acct *a, char **url, char **post, char *err, size_t errlen)
{
    const struct cfg_upstream *up = a->up;
    struct buf *b = buf_new(0);
    char *rt = NULL, *assertion = NULL, *endpoint = NULL;

    *url = NULL;
    *post = NULL;
    switch (up->grant) {
    case CFG_GRANT_CLIENT_CREDENTIALS:
        /* Microsoft identity platform, client credentials with a shared secret. */
        oauth2_form_add(b, "client_id", up->client_id);
        oauth2_form_add(b, "scope", up->scope);
        oauth2_form_add(b, "client_secret", up->client_secret);
        oauth2_form_add(b, "grant_type", "client_credentials");
        *url = xstrdup(up->token_endpoint);
        break;
    case CFG_GRANT_REFRESH_TOKEN:
        if (oauth2__refresh_token_read(a, &rt, err, errlen) != 0)
            goto fail;
        oauth2_form_add(b, "client_id", up->client_id);
        /* Google refreshes without scope; Microsoft wants the scope again (v2.0). */
        if (up->scope != NULL && !is_google(up))
            oauth2_form_add(b, "scope", up->scope);
        oauth2_form_add(b, "refresh_token", rt);
        oauth2_form_add(b, "grant_type", "refresh_token");
        if (up->client_secret != NULL)
            oauth2_form_add(b, "client_secret", up->client_secret);
        oauth2__wipe_free(rt);
        *url = xstrdup(up->token_endpoint);
        break;
    case CFG_GRANT_JWT_BEARER:
        if (jwt_assertion(up, &assertion, &endpoint, err, errlen) != 0)
            goto fail;
        oauth2_form_add(b, "grant_type", O2_GRANT_JWT);
        oauth2_form_add(b, "assertion", assertion);
        oauth2__wipe_free(assertion);
        *url = endpoint;
        break;
    case CFG_GRANT_NONE:
    case CFG_GRANT_COMMAND:
        snprintf(err, errlen, "no token endpoint grant configured");
        goto fail;
    }
    {
        size_t plen;

        *post = buf_steal(b, &plen);
    }
    buf_free(b);
    return 0;
fail:
    explicit_bzero(b->data, b->cap);
    buf_free(b);
    return -1;
}
