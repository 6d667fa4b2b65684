/*
 * control - the operator's channel into the running daemon: a unix stream socket
 * CONTROL_SOCKET in the spool directory (mode 0600: whoever may write the spool may steer
 * the daemon), used by relayctl reload, drain, resume and daemon-status
 * (relayd/ctl/ctl_control.c).
 *
 * Protocol: one request line ("reload\n"), one reply line, then the daemon closes:
 *   "ok WORDS"      the command was done (WORDS say what)
 *   "error: WHY"    it was not (an invalid configuration: "relayd.conf:14: ...")
 * Requests are bounded (CONTROL_LINE_MAX bytes, CONTROL_TIMEOUT_MS of silence closes).
 *
 * The socket is created at start (a stale one left by a crash is replaced; one a live
 * daemon answers on is left alone, and this daemon runs without a control channel) and
 * removed at stop.
 *
 * Errors: control_start() returns a negative UV_E* with text in err.  Ownership:
 * control_start() allocates; control_stop() closes every handle and removes the socket;
 * the server frees itself once its handles are closed (before uv_run() returns).
 */
#ifndef RELAYD_CONTROL_H
#define RELAYD_CONTROL_H

#include <stddef.h>
#include <uv.h>

#define CONTROL_SOCKET "control.sock"
#define CONTROL_LINE_MAX 256
#define CONTROL_TIMEOUT_MS 10000

struct control;

struct control_hooks {
    /* Re-reads the configuration: 0, or -1 with the reason (file:line) in err. */
    int (*reload)(void *arg, char *err, size_t errlen);
    /* accepting 0: drain (new connections get 421); 1: accept again. */
    void (*set_accepting)(void *arg, int accepting);
    /* One line of state: "accepting" or "draining", queue counts. */
    void (*status)(void *arg, char *out, size_t outlen);
    void *arg;
};

/* Listens on spool_dir/CONTROL_SOCKET; hooks are copied. */
int control_start(uv_loop_t *loop, const char *spool_dir, const struct control_hooks *hooks,
                  struct control **out, char *err, size_t errlen);
/* Stops listening, removes the socket, closes connections; NULL is fine. */
void control_stop(struct control *c);

/* The reply to one request line (without its line end), by the hooks; pure but for them. */
void control_dispatch(const struct control_hooks *hooks, const char *line, char *reply,
                      size_t replylen);

#endif
