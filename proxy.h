/* proxy.h — the table of contents. The files are layers; each calls only the layers below it
 * (`make layers` checks this from the object files):
 *
 *     proxy.c              main: options, start, signals, stop
 *     plan.c               the plan -t prints: memory and fds at full load, the fd limit
 *     acceptor.c           the acceptor thread: new clients; idle ones into the room and out
 *     tcp.c   http.c       the two modes: what a worker does with a connection
 *     http_exchange.c      a request's exchange with its server; tunnels and upgrades
 *     http_head.c          the heads forwarded both ways: hop-by-hop fields, Via
 *     http_io.c            HTTP messages between sockets: heads, bodies, error replies
 *     auth.c  http_parse.c http's pure helpers: credentials; strict heads
 *     pool.c               the queue, the worker pairs, the back thread, the mailbox, the stop
 *     upstream.c           choosing an upstream (balance, failover) and connecting to it
 *     copy.c               the copy loops: splice or buffer, half-close, idle clock, rate limit
 *     room.c               the waiting room: when a connection leaves its worker, where it waits
 *     end.c                a connection's end: why, the shutdowns that wake it, the close
 *     admin.c              the /metrics listener
 *     proxy_protocol.c     the PROXY header: sent upstream, read from a trusted balancer
 *     limits.c             what each client may take: connections, requests per second
 *     stats.c              counters, gauges, the log
 *     running.c            the config in force: snapshots, reload, the upstreams' health
 *     config.c             proxy.ini: the keys, their values, the checks across them
 *     net.c                sockets, addresses, networks, lists of names and ports
 *
 * This file lists them bottom-up: each section's structs and the contract of every function
 * its file offers, here and only here (a comment at a definition says how or why, never the
 * contract again). Read it first. */
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
#define MAX_UPSTREAMS     32
#define MAX_USERS         256
#define HEAD_MAX          16384  /* bytes in an HTTP request or response head: 16 KiB */
#define HTTP_MAX_FIELDS   100    /* header fields in one head */
#define AUTH_FAILURES_MAX 3      /* 407s one client connection may get; the last one closes it */
#define STACK_SIZE        262144 /* bytes per thread (256 KiB); getaddrinfo needs > 32 KiB */
#define TICK_MS           1000   /* ms: a blocked send checks its deadline this often */
#define QUIET_MS          10  /* ms: while others wait, this quiet on its client: nothing to do */
#define DIAL_ADDRESSES    3   /* a name's addresses tried in turn, sharing connect_timeout */
#define LOOKUPS_MAX       256 /* name lookups at once, each a thread; beyond: EAGAIN (502) */
#define DOWN_SECONDS      10  /* an upstream that failed a connect is skipped this long */
#define GRACE_SECONDS     10  /* SIGTERM: how long active connections may finish */

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

/* ==== net.c: sockets, addresses, networks ============================================== */

struct addr {
    struct sockaddr_storage sa;
    socklen_t len; /* 0: not set */
};

struct cidr {
    int family; /* AF_INET or AF_INET6 */
    int bits;
    uint8_t net[16];
};

/* Opens a listening socket on a (SO_REUSEPORT too if asked: several processes may then listen on
 * the same address and the kernel spreads connections over them). Returns the fd or -1 with
 * errno. */
int net_listen(const struct addr *a, int reuse_port);
/* The local address of fd (a listener's port 0 becomes the port the kernel chose), IPv4-mapped
 * addresses unmapped. Returns 0, or -1 with errno. */
int net_local(int fd, struct addr *a);
/* Sets what every relayed socket needs: TCP_NODELAY and urgent data in line. */
void net_prepare(int fd);
/* Makes every blocking read and write on fd give up after ms with EAGAIN: the tick at which a
 * blocked thread checks its deadlines. Accepted sockets inherit it from their listener. */
void net_set_tick(int fd, int ms);
/* Whether this host owns a's IP (any port): a socket can bind to it. */
int net_owns(const struct addr *a);
/* Starts connecting to a (non-blocking): done or failed once fd is writable, then net_connect_done.
 * Returns the fd, or -1 with errno (a connect refused at once, no fds). */
int net_connect_start(const struct addr *a);
/* Finishes a connect once fd is writable: its result, and the socket made blocking and prepared
 * (net_prepare) with a tick of tick_ms. Returns 0, or -1 with the connect's errno; the caller
 * closes fd either way when it fails. */
int net_connect_done(int fd, int tick_ms);
/* A name lookup running on a thread of its own (net.c). */
struct lookup;
/* errno when a name did not resolve: one no connect returns, so that an answer can tell a
 * failed lookup from an unreachable host. */
#define E_LOOKUP ENXIO
/* Resolves host:port into at most max addresses, in the resolver's order: an address at once
 * (returns how many); a name on a thread of its own (returns 0 with *l set: wait for net_lookup_fd,
 * then net_lookup_take, or net_lookup_drop). -1 with errno (E_LOOKUP, EAGAIN: too many lookups at
 * once). */
int net_resolve(const char *host, int port, struct addr *out, int max, struct lookup **l);
/* The fd that becomes readable once l is done. */
int net_lookup_fd(const struct lookup *l);
/* Takes the addresses of l, which is done (its fd was readable): at most max into out, and lets go
 * of l. Returns how many, or -1 with errno (E_LOOKUP: the name did not resolve). */
int net_lookup_take(struct lookup *l, struct addr *out, int max);
/* Lets go of l, done or not: its thread frees it if it still runs. */
void net_lookup_drop(struct lookup *l);

/* Parses "host:port", "[v6]:port" or "*:port" (resolving names). Returns 0, or -1 with a
 * reason in err. */
int addr_parse(const char *s, struct addr *a, char *err, size_t errlen);
/* The address bytes of a (4 or 16 of them; *len says which). */
const uint8_t *addr_ip(const struct addr *a, int *len);
/* The port of a. */
int addr_port(const struct addr *a);
/* Writes "1.2.3.4:80" or "[::1]:80" into buf; returns buf. */
char *addr_format(const struct addr *a, char *buf, size_t len);
/* Rewrites an IPv4-mapped IPv6 address (::ffff:1.2.3.4) as plain IPv4: done once, on accept,
 * so that the allow-list, the source hash, the PROXY header and the log all see IPv4. */
void addr_unmap(struct addr *a);
/* Whether a is a loopback, link-local or unspecified address (127.0.0.0/8, 169.254.0.0/16,
 * 0.0.0.0/8, ::1, fe80::/10, ::), IPv4-mapped forms included. */
int addr_is_local(const struct addr *a);
/* Parses "10.0.0.0/8", "::1" (a single host) and so on. Returns 0 or -1. */
int cidr_parse(const char *s, struct cidr *n);
/* Whether a is inside one of the count networks of list. */
int cidr_match(const struct cidr *list, int count, const struct addr *a);

