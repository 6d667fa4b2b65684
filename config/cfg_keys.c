/*
 * cfg_keys - the key tables of relayd.conf: one table per section type, one row per key
 * (name, type, offsetof in the section's struct, bounds, default text, second field), and
 * the names of the enumerated values.  Defaults live here and nowhere else: a section gets
 * them the moment its header is read (cfg.c).  The rules that involve several keys are in
 * cfg_check.c; every key is documented in README.md and man/relayd.conf.5 (test_cfg_doc
 * fails naming a key that is not).
 *
 * Adding a key: a field in its struct (cfg.h), a row here, a line in cfg_dump()'s output
 * comes for free, a row in README's table and an entry in relayd.conf(5).
 */
#include <stddef.h>

#include "common/xalloc.h"
#include "config/cfg_int.h"

/* The rows stay one per line, whatever their width: clang-format keeps out. */
// clang-format off
#define O(field) offsetof(struct cfg, field)
static const struct cfg_key relayd_keys[] = {
    /* NULL: gethostname() at load. */
    {"hostname", CFG_T_HOST, O(hostname), 0, 0, NULL, 0},
    {"spool", CFG_T_STRING, O(spool_dir), 0, 0, "/var/spool/relayd", 0},
    {"max_message_size", CFG_T_SIZE, O(max_message_size), KB, GB, "35M", 0},
    {"max_recipients", CFG_T_INT, O(max_recipients), 1, 100000, "1000", 0},
    {"retry_first", CFG_T_DURATION, O(retry_first), 1, DAY, "60s", 0},
    {"retry_max", CFG_T_DURATION, O(retry_max), 1, 7 * DAY, "1h", 0},
    {"max_lifetime", CFG_T_DURATION, O(max_lifetime), MINUTE, 100 * DAY, "5d", 0},
    {"workers", CFG_T_INT, O(workers), 1, 1024, "4", 0},
    /* Message lifecycle and bounces (sched.c, bounce.c). */
    {"retry_factor", CFG_T_INT, O(retry_factor), 1, 10, "2", 0},
    /* 0: no delay warning. */
    {"delay_warning", CFG_T_DURATION, O(delay_warning), 0, 100 * DAY, "0", 0},
    /* NULL: the envelope sender. */
    {"bounce_to", CFG_T_STRING, O(bounce_to), 0, 0, NULL, 0},
    {"bounces", CFG_T_BOOL, O(bounces), 0, 1, "yes", 0},
    {"failed_retention", CFG_T_DURATION, O(failed_retention), MINUTE, 365 * DAY, "7d", 0},
    {"upstream_probe_interval", CFG_T_DURATION, O(upstream_probe_interval), 1, HOUR, "60s", 0},
    /* On stop, a delivery whose final dot was sent waits this long for its reply. */
    {"stop_grace", CFG_T_DURATION, O(stop_grace), 0, 10 * MINUTE, "10s", 0},
    {"max_connections", CFG_T_INT, O(max_connections), 1, 100000, "200", 0},
    {"max_connections_per_client", CFG_T_INT, O(max_connections_per_client), 1, 100000, "20", 0},
    {"max_memory", CFG_T_SIZE, O(max_memory), MB, 1024 * GB, "256M", 0},
    /* The spool refuses new mail (452 4.3.1) past either limit; 0 turns a limit off. */
    {"spool_max_size", CFG_T_SIZE, O(spool_max_size), 0, 16384 * GB, "0", 0},
    {"spool_reserve", CFG_T_SIZE, O(spool_reserve), 0, 16384 * GB, "100M", 0},
    /* Loses acknowledged mail on a power failure or kernel crash; benchmarks only. */
    {"unsafe_no_fsync", CFG_T_BOOL, O(unsafe_no_fsync), 0, 1, "no", 0},
    /* Least privilege (relayd/privdrop.c): started as root, relayd becomes user:group. */
    {"user", CFG_T_STRING, O(user), 0, 0, "relayd", 0},
    /* NULL: the user's primary group. */
    {"group", CFG_T_STRING, O(group), 0, 0, NULL, 0},
    {"run_as_root", CFG_T_BOOL, O(run_as_root), 0, 1, "no", 0},
    /* Monitoring (relayd/metrics_http.c): off unless metrics = address:port. */
    {"metrics", CFG_T_HOSTPORT, O(metrics_host), 1, 65535, NULL, O(metrics_port)},
    {"metrics_allow", CFG_T_NETLIST, O(metrics_allow), 0, 0, "127.0.0.0/8, ::1", 0},
    /* /healthz fails once the oldest queued message is older; 0: never for age. */
    {"health_max_age", CFG_T_DURATION, O(health_max_age), 0, 100 * DAY, "1h", 0},
};
#undef O

