/*
 * ctl_devices - "relayctl devices" (see ctl_devices.h).
 *
 * Text: one block per client, most recently seen first: address, listener, last HELO
 * name, first and last seen, messages accepted, then one line per refusal reason with its
 * count and the last one's time and text.  --json: an array of objects with the same
 * facts.  Reads only (the spool may be opened read-only).
 */
#include "relayd/ctl/ctl_devices.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static const char *when(int64_t t, char out[32])
{
    time_t tt = (time_t)t;
    struct tm tm;

    if (t == 0 || gmtime_r(&tt, &tm) == NULL || strftime(out, 32, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        snprintf(out, 32, "-");
    return out;
}

/* A JSON string; bytes outside printable ASCII are escaped (HELO names are the client's). */
static void json_str(const char *s)
{
    if (s == NULL) {
        fputs("null", stdout);
        return;
    }
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f)
            printf("\\u%04x", *p);
        else
            putchar(*p);
    }
    putchar('"');
}

static void print_json(const struct spool_device *d, size_t n)
{
    char tb[32];

    putchar('[');
    for (size_t i = 0; i < n; i++) {
        printf("%s\n  {\"client\": ", i ? "," : "");
        json_str(d[i].client);
        fputs(", \"listener\": ", stdout);
        json_str(d[i].listener);
        fputs(", \"helo\": ", stdout);
        json_str(d[i].helo);
        printf(", \"first_seen\": \"%s\"", when(d[i].first_seen, tb));
        printf(", \"last_seen\": \"%s\"", when(d[i].last_seen, tb));
        printf(", \"accepted\": %llu, \"refusals\": [", (unsigned long long)d[i].accepted);
        for (size_t j = 0; j < d[i].nreasons; j++) {
            const struct spool_device_reason *r = &d[i].reasons[j];

            printf("%s{\"reason\": ", j ? ", " : "");
            json_str(r->name);
            printf(", \"count\": %llu, \"last\": \"%s\", \"last_text\": ",
                   (unsigned long long)r->count, when(r->last_when, tb));
            json_str(r->last_text);
            putchar('}');
        }
        fputs("]}", stdout);
    }
    fputs(n ? "\n]\n" : "]\n", stdout);
}

static void print_text(const struct spool_device *d, size_t n)
{
    char a[32], b[32];

    for (size_t i = 0; i < n; i++) {
        printf("%s  listener=%s  helo=%s  accepted=%llu\n", d[i].client,
               d[i].listener ? d[i].listener : "-", d[i].helo ? d[i].helo : "-",
               (unsigned long long)d[i].accepted);
        printf("    first seen %s, last seen %s\n", when(d[i].first_seen, a),
               when(d[i].last_seen, b));
        for (size_t j = 0; j < d[i].nreasons; j++) {
            const struct spool_device_reason *r = &d[i].reasons[j];

            printf("    refused %llu x %s, last at %s: %s\n", (unsigned long long)r->count, r->name,
                   when(r->last_when, a), r->last_text ? r->last_text : "");
        }
    }
    if (n == 0)
        printf("no devices seen yet\n");
}

int ctl_devices(struct spool *sp, int argc, char **argv)
{
    struct spool_device *d;
    const char *only = NULL;
    size_t n, i, k = 0;
    int json = 0, rc;

    for (i = 0; i < (size_t)argc; i++) {
        if (strcmp(argv[i], "--json") == 0) {
            json = 1;
        } else if (argv[i][0] != '-' && only == NULL) {
            only = argv[i];
        } else {
            fprintf(stderr, "relayctl: devices: unexpected argument %s\n", argv[i]);
            return 2;
        }
    }
    if ((rc = spool_devices_list(sp, &d, &n)) != 0) {
        fprintf(stderr, "relayctl: devices: %s\n", spool_strerror(rc));
        return 1;
    }
    if (only != NULL) {
        for (i = 0; i < n; i++) {
            if (strcmp(d[i].client, only) == 0) {
                struct spool_device tmp = d[k];

                d[k++] = d[i];
                d[i] = tmp;
            }
        }
        if (k == 0) {
            fprintf(stderr, "relayctl: devices: %s: never seen\n", only);
            spool_devices_free(d, n);
            return 1;
        }
    } else {
        k = n;
    }
    if (json)
        print_json(d, k);
    else
        print_text(d, k);
    spool_devices_free(d, n);
    return 0;
}
