/*
 * privdrop - least privilege; see privdrop.h.
 */
#include "relayd/privdrop.h"

#include <errno.h>
#include <ftw.h>
#include <grp.h>
#include <libgen.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/log.h"

enum privdrop_action privdrop_decide(const struct privdrop_in *in, char *why, size_t whylen)
{
    if (whylen > 0)
        why[0] = '\0';
    if (in->euid != 0)
        return PRIVDROP_AS_IS;
    if (in->run_as_root) {
        snprintf(why, whylen, "running as root: run_as_root = yes");
        return PRIVDROP_STAY_ROOT;
    }
    /* The built-in configuration listens on loopback only: a first trial from the source
     * tree (README's quick start) on a machine that has no relayd user yet. */
    if (in->builtin_config) {
        snprintf(why, whylen,
                 "running as root with the built-in configuration (no -c); a configuration "
                 "file makes relayd drop to its user (default relayd)");
        return PRIVDROP_STAY_ROOT;
    }
    if (in->user == NULL || in->user[0] == '\0' || !in->user_found) {
        snprintf(why, whylen,
                 "started as root, but user %s does not exist: create it (adduser --system "
                 "--group %s), set user = to another account, or set run_as_root = yes",
                 in->user != NULL && in->user[0] != '\0' ? in->user : "(empty)",
                 in->user != NULL && in->user[0] != '\0' ? in->user : "relayd");
        return PRIVDROP_REFUSE;
    }
    if (in->user_uid == 0) {
        snprintf(why, whylen,
                 "user = %s is root: relayd does not serve clients as root unless "
                 "run_as_root = yes says so",
                 in->user);
        return PRIVDROP_REFUSE;
    }
    if (!in->group_found) {
        snprintf(why, whylen, "started as root, but group %s does not exist", in->group);
        return PRIVDROP_REFUSE;
    }
    return PRIVDROP_DROP;
}

int privdrop_plan(const struct cfg *cfg, int builtin_config, struct privdrop *pd, char *err,
                  size_t errlen)
{
    struct privdrop_in in;
    struct passwd *pw = NULL;
    struct group *gr = NULL;

    memset(pd, 0, sizeof *pd);
    memset(&in, 0, sizeof in);
    in.euid = geteuid();
    in.builtin_config = builtin_config;
    in.run_as_root = cfg->run_as_root;
    in.user = cfg->user;
    in.group = cfg->group;
    in.group_found = 1;
    if (in.euid == 0 && cfg->user != NULL && cfg->user[0] != '\0') {
        pw = getpwnam(cfg->user);
        in.user_found = pw != NULL;
        if (pw != NULL) {
            in.user_uid = pw->pw_uid;
            pd->uid = pw->pw_uid;
            pd->gid = pw->pw_gid;
        }
    }
    if (in.euid == 0 && cfg->group != NULL) {
        gr = getgrnam(cfg->group);
        in.group_found = gr != NULL;
        if (gr != NULL)
            pd->gid = gr->gr_gid;
    }
    snprintf(pd->user, sizeof pd->user, "%s", cfg->user != NULL ? cfg->user : "");
    pd->action = privdrop_decide(&in, pd->why, sizeof pd->why);
    if (pd->action == PRIVDROP_REFUSE) {
        snprintf(err, errlen, "%s", pd->why);
        return -1;
    }
    return 0;
}

enum privdrop_chown privdrop_chown_decide(const struct stat *st, uid_t uid)
{
    if (st->st_uid == uid)
        return PRIVDROP_CHOWN_SKIP;
    if (S_ISREG(st->st_mode) && st->st_nlink > 1)
        return PRIVDROP_CHOWN_REFUSE;
    return PRIVDROP_CHOWN_DO;
}

/* nftw() has no user argument: the owner the spool's files get. */
static uid_t chown_uid;
static gid_t chown_gid;
static int chown_errno;
static char chown_path[512];

static int chown_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)flag;
    (void)ftw;
    switch (privdrop_chown_decide(st, chown_uid)) {
    case PRIVDROP_CHOWN_SKIP:
        return 0;
    case PRIVDROP_CHOWN_REFUSE:
        chown_errno = EMLINK;
        snprintf(chown_path, sizeof chown_path, "%s (a hard link; remove it)", path);
        return 1;
    case PRIVDROP_CHOWN_DO:
        break;
    }
    /* lchown: a symbolic link in the spool is followed by nobody, least of all root. */
    if (lchown(path, chown_uid, chown_gid) != 0) {
        chown_errno = errno;
        snprintf(chown_path, sizeof chown_path, "%s", path);
        return 1;
    }
    return 0;
}

