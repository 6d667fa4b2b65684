/*
 * tlsio - a libuv TCP stream with optional GnuTLS; see tlsio.h.
 *
 * GnuTLS runs on a custom transport: its pull function reads ciphertext from io->cin, which
 * the uv read callback fills; its push function copies each record into its own uv_write
 * request, so GnuTLS never sees EAGAIN on output.  After every read one tlsio_drive() runs the
 * handshake, or gnutls_record_recv() until GNUTLS_E_AGAIN, and everything decrypted goes to
 * io->in.  Nothing stays hidden inside GnuTLS or io->cin after a drive except a partial
 * record, so stopping and restarting reads never strands plaintext (Postfix tlsp_strategy).
 *
 * Happy path and failure modes: an event is delivered only while the io is neither closing
 * nor dead (after EOF or ERROR).  The callback may call tlsio_close() on its own io, so every
 * place that delivers an event re-checks io->closing afterwards; memory stays valid because
 * it is freed only from the libuv close callbacks, which always run later (raft
 * uvClientMaybeDestroy).  tlsio_close() flushes queued writes (bounded by a timer) so that a
 * final "221" is not lost, then closes both handles; the last close callback frees.
 *
 * Errors: expected failures return UV_E* (negative) or become TLSIO_ERROR with words in
 * io->err.  OOM dies in xmalloc().
 */
#include "common/tlsio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <gnutls/gnutls.h>
#include <gnutls/abstract.h>
#include <gnutls/crypto.h>
#include <gnutls/x509.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "common/xalloc.h"

/* How long tlsio_close() waits for queued writes to reach the kernel. */
#define TLSIO_CLOSE_FLUSH_MS 5000
/* Read size offered to libuv. */
#define TLSIO_READ_CHUNK 65536

struct tlsio_cred {
    gnutls_certificate_credentials_t x509;
    gnutls_priority_t prio;
    int is_server;
};

enum tlsio_tls_state {
    TLSIO_T_NONE,
    TLSIO_T_HANDSHAKE,
    TLSIO_T_READY,
};

struct tlsio {
    uv_loop_t *loop;
    uv_tcp_t tcp;
    uv_timer_t timer; /* deferred DATAIN after read_start; close flush guard */
    uv_connect_t creq;
    uv_shutdown_t sreq;
    tlsio_cb cb;
    void *arg;

    struct buf *in;     /* plaintext for the consumer */
    struct buf *cin;    /* ciphertext waiting for gnutls pull */
    struct buf *preout; /* plaintext written during the handshake */

    gnutls_session_t sess;
    enum tlsio_tls_state tls;
    int is_server;
    char *servername;

    size_t pending; /* bytes in uv_write requests not yet completed */
    int nwrites;    /* uv_write requests not yet completed */
    int push_err;   /* uv_write failure seen inside the push function */

    int want_read;       /* the consumer asked for reads */
    int reading;         /* the socket is actually being read */
    int peer_eof;        /* UV_EOF seen on the socket */
    int dead;            /* EOF or ERROR delivered: no more events */
    int closing;         /* tlsio_close() called: no more events, ever */
    int handles_closing; /* uv_close() called on both handles */
    int open_handles;    /* freed when this reaches 0 after handles_closing */
    int verify_failed;   /* last error was a certificate verification failure */
    char *pins;          /* tls_pin list, or NULL: see tlsio_set_pin() */
    char peer_pin[64];   /* "sha256//BASE64" of the peer's key once the handshake is done */
    int failed;          /* ERROR delivered (EOF alone still allows writes: half-close) */
    char client_versions[64]; /* server: what the client's ClientHello offered, or "" */

    void (*closed)(void *arg);
    void *closed_arg;
    char err[256];
};

struct tlsio_wreq {
    uv_write_t req;
    struct tlsio *io;
    size_t len;
    char data[];
};

static int tlsio_initialised;

int tlsio_global_init(char *err, size_t errlen)
{
    int rc;

    if (tlsio_initialised)
        return 0;
    if ((rc = gnutls_global_init()) < 0) {
        snprintf(err, errlen, "GnuTLS initialisation failed: %s", gnutls_strerror(rc));
        return -1;
    }
    /* A peer that resets the connection must give us EPIPE, not kill the process. */
    signal(SIGPIPE, SIG_IGN);
    tlsio_initialised = 1;
    return 0;
}

/* ---- Credentials ---- */

static int cred_new(const char *priority, int is_server, struct tlsio_cred **out, char *err,
                    size_t errlen)
{
    struct tlsio_cred *cred = xcalloc(1, sizeof(*cred));
    const char *errpos = NULL;
    int rc;

    if (priority == NULL)
        priority = TLSIO_DEFAULT_PRIORITY;
    if ((rc = gnutls_certificate_allocate_credentials(&cred->x509)) < 0) {
        snprintf(err, errlen, "TLS credentials: %s", gnutls_strerror(rc));
        goto free_cred;
    }
    if ((rc = gnutls_priority_init(&cred->prio, priority, &errpos)) < 0) {
        snprintf(err, errlen, "TLS priority \"%s\": %s at \"%s\"", priority, gnutls_strerror(rc),
                 errpos != NULL ? errpos : "");
        goto free_x509;
    }
    cred->is_server = is_server;
    *out = cred;
    return 0;
free_x509:
    gnutls_certificate_free_credentials(cred->x509);
free_cred:
    free(cred);
    return -1;
}

