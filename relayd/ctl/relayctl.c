/*
 * relayctl - the operator's view of relayd's spool: list, show, cat, hold, release,
 * retry, delete, purge, stats.
 *
 * It works on the spool directly through the spool API (LMDB's multi-process locking
 * makes that safe while relayd runs): read-only commands open the spool read-only,
 * the others make one durable commit per message.  The spool directory comes from the
 * configuration file (-c, default /etc/relayd/relayd.conf) unless --spool names it.
 *
 * Exit codes: 0 success, 1 operational error (no such message, spool cannot be opened,
 * the operator said no), 2 usage error.  Errors go to stderr as
 * "relayctl: show 0190A3F2C1D4: no such message".  With several ids, every id is tried
 * and the status is 1 if any failed.  list --json, show --json and stats --json print one
 * JSON document whose keys are stable (new keys may be added, none renamed or removed).
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/json.h"
#include "common/log.h"
#include "common/netaddr.h"
#include "common/xalloc.h"
#include "config/cfg.h"
#include "relayd/ctl/ctl.h"
#include "relayd/ctl/ctl_control.h"
#include "relayd/ctl/ctl_devices.h"
#include "spool/spool.h"

static const char *prog = "relayctl";

static void usage(FILE *out)
{
    fprintf(out,
            "usage: %s [-c FILE | --spool DIR] COMMAND [ARGS]\n"
            "\n"
            "Inspects and manages relayd's mail spool (safe while relayd runs).\n"
            "\n"
            "options:\n"
            "  -c, --config FILE   configuration file to take the spool from (default %s)\n"
            "  -s, --spool DIR     spool directory (overrides the configuration)\n"
            "  -h, --help          this text\n"
            "\n"
            "commands:\n"
            "  list [--json] [FILTERS]    messages in the spool, oldest first\n"
            "      --state S              S: queued, deferred, held or failed\n"
            "      --from TEXT            sender contains TEXT (case-insensitive; <> is the\n"
            "                             null sender)\n"
            "      --to TEXT              some recipient contains TEXT (case-insensitive)\n"
            "      --client ADDR|CIDR     sent by this device or network (10.0.0.7, 10.0.0.0/24)\n"
            "      --older-than AGE       arrived more than AGE ago (90s, 30m, 2h, 3d, 1w)\n"
            "  show ID [--json]           envelope, recipients with their last reply, every\n"
            "                             attempt with the server's reply, headers\n"
            "  cat ID                     the message exactly as spooled\n"
            "  hold ID...                 keep messages until released\n"
            "  release ID...              queue held messages for delivery now\n"
            "  retry ID... | --all        attempt delivery now (--all: every queued or deferred\n"
            "                             message); a failed message retries its failed\n"
            "                             recipients, a held one is released; a running relayd\n"
            "                             starts it within about a second\n"
            "  delete ID... [--yes]       remove messages (asks on a terminal unless --yes)\n"
            "  purge --failed [--older-than AGE] [--yes]\n"
            "                             remove failed messages (asks unless --yes)\n"
            "  stats [--json] [--by-client]\n"
            "                             counts per state, bytes, oldest message age;\n"
            "                             --by-client: the same per sending device\n"
            "  devices [--json] [ADDR]    every client seen: listener, HELO name, first/last\n"
            "                             seen, messages accepted, refusals by reason with\n"
            "                             the last one's time and text\n"
            "  upstreams                  each upstream's state as relayd last saved it:\n"
            "                             health and reason, pause, rate window usage\n"
            "  oauth2 authorize NAME      OAuth 2.0 device-code sign-in for upstream NAME;\n"
            "                             stores the refresh token in refresh_token_file\n"
            "  oauth2 token NAME          obtain a token as relayd would (never printed)\n"
            "  test-upstream NAME         connect, TLS, verify, AUTH, QUIT; prints each step\n"
            "                             and a verdict (exit 0 only when all passed)\n"
            "  send-test NAME --to ADDR [--from ADDR] [--wait SECS]\n"
            "                             queue a test message through relayd and watch it\n"
            "  reload                     the running relayd re-reads its configuration;\n"
            "                             prints the error (file:line) when it is invalid\n"
            "  drain                      the running relayd stops accepting mail (421 to new\n"
            "                             connections) and goes on delivering what it holds\n"
            "  resume                     it accepts mail again\n"
            "  daemon-status              accepting or draining, and its queue counts\n"
            "\n"
            "list, show, cat and stats open the spool read-only: they need read permission\n"
            "on the spool directory and data.mdb, and write permission on lock.mdb (LMDB's\n"
            "reader table).  Without the latter they read unlocked, retrying when relayd\n"
            "commits meanwhile.\n"
            "\n"
            "exit status: 0 success, 1 operational error (no such message, spool cannot be\n"
            "opened, nothing confirmed), 2 usage error\n",
            prog, CTL_DEFAULT_CONFIG);
}

/* ---- output helpers ---- */

/* RFC 3339 UTC, "2026-11-22T16:20:00Z". */
static const char *fmt_time(int64_t t, char out[32])
{
    time_t tt = (time_t)t;
    struct tm tm;

    if (gmtime_r(&tt, &tm) == NULL || strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, 32, "%lld", (long long)t);
    return out;
}

static void json_time(FILE *out, int64_t t)
{
    char tb[32];

    if (t == 0)
        fputs("null", out);
    else
        fprintf(out, "\"%s\"", fmt_time(t, tb));
}

static const char *rcpt_status_name(enum spool_rcpt_status st)
{
    switch (st) {
    case SPOOL_RCPT_PENDING:
        return "pending";
    case SPOOL_RCPT_SENT:
        return "sent";
    case SPOOL_RCPT_FAILED:
        return "failed";
    }
    return "unknown";
}

