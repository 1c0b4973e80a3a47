/* tests/fuzz/fuzz_head.c — libFuzzer target: request and response heads (http_head_end,
 * http_parse), and the targets, chunk sizes and field lines they lead to. Checks, beyond "no
 * crash": finding a head's end byte by byte agrees with finding it at once, and every pointer
 * the parser returns stays inside the input. */
#include "../../proxy.h"

#include <stdlib.h>
#include <string.h>

static void inside(const char *buf, size_t len, const char *p, size_t n) {
    if (n && (p < buf || p + n > buf + len)) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *buf = (const char *)data;
    size_t scanned = 0, step = 0, whole = 0, part = 0;
    enum scan all = http_head_end(buf, size, &scanned, &whole), found = SCAN_MORE;
    for (scanned = 0; step <= size; step++) { /* as if it arrived a byte at a time */
        found = http_head_end(buf, step, &scanned, &part);
        if (found != SCAN_MORE) break;
    }
    if (found != all || part != whole) abort();
    if (all != SCAN_DONE) return 0;

    static struct msg m;
    for (int request = 0; request < 2; request++) {
        if (http_parse(buf, whole, &m, request)) continue;
        inside(buf, whole, m.method, m.mlen);
        inside(buf, whole, m.target, m.tlen);
        if (m.nfields < 0 || m.nfields > HTTP_MAX_FIELDS) abort();
        if (m.chunked && m.length >= 0) abort(); /* both framings must have been refused */
        for (int i = 0; i < m.nfields; i++) {
            inside(buf, whole, m.field[i].name, m.field[i].nlen);
            inside(buf, whole, m.field[i].value, m.field[i].vlen);
            struct field f;
            if (http_field(m.field[i].name, m.field[i].nlen + 1, &f)) abort(); /* "name:" parses */
        }
        if (request) {
            char host[256];
            int port = 0;
            if (!http_authority(m.target, m.tlen, host, sizeof host, &port, 0) &&
                (port < 1 || port > 65535 || strlen(host) >= sizeof host))
                abort();
        }
    }
    uint64_t n;
    const char *lf = memchr(buf, '\r', whole);
    if (lf) http_chunk_size(buf, (size_t)(lf - buf), &n);
    return 0;
}
