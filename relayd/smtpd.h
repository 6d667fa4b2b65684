/*
 * smtpd - the inbound SMTP server: listeners and per-connection sessions.
 *
 * Each accepted connection gets a struct smtpd_session driven by an explicit state
 * machine (see smtpd.c).  A message is handed to the spool at the end of DATA and the
 * 250 reply is sent only from the spool's completion callback, after the durable commit.
 *
 * Listeners may use STARTTLS or implicit TLS (GnuTLS, via tlsio), inbound AUTH (Cyrus SASL
 * server, via authsasl), and the PROXY protocol (proxyproto); see smtpd.c for the states.
 *
 * Ownership: the server owns its listeners and sessions; smtpd_server_stop() stops
 * accepting and closes every session (transactions not yet committed are dropped: the
 * client never saw a 250 for them).
 */
#ifndef RELAYD_SMTPD_H
#define RELAYD_SMTPD_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "config/cfg.h"
#include "spool/spool.h"

struct smtpd_server;

/* on_spooled(arg, id) runs after each durable commit of a new message. */
struct smtpd_server *smtpd_server_new(uv_loop_t *loop, const struct cfg *cfg, struct spool *sp,
                                      void (*on_spooled)(void *arg, uint64_t id), void *arg);
/* Binds and listens on every configured listener; 0 or negative with text in err. */
int smtpd_server_listen(struct smtpd_server *srv, char *err, size_t errlen);
/* The full reload: the listeners become cfg's.  Listeners are matched by host and port: a
 * kept one stays on its socket and takes the new settings and freshly read certificate;
 * new ones are bound first, so a failure (a port in use, a certificate that does not load)
 * changes nothing and returns negative with text in err.  Sessions in progress finish on
 * the generation they started with (each holds a reference to gen, which may be NULL
 * when cfg is the caller's to keep alive); new sessions get cfg, and the server holds a
 * reference to gen.  *st (may be NULL) gets what changed. */
struct smtpd_reconf {
    int added, removed, changed;
};
int smtpd_server_reconfigure(struct smtpd_server *srv, const struct cfg *cfg, struct cfg_gen *gen,
                             struct smtpd_reconf *st, char *err, size_t errlen);
/* Stops accepting and closes all sessions; done(arg) runs once every handle is closed. */
void smtpd_server_stop(struct smtpd_server *srv, void (*done)(void *arg), void *arg);
/* Drain (accepting = 0, relayctl drain): listeners stay open, but every new connection
 * gets "421 4.3.2 <host> not accepting mail now (draining), try another server" (on
 * implicit-TLS listeners a close), so load balancer checks mark the node down; sessions in
 * progress finish.  accepting = 1 (relayctl resume) takes mail again. */
void smtpd_server_set_accepting(struct smtpd_server *srv, int accepting);
int smtpd_server_accepting(const struct smtpd_server *srv);
/* Frees a stopped server. */
void smtpd_server_free(struct smtpd_server *srv);
/* The counter of message bytes held in memory that [relayd] max_memory bounds: the
 * sessions' (this server's) and, once the daemon shares it (sched_share_memory()), the
 * bodies of deliveries in progress.  Valid until smtpd_server_free(). */
size_t *smtpd_server_memory(struct smtpd_server *srv);

#endif
