/*
 * test_buf - the growable buffer: limits, NUL termination, lines, printf, consume, steal.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"

/* A new buffer is empty, NUL-terminated and buf_free() returns NULL. */
Test(buf, new_free)
{
    struct buf *b = buf_new(0);

    cr_assert(ne(ptr, b, NULL));
    cr_expect(eq(sz, b->len, 0));
    cr_expect(eq(str, b->data, ""));
    cr_expect(eq(ptr, buf_free(b), NULL));
    cr_expect(eq(ptr, buf_free(NULL), NULL));
}

/* Appends grow the buffer (across several doublings) and keep it NUL-terminated. */
Test(buf, append_grows)
{
    struct buf *b = buf_new(0);
    char chunk[100];
    size_t i;

    memset(chunk, 'x', sizeof chunk);
    for (i = 0; i < 100; i++)
        cr_assert(eq(int, buf_append(b, chunk, sizeof chunk), 0));
    cr_expect(eq(sz, b->len, 10000));
    cr_expect(ge(sz, b->cap, 10001));
    cr_expect(eq(chr, b->data[b->len], '\0'));
    cr_expect(eq(sz, strspn(b->data, "x"), 10000));
    cr_expect(eq(int, buf_append(b, NULL, 0), 0));
    cr_expect(eq(sz, b->len, 10000));
    buf_free(b);
}

struct max_case {
    const char *label;
    size_t max;
    const char *first;
    const char *second;
    int want_rc;
    const char *want_data;
};

static const struct max_case max_cases[] = {
    {"fits exactly", 10, "hello", "world", 0, "helloworld"},
    {"one over", 10, "hello", "world!", -ENOSPC, "hello"},
    {"first already at max", 5, "hello", "!", -ENOSPC, "hello"},
    {"empty append at max", 5, "hello", "", 0, "hello"},
    {"unlimited", 0, "hello", "world and more", 0, "helloworld and more"},
};

/* Appending past max fails with -ENOSPC and leaves the buffer as it was. */
Test(buf, append_max)
{
    size_t i;

    for (i = 0; i < sizeof max_cases / sizeof max_cases[0]; i++) {
        const struct max_case *c = &max_cases[i];
        struct buf *b = buf_new(c->max);

        cr_assert(eq(int, buf_puts(b, c->first), 0), "%s", c->label);
        cr_expect(eq(int, buf_puts(b, c->second), c->want_rc), "%s", c->label);
        cr_expect(eq(str, b->data, (char *)c->want_data), "%s", c->label);
        cr_expect(eq(sz, b->len, strlen(c->want_data)), "%s", c->label);
        buf_free(b);
    }
}

/* buf_reserve() respects max and makes room without changing the contents. */
Test(buf, reserve)
{
    struct buf *b = buf_new(100);

    cr_expect(eq(int, buf_reserve(b, 100), 0));
    cr_expect(ge(sz, b->cap, 101));
    cr_expect(eq(sz, b->len, 0));
    cr_expect(eq(int, buf_reserve(b, 101), -ENOSPC));
    cr_expect(eq(int, buf_reserve(b, (size_t)-1), -ENOSPC));
    buf_free(b);
}

/* buf_printf() appends formatted text, honours max and leaves the buffer on failure. */
Test(buf, printf)
{
    struct buf *b = buf_new(32);

    cr_expect(eq(int, buf_printf(b, "%d %s", 250, "OK"), 0));
    cr_expect(eq(int, buf_printf(b, "-%05d", 42), 0));
    cr_expect(eq(str, b->data, "250 OK-00042"));
    cr_expect(eq(int, buf_printf(b, "%s", "this is far too long for the limit"), -ENOSPC));
    cr_expect(eq(str, b->data, "250 OK-00042"));
    cr_expect(eq(sz, b->len, 12));
    buf_free(b);
}

/* A long printf forces growth in the middle of formatting. */
Test(buf, printf_grows)
{
    struct buf *b = buf_new(0);

    cr_expect(eq(int, buf_printf(b, "%0500d", 7), 0));
    cr_expect(eq(sz, b->len, 500));
    cr_expect(eq(chr, b->data[499], '7'));
    cr_expect(eq(chr, b->data[500], '\0'));
    buf_free(b);
}

struct line_case {
    const char *label;
    const char *input;
    size_t input_len;
    size_t want_consume; /* 0: no complete line */
    const char *want_line;
    size_t want_n;
};

static const struct line_case line_cases[] = {
    {"CRLF", "EHLO x\r\nrest", 13, 8, "EHLO x", 6},
    {"bare LF", "EHLO x\nrest", 11, 7, "EHLO x", 6},
    {"empty CRLF line", "\r\n", 2, 2, "", 0},
    {"empty LF line", "\n", 1, 1, "", 0},
    {"no line ending", "EHLO x", 6, 0, NULL, 0},
    {"lone CR is not an ending", "EHLO x\r", 7, 0, NULL, 0},
    {"CR inside the line stays", "a\rb\n", 4, 4, "a\rb", 3},
    {"NUL inside the line", "a\0b\r\n", 5, 5, "a\0b", 3},
    {"only the first of two lines", "a\nbb\r\n", 7, 2, "a", 1},
    {"empty buffer", "", 0, 0, NULL, 0},
};

