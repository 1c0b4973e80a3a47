/* http.c — http mode. The front thread reads each request head on a client connection, parses
 * and authenticates it, and routes it: CONNECT to a tunnel, absolute-form to its host,
 * origin-form to the configured upstream; request bodies go on by their framing. The back
 * thread relays the responses in order, parsing only their heads to find where each ends. It
 * also owns http's counters and its access log line, one per request. */
#include "proxy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define OUT_MAX (HEAD_MAX + 1024) /* a rewritten head: Host and Via may add a little */

/* One forwarded request, from the front thread that sent it to the back thread that relays
 * its response and logs it. */
struct exchange {
    uint64_t start_ns;
    uint64_t up_bytes, down_bytes; /* the request's head and body; the response */
    char method[16], target[128], user[64];
    int is_head, upgrade; /* a HEAD request (no response body); it asked to upgrade */
};

/* One worker's http scratch (w->scratch), allocated once and reset for each connection: the
 * buffers, and the pipeline from the front thread (which forwards requests) to the back thread
 * (which relays responses). Fields marked (mu) are guarded by the worker's mu while the back
 * thread runs; the front thread alone touches them when it has stopped. */
struct http_worker {
    struct stream in[2];                /* [UP] reads the client, [DOWN] the upstream */
    char *out;                          /* a rewritten request head; a sink for dropped bytes */
    struct exchange ring[PIPELINE_MAX]; /* (mu) forwarded, not yet answered */
    uint64_t nforwarded, nanswered;     /* (mu) counts; the ring holds the difference */
    int upgraded;                       /* (mu) the back thread relayed a 101 */
    int back_gone;                      /* (mu) the back thread left: nothing more is answered */
};

/* What the front thread does after a request. */
enum next { NEXT_READ, NEXT_CLOSE };

#define HTTP_METHODS 9
static const char *const method_names[HTTP_METHODS] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "other"};

/* http's own counters, beside the shared ones in stats. */
static struct {
    _Atomic uint64_t methods[HTTP_METHODS];   /* requests by method */
    _Atomic uint64_t classes[6];              /* responses by status class, 1-5 */
    _Atomic uint64_t auth_failures[AUTH_MAX]; /* by enum auth */
    _Atomic uint64_t tunnels, upgrades;       /* CONNECT tunnels, 101 upgrades */
} counts;

static char via[48]; /* "1.1 proxy-PID": added to forwarded requests, and how loops are seen */

/* ---- counting, logging, answering ----------------------------------------------------- */

/* http's metric families, rendered among the shared ones. */
static void http_metrics(FILE *f) {
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    metric_family(f, "proxy_http_requests_total", "counter", "Requests by method.", "method",
                  method_names, counts.methods, HTTP_METHODS);
    metric_family(f, "proxy_http_responses_total", "counter",
                  "Responses by status class, relayed or the proxy's own.", "code", classes,
                  counts.classes + 1, 5);
    metric_family(f, "proxy_auth_failures_total", "counter", "Requests answered 407, by reason.",
                  "reason", auth_names + AUTH_MISSING, counts.auth_failures + AUTH_MISSING,
                  AUTH_MAX - AUTH_MISSING);
    metric_one(f, "proxy_http_tunnels_total", "counter", "CONNECT tunnels established.",
               atomic_load(&counts.tunnels));
    metric_one(f, "proxy_http_upgrades_total", "counter", "Upgrades (101) relayed.",
               atomic_load(&counts.upgrades));
}

/* Counts a request's method. */
static void count_method(const char *method) {
    int i = 0;
    while (i < HTTP_METHODS - 1 && strcmp(method, method_names[i])) i++;
    atomic_fetch_add(&counts.methods[i], 1);
}

/* Counts a response's status and writes the request's access log line. */
static void log_request(const struct conn *c, const struct exchange *x, int status) {
    char peer[64];
    if (status >= 100 && status < 600) atomic_fetch_add(&counts.classes[status / 100], 1);
    log_line("%s %s %s %s %d up=%llu down=%llu ms=%.3f", addr_format(&c->peer, peer, sizeof peer),
             x->user[0] ? x->user : "-", x->method, x->target, status,
             (unsigned long long)x->up_bytes, (unsigned long long)x->down_bytes,
             (double)(mono_ns() - x->start_ns) / 1e6);
}

