/* proxy.h — the table of contents: every shared struct and constant, then the functions each
 * .c file offers, grouped by file. Read this first; each function's contract is here. */
#ifndef PROXY_H
#define PROXY_H

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>

#define PROXY_VERSION "0.1.0"

/* Build-time limits; override with -D. */
#ifndef MAX_UPSTREAMS
#define MAX_UPSTREAMS 32
#endif
#ifndef MAX_ALLOW
#define MAX_ALLOW 64 /* [access] allow networks */
#endif
#ifndef STACK_SIZE
#define STACK_SIZE (256 * 1024) /* per thread; getaddrinfo needs more than 32 KiB */
#endif
#ifndef TICK_MS
#define TICK_MS 1000 /* a blocked read or write wakes this often to check idle_timeout */
#endif
#ifndef DOWN_SECONDS
#define DOWN_SECONDS 10 /* an upstream that failed a connect is skipped this long */
#endif
#ifndef GRACE_SECONDS
#define GRACE_SECONDS 10 /* SIGTERM: how long active connections may finish */
#endif

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
    char name[64]; /* "host:port" as configured: log lines and metric labels */
    struct addr addr;
    _Atomic uint64_t down_until; /* monotonic ns; skipped until then unless all are down */
    _Atomic uint64_t connects, failures;
};

enum mode { MODE_TCP, MODE_HTTP };
enum balance { BALANCE_SOURCE, BALANCE_ROUNDROBIN };
enum copy_mode { COPY_SPLICE, COPY_BUFFER };
enum send_proxy { SEND_PROXY_OFF, SEND_PROXY_V1, SEND_PROXY_V2 };

/* Everything proxy.ini says; filled once by config_load, read-only while serving
 * (except the health counters inside each upstream). */
struct config {
    const char *file;
    struct addr listen, stats_listen; /* stats_listen.len == 0: no admin listener */
    int mode, balance, copy, send_proxy;
    struct upstream up[MAX_UPSTREAMS];
    int nup;
    int workers, queue, buffer_size;
    int connect_timeout, idle_timeout; /* seconds; idle_timeout 0 = never */
    int rate_limit;                    /* bytes/s per direction, 0 = unlimited */
    char log[256];                     /* "-", "off" or a path */
    struct cidr allow[MAX_ALLOW];
    int nallow;
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

/* A worker: a front thread that takes connections from the queue and a back thread that
 * runs the upstream → client loop for it. */
struct worker {
    pthread_t front, back;
    pthread_mutex_t mu; /* guards the fields below */
    pthread_cond_t cv;
    struct conn *conn; /* being served; what a forced stop shuts down */
    struct conn *job;  /* handed to the back thread; NULL when it is idle */
    int quit;
    struct copier cp[2]; /* by enum dir */
};

/* ---- config.c: proxy.ini, addresses, networks, the memory plan ------------------------ */

extern struct config cfg;

/* Loads and validates FILE into *c (defaults first). Returns 0, or -1 with a message
 * "FILE:LINE: what is wrong" in err. Names in upstream and listen are resolved here. */
int config_load(struct config *c, const char *file, char *err, size_t errlen);
/* File descriptors a full load needs: sockets, pipes, the queue, a few to spare. */
long long config_fds(const struct config *c);
/* Prints what -t shows: threads, stacks, buffers, pipes, descriptors. */
void config_plan(const struct config *c, FILE *out);
/* Parses "host:port", "[v6]:port" or "*:port" (resolving names). Returns 0 or -1 with a
 * reason in err. */
int addr_parse(const char *s, struct addr *a, char *err, size_t errlen);
/* Writes "1.2.3.4:80" or "[::1]:80" into buf; returns buf. */
char *addr_format(const struct addr *a, char *buf, size_t len);
/* Rewrites an IPv4-mapped IPv6 address (::ffff:1.2.3.4) as plain IPv4. */
void addr_unmap(struct addr *a);
/* Parses "10.0.0.0/8", "::1" (a single host) and so on. Returns 0 or -1. */
int cidr_parse(const char *s, struct cidr *n);
/* Whether a is inside one of the n networks. */
int cidr_match(const struct cidr *list, int n, const struct addr *a);

/* ---- upstream.c: choosing an upstream, connecting, the PROXY protocol header ---------- */

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

typedef void (*serve_fn)(struct worker *w, struct conn *c);

/* Creates cfg.workers workers that call serve for each connection. Returns 0 or -1. */
int pool_start(serve_fn serve);
/* Hands an accepted socket to the pool. Returns 0, or -1 when the queue is full or the
 * pool is stopping (the caller closes fd). */
int pool_submit(int fd, const struct addr *peer);
/* Makes fd the upstream socket of w's connection (closing the one before, if any). Only
 * through here, so that a forced stop never shuts down an fd number already reused. */
void pool_set_upstream(struct worker *w, int fd);
/* Relays both directions of c (front: client → upstream, back: the other) until both end. */
void pool_relay(struct worker *w, struct conn *c);
/* Starts the back thread copying upstream → client for c. */
void pool_back_start(struct worker *w, struct conn *c);
/* Waits until the back thread has finished with c. */
void pool_back_wait(struct worker *w);
/* Stops taking connections, lets active ones finish for GRACE_SECONDS, ends the rest,
 * joins every thread. */
void pool_stop(void);
/* Connections waiting in the queue now. */
int pool_queued(void);

/* ---- copy.c: the copy loops ----------------------------------------------------------- */

/* Prepares a fresh connection's sockets: TCP_NODELAY and the TICK_MS timeouts. */
void copy_prepare(int fd);
/* A worker's copier: allocated once (buffer or pipe by cfg.copy). Returns 0 or -1. */
int copy_init(struct copier *k);
/* Between connections: forgets pacing; replaces a pipe that still holds bytes. */
void copy_reset(struct copier *k);
void copy_free(struct copier *k);
/* Moves up to limit bytes from → to, counting them in direction d. Returns the bytes moved
 * when from reached EOF or the limit, or -1 when the connection ended (c->end says why). */
int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, enum dir d, uint64_t limit);
/* Sends all n bytes to fd. Returns 0, or -1 when the connection ended. */
int copy_send(struct conn *c, int to, const char *p, size_t n);
/* Copies one direction of c until EOF (then shuts down the write side of the destination)
 * or until the connection ends. */
