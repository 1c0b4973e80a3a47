/* proxy.h — the table of contents: every shared struct and constant, then the functions each
 * .c file offers, grouped by file. Read this first; each function's contract is here. */
#ifndef PROXY_H
#define PROXY_H

#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PROXY_VERSION "0.1.0"

/* Build-time limits: change them here. */
#define MAX_UPSTREAMS   32
#define MAX_ALLOW       64 /* [access] allow networks */
#define MAX_USERS       256
#define HEAD_MAX        16384  /* bytes in an HTTP request or response head: 16 KiB */
#define HTTP_MAX_FIELDS 100    /* header fields in one head */
#define PIPELINE_MAX    16     /* requests forwarded and not yet answered, per connection */
#define STACK_SIZE      262144 /* bytes per thread (256 KiB); getaddrinfo needs > 32 KiB */
#define TICK_MS         1000   /* a blocked read or write wakes this often to check idle_timeout */
#define DOWN_SECONDS    10     /* an upstream that failed a connect is skipped this long */
#define GRACE_SECONDS   10     /* SIGTERM: how long active connections may finish */

/* ---- shared structs ------------------------------------------------------------------- */

struct addr {
    struct sockaddr_storage sa;
    socklen_t len; /* 0: not set */
};

struct cidr {
    int family; /* AF_INET or AF_INET6 */
    int bits;
    uint8_t net[16];
};

/* One configured upstream and its health. */
struct upstream {
    char name[272]; /* "host:port" as configured: log lines and metric labels */
    struct addr addr;
    _Atomic uint64_t down_until; /* monotonic ns; skipped until then unless all are down */
    _Atomic uint64_t connects, failures;
};

enum mode { MODE_TCP, MODE_HTTP };
enum balance { BALANCE_SOURCE, BALANCE_ROUNDROBIN };
enum copy_mode { COPY_SPLICE, COPY_BUFFER };
enum send_proxy { SEND_PROXY_OFF, SEND_PROXY_V1, SEND_PROXY_V2 };

struct user {
    char name[64], pass[128];
};

/* Everything proxy.ini says; filled once by config_load, read-only while serving
 * (except the health counters inside each upstream). */
struct config {
    const char *file;
    struct addr listen, stats_listen; /* stats_listen.len == 0: no admin listener */
    int mode, balance, copy, send_proxy, reuse_port;
    struct upstream up[MAX_UPSTREAMS];
    int nup;
    int workers, queue, buffer_size;
    int connect_timeout, idle_timeout; /* seconds; idle_timeout 0 = never */
    int header_timeout;                /* http: seconds to receive a request head */
    int rate_limit;                    /* bytes/s per direction, 0 = unlimited */
    char log[256];                     /* "-", "off" or a path */
    struct cidr allow[MAX_ALLOW];
    int nallow;
    uint8_t connect_ports[65536 / 8]; /* a bit per port CONNECT may reach */
    char realm[64];
    struct user users[MAX_USERS]; /* any user turns Basic auth on */
    int nusers;
};

/* Why a connection ended; the first reason recorded wins. */
enum end {
    END_NONE,
    END_DONE,        /* both directions reached EOF */
    END_IDLE,        /* no byte either way for idle_timeout */
    END_CLIENT,      /* read or write error on the client socket */
    END_UPSTREAM,    /* read or write error on the upstream socket */
    END_NO_UPSTREAM, /* every upstream refused or timed out */
    END_STOPPED,     /* still open when the graceful stop ran out of time */
    END_MAX
};
enum dir { UP, DOWN }; /* UP: client → upstream; DOWN: upstream → client */

/* One client connection, shared by the two threads of the worker serving it. Each
 * direction's fields are written only by the thread copying that direction. */
struct conn {
    int client, upstream; /* fds; upstream -1 until connected */
    struct addr peer;     /* the client's address */
    struct upstream *up;  /* the chosen upstream */
    uint64_t start_ns;
    _Atomic uint64_t last_ns; /* last byte moved either way: the idle clock */
    _Atomic int end;          /* enum end */
    uint64_t bytes[2];        /* by enum dir */
};

/* What one direction copies with: allocated once per worker, reused per connection. */
struct copier {
    char *buf;    /* copy = buffer, or splice's fallback; NULL until needed */
    int pipe[2];  /* copy = splice; -1 otherwise */
    int pending;  /* bytes sitting in the pipe */
    uint64_t tat; /* rate limit: theoretical arrival time of the next byte, ns */
};