/* A list of networks of any length, read from the config. */
struct nets {
    struct cidr *v;
    int n, cap;
};
/* Appends n to l. Returns 0, or -1 out of memory. */
int nets_add(struct nets *l, const struct cidr *n);
/* Whether a is in one of l's networks. */
int nets_match(const struct nets *l, const struct addr *a);
void nets_free(struct nets *l);
/* Whether port is in ports, a bitmap of 65536 bits: a config's connect_ports (CONNECT) or
 * forward_ports (absolute-form requests). */
int ports_match(const uint8_t *ports, int port);

/* A set of host names of any size: "example.com" matches that name, ".example.com" it and
 * every name under it. Case and a trailing dot do not matter. A hash table, so that a list of
 * thousands costs a handful of lookups per name matched, not a scan. */
struct names {
    char **table; /* mask + 1 slots, each a name (folded) or NULL */
    size_t mask;
    int n;
};
/* Adds name (it must not be empty nor over 255 bytes). Returns 0, or -1. */
int names_add(struct names *l, const char *name);
/* Whether name is in l, or under a ".suffix" of it. */
int names_match(const struct names *l, const char *name);
void names_free(struct names *l);

/* ==== config.c: proxy.ini ============================================================== */

/* One configured upstream. */
struct upstream {
    char name[272]; /* "host:port" as configured: log lines and metric labels */
    struct addr addr;
    struct upstream_state *st; /* its health: set once the config is in force */
};

enum mode_name { MODE_TCP, MODE_HTTP };
enum balance { BALANCE_SOURCE, BALANCE_ROUNDROBIN };
enum copy_mode { COPY_SPLICE, COPY_BUFFER };
enum send_proxy { SEND_PROXY_OFF, SEND_PROXY_V1, SEND_PROXY_V2 };
enum local_destinations { LOCAL_AUTO, LOCAL_ALLOW, LOCAL_DENY };
enum limit_by { LIMIT_BY_ADDRESS, LIMIT_BY_USER };

struct user {
    char name[64], pass[128];
};

/* Everything proxy.ini says; filled by config_load, read-only once in force. cfg is the config
 * loaded at start: the keys only a restart changes (the pool, the listeners, the mode) are read
 * there, always. Every other key is read from a snapshot (config_hold): the one a connection
 * holds (c->cfg), or the newest. */
struct config {
    const char *file;
    _Atomic int refs;                 /* holders of this snapshot: config_hold, config_drop */
    uint64_t generation;              /* 1: the config loaded at start; each reload, one more */
    struct addr listen, stats_listen; /* stats_listen.len == 0: no admin listener */
    int mode, balance, copy, send_proxy, reuse_port;
    struct upstream up[MAX_UPSTREAMS];
    int nup;
    int workers, queue, buffer_size;
    int max_connections;               /* client connections open at once: busy, queued, parked */
    int park_after;                    /* ms quiet before a connection parks; 0 = never */
    int time_slice;                    /* ms a connection may keep its worker while others
                                          wait; 0 = no turns */
    int connect_timeout, idle_timeout; /* seconds; idle_timeout 0 = never */
    int keepalive_timeout;             /* http: seconds idle between requests; 0 = never */
    int header_timeout;                /* http: seconds to receive a request head */
    int min_rate;      /* http: bytes/s a head or a body must average from its first byte (after
                          a free first second); 0 = none. At most rate_limit / 2 once loaded */
    int head_buffers;  /* http: request heads read in part that may wait parked */
    int rate_limit;    /* bytes/s per direction, 0 = unlimited */
    char log[256];     /* "-", "off" or a path */
    int log_line;      /* the line that set log: where an error about the file points */
    struct nets allow; /* clients that may connect at all */
    struct nets trusted_proxies; /* clients whose PROXY header names the real client */
    struct destinations {
        struct names names;
        struct nets nets;
    } deny_destinations, allow_destinations; /* where requests may go; allow empty: anywhere */
    /* [limits]: what each client may take (limits.c); 0: no limit */
    int connections_per_client, requests_per_second, request_burst;
    int limit_by;       /* enum limit_by: what requests_per_second counts by */
    int clients;        /* the table's entries: clients tracked at once (fixed at start) */
    struct nets exempt; /* clients no limit applies to */
    uint8_t connect_ports[65536 / 8]; /* a bit per port CONNECT may reach */
    uint8_t forward_ports[65536 / 8]; /* a bit per port absolute-form requests may reach */
    int local_destinations;           /* LOCAL_ALLOW or LOCAL_DENY once loaded: what auto chose */
    int local_auto;                   /* local_destinations was auto: -t says so */
    char realm[64];
    struct user users[MAX_USERS]; /* any user turns Basic auth on */
    int nusers;
};

extern struct config cfg;

/* Loads and validates FILE into *c (then defaults for the keys it left out). Returns 0, or -1
 * with "FILE:LINE: what is wrong" in err (nothing is left allocated). Names in upstream and
 * listen are resolved here. */
int config_load(struct config *c, const char *file, char *err, size_t errlen);
/* As config_load, for a reload: the keys only a restart changes keep keep's values (the running
 * config's), and those the file changes are named in note, comma-separated. A change of mode is
 * an error: other keys' checks depend on it. */
int config_load_keeping(struct config *c, const char *file, const struct config *keep, char *note,
                        size_t notelen, char *err, size_t errlen);
/* Whether c's log opens as start-up will open it (appending, created if missing), without
 * creating it. Returns 0, or -1 with "FILE:LINE: log = PATH: cannot open: why" in err. */
int config_check_log(const struct config *c, char *err, size_t errlen);
/* Frees the lists c holds (not c itself). */
void config_free(struct config *c);

/* ==== running.c: the config in force =================================================== */

/* What belongs to an upstream and not to a config: its health and its counters. A reload keeps
 * them for every upstream it still lists (by name); running.c hands them out. */
struct upstream_state {
    char name[272];
    int holders;                 /* (running.c's lock) snapshots that list it; 0: free */
    _Atomic uint64_t down_until; /* monotonic ns; skipped until then unless all are down */
    _Atomic uint64_t connects, failures;
};

/* A reload publishes a new snapshot; one is never changed once published. The rule for
 * freeing one: each holder has a reference (the pointer to the newest, and each connection,
 * from accept to close; an http connection moves to the newest at each request), and the last
 * to drop it frees it. cfg has a reference nobody drops. */

/* The newest snapshot, held: the caller drops it. */
struct config *config_hold(void);
/* Drops a reference to c; the last one frees it. */
void config_drop(struct config *c);
/* *c, or the newest if a reload came since: held in its place (the old one dropped). */
void config_refresh(struct config **c);
/* Puts cfg in force (its upstreams' health); before any thread reads it. */
void config_start(void);
/* Loads cfg.file again, validates it as -t does, and puts it in force. Keys only a restart
 * changes keep their running values: those the file changes are named in note. Returns 0, or
 * -1 with what is wrong in err (the running config stays). */
int config_reload(char *err, size_t errlen, char *note, size_t notelen);
/* The generation in force: 1 at start, one more for each reload. */
uint64_t config_generation(void);

/* ==== a connection: the record every layer from stats.c up works on ==================== */

