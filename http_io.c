/* http_io.c — HTTP messages between sockets: reading a head until it is whole, reading a
 * chunk-size or trailer line, copying a body of known length or a chunked one, checked as it
 * goes, and writing and sending the proxy's own error responses. Bytes move through copy.c; heads
 * and lines are parsed by http_parse.c. */
#include "proxy.h"

#include <poll.h>
#include <string.h>

/* Each answer the proxy makes itself: its status and reason phrase, a word for the access log
 * (error=) and a sentence for the client, so that a name that does not resolve, a refused port
 * and a black hole each say so, as squid's error pages and haproxy's termination codes do. */
static const struct {
    int status;
    const char *reason, *word, *text;
} whys[WHY_MAX] = {
    [WHY_BAD_REQUEST] = {400, "Bad Request", "bad_request", "the request is not valid HTTP/1.1"},
    [WHY_NO_UPSTREAM] = {400, "Bad Request", "no_upstream",
                         "the request names a path, not a URL, and this proxy has no upstream "
                         "to send it to: ask for the whole URL (http://host/path)"},
    [WHY_PORT] = {403, "Forbidden", "port", "this proxy does not reach that port"},
    [WHY_DESTINATION] = {403, "Forbidden", "destination", "this proxy does not reach that address"},
    [WHY_AUTH] = {407, "Proxy Authentication Required", "auth",
                  "this proxy needs a user name and password (Basic)"},
    [WHY_HEADER_TIMEOUT] = {408, "Request Timeout", "header_timeout",
                            "the request head did not come in time"},
    [WHY_URI_TOO_LONG] = {414, "URI Too Long", "uri_too_long", "the request line is too long"},
    [WHY_HEAD_TOO_LARGE] = {431, "Request Header Fields Too Large", "head_too_large",
                            "the request head is too large"},
    [WHY_VERSION] = {505, "HTTP Version Not Supported", "version",
                     "only HTTP/1.0 and HTTP/1.1 are spoken here"},
    [WHY_LOOP] = {508, "Loop Detected", "loop", "this request came through this proxy before"},
    [WHY_DNS] = {502, "Bad Gateway", "dns", "the upstream's name did not resolve"},
    [WHY_REFUSED] = {502, "Bad Gateway", "refused", "the upstream refused the connection"},
    [WHY_UNREACHABLE] = {502, "Bad Gateway", "unreachable",
                         "the upstream's host or network is unreachable"},
    [WHY_CONNECT_TIMEOUT] = {504, "Gateway Timeout", "connect_timeout",
                             "the upstream did not accept a connection in time"},
    [WHY_CONNECT_FAILED] = {502, "Bad Gateway", "connect_failed",
                            "the connection to the upstream failed"},
    [WHY_RESOURCES] = {503, "Service Unavailable", "resources",
                       "the proxy is short of file descriptors or memory for now"},
    [WHY_CLOSED] = {502, "Bad Gateway", "closed",
                    "the upstream closed the connection without a response"},
    [WHY_RESET] = {502, "Bad Gateway", "reset",
                   "the upstream reset the connection before a response"},
    [WHY_BAD_RESPONSE] = {502, "Bad Gateway", "bad_response",
                          "the upstream's response was not valid HTTP/1.1"},
    [WHY_BUSY] = {503, "Service Unavailable", "busy", "the proxy is busy: try again in a moment"},
    [WHY_DENIED] = {403, "Forbidden", "destination_denied",
                    "this proxy's list of denied destinations holds that one"},
    [WHY_NOT_ALLOWED] = {403, "Forbidden", "destination_not_allowed",
                         "that destination is not on this proxy's list of allowed ones"},
    [WHY_RATE] = {429, "Too Many Requests", "requests_per_second",
                  "this client sends more requests than this proxy allows: try again after "
                  "Retry-After seconds"},
    [WHY_CLIENT_CONNECTIONS] = {429, "Too Many Requests", "connections_per_client",
                                "this client has as many connections open as this proxy allows: "
                                "use one of them, or close one"},
    [WHY_PROXY_HEADER] = {400, "Bad Request", "proxy_header",
                          "a PROXY protocol header is taken only from a trusted balancer"},
};

enum why http_why_of(int status) {
    for (int i = 0; i < WHY_MAX; i++)
        if (whys[i].status == status) return (enum why)i;
    return WHY_BAD_REQUEST;
}

