/*
 * json - the JSON relayd reads and writes, and no more.
 *
 * Reader: one object whose top-level scalar members are kept (strings decoded, numbers as
 * written, true/false as words; null and nested values skipped): OAuth 2.0 token responses,
 * device-code answers, service account keys.  Strict: a malformed text is an error with a
 * reason, never a partial result.
 * Writer: a JSON string literal of any bytes: '"', '\\' and control characters escaped,
 * invalid UTF-8 (bytes from the wire) as U+FFFD; NULL as null.
 *
 * Errors: json_obj_parse() returns NULL with text in err; out of memory dies (xalloc).
 * Ownership: json_obj_parse() allocates, json_obj_free() frees (wiping the values, which may
 * be secrets); json_obj_get()'s result points into the object.
 */
#ifndef COMMON_JSON_H
#define COMMON_JSON_H

#include <stddef.h>
#include <stdio.h>

#include "common/buf.h"

struct json_obj;

/* The top-level scalar members of a JSON object.  NULL with text in err when the text is
 * not one well-formed JSON object (depth <= 32, no duplicate member names, no NUL in
 * strings). */
struct json_obj *json_obj_parse(const char *text, size_t len, char *err, size_t errlen);
/* The member's value, or NULL (also when j is NULL); points into j. */
const char *json_obj_get(const struct json_obj *j, const char *key);
/* Frees j (NULL is fine); returns NULL. */
struct json_obj *json_obj_free(struct json_obj *j);

/* Appends the JSON string literal of the n bytes at s to b. */
void json_quote_n(struct buf *b, const char *s, size_t n);
/* The same for a C string; NULL appends null. */
void json_quote(struct buf *b, const char *s);
/* The same, written to out. */
void json_fput_n(FILE *out, const char *s, size_t n);
void json_fput(FILE *out, const char *s);

#endif