/* Why a connection ended; the first reason recorded wins. */
enum end {
    END_NONE,
    END_DONE,        /* both directions reached EOF */
    END_IDLE,        /* no byte either way for idle_timeout */
    END_CLIENT,      /* read or write error on the client socket */
    END_UPSTREAM,    /* read or write error on the server socket (its log word: upstream_error) */
    END_NO_UPSTREAM, /* every upstream refused or timed out */
    END_STOPPED,     /* closed by the graceful stop: idle between http requests when it
                        began, or still open when it ran out of time */
    END_SLOW,        /* a request head or a body came slower than min_rate */
    END_REFUSED,     /* from a trusted balancer: its PROXY header was bad, or the client it
                        named is not allowed or over a per-client limit */
    END_MAX
};
enum dir { UP, DOWN }; /* UP: client → server (upstream); DOWN: server → client */

/* What an http request's access log line says. It is kept in the connection, not on a worker's
 * stack, because a CONNECT tunnel's line is written when the tunnel ends, and a tunnel may park
 * and end on another worker. */
struct request_log {
    uint64_t start_ns;
    uint64_t bytes0[2]; /* c->bytes when it began: what it moved is counted from there */
    int status;         /* the last status line the client got; 0: none (logged "-") */
    int logged;         /* its access log line is written */
    const char *error;  /* why the proxy answered it itself (a word of http.c's); NULL: not */
    char method[16], target[128], user[64];
};

/* One client connection, from accept to close. It lives in pool.c's slab, not on a worker's
 * stack, and a worker's scratch (struct worker) is kept apart, so that a connection's state
 * does not depend on the worker serving it: it can park between requests (room.c's
 * waiting room) and come back to another worker. While it is parked the acceptor thread alone
 * touches it. Who writes what while it is served: */
struct conn {
    int client;                    /* pool_submit, then read-only */
    int server;                    /* the socket to the server it goes to: a configured
                                      upstream, or in http the host a request names. Set by
                                      pool_set_server, under the worker's mu; or the waiting
                                      room while parked; -1: none */
    struct addr peer;              /* pool_submit, then read-only (behind: the first turn) */
    struct config *cfg;            /* the config it is served by, held (config_hold) from
                                      pool_submit to retire; an http connection's front thread
                                      moves it to the newest at a request's start. The waiting
                                      room reads it while c is parked */
    const struct upstream *chosen; /* the front thread: the configured upstream; NULL: none */
    uint64_t start_ns;             /* pool_submit: when it was accepted */
    _Atomic uint64_t last_ns;      /* either thread: the last byte moved, the idle clock */
    _Atomic int last_dir;          /* either thread: which way the last byte sent went (enum
                                      dir): whom a relay waits for (room_due) */
    _Atomic int end;               /* any thread, through end.c: enum end, first wins */
    uint64_t bytes[2];             /* by enum dir: the one thread sending that way now */
    int server_apart;              /* the front thread: a failure of the server connection
                                      ends only it (http, between tunnels), not c */
    _Atomic int server_failed;     /* copy.c, when server_apart: the server connection
                                      failed; pool_set_server clears it */
    int auth_failures;             /* http, the front thread: 407s sent; pool_submit zeroes it */
    int behind;                    /* pool_submit: from a trusted balancer; its first turn reads
                                      the PROXY header and sets peer (pool.c) */
    int entry;                     /* pool_submit (or the first turn, behind): its address's
                                      entry in limits.c's table; -1: not counted */
    int barred;                    /* the front thread: why its last dial was refused (enum
                                      reach), when it was */
    char route[272];        /* http, the front thread: where c->server goes: "host:port", "=" (the
                               configured upstreams), "" (nowhere) */
    struct request_log req; /* http, the front thread: the request being served */
    /* Taking turns on a worker, and parking. */
    int relay;              /* the front thread: bytes are relayed raw both ways (tcp mode, a
                               tunnel, an upgrade); else c parks between http requests */
    int turns;              /* pool.c: times a worker took c (1 while its first worker has it) */
    uint8_t eof[2];         /* by enum dir, the thread copying that way: EOF passed on; a parked
                               relay does not watch that direction */
    uint64_t head_deadline; /* http, the front thread: a request head must be whole by then
                               (the earlier of head_cap and its min_rate); 0: no head in
                               progress. The waiting room reads it too: room_deadline */
    uint64_t head_cap;      /* http, the front thread: header_timeout's bound for this head */
    uint64_t head_first;    /* http, the front thread: when its first byte came; 0: none yet */
    uint64_t head_since;    /* http, the front thread: when the next request began, for its
                               log line: accept for the first; for the first of a later turn,
                               when c went back to the queue (its bytes woke it); else its
                               first byte (head_done); 0: not known yet */
    char *stash;            /* http, the front thread: a head read in part, or a request whose
                               dial left its worker, carried while c is parked (a buffer of
                               pool.c's; retire gives it back); NULL: none */
    size_t stash_len;
    struct dial *dial; /* the front thread: the server connection being made (upstream.c),
                          which c may leave its worker in; the waiting room watches its fd */
    struct rate {
        uint64_t from;  /* when the body's clock started; 0: no body is timed */
        uint64_t bytes; /* read since */
    } rate[2];          /* by enum dir, the thread reading that body: min_rate (copy.c) */
    uint64_t queued_ns; /* pool.c: when c last went into the queue (accepted, or woken) */
    struct seat *seats; /* pool.c, while a worker has c: that worker's two seats, by the enum
                           dir each copies in a relay (UP: the front thread, DOWN: the back);
                           NULL otherwise */
    uint64_t slice_end; /* pool.c, when a worker takes c: its turn ends then if others wait */
    _Atomic int awake;  /* copy.c: c's copy loops that are not waiting for bytes (nor done) */
    _Atomic int leave;  /* room.c (room_ask_leave), first writer wins: enum leave, why c's loops
                           leave their worker; pool.c clears it when a worker takes c */
    /* The waiting room's own, while c is parked (room.c, on the acceptor thread): */
    uint64_t held_until; /* http, the front thread: got a 429 for its rate; parked, its client
                            is not read until then (the waiting room's clock) */
    struct conn *next;   /* in the pool's mailbox, on its way to the waiting room */
    int slot;            /* its place in the waiting room's heap; -1: not in it */
    uint64_t deadline;   /* monotonic ns: room_deadline when it parked; UINT64_MAX: none */
    struct watch {
        struct conn *c;
        int fd;
    } watch[2]; /* by enum dir, what epoll reports: the socket read for that direction */
};

/* ==== stats.c: counters, gauges, the log =============================================== */

/* Why a client was turned away at once (by the acceptor, or after its PROXY header). */
enum refusal {
    REFUSED_NOT_ALLOWED,     /* not in [access] allow */
    REFUSED_MAX_CONNECTIONS, /* max_connections open */
    REFUSED_PER_CLIENT,      /* connections_per_client open from its address */
    REFUSED_RATE,            /* tcp mode: a new connection over requests_per_second */
    REFUSED_PROXY_HEADER,    /* from a trusted balancer, with no valid PROXY header */
    REFUSED_MAX
};
/* The per-client limits, for the counts of what they refused. */
enum limit { LIMIT_CONNECTIONS, LIMIT_RATE, LIMIT_MAX };
#define HISTOGRAM_BUCKETS 8
/* A histogram of durations: counts per bucket (the last is +Inf), not cumulative. */
struct histogram {
    const double *le; /* the HISTOGRAM_BUCKETS - 1 upper bounds, in seconds */
    _Atomic uint64_t count[HISTOGRAM_BUCKETS];
    _Atomic uint64_t sum_us;
};
/* The counters every mode shares. Gauges are published here by the layer that owns them
 * (pool.c: queued, waiting, busy, parked), so that reading them calls nothing above. */
