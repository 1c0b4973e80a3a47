/* tests/fuzz/fuzz_config.c — libFuzzer target: the config loader on arbitrary files. Checks,
 * beyond "no crash": a refused file names itself and a line; an accepted one is in range.
 * Name lookups are made numeric-only (see __wrap_getaddrinfo) so no input reaches the DNS. */
#include "../../proxy.h"

#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int __real_getaddrinfo(const char *, const char *, const struct addrinfo *, struct addrinfo **);
int __wrap_getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                       struct addrinfo **res) {
    struct addrinfo h = *hints;
    h.ai_flags |= AI_NUMERICHOST;
    return __real_getaddrinfo(node, service, &h, res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char path[64];
    static struct config c;
    char err[1024];
    if (!path[0]) snprintf(path, sizeof path, "/tmp/fuzz-config-%d.ini", (int)getpid());
    FILE *f = fopen(path, "w");
    if (!f) abort();
    fwrite(data, 1, size, f);
    fclose(f);
    if (config_load(&c, path, err, sizeof err) < 0) {
        size_t n = strlen(path);
        if (strncmp(err, path, n) || err[n] != ':') abort();
        return 0;
    }
    if (c.workers < 1 || c.workers > 50000 || c.buffer_size < 1024 || c.nup > MAX_UPSTREAMS ||
        c.allow.n < 1 || c.nusers > MAX_USERS || (c.mode == MODE_TCP && c.nup < 1) ||
        c.clients < c.max_connections)
        abort();
    config_free(&c);
    return 0;
}