int tlsio_cred_client_new(const char *ca_file, const char *priority, struct tlsio_cred **out,
                          char *err, size_t errlen)
{
    struct tlsio_cred *cred;
    int rc;

    if (cred_new(priority, 0, &cred, err, errlen) != 0)
        return -1;
    if (ca_file != NULL) {
        rc = gnutls_certificate_set_x509_trust_file(cred->x509, ca_file, GNUTLS_X509_FMT_PEM);
        if (rc < 0) {
            snprintf(err, errlen, "%s: cannot load CA certificates: %s", ca_file,
                     gnutls_strerror(rc));
            goto fail;
        }
        if (rc == 0) {
            snprintf(err, errlen, "%s: no CA certificates found", ca_file);
            goto fail;
        }
    } else {
        rc = gnutls_certificate_set_x509_system_trust(cred->x509);
        if (rc < 0) {
            snprintf(err, errlen, "cannot load the system trust store: %s", gnutls_strerror(rc));
            goto fail;
        }
    }
    *out = cred;
    return 0;
fail:
    tlsio_cred_free(cred);
    return -1;
}

int tlsio_cred_server_new(const char *cert_file, const char *key_file, const char *priority,
                          struct tlsio_cred **out, char *err, size_t errlen)
{
    struct tlsio_cred *cred;
    int rc;

    if (cred_new(priority, 1, &cred, err, errlen) != 0)
        return -1;
    rc = gnutls_certificate_set_x509_key_file(cred->x509, cert_file, key_file, GNUTLS_X509_FMT_PEM);
    if (rc < 0) {
        snprintf(err, errlen, "cannot load certificate %s with key %s: %s", cert_file, key_file,
                 gnutls_strerror(rc));
        tlsio_cred_free(cred);
        return -1;
    }
    *out = cred;
    return 0;
}

struct tlsio_cred *tlsio_cred_free(struct tlsio_cred *cred)
{
    if (cred != NULL) {
        gnutls_priority_deinit(cred->prio);
        gnutls_certificate_free_credentials(cred->x509);
        free(cred);
    }
    return NULL;
}

/* ---- Events ---- */

/* Delivers ev unless the consumer closed the io or it already died.  Afterwards the caller
 * must re-check io->closing and io->dead: the callback may have closed it. */
static void tlsio_emit(struct tlsio *io, enum tlsio_event ev)
{
    if (io->closing || io->dead)
        return;
    if (ev == TLSIO_EOF || ev == TLSIO_ERROR)
        io->dead = 1;
    io->cb(io, ev, io->arg);
}

static void update_reading(struct tlsio *io);

