/*
 * test_cfg - loading, validating, defaulting and dumping relayd.conf; route lookup.
 *
 * Configuration files are written with mkstemp() under /tmp and removed in the suite's
 * fini.  Error texts are compared whole: "PATH:LINE: [section name] key: why".
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

static char *tmp_paths[64];
static int ntmp;

static void cleanup(void)
{
    while (ntmp > 0)
        free((unlink(tmp_paths[--ntmp]), tmp_paths[ntmp]));
}

TestSuite(cfg, .fini = cleanup);

/* Writes text into a new file under /tmp with the given mode; returns its path. */
static const char *tmp_file(const char *text, mode_t mode)
{
    char tmpl[] = "/tmp/test_cfg.XXXXXX";
    size_t len = strlen(text);
    int fd = mkstemp(tmpl);

    cr_assert(ge(int, fd, 0), "mkstemp: %s", strerror(errno));
    cr_assert(eq(long, (long)write(fd, text, len), (long)len));
    cr_assert(eq(int, fchmod(fd, mode), 0));
    close(fd);
    cr_assert(lt(int, ntmp, 64));
    tmp_paths[ntmp] = strdup(tmpl);
    return tmp_paths[ntmp++];
}

static int is_zero(const struct cfg *cfg)
{
    static const struct cfg zero;

    return memcmp(cfg, &zero, sizeof zero) == 0;
}

/* Loads text expecting failure; want is the error without the leading path. */
static void expect_error(const char *label, const char *text, const char *want)
{
    const char *path = tmp_file(text, 0600);
    char err[512], full[600];
    struct cfg cfg;
    int rc;

    memset(&cfg, 0xa5, sizeof cfg);
    rc = cfg_load(path, &cfg, err, sizeof err);
    cr_expect(eq(int, rc, CFG_EINVAL), "%s", label);
    snprintf(full, sizeof full, "%s%s", path, want);
    cr_expect(eq(str, err, full), "%s", label);
    cr_expect(is_zero(&cfg), "%s: *cfg not cleared on failure", label);
}

static void load_ok(const char *text, struct cfg *cfg)
{
    const char *path = tmp_file(text, 0600);
    char err[512] = "";

    cr_assert(eq(int, cfg_load(path, cfg, err, sizeof err), 0), "%s", err);
}

#define LAN "[listener lan]\nlisten = 127.0.0.1:25\n"

struct err_case {
    const char *label;
    const char *text;
    const char *want; /* error text after the path */
};

