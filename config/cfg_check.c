/*
 * cfg_check - the rules across keys of relayd.conf, run by cfg_load() once the whole file is
 * read (cfg__check_all()): required keys, the listener that would be an open relay, cleartext
 * passwords, TLS pins, the OAuth 2.0 token source and its presets, routes -> upstreams and
 * their matchers.  A rule may complete the configuration (a loopback listener's allow list,
 * port 465 for implicit TLS, the inferred grant, provider presets); each reports its problem
 * through cfg__perr() at the line of the key at fault, and the first problem wins.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "common/netaddr.h"
#include "common/xalloc.h"
#include "config/cfg_int.h"

/* The line a key was set on, or else the section's line. */
static int key_line(const struct cfg_sec *s, const char *key)
{
    int line = s->seen[cfg__key_index(s->def, key)];

    return line != 0 ? line : s->line;
}

static void check_relayd(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg *cfg = p->cfg;
    char a[32], b[32];

    if (cfg->retry_max < cfg->retry_first) {
        cfg__fmt_duration(cfg->retry_max, a, sizeof a);
        cfg__fmt_duration(cfg->retry_first, b, sizeof b);
        cfg__perr(p, key_line(s, "retry_max"), s, "retry_max", "%s is less than retry_first (%s)",
                  a, b);
    }
    if (cfg->bounce_to != NULL) {
        const char *at = strrchr(cfg->bounce_to, '@');
        const char *c;

        for (c = cfg->bounce_to; *c != '\0' && (unsigned char)*c > ' ' && *c != '<' && *c != '>' &&
                                 *c != ',' && *c != 0x7f;
             c++)
            ;
        if (*c != '\0' || at == NULL || at == cfg->bounce_to || at[1] == '\0')
            cfg__perr(p, key_line(s, "bounce_to"), s, "bounce_to",
                      "'%.60s' is not a mail address (user@domain, no brackets)", cfg->bounce_to);
    }
}

/* 1 when the list names PLAIN or LOGIN (mechanisms that send the password as it is). */
static int cfg_mechs_have_plaintext(const char *mechs)
{
    const char *p = mechs != NULL ? mechs : "PLAIN LOGIN";

    while (*p != '\0') {
        size_t n;

        p += strspn(p, ", \t");
        n = strcspn(p, ", \t");
        if (n == 5 && (strncasecmp(p, "PLAIN", 5) == 0 || strncasecmp(p, "LOGIN", 5) == 0))
            return 1;
        p += n;
    }
    return 0;
}

/* TLS files, the sasldb, and no cleartext passwords by accident.  0 or -1 (reported). */
static int check_listener_tls_auth(struct cfg_parse *p, const struct cfg_sec *s,
                                   const struct cfg_listener *l)
{
    struct stat st;

    if (l->tls != CFG_TLS_NONE && (l->cert == NULL || l->key == NULL)) {
        cfg__perr(p, key_line(s, "tls"), s, l->cert == NULL ? "cert" : "key",
                  "required with tls = %s (PEM file)", cfg_tls_name(l->tls));
        return -1;
    }
    if ((l->auth == CFG_AUTH_OPTIONAL || l->auth == CFG_AUTH_REQUIRED) &&
        (stat(l->sasldb, &st) != 0 || access(l->sasldb, R_OK) != 0)) {
        cfg__perr(p, key_line(s, "sasldb"), s, "sasldb",
                  "%.*s: %s (create accounts with: saslpasswd2 -c -f %.*s -u DOMAIN USER)",
                  VAL(l->sasldb), strerror(errno), VAL(l->sasldb));
        return -1;
    }
    /* CRAM-MD5 (and the like) never send the password itself: a fax machine that offers
     * only that may log in without TLS; PLAIN and LOGIN may not, unless said so. */
    if (l->tls == CFG_TLS_NONE && l->auth != CFG_AUTH_OFF && !l->auth_plaintext &&
        cfg_mechs_have_plaintext(l->auth_mechanisms)) {
        cfg__perr(
            p, key_line(s, "auth"), s, "auth",
            "%s on a listener with tls = none would have clients send passwords in "
            "cleartext; set tls = starttls or implicit (with cert and key), or auth_plaintext "
            "= yes for devices that cannot do TLS",
            cfg_auth_name(l->auth));
        return -1;
    }
    return 0;
}