struct stats {
    _Atomic uint64_t accepted, active, busy, queued, parked, accept_errors;
    _Atomic uint64_t waiting;  /* pool.c: queued connections no idle worker is about to take:
                                  while it is above 0, connections take turns (room_due) */
    _Atomic uint64_t stopping; /* pool.c: the stop has begun: http connections end at their
                                  next request boundary (room_due, http_exchange.c) */
    _Atomic uint64_t parks, wakeups, room_timeouts; /* the waiting room's traffic */
    _Atomic uint64_t turns; /* connections that left their worker because their slice was over */
    _Atomic uint64_t refused[REFUSED_MAX]; /* by enum refusal */
    _Atomic uint64_t limited[LIMIT_MAX];   /* limits.c: connections and requests refused */
    _Atomic uint64_t clients;              /* limits.c: entries of its table in use */
    _Atomic uint64_t clients_forgotten;    /* limits.c: entries reused for another client */
    _Atomic uint64_t bytes[2];             /* by enum dir */
    _Atomic uint64_t ended[END_MAX];
    _Atomic uint64_t reloads[2]; /* proxy.c: SIGHUP reloads, put in force [0] or refused [1] */
    struct histogram duration;   /* accept to close */
    struct histogram queue_wait; /* into the queue (accepted or woken) to a worker */
};
extern struct stats stats;
extern const char *const end_names[END_MAX];
extern const char *const refusal_texts[REFUSED_MAX]; /* for the log */

/* Writes a mode's own metric families (see metric_*). */
typedef void (*render_fn)(FILE *f);

/* Counts a closed connection: its end reason and its duration. It stays active until pool.c
 * has its record back. */
void stats_conn_done(const struct conn *c);
/* Counts one duration of ns into h. */
void stats_observe(struct histogram *h, uint64_t ns);
/* Returns the Prometheus text of every counter, with more's families (may be NULL) among
 * them: malloc'd, the caller frees; NULL on failure. */
char *stats_render(render_fn more, size_t *len);
/* A family of one sample. */
void metric_one(FILE *f, const char *name, const char *type, const char *help, uint64_t v);
/* A family of n samples that differ in one label: name{label="keys[i]"} v[i]. */
void metric_family(FILE *f, const char *name, const char *type, const char *help, const char *label,
                   const char *const *keys, _Atomic uint64_t *v, int n);

/* Opens the log: "-" is stderr, "off" disables, else a file opened for append. Also used
 * on SIGHUP to reopen. Returns 0 or -1 with errno. */