static const struct err_case err_cases[] = {
    {"unknown section type", "[relayd]\n[foo bar]\n",
     ":2: [foo bar] unknown section type 'foo' (expected relayd, listener NAME, upstream NAME "
     "or route NAME)"},
    {"unknown key", LAN "foo = 1\n", ":3: [listener lan] foo: unknown key"},
    {"port out of range", LAN "[upstream provider]\nhost = smtp.example.com\nport = 70000\n",
     ":5: [upstream provider] port: 70000 is not in 1..65535"},
    {"port zero", LAN "[upstream provider]\nhost = smtp.example.com\nport = 0\n",
     ":5: [upstream provider] port: 0 is not in 1..65535"},
    {"port not a number", LAN "[upstream p]\nhost = h\nport = smtp\n",
     ":5: [upstream p] port: 'smtp' is not a number"},
    {"duplicate section", LAN "[upstream a]\nhost = x\n[upstream a]\nhost = y\n",
     ":5: [upstream a] duplicate section (first on line 3)"},
    {"duplicate empty section", LAN "[route r]\n[route r]\n",
     ":4: [route r] duplicate section (first on line 3)"},
    {"duplicate relayd", "[relayd]\nworkers = 2\n[relayd]\n",
     ":3: [relayd] duplicate section (first on line 1)"},
    {"key set twice", LAN "listen = 127.0.0.1:26\n",
     ":3: [listener lan] listen: set twice (first on line 2)"},
    {"key outside a section", "workers = 4\n" LAN,
     ":1: workers: outside any section (start with [relayd], [listener NAME], [upstream NAME] "
     "or [route NAME])"},
    {"no equals sign", LAN "[relayd]\nworkers\n",
     ":4: syntax error: expected [section], key = value or a comment"},
    {"unclosed section", LAN "[relayd\nworkers = 2\n",
     ":3: syntax error: expected [section], key = value or a comment"},
    {"relayd with a name", "[relayd main]\n", ":1: [relayd main] takes no name: write [relayd]"},
    {"listener without a name", "[listener]\n", ":1: [listener] needs a name: [listener NAME]"},
    {"bad section name", "[upstream my/provider]\n",
     ":1: [upstream my/provider] the name may contain only letters, digits, '.', '_' and '-' "
     "(upstream NAME)"},
    {"line numbers count comments and blanks",
     "; a comment\n# another\n\n[listener lan] ; inline\nlisten = 127.0.0.1:25 ; inline\n"
     "workers = 3\n",
     ":6: [listener lan] workers: unknown key"},
    {"indented continuation is not a value", LAN "[relayd]\nworkers = 2\n  workers = 3\n",
     ":5: [relayd] workers: set twice (first on line 4)"},
    {"empty value", LAN "[relayd]\nhostname =\n", ":4: [relayd] hostname: empty value"},
    {"listen missing", "[listener lan]\nallow = 10.0.0.0/8\n",
     ":1: [listener lan] listen: required (e.g. listen = 127.0.0.1:25)"},
    {"open relay on 0.0.0.0", "[listener lan]\nlisten = 0.0.0.0:25\n",
     ":2: [listener lan] allow: 0.0.0.0 binds a public address with no allow list: this would "
     "be an open relay; add allow = <your client networks>"},
    {"open relay on ::", "[relayd]\n\n[listener v6]\nlisten = [::]:25\n",
     ":4: [listener v6] allow: :: binds a public address with no allow list: this would be an "
     "open relay; add allow = <your client networks>"},
    {"open relay on a LAN address", "[listener lan]\nlisten = 192.168.1.5:25\n",
     ":2: [listener lan] allow: 192.168.1.5 binds a non-loopback address with no allow list: "
     "this would be an open relay; add allow = <your client networks>"},
    {"listen on a host name", "[listener lan]\nlisten = localhost:25\n",
     ":2: [listener lan] listen: localhost: not an IP address (a host name cannot be judged for "
     "open relaying; write 0.0.0.0, 127.0.0.1, [::] or [::1])"},
    {"listen without port", "[listener lan]\nlisten = 127.0.0.1\n",
     ":2: [listener lan] listen: '127.0.0.1' is not ADDRESS:PORT (e.g. 0.0.0.0:25 or "
     "[::1]:2525)"},
    {"listen v6 without brackets", "[listener lan]\nlisten = ::1:25\n",
     ":2: [listener lan] listen: '::1:25' is not ADDRESS:PORT (e.g. 0.0.0.0:25 or [::1]:2525)"},
    {"listen port out of range", "[listener lan]\nlisten = [::1]:65536\n",
     ":2: [listener lan] listen: port 65536 is not in 1..65535"},
    {"same address twice", LAN "[listener b]\nlisten = 127.0.0.1:25\n",
     ":4: [listener b] listen: same address as [listener lan]"},
    {"bad allow network", "[listener lan]\nlisten = 0.0.0.0:25\nallow = 10.0.0.0/33\n",
     ":3: [listener lan] allow: 10.0.0.0/33: prefix length is not in 0..32"},
    {"size with a bad suffix", LAN "[relayd]\nmax_message_size = 35MB\n",
     ":4: [relayd] max_message_size: '35MB' is not a size (bytes, or with K, M or G)"},
    {"size too big", LAN "[relayd]\nmax_message_size = 2G\n",
     ":4: [relayd] max_message_size: 2G is not in 1K..1G"},
    {"size too small", LAN "[relayd]\nmax_message_size = 100\n",
     ":4: [relayd] max_message_size: 100 is not in 1K..1G"},
    {"size overflow", LAN "[relayd]\nmax_message_size = 99999999999999999G\n",
     ":4: [relayd] max_message_size: 99999999999999999G is not in 1K..1G"},
    {"duration too long", LAN "[relayd]\nretry_first = 2d\n",
     ":4: [relayd] retry_first: 2d is not in 1s..1d"},
    {"duration with a bad unit", LAN "[relayd]\nretry_first = 5x\n",
     ":4: [relayd] retry_first: '5x' is not a duration (seconds, or with s, m, h or d)"},
    {"duration negative", LAN "[relayd]\nmax_lifetime = -1d\n",
     ":4: [relayd] max_lifetime: -1d is not in 1m..100d"},
    {"int not a number", LAN "[relayd]\nworkers = many\n",
     ":4: [relayd] workers: 'many' is not a number"},
    {"int with trailing junk", LAN "[relayd]\nmax_recipients = 10x\n",
     ":4: [relayd] max_recipients: '10x' is not a number"},
    {"int too small", LAN "[relayd]\nworkers = 0\n", ":4: [relayd] workers: 0 is not in 1..1024"},
    {"retry_max below retry_first", LAN "[relayd]\nretry_first = 2h\nretry_max = 1h\n",
     ":5: [relayd] retry_max: 1h is less than retry_first (2h)"},
    {"bad hostname", LAN "[relayd]\nhostname = relay example\n",
     ":4: [relayd] hostname: 'relay example' is not a host name or address"},
    {"bad bool", LAN "[upstream p]\nhost = h\nallow_plaintext_auth = maybe\n",
     ":5: [upstream p] allow_plaintext_auth: 'maybe' is not yes/no, true/false, on/off or 1/0"},
    {"bad tls", LAN "[upstream p]\nhost = h\ntls = ssl\n",
     ":5: [upstream p] tls: 'ssl' is not one of starttls, implicit, none"},
    {"upstream host missing", LAN "[upstream p]\nport = 25\n",
     ":3: [upstream p] host: required (e.g. host = smtp.example.com)"},
    {"ca_file missing", LAN "[upstream p]\nhost = h\nca_file = /nonexistent/ca.pem\n",
     ":5: [upstream p] ca_file: /nonexistent/ca.pem: No such file or directory"},
    {"ca_file is a directory", LAN "[upstream p]\nhost = h\nca_file = /tmp\n",
     ":5: [upstream p] ca_file: /tmp: not a regular file"},
    {"password_file missing",
     LAN "[upstream p]\nhost = h\nusername = u\n"
         "password_file = /nonexistent/pw\n",
     ":6: [upstream p] password_file: /nonexistent/pw: No such file or directory"},
    {"username without password_file", LAN "[upstream p]\nhost = h\nusername = u\n",
     ":5: [upstream p] password_file: required when username is set"},
    {"route without upstream", LAN "[route default]\n",
     ":3: [route default] upstream: required (the name of an [upstream NAME] section)"},
    {"route to an unknown upstream", LAN "[route default]\nupstream = nope\n",
     ":4: [route default] upstream: no [upstream nope] section"},
    {"default route with domains",
     LAN "[upstream a]\nhost = h\n[route default]\n"
         "upstream = a\nrecipient_domain = example.com\n",
     ":7: [route default] recipient_domain: the default route matches everything; put domains "
     "in another route"},
    {"route matching nothing", LAN "[upstream a]\nhost = h\n[route other]\nupstream = a\n",
     ":5: [route other] matches nothing: set sender_domain or recipient_domain, or name it "
     "[route default]"},
    {"bad domain list",
     LAN "[upstream a]\nhost = h\n[route x]\nupstream = a\n"
         "sender_domain = a.example, user@b.example\n",
     ":7: [route x] sender_domain: 'user@b.example' is not a domain"},
    {"no listener", "[relayd]\nworkers = 2\n",
     ": no [listener NAME] section: relayd would accept no mail"},
};