/* bare_lf's word into its enum; a world-open allow list on a non-loopback listener is
 * legal (a relay behind a firewall) but worth a warning at every load. */
static void check_listener_inbound(struct cfg_parse *p, const struct cfg_sec *s,
                                   struct cfg_listener *l)
{
    size_t i;

    if (l->bare_lf == NULL || strcmp(l->bare_lf, "accept") == 0)
        l->bare_lf_mode = CFG_BARE_LF_ACCEPT;
    else if (strcmp(l->bare_lf, "normalize") == 0)
        l->bare_lf_mode = CFG_BARE_LF_NORMALIZE;
    else if (strcmp(l->bare_lf, "reject") == 0)
        l->bare_lf_mode = CFG_BARE_LF_REJECT;
    else
        cfg__perr(p, key_line(s, "bare_lf"), s, "bare_lf",
                  "'%.40s' is not one of accept, normalize, reject", l->bare_lf);
    for (i = 0; i < l->allow.n; i++) {
        if (l->allow.nets[i].prefix == 0 && l->host != NULL && strcmp(l->host, "127.0.0.1") != 0 &&
            strcmp(l->host, "::1") != 0) {
            log_warn("%s:%d: [listener %s] allow: a /0 network lets every address on the "
                     "Internet use this listener as a relay; list your client networks instead",
                     p->path, key_line(s, "allow"), l->name);
            break;
        }
    }
}

