/*
 * sdnotify - systemd's readiness protocol without libsystemd: one datagram of
 * "KEY=value\n..." text to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or '@' for
 * the abstract namespace).  Without $NOTIFY_SOCKET (not under systemd Type=notify) every
 * call does nothing.
 *
 * relayd sends READY=1 once every listener listens, the spool is open and privileges are
 * dropped; RELOADING=1 and READY=1 around a SIGHUP reload; STOPPING=1 when a stop begins.
 *
 * Errors: 1 sent, 0 no socket configured, a negative errno when sending failed (the caller
 * may log it; systemd then times the start out, which is what should happen).
 */
#ifndef COMMON_SDNOTIFY_H
#define COMMON_SDNOTIFY_H

/* Sends state (e.g. "READY=1\nSTATUS=accepting mail") to $NOTIFY_SOCKET. */
int sdnotify(const char *state);

#endif
