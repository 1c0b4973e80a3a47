/* http.c — http mode. The front thread reads each request head on a client connection, parses
 * and authenticates it, and routes it: CONNECT to a tunnel, absolute-form to its host,
 * origin-form to the configured upstream. Then it runs the exchange: it sends the request,
 * reads the response and relays it, one request at a time, retrying once on a fresh upstream
 * connection when a kept-alive one turns out to be closed. While a request's body streams
 * upstream the back thread sends it, so that a response may come before the body is all sent.
 * This file also owns http's counters and its access log line, one per request. */
#include "proxy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* One request and its response: what the front thread knows of it while it runs. What its
 * access log line says is in c->req. */
struct exchange {
    int is_head;       /* a HEAD request: its response has no body */
    int upgrade;       /* it asks to upgrade, and may: no body streams behind it */
    size_t out_len;    /* out[UP]: the rewritten head, and the body when held */
    int held;          /* the whole request is in out[UP]: it can be sent twice */
    int streaming;     /* the back thread sends its body */
    int close_client;  /* the client was told that the connection ends after the response */
    int keep_upstream; /* the upstream connection can carry another request */
    enum why failed;   /* no upstream connection could be made: why (WHY_NONE: it could) */
};

/* One worker's http scratch (w->scratch), allocated once and reused for each connection. */
struct http_worker {
    struct stream in[2]; /* [UP] reads the client, [DOWN] the upstream */
    char *out[2];        /* [UP] a rewritten request head, kept for a retry; [DOWN] a response's */
    /* The body job: the front thread sets these before pool_back_start and reads body_rc after
     * pool_back_wait; the back thread owns in[UP] and body_rc in between. */
    int body_chunked;
    uint64_t body_length;
    int body_rc; /* 0: the whole body went upstream; -1: it did not */
};

/* What the front thread does after a request. */
enum next {
    NEXT_READ,  /* read the next request */
    NEXT_CLOSE, /* end the connection */
    NEXT_PARK   /* park it: quiet between requests, or a quiet tunnel */
};

/* Where c->upstream stands after route(). */
enum route {
    ROUTE_FAILED, /* no connection could be made (errno says why) */
    ROUTE_LEFT,   /* c leaves its worker while the connection is made (dial) */
    ROUTE_NEW,
    ROUTE_REUSED
};

/* How relaying a response went. */
enum answer {
    ANSWER_DONE,  /* a final response (or a 101) reached the client whole */
    ANSWER_NONE,  /* the upstream closed or failed before any byte of a response */
    ANSWER_BAD,   /* a response we refuse (bad head, an unasked 101): nothing reached the client */
    ANSWER_CUT,   /* the upstream failed after response bytes reached the client */
    ANSWER_ENDED, /* the connection ended: the client left, idle_timeout, a stop */
    ANSWER_LEFT,  /* nothing was sent: c leaves its worker while its upstream connection is made */
};

#define HTTP_METHODS 9
static const char *const method_names[HTTP_METHODS] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "other"};

/* http's own counters, beside the shared ones in stats. */
static struct {
    _Atomic uint64_t methods[HTTP_METHODS];   /* requests by method */
    _Atomic uint64_t classes[6];              /* responses by status class, 1-5 */
    _Atomic uint64_t auth_failures[AUTH_MAX]; /* by enum auth */
    _Atomic uint64_t tunnels, upgrades;       /* CONNECT tunnels, 101 upgrades */
    _Atomic uint64_t retries;                 /* requests sent again on a fresh connection */
} counts;

/* ---- counting, logging, answering ----------------------------------------------------- */

/* http's metric families, rendered among the shared ones. */
static void http_metrics(FILE *f) {
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    metric_family(f, "proxy_http_requests_total", "counter", "Requests by method.", "method",
                  method_names, counts.methods, HTTP_METHODS);
    metric_family(f, "proxy_http_responses_total", "counter",
                  "Requests by the class of the status the client got, relayed or the proxy's own.",
                  "code", classes, counts.classes + 1, 5);
    metric_family(f, "proxy_auth_failures_total", "counter", "Requests answered 407, by reason.",
                  "reason", auth_names + AUTH_MISSING, counts.auth_failures + AUTH_MISSING,
                  AUTH_MAX - AUTH_MISSING);
    metric_one(f, "proxy_http_tunnels_total", "counter", "CONNECT tunnels established.",
               atomic_load(&counts.tunnels));
    metric_one(f, "proxy_http_upgrades_total", "counter", "Upgrades (101) relayed.",
               atomic_load(&counts.upgrades));
    metric_one(f, "proxy_http_retries_total", "counter",
               "Requests sent again on a fresh upstream connection after a kept-alive one closed.",
               atomic_load(&counts.retries));
}

