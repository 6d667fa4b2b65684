/*
 * relayd - SMTP relay for devices that only speak old SMTP.
 *
 * main() wires the pieces together on one libuv loop: the listeners and sessions
 * (smtpd), the spool writer thread (its completions arrive through a uv_async), and the
 * delivery scheduler (sched).  It runs in the foreground, logs to stderr, and on SIGTERM
 * or SIGINT stops accepting, closes sessions (nothing unacknowledged is kept), interrupts
 * deliveries (they stay queued), finishes the spool's pending writes and exits 0.
 *
 * SIGHUP is the full reload (relayd_reload()): the file is read and validated into a new
 * configuration generation (struct cfg_gen); only if it is valid do the listeners change
 * (new ones bound before anything else changes) and new sessions get it at once, while the
 * deliveries take it over as soon as those in progress have finished on the old one
 * (sched_reconfigure()).  Each session holds the generation it started with; the last one
 * to finish frees it.  Nothing in the spool is touched by a reload.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "common/authsasl.h"
#include "common/log.h"
#include "common/sdnotify.h"
#include "common/tlsio.h"
#include "common/xalloc.h"
#include "config/cfg.h"
#include "relayd/control.h"
#include "relayd/metrics.h"
#include "relayd/metrics_http.h"
#include "relayd/oauth2.h"
#include "relayd/privdrop.h"
#include "relayd/sched.h"
#include "relayd/smtpd.h"
#include "spool/spool.h"

/* A token manager a reload replaced: freed once its stop is done (and not from inside its
 * own callback: at the next reload, or at exit). */
struct relayd_retired {
    struct oauth2 *o;
    int stopped;
};

struct relayd {
    uv_loop_t loop;
    const struct cfg *cfg;           /* &gen->cfg: the current configuration */
    struct cfg_gen *gen;             /* its generation; new sessions and deliveries get it */
    struct cfg_gen *dgen;            /* the generation the deliveries use (gen after a swap) */
    struct cfg_gen *next_dgen;       /* a reload waiting to take over the deliveries, or NULL */
    struct oauth2 *next_oauth2;      /* its token manager */
    struct relayd_retired **retired; /* token managers of past generations, stopping */
    int nretired;
    const char *config_path;    /* -c FILE, re-read by a reload; NULL: built-in default */
    const char *spool_override; /* --spool DIR */
    struct spool *sp;
    struct smtpd_server *smtpd;
    struct sched *sched;
    struct oauth2 *oauth2; /* OAuth 2.0 tokens for upstreams with auth = xoauth2 */
    uv_async_t spool_wake;
    uv_signal_t sigterm, sigint;
    uv_signal_t sighup; /* the full reload (relayd_reload()) */
    int stopping;
    /* Monitoring and the operator's control channel (relayctl reload / drain / resume). */
    struct metrics *metrics;
    struct metrics_sources msrc;
    struct metrics_http *mhttp; /* NULL unless [relayd] metrics is set */
    struct control *control;    /* NULL when the socket could not be made */
};

/* Each inbound session is one descriptor: max_connections sessions need at least that many
 * plus the upstream sessions, the spool and the listeners.  Raise the soft limit up to the
 * hard one; say so when even that is too low (systemd: LimitNOFILE=). */
static void relayd_raise_nofile(const struct cfg *cfg)
{
    struct rlimit rl;
    rlim_t need = (rlim_t)cfg->max_connections + (rlim_t)cfg->nlisteners + 64;
    int i;

    for (i = 0; i < cfg->nupstreams; i++)
        need += (rlim_t)cfg->upstreams[i].max_connections;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= need)
        return;
    rl.rlim_cur = rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need ? rl.rlim_max : need;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur < need)
        log_warn("open files limit is %llu, but max_connections = %d needs about %llu: "
                 "connections beyond it fail at accept; raise LimitNOFILE= in relayd.service "
                 "(or ulimit -n)",
                 (unsigned long long)rl.rlim_cur, cfg->max_connections, (unsigned long long)need);
    else
        log_info("open files limit raised to %llu for max_connections = %d",
                 (unsigned long long)rl.rlim_cur, cfg->max_connections);
}

static void usage(FILE *out)
{
    fprintf(out,
            "usage: relayd [-c FILE] [--check] [--spool DIR] [-v]...\n"
            "  -c, --config FILE  configuration file (default: built-in, see README)\n"
            "      --check        validate the configuration, print it (secrets masked), exit\n"
            "      --spool DIR    spool directory (overrides the configuration)\n"
            "  -v, --verbose      more log detail (repeat for more)\n"
            "  -h, --help         this text\n");
}

