/*
 * privdrop - least privilege: started as root, relayd binds its listeners, opens the spool
 * and reads its secrets, then becomes [relayd] user:group before it serves any client.
 *
 * The decision is the pure privdrop_decide() (table-tested): who we are, what the
 * configuration says and whether the user exists -> run as is, drop, stay root, or refuse.
 * privdrop_plan() makes it at start (before anything is opened, so a refusal leaves
 * nothing behind); privdrop_apply() carries it out once the listeners listen and the spool
 * is open, before the loop runs: the spool is chowned to the user (a spool that root
 * created earlier keeps working; privdrop_chown_decide() says which entries), then
 * initgroups/setgid/setuid; after setuid from root every capability is gone (no
 * SECBIT_KEEP_CAPS), and setuid(0) must fail or we die.
 *
 * Errors: a refusal or a failed drop is the caller's log_fatal() with the text in err;
 * files the run user will not be able to read again (SIGHUP) are warnings naming the exact
 * chown/chmod to run.
 */
#ifndef RELAYD_PRIVDROP_H
#define RELAYD_PRIVDROP_H

#include <stddef.h>
#include <sys/stat.h>
#include <sys/types.h>

#include "config/cfg.h"

enum privdrop_action {
    PRIVDROP_AS_IS,     /* not started as root: nothing to drop (systemd User=, a developer) */
    PRIVDROP_DROP,      /* root: become user:group after the set-up */
    PRIVDROP_STAY_ROOT, /* root, and told to stay so (run_as_root, built-in configuration) */
    PRIVDROP_REFUSE,    /* root, with nowhere safe to go: why says what to change */
};

/* What privdrop_decide() looks at; filled by privdrop_plan() from the process and cfg. */
struct privdrop_in {
    uid_t euid;
    int builtin_config; /* no -c: the loopback trial configuration */
    int run_as_root;    /* [relayd] run_as_root */
    const char *user;   /* [relayd] user */
    const char *group;  /* [relayd] group or NULL */
    int user_found;     /* getpwnam(user) found it */
    uid_t user_uid;
    int group_found; /* group == NULL, or getgrnam(group) found it */
};

/* The action; why (for REFUSE and STAY_ROOT) gets one line for the log. */
enum privdrop_action privdrop_decide(const struct privdrop_in *in, char *why, size_t whylen);

/* What privdrop_plan() decided and needs later.  No pointers into anything. */
struct privdrop {
    enum privdrop_action action;
    uid_t uid;
    gid_t gid;
    char user[64];
    char why[256];
};

/* Looks the user and group up and decides; -1 with err for REFUSE (the caller exits). */
int privdrop_plan(const struct cfg *cfg, int builtin_config, struct privdrop *pd, char *err,
                  size_t errlen);
/* What privdrop_apply() does with one entry of the spool (pure, table-tested): an entry the
 * run user owns already is left alone (its group too: README's operator group), and so is a
 * symbolic link's target; a regular file with more than one hard link is refused (a link
 * planted in the spool to a file elsewhere must not be given away by root); anything else is
 * chowned to uid:gid. */
enum privdrop_chown { PRIVDROP_CHOWN_SKIP, PRIVDROP_CHOWN_DO, PRIVDROP_CHOWN_REFUSE };
enum privdrop_chown privdrop_chown_decide(const struct stat *st, uid_t uid);
/* Carries the plan out (see above); 0, or -1 with err.  Logs one line saying what it did. */
int privdrop_apply(const struct privdrop *pd, const struct cfg *cfg, char *err, size_t errlen);

#endif