static void tlsio_fail(struct tlsio *io, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void tlsio_fail(struct tlsio *io, const char *fmt, ...)
{
    va_list ap;

    if (io->closing || io->dead)
        return;
    va_start(ap, fmt);
    vsnprintf(io->err, sizeof(io->err), fmt, ap);
    va_end(ap);
    io->dead = 1;
    io->failed = 1;
    update_reading(io);
    io->dead = 0; /* tlsio_emit() sets it again */
    tlsio_emit(io, TLSIO_ERROR);
}

/* ---- Writes ---- */

static void write_cb(uv_write_t *req, int status)
{
    struct tlsio_wreq *w = (struct tlsio_wreq *)req;
    struct tlsio *io = w->io;

    io->nwrites--;
    io->pending -= w->len;
    free(w);
    if (io->closing)
        return;
    if (status < 0) {
        if (status != UV_ECANCELED)
            tlsio_fail(io, "%s", uv_strerror(status));
        return;
    }
    if (io->nwrites == 0 && io->preout->len == 0)
        tlsio_emit(io, TLSIO_DRAINED);
}

static int queue_write(struct tlsio *io, const void *data, size_t len)
{
    struct tlsio_wreq *w;
    uv_buf_t b;
    int rc;

    if (len == 0)
        return 0;
    w = xmalloc(sizeof(*w) + len);
    w->io = io;
    w->len = len;
    memcpy(w->data, data, len);
    b = uv_buf_init(w->data, (unsigned)len);
    if ((rc = uv_write(&w->req, (uv_stream_t *)&io->tcp, &b, 1, write_cb)) < 0) {
        free(w);
        return rc;
    }
    io->nwrites++;
    io->pending += len;
    return 0;
}

static ssize_t tls_push(gnutls_transport_ptr_t ptr, const void *data, size_t len)
{
    struct tlsio *io = ptr;
    int rc;

    if ((rc = queue_write(io, data, len)) < 0) {
        io->push_err = rc;
        gnutls_transport_set_errno(io->sess, EPIPE);
        return -1;
    }
    return (ssize_t)len;
}

static ssize_t tls_pull(gnutls_transport_ptr_t ptr, void *data, size_t len)
{
    struct tlsio *io = ptr;

    if (io->cin->len == 0) {
        if (io->peer_eof)
            return 0;
        gnutls_transport_set_errno(io->sess, EAGAIN);
        return -1;
    }
    if (len > io->cin->len)
        len = io->cin->len;
    memcpy(data, io->cin->data, len);
    buf_consume(io->cin, len);
    return (ssize_t)len;
}

static int tls_send(struct tlsio *io, const char *p, size_t len)
{
    ssize_t n;

    while (len > 0) {
        n = gnutls_record_send(io->sess, p, len);
        if (n == GNUTLS_E_INTERRUPTED)
            continue;
        if (n < 0) {
            /* Our push never returns EAGAIN, so anything negative is fatal. */
            if (io->push_err != 0)
                snprintf(io->err, sizeof(io->err), "%s", uv_strerror(io->push_err));
            else
                snprintf(io->err, sizeof(io->err), "TLS write failed: %s", gnutls_strerror((int)n));
            return io->push_err != 0 ? io->push_err : UV_EPIPE;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int tlsio_write(struct tlsio *io, const void *data, size_t len)
{
    int rc;

    /* After TLSIO_EOF the peer has only shut down its sending side: a reply it is waiting
     * for (the 250 of a message whose commit was pending) may still go out. */
    if (io->closing || io->failed)
        return UV_EPIPE;
    switch (io->tls) {
    case TLSIO_T_NONE:
        if ((rc = queue_write(io, data, len)) < 0)
            snprintf(io->err, sizeof(io->err), "%s", uv_strerror(rc));
        return rc;
    case TLSIO_T_HANDSHAKE:
        /* Sent once the handshake is done; see tlsio_drive(). */
        buf_append(io->preout, data, len);
        return 0;
    case TLSIO_T_READY:
        return tls_send(io, data, len);
    }
    return UV_EINVAL;
}

size_t tlsio_pending_write(const struct tlsio *io)
{
    return io->pending + io->preout->len;
}

/* ---- Reads and the TLS engine ---- */

static const char *verify_words(struct tlsio *io, char *out, size_t outlen)
{
    unsigned status = gnutls_session_get_verify_cert_status(io->sess);
    gnutls_datum_t txt;

    io->verify_failed = 1;
    if (status & GNUTLS_CERT_SIGNER_NOT_FOUND)
        return "certificate signer not trusted";
    if (status & GNUTLS_CERT_EXPIRED)
        return "certificate expired";
    if (status & GNUTLS_CERT_NOT_ACTIVATED)
        return "certificate not yet valid";
    if (status & GNUTLS_CERT_REVOKED)
        return "certificate revoked";
    if (status & GNUTLS_CERT_SIGNER_NOT_CA)
        return "certificate signer is not a CA";
    if (status & GNUTLS_CERT_INSECURE_ALGORITHM)
        return "certificate uses an insecure algorithm";
    if (status & GNUTLS_CERT_UNEXPECTED_OWNER) {
        snprintf(out, outlen, "certificate name mismatch: expected %s",
                 io->servername != NULL ? io->servername : "(none)");
        return out;
    }
    if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &txt, 0) == 0) {
        snprintf(out, outlen, "certificate verification failed: %s", (char *)txt.data);
        gnutls_free(txt.data);
        return out;
    }
    return "certificate verification failed";
}

/* Words for a fatal GnuTLS error during the handshake or a read. */
static void tls_fail(struct tlsio *io, int rc, const char *when)
{
    char tmp[200];

    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
        tlsio_fail(io, "%s", verify_words(io, tmp, sizeof(tmp)));
    } else if (rc == GNUTLS_E_FATAL_ALERT_RECEIVED) {
        const char *name = gnutls_alert_get_name(gnutls_alert_get(io->sess));
        tlsio_fail(io, "received TLS alert: %s", name != NULL ? name : "unknown");
    } else if (rc == GNUTLS_E_PUSH_ERROR && io->push_err != 0) {
        tlsio_fail(io, "%s", uv_strerror(io->push_err));
    } else if (io->peer_eof && io->tls == TLSIO_T_HANDSHAKE) {
        tlsio_fail(io, "connection closed by peer during TLS handshake");
    } else {
        tlsio_fail(io, "TLS %s failed: %s", when, gnutls_strerror(rc));
    }
}

static void flush_preout(struct tlsio *io)
{
    int rc;
    char tmp[sizeof(io->err)];

    if (io->preout->len == 0)
        return;
    rc = tls_send(io, io->preout->data, io->preout->len);
    buf_reset(io->preout);
    if (rc < 0) {
        snprintf(tmp, sizeof(tmp), "%s", io->err);
        tlsio_fail(io, "%s", tmp);
    }
}

/* ---- Public-key pinning (RFC 7469 pin-sha256, curl's --pinnedpubkey sha256//) ---- */

static void base64(const unsigned char *in, size_t n, char *out, size_t outlen)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;

    for (i = 0; i < n && o + 5 < outlen; i += 3) {
        unsigned v = (unsigned)in[i] << 16;
        if (i + 1 < n)
            v |= (unsigned)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = tab[(v >> 18) & 63];
        out[o++] = tab[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tab[v & 63] : '=';
    }
    out[o] = '\0';
}

/* "sha256//BASE64" of a DER certificate's SubjectPublicKeyInfo; 0 or a GnuTLS error. */
static int spki_pin(const gnutls_datum_t *der, char *out, size_t outlen)
{
    gnutls_x509_crt_t crt = NULL;
    gnutls_pubkey_t key = NULL;
    gnutls_datum_t spki = {NULL, 0};
    unsigned char digest[32];
    int rc;

    if ((rc = gnutls_x509_crt_init(&crt)) < 0)
        return rc;
    if ((rc = gnutls_x509_crt_import(crt, der, GNUTLS_X509_FMT_DER)) < 0)
        goto free_crt;
    if ((rc = gnutls_pubkey_init(&key)) < 0)
        goto free_crt;
    if ((rc = gnutls_pubkey_import_x509(key, crt, 0)) < 0)
        goto free_key;
    if ((rc = gnutls_pubkey_export2(key, GNUTLS_X509_FMT_DER, &spki)) < 0)
        goto free_key;
    rc = gnutls_hash_fast(GNUTLS_DIG_SHA256, spki.data, spki.size, digest);
    gnutls_free(spki.data);
    if (rc < 0)
        goto free_key;
    snprintf(out, outlen, "sha256//");
    base64(digest, sizeof(digest), out + strlen(out), outlen - strlen(out));
free_key:
    gnutls_pubkey_deinit(key);
free_crt:
    gnutls_x509_crt_deinit(crt);
    return rc < 0 ? rc : 0;
}

/* 1 when pin ("sha256//B64" or "sha256/B64") is in the list. */
static int pin_listed(const char *list, const char *pin)
{
    const char *want = pin + 8; /* past "sha256//" */
    size_t wlen = strlen(want);

    while (*list != '\0') {
        size_t len;

        list += strspn(list, ";, \t");
        len = strcspn(list, ";, \t");
        if (len > 7 && strncasecmp(list, "sha256/", 7) == 0) {
            const char *b = list + 7 + (list[7] == '/');
            if ((size_t)(list + len - b) == wlen && memcmp(b, want, wlen) == 0)
                return 1;
        }
        list += len;
    }
    return 0;
}

/* After the chain and name verified: the leaf's key must be pinned, when pins are set. */
static int check_pin(struct tlsio *io)
{
    const gnutls_datum_t *certs;
    unsigned n = 0;
    int rc;

    certs = gnutls_certificate_get_peers(io->sess, &n);
    if (certs == NULL || n == 0) {
        if (io->pins == NULL)
            return 0;
        io->verify_failed = 1;
        tlsio_fail(io, "server sent no certificate to check against tls_pin");
        return -1;
    }
    if ((rc = spki_pin(&certs[0], io->peer_pin, sizeof(io->peer_pin))) < 0) {
        io->peer_pin[0] = '\0';
        if (io->pins == NULL)
            return 0;
        io->verify_failed = 1;
        tlsio_fail(io, "cannot read the server's public key: %s", gnutls_strerror(rc));
        return -1;
    }
    if (io->pins != NULL && !pin_listed(io->pins, io->peer_pin)) {
        io->verify_failed = 1;
        tlsio_fail(io, "certificate public key does not match tls_pin (server key is %s)",
             io->peer_pin);
        return -1;
    }
    return 0;
}

int tlsio_set_pin(struct tlsio *io, const char *pins)
{
    if (io->tls != TLSIO_T_NONE)
        return UV_EINVAL;
    free(io->pins);
    io->pins = pins != NULL && *pins != '\0' ? xstrdup(pins) : NULL;
    return 0;
}

const char *tlsio_peer_pin(const struct tlsio *io)
{
    return io->tls == TLSIO_T_READY ? io->peer_pin : "";
}

int tlsio_pin_of_cert_file(const char *pem_file, char *out, size_t outlen, char *err,
                           size_t errlen)
{
    gnutls_datum_t pem = {NULL, 0}, der = {NULL, 0};
    int rc;

    if ((rc = gnutls_load_file(pem_file, &pem)) < 0) {
        snprintf(err, errlen, "%s: %s", pem_file, gnutls_strerror(rc));
        return -1;
    }
    rc = gnutls_pem_base64_decode2("CERTIFICATE", &pem, &der);
    gnutls_free(pem.data);
    if (rc < 0) {
        snprintf(err, errlen, "%s: no PEM certificate: %s", pem_file, gnutls_strerror(rc));
        return -1;
    }
    rc = spki_pin(&der, out, outlen);
    gnutls_free(der.data);
    if (rc < 0) {
        snprintf(err, errlen, "%s: %s", pem_file, gnutls_strerror(rc));
        return -1;
    }
    return 0;
}

/* Runs the TLS engine over everything in io->cin; see the file comment. */
static void tlsio_drive(struct tlsio *io)
{
    char tmp[16384];
    int got = 0, eof = 0;
    ssize_t n;
    int rc;

    if (io->tls == TLSIO_T_HANDSHAKE) {
        for (;;) {
            rc = gnutls_handshake(io->sess);
            if (rc == GNUTLS_E_SUCCESS)
                break;
            if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED) {
                if (io->peer_eof && io->cin->len == 0)
                    tlsio_fail(io, "connection closed by peer during TLS handshake");
                return;
            }
            if (!gnutls_error_is_fatal(rc))
                continue; /* warning alert: carry on */
            tls_fail(io, rc, "handshake");
            return;
        }
        if (!io->is_server && check_pin(io) != 0)
            return;
        io->tls = TLSIO_T_READY;
        update_reading(io);
        flush_preout(io);
        if (io->closing || io->dead)
            return;
        tlsio_emit(io, TLSIO_TLSREADY);
        if (io->closing || io->dead)
            return;
    }
    if (io->tls != TLSIO_T_READY)
        return;
    for (;;) {
        size_t before = io->cin->len;

        n = gnutls_record_recv(io->sess, tmp, sizeof(tmp));
        if (n > 0) {
            buf_append(io->in, tmp, (size_t)n);
            got = 1;
            continue;
        }
        if (n == 0 || n == GNUTLS_E_PREMATURE_TERMINATION) {
            eof = 1;
            break;
        }
        if (n == GNUTLS_E_AGAIN) {
            if (gnutls_record_check_pending(io->sess) > 0)
                continue;
            /* A post-handshake message (a TLS 1.3 session ticket) also ends in EAGAIN, with
             * application data still waiting in cin behind it: go on while we progress. */
            if (io->cin->len > 0 && io->cin->len < before)
                continue;
            break;
        }
        if (n == GNUTLS_E_INTERRUPTED)
            continue;
        if (n == GNUTLS_E_REHANDSHAKE) {
            /* Renegotiation is not supported; tell the peer and carry on. */
            gnutls_alert_send(io->sess, GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION);
            continue;
        }
        if (!gnutls_error_is_fatal((int)n))
            continue;
        if (got && io->want_read)
            tlsio_emit(io, TLSIO_DATAIN);
        tls_fail(io, (int)n, "read");
        return;
    }
    if (got && io->want_read)
        tlsio_emit(io, TLSIO_DATAIN);
    if (io->closing || io->dead)
        return;
    if (eof || (io->peer_eof && io->cin->len == 0)) {
        update_reading(io);
        tlsio_emit(io, TLSIO_EOF);
    }
}

