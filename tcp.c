/* tcp.c — tcp mode: a worker connects the client to an upstream (upstream.c), tells it who the
 * client is if asked (the PROXY protocol header), and relays bytes both ways until both sides
 * are done; then the connection's access log line. */
#include "proxy.h"

#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

/* Connects an upstream, tells it who the client is if asked, relays both ways; a connection
 * back from the waiting room goes on relaying, or dialling. */
static enum served tcp_serve(struct worker *w, struct conn *c) {
    if (c->relay) return pool_relay(w, c, pool_copy_down);
    int fd = upstream_connect(c, NULL, 0, cfg.park_after != 0);
    if (fd < 0 && errno == EINPROGRESS) return SERVED_PARK; /* the dial waits parked */
    if (fd < 0) {
        conn_end(c, END_NO_UPSTREAM);
        return SERVED_DONE;
    }
    pool_set_upstream(w, fd);
    if (c->cfg->send_proxy != SEND_PROXY_OFF) {
        char hdr[128];
        struct addr local = {0}; /* if getsockname fails: families differ, PROXY UNKNOWN */
        net_local(c->client, &local);
        int n = tcp_proxy_header(c->cfg->send_proxy, &c->peer, &local, hdr);
        if (copy_send(c, c->upstream, hdr, (size_t)n) < 0) return SERVED_DONE;
    }
    c->relay = 1;
    return pool_relay(w, c, pool_copy_down); /* the back thread: upstream → client */
}

/* One access log line per connection, once it is closed and counted, however often it
 * parked. */
static void tcp_done(const struct conn *c) {
    char peer[64];
    log_line("%s -> %s up=%llu down=%llu ms=%.3f end=%s", addr_format(&c->peer, peer, sizeof peer),
             c->chosen ? c->chosen->name : "-", (unsigned long long)c->bytes[UP],
             (unsigned long long)c->bytes[DOWN], (double)(mono_ns() - c->start_ns) / 1e6,
             end_names[atomic_load(&c->end)]);
}

/* tcp mode needs no scratch beyond the copiers and refuses by closing. */
const struct mode tcp_mode = {.name = "tcp", .serve = tcp_serve, .done = tcp_done};

/* Writes the PROXY protocol header (version 1 or 2) for src → dst into buf (at least 108
 * bytes) and returns its length. */
int tcp_proxy_header(int version, const struct addr *src, const struct addr *dst, char *buf) {
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