/* http mode: one side's input with its read buffer. Heads and chunk-size lines are parsed
 * from the buffer; body bytes leave it first, then go straight from the socket. */
struct stream {
    char *buf;       /* HEAD_MAX bytes */
    size_t off, len; /* the unread bytes are buf[off, len) */
};

/* http mode: one forwarded request, from the front thread that sent it to the back thread
 * that relays its response and logs it. */
struct exchange {
    uint64_t start_ns, up, down; /* request body bytes; response bytes */
    char method[16], target[128], user[64];
    int head, upgrade; /* a HEAD request (no response body); asked to upgrade */
};

struct worker;
typedef void (*serve_fn)(struct worker *w, struct conn *c);

/* A worker: a front thread that takes connections from the queue and a back thread that
 * runs the upstream → client side for it. */
struct worker {
    pthread_t front, back;
    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cv;
    struct conn *conn; /* being served; what a forced stop shuts down */
    struct conn *job;  /* handed to the back thread; NULL when it is idle */
    serve_fn back_fn;  /* what the back thread runs for job */
    int quit;
    struct copier cp[2]; /* by enum dir */
    /* http mode */
    struct stream in[2];                  /* [UP] reads the client, [DOWN] the upstream */
    char *out;                            /* a rewritten request head */
    struct exchange sent_x[PIPELINE_MAX]; /* forwarded, not yet answered: a ring */
    uint64_t sent, answered;              /* counts; the ring holds sent - answered */
    int upgraded;                         /* the back thread relayed a 101 */
    int gone;                             /* the back thread is leaving: nothing to answer */
};

/* ---- config.c: proxy.ini, addresses, networks, the memory plan ------------------------ */

extern struct config cfg;

/* Loads and validates FILE into *c (then defaults for the keys it left out). Returns 0, or -1 with
 * a message "FILE:LINE: what is wrong" in err. Names in upstream and listen are resolved here. */
int config_load(struct config *c, const char *file, char *err, size_t errlen);
/* File descriptors a full load needs: sockets, pipes, the queue, a few to spare. */
long long config_fds(const struct config *c);
/* Prints what -t shows: threads, stacks, buffers, pipes, descriptors. */
void config_plan(const struct config *c, FILE *out);
/* Parses "host:port", "[v6]:port" or "*:port" (resolving names). Returns 0 or -1 with a
 * reason in err. */
int addr_parse(const char *s, struct addr *a, char *err, size_t errlen);
/* The address bytes of a (4 or 16 of them, *len says which) and its port. */
const uint8_t *addr_ip(const struct addr *a, int *len);
int addr_port(const struct addr *a);
/* Writes "1.2.3.4:80" or "[::1]:80" into buf; returns buf. */
char *addr_format(const struct addr *a, char *buf, size_t len);
/* Rewrites an IPv4-mapped IPv6 address (::ffff:1.2.3.4) as plain IPv4: done once, on accept,
 * so that the allow-list, the source hash, the PROXY header and the log all see IPv4. */
void addr_unmap(struct addr *a);
/* Parses "10.0.0.0/8", "::1" (a single host) and so on. Returns 0 or -1. */
int cidr_parse(const char *s, struct cidr *n);
/* Whether a is inside one of the n networks. */
int cidr_match(const struct cidr *list, int n, const struct addr *a);

/* ---- upstream.c: choosing an upstream, connecting, the PROXY protocol header ---------- */

/* Resolves host and connects to the first of its addresses that answers. Returns the fd, or
 * -1 with errno (EHOSTUNREACH when the name does not resolve, ETIMEDOUT on timeout). */
int upstream_dial(const char *host, int port);
/* Connects to a within timeout_s seconds. Returns the fd, blocking and prepared by
 * copy_prepare, or -1 with errno (ETIMEDOUT on timeout). */
int upstream_connect(const struct addr *a, int timeout_s);
/* Which upstream a client starts at for balance = source: stable for one address. */
unsigned upstream_hash(const struct addr *client, unsigned n);
/* Chooses an upstream for c by cfg.balance, skipping ones marked down, failing over in
 * order, and connects. Sets c->up; returns the fd, or -1 when every upstream failed. */
int upstream_open(struct conn *c);
/* Writes the PROXY protocol header (version 1 or 2) for src → dst into buf (at least 108
 * bytes) and returns its length. */
int upstream_proxy_header(int version, const struct addr *src, const struct addr *dst, char *buf);

/* ---- pool.c: the bounded queue, the workers, the graceful stop ------------------------ */