static void check_listener(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_listener *l = &p->cfg->listeners[s->index];
    struct sockaddr_storage ss;
    char why[256];
    int i;

    if (l->host == NULL) {
        cfg__perr(p, s->line, s, "listen", "required (e.g. listen = 127.0.0.1:25)");
        return;
    }
    for (i = 0; i < s->index; i++) {
        const struct cfg_listener *o = &p->cfg->listeners[i];

        if (strcmp(o->host, l->host) == 0 && o->port == l->port) {
            cfg__perr(p, key_line(s, "listen"), s, "listen", "same address as [listener %s]",
                      o->name);
            return;
        }
    }
    check_listener_inbound(p, s, l);
    if (check_listener_tls_auth(p, s, l) != 0)
        return;
    if (l->allow.n > 0)
        return;

    memset(&ss, 0, sizeof ss);
    if (strchr(l->host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

        sin6->sin6_family = AF_INET6;
        inet_pton(AF_INET6, l->host, &sin6->sin6_addr);
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;

        sin->sin_family = AF_INET;
        inet_pton(AF_INET, l->host, &sin->sin_addr);
    }
    /* Only a loopback listener may go without an allow list: anything else could be an
     * open relay the moment the host gets a public address or a port forward. */
    {
        struct netaddr_list lo;

        if (netaddr_list_parse(CFG_ALLOW_LOOPBACK, &lo, why, sizeof why) != 0)
            log_panic("cfg: %s: %s", CFG_ALLOW_LOOPBACK, why);
        if (netaddr_list_match(&lo, (struct sockaddr *)&ss)) {
            l->allow = lo;
            return;
        }
        netaddr_list_free(&lo);
    }
    cfg__perr(p, key_line(s, "listen"), s, "allow",
              "%s %s with no allow list: this would be an open "
              "relay; add allow = <your client networks>",
              l->host,
              netaddr_is_private_or_loopback((struct sockaddr *)&ss)
                  ? "binds a non-loopback address"
                  : "binds a public address");
}

/* tls_pin: "sha256//BASE64" (curl's --pinnedpubkey; "sha256/" accepted too) of a 32-byte
 * SHA-256, several separated by ';', ',' or spaces.  0, or -1 with the reason in why. */
static int pin_list_ok(const char *list, char *why, size_t whylen)
{
    const char *q = list;
    int n = 0;

    while (*q != '\0') {
        size_t len, i;
        const char *b;

        q += strspn(q, ";, \t");
        if (*q == '\0')
            break;
        len = strcspn(q, ";, \t");
        if (len < 7 || strncasecmp(q, "sha256/", 7) != 0) {
            snprintf(why, whylen,
                     "\"%.*s\" must start with sha256// (sha256//BASE64 of the "
                     "certificate's public key)",
                     (int)(len > 60 ? 60 : len), q);
            return -1;
        }
        b = q + 7 + (len > 7 && q[7] == '/');
        i = len - (size_t)(b - q);
        /* 32 bytes are 44 base64 characters, the last one '='. */
        if (i != 44 || b[43] != '=' ||
            strspn(b, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                      "0123456789+/") != 43) {
            snprintf(why, whylen, "\"%.*s\" is not a base64 SHA-256 (44 characters ending in =)",
                     (int)(len > 60 ? 60 : len), q);
            return -1;
        }
        q += len;
        n++;
    }
    if (n == 0) {
        snprintf(why, whylen, "no pin given");
        return -1;
    }
    return 0;
}

/* Provider presets for [upstream] provider (README "OAuth 2.0"). */
#define CFG_MS_LOGIN "https://login.microsoftonline.com/"
#define CFG_MS_SCOPE_APP "https://outlook.office365.com/.default"
#define CFG_MS_SCOPE_DELEGATED "https://outlook.office.com/SMTP.Send offline_access"
#define CFG_GOOGLE_TOKEN "https://oauth2.googleapis.com/token"
#define CFG_GOOGLE_DEVICE "https://oauth2.googleapis.com/device/code"
#define CFG_GOOGLE_SCOPE "https://mail.google.com/"
/* A Google service account key holds a 2048-bit PEM key and a few names: ~2.4 kB. */
#define CFG_SA_MAX (64 * 1024)
/* Microsoft's refresh tokens run to a few kB. */
#define CFG_RT_MAX (64 * 1024)

/* Fails the load when path exists and others could read it (or it is no regular file);
 * a missing file is fine when may_be_missing (relayctl oauth2 authorize creates it). */
static int oauth2_file_ok(struct cfg_parse *p, const struct cfg_sec *s, const char *key,
                          const char *path, size_t max, int may_be_missing)
{
    char why[300], *data = NULL;

    if (may_be_missing && access(path, F_OK) != 0 && errno == ENOENT)
        return 0;
    if (cfg_secret_read(path, max, &data, why, sizeof why) != 0) {
        cfg__perr(p, key_line(s, key), s, key, "%s", why);
        return -1;
    }
    explicit_bzero(data, strlen(data));
    free(data);
    return 0;
}

static int https_url_ok(struct cfg_parse *p, const struct cfg_sec *s, const char *key,
                        const char *v)
{
    if (v != NULL && (strncasecmp(v, "https://", 8) != 0 || strpbrk(v, " \t\r\n") != NULL)) {
        cfg__perr(p, key_line(s, key), s, key, "'%.*s' is not an https:// URL", VAL(v));
        return -1;
    }
    return 0;
}

/* auth = xoauth2 | oauthbearer: the token source must be complete and its secrets private.
 * Presets of provider fill token_endpoint, device_endpoint and scope when not given. */
static void check_upstream_oauth2(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];
    const char *auth = cfg__enum_name(CFG_T_UPAUTH, (int)u->upauth);
    int ms, google;

    if (u->upauth == CFG_UPAUTH_PASSWORD) {
        cfg__perr(p, key_line(s, "auth"), s, "auth",
                  "OAuth 2.0 keys are set but auth = password; set auth = xoauth2 or oauthbearer");
        return;
    }
    if (u->username == NULL) {
        cfg__perr(p, s->line, s, "username", "required with auth = %s (the mailbox to send as)",
                  auth);
        return;
    }
    if (u->password_file != NULL) {
        cfg__perr(p, key_line(s, "password_file"), s, "password_file",
                  "not used with auth = %s: remove it (there is no password fallback)", auth);
        return;
    }
    if (u->tls == CFG_TLS_NONE && !u->allow_plaintext_auth) {
        cfg__perr(p, key_line(s, "tls"), s, "tls",
                  "none with auth = %s would send the token in cleartext; use starttls or "
                  "implicit",
                  auth);
        return;
    }
    ms = u->provider != NULL && strcasecmp(u->provider, "microsoft") == 0;
    google = u->provider != NULL && strcasecmp(u->provider, "google") == 0;
    if (u->provider != NULL && !ms && !google) {
        cfg__perr(p, key_line(s, "provider"), s, "provider",
                  "'%.*s' is not one of microsoft, google", VAL(u->provider));
        return;
    }
    if (u->oauth2_token_command != NULL) {
        if (u->grant != CFG_GRANT_NONE || u->client_id != NULL || u->refresh_token_file != NULL ||
            u->client_secret_file != NULL || u->service_account_file != NULL) {
            cfg__perr(p, key_line(s, "oauth2_token_command"), s, "oauth2_token_command",
                      "the command is the token source: remove oauth2_grant, client_id and the "
                      "secrets files");
            return;
        }
        u->grant = CFG_GRANT_COMMAND;
        return;
    }
    /* Not given: the files say which grant is meant. */
    if (u->grant == CFG_GRANT_NONE)
        u->grant = u->service_account_file != NULL ? CFG_GRANT_JWT_BEARER
                   : u->refresh_token_file != NULL ? CFG_GRANT_REFRESH_TOKEN
                                                   : CFG_GRANT_CLIENT_CREDENTIALS;
    if (ms && u->tenant == NULL) {
        cfg__perr(
            p, s->line, s, "tenant",
            "required with provider = microsoft (your tenant id or domain, e.g. contoso.com)");
        return;
    }
    if (ms && u->token_endpoint == NULL)
        u->token_endpoint = xasprintf(CFG_MS_LOGIN "%s/oauth2/v2.0/token", u->tenant);
    if (ms && u->device_endpoint == NULL)
        u->device_endpoint = xasprintf(CFG_MS_LOGIN "%s/oauth2/v2.0/devicecode", u->tenant);
    if (ms && u->scope == NULL)
        u->scope = xstrdup(u->grant == CFG_GRANT_CLIENT_CREDENTIALS ? CFG_MS_SCOPE_APP
                                                                    : CFG_MS_SCOPE_DELEGATED);
    if (google && u->token_endpoint == NULL)
        u->token_endpoint = xstrdup(CFG_GOOGLE_TOKEN);
    if (google && u->device_endpoint == NULL)
        u->device_endpoint = xstrdup(CFG_GOOGLE_DEVICE);
    if (google && u->scope == NULL)
        u->scope = xstrdup(CFG_GOOGLE_SCOPE);
    if (https_url_ok(p, s, "token_endpoint", u->token_endpoint) != 0 ||
        https_url_ok(p, s, "device_endpoint", u->device_endpoint) != 0)
        return;
    switch (u->grant) {
    case CFG_GRANT_JWT_BEARER:
        if (u->service_account_file == NULL) {
            cfg__perr(p, s->line, s, "service_account_file",
                      "required with oauth2_grant = jwt_bearer");
            return;
        }
        if (u->scope == NULL)
            u->scope = xstrdup(CFG_GOOGLE_SCOPE);
        oauth2_file_ok(p, s, "service_account_file", u->service_account_file, CFG_SA_MAX, 0);
        return; /* token_endpoint may come from the key's token_uri */
    case CFG_GRANT_REFRESH_TOKEN:
        if (u->refresh_token_file == NULL) {
            cfg__perr(p, s->line, s, "refresh_token_file",
                      "required with oauth2_grant = refresh_token "
                      "(relayctl oauth2 authorize %s creates it)",
                      u->name);
            return;
        }
        if (oauth2_file_ok(p, s, "refresh_token_file", u->refresh_token_file, CFG_RT_MAX, 1) != 0)
            return;
        break;
    case CFG_GRANT_CLIENT_CREDENTIALS:
        if (u->client_secret_file == NULL) {
            cfg__perr(p, s->line, s, "client_secret_file",
                      "required with oauth2_grant = "
                      "client_credentials");
            return;
        }
        break;
    case CFG_GRANT_NONE:
    case CFG_GRANT_COMMAND:
        break;
    }
    if (u->client_id == NULL) {
        cfg__perr(p, s->line, s, "client_id", "required with oauth2_grant = %s",
                  cfg__enum_name(CFG_T_GRANT, (int)u->grant));
        return;
    }
    if (u->token_endpoint == NULL) {
        cfg__perr(p, s->line, s, "token_endpoint", "required (or provider = microsoft | google)");
        return;
    }
}

