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
     * When the upstream failed, the client may still be owed a reply (http: 502), so only its
     * reading side is shut; the front thread closes the socket once the reply is out. */
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