static void relayd_spool_wake(void *arg)
{
    uv_async_send(arg); /* called from the spool writer thread */
}

static void relayd_on_spool_wake(uv_async_t *a)
{
    struct relayd *r = a->data;

    spool_writer_reap(r->sp);
}

static void relayd_on_spooled(void *arg, uint64_t id)
{
    struct relayd *r = arg;

    (void)id;
    sched_kick(r->sched);
}

static void relayd_on_sched_stopped(void *arg)
{
    struct relayd *r = arg;

    metrics_http_stop(r->mhttp);
    r->mhttp = NULL;
    control_stop(r->control);
    r->control = NULL;
    oauth2_stop(r->oauth2, NULL, NULL); /* its handles close from the loop */
    /* Let pending spool completions run, then leave the loop. */
    spool_writer_reap(r->sp);
    uv_close((uv_handle_t *)&r->spool_wake, NULL);
    uv_close((uv_handle_t *)&r->sigterm, NULL);
    uv_close((uv_handle_t *)&r->sigint, NULL);
    uv_close((uv_handle_t *)&r->sighup, NULL);
}

static void relayd_on_smtpd_stopped(void *arg)
{
    struct relayd *r = arg;

    sched_stop(r->sched, relayd_on_sched_stopped, r);
}

static void relayd_on_retired_stopped(void *arg)
{
    *(int *)arg = 1;
}

/* Stops a token manager of a past generation.  Those whose stop is done are freed here, so
 * that reloads over the years keep at most a couple. */
static void relayd_retire_oauth2(struct relayd *r, struct oauth2 *o)
{
    struct relayd_retired *rt = xcalloc(1, sizeof(*rt));
    int i, n = 0;

    for (i = 0; i < r->nretired; i++) {
        if (r->retired[i]->stopped) {
            oauth2_free(r->retired[i]->o);
            free(r->retired[i]);
        } else {
            r->retired[n++] = r->retired[i];
        }
    }
    r->retired = xrealloc(r->retired, (size_t)(n + 1) * sizeof(*r->retired));
    r->retired[n] = rt;
    r->nretired = n + 1;
    rt->o = o;
    oauth2_stop(o, relayd_on_retired_stopped, &rt->stopped);
}

/* sched_reconfigure()'s done: the deliveries took over the new generation (swapped), or
 * the reload was dropped by a stop. */
static void relayd_on_sched_reconfigured(void *arg, int swapped)
{
    struct relayd *r = arg;

    if (swapped) {
        relayd_retire_oauth2(r, r->oauth2);
        r->oauth2 = r->next_oauth2;
        r->msrc.oauth2 = r->oauth2; /* token expiry on /metrics */
        cfg_gen_unref(r->dgen);
        r->dgen = r->next_dgen;
    } else {
        relayd_retire_oauth2(r, r->next_oauth2);
        cfg_gen_unref(r->next_dgen);
    }
    r->next_oauth2 = NULL;
    r->next_dgen = NULL;
}

/* "+1 -0 =2": upstreams (or routes) by name: added, removed, and kept (their settings
 * are the new ones either way; the run-time state of a kept upstream carries over).  a and
 * b are arrays of na and nb structs of size bytes whose first member is the name. */
static void relayd_count_names(const void *a, int na, const void *b, int nb, size_t size,
                               int *added, int *removed, int *kept)
{
    int i, j;

    *added = *kept = 0;
    for (i = 0; i < nb; i++) {
        const char *name = *(char *const *)(const void *)((const char *)b + (size_t)i * size);

        for (j = 0; j < na; j++)
            if (strcmp(*(char *const *)(const void *)((const char *)a + (size_t)j * size), name) ==
                0)
                break;
        if (j < na)
            (*kept)++;
        else
            (*added)++;
    }
    *removed = na - *kept;
}
_Static_assert(offsetof(struct cfg_upstream, name) == 0, "relayd_count_names()");
_Static_assert(offsetof(struct cfg_route, name) == 0, "relayd_count_names()");

/*
 * The full reload, the one entry point (SIGHUP, and the control socket's reload): 0, or
 * negative with "FILE:LINE: what" (or why it cannot be done now) in err; on failure the
 * running configuration stays in force, untouched.  Order: read and validate the file
 * into a new generation; refuse what a reload cannot change (the spool); prepare the
 * deliveries' new pool (its TLS credentials); bind the new listeners (a port in use fails
 * here, and the prepared pool is dropped); then commit: listeners, new sessions, and the
 * deliveries once those in progress are done.
 */