/* A file the run user reads again later (SIGHUP, a refresh, each AUTH): say now, with the
 * command that fixes it, rather than at the first reload. */
static void check_readable(const char *what, const char *path, const struct privdrop *pd)
{
    if (path == NULL || access(path, R_OK) == 0)
        return;
    log_warn("privdrop: %s %s is not readable by user %s (%s): relayd reads it again later "
             "(SIGHUP reload); fix: chown %s %s (keep it chmod 600)",
             what, path, pd->user, strerror(errno), pd->user, path);
}

static void check_files(const struct privdrop *pd, const struct cfg *cfg)
{
    char dir[4096];
    int i;

    for (i = 0; i < cfg->nlisteners; i++) {
        const struct cfg_listener *l = &cfg->listeners[i];

        check_readable("listener certificate", l->cert, pd);
        check_readable("listener key", l->key, pd);
        if (l->auth == CFG_AUTH_OPTIONAL || l->auth == CFG_AUTH_REQUIRED)
            check_readable("sasldb", l->sasldb, pd);
    }
    for (i = 0; i < cfg->nupstreams; i++) {
        const struct cfg_upstream *u = &cfg->upstreams[i];

        check_readable("password_file", u->password_file, pd);
        check_readable("client_secret_file", u->client_secret_file, pd);
        check_readable("service_account_file", u->service_account_file, pd);
        check_readable("ca_file", u->ca_file, pd);
        check_readable("oauth2_ca_file", u->oauth2_ca_file, pd);
        if (u->refresh_token_file == NULL)
            continue;
        check_readable("refresh_token_file", u->refresh_token_file, pd);
        /* A rotated refresh token is written next to the old one and renamed over it. */
        snprintf(dir, sizeof dir, "%s", u->refresh_token_file);
        if (access(dirname(dir), W_OK) != 0)
            log_warn("privdrop: directory %s of refresh_token_file is not writable by user "
                     "%s (%s): a rotated token cannot be saved; fix: chown %s %s (or keep the "
                     "token under /var/lib/relayd)",
                     dir, pd->user, strerror(errno), pd->user, dir);
    }
}

int privdrop_apply(const struct privdrop *pd, const struct cfg *cfg, char *err, size_t errlen)
{
    gid_t gid = pd->gid;

    switch (pd->action) {
    case PRIVDROP_AS_IS:
        log_info("running as uid %ld gid %ld (not started as root: nothing to drop)",
                 (long)getuid(), (long)getgid());
        return 0;
    case PRIVDROP_STAY_ROOT:
        log_warn("%s", pd->why);
        return 0;
    case PRIVDROP_REFUSE:
        snprintf(err, errlen, "%s", pd->why);
        return -1;
    case PRIVDROP_DROP:
        break;
    }

    /* The spool first: LMDB's files, opened by root now, are opened again by relayctl and
     * by the next start as the run user; the control socket, bound by root just before, is
     * for relayctl run as that user too.  Entries it owns already keep their group (an
     * operator group set by hand); the walk stays on the spool's file system. */
    chown_uid = pd->uid;
    chown_gid = pd->gid;
    chown_errno = 0;
    if (nftw(cfg->spool_dir, chown_one, 16, FTW_PHYS | FTW_MOUNT) != 0) {
        snprintf(err, errlen, "spool %s: cannot give %s to user %s: %s", cfg->spool_dir,
                 chown_errno != 0 ? chown_path : cfg->spool_dir, pd->user,
                 strerror(chown_errno != 0 ? chown_errno : errno));
        return -1;
    }
    /* The user's supplementary groups from /etc/group (e.g. sasl, for /etc/sasldb2), never
     * root's. */
    if (initgroups(pd->user, gid) != 0 || setgid(pd->gid) != 0 || setuid(pd->uid) != 0) {
        snprintf(err, errlen, "cannot become user %s (uid %ld gid %ld): %s", pd->user,
                 (long)pd->uid, (long)pd->gid, strerror(errno));
        return -1;
    }
    /* Verify it took: no way back to root, and no capability left. */
    if (setuid(0) == 0 || geteuid() != pd->uid || getegid() != pd->gid) {
        snprintf(err, errlen, "privileges were not dropped (setuid(0) still works)");
        return -1;
    }
    log_info("privileges dropped: user=%s uid=%ld gid=%ld", pd->user, (long)pd->uid, (long)pd->gid);
    check_files(pd, cfg);
    return 0;
}
