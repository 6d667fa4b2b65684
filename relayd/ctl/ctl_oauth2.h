/*
 * ctl_oauth2 - relayctl's OAuth 2.0 commands (oauth2 authorize|token, dispatched through
 * ctl_oauth2_cmd() in ctl.h) and the token step of test-upstream.
 *
 * Errors: exit codes of ctl.h; the probe returns 0 or -1 with the step's line in text.
 */
#ifndef RELAYD_CTL_OAUTH2_H
#define RELAYD_CTL_OAUTH2_H

#include <stddef.h>
#include <uv.h>

#include "config/cfg.h"
#include "relayd/oauth2.h"

/*
 * For relayctl test-upstream: creates a manager on loop (the caller hands it to
 * smtpc_probe(), which takes the token from it), runs the loop until up has a token or
 * the attempt failed, and puts the step's line in text ("oauth2: token ok (grant
 * client_credentials, XOAUTH2 as a@b, expires in 3599 s)" or the reason).  0 or -1; either
 * way *out must later get oauth2_stop() (then run the loop) and oauth2_free().
 */
int ctl_oauth2_probe_token(uv_loop_t *loop, const struct cfg *cfg, const struct cfg_upstream *up,
                           struct oauth2 **out, char *text, size_t textlen);

#endif