int log_open(const char *where);
/* Writes one line (a timestamp, the message, a newline) with one write(2). */
void log_line(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Writes len bytes as they are, with one write(2). */
void log_raw(const char *buf, size_t len);
/* Logs a client turned away (peer NULL: accept itself failed), at most one line a second: a
 * flood of refusals must not flood the log too. */
void log_refused(const char *why, const struct addr *peer);

/* ==== limits.c: what each client may take ============================================== */

/* Makes the table of clients entries (cfg.clients): once, before any client. 0 or -1. */
int limits_start(int clients);
/* A new connection from peer, by cf's limits: counted against its address (*entry, to give to
 * limits_leave once it closes), or refused. With is_request (tcp mode) it is also a request
 * for requests_per_second. An exempt client is not counted (*entry -1). Returns -1 when it may
 * come in, else the enum refusal that turns it away (counted). */
int limits_admit(const struct config *cf, const struct addr *peer, int is_request, int *entry);
/* The connection limits_admit counted (entry; -1: none) has closed. */
void limits_leave(int entry);
/* One http request from peer, authenticated as user ("" or NULL: none), by cf's limits.
 * Returns 0 when it may go on, else the whole seconds until it would (Retry-After). */
int limits_request(const struct config *cf, const struct addr *peer, const char *user);
/* Prints what -t shows of the limits: their values, the table's memory. */
void limits_plan(const struct config *c, FILE *out);

/* ==== proxy_protocol.c: the PROXY protocol header ====================================== */

/* Writes the PROXY protocol header (version 1 or 2) for src → dst into buf (at least 108
 * bytes) and returns its length. */
int proxy_protocol_write(int version, const struct addr *src, const struct addr *dst, char *buf);
/* Looks for a PROXY header (version 1 or 2) at the start of p[0, len): 1 when it is whole
 * (its length in *used, the client it names in *client, left alone for UNKNOWN or LOCAL), 0
 * when what is there is the start of one, -1 when it is not one. */
int proxy_protocol_parse(const char *p, size_t len, struct addr *client, size_t *used);
/* Reads the PROXY header a trusted balancer starts fd with, taking exactly its bytes off the
 * socket, by deadline (monotonic ns). Returns 0 with the client it names in *client (left
 * alone for UNKNOWN or LOCAL), or -1: not a PROXY header, none in time, or the client left. */
int proxy_protocol_read(int fd, uint64_t deadline, struct addr *client);

/* ==== admin.c: the /metrics listener =================================================== */

/* Starts the admin thread serving GET /metrics (stats_render with more) on the listening
 * socket fd. Returns 0 or -1. */
int admin_start(int fd, render_fn more);
/* Stops the admin thread (fd is shut down and closed). */
void admin_stop(void);

/* ==== end.c: a connection's end ======================================================== */

/* Records reason as why c ends, unless a reason was recorded first. */
void conn_why(struct conn *c, enum end reason);
/* Ends c for reason (if none was recorded yet) and wakes both loops: its sockets are shut down,
 * not closed, so their numbers stay c's until conn_close. */
void conn_end(struct conn *c, enum end reason);
/* Closes c's sockets, records END_DONE if no reason was recorded, counts c (stats_conn_done)
 * and calls log for its access log line (NULL: none). Once only, when no thread holds c's
 * sockets any more. */
void conn_close(struct conn *c, void (*log)(const struct conn *c));

/* ==== room.c: the waiting room ======================================================== */

/* Why a connection's loops leave their worker (c->leave) at a safe point: where no byte of
 * it is inside the proxy, so that it can wait in the waiting room and go on on any worker. */
enum leave {
    LEAVE_NO,
    LEAVE_PARK, /* it has nothing to do: quiet for park_after; while others wait, new and
                   silent, or waiting on its client for QUIET_MS */
    LEAVE_TURN, /* its time slice is over and others wait for a worker */
};

/* A worker thread's seat: how the thread is asked to look again at whether its connection
 * should keep the worker. A ring must reach a thread that is blocked, or about to block, in
 * copy_wait, so the thread never blocks in a read alone: it waits in poll on the socket and
 * on its bell. */
struct seat {
    int bell;             /* eventfd: readable from a ring until the thread takes it */
    _Atomic int sleeping; /* the thread waits in copy_wait with no eye on the time slice:
                             pool.c rings it when others begin to wait for a worker */
};

/* The decision, on a worker's threads. */

/* Whether c, one of whose loops is about to wait (the last awake one if last_awake), should leave
 * its worker now (copy_wait asks at each wait): its slice is over while others wait
 * (LEAVE_TURN), or it has nothing to do (LEAVE_PARK: all its loops wait and no byte moved for
 * park_after, unless it is dialling; while others wait, it is dialling, or it is new and never
 * moved a byte, or it waits on its client and no byte moved for QUIET_MS; in the stop, an http
 * connection between requests quiet for QUIET_MS). Else LEAVE_NO, and *until moves to the moment
 * that answer may change. */
enum leave room_due(struct conn *c, uint64_t now, int last_awake, uint64_t *until);
/* Records why c leaves its worker (the first reason wins) and rings the other loop's thread of
 * a relay (seat !d), wherever it waits, so that it leaves too at its next safe point. */
void room_ask_leave(struct conn *c, enum dir d, enum leave why);
/* Rings s's bell: its thread looks again at whether to keep its connection. */
void room_ring(struct seat *s);
/* The deadline of what c waits for, the same on a worker and in the waiting room (0: none): a
 * dial's lookup or connect (connect_timeout); a request head's (c->head_deadline); a relay's,
 * last byte + idle_timeout; an http connection's between requests, last byte +
 * keepalive_timeout. */
uint64_t room_deadline(struct conn *c);
/* Whether c is an http connection between requests (none begun, nor a tunnel): at the stop nothing
 * of it is in progress, so it is closed instead of kept, unless a request is waiting already. */
int room_between_requests(const struct conn *c);
/* Whether c, at the end of its turn, has bytes to read already on a socket the waiting room
 * would watch for it: the room would send it back to the queue at once. */
int room_has_bytes(const struct conn *c);

/* The room, on the acceptor thread alone (room_start and room_end before and after it). It calls
 * nothing above it: a connection that comes out is returned, and the caller hands it back to the
 * pool (pool_resume) or closes it (pool_close_parked). */

/* Sets the room up to watch parked sockets in the epoll set ep (whose events carry a struct
 * watch *, for room_woken), for up to max_connections parked at once. Returns 0 or -1. */
int room_start(int ep);
/* Frees what room_start allocated (ep stays the caller's). */
void room_end(void);
/* Lets c, which a worker parked, in: its sockets are watched, and its deadline (c->held_until, or
 * room_deadline) goes into the heap. Returns 0, or -1 when the kernel would not watch it (out of
 * memory): then c is not in the room, and the caller serves it. */
int room_enter(struct conn *c);
/* epoll reported w: returns its connection, out of the room, to be served; or NULL: stale (it
 * left earlier in this batch), or the kept-alive server connection of a parked http client
 * closed (closed here: the client stays parked, its next request opens a new one). */
struct conn *room_woken(struct watch *w);
/* Takes out the next connection whose deadline is at or before now (a timeout, counted in
 * stats.room_timeouts), or NULL when none is left: *serve set when it goes back to a worker (a
 * head owed its 408, a dial its next address or 504), else the caller closes it (END_IDLE). One
 * held for its rate (c->held_until) whose time is up is no timeout: it stays in the room,
 * watched now, its idle clock restarted; or, when the kernel would not watch it, it is taken
 * out with *serve set. */
struct conn *room_expire(uint64_t now, int *serve);
/* The nearest deadline in the room; 0: none. */
uint64_t room_next_deadline(void);
/* The stop: takes every connection between http requests (room_between_requests) out of the
 * room; linked by next, NULL: none. */
struct conn *room_take_idle(void);
/* Takes a connection out of the room, the nearest deadline first; NULL: the room is empty. */
struct conn *room_take_any(void);

/* ==== copy.c: the copy loops =========================================================== */

/* What one direction copies with: allocated once per worker, reused per connection. */
struct copier {
    char *buf;    /* copy = buffer, or splice's fallback; NULL until needed */
    int pipe[2];  /* copy = splice; -1 otherwise */
    int pending;  /* bytes sitting in the pipe */
    uint64_t tat; /* rate limit: theoretical arrival time of the next byte, ns */
};

/* What copy_recv found. */
enum recv { RECV_DATA, RECV_EOF, RECV_TICK, RECV_ENDED };
/* How copy_stream ended. */
enum streamed { STREAM_EOF, STREAM_LEAVE, STREAM_ENDED };
/* What copy_wait ended with. */
enum wake {
    WAKE_READY,   /* fd is ready (bytes, EOF, a connect done, or an error): no block */
    WAKE_LEAVE,   /* c leaves its worker now (c->leave says why): nothing was read; only
                     when the caller said it may */
    WAKE_TIMEOUT, /* room_deadline passed: the caller ends c as its state says */
    WAKE_ENDED,   /* c ended (an error on the other side, a stop) */
};

/* A worker's copier: allocated once (buffer or pipe by cfg.copy). Returns 0 or -1. */
int copy_init(struct copier *k);
/* Between connections: forgets pacing; drains bytes a failed connection left in the pipe. */
void copy_reset(struct copier *k);
/* Frees what copy_init allocated. */
void copy_free(struct copier *k);
/* Moves up to limit bytes from → to, counting them. Returns the bytes moved when from reached
 * EOF or the limit, or -1 when the connection ended (c->end says why). */
int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, uint64_t limit);
/* Sends all n bytes to fd. Returns 0, or -1 when the connection ended. */
int copy_send(struct conn *c, int to, const char *p, size_t n);
/* Copies one direction of c, UP on the front thread and DOWN on the back (a relay), waiting for
 * each read in copy_wait (with park_after = 0, in the read itself, as a worker that never parks
 * would): STREAM_EOF at EOF (the write side of the destination is shut down, c->eof[d] set);
 * STREAM_LEAVE when c leaves its worker (c->leave); STREAM_ENDED when the connection ended. It
 * leaves only between reads: no byte is read and left behind. */
enum streamed copy_stream(struct conn *c, struct copier *k, enum dir d);
/* Waits, on the thread of seat d, until fd is ready for events (POLLIN: can be read without
 * blocking; POLLOUT: a connect is done), or, if may_leave, until c should leave its worker
 * (room_due says when; then room_ask_leave). Wakes for nothing else than bytes, its deadlines
 * (room_deadline, the park's, the slice's) and its bell. */
enum wake copy_wait(struct conn *c, enum dir d, int fd, short events, int may_leave);
/* Starts timing the body read in direction d against min_rate: read slower, it ends c
 * (END_SLOW). */