/* RFC 3461 NOTIFY bits as the parameter is written ("FAILURE,DELAY"); "" for none. */
static const char *notify_words(unsigned bits, char out[40])
{
    out[0] = '\0';
    if (bits & SPOOL_NOTIFY_NEVER)
        strcat(out, "NEVER");
    if (bits & SPOOL_NOTIFY_SUCCESS)
        strcat(out, out[0] ? ",SUCCESS" : "SUCCESS");
    if (bits & SPOOL_NOTIFY_FAILURE)
        strcat(out, out[0] ? ",FAILURE" : "FAILURE");
    if (bits & SPOOL_NOTIFY_DELAY)
        strcat(out, out[0] ? ",DELAY" : "DELAY");
    return out;
}

static const char *ret_word(int ret)
{
    return ret == SPOOL_RET_FULL ? "FULL" : ret == SPOOL_RET_HDRS ? "HDRS" : NULL;
}

/* The keys shared by list --json and show --json (without the closing brace). */
static void json_msg_fields(FILE *out, const struct spool_msg *m)
{
    char id[17];

    fprintf(out, "{\"id\":\"%s\",\"state\":\"%s\",\"sender\":", spool_id_str(m->id, id),
            spool_state_name(m->state));
    json_fput(out, m->sender);
    fputs(",\"recipients\":[", out);
    for (size_t i = 0; i < m->nrcpts; i++) {
        if (i > 0)
            putc(',', out);
        json_fput(out, m->rcpts[i].addr);
    }
    fputs("],\"rcpt_status\":[", out);
    for (size_t i = 0; i < m->nrcpts; i++)
        fprintf(out, "%s\"%s\"", i > 0 ? "," : "", rcpt_status_name(m->rcpts[i].status));
    fprintf(out, "],\"size\":%llu,\"arrived\":", (unsigned long long)m->size);
    json_time(out, m->arrived);
    fprintf(out, ",\"attempts\":%d,\"next_attempt\":", m->attempts);
    json_time(out, m->state == SPOOL_QUEUED || m->state == SPOOL_DEFERRED ? m->next_attempt : 0);
    fputs(",\"last_error\":", out);
    json_fput(out, m->last_error);
    fputs(",\"client\":", out);
    json_fput(out, m->client);
    fputs(",\"helo\":", out);
    json_fput(out, m->helo);
    fputs(",\"listener\":", out);
    json_fput(out, m->listener);
}

/* Copies s into out (size n) on one line, shortened with "..." when longer. */
static const char *shorten(const char *s, char *out, size_t n)
{
    size_t i, len;

    if (s == NULL)
        return "-";
    for (i = 0; s[i] != '\0' && i + 1 < n; i++)
        out[i] = (s[i] == '\r' || s[i] == '\n' || s[i] == '\t') ? ' ' : s[i];
    out[i] = '\0';
    len = strlen(s);
    if (len >= n && n > 4)
        memcpy(out + n - 4, "...", 4);
    return out;
}

/* s for a human line: control characters (a reply's CRLF) shown as spaces.  Returns a
 * malloc'd copy kept in a small ring, so callers need not free it. */
static const char *oneline(const char *s)
{
    static char *ring[8];
    static unsigned next;
    char *o;

    if (s == NULL)
        return "-";
    o = xstrdup(s);
    for (char *p = o; *p != '\0'; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7F)
            *p = ' ';
    /* Trailing spaces from a stripped CRLF help nobody. */
    for (size_t n = strlen(o); n > 0 && o[n - 1] == ' '; n--)
        o[n - 1] = '\0';
    free(ring[next % 8]);
    ring[next++ % 8] = o;
    return o;
}

/* ---- commands ---- */

struct spool *ctl_spool(struct ctl *c)
{
    struct spool_opts o = {.readonly = c->access != CTL_SPOOL_WRITE};
    char err[512];
    int rc;

    if (c->sp != NULL)
        return c->sp;
    if (c->access == CTL_SPOOL_NONE)
        log_panic("relayctl: %s opens the spool but its table row says it does not", c->cmd);
    if ((rc = spool_open(c->spool_dir, &o, &c->sp, err, sizeof(err))) != 0) {
        fprintf(stderr, "%s: %s\n", prog, err[0] ? err : spool_strerror(rc));
        c->sp = NULL;
        return NULL;
    }
    return c->sp;
}

/* Parses one queue id argument; prints the usage-level complaint itself. */
static int parse_id(struct ctl *c, const char *arg, uint64_t *id)
{
    if (spool_id_parse(arg, id) != 0) {
        fprintf(stderr, "%s: %s %s: not a queue id\n", prog, c->cmd, arg);
        return -1;
    }
    return 0;
}

static void report(struct ctl *c, const char *arg, int rc)
{
    fprintf(stderr, "%s: %s %s: %s\n", prog, c->cmd, arg, spool_strerror(rc));
}

/* "--name VALUE" or "--name=VALUE" at argv[*i]: 1 and *val set (advancing *i past a
 * separate value), 0 when argv[*i] is another argument, -1 when the value is missing. */
static int opt_value(int argc, char **argv, int *i, const char *name, const char **val)
{
    size_t n = strlen(name);

    if (strncmp(argv[*i], name, n) != 0)
        return 0;
    if (argv[*i][n] == '=') {
        *val = argv[*i] + n + 1;
        return 1;
    }
    if (argv[*i][n] != '\0')
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "%s: %s wants a value\n", prog, name);
        return -1;
    }
    *val = argv[++*i];
    return 1;
}

/* "90", "90s", "30m", "2h", "3d", "1w" -> seconds; -1 when not such a duration. */
static int64_t parse_age(const char *text)
{
    char *end;
    long long n;
    int64_t mult = 1;

    if (text == NULL || !isdigit((unsigned char)text[0]))
        return -1;
    errno = 0;
    n = strtoll(text, &end, 10);
    if (errno != 0 || n < 0)
        return -1;
    if (*end != '\0') {
        switch (tolower((unsigned char)*end)) {
        case 's':
            mult = 1;
            break;
        case 'm':
            mult = 60;
            break;
        case 'h':
            mult = 3600;
            break;
        case 'd':
            mult = 86400;
            break;
        case 'w':
            mult = 7 * 86400;
            break;
        default:
            return -1;
        }
        if (end[1] != '\0')
            return -1;
    }
    if (n > INT64_MAX / mult / 2)
        return -1;
    return (int64_t)n * mult;
}