#define CFG_GRAPH_URL "https://graph.microsoft.com"
#define CFG_GRAPH_SCOPE_APP "https://graph.microsoft.com/.default"
#define CFG_GRAPH_SCOPE_DELEGATED "https://graph.microsoft.com/Mail.Send offline_access"
/* save_to_sent_items = no sends through a draft (relayd/apisend.c): drafts need Mail.ReadWrite. */
#define CFG_GRAPH_SCOPE_DELEGATED_DRAFTS                                                           \
    "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.ReadWrite "            \
    "offline_access"
#define CFG_GMAIL_URL "https://gmail.googleapis.com"
#define CFG_GMAIL_SCOPE "https://www.googleapis.com/auth/gmail.send"

/* transport = graph | gmail: an OAuth 2.0 token source, a sending mailbox, an https base URL.
 * host and port are not used (the base URL says where); scope defaults to the API's. */
static void check_upstream_api(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];
    int graph = u->transport == CFG_TRANSPORT_GRAPH;
    const char *tname = graph ? "graph" : "gmail";

    if (u->upauth == CFG_UPAUTH_PASSWORD) {
        cfg__perr(p, key_line(s, "transport"), s, "auth",
                  "transport = %s needs an OAuth 2.0 token: set auth = xoauth2 with provider, "
                  "oauth2_grant and its keys",
                  tname);
        return;
    }
    if (u->mailbox != NULL && strcmp(u->mailbox, "sender") != 0 &&
        strchr(u->mailbox, '@') == NULL) {
        cfg__perr(p, key_line(s, "mailbox"), s, "mailbox",
                  "'%.*s' is neither an address nor 'sender'", VAL(u->mailbox));
        return;
    }
    if (u->mailbox == NULL && u->username == NULL && u->mailbox_map_file == NULL) {
        cfg__perr(p, s->line, s, "mailbox",
                  "required with transport = %s (the mailbox to send as: an address, or "
                  "'sender' for the envelope sender)",
                  tname);
        return;
    }
    /* The token manager wants a username (the mailbox; Google's JWT subject). */
    if (u->username == NULL)
        u->username =
            xstrdup(u->mailbox != NULL && strchr(u->mailbox, '@') != NULL ? u->mailbox : "-");
    if ((u->grant == CFG_GRANT_JWT_BEARER ||
         (u->grant == CFG_GRANT_NONE && u->service_account_file != NULL)) &&
        (u->mailbox_map_file != NULL ||
         (u->mailbox != NULL && strcmp(u->mailbox, u->username) != 0))) {
        cfg__perr(p, key_line(s, "mailbox"), s, "mailbox",
                  "with oauth2_grant = jwt_bearer the token is for one mailbox (the JWT "
                  "subject, username): use a fixed mailbox equal to username");
        return;
    }
    if (u->scope == NULL) {
        if (graph)
            u->scope = xstrdup(u->grant == CFG_GRANT_REFRESH_TOKEN ||
                                       (u->grant == CFG_GRANT_NONE && u->refresh_token_file != NULL)
                                   ? (u->save_to_sent_items ? CFG_GRAPH_SCOPE_DELEGATED
                                                            : CFG_GRAPH_SCOPE_DELEGATED_DRAFTS)
                                   : CFG_GRAPH_SCOPE_APP);
        else
            u->scope = xstrdup(CFG_GMAIL_SCOPE);
    }
    if (u->api_url == NULL)
        u->api_url = xstrdup(graph ? CFG_GRAPH_URL : CFG_GMAIL_URL);
    if (https_url_ok(p, s, "api_url", u->api_url) != 0)
        return;
    /* host and port for the logs (relay=NAME[host]:port): the API's. */
    if (u->host == NULL) {
        const char *h = u->api_url + 8, *colon;
        size_t n = strcspn(h, "/?#");

        colon = memchr(h, ':', n);
        u->host = xasprintf("%.*s", (int)(colon != NULL ? (size_t)(colon - h) : n), h);
        if (s->seen[cfg__key_index(s->def, "port")] == 0)
            u->port = colon != NULL ? atoi(colon + 1) : 443;
    }
    check_upstream_oauth2(p, s);
}

