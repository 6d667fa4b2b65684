/*
 * test_cfg_doc - every key of every section table (cfg_keys_each()) is documented: a row of
 * its section's table in README.md ("| `key` |", "| `cert`, `key` |") or an entry of its
 * section in man/relayd.conf.5 (".B key", ".B cert, key").  The test names each key that is
 * in neither, so that a key added to config/cfg_keys.c without documentation fails here.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config/cfg.h"
#include "tests/lib/testlib.h"

/* The lines of doc from the first one that starts with head up to (not including) the next
 * one that starts with stop1 or stop2; "" when no line starts with head.  Copied. */
static char *doc_block(const char *doc, const char *head, const char *stop1, const char *stop2)
{
    const char *p = doc, *start = NULL, *end;

    for (; p != NULL && *p != '\0'; p = strchr(p, '\n'), p = p != NULL ? p + 1 : NULL) {
        if (start == NULL && strncmp(p, head, strlen(head)) == 0) {
            start = p;
        } else if (start != NULL && (strncmp(p, stop1, strlen(stop1)) == 0 ||
                                     (stop2 != NULL && strncmp(p, stop2, strlen(stop2)) == 0))) {
            break;
        }
    }
    if (start == NULL)
        return strdup("");
    end = p != NULL ? p : start + strlen(start);
    return strndup(start, (size_t)(end - start));
}

/* 1 when a line of blk starts with prefix and, up to the end of its first cell (cell_end,
 * or the end of the line), names key: as "`key`" (quoted) or as a ", "-separated word. */
static int doc_lists(const char *blk, const char *prefix, const char *cell_end, int quoted,
                     const char *key)
{
    const char *p;

    for (p = blk; p != NULL && *p != '\0'; p = strchr(p, '\n'), p = p != NULL ? p + 1 : NULL) {
        size_t len = strcspn(p, "\n");
        char line[512], *cell, *end, *w, *save = NULL;

        if (strncmp(p, prefix, strlen(prefix)) != 0 || len >= sizeof line)
            continue;
        snprintf(line, sizeof line, "%.*s", (int)len, p);
        cell = line + strlen(prefix);
        if (cell_end != NULL && (end = strstr(cell, cell_end)) != NULL)
            *end = '\0';
        for (w = strtok_r(cell, ", ", &save); w != NULL; w = strtok_r(NULL, ", ", &save)) {
            size_t n = strlen(w);

            if (quoted ? n == strlen(key) + 2 && w[0] == '`' && w[n - 1] == '`' &&
                             strncmp(w + 1, key, n - 2) == 0
                       : strcmp(w, key) == 0)
                return 1;
        }
    }
    return 0;
}

struct doc_check {
    char *readme, *man;
    char missing[4096];
    int nkeys;
};

static void doc_check_key(void *arg, const char *section, const char *key)
{
    struct doc_check *dc = arg;
    char rhead[64], mhead[64];
    char *rblk, *mblk;
    size_t used = strlen(dc->missing);

    snprintf(rhead, sizeof rhead, "### `[%s", section);
    snprintf(mhead, sizeof mhead, ".SH \"[%s", section);
    rblk = doc_block(dc->readme, rhead, "## ", "### ");
    mblk = doc_block(dc->man, mhead, ".SH ", NULL);
    if (!doc_lists(rblk, "| ", " |", 1, key) && !doc_lists(mblk, ".B ", NULL, 0, key))
        snprintf(dc->missing + used, sizeof dc->missing - used, " [%s] %s", section, key);
    dc->nkeys++;
    free(rblk);
    free(mblk);
}

/* Every key in the tables is in README.md's or relayd.conf(5)'s reference for its section. */
Test(cfg_doc, every_key_documented)
{
    struct doc_check dc;

    memset(&dc, 0, sizeof dc);
    dc.readme = testlib_source_read("README.md");
    dc.man = testlib_source_read("man/relayd.conf.5");
    cfg_keys_each(doc_check_key, &dc);
    cr_assert(gt(int, dc.nkeys, 50), "cfg_keys_each() walked %d keys", dc.nkeys);
    cr_expect(eq(str, dc.missing, ""),
              "keys documented neither in README.md nor in man/relayd.conf.5:%s", dc.missing);
    free(dc.readme);
    free(dc.man);
}

/* The check itself: a key that is nowhere, and one in another section's table only, fail. */
Test(cfg_doc, check_finds_missing)
{
    struct doc_check dc;

    memset(&dc, 0, sizeof dc);
    dc.readme = strdup("## Configuration reference\n### `[relayd]`\n| key | default |\n"
                       "| `spool`, `workers` | x |\n### `[route NAME]`\n| `upstream` | |\n");
    dc.man = strdup(".SH \"[relayd] SECTION\"\n.TP\n.B hostname\n.SH \"[route NAME]\"\n"
                    ".TP\n.B failover\n");
    doc_check_key(&dc, "relayd", "spool");
    doc_check_key(&dc, "relayd", "workers");
    doc_check_key(&dc, "relayd", "hostname");
    doc_check_key(&dc, "relayd", "upstream");
    doc_check_key(&dc, "relayd", "host");
    doc_check_key(&dc, "route", "failover");
    cr_expect(eq(str, dc.missing, " [relayd] upstream [relayd] host"));
    free(dc.readme);
    free(dc.man);
}