/* The acceptor's last word to a client the queue has no room for: 503, never blocking. */
static void http_refuse(int fd) {
    char busy[256];
    int n = http_error(busy, sizeof busy, 503, 0);
    send(fd, busy, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* 502 when a connect was refused or a name did not resolve, 504 when it timed out. */
static int dial_status(int err) {
    return err == ETIMEDOUT ? 504 : 502;
}

/* ---- the pipeline: requests forwarded, responses awaited ------------------------------ */

/* Waits until every forwarded request is answered, or the back thread has stopped. Only then
 * may the front thread write to the client, or the two would interleave. */
static void quiesce(struct worker *w) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    while (h->nanswered != h->nforwarded && w->job) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* Queues x for the back thread (waiting while PIPELINE_MAX are in flight) and sets *seq to the
 * count nanswered reaches once its response is relayed. Returns -1 when the back thread has
 * left (the upstream closed): then x was not queued and a new connection is due. */
static int pipeline_push(struct worker *w, const struct exchange *x, uint64_t *seq) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    while (h->nforwarded - h->nanswered == PIPELINE_MAX && w->job && !h->back_gone)
        pthread_cond_wait(&w->cv, &w->mu);
    int ok = w->job && !h->back_gone;
    if (ok) {
        h->ring[h->nforwarded % PIPELINE_MAX] = *x;
        *seq = ++h->nforwarded;
    }
    pthread_mutex_unlock(&w->mu);
    return ok ? 0 : -1;
}

/* The back thread: the request the next response answers. With none waiting it returns 0 and
 * marks the back thread gone, in the same lock as pipeline_push checks it, so that no request
 * can slip in after the back thread decided to leave. */
static int pipeline_oldest(struct worker *w, struct exchange *x) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    int pending = h->nforwarded != h->nanswered;
    if (pending)
        *x = h->ring[h->nanswered % PIPELINE_MAX];
    else
        h->back_gone = 1;
    pthread_mutex_unlock(&w->mu);
    return pending;
}

/* The back thread: the oldest request's response is relayed (upgraded: it was a 101). */
static void pipeline_answered(struct worker *w, int upgraded) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    h->nanswered++;
    h->upgraded = upgraded;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Forgets what s holds. */
static void stream_clear(struct stream *s) {
    s->off = 0;
    s->len = 0;
}

/* Closes the upstream connection once its responses are relayed, and stops the back thread. */
static void end_upstream(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    if (c->upstream < 0) return;
    quiesce(w);
    shutdown(c->upstream, SHUT_RDWR); /* wakes the back thread waiting for a next response */
    pool_back_wait(w);
    pool_set_upstream(w, -1);
    h->nanswered = h->nforwarded; /* requests that will never be answered are forgotten */
    stream_clear(&h->in[DOWN]);
}

/* ---- relaying ------------------------------------------------------------------------ */

/* Relays what is buffered in direction d, then everything until EOF (a tunnel, or a body that
 * ends when the connection does), then passes the half-close on. */
static void relay_rest(struct worker *w, struct conn *c, enum dir d) {
    struct stream *s = &((struct http_worker *)w->scratch)->in[d];
    int to = d == UP ? c->upstream : c->client;
    if (s->len > s->off && copy_send(c, to, s->buf + s->off, s->len - s->off) < 0) return;
    s->off = s->len;
    copy_stream(c, &w->cp[d], d);
}

/* ---- the back thread: responses ------------------------------------------------------- */

/* How a response's body ended. */
enum body { BODY_DONE, BODY_AT_EOF, BODY_FAILED };

/* Relays the body of the response m answering x, by its framing (RFC 9112 6.3): none after
 * HEAD, 101, 204 and 304; chunked; Content-Length; else until the upstream closes. */
static enum body response_body(struct worker *w, struct conn *c, const struct msg *m,
                               const struct exchange *x) {
    struct stream *s = &((struct http_worker *)w->scratch)->in[DOWN];
    int rc = 0;
    if (m->status == 101 || x->is_head || m->status == 204 || m->status == 304) return BODY_DONE;
    if (m->chunked) {
        rc = http_relay_chunked(c, &w->cp[DOWN], s, c->upstream, c->client);
    } else if (m->length >= 0) {
        rc = http_relay_n(c, &w->cp[DOWN], s, c->upstream, c->client, (uint64_t)m->length);
    } else {
        relay_rest(w, c, DOWN);
        return BODY_AT_EOF;
    }
    return rc < 0 ? BODY_FAILED : BODY_DONE;
}

