/* Unit tests for relayd/sched: retry backoff. */
#include <criterion/criterion.h>

#include "relayd/sched.h"

/* Backoff doubles from retry_first, stays within +-10%, and is capped at retry_max. */
Test(sched, backoff)
{
    for (unsigned rnd = 0; rnd < 2001; rnd += 250) {
        int64_t d1 = sched_backoff(1, 60, 3600, rnd);
        int64_t d3 = sched_backoff(3, 60, 3600, rnd);
        int64_t d20 = sched_backoff(20, 60, 3600, rnd);
        cr_expect(d1 >= 54 && d1 <= 66, "%lld", (long long)d1);
        cr_expect(d3 >= 216 && d3 <= 264, "%lld", (long long)d3);
        cr_expect(d20 >= 3240 && d20 <= 3960, "%lld", (long long)d20);
    }
    cr_expect_geq(sched_backoff(1, 0, 0, 0), 1);
}
