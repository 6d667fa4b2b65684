/* libFuzzer target: msgfix_build() on arbitrary messages must not crash, and the body (what
 * follows the header section) must come out byte-identical. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "relayd/msgfix.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct msgfix_opts o;
    struct msgfix_report rep;
    struct buf *out = buf_new(0);

    memset(&o, 0, sizeof(o));
    o.hostname = "relay.test";
    o.received = "Received: by relay.test";
    o.sender = "fuzz@example.com";
    o.queue_id = "0190A3F2C1D4";
    o.add_date = o.add_message_id = o.add_from = 1;
    if (msgfix_build((const char *)data, size, &o, out, &rep) != 0)
        abort();
    /* The original body is the tail of the output. */
    size_t body = size - rep.header_bytes;
    if (out->len < body || memcmp(out->data + out->len - body, data + rep.header_bytes, body) != 0)
        abort();
    buf_free(out);
    return 0;
}