/* Answers a request that will get no response from upstream: 502, then the end. */
static void no_response(struct worker *w, struct conn *c, const struct exchange *x) {
    char buf[256];
    int end = atomic_load(&c->end);
    int n = http_error(buf, sizeof buf, 502, 0);
    if (end == END_NONE || end == END_UPSTREAM) copy_send(c, c->client, buf, (size_t)n);
    log_request(c, x, 502);
    pipeline_answered(w, 0);
    conn_end(c, END_UPSTREAM);
}

/* The back thread in http mode: relays each response in order, reading its head to know where
 * its body ends, and logs the request it answers. */
static void responses(struct worker *w, struct conn *c) {
    struct stream *s = &((struct http_worker *)w->scratch)->in[DOWN];
    for (;;) {
        struct msg m;
        struct exchange x;
        int status;
        enum head r = http_read_head(c, s, c->upstream, &m, 0, 0, &status);
        if (!pipeline_oldest(w, &x)) { /* nothing asked: a closed idle connection, or stray bytes */
            if (r != HEAD_NONE && r != HEAD_LOST) conn_end(c, END_UPSTREAM);
            return;
        }
        /* A 101 nobody asked for would turn the connection into a tunnel behind our back. */
        if (r != HEAD_OK || (m.status == 101 && !x.upgrade)) {
            no_response(w, c, &x);
            return;
        }
        uint64_t before = c->bytes[DOWN];
        if (copy_send(c, c->client, s->buf, m.size) < 0) return;
        s->off = m.size;
        if (m.status < 200 && m.status != 101) continue; /* interim: the final one follows */
        enum body b = response_body(w, c, &m, &x);
        x.down_bytes = c->bytes[DOWN] - before;
        log_request(c, &x, m.status);
        pipeline_answered(w, m.status == 101);
        if (b == BODY_FAILED) {
            conn_end(c, END_UPSTREAM);
            return;
        }
        if (m.status == 101) {
            atomic_fetch_add(&counts.upgrades, 1);
            relay_rest(w, c, DOWN); /* a tunnel now, both ways */
            return;
        }
        if (b == BODY_AT_EOF || m.close) { /* the client was told the connection ends here */
            shutdown(c->client, SHUT_WR);
            return;
        }
    }
}

/* ---- the front thread: requests ------------------------------------------------------- */

/* Where a request goes, read from its target. */
struct target {
    const char *authority; /* absolute-form's host[:port]; NULL for origin-form */
    const char *path;      /* what goes upstream as the origin-form target */
    size_t alen, plen;
    char host[256];
    int port;
};

/* Reads and drops what the client still sends, a little while, once our side is shut: closing
 * with unread request bytes would send a reset that can destroy the reply before the client
 * reads it. */
static void drain_client(struct worker *w, struct conn *c) {
    char *sink = ((struct http_worker *)w->scratch)->out;
    uint64_t until = mono_ns() + 2000000000u, dropped = 0;
    while (dropped < (1 << 20) && mono_ns() < until) {
        size_t got;
        enum recv r = copy_recv(c, c->client, sink, OUT_MAX, &got);
        if (r == RECV_EOF || r == RECV_ENDED) break;
        if (r == RECV_DATA) dropped += got;
    }
}

/* Answers the client with the proxy's own response (after any responses in flight) and logs
 * it. NEXT_READ when the connection may go on (keep), else NEXT_CLOSE. */
static enum next reply(struct worker *w, struct conn *c, struct exchange *x, int status, int keep) {
    char buf[512];
    quiesce(w);
    int n = http_error(buf, sizeof buf, status, keep);
    uint64_t before = c->bytes[DOWN];
    int rc = copy_send(c, c->client, buf, (size_t)n);
    x->down_bytes = c->bytes[DOWN] - before;
    log_request(c, x, status);
    if (keep && rc == 0) return NEXT_READ;
    shutdown(c->client, SHUT_WR);
    if (rc == 0) drain_client(w, c);
    return NEXT_CLOSE;
}

/* Whether f must not be forwarded: hop-by-hop fields, those the Connection fields name, the
 * credentials, and Host when the target supplies a new one. Framing fields are never dropped
 * because Connection names them: that would make us and the upstream disagree on the body. */
