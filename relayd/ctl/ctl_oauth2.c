/*
 * ctl_oauth2 - relayctl oauth2 authorize|token UPSTREAM, and the OAuth 2.0 step of
 * test-upstream; see ctl_oauth2.h.
 *
 * authorize: the device-code flow (RFC 8628), blocking: the device authorization request,
 * the verification URL and user code printed, then polling the token endpoint (bounded by
 * the answer's expires_in, at most an hour) until someone signed in; the refresh token is
 * written with oauth2_file_write() (0600, atomic).  token: a private loop runs the token
 * manager until the upstream has a token (or the attempt failed), as relayd would.
 * Output to stdout, errors to stderr as "relayctl: oauth2 ...": never a token.
 */
#include "relayd/ctl/ctl_oauth2.h"

#include <curl/curl.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/buf.h"
#include "common/json.h"
#include "common/xalloc.h"
#include "relayd/ctl/ctl.h"
#include "relayd/oauth2.h"

#define CTL_OAUTH2_GRANT_DEVICE "urn:ietf:params:oauth:grant-type:device_code"

static void wipe_free(char *s)
{
    if (s != NULL) {
        explicit_bzero(s, strlen(s));
        free(s);
    }
}

struct cli_get {
    int done;
    int ok;
    char err[600];
};

static void cli_got(void *arg, const char *token, const char *err)
{
    struct cli_get *g = arg;

    g->done = 1;
    g->ok = token != NULL;
    if (err != NULL)
        snprintf(g->err, sizeof g->err, "%s", err);
}

static void cli_stopped(void *arg)
{
    (void)arg;
}

