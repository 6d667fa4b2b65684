/* libFuzzer target: apimime_for_api(), apimime_from_address() and apimime_graph_split() on
 * arbitrary messages must not crash or leak; a copy that needed no change (empty note) must
 * be byte-identical to the input, and a second pass over the copy must change nothing. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "relayd/apimime.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const rcpts[] = {"a@x.example", "B@Y.example", "fax@corp.example"};
    const char *msg = (const char *)data;
    struct apimime_split s;
    char note[256], err[256], from[320];
    char *out = NULL;
    size_t outlen = 0;

    /* The first byte says how many envelope recipients (1..3). */
    size_t n = size > 0 ? (size_t)(data[0] % 3) + 1 : 1;
    if (apimime_for_api(msg, size, rcpts, n, &out, &outlen, note, sizeof note, err, sizeof err) ==
        0) {
        if (note[0] == '\0' && (outlen != size || memcmp(out, msg, size) != 0))
            abort();
        if (strlen(note) >= sizeof note)
            abort();
        /* Idempotent: the copy of the copy needs no change (every envelope recipient is
         * named once, no other recipient is left, nothing swallows an added address). */
        {
            char *again = NULL;
            size_t againlen = 0;
            if (apimime_for_api(out, outlen, rcpts, n, &again, &againlen, note, sizeof note, err,
                                sizeof err) != 0 ||
                note[0] != '\0' || againlen != outlen || memcmp(again, out, outlen) != 0)
                abort();
            free(again);
        }
        free(out);
    }
    if (apimime_from_address(msg, size, from, sizeof from) == 0 && strchr(from, '@') == NULL)
        abort();
    if (apimime_graph_split(msg, size, &s, err, sizeof err) == 0) {
        if (s.draft == NULL)
            abort();
        for (size_t i = 0; i < s.natt; i++)
            if (s.att[i].name == NULL || s.att[i].content_type == NULL)
                abort();
        apimime_split_free(&s);
    }
    return 0;
}
