/* end.c — a connection's end, in one place: why it ended (the first reason recorded wins), the
 * shutdowns that wake both its loops wherever they wait, and its close: both sockets, counted,
 * its log line. Ending and closing are two steps because a connection is ended by whoever sees
 * the reason first (either loop, the stop, a timeout) while its threads still hold its sockets;
 * it is closed once, by pool.c, when nothing holds them any more. What the log line says is
 * the mode's business (tcp.c, http.c). */
#include "proxy.h"

#include <unistd.h>

void conn_why(struct conn *c, enum end reason) {
    int none = END_NONE;
    atomic_compare_exchange_strong(&c->end, &none, (int)reason);
}

void conn_end(struct conn *c, enum end reason) {
    conn_why(c, reason);
    /* shutdown, not close: it wakes a thread blocked on the fd without freeing the number.
     * When the server failed, only the client's reading side is shut: what was read from the
     * server before it failed may still be on its way to the client (the other loop is sending
     * it), and a response cut short reaches the client up to where it was cut. The socket
     * closes in conn_close. */
    shutdown(c->client, reason == END_UPSTREAM ? SHUT_RD : SHUT_RDWR);
    if (c->server >= 0) shutdown(c->server, SHUT_RDWR);
}

void conn_close(struct conn *c, void (*log)(const struct conn *c)) {
    close(c->client);
    if (c->server >= 0) close(c->server);
    conn_why(c, END_DONE);
    stats_conn_done(c);
    if (log) log(c);
}