#define O(field) offsetof(struct cfg_listener, field)
static const struct cfg_key listener_keys[] = {
    /* Required. */
    {"listen", CFG_T_HOSTPORT, O(host), 1, 65535, NULL, O(port)},
    /* NULL: CFG_ALLOW_LOOPBACK when listen is loopback, else an error (open relay). */
    {"allow", CFG_T_NETLIST, O(allow), 0, 0, NULL, 0},
    {"tls", CFG_T_TLS, O(tls), 0, 0, "none", 0},
    /* Required when tls is not none. */
    {"cert", CFG_T_FILE, O(cert), 0, 0, NULL, 0},
    {"key", CFG_T_FILE, O(key), 0, 0, NULL, 0},
    {"tls_priority", CFG_T_STRING, O(tls_priority), 0, 0, CFG_TLS_PRIORITY, 0},
    {"auth", CFG_T_AUTH, O(auth), 0, 0, "off", 0},
    /* Must exist when auth is optional or required. */
    {"sasldb", CFG_T_STRING, O(sasldb), 0, 0, "/etc/sasldb2", 0},
    {"auth_mechanisms", CFG_T_STRING, O(auth_mechanisms), 0, 0, "PLAIN LOGIN CRAM-MD5", 0},
    {"auth_plaintext", CFG_T_BOOL, O(auth_plaintext), 0, 1, "no", 0},
    {"sender_domains", CFG_T_DOMAINS, O(sender_domains), 0, 0, NULL, 0},
    {"recipient_domains", CFG_T_DOMAINS, O(recipient_domains), 0, 0, NULL, 0},
    {"proxy_protocol", CFG_T_PROXY, O(proxy_protocol), 0, 0, "no", 0},
    {"debug_peers", CFG_T_NETLIST, O(debug_peers), 0, 0, NULL, 0},
    {"proxy_trusted", CFG_T_NETLIST, O(proxy_trusted), 0, 0, "127.0.0.0/8, ::1", 0},
    {"add_date", CFG_T_BOOL, O(add_date), 0, 1, "yes", 0},
    {"add_message_id", CFG_T_BOOL, O(add_message_id), 0, 1, "yes", 0},
    {"add_from", CFG_T_BOOL, O(add_from), 0, 1, "yes", 0},
    {"add_received", CFG_T_BOOL, O(add_received), 0, 1, "yes", 0},
    {"command_timeout", CFG_T_DURATION, O(command_timeout), 1, HOUR, "300s", 0},
    {"data_timeout", CFG_T_DURATION, O(data_timeout), 1, HOUR, "300s", 0},
    {"max_line_length", CFG_T_INT, O(max_line_length), 512, 65536, "2048", 0},
    {"max_errors", CFG_T_INT, O(max_errors), 1, 10000, "20", 0},
    /* Checked in cfg_check.c (check_listener_inbound()): accept | normalize | reject. */
    {"bare_lf", CFG_T_STRING, O(bare_lf), 0, 0, "accept", 0},
    {"bare_lf_accept", CFG_T_NETLIST, O(bare_lf_accept), 0, 0, NULL, 0},
    {"glued_dot", CFG_T_BOOL, O(glued_dot), 0, 1, "no", 0},
    {"handshake_timeout", CFG_T_DURATION, O(handshake_timeout), 1, HOUR, "10s", 0},
    {"write_timeout", CFG_T_DURATION, O(write_timeout), 1, HOUR, "60s", 0},
    {"listen_backlog", CFG_T_INT, O(listen_backlog), 1, 65535, "4096", 0},
};
#undef O

