/* http_exchange.c — a request's exchange with its server (a configured upstream, or the host
 * the request names), below http.c's request loop: it finds the request a server connection (the
 * kept-alive one, or a new one dialled), sends the request, reads the response and forwards it, one
 * request at a time, retrying once on a fresh server connection when a kept-alive one turns out to
 * be closed. While a request's body streams upstream the back thread sends it, so that a response
 * may come before the body is all sent. A CONNECT tunnel, and an upgraded connection after its 101,
 * become a raw relay both ways here. This file also owns the counters of tunnels, upgrades and
 * retries. */
#include "proxy.h"

#include <errno.h>
#include <string.h>

#define BODY_END_WAIT_MS 100 /* how long a response waits for its request body to end */

/* One request and its response: what the front thread knows of it while it runs. What its
 * access log line says is in c->req. */
struct exchange {
    int is_head;      /* a HEAD request: its response has no body */
    int upgrade;      /* it asks to upgrade, and may: no body streams behind it */
    size_t out_len;   /* out[UP]: the rewritten head, and the body when buffered */
    int buffered;     /* the whole request is in out[UP]: it can be sent twice */
    int streaming;    /* the back thread sends its body */
    int close_client; /* the client was told that the connection ends after the response */
    int keep_server;  /* the server connection can carry another request */
    enum why failed;  /* no server connection could be made: why (WHY_NONE: it could) */
};

/* Where c->server stands after route(). */
enum route {
    ROUTE_FAILED, /* no connection could be made (errno says why) */
    ROUTE_LEFT,   /* c leaves its worker while the connection is made (dial) */
    ROUTE_NEW,
    ROUTE_REUSED
};

/* How forwarding a response went. */
enum response {
    RESPONSE_DONE,  /* a final response (or a 101) reached the client whole */
    RESPONSE_NONE,  /* the server closed or failed before any byte of a response */
    RESPONSE_BAD,   /* one we refuse (bad head, an unasked 101): nothing reached the client */
    RESPONSE_CUT,   /* the server failed after response bytes reached the client */
    RESPONSE_ENDED, /* the connection ended: the client left, idle_timeout, a stop */
    RESPONSE_LEFT,  /* nothing sent: c leaves its worker while its server connection is made */
};

/* The exchange's counters, rendered after http.c's. */
static struct {
    _Atomic uint64_t tunnels, upgrades; /* CONNECT tunnels, 101 upgrades */
    _Atomic uint64_t retries;           /* requests sent again on a fresh connection */
} counts;

void http_exchange_metrics(FILE *f) {
    metric_one(f, "proxy_http_tunnels_total", "counter", "CONNECT tunnels established.",
               atomic_load(&counts.tunnels));
    metric_one(f, "proxy_http_upgrades_total", "counter", "Upgrades (101) relayed.",
               atomic_load(&counts.upgrades));
    metric_one(f, "proxy_http_retries_total", "counter",
               "Requests sent again on a fresh upstream connection after a kept-alive one closed.",
               atomic_load(&counts.retries));
}

/* Why no server connection could be made, from upstream_connect's errno: a destination
 * refused by a rule (403, saying which kind: c->barred), a connect that timed out (504), our
 * own shortage (503), else what the network said (502). */
static enum why dial_why(const struct conn *c, int err) {
    switch (err) {
    case EACCES:
        return c->barred == REACH_DENIED        ? WHY_DENIED
               : c->barred == REACH_NOT_ALLOWED ? WHY_NOT_ALLOWED
                                                : WHY_DESTINATION;
    case E_LOOKUP: return WHY_DNS;
    case ETIMEDOUT: return WHY_CONNECT_TIMEOUT;
    case ECONNREFUSED: return WHY_REFUSED;
    case ECONNRESET: return WHY_RESET;
    case EHOSTUNREACH:
    case ENETUNREACH:
    case EHOSTDOWN:
    case ENETDOWN: return WHY_UNREACHABLE;
    case EMFILE:
    case ENFILE:
    case ENOMEM:
    case ENOBUFS:
    case EAGAIN: /* too many lookups at once */
    case EADDRNOTAVAIL: return WHY_RESOURCES;
    default: return WHY_CONNECT_FAILED;
    }
}

