/*
 * control - the daemon side of relayctl reload / drain / resume / daemon-status; see
 * control.h.
 *
 * Happy path (relayd/reqsrv.c does the I/O): accept -> read one line -> control_dispatch()
 * runs the hook -> one reply line -> close.
 *
 * Failure modes: a line over CONTROL_LINE_MAX gets "error: request too long"; silence for
 * CONTROL_TIMEOUT_MS closes; more than CONTROL_CONNS connections at once are closed at
 * accept.  A socket path too long for sun_path, or a live daemon on the same socket, makes
 * control_start() fail (the daemon logs it and runs on without a control channel).
 *
 * Ownership: struct control owns its reqsrv (the listener and the connections).
 */
#include "relayd/control.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/log.h"
#include "common/xalloc.h"
#include "relayd/reqsrv.h"

#define CONTROL_CONNS 8

struct control {
    struct control_hooks hooks;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    struct reqsrv *srv;
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

static int ctl_complete(const char *in, size_t len)
{
    return memchr(in, '\n', len) != NULL;
}

static void ctl_handle(void *arg, const char *req, size_t len, int too_long, struct buf *out)
{
    struct control *c = arg;
    char line[CONTROL_LINE_MAX], reply[1023];
    size_t n = (size_t)((const char *)memchr(req, '\n', len) - req);

    if (too_long) {
        buf_printf(out, "error: request too long\n");
        return;
    }
    if (n > 0 && req[n - 1] == '\r')
        n--;
    memcpy(line, req, n);
    line[n] = '\0';
    log_info("control: %s", line[0] ? line : "(empty request)");
    control_dispatch(&c->hooks, line, reply, sizeof reply);
    if (strncmp(reply, "error", 5) == 0)
        log_warn("control: %s: %s", line, reply);
    buf_printf(out, "%s\n", reply);
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
    c->hooks = *hooks;
    {
        struct reqsrv_ops ops = {ctl_complete, NULL, ctl_handle, c, "control"};
        struct reqsrv_limits lim = {CONTROL_LINE_MAX, CONTROL_TIMEOUT_MS, CONTROL_CONNS};

        c->srv = reqsrv_new(loop, 1, &ops, &lim);
    }
    if ((rc = uv_pipe_bind((uv_pipe_t *)reqsrv_listener(c->srv), c->path)) != 0 ||
        (rc = chmod(c->path, 0600) != 0 ? uv_translate_sys_error(errno) : 0) != 0 ||
        (rc = reqsrv_listen(c->srv, 8)) != 0) {
        snprintf(err, errlen, "control socket %s: %s", c->path, uv_strerror(rc));
        unlink(c->path);
        reqsrv_stop(c->srv);
        free(c);
        return rc;
    }
    log_info("control: listening on %s", c->path);
    *out = c;
    return 0;
}

void control_stop(struct control *c)
{
    if (c == NULL)
        return;
    unlink(c->path);
    reqsrv_stop(c->srv); /* freed once its handles are closed */
    free(c);
}