static void check_upstream(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_upstream *u = &p->cfg->upstreams[s->index];
    char why[160];

    if (u->transport_name == NULL || strcmp(u->transport_name, "smtp") == 0) {
        u->transport = CFG_TRANSPORT_SMTP;
    } else if (strcmp(u->transport_name, "graph") == 0) {
        u->transport = CFG_TRANSPORT_GRAPH;
    } else if (strcmp(u->transport_name, "gmail") == 0) {
        u->transport = CFG_TRANSPORT_GMAIL;
    } else {
        cfg__perr(p, key_line(s, "transport"), s, "transport",
                  "'%.*s' is not one of smtp, graph, gmail", VAL(u->transport_name));
        return;
    }
    if (u->transport != CFG_TRANSPORT_SMTP) {
        check_upstream_api(p, s);
        return;
    }
    if (u->mailbox != NULL || u->mailbox_map_file != NULL || u->api_url != NULL) {
        cfg__perr(p,
                  key_line(s, u->mailbox != NULL   ? "mailbox"
                              : u->api_url != NULL ? "api_url"
                                                   : "mailbox_map"),
                  s,
                  u->mailbox != NULL   ? "mailbox"
                  : u->api_url != NULL ? "api_url"
                                       : "mailbox_map",
                  "only for transport = graph | gmail");
        return;
    }
    if (u->host == NULL) {
        cfg__perr(p, s->line, s, "host", "required (e.g. host = smtp.example.com)");
        return;
    }
    if (u->tls_pin != NULL && pin_list_ok(u->tls_pin, why, sizeof why) != 0) {
        cfg__perr(p, key_line(s, "tls_pin"), s, "tls_pin", "%s", why);
        return;
    }
    if (u->tls_pin != NULL && u->tls == CFG_TLS_NONE) {
        cfg__perr(p, key_line(s, "tls_pin"), s, "tls_pin", "needs tls = starttls or implicit");
        return;
    }
    if (u->tls == CFG_TLS_IMPLICIT && s->seen[cfg__key_index(s->def, "port")] == 0)
        u->port = CFG_IMPLICIT_PORT;
    if (u->upauth != CFG_UPAUTH_PASSWORD || u->grant != CFG_GRANT_NONE ||
        u->token_endpoint != NULL || u->provider != NULL || u->oauth2_token_command != NULL) {
        check_upstream_oauth2(p, s);
        return;
    }
    if (u->username != NULL && u->password_file == NULL) {
        cfg__perr(p, key_line(s, "username"), s, "password_file", "required when username is set");
        return;
    }
    if (u->username == NULL && u->password_file != NULL) {
        cfg__perr(p, key_line(s, "password_file"), s, "username",
                  "required when password_file is set");
        return;
    }
    if (u->tls == CFG_TLS_NONE && u->username != NULL && !u->allow_plaintext_auth) {
        cfg__perr(p, key_line(s, "tls"), s, "tls",
                  "none with username set would send the password "
                  "in cleartext; use starttls or implicit (or allow_plaintext_auth = yes)");
        return;
    }
}