/* Every kind of mistake is refused with "FILE:LINE: [section name] key: why". */
Test(cfg, errors)
{
    size_t i;

    for (i = 0; i < sizeof err_cases / sizeof err_cases[0]; i++)
        expect_error(err_cases[i].label, err_cases[i].text, err_cases[i].want);
}

/* A line inih would split is refused with its line number instead. */
Test(cfg, line_too_long)
{
    char text[600];
    char want[80];

    snprintf(text, sizeof text, LAN "[route r]\nupstream = %0300d\n", 0);
    snprintf(want, sizeof want, ":4: line is longer than 197 characters");
    expect_error("long line", text, want);
}

/* A file that cannot be opened gives -errno and the path. */
Test(cfg, missing_file)
{
    struct cfg cfg;
    char err[256];

    cr_expect(eq(int, cfg_load("/nonexistent/relayd.conf", &cfg, err, sizeof err), -ENOENT));
    cr_expect(eq(str, err, "/nonexistent/relayd.conf: No such file or directory"));
    cr_expect(is_zero(&cfg));
}

static const char full_fmt[] = "; relayd test configuration\n"
                               "[relayd]\n"
                               "hostname = relay.example.net\n"
                               "spool = /tmp/relayd-spool ; where messages wait\n"
                               "max_message_size = 10M\n"
                               "max_recipients = 50\n"
                               "retry_first = 2m\n"
                               "retry_max = 2h\n"
                               "max_lifetime = 3d\n"
                               "workers = 2\n"
                               "\n"
                               "[listener lan]\n"
                               "listen = 0.0.0.0:25\n"
                               "allow = 10.0.0.0/8, 192.168.0.0/16 fd00::/8\n"
                               "\n"
                               "[listener local]\n"
                               "listen = [::1]:2525\n"
                               "\n"
                               "[upstream m365]\n"
                               "host = smtp.office365.com\n"
                               "port = 587\n"
                               "tls = starttls\n"
                               "ca_file = %s\n"
                               "tls_name = outlook.office365.com\n"
                               "username = fax@example.com\n"
                               "password_file = %s\n"
                               "mechanisms = LOGIN PLAIN\n"
                               "connect_timeout = 1m\n"
                               "command_timeout = 10m\n"
                               "\n"
                               "[upstream backup]\n"
                               "host = smtp.example.org\n"
                               "tls = implicit\n"
                               "\n"
                               "[route corp]\n"
                               "upstream = backup\n"
                               "recipient_domain = corp.example, Other.Example\n"
                               "sender_domain = lists.example\n"
                               "\n"
                               "[route default]\n"
                               "upstream = m365\n";

static void load_full(struct cfg *cfg, const char **pwpath, const char **capath)
{
    char *text;

    *pwpath = tmp_file("s3cret-pass\r\n", 0600);
    *capath = tmp_file("-----BEGIN CERTIFICATE-----\n", 0644);
    cr_assert(ge(int, asprintf(&text, full_fmt, *capath, *pwpath), 0));
    load_ok(text, cfg);
    free(text);
}

