/*
 * bounce - delivery status notifications (RFC 3464) for mail relayd could not deliver.
 *
 * bounce_build() writes one complete message, ready for the spool: a multipart/report
 * (RFC 6522) with report-type=delivery-status and three parts: a plain-text explanation for
 * the person who sent the mail, the machine-readable message/delivery-status, and the
 * original message's header section as text/rfc822-headers (not its body: the sender has
 * it, and it may be large) - unless the sender asked for the whole message with RFC 3461
 * RET=FULL: then a failure notification returns it as message/rfc822, when it is at most
 * BOUNCE_FULL_MAX bytes (larger ones, and delay notifications, get the headers only).
 * The sender's ENVID is reported as Original-Envelope-Id and each recipient's ORCPT as
 * Original-Recipient (RFC 3464 2.2.1, 2.3.1).  Lines end in CRLF; every header line stays within 78
 * columns where it can and within 998 always (RFC 5322 2.1.1): long replies are folded and
 * cut to BOUNCE_DIAG_MAX.  Upstream replies are reduced to printable ASCII before they are
 * quoted.
 *
 * The caller decides whether to send one at all: never for the null sender (RFC 5321
 * 6.1, RFC 3464 2: a DSN is sent with MAIL FROM:<> and must not cause another).
 *
 * Errors: none expected (xmalloc dies on OOM).  Ownership: the returned text is the
 * caller's (free()); nothing in info is kept.
 */
#ifndef RELAYD_BOUNCE_H
#define RELAYD_BOUNCE_H

#include <stddef.h>
#include <stdint.h>

#define BOUNCE_DIAG_MAX 900      /* characters of an upstream reply quoted per recipient */
#define BOUNCE_HEADERS_MAX 65536 /* bytes of the original header section returned */
#define BOUNCE_FULL_MAX (1024 * 1024) /* RET=FULL: largest original returned whole */

enum bounce_kind {
    BOUNCE_FAILED,  /* Action: failed  - "Undelivered Mail Returned to Sender" */
    BOUNCE_DELAYED, /* Action: delayed - "Delayed Mail (still being retried)" */
};

struct bounce_rcpt {
    const char *addr;       /* the envelope recipient */
    const char *reply;      /* the upstream's reply ("550 5.1.1 <x@y>: User unknown") or
                               relayd's reason in words ("connect to ...: refused"); NULL:
                               none */
    const char *status;     /* RFC 3463 code to report; NULL: derived from reply */
    const char *remote_mta; /* the upstream's host name; NULL: none contacted */
    int64_t last_attempt;   /* unix seconds; 0: none */
    const char *orcpt;      /* RFC 3461 ORCPT, decoded ("rfc822;a@example.com"); NULL: none */
};

struct bounce_info {
    enum bounce_kind kind;
    const char *hostname; /* relayd's host name: Reporting-MTA, From: MAILER-DAEMON@ */
    uint64_t queue_id;    /* the original message */
    uint64_t dsn_id;      /* the notification's own queue id (for its Message-ID) */
    const char *sender;   /* the original envelope sender */
    const char *to;       /* who receives the notification */
    int64_t arrived;      /* the original's arrival, unix seconds */
    int64_t now;          /* Date: */
    int64_t retry_until;  /* BOUNCE_DELAYED: when relayd gives up; 0: not said */
    const struct bounce_rcpt *rcpts;
    size_t nrcpts;
    const char *orig; /* the original message as spooled (CRLF); NULL: none */
    size_t orig_len;
    int dsn_ret;       /* RFC 3461 RET: SPOOL_RET_FULL returns orig whole (BOUNCE_FAILED) */
    const char *envid; /* RFC 3461 ENVID, decoded; NULL: none */
};

/* The complete notification (header and body, CRLF) in *out, malloc'd, length *len. */
void bounce_build(const struct bounce_info *info, char **out, size_t *len);

/*
 * The RFC 3463 status code for a reply, into out: the enhanced status code when the reply
 * has one whose class matches its basic code ("550 5.1.1 ..." -> "5.1.1"); else from the
 * basic code ("554 no" -> "5.0.0", "451 later" -> "4.0.0"); else "5.0.0" for kind
 * BOUNCE_FAILED and "4.0.0" for BOUNCE_DELAYED.  Returns out.
 */
char *bounce_status(const char *reply, enum bounce_kind kind, char out[16]);

#endif
