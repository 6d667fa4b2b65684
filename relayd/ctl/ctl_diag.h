/*
 * ctl_diag - relayctl's diagnosis commands: test-upstream (a real "Test Connection" button)
 * and send-test (a test message through relayd's normal path).
 *
 * test-upstream runs smtpc_probe() on a private libuv loop in the relayctl process: it
 * connects, EHLOs, starts TLS, verifies the certificate, authenticates and quits, and
 * prints one line per step ("[ ok ] ..." / "[FAIL] ...") and a plain verdict line, plus
 * what to do about a failure.  No mail is sent and the spool is not touched.
 *
 * send-test submits a short message over SMTP to relayd's first listener (from the same
 * configuration), prints the queue id from the 250 reply, then watches the spool
 * (read-only) until the message is delivered, deferred, held or failed, or the wait ends.
 *
 * Errors: the functions return relayctl exit codes (ctl.h): CTL_EXIT_OK the upstream works /
 * the message was delivered, CTL_EXIT_FAIL it does not / was not (the reason is printed),
 * CTL_EXIT_USAGE usage error.  relayctl runs them through ctl_diag_*_cmd() (ctl.h).
 * Output goes to out; nothing here logs through log_*() except smtpc itself.
 */
#ifndef RELAYD_CTL_DIAG_H
#define RELAYD_CTL_DIAG_H

#include <stdio.h>

#include "config/cfg.h"

/* relayctl test-upstream NAME. */
int ctl_diag_test_upstream(const struct cfg *cfg, const char *name, FILE *out);

/* relayctl send-test NAME --to ADDR, from the default sender (the upstream's username when
 * it is an address, else postmaster@hostname), waiting up to 30 seconds. */
int ctl_diag_send_test(const struct cfg *cfg, const char *name, const char *to, FILE *out);

/* The same with the sender (NULL: default) and the wait in seconds (0: do not wait). */
int ctl_diag_send_test_ex(const struct cfg *cfg, const char *name, const char *to, const char *from,
                          int wait_secs, FILE *out);

#endif
