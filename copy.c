/* copy.c — the copy loops that move a connection's bytes, one direction per thread: through a
 * buffer (read/send) or through a pipe (splice), with half-close, the idle clock, the rate
 * limit, and the moment a quiet relay may leave to park; and conn_end, which wakes both loops
 * when a connection ends. It knows nothing of queues or protocols: pool.c and the modes call
 * it. */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* A worker's copier: allocated once (buffer or pipe by cfg.copy). Returns 0 or -1. */
int copy_init(struct copier *k) {
    static _Atomic int warned;
    *k = (struct copier){.pipe = {-1, -1}};
    if (cfg.copy == COPY_BUFFER) return (k->buf = malloc(cfg.buffer_size)) ? 0 : -1;
    if (pipe2(k->pipe, O_CLOEXEC) < 0) return -1;
    if (fcntl(k->pipe[1], F_SETPIPE_SZ, cfg.buffer_size) < 0 && !atomic_exchange(&warned, 1))
        log_line("warning: pipes stay at %ld bytes, not buffer_size: %s (see "
                 "/proc/sys/fs/pipe-max-size)",
                 (long)fcntl(k->pipe[1], F_GETPIPE_SZ), strerror(errno));
    return 0;
}

/* Between connections: forgets pacing; drains bytes a failed connection left in the pipe. */
void copy_reset(struct copier *k) {
    char sink[4096];
    k->tat = 0;
    /* A connection that ended with bytes still in the pipe must not hand them to the next
     * client. They are there, so these reads do not block; no fd is given up on the way. */
    while (k->pending > 0) {
        ssize_t n = read(k->pipe[0], sink,
                         (size_t)k->pending < sizeof sink ? (size_t)k->pending : sizeof sink);
        if (n <= 0 && errno != EINTR) break;
        if (n > 0) k->pending -= (int)n;
    }
}

/* Frees what copy_init allocated. */
void copy_free(struct copier *k) {
    free(k->buf);
    if (k->pipe[0] < 0) return;
    close(k->pipe[0]);
    close(k->pipe[1]);
}

/* Ends c for reason (if none was recorded yet) and wakes both loops. */
void conn_end(struct conn *c, enum end reason) {
    int none = END_NONE;
    atomic_compare_exchange_strong(&c->end, &none, (int)reason);
    /* shutdown, not close: it wakes a thread blocked on the fd without freeing the number.
     * When the upstream failed, the client may still be owed a reply (http: 502), so only its
     * reading side is shut; the front thread closes the socket once the reply is out. */
    shutdown(c->client, reason == END_UPSTREAM ? SHUT_RD : SHUT_RDWR);
    if (c->upstream >= 0) shutdown(c->upstream, SHUT_RDWR);
}

/* Whether no byte moved on c, either way, for ms milliseconds (0: never). */
int copy_idle_for(struct conn *c, uint64_t ms) {
    uint64_t last = atomic_load_explicit(&c->last_ns, memory_order_relaxed), now = mono_ns();
    return ms && now > last && now - last >= ms * 1000000u;
}

/* Records that bytes moved: the idle clock both directions share. */
static void touch(struct conn *c) {
    atomic_store_explicit(&c->last_ns, mono_ns(), memory_order_relaxed);
}

/* A read or write waited TICK_MS without progress: whether the connection goes on. */
static int still_alive(struct conn *c) {
    if (atomic_load(&c->end)) return 0;
    if (copy_idle_for(c, (uint64_t)cfg.idle_timeout * 1000)) {
        conn_end(c, END_IDLE);
        return 0;
    }
    return 1;
}

/* Whether a failed call may simply be retried: interrupted, or a tick with the peer alive.
 * Otherwise the failure ends c, or only its upstream connection when the mode asked for that
 * (http: it may send the request again, or answer 502 itself). */
static int retry(struct conn *c, int fd, int err) {
    if (err == EINTR) return 1;
    if (err == EAGAIN) return still_alive(c);
    if (fd == c->client)
        conn_end(c, END_CLIENT);
    else if (c->upstream_apart)
        atomic_store(&c->upstream_failed, 1);
    else
        conn_end(c, END_UPSTREAM);
    return 0;
}

/* Counts n bytes sent to fd, as they go, so that a connection that fails still counts what
 * it moved. */
static void count_sent(struct conn *c, int to, size_t n) {
    enum dir d = to == c->upstream ? UP : DOWN;
    c->bytes[d] += n;
    atomic_store_explicit(&c->last_dir, (int)d, memory_order_relaxed);
    atomic_fetch_add_explicit(&stats.bytes[d], n, memory_order_relaxed);
    touch(c);
}

/* Sends all n bytes to fd. Returns 0, or -1 when the connection ended. */
int copy_send(struct conn *c, int to, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(to, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            count_sent(c, to, (size_t)w);
        } else if (!retry(c, to, w < 0 ? errno : EPIPE)) {
            return -1;
        }
    }
    return 0;
}

/* Receives up to len bytes into buf: RECV_DATA (*got bytes), RECV_EOF, RECV_TICK (TICK_MS
 * passed with nothing to read: the caller checks its own deadlines), or RECV_ENDED. */
enum recv copy_recv(struct conn *c, int fd, void *buf, size_t len, size_t *got) {
    for (;;) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n > 0) {
            touch(c);
            *got = (size_t)n;
            return RECV_DATA;
        }
        if (n == 0) return RECV_EOF;
        if (errno == EAGAIN) return still_alive(c) ? RECV_TICK : RECV_ENDED;
        if (!retry(c, fd, errno)) return RECV_ENDED;
    }
}

