/*
 * test_oauth2 - OAuth 2.0: the JSON reader, token responses, the XOAUTH2/OAUTHBEARER SASL
 * framing (through authsasl), the token cache and its refresh margin (injectable clock,
 * tokens from oauth2_token_command), atomic refresh-token files, the RS256 signer and the
 * configuration rules (presets, loose secrets files refused).
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "common/authsasl.h"
#include "common/tlsio.h"
#include "config/cfg.h"
#include "relayd/oauth2.h"
#include "tests/lib/testlib.h"

static char tmpdir[64];

static void mktmp(void)
{
    testlib_tmpdir(tmpdir, sizeof tmpdir, "test_oauth2");
}

static void rmtmp(void)
{
    testlib_rmtree(tmpdir);
}

static void write_file(const char *path, const char *text, mode_t mode)
{
    FILE *f = fopen(path, "w");

    cr_assert_not_null(f, "%s", path);
    fputs(text, f);
    fclose(f);
    cr_assert(eq(int, chmod(path, mode), 0));
}

/* ---- JSON ---- */

struct json_case {
    const char *label;
    const char *text;
    int want_ok;
    const char *key, *want;
};

/* Well-formed objects give their scalar members; malformed text is refused whole. */
Test(oauth2, json_table)
{
    static const struct json_case cases[] = {
        {"token", "{\"access_token\":\"abc\",\"expires_in\":3599,\"token_type\":\"Bearer\"}", 1,
         "expires_in", "3599"},
        {"escapes", "{\"d\":\"a\\\"b\\\\c\\/d\\n\\u00e9\"}", 1, "d", "a\"b\\c/d\n\xc3\xa9"},
        {"surrogate pair", "{\"e\":\"\\ud83d\\ude00\"}", 1, "e", "\xf0\x9f\x98\x80"},
        {"nested skipped", "{\"o\":{\"x\":[1,2,{\"y\":null}]},\"k\":\"v\"}", 1, "k", "v"},
        {"nested not kept", "{\"o\":{\"x\":1}}", 1, "o", NULL},
        {"bool", " {\"b\" : true } ", 1, "b", "true"},
        {"empty object", "{}", 1, "x", NULL},
        {"negative exp", "{\"n\":-1.5e+3}", 1, "n", "-1.5e+3"},
        {"trailing text", "{\"a\":\"b\"} x", 0, NULL, NULL},
        {"duplicate member", "{\"a\":\"b\",\"a\":\"c\"}", 0, NULL, NULL},
        {"unterminated", "{\"a\":\"b", 0, NULL, NULL},
        {"NUL escape", "{\"a\":\"x\\u0000y\"}", 0, NULL, NULL},
        {"raw control", "{\"a\":\"x\ny\"}", 0, NULL, NULL},
        {"lone surrogate", "{\"a\":\"\\udc00\"}", 0, NULL, NULL},
        {"bad number", "{\"a\":01}", 0, NULL, NULL},
        {"trailing comma", "{\"a\":1,}", 0, NULL, NULL},
        {"not an object", "[1]", 0, NULL, NULL},
        {"html", "<html>503</html>", 0, NULL, NULL},
        {"deep", "{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
         0, NULL, NULL},
    };
    char err[128];
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const struct json_case *c = &cases[i];
        struct json_obj *j = json_obj_parse(c->text, strlen(c->text), err, sizeof err);

        if (!c->want_ok) {
            cr_assert_null(j, "%s: accepted", c->label);
            cr_assert(ne(str, err, ""), "%s", c->label);
            continue;
        }
        cr_assert_not_null(j, "%s: %s", c->label, err);
        if (c->want == NULL)
            cr_assert_null(json_obj_get(j, c->key), "%s", c->label);
        else
            cr_assert(eq(str, (char *)json_obj_get(j, c->key), (char *)c->want), "%s",
                      c->label);
        json_obj_free(j);
    }
}