static void alloc_cb(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct tlsio *io = h->data;
    struct buf *dst = io->tls == TLSIO_T_NONE ? io->in : io->cin;

    (void)hint;
    buf_reserve(dst, TLSIO_READ_CHUNK);
    *b = uv_buf_init(dst->data + dst->len, TLSIO_READ_CHUNK);
}

static void read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct tlsio *io = s->data;
    struct buf *dst = io->tls == TLSIO_T_NONE ? io->in : io->cin;

    (void)b;
    if (io->closing || io->dead)
        return;
    if (nread == UV_EOF) {
        io->peer_eof = 1;
        if (io->tls == TLSIO_T_NONE) {
            update_reading(io);
            tlsio_emit(io, TLSIO_EOF);
        } else {
            tlsio_drive(io);
        }
        return;
    }
    if (nread < 0) {
        tlsio_fail(io, "%s", uv_strerror((int)nread));
        return;
    }
    if (nread == 0)
        return;
    /* alloc_cb handed libuv the free space after dst->len. */
    dst->len += (size_t)nread;
    dst->data[dst->len] = '\0';
    if (io->tls == TLSIO_T_NONE) {
        if (io->want_read)
            tlsio_emit(io, TLSIO_DATAIN);
    } else {
        tlsio_drive(io);
    }
}

