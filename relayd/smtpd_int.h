/*
 * smtpd_int.h - internals shared by smtpd.c (sessions, I/O, listeners), smtpd_cmd.c
 * (commands and AUTH) and smtpd_data.c (DATA, the message, the commit).
 *
 * The session state machine and its invariants are described atop smtpd.c.  Everything
 * here is private to those three files (libuv's uv__ convention: smtpd__name).
 */
#ifndef RELAYD_SMTPD_INT_H
#define RELAYD_SMTPD_INT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <uv.h>

#include "common/authsasl.h"
#include "common/tlsio.h"
#include "config/cfg.h"
#include "relayd/smtpd.h"
#include "relayd/smtpd_policy.h"

#define SMTPD_INPUT_MAX (256 * 1024) /* input held while not reading commands */
#define SMTPD_DATA_CHUNK (64 * 1024)   /* flush a partial DATA line beyond this */
#define SMTPD_PROXY_TIMEOUT_MS 10000   /* for the PROXY header */
#define SMTPD_PROXY_MAX (PROXYPROTO_V2_HDR + 65535)
#define SMTPD_AUTH_DELAY_MS 1000       /* first failed login; grows by this per failure */
#define SMTPD_AUTH_DELAY_MAX_MS 3000
#define SMTPD_ENVID_MAX 100            /* RFC 3461 4.4 */
/* Replies the client has not read yet: past this we stop reading its commands until the
 * kernel took them (an EHLO loop that never reads once grew relayd to 4.5 GB). */
#define SMTPD_OUTPUT_MAX (64 * 1024)
#define SMTPD_CLIENT_BUCKETS 4096      /* per-address session counts (power of two) */

enum smtpd_state {
    SMTPD_S_PROXY,
    SMTPD_S_TLS_HANDSHAKE,
    SMTPD_S_CMD,
    SMTPD_S_AUTH,
    SMTPD_S_AUTH_DELAY,
    SMTPD_S_DATA,
    SMTPD_S_COMMIT_WAIT,
    SMTPD_S_QUIT,
    SMTPD_S_CLOSING,
};

#define SMTPD_F_HELO 0x1      /* HELO or EHLO seen */
#define SMTPD_F_EHLO 0x2      /* EHLO (ESMTP) */
#define SMTPD_F_SKIPLINE 0x4  /* discarding the rest of an over-long command line */
#define SMTPD_F_AUTHED 0x8    /* AUTH succeeded */
#define SMTPD_F_NEEDHELO 0x10 /* after STARTTLS: a new EHLO before MAIL */
#define SMTPD_F_GREETED 0x20  /* the 220 (or a reject) was sent */
#define SMTPD_F_COUNTED 0x40  /* counted in srv->nsessions */
#define SMTPD_F_MASK 0x80     /* after a refused or aborted AUTH: unknown lines are masked */
#define SMTPD_F_PROBE 0x100   /* PROXY LOCAL: the load balancer's own health check */

struct smtpd_tx {
    char *sender;
    char **rcpts;
    size_t nrcpts, cap;
    struct buf *data; /* the message as received: CRLF lines, unstuffed */
    int too_big;      /* went over max_message_size: read to the end, then 552 */
    int no_mem;       /* went over the server's max_memory: read to the end, then 451 */
    int mid_line;     /* the last chunk appended ended inside a line */
    int last_dot;     /* the last complete line ended in '.' (see smtpd_data_glued_dot) */
    int prev_crlf;    /* the last complete line (or the DATA command) ended in CRLF */
    size_t rcpt_bytes; /* memory held by the recipient list, for max_memory */
    /* RFC 3461 DSN parameters, kept in the spool (spool.h) and passed upstream when it
     * offers DSN; ENVID and ORCPT are stored xtext-decoded. */
    char ret[8];         /* "FULL", "HDRS" or "" */
    char *envid;         /* decoded, or NULL */
    int ndsn_rcpts;      /* recipients with NOTIFY or ORCPT */
    unsigned *notify;    /* per recipient: SPOOL_NOTIFY_* bits, 0: not given */
    char **orcpt;        /* per recipient: "rfc822;addr" decoded, or NULL */
};

/* Server TLS credentials shared by a listener and the sessions that use them. */
struct smtpd_cred {
    struct tlsio_cred *cred;
    int refs;
};

/* Allocated one by one: a reload keeps, adds and closes listeners (smtpd_server_reconfigure);
 * a closed one is freed by its close callback.  Sessions never point at their listener. */
struct smtpd_listener {
    struct smtpd_server *srv;
    const struct cfg_listener *cfg; /* in srv->cfg, the current generation */
    uv_tcp_t tcp;
    int bound;
    struct smtpd_cred *cred; /* tls != none */
};

