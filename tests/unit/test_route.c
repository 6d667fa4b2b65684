/*
 * test_route - [route] matchers (sender, sender_domain, recipient_domain, client, listener),
 * route_match() (relayd/route.c) order and AND semantics, route validation, and map files.
 *
 * Files are written with mkstemp() under /tmp and removed in the suite's fini.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config/cfg.h"
#include "relayd/route.h"

static char *tmp_paths[32];
static int ntmp;

static void cleanup(void)
{
    while (ntmp > 0)
        free((unlink(tmp_paths[--ntmp]), tmp_paths[ntmp]));
}

TestSuite(route, .fini = cleanup);

static const char *tmp_file(const char *text)
{
    char tmpl[] = "/tmp/test_route.XXXXXX";
    size_t len = strlen(text);
    int fd = mkstemp(tmpl);

    cr_assert(ge(int, fd, 0), "mkstemp: %s", strerror(errno));
    cr_assert(eq(long, (long)write(fd, text, len), (long)len));
    close(fd);
    cr_assert(lt(int, ntmp, 32));
    tmp_paths[ntmp] = strdup(tmpl);
    return tmp_paths[ntmp++];
}

static void load_ok(const char *text, struct cfg *cfg)
{
    char err[512] = "";

    cr_assert(eq(int, cfg_load(tmp_file(text), cfg, err, sizeof err), 0), "%s", err);
}

/* Loads text expecting failure; want must occur in the error text. */
static void expect_error(const char *label, const char *text, const char *want)
{
    char err[512] = "";
    struct cfg cfg;
    int rc = cfg_load(tmp_file(text), &cfg, err, sizeof err);

    cr_expect(eq(int, rc, CFG_EINVAL), "%s: rc %d (%s)", label, rc, err);
    cr_expect(ne(ptr, strstr(err, want), NULL), "%s: got '%s', want '%s'", label, err, want);
    if (rc == 0)
        cfg_free(&cfg);
}

#define LISTENERS                                                                                  \
    "[listener lan]\nlisten = 127.0.0.1:25\n"                                                      \
    "[listener scan]\nlisten = 127.0.0.1:2526\n"
#define UPSTREAMS "[upstream a]\nhost = a.example\n[upstream b]\nhost = b.example\n"

struct match_case {
    const char *label;
    const char *sender, *rcpt, *client, *listener;
    const char *want; /* route name, NULL: none */
};

static const char routes_conf[] = LISTENERS UPSTREAMS
    "[route scanners]\nupstream = b\nsender = scanner@lan.example, @fax.example, copiers.example\n"
    "[route corp-from-lab]\nupstream = b\nrecipient_domain = corp.example\n"
    "client = 10.1.0.0/16\n"
    "[route scan-listener]\nupstream = b\nlistener = scan\n"
    "[route both]\nupstream = b\nsender_domain = lists.example\nrecipient_domain = news.example\n"
    "[route v6]\nupstream = b\nclient = fd00::/8\n"
    "[route default]\nupstream = a\n";

static const struct match_case match_cases[] = {
    {"full sender address", "scanner@lan.example", "x@y.example", "10.0.0.1", "lan", "scanners"},
    {"sender address, other case", "Scanner@LAN.example", "x@y.example", NULL, NULL, "scanners"},
    {"other user of that domain", "other@lan.example", "x@y.example", "10.0.0.1", "lan", "default"},
    {"@domain", "anyone@fax.example", "x@y.example", NULL, NULL, "scanners"},
    {"bare domain", "room1@copiers.example", "x@y.example", NULL, NULL, "scanners"},
    {"subdomain is not the domain", "a@sub.fax.example", "x@y.example", NULL, NULL, "default"},
    {"null sender", "", "x@y.example", "10.0.0.1", "lan", "default"},
    {"NULL sender", NULL, "x@y.example", NULL, NULL, "default"},
    {"recipient and client both match", "a@b.example", "boss@corp.example", "10.1.2.3", "lan",
     "corp-from-lab"},
    {"recipient matches, client does not", "a@b.example", "boss@corp.example", "10.2.0.1", "lan",
     "default"},
    {"client matches, recipient does not", "a@b.example", "x@y.example", "10.1.2.3", "lan",
     "default"},
    {"client unknown: a client route does not match", "a@b.example", "boss@corp.example", NULL,
     "lan", "default"},
    {"client not an address", "a@b.example", "boss@corp.example", "garbage", "lan", "default"},
    {"listener", "a@b.example", "x@y.example", "10.0.0.1", "scan", "scan-listener"},
    {"listener unknown", "a@b.example", "x@y.example", "10.0.0.1", NULL, "default"},
    {"first match wins", "scanner@lan.example", "x@y.example", "10.0.0.1", "scan", "scanners"},
    {"sender_domain AND recipient_domain", "n@lists.example", "r@news.example", NULL, NULL, "both"},
    {"sender_domain without recipient_domain", "n@lists.example", "r@y.example", NULL, NULL,
     "default"},
    {"IPv6 client", "a@b.example", "x@y.example", "fd00::7", NULL, "v6"},
    {"IPv6 client outside", "a@b.example", "x@y.example", "fe80::7", NULL, "default"},
};