/* The socket is read while the consumer wants input or a handshake needs it. */
static void update_reading(struct tlsio *io)
{
    int want = !io->closing && !io->dead && !io->peer_eof &&
               (io->want_read || io->tls == TLSIO_T_HANDSHAKE);

    if (want && !io->reading) {
        if (uv_read_start((uv_stream_t *)&io->tcp, alloc_cb, read_cb) == 0)
            io->reading = 1;
    } else if (!want && io->reading) {
        uv_read_stop((uv_stream_t *)&io->tcp);
        io->reading = 0;
    }
}

static void deferred_datain(uv_timer_t *t)
{
    struct tlsio *io = t->data;

    if (io->want_read && io->in->len > 0)
        tlsio_emit(io, TLSIO_DATAIN);
}

int tlsio_read_start(struct tlsio *io)
{
    if (io->closing || io->dead)
        return UV_EPIPE;
    io->want_read = 1;
    /* Accepted sockets too: a reply written in pieces must not wait for a delayed ACK. */
    uv_tcp_nodelay(&io->tcp, 1);
    update_reading(io);
    if (!io->reading && !io->peer_eof) {
        snprintf(io->err, sizeof(io->err), "cannot read from socket");
        return UV_EPIPE;
    }
    /* Plaintext decrypted while reads were stopped is announced again, from the loop. */
    if (io->in->len > 0)
        uv_timer_start(&io->timer, deferred_datain, 0, 0);
    return 0;
}

