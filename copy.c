/* copy.c — the copy loops that move a connection's bytes, one direction per thread: through a
 * buffer (read/send) or through a pipe (splice), with half-close, the idle clock and the rate
 * limit. It knows nothing of queues or protocols: pool.c and the modes call it. */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <sys/time.h>
#include <unistd.h>

void copy_prepare(int fd)
{
    /* Best-effort: a socket without these still works, only slower or less watched. Without
     * TCP_NODELAY a small reply waits for the peer's delayed ACK (~40 ms). */
    int one = 1;
    struct timeval tick = {TICK_MS / 1000, TICK_MS % 1000 * 1000};
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tick, sizeof tick);
}

int copy_init(struct copier *k)
{
    k->buf = NULL;
    k->pipe[0] = k->pipe[1] = -1;
    k->pending = 0;
    k->tat = 0;
    if (cfg.copy == COPY_BUFFER) return (k->buf = malloc(cfg.buffer_size)) ? 0 : -1;
    if (pipe2(k->pipe, O_CLOEXEC) < 0) return -1;
    fcntl(k->pipe[1], F_SETPIPE_SZ, cfg.buffer_size); /* best-effort: 64 KiB works too */
    return 0;
}

void copy_reset(struct copier *k)
{
    k->tat = 0;
    if (!k->pending) return;
    /* A connection that ended with bytes still in the pipe must not hand them to the next
     * client: start over with a fresh pipe (or the buffer, if none can be had). */
    close(k->pipe[0]);
    close(k->pipe[1]);
    k->pending = 0;
    if (pipe2(k->pipe, O_CLOEXEC) < 0)
        k->pipe[0] = k->pipe[1] = -1;
    else
        fcntl(k->pipe[1], F_SETPIPE_SZ, cfg.buffer_size);
}

void copy_free(struct copier *k)
{
    free(k->buf);
    if (k->pipe[0] >= 0) close(k->pipe[0]), close(k->pipe[1]);
}

void conn_end(struct conn *c, enum end reason)
{
    int none = END_NONE;
    atomic_compare_exchange_strong(&c->end, &none, (int)reason);
    /* shutdown, not close: it wakes a thread blocked on the fd without freeing the number. */
    shutdown(c->client, SHUT_RDWR);
    if (c->upstream >= 0) shutdown(c->upstream, SHUT_RDWR);
}

static void touch(struct conn *c)
{
    atomic_store_explicit(&c->last_ns, mono_ns(), memory_order_relaxed);
}

/* A read or write waited TICK_MS without progress: whether the connection goes on. */
static int still_alive(struct conn *c)
{
    if (atomic_load(&c->end)) return 0;
    uint64_t idle = mono_ns() - atomic_load_explicit(&c->last_ns, memory_order_relaxed);
    if (cfg.idle_timeout && idle >= (uint64_t)cfg.idle_timeout * 1000000000u) {
        conn_end(c, END_IDLE);
        return 0;
    }
    return 1;
}

/* Whether a failed call may simply be retried: interrupted, or a tick with the peer alive. */
static int retry(struct conn *c, int fd, int err)
{
    if (err == EINTR) return 1;
    if (err == EAGAIN) return still_alive(c);
    conn_end(c, fd == c->client ? END_CLIENT : END_UPSTREAM);
    return 0;
}

int copy_send(struct conn *c, int to, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(to, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            touch(c);
        } else if (!retry(c, to, w < 0 ? errno : EPIPE)) {
            return -1;
        }
    }
    return 0;
}

/* Moves the n bytes just spliced into the pipe on to the socket. */
static int drain_pipe(struct conn *c, struct copier *k, int to, size_t n)
{
    k->pending = (int)n;
    while (k->pending) {
        ssize_t w = splice(k->pipe[0], NULL, to, NULL, (size_t)k->pending, SPLICE_F_MOVE);
        if (w > 0) {
            k->pending -= (int)w;
            touch(c);
        } else if (!retry(c, to, w < 0 ? errno : EPIPE)) {
            return -1;
        }
    }
    return 0;
}

uint64_t copy_pace_wait(const struct copier *k, uint64_t now)
{
    return k->tat > now ? k->tat - now : 0;
}

void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate)
{
    /* GCRA: each byte pushes the theoretical arrival time on by 1/rate s; an idle spell
     * earns no credit beyond the next read, so a burst is at most one chunk. */
    k->tat = (k->tat > now ? k->tat : now) + n * 1000000000ull / (uint64_t)rate;
}

int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, enum dir d, uint64_t limit)
{
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
        if (n == 0) break; /* EOF */
        if (n < 0 && piped && (errno == EINVAL || errno == ENOSYS)) {
            /* This pair of fds cannot splice: fall back to the buffer, for good. */
            if (!k->buf && !(k->buf = malloc(cfg.buffer_size))) return conn_end(c, END_CLIENT), -1;
            close(k->pipe[0]), close(k->pipe[1]);
            k->pipe[0] = k->pipe[1] = -1;
            continue;
        }
        if (n < 0) {
            if (retry(c, from, errno)) continue;
            return -1;
        }
        touch(c);
        if (piped ? drain_pipe(c, k, to, (size_t)n) : copy_send(c, to, k->buf, (size_t)n))
            return -1;
        moved += (uint64_t)n;
        c->bytes[d] += (uint64_t)n;
        atomic_fetch_add_explicit(&stats.bytes[d], (uint64_t)n, memory_order_relaxed);
        if (cfg.rate_limit) copy_pace_spend(k, mono_ns(), (size_t)n, cfg.rate_limit);
    }
    return (int64_t)moved;
}

void copy_stream(struct conn *c, struct copier *k, enum dir d)
{
    int from = d == UP ? c->client : c->upstream, to = d == UP ? c->upstream : c->client;
    if (copy_bytes(c, k, from, to, d, UINT64_MAX) >= 0)
        shutdown(to, SHUT_WR); /* EOF: pass the half-close on; the other direction goes on */
}