/* Case-insensitive "needle occurs in hay". */
static int contains_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);

    if (hay == NULL)
        return 0;
    for (; *hay != '\0'; hay++)
        if (strncasecmp(hay, needle, n) == 0)
            return 1;
    return n == 0;
}

/* 1 when the client address text lies inside net. */
static int client_in(const char *client, const struct netaddr_net *net)
{
    struct sockaddr_storage ss;

    memset(&ss, 0, sizeof(ss));
    if (client == NULL)
        return 0;
    if (inet_pton(AF_INET, client, &((struct sockaddr_in *)&ss)->sin_addr) == 1)
        ss.ss_family = AF_INET;
    else if (inet_pton(AF_INET6, client, &((struct sockaddr_in6 *)&ss)->sin6_addr) == 1)
        ss.ss_family = AF_INET6;
    else
        return 0;
    return netaddr_net_match(net, (struct sockaddr *)&ss);
}

/* Message filters shared by list (and usable by other commands). */
struct filter {
    int state;             /* 0: any */
    const char *from, *to; /* substrings; NULL: any */
    int have_client;
    struct netaddr_net client;
    int64_t arrived_before; /* 0: any */
};

/* Parses one filter option at argv[*i]: 1 taken, 0 not a filter option, -1 bad value. */
static int filter_opt(struct filter *f, const char *cmd, int argc, char **argv, int *i)
{
    const char *v;
    char why[160];
    int64_t age;
    int r;

    if ((r = opt_value(argc, argv, i, "--state", &v)) != 0) {
        if (r > 0 && (f->state = spool_state_parse(v)) < 0) {
            fprintf(stderr, "%s: %s: --state wants queued, deferred, held or failed\n", prog, cmd);
            return -1;
        }
        return r;
    }
    if ((r = opt_value(argc, argv, i, "--from", &v)) != 0) {
        /* "<>" and "" both mean the null sender, matched exactly. */
        f->from = v;
        return r;
    }
    if ((r = opt_value(argc, argv, i, "--to", &v)) != 0) {
        f->to = v;
        return r;
    }
    if ((r = opt_value(argc, argv, i, "--client", &v)) != 0) {
        if (r > 0 && netaddr_net_parse(v, &f->client, why, sizeof(why)) != 0) {
            fprintf(stderr, "%s: %s: --client: %s\n", prog, cmd, why);
            return -1;
        }
        f->have_client = 1;
        return r;
    }
    if ((r = opt_value(argc, argv, i, "--older-than", &v)) != 0) {
        if (r > 0 && (age = parse_age(v)) < 0) {
            fprintf(stderr, "%s: %s: --older-than %s: not an age (90s, 30m, 2h, 3d, 1w)\n", prog,
                    cmd, v);
            return -1;
        }
        if (r > 0)
            f->arrived_before = (int64_t)time(NULL) - age;
        return r;
    }
    return 0;
}

static int filter_match(const struct filter *f, const struct spool_msg *m)
{
    if (f->state > 0 && (int)m->state != f->state)
        return 0;
    if (f->arrived_before != 0 && m->arrived >= f->arrived_before)
        return 0;
    if (f->from != NULL) {
        if (strcmp(f->from, "<>") == 0 || f->from[0] == '\0') {
            if (m->sender[0] != '\0')
                return 0;
        } else if (!contains_ci(m->sender, f->from)) {
            return 0;
        }
    }
    if (f->to != NULL) {
        size_t i;

        for (i = 0; i < m->nrcpts; i++)
            if (contains_ci(m->rcpts[i].addr, f->to))
                break;
        if (i == m->nrcpts)
            return 0;
    }
    if (f->have_client && !client_in(m->client, &f->client))
        return 0;
    return 1;
}

struct list_arg {
    int json, n;
    struct filter f;
};

static int list_one(const struct spool_msg *m, void *arg)
{
    struct list_arg *la = arg;
    char id[17], tb[32], sender[25], rcpt[64], err[41], more[24] = "", cl[16];

    if (!filter_match(&la->f, m))
        return 0;
    if (la->json) {
        fputs(la->n > 0 ? ",\n" : "\n", stdout);
        json_msg_fields(stdout, m);
        putchar('}');
        la->n++;
        return 0;
    }
    if (la->n++ == 0)
        printf("%-12s  %-8s  %-20s  %8s  %-15s  %-24s  %-28s  %3s  %s\n", "ID", "STATE", "ARRIVED",
               "SIZE", "CLIENT", "SENDER", "RECIPIENTS", "ATT", "LAST ERROR");
    if (m->nrcpts > 1)
        snprintf(more, sizeof(more), " +%zu", m->nrcpts - 1);
    {
        char first[29];

        shorten(m->nrcpts ? m->rcpts[0].addr : "-", first, sizeof(first) - strlen(more));
        snprintf(rcpt, sizeof(rcpt), "%s%s", first, more);
    }
    printf("%-12s  %-8s  %-20s  %8llu  %-15s  %-24s  %-28s  %3d  %s\n", spool_id_str(m->id, id),
           spool_state_name(m->state), fmt_time(m->arrived, tb), (unsigned long long)m->size,
           shorten(m->client, cl, sizeof(cl)),
           m->sender[0] ? shorten(m->sender, sender, sizeof(sender)) : "<>", rcpt, m->attempts,
           shorten(m->last_error, err, sizeof(err)));
    return 0;
}

