/* tests/fuzz/fuzz_auth.c — libFuzzer target: strict base64 and the Basic credential check.
 * Checks, beyond "no crash": whatever decodes re-encodes to exactly the input (one spelling
 * per credential), and any byte string encodes to something that decodes back to it. */
#include "../../proxy.h"

#include <stdlib.h>
#include <string.h>

static size_t encode(const uint8_t *in, size_t n, char *out) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v =
            (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = a[v >> 18 & 63];
        out[o++] = a[v >> 12 & 63];
        out[o++] = i + 1 < n ? a[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? a[v & 63] : '=';
    }
    return o;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static unsigned char dec[8192];
    static char enc[16384];
    if (size > 4096) return 0;
    int n = auth_base64_decode((const char *)data, size, dec, sizeof dec);
    if (n >= 0 && (encode(dec, (size_t)n, enc) != size || memcmp(enc, data, size))) abort();
    size_t e = encode(data, size, enc);
    n = auth_base64_decode(enc, e, dec, sizeof dec);
    if (size && (n != (int)size || memcmp(dec, data, size))) abort();

    /* The whole check, on a request whose Proxy-Authorization value is the input. */
    if (!cfg.nusers) {
        cfg.nusers = 1;
        strcpy(cfg.users[0].name, "alice");
        strcpy(cfg.users[0].pass, "s3cret");
    }
    static char head[8192];
    int len = snprintf(head, sizeof head, "GET / HTTP/1.1\r\nProxy-Authorization: %.*s\r\n\r\n",
                       (int)size, (const char *)data);
    size_t scanned = 0, end;
    static struct msg m;
    char user[64];
    if (len <= 0 || len >= (int)sizeof head) return 0;
    if (http_head_end(head, (size_t)len, &scanned, &end) == SCAN_DONE &&
        !http_parse(head, end, &m, 1) && auth_check(&cfg, &m, user, sizeof user) == AUTH_OK &&
        strcmp(user, "alice"))
        abort();
    return 0;
}
