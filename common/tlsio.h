/*
 * tlsio - a libuv TCP stream with optional TLS (GnuTLS), delivering one event callback.
 *
 * The only module that includes GnuTLS.  Sessions (smtpd, smtpc) never call GnuTLS: they
 * write plaintext with tlsio_write(), read plaintext from tlsio_input(), and switch to TLS
 * with tlsio_starttls() (STARTTLS) or right after connect/accept (implicit TLS).
 *
 * Events (OpenSMTPD ioev style), delivered through the callback given to tlsio_new():
 *   TLSIO_CONNECTED  tlsio_connect() finished
 *   TLSIO_DATAIN     new plaintext was appended to tlsio_input()
 *   TLSIO_TLSREADY   the handshake finished (and, as a client, the peer was verified)
 *   TLSIO_DRAINED    everything written so far has been handed to the kernel
 *   TLSIO_EOF        the peer closed the connection
 *   TLSIO_ERROR      connect, read, write or handshake failed: tlsio_errstr() says why in
 *                    words ("connection refused", "certificate signer not trusted",
 *                    "certificate name mismatch: expected relay.example.com", ...)
 * After TLSIO_EOF or TLSIO_ERROR no more events arrive except from a later tlsio_close().
 *
 * Ownership: tlsio_new() allocates; tlsio_close() closes the socket and frees the tlsio
 * after libuv's close callback, then calls closed(arg).  Never free a tlsio otherwise, and
 * never use it after tlsio_close().  The callback may call tlsio_close() on its own io.
 */
#ifndef COMMON_TLSIO_H
#define COMMON_TLSIO_H

#include <stddef.h>
#include <sys/socket.h>
#include <uv.h>

#include "common/buf.h"

enum tlsio_event {
    TLSIO_CONNECTED,
    TLSIO_DATAIN,
    TLSIO_TLSREADY,
    TLSIO_DRAINED,
    TLSIO_EOF,
    TLSIO_ERROR,
};

struct tlsio;
struct tlsio_cred;
typedef void (*tlsio_cb)(struct tlsio *io, enum tlsio_event ev, void *arg);

/* Default priority: TLS 1.2 and 1.3 only. */
#define TLSIO_DEFAULT_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

/* Process-wide GnuTLS set-up; call once before anything else here. */
int tlsio_global_init(char *err, size_t errlen);

/* Client credentials: trust ca_file (PEM), or the system store when ca_file is NULL.
 * priority NULL: TLSIO_DEFAULT_PRIORITY.  0 or negative with text in err. */
int tlsio_cred_client_new(const char *ca_file, const char *priority, struct tlsio_cred **out,
                          char *err, size_t errlen);
/* Server credentials from a PEM certificate chain and key. */
int tlsio_cred_server_new(const char *cert_file, const char *key_file, const char *priority,
                          struct tlsio_cred **out, char *err, size_t errlen);
struct tlsio_cred *tlsio_cred_free(struct tlsio_cred *cred); /* returns NULL */

/* A new unconnected stream; the TCP handle is initialised on loop. */
struct tlsio *tlsio_new(uv_loop_t *loop, tlsio_cb cb, void *arg);
/* The TCP handle as a stream, for uv_accept() into it. */
uv_stream_t *tlsio_stream(struct tlsio *io);
/* Connects; TLSIO_CONNECTED or TLSIO_ERROR follows. */
int tlsio_connect(struct tlsio *io, const struct sockaddr *addr);
/* Starts reading: TLSIO_DATAIN events follow.  While reads are stopped no TLSIO_DATAIN is
 * delivered, but records already received may still be decrypted into tlsio_input(); if
 * that holds anything when reads restart, one TLSIO_DATAIN follows from the loop. */
int tlsio_read_start(struct tlsio *io);
void tlsio_read_stop(struct tlsio *io);

/* Plaintext received and not yet consumed; the consumer buf_consume()s what it used. */
struct buf *tlsio_input(struct tlsio *io);
/* Queues plaintext for the peer (encrypted when TLS is up).  0 or negative. */
int tlsio_write(struct tlsio *io, const void *data, size_t len);
/* Bytes queued but not yet handed to the kernel. */
size_t tlsio_pending_write(const struct tlsio *io);