void copy_min_rate_start(struct conn *c, enum dir d);
/* Stops timing the body read in direction d. */
void copy_min_rate_stop(struct conn *c, enum dir d);
/* One loop of c is done for good (at EOF): it no longer counts as awake. */
void copy_loop_done(struct conn *c, enum dir d);
/* Whether no byte moved on c, either way, for ms milliseconds (0: never). */
int copy_idle_for(struct conn *c, uint64_t ms);
/* Receives up to len bytes into buf: RECV_DATA (*got bytes), RECV_EOF, RECV_TICK (TICK_MS
 * passed with nothing to read: the caller checks its own deadlines), or RECV_ENDED. */
enum recv copy_recv(struct conn *c, int fd, void *buf, size_t len, size_t *got);
/* Rate limiting: ns to wait before the next read may start (0: now). */
uint64_t copy_pace_delay(const struct copier *k, uint64_t now);
/* Rate limiting: charges n bytes moved at now, at rate_limit bytes a second. */
void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate_limit);

/* ==== upstream.c: choosing an upstream and connecting ================================== */

/* Which upstream a client starts at for balance = source: stable for one address. */
unsigned upstream_hash(const struct addr *client, unsigned n);
/* Whether a connect that failed with err counts against the upstream (marks it down): not when
 * the shortage was our own (fds, memory, buffers, local ports) or the connection ended. */
int upstream_at_fault(int err);
/* Tells the dial path the proxy's own listeners (as bound: port 0 resolved, unmapped), which no
 * request may reach. Called once, before the pool starts. */
void upstream_own(const struct addr *listeners, int n);
/* Whether a request may go to a destination, and if not, by which rule. */
enum reach {
    REACH_OK,
    REACH_LOCAL,      /* one of the proxy's own listeners, or local_destinations = deny */
    REACH_DENIED,     /* deny_destinations */
    REACH_NOT_ALLOWED /* allow_destinations is set and does not hold it */
};
/* Whether a request may be dialled to a (by_name: its name is in allow_destinations, so its
 * addresses need not be): never to one of the proxy's own listeners; not into a network of
 * deny_destinations; only into allow_destinations' networks if it has any; with
 * local_destinations = deny, not to a loopback, link-local or unspecified address, nor to any
 * address this host owns. */
enum reach upstream_reach(const struct config *cf, const struct addr *a, int by_name);
/* A dial in progress: a name's lookup, then connects to its candidates in turn. It is c's own
 * (c->dial), allocated when it starts, so that c may leave its worker in the middle of it; the
 * waiting room then watches fd until the step in progress is done or its time (until) is up.
 * Whoever has c owns it: the front thread of its worker, or the waiting room, which only reads
 * fd, out and until (room_deadline). */
struct dial {
    const struct config *cf;   /* its connection's (c->cfg, which stays while it dials) */
    char key[272];             /* where it goes: "host:port", or "" for the configured upstreams */
    int fd;                    /* what the step in progress waits on: the lookup's eventfd (out 0)
                                  or the socket connecting (out 1); -1: none */
    int out;                   /* fd is a socket connecting: it waits to be writable */
    struct lookup *lookup;     /* the lookup in progress, or NULL */
    uint64_t deadline;         /* a name's: one connect_timeout for the lookup and every address */
    uint64_t until;            /* the step in progress is given up on then */
    int n, next;               /* candidates, and the next to try */
    int err;                   /* why the last try failed (an errno) */
    int by_name;               /* its name is in allow_destinations */
    enum reach barred;         /* EACCES: the rule that refused it */
    uint8_t up[MAX_UPSTREAMS]; /* the configured upstreams: indexes into cf->up, in turn */
    struct addr a[DIAL_ADDRESSES]; /* a name's addresses, in the resolver's order */
};
/* Connects c to where it goes: host:port from a request (its first DIAL_ADDRESSES addresses in
 * turn, sharing one connect_timeout with the lookup), or with host NULL the configured
 * upstreams (chosen by cfg.balance, those marked down last, each with a connect_timeout of its
 * own; sets c->chosen). Returns the fd, or -1 with errno: EACCES (an address not allowed),
 * ETIMEDOUT, ECANCELED (c ended), or EINPROGRESS: c leaves its worker (only if may_leave), and
 * the dial waits in the waiting room (c->dial); call again with the same host and port once a
 * worker has c again. */
int upstream_connect(struct conn *c, const char *host, int port, int may_leave);
/* Gives up the dial c is in, if any: its socket, its lookup, its record. */
void upstream_drop(struct conn *c);

/* ==== pool.c: the queue, the workers, the graceful stop ================================ */

struct worker;
typedef void (*job_fn)(struct worker *w, struct conn *c);
/* What the front thread does with a connection once its mode is done with it for now. */
enum served { SERVED_DONE, SERVED_PARK };
typedef enum served (*serve_fn)(struct worker *w, struct conn *c);

/* A mode: how a worker serves a connection. The pool is started with one and never names a
 * mode itself. */
struct mode {
    const char *name;
    serve_fn serve;                 /* the front thread's job for one connection, until it
                                       ends (SERVED_DONE) or parks (SERVED_PARK); called
                                       again when a parked connection has work, unless it
                                       is a relay (c->relay): pool.c goes on relaying that
                                       one itself, whatever the mode */
    int (*init)(struct worker *w);  /* allocates w->scratch; returns 0 or -1 */
    void (*free)(struct worker *w); /* frees w->scratch */
    void (*last_word)(int fd, enum refusal why); /* to a client turned away (pool_turn_away);
                                                    never blocks; NULL: none */
    void (*done)(const struct conn *c);          /* after c is closed and counted; NULL: nothing */
    render_fn metrics;                           /* the mode's own metric families; NULL: none */
};

/* A worker: a front thread that takes connections from the queue and a back thread for the
 * second job a connection may have at once: a relay's upstream → client side, or in http the
 * request body going up while the front thread reads the response. Its buffers are scratch,
 * reused per connection. */
struct worker {
    pthread_t front, back;
    pthread_mutex_t mu; /* guards conn, job, back_job, quit, and what a mode's scratch says */
    pthread_cond_t cv;
    struct conn *conn; /* being served; what a forced stop shuts down */
    struct conn *job;  /* handed to the back thread; NULL when it is idle */
    job_fn back_job;   /* what the back thread runs for job */
    int quit;
    struct copier cp[2]; /* by enum dir */
    struct seat seat[2]; /* by the enum dir each copies in a relay: the front thread's (UP) and
                            the back thread's (DOWN) */
    void *scratch;       /* the mode's own per-worker state (http: head buffers, the body job) */
};

/* Creates cfg.workers workers that serve each connection by mode, and returns once all of
 * them wait for work. Returns 0 or -1. */
int pool_start(const struct mode *mode);
/* Whether the queue has room for one more new connection (cfg.queue beyond the idle workers).
 * When it has none, the acceptor's bell (pool_parked_fd) rings once it has. */
int pool_intake_open(void);
/* A head buffer (HEAD_MAX bytes) from the fixed pool of cfg.head_buffers, for a request head
 * read in part to wait in while its connection is parked (c->stash); NULL when none is left. */
char *pool_head_take(void);
/* Gives a head buffer back. */
void pool_head_give(char *buf);
/* Turns a client away before it is served (the acceptor, or after a trusted balancer's PROXY
 * header): counted and logged as why, and given the mode's last word unless it is not allowed
 * at all. The caller closes fd. */