static int hop_by_hop(const struct msg *m, const struct field *f, int new_host) {
    static const char *const hop[] = {
        "connection", "proxy-connection",    "keep-alive",        "te",
        "trailer",    "proxy-authorization", "proxy-authenticate"};
    if (http_is(f->name, f->nlen, "upgrade")) return !m->upgrade;
    if (http_is(f->name, f->nlen, "host")) return new_host;
    if (http_is(f->name, f->nlen, "content-length") ||
        http_is(f->name, f->nlen, "transfer-encoding"))
        return 0;
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (http_is(f->name, f->nlen, hop[i])) return 1;
    for (int i = 0; i < m->nfields; i++)
        if (http_is(m->field[i].name, m->field[i].nlen, "connection") &&
            http_list_has(m->field[i].value, m->field[i].vlen, f->name, f->nlen))
            return 1;
    return 0;
}

/* Writes the head to forward into o (OUT_MAX bytes): origin-form target, hop-by-hop fields
 * dropped, Host from the target's authority if it has one, Via added. Returns its length, or
 * -1 when it does not fit. */
static long rewrite(char *o, const struct msg *m, const struct target *t) {
    size_t n = 0;
#define PUT(p, l)                                                                                  \
    do {                                                                                           \
        if (n + (l) > OUT_MAX) return -1;                                                          \
        memcpy(o + n, (p), (l));                                                                   \
        n += (l);                                                                                  \
    } while (0)
#define PUTS(s) PUT(s, strlen(s))
    PUT(m->method, m->mlen);
    PUTS(t->plen && *t->path != '?' ? " " : " /"); /* "/" for an empty path or a bare query */
    PUT(t->path, t->plen);
    PUTS(m->version ? " HTTP/1.1\r\n" : " HTTP/1.0\r\n");
    if (t->authority) {
        PUTS("Host: ");
        PUT(t->authority, t->alen);
        PUTS("\r\n");
    }
    for (int i = 0; i < m->nfields; i++) {
        const struct field *f = &m->field[i];
        if (hop_by_hop(m, f, t->authority != NULL)) continue;
        PUT(f->name, f->nlen);
        PUTS(": ");
        PUT(f->value, f->vlen);
        PUTS("\r\n");
    }
    if (m->upgrade) PUTS("Connection: upgrade\r\n");
    PUTS("Via: ");
    PUTS(via);
    PUTS("\r\n\r\n");
    return (long)n;
#undef PUT
#undef PUTS
}

/* CONNECT host:port: an allowed port, a connection, 200, then raw bytes both ways. */
static enum next tunnel(struct worker *w, struct conn *c, const struct msg *m, struct exchange *x) {
    static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
    char host[256];
    int port;
    if (http_authority(m->target, m->tlen, host, sizeof host, &port, 0) < 0 || m->chunked ||
        m->length > 0)
        return reply(w, c, x, 400, 0);
    if (!auth_port_allowed(port)) return reply(w, c, x, 403, 0);
    end_upstream(w, c);
    int fd = upstream_dial(host, port);
    if (fd < 0) return reply(w, c, x, dial_status(errno), 0);
    pool_set_upstream(w, fd);
    uint64_t up = c->bytes[UP], down = c->bytes[DOWN];
    if (copy_send(c, c->client, ok, sizeof ok - 1) < 0) return NEXT_CLOSE;
    atomic_fetch_add(&counts.tunnels, 1);
    pool_back_start(w, c, pool_copy_down);
    relay_rest(w, c, UP); /* what the client sent after the head, then the rest */
    pool_back_wait(w);
    x->up_bytes = c->bytes[UP] - up;
    x->down_bytes = c->bytes[DOWN] - down;
    log_request(c, x, 200);
    return NEXT_CLOSE;
}

/* Makes sure c->upstream goes to want, c->route's form of where (host:port, or the configured
 * upstreams when host is NULL), reusing the open connection when it does. Returns 0, or -1
 * with errno. */
static int route(struct worker *w, struct conn *c, const char *want, const char *host, int port) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    int alive = w->job && !h->back_gone;
    pthread_mutex_unlock(&w->mu);
    if (alive && !strcmp(c->route, want)) return 0;
    end_upstream(w, c);
    c->route[0] = 0;
    int fd = host ? upstream_dial(host, port) : upstream_open(c);
    if (fd < 0) return -1;
    pool_set_upstream(w, fd);
    snprintf(c->route, sizeof c->route, "%s", want);
    h->back_gone = 0; /* the back thread is not running: no lock needed */
    pool_back_start(w, c, responses);
    return 0;
}

