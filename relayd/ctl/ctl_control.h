/*
 * ctl_control - relayctl reload, drain, resume and daemon-status: one request line to the
 * running daemon's control socket (spool/control.sock, relayd/control.h), one reply line.
 */
#ifndef RELAYD_CTL_CONTROL_H
#define RELAYD_CTL_CONTROL_H

#include <stddef.h>

#include "relayd/ctl/ctl.h"

/* Seconds relayctl waits for the daemon's reply (a reload reads files and certificates). */
#define CTL_CONTROL_TIMEOUT 30

/* Sends request (one word) to the daemon on spool_dir; its reply line (without the line
 * end) in reply.  0, or -1 with why in err ("no relayd is running on SPOOL"). */
int ctl_control_request(const char *spool_dir, const char *request, char *reply, size_t replylen,
                        char *err, size_t errlen);

int ctl_control_cmd(struct ctl *c, int argc,
                    char **argv); /* reload, drain, resume, daemon-status */

#endif