/* A complete file sets every field, fills defaults from the tables and resolves routes. */
Test(cfg, full)
{
    const char *pw, *ca;
    struct cfg cfg;
    const struct cfg_upstream *u;
    const struct cfg_listener *l;

    load_full(&cfg, &pw, &ca);
    cr_expect(eq(str, cfg.hostname, "relay.example.net"));
    cr_expect(eq(str, cfg.spool_dir, "/tmp/relayd-spool"));
    cr_expect(eq(long, cfg.max_message_size, 10L * 1024 * 1024));
    cr_expect(eq(int, cfg.max_recipients, 50));
    cr_expect(eq(int, cfg.retry_first, 120));
    cr_expect(eq(int, cfg.retry_max, 7200));
    cr_expect(eq(int, cfg.max_lifetime, 3 * 86400));
    cr_expect(eq(int, cfg.workers, 2));

    cr_assert(eq(int, cfg.nlisteners, 2));
    l = &cfg.listeners[0];
    cr_expect(eq(str, l->name, "lan"));
    cr_expect(eq(str, l->host, "0.0.0.0"));
    cr_expect(eq(int, l->port, 25));
    cr_expect(eq(sz, l->allow.n, 3));
    cr_expect(eq(int, l->line, 12));
    l = &cfg.listeners[1];
    cr_expect(eq(str, l->name, "local"));
    cr_expect(eq(str, l->host, "::1"));
    cr_expect(eq(int, l->port, 2525));
    cr_expect(eq(sz, l->allow.n, 2), "loopback listener gets the loopback allow list");
    cr_expect(eq(int, l->line, 16));

    cr_assert(eq(int, cfg.nupstreams, 2));
    u = &cfg.upstreams[0];
    cr_expect(eq(str, u->name, "m365"));
    cr_expect(eq(str, u->host, "smtp.office365.com"));
    cr_expect(eq(int, u->port, 587));
    cr_expect(eq(int, u->tls, CFG_TLS_STARTTLS));
    cr_expect(eq(str, u->ca_file, (char *)ca));
    cr_expect(eq(str, u->tls_name, "outlook.office365.com"));
    cr_expect(eq(str, u->tls_priority, "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"));
    cr_expect(eq(str, u->username, "fax@example.com"));
    cr_expect(eq(str, u->password_file, (char *)pw));
    cr_expect(eq(str, u->password, "s3cret-pass"), "trailing CR/LF stripped");
    cr_expect(eq(str, u->mechanisms, "LOGIN PLAIN"));
    cr_expect(eq(int, u->allow_plaintext_auth, 0));
    cr_expect(eq(int, u->connect_timeout, 60));
    cr_expect(eq(int, u->command_timeout, 600));
    cr_expect(eq(int, u->line, 19));
    u = &cfg.upstreams[1];
    cr_expect(eq(str, u->name, "backup"));
    cr_expect(eq(int, u->port, 465), "tls = implicit defaults to port 465");
    cr_expect(eq(int, u->tls, CFG_TLS_IMPLICIT));
    cr_expect(eq(ptr, u->ca_file, NULL));
    cr_expect(eq(ptr, u->tls_name, NULL));
    cr_expect(eq(ptr, u->username, NULL));
    cr_expect(eq(ptr, u->password, NULL));
    cr_expect(eq(ptr, u->mechanisms, NULL));
    cr_expect(eq(int, u->connect_timeout, 30));
    cr_expect(eq(int, u->command_timeout, 300));

    cr_assert(eq(int, cfg.nroutes, 2));
    cr_expect(eq(str, cfg.routes[0].name, "corp"));
    cr_expect(eq(ptr, cfg.routes[0].upstream, &cfg.upstreams[1]));
    cr_expect(eq(str, cfg.routes[0].upstream_name, "backup"));
    cr_expect(eq(str, cfg.routes[1].name, "default"));
    cr_expect(eq(ptr, cfg.routes[1].upstream, &cfg.upstreams[0]));
    cr_expect(eq(ptr, cfg.routes[1].sender_domain, NULL));
    cr_expect(eq(int, cfg.routes[1].line, 40));
    cr_expect(eq(str, cfg.path, (char *)tmp_paths[ntmp - 1]));

    cfg_free(&cfg);
    cr_expect(is_zero(&cfg));
    cfg_free(&cfg); /* twice is harmless */
}

/* A minimal file gets every [relayd] default from the key table. */
Test(cfg, defaults)
{
    struct cfg cfg;
    char host[256] = "";

    load_ok(LAN, &cfg);
    gethostname(host, sizeof host);
    cr_expect(eq(str, cfg.hostname, host));
    cr_expect(eq(str, cfg.spool_dir, "/var/spool/relayd"));
    cr_expect(eq(long, cfg.max_message_size, 35L * 1024 * 1024));
    cr_expect(eq(int, cfg.max_recipients, 1000));
    cr_expect(eq(int, cfg.retry_first, 60));
    cr_expect(eq(int, cfg.retry_max, 3600));
    cr_expect(eq(int, cfg.max_lifetime, 5 * 86400));
    cr_expect(eq(int, cfg.workers, 4));
    cr_expect(eq(int, cfg.nupstreams, 0));
    cr_expect(eq(int, cfg.nroutes, 0));
    cfg_free(&cfg);
}

