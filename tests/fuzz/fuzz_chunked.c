/* tests/fuzz/fuzz_chunked.c — libFuzzer target: the real chunked-body copy, fed through a
 * socketpair. Checks, beyond "no crash": when the copy accepts a body, what came out is
 * exactly the bytes it consumed, unchanged; and it never consumes past the input. */
#include "../../proxy.h"

#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int pair(int fds[2]) {
    int big = 1 << 20;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) abort();
    for (int i = 0; i < 2; i++) {
        setsockopt(fds[i], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
        setsockopt(fds[i], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static struct copier k;
    static struct inbuf s;
    static char *out;
    if (!out) {
        signal(SIGPIPE, SIG_IGN);
        cfg.copy = COPY_BUFFER;
        cfg.buffer_size = 4096;
        if (copy_init(&k) < 0 || !(s.buf = malloc(HEAD_MAX)) || !(out = malloc(1 << 20))) abort();
    }
    if (size > 200000) return 0; /* stays within the socket buffers: no reader thread needed */
    int in[2], sink[2];
    pair(in);
    pair(sink);
    if (size && write(in[0], data, size) != (ssize_t)size) abort();
    shutdown(in[0], SHUT_WR);
    struct conn c = {.client = in[1], .server = sink[0], .cfg = &cfg, .start_ns = mono_ns()};
    atomic_store(&c.last_ns, c.start_ns);
    s.off = s.len = 0;
    int rc = http_copy_chunked(&c, &k, &s, in[1], sink[0]);
    shutdown(sink[0], SHUT_WR);
    size_t got = 0;
    for (ssize_t n; (n = read(sink[1], out + got, (1 << 20) - got)) > 0;) got += (size_t)n;
    if (got > size || memcmp(out, data, got)) abort(); /* out is always a prefix of in */
    if (rc == 0) {
        /* Consumed = what the copy read off the socket, minus what it left buffered. */
        size_t left = 0;
        char probe[4096];
        for (ssize_t n; (n = read(in[1], probe, sizeof probe)) > 0;) left += (size_t)n;
        if (got + (s.len - s.off) + left != size) abort();
    }
    close(in[0]), close(in[1]), close(sink[0]), close(sink[1]);
    return 0;
}