/* Whether a request with this method may be sent twice (RFC 9110 9.2.2). */
static int idempotent(const char *method) {
    static const char *const safe[] = {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"};
    for (size_t i = 0; i < sizeof safe / sizeof safe[0]; i++)
        if (!strcmp(method, safe[i])) return 1;
    return 0;
}

/* The proxy answers the request itself (http_reply) and the connection ends; the caller logs it
 * (http.c). */
static enum next answer_self_close(struct conn *c, enum why why) {
    http_reply(c, why, 0, 0);
    return NEXT_CLOSE;
}

/* ---- the server connection ---------------------------------------------------------- */

void http_end_server(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    if (c->server < 0) return;
    pool_set_server(w, -1);
    c->route[0] = 0;
    http_inbuf_clear(&h->in[DOWN]);
}

/* Whether the kept-alive server connection can carry another request: nothing unread, not
 * closed, not reset. A server may close an idle connection at any time, and bytes after a
 * complete response mean it speaks out of turn; either way it is dropped, not reused. One
 * non-blocking peek: it saves a failed round trip when the server's keep-alive timeout has
 * passed, the everyday case; the retry covers the race that is left. */
static int server_clean(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    char byte = 0;
    if (h->in[DOWN].len > h->in[DOWN].off) return 0;
    return recv(c->server, &byte, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

/* Connects c to host:port, or to the configured upstreams (host NULL), for the request read
 * into the worker's in[UP]. While others wait for a worker, c leaves its worker while the
 * connection is made (upstream_connect) if a head buffer is free to carry the request (c->stash:
 * all of in[UP], from the head on, which is read again when a worker takes c back and finds its
 * dial in progress: the request is handled from the start). Returns the fd, or -1 with errno
 * (EINPROGRESS: c leaves). */
static int dial(struct worker *w, struct conn *c, const char *host, int port) {
    struct inbuf *in = &((struct http_worker *)w->scratch)->in[UP];
    char *spare = cfg.park_after ? pool_head_take() : NULL;
    int fd = upstream_connect(c, host, port, spare != NULL);
    if (fd < 0 && errno == EINPROGRESS && spare) { /* it may leave only with a spare */
        memcpy(spare, in->buf, in->len);           /* the head starts the buffer: http_read_head */
        c->stash = spare;
        c->stash_len = in->len;
        return -1;
    }
    int e = errno;
    if (spare) pool_head_give(spare);
    errno = e;
    return fd;
}

/* Makes c->server a usable connection to where t goes (c->route names it: "host:port", or
 * "=" for the configured upstreams), keeping the open one when it goes there and is clean.
 * ROUTE_REUSED or ROUTE_NEW; ROUTE_FAILED with errno when no connection could be made;
 * ROUTE_LEFT when c leaves its worker while it is made (dial). */
static enum route route(struct worker *w, struct conn *c, const struct target *t) {
    char want[sizeof c->route] = "=";
    const char *host = t->authority ? t->host : NULL;
    if (host) snprintf(want, sizeof want, "%s:%d", host, t->port);
    if (c->server >= 0 && !strcmp(c->route, want) && server_clean(w, c)) return ROUTE_REUSED;
    http_end_server(w, c);
    int fd = dial(w, c, host, t->port);
    if (fd < 0) return errno == EINPROGRESS ? ROUTE_LEFT : ROUTE_FAILED;
    pool_set_server(w, fd);
    snprintf(c->route, sizeof c->route, "%s", want);
    return ROUTE_NEW;
}

/* ---- tunnels and upgrades: the raw relay ---------------------------------------------- */

/* Sends on what is buffered in direction d: bytes that came behind a head in a tunnel or an
 * upgrade. Returns 0, or -1 when the connection ended. */
static int flush(struct worker *w, struct conn *c, enum dir d) {
    struct inbuf *s = &((struct http_worker *)w->scratch)->in[d];
    int to = d == UP ? c->server : c->client;
    if (s->len > s->off && copy_send(c, to, s->buf + s->off, s->len - s->off) < 0) return -1;
    s->off = s->len;
    return 0;
}

/* The back thread's job in a tunnel: what came behind the response head, then upstream →
 * client until EOF or a park. */
static void relay_down(struct worker *w, struct conn *c) {
    if (flush(w, c, DOWN) == 0) copy_stream(c, &w->cp[DOWN], DOWN);
}

/* Relays a tunnel (after CONNECT's 200) or an upgraded connection (after a 101) raw both ways
 * (pool_relay), what came behind the heads first: until both sides are done or it ends
 * (NEXT_CLOSE: the request that opened it is done); or until it is quiet (NEXT_PARK). Back from
 * the waiting room, pool.c goes on relaying it: nothing is left behind the heads by then. */
static enum next relay_raw(struct worker *w, struct conn *c) {
    c->relay = 1;
    c->server_apart = 0; /* a tunnel: either side failing ends it */
    if (flush(w, c, UP) == 0 && pool_relay(w, c, relay_down) == SERVED_PARK) return NEXT_PARK;
    return NEXT_CLOSE;
}

/* ---- the request body, on the back thread --------------------------------------------- */

/* The back thread's job while a request body streams: sends it upstream by its framing, and
 * records in body_rc whether it all went. A body the client broke off (EOF, bad chunk) ends
 * the connection; one the server stopped taking (it answered early and closed) ends only
 * the server connection, and the front thread forwards whatever response came. */
static void send_body(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    int rc;
    copy_min_rate_start(c, UP); /* a body that trickles in is ended by min_rate */
    if (h->body_chunked)
        rc = http_copy_chunked(c, &w->cp[UP], &h->in[UP], c->client, c->server);
    else
        rc = http_copy_n(c, &w->cp[UP], &h->in[UP], c->client, c->server, h->body_length);
    copy_min_rate_stop(c, UP);
    if (rc < 0 && !atomic_load(&c->server_failed)) conn_end(c, END_CLIENT);
    h->body_rc = rc;
}

/* Whether a request body still streams when its response comes. A server commonly answers as
 * soon as it has the body's last bytes, while the back thread that sent them has yet to say it
 * is done: a moment's wait tells that apart from a server that answered early (and may have
 * stopped reading), instead of leaving a keep-alive client's connection to whichever thread
 * wins the race. */
static int body_pending(struct worker *w) {
    return !pool_back_wait_for(w, BODY_END_WAIT_MS);
}

/* ---- the exchange: a request out, its response back ----------------------------------- */

/* How a response's body ended. */
enum body { BODY_DONE, BODY_AT_EOF, BODY_FAILED };

/* Whether the response r to x has a body at all (RFC 9112 6.3): none after HEAD, 1xx, 204 and
 * 304. */
static int has_body(const struct msg *r, const struct exchange *x) {
    return !x->is_head && r->status >= 200 && r->status != 204 && r->status != 304;
}

/* Whether r, answering x, has a body that ends when the server closes: then the client can
 * tell where it ends only by the close. */
static int ends_at_close(const struct msg *r, const struct exchange *x) {
    return has_body(r, x) && !r->chunked && r->length < 0;
}

/* Forwards the body of the response r by its framing: chunked; Content-Length (sent of it: what
 * went with the head); else until the server closes. Returns 0 when the body is whole, -2
 * when it ended at the server's close, -1 on a failure. */
static int forward_body(struct worker *w, struct conn *c, const struct msg *r, struct inbuf *s,
                        size_t sent) {
    int rc;
    if (r->chunked) {
        rc = http_copy_chunked(c, &w->cp[DOWN], s, c->server, c->client);
    } else if (r->length >= 0) {
        uint64_t rest = (uint64_t)r->length - sent;
        rc = http_copy_n(c, &w->cp[DOWN], s, c->server, c->client, rest);
    } else {
        if (flush(w, c, DOWN) < 0) return -1; /* what came with the head */
        int64_t moved = copy_bytes(c, &w->cp[DOWN], c->server, c->client, UINT64_MAX);
        return moved < 0 ? -1 : -2;
    }
    return rc;
}

/* Forwards the body, if any, of the response r answering x (forward_body), timed against min_rate.
 */
static enum body response_body(struct worker *w, struct conn *c, const struct msg *r,
                               const struct exchange *x, size_t sent) {
    struct inbuf *s = &((struct http_worker *)w->scratch)->in[DOWN];
    if (!has_body(r, x)) return BODY_DONE;
    copy_min_rate_start(c, DOWN); /* a body that trickles in is ended by min_rate */
    int rc = forward_body(w, c, r, s, sent);
    copy_min_rate_stop(c, DOWN);
    if (rc == -2) return BODY_AT_EOF;
    return rc < 0 ? BODY_FAILED : BODY_DONE;
}

/* Copies into out, behind the n bytes there, as much of the body buffered in s as fits and
 * belongs to it (want bytes): a small message then goes out in one send, not two. Returns the
 * bytes copied; s->off moves past them. */
static size_t with_body(char *out, size_t n, struct inbuf *s, uint64_t want) {
    size_t k = s->len - s->off;
    if (k > want) k = (size_t)want;
    if (k > OUT_MAX - n) k = OUT_MAX - n;
    memcpy(out + n, s->buf + s->off, k);
    s->off += k;
    return k;
}

/* Forwards the response to req (x): interim responses, then the final one, each head rewritten
 * (http_rewrite_response), the body by its framing. Sets x->close_client when the client was told
 * that the connection ends after it, and x->keep_server when the server connection can
 * carry another request. */
static enum response forward_response(struct worker *w, struct conn *c, const struct msg *req,
                                      struct exchange *x) {
    struct http_worker *h = w->scratch;
    struct inbuf *s = &h->in[DOWN];
    for (;;) {
        struct msg r;
        int status;
        enum head got = http_read_head(c, s, c->server, &r, 0, &status);
        if (atomic_load(&c->end)) return RESPONSE_ENDED;
        if (got != HEAD_OK && c->req.status) return RESPONSE_CUT;
        if (got == HEAD_NONE || (got == HEAD_LOST && !s->len)) return RESPONSE_NONE;
        /* A 101 nobody asked for would turn the connection into a tunnel behind our back. */
        if (got != HEAD_OK || (r.status == 101 && !x->upgrade))
            return c->req.status ? RESPONSE_CUT : RESPONSE_BAD;
        int final = r.status >= 200 || r.status == 101;
        if (!final && !req->version) { /* an HTTP/1.0 client never gets a 1xx (RFC 9110 15.2) */
            s->off = r.size;
            continue;
        }
        /* A body still streaming from the client when the response comes (body_pending) cannot
         * be finished for sure (the server may have stopped reading): the client connection
         * ends. */
        x->close_client =
            final && (req->close || ends_at_close(&r, x) || (x->streaming && body_pending(w)) ||
                      atomic_load(&stats.stopping)); /* the last one: we stop */
        long n = http_rewrite_response(h->out[DOWN], s->buf, &r, req, x->close_client);
        if (n < 0) return c->req.status ? RESPONSE_CUT : RESPONSE_BAD;
        s->off = r.size;
        size_t sent = 0;
        if (has_body(&r, x) && !r.chunked && r.length > 0)
            sent = with_body(h->out[DOWN], (size_t)n, s, (uint64_t)r.length);
        if (copy_send(c, c->client, h->out[DOWN], (size_t)n + sent) < 0) return RESPONSE_ENDED;
        c->req.status = r.status;
        if (!final) continue; /* interim: the final one follows */
        enum body b = response_body(w, c, &r, x, sent);
        if (b == BODY_FAILED) return atomic_load(&c->end) ? RESPONSE_ENDED : RESPONSE_CUT;
        x->keep_server = b == BODY_DONE && !r.close && s->off == s->len;
        return RESPONSE_DONE;
    }
}

/* Starts the back thread sending the body that follows m's head. */
static void start_body(struct worker *w, struct conn *c, const struct msg *m) {
    struct http_worker *h = w->scratch;
    h->body_chunked = m->chunked;
    h->body_length = m->length > 0 ? (uint64_t)m->length : 0;
    h->body_rc = -1;
    pool_back_start(w, c, send_body);
}

/* Runs one exchange: the request goes upstream (its head rewritten, its body by its framing)
 * and its response comes back. A kept-alive server connection that fails before any byte of
 * a response is dropped, and the request is sent once more on a fresh connection when that is
 * safe (RFC 9110 9.2.2, 9112 9.3.1): its head never went whole (so no body byte did either),
 * or all of it is still at hand (buffered) and it is idempotent or has no body. Any other failure
 * is a 502, or a cut once part of the response reached the client. */
static enum response exchange(struct worker *w, struct conn *c, const struct msg *m,
                              struct exchange *x, const struct target *t) {
    struct http_worker *h = w->scratch;
    for (int attempt = 0;; attempt++) {
        enum route r = route(w, c, t);
        if (r == ROUTE_LEFT) return RESPONSE_LEFT;
        if (r == ROUTE_FAILED) {
            x->failed = dial_why(c, errno);
            return RESPONSE_BAD;
        }
        if (!t->authority) snprintf(c->req.target, sizeof c->req.target, "%.127s", c->chosen->name);
        int sent = copy_send(c, c->server, h->out[UP], x->out_len) == 0;
        if (sent && !x->buffered) {
            start_body(w, c, m);
            x->streaming = 1;
        }
        /* Even when sending failed, a response may be waiting: an upstream that refuses a
         * request (413) often answers and closes before it has read all of it. */
        enum response a = RESPONSE_ENDED;
        if (!atomic_load(&c->end)) a = forward_response(w, c, m, x);
        int safe = !sent || (x->buffered && (idempotent(c->req.method) || m->length <= 0));
        if (a != RESPONSE_NONE || r != ROUTE_REUSED || attempt || !safe) return a;
        atomic_fetch_add(&counts.retries, 1);
        http_end_server(w, c);
    }
}

/* Writes what goes upstream first into out[UP]: the request head (http_rewrite_request), and
 * the body behind it when it came whole with the head; x says what (out_len, buffered,
 * upgrade). Returns 0, or -1 when the head does not fit. */
static int write_request(struct http_worker *h, const struct msg *m, const struct target *t,
                         struct exchange *x) {
    struct inbuf *in = &h->in[UP];
    uint64_t length = m->length > 0 ? (uint64_t)m->length : 0;
    long n = http_rewrite_request(h->out[UP], m, t, m->upgrade);
    if (n < 0) return -1;
    /* A body that came whole with its head goes with it, and is held for a second try. */
    x->out_len = (size_t)n;
    x->buffered = !m->chunked && in->len - in->off >= length && (size_t)n + length <= OUT_MAX;
    if (x->buffered) x->out_len += with_body(h->out[UP], (size_t)n, in, length);
    x->upgrade = m->upgrade && x->buffered;
    if (m->upgrade && !x->buffered) { /* no upgrade behind a streaming body: ask without it */
        n = http_rewrite_request(h->out[UP], m, t, 0);
        x->out_len = (size_t)n;
    }
    return 0;
}

/* The head is written (write_request), the exchange runs (exchange), and then what comes next
 * is settled: a 502 if no response came, the raw relay after a 101, the end of a body still
 * streaming, whether the server connection is kept. */
enum next http_forward(struct worker *w, struct conn *c, const struct msg *m,
                       const struct target *t) {
    struct http_worker *h = w->scratch;
    /* Methods are case-sensitive (RFC 9110 9.1): "head" is not HEAD; its response has a body. */
    struct exchange x = {.is_head = !strcmp(c->req.method, "HEAD")};
    if (write_request(h, m, t, &x) < 0) return answer_self_close(c, WHY_HEAD_TOO_LARGE);
    x.close_client = 1;
    enum response a = exchange(w, c, m, &x, t);
    if (a == RESPONSE_LEFT) return NEXT_PARK; /* it comes back to this request (dial) */
    enum next next = a == RESPONSE_DONE && !x.close_client ? NEXT_READ : NEXT_CLOSE;
    if (a == RESPONSE_NONE) x.failed = atomic_load(&c->server_failed) ? WHY_RESET : WHY_CLOSED;
    if (a == RESPONSE_BAD && !x.failed) x.failed = WHY_BAD_RESPONSE;
    if (a == RESPONSE_BAD || a == RESPONSE_NONE) http_reply(c, x.failed, 0, 0);
    if (a == RESPONSE_CUT) conn_end(c, END_UPSTREAM); /* the client sees the response cut short */
    if (x.streaming) {
        if (a != RESPONSE_DONE) shutdown(c->server, SHUT_RDWR); /* stops the body going there */
        if (next == NEXT_CLOSE) shutdown(c->client, SHUT_WR);   /* the client sees the end */
        pool_back_wait(w);
        if (h->body_rc < 0) next = NEXT_CLOSE;
    }
    if (a == RESPONSE_DONE && c->req.status == 101) {
        atomic_fetch_add(&counts.upgrades, 1);
        return relay_raw(w, c);
    }
    if (next == NEXT_CLOSE || !x.keep_server) http_end_server(w, c);
    return next;
}

/* ---- CONNECT -------------------------------------------------------------------------- */

enum next http_tunnel(struct worker *w, struct conn *c, const struct msg *m) {
    static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
    char host[256];
    int port;
    if (http_authority(m->target, m->tlen, host, sizeof host, &port, 0) < 0 || m->chunked ||
        m->length > 0)
        return answer_self_close(c, WHY_BAD_REQUEST);
    if (!ports_match(c->cfg->connect_ports, port)) return answer_self_close(c, WHY_PORT);
    http_end_server(w, c);
    int fd = dial(w, c, host, port);
    if (fd < 0 && errno == EINPROGRESS) return NEXT_PARK; /* it comes back to this request */
    if (fd < 0) return answer_self_close(c, dial_why(c, errno));
    pool_set_server(w, fd);
    if (copy_send(c, c->client, ok, sizeof ok - 1) < 0) return NEXT_CLOSE;
    c->req.status = 200;
    atomic_fetch_add(&counts.tunnels, 1);
    return relay_raw(w, c);
}
