/* tcp.c — tcp mode: a worker connects the client to an upstream (upstream.c), tells it who the
 * client is if asked (the PROXY protocol header), and relays bytes both ways until both sides
 * are done; then the connection's access log line. */
#include "proxy.h"

#include <errno.h>
#include <string.h>

/* Connects an upstream, tells it who the client is if asked, relays both ways; a connection
 * back from the waiting room goes on dialling (a relay back from there is pool.c's). */
static enum served tcp_serve(struct worker *w, struct conn *c) {
    int fd = upstream_connect(c, NULL, 0, cfg.park_after != 0);
    if (fd < 0 && errno == EINPROGRESS) return SERVED_PARK; /* the dial waits parked */
    if (fd < 0) {
        conn_end(c, END_NO_UPSTREAM);
        return SERVED_DONE;
    }
    pool_set_server(w, fd);
    if (c->cfg->send_proxy != SEND_PROXY_OFF) {
        char hdr[128];
        struct addr local = {0}; /* if getsockname fails: families differ, PROXY UNKNOWN */
        net_local(c->client, &local);
        int n = proxy_protocol_write(c->cfg->send_proxy, &c->peer, &local, hdr);
        if (copy_send(c, c->server, hdr, (size_t)n) < 0) return SERVED_DONE;
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
