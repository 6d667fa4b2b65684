/*
 * ctl - what relayctl's commands share: exit codes, the command context, the spool.
 *
 * relayctl is its own program (relayd/ctl/, like Postfix's postqueue and OpenSMTPD's
 * smtpctl): the daemon library holds no CLI code; relayctl links the daemon library only
 * for the spool, the configuration and the pieces test-upstream and the OAuth 2.0
 * commands drive (smtpc, oauth2).  Its commands are one table in relayctl.c:
 * {name, handler, spool access}.  A handler with CTL_SPOOL_READ or CTL_SPOOL_WRITE finds
 * the spool directory resolved in c->spool_dir and opens the spool with ctl_spool()
 * (lazily, after its own argument checks, so a usage error stays a usage error); one with
 * CTL_SPOOL_NONE loads c->config_path itself.
 *
 * Errors: handlers print "relayctl: CMD ARG: why" to stderr themselves and return an exit
 * code below.  Output goes to stdout; relayctl's main() flushes it and turns a failed write
 * into CTL_EXIT_FAIL.
 */
#ifndef RELAYD_CTL_H
#define RELAYD_CTL_H

#include "spool/spool.h"

/* relayctl's exit codes (man/relayctl.8). */
#define CTL_EXIT_OK 0 /* success; test-upstream: the upstream works */
#define CTL_EXIT_FAIL                                                                              \
    1                    /* operational error: no such message, spool or config unusable,          \
                          * the operator said no, the upstream or test message failed */
#define CTL_EXIT_USAGE 2 /* usage error */

#define CTL_DEFAULT_CONFIG "/etc/relayd/relayd.conf"

/* What a command does to the spool: relayctl opens it read-only for CTL_SPOOL_READ. */
enum ctl_spool_access { CTL_SPOOL_NONE, CTL_SPOOL_READ, CTL_SPOOL_WRITE };

struct ctl {
    const char *prog;        /* "relayctl", the prefix of every error line */
    const char *cmd;         /* the command's name */
    const char *config_path; /* -c FILE or CTL_DEFAULT_CONFIG */
    const char *spool_dir;   /* CTL_SPOOL_READ/WRITE: resolved before the handler runs */
    enum ctl_spool_access access;
    struct spool *sp; /* opened by ctl_spool(), closed by main() */
};

/* A command: argv holds its arguments (without its name).  Returns an exit code. */
typedef int (*ctl_handler)(struct ctl *c, int argc, char **argv);

/* Opens c->spool_dir as c->access says (once; later calls return the same spool).  NULL
 * after printing why to stderr. */
struct spool *ctl_spool(struct ctl *c);

/* Handlers outside relayctl.c. */
int ctl_diag_test_upstream_cmd(struct ctl *c, int argc, char **argv); /* ctl_diag.c */
int ctl_diag_send_test_cmd(struct ctl *c, int argc, char **argv);     /* ctl_diag.c */
int ctl_oauth2_cmd(struct ctl *c, int argc, char **argv);             /* ctl_oauth2.c */

#endif