/* Token endpoint answers: success, OAuth errors with their description, bare HTTP errors. */
Test(oauth2, token_responses)
{
    struct oauth2_resp r;
    char err[512];
    const char *ok = "{\"token_type\":\"Bearer\",\"expires_in\":\"3599\",\"access_token\":\"at1\","
                     "\"refresh_token\":\"rt2\"}";
    const char *bad = "{\"error\":\"invalid_grant\",\"error_description\":\"AADSTS70008: The "
                      "refresh token has expired.\"}";

    cr_assert(eq(int, oauth2_resp_parse(200, ok, strlen(ok), &r, err, sizeof err), 0), "%s", err);
    cr_assert(eq(str, r.access_token, "at1"));
    cr_assert(eq(str, r.refresh_token, "rt2"));
    cr_assert(eq(long, r.expires_in, 3599));
    oauth2_resp_clear(&r);

    cr_assert(eq(int, oauth2_resp_parse(400, bad, strlen(bad), &r, err, sizeof err), -1));
    cr_assert(eq(str, err, "invalid_grant: AADSTS70008: The refresh token has expired. (HTTP 400)"));
    cr_assert_null(r.access_token);
    oauth2_resp_clear(&r);

    cr_assert(eq(int, oauth2_resp_parse(503, "<html/>", 7, &r, err, sizeof err), -1));
    cr_assert(eq(str, err, "HTTP 503 with no OAuth error in the body"));
    oauth2_resp_clear(&r);

    cr_assert(eq(int, oauth2_resp_parse(200, "{\"x\":1}", 7, &r, err, sizeof err), -1));
    cr_assert(eq(str, err, "HTTP 200 without access_token"));
    oauth2_resp_clear(&r);

    cr_assert(eq(int, oauth2_resp_parse(200, "{\"access_token\":\"a\",\"token_type\":\"mac\"}", 39,
                                        &r, err, sizeof err), -1));
    oauth2_resp_clear(&r);
}

/* ---- SASL framing ---- */

static char *b64dec(const char *s, size_t *outlen)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = calloc(1, strlen(s) + 1);
    unsigned v = 0;
    int bits = 0;
    size_t n = 0;

    for (; *s != '\0' && *s != '='; s++) {
        const char *p = strchr(tbl, *s);

        cr_assert_not_null(p);
        v = (v << 6) | (unsigned)(p - tbl);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[n++] = (char)((v >> bits) & 0xff);
        }
    }
    *outlen = n;
    return out;
}