static int cli_token(const struct cfg *cfg, const struct cfg_upstream *up)
{
    uv_loop_t loop;
    struct oauth2 *o;
    struct cli_get g = {0, 0, ""};
    long ttl;
    int i;

    uv_loop_init(&loop);
    o = oauth2_new(&loop, cfg);
    if (oauth2_token_get(o, up, cli_got, &g) == 0) {
        /* Bounded: the request has its own 30 s timeout, the command its own. */
        for (i = 0; i < 600 && !g.done; i++)
            uv_run(&loop, UV_RUN_ONCE);
    }
    ttl = oauth2_token_ttl(o, up);
    oauth2_stop(o, cli_stopped, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    oauth2_free(o);
    if (!g.ok) {
        fprintf(stderr, "relayctl: oauth2 token %s: %s\n", up->name,
                g.err[0] ? g.err : "oauth2: no answer");
        return CTL_EXIT_FAIL;
    }
    printf("oauth2: upstream %s: token ok (grant %s, %s as %s, expires in %ld s)\n", up->name,
           oauth2_grant_name(up->grant), oauth2_mechanism(up), up->username, ttl);
    return CTL_EXIT_OK;
}

int ctl_oauth2_probe_token(uv_loop_t *loop, const struct cfg *cfg, const struct cfg_upstream *up,
                           struct oauth2 **out, char *text, size_t textlen)
{
    struct cli_get g = {0, 0, ""};
    int i;

    *out = oauth2_new(loop, cfg);
    if (oauth2_token_get(*out, up, cli_got, &g) != 0) {
        snprintf(text, textlen, "oauth2: upstream %s does not use OAuth 2.0", up->name);
        return -1;
    }
    for (i = 0; i < 600 && !g.done; i++)
        uv_run(loop, UV_RUN_ONCE);
    if (!g.ok) {
        snprintf(text, textlen, "%s", g.err[0] ? g.err : "oauth2: no answer");
        return -1;
    }
    snprintf(text, textlen, "oauth2: token ok (grant %s, %s as %s, expires in %ld s)",
             oauth2_grant_name(up->grant), oauth2_mechanism(up), up->username,
             oauth2_token_ttl(*out, up));
    return 0;
}

static int cli_authorize(const struct cfg_upstream *up)
{
    struct buf *b = buf_new(0);
    struct json_obj *j = NULL;
    char err[600], *device_code = NULL;
    const char *v, *uri;
    long status = 0, interval, expires;
    time_t deadline;
    int rc = CTL_EXIT_FAIL;

    if (up->grant != CFG_GRANT_REFRESH_TOKEN) {
        fprintf(stderr,
                "relayctl: oauth2 authorize %s: needs oauth2_grant = refresh_token "
                "(this upstream uses %s)\n",
                up->name, oauth2_grant_name(up->grant));
        goto done;
    }
    if (up->device_endpoint == NULL) {
        fprintf(stderr,
                "relayctl: oauth2 authorize %s: no device_endpoint (set it, or "
                "provider = microsoft | google)\n",
                up->name);
        goto done;
    }
    /* RFC 8628 3.1: the device authorization request. */
    oauth2_form_add(b, "client_id", up->client_id);
    oauth2_form_add(b, "scope", up->scope != NULL ? up->scope : "");
    if (oauth2_http_post(up, up->device_endpoint, b->data, &status, &j, err, sizeof err) != 0) {
        fprintf(stderr, "relayctl: oauth2 authorize %s: device endpoint: %s\n", up->name, err);
        goto done;
    }
    if (status != 200 || json_obj_get(j, "device_code") == NULL) {
        v = json_obj_get(j, "error_description");
        fprintf(stderr,
                "relayctl: oauth2 authorize %s: device endpoint said %s%s%.300s "
                "(HTTP %ld)\n",
                up->name, json_obj_get(j, "error") ? json_obj_get(j, "error") : "no device_code",
                v ? ": " : "", v ? v : "", status);
        goto done;
    }
    device_code = xstrdup(json_obj_get(j, "device_code"));
    /* Google says verification_url, RFC 8628 and Microsoft verification_uri. */
    uri = json_obj_get(j, "verification_uri");
    if (uri == NULL)
        uri = json_obj_get(j, "verification_url");
    interval = (v = json_obj_get(j, "interval")) != NULL ? strtol(v, NULL, 10) : 5;
    expires = (v = json_obj_get(j, "expires_in")) != NULL ? strtol(v, NULL, 10) : 900;
    if (interval < 1)
        interval = 1;
    if (interval > 60)
        interval = 60;
    if (expires < 1 || expires > 3600)
        expires = 900;
    printf("To authorize relayd for upstream %s, sign in as %s:\n"
           "  open   %s\n"
           "  enter  %s\n"
           "Waiting up to %ld s (polling every %ld s)...\n",
           up->name, up->username, uri != NULL ? uri : "(no verification URI given)",
           json_obj_get(j, "user_code") ? json_obj_get(j, "user_code") : "(none)", expires,
           interval);
    fflush(stdout);
    j = json_obj_free(j);
    deadline = time(NULL) + expires;
    while (time(NULL) < deadline) {
        struct timespec ts = {interval, 0};

        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        buf_reset(b);
        /* RFC 8628 3.4. */
        oauth2_form_add(b, "grant_type", CTL_OAUTH2_GRANT_DEVICE);
        oauth2_form_add(b, "device_code", device_code);
        oauth2_form_add(b, "client_id", up->client_id);
        if (up->client_secret != NULL)
            oauth2_form_add(b, "client_secret", up->client_secret);
        if (oauth2_http_post(up, up->token_endpoint, b->data, &status, &j, err, sizeof err) != 0) {
            fprintf(stderr, "relayctl: oauth2 authorize %s: %s\n", up->name, err);
            goto done;
        }
        v = json_obj_get(j, "error");
        if (v != NULL && strcmp(v, "authorization_pending") == 0) {
            j = json_obj_free(j);
            continue;
        }
        if (v != NULL && strcmp(v, "slow_down") == 0) {
            interval += 5; /* RFC 8628 3.5 */
            j = json_obj_free(j);
            continue;
        }
        if (v != NULL || status != 200) {
            const char *d = json_obj_get(j, "error_description");

            fprintf(stderr,
                    "relayctl: oauth2 authorize %s: token endpoint said %.64s%s%.300s "
                    "(HTTP %ld)\n",
                    up->name, v != NULL ? v : "no token", d ? ": " : "", d ? d : "", status);
            goto done;
        }
        if ((v = json_obj_get(j, "refresh_token")) == NULL) {
            fprintf(stderr,
                    "relayctl: oauth2 authorize %s: the answer has no refresh_token "
                    "(Microsoft: scope needs offline_access)\n",
                    up->name);
            goto done;
        }
        if (oauth2_file_write(up->refresh_token_file, v, err, sizeof err) != 0) {
            fprintf(stderr, "relayctl: oauth2 authorize %s: %s\n", up->name, err);
            goto done;
        }
        printf("Authorized.  Refresh token stored in %s (mode 0600); relayd uses it from its "
               "next token refresh on.\n",
               up->refresh_token_file);
        rc = CTL_EXIT_OK;
        goto done;
    }
    fprintf(stderr, "relayctl: oauth2 authorize %s: nobody signed in within %ld s\n", up->name,
            expires);
done:
    json_obj_free(j);
    wipe_free(device_code);
    explicit_bzero(b->data, b->cap);
    buf_free(b);
    return rc;
}

static int oauth2_cli(const struct cfg *cfg, int argc, char **argv)
{
    const struct cfg_upstream *up = NULL;
    int i, rc;

    if (argc != 2 || (strcmp(argv[0], "authorize") != 0 && strcmp(argv[0], "token") != 0)) {
        fprintf(stderr, "usage: relayctl [-c FILE] oauth2 authorize|token UPSTREAM\n");
        return CTL_EXIT_USAGE;
    }
    for (i = 0; i < cfg->nupstreams && up == NULL; i++)
        if (strcmp(cfg->upstreams[i].name, argv[1]) == 0)
            up = &cfg->upstreams[i];
    if (up == NULL) {
        fprintf(stderr, "relayctl: oauth2 %s %s: no [upstream %s] in %s\n", argv[0], argv[1],
                argv[1], cfg->path != NULL ? cfg->path : "the configuration");
        return CTL_EXIT_FAIL;
    }
    if (up->upauth == CFG_UPAUTH_PASSWORD) {
        fprintf(stderr, "relayctl: oauth2 %s %s: the upstream uses auth = password\n", argv[0],
                up->name);
        return CTL_EXIT_FAIL;
    }
    if (strcmp(argv[0], "token") == 0)
        return cli_token(cfg, up);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    rc = cli_authorize(up);
    curl_global_cleanup();
    return rc;
}

int ctl_oauth2_cmd(struct ctl *c, int argc, char **argv)
{
    struct cfg cfg;
    char err[1024];
    int rc;

    if ((rc = cfg_load(c->config_path, &cfg, err, sizeof err)) != 0) {
        fprintf(stderr, "relayctl: %s\n", err[0] ? err : strerror(-rc));
        return CTL_EXIT_FAIL;
    }
    rc = oauth2_cli(&cfg, argc, argv);
    cfg_free(&cfg);
    return rc;
}