void pool_turn_away(int fd, const struct addr *peer, enum refusal why);
/* Hands an accepted socket to the pool, served by config cf (held: the connection keeps the
 * reference), counted in limits.c as entry (-1: not), behind a trusted balancer if behind.
 * Returns 0, or -1 when the pool is stopping (the caller closes fd, drops cf, leaves entry). */
int pool_submit(int fd, const struct addr *peer, struct config *cf, int entry, int behind);
/* Makes fd the server socket of w's connection (closing the one before, if any). Only
 * through here, so that a forced stop never shuts down an fd number already reused. */
void pool_set_server(struct worker *w, int fd);
/* Starts the back thread running job(w, c): a relay's upstream → client side, or http's request
 * body. */
void pool_back_start(struct worker *w, struct conn *c, job_fn job);
/* Waits until the back thread has finished with its job. */
void pool_back_wait(struct worker *w);
/* As pool_back_wait, for ms milliseconds at most. Returns whether the back thread is done. */
int pool_back_wait_for(struct worker *w, int ms);
/* The usual back job: copies upstream → client until EOF (copy_stream). */
void pool_copy_down(struct worker *w, struct conn *c);
/* Relays c raw both ways, down (its job: copy_stream DOWN, after anything of the mode's own)
 * on the back thread and client → upstream here, skipping directions already at EOF:
 * SERVED_DONE once both reached EOF or c ended; SERVED_PARK once both loops left their worker
 * (c->leave says why). */
enum served pool_relay(struct worker *w, struct conn *c, job_fn down);
/* The stop: waits until no connection is left or seconds have passed. */
void pool_drain(int seconds);
/* The stop's end (the waiting room is closed already): ends what is still queued or served, joins
 * every thread. */
void pool_stop(void);

/* The waiting room's side (acceptor.c, for room.c): a connection a worker parked comes out here,
 * goes back in with pool_resume when it has work, or is closed with pool_close_parked. */

/* The acceptor's bell, an eventfd: readable once connections have parked since
 * pool_take_parked, or once the queue has room for new connections again (pool_intake_open). */
int pool_parked_fd(void);
/* The connections parked since the last call, oldest first, linked by next; NULL: none. */
struct conn *pool_take_parked(void);
/* A parked connection has work (its socket is readable or hung up, or its request head's time
 * is up): back into the queue, behind those already waiting. */
void pool_resume(struct conn *c);
/* Closes a parked connection for why: its sockets, its counts, its log line, its record. */
void pool_close_parked(struct conn *c, enum end why);
/* The stop begins: from now on a connection between http requests that would park is closed
 * instead, and http connections end at their next request boundary. Tunnels, relays, dials and
 * heads begun still park: the room keeps them through the grace period. Returns those that parked
 * since the last pool_take_parked, as that does. */
struct conn *pool_stop_begin(void);
/* The stop meets parked c between requests: served if a request (or a hang-up) came already, with
 * the stop's Connection: close; else closed. Returns 1 if it closed c. */
int pool_stop_idle(struct conn *c);
/* The room closes for good (the grace period is over): from now on any connection that would park
 * is closed instead. Returns those that parked since the last pool_take_parked, as that does. */
struct conn *pool_room_close(void);

/* ==== http_parse.c: strict HTTP/1.1 heads, targets and chunk sizes ===================== */

struct field {
    const char *name, *value; /* into the buffer; value without surrounding whitespace */
    size_t nlen, vlen;
};

/* A parsed head. Pointers point into the buffer it was parsed from. */
struct msg {
    size_t size;                 /* the head's bytes, with its final CRLF CRLF */
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

/* What http_head_end found. */
enum scan { SCAN_MORE, SCAN_DONE, SCAN_BAD };

/* Looks for the end of a head in buf[0, len), scanning on from *scanned: SCAN_DONE with *end
 * the head's length, SCAN_MORE if more bytes are needed, SCAN_BAD on a NUL, a bare CR or LF,
 * or a head that starts with CRLF (no start line). */
enum scan http_head_end(const char *buf, size_t len, size_t *scanned, size_t *end);
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

/* ==== auth.c: Proxy-Authorization ===================================================== */

enum auth { AUTH_OK, AUTH_MISSING, AUTH_MALFORMED, AUTH_BAD, AUTH_MAX };
extern const char *const auth_names[AUTH_MAX];

/* Checks the request's Proxy-Authorization against cf's [users] (AUTH_OK when there are none)
 * and copies the user name into user. Compares with every user in constant time. */
enum auth auth_check(const struct config *cf, const struct msg *m, char *user, size_t cap);
/* Counts a failed authentication (a 407) on c. Returns whether c may stay open for another
 * try: 0 once it has had AUTH_FAILURES_MAX. */
int auth_may_retry(struct conn *c);
/* Decodes strict base64 (padding required, no whitespace, zero pad bits) into out. Returns
 * the decoded length, or -1. */
int auth_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap);

/* ==== http_io.c: HTTP messages between sockets ========================================= */

/* One side's input with its read buffer. Heads and chunk-size lines are parsed from the
 * buffer; body bytes leave it first, then go straight from the socket. */
struct inbuf {
    char *buf;       /* HEAD_MAX bytes */
    size_t off, len; /* the unread bytes are buf[off, len) */
};

/* Forgets what s holds. */
void http_inbuf_clear(struct inbuf *s);

/* What http_read_head found. */
enum head { HEAD_OK, HEAD_NONE, HEAD_LOST, HEAD_BAD, HEAD_LEAVE };

/* Reads until s holds a whole head and parses it into m (a request if request: it must be whole by
 * c->head_deadline, which is set at its first byte if it is not yet): HEAD_OK; HEAD_NONE at EOF
 * before any byte, or when a client between requests was idle for keepalive_timeout; HEAD_LEAVE
 * when c leaves its worker while it waits for a request or for the rest of one (copy_wait; a part
 * read goes with it in c->stash); HEAD_LOST when the connection ended or the client left mid-head;
 * HEAD_BAD with the status to refuse it with in *status (408 when its time is up; 502 for any bad
 * response). */
enum head http_read_head(struct conn *c, struct inbuf *s, int fd, struct msg *m, int request,
                         int *status);
/* Copies exactly n body bytes from s (what is buffered, then the socket from) to `to`.
 * Returns 0 or -1. */
int http_copy_n(struct conn *c, struct copier *k, struct inbuf *s, int from, int to, uint64_t n);
/* Copies a chunked body from s (what is buffered, then the socket from) to `to`, checking
 * every size line and trailer; the bytes go on exactly as they came. Returns 0 or -1. */
int http_copy_chunked(struct conn *c, struct copier *k, struct inbuf *s, int from, int to);
/* Why the proxy answers a request itself; each has its status, a word for the access log and
 * a sentence for the client (http_io.c's table). */