static int relayd_reload(struct relayd *r, char *err, size_t errlen)
{
    struct cfg cfg;
    struct cfg_gen *gen;
    struct oauth2 *o2;
    struct smtpd_reconf lst;
    int rc, ua, ur, uk, ra, rr, rk;

    if (r->stopping) {
        snprintf(err, errlen, "relayd is stopping");
        return -1;
    }
    if (r->next_dgen != NULL) {
        snprintf(err, errlen,
                 "the previous reload (generation %lu) is still waiting for "
                 "deliveries in progress to finish",
                 r->next_dgen->n);
        return -1;
    }
    if (r->config_path == NULL) {
        snprintf(err, errlen, "no configuration file (-c FILE) to reload");
        return -1;
    }
    if ((rc = cfg_load(r->config_path, &cfg, err, errlen)) != 0)
        return rc;
    if (r->spool_override != NULL) {
        free(cfg.spool_dir);
        cfg.spool_dir = xstrdup(r->spool_override);
    }
    if (strcmp(cfg.spool_dir, r->cfg->spool_dir) != 0) {
        snprintf(err, errlen, "%s: spool cannot change on reload (%s -> %s); restart relayd",
                 r->config_path, r->cfg->spool_dir, cfg.spool_dir);
        cfg_free(&cfg);
        return -1;
    }
    gen = cfg_gen_new(&cfg, r->gen->n + 1);
    o2 = oauth2_new(&r->loop, &gen->cfg);
    if ((rc = sched_reconfigure(r->sched, &gen->cfg, o2, relayd_on_sched_reconfigured, r, err,
                                errlen)) != 0) {
        oauth2_free(o2); /* never started */
        cfg_gen_unref(gen);
        return rc;
    }
    r->next_dgen = gen; /* the reference the deliveries will hold */
    r->next_oauth2 = o2;
    if ((rc = smtpd_server_reconfigure(r->smtpd, &gen->cfg, gen, &lst, err, errlen)) != 0) {
        sched_reconfigure_cancel(r->sched); /* relayd_on_sched_reconfigured() drops gen */
        return rc;
    }
    /* Committed. */
    relayd_count_names(r->cfg->upstreams, r->cfg->nupstreams, gen->cfg.upstreams,
                       gen->cfg.nupstreams, sizeof(struct cfg_upstream), &ua, &ur, &uk);
    relayd_count_names(r->cfg->routes, r->cfg->nroutes, gen->cfg.routes, gen->cfg.nroutes,
                       sizeof(struct cfg_route), &ra, &rr, &rk);
    cfg_gen_unref(r->gen);
    r->gen = cfg_gen_ref(gen);
    r->cfg = &gen->cfg;
    /* /metrics and /healthz read the running generation (metrics_allow, health_max_age,
     * the upstreams); main's reference keeps it alive. */
    r->msrc.cfg = r->cfg;
    if (r->mhttp != NULL)
        metrics_http_set_cfg(r->mhttp, r->cfg);
    oauth2_start(o2);
    relayd_raise_nofile(r->cfg);
    log_info("reload: ok (generation %lu): listeners +%d -%d ~%d, upstreams +%d -%d =%d, "
             "routes +%d -%d =%d",
             gen->n, lst.added, lst.removed, lst.changed, ua, ur, uk, ra, rr, rk);
    return 0;
}

/* The reload as systemd and the log see it, whoever asked (SIGHUP or relayctl reload):
 * RELOADING=1, the reload, one outcome line, READY=1 with the outcome as STATUS=. */
static int relayd_reload_told(struct relayd *r, const char *who, char *err, size_t errlen)
{
    char status[1200];
    int rc;

    sdnotify("RELOADING=1");
    log_info("%s: reloading %s", who, r->config_path != NULL ? r->config_path : "(none)");
    rc = relayd_reload(r, err, errlen);
    if (rc != 0) {
        log_error("reload: %s; keeping the running configuration", err);
        snprintf(status, sizeof status, "READY=1\nSTATUS=reload failed: %s", err);
    } else {
        snprintf(status, sizeof status, "READY=1\nSTATUS=reloaded");
    }
    sdnotify(status);
    return rc;
}

/* SIGHUP: the full reload; an invalid file keeps the running configuration. */
static void relayd_on_sighup(uv_signal_t *h, int signum)
{
    struct relayd *r = h->data;
    char err[1024];

    (void)signum;
    relayd_reload_told(r, "SIGHUP", err, sizeof err);
}

