/* Unit tests for relayd/smtpd_policy: the inbound server's pure decisions (bare LF, refusal
 * reasons and their settings, TLS handshake hints, the session summary) and the ClientHello
 * parser in common/tlsio that feeds the TLS hints. */
#include <criterion/criterion.h>
#include <string.h>

#include "common/tlsio.h"
#include "relayd/smtpd_policy.h"

#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* Which lone-dot lines end DATA under each mode: only CRLF.CRLF in normalize/reject. */
Test(smtpd, dot_verdicts)
{
    static const struct {
        const char *label;
        enum cfg_bare_lf mode;
        int prev_crlf, dot_crlf;
        enum smtpd_eod want;
    } cases[] = {
        {"accept CRLF.CRLF", CFG_BARE_LF_ACCEPT, 1, 1, SMTPD_EOD_END},
        {"accept LF.LF", CFG_BARE_LF_ACCEPT, 0, 0, SMTPD_EOD_END_BARE},
        {"accept CRLF.LF", CFG_BARE_LF_ACCEPT, 1, 0, SMTPD_EOD_END_BARE},
        {"accept LF.CRLF", CFG_BARE_LF_ACCEPT, 0, 1, SMTPD_EOD_END_BARE},
        {"normalize CRLF.CRLF", CFG_BARE_LF_NORMALIZE, 1, 1, SMTPD_EOD_END},
        {"normalize LF.LF", CFG_BARE_LF_NORMALIZE, 0, 0, SMTPD_EOD_DATA},
        {"normalize CRLF.LF", CFG_BARE_LF_NORMALIZE, 1, 0, SMTPD_EOD_DATA},
        {"normalize LF.CRLF", CFG_BARE_LF_NORMALIZE, 0, 1, SMTPD_EOD_DATA},
        {"reject CRLF.CRLF", CFG_BARE_LF_REJECT, 1, 1, SMTPD_EOD_END},
        {"reject LF.CRLF", CFG_BARE_LF_REJECT, 0, 1, SMTPD_EOD_DATA},
    };
    size_t i;

    for (i = 0; i < NELEM(cases); i++)
        cr_expect_eq(smtpd_policy_dot(cases[i].mode, cases[i].prev_crlf, cases[i].dot_crlf),
                     cases[i].want, "%s", cases[i].label);
}

/* bare_lf_accept networks get "accept" whatever the listener says; others its mode. */
Test(smtpd, bare_lf_exemption)
{
    cr_expect_eq(smtpd_policy_bare_lf_mode(CFG_BARE_LF_REJECT, 1), CFG_BARE_LF_ACCEPT);
    cr_expect_eq(smtpd_policy_bare_lf_mode(CFG_BARE_LF_NORMALIZE, 1), CFG_BARE_LF_ACCEPT);
    cr_expect_eq(smtpd_policy_bare_lf_mode(CFG_BARE_LF_REJECT, 0), CFG_BARE_LF_REJECT);
    cr_expect_eq(smtpd_policy_bare_lf_mode(CFG_BARE_LF_NORMALIZE, 0), CFG_BARE_LF_NORMALIZE);
    cr_expect_eq(smtpd_policy_bare_lf_mode(CFG_BARE_LF_ACCEPT, 0), CFG_BARE_LF_ACCEPT);
}

/* Every refusal has a tag, a setting and a fix; the seeds' refusals name the right key. */
Test(smtpd, refusal_settings)
{
    static const struct {
        enum smtpd_refusal r;
        const char *want_name, *want_setting;
    } cases[] = {
        {SMTPD_R_NOT_ALLOWED, "not_allowed", "allow"},                /* "Relaying Denied" */
        {SMTPD_R_AUTH_NEEDS_TLS, "auth_needs_tls", "auth_plaintext"}, /* alarm panel 538 */
        {SMTPD_R_AUTH_MECH, "auth_mechanism", "auth_mechanisms"},     /* fax CRAM-MD5 */
        {SMTPD_R_TLS_FAILED, "tls_failed", "tls_priority"},           /* bare "SSL error" */
        {SMTPD_R_AUTH_FAILED, "auth_failed", "sasldb"},
        {SMTPD_R_AUTH_REQUIRED, "auth_required", "auth"},
        {SMTPD_R_TOO_BIG, "message_too_big", "max_message_size"},
        {SMTPD_R_TOO_MANY_RCPTS, "too_many_recipients", "max_recipients"},
        {SMTPD_R_MAX_CONN_CLIENT, "max_connections_per_client", "max_connections_per_client"},
        {SMTPD_R_BARE_LF, "bare_lf", "bare_lf"},
    };
    size_t i;
    int r;

    for (r = 0; r < SMTPD_R_COUNT; r++) {
        const struct smtpd_refusal_info *ri = smtpd_policy_refusal((enum smtpd_refusal)r);

        cr_assert(ri->name != NULL && ri->setting != NULL && ri->fix != NULL, "refusal %d", r);
        cr_expect(strchr(ri->name, ' ') == NULL, "tag %s is one word", ri->name);
    }
    for (i = 0; i < NELEM(cases); i++) {
        cr_expect_str_eq(smtpd_policy_refusal(cases[i].r)->name, cases[i].want_name);
        cr_expect_str_eq(smtpd_policy_refusal(cases[i].r)->setting, cases[i].want_setting);
    }
}