void copy_stream(struct conn *c, struct copier *k, enum dir d);
/* Ends c for reason (if none was recorded yet) and wakes both loops. */
void conn_end(struct conn *c, enum end reason);
/* Rate limiting: ns to wait before the next read may start (0: now). */
uint64_t copy_pace_wait(const struct copier *k, uint64_t now);
/* Rate limiting: charges n bytes moved at now. */
void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate);

/* ---- stats.c: counters, /metrics, the log --------------------------------------------- */

#define DURATION_BUCKETS 8
struct stats {
    _Atomic uint64_t accepted, active, busy, accept_errors;
    _Atomic uint64_t refused_queue, refused_acl;
    _Atomic uint64_t bytes[2]; /* by enum dir */
    _Atomic uint64_t ended[END_MAX];
    _Atomic uint64_t duration[DURATION_BUCKETS]; /* per bucket, not cumulative */
    _Atomic uint64_t duration_us;                /* sum */
};
extern struct stats stats;
extern const char *const end_names[END_MAX];

/* Starts the admin thread serving GET /metrics on the listening socket fd. Returns 0/-1. */
int stats_start(int fd);
/* Stops the admin thread (fd is shut down and closed). */
void stats_stop(void);
/* Returns the Prometheus text of every counter (malloc'd, caller frees), or NULL. */
char *stats_render(size_t *len);
/* Counts a finished connection and writes its access log line. */
void stats_conn_done(const struct conn *c);

/* Opens the log: "-" is stderr, "off" disables, else a file opened for append. Also used
 * on SIGHUP to reopen. Returns 0 or -1 with errno. */
int log_open(const char *where);
/* Writes one line (a timestamp, the message, a newline) with one write(2). */
void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes len bytes as they are, with one write(2). */
void log_raw(const char *buf, size_t len);

/* Monotonic time in ns: every duration and deadline uses it. */
static inline uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

#endif