static int cmd_list(struct ctl *c, int argc, char **argv)
{
    struct list_arg la = {0};
    int rc;

    for (int i = 0; i < argc; i++) {
        int r;

        if (strcmp(argv[i], "--json") == 0) {
            la.json = 1;
        } else if ((r = filter_opt(&la.f, "list", argc, argv, &i)) != 0) {
            if (r < 0)
                return CTL_EXIT_USAGE;
        } else {
            fprintf(stderr, "%s: list: unexpected argument %s\n", prog, argv[i]);
            return CTL_EXIT_USAGE;
        }
    }
    if (ctl_spool(c) == NULL)
        return CTL_EXIT_FAIL;
    if (la.json)
        putchar('[');
    rc = spool_foreach(c->sp, list_one, &la);
    if (la.json)
        fputs(la.n > 0 ? "\n]\n" : "]\n", stdout);
    if (rc != 0) {
        fprintf(stderr, "%s: list: %s\n", prog, spool_strerror(rc));
        return CTL_EXIT_FAIL;
    }
    return 0;
}

/* The header section of a body: up to (not including) the first empty line. */
static size_t header_len(const char *body, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if (body[i] != '\n')
            continue;
        if (i + 1 < len && body[i + 1] == '\n')
            return i + 1;
        if (i + 2 < len && body[i + 1] == '\r' && body[i + 2] == '\n')
            return i + 1;
    }
    return len;
}

static int cmd_show(struct ctl *c, int argc, char **argv)
{
    const char *arg = NULL;
    struct spool_msg *m;
    uint64_t id;
    int json = 0, rc;
    char *body = NULL, tb[32], ids[17];
    size_t len = 0, hlen;

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (arg == NULL && argv[i][0] != '-') {
            arg = argv[i];
        } else {
            fprintf(stderr, "%s: show: unexpected argument %s\n", prog, argv[i]);
            return CTL_EXIT_USAGE;
        }
    }
    if (arg == NULL) {
        fprintf(stderr, "%s: show: which message? (relayctl show ID)\n", prog);
        return CTL_EXIT_USAGE;
    }
    if (parse_id(c, arg, &id) != 0)
        return CTL_EXIT_USAGE;
    if (ctl_spool(c) == NULL)
        return CTL_EXIT_FAIL;
    if ((rc = spool_msg_get(c->sp, id, SPOOL_GET_HISTORY, &m)) != 0) {
        report(c, arg, rc);
        return CTL_EXIT_FAIL;
    }
    /* A body missing next to its envelope is worth saying, not fatal. */
    if ((rc = spool_body_get(c->sp, id, &body, &len)) != 0)
        fprintf(stderr, "%s: show %s: body: %s\n", prog, arg, spool_strerror(rc));
    hlen = body != NULL ? header_len(body, len) : 0;

    if (json) {
        char nw[40];

        json_msg_fields(stdout, m);
        /* RFC 3461 parameters as the client gave them (null: not given). */
        fputs(",\"dsn_ret\":", stdout);
        json_fput(stdout, ret_word(m->dsn_ret));
        fputs(",\"dsn_envid\":", stdout);
        json_fput(stdout, m->dsn_envid);
        fputs(",\"rcpts\":[", stdout);
        for (size_t i = 0; i < m->nrcpts; i++) {
            fputs(i > 0 ? ",{\"addr\":" : "{\"addr\":", stdout);
            json_fput(stdout, m->rcpts[i].addr);
            printf(",\"status\":\"%s\",\"reply\":", rcpt_status_name(m->rcpts[i].status));
            json_fput(stdout, m->rcpts[i].reply);
            fputs(",\"dsn_notify\":", stdout);
            json_fput(stdout,
                      m->rcpts[i].dsn_notify ? notify_words(m->rcpts[i].dsn_notify, nw) : NULL);
            fputs(",\"dsn_orcpt\":", stdout);
            json_fput(stdout, m->rcpts[i].dsn_orcpt);
            putchar('}');
        }
        fputs("],\"history\":[", stdout);
        for (size_t i = 0; i < m->nattempts_log; i++) {
            fputs(i > 0 ? ",{\"when\":" : "{\"when\":", stdout);
            json_time(stdout, m->attempts_log[i].when);
            fputs(",\"upstream\":", stdout);
            json_fput(stdout, m->attempts_log[i].upstream);
            fputs(",\"result\":", stdout);
            json_fput(stdout, m->attempts_log[i].result);
            putchar('}');
        }
        fputs("],\"headers\":", stdout);
        if (body != NULL)
            json_fput_n(stdout, body, hlen);
        else
            fputs("null", stdout);
        fputs("}\n", stdout);
    } else {
        printf("id:           %s\n", spool_id_str(m->id, ids));
        printf("state:        %s\n", spool_state_name(m->state));
        printf("arrived:      %s\n", fmt_time(m->arrived, tb));
        if (m->state == SPOOL_QUEUED || m->state == SPOOL_DEFERRED)
            printf("next attempt: %s\n", fmt_time(m->next_attempt, tb));
        printf("attempts:     %d\n", m->attempts);
        if (m->config_wait != 0 || m->config_since != 0) {
            /* Time held on a relay configuration fault: not counted toward max_lifetime. */
            int64_t w = m->config_wait;

            if (m->config_since > 0 && time(NULL) > m->config_since)
                w += (int64_t)time(NULL) - m->config_since;
            printf("config wait:  %llds (not counted toward max_lifetime)%s\n", (long long)w,
                   m->config_since > 0 ? ", waiting now" : "");
        }
        printf("size:         %llu\n", (unsigned long long)m->size);
        printf("sender:       <%s>\n", oneline(m->sender));
        printf("client:       %s\n", oneline(m->client));
        printf("helo:         %s\n", oneline(m->helo));
        printf("listener:     %s\n", oneline(m->listener));
        printf("last error:   %s\n", oneline(m->last_error));
        if (m->dsn_ret != 0 || m->dsn_envid != NULL)
            printf("dsn:          ret=%s envid=%s\n", m->dsn_ret ? ret_word(m->dsn_ret) : "-",
                   m->dsn_envid ? oneline(m->dsn_envid) : "-");
        printf("recipients:\n");
        for (size_t i = 0; i < m->nrcpts; i++) {
            char nw[40];

            printf("  %-8s <%s>%s%s\n", rcpt_status_name(m->rcpts[i].status),
                   oneline(m->rcpts[i].addr), m->rcpts[i].reply ? "  " : "",
                   m->rcpts[i].reply ? oneline(m->rcpts[i].reply) : "");
            if (m->rcpts[i].dsn_notify != 0 || m->rcpts[i].dsn_orcpt != NULL)
                printf("           dsn: notify=%s orcpt=%s\n",
                       m->rcpts[i].dsn_notify ? notify_words(m->rcpts[i].dsn_notify, nw) : "-",
                       m->rcpts[i].dsn_orcpt ? oneline(m->rcpts[i].dsn_orcpt) : "-");
        }
        printf("history:%s\n", m->nattempts_log ? "" : " none");
        for (size_t i = 0; i < m->nattempts_log; i++)
            printf("  %s  %s  %s\n", fmt_time(m->attempts_log[i].when, tb),
                   oneline(m->attempts_log[i].upstream), oneline(m->attempts_log[i].result));
        printf("headers:\n");
        for (size_t i = 0; i < hlen;) {
            size_t e = i;

            while (e < hlen && body[e] != '\n')
                e++;
            printf("  %.*s\n", (int)(e > i && body[e - 1] == '\r' ? e - 1 - i : e - i), body + i);
            i = e + 1;
        }
    }
    free(body);
    spool_msg_free(m);
    return 0;
}

