/*
 * control - the daemon side of relayctl reload / drain / resume / daemon-status; see
 * control.h.
 *
 * Happy path: accept -> read one line -> control_dispatch() runs the hook -> one reply
 * line -> close.
 *
 * Failure modes: a line over CONTROL_LINE_MAX gets "error: request too long"; silence for
 * CONTROL_TIMEOUT_MS closes; more than CONTROL_CONNS connections at once are closed at
 * accept.  A socket path too long for sun_path, or a live daemon on the same socket, makes
 * control_start() fail (the daemon logs it and runs on without a control channel).
 *
 * Ownership: the server owns its connections (a list); a connection is freed from the
 * close callback of its last handle, the server once its listener and every connection
 * are closed.
 */
#include "relayd/control.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/log.h"
#include "common/xalloc.h"

#define CONTROL_CONNS 8

struct ctl_conn {
    LIST_ENTRY(ctl_conn) link;
    struct control *srv;
    uv_pipe_t pipe;
    uv_timer_t timer;
    uv_write_t wr;
    char in[CONTROL_LINE_MAX];
    size_t inlen;
    char out[1024];
    int handles;
    int closing;
};

struct control {
    uv_loop_t *loop;
    struct control_hooks hooks;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    uv_pipe_t listener;
    LIST_HEAD(, ctl_conn) conns;
    int nconns;
    int open;
    int stopping;
};

void control_dispatch(const struct control_hooks *h, const char *line, char *reply, size_t replylen)
{
    char err[900];

    if (strcmp(line, "reload") == 0) {
        err[0] = '\0';
        if (h->reload == NULL)
            snprintf(reply, replylen, "error: reload is not available");
        else if (h->reload(h->arg, err, sizeof err) != 0)
            snprintf(reply, replylen, "error: %s", err[0] ? err : "reload failed");
        else
            snprintf(reply, replylen, "ok configuration reloaded");
    } else if (strcmp(line, "drain") == 0 || strcmp(line, "resume") == 0) {
        int on = line[0] == 'r';

        if (h->set_accepting != NULL)
            h->set_accepting(h->arg, on);
        snprintf(reply, replylen, "ok %s", on ? "accepting mail" : "draining");
    } else if (strcmp(line, "status") == 0) {
        char st[900] = "";

        if (h->status != NULL)
            h->status(h->arg, st, sizeof st);
        snprintf(reply, replylen, "ok %s", st);
    } else {
        snprintf(reply, replylen, "error: unknown command (reload, drain, resume, status)");
    }
}

static void ctl_maybe_free(struct control *c)
{
    if (c->stopping && c->open == 0)
        free(c);
}

static void ctl_on_listener_closed(uv_handle_t *h)
{
    struct control *c = h->data;

    c->open--;
    ctl_maybe_free(c);
}

static void ctl_conn_on_closed(uv_handle_t *h)
{
    struct ctl_conn *cc = h->data;
    struct control *c = cc->srv;

    if (--cc->handles > 0)
        return;
    LIST_REMOVE(cc, link);
    c->nconns--;
    free(cc);
    c->open--;
    ctl_maybe_free(c);
}

static void ctl_conn_close(struct ctl_conn *cc)
{
    if (cc->closing)
        return;
    cc->closing = 1;
    uv_timer_stop(&cc->timer);
    uv_close((uv_handle_t *)&cc->timer, ctl_conn_on_closed);
    uv_close((uv_handle_t *)&cc->pipe, ctl_conn_on_closed);
}

static void ctl_on_written(uv_write_t *wr, int status)
{
    (void)status;
    ctl_conn_close(wr->data);
}

static void ctl_reply(struct ctl_conn *cc, const char *line)
{
    uv_buf_t b;
    int n;

    uv_read_stop((uv_stream_t *)&cc->pipe);
    n = snprintf(cc->out, sizeof cc->out, "%s\n", line);
    if (n < 0 || (size_t)n >= sizeof cc->out) {
        cc->out[sizeof cc->out - 2] = '\n';
        n = (int)sizeof cc->out - 1;
    }
    b = uv_buf_init(cc->out, (unsigned)n);
    cc->wr.data = cc;
    if (uv_write(&cc->wr, (uv_stream_t *)&cc->pipe, &b, 1, ctl_on_written) != 0)
        ctl_conn_close(cc);
}

static void ctl_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct ctl_conn *cc = h->data;

    (void)hint;
    *b = uv_buf_init(cc->in + cc->inlen, (unsigned)(sizeof cc->in - cc->inlen));
}