/* buf_getline() finds the first line, strips CRLF or LF, and says how much to consume. */
Test(buf, getline)
{
    size_t i;

    for (i = 0; i < sizeof line_cases / sizeof line_cases[0]; i++) {
        const struct line_case *c = &line_cases[i];
        struct buf *b = buf_new(0);
        const char *line = NULL;
        size_t n = 99, used;

        cr_assert(eq(int, buf_append(b, c->input, c->input_len), 0));
        used = buf_getline(b, &line, &n);
        cr_expect(eq(sz, used, c->want_consume), "%s", c->label);
        if (c->want_line != NULL && used != 0) {
            cr_expect(eq(ptr, (void *)line, b->data), "%s", c->label);
            cr_expect(eq(sz, n, c->want_n), "%s", c->label);
            cr_expect(eq(int, memcmp(line, c->want_line, n), 0), "%s", c->label);
        }
        buf_free(b);
    }
}

/* Line lengths are exact, including a NUL inside the line. */
Test(buf, getline_lengths)
{
    struct buf *b = buf_new(0);
    const char *line;
    size_t n;

    cr_assert(eq(int, buf_append(b, "a\0b\r\nxy\n", 8), 0));
    cr_expect(eq(sz, buf_getline(b, &line, &n), 5));
    cr_expect(eq(sz, n, 3));
    cr_expect(eq(int, memcmp(line, "a\0b", 3), 0));
    buf_consume(b, 5);
    cr_expect(eq(sz, buf_getline(b, &line, &n), 3));
    cr_expect(eq(sz, n, 2));
    cr_expect(eq(int, memcmp(line, "xy", 2), 0));
    buf_free(b);
}

/* Pipelined input: consuming line by line walks through every line, then reports none. */
Test(buf, getline_consume_loop)
{
    static const char *const want[] = {"MAIL FROM:<a@b>", "RCPT TO:<c@d>", "", "DATA"};
    struct buf *b = buf_new(0);
    const char *line;
    size_t n, used, i = 0;

    cr_assert(eq(int, buf_puts(b, "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\n\r\nDATA\r\nQU"), 0));
    while ((used = buf_getline(b, &line, &n)) != 0 && i < 10) {
        cr_assert(lt(sz, i, 4));
        cr_expect(eq(sz, n, strlen(want[i])), "line %zu", i);
        cr_expect(eq(int, strncmp(line, want[i], n), 0), "line %zu", i);
        buf_consume(b, used);
        i++;
    }
    cr_expect(eq(sz, i, 4));
    cr_expect(eq(str, b->data, "QU"));
    buf_free(b);
}

/* buf_consume() drops a prefix, keeps the NUL, and clamps past the end. */
Test(buf, consume)
{
    struct buf *b = buf_new(0);

    cr_assert(eq(int, buf_puts(b, "hello world"), 0));
    buf_consume(b, 0);
    cr_expect(eq(str, b->data, "hello world"));
    buf_consume(b, 6);
    cr_expect(eq(str, b->data, "world"));
    cr_expect(eq(sz, b->len, 5));
    buf_consume(b, 5);
    cr_expect(eq(str, b->data, ""));
    cr_expect(eq(sz, b->len, 0));
    cr_assert(eq(int, buf_puts(b, "abc"), 0));
    buf_consume(b, 1000);
    cr_expect(eq(sz, b->len, 0));
    cr_expect(eq(str, b->data, ""));
    buf_free(b);
}

/* After consuming, the max applies to what is left, not to what was ever appended. */
Test(buf, consume_frees_room)
{
    struct buf *b = buf_new(8);

    cr_assert(eq(int, buf_puts(b, "12345678"), 0));
    cr_expect(eq(int, buf_puts(b, "9"), -ENOSPC));
    buf_consume(b, 4);
    cr_expect(eq(int, buf_puts(b, "9abc"), 0));
    cr_expect(eq(str, b->data, "56789abc"));
    buf_free(b);
}

/* buf_reset() empties the buffer, which stays usable. */
Test(buf, reset)
{
    struct buf *b = buf_new(0);

    cr_assert(eq(int, buf_puts(b, "abc"), 0));
    buf_reset(b);
    cr_expect(eq(sz, b->len, 0));
    cr_expect(eq(str, b->data, ""));
    cr_expect(eq(int, buf_puts(b, "de"), 0));
    cr_expect(eq(str, b->data, "de"));
    buf_free(b);
}

/* buf_steal() hands over the data and leaves an empty, usable buffer with the same max. */
Test(buf, steal)
{
    struct buf *b = buf_new(16);
    char *data;
    size_t len = 0;

    cr_assert(eq(int, buf_puts(b, "payload"), 0));
    data = buf_steal(b, &len);
    cr_expect(eq(str, data, "payload"));
    cr_expect(eq(sz, len, 7));
    cr_expect(eq(sz, b->len, 0));
    cr_expect(eq(str, b->data, ""));
    cr_expect(eq(int, buf_puts(b, "0123456789abcdefg"), -ENOSPC));
    cr_expect(eq(int, buf_puts(b, "again"), 0));
    cr_expect(eq(str, b->data, "again"));
    free(data);
    buf_free(b);
}

/* Growth stops at the limit: a buffer with max M never allocates more than M + 1 bytes
 * (max_memory counts allocated bytes; doubling made 35 MB cost 64 MB). */
Test(buf, growth_capped_at_max)
{
    struct buf *b = buf_new(1000);
    char chunk[300];

    memset(chunk, 'x', sizeof(chunk));
    cr_assert_eq(buf_append(b, chunk, sizeof(chunk)), 0);
    cr_assert_eq(buf_append(b, chunk, sizeof(chunk)), 0);
    cr_assert_eq(buf_append(b, chunk, sizeof(chunk)), 0);
    cr_expect_leq(b->cap, 1001);
    cr_assert_eq(buf_append(b, chunk, 100), 0);
    cr_expect_eq(b->len, 1000);
    cr_expect_eq(b->data[1000], '\0');
    cr_expect_eq(buf_append(b, "y", 1), -ENOSPC);
    buf_free(b);
}