void tlsio_read_stop(struct tlsio *io)
{
    io->want_read = 0;
    update_reading(io);
}

struct buf *tlsio_input(struct tlsio *io)
{
    return io->in;
}

/* ---- Connection set-up ---- */

struct tlsio *tlsio_new(uv_loop_t *loop, tlsio_cb cb, void *arg)
{
    struct tlsio *io = xcalloc(1, sizeof(*io));

    io->loop = loop;
    io->cb = cb;
    io->arg = arg;
    io->in = buf_new(0);
    io->cin = buf_new(0);
    io->preout = buf_new(0);
    uv_tcp_init(loop, &io->tcp);
    uv_timer_init(loop, &io->timer);
    io->tcp.data = io;
    io->timer.data = io;
    io->open_handles = 2;
    return io;
}

uv_stream_t *tlsio_stream(struct tlsio *io)
{
    return (uv_stream_t *)&io->tcp;
}

static void connect_cb(uv_connect_t *req, int status)
{
    struct tlsio *io = req->data;

    if (status == UV_ECANCELED || io->closing)
        return;
    if (status < 0) {
        tlsio_fail(io, "%s", uv_strerror(status));
        return;
    }
    /* SMTP is a dialogue of short lines: do not let Nagle hold back the last one. */
    uv_tcp_nodelay(&io->tcp, 1);
    tlsio_emit(io, TLSIO_CONNECTED);
}

int tlsio_connect(struct tlsio *io, const struct sockaddr *addr)
{
    int rc;

    io->creq.data = io;
    if ((rc = uv_tcp_connect(&io->creq, &io->tcp, addr, connect_cb)) < 0)
        snprintf(io->err, sizeof(io->err), "%s", uv_strerror(rc));
    return rc;
}

static size_t hello_version(unsigned v, char *out, size_t outlen, size_t len)
{
    const char *name = v == 0x0300   ? "SSL3.0"
                       : v == 0x0301 ? "TLS1.0"
                       : v == 0x0302 ? "TLS1.1"
                       : v == 0x0303 ? "TLS1.2"
                       : v == 0x0304 ? "TLS1.3"
                                     : NULL; /* GREASE, drafts: not worth naming */
    int n;

    if (name == NULL || strstr(out, name) != NULL)
        return len;
    n = snprintf(out + len, outlen - len, "%s%s", len > 0 ? " " : "", name);
    return n > 0 && (size_t)n < outlen - len ? len + (size_t)n : len;
}

int tlsio_parse_client_hello(const unsigned char *p, size_t n, char *out, size_t outlen)
{
    size_t off = 0, len = 0, end, ext_end;
    unsigned legacy;

    if (outlen == 0)
        return -1;
    out[0] = '\0';
    /* With or without the handshake header (type 1, 24-bit length). */
    if (n >= 4 && p[0] == 1 && ((size_t)p[1] << 16 | (size_t)p[2] << 8 | p[3]) == n - 4)
        off = 4;
    if (n < off + 2 + 32 + 1)
        return -1;
    legacy = (unsigned)p[off] << 8 | p[off + 1];
    off += 2 + 32;
    off += 1 + (size_t)p[off]; /* session id */
    if (off + 2 > n)
        goto legacy_only;
    off += 2 + ((size_t)p[off] << 8 | p[off + 1]); /* cipher suites */
    if (off + 1 > n)
        goto legacy_only;
    off += 1 + (size_t)p[off]; /* compression methods */
    if (off + 2 > n)
        goto legacy_only;
    ext_end = off + 2 + ((size_t)p[off] << 8 | p[off + 1]);
    off += 2;
    if (ext_end > n)
        ext_end = n;
    while (off + 4 <= ext_end) {
        unsigned type = (unsigned)p[off] << 8 | p[off + 1];
        size_t elen = (size_t)p[off + 2] << 8 | p[off + 3];

        off += 4;
        if (off + elen > ext_end)
            break;
        if (type == 43 && elen >= 1) { /* RFC 8446 4.2.1 supported_versions */
            size_t i;

            end = off + 1 + p[off];
            if (end > off + elen)
                end = off + elen;
            for (i = off + 1; i + 2 <= end; i += 2)
                len = hello_version((unsigned)p[i] << 8 | p[i + 1], out, outlen, len);
            if (len > 0)
                return 0;
        }
        off += elen;
    }
legacy_only:
    /* No supported_versions: the client's highest version is the legacy one. */
    len = hello_version(legacy, out, outlen, len);
    if (len == 0)
        snprintf(out, outlen, "0x%04x", legacy);
    return 0;
}