/* Parses the request's target into t and names it in x for the log. Returns 0 or 400. */
static int parse_target(const struct msg *m, struct exchange *x, struct target *t) {
    int asterisk = m->tlen == 1 && *m->target == '*' && !strcmp(x->method, "OPTIONS");
    *t = (struct target){.path = m->target, .plen = m->tlen};
    if (!strcmp(x->method, "CONNECT")) {
        snprintf(x->target, sizeof x->target, "%.*s", (int)m->tlen, m->target);
    } else if (m->tlen > 7 && !strncasecmp(m->target, "http://", 7)) {
        t->authority = m->target + 7;
        t->path = t->authority;
        while (t->path < m->target + m->tlen && *t->path != '/' && *t->path != '?') t->path++;
        t->alen = (size_t)(t->path - t->authority);
        t->plen = m->tlen - 7 - t->alen;
        if (http_authority(t->authority, t->alen, t->host, sizeof t->host, &t->port, 80) < 0)
            return 400;
        snprintf(x->target, sizeof x->target, "%.*s", (int)t->alen, t->authority);
    } else if (*m->target != '/' && !asterisk) {
        return 400; /* https:// outside CONNECT, or nonsense */
    }
    return 0;
}

/* Whether the request may go on: not a loop through us (508), and authenticated (407).
 * Returns 0 or that status. */
static int admit_request(const struct msg *m, struct exchange *x) {
    for (int i = 0; i < m->nfields; i++)
        if (http_is(m->field[i].name, m->field[i].nlen, "via") &&
            http_list_has(m->field[i].value, m->field[i].vlen, via, strlen(via)))
            return 508; /* it came through us before */
    enum auth a = auth_check(m, x->user, sizeof x->user);
    if (a == AUTH_OK) return 0;
    atomic_fetch_add(&counts.auth_failures[a], 1);
    return 407;
}

/* Routes the request and queues x for the back thread, once more on a new connection if a
 * kept-alive upstream has just closed. Sets *seq; returns 0 or the status to answer with. */
static int dispatch(struct worker *w, struct conn *c, struct exchange *x, const struct target *t,
                    uint64_t *seq) {
    char want[sizeof c->route] = "="; /* origin-form: the configured upstreams */
    const char *host = t->authority ? t->host : NULL;
    if (host) snprintf(want, sizeof want, "%s:%d", host, t->port);
    for (int tries = 0;; tries++) {
        if (route(w, c, want, host, t->port) < 0) return dial_status(errno);
        if (!host) snprintf(x->target, sizeof x->target, "%.127s", c->chosen->name);
        if (pipeline_push(w, x, seq) == 0) return 0;
        if (tries || atomic_load(&c->end)) return 502;
        c->route[0] = 0;
    }
}

/* After a request and its body went upstream: records its real size (a chunked body's is known
 * only now) and, if it asked to upgrade, waits for the answer; after a 101, raw bytes both
 * ways. */
static enum next settle(struct worker *w, struct conn *c, const struct msg *m, uint64_t seq,
                        uint64_t up_before) {
    struct http_worker *h = w->scratch;
    pthread_mutex_lock(&w->mu);
    if (h->nanswered < seq) h->ring[(seq - 1) % PIPELINE_MAX].up_bytes = c->bytes[UP] - up_before;
    while (m->upgrade && h->nanswered < seq && w->job) pthread_cond_wait(&w->cv, &w->mu);
    int upgraded = m->upgrade && h->upgraded && h->nanswered >= seq;
    pthread_mutex_unlock(&w->mu);
    if (upgraded) {
        relay_rest(w, c, UP);
        pool_back_wait(w);
        return NEXT_CLOSE;
    }
    return m->close ? NEXT_CLOSE : NEXT_READ;
}