struct smtpd_session {
    uint64_t id;
    struct smtpd_server *srv;
    const struct cfg *cfg;            /* the generation it started with (a reload waits) */
    struct cfg_gen *gen;              /* its reference to it; NULL without generations */
    const struct cfg_listener *lcfg;  /* its listener, in cfg */
    struct smtpd_cred *lcred;         /* the listener's TLS credentials at accept, or NULL */
    enum smtpd_state state;
    unsigned flags;
    struct tlsio *io;
    uv_timer_t timer;
    struct sockaddr_storage addr; /* the client (from the PROXY header when there is one) */
    char peer[64];
    char *helo;
    struct smtpd_tx *tx;
    struct smtpd_cred *cred;      /* held while TLS may be in use */
    struct authsasl_server *sasl; /* for the current TLS state; NULL until needed */
    char *auth_user;
    int auth_failures;
    int debug;                    /* debug_peers matched: log the dialogue */
    size_t mem;                   /* bytes of srv->mem_used that are ours */
    int refs;                     /* alive + open handles + outstanding commits */
    int errors;
    int close_after_drain;        /* QUIT or a fatal reply: close once the reply is sent */
    const char *close_why;        /* for the disconnect line; NULL: "quit" */
    int input_paused;             /* reads stopped while we are not taking commands */
    int out_blocked;              /* over SMTPD_OUTPUT_MAX unread replies: not reading */
    size_t in_off;                /* input handled but not yet consumed (see drain_input) */
    struct buf *cork;             /* replies gathered for one write, or NULL */
    int last_code;                /* of the last reply, for the command counters */
    int cmd_crlf;                 /* the last command line ended in CRLF */
    int peer_eof;                 /* the client half-closed while its commit was pending */
    size_t commit_mem;            /* bytes of the message the spool writer holds for us */
    enum cfg_bare_lf bare_lf;     /* the listener's bare_lf for this client */
    int bare_lf_logged;           /* a bare-LF end of DATA was logged in this session */
    struct smtpd_counts counts;   /* for the disconnect line */
    struct smtpd_session *prev, *next;
};

/* Sessions counted per client address (max_connections_per_client) without walking
 * every session at each accept: with 10,000 sessions that walk stalled the loop. */
struct smtpd_client {
    char peer[64];
    int n;
    struct smtpd_client *next;
};

struct smtpd_server {
    uv_loop_t *loop;
    const struct cfg *cfg;
    struct spool *sp;
    void (*on_spooled)(void *arg, uint64_t id);
    void *on_spooled_arg;
    struct cfg_gen *gen; /* the reference to cfg's generation, or NULL (cfg is the caller's) */
    struct smtpd_listener **listeners;
    int nlisteners;
    struct smtpd_session *sessions;
    uint64_t next_session_id;
    int nsessions;         /* sessions counted against max_connections */
    size_t mem_used;       /* message bytes held by all sessions */
    struct smtpd_client *clients[SMTPD_CLIENT_BUCKETS];
    int open;              /* listeners bound and not yet closed + sessions not yet freed */
    int stopping;
    void (*stop_done)(void *arg);
    void *stop_arg;
    int draining;          /* relayctl drain: new connections get 421 (smtpd_server_set_accepting) */
};

/* A commit in flight: the session it answers to, and the queue id. */
struct smtpd_commit {
    struct smtpd_session *s;
    uint64_t id;
};

/* ---- smtpd.c: the session, its I/O and its end ---- */

/* One more reference to listener credentials (NULL is fine); returns c. */
struct smtpd_cred *smtpd__cred_ref(struct smtpd_cred *c);

/* ---- smtpd_data.c: DATA, the message, the commit ---- */

/* Appends message bytes, within max_message_size and max_memory (else flags the tx). */
void smtpd__data_append(struct smtpd_session *s, const char *p, size_t n);
/* The end of DATA: repair, log, hand to the spool writer; the 250 follows the commit. */
void smtpd__data_end(struct smtpd_session *s);
/* At data_timeout on a glued_dot listener: 1 when a glued final dot ended the message. */
int smtpd__data_glued_dot(struct smtpd_session *s);
/* One DATA line without its end (crlf: it ended in CRLF); 1 at the end of the message. */
int smtpd__data_line(struct smtpd_session *s, const char *line, size_t n, int crlf);

/* ---- smtpd_cmd.c: commands and AUTH ---- */

/* One command line (a private copy, NUL-terminated, without its line end). */
void smtpd__dispatch(struct smtpd_session *s, char *cmd, size_t n);
/* Handles every complete line buffered (see smtpd.c). */
void smtpd__drain_input(struct smtpd_session *s);
/* The one way to change state: logs it and re-arms the timer. */
void smtpd__enter_state(struct smtpd_session *s, enum smtpd_state st);
/* Counts a protocol error; -1 (after 421 and a close) at max_errors. */
int smtpd__error(struct smtpd_session *s);
/* Writes corked replies; stops reading past SMTPD_OUTPUT_MAX unread bytes. */
void smtpd__flush(struct smtpd_session *s);
/* Brings srv->mem_used in line with what the session holds now (max_memory). */
void smtpd__mem_sync(struct smtpd_session *s);
/* A refusal: one info line naming the setting (smtpd_policy.h), and a devices note. */
void smtpd__refuse_log(struct smtpd_session *s, enum smtpd_refusal r, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* After a final reply: closes once it is written. */
void smtpd__reject_close(struct smtpd_session *s, const char *why);
/* One reply line (CRLF added); corked inside smtpd__drain_input. */
void smtpd__reply(struct smtpd_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The one exit: logs the summary line, rolls back the tx, closes every handle. */
void smtpd__session_close(struct smtpd_session *s, const char *why);
/* Drops a reference; the last one frees the session.  s may be gone afterwards. */
void smtpd__session_unref(struct smtpd_session *s);
/* The dialogue for debug_peers (info) or -vv (debug). */
void smtpd__trace(struct smtpd_session *s, char dir, const char *line, int n);
/* Frees a transaction (NULL is fine); returns NULL. */
struct smtpd_tx *smtpd__tx_free(struct smtpd_tx *tx);
/* Drops the session's transaction. */
void smtpd__tx_reset(struct smtpd_session *s);

#endif
