/* Unit tests for relayd/control.c: the request lines relayctl sends and the replies. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdio.h>
#include <string.h>

#include "relayd/control.h"

struct fake {
    int reloads, accepting, fail;
};

static int fake_reload(void *arg, char *err, size_t errlen)
{
    struct fake *f = arg;

    f->reloads++;
    if (f->fail)
        snprintf(err, errlen, "relayd.conf:14: [upstream provider] port: 70000 is not in 1..65535");
    return f->fail ? -1 : 0;
}

static void fake_set_accepting(void *arg, int on)
{
    ((struct fake *)arg)->accepting = on;
}

static void fake_status(void *arg, char *out, size_t outlen)
{
    snprintf(out, outlen, "%s queued=0",
             ((struct fake *)arg)->accepting ? "accepting" : "draining");
}

/* Each command, its effect on the daemon and its one reply line. */
Test(control, dispatch)
{
    struct fake f = {0, 1, 0};
    const struct control_hooks h = {fake_reload, fake_set_accepting, fake_status, &f};
    static const struct {
        const char *label, *line;
        int fail;
        const char *want;
        int want_accepting, want_reloads;
    } cases[] = {
        {"reload", "reload", 0, "ok configuration reloaded", 1, 1},
        {"reload fails", "reload", 1,
         "error: relayd.conf:14: [upstream provider] port: 70000 is not in 1..65535", 1, 2},
        {"drain", "drain", 0, "ok draining", 0, 2},
        {"status while drained", "status", 0, "ok draining queued=0", 0, 2},
        {"drain twice", "drain", 0, "ok draining", 0, 2},
        {"resume", "resume", 0, "ok accepting mail", 1, 2},
        {"unknown", "stop", 0, "error: unknown command", 1, 2},
        {"case matters", "RELOAD", 0, "error: unknown command", 1, 2},
        {"empty", "", 0, "error: unknown command", 1, 2},
    };
    char reply[256];

    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        f.fail = cases[i].fail;
        control_dispatch(&h, cases[i].line, reply, sizeof reply);
        cr_expect(strncmp(reply, cases[i].want, strlen(cases[i].want)) == 0, "%s: %s",
                  cases[i].label, reply);
        cr_expect(strchr(reply, '\n') == NULL, "%s: one line", cases[i].label);
        cr_expect(f.accepting == cases[i].want_accepting, "%s: accepting %d", cases[i].label,
                  f.accepting);
        cr_expect(f.reloads == cases[i].want_reloads, "%s: reloads %d", cases[i].label, f.reloads);
    }
}

/* Without a reload hook (a daemon that cannot), reload is an error, not a crash. */
Test(control, no_hooks)
{
    const struct control_hooks h = {NULL, NULL, NULL, NULL};
    char reply[256];

    control_dispatch(&h, "reload", reply, sizeof reply);
    cr_expect(strncmp(reply, "error: ", 7) == 0, "%s", reply);
    control_dispatch(&h, "status", reply, sizeof reply);
    cr_expect(strcmp(reply, "ok ") == 0, "%s", reply);
}