#define O(field) offsetof(struct cfg_upstream, field)
static const struct cfg_key upstream_keys[] = {
    /* Required. */
    {"host", CFG_T_HOST, O(host), 0, 0, NULL, 0},
    /* CFG_IMPLICIT_PORT instead when tls = implicit and no port is given. */
    {"port", CFG_T_INT, O(port), 1, 65535, "587", 0},
    {"tls", CFG_T_TLS, O(tls), 0, 0, "starttls", 0},
    {"ca_file", CFG_T_FILE, O(ca_file), 0, 0, NULL, 0},
    {"tls_name", CFG_T_HOST, O(tls_name), 0, 0, NULL, 0},
    {"tls_priority", CFG_T_STRING, O(tls_priority), 0, 0, CFG_TLS_PRIORITY, 0},
    {"username", CFG_T_STRING, O(username), 0, 0, NULL, 0},
    {"password_file", CFG_T_SECRET, O(password_file), 0, 0, NULL, O(password)},
    {"mechanisms", CFG_T_STRING, O(mechanisms), 0, 0, NULL, 0},
    {"allow_plaintext_auth", CFG_T_BOOL, O(allow_plaintext_auth), 0, 1, "no", 0},
    {"connect_timeout", CFG_T_DURATION, O(connect_timeout), 1, HOUR, "30s", 0},
    {"command_timeout", CFG_T_DURATION, O(command_timeout), 1, HOUR, "300s", 0},
    /* RFC 5321 4.5.3.2.6: the reply to the end of data may take 10 minutes. */
    {"data_timeout", CFG_T_DURATION, O(data_timeout), 1, HOUR, "600s", 0},
    {"max_connections", CFG_T_INT, O(max_connections), 1, 1000, "4", 0},
    {"idle_timeout", CFG_T_DURATION, O(idle_timeout), 1, HOUR, "30s", 0},
    {"reuse", CFG_T_BOOL, O(reuse), 0, 1, "yes", 0},
    /* Checked in check_upstream(): sha256//BASE64 of the SubjectPublicKeyInfo, ';' between. */
    {"tls_pin", CFG_T_STRING, O(tls_pin), 0, 0, NULL, 0},
    {"max_messages_per_minute", CFG_T_INT, O(max_messages_per_minute), 0, 1000000, "0", 0},
    {"max_recipients_per_day", CFG_T_INT, O(max_recipients_per_day), 0, 100000000, "0", 0},
    /* OAuth 2.0 (relayd/oauth2.h).  Enumerations and presets: check_upstream_oauth2(). */
    {"auth", CFG_T_UPAUTH, O(upauth), 0, 0, "password", 0},
    {"provider", CFG_T_STRING, O(provider), 0, 0, NULL, 0},
    {"tenant", CFG_T_STRING, O(tenant), 0, 0, NULL, 0},
    {"token_endpoint", CFG_T_STRING, O(token_endpoint), 0, 0, NULL, 0},
    {"device_endpoint", CFG_T_STRING, O(device_endpoint), 0, 0, NULL, 0},
    /* NULL: inferred from the files given (see check_upstream_oauth2()). */
    {"oauth2_grant", CFG_T_GRANT, O(grant), 0, 0, NULL, 0},
    {"client_id", CFG_T_STRING, O(client_id), 0, 0, NULL, 0},
    {"client_secret_file", CFG_T_SECRET, O(client_secret_file), 0, 0, NULL, O(client_secret)},
    /* Paths only: relayd reads (and rewrites) them at run time; modes checked at load. */
    {"refresh_token_file", CFG_T_STRING, O(refresh_token_file), 0, 0, NULL, 0},
    {"service_account_file", CFG_T_STRING, O(service_account_file), 0, 0, NULL, 0},
    {"scope", CFG_T_STRING, O(scope), 0, 0, NULL, 0},
    {"oauth2_ca_file", CFG_T_FILE, O(oauth2_ca_file), 0, 0, NULL, 0},
    {"oauth2_token_command", CFG_T_STRING, O(oauth2_token_command), 0, 0, NULL, 0},
    {"oauth2_refresh_margin", CFG_T_DURATION, O(oauth2_refresh_margin), 0, DAY, "10m", 0},
    /* HTTP API transports (relayd/apisend.h); checked in check_upstream_api(). */
    {"transport", CFG_T_STRING, O(transport_name), 0, 0, "smtp", 0},
    {"mailbox", CFG_T_STRING, O(mailbox), 0, 0, NULL, 0},
    {"mailbox_map", CFG_T_MAP, O(mailbox_map_file), 0, 0, NULL, O(mailbox_map)},
    {"save_to_sent_items", CFG_T_BOOL, O(save_to_sent_items), 0, 1, "no", 0},
    {"api_url", CFG_T_STRING, O(api_url), 0, 0, NULL, 0},
};
#undef O

#define O(field) offsetof(struct cfg_route, field)
static const struct cfg_key route_keys[] = {
    /* Required; must name an [upstream]. */
    {"upstream", CFG_T_STRING, O(upstream_name), 0, 0, NULL, 0},
    {"failover", CFG_T_STRING, O(failover_names), 0, 0, NULL, 0},
    {"sender_domain", CFG_T_DOMAINS, O(sender_domain), 0, 0, NULL, 0},
    {"recipient_domain", CFG_T_DOMAINS, O(recipient_domain), 0, 0, NULL, 0},
    /* Checked in check_route(): addresses, @domains or domains. */
    {"sender", CFG_T_STRING, O(sender), 0, 0, NULL, 0},
    {"client", CFG_T_NETLIST, O(client), 0, 0, NULL, 0},
    /* Checked in check_route(): names of [listener] sections. */
    {"listener", CFG_T_STRING, O(listener), 0, 0, NULL, 0},
    {"rewrite_sender", CFG_T_STRING, O(rewrite_sender), 0, 0, NULL, 0},
    {"rewrite_sender_map", CFG_T_MAP, O(rewrite_sender_map_file), 0, 0, NULL,
     O(rewrite_sender_map)},
    {"rewrite_from", CFG_T_BOOL, O(rewrite_from), 0, 1, "no", 0},
    {"keep_reply_to", CFG_T_BOOL, O(keep_reply_to), 0, 1, "yes", 0},
    {"recipient_map", CFG_T_MAP, O(recipient_map_file), 0, 0, NULL, O(recipient_map)},
};
#undef O

