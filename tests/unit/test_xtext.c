/* Unit tests for common/xtext.c (RFC 3461 xtext). */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdlib.h>
#include <string.h>

#include "common/xtext.h"

/* RFC 3461 xtext: encoding and decoding, and what does not decode. */
Test(xtext, codec)
{
    static const struct {
        const char *label, *in, *want; /* want NULL: not xtext */
    } dec[] = {
        {"plain", "abc@example.com", "abc@example.com"},
        {"escapes", "a+2Bb+3Dc+20d", "a+b=c d"},
        {"8bit", "j+C3+B6rg", "j\xc3\xb6rg"},
        {"lower hex", "a+2b", NULL},
        {"short", "a+2", NULL},
        {"nul", "a+00", NULL},
        {"equals", "a=b", NULL},
        {"space", "a b", NULL},
    };
    char *x;

    for (size_t i = 0; i < sizeof dec / sizeof dec[0]; i++) {
        x = xtext_decode(dec[i].in, strlen(dec[i].in));
        if (dec[i].want == NULL) {
            cr_expect(x == NULL, "%s: decoded to %s", dec[i].label, x);
        } else {
            cr_expect(x != NULL && strcmp(x, dec[i].want) == 0, "%s: %s", dec[i].label,
                      x ? x : "(null)");
        }
        free(x);
    }
    x = xtext_encode("a+b=c d\xc3\xb6~!");
    cr_expect(eq(str, x, "a+2Bb+3Dc+20d+C3+B6~!"));
    free(x);
    x = xtext_encode("");
    cr_expect(eq(str, x, ""));
    free(x);
}