/* When the request now read began (c->head_since, or its first byte if its head was never
 * whole), for its log line; the next one's is not known yet. */
static uint64_t request_began(struct conn *c) {
    uint64_t t = c->head_since ? c->head_since : c->head_first ? c->head_first : mono_ns();
    c->head_since = 0;
    return t;
}

/* Counts a request's method. */
static void count_method(const char *method) {
    int i = 0;
    while (i < HTTP_METHODS - 1 && strcmp(method, method_names[i])) i++;
    atomic_fetch_add(&counts.methods[i], 1);
}

/* Counts the status the client got and writes the request's access log line: every request
 * gets one, and its status is "-" when no status line reached the client. */
static void write_log(const struct conn *c) {
    char peer[64], status[8] = "-";
    if (c->req.status >= 100 && c->req.status < 600) {
        atomic_fetch_add(&counts.classes[c->req.status / 100], 1);
        snprintf(status, sizeof status, "%d", c->req.status);
    }
    log_line("%s %s %s %s %s up=%llu down=%llu ms=%.3f error=%s",
             addr_format(&c->peer, peer, sizeof peer), c->req.user[0] ? c->req.user : "-",
             c->req.method, c->req.target, status,
             (unsigned long long)(c->bytes[UP] - c->req.bytes0[UP]),
             (unsigned long long)(c->bytes[DOWN] - c->req.bytes0[DOWN]),
             (double)(mono_ns() - c->req.start_ns) / 1e6, c->req.error ? c->req.error : "-");
}

/* Logs the request c serves (write_log), once. */
static void log_request(struct conn *c) {
    write_log(c);
    c->req.logged = 1;
}

/* The connection is closed: a tunnel or upgrade that was still open (closed in the waiting
 * room by idle_timeout or a stop, or never back from the queue) gets its line now. */
static void http_done(const struct conn *c) {
    if (c->relay && !c->req.logged) write_log(c);
}

/* The last word to a client turned away before any request is read (by the acceptor, or
 * after a trusted balancer's PROXY header): 503 when the proxy is full, 429 over a per-client
 * limit, 400 for a bad PROXY header; never blocking. */