struct value_case {
    const char *label;
    const char *line; /* in [relayd] */
    long want_size;
    int want_lifetime;
};

static const struct value_case value_cases[] = {
    {"size in bytes", "max_message_size = 1048576", 1048576, 5 * 86400},
    {"size k", "max_message_size = 512k", 512 * 1024, 5 * 86400},
    {"size K", "max_message_size = 512K", 512 * 1024, 5 * 86400},
    {"size m", "max_message_size = 20m", 20L * 1024 * 1024, 5 * 86400},
    {"size G at the bound", "max_message_size = 1G", 1024L * 1024 * 1024, 5 * 86400},
    {"size g", "max_message_size = 1g", 1024L * 1024 * 1024, 5 * 86400},
    {"duration plain seconds", "max_lifetime = 7200", 35L << 20, 7200},
    {"duration s", "max_lifetime = 90s", 35L << 20, 90},
    {"duration m", "max_lifetime = 15m", 35L << 20, 900},
    {"duration h", "max_lifetime = 36h", 35L << 20, 36 * 3600},
    {"duration d at the bound", "max_lifetime = 100d", 35L << 20, 100 * 86400},
    {"duration lower bound", "max_lifetime = 1m", 35L << 20, 60},
};

/* Sizes and durations accept their suffixes and the bounds themselves. */
Test(cfg, units)
{
    size_t i;

    for (i = 0; i < sizeof value_cases / sizeof value_cases[0]; i++) {
        struct cfg cfg;
        char text[256];

        snprintf(text, sizeof text, LAN "[relayd]\n%s\n", value_cases[i].line);
        load_ok(text, &cfg);
        cr_expect(eq(long, cfg.max_message_size, value_cases[i].want_size), "%s",
                  value_cases[i].label);
        cr_expect(eq(int, cfg.max_lifetime, value_cases[i].want_lifetime), "%s",
                  value_cases[i].label);
        cfg_free(&cfg);
    }
}

/* All spellings of yes and no are understood, in any case. */
Test(cfg, bools)
{
    static const struct {
        const char *text;
        int want;
    } cases[] = {{"yes", 1}, {"YES", 1},   {"true", 1}, {"on", 1}, {"1", 1},
                 {"no", 0},  {"False", 0}, {"off", 0},  {"0", 0}};
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct cfg cfg;
        char text[256];

        snprintf(text, sizeof text, LAN "[upstream p]\nhost = h\nallow_plaintext_auth = %s\n",
                 cases[i].text);
        load_ok(text, &cfg);
        cr_expect(eq(int, cfg.upstreams[0].allow_plaintext_auth, cases[i].want), "%s",
                  cases[i].text);
        cfg_free(&cfg);
    }
}

/* An explicit port wins over the implicit-TLS default; tls = none needs no TLS port. */
Test(cfg, upstream_ports)
{
    struct cfg cfg;

    load_ok(LAN "[upstream a]\nhost = h\ntls = implicit\nport = 2465\n"
                "[upstream b]\nhost = 127.0.0.1\ntls = none\n",
            &cfg);
    cr_expect(eq(int, cfg.upstreams[0].port, 2465));
    cr_expect(eq(int, cfg.upstreams[1].port, 587));
    cr_expect(eq(int, cfg.upstreams[1].tls, CFG_TLS_NONE));
    cr_expect(eq(str, (char *)cfg_tls_name(CFG_TLS_NONE), "none"));
    cr_expect(eq(str, (char *)cfg_tls_name(CFG_TLS_STARTTLS), "starttls"));
    cr_expect(eq(str, (char *)cfg_tls_name(CFG_TLS_IMPLICIT), "implicit"));
    cfg_free(&cfg);
}

/* A password file others can read is refused with the mode and the fix. */
Test(cfg, password_file_mode)
{
    static const mode_t bad[] = {0644, 0640, 0604, 0444};
    size_t i;

    for (i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *pw = tmp_file("secret\n", bad[i]);
        char text[512], want[512];

        snprintf(text, sizeof text,
                 LAN "[upstream p]\nhost = h\nusername = u\n"
                     "password_file = %s\n",
                 pw);
        snprintf(want, sizeof want,
                 ":6: [upstream p] password_file: %s: mode %04o is readable "
                 "by group or others; chmod 600 it",
                 pw, (unsigned)bad[i]);
        expect_error("bad mode", text, want);
    }
}

