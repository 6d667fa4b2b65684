/*
 * ctl_control - relayctl's side of the control channel; see ctl_control.h and
 * relayd/control.h.
 *
 * The reply decides the exit code: "ok ..." is CTL_EXIT_OK, "error: ..." (an invalid
 * configuration with its file:line) CTL_EXIT_FAIL, and so is a daemon that does not answer
 * (not running, or the socket is not there).
 */
#include "relayd/ctl/ctl_control.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "relayd/control.h"

int ctl_control_request(const char *spool_dir, const char *request, char *reply, size_t replylen,
                        char *err, size_t errlen)
{
    struct sockaddr_un sa;
    struct timeval tv = {CTL_CONTROL_TIMEOUT, 0};
    char line[CONTROL_LINE_MAX];
    size_t len = 0;
    ssize_t n;
    int fd, rc = -1;

    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    n = snprintf(sa.sun_path, sizeof sa.sun_path, "%s/%s", spool_dir, CONTROL_SOCKET);
    if (n < 0 || (size_t)n >= sizeof sa.sun_path) {
        snprintf(err, errlen, "%s/%s: path too long for a unix socket", spool_dir, CONTROL_SOCKET);
        return -1;
    }
    if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        if (errno == ENOENT || errno == ECONNREFUSED)
            snprintf(err, errlen, "no relayd is running on spool %s (%s: %s)", spool_dir,
                     sa.sun_path, strerror(errno));
        else
            snprintf(err, errlen, "%s: %s", sa.sun_path, strerror(errno));
        goto close_fd;
    }
    snprintf(line, sizeof line, "%s\n", request);
    /* EINTR: a socket with SO_RCVTIMEO/SO_SNDTIMEO is not restarted after a stop signal
     * and SIGCONT (Ctrl-Z, fg while a reload runs); try again rather than fail. */
    while ((n = write(fd, line, strlen(line))) < 0 && errno == EINTR)
        ;
    if (n != (ssize_t)strlen(line)) {
        snprintf(err, errlen, "%s: write: %s", sa.sun_path, n < 0 ? strerror(errno) : "short");
        goto close_fd;
    }
    while (len + 1 < replylen) {
        n = read(fd, reply + len, replylen - 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
        if (memchr(reply, '\n', len) != NULL)
            break;
    }
    reply[len] = '\0';
    if (n < 0 || len == 0) {
        if (n < 0 && errno == EAGAIN)
            snprintf(err, errlen, "%s: no reply within %d s", sa.sun_path, CTL_CONTROL_TIMEOUT);
        else
            snprintf(err, errlen, "%s: %s", sa.sun_path,
                     n < 0 ? strerror(errno) : "relayd closed the connection without a reply");
        goto close_fd;
    }
    reply[strcspn(reply, "\r\n")] = '\0';
    /* The reply goes to the operator's terminal, often root's: no escape sequences from
     * whatever answers on a socket in a directory the run user owns. */
    for (char *p = reply; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7F)
            *p = ' ';
    rc = 0;
close_fd:
    close(fd);
    return rc;
}

int ctl_control_cmd(struct ctl *c, int argc, char **argv)
{
    const char *request = strcmp(c->cmd, "daemon-status") == 0 ? "status" : c->cmd;
    char reply[1024], err[512];

    (void)argv;
    if (argc != 0) {
        fprintf(stderr, "%s: %s takes no arguments\n", c->prog, c->cmd);
        return CTL_EXIT_USAGE;
    }
    if (ctl_control_request(c->spool_dir, request, reply, sizeof reply, err, sizeof err) != 0) {
        fprintf(stderr, "%s: %s: %s\n", c->prog, c->cmd, err);
        return CTL_EXIT_FAIL;
    }
    if (strncmp(reply, "ok", 2) != 0) {
        fprintf(stderr, "%s: %s: %s\n", c->prog, c->cmd,
                strncmp(reply, "error: ", 7) == 0 ? reply + 7 : reply);
        return CTL_EXIT_FAIL;
    }
    if (strcmp(request, "reload") == 0)
        printf("relayd: configuration reloaded\n");
    else if (strcmp(request, "drain") == 0)
        printf("relayd: draining: new connections get 421; queued mail is still delivered "
               "(relayctl resume to accept again)\n");
    else if (strcmp(request, "resume") == 0)
        printf("relayd: accepting mail\n");
    else
        printf("relayd: %s\n", reply[2] == ' ' ? reply + 3 : reply + 2);
    return CTL_EXIT_OK;
}
