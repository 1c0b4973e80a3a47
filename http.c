/* http.c — http mode, the client's side. The front thread reads each request head on a client
 * connection, parses and authenticates it, charges its client's rate, and hands it on
 * (http_exchange.c): CONNECT to a tunnel, absolute-form to its host, origin-form to the
 * configured upstream, one request at a time. This file also owns http's counters of requests
 * and its access log line, one per request, and the mode's per-worker scratch. It reads
 * top-down from the mode's entry point, http_serve. */
#include "proxy.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

/* So that the file reads top-down from http_serve, each function before those it calls. */
static void turn_begins(struct conn *c, struct inbuf *in);
static enum next bad_head(struct conn *c, const struct inbuf *in, int status);
static int proxy_header_sent(const struct inbuf *s);
static enum next request(struct worker *w, struct conn *c, const struct msg *m);
static int parse_target(struct conn *c, const struct msg *m, struct target *t);
static int admit_request(struct conn *c, const struct msg *m);
static int over_rate(struct worker *w, struct conn *c, int authenticated, int bodiless,
                     enum next *next);
static enum next answer_self(struct conn *c, enum why why, int keep);
static enum next log_unless_parked(struct conn *c, enum next next);
static void drain_client(struct worker *w, struct conn *c);
static uint64_t request_began(struct conn *c);
static void count_method(const char *method);
static void count_auth_failure(enum auth a);
static void log_request(struct conn *c);

/* Serves one client connection: every request head read, parsed and handled in turn, until a
 * request or its response ends the connection (RFC 9112 9.6: then no further request is read),
 * or until it leaves its worker while it waits for a request (its turn is over, or it has
 * nothing to do: copy_wait), or a tunnel does. A connection back from the waiting room goes on
 * from where it left: what it left with (part of a head, or a request whose dial parked) comes
 * back from c->stash (turn_begins); a tunnel back from there is pool.c's to relay, and never
 * comes here again. Requests pipelined behind one another are all served before it can leave:
 * it waits for a request only once its buffer is empty. */
static enum served http_serve(struct worker *w, struct conn *c) {
    struct http_worker *h = w->scratch;
    struct inbuf *in = &h->in[UP];
    enum next next = NEXT_READ;
    http_inbuf_clear(in);
    http_inbuf_clear(&h->in[DOWN]);
    turn_begins(c, in);
    c->server_apart = 1; /* a server connection failing is retried or answered 502 */
    while (next == NEXT_READ) {
        struct msg m;
        int status;
        enum head r = http_read_head(c, in, c->client, &m, 1, &status);
        if (r == HEAD_LEAVE) next = NEXT_PARK;
        if (r == HEAD_NONE || r == HEAD_LOST || r == HEAD_LEAVE) break;
        next = r == HEAD_BAD ? bad_head(c, in, status) : request(w, c, &m);
    }
    if (next == NEXT_PARK) return SERVED_PARK;
    http_end_server(w, c);
    if (next == NEXT_CLOSE && !atomic_load(&c->end)) {
        shutdown(c->client, SHUT_WR); /* the end of the last response */
        drain_client(w, c);
    }
    return SERVED_DONE;
}

/* A turn of c begins on a worker: the clocks of its next request head, and the part of a head
 * it left its last worker with (c->stash) back in in. */