static int cmd_cat(struct ctl *c, int argc, char **argv)
{
    uint64_t id;
    char *body;
    size_t len;
    int rc;

    if (argc != 1) {
        fprintf(stderr, "%s: cat: wants exactly one queue id\n", prog);
        return CTL_EXIT_USAGE;
    }
    if (parse_id(c, argv[0], &id) != 0)
        return CTL_EXIT_USAGE;
    if (ctl_spool(c) == NULL)
        return CTL_EXIT_FAIL;
    if ((rc = spool_body_get(c->sp, id, &body, &len)) != 0) {
        report(c, argv[0], rc);
        return CTL_EXIT_FAIL;
    }
    rc = fwrite(body, 1, len, stdout) == len && fflush(stdout) == 0 ? 0 : CTL_EXIT_FAIL;
    if (rc != 0)
        fprintf(stderr, "%s: cat %s: write: %s\n", prog, argv[0], strerror(errno));
    free(body);
    return rc;
}

enum action { ACT_HOLD, ACT_RELEASE, ACT_RETRY, ACT_DELETE };

static int act_one(struct ctl *c, enum action act, uint64_t id, const char *arg)
{
    static const char *const done_word[] = {"held", "released", "queued for retry", "deleted"};
    struct spool_msg *m = NULL;
    char ids[17];
    int rc;

    switch (act) {
    case ACT_HOLD:
        rc = spool_msg_set_state(c->sp, id, SPOOL_HELD);
        break;
    case ACT_RELEASE:
        /* Only held messages: releasing a failed one would queue it with nothing pending. */
        if ((rc = spool_msg_get(c->sp, id, 0, &m)) == 0 && m->state != SPOOL_HELD) {
            fprintf(stderr, "%s: release %s: message is %s, not held%s\n", prog, arg,
                    spool_state_name(m->state), m->state == SPOOL_FAILED ? " (use retry)" : "");
            spool_msg_free(m);
            return -1;
        }
        spool_msg_free(m);
        if (rc == 0)
            rc = spool_msg_set_state(c->sp, id, SPOOL_QUEUED);
        break;
    case ACT_RETRY:
        rc = spool_msg_retry(c->sp, id);
        break;
    case ACT_DELETE:
    default:
        rc = spool_msg_delete(c->sp, id);
        break;
    }
    if (rc != 0) {
        report(c, arg, rc);
        return -1;
    }
    printf("%s: %s\n", spool_id_str(id, ids), done_word[act]);
    return 0;
}

/* Asks on the terminal; 1 when the answer starts with y. */
static int confirm(size_t n)
{
    char line[32];

    if (n == 0)
        fprintf(stderr, "Delete them? [y/N] ");
    else
        fprintf(stderr, "Delete %zu message%s? [y/N] ", n, n == 1 ? "" : "s");
    if (fgets(line, sizeof(line), stdin) == NULL)
        return 0;
    return line[0] == 'y' || line[0] == 'Y';
}

