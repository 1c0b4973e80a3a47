/* tests/fuzz/fuzz_proxy.c — libFuzzer target: reading a PROXY protocol header from a trusted
 * balancer, through a socketpair, as a worker reads it. Checks, beyond "no crash": a header
 * taken is one the parser accepts whole, and exactly its bytes leave the socket: what follows
 * is the client's own and stays there, unchanged. */
#include "../../proxy.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char rest[1 << 16];
    int fds[2];
    struct addr client = {0}, parsed = {0};
    size_t used = 0;
    if (size > sizeof rest) return 0;
    signal(SIGPIPE, SIG_IGN);
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) abort();
    if (write(fds[1], data, size) != (ssize_t)size) abort();
    shutdown(fds[1], SHUT_WR); /* no more: a header cut short is refused, not waited for */
    int rc = proxy_protocol_read(fds[0], mono_ns() + 1000000000u, &client);
    int whole = proxy_protocol_parse((const char *)data, size, &parsed, &used);
    if ((rc == 0) != (whole == 1)) abort();
    if (rc == 0) {
        ssize_t n = read(fds[0], rest, sizeof rest);
        if (n < 0) n = 0;
        if ((size_t)n != size - used || memcmp(rest, data + used, (size_t)n)) abort();
        if (client.len != parsed.len || memcmp(&client.sa, &parsed.sa, client.len)) abort();
    }
    close(fds[0]);
    close(fds[1]);
    return 0;
}