static void turn_begins(struct conn *c, struct inbuf *in) {
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
static enum next bad_head(struct conn *c, const struct inbuf *in, int status) {
    enum why why = http_why_of(status);
    c->req = (struct request_log){.start_ns = request_began(c),
                                  .bytes0 = {c->bytes[UP], c->bytes[DOWN]},
                                  .method = "-",
                                  .target = "-"};
    if (status == 400 && proxy_header_sent(in)) why = WHY_PROXY_HEADER;
    return answer_self(c, why, 0);
}

/* Whether what s holds, a bad request head, is a PROXY protocol header instead: from a client
 * that is not a trusted balancer (one is read before any request: pool.c), so the log can say
 * why its 400 came. */
static int proxy_header_sent(const struct inbuf *s) {
    struct addr ignored;
    size_t used;
    return s->len >= 6 && proxy_protocol_parse(s->buf, s->len, &ignored, &used) >= 0;
}

/* Handles one parsed request: its target, then admission (loop check, auth), then CONNECT's
 * tunnel or forwarding. A request whose dial left its worker is handled again from here when
 * c is back (c->dial): the same steps lead to the same dial, and it is counted and timed once. */
static enum next request(struct worker *w, struct conn *c, const struct msg *m) {
    struct http_worker *h = w->scratch;
    struct target t;
    int again = c->dial != NULL;
    /* Each request is served by the newest config (a reload since the last one counts: a
     * revoked user is refused now). Its server connection, made under the one before, goes;
     * a request back from its dial keeps the config it dials by. */
    struct config *was = c->cfg;
    if (!again) config_refresh(&c->cfg);
    if (c->cfg != was) {
        http_end_server(w, c);
        c->chosen = NULL;
    }
    h->in[UP].off = m->size; /* the head is read; what follows is body or the next request */
    c->req = (struct request_log){.start_ns = again ? c->req.start_ns : request_began(c),
                                  .bytes0 = {c->bytes[UP], c->bytes[DOWN]},
                                  .target = "-"};
    snprintf(c->req.method, sizeof c->req.method, "%.*s", (int)m->mlen, m->method);
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
    if (!strcmp(c->req.method, "CONNECT")) return log_unless_parked(c, http_tunnel(w, c, m));
    /* Any host, not any port: else a body could speak to SMTP on 25 or SSH on 22. */
    if (t.authority && !ports_match(c->cfg->forward_ports, t.port))
        return answer_self(c, WHY_PORT, 0);
    if (!t.authority && !c->cfg->nup) return answer_self(c, WHY_NO_UPSTREAM, 0);
    if (!t.authority && m->version && !m->host) return answer_self(c, WHY_BAD_REQUEST, 0);
    return log_unless_parked(c, http_forward(w, c, m, &t));
}

/* Parses the request's target into t and names it in c->req for the log. Returns 0 or 400. */
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
    count_auth_failure(a);
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
    struct inbuf *in = &((struct http_worker *)w->scratch)->in[UP];
    int wait = limits_request(c->cfg, &c->peer, authenticated ? c->req.user : NULL);
    if (!wait) return 0;
    int rc = http_reply(c, WHY_RATE, bodiless, wait);
    log_request(c);
    *next = NEXT_CLOSE;
    if (!bodiless || rc < 0) return 1;
    *next = NEXT_READ;
    if (!cfg.park_after || in->len > in->off) return 1;
    c->held_until = mono_ns() + (uint64_t)wait * 1000000000u;
    *next = NEXT_PARK;
    return 1;
}

/* Answers a request with the proxy's own response (http_reply), logs it, and says what comes
 * next: the next request only if keep and the reply went out. */
static enum next answer_self(struct conn *c, enum why why, int keep) {
    int rc = http_reply(c, why, keep, 0);
    log_request(c);
    return keep && rc == 0 ? NEXT_READ : NEXT_CLOSE;
}

/* A request handed on to http_exchange.c is done unless it parked: a parked one gets its line
 * once it is done, on a later turn, or when its connection closes (http_done). */
static enum next log_unless_parked(struct conn *c, enum next next) {
    if (next != NEXT_PARK) log_request(c);
    return next;
}

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

/* ---- counting and logging ------------------------------------------------------------- */

#define HTTP_METHODS 9
static const char *const method_names[HTTP_METHODS] = {
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "other"};

/* http's own counters, beside the shared ones in stats and the exchange's. */
static struct {
    _Atomic uint64_t methods[HTTP_METHODS];   /* requests by method */
    _Atomic uint64_t classes[6];              /* responses by status class, 1-5 */
    _Atomic uint64_t auth_failures[AUTH_MAX]; /* by enum auth */
} counts;

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

/* Counts a request answered 407, by why. */
static void count_auth_failure(enum auth a) {
    atomic_fetch_add(&counts.auth_failures[a], 1);
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

/* The connection is closed: a tunnel or upgrade that parked gets its line now (pool.c relayed
 * it to its end, or the waiting room closed it: idle_timeout, the stop). */
static void http_done(const struct conn *c) {
    if (c->relay && !c->req.logged) write_log(c);
}

/* http's metric families, rendered among the shared ones. */
static void http_metrics(FILE *f) {
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    metric_family(f, "proxy_http_requests_total", "counter", "Requests by method.", "method",
                  method_names, counts.methods, HTTP_METHODS);
    metric_family(
        f, "proxy_http_responses_total", "counter",
        "Requests by the class of the status the client got, forwarded or the proxy's own.", "code",
        classes, counts.classes + 1, 5);
    metric_family(f, "proxy_auth_failures_total", "counter", "Requests answered 407, by reason.",
                  "reason", auth_names + AUTH_MISSING, counts.auth_failures + AUTH_MISSING,
                  AUTH_MAX - AUTH_MISSING);
    http_exchange_metrics(f);
}

/* ---- turning clients away; the worker's scratch --------------------------------------- */

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