static int cmd_action(struct ctl *c, enum action act, int argc, char **argv)
{
    uint64_t *ids = xcalloc((size_t)argc + 1, sizeof(*ids));
    const char **args = xcalloc((size_t)argc + 1, sizeof(*args));
    size_t n = 0;
    int all = 0, yes = 0, failed = 0, rc = 0;

    for (int i = 0; i < argc; i++) {
        if (act == ACT_RETRY && strcmp(argv[i], "--all") == 0) {
            all = 1;
        } else if (act == ACT_DELETE &&
                   (strcmp(argv[i], "--yes") == 0 || strcmp(argv[i], "-y") == 0)) {
            yes = 1;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "%s: %s: unknown option %s\n", prog, c->cmd, argv[i]);
            rc = CTL_EXIT_USAGE;
            goto out;
        } else {
            if (parse_id(c, argv[i], &ids[n]) != 0) {
                rc = CTL_EXIT_USAGE;
                goto out;
            }
            args[n++] = argv[i];
        }
    }
    if (all && n > 0) {
        fprintf(stderr, "%s: retry: either queue ids or --all\n", prog);
        rc = CTL_EXIT_USAGE;
        goto out;
    }
    if (!all && n == 0) {
        fprintf(stderr, "%s: %s: which messages? (relayctl %s ID...%s)\n", prog, c->cmd, c->cmd,
                act == ACT_RETRY ? " or --all" : "");
        rc = CTL_EXIT_USAGE;
        goto out;
    }
    if (act == ACT_DELETE && !yes) {
        if (!isatty(STDIN_FILENO)) {
            fprintf(stderr, "%s: delete: not a terminal; add --yes to delete without asking\n",
                    prog);
            rc = CTL_EXIT_USAGE;
            goto out;
        }
        if (!confirm(n)) {
            fprintf(stderr, "%s: delete: nothing deleted\n", prog);
            rc = CTL_EXIT_FAIL;
            goto out;
        }
    }
    if (ctl_spool(c) == NULL) {
        rc = CTL_EXIT_FAIL;
        goto out;
    }
    if (all) {
        /* A few transactions of thousands of messages each, not one per message. */
        size_t nall = 0;
        int frc = spool_retry_all(c->sp, &nall);

        if (frc != 0) {
            fprintf(stderr, "%s: retry: %s\n", prog, spool_strerror(frc));
            failed++;
        }
        if (nall == 0 && frc == 0)
            printf("no queued or deferred messages\n");
        else if (nall > 0)
            printf("%zu message%s queued for retry\n", nall, nall == 1 ? "" : "s");
    }
    for (size_t i = 0; i < n; i++)
        failed += act_one(c, act, ids[i], args[i]) != 0;
    rc = failed ? CTL_EXIT_FAIL : 0;
out:
    free(ids);
    free(args);
    return rc;
}

static int cmd_purge(struct ctl *c, int argc, char **argv)
{
    struct filter f = {0};
    int failed = 0, yes = 0, r, rc;
    size_t removed = 0;
    char tb[32];

    for (int i = 0; i < argc; i++) {
        const char *v;

        if (strcmp(argv[i], "--failed") == 0) {
            failed = 1;
        } else if (strcmp(argv[i], "--yes") == 0 || strcmp(argv[i], "-y") == 0) {
            yes = 1;
        } else if ((r = opt_value(argc, argv, &i, "--older-than", &v)) != 0) {
            int64_t age = r > 0 ? parse_age(v) : -1;

            if (age < 0) {
                if (r > 0)
                    fprintf(stderr, "%s: purge: --older-than %s: not an age (90s, 30m, 2h, 3d)\n",
                            prog, v);
                return CTL_EXIT_USAGE;
            }
            f.arrived_before = (int64_t)time(NULL) - age;
        } else {
            fprintf(stderr, "%s: purge: unexpected argument %s\n", prog, argv[i]);
            return CTL_EXIT_USAGE;
        }
    }
    if (!failed) {
        fprintf(stderr, "%s: purge: say what to purge: relayctl purge --failed\n", prog);
        return CTL_EXIT_USAGE;
    }
    if (!yes) {
        if (!isatty(STDIN_FILENO)) {
            fprintf(stderr, "%s: purge: not a terminal; add --yes to purge without asking\n", prog);
            return CTL_EXIT_USAGE;
        }
        if (f.arrived_before != 0)
            fprintf(stderr, "Failed messages that arrived before %s will be deleted.\n",
                    fmt_time(f.arrived_before, tb));
        else
            fprintf(stderr, "Every failed message will be deleted.\n");
        if (!confirm(0)) {
            fprintf(stderr, "%s: purge: nothing deleted\n", prog);
            return CTL_EXIT_FAIL;
        }
    }
    if (ctl_spool(c) == NULL)
        return CTL_EXIT_FAIL;
    if ((rc = spool_purge(c->sp, SPOOL_FAILED, f.arrived_before, &removed)) != 0) {
        fprintf(stderr, "%s: purge: %s\n", prog, spool_strerror(rc));
        return CTL_EXIT_FAIL;
    }
    printf("%zu failed message%s deleted\n", removed, removed == 1 ? "" : "s");
    return 0;
}

/* Per-device figures for stats --by-client. */
struct client_stat {
    char *client;
    uint64_t messages, bytes, by_state[5];
    int64_t oldest;
};

struct client_stats {
    struct client_stat *v;
    size_t n, cap;
};

static int client_stat_add(const struct spool_msg *m, void *arg)
{
    struct client_stats *cs = arg;
    const char *client = m->client != NULL ? m->client : "-";
    struct client_stat *e = NULL;

    for (size_t i = 0; i < cs->n; i++) {
        if (strcmp(cs->v[i].client, client) == 0) {
            e = &cs->v[i];
            break;
        }
    }
    if (e == NULL) {
        if (cs->n == cs->cap) {
            cs->cap = cs->cap ? cs->cap * 2 : 16;
            cs->v = xrealloc(cs->v, cs->cap * sizeof(*cs->v));
        }
        e = &cs->v[cs->n++];
        memset(e, 0, sizeof(*e));
        e->client = xstrdup(client);
    }
    e->messages++;
    e->bytes += m->size;
    if (m->state >= SPOOL_QUEUED && m->state <= SPOOL_FAILED)
        e->by_state[m->state]++;
    if (e->oldest == 0 || m->arrived < e->oldest)
        e->oldest = m->arrived;
    return 0;
}

static int client_stat_cmp(const void *a, const void *b)
{
    const struct client_stat *x = a, *y = b;

    if (x->messages != y->messages)
        return x->messages > y->messages ? -1 : 1;
    return strcmp(x->client, y->client);
}

static void print_age(int64_t arrived)
{
    long long age = arrived != 0 ? (long long)(time(NULL) - arrived) : 0;

    if (arrived == 0)
        printf("-");
    else if (age >= 86400)
        printf("%lldd%02lldh", age / 86400, (age % 86400) / 3600);
    else
        printf("%lldh%02lldm", age / 3600, (age % 3600) / 60);
}

