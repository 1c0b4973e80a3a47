/* upstream.c — where a connection goes: balancing over the configured upstreams, skipping the
 * ones that failed recently, connecting with a timeout, and the PROXY protocol header that
 * tells an upstream who the client really is. */
#include "proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static _Atomic unsigned next_rr;

int upstream_connect(const struct addr *a, int timeout_s) {
    struct timeval limit = {timeout_s, 0};
    int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    /* A blocking connect gives up after SO_SNDTIMEO (with EINPROGRESS), so the timeout costs
     * no poll and no fcntl; copy_prepare then sets the copy loops' tick instead. */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    if (connect(fd, (const struct sockaddr *)&a->sa, a->len) < 0) {
        if (errno == EINPROGRESS || errno == EAGAIN) errno = ETIMEDOUT;
        return close_failed(fd);
    }
    copy_prepare(fd);
    return fd;
}

int upstream_dial(const char *host, int port) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res;
    char service[8];
    int fd = -1, tries = 0;
    snprintf(service, sizeof service, "%d", port);
    if (getaddrinfo(host, service, &hints, &res)) return errno = EHOSTUNREACH, -1;
    /* A name may have several addresses (::1 and 127.0.0.1 for localhost): try a few. */
    for (struct addrinfo *ai = res; ai && fd < 0 && tries++ < 3; ai = ai->ai_next) {
        struct addr a = {.len = ai->ai_addrlen};
        memcpy(&a.sa, ai->ai_addr, ai->ai_addrlen);
        fd = upstream_connect(&a, cfg.connect_timeout);
    }
    int e = errno;
    freeaddrinfo(res);
    errno = e;
    return fd;
}

/* FNV-1a over the address bytes (not the port: one client machine, one upstream). */
unsigned upstream_hash(const struct addr *client, unsigned n) {
    int len;
    const uint8_t *p = addr_ip(client, &len);
    uint32_t h = 2166136261u;
    for (int i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h % n;
}

int upstream_open(struct conn *c) {
    unsigned n = (unsigned)cfg.nup, tried = 0;
    unsigned start = cfg.balance == BALANCE_SOURCE ? upstream_hash(&c->peer, n)
                                                   : atomic_fetch_add(&next_rr, 1) % n;
    uint64_t now = mono_ns();
    /* First the upstreams that are up, in order from start; only if all of those fail, the
     * ones marked down, which may have come back. */
    for (int pass = 0; pass < 2; pass++) {
        for (unsigned i = 0; i < n; i++) {
            unsigned k = (start + i) % n;
            struct upstream *u = &cfg.up[k];
            uint64_t down_until = atomic_load(&u->down_until);
            if ((tried & 1u << k) || (pass == 0 && down_until > now)) continue;
            if (atomic_load(&c->end)) return -1; /* stopped meanwhile: no more tries */
            tried |= 1u << k;
            int fd = upstream_connect(&u->addr, cfg.connect_timeout);
            if (fd >= 0) {
                if (down_until) atomic_store(&u->down_until, 0);
                atomic_fetch_add(&u->connects, 1);
                c->up = u;
                return fd;
            }
            int e = errno;
            if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM)
                return -1; /* our shortage, not the upstream's fault: keep it up */
            atomic_fetch_add(&u->failures, 1);
            atomic_store(&u->down_until, mono_ns() + DOWN_SECONDS * 1000000000ull);
            if (down_until <= now) /* log the fall, not every failure while down */
                log_line("upstream %s is down: %s; skipped for %d s", u->name, strerror(e),
                         DOWN_SECONDS);
        }
    }
    return -1;
}

int upstream_proxy_header(int version, const struct addr *src, const struct addr *dst, char *buf) {
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
    static const char sig[12] = "\r\n\r\n\0\r\nQUIT\n";
    uint16_t body = htons(len ? 2 * len + 4 : 0), sport = htons(addr_port(src)),
             dport = htons(addr_port(dst));
    memcpy(buf, sig, 12);
    buf[12] = 0x21;
    buf[13] = len == 4 ? 0x11 : len == 16 ? 0x21 : 0x00; /* TCP over IPv4, IPv6, or unspec */
    memcpy(buf + 14, &body, 2);
    if (!len) return 16;
    memcpy(buf + 16, sip, len);
    memcpy(buf + 16 + len, dip, len);
    memcpy(buf + 16 + 2 * (size_t)len, &sport, 2);
    memcpy(buf + 18 + 2 * (size_t)len, &dport, 2);
    return 20 + 2 * len;
}