int http_why_status(enum why why) {
    return whys[why].status;
}

const char *http_why_word(enum why why) {
    return whys[why].word;
}

int http_error(char *buf, size_t cap, enum why why, int keep, const char *realm, int retry) {
    char body[320], extra[128] = "";
    int status = whys[why].status;
    const char *reason = whys[why].reason;
    int blen = snprintf(body, sizeof body, "%d %s: %s\n", status, reason, whys[why].text);
    if (status == 407)
        snprintf(extra, sizeof extra, "Proxy-Authenticate: Basic realm=\"%s\"\r\n", realm);
    if (status == 503 && !retry) retry = 1;
    if (retry) snprintf(extra, sizeof extra, "Retry-After: %d\r\n", retry);
    return snprintf(
        buf, cap, "HTTP/1.1 %d %s\r\n%sContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s",
        status, reason, extra, blen, keep ? "" : "Connection: close\r\n", body);
}

int http_reply(struct conn *c, enum why why, int keep, int retry) {
    char buf[768];
    int n = http_error(buf, sizeof buf, why, keep, c->cfg->realm, retry);
    c->req.error = http_why_word(why);
    if (copy_send(c, c->client, buf, (size_t)n) < 0) return -1;
    c->req.status = http_why_status(why);
    return 0;
}

void http_inbuf_clear(struct inbuf *s) {
    s->off = 0;
    s->len = 0;
}

/* Moves the unread bytes of s to the start of its buffer. */
static void compact(struct inbuf *s) {
    memmove(s->buf, s->buf + s->off, s->len - s->off);
    s->len -= s->off;
    s->off = 0;
}

/* A request head's bytes came: its deadline is now the earlier of header_timeout's (from its
 * first byte, or from accept for a connection's first head) and min_rate's (as for a body: the
 * first second free, then a second for each min_rate bytes), so that a head that trickles is
 * ended, not only one that stops. The waiting room keeps the same deadline (room_deadline). */
static void head_came(struct conn *c, size_t len) {
    uint64_t now = mono_ns(), sec = 1000000000u;
    if (!c->head_first) {
        c->head_first = now;
        if (!c->head_cap) c->head_cap = now + (uint64_t)c->cfg->header_timeout * sec;
    }
    c->head_deadline = c->head_cap;
    if (!c->cfg->min_rate) return;
    uint64_t rate = c->head_first + sec + len * sec / (uint64_t)c->cfg->min_rate;
    if (rate < c->head_deadline) c->head_deadline = rate;
}

/* A request head is whole (or refused): no deadline runs until the next one's first byte. The
 * request began with its first byte, unless it was known to be there earlier (head_since). */
static void head_done(struct conn *c) {
    if (!c->head_since) c->head_since = c->head_first ? c->head_first : mono_ns();
    c->head_deadline = c->head_cap = c->head_first = 0;
}

/* Waits on a worker for a request's bytes (s holds none of it yet, or part of it): a safe
 * point, where c may leave its worker, what it read of a head going with it in c->stash when a
 * head buffer is free to carry it (with none free it keeps its worker). Returns HEAD_OK when fd
 * is readable or the head's time is up (the caller looks), HEAD_LEAVE, HEAD_NONE when
 * keepalive_timeout ended c between requests, or HEAD_LOST when c ended. */
static enum head wait_request(struct conn *c, struct inbuf *s, int fd) {
    size_t part = s->len - s->off;
    char *spare = part ? pool_head_take() : NULL;
    enum wake w = copy_wait(c, UP, fd, POLLIN, !part || spare);
    if (w == WAKE_LEAVE && part && spare) {
        memcpy(spare, s->buf + s->off, part);
        c->stash = spare;
        c->stash_len = part;
        return HEAD_LEAVE;
    }
    if (spare) pool_head_give(spare);
    if (w == WAKE_LEAVE) return HEAD_LEAVE;
    if (w == WAKE_ENDED) return HEAD_LOST;
    if (w == WAKE_TIMEOUT && !c->head_deadline) { /* keepalive_timeout */
        conn_end(c, END_IDLE);
        return HEAD_NONE;
    }
    return HEAD_OK;
}

