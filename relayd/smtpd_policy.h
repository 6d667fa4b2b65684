/*
 * smtpd_policy - the inbound server's decisions that do not need a socket: where a
 * message ends under each bare_lf mode, what each refusal is called and which setting
 * changes it, what a TLS handshake failure probably means, and the session summary line.
 *
 * Pure functions over their arguments (Postfix smtp_trouble.c style): smtpd.c gathers the
 * facts and carries the verdicts out; tests/unit/test_smtpd.c pins them with tables.
 * Error tier: none (no failure is possible).  Nothing here allocates; returned strings are
 * static or written into the caller's buffer.
 */
#ifndef RELAYD_SMTPD_POLICY_H
#define RELAYD_SMTPD_POLICY_H

#include <stddef.h>

#include "config/cfg.h"

/* ---- bare LF (RFC 5321 2.3.8: lines end in CRLF; 4.1.1.4: DATA ends with CRLF.CRLF) ---- */

/* The mode for one client: clients in bare_lf_accept always get CFG_BARE_LF_ACCEPT. */
enum cfg_bare_lf smtpd_policy_bare_lf_mode(enum cfg_bare_lf listener_mode, int client_exempt);

enum smtpd_eod {
    SMTPD_EOD_DATA,     /* the "." line is message text (a dot on its own line) */
    SMTPD_EOD_END,      /* CRLF.CRLF: the end of the message */
    SMTPD_EOD_END_BARE, /* the end, but a bare LF was part of it (logged once per session) */
};

/* A DATA line holding a lone "." was read.  prev_crlf: the line before it (or the DATA
 * command) ended in CRLF; dot_crlf: the "." line itself ends in CRLF.  In reject mode a
 * bare LF never gets this far (the session is refused at the first one). */
enum smtpd_eod smtpd_policy_dot(enum cfg_bare_lf mode, int prev_crlf, int dot_crlf);

/* ---- refusals: one log line each, naming the setting that would change it ---- */

enum smtpd_refusal {
    SMTPD_R_NOT_ALLOWED,      /* client address not in allow */
    SMTPD_R_MAX_CONN,         /* max_connections */
    SMTPD_R_MAX_CONN_CLIENT,  /* max_connections_per_client */
    SMTPD_R_AUTH_OFF,         /* AUTH on a listener with auth = off */
    SMTPD_R_AUTH_MECH,        /* a mechanism not in auth_mechanisms */
    SMTPD_R_AUTH_NEEDS_TLS,   /* PLAIN/LOGIN without TLS and auth_plaintext = no */
    SMTPD_R_AUTH_FAILED,      /* wrong user name or password */
    SMTPD_R_AUTH_REQUIRED,    /* MAIL before AUTH with auth = required */
    SMTPD_R_AUTH_UNAVAILABLE, /* the sasldb cannot be used */
    SMTPD_R_SENDER_DOMAIN,    /* sender_domains */
    SMTPD_R_RCPT_DOMAIN,      /* recipient_domains */
    SMTPD_R_TOO_BIG,          /* max_message_size */
    SMTPD_R_TOO_MANY_RCPTS,   /* max_recipients */
    SMTPD_R_MEMORY,           /* max_memory */
    SMTPD_R_SPOOL_FULL,       /* spool_max_size / spool_reserve */
    SMTPD_R_BARE_LF,          /* bare_lf = reject */
    SMTPD_R_TLS_FAILED,       /* the TLS handshake failed */
    SMTPD_R_TOO_MANY_ERRORS,  /* max_errors */
    SMTPD_R_TIMEOUT,          /* command_timeout / data_timeout */
    SMTPD_R_WRITE_TIMEOUT,    /* the client did not read our replies: write_timeout */
    SMTPD_R_LINE_TOO_LONG,    /* max_line_length */
    SMTPD_R_COUNT
};

struct smtpd_refusal_info {
    const char *name;    /* short tag: "reason=auth_needs_tls", the devices table */
    const char *setting; /* the configuration key(s) that decide it */
    const char *fix;     /* what an administrator changes, in words */
};

/* Never NULL; an out-of-range value is a bug (log_panic). */
const struct smtpd_refusal_info *smtpd_policy_refusal(enum smtpd_refusal r);

/* What a failed inbound TLS handshake most likely means, as advice naming the setting.
 * versions: the versions the client offered ("TLS1.0 TLS1.1", from tlsio_client_versions(),
 * "" when no ClientHello was seen); err: tlsio_errstr().  Returns out. */
char *smtpd_policy_tls_hint(const char *versions, const char *err, char *out, size_t outlen);

/* ---- the session summary (Postfix's "disconnect from ... ehlo=1 mail=1/2") ---- */

enum smtpd_verb {
    SMTPD_V_HELO,
    SMTPD_V_EHLO,
    SMTPD_V_STARTTLS,
    SMTPD_V_AUTH,
    SMTPD_V_MAIL,
    SMTPD_V_RCPT,
    SMTPD_V_DATA,
    SMTPD_V_BDAT,
    SMTPD_V_RSET,
    SMTPD_V_NOOP,
    SMTPD_V_VRFY,
    SMTPD_V_HELP,
    SMTPD_V_QUIT,
    SMTPD_V_UNKNOWN,
    SMTPD_V_COUNT
};

struct smtpd_counts {
    unsigned ok[SMTPD_V_COUNT], total[SMTPD_V_COUNT];
};

/* " ehlo=1 auth=0/1 mail=0/1 quit=1 commands=2/4": one "verb=ok" (or "ok/total" when some
 * failed) per verb used, in protocol order, then the totals; "" for a silent client. */
char *smtpd_policy_summary(const struct smtpd_counts *c, char *out, size_t outlen);

#endif