/* sender: "user@domain", "@domain" or "domain" entries; listener: [listener] names. */
static void route_check_matchers(struct cfg_parse *p, const struct cfg_sec *s,
                                 const struct cfg_route *r)
{
    const char *v, *at;
    size_t len;
    int i, found;

    for (v = r->sender; v != NULL && *(v += strspn(v, ", \t")) != '\0'; v += len) {
        char a[321];

        len = strcspn(v, ", \t");
        snprintf(a, sizeof a, "%.*s", (int)len, v);
        at = strrchr(a, '@');
        if (len >= sizeof a || (at != NULL && !cfg__host_ok(at + 1)) ||
            (at == NULL && !cfg__host_ok(a)) || (at != NULL && at[1] == '\0') ||
            strchr(a, ':') != NULL || strpbrk(a, "<>\"") != NULL) {
            cfg__perr(p, key_line(s, "sender"), s, "sender",
                      "'%.*s' is not an address, @domain or domain", (int)(len > 60 ? 60 : len), v);
            return;
        }
    }
    for (v = r->listener; v != NULL && *(v += strspn(v, ", \t")) != '\0'; v += len) {
        len = strcspn(v, ", \t");
        for (i = 0, found = 0; i < p->cfg->nlisteners && !found; i++)
            found = strlen(p->cfg->listeners[i].name) == len &&
                    strncmp(p->cfg->listeners[i].name, v, len) == 0;
        if (!found) {
            cfg__perr(p, key_line(s, "listener"), s, "listener", "no [listener %.*s] section",
                      (int)(len > 60 ? 60 : len), v);
            return;
        }
    }
}

static void route_check_rewrite(struct cfg_parse *p, const struct cfg_sec *s,
                                const struct cfg_route *r)
{
    const char *v = r->rewrite_sender, *at;

    if (v != NULL) {
        at = strrchr(v, '@');
        if (at == NULL || at == v || !cfg__host_ok(at + 1) || at[1] == '\0' ||
            strpbrk(v, " \t<>,;\"") != NULL) {
            cfg__perr(p, key_line(s, "rewrite_sender"), s, "rewrite_sender",
                      "'%.*s' is not an address (e.g. scanner@corp.example)", VAL(v));
            return;
        }
    }
    if (r->rewrite_from && r->rewrite_sender == NULL && r->rewrite_sender_map_file == NULL)
        cfg__perr(p, key_line(s, "rewrite_from"), s, "rewrite_from",
                  "yes needs rewrite_sender or rewrite_sender_map (the address to put in From:)");
}