/* Creates cfg.workers workers that call serve for each connection, and returns once all of
 * them wait for work. Returns 0 or -1. */
int pool_start(serve_fn serve);
/* Hands an accepted socket to the pool. Returns 0, or -1 when the queue is full or the
 * pool is stopping (the caller closes fd). */
int pool_submit(int fd, const struct addr *peer);
/* Makes fd the upstream socket of w's connection (closing the one before, if any). Only
 * through here, so that a forced stop never shuts down an fd number already reused. */
void pool_set_upstream(struct worker *w, int fd);
/* Starts the back thread running fn(w, c); fn handles the upstream → client side. */
void pool_back_start(struct worker *w, struct conn *c, serve_fn fn);
/* Waits until the back thread has finished with c. */
void pool_back_wait(struct worker *w);
/* Stops taking connections, lets active ones finish for GRACE_SECONDS, ends the rest,
 * joins every thread. */
void pool_stop(void);
/* Connections waiting in the queue now. */
int pool_queued(void);

/* ---- copy.c: the copy loops ----------------------------------------------------------- */

/* Sets a socket's options for the copy loops: TCP_NODELAY, urgent data in line, and the
 * TICK_MS timeouts. Called on the listener (accepted sockets inherit them) and upstreams. */
void copy_prepare(int fd);
/* A worker's copier: allocated once (buffer or pipe by cfg.copy). Returns 0 or -1. */
int copy_init(struct copier *k);
/* Between connections: forgets pacing; drains bytes a failed connection left in the pipe. */
void copy_reset(struct copier *k);
void copy_free(struct copier *k);
/* Moves up to limit bytes from → to, counting them. Returns the bytes moved
 * when from reached EOF or the limit, or -1 when the connection ended (c->end says why). */
int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, uint64_t limit);
/* Sends all n bytes to fd. Returns 0, or -1 when the connection ended. */
int copy_send(struct conn *c, int to, const char *p, size_t n);
/* Copies one direction of c until EOF (then shuts down the write side of the destination)
 * or until the connection ends. */
void copy_stream(struct conn *c, struct copier *k, enum dir d);
/* The back thread's job in tcp mode and in tunnels: copy_stream upstream → client. */
void copy_down(struct worker *w, struct conn *c);
/* Receives into buf: bytes (> 0), 0 at EOF, -1 once the connection ended, or -2 when
 * TICK_MS passed with nothing to read (the caller checks its own deadlines). */
ssize_t copy_recv(struct conn *c, int fd, void *buf, size_t len);
/* Ends c for reason (if none was recorded yet) and wakes both loops. */
void conn_end(struct conn *c, enum end reason);
/* Rate limiting: ns to wait before the next read may start (0: now). */
uint64_t copy_pace_wait(const struct copier *k, uint64_t now);
/* Rate limiting: charges n bytes moved at now. */
void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate);

/* ---- http_parse.c: strict HTTP/1.1 heads, targets and chunk sizes --------------------- */

struct field {
    const char *name, *value; /* into the buffer; value without surrounding whitespace */
    size_t nlen, vlen;
};

/* A parsed head. Pointers point into the buffer it was parsed from. */
struct msg {
    const char *method, *target; /* requests */
    size_t mlen, tlen;
    int version; /* minor: HTTP/1.0 or HTTP/1.1 */
    int status;  /* responses */
    struct field field[HTTP_MAX_FIELDS];
    int nfields;
    int64_t length; /* Content-Length, -1 without */
    int chunked, close, keep_alive, upgrade;
    const struct field *host, *auth, *upgrade_to; /* the last seen of each */
    int nauth;                                    /* Proxy-Authorization fields seen */
};

/* Finds the end of a head in buf[0, len), scanning on from *scanned. Returns the head's
 * length with its final CRLF CRLF, 0 if more bytes are needed, or -400 on a NUL, a bare CR or
 * a bare LF. */
long http_head_end(const char *buf, size_t len, size_t *scanned);
/* Parses a whole head (request if request, else response) into m. Returns 0, or the status
 * to refuse it with: 400, 431, 505 for requests; 502 for responses. */
int http_parse(const char *buf, size_t len, struct msg *m, int request);
/* Parses the field line p[0, len) "name: value" (a header field or a trailer) into f.
 * Returns 0 or -1. */
int http_field(const char *p, size_t len, struct field *f);
/* Parses a chunk-size line without its CRLF (hex size, optional extensions). 0 or -1. */
int http_chunk_size(const char *line, size_t len, uint64_t *size);
/* Parses "host[:port]" or "[v6][:port]" into host (cap bytes) and port; the port defaults
 * to def, or is required when def is 0. Returns 0 or -1. */
