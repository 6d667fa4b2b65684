/* Unit tests for common/addr: tolerant SMTP path parsing. */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "common/addr.h"

struct addr_case {
    const char *label;
    const char *arg;
    int want_rc;
    const char *want_addr;
    const char *want_params;
};

static const struct addr_case addr_cases[] = {
    {"plain", "<user@example.net>", 0, "user@example.net", ""},
    {"leading space", " <user@example.net>", 0, "user@example.net", ""},
    {"TNCS spaces inside brackets", " < user@example.net >", 0, "user@example.net", ""},
    {"no brackets", "user@example.net", 0, "user@example.net", ""},
    {"no brackets with params", "user@example.net SIZE=10", 0, "user@example.net", "SIZE=10"},
    {"null sender", "<>", 0, "", ""},
    {"null sender with params", "<> BODY=8BITMIME", 0, "", "BODY=8BITMIME"},
    {"params", "<a@b> SIZE=100 BODY=8BITMIME", 0, "a@b", "SIZE=100 BODY=8BITMIME"},
    {"quoted local part", "<\"john doe\"@example.com>", 0, "\"john doe\"@example.com", ""},
    {"quoted bracket", "<\"a>b\"@example.com>", 0, "\"a>b\"@example.com", ""},
    {"source route dropped", "<@relay.example,@b.example:user@c.example>", 0, "user@c.example",
     ""},
    {"unbalanced", "<user@example.net", -22, NULL, NULL},
    {"stray bracket", "<a<b@c>", -22, NULL, NULL},
    {"garbage after", "<a@b>x", -22, NULL, NULL},
    {"control char", "<a\001@b>", -22, NULL, NULL},
    {"unbalanced quote", "\"abc@d", -22, NULL, NULL},
};

/* Every case parses (or fails) as the table says. */
Test(addr, path_parse_table)
{
    for (size_t i = 0; i < sizeof(addr_cases) / sizeof(addr_cases[0]); i++) {
        const struct addr_case *c = &addr_cases[i];
        char err[128] = "", *addr = NULL;
        const char *params = NULL;
        int rc = addr_path_parse(c->arg, &addr, &params, err, sizeof(err));

        cr_expect_eq(rc, c->want_rc, "%s: rc %d, want %d (%s)", c->label, rc, c->want_rc, err);
        if (rc == 0 && c->want_rc == 0) {
            cr_expect_str_eq(addr, c->want_addr, "%s", c->label);
            cr_expect_str_eq(params, c->want_params, "%s", c->label);
        }
        if (rc != 0)
            cr_expect(err[0] != '\0', "%s: error text is empty", c->label);
        free(addr);
    }
}

/* A path longer than ADDR_MAX is refused instead of being passed upstream. */
Test(addr, too_long)
{
    char arg[ADDR_MAX + 16], err[64], *addr = NULL;
    const char *params;

    memset(arg, 'a', sizeof(arg) - 1);
    arg[sizeof(arg) - 1] = '\0';
    cr_expect_neq(addr_path_parse(arg, &addr, &params, err, sizeof(err)), 0);
    cr_expect_null(addr);
}

/* addr_domain() gives what follows the last '@'. */
Test(addr, domain)
{
    cr_expect_str_eq(addr_domain("a@b.example"), "b.example");
    cr_expect_str_eq(addr_domain("\"x@y\"@z.example"), "z.example");
    cr_expect_str_eq(addr_domain("postmaster"), "");
}