static void http_last_word(int fd, enum refusal why) {
    static const enum why answer[REFUSED_MAX] = {
        [REFUSED_MAX_CONNECTIONS] = WHY_BUSY,
        [REFUSED_PER_CLIENT] = WHY_CLIENT_CONNECTIONS,
        [REFUSED_RATE] = WHY_RATE,
        [REFUSED_PROXY_HEADER] = WHY_BAD_REQUEST,
    };
    char buf[512];
    if (answer[why] == WHY_NONE) return;
    int n = http_error(buf, sizeof buf, answer[why], 0, NULL, 0);
    send(fd, buf, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* Why no upstream connection could be made, from upstream_connect's errno: a destination
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

/* Forgets what s holds. */
static void stream_clear(struct stream *s) {
    s->off = 0;
    s->len = 0;
}

/* Sends the proxy's own response for why (http_error) and records it for the log. Returns 0,
 * or -1 when the client could not take it. The caller decides whether the connection goes on
 * (keep). */
static int reply(struct conn *c, enum why why, int keep, int retry) {
    char buf[768];
    int n = http_error(buf, sizeof buf, why, keep, c->cfg->realm, retry);
    c->req.error = http_why_word(why);
    if (copy_send(c, c->client, buf, (size_t)n) < 0) return -1;
    c->req.status = http_why_status(why);
    return 0;
}

/* Answers a request with the proxy's own response (reply), logs it, and says what comes
 * next: the next request only if keep and the reply went out. */
static enum next answer_self(struct conn *c, enum why why, int keep) {
    int rc = reply(c, why, keep, 0);
    log_request(c);
    return keep && rc == 0 ? NEXT_READ : NEXT_CLOSE;
}

/* ---- the upstream connection ---------------------------------------------------------- */

/* Closes the upstream connection; the next request opens a new one. */
static void end_upstream(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    if (c->upstream < 0) return;
    pool_set_upstream(w, -1);
    c->route[0] = 0;
    stream_clear(&h->in[DOWN]);
}

/* Whether the kept-alive upstream connection can carry another request: nothing unread, not
 * closed, not reset. An upstream may close an idle connection at any time, and bytes after a
 * complete response mean it speaks out of turn; either way it is dropped, not reused. One
 * non-blocking peek: it saves a failed round trip when the upstream's keep-alive timeout has
 * passed, the everyday case; the retry covers the race that is left. */
static int upstream_clean(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    char byte = 0;
    if (h->in[DOWN].len > h->in[DOWN].off) return 0;
    return recv(c->upstream, &byte, 1, MSG_PEEK | MSG_DONTWAIT) < 0 && errno == EAGAIN;
}

/* Connects c to host:port, or to the configured upstreams (host NULL), for the request read
 * into the worker's in[UP]. While others wait for a worker, c leaves its worker while the
 * connection is made (upstream_connect) if a head buffer is free to carry the request (c->stash:
 * all of in[UP], from the head on, which is read again when a worker takes c back and finds its
 * dial in progress: the request is handled from the start). Returns the fd, or -1 with errno
 * (EINPROGRESS: c leaves). */
static int dial(struct worker *w, struct conn *c, const char *host, int port) {
    struct stream *in = &((struct http_worker *)w->scratch)->in[UP];
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

/* Makes c->upstream a usable connection to where t goes (c->route names it: "host:port", or
 * "=" for the configured upstreams), keeping the open one when it goes there and is clean.
 * ROUTE_REUSED or ROUTE_NEW; ROUTE_FAILED with errno when no connection could be made;
 * ROUTE_LEFT when c leaves its worker while it is made (dial). */
static enum route route(struct worker *w, struct conn *c, const struct target *t) {
    char want[sizeof c->route] = "=";
    const char *host = t->authority ? t->host : NULL;
    if (host) snprintf(want, sizeof want, "%s:%d", host, t->port);
    if (c->upstream >= 0 && !strcmp(c->route, want) && upstream_clean(w, c)) return ROUTE_REUSED;
    end_upstream(w, c);
    int fd = dial(w, c, host, t->port);
    if (fd < 0) return errno == EINPROGRESS ? ROUTE_LEFT : ROUTE_FAILED;
    pool_set_upstream(w, fd);
    snprintf(c->route, sizeof c->route, "%s", want);
    return ROUTE_NEW;
}

/* ---- relaying ------------------------------------------------------------------------ */

/* Sends on what is buffered in direction d: bytes that came behind a head in a tunnel or an
 * upgrade. Returns 0, or -1 when the connection ended. */
static int flush(struct worker *w, struct conn *c, enum dir d) {
    struct stream *s = &((struct http_worker *)w->scratch)->in[d];
    int to = d == UP ? c->upstream : c->client;
    if (s->len > s->off && copy_send(c, to, s->buf + s->off, s->len - s->off) < 0) return -1;
    s->off = s->len;
    return 0;
}

/* The back thread's job in a tunnel: what came behind the response head, then upstream →
 * client until EOF or a park. */
static void relay_down(struct worker *w, struct conn *c) {
    if (flush(w, c, DOWN) == 0) copy_stream(c, &w->cp[DOWN], DOWN);
}

/* Relays a tunnel (after CONNECT's 200) or an upgraded connection (after a 101) raw both ways,
 * what came behind the heads first: until both sides are done or it ends, then logs the request
 * that opened it (NEXT_CLOSE); or until it is quiet (NEXT_PARK), and the worker that takes it
 * back from the waiting room calls this again. */
static enum next relay(struct worker *w, struct conn *c) {
    if (!c->relay) {
        c->relay = 1;
        c->upstream_apart = 0; /* a tunnel: either side failing ends it */
    }
    if (flush(w, c, UP) == 0 && pool_relay(w, c, relay_down) == SERVED_PARK) return NEXT_PARK;
    log_request(c);
    return NEXT_CLOSE;
}

/* The back thread's job while a request body streams: sends it upstream by its framing, and
 * records in body_rc whether it all went. A body the client broke off (EOF, bad chunk) ends
 * the connection; one the upstream stopped taking (it answered early and closed) ends only
 * the upstream connection, and the front thread relays whatever answer came. */
static void send_body(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    int rc;
    copy_rate_start(c, UP); /* a body that trickles in is ended by min_rate */
    if (h->body_chunked)
        rc = http_relay_chunked(c, &w->cp[UP], &h->in[UP], c->client, c->upstream);
    else
        rc = http_relay_n(c, &w->cp[UP], &h->in[UP], c->client, c->upstream, h->body_length);
    copy_rate_stop(c, UP);
    if (rc < 0 && !atomic_load(&c->upstream_failed)) conn_end(c, END_CLIENT);
    h->body_rc = rc;
}

/* Whether the back thread is still sending a request body. */
static int body_pending(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    int pending = w->job != NULL;
    pthread_mutex_unlock(&w->mu);
    return pending;
}

/* ---- the exchange: a request out, its response back ----------------------------------- */

/* How a response's body ended. */
enum body { BODY_DONE, BODY_AT_EOF, BODY_FAILED };

/* Whether the response r to x has a body at all (RFC 9112 6.3): none after HEAD, 1xx, 204 and
 * 304. */
static int has_body(const struct msg *r, const struct exchange *x) {
    return !x->is_head && r->status >= 200 && r->status != 204 && r->status != 304;
}

/* Whether r, answering x, has a body that ends when the upstream closes: then the client can
 * tell where it ends only by the close. */
static int ends_at_close(const struct msg *r, const struct exchange *x) {
    return has_body(r, x) && !r->chunked && r->length < 0;
}

/* Relays the body of the response r by its framing: chunked; Content-Length (sent of it: what
 * went with the head); else until the upstream closes. Returns 0 when the body is whole, -2
 * when it ended at the upstream's close, -1 on a failure. */
static int relay_body(struct worker *w, struct conn *c, const struct msg *r, struct stream *s,
                      size_t sent) {
    int rc;
    if (r->chunked) {
        rc = http_relay_chunked(c, &w->cp[DOWN], s, c->upstream, c->client);
    } else if (r->length >= 0) {
        uint64_t rest = (uint64_t)r->length - sent;
        rc = http_relay_n(c, &w->cp[DOWN], s, c->upstream, c->client, rest);
    } else {
        if (s->len > s->off && copy_send(c, c->client, s->buf + s->off, s->len - s->off) < 0)
            return -1;
        s->off = s->len;
        int64_t moved = copy_bytes(c, &w->cp[DOWN], c->upstream, c->client, UINT64_MAX);
        return moved < 0 ? -1 : -2;
    }
    return rc;
}

/* Relays the body, if any, of the response r answering x (relay_body), timed against min_rate. */
static enum body response_body(struct worker *w, struct conn *c, const struct msg *r,
                               const struct exchange *x, size_t sent) {
    struct stream *s = &((struct http_worker *)w->scratch)->in[DOWN];
    if (!has_body(r, x)) return BODY_DONE;
    copy_rate_start(c, DOWN); /* a body that trickles in is ended by min_rate */
    int rc = relay_body(w, c, r, s, sent);
    copy_rate_stop(c, DOWN);
    if (rc == -2) return BODY_AT_EOF;
    return rc < 0 ? BODY_FAILED : BODY_DONE;
}

/* Copies into out, behind the n bytes there, as much of the body buffered in s as fits and
 * belongs to it (want bytes): a small message then goes out in one send, not two. Returns the
 * bytes copied; s->off moves past them. */
static size_t with_body(char *out, size_t n, struct stream *s, uint64_t want) {
    size_t k = s->len - s->off;
    if (k > want) k = (size_t)want;
    if (k > OUT_MAX - n) k = OUT_MAX - n;
    memcpy(out + n, s->buf + s->off, k);
    s->off += k;
    return k;
}

/* Relays the response to req (x): interim responses, then the final one, each head rewritten
 * (rewrite_response), the body by its framing. Sets x->close_client when the client was told
 * that the connection ends after it, and x->keep_upstream when the upstream connection can
 * carry another request. */
static enum answer relay_response(struct worker *w, struct conn *c, const struct msg *req,
                                  struct exchange *x) {
    struct http_worker *h = w->scratch;
    struct stream *s = &h->in[DOWN];
    for (;;) {
        struct msg r;
        int status;
        enum head got = http_read_head(c, s, c->upstream, &r, 0, &status);
        if (atomic_load(&c->end)) return ANSWER_ENDED;
        if (got != HEAD_OK && c->req.status) return ANSWER_CUT;
        if (got == HEAD_NONE || (got == HEAD_LOST && !s->len)) return ANSWER_NONE;
        /* A 101 nobody asked for would turn the connection into a tunnel behind our back. */
        if (got != HEAD_OK || (r.status == 101 && !x->upgrade))
            return c->req.status ? ANSWER_CUT : ANSWER_BAD;
        int final = r.status >= 200 || r.status == 101;
        if (!final && !req->version) { /* an HTTP/1.0 client never gets a 1xx (RFC 9110 15.2) */
            s->off = r.size;
            continue;
        }
        /* A body still streaming from the client when the answer comes cannot be finished
         * for sure (the upstream may have stopped reading): the client connection ends. */
        x->close_client =
            final && (req->close || ends_at_close(&r, x) || (x->streaming && body_pending(w)) ||
                      atomic_load(&stats.stopping)); /* the last one: we stop */
        long n = http_rewrite_response(h->out[DOWN], s->buf, &r, req, x->close_client);
        if (n < 0) return c->req.status ? ANSWER_CUT : ANSWER_BAD;
        s->off = r.size;
        size_t sent = 0;
        if (has_body(&r, x) && !r.chunked && r.length > 0)
            sent = with_body(h->out[DOWN], (size_t)n, s, (uint64_t)r.length);
        if (copy_send(c, c->client, h->out[DOWN], (size_t)n + sent) < 0) return ANSWER_ENDED;
        c->req.status = r.status;
        if (!final) continue; /* interim: the final one follows */
        enum body b = response_body(w, c, &r, x, sent);
        if (b == BODY_FAILED) return atomic_load(&c->end) ? ANSWER_ENDED : ANSWER_CUT;
        x->keep_upstream = b == BODY_DONE && !r.close && s->off == s->len;
        return ANSWER_DONE;
    }
}

/* Starts the back thread sending the body that follows m's head. */
static void stream_body(struct worker *w, struct conn *c, const struct msg *m) {
    struct http_worker *h = w->scratch;
    h->body_chunked = m->chunked;
    h->body_length = m->length > 0 ? (uint64_t)m->length : 0;
    h->body_rc = -1;
    pool_back_start(w, c, send_body);
}

/* Runs one exchange: the request goes upstream (its head rewritten, its body by its framing)
 * and its response comes back. A kept-alive upstream connection that fails before any byte of
 * a response is dropped, and the request is sent once more on a fresh connection when that is
 * safe (RFC 9110 9.2.2, 9112 9.3.1): its head never went whole (so no body byte did either),
 * or all of it is still at hand (held) and it is idempotent or has no body. Any other failure
 * is a 502, or a cut once part of the response reached the client. */
static enum answer exchange(struct worker *w, struct conn *c, const struct msg *m,
                            struct exchange *x, const struct target *t) {
    struct http_worker *h = w->scratch;
    for (int attempt = 0;; attempt++) {
        enum route r = route(w, c, t);
        if (r == ROUTE_LEFT) return ANSWER_LEFT;
        if (r == ROUTE_FAILED) {
            x->failed = dial_why(c, errno);
            return ANSWER_BAD;
        }
        if (!t->authority) snprintf(c->req.target, sizeof c->req.target, "%.127s", c->chosen->name);
        int sent = copy_send(c, c->upstream, h->out[UP], x->out_len) == 0;
        if (sent && !x->held) {
            stream_body(w, c, m);
            x->streaming = 1;
        }
        /* Even when sending failed, an answer may be waiting: an upstream that refuses a
         * request (413) often answers and closes before it has read all of it. */
        enum answer a = ANSWER_ENDED;
        if (!atomic_load(&c->end)) a = relay_response(w, c, m, x);
        int safe = !sent || (x->held && (idempotent(c->req.method) || m->length <= 0));
        if (a != ANSWER_NONE || r != ROUTE_REUSED || attempt || !safe) return a;
        atomic_fetch_add(&counts.retries, 1);
        end_upstream(w, c);
    }
}

/* Forwards a request and relays its answer (exchange), then settles what comes next: a 502 if
 * no response came, the tunnel after a 101, the end of a body still streaming, whether the
 * upstream connection is kept; and logs the request. */
static enum next forward(struct worker *w, struct conn *c, const struct msg *m, struct exchange *x,
                         const struct target *t) {
    struct http_worker *h = w->scratch;
    struct stream *in = &h->in[UP];
    uint64_t length = m->length > 0 ? (uint64_t)m->length : 0;
    long n = http_rewrite_request(h->out[UP], m, t, m->upgrade);
    if (n < 0) return answer_self(c, WHY_HEAD_TOO_LARGE, 0);
    /* A body that came whole with its head goes with it, and is held for a second try. */
    x->out_len = (size_t)n;
    x->held = !m->chunked && in->len - in->off >= length && (size_t)n + length <= OUT_MAX;
    if (x->held) x->out_len += with_body(h->out[UP], (size_t)n, in, length);
    x->upgrade = m->upgrade && x->held;
    if (m->upgrade && !x->held) { /* no upgrade behind a streaming body: ask without it */
        n = http_rewrite_request(h->out[UP], m, t, 0);
        x->out_len = (size_t)n;
    }
    x->close_client = 1;
    enum answer a = exchange(w, c, m, x, t);
    if (a == ANSWER_LEFT) return NEXT_PARK; /* it comes back to this request (dial) */
    enum next next = a == ANSWER_DONE && !x->close_client ? NEXT_READ : NEXT_CLOSE;
    if (a == ANSWER_NONE) x->failed = atomic_load(&c->upstream_failed) ? WHY_RESET : WHY_CLOSED;
    if (a == ANSWER_BAD && !x->failed) x->failed = WHY_BAD_RESPONSE;
    if (a == ANSWER_BAD || a == ANSWER_NONE) reply(c, x->failed, 0, 0);
    if (a == ANSWER_CUT) conn_end(c, END_UPSTREAM); /* the client sees the response cut short */
    if (x->streaming) {
        if (a != ANSWER_DONE) shutdown(c->upstream, SHUT_RDWR); /* stops the body going there */
        if (next == NEXT_CLOSE) shutdown(c->client, SHUT_WR);   /* the client sees the end */
        pool_back_wait(w);
        if (h->body_rc < 0) next = NEXT_CLOSE;
    }
    if (a == ANSWER_DONE && c->req.status == 101) {
        atomic_fetch_add(&counts.upgrades, 1);
        return relay(w, c);
    }
    if (next == NEXT_CLOSE || !x->keep_upstream) end_upstream(w, c);
    log_request(c);
    return next;
}

/* ---- the front thread: requests ------------------------------------------------------- */

/* Reads and drops what the client still sends, until it closes or for 2 s at most, once our
 * side is shut (Apache's lingering close): closing with unread request bytes would send a
 * reset that can destroy the reply before the client reads it. A client still uploading
 * stops once it reads the reply; bounded by time, not bytes, so that a fast one gets that
 * far. */
static void drain_client(struct worker *w, struct conn *c) {
    char *sink = ((struct http_worker *)w->scratch)->out[UP];
    uint64_t until = mono_ns() + 2000000000u;
    while (mono_ns() < until) {
        size_t got;
        enum recv r = copy_recv(c, c->client, sink, OUT_MAX, &got);
        if (r == RECV_EOF || r == RECV_ENDED) break;
    }
}

/* CONNECT host:port: an allowed port, a connection, 200, then raw bytes both ways (relay). */
static enum next tunnel(struct worker *w, struct conn *c, const struct msg *m) {
    static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
    char host[256];
    int port;
    if (http_authority(m->target, m->tlen, host, sizeof host, &port, 0) < 0 || m->chunked ||
        m->length > 0)
        return answer_self(c, WHY_BAD_REQUEST, 0);
    if (!auth_port_allowed(c->cfg->connect_ports, port)) return answer_self(c, WHY_PORT, 0);
    end_upstream(w, c);
    int fd = dial(w, c, host, port);
    if (fd < 0 && errno == EINPROGRESS) return NEXT_PARK; /* it comes back to this request */
    if (fd < 0) return answer_self(c, dial_why(c, errno), 0);
    pool_set_upstream(w, fd);
    if (copy_send(c, c->client, ok, sizeof ok - 1) < 0) {
        log_request(c);
        return NEXT_CLOSE;
    }
    c->req.status = 200;
    atomic_fetch_add(&counts.tunnels, 1);
    return relay(w, c);
}

/* Parses the request's target into t and names it in x for the log. Returns 0 or 400. */
static int parse_target(struct conn *c, const struct msg *m, struct target *t) {
    int asterisk = m->tlen == 1 && *m->target == '*' && !strcmp(c->req.method, "OPTIONS");
    *t = (struct target){.path = m->target, .plen = m->tlen};
    if (!strcmp(c->req.method, "CONNECT")) {
        snprintf(c->req.target, sizeof c->req.target, "%.*s", (int)m->tlen, m->target);
    } else if (m->tlen > 7 && !strncasecmp(m->target, "http://", 7)) {
        t->authority = m->target + 7;
        t->path = t->authority;
        while (t->path < m->target + m->tlen && *t->path != '/' && *t->path != '?') t->path++;
        t->alen = (size_t)(t->path - t->authority);
        t->plen = m->tlen - 7 - t->alen;
        if (http_authority(t->authority, t->alen, t->host, sizeof t->host, &t->port, 80) < 0)
            return 400;
        snprintf(c->req.target, sizeof c->req.target, "%.*s", (int)t->alen, t->authority);
    } else if (*m->target != '/' && !asterisk) {
        return 400; /* https:// outside CONNECT, or nonsense */
    }
    return 0;
}

/* Whether the request may go on: not a loop through us (508), and authenticated (407).
 * Returns 0 or that status. */
static int admit_request(struct conn *c, const struct msg *m) {
    for (int i = 0; i < m->nfields; i++)
        if (http_is(m->field[i].name, m->field[i].nlen, "via") &&
            http_list_has(m->field[i].value, m->field[i].vlen, http_via(), strlen(http_via())))
            return 508; /* it came through us before */
    enum auth a = auth_check(c->cfg, m, c->req.user, sizeof c->req.user);
    if (a == AUTH_OK) return 0;
    atomic_fetch_add(&counts.auth_failures[a], 1);
    return 407;
}

/* Counts a request against its client's rate (limits.c): its user once authenticated, else
 * its address (a 407 too: guessing passwords is slow). Over it: 429 with Retry-After, and a
 * connection that goes on (bodiless) is not read again until then, parked, holding no worker:
 * one that sends as fast as it can would otherwise cost as much as one served (on this
 * machine, a 429 loop beside another client halved that one's requests: bench/policy.py).
 * Only with nothing more read already. Returns 0 when the request may go on, else 1 with what
 * comes next in *next. */
static int over_rate(struct worker *w, struct conn *c, int authenticated, int bodiless,
                     enum next *next) {
    struct stream *in = &((struct http_worker *)w->scratch)->in[UP];
    int wait = limits_request(c->cfg, &c->peer, authenticated ? c->req.user : NULL);
    if (!wait) return 0;
    int rc = reply(c, WHY_RATE, bodiless, wait);
    log_request(c);
    *next = NEXT_CLOSE;
    if (!bodiless || rc < 0) return 1;
    *next = NEXT_READ;
    if (!cfg.park_after || in->len > in->off) return 1;
    c->held_until = mono_ns() + (uint64_t)wait * 1000000000u;
    *next = NEXT_PARK;
    return 1;
}

/* Handles one parsed request: its target, then admission (loop check, auth), then CONNECT's
 * tunnel or forwarding. A request whose dial left its worker is handled again from here when
 * c is back (c->dial): the same steps lead to the same dial, and it is counted and timed once. */
static enum next request(struct worker *w, struct conn *c, const struct msg *m) {
    struct http_worker *h = w->scratch;
    struct exchange x = {0};
    struct target t;
    int again = c->dial != NULL;
    /* Each request is served by the newest config (a reload since the last one counts: a
     * revoked user is refused now). Its upstream connection, made under the one before, goes;
     * a request back from its dial keeps the config it dials by. */
    struct config *was = c->cfg;
    if (!again) config_refresh(&c->cfg);
    if (c->cfg != was) {
        end_upstream(w, c);
        c->chosen = NULL;
    }
    h->in[UP].off = m->size; /* the head is read; what follows is body or the next request */
    c->req = (struct request_log){.start_ns = again ? c->req.start_ns : request_began(c),
                                  .bytes0 = {c->bytes[UP], c->bytes[DOWN]},
                                  .target = "-"};
    snprintf(c->req.method, sizeof c->req.method, "%.*s", (int)m->mlen, m->method);
    /* Methods are case-sensitive (RFC 9110 9.1): "head" is not HEAD; its response has a body. */
    x.is_head = !strcmp(c->req.method, "HEAD");
    if (!again) count_method(c->req.method);

    int status = parse_target(c, m, &t);
    if (status) return answer_self(c, http_why_of(status), 0);
    status = admit_request(c, m);
    /* The connection may go on after a refusal only when no body follows the head. */
    int bodiless = !m->chunked && m->length <= 0 && !m->close;
    enum next next;
    if (!again && over_rate(w, c, status == 0, bodiless, &next)) return next;
    if (status == 407) {
        int retry = auth_may_retry(c); /* counts this failure */
        return answer_self(c, WHY_AUTH, retry && bodiless);
    }
    if (status) return answer_self(c, http_why_of(status), 0);
    if (!strcmp(c->req.method, "CONNECT")) return tunnel(w, c, m);
    /* Any host, not any port: else a body could speak to SMTP on 25 or SSH on 22. */
    if (t.authority && !auth_port_allowed(c->cfg->forward_ports, t.port))
        return answer_self(c, WHY_PORT, 0);
    if (!t.authority && !c->cfg->nup) return answer_self(c, WHY_NO_UPSTREAM, 0);
    if (!t.authority && m->version && !m->host) return answer_self(c, WHY_BAD_REQUEST, 0);
    return forward(w, c, m, &x, &t);
}

/* Whether what s holds, a bad request head, is a PROXY protocol header instead: from a client
 * that is not a trusted balancer (one is read before any request: pool.c), so the log can say
 * why its 400 came. */
static int proxy_header_sent(const struct stream *s) {
    struct addr ignored;
    size_t used;
    return s->len >= 6 && proxy_protocol_parse(s->buf, s->len, &ignored, &used) >= 0;
}

/* A turn of c begins on a worker: the clocks of its next request head, and the part of a head
 * it left its last worker with (c->stash) back in in. */
static void turn_begins(struct conn *c, struct stream *in) {
    /* The first head counts from accept (RFC 9112 leaves it to us; Apache does the same), also
     * behind a balancer whose header came on a turn before (admit_behind kept head_cap). */
    if (c->turns == 1)
        c->head_deadline = c->head_cap =
            c->start_ns + (uint64_t)c->cfg->header_timeout * 1000000000u;
    else if (c->head_cap && !c->head_deadline)
        c->head_deadline = c->head_cap;
    /* A turn between requests began because its client's bytes came (or it is new): the next
     * request was there by the time c went into the queue, and its wait for a worker is part
     * of what its client saw. */
    if (!c->relay && !c->dial && !c->head_first && !c->head_since)
        c->head_since = c->turns == 1 ? c->start_ns : c->queued_ns;
    if (c->stash) {
        memcpy(in->buf, c->stash, c->stash_len);
        in->len = c->stash_len;
        pool_head_give(c->stash);
        c->stash = NULL;
    }
}

/* A request head that could not be read whole or parsed (status: http_read_head's) is
 * answered, logged with what little is known of it, and ends the connection. */
static enum next bad_head(struct conn *c, const struct stream *in, int status) {
    enum why why = http_why_of(status);
    c->req = (struct request_log){.start_ns = request_began(c),
                                  .bytes0 = {c->bytes[UP], c->bytes[DOWN]},
                                  .method = "-",
                                  .target = "-"};
    if (status == 400 && proxy_header_sent(in)) why = WHY_PROXY_HEADER;
    return answer_self(c, why, 0);
}

/* Serves one client connection: every request head read, parsed and handled in turn, until a
 * request or its response ends the connection (RFC 9112 9.6: then no further request is read),
 * or until it leaves its worker while it waits for a request (its turn is over, or it has
 * nothing to do: copy_wait), or a tunnel does. A connection back from the waiting room goes on
 * from there: it left with nothing buffered. Requests pipelined behind one another are all
 * served before it can leave: it waits for a request only once its buffer is empty. */
static enum served http_serve(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    struct stream *in = &h->in[UP];
    enum next next = NEXT_READ;
    stream_clear(in);
    stream_clear(&h->in[DOWN]);
    turn_begins(c, in);
    if (c->relay)
        next = relay(w, c); /* a tunnel back from the waiting room */
    else
        c->upstream_apart = 1; /* an upstream connection failing is retried or answered 502 */
    while (next == NEXT_READ) {
        struct msg m;
        int status;
        enum head r = http_read_head(c, in, c->client, &m, 1, &status);
        if (r == HEAD_LEAVE) next = NEXT_PARK;
        if (r == HEAD_NONE || r == HEAD_LOST || r == HEAD_LEAVE) break;
        next = r == HEAD_BAD ? bad_head(c, in, status) : request(w, c, &m);
    }
    if (next == NEXT_PARK) return SERVED_PARK;
    end_upstream(w, c);
    if (next == NEXT_CLOSE && !atomic_load(&c->end)) {
        shutdown(c->client, SHUT_WR); /* the end of the last response */
        drain_client(w, c);
    }
    return SERVED_DONE;
}

/* ---- the worker's scratch ------------------------------------------------------------- */

/* Allocates w's http scratch. Returns 0 or -1. */
static int http_init(struct worker *w) {
    struct http_worker *h = calloc(1, sizeof *h);
    http_head_init();
    w->scratch = h;
    if (!h) return -1;
    for (int d = UP; d <= DOWN; d++) {
        h->in[d].buf = malloc(HEAD_MAX);
        h->out[d] = malloc(OUT_MAX);
        if (!h->in[d].buf || !h->out[d]) return -1;
    }
    return 0;
}

/* Frees what http_init allocated. */
static void http_free(struct worker *w) {
    struct http_worker *h = w->scratch;
    if (!h) return;
    for (int d = UP; d <= DOWN; d++) {
        free(h->in[d].buf);
        free(h->out[d]);
    }
    free(h);
}

const struct mode http_mode = {
    .name = "http",
    .serve = http_serve,
    .done = http_done,
    .init = http_init,
    .free = http_free,
    .last_word = http_last_word,
    .metrics = http_metrics,
};
