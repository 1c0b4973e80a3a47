/* proxy_protocol.c — the PROXY protocol (haproxy's, versions 1 and 2), both ways: the header
 * tcp mode sends an upstream to say who the client is (send_proxy), and the one a trusted
 * balancer sends us (trusted_proxies). Reading one takes exactly its bytes off the socket, so
 * that what follows is the client's own, for either mode to serve. */
#include "proxy.h"

#include <arpa/inet.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>

static const char v2_sig[12] = "\r\n\r\n\0\r\nQUIT\n";
#define V1_MAX 107 /* the longest version 1 line, CRLF included */
#define V2_MAX                                                                                     \
    1040 /* a version 2 header we accept: 16 bytes and up to 1 KiB of addresses, TLVs              \
          */

int proxy_protocol_write(int version, const struct addr *src, const struct addr *dst, char *buf) {
    int len, dlen;
    const uint8_t *sip = addr_ip(src, &len), *dip = addr_ip(dst, &dlen);
    if (len != dlen) len = 0; /* families differ: say UNKNOWN */
    if (version == 1) {
        char sa[INET6_ADDRSTRLEN], da[INET6_ADDRSTRLEN];
        int fam = len == 4 ? AF_INET : AF_INET6;
        if (!len) return sprintf(buf, "PROXY UNKNOWN\r\n");
        return sprintf(buf, "PROXY TCP%c %s %s %d %d\r\n", len == 4 ? '4' : '6',
                       inet_ntop(fam, sip, sa, sizeof sa), inet_ntop(fam, dip, da, sizeof da),
                       addr_port(src), addr_port(dst));
    }
    /* Version 2: signature, version+command (2, PROXY), family+protocol, length, addresses. */
    uint16_t body = htons(len ? 2 * len + 4 : 0), sport = htons(addr_port(src)),
             dport = htons(addr_port(dst));
    memcpy(buf, v2_sig, 12);
    buf[12] = 0x21;
    buf[13] = 0x00; /* unspecified, unless TCP over IPv4 or IPv6: */
    if (len == 4) buf[13] = 0x11;
    if (len == 16) buf[13] = 0x21;
    memcpy(buf + 14, &body, 2);
    if (!len) return 16;
    memcpy(buf + 16, sip, len);
    memcpy(buf + 16 + len, dip, len);
    memcpy(buf + 16 + 2 * (size_t)len, &sport, 2);
    memcpy(buf + 18 + 2 * (size_t)len, &dport, 2);
    return 20 + 2 * len;
}

/* Parses a version 1 line p[0, len) (CRLF included) into *client. Returns 0 or -1. */
static int parse_v1(const char *p, size_t len, struct addr *client) {
    char line[V1_MAX + 1], fam[8], src[64], dst[64], sp[8], dp[8];
    int n = 0;
    memcpy(line, p, len - 2);
    line[len - 2] = 0;
    if (!strcmp(line, "PROXY UNKNOWN") || !strncmp(line, "PROXY UNKNOWN ", 14)) return 0;
    /* One space between fields, as the protocol says (sscanf alone would take any run), and
     * ports of digits only. */
    if (strstr(line, "  ") ||
        sscanf(line, "PROXY %7s %63s %63s %7[0-9] %7[0-9]%n", fam, src, dst, sp, dp, &n) != 5 ||
        (size_t)n != len - 2 || atoi(sp) > 65535 || atoi(dp) > 65535 || strlen(sp) > 5 ||
        strlen(dp) > 5)
        return -1;
    struct addr a = {0};
    uint8_t ignored[16];
    int family = !strcmp(fam, "TCP4") ? AF_INET : !strcmp(fam, "TCP6") ? AF_INET6 : 0;
    if (!family || inet_pton(family, dst, ignored) != 1) return -1;
    if (family == AF_INET) {
        struct sockaddr_in *s = (struct sockaddr_in *)&a.sa;
        s->sin_family = AF_INET;
        s->sin_port = htons((uint16_t)atoi(sp));
        if (inet_pton(AF_INET, src, &s->sin_addr) != 1) return -1;
        a.len = sizeof *s;
    } else {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a.sa;
        s->sin6_family = AF_INET6;
        s->sin6_port = htons((uint16_t)atoi(sp));
        if (inet_pton(AF_INET6, src, &s->sin6_addr) != 1) return -1;
        a.len = sizeof *s;
    }
    *client = a;
    return 0;
}