/* The advice for a failed handshake follows what the client offered and GnuTLS said. */
Test(smtpd, tls_hints)
{
    static const struct {
        const char *label, *versions, *err, *want_substr;
    } cases[] = {
        {"TLS 1.0 only", "TLS1.0",
         "TLS handshake failed: A packet with illegal or unsupported "
         "version was received.",
         "+VERS-TLS1.0"},
        {"TLS 1.1 max", "TLS1.1", "whatever", "+VERS-TLS1.1"},
        {"no hello", "", "TLS handshake failed: An unexpected TLS packet was received.",
         "no TLS ClientHello"},
        {"no cipher", "TLS1.2",
         "TLS handshake failed: Could not negotiate a supported cipher "
         "suite.",
         "tls_priority"},
        {"cert refused", "TLS1.3 TLS1.2", "received TLS alert: Unknown certificate", "cert"},
    };
    char out[256];
    size_t i;

    for (i = 0; i < NELEM(cases); i++) {
        smtpd_policy_tls_hint(cases[i].versions, cases[i].err, out, sizeof(out));
        cr_expect(strstr(out, cases[i].want_substr) != NULL, "%s: %s", cases[i].label, out);
    }
}

/* The disconnect line: "verb=n" when all succeeded, "ok/total" otherwise, then totals. */
Test(smtpd, summary_line)
{
    struct smtpd_counts c;
    char out[256];

    memset(&c, 0, sizeof(c));
    cr_expect_str_eq(smtpd_policy_summary(&c, out, sizeof(out)), "");
    c.total[SMTPD_V_EHLO] = c.ok[SMTPD_V_EHLO] = 1;
    c.total[SMTPD_V_AUTH] = 1;
    c.total[SMTPD_V_MAIL] = 1;
    c.total[SMTPD_V_QUIT] = c.ok[SMTPD_V_QUIT] = 1;
    cr_expect_str_eq(smtpd_policy_summary(&c, out, sizeof(out)),
                     " ehlo=1 auth=0/1 mail=0/1 quit=1 commands=2/4");
    c.ok[SMTPD_V_AUTH] = c.ok[SMTPD_V_MAIL] = 1;
    cr_expect_str_eq(smtpd_policy_summary(&c, out, sizeof(out)),
                     " ehlo=1 auth=1 mail=1 quit=1 commands=4");
    /* A short buffer is cut, never overrun. */
    cr_expect(strlen(smtpd_policy_summary(&c, out, 12)) < 12);
}

/* ClientHello parsing: supported_versions when present, the legacy version otherwise. */
Test(smtpd, client_hello_versions)
{
    /* legacy 0x0303, random, no session id, 1 suite, 1 compression, supported_versions
     * {GREASE, TLS1.3, TLS1.2}. */
    unsigned char hello13[] = {
        0x03, 0x03, 0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,
        0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,    0,
        0,    0,    0,    0,    0,    0,    0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00, 0x00,
        0x0b, 0x00, 0x2b, 0x00, 0x07, 0x06, 0x0a, 0x0a, 0x03, 0x04, 0x03, 0x03,
    };
    /* A TLS 1.0 client: legacy 0x0301 and no extensions at all. */
    unsigned char hello10[] = {
        0x03, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,    0,    0,    0,    0,    0,    0,    0,
        0,    0,    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00,
    };
    unsigned char with_hdr[4 + sizeof(hello10)];
    char out[64];

    cr_assert_eq(tlsio_parse_client_hello(hello13, sizeof(hello13), out, sizeof(out)), 0);
    cr_expect_str_eq(out, "TLS1.3 TLS1.2");
    cr_assert_eq(tlsio_parse_client_hello(hello10, sizeof(hello10), out, sizeof(out)), 0);
    cr_expect_str_eq(out, "TLS1.0");
    with_hdr[0] = 1;
    with_hdr[1] = 0;
    with_hdr[2] = 0;
    with_hdr[3] = sizeof(hello10);
    memcpy(with_hdr + 4, hello10, sizeof(hello10));
    cr_assert_eq(tlsio_parse_client_hello(with_hdr, sizeof(with_hdr), out, sizeof(out)), 0);
    cr_expect_str_eq(out, "TLS1.0");
    cr_expect_eq(tlsio_parse_client_hello(hello10, 10, out, sizeof(out)), -1);
    /* Truncated inside the extensions: still no overrun, the legacy version is reported. */
    cr_assert_eq(tlsio_parse_client_hello(hello13, sizeof(hello13) - 3, out, sizeof(out)), 0);
}
