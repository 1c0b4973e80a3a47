/* http.c — HTTP mode. The front thread reads each request head on a client connection, parses
 * and authenticates it, and routes it: CONNECT to a tunnel, absolute-form to its host,
 * origin-form to the configured upstream; request bodies go on by their framing. The back
 * thread relays the responses in order, parsing only their heads to find where each ends. */
#include "proxy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define OUT_MAX (HEAD_MAX + 1024) /* a rewritten head: Host and Via may add a little */

static char via[48]; /* "1.1 proxy-PID": added to forwarded requests, and how loops are seen */

int http_init(struct worker *w) {
    snprintf(via, sizeof via, "1.1 proxy-%d", (int)getpid());
    w->in[UP].buf = malloc(HEAD_MAX);
    w->in[DOWN].buf = malloc(HEAD_MAX);
    w->out = malloc(OUT_MAX);
    return w->in[UP].buf && w->in[DOWN].buf && w->out ? 0 : -1;
}

void http_free(struct worker *w) {
    free(w->in[UP].buf);
    free(w->in[DOWN].buf);
    free(w->out);
}

/* The reason phrase of a status the proxy answers with itself. */
static const char *reason(int status) {
    switch (status) {
    case 400: return "Bad Request";
    case 403: return "Forbidden";
    case 407: return "Proxy Authentication Required";
    case 408: return "Request Timeout";
    case 414: return "URI Too Long";
    case 431: return "Request Header Fields Too Large";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    case 508: return "Loop Detected";
    default: return "Error";
    }
}

int http_error(char *buf, size_t cap, int status, int keep) {
    char body[64];
    int blen = snprintf(body, sizeof body, "%d %s\n", status, reason(status));
    return snprintf(buf, cap,
                    "HTTP/1.1 %d %s\r\n%s%s%s%sContent-Type: text/plain\r\nContent-Length: "
                    "%d\r\n%s\r\n%s",
                    status, reason(status), status == 503 ? "Retry-After: 1\r\n" : "",
                    status == 407 ? "Proxy-Authenticate: Basic realm=\"" : "",
                    status == 407 ? cfg.realm : "", status == 407 ? "\"\r\n" : "", blen,
                    keep ? "" : "Connection: close\r\n", body);
}

/* ---- the pipeline: requests forwarded, responses awaited ------------------------------ */

/* Waits until every forwarded request is answered, or the back thread has stopped. Only then
 * may the front thread write to the client, or the two would interleave. */