/* route_match(): file order, every given matcher kind must match, then default. */
Test(route, match)
{
    struct cfg cfg;
    size_t i;

    load_ok(routes_conf, &cfg);
    for (i = 0; i < sizeof match_cases / sizeof match_cases[0]; i++) {
        const struct match_case *c = &match_cases[i];
        const struct cfg_route *r = route_match(&cfg, c->sender, c->rcpt, c->client, c->listener);

        cr_assert(ne(ptr, (void *)r, NULL), "%s", c->label);
        cr_expect(eq(str, r->name, (char *)c->want), "%s", c->label);
    }
    cfg_free(&cfg);
}

/* Client and listener unknown (NULL): routes that need them do not match. */
Test(route, match_without_client_and_listener)
{
    struct cfg cfg;

    load_ok(routes_conf, &cfg);
    cr_expect(eq(str, route_match(&cfg, "a@fax.example", "x@y", NULL, NULL)->name, "scanners"));
    cr_expect(eq(str, route_match(&cfg, "a@b.example", "boss@corp.example", NULL, NULL)->name,
                 "default"));
    cfg_free(&cfg);
}

/* No default: unmatched mail has no route (held). */
Test(route, no_default)
{
    struct cfg cfg;

    load_ok(LISTENERS UPSTREAMS "[route s]\nupstream = a\nlistener = scan\n", &cfg);
    cr_expect(eq(ptr, (void *)route_match(&cfg, "a@b", "c@d", "127.0.0.1", "lan"), NULL));
    cr_expect(eq(str, route_match(&cfg, "a@b", "c@d", "127.0.0.1", "scan")->name, "s"));
    cfg_free(&cfg);
}

/* Failover names resolve to upstreams in order. */
Test(route, failover)
{
    struct cfg cfg;

    load_ok(LISTENERS UPSTREAMS "[upstream c]\nhost = c.example\n"
                                "[route default]\nupstream = a\nfailover = c, b\n",
            &cfg);
    cr_assert(eq(int, cfg.routes[0].nfailover, 2));
    cr_expect(eq(str, cfg.routes[0].failover[0]->name, "c"));
    cr_expect(eq(str, cfg.routes[0].failover[1]->name, "b"));
    cfg_free(&cfg);
}

struct err_case {
    const char *label;
    const char *text;
    const char *want;
};

static const struct err_case err_cases[] = {
    {"sender not an address", LISTENERS UPSTREAMS "[route r]\nupstream = a\nsender = <x@y>\n",
     "[route r] sender: '<x@y>' is not an address, @domain or domain"},
    {"sender with empty domain", LISTENERS UPSTREAMS "[route r]\nupstream = a\nsender = x@\n",
     "[route r] sender: 'x@' is not an address"},
    {"unknown listener", LISTENERS UPSTREAMS "[route r]\nupstream = a\nlistener = lan, nope\n",
     "[route r] listener: no [listener nope] section"},
    {"bad client network", LISTENERS UPSTREAMS "[route r]\nupstream = a\nclient = 10.0.0.0/33\n",
     "[route r] client: "},
    {"default with client", LISTENERS UPSTREAMS "[route default]\nupstream = a\nclient = ::1\n",
     "[route default] client: the default route matches everything"},
    {"default with sender", LISTENERS UPSTREAMS "[route default]\nupstream = a\nsender = a@b\n",
     "[route default] sender: the default route matches everything"},
    {"route matching nothing", LISTENERS UPSTREAMS "[route r]\nupstream = a\n",
     "[route r] matches nothing"},
    {"rewrite_sender not an address",
     LISTENERS UPSTREAMS "[route default]\nupstream = a\nrewrite_sender = scanner\n",
     "[route default] rewrite_sender: 'scanner' is not an address"},
    {"rewrite_from without a sender",
     LISTENERS UPSTREAMS "[route default]\nupstream = a\nrewrite_from = yes\n",
     "[route default] rewrite_from: yes needs rewrite_sender or rewrite_sender_map"},
    {"missing map file",
     LISTENERS UPSTREAMS "[route default]\nupstream = a\nrecipient_map = /nonexistent/map\n",
     "[route default] recipient_map: /nonexistent/map: No such file or directory"},
};