/* XOAUTH2's initial response is user=U^Aauth=Bearer T^A^A; an error challenge gets "". */
Test(oauth2, sasl_xoauth2_framing)
{
    struct authsasl *a;
    const char *mech;
    char err[256], *resp, *dec;
    const char want[] = "user=u@example.com\x01" "auth=Bearer tok-123\x01\x01";
    size_t n;

    cr_assert(eq(int, authsasl_client_init(err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, authsasl_client_new("smtp.example.com", "u@example.com", "tok-123", &a, err,
                                          sizeof err), 0));
    cr_assert(eq(int, authsasl_client_start(a, "PLAIN LOGIN XOAUTH2", "XOAUTH2", 1, 0, &mech,
                                            &resp, err, sizeof err), AUTHSASL_MORE), "%s", err);
    cr_assert(eq(str, (char *)mech, "XOAUTH2"));
    cr_assert_not_null(resp);
    dec = b64dec(resp, &n);
    cr_assert(eq(sz, n, sizeof want - 1));
    cr_assert(eq(int, memcmp(dec, want, n), 0), "got %.*s", (int)n, dec);
    free(dec);
    free(resp);
    /* {"status":"401",...} challenge: the client answers with an empty line. */
    cr_assert(ge(int, authsasl_client_step(a, "eyJzdGF0dXMiOiI0MDEifQ==", &resp, err, sizeof err),
                 0), "%s", err);
    cr_assert(eq(str, resp, ""));
    free(resp);
    authsasl_free(a);
}

/* OAUTHBEARER follows RFC 7628: gs2 header with the escaped mailbox, host, auth. */
Test(oauth2, sasl_oauthbearer_framing)
{
    struct authsasl *a;
    const char *mech;
    char err[256], *resp, *dec;
    const char want[] = "n,a=a=3Db=2Cc@example.com,\x01host=smtp.example.com\x01"
                        "auth=Bearer T\x01\x01";
    size_t n;

    cr_assert(eq(int, authsasl_client_init(err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, authsasl_client_new("smtp.example.com", "a=b,c@example.com", "T", &a, err,
                                          sizeof err), 0));
    cr_assert(eq(int, authsasl_client_start(a, "OAUTHBEARER XOAUTH2", "OAUTHBEARER", 1, 0, &mech,
                                            &resp, err, sizeof err), AUTHSASL_MORE), "%s", err);
    cr_assert(eq(str, (char *)mech, "OAUTHBEARER"));
    dec = b64dec(resp, &n);
    cr_assert(eq(sz, n, sizeof want - 1));
    cr_assert(eq(int, memcmp(dec, want, n), 0), "got %.*s", (int)n, dec);
    free(dec);
    free(resp);
    cr_assert(ge(int, authsasl_client_step(a, "e30=", &resp, err, sizeof err), 0), "%s", err);
    cr_assert(eq(str, resp, "AQ==")); /* a single ^A */
    free(resp);
    authsasl_free(a);
}

/* A password account never sends its password as a bearer token, and no token goes out
 * without TLS. */
Test(oauth2, sasl_token_mechs_only_on_request)
{
    struct authsasl *a;
    const char *mech;
    char err[256], *resp = NULL;

    cr_assert(eq(int, authsasl_client_init(err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, authsasl_client_new("h", "u", "password", &a, err, sizeof err), 0));
    cr_assert(lt(int, authsasl_client_start(a, "XOAUTH2 OAUTHBEARER", NULL, 1, 0, &mech, &resp,
                                            err, sizeof err), 0));
    cr_assert_null(resp);
    cr_assert(lt(int, authsasl_client_start(a, "XOAUTH2", "XOAUTH2", 0, 0, &mech, &resp, err,
                                            sizeof err), 0));
    cr_assert_null(resp);
    authsasl_free(a);
}

/* ---- token cache and margin (fake clock, tokens from a command) ---- */

static uint64_t fake_now;
static uint64_t fake_clock(void *arg)
{
    (void)arg;
    return fake_now;
}

struct got {
    int n;
    char token[64];
    char err[600];
};

static void on_token(void *arg, const char *token, const char *err)
{
    struct got *g = arg;

    g->n++;
    snprintf(g->token, sizeof g->token, "%s", token != NULL ? token : "");
    snprintf(g->err, sizeof g->err, "%s", err != NULL ? err : "");
}

static void stopped(void *arg)
{
    *(int *)arg = 1;
}

struct env {
    uv_loop_t loop;
    struct cfg cfg;
    struct cfg_upstream up;
    struct oauth2 *o;
    char cmd[512];
};

/* One upstream whose token command prints {"access_token":"tokN","expires_in":LIFE}, N
 * counting runs, or fails when the file "fail" exists. */
static void env_init(struct env *e, int life)
{
    memset(e, 0, sizeof *e);
    snprintf(e->cmd, sizeof e->cmd,
             "cd '%s' && [ ! -e fail ] || exit 3; n=$(cat n 2>/dev/null || echo 0); "
             "n=$((n+1)); echo $n > n; printf '{\"access_token\":\"tok%%d\",\"expires_in\":%d}' $n",
             tmpdir, life);
    e->up.name = "m365";
    e->up.host = "smtp.example.com";
    e->up.username = "relay@example.com";
    e->up.upauth = CFG_UPAUTH_XOAUTH2;
    e->up.grant = CFG_GRANT_COMMAND;
    e->up.oauth2_token_command = e->cmd;
    e->up.oauth2_refresh_margin = 600;
    e->cfg.upstreams = &e->up;
    e->cfg.nupstreams = 1;
    cr_assert(eq(int, uv_loop_init(&e->loop), 0));
    e->o = oauth2_new(&e->loop, &e->cfg);
    oauth2_set_clock(e->o, fake_clock, NULL);
}

static void env_wait(struct env *e, struct got *g)
{
    int before = g->n;

    cr_assert(eq(int, oauth2_token_get(e->o, &e->up, on_token, g), 0));
    TESTLIB_LOOP_RUN_UNTIL(&e->loop, g->n != before, 2000);
    cr_assert(eq(int, g->n, before + 1), "no answer from the token manager");
}

/* Waits until the request in flight (if any) has finished, or for the backoff's verdict. */
static void env_settle(struct env *e)
{
    struct got g = {0, "", ""};

    env_wait(e, &g);
}

static void env_free(struct env *e)
{
    int done = 0;

    oauth2_stop(e->o, stopped, &done);
    TESTLIB_LOOP_RUN_UNTIL(&e->loop, done, 1000);
    cr_assert(eq(int, done, 1));
    e->o = oauth2_free(e->o);
    cr_assert(eq(int, uv_loop_close(&e->loop), 0), "handles left open");
}

TestSuite(oauth2_cache, .init = mktmp, .fini = rmtmp, .timeout = 30);

/* Issued once, reused until expiry - margin, refreshed there while still handed out, never
 * handed out in the last margin/2. */
Test(oauth2_cache, early_refresh)
{
    struct env e;
    struct got g = {0, "", ""};

    env_init(&e, 3600);
    fake_now = 1000000;
    cr_assert_null(oauth2_token_peek(e.o, &e.up)); /* nothing yet: starts the request */
    env_wait(&e, &g);
    cr_assert(eq(str, g.token, "tok1"));
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok1"));
    cr_assert(eq(long, oauth2_token_ttl(e.o, &e.up), 3600));

    fake_now += 2999 * 1000; /* before expiry - 10 min: the same token, no request */
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok1"));
    cr_assert(eq(str, (char *)oauth2_last_error(e.o, &e.up), ""));

    fake_now += 1000; /* at expiry - 10 min: still tok1, and a refresh starts */
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok1"));
    cr_assert(eq(str, (char *)oauth2_last_error(e.o, &e.up), "oauth2: token refresh in progress"));
    for (int i = 0; i < 2000 && strcmp(oauth2_token_peek(e.o, &e.up), "tok1") == 0; i++)
        uv_run(&e.loop, UV_RUN_ONCE); /* tok1 stays usable while tok2 is on its way */
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok2"));

    /* tok2 was issued now: past expiry - 5 min it is never handed out. */
    fake_now += 3301 * 1000;
    cr_assert_null(oauth2_token_peek(e.o, &e.up));
    env_settle(&e);
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok3"));
    env_free(&e);
}

/* A token shorter-lived than twice the margin is refreshed at half its life. */
Test(oauth2_cache, short_lifetime)
{
    struct env e;
    struct got g = {0, "", ""};

    env_init(&e, 20);
    fake_now = 5000;
    env_wait(&e, &g);
    cr_assert(eq(str, g.token, "tok1"));
    fake_now += 9999;
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok1"));
    cr_assert(eq(str, (char *)oauth2_last_error(e.o, &e.up), ""));
    fake_now += 5001; /* 15 s: the last quarter */
    cr_assert_null(oauth2_token_peek(e.o, &e.up));
    env_settle(&e);
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok2"));
    env_free(&e);
}

/* After a 535 the token is refreshed once; a fresh token refused again is not. */
Test(oauth2_cache, invalidate_once)
{
    struct env e;
    struct got g = {0, "", ""};

    env_init(&e, 3600);
    fake_now = 1000;
    env_wait(&e, &g);
    oauth2_invalidate(e.o, &e.up);
    cr_assert_null(oauth2_token_peek(e.o, &e.up));
    env_settle(&e);
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok2"));
    oauth2_invalidate(e.o, &e.up);
    cr_assert_null(oauth2_token_peek(e.o, &e.up));
    cr_assert(not(eq(ptr, strstr(oauth2_last_error(e.o, &e.up), "refused a token issued right "
                                                                 "after an earlier 535"), NULL)),
              "%s", oauth2_last_error(e.o, &e.up));
    env_settle(&e);
    cr_assert_null(oauth2_token_peek(e.o, &e.up)); /* backing off: no third request yet */
    env_free(&e);
}

/* A failing source keeps its reason, backs off, and recovers once it works again. */
Test(oauth2_cache, failure_and_backoff)
{
    struct env e;
    struct got g = {0, "", ""};
    char path[128];

    snprintf(path, sizeof path, "%s/fail", tmpdir);
    write_file(path, "", 0600);
    env_init(&e, 3600);
    fake_now = 1000;
    env_wait(&e, &g);
    cr_assert(eq(str, g.token, ""));
    cr_assert(eq(str, g.err, "oauth2: oauth2_token_command exited with status 3"));
    cr_assert_null(oauth2_token_peek(e.o, &e.up));
    cr_assert(eq(str, (char *)oauth2_last_error(e.o, &e.up), g.err)); /* no new run: backoff */
    unlink(path);
    fake_now += 2000;
    cr_assert_null(oauth2_token_peek(e.o, &e.up)); /* backoff over: runs again */
    env_settle(&e);
    cr_assert(eq(str, (char *)oauth2_token_peek(e.o, &e.up), "tok1"));
    env_free(&e);
}

/* ---- files ---- */

/* The refresh token file is replaced atomically with mode 0600, even over a 0644 file. */
Test(oauth2_cache, file_write_atomic)
{
    char path[128], err[256], *got = NULL;
    struct stat st;

    snprintf(path, sizeof path, "%s/rt", tmpdir);
    write_file(path, "old\n", 0644);
    cr_assert(eq(int, oauth2_file_write(path, "new-token", err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, stat(path, &st), 0));
    cr_assert(eq(int, (int)(st.st_mode & 0777), 0600));
    cr_assert(eq(int, cfg_secret_read(path, 1024, &got, err, sizeof err), 0), "%s", err);
    cr_assert(eq(str, got, "new-token"));
    free(got);
    cr_assert(eq(int, chmod(path, 0640), 0));
    cr_assert(eq(int, cfg_secret_read(path, 1024, &got, err, sizeof err), -1));
    cr_assert(not(eq(ptr, strstr(err, "readable by group or others"), NULL)), "%s", err);
}

/* RS256 signatures are deterministic PKCS#1 v1.5, one modulus long. */
Test(oauth2_cache, rs256_sign)
{
    char cmd[256], path[128], err[256], *pem = NULL;
    unsigned char *s1, *s2;
    size_t n1, n2;
    FILE *f;
    long len;

    snprintf(path, sizeof path, "%s/key.pem", tmpdir);
    snprintf(cmd, sizeof cmd, "certtool --generate-privkey --key-type rsa --bits 2048 "
             "--pkcs8 --password '' --outfile '%s' >/dev/null 2>&1", path);
    cr_assert(eq(int, system(cmd), 0));
    cr_assert(eq(int, tlsio_global_init(err, sizeof err), 0));
    f = fopen(path, "r");
    cr_assert_not_null(f);
    fseek(f, 0, SEEK_END);
    len = ftell(f);
    rewind(f);
    pem = calloc(1, (size_t)len + 1);
    cr_assert(eq(sz, fread(pem, 1, (size_t)len, f), (size_t)len));
    fclose(f);
    cr_assert(eq(int, tlsio_rs256_sign(pem, "a.b", 3, &s1, &n1, err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, tlsio_rs256_sign(pem, "a.b", 3, &s2, &n2, err, sizeof err), 0), "%s", err);
    cr_assert(eq(sz, n1, 256));
    cr_assert(eq(int, memcmp(s1, s2, n1), 0));
    free(s1);
    free(s2);
    cr_assert(eq(int, tlsio_rs256_sign("not a key", "a", 1, &s1, &n1, err, sizeof err), -1));
    free(pem);
}

/* ---- configuration ---- */

static int load(const char *upstream_lines, struct cfg *cfg, char *err, size_t errlen)
{
    char path[128], text[2048];

    snprintf(path, sizeof path, "%s/relayd.conf", tmpdir);
    snprintf(text, sizeof text,
             "[listener lan]\nlisten = 127.0.0.1:2525\n\n[upstream m365]\n"
             "host = smtp.office365.com\n%s\n[route default]\nupstream = m365\n",
             upstream_lines);
    write_file(path, text, 0644);
    return cfg_load(path, cfg, err, errlen);
}

/* Microsoft presets: endpoints from the tenant, the scope from the grant. */
Test(oauth2_cache, cfg_presets)
{
    struct cfg cfg;
    char err[512], lines[1024], secret[128];

    snprintf(secret, sizeof secret, "%s/secret", tmpdir);
    write_file(secret, "s3cret\n", 0600);
    snprintf(lines, sizeof lines,
             "auth = xoauth2\nusername = relay@contoso.com\nprovider = microsoft\n"
             "tenant = contoso.com\nclient_id = 1234\nclient_secret_file = %s\n", secret);
    cr_assert(eq(int, load(lines, &cfg, err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, cfg.upstreams[0].grant, CFG_GRANT_CLIENT_CREDENTIALS));
    cr_assert(eq(str, cfg.upstreams[0].token_endpoint,
                 "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/token"));
    cr_assert(eq(str, cfg.upstreams[0].scope, "https://outlook.office365.com/.default"));
    cr_assert(eq(str, cfg.upstreams[0].client_secret, "s3cret"));
    cr_assert(eq(int, cfg.upstreams[0].oauth2_refresh_margin, 600));
    cfg_free(&cfg);

    snprintf(lines, sizeof lines,
             "auth = xoauth2\nusername = relay@contoso.com\nprovider = microsoft\n"
             "tenant = contoso.com\nclient_id = 1234\nrefresh_token_file = %s/rt\n", tmpdir);
    cr_assert(eq(int, load(lines, &cfg, err, sizeof err), 0), "%s", err);
    cr_assert(eq(int, cfg.upstreams[0].grant, CFG_GRANT_REFRESH_TOKEN));
    cr_assert(eq(str, cfg.upstreams[0].scope, "https://outlook.office.com/SMTP.Send "
                                              "offline_access"));
    cr_assert(eq(str, cfg.upstreams[0].device_endpoint,
                 "https://login.microsoftonline.com/contoso.com/oauth2/v2.0/devicecode"));
    cfg_free(&cfg);
}

/* Secrets files readable by others are refused at load, naming the file. */
Test(oauth2_cache, cfg_loose_modes)
{
    struct cfg cfg;
    char err[512], lines[1024], path[128];

    snprintf(path, sizeof path, "%s/secret", tmpdir);
    write_file(path, "s3cret\n", 0644);
    snprintf(lines, sizeof lines, "auth = xoauth2\nusername = a@b.c\nprovider = microsoft\n"
             "tenant = t\nclient_id = 1\nclient_secret_file = %s\n", path);
    cr_assert(eq(int, load(lines, &cfg, err, sizeof err), CFG_EINVAL));
    cr_assert(not(eq(ptr, strstr(err, "readable by group or others"), NULL)), "%s", err);

    snprintf(path, sizeof path, "%s/rt", tmpdir);
    write_file(path, "rt\n", 0640);
    snprintf(lines, sizeof lines, "auth = xoauth2\nusername = a@b.c\nprovider = google\n"
             "client_id = 1\nrefresh_token_file = %s\n", path);
    cr_assert(eq(int, load(lines, &cfg, err, sizeof err), CFG_EINVAL));
    cr_assert(not(eq(ptr, strstr(err, "refresh_token_file"), NULL)), "%s", err);
    cr_assert(not(eq(ptr, strstr(err, "readable by group or others"), NULL)), "%s", err);

    /* No silent password fallback: password_file is refused with auth = xoauth2. */
    snprintf(path, sizeof path, "%s/pw", tmpdir);
    write_file(path, "pw\n", 0600);
    snprintf(lines, sizeof lines, "auth = xoauth2\nusername = a@b.c\npassword_file = %s\n"
             "oauth2_token_command = echo x\n", path);
    cr_assert(eq(int, load(lines, &cfg, err, sizeof err), CFG_EINVAL));
    cr_assert(not(eq(ptr, strstr(err, "no password fallback"), NULL)), "%s", err);
}
