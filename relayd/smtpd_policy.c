/*
 * smtpd_policy - pure decisions of the inbound server (see smtpd_policy.h).
 */
#include "relayd/smtpd_policy.h"

#include <stdio.h>
#include <string.h>

#include "common/log.h"

enum cfg_bare_lf smtpd_policy_bare_lf_mode(enum cfg_bare_lf listener_mode, int client_exempt)
{
    return client_exempt ? CFG_BARE_LF_ACCEPT : listener_mode;
}

enum smtpd_eod smtpd_policy_dot(enum cfg_bare_lf mode, int prev_crlf, int dot_crlf)
{
    if (prev_crlf && dot_crlf)
        return SMTPD_EOD_END;
    /* "\n.\n", "\r\n.\n", "\n.\r\n": legacy devices end this way, and so does an SMTP
     * smuggling attempt (a second message hidden in the first).  Only "accept" takes it. */
    return mode == CFG_BARE_LF_ACCEPT ? SMTPD_EOD_END_BARE : SMTPD_EOD_DATA;
}

static const struct smtpd_refusal_info refusals[SMTPD_R_COUNT] = {
    [SMTPD_R_NOT_ALLOWED] = {"not_allowed", "allow",
                             "add the client's network to allow of this listener"},
    [SMTPD_R_MAX_CONN] = {"max_connections", "max_connections",
                          "raise max_connections in [relayd]"},
    [SMTPD_R_MAX_CONN_CLIENT] = {"max_connections_per_client", "max_connections_per_client",
                                 "raise max_connections_per_client in [relayd]"},
    [SMTPD_R_AUTH_OFF] = {"auth_off", "auth",
                          "set auth = optional (with sasldb) or auth = accept-any on this "
                          "listener, or configure the device not to log in"},
    [SMTPD_R_AUTH_MECH] = {"auth_mechanism", "auth_mechanisms",
                           "add the device's mechanism to auth_mechanisms"},
    [SMTPD_R_AUTH_NEEDS_TLS] = {"auth_needs_tls", "auth_plaintext",
                                "enable TLS on the device, or set auth_plaintext = yes on this "
                                "listener for devices that cannot do TLS"},
    [SMTPD_R_AUTH_FAILED] = {"auth_failed", "sasldb",
                             "check the device's user name and password against the sasldb "
                             "(saslpasswd2), or use auth = accept-any"},
    [SMTPD_R_AUTH_REQUIRED] = {"auth_required", "auth",
                               "configure a login on the device, or set auth = optional"},
    [SMTPD_R_AUTH_UNAVAILABLE] = {"auth_unavailable", "sasldb",
                                  "make the sasldb readable by relayd"},
    [SMTPD_R_SENDER_DOMAIN] = {"sender_domain", "sender_domains",
                               "add the sender's domain to sender_domains, or change the "
                               "device's sender address"},
    [SMTPD_R_RCPT_DOMAIN] = {"recipient_domain", "recipient_domains",
                             "add the recipient's domain to recipient_domains"},
    [SMTPD_R_TOO_BIG] = {"message_too_big", "max_message_size",
                         "raise max_message_size in [relayd]"},
    [SMTPD_R_TOO_MANY_RCPTS] = {"too_many_recipients", "max_recipients",
                                "raise max_recipients in [relayd]"},
    [SMTPD_R_MEMORY] = {"max_memory", "max_memory", "raise max_memory in [relayd]"},
    [SMTPD_R_SPOOL_FULL] = {"spool_full", "spool_max_size",
                            "free disk space, or raise spool_max_size / lower spool_reserve"},
    [SMTPD_R_BARE_LF] = {"bare_lf", "bare_lf",
                         "set bare_lf = normalize (or accept) on this listener, or add the "
                         "client to bare_lf_accept"},
    [SMTPD_R_TLS_FAILED] = {"tls_failed", "tls_priority", "see the hint"},
    [SMTPD_R_TOO_MANY_ERRORS] = {"too_many_errors", "max_errors",
                                 "look at the client's dialogue (debug_peers), or raise "
                                 "max_errors"},
    [SMTPD_R_TIMEOUT] = {"timeout", "command_timeout",
                         "raise command_timeout / data_timeout on this listener"},
    [SMTPD_R_WRITE_TIMEOUT] = {"write_timeout", "write_timeout",
                               "the client stopped reading replies; raise write_timeout"},
    [SMTPD_R_LINE_TOO_LONG] = {"line_too_long", "max_line_length",
                               "raise max_line_length on this listener"},
};

const struct smtpd_refusal_info *smtpd_policy_refusal(enum smtpd_refusal r)
{
    if ((unsigned)r >= SMTPD_R_COUNT || refusals[r].name == NULL)
        log_panic("smtpd_policy_refusal: bad refusal %d", (int)r);
    return &refusals[r];
}

char *smtpd_policy_tls_hint(const char *versions, const char *err, char *out, size_t outlen)
{
    int modern = strstr(versions, "TLS1.2") != NULL || strstr(versions, "TLS1.3") != NULL;

    if (versions[0] == '\0') {
        snprintf(out, outlen,
                 "no TLS ClientHello was received: the client may not speak TLS "
                 "on this port (use tls = starttls or none for it)");
    } else if (!modern) {
        snprintf(out, outlen,
                 "the client offers only %s: to let it in, add %s to tls_priority "
                 "on a listener of its own",
                 versions,
                 strstr(versions, "TLS1.1") != NULL   ? "+VERS-TLS1.1"
                 : strstr(versions, "TLS1.0") != NULL ? "+VERS-TLS1.0"
                                                      : "its version (SSL 3 cannot be enabled)");
    } else if (strstr(err, "cipher") != NULL || strstr(err, "algorithm") != NULL ||
               strstr(err, "insufficient") != NULL || strstr(err, "credentials") != NULL) {
        snprintf(out, outlen,
                 "no cipher or key type in common: widen tls_priority, or give "
                 "the listener a certificate type the client supports (RSA)");
    } else if (strstr(err, "certificate") != NULL || strstr(err, "Unknown CA") != NULL ||
               strstr(err, "unknown_ca") != NULL) {
        snprintf(out, outlen,
                 "the client rejected the certificate: install a cert it trusts "
                 "(or its CA on the device)");
    } else {
        snprintf(out, outlen,
                 "the client offered %s; compare its TLS settings with "
                 "tls_priority and cert",
                 versions);
    }
    return out;
}

static const char *const verb_names[SMTPD_V_COUNT] = {
    "helo", "ehlo", "starttls", "auth", "mail", "rcpt", "data",
    "bdat", "rset", "noop",     "vrfy", "help", "quit", "unknown",
};

char *smtpd_policy_summary(const struct smtpd_counts *c, char *out, size_t outlen)
{
    unsigned ok = 0, total = 0;
    size_t len = 0;
    int i, n;

    out[0] = '\0';
    for (i = 0; i < SMTPD_V_COUNT; i++) {
        if (c->total[i] == 0)
            continue;
        ok += c->ok[i];
        total += c->total[i];
        if (c->ok[i] == c->total[i])
            n = snprintf(out + len, outlen - len, " %s=%u", verb_names[i], c->total[i]);
        else
            n = snprintf(out + len, outlen - len, " %s=%u/%u", verb_names[i], c->ok[i],
                         c->total[i]);
        if (n < 0 || (size_t)n >= outlen - len)
            return out;
        len += (size_t)n;
    }
    if (total == 0)
        return out;
    if (ok == total)
        snprintf(out + len, outlen - len, " commands=%u", total);
    else
        snprintf(out + len, outlen - len, " commands=%u/%u", ok, total);
    return out;
}
