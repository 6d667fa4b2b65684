/* libFuzzer target: proxyproto_parse() on arbitrary bytes must not crash or read past len,
 * and must keep its contract: a header it accepts (rc > 0) lies within the buffer, parses
 * the same from exactly its own bytes, and every shorter prefix of it is "need more" (0),
 * never an error; a buffer it calls incomplete (0) has only incomplete prefixes too. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "common/netaddr.h"
#include "common/proxyproto.h"

/* Parses a private copy of exactly n bytes, so that ASan sees any read beyond n. */
static int parse_copy(const uint8_t *data, size_t n, struct proxyproto_result *res)
{
    uint8_t *copy = malloc(n ? n : 1);
    int rc;

    if (n > 0)
        memcpy(copy, data, n);
    rc = proxyproto_parse(copy, n, res);
    free(copy);
    return rc;
}

static void check_result(const struct proxyproto_result *r)
{
    char text[128];

    if (r->version != 1 && r->version != 2)
        abort();
    if (r->local)
        return;
    if (r->src.ss_family != AF_INET && r->src.ss_family != AF_INET6)
        abort();
    netaddr_sockaddr_str((const struct sockaddr *)&r->src, text, sizeof(text));
    if (memchr(text, '\0', sizeof(text)) == NULL)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct proxyproto_result r1, r2;
    int rc, rc2;

    memset(&r1, 0, sizeof(r1));
    rc = parse_copy(data, size, &r1);
    if (rc > 0) {
        if ((size_t)rc > size)
            abort();
        check_result(&r1);
        memset(&r2, 0, sizeof(r2));
        rc2 = parse_copy(data, (size_t)rc, &r2);
        if (rc2 != rc || r2.version != r1.version || r2.local != r1.local)
            abort();
        if (!r1.local && memcmp(&r1.src, &r2.src, sizeof(r1.src)) != 0)
            abort();
        if (parse_copy(data, (size_t)rc - 1, &r2) != 0)
            abort();
        if (rc > 2 && parse_copy(data, (size_t)rc / 2, &r2) != 0)
            abort();
    } else if (rc == 0) {
        if (size >= PROXYPROTO_V2_HDR + 65535)
            abort(); /* no header is that long */
        if (size > 0 && parse_copy(data, size - 1, &r2) != 0)
            abort();
    } else if (rc != PROXYPROTO_ESIG && rc != PROXYPROTO_EV1 && rc != PROXYPROTO_EV2 &&
               rc != PROXYPROTO_ETOOLONG) {
        abort();
    } else if (proxyproto_strerror(rc) == NULL) {
        abort();
    }
    return 0;
}