static void ctl_on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct ctl_conn *cc = st->data;
    char *nl, reply[sizeof cc->out - 1];

    (void)b;
    if (n < 0) {
        ctl_conn_close(cc);
        return;
    }
    cc->inlen += (size_t)n;
    nl = memchr(cc->in, '\n', cc->inlen);
    if (nl == NULL) {
        if (cc->inlen == sizeof cc->in)
            ctl_reply(cc, "error: request too long");
        return;
    }
    *nl = '\0';
    if (nl > cc->in && nl[-1] == '\r')
        nl[-1] = '\0';
    log_info("control: %s", cc->in[0] ? cc->in : "(empty request)");
    control_dispatch(&cc->srv->hooks, cc->in, reply, sizeof reply);
    if (strncmp(reply, "error", 5) == 0)
        log_warn("control: %s: %s", cc->in, reply);
    ctl_reply(cc, reply);
}

static void ctl_on_timeout(uv_timer_t *t)
{
    ctl_conn_close(t->data);
}

static void ctl_on_connection(uv_stream_t *server, int status)
{
    struct control *c = server->data;
    struct ctl_conn *cc;

    if (status < 0) {
        log_warn("control: accept: %s", uv_strerror(status));
        return;
    }
    cc = xcalloc(1, sizeof(*cc));
    cc->srv = c;
    uv_pipe_init(c->loop, &cc->pipe, 0);
    uv_timer_init(c->loop, &cc->timer);
    cc->pipe.data = cc->timer.data = cc;
    cc->handles = 2;
    LIST_INSERT_HEAD(&c->conns, cc, link);
    c->nconns++;
    c->open++;
    if (uv_accept(server, (uv_stream_t *)&cc->pipe) != 0 || c->nconns > CONTROL_CONNS) {
        ctl_conn_close(cc);
        return;
    }
    uv_timer_start(&cc->timer, ctl_on_timeout, CONTROL_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&cc->pipe, ctl_alloc, ctl_on_read);
}

/* 1 when a daemon answers on path (leave it alone), 0 when nobody does (stale). */
static int ctl_socket_live(const char *path)
{
    struct sockaddr_un sa;
    int fd, live;

    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    snprintf(sa.sun_path, sizeof sa.sun_path, "%s", path);
    /* Non-blocking: a live daemon with a full backlog answers EAGAIN at once, where a
     * blocking connect() would hold this start until it accepted. */
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0)) < 0)
        return 0;
    live = connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0 || errno == EAGAIN;
    close(fd);
    return live;
}

int control_start(uv_loop_t *loop, const char *spool_dir, const struct control_hooks *hooks,
                  struct control **out, char *err, size_t errlen)
{
    struct control *c;
    int rc, n;

    *out = NULL;
    c = xcalloc(1, sizeof(*c));
    n = snprintf(c->path, sizeof c->path, "%s/%s", spool_dir, CONTROL_SOCKET);
    if (n < 0 || (size_t)n >= sizeof c->path) {
        snprintf(err, errlen, "control socket %s/%s: path too long for a unix socket", spool_dir,
                 CONTROL_SOCKET);
        free(c);
        return UV_ENAMETOOLONG;
    }
    if (ctl_socket_live(c->path)) {
        snprintf(err, errlen,
                 "control socket %s: another relayd answers on it (two daemons "
                 "on one spool?)",
                 c->path);
        free(c);
        return UV_EADDRINUSE;
    }
    if (unlink(c->path) == 0)
        log_info("control: removed the stale socket %s (left by a crash)", c->path);
    c->loop = loop;
    c->hooks = *hooks;
    LIST_INIT(&c->conns);
    uv_pipe_init(loop, &c->listener, 0);
    c->listener.data = c;
    c->open = 1;
    if ((rc = uv_pipe_bind(&c->listener, c->path)) != 0 ||
        (rc = chmod(c->path, 0600) != 0 ? uv_translate_sys_error(errno) : 0) != 0 ||
        (rc = uv_listen((uv_stream_t *)&c->listener, 8, ctl_on_connection)) != 0) {
        snprintf(err, errlen, "control socket %s: %s", c->path, uv_strerror(rc));
        unlink(c->path);
        c->stopping = 1;
        uv_close((uv_handle_t *)&c->listener, ctl_on_listener_closed);
        return rc;
    }
    log_info("control: listening on %s", c->path);
    *out = c;
    return 0;
}

void control_stop(struct control *c)
{
    struct ctl_conn *cc;

    if (c == NULL || c->stopping)
        return;
    c->stopping = 1;
    unlink(c->path);
    LIST_FOREACH(cc, &c->conns, link)
    ctl_conn_close(cc);
    uv_close((uv_handle_t *)&c->listener, ctl_on_listener_closed);
}