/* Parses a whole version 2 header p[0, len) into *client. Returns 0 or -1. */
static int parse_v2(const uint8_t *p, size_t len, struct addr *client) {
    int cmd = p[12] & 0x0f, family = p[13] >> 4, stream = (p[13] & 0x0f) == 1;
    struct addr a = {0};
    if (p[12] >> 4 != 2 || cmd > 1) return -1;
    if (cmd == 0) return 0; /* LOCAL: the balancer's own connection (a health check) */
    if ((family == 1 || family == 2) && !stream) return -1; /* UDP over a TCP connection? */
    if (family == 1 && len >= 16 + 12) {
        struct sockaddr_in *s = (struct sockaddr_in *)&a.sa;
        s->sin_family = AF_INET;
        memcpy(&s->sin_addr, p + 16, 4);
        memcpy(&s->sin_port, p + 24, 2);
        a.len = sizeof *s;
    } else if (family == 2 && len >= 16 + 36) {
        struct sockaddr_in6 *s = (struct sockaddr_in6 *)&a.sa;
        s->sin6_family = AF_INET6;
        memcpy(&s->sin6_addr, p + 16, 16);
        memcpy(&s->sin6_port, p + 48, 2);
        a.len = sizeof *s;
    } else if (family == 1 || family == 2) {
        return -1; /* too short for its addresses */
    } else {
        return 0; /* unspecified or a unix socket: no address to use */
    }
    *client = a;
    return 0;
}

int proxy_protocol_parse(const char *p, size_t len, struct addr *client, size_t *used) {
    const uint8_t *u = (const uint8_t *)p;
    size_t sig = len < 12 ? len : 12;
    if (!memcmp(p, v2_sig, sig)) {
        if (len < 16) return 0;
        size_t total = 16 + (size_t)(u[14] << 8 | u[15]);
        if (total > V2_MAX) return -1;
        if (len < total) return 0;
        *used = total;
        return parse_v2(u, total, client) < 0 ? -1 : 1;
    }
    size_t pre = len < 6 ? len : 6;
    if (memcmp(p, "PROXY ", pre)) return -1;
    const char *end = memchr(p, '\n', len < V1_MAX ? len : V1_MAX);
    if (!end) return len < V1_MAX ? 0 : -1;
    if (end == p || end[-1] != '\r') return -1;
    *used = (size_t)(end + 1 - p);
    return parse_v1(p, *used, client) < 0 ? -1 : 1;
}

int proxy_protocol_read(int fd, uint64_t deadline, struct addr *client) {
    char buf[V2_MAX];
    size_t have = 0, used = 0;
    for (;;) {
        uint64_t now = mono_ns();
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (now >= deadline || poll(&p, 1, (int)((deadline - now) / 1000000u) + 1) <= 0) {
            if (mono_ns() < deadline) continue; /* EINTR */
            return -1;
        }
        /* Peeked, not read: the bytes after the header are not ours to take. */
        ssize_t got = recv(fd, buf + have, sizeof buf - have, MSG_PEEK | MSG_DONTWAIT);
        if (got <= 0) return -1;
        int r = proxy_protocol_parse(buf, have + (size_t)got, client, &used);
        if (r < 0) return -1;
        /* What was peeked is all header (whole, or not yet): take it off the socket. */
        size_t take = r ? used - have : (size_t)got;
        if (recv(fd, buf + have, take, MSG_DONTWAIT) != (ssize_t)take) return -1;
        have += take;
        if (r) return 0;
    }
}