/* Route validation names the section, the key and what is wrong. */
Test(route, errors)
{
    size_t i;

    for (i = 0; i < sizeof err_cases / sizeof err_cases[0]; i++)
        expect_error(err_cases[i].label, err_cases[i].text, err_cases[i].want);
}

static char *conf_with_map(const char *key, const char *map_text)
{
    const char *map = tmp_file(map_text);
    char *text;

    cr_assert(ge(
        int,
        asprintf(&text, LISTENERS UPSTREAMS "[route default]\nupstream = a\n%s = %s\n", key, map),
        0));
    return text;
}

/* A map file: comments, blank lines, tabs; exact address before @domain; dump shows it. */
Test(route, map_load_and_lookup)
{
    struct cfg cfg;
    char *text = conf_with_map("rewrite_sender_map",
                               "# device senders\n"
                               "\n"
                               "scanner@lan\tscan-account@corp.example   # the 3rd floor\n"
                               "@fax.lan  fax@corp.example\n"
                               "boss@fax.lan boss@corp.example\r\n");
    const struct cfg_map *m;

    load_ok(text, &cfg);
    free(text);
    m = &cfg.routes[0].rewrite_sender_map;
    cr_assert(eq(int, m->n, 3));
    cr_expect(eq(str, (char *)cfg_map_lookup(m, "scanner@lan"), "scan-account@corp.example"));
    cr_expect(eq(str, (char *)cfg_map_lookup(m, "SCANNER@LAN"), "scan-account@corp.example"));
    cr_expect(eq(str, (char *)cfg_map_lookup(m, "room2@fax.lan"), "fax@corp.example"));
    cr_expect(eq(str, (char *)cfg_map_lookup(m, "boss@fax.lan"), "boss@corp.example"));
    cr_expect(eq(ptr, (void *)cfg_map_lookup(m, "other@lan"), NULL));
    cr_expect(eq(ptr, (void *)cfg_map_lookup(m, ""), NULL));
    {
        char *out = NULL;
        size_t len = 0;
        FILE *f = open_memstream(&out, &len);

        cfg_dump(&cfg, f);
        fclose(f);
        cr_expect(ne(ptr, strstr(out, "rewrite_sender_map = /tmp/test_route."), NULL), "%s", out);
        cr_expect(ne(ptr, strstr(out, "; 3 entries"), NULL), "%s", out);
        cr_expect(ne(ptr, strstr(out, "keep_reply_to = yes"), NULL), "%s", out);
        free(out);
    }
    cfg_free(&cfg);
}

struct map_err {
    const char *label;
    const char *text;
    const char *want; /* after "MAPPATH:" */
};

static const struct map_err map_errs[] = {
    {"one column", "scanner@lan\n", "1: expected two addresses: FROM TO"},
    {"three columns", "# c\na@b c@d e@f\n", "2: expected two addresses: FROM TO"},
    {"bad key", "scanner c@d\n", "1: 'scanner' is not an address or @domain"},
    {"value is a domain", "a@b @d\n", "1: '@d' is not an address"},
    {"mapped twice", "a@b c@d\nA@B e@f\n", "2: A@B is mapped twice"},
};

/* A bad map line stops the load with the map's own file and line. */
Test(route, map_errors)
{
    size_t i;

    for (i = 0; i < sizeof map_errs / sizeof map_errs[0]; i++) {
        char *text = conf_with_map("recipient_map", map_errs[i].text);
        const char *map = tmp_paths[ntmp - 1];
        char want[512];

        snprintf(want, sizeof want, "recipient_map: %s:%s", map, map_errs[i].want);
        expect_error(map_errs[i].label, text, want);
        free(text);
    }
}