enum head http_read_head(struct conn *c, struct inbuf *s, int fd, struct msg *m, int request,
                         int *status) {
    size_t scanned = 0, end, got;
    int looked = 0; /* its time is up, and the socket was read once more */
    compact(s);
    *status = request ? 400 : 502;
    for (;;) {
        enum scan found = http_head_end(s->buf, s->len, &scanned, &end);
        if (found != SCAN_MORE && request) head_done(c);
        if (found == SCAN_DONE) {
            *status = http_parse(s->buf, end, m, request);
            return *status ? HEAD_BAD : HEAD_OK;
        }
        if (found == SCAN_BAD) return HEAD_BAD;
        if (s->len == HEAD_MAX) {
            if (request) *status = memchr(s->buf, '\n', s->len) ? 431 : 414;
            return HEAD_BAD;
        }
        if (request && s->len && !c->head_first) /* its first bytes: read now, or pipelined */
            head_came(c, s->len);
        /* Its time is up; but bytes that came in time and waited for a worker (in the queue,
         * or behind another connection) are the client's due: one more read of what is there,
         * never a wait, before the 408. */
        if (request && c->head_deadline && mono_ns() >= c->head_deadline) {
            struct pollfd p = {.fd = fd, .events = POLLIN};
            if (looked || poll(&p, 1, 0) != 1) {
                *status = 408;
                return HEAD_BAD;
            }
            looked = 1;
        } else if (request && cfg.park_after) { /* waiting for a request, or the rest of one */
            enum head h = wait_request(c, s, fd);
            if (h != HEAD_OK) return h;
            if (c->head_deadline && mono_ns() >= c->head_deadline) continue; /* 408 above */
        }
        enum recv r = copy_recv(c, fd, s->buf + s->len, HEAD_MAX - s->len, &got);
        if (r == RECV_TICK && request && !c->head_deadline && !s->len && /* between requests */
            copy_idle_for(c, (uint64_t)c->cfg->keepalive_timeout * 1000)) {
            conn_end(c, END_IDLE);
            return HEAD_NONE;
        }
        if (r == RECV_DATA) s->len += got;
        if (r == RECV_DATA && request) head_came(c, s->len);
        if (r == RECV_ENDED) return HEAD_LOST;
        if (r == RECV_EOF && !s->len) return HEAD_NONE;
        if (r == RECV_EOF) return request ? HEAD_LOST : HEAD_BAD;
    }
}

/* Reads until s holds a CRLF-ended line at off; returns its length without the CRLF, or -1. */
static long read_line(struct conn *c, struct inbuf *s, int fd) {
    for (;;) {
        char *p = s->buf + s->off, *lf = memchr(p, '\n', s->len - s->off);
        if (lf) return lf > p && lf[-1] == '\r' ? lf - p - 1 : -1;
        if (s->len - s->off >= 4096) return -1; /* no chunk-size or trailer line is this long */
        if (s->len == HEAD_MAX) compact(s);
        size_t got;
        enum recv r = copy_recv(c, fd, s->buf + s->len, HEAD_MAX - s->len, &got);
        if (r == RECV_DATA) s->len += got;
        if (r == RECV_EOF || r == RECV_ENDED) return -1;
    }
}

int http_copy_n(struct conn *c, struct copier *k, struct inbuf *s, int from, int to, uint64_t n) {
    size_t have = s->len - s->off;
    if (have > n) have = (size_t)n;
    if (have && copy_send(c, to, s->buf + s->off, have) < 0) return -1;
    s->off += have;
    if (n == have) return 0;
    return copy_bytes(c, k, from, to, n - have) == (int64_t)(n - have) ? 0 : -1;
}

/* The loop is flat on purpose: no recursion, no limit on the number of chunks, each one bounded. */
int http_copy_chunked(struct conn *c, struct copier *k, struct inbuf *s, int from, int to) {
    uint64_t size;
    for (;;) {
        long n = read_line(c, s, from);
        if (n < 0 || http_chunk_size(s->buf + s->off, (size_t)n, &size) < 0) return -1;
        if (copy_send(c, to, s->buf + s->off, (size_t)n + 2) < 0) return -1;
        s->off += (size_t)n + 2;
        if (!size) break;
        if (http_copy_n(c, k, s, from, to, size) < 0 || read_line(c, s, from) != 0) return -1;
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
