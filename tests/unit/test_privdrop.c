/* Unit tests for relayd/privdrop.c: who relayd becomes, decided from who started it and
 * what the configuration says. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <string.h>
#include <sys/stat.h>

#include "relayd/privdrop.h"

/* Every combination that matters: not root, root told to stay, root with the built-in
 * configuration, a missing user or group, user = root, and the normal drop. */
Test(privdrop, decide)
{
    static const struct {
        const char *label;
        struct privdrop_in in;
        enum privdrop_action want;
        const char *want_why; /* substring of why, or NULL */
    } cases[] = {
        {"unprivileged start", {1000, 0, 0, "relayd", NULL, 0, 0, 1}, PRIVDROP_AS_IS, NULL},
        {"unprivileged, run_as_root", {1000, 0, 1, "root", NULL, 1, 0, 1}, PRIVDROP_AS_IS, NULL},
        {"root, normal", {0, 0, 0, "relayd", NULL, 1, 105, 1}, PRIVDROP_DROP, NULL},
        {"root, group given", {0, 0, 0, "relayd", "mail", 1, 105, 1}, PRIVDROP_DROP, NULL},
        {"root, run_as_root",
         {0, 0, 1, "relayd", NULL, 0, 0, 1},
         PRIVDROP_STAY_ROOT,
         "run_as_root = yes"},
        {"root, built-in config",
         {0, 1, 0, "relayd", NULL, 0, 0, 1},
         PRIVDROP_STAY_ROOT,
         "built-in configuration"},
        {"root, no such user",
         {0, 0, 0, "relayd", NULL, 0, 0, 1},
         PRIVDROP_REFUSE,
         "user relayd does not exist"},
        {"root, empty user", {0, 0, 0, "", NULL, 0, 0, 1}, PRIVDROP_REFUSE, "does not exist"},
        {"root, user = root",
         {0, 0, 0, "root", NULL, 1, 0, 1},
         PRIVDROP_REFUSE,
         "run_as_root = yes"},
        {"root, user with uid 0",
         {0, 0, 0, "toor", NULL, 1, 0, 1},
         PRIVDROP_REFUSE,
         "user = toor is root"},
        {"root, no such group",
         {0, 0, 0, "relayd", "nogrp", 1, 105, 0},
         PRIVDROP_REFUSE,
         "group nogrp does not exist"},
    };
    char why[256];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        enum privdrop_action got = privdrop_decide(&cases[i].in, why, sizeof why);

        cr_expect(got == cases[i].want, "%s: action %d, want %d", cases[i].label, (int)got,
                  (int)cases[i].want);
        if (cases[i].want_why != NULL)
            cr_expect(strstr(why, cases[i].want_why) != NULL, "%s: why \"%s\" lacks \"%s\"",
                      cases[i].label, why, cases[i].want_why);
    }
}

/* Which spool entries root gives to the run user (uid 105) before the drop. */
Test(privdrop, chown_decide)
{
    static const struct {
        const char *label;
        uid_t uid;
        mode_t mode;
        nlink_t nlink;
        enum privdrop_chown want;
    } cases[] = {
        {"root's data.mdb", 0, S_IFREG | 0600, 1, PRIVDROP_CHOWN_DO},
        {"root's spool directory", 0, S_IFDIR | 0700, 2, PRIVDROP_CHOWN_DO},
        {"root's control socket", 0, S_IFSOCK | 0600, 1, PRIVDROP_CHOWN_DO},
        {"another user's file", 1000, S_IFREG | 0600, 1, PRIVDROP_CHOWN_DO},
        {"the run user's file (group kept)", 105, S_IFREG | 0640, 1, PRIVDROP_CHOWN_SKIP},
        {"the run user's hard link", 105, S_IFREG | 0600, 2, PRIVDROP_CHOWN_SKIP},
        {"a hard link to root's file", 0, S_IFREG | 0640, 2, PRIVDROP_CHOWN_REFUSE},
        {"a symbolic link (lchown)", 0, S_IFLNK | 0777, 1, PRIVDROP_CHOWN_DO},
    };

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct stat st;

        memset(&st, 0, sizeof st);
        st.st_uid = cases[i].uid;
        st.st_mode = cases[i].mode;
        st.st_nlink = cases[i].nlink;
        cr_expect(privdrop_chown_decide(&st, 105) == cases[i].want, "%s", cases[i].label);
    }
}