/*
 * Starts a TLS handshake on the connection.  As a server: cred from
 * tlsio_cred_server_new(), servername NULL.  As a client: verifies the peer's certificate
 * chain against cred's trust and its name against servername (also sent as SNI).
 * Plaintext already buffered in the input is discarded first (RFC 3207 section 4: no
 * command injection across STARTTLS).  TLSIO_TLSREADY or TLSIO_ERROR follows.
 */
int tlsio_starttls(struct tlsio *io, struct tlsio_cred *cred, int is_server,
                   const char *servername);

/*
 * Like tlsio_starttls(), but the plaintext input not yet consumed is kept: it becomes the
 * first TLS ciphertext the handshake reads, instead of being discarded.  For implicit-TLS
 * listeners behind a proxy: the consumer reads the PROXY header as plaintext, buf_consume()s
 * it, and calls this, because the client's ClientHello often arrives in the same segment
 * right behind the header and is already in tlsio_input().  NEVER use it for STARTTLS:
 * there, bytes received in cleartext must not be carried across (RFC 3207 section 4).
 */
int tlsio_starttls_keep(struct tlsio *io, struct tlsio_cred *cred, int is_server,
                        const char *servername);

/*
 * Public-key pinning for a client: pins is tls_pin's text, "sha256//BASE64" (the SHA-256 of
 * the server certificate's SubjectPublicKeyInfo, as curl's --pinnedpubkey and RFC 7469's
 * pin-sha256; "sha256/" accepted), several separated by ';', ',' or spaces.  Checked after
 * the chain and the name verified; a mismatch is a TLSIO_ERROR "certificate public key does
 * not match tls_pin (server key is sha256//...)" with tlsio_verify_failed() set.  Call before
 * tlsio_starttls(); NULL clears.  0 or UV_EINVAL (TLS already started).  Copied.
 */
int tlsio_set_pin(struct tlsio *io, const char *pins);
/* "sha256//BASE64" of the server's public key once TLS is up as a client, else "". */
const char *tlsio_peer_pin(const struct tlsio *io);
/* The pin of the first certificate in a PEM file (for tests and operators); 0 or -1 + err. */
int tlsio_pin_of_cert_file(const char *pem_file, char *out, size_t outlen, char *err,
                           size_t errlen);

int tlsio_is_tls(const struct tlsio *io);
/* "TLSv1.3 with cipher AES-256-GCM" style text for Received: headers and logs, or "". */
char *tlsio_describe(const struct tlsio *io, char *out, size_t outlen);
/* Why the last TLSIO_ERROR happened, in words. */
const char *tlsio_errstr(const struct tlsio *io);
/* 1 when the last error was the peer's certificate failing verification (chain, dates or
 * name): a configuration problem rather than a network one. */
int tlsio_verify_failed(const struct tlsio *io);
/* As a server: the TLS versions the client's ClientHello offered, best known names first
 * as sent ("TLS1.3 TLS1.2", or the legacy version alone when it sent no supported_versions:
 * "TLS1.0"); "" before a ClientHello arrived.  Valid until tlsio_close(). */
const char *tlsio_client_versions(const struct tlsio *io);
/* Parses a ClientHello (with or without its 4-byte handshake header) into that text;
 * 0, or -1 when it is too short to say anything.  Pure; for tests and the hook above. */
int tlsio_parse_client_hello(const unsigned char *p, size_t n, char *out, size_t outlen);

/* The peer's address; 0 or negative. */
int tlsio_peer(const struct tlsio *io, struct sockaddr_storage *ss);

/* Closes and frees (see above); closed may be NULL.  Safe to call twice.  Data already
 * passed to tlsio_write() is still flushed to the kernel (for at most a few seconds), so a
 * final reply such as "221 Bye" may be written right before closing.  No event is
 * delivered once this has been called; closed(arg) runs later, from the loop. */
void tlsio_close(struct tlsio *io, void (*closed)(void *arg), void *arg);

/*
 * RS256 (RSASSA-PKCS1-v1_5 with SHA-256, RFC 7518 3.3) signature of data with the RSA
 * private key pem_key (PEM, PKCS#1 or unencrypted PKCS#8, as in a Google service account
 * key).  For JWT assertions (relayd/oauth2.c).  0 with *sig malloc'd (*siglen bytes), or
 * -1 with text in err (never the key).
 */
int tlsio_rs256_sign(const char *pem_key, const void *data, size_t len, unsigned char **sig,
                     size_t *siglen, char *err, size_t errlen);

#endif