static int client_hello_hook(gnutls_session_t sess, unsigned htype, unsigned when,
                             unsigned incoming, const gnutls_datum_t *msg)
{
    struct tlsio *io = gnutls_transport_get_ptr(sess);

    (void)htype;
    (void)when;
    if (incoming && msg != NULL && msg->size > 0 && io->client_versions[0] == '\0')
        tlsio_parse_client_hello(msg->data, msg->size, io->client_versions,
                                 sizeof(io->client_versions));
    return 0;
}

const char *tlsio_client_versions(const struct tlsio *io)
{
    return io->client_versions;
}

static int is_ip_literal(const char *name)
{
    unsigned char tmp[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, name, tmp) == 1 || inet_pton(AF_INET6, name, tmp) == 1;
}

static int tlsio_start_tls(struct tlsio *io, struct tlsio_cred *cred, int is_server,
                    const char *servername, int keep)
{
    int rc;

    if (io->closing || io->dead || io->tls != TLSIO_T_NONE)
        return UV_EINVAL;
    buf_reset(io->cin);
    if (keep) {
        /* The bytes behind a PROXY header are the client's first TLS records. */
        if (io->in->len > 0 && buf_append(io->cin, io->in->data, io->in->len) != 0) {
            snprintf(io->err, sizeof(io->err), "TLS set-up failed: input too large");
            return UV_EPROTO;
        }
    }
    /* RFC 3207 section 4: nothing received in cleartext may count after the handshake. */
    buf_reset(io->in);
    rc = gnutls_init(&io->sess, (is_server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NONBLOCK);
    if (rc < 0)
        goto gnutls_fail;
    if ((rc = gnutls_priority_set(io->sess, cred->prio)) < 0)
        goto deinit;
    if ((rc = gnutls_credentials_set(io->sess, GNUTLS_CRD_CERTIFICATE, cred->x509)) < 0)
        goto deinit;
    if (is_server) {
        gnutls_certificate_server_set_request(io->sess, GNUTLS_CERT_IGNORE);
    } else {
        if (servername != NULL) {
            io->servername = xstrdup(servername);
            /* RFC 6066 section 3: SNI carries host names only, never address literals. */
            if (!is_ip_literal(servername)) {
                rc = gnutls_server_name_set(io->sess, GNUTLS_NAME_DNS, servername,
                                            strlen(servername));
                if (rc < 0)
                    goto deinit;
            }
        }
        gnutls_session_set_verify_cert(io->sess, io->servername, 0);
    }
    gnutls_transport_set_ptr(io->sess, io);
    gnutls_transport_set_push_function(io->sess, tls_push);
    gnutls_transport_set_pull_function(io->sess, tls_pull);
    if (is_server) {
        io->client_versions[0] = '\0';
        gnutls_handshake_set_hook_function(io->sess, GNUTLS_HANDSHAKE_CLIENT_HELLO,
                                           GNUTLS_HOOK_PRE, client_hello_hook);
    }
    io->is_server = is_server;
    io->tls = TLSIO_T_HANDSHAKE;
    update_reading(io);
    /* The client's first flight goes out now; everything after that is driven by reads. */
    rc = gnutls_handshake(io->sess);
    if (rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED)
        return 0;
    if (rc < 0) {
        char tmp[200];
        if (rc == GNUTLS_E_PUSH_ERROR && io->push_err != 0)
            snprintf(tmp, sizeof(tmp), "%s", uv_strerror(io->push_err));
        else
            snprintf(tmp, sizeof(tmp), "TLS handshake failed: %s", gnutls_strerror(rc));
        snprintf(io->err, sizeof(io->err), "%s", tmp);
        return UV_EPROTO;
    }
    log_panic("tlsio: handshake finished without reading from the peer");
deinit:
    gnutls_deinit(io->sess);
    io->sess = NULL;
    free(io->servername);
    io->servername = NULL;
gnutls_fail:
    snprintf(io->err, sizeof(io->err), "TLS set-up failed: %s", gnutls_strerror(rc));
    return UV_EPROTO;
}

int tlsio_starttls(struct tlsio *io, struct tlsio_cred *cred, int is_server, const char *servername)
{
    return tlsio_start_tls(io, cred, is_server, servername, 0);
}

int tlsio_starttls_keep(struct tlsio *io, struct tlsio_cred *cred, int is_server,
                        const char *servername)
{
    return tlsio_start_tls(io, cred, is_server, servername, 1);
}

/* ---- Queries ---- */

int tlsio_is_tls(const struct tlsio *io)
{
    return io->tls == TLSIO_T_READY;
}

int tlsio_verify_failed(const struct tlsio *io)
{
    return io->verify_failed;
}

char *tlsio_describe(const struct tlsio *io, char *out, size_t outlen)
{
    const char *proto, *cipher;

    if (outlen == 0)
        return out;
    out[0] = '\0';
    if (io->tls != TLSIO_T_READY)
        return out;
    proto = gnutls_protocol_get_name(gnutls_protocol_get_version(io->sess));
    cipher = gnutls_cipher_get_name(gnutls_cipher_get(io->sess));
    if (proto == NULL)
        proto = "TLS";
    if (cipher == NULL)
        cipher = "unknown";
    /* GnuTLS says "TLS1.3"; mail headers and OpenSSL-trained eyes expect "TLSv1.3". */
    if (strncmp(proto, "TLS1", 4) == 0)
        snprintf(out, outlen, "TLSv%s with cipher %s", proto + 3, cipher);
    else
        snprintf(out, outlen, "%s with cipher %s", proto, cipher);
    return out;
}

const char *tlsio_errstr(const struct tlsio *io)
{
    return io->err[0] != '\0' ? io->err : "no error";
}

int tlsio_peer(const struct tlsio *io, struct sockaddr_storage *ss)
{
    int len = sizeof(*ss);

    return uv_tcp_getpeername(&io->tcp, (struct sockaddr *)ss, &len);
}

/* ---- Closing ---- */

static void handle_closed(uv_handle_t *h)
{
    struct tlsio *io = h->data;

    if (--io->open_handles > 0)
        return;
    if (io->sess != NULL)
        gnutls_deinit(io->sess);
    buf_free(io->in);
    buf_free(io->cin);
    buf_free(io->preout);
    free(io->servername);
    free(io->pins);
    if (io->closed != NULL)
        io->closed(io->closed_arg);
    free(io);
}

static void close_handles(struct tlsio *io)
{
    if (io->handles_closing)
        return;
    io->handles_closing = 1;
    uv_close((uv_handle_t *)&io->tcp, handle_closed);
    uv_close((uv_handle_t *)&io->timer, handle_closed);
}

static void shutdown_cb(uv_shutdown_t *req, int status)
{
    (void)status;
    close_handles(req->data);
}

static void flush_timeout(uv_timer_t *t)
{
    close_handles(t->data);
}

void tlsio_close(struct tlsio *io, void (*closed)(void *arg), void *arg)
{
    if (io->closing)
        return;
    io->closing = 1;
    io->closed = closed;
    io->closed_arg = arg;
    update_reading(io);
    uv_timer_stop(&io->timer);
    /* close_notify is polite but optional: our push only queues it, so this never blocks. */
    if (io->tls == TLSIO_T_READY && !io->dead)
        gnutls_bye(io->sess, GNUTLS_SHUT_WR);
    if (io->nwrites > 0) {
        /* uv_shutdown() waits for queued writes, so a final reply is not cut off. */
        io->sreq.data = io;
        if (uv_shutdown(&io->sreq, (uv_stream_t *)&io->tcp, shutdown_cb) == 0) {
            uv_timer_start(&io->timer, flush_timeout, TLSIO_CLOSE_FLUSH_MS, 0);
            return;
        }
    }
    close_handles(io);
}

/* ---- RS256 (JWT) signatures, for relayd/oauth2.c's Google service accounts ---- */

int tlsio_rs256_sign(const char *pem_key, const void *data, size_t len, unsigned char **sig,
                     size_t *siglen, char *err, size_t errlen)
{
    gnutls_datum_t key = {(unsigned char *)(uintptr_t)pem_key, (unsigned)strlen(pem_key)};
    gnutls_datum_t in = {(unsigned char *)(uintptr_t)data, (unsigned)len};
    gnutls_datum_t out = {NULL, 0};
    gnutls_privkey_t pk;
    int rc;

    *sig = NULL;
    *siglen = 0;
    if ((rc = gnutls_privkey_init(&pk)) < 0)
        goto fail;
    if ((rc = gnutls_privkey_import_x509_raw(pk, &key, GNUTLS_X509_FMT_PEM, NULL, 0)) < 0) {
        gnutls_privkey_deinit(pk);
        snprintf(err, errlen, "private key: %s", gnutls_strerror(rc));
        return -1;
    }
    if (gnutls_privkey_get_pk_algorithm(pk, NULL) != GNUTLS_PK_RSA) {
        gnutls_privkey_deinit(pk);
        snprintf(err, errlen, "private key: not an RSA key (RS256 needs one)");
        return -1;
    }
    /* RSASSA-PKCS1-v1_5 with SHA-256 (RFC 7518 3.3). */
    rc = gnutls_privkey_sign_data(pk, GNUTLS_DIG_SHA256, 0, &in, &out);
    gnutls_privkey_deinit(pk);
    if (rc < 0)
        goto fail;
    *sig = xmalloc(out.size);
    memcpy(*sig, out.data, out.size);
    *siglen = out.size;
    gnutls_free(out.data);
    return 0;
fail:
    snprintf(err, errlen, "RS256 signature: %s", gnutls_strerror(rc));
    return -1;
}