static int cmd_stats(struct ctl *c, int argc, char **argv)
{
    struct spool_stats st;
    struct client_stats cs = {0};
    char tb[32];
    int json = 0, by_client = 0, rc;

    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (strcmp(argv[i], "--by-client") == 0) {
            by_client = 1;
        } else {
            fprintf(stderr, "%s: stats: unexpected argument %s\n", prog, argv[i]);
            return CTL_EXIT_USAGE;
        }
    }
    if (ctl_spool(c) == NULL)
        return CTL_EXIT_FAIL;
    if ((rc = spool_stats(c->sp, &st)) != 0 ||
        (by_client && (rc = spool_foreach(c->sp, client_stat_add, &cs)) != 0)) {
        fprintf(stderr, "%s: stats: %s\n", prog, spool_strerror(rc));
        rc = CTL_EXIT_FAIL;
        goto out;
    }
    if (cs.n > 1)
        qsort(cs.v, cs.n, sizeof(*cs.v), client_stat_cmp);
    if (json) {
        printf("{\"messages\":%llu", (unsigned long long)st.messages);
        for (int s = SPOOL_QUEUED; s <= SPOOL_FAILED; s++)
            printf(",\"%s\":%llu", spool_state_name(s), (unsigned long long)st.by_state[s]);
        printf(",\"recipients_pending\":%llu,\"bytes\":%llu,\"oldest_arrival\":",
               (unsigned long long)st.recipients, (unsigned long long)st.bytes);
        json_time(stdout, st.oldest_arrival);
        printf(",\"oldest_age\":%lld",
               st.oldest_arrival ? (long long)(time(NULL) - st.oldest_arrival) : 0LL);
        printf(",\"map_bytes\":%llu,\"used_bytes\":%llu", (unsigned long long)st.map_bytes,
               (unsigned long long)st.used_bytes);
        if (by_client) {
            fputs(",\"by_client\":[", stdout);
            for (size_t i = 0; i < cs.n; i++) {
                fputs(i > 0 ? ",{\"client\":" : "{\"client\":", stdout);
                json_fput(stdout, cs.v[i].client);
                printf(",\"messages\":%llu", (unsigned long long)cs.v[i].messages);
                for (int s = SPOOL_QUEUED; s <= SPOOL_FAILED; s++)
                    printf(",\"%s\":%llu", spool_state_name(s),
                           (unsigned long long)cs.v[i].by_state[s]);
                printf(",\"bytes\":%llu,\"oldest_arrival\":", (unsigned long long)cs.v[i].bytes);
                json_time(stdout, cs.v[i].oldest);
                putchar('}');
            }
            putchar(']');
        }
        fputs("}\n", stdout);
        rc = 0;
        goto out;
    }
    if (by_client) {
        printf("%-39s  %8s  %8s  %8s  %8s  %8s  %12s  %s\n", "CLIENT", "MESSAGES", "QUEUED",
               "DEFERRED", "HELD", "FAILED", "BYTES", "OLDEST");
        for (size_t i = 0; i < cs.n; i++) {
            const struct client_stat *e = &cs.v[i];

            printf("%-39s  %8llu  %8llu  %8llu  %8llu  %8llu  %12llu  ", oneline(e->client),
                   (unsigned long long)e->messages, (unsigned long long)e->by_state[SPOOL_QUEUED],
                   (unsigned long long)e->by_state[SPOOL_DEFERRED],
                   (unsigned long long)e->by_state[SPOOL_HELD],
                   (unsigned long long)e->by_state[SPOOL_FAILED], (unsigned long long)e->bytes);
            print_age(e->oldest);
            putchar('\n');
        }
        if (cs.n == 0)
            printf("(no messages)\n");
        rc = 0;
        goto out;
    }
    printf("messages:           %llu\n", (unsigned long long)st.messages);
    for (int s = SPOOL_QUEUED; s <= SPOOL_FAILED; s++)
        printf("  %-17s %llu\n", spool_state_name(s), (unsigned long long)st.by_state[s]);
    printf("recipients pending: %llu\n", (unsigned long long)st.recipients);
    printf("bytes:              %llu\n", (unsigned long long)st.bytes);
    if (st.oldest_arrival != 0) {
        long long age = (long long)(time(NULL) - st.oldest_arrival);

        printf("oldest:             %s (%lldh%02lldm ago)\n", fmt_time(st.oldest_arrival, tb),
               age / 3600, (age % 3600) / 60);
    } else {
        printf("oldest:             -\n");
    }
    printf("map:                %.1f MiB (%.1f MiB used)\n", st.map_bytes / 1048576.0,
           st.used_bytes / 1048576.0);
    rc = 0;
out:
    for (size_t i = 0; i < cs.n; i++)
        free(cs.v[i].client);
    free(cs.v);
    return rc;
}

static int cmd_hold(struct ctl *c, int argc, char **argv)
{
    return cmd_action(c, ACT_HOLD, argc, argv);
}

static int cmd_release(struct ctl *c, int argc, char **argv)
{
    return cmd_action(c, ACT_RELEASE, argc, argv);
}

static int cmd_retry(struct ctl *c, int argc, char **argv)
{
    return cmd_action(c, ACT_RETRY, argc, argv);
}

static int cmd_delete(struct ctl *c, int argc, char **argv)
{
    return cmd_action(c, ACT_DELETE, argc, argv);
}

/* relayctl devices: relayd/ctl/ctl_devices.c. */
static int cmd_devices(struct ctl *c, int argc, char **argv)
{
    struct spool *sp = ctl_spool(c);

    return sp != NULL ? ctl_devices(sp, argc, argv) : CTL_EXIT_FAIL;
}

/* relayctl upstreams: the upstream state relayd keeps in the spool (spool_upstate_list();
 * written at most a second after each change), one line per upstream. */