/* relayctl reload (the control socket): the same reload, its outcome told to the operator. */
static int relayd_ctl_reload(void *arg, char *err, size_t errlen)
{
    return relayd_reload_told(arg, "relayctl reload", err, errlen);
}

static void relayd_ctl_set_accepting(void *arg, int accepting)
{
    struct relayd *r = arg;

    smtpd_server_set_accepting(r->smtpd, accepting);
}

static void relayd_ctl_status(void *arg, char *out, size_t outlen)
{
    struct relayd *r = arg;
    struct spool_stats st;

    if (spool_stats(r->sp, &st) != 0)
        memset(&st, 0, sizeof st);
    snprintf(out, outlen, "%s queued=%llu deferred=%llu held=%llu failed=%llu",
             smtpd_server_accepting(r->smtpd) ? "accepting" : "draining",
             (unsigned long long)st.by_state[SPOOL_QUEUED],
             (unsigned long long)st.by_state[SPOOL_DEFERRED],
             (unsigned long long)st.by_state[SPOOL_HELD],
             (unsigned long long)st.by_state[SPOOL_FAILED]);
}

static void relayd_on_signal(uv_signal_t *h, int signum)
{
    struct relayd *r = h->data;

    if (r->stopping)
        return;
    r->stopping = 1;
    sdnotify("STOPPING=1");
    log_info("%s: stopping", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    smtpd_server_stop(r->smtpd, relayd_on_smtpd_stopped, r);
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'}, {"check", no_argument, NULL, 'C'},
        {"spool", required_argument, NULL, 'S'},  {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    struct relayd r;
    struct privdrop pd;
    struct cfg cfg0;
    struct spool_opts so;
    const char *config = NULL, *spool_dir = NULL;
    char err[1024];
    int c, check = 0, verbose = 0, rc;

    memset(&r, 0, sizeof(r));
    log_init("relayd");
    while ((c = getopt_long(argc, argv, "c:vh", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 'C':
            check = 1;
            break;
        case 'S':
            spool_dir = optarg;
            break;
        case 'v':
            verbose++;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (optind != argc) {
        usage(stderr);
        return 2;
    }
    log_set_verbose(verbose);

    if (config != NULL) {
        if (cfg_load(config, &cfg0, err, sizeof(err)) != 0) {
            fprintf(stderr, "relayd: %s\n", err);
            return 1;
        }
        if (spool_dir != NULL) {
            free(cfg0.spool_dir);
            cfg0.spool_dir = strdup(spool_dir);
        }
    } else {
        cfg_default(&cfg0, spool_dir);
    }
    if (check) {
        cfg_dump(&cfg0, stdout);
        cfg_free(&cfg0);
        return 0;
    }
    r.config_path = config;
    r.spool_override = spool_dir;
    r.gen = cfg_gen_new(&cfg0, 1);
    r.cfg = &r.gen->cfg;
    r.dgen = cfg_gen_ref(r.gen);

    if (privdrop_plan(r.cfg, config == NULL, &pd, err, sizeof err) != 0)
        log_fatal("%s", err);
    signal(SIGPIPE, SIG_IGN);
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    if (tlsio_global_init(err, sizeof(err)) != 0 || authsasl_client_init(err, sizeof(err)) != 0)
        log_fatal("%s", err);

    memset(&so, 0, sizeof(so));
    so.max_bytes = (uint64_t)r.cfg->spool_max_size;
    so.reserve_bytes = (uint64_t)r.cfg->spool_reserve;
    so.unsafe_nosync = r.cfg->unsafe_no_fsync;
    if (so.unsafe_nosync)
        log_warn("UNSAFE: unsafe_no_fsync = yes: the spool is not synced to disk; mail that "
                 "was acknowledged with 250 is LOST on a power failure or kernel crash");
    if ((rc = spool_open(r.cfg->spool_dir, &so, &r.sp, err, sizeof(err))) != 0)
        log_fatal("%s", err);

    uv_loop_init(&r.loop);
    uv_async_init(&r.loop, &r.spool_wake, relayd_on_spool_wake);
    r.spool_wake.data = &r;
    if ((rc = spool_writer_start(r.sp, relayd_spool_wake, &r.spool_wake)) != 0)
        log_fatal("spool %s: cannot start the writer: %s", r.cfg->spool_dir, spool_strerror(rc));
    if (getenv("RELAYD_TEST_FAIL_UPDATES") != NULL) {
        /* Fault injection for the test suite: the next N delivery results fail to be
         * written, as on a full or failing disk (tests/e2e/t_out_write_fail.sh). */
        log_warn("RELAYD_TEST_FAIL_UPDATES is set: the next %d spool updates will fail",
                 atoi(getenv("RELAYD_TEST_FAIL_UPDATES")));
        spool_fault_updates(r.sp, atoi(getenv("RELAYD_TEST_FAIL_UPDATES")));
    }

    r.oauth2 = oauth2_new(&r.loop, r.cfg);
    oauth2_start(r.oauth2); /* so that the first delivery finds a token */
    r.sched = sched_new(&r.loop, r.cfg, r.sp, r.oauth2);
    if (sched_start(r.sched, err, sizeof(err)) != 0)
        log_fatal("%s", err);
    relayd_raise_nofile(r.cfg);
    r.smtpd = smtpd_server_new(&r.loop, r.cfg, r.sp, relayd_on_spooled, &r);
    /* One max_memory for both sides: bodies being delivered count with those received. */
    sched_share_memory(r.sched, smtpd_server_memory(r.smtpd));
    if (smtpd_server_reconfigure(r.smtpd, r.cfg, r.gen, NULL, err, sizeof(err)) != 0)
        log_fatal("%s", err);
    {
        /* Monitoring (/metrics, /healthz) and the control socket.  The registry sees
         * every event from here on: nothing has run on the loop yet. */
        struct metrics_http_hooks mh = {metrics_collect, metrics_healthz, &r.msrc};
        struct control_hooks ch = {relayd_ctl_reload, relayd_ctl_set_accepting, relayd_ctl_status,
                                   &r};
        int i;

        r.metrics = metrics_new();
        metrics_set_global(r.metrics);
        for (i = 0; i < r.cfg->nupstreams; i++)
            metrics_on_health(r.cfg->upstreams[i].name, 1, NULL);
        r.msrc = (struct metrics_sources){r.cfg, r.sp, r.smtpd, r.oauth2};
        if (r.cfg->metrics_host != NULL &&
            metrics_http_start(&r.loop, r.cfg, r.metrics, &mh, &r.mhttp, err, sizeof err) != 0)
            log_fatal("%s", err);
        if (control_start(&r.loop, r.cfg->spool_dir, &ch, &r.control, err, sizeof err) != 0)
            log_error("%s; relayctl reload, drain and resume will not work", err);
    }
    /* Listening and spool open: no client is served before the loop runs, below. */
    if (privdrop_apply(&pd, r.cfg, err, sizeof err) != 0)
        log_fatal("%s", err);

    uv_signal_init(&r.loop, &r.sigterm);
    uv_signal_init(&r.loop, &r.sigint);
    r.sigterm.data = r.sigint.data = &r;
    uv_signal_start(&r.sigterm, relayd_on_signal, SIGTERM);
    uv_signal_start(&r.sigint, relayd_on_signal, SIGINT);
    uv_signal_init(&r.loop, &r.sighup);
    r.sighup.data = &r;
    uv_signal_start(&r.sighup, relayd_on_sighup, SIGHUP);

    log_info("started: hostname=%s spool=%s config=%s", r.cfg->hostname, r.cfg->spool_dir,
             r.cfg->path);
    sdnotify("READY=1\nSTATUS=accepting mail");
    uv_run(&r.loop, UV_RUN_DEFAULT);

    /* Finish queued writes and run their completions, so nothing is left half-done. */
    spool_writer_stop(r.sp);
    spool_writer_reap(r.sp);
    {
        struct spool_stats st;

        /* contrib/bench.sh reads this line: durable commits (fsyncs) per message. */
        if (spool_stats(r.sp, &st) == 0)
            log_info("spool: %llu commits for %llu writes", (unsigned long long)st.commits,
                     (unsigned long long)st.committed_jobs);
    }
    spool_close(r.sp);
    metrics_set_global(NULL);
    r.metrics = metrics_free(r.metrics);
    smtpd_server_free(r.smtpd);
    sched_free(r.sched);
    oauth2_free(r.oauth2);
    for (int i = 0; i < r.nretired; i++) {
        oauth2_free(r.retired[i]->o);
        free(r.retired[i]);
    }
    free(r.retired);
    rc = uv_loop_close(&r.loop);
    if (rc != 0)
        log_warn("event loop closed with handles still open: %s", uv_strerror(rc));
    cfg_gen_unref(r.dgen);
    cfg_gen_unref(r.gen);
    log_info("stopped");
    return 0;
}