/* Sends the request upstream: its rewritten head, then its body by its framing. */
static enum next forward(struct worker *w, struct conn *c, const struct msg *m, struct exchange *x,
                         const struct target *t) {
    struct http_worker *h = w->scratch;
    long n = rewrite(h->out, m, t);
    if (n < 0) return reply(w, c, x, 431, 0);
    x->upgrade = m->upgrade;
    /* Counted before it goes: the response (and its log line) may beat the body upstream. */
    x->up_bytes = (uint64_t)n + (m->length > 0 ? (uint64_t)m->length : 0);
    uint64_t seq, up_before = c->bytes[UP];
    int status = dispatch(w, c, x, t, &seq);
    if (status) return reply(w, c, x, status, 0);
    if (copy_send(c, c->upstream, h->out, (size_t)n) < 0) return NEXT_CLOSE;
    int rc = 0;
    if (m->chunked)
        rc = http_relay_chunked(c, &w->cp[UP], &h->in[UP], c->client, c->upstream);
    else if (m->length > 0)
        rc = http_relay_n(c, &w->cp[UP], &h->in[UP], c->client, c->upstream, (uint64_t)m->length);
    if (rc < 0) {
        conn_end(c, END_CLIENT);
        return NEXT_CLOSE;
    }
    return settle(w, c, m, seq, up_before);
}

/* Handles one parsed request: its target, then admission (loop check, auth), then CONNECT's
 * tunnel or forwarding. */
static enum next request(struct worker *w, struct conn *c, const struct msg *m) {
    struct http_worker *h = w->scratch;
    struct exchange x = {.start_ns = mono_ns()};
    struct target t;
    h->in[UP].off = m->size; /* the head is read; what follows is body or the next request */
    snprintf(x.method, sizeof x.method, "%.*s", (int)m->mlen, m->method);
    snprintf(x.target, sizeof x.target, "-");
    /* Methods are case-sensitive (RFC 9110 9.1): "head" is not HEAD; its response has a body. */
    x.is_head = !strcmp(x.method, "HEAD");
    count_method(x.method);

    int status = parse_target(m, &x, &t);
    if (status) return reply(w, c, &x, status, 0);
    status = admit_request(m, &x);
    if (status == 407) return reply(w, c, &x, 407, !m->chunked && m->length <= 0 && !m->close);
    if (status) return reply(w, c, &x, status, 0);
    if (!strcmp(x.method, "CONNECT")) return tunnel(w, c, m, &x);
    if (!t.authority && (!cfg.nup || (m->version && !m->host))) return reply(w, c, &x, 400, 0);
    return forward(w, c, m, &x, &t);
}

/* Serves one client connection: every request head read, parsed and handled in turn. */
static void http_serve(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    /* The first head counts from accept, later ones from their first byte. */
    uint64_t deadline = c->start_ns + (uint64_t)cfg.header_timeout * 1000000000u;
    stream_clear(&h->in[UP]);
    stream_clear(&h->in[DOWN]);
    h->nforwarded = 0;
    h->nanswered = 0;
    for (;;) {
        struct msg m;
        int status;
        enum head r = http_read_head(c, &h->in[UP], c->client, &m, 1, deadline, &status);
        deadline = 0;
        if (r == HEAD_NONE || r == HEAD_LOST) break;
        if (r == HEAD_BAD) {
            struct exchange x = {.start_ns = mono_ns(), .method = "-", .target = "-"};
            reply(w, c, &x, status, 0);
            break;
        }
        if (request(w, c, &m) == NEXT_CLOSE) break;
    }
    end_upstream(w, c);
}

/* ---- the worker's scratch ------------------------------------------------------------- */

/* Allocates w's http scratch. Returns 0 or -1. */
static int http_init(struct worker *w) {
    struct http_worker *h = calloc(1, sizeof *h);
    if (!via[0]) snprintf(via, sizeof via, "1.1 proxy-%d", (int)getpid());
    w->scratch = h;
    if (!h) return -1;
    h->in[UP].buf = malloc(HEAD_MAX);
    h->in[DOWN].buf = malloc(HEAD_MAX);
    h->out = malloc(OUT_MAX);
    return h->in[UP].buf && h->in[DOWN].buf && h->out ? 0 : -1;
}

/* Frees what http_init allocated. */
static void http_free(struct worker *w) {
    struct http_worker *h = w->scratch;
    if (!h) return;
    free(h->in[UP].buf);
    free(h->in[DOWN].buf);
    free(h->out);
    free(h);
}

const struct mode http_mode = {
    .name = "http",
    .serve = http_serve,
    .init = http_init,
    .free = http_free,
    .refuse = http_refuse,
    .metrics = http_metrics,
};