static int cmd_upstreams(struct ctl *c, int argc, char **argv)
{
    struct spool *sp = ctl_spool(c);
    struct spool_upstate *list = NULL;
    struct timespec ts;
    int64_t now;
    size_t n = 0;
    int rc;

    (void)argv;
    if (argc != 0) {
        fprintf(stderr, "%s: upstreams: no arguments expected\n", c->prog);
        return CTL_EXIT_USAGE;
    }
    if (sp == NULL)
        return CTL_EXIT_FAIL;
    if ((rc = spool_upstate_list(sp, &list, &n)) != 0) {
        fprintf(stderr, "%s: upstreams: %s\n", c->prog, spool_strerror(rc));
        return CTL_EXIT_FAIL;
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    for (size_t i = 0; i < n; i++) {
        const struct spool_upstate *u = &list[i];
        int64_t rcpts = 0;
        size_t msgs = 0;

        for (size_t k = 0; k < u->nsent; k++)
            msgs += u->sent[k] + 60000 > now;
        for (size_t k = 0; k < u->nbuckets; k++)
            if ((u->buckets[k].minute + 1440) * 60000 > now)
                rcpts += u->buckets[k].count;
        printf("%s: ", u->name);
        if (u->unhealthy)
            printf("unhealthy for %llds: %s%s%s", (long long)((now - u->since) / 1000),
                   u->reason != NULL ? u->reason : "", u->action != NULL ? "; action: " : "",
                   u->action != NULL ? u->action : "");
        else
            printf("healthy");
        if (u->paused_until > now)
            printf("; paused for %llds more", (long long)((u->paused_until - now + 999) / 1000));
        printf("; %zu message%s in the last minute, %lld recipient%s in 24 h (as of %llds ago)\n",
               msgs, msgs == 1 ? "" : "s", (long long)rcpts, rcpts == 1 ? "" : "s",
               (long long)((now - u->saved) / 1000));
    }
    spool_upstate_list_free(list, n);
    return CTL_EXIT_OK;
}

/* Every command, once: its name, its handler and what it does to the spool. */
static const struct ctl_cmd {
    const char *name;
    ctl_handler run;
    enum ctl_spool_access spool;
} ctl_cmds[] = {
    {"list", cmd_list, CTL_SPOOL_READ},
    {"show", cmd_show, CTL_SPOOL_READ},
    {"cat", cmd_cat, CTL_SPOOL_READ},
    {"hold", cmd_hold, CTL_SPOOL_WRITE},
    {"release", cmd_release, CTL_SPOOL_WRITE},
    {"retry", cmd_retry, CTL_SPOOL_WRITE},
    {"delete", cmd_delete, CTL_SPOOL_WRITE},
    {"purge", cmd_purge, CTL_SPOOL_WRITE},
    {"stats", cmd_stats, CTL_SPOOL_READ},
    {"devices", cmd_devices, CTL_SPOOL_READ},
    {"upstreams", cmd_upstreams, CTL_SPOOL_READ},
    {"test-upstream", ctl_diag_test_upstream_cmd, CTL_SPOOL_NONE},
    {"send-test", ctl_diag_send_test_cmd, CTL_SPOOL_NONE},
    {"oauth2", ctl_oauth2_cmd, CTL_SPOOL_NONE},
    /* The running daemon, through spool/control.sock (ctl_control.c). */
    {"reload", ctl_control_cmd, CTL_SPOOL_READ},
    {"drain", ctl_control_cmd, CTL_SPOOL_READ},
    {"resume", ctl_control_cmd, CTL_SPOOL_READ},
    {"daemon-status", ctl_control_cmd, CTL_SPOOL_READ},
};

int main(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"spool", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config = NULL, *spool_dir = NULL;
    const struct ctl_cmd *cmd = NULL;
    struct ctl c = {.prog = prog};
    struct cfg cfg;
    int opt, rc, have_cfg = 0;
    size_t i;

    log_init(prog);
    /* '+': stop at the command, so its own options are left for it. */
    while ((opt = getopt_long(argc, argv, "+c:s:h", longopts, NULL)) != -1) {
        switch (opt) {
        case 'c':
            config = optarg;
            break;
        case 's':
            spool_dir = optarg;
            break;
        case 'h':
            usage(stdout);
            return CTL_EXIT_OK;
        default:
            usage(stderr);
            return CTL_EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return CTL_EXIT_USAGE;
    }
    c.cmd = argv[optind];
    c.config_path = config != NULL ? config : CTL_DEFAULT_CONFIG;
    if (strcmp(c.cmd, "help") == 0) {
        usage(stdout);
        return CTL_EXIT_OK;
    }
    for (i = 0; i < sizeof(ctl_cmds) / sizeof(ctl_cmds[0]) && cmd == NULL; i++)
        if (strcmp(ctl_cmds[i].name, c.cmd) == 0)
            cmd = &ctl_cmds[i];
    if (cmd == NULL) {
        fprintf(stderr, "%s: unknown command %s (relayctl --help lists them)\n", prog, c.cmd);
        return CTL_EXIT_USAGE;
    }
    c.access = cmd->spool;

    if (cmd->spool != CTL_SPOOL_NONE && spool_dir == NULL) {
        char err[512];

        if ((rc = cfg_load(c.config_path, &cfg, err, sizeof(err))) != 0) {
            fprintf(stderr, "%s: %s\n", prog, err[0] ? err : strerror(-rc));
            if (rc == -ENOENT)
                fprintf(stderr,
                        "%s: name the configuration with -c FILE or the spool with "
                        "--spool DIR\n",
                        prog);
            return CTL_EXIT_FAIL;
        }
        have_cfg = 1;
        spool_dir = cfg.spool_dir;
    }
    c.spool_dir = spool_dir;

    rc = cmd->run(&c, argc - optind - 1, argv + optind + 1);

    spool_close(c.sp);
    if (have_cfg)
        cfg_free(&cfg);
    if (fflush(stdout) != 0 && rc == CTL_EXIT_OK) {
        fprintf(stderr, "%s: write: %s\n", prog, strerror(errno));
        rc = CTL_EXIT_FAIL;
    }
    return rc;
}