int http_authority(const char *s, size_t len, char *host, size_t cap, int *port, int def);
/* Whether s[0, len) equals word, ignoring case. */
int http_is(const char *s, size_t len, const char *word);
/* Whether the comma-separated list holds item, ignoring case. */
int http_list_has(const char *list, size_t len, const char *item, size_t ilen);

/* ---- http.c: HTTP mode ---------------------------------------------------------------- */

/* Serves one client connection in http mode: every request parsed and authenticated. */
void http_serve(struct worker *w, struct conn *c);
/* Relays a chunked body from s (what is buffered, then the socket from) to `to`, checking
 * every size line and trailer; the bytes go on exactly as they came. Returns 0 or -1. */
int http_relay_chunked(struct conn *c, struct copier *k, struct stream *s, int from, int to);
/* Allocates w's http buffers. Returns 0 or -1. */
int http_init(struct worker *w);
void http_free(struct worker *w);
/* Writes the proxy's own response for status (reason as a text body; for 407 the Basic
 * challenge, for 503 Retry-After) into buf and returns its length. */
int http_error(char *buf, size_t cap, int status, int keep);

/* ---- auth.c: Proxy-Authorization and CONNECT ports ------------------------------------ */

enum auth { AUTH_OK, AUTH_MISSING, AUTH_MALFORMED, AUTH_BAD, AUTH_MAX };
extern const char *const auth_names[AUTH_MAX];

/* Checks the request's Proxy-Authorization against [users] (AUTH_OK when there are none)
 * and copies the user name into user. */
enum auth auth_check(const struct msg *m, char *user, size_t cap);
/* Decodes strict base64 (padding required, no whitespace, zero pad bits) into out. Returns
 * the decoded length, or -1. */
int auth_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap);
/* Whether CONNECT may reach port ([access] connect_ports). */
int auth_port_allowed(int port);

/* ---- stats.c: counters, /metrics, the log --------------------------------------------- */

enum refusal { REFUSED_QUEUE_FULL, REFUSED_NOT_ALLOWED };
#define DURATION_BUCKETS 8
#define HTTP_METHODS     9
extern const char *const method_names[HTTP_METHODS]; /* GET ... CONNECT, "other" last */
struct stats {
    _Atomic uint64_t accepted, active, busy, accept_errors;
    _Atomic uint64_t refused[2]; /* by enum refusal */
    _Atomic uint64_t bytes[2];   /* by enum dir */
    _Atomic uint64_t ended[END_MAX];
    _Atomic uint64_t duration[DURATION_BUCKETS]; /* per bucket, not cumulative */
    _Atomic uint64_t duration_us;                /* sum */
    _Atomic uint64_t methods[HTTP_METHODS];      /* http: requests by method */
    _Atomic uint64_t classes[6];                 /* http: responses by status class, 1-5 */
    _Atomic uint64_t auth_failures[AUTH_MAX];    /* http: by enum auth */
    _Atomic uint64_t tunnels, upgrades;          /* http: CONNECT tunnels, 101 upgrades */
};
extern struct stats stats;
extern const char *const end_names[END_MAX];

/* Starts the admin thread serving GET /metrics on the listening socket fd. Returns 0/-1. */
int stats_start(int fd);
/* Stops the admin thread (fd is shut down and closed). */
void stats_stop(void);
/* Returns the Prometheus text of every counter (malloc'd, caller frees), or NULL. */
char *stats_render(size_t *len);
/* Counts a finished connection and, in tcp mode, writes its access log line. */
void stats_conn_done(const struct conn *c);
/* http: counts a request's method. */
void stats_method(const char *method, size_t len);
/* http: counts a response's status and writes the request's access log line. */
void stats_request(const struct conn *c, const struct exchange *x, int status);

/* Opens the log: "-" is stderr, "off" disables, else a file opened for append. Also used
 * on SIGHUP to reopen. Returns 0 or -1 with errno. */
int log_open(const char *where);
/* Writes one line (a timestamp, the message, a newline) with one write(2). */
void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes len bytes as they are, with one write(2). */
void log_raw(const char *buf, size_t len);

/* Closes fd, keeping errno for the caller: `return close_failed(fd);` ends a failed setup. */
static inline int close_failed(int fd) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
}

/* Monotonic time in ns: every duration and deadline uses it. */
static inline uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#endif