/* Mode 0600 and 0400 are fine; only trailing CR/LF is stripped from the password. */
Test(cfg, password_file_ok)
{
    static const struct {
        const char *content;
        mode_t mode;
        const char *want;
    } cases[] = {
        {"pw\n", 0600, "pw"},
        {"pw", 0400, "pw"},
        {"p w \r\n\r\n", 0600, "p w "},
        {"  spaced\tpw\n", 0600, "  spaced\tpw"},
    };
    size_t i;

    for (i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *pw = tmp_file(cases[i].content, cases[i].mode);
        struct cfg cfg;
        char text[512];

        snprintf(text, sizeof text,
                 LAN "[upstream p]\nhost = h\nusername = u\n"
                     "password_file = %s\n",
                 pw);
        load_ok(text, &cfg);
        cr_expect(eq(str, cfg.upstreams[0].password, (char *)cases[i].want), "case %zu", i);
        cfg_free(&cfg);
    }
}

/* An empty password file, or one without a username, is a mistake worth reporting. */
Test(cfg, password_file_misuse)
{
    const char *empty = tmp_file("\r\n", 0600);
    const char *pw = tmp_file("pw\n", 0600);
    char text[512], want[512];

    snprintf(text, sizeof text, LAN "[upstream p]\nhost = h\nusername = u\npassword_file = %s\n",
             empty);
    snprintf(want, sizeof want, ":6: [upstream p] password_file: %s: is empty", empty);
    expect_error("empty password", text, want);

    snprintf(text, sizeof text, LAN "[upstream p]\nhost = h\npassword_file = %s\n", pw);
    expect_error("no username", text,
                 ":5: [upstream p] username: required when password_file "
                 "is set");
}

/* tls = none with a username would leak the password unless explicitly allowed. */
Test(cfg, cleartext_password)
{
    const char *pw = tmp_file("pw\n", 0600);
    struct cfg cfg;
    char text[512];

    snprintf(text, sizeof text,
             LAN "[upstream p]\nhost = h\ntls = none\nusername = u\n"
                 "password_file = %s\n",
             pw);
    expect_error("cleartext", text,
                 ":5: [upstream p] tls: none with username set would send the "
                 "password in cleartext; use starttls or implicit (or "
                 "allow_plaintext_auth = yes)");

    snprintf(text, sizeof text,
             LAN "[upstream p]\nhost = h\ntls = none\nusername = u\n"
                 "password_file = %s\nallow_plaintext_auth = yes\n",
             pw);
    load_ok(text, &cfg);
    cr_expect(eq(int, cfg.upstreams[0].allow_plaintext_auth, 1));
    cfg_free(&cfg);
}

/* A loopback listener without allow gets loopback only; a listed one keeps its list. */
Test(cfg, listener_allow)
{
    struct cfg cfg;
    char net[64];

    load_ok("[listener a]\nlisten = 127.0.0.2:25\n[listener b]\nlisten = [::]:587\n"
            "allow = ::ffff:192.168.0.0/112\n",
            &cfg);
    cr_assert(eq(sz, cfg.listeners[0].allow.n, 2));
    cr_expect(
        eq(str, netaddr_net_str(&cfg.listeners[0].allow.nets[0], net, sizeof net), "127.0.0.0/8"));
    cr_expect(
        eq(str, netaddr_net_str(&cfg.listeners[0].allow.nets[1], net, sizeof net), "::1/128"));
    cr_assert(eq(sz, cfg.listeners[1].allow.n, 1));
    cr_expect(eq(str, netaddr_net_str(&cfg.listeners[1].allow.nets[0], net, sizeof net),
                 "192.168.0.0/16"));
    cr_expect(eq(str, cfg.listeners[1].host, "::"));
    cr_expect(eq(int, cfg.listeners[1].port, 587));
    cfg_free(&cfg);
}

/* The built-in configuration: loopback listener on 2525, table defaults, no routes. */
Test(cfg, builtin_default)
{
    struct cfg cfg;
    char net[64];

    cfg_default(&cfg, NULL);
    cr_expect(eq(str, cfg.path, "(built-in default)"));
    cr_expect(eq(str, cfg.spool_dir, "./spool"));
    cr_expect(ne(ptr, cfg.hostname, NULL));
    cr_expect(gt(sz, strlen(cfg.hostname), 0));
    cr_expect(eq(long, cfg.max_message_size, 35L * 1024 * 1024));
    cr_expect(eq(int, cfg.max_recipients, 1000));
    cr_expect(eq(int, cfg.workers, 4));
    cr_assert(eq(int, cfg.nlisteners, 1));
    cr_expect(eq(str, cfg.listeners[0].name, "default"));
    cr_expect(eq(str, cfg.listeners[0].host, "127.0.0.1"));
    cr_expect(eq(int, cfg.listeners[0].port, 2525));
    cr_assert(eq(sz, cfg.listeners[0].allow.n, 2));
    cr_expect(
        eq(str, netaddr_net_str(&cfg.listeners[0].allow.nets[0], net, sizeof net), "127.0.0.0/8"));
    cr_expect(
        eq(str, netaddr_net_str(&cfg.listeners[0].allow.nets[1], net, sizeof net), "::1/128"));
    cr_expect(eq(int, cfg.nupstreams, 0));
    cr_expect(eq(int, cfg.nroutes, 0));
    cr_expect(eq(ptr, (void *)route_match(&cfg, "a@b", "c@d", NULL, NULL), NULL));
    cfg_free(&cfg);

    cfg_default(&cfg, "/var/tmp/spool");
    cr_expect(eq(str, cfg.spool_dir, "/var/tmp/spool"));
    cfg_free(&cfg);
}