enum why {
    WHY_NONE, /* it does not: the answer is the server's */
    WHY_BAD_REQUEST,
    WHY_NO_UPSTREAM,
    WHY_PORT,
    WHY_DESTINATION,
    WHY_AUTH,
    WHY_HEADER_TIMEOUT,
    WHY_URI_TOO_LONG,
    WHY_HEAD_TOO_LARGE,
    WHY_VERSION,
    WHY_LOOP,
    WHY_DNS,
    WHY_REFUSED,
    WHY_UNREACHABLE,
    WHY_CONNECT_TIMEOUT,
    WHY_CONNECT_FAILED,
    WHY_RESOURCES,
    WHY_CLOSED,
    WHY_RESET,
    WHY_BAD_RESPONSE,
    WHY_BUSY,
    WHY_DENIED,
    WHY_NOT_ALLOWED,
    WHY_RATE,
    WHY_CLIENT_CONNECTIONS,
    WHY_PROXY_HEADER,
    WHY_MAX
};
/* The why of a status found while reading a request (http_read_head, http_parse): the first
 * with that status. */
enum why http_why_of(int status);
int http_why_status(enum why why);
const char *http_why_word(enum why why);
/* Writes the proxy's own answer for why into buf (its status; a text body: the reason and the
 * sentence; for 407 the Basic challenge in realm; Retry-After: retry seconds if retry, 1 for a
 * 503; Connection: close unless keep) and returns its length. */
int http_error(char *buf, size_t cap, enum why why, int keep, const char *realm, int retry);
/* Sends c's client the proxy's own answer for why (http_error, in c's realm) and records it in
 * c->req for the log. Returns 0, or -1 when the client could not take it. The caller decides
 * whether the connection goes on (keep). */
int http_reply(struct conn *c, enum why why, int keep, int retry);

/* ==== http_head.c: the heads forwarded both ways ======================================= */

#define OUT_MAX (HEAD_MAX + 1024) /* a rewritten head: Host, Via, Connection add a little */

/* Where a request goes, read from its target. */
struct target {
    const char *authority; /* absolute-form's host[:port]; NULL for origin-form */
    const char *path;      /* what goes upstream as the origin-form target */
    size_t alen, plen;
    char host[256];
    int port;
};

/* Makes this process's Via value, before any worker runs (again: the same value). */
void http_head_init(void);
/* The Via value this proxy adds: "1.1 proxy-PID". */
const char *http_via(void);
/* Writes the request head to forward into buf (OUT_MAX bytes): origin-form target, hop-by-hop
 * fields dropped (Upgrade kept only with upgrade), Host from the target's authority if it has
 * one, our own Connection, Via added. Returns its length, or -1 when it does not fit. */
long http_rewrite_request(char *buf, const struct msg *m, const struct target *t, int upgrade);
/* Writes the response head to forward (r, parsed from head; answering req) into buf (OUT_MAX
 * bytes): our HTTP/1.1 status line with the server's status and reason, its end-to-end fields,
 * our own Connection (close when close: the client connection ends after this response; keep-alive
 * for an HTTP/1.0 client that asked for it; upgrade on a 101), Via added. Returns its length, or -1
 * when it does not fit. */
long http_rewrite_response(char *buf, const char *head, const struct msg *r, const struct msg *req,
                           int close);

/* ==== http_exchange.c: a request's exchange with its server ============================ */

/* One worker's http scratch (w->scratch): allocated once (http.c's init), reused for each
 * connection. */
struct http_worker {
    struct inbuf in[2]; /* [UP] reads the client, [DOWN] the upstream */
    char *out[2];       /* [UP] a rewritten request head, kept for a retry; [DOWN] a response's */
    /* The body job: the front thread sets these before pool_back_start and reads body_rc after
     * pool_back_wait; the back thread owns in[UP] and body_rc in between. */
    int body_chunked;
    uint64_t body_length;
    int body_rc; /* 0: the whole body went upstream; -1: it did not */
};

/* What the front thread does after a request. Each function below that returns it leaves the
 * request's log line to its caller: the request is done unless NEXT_PARK. */
enum next {
    NEXT_READ,  /* read the next request */
    NEXT_CLOSE, /* end the connection */
    NEXT_PARK   /* park it: quiet between requests, or a quiet tunnel */
};

/* Forwards the request m (its head at the start of the scratch's in[UP], whatever follows it
 * its body, if any, or the next request), going where t says, and forwards its response back.
 * A kept-alive server connection that failed before any byte of a response is dropped, and
 * the request sent once more on a fresh one when that is safe. The proxy answers itself (502,
 * 504, ...) when no response came, and a 101 makes c a raw relay (relay_raw). NEXT_PARK:
 * c leaves its worker while its server connection is made, and this request is handled again
 * from the start when it is back (c->dial); or an upgraded connection is quiet. */
enum next http_forward(struct worker *w, struct conn *c, const struct msg *m,
                       const struct target *t);
/* CONNECT host:port: an allowed port, a connection, 200, then raw bytes both ways
 * (relay_raw); the proxy answers itself when any of it fails. NEXT_PARK as for
 * http_forward. */
enum next http_tunnel(struct worker *w, struct conn *c, const struct msg *m);
/* Closes c's server connection, if it has one; the next request opens a new one. */
void http_end_server(struct worker *w, struct conn *c);
/* The exchange's metric families (tunnels, upgrades, retries), the last of http's. */
void http_exchange_metrics(FILE *f);

/* ==== tcp.c: tcp mode ================================================================== */

extern const struct mode tcp_mode;

/* ==== http.c: http mode ================================================================ */

extern const struct mode http_mode;

/* ==== acceptor.c: the acceptor thread ================================================== */

/* Starts the acceptor thread on the listening socket fd (made non-blocking here), handing
 * clients to the pool (pool_start first). Returns 0 or -1. */
int acceptor_start(int listen_fd);
/* Stops accepting: returns once the backlog is taken in (if drain_backlog: the listener closes
 * with us; else its clients wait for whoever listens next) and the listener may close, with
 * how many parked connections between requests were closed. Connections with work in progress
 * go on, parked or not, until acceptor_end. */
uint64_t acceptor_stop(int drain_backlog);
/* Called once the grace period is over, or nothing is left: closes every connection still parked
 * and ends the acceptor thread. */
void acceptor_end(void);

/* ==== plan.c: what -t prints =========================================================== */

/* File descriptors a full load needs: max_connections' sockets, the workers' pipes and bells,
 * the lookups' eventfds (http), a few to spare. */
long long config_fds(const struct config *c);
/* Warns on out (each line after prefix) when limit fds cannot hold a full load, saying what
 * max_connections would fit. Returns 0, or -1 (said as an error) when not even the workers and one
 * connection fit: start-up would fail, and lowering max_connections cannot help. */
int config_fd_warning(const struct config *c, unsigned long long limit, const char *prefix,
                      FILE *out);
/* Prints what -t shows: the pool (threads, stacks, buffers, pipes), the connections (records,
 * sockets), and whether the fd limit holds them; and opens what start-up opens (the log; not the
 * sockets). Returns 0, or -1 where start-up would fail (said on out, or in err). */
int config_plan(const struct config *c, FILE *out, char *err, size_t errlen);

#endif
