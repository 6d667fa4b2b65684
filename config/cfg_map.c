/*
 * cfg_map - two-column address map files for the route keys rewrite_sender_map and
 * recipient_map; see cfg.h.
 *
 * Format: one "FROM TO" pair per line, separated by spaces or tabs; '#' starts a comment;
 * blank lines are ignored.  FROM is a full address ("scanner@lan") or "@domain" (every
 * address of that domain); TO is a full address.  A FROM listed twice is an error, so a
 * typo cannot silently shadow a line.  Loaded once, at configuration load.
 *
 * Errors: cfg_map_load() returns -1 with "PATH:LINE: why" in the caller's buffer and leaves
 * the map empty.  Ownership: the map owns its strings; cfg_map_free() releases them.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/xalloc.h"
#include "config/cfg.h"

#define CFG_MAP_MAX_ENTRIES 100000

/* "local@domain" with a plausible domain, or (when at_ok) "@domain". */
static int map_addr_ok(const char *a, int at_ok)
{
    const char *at = strrchr(a, '@'), *c;

    if (at == NULL || at[1] == '\0' || strlen(a) > 320)
        return 0;
    if (at == a && !at_ok)
        return 0;
    for (c = a; *c != '\0'; c++)
        if ((unsigned char)*c <= ' ' || *c == 0x7F || strchr("<>,;\"", *c) != NULL)
            return 0;
    for (c = at + 1; *c != '\0'; c++)
        if (!isalnum((unsigned char)*c) && strchr(".-_", *c) == NULL)
            return 0;
    return 1;
}

void cfg_map_free(struct cfg_map *map)
{
    int i;

    if (map == NULL)
        return;
    for (i = 0; i < map->n; i++) {
        free(map->e[i].from);
        free(map->e[i].to);
    }
    free(map->e);
    map->e = NULL;
    map->n = 0;
}

int cfg_map_load(const char *path, struct cfg_map *map, char *why, size_t whylen)
{
    FILE *fp;
    char *line = NULL, *p, *from, *to, *extra;
    size_t cap = 0;
    int lineno = 0, i;

    map->e = NULL;
    map->n = 0;
    if ((fp = fopen(path, "re")) == NULL) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        return -1;
    }
    while (getline(&line, &cap, fp) >= 0) {
        lineno++;
        if ((p = strchr(line, '#')) != NULL)
            *p = '\0';
        from = strtok_r(line, " \t\r\n", &p);
        if (from == NULL)
            continue;
        to = strtok_r(NULL, " \t\r\n", &p);
        extra = strtok_r(NULL, " \t\r\n", &p);
        if (to == NULL || extra != NULL) {
            snprintf(why, whylen, "%s:%d: expected two addresses: FROM TO", path, lineno);
            goto fail;
        }
        if (!map_addr_ok(from, 1)) {
            snprintf(why, whylen, "%s:%d: '%.60s' is not an address or @domain", path, lineno,
                     from);
            goto fail;
        }
        if (!map_addr_ok(to, 0)) {
            snprintf(why, whylen, "%s:%d: '%.60s' is not an address", path, lineno, to);
            goto fail;
        }
        for (i = 0; i < map->n; i++) {
            if (strcasecmp(map->e[i].from, from) == 0) {
                snprintf(why, whylen, "%s:%d: %.60s is mapped twice", path, lineno, from);
                goto fail;
            }
        }
        if (map->n >= CFG_MAP_MAX_ENTRIES) {
            snprintf(why, whylen, "%s:%d: more than %d entries", path, lineno,
                     CFG_MAP_MAX_ENTRIES);
            goto fail;
        }
        map->e = xrealloc(map->e, (size_t)(map->n + 1) * sizeof(*map->e));
        map->e[map->n].from = xstrdup(from);
        map->e[map->n].to = xstrdup(to);
        map->n++;
    }
    if (ferror(fp)) {
        snprintf(why, whylen, "%s: %s", path, strerror(errno));
        goto fail;
    }
    free(line);
    fclose(fp);
    return 0;

fail:
    free(line);
    fclose(fp);
    cfg_map_free(map);
    return -1;
}

const char *cfg_map_lookup(const struct cfg_map *map, const char *addr)
{
    const char *at;
    int i;

    if (map == NULL || addr == NULL || *addr == '\0')
        return NULL;
    for (i = 0; i < map->n; i++)
        if (strcasecmp(map->e[i].from, addr) == 0)
            return map->e[i].to;
    if ((at = strrchr(addr, '@')) == NULL)
        return NULL;
    for (i = 0; i < map->n; i++)
        if (map->e[i].from[0] == '@' && strcasecmp(map->e[i].from, at) == 0)
            return map->e[i].to;
    return NULL;
}