static void quiesce(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    while (w->answered != w->sent && w->job) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* Queues x for the back thread (waiting while PIPELINE_MAX are in flight) and sets *seq to
 * the count that answered passes once its response is relayed. Returns -1 when the back
 * thread has left (the upstream closed): then x was not queued and a new connection is due. */
static int push(struct worker *w, const struct exchange *x, uint64_t *seq) {
    pthread_mutex_lock(&w->mu);
    while (w->sent - w->answered == PIPELINE_MAX && w->job && !w->gone)
        pthread_cond_wait(&w->cv, &w->mu);
    int ok = w->job && !w->gone;
    if (ok) {
        w->sent_x[w->sent % PIPELINE_MAX] = *x;
        *seq = ++w->sent;
    }
    pthread_mutex_unlock(&w->mu);
    return ok ? 0 : -1;
}

/* The back thread: the request the next response answers. With none waiting it returns 0 and
 * marks the upstream gone, in the same lock as push() checks it, so that no request can slip
 * in after the back thread decided to leave. */
static int oldest(struct worker *w, struct exchange *x) {
    pthread_mutex_lock(&w->mu);
    int pending = w->sent != w->answered;
    if (pending)
        *x = w->sent_x[w->answered % PIPELINE_MAX];
    else
        w->gone = 1;
    pthread_mutex_unlock(&w->mu);
    return pending;
}

/* The back thread: the oldest request's response is relayed (upgraded: it was a 101). */
static void answered(struct worker *w, int upgraded) {
    pthread_mutex_lock(&w->mu);
    w->answered++;
    w->upgraded = upgraded;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Closes the upstream connection once its responses are relayed, and stops the back thread. */
static void end_upstream(struct worker *w, struct conn *c) {
    if (c->upstream < 0) return;
    quiesce(w);
    shutdown(c->upstream, SHUT_RDWR); /* wakes the back thread waiting for a next response */
    pool_back_wait(w);
    pool_set_upstream(w, -1);
    w->answered = w->sent; /* requests that will never be answered are forgotten */
    w->in[DOWN].off = w->in[DOWN].len = 0;
}

/* ---- reading: heads, lines, bodies ---------------------------------------------------- */

/* Reads until s holds a whole head, and parses it. Returns the head's length; 0 at EOF
 * before any byte; -1 when the connection ended or the peer left mid-head; or -status. */
static long read_head(struct conn *c, struct stream *s, int fd, struct msg *m, int request,
                      uint64_t deadline) {
    size_t scanned = 0;
    memmove(s->buf, s->buf + s->off, s->len - s->off);
    s->len -= s->off;
    s->off = 0;
    for (;;) {
        long end = http_head_end(s->buf, s->len, &scanned);
        if (end > 0) {
            int status = http_parse(s->buf, (size_t)end, m, request);
            return status ? -status : end;
        }
        if (end < 0) return request ? -400 : -502;
        if (s->len == HEAD_MAX) return !request ? -502 : memchr(s->buf, '\n', s->len) ? -431 : -414;
        if (request && s->len && !deadline) /* header_timeout runs from a head's first byte */
            deadline = mono_ns() + (uint64_t)cfg.header_timeout * 1000000000u;
        if (request && deadline && mono_ns() > deadline) return -408;
        ssize_t n = copy_recv(c, fd, s->buf + s->len, HEAD_MAX - s->len);
        if (n > 0)
            s->len += (size_t)n;
        else if (n == 0)
            return s->len ? (request ? -1 : -502) : 0;
        else if (n == -1)
            return -1;
    }
}

/* Reads until s holds a CRLF-ended line at off; returns its length without the CRLF, or -1. */
static long read_line(struct conn *c, struct stream *s, int fd) {
    for (;;) {
        char *p = s->buf + s->off, *lf = memchr(p, '\n', s->len - s->off);
        if (lf) return lf > p && lf[-1] == '\r' ? lf - p - 1 : -1;
        if (s->len - s->off >= 4096) return -1; /* no chunk-size or trailer line is this long */
        if (s->len == HEAD_MAX) {
            memmove(s->buf, p, s->len - s->off);
            s->len -= s->off;
            s->off = 0;
        }
        ssize_t n = copy_recv(c, fd, s->buf + s->len, HEAD_MAX - s->len);
        if (n > 0)
            s->len += (size_t)n;
        else if (n != -2)
            return -1;
    }
}

/* Relays exactly n body bytes from s (what is buffered, then the socket) to `to`. */
static int relay_n(struct conn *c, struct copier *k, struct stream *s, int from, int to,
                   uint64_t n) {
    size_t have = s->len - s->off;
    if (have > n) have = (size_t)n;
    if (have && copy_send(c, to, s->buf + s->off, have) < 0) return -1;
    s->off += have;
    return n == have || copy_bytes(c, k, from, to, n - have) == (int64_t)(n - have) ? 0 : -1;
}

/* The loop is flat on purpose: no recursion, no limit on the number of chunks, each one
 * bounded. */
int http_relay_chunked(struct conn *c, struct copier *k, struct stream *s, int from, int to) {
    uint64_t size;
    for (;;) {
        long n = read_line(c, s, from);
        if (n < 0 || http_chunk_size(s->buf + s->off, (size_t)n, &size) < 0) return -1;
        if (copy_send(c, to, s->buf + s->off, (size_t)n + 2) < 0) return -1;
        s->off += (size_t)n + 2;
        if (!size) break;
        if (relay_n(c, k, s, from, to, size) < 0 || read_line(c, s, from) != 0) return -1;
        if (copy_send(c, to, "\r\n", 2) < 0) return -1;
        s->off += 2;
    }
    for (;;) { /* the trailer section: field lines, then an empty line */
        struct field f;
        long n = read_line(c, s, from);
        if (n < 0 || (n > 0 && http_field(s->buf + s->off, (size_t)n, &f) < 0)) return -1;
        if (copy_send(c, to, s->buf + s->off, (size_t)n + 2) < 0) return -1;
        s->off += (size_t)n + 2;
        if (n == 0) return 0;
    }
}

/* ---- the back thread: responses ------------------------------------------------------- */

/* Relays what is buffered in s, then everything until EOF (a tunnel, or a body that ends
 * when the connection does), then passes the half-close on. */
static void relay_rest(struct worker *w, struct conn *c, enum dir d) {
    struct stream *s = &w->in[d];
    int to = d == UP ? c->upstream : c->client;
    if (s->len > s->off && copy_send(c, to, s->buf + s->off, s->len - s->off) < 0) return;
    s->off = s->len;
    copy_stream(c, &w->cp[d], d);
}

/* Answers a request that will get no response from upstream: 502, then the end. */
static void no_response(struct worker *w, struct conn *c, struct exchange *x) {
    char buf[256];
    int end = atomic_load(&c->end), n = http_error(buf, sizeof buf, 502, 0);
    if (end == END_NONE || end == END_UPSTREAM) copy_send(c, c->client, buf, (size_t)n);
    stats_request(c, x, 502);
    answered(w, 0);
    conn_end(c, END_UPSTREAM);
}

/* The back thread in http mode: relays each response in order, reading its head to know
 * where its body ends (none for HEAD, 1xx, 204, 304), and logs the request it answers. */
static void responses(struct worker *w, struct conn *c) {
    struct stream *s = &w->in[DOWN];
    for (;;) {
        struct msg m;
        struct exchange x;
        long hl = read_head(c, s, c->upstream, &m, 0, 0);
        if (!oldest(w, &x)) { /* nothing asked: a closed idle connection, or stray bytes */
            if (hl != 0 && hl != -1) conn_end(c, END_UPSTREAM);
            return;
        }
        /* A 101 nobody asked for would turn the connection into a tunnel behind our back. */
        if (hl <= 0 || (m.status == 101 && !x.upgrade)) return no_response(w, c, &x);
        uint64_t before = c->bytes[DOWN];
        if (copy_send(c, c->client, s->buf, (size_t)hl) < 0) return;
        s->off = (size_t)hl;
        if (m.status < 200 && m.status != 101) continue; /* interim: the final one follows */
        int rc = 0, to_eof = 0;
        if (m.status == 101 || x.head || m.status == 204 || m.status == 304)
            rc = 0;
        else if (m.chunked)
            rc = http_relay_chunked(c, &w->cp[DOWN], s, c->upstream, c->client);
        else if (m.length >= 0)
            rc = relay_n(c, &w->cp[DOWN], s, c->upstream, c->client, (uint64_t)m.length);
        else
            to_eof = 1;
        if (to_eof) relay_rest(w, c, DOWN);
        x.down = c->bytes[DOWN] - before;
        stats_request(c, &x, m.status);
        answered(w, m.status == 101);
        if (rc < 0) return conn_end(c, END_UPSTREAM);
        if (m.status == 101) {
            atomic_fetch_add(&stats.upgrades, 1);
            return relay_rest(w, c, DOWN); /* a tunnel now, both ways */
        }
        if (to_eof || m.close) { /* the client was told the connection ends here */
            shutdown(c->client, SHUT_WR);
            return;
        }
    }
}

/* ---- the front thread: requests ------------------------------------------------------- */

/* Answers the client with an error (after any responses in flight) and logs it. Returns 0
 * when the connection may go on (keep), else -1. */
static int reply(struct worker *w, struct conn *c, struct exchange *x, int status, int keep) {
    char buf[512];
    quiesce(w);
    int n = http_error(buf, sizeof buf, status, keep);
    uint64_t before = c->bytes[DOWN];
    int rc = copy_send(c, c->client, buf, (size_t)n);
    x->down = c->bytes[DOWN] - before;
    stats_request(c, x, status);
    if (keep && rc == 0) return 0;
    /* Closing with unread request bytes would send a reset that can destroy the reply before
     * the client reads it. Close our side, then read and drop what comes, a little while. */
    shutdown(c->client, SHUT_WR);
    uint64_t until = mono_ns() + 2000000000u, dropped = 0;
    while (rc == 0 && dropped < (1 << 20) && mono_ns() < until) {
        ssize_t got = copy_recv(c, c->client, w->out, OUT_MAX);
        if (got == 0 || got == -1) break;
        if (got > 0) dropped += (uint64_t)got;
    }
    return -1;
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

/* Writes the head to forward into w->out: origin-form target, hop-by-hop fields dropped, Host
 * from the target (authority, if not NULL), Via added. Returns its length, or -1. */
static long rewrite(struct worker *w, const struct msg *m, const char *path, size_t plen,
                    const char *authority, size_t alen) {
    char *o = w->out;
    size_t n = 0;
#define PUT(p, l)                                                                                  \
    do {                                                                                           \
        if (n + (l) > OUT_MAX) return -1;                                                          \
        memcpy(o + n, (p), (l));                                                                   \
        n += (l);                                                                                  \
    } while (0)
#define PUTS(s) PUT(s, strlen(s))
    PUT(m->method, m->mlen);
    PUTS(plen && *path == '?' ? " /" : plen ? " " : " /");
    PUT(path, plen);
    PUTS(m->version ? " HTTP/1.1\r\n" : " HTTP/1.0\r\n");
    if (authority) {
        PUTS("Host: ");
        PUT(authority, alen);
        PUTS("\r\n");
    }
    for (int i = 0; i < m->nfields; i++) {
        const struct field *f = &m->field[i];
        if (hop_by_hop(m, f, authority != NULL)) continue;
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
static int tunnel(struct worker *w, struct conn *c, const struct msg *m, struct exchange *x) {
    static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
    char host[256];
    int port;
    if (http_authority(m->target, m->tlen, host, sizeof host, &port, 0) < 0 || m->chunked ||
        m->length > 0)
        return reply(w, c, x, 400, 0);
    if (!auth_port_allowed(port)) return reply(w, c, x, 403, 0);
    end_upstream(w, c);
    int fd = upstream_dial(host, port);
    if (fd < 0) return reply(w, c, x, errno == ETIMEDOUT ? 504 : 502, 0);
    pool_set_upstream(w, fd);
    uint64_t up = c->bytes[UP], down = c->bytes[DOWN];
    if (copy_send(c, c->client, ok, sizeof ok - 1) < 0) return -1;
    atomic_fetch_add(&stats.tunnels, 1);
    pool_back_start(w, c, copy_down);
    relay_rest(w, c, UP); /* what the client sent after the head, then the rest */
    pool_back_wait(w);
    x->up = c->bytes[UP] - up;
    x->down = c->bytes[DOWN] - down;
    stats_request(c, x, 200);
    return -1;
}

/* Makes sure c->upstream goes to key (connecting host:port, or the configured upstreams when
 * host is NULL), reusing the open connection when it does. Returns 0 or an error status. */
static int route(struct worker *w, struct conn *c, char *key, const char *want, const char *host,
                 int port) {
    pthread_mutex_lock(&w->mu);
    int alive = w->job && !w->gone;
    pthread_mutex_unlock(&w->mu);
    if (alive && !strcmp(key, want)) return 0;
    end_upstream(w, c);
    key[0] = 0;
    int fd = host ? upstream_dial(host, port) : upstream_open(c);
    if (fd < 0) return errno == ETIMEDOUT ? 504 : 502;
    pool_set_upstream(w, fd);
    snprintf(key, 300, "%s", want);
    w->gone = 0; /* the back thread is not running: no lock needed */
    pool_back_start(w, c, responses);
    return 0;
}

/* Handles one parsed request whose head is hl bytes. Returns 0 to read the next one, -1 to
 * end the connection. */
static int request(struct worker *w, struct conn *c, const struct msg *m, long hl, char *key) {
    struct stream *in = &w->in[UP];
    struct exchange x = {.start_ns = mono_ns()};
    int has_body = m->chunked || m->length > 0;
    const char *authority = NULL, *path = m->target;
    size_t alen = 0, plen = m->tlen;
    char host[256], want[300];
    int port = 0;
    snprintf(x.method, sizeof x.method, "%.*s", (int)m->mlen, m->method);
    /* Methods are case-sensitive (RFC 9110 9.1): "head" is not HEAD; its response has a body. */
    int is_connect = !strcmp(x.method, "CONNECT");
    x.head = !strcmp(x.method, "HEAD");
    snprintf(x.target, sizeof x.target, "-");
    stats_method(m->method, m->mlen);
    in->off = (size_t)hl;

    if (is_connect) {
        snprintf(x.target, sizeof x.target, "%.*s", (int)m->tlen, m->target);
    } else if (m->tlen > 7 && !strncasecmp(m->target, "http://", 7)) {
        authority = m->target + 7;
        for (path = authority; path < m->target + m->tlen && *path != '/' && *path != '?';) path++;
        alen = (size_t)(path - authority);
        plen = m->tlen - 7 - alen;
        if (http_authority(authority, alen, host, sizeof host, &port, 80) < 0)
            return reply(w, c, &x, 400, 0);
        snprintf(x.target, sizeof x.target, "%.*s", (int)alen, authority);
    } else if (*m->target != '/' && !(x.method[0] == 'O' && m->tlen == 1 && *m->target == '*')) {
        return reply(w, c, &x, 400, 0); /* https:// outside CONNECT, or nonsense */
    }

    for (int i = 0; i < m->nfields; i++)
        if (http_is(m->field[i].name, m->field[i].nlen, "via") &&
            http_list_has(m->field[i].value, m->field[i].vlen, via, strlen(via)))
            return reply(w, c, &x, 508, 0); /* it came through us before: a loop */
    enum auth a = auth_check(m, x.user, sizeof x.user);
    if (a != AUTH_OK) {
        atomic_fetch_add(&stats.auth_failures[a], 1);
        return reply(w, c, &x, 407, !has_body && !m->close);
    }
    if (is_connect) return tunnel(w, c, m, &x);
    if (!authority && (!cfg.nup || (m->version && !m->host))) return reply(w, c, &x, 400, 0);

    long n = rewrite(w, m, path, plen, authority, alen);
    if (n < 0) return reply(w, c, &x, 431, 0);
    x.upgrade = m->upgrade;
    /* Counted before it goes: the response (and its log line) may beat the body upstream. */
    x.up = (uint64_t)n + (m->length > 0 ? (uint64_t)m->length : 0);
    snprintf(want, sizeof want, "%s:%d", authority ? host : "=", port);
    uint64_t seq, up = c->bytes[UP];
    for (int tries = 0;; tries++) { /* a kept-alive upstream may have just closed: once more */
        int status = route(w, c, key, want, authority ? host : NULL, port);
        if (status) return reply(w, c, &x, status, 0);
        if (!authority) snprintf(x.target, sizeof x.target, "%.127s", c->up->name);
        if (push(w, &x, &seq) == 0) break;
        if (tries || atomic_load(&c->end)) return reply(w, c, &x, 502, 0);
        key[0] = 0;
    }
    if (copy_send(c, c->upstream, w->out, (size_t)n) < 0) return -1;
    int rc = m->chunked ? http_relay_chunked(c, &w->cp[UP], in, c->client, c->upstream)
             : m->length > 0
                 ? relay_n(c, &w->cp[UP], in, c->client, c->upstream, (uint64_t)m->length)
                 : 0;
    if (rc < 0) return conn_end(c, END_CLIENT), -1;
    pthread_mutex_lock(&w->mu);
    if (w->answered < seq) w->sent_x[(seq - 1) % PIPELINE_MAX].up = c->bytes[UP] - up; /* chunked */
    while (m->upgrade && w->answered < seq && w->job) pthread_cond_wait(&w->cv, &w->mu);
    int upgraded = m->upgrade && w->upgraded && w->answered >= seq;
    pthread_mutex_unlock(&w->mu);
    if (upgraded) { /* 101: from here on, raw bytes both ways */
        relay_rest(w, c, UP);
        pool_back_wait(w);
        return -1;
    }
    return m->close ? -1 : 0;
}

void http_serve(struct worker *w, struct conn *c) {
    char key[300] = ""; /* where c->upstream goes: "host:port", "=" (configured), "" (none) */
    uint64_t deadline = c->start_ns + (uint64_t)cfg.header_timeout * 1000000000u;
    w->in[UP].off = w->in[UP].len = 0;
    w->in[DOWN].off = w->in[DOWN].len = 0;
    w->sent = w->answered = 0;
    for (;;) {
        struct msg m;
        long hl = read_head(c, &w->in[UP], c->client, &m, 1, deadline);
        deadline = 0; /* the first head counts from accept, later ones from their first byte */
        if (hl == 0 || hl == -1) break;
        if (hl < 0) {
            struct exchange x = {.start_ns = mono_ns(), .method = "-", .target = "-"};
            reply(w, c, &x, (int)-hl, 0);
            break;
        }
        if (request(w, c, &m, hl, key) < 0) break;
    }
    end_upstream(w, c);
}