/* Moves the n bytes just spliced into the pipe on to the socket. */
static int drain_pipe(struct conn *c, struct copier *k, int to, size_t n) {
    k->pending = (int)n;
    while (k->pending) {
        ssize_t w = splice(k->pipe[0], NULL, to, NULL, (size_t)k->pending, SPLICE_F_MOVE);
        if (w > 0) {
            k->pending -= (int)w;
            count_sent(c, to, (size_t)w);
        } else if (!retry(c, to, w < 0 ? errno : EPIPE)) {
            return -1;
        }
    }
    return 0;
}

/* Rate limiting: ns to wait before the next read may start (0: now). */
uint64_t copy_pace_wait(const struct copier *k, uint64_t now) {
    return k->tat > now ? k->tat - now : 0;
}

/* Rate limiting: charges n bytes moved at now. */
void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate) {
    /* GCRA: each byte pushes the theoretical arrival time on by 1/rate s; an idle spell
     * earns no credit beyond the next read, so a burst is at most one chunk. */
    k->tat = (k->tat > now ? k->tat : now) + n * 1000000000ull / (uint64_t)rate;
}

/* Whether c may leave its worker to park: park_after is on and no byte moved for park_after;
 * or, while other connections wait for a worker, for one park_tick if its last byte went to
 * the client: then the client has had its answer and c waits on it. One whose last byte went
 * upstream is waiting for an answer that is on its way: parking it would only make it come
 * back through the queue, and under load the queue would keep itself full that way. */
int copy_quiet(struct conn *c) {
    if (!cfg.park_after) return 0;
    if (copy_idle_for(c, (uint64_t)cfg.park_after)) return 1;
    return atomic_load(&stats.queued) > 0 && copy_idle_for(c, (uint64_t)cfg.park_tick) &&
           atomic_load_explicit(&c->last_dir, memory_order_relaxed) == DOWN;
}

/* At a read's tick with nothing read: whether the loop copying direction d leaves to park (see
 * copy_stream). park is 0 where parking is not for this loop to decide (a body, a response). */
static int leave_to_park(struct conn *c, int park, enum dir d) {
    int asked = PARKING_ASKED;
    if (!park) return 0;
    if (d == UP) return copy_quiet(c);
    return atomic_compare_exchange_strong(&c->parking, &asked, PARKING_AGREED);
}

/* copy_bytes, and for copy_stream also: returns -2 when the loop for direction d leaves to
 * park (park set). */
static int64_t move(struct conn *c, struct copier *k, int from, int to, uint64_t limit, int park,
                    enum dir d) {
    uint64_t moved = 0;
    size_t chunk = (size_t)cfg.buffer_size;
    if (cfg.rate_limit && chunk > (size_t)cfg.rate_limit / 8) /* ~8 reads a second when paced */
        chunk = cfg.rate_limit >= 8 ? (size_t)cfg.rate_limit / 8 : 1;
    while (moved < limit) {
        size_t want = limit - moved < chunk ? (size_t)(limit - moved) : chunk;
        if (cfg.rate_limit) {
            uint64_t wait = copy_pace_wait(k, mono_ns());
            struct timespec ts = {(time_t)(wait / 1000000000u), (long)(wait % 1000000000u)};
            if (wait) nanosleep(&ts, NULL);
        }
        int piped = k->pipe[0] >= 0;
        ssize_t n = piped ? splice(from, NULL, k->pipe[1], NULL, want, SPLICE_F_MOVE)
                          : read(from, k->buf, want);
        if (piped && (n == 0 || (n < 0 && (errno == EINVAL || errno == ENOSYS)))) {
            /* splice returns 0 at TCP urgent data as at EOF (a peek tells them apart), and
             * EINVAL where these fds cannot splice: then read through the buffer. */
            char probe = 0;
            if (n == 0 && recv(from, &probe, 1, MSG_PEEK | MSG_DONTWAIT) != 1) break; /* EOF */
            if (!k->buf && !(k->buf = malloc(cfg.buffer_size))) {
                conn_end(c, END_CLIENT);
                return -1;
            }
            piped = 0;
            n = read(from, k->buf, want);
        }
        if (n == 0) break; /* EOF */
        if (n < 0 && errno == EAGAIN && leave_to_park(c, park, d)) return -2;
        if (n < 0) {
            if (retry(c, from, errno)) continue;
            return -1;
        }
        touch(c);
        if (piped ? drain_pipe(c, k, to, (size_t)n) : copy_send(c, to, k->buf, (size_t)n))
            return -1;
        moved += (uint64_t)n;
        if (cfg.rate_limit) copy_pace_spend(k, mono_ns(), (size_t)n, cfg.rate_limit);
    }
    return (int64_t)moved;
}

/* Moves up to limit bytes from → to, counting them. Returns the bytes moved when from reached
 * EOF or the limit, or -1 when the connection ended (c->end says why). */
int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, uint64_t limit) {
    return move(c, k, from, to, limit, 0, UP);
}

/* Copies one direction of c, UP on the front thread and DOWN on the back one: STREAM_EOF at
 * EOF (the write side of the destination is shut down, c->eof[d] set); STREAM_ENDED when the
 * connection ended; STREAM_QUIET at a tick with nothing read, when UP finds c quiet
 * (copy_quiet) or DOWN finds the front asking to park (PARKING_ASKED → AGREED). No byte is
 * read and left behind. */
enum streamed copy_stream(struct conn *c, struct copier *k, enum dir d) {
    int from = d == UP ? c->client : c->upstream;
    int to = d == UP ? c->upstream : c->client;
    int64_t moved = move(c, k, from, to, UINT64_MAX, 1, d);
    if (moved == -2) return STREAM_QUIET;
    if (moved < 0) return STREAM_ENDED;
    shutdown(to, SHUT_WR); /* EOF: pass the half-close on; the other direction goes on */
    c->eof[d] = 1;
    return STREAM_EOF;
}