struct route_case {
    const char *label;
    const char *sender;
    const char *rcpt;
    const char *want; /* route name, NULL: none */
};

static const struct route_case route_cases[] = {
    {"recipient domain", "fax@lan.example", "boss@corp.example", "corp"},
    {"recipient domain, other case", "fax@lan.example", "boss@CORP.Example", "corp"},
    {"second domain of the list", "fax@lan.example", "x@other.example", "corp"},
    {"sender domain", "news@lists.example", "someone@gmail.example", "lists"},
    {"first matching route wins", "news@lists.example", "boss@corp.example", "corp"},
    {"nothing matches: default", "fax@lan.example", "someone@gmail.example", "default"},
    {"null sender", "", "someone@gmail.example", "default"},
    {"null sender, routed recipient", "", "boss@corp.example", "corp"},
    {"subdomain is not the domain", "a@b", "x@sub.corp.example", "default"},
    {"local part only", "a@b", "postmaster", "default"},
    {"domain is a suffix only", "a@b", "x@xcorp.example", "default"},
    {"NULL sender pointer", NULL, "x@corp.example", "corp"},
};

/* route_match() without client and listener: non-default routes in order by domain, then
 * "default". */
Test(cfg, route_find)
{
    struct cfg cfg;
    size_t i;

    load_ok(LAN "[upstream a]\nhost = a.example\n[upstream b]\nhost = b.example\n"
                "[route corp]\nupstream = b\nrecipient_domain = corp.example other.example\n"
                "[route lists]\nupstream = a\nsender_domain = lists.example\n"
                "[route default]\nupstream = a\n",
            &cfg);
    for (i = 0; i < sizeof route_cases / sizeof route_cases[0]; i++) {
        const struct route_case *c = &route_cases[i];
        const struct cfg_route *r = route_match(&cfg, c->sender, c->rcpt, NULL, NULL);

        cr_assert(ne(ptr, (void *)r, NULL), "%s", c->label);
        cr_expect(eq(str, r->name, (char *)c->want), "%s", c->label);
    }
    cfg_free(&cfg);
}

/* Without a default route, unmatched mail has no route (it is held). */
Test(cfg, route_find_no_default)
{
    struct cfg cfg;

    load_ok(LAN "[upstream a]\nhost = a.example\n"
                "[route corp]\nupstream = a\nrecipient_domain = corp.example\n",
            &cfg);
    cr_expect(eq(ptr, (void *)route_match(&cfg, "a@b", "x@gmail.example", NULL, NULL), NULL));
    cr_expect(eq(str, route_match(&cfg, "a@b", "x@corp.example", NULL, NULL)->name, "corp"));
    cfg_free(&cfg);
}

static char *dump_str(const struct cfg *cfg)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    cr_assert(ne(ptr, f, NULL));
    cfg_dump(cfg, f);
    fclose(f);
    return text;
}

/* The dump shows every key with its value, never the password, and loads back the same. */
Test(cfg, dump)
{
    const char *pw, *ca;
    struct cfg cfg, again;
    char *text, *text2, line[512];
    const char *path;
    char err[512];

    load_full(&cfg, &pw, &ca);
    text = dump_str(&cfg);
    cr_expect(eq(ptr, strstr(text, "s3cret"), NULL), "password leaked:\n%s", text);
    snprintf(line, sizeof line, "\npassword_file = %s\n; password: ********", pw);
    cr_expect(ne(ptr, strstr(text, line), NULL), "%s", text);
    cr_expect(ne(ptr,
                 strstr(text, "\n[relayd]\nhostname = relay.example.net\n"
                              "spool = /tmp/relayd-spool\nmax_message_size = 10M\n"
                              "max_recipients = 50\nretry_first = 2m\nretry_max = 2h\n"
                              "max_lifetime = 3d\nworkers = 2\n"),
                 NULL),
              "%s", text);
    cr_expect(ne(ptr,
                 strstr(text, "\n[listener lan]\nlisten = 0.0.0.0:25\n"
                              "allow = 10.0.0.0/8, 192.168.0.0/16, fd00::/8\n"),
                 NULL),
              "%s", text);
    cr_expect(ne(ptr,
                 strstr(text, "\n[listener local]\nlisten = [::1]:2525\n"
                              "allow = 127.0.0.0/8, ::1/128\n"),
                 NULL),
              "%s", text);
    cr_expect(ne(ptr,
                 strstr(text, "\n[upstream backup]\nhost = smtp.example.org\nport = 465\n"
                              "tls = implicit\n; ca_file is not set\n; tls_name is not set\n"
                              "tls_priority = NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2\n"
                              "; username is not set\n; password_file is not set\n"
                              "; mechanisms is not set\nallow_plaintext_auth = no\n"
                              "connect_timeout = 30s\ncommand_timeout = 5m\n"),
                 NULL),
              "%s", text);
    cr_expect(ne(ptr, strstr(text, "\n[route default]\nupstream = m365\n"), NULL), "%s", text);

    /* What the dump says is what the daemon would run with: it loads back identically. */
    path = tmp_file(text, 0600);
    cr_assert(eq(int, cfg_load(path, &again, err, sizeof err), 0), "%s\n%s", err, text);
    text2 = dump_str(&again);
    cr_expect(eq(str, strchr(text2, '\n'), strchr(text, '\n')));
    cfg_free(&again);
    cfg_free(&cfg);
    free(text);
    free(text2);
}