static void check_route(struct cfg_parse *p, const struct cfg_sec *s)
{
    struct cfg_route *r = &p->cfg->routes[s->index];
    int i;

    if (r->upstream_name == NULL) {
        cfg__perr(p, s->line, s, "upstream", "required (the name of an [upstream NAME] section)");
        return;
    }
    for (i = 0; i < p->cfg->nupstreams && r->upstream == NULL; i++)
        if (strcmp(p->cfg->upstreams[i].name, r->upstream_name) == 0)
            r->upstream = &p->cfg->upstreams[i];
    if (r->upstream == NULL) {
        cfg__perr(p, key_line(s, "upstream"), s, "upstream", "no [upstream %s] section",
                  r->upstream_name);
        return;
    }
    if (r->failover_names != NULL) {
        char *names = xstrdup(r->failover_names), *save = NULL, *name;
        for (name = strtok_r(names, ", \t", &save); name != NULL;
             name = strtok_r(NULL, ", \t", &save)) {
            struct cfg_upstream *up = NULL;
            for (i = 0; i < p->cfg->nupstreams && up == NULL; i++)
                if (strcmp(p->cfg->upstreams[i].name, name) == 0)
                    up = &p->cfg->upstreams[i];
            if (up == NULL) {
                cfg__perr(p, key_line(s, "failover"), s, "failover", "no [upstream %s] section",
                          name);
                break;
            }
            r->failover = xrealloc(r->failover, (size_t)(r->nfailover + 1) * sizeof(*r->failover));
            r->failover[r->nfailover++] = up;
        }
        free(names);
    }
    if (p->failed)
        return;
    route_check_matchers(p, s, r);
    if (!p->failed)
        route_check_rewrite(p, s, r);
    if (p->failed)
        return;
    if (strcmp(r->name, "default") == 0) {
        if (r->sender_domain != NULL || r->recipient_domain != NULL)
            cfg__perr(p, key_line(s, r->sender_domain ? "sender_domain" : "recipient_domain"), s,
                      r->sender_domain ? "sender_domain" : "recipient_domain",
                      "the default route matches everything; put domains in another route");
        else if (r->sender != NULL || r->client.n > 0 || r->listener != NULL) {
            const char *k = r->sender ? "sender" : r->client.n > 0 ? "client" : "listener";

            cfg__perr(p, key_line(s, k), s, k,
                      "the default route matches everything; put matchers in another route");
        }
    } else if (r->sender_domain == NULL && r->recipient_domain == NULL && r->sender == NULL &&
               r->client.n == 0 && r->listener == NULL) {
        cfg__perr(p, s->line, s, NULL,
                  "matches nothing: set sender_domain or recipient_domain, or "
                  "name it [route default]");
    }
}

void cfg__check_all(struct cfg_parse *p)
{
    const struct cfg_sec *relayd = cfg__sec_find(p, &cfg__secdefs[CFG_K_RELAYD], NULL);
    char host[256];
    int i;

    if (p->cfg->hostname == NULL) {
        if (gethostname(host, sizeof host) != 0 || host[0] == '\0')
            snprintf(host, sizeof host, "localhost");
        host[sizeof host - 1] = '\0';
        p->cfg->hostname = xstrdup(host);
    }
    check_relayd(p, relayd != NULL ? relayd : &p->relayd);
    for (i = 0; i < p->nsecs && !p->failed; i++) {
        switch (p->secs[i].def->kind) {
        case CFG_K_LISTENER:
            check_listener(p, &p->secs[i]);
            break;
        case CFG_K_UPSTREAM:
            check_upstream(p, &p->secs[i]);
            break;
        case CFG_K_ROUTE:
            check_route(p, &p->secs[i]);
            break;
        case CFG_K_RELAYD:
            break;
        }
    }
    if (!p->failed && p->cfg->nlisteners == 0)
        cfg__perr(p, 0, NULL, NULL, "no [listener NAME] section: relayd would accept no mail");
}
