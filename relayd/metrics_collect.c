/*
 * metrics_collect - the daemon's side of /metrics and /healthz: reads what lives elsewhere
 * (the spool's O(1) counters, the listeners' drain state, OAuth 2.0 tokens) into the
 * registry just before it is rendered, and decides /healthz; see metrics_http.h.
 *
 * The only cost that grows is the age of the oldest message still to deliver when FAILED
 * messages (kept failed_retention for inspection) are older than it: those are stepped
 * over in arrival order.  Everything else is O(number of upstreams).
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "relayd/metrics_http.h"
#include "relayd/oauth2.h"
#include "relayd/smtpd.h"
#include "spool/spool.h"

static int oldest_live(const struct spool_msg *msg, void *arg)
{
    int64_t *arrived = arg;

    if (msg->state == SPOOL_FAILED)
        return 0;
    *arrived = msg->arrived;
    return 1;
}

/* Seconds the oldest message not FAILED has been in the spool; 0 when there is none. */
static int64_t oldest_age(struct spool *sp, const struct spool_stats *st, int64_t now)
{
    int64_t arrived = 0;

    if (st->messages == st->by_state[SPOOL_FAILED])
        return 0;
    if (st->by_state[SPOOL_FAILED] == 0)
        arrived = st->oldest_arrival;
    else if (spool_foreach(sp, oldest_live, &arrived) < 0)
        arrived = st->oldest_arrival;
    return arrived > 0 && now > arrived ? now - arrived : 0;
}

void metrics_collect(void *arg, struct metrics *m)
{
    const struct metrics_sources *src = arg;
    struct spool_stats st;
    int i;

    if (spool_stats(src->sp, &st) == 0) {
        for (i = SPOOL_QUEUED; i <= SPOOL_FAILED; i++) {
            const char *lab[1] = {spool_state_name((enum spool_state)i)};

            metrics_set(m, METRICS_QUEUE, lab, (double)st.by_state[i]);
        }
        metrics_set(m, METRICS_OLDEST_AGE, NULL,
                    (double)oldest_age(src->sp, &st, (int64_t)time(NULL)));
        metrics_set(m, METRICS_SPOOL_BYTES, NULL, (double)st.bytes);
        metrics_set(m, METRICS_SPOOL_COMMITS, NULL, (double)st.commits);
    }
    metrics_set(m, METRICS_ACCEPTING, NULL, smtpd_server_accepting(src->smtpd));
    metrics_health_gauges(m, src->cfg);
    metrics_clear(m, METRICS_OAUTH2_TTL); /* upstreams may come and go with a reload */
    for (i = 0; src->oauth2 != NULL && i < src->cfg->nupstreams; i++) {
        const struct cfg_upstream *up = &src->cfg->upstreams[i];
        const char *lab[1] = {up->name};

        if (oauth2_mechanism(up) != NULL)
            metrics_set(m, METRICS_OAUTH2_TTL, lab, (double)oauth2_token_ttl(src->oauth2, up));
    }
}

int metrics_healthz(void *arg, char *why, size_t whylen)
{
    const struct metrics_sources *src = arg;
    struct metrics_health_in in;
    struct spool_stats st;
    char dirwhy[300];
    int rc;

    memset(&in, 0, sizeof in);
    if (metrics_global() != NULL)
        metrics_health_fill(metrics_global(), src->cfg, &in);
    in.draining = !smtpd_server_accepting(src->smtpd);
    in.max_age = src->cfg->health_max_age;
    if ((rc = spool_stats(src->sp, &st)) != 0) {
        in.spool_fault = 1;
        in.spool_why = spool_strerror(rc);
    } else {
        in.oldest_age = oldest_age(src->sp, &st, (int64_t)time(NULL));
    }
    if (!in.spool_fault && spool_room(src->sp, 0) == SPOOL_EFULL) {
        in.spool_fault = 1;
        in.spool_why = "full (spool_max_size or spool_reserve reached)";
    }
    /* A spool nobody has written to lately is checked too: a file system remounted
     * read-only, a directory removed or renamed would otherwise show only at the next
     * message, which a client would then be refused. */
    if (!in.spool_fault && access(src->cfg->spool_dir, W_OK) != 0) {
        snprintf(dirwhy, sizeof dirwhy, "%s: %s", src->cfg->spool_dir, strerror(errno));
        in.spool_fault = 1;
        in.spool_why = dirwhy;
    }
    return metrics_health(&in, why, whylen);
}