/* The dump of the built-in default is a loadable file too. */
Test(cfg, dump_default_loads)
{
    struct cfg cfg, again;
    char *text, err[512];
    const char *path;

    cfg_default(&cfg, "/tmp/s");
    text = dump_str(&cfg);
    cr_expect(
        ne(ptr, strstr(text, "# relayd effective configuration from (built-in default)"), NULL),
        "%s", text);
    path = tmp_file(text, 0600);
    cr_expect(eq(int, cfg_load(path, &again, err, sizeof err), 0), "%s\n%s", err, text);
    cfg_free(&again);
    cfg_free(&cfg);
    free(text);
}

/* contrib/relayd.conf.example loads (with its password file swapped for a real one). */
Test(cfg, example_loads)
{
    static const char pwkey[] = "password_file = /etc/relayd/m365.password";
    char example[512], *text = NULL, *at, *fixed, err[512];
    const char *pw = tmp_file("pw\n", 0600), *path;
    size_t len = 0;
    struct cfg cfg;
    FILE *f;

    /* The source tree is two levels above this file. */
    snprintf(example, sizeof example, "%s", __FILE__);
    cr_assert(ne(ptr, strstr(example, "tests/unit/test_cfg.c"), NULL));
    strcpy(strstr(example, "tests/unit/test_cfg.c"), "contrib/relayd.conf.example");
    cr_assert(ne(ptr, (f = fopen(example, "r")), NULL), "%s: %s", example, strerror(errno));
    cr_assert(eq(long, (long)getdelim(&text, &len, '\0', f) > 0, 1));
    fclose(f);
    cr_assert(ne(ptr, (at = strstr(text, pwkey)), NULL));
    cr_assert(ge(int,
                 asprintf(&fixed, "%.*spassword_file = %s%s", (int)(at - text), text, pw,
                          at + strlen(pwkey)),
                 0));
    path = tmp_file(fixed, 0600);
    cr_assert(eq(int, cfg_load(path, &cfg, err, sizeof err), 0), "%s", err);
    cr_expect(eq(int, cfg.nlisteners, 1));
    cr_expect(eq(str, cfg.listeners[0].host, "0.0.0.0"));
    cr_expect(eq(int, cfg.upstreams[0].port, 587));
    cr_expect(eq(int, cfg.upstreams[0].tls, CFG_TLS_STARTTLS));
    cr_expect(eq(str, cfg.upstreams[0].host, "smtp.office365.com"));
    cr_expect(eq(str, route_match(&cfg, "scanner@example.com", "x@y.example", NULL, NULL)->name,
                 "default"));
    cfg_free(&cfg);
    free(fixed);
    free(text);
}

/* The inbound keys of issue #10: bare_lf's three words (and nothing else), their defaults. */
Test(cfg, listener_inbound_keys)
{
    static const struct {
        const char *label, *line;
        enum cfg_bare_lf want;
    } cases[] = {
        {"default", "", CFG_BARE_LF_ACCEPT},
        {"accept", "bare_lf = accept\n", CFG_BARE_LF_ACCEPT},
        {"normalize", "bare_lf = normalize\n", CFG_BARE_LF_NORMALIZE},
        {"reject", "bare_lf = reject\n", CFG_BARE_LF_REJECT},
    };
    char text[256];
    struct cfg cfg;

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        snprintf(text, sizeof text, LAN "%s", cases[i].line);
        load_ok(text, &cfg);
        cr_expect(eq(int, cfg.listeners[0].bare_lf_mode, cases[i].want), "%s", cases[i].label);
        cr_expect(eq(int, cfg.listeners[0].glued_dot, 0), "%s", cases[i].label);
        cr_expect(eq(int, cfg.listeners[0].handshake_timeout, 10), "%s", cases[i].label);
        cr_expect(eq(int, cfg.listeners[0].write_timeout, 60), "%s", cases[i].label);
        cr_expect(eq(int, cfg.listeners[0].listen_backlog, 4096), "%s", cases[i].label);
        cfg_free(&cfg);
    }
    expect_error("bare_lf word", LAN "bare_lf = lenient\n",
                 ":3: [listener lan] bare_lf: 'lenient' is not one of accept, normalize, reject");
}