// clang-format on

const struct cfg_secdef cfg__secdefs[] = {
    [CFG_K_RELAYD] = {"relayd", CFG_K_RELAYD, relayd_keys, NELEM(relayd_keys)},
    [CFG_K_LISTENER] = {"listener", CFG_K_LISTENER, listener_keys, NELEM(listener_keys)},
    [CFG_K_UPSTREAM] = {"upstream", CFG_K_UPSTREAM, upstream_keys, NELEM(upstream_keys)},
    [CFG_K_ROUTE] = {"route", CFG_K_ROUTE, route_keys, NELEM(route_keys)},
};
const size_t cfg__nsecdefs = NELEM(cfg__secdefs);

static const char *const tls_names[] = {
    [CFG_TLS_NONE] = "none",
    [CFG_TLS_STARTTLS] = "starttls",
    [CFG_TLS_IMPLICIT] = "implicit",
};

static const char *const auth_names[] = {
    [CFG_AUTH_OFF] = "off",
    [CFG_AUTH_OPTIONAL] = "optional",
    [CFG_AUTH_REQUIRED] = "required",
    [CFG_AUTH_ACCEPT_ANY] = "accept-any",
};

static const char *const proxy_names[] = {
    [CFG_PROXY_NO] = "no",
    [CFG_PROXY_V1] = "v1",
    [CFG_PROXY_V2] = "v2",
    [CFG_PROXY_ANY] = "any",
};

static const char *const upauth_names[] = {
    [CFG_UPAUTH_PASSWORD] = "password",
    [CFG_UPAUTH_XOAUTH2] = "xoauth2",
    [CFG_UPAUTH_OAUTHBEARER] = "oauthbearer",
};

/* NONE (not set: inferred) and COMMAND (oauth2_token_command) are not written. */
static const char *const grant_names[] = {
    [CFG_GRANT_NONE] = NULL,
    [CFG_GRANT_CLIENT_CREDENTIALS] = "client_credentials",
    [CFG_GRANT_REFRESH_TOKEN] = "refresh_token",
    [CFG_GRANT_JWT_BEARER] = "jwt_bearer",
    [CFG_GRANT_COMMAND] = NULL,
};

const struct cfg_enum cfg__enums[CFG_T_MAP + 1] = {
    [CFG_T_TLS] = {tls_names, NELEM(tls_names), "starttls, implicit, none"},
    [CFG_T_AUTH] = {auth_names, NELEM(auth_names), "off, optional, required, accept-any"},
    [CFG_T_PROXY] = {proxy_names, NELEM(proxy_names), "no, v1, v2, any"},
    [CFG_T_UPAUTH] = {upauth_names, NELEM(upauth_names), "password, xoauth2, oauthbearer"},
    [CFG_T_GRANT] = {grant_names, NELEM(grant_names),
                     "client_credentials, refresh_token, jwt_bearer"},
};

const char *cfg__enum_name(enum cfg_type type, int value)
{
    const struct cfg_enum *e = &cfg__enums[type];

    if (e->names == NULL || value < 0 || (size_t)value >= e->n || e->names[value] == NULL)
        return "?";
    return e->names[value];
}

const char *cfg_tls_name(enum cfg_tls tls)
{
    return cfg__enum_name(CFG_T_TLS, (int)tls);
}

const char *cfg_auth_name(enum cfg_auth auth)
{
    return cfg__enum_name(CFG_T_AUTH, (int)auth);
}

const char *cfg_proxy_name(enum cfg_proxy proxy)
{
    return cfg__enum_name(CFG_T_PROXY, (int)proxy);
}

const char *cfg_bare_lf_name(enum cfg_bare_lf mode)
{
    switch (mode) {
    case CFG_BARE_LF_ACCEPT:
        return "accept";
    case CFG_BARE_LF_NORMALIZE:
        return "normalize";
    case CFG_BARE_LF_REJECT:
        return "reject";
    }
    return "?";
}

void cfg_keys_each(cfg_key_fn fn, void *arg)
{
    size_t i, j;

    for (i = 0; i < cfg__nsecdefs; i++)
        for (j = 0; j < cfg__secdefs[i].nkeys; j++)
            fn(arg, cfg__secdefs[i].type, cfg__secdefs[i].keys[j].name);
}
