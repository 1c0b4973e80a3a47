/* copy.c — the copy loops that move a connection's bytes, one direction per thread: through a
 * buffer (read/send) or through a pipe (splice), with half-close, the idle clock, the rate
 * limit; the wait for bytes (copy_wait), which asks room.c at each wait whether the
 * connection's turn on its worker ends (room_due) and carries the answer out. It knows nothing
 * of queues or protocols: pool.c and the modes call it; a connection's end is end.c's. */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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

void copy_free(struct copier *k) {
    free(k->buf);
    if (k->pipe[0] < 0) return;
    close(k->pipe[0]);
    close(k->pipe[1]);
}

int copy_idle_for(struct conn *c, uint64_t ms) {
    uint64_t last = atomic_load_explicit(&c->last_ns, memory_order_relaxed), now = mono_ns();
    return ms && now > last && now - last >= ms * 1000000u;
}

/* Records that bytes moved: the idle clock both directions share. */
static void touch(struct conn *c) {
    atomic_store_explicit(&c->last_ns, mono_ns(), memory_order_relaxed);
}

/* Counts n more bytes of the body timed in direction d (c->rate) and says whether it came
 * slower than min_rate: then c ends (END_SLOW). As Apache's mod_reqtimeout (MinRate): the first
 * second is free, then each min_rate bytes buy one more, so a body that trickles is ended, not
 * only one that stops. */
static int too_slow(struct conn *c, enum dir d, size_t n) {
    struct rate *r = &c->rate[d];
    uint64_t rate = (uint64_t)c->cfg->min_rate, sec = 1000000000u;
    if (!r->from || !rate) return 0;
    r->bytes += n;
    if (mono_ns() <= r->from + sec + r->bytes / rate * sec + r->bytes % rate * sec / rate) return 0;
    conn_end(c, END_SLOW);
    return 1;
}

void copy_min_rate_start(struct conn *c, enum dir d) {
    c->rate[d] = (struct rate){.from = c->cfg->min_rate ? mono_ns() : 0};
}

void copy_min_rate_stop(struct conn *c, enum dir d) {
    c->rate[d].from = 0;
}

/* A read or write for the body of direction d waited TICK_MS without progress: whether the
 * connection goes on (idle_timeout, min_rate). */
static int still_alive(struct conn *c, enum dir d) {
    if (atomic_load(&c->end)) return 0;
    if (copy_idle_for(c, (uint64_t)c->cfg->idle_timeout * 1000)) {
        conn_end(c, END_IDLE);
        return 0;
    }
    return !too_slow(c, d, 0);
}

/* Whether a failed call on fd, for the bytes going direction d, may simply be retried:
 * interrupted, or a tick with the peer alive. Otherwise the failure ends c, or only its
 * server connection when the mode asked for that (http: it may send the request again, or
 * answer 502 itself). */
static int retry_or_end(struct conn *c, int fd, int err, enum dir d) {
    if (err == EINTR) return 1;
    if (err == EAGAIN) return still_alive(c, d);
    if (fd == c->client)
        conn_end(c, END_CLIENT);
    else if (c->server_apart)
        atomic_store(&c->server_failed, 1);
    else
        conn_end(c, END_UPSTREAM);
    return 0;
}

/* The direction of the bytes a read from fd brings: from the client they go up. */
static enum dir read_dir(const struct conn *c, int fd) {
    return fd == c->client ? UP : DOWN;
}

/* The direction of the bytes a send to fd carries: to the upstream they go up. */
static enum dir send_dir(const struct conn *c, int fd) {
    return fd == c->server ? UP : DOWN;
}

/* Counts n bytes sent to fd, as they go, so that a connection that fails still counts what
 * it moved. */
static void count_sent(struct conn *c, int to, size_t n) {
    enum dir d = send_dir(c, to);
    c->bytes[d] += n;
    atomic_store_explicit(&c->last_dir, (int)d, memory_order_relaxed);
    atomic_fetch_add_explicit(&stats.bytes[d], n, memory_order_relaxed);
    touch(c);
}

int copy_send(struct conn *c, int to, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(to, p, n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            count_sent(c, to, (size_t)w);
        } else if (!retry_or_end(c, to, w < 0 ? errno : EPIPE, send_dir(c, to))) {
            return -1;
        }
    }
    return 0;
}

enum recv copy_recv(struct conn *c, int fd, void *buf, size_t len, size_t *got) {
    for (;;) {
        ssize_t n = recv(fd, buf, len, 0);
        if (n > 0) {
            touch(c);
            *got = (size_t)n;
            return too_slow(c, read_dir(c, fd), (size_t)n) ? RECV_ENDED : RECV_DATA;
        }
        if (n == 0) return RECV_EOF;
        if (errno == EAGAIN) return still_alive(c, read_dir(c, fd)) ? RECV_TICK : RECV_ENDED;
        if (!retry_or_end(c, fd, errno, read_dir(c, fd))) return RECV_ENDED;
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
        } else if (!retry_or_end(c, to, w < 0 ? errno : EPIPE, send_dir(c, to))) {
            return -1;
        }
    }
    return 0;
}

uint64_t copy_pace_delay(const struct copier *k, uint64_t now) {
    return k->tat > now ? k->tat - now : 0;
}

void copy_pace_spend(struct copier *k, uint64_t now, size_t n, int rate_limit) {
    /* GCRA: each byte pushes the theoretical arrival time on by 1/rate_limit s; an idle spell
     * earns no credit beyond the next read, so a burst is at most one chunk. */
    k->tat = (k->tat > now ? k->tat : now) + n * 1000000000ull / (uint64_t)rate_limit;
}

/* ---- waiting for bytes, and leaving the worker ------------------------------------------ */

void copy_loop_done(struct conn *c, enum dir d) {
    /* If the other loop waits, it waits with no eye on the clock: that was this one's, the
     * last awake. Ring it to take the clock over. */
    if (atomic_fetch_sub(&c->awake, 1) == 1) room_ring(&c->seats[!d]);
}

/* poll's timeout for a wait until deadline (0: none), in whole ms rounded up. */
static int timeout_ms(uint64_t deadline, uint64_t now) {
    if (!deadline) return -1;
    uint64_t ms = deadline > now ? (deadline - now + 999999) / 1000000 : 0;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Why poll and not a blocked read: a blocked read could not be woken to leave; poll on the socket
 * and the thread's bell can, and a ring that comes before the thread blocks is not lost: the bell
 * stays readable until the thread takes it. Whether c should leave is room_due's answer. A dial
 * waits on an fd conn_end does not shut: the client's hang-up, which conn_end causes, wakes it. */
enum wake copy_wait(struct conn *c, enum dir d, int fd, short events, int may_leave) {
    struct seat *me = &c->seats[d];
    for (;;) {
        if (may_leave && atomic_load(&c->leave)) return WAKE_LEAVE;
        if (atomic_load(&c->end)) return WAKE_ENDED;
        uint64_t now = mono_ns(), deadline = room_deadline(c), until = deadline;
        if (deadline && now >= deadline) return WAKE_TIMEOUT;
        /* The last loop to wait asks to be rung when others begin to wait. It says so before
         * it reads stats.waiting, and pool.c sets that before it reads sleeping: one of the
         * two sees the other, so the ring is never missed. */
        int last_awake = atomic_fetch_sub(&c->awake, 1) == 1 && may_leave;
        atomic_store(&me->sleeping, last_awake);
        enum leave why = may_leave ? room_due(c, now, last_awake, &until) : LEAVE_NO;
        struct pollfd p[3] = {{.fd = fd, .events = events},
                              {.fd = me->bell, .events = POLLIN},
                              {.fd = c->client, .events = 0}}; /* hang-ups only */
        nfds_t nfds = fd == c->client || fd == c->server ? 2 : 3;
        /* A turn ends without a look at the socket. Nothing to do is checked once more, with
         * a poll that does not wait: bytes already there (the very ones that woke a parked
         * connection) are read first. */
        int n = why == LEAVE_TURN ? 0 : poll(p, nfds, why ? 0 : timeout_ms(until, now));
        atomic_store(&me->sleeping, 0);
        atomic_fetch_add(&c->awake, 1);
        if (n > 0 && p[0].revents) return WAKE_READY;
        if (why) {
            room_ask_leave(c, d, why);
            return WAKE_LEAVE;
        }
        if (n > 0 && nfds == 3 && p[2].revents) conn_end(c, END_CLIENT); /* reset, or ended */
        if (n > 0 && p[1].revents) {
            uint64_t rang;
            if (read(me->bell, &rang, sizeof rang) < 0) rang = 0; /* another took it: fine */
        }
        /* A deadline, a ring, or EINTR: look again. */
    }
}

/* What move returns instead of the bytes moved: c ended (c->end says why), or its loop leaves its
 * worker (c->leave says why). */
enum { MOVE_ENDED = -1, MOVE_LEFT = -2 };

/* The most one read asks for. */
static size_t chunk_size(int rate_limit) {
    size_t chunk = (size_t)cfg.buffer_size;
    if (rate_limit && chunk > (size_t)rate_limit / 8) /* ~8 reads a second when paced */
        chunk = rate_limit >= 8 ? (size_t)rate_limit / 8 : 1;
    return chunk;
}

/* The rate limit, before a read: sleeps until the bytes moved so far are paid for
 * (copy_pace_spend). */
static void pace_sleep(const struct copier *k) {
    uint64_t pause = copy_pace_delay(k, mono_ns());
    struct timespec ts = {(time_t)(pause / 1000000000u), (long)(pause % 1000000000u)};
    if (pause) nanosleep(&ts, NULL);
}

/* Waits in copy_wait until from is readable: 0, or what move returns when it may not read. */
static int wait_readable(struct conn *c, enum dir d, int from) {
    enum wake w = copy_wait(c, d, from, POLLIN, 1);
    if (w == WAKE_LEAVE) return MOVE_LEFT;
    if (w == WAKE_ENDED) return MOVE_ENDED;
    if (w == WAKE_TIMEOUT) {
        conn_end(c, END_IDLE);
        return MOVE_ENDED;
    }
    return 0;
}

/* Whether from, where splice just returned 0, is at EOF and not at TCP urgent data. */
static int at_eof(int from) {
    char probe = 0;
    return recv(from, &probe, 1, MSG_PEEK | MSG_DONTWAIT) != 1;
}

/* read_chunk's answer when c ended in it: no buffer to fall back to. */
enum { READ_ENDED = -2 };

/* Reads up to want bytes from `from`: spliced into k's pipe (*piped set), or read into its buffer.
 * Returns as read does, or READ_ENDED. */
static ssize_t read_chunk(struct conn *c, struct copier *k, int from, size_t want, int *piped) {
    *piped = k->pipe[0] >= 0;
    if (!*piped) return read(from, k->buf, want);
    ssize_t n = splice(from, NULL, k->pipe[1], NULL, want, SPLICE_F_MOVE);
    if (n > 0 || (n < 0 && errno != EINVAL && errno != ENOSYS)) return n;
    /* splice returns 0 at TCP urgent data as at EOF (a peek tells them apart), and
     * EINVAL where these fds cannot splice: then read through the buffer. */
    if (n == 0 && at_eof(from)) return 0;
    if (!k->buf && !(k->buf = malloc(cfg.buffer_size))) {
        conn_end(c, END_CLIENT);
        return READ_ENDED;
    }
    *piped = 0;
    return read(from, k->buf, want);
}

/* copy_bytes, and for copy_stream also (wait_first set): each read waits in copy_wait first,
 * and MOVE_LEFT is returned when the loop for direction d leaves its worker there. */
static int64_t move(struct conn *c, struct copier *k, int from, int to, uint64_t limit,
                    int wait_first, enum dir d) {
    int rate_limit = c->cfg->rate_limit;
    size_t chunk = chunk_size(rate_limit);
    uint64_t moved = 0;
    while (moved < limit) {
        size_t want = limit - moved < chunk ? (size_t)(limit - moved) : chunk;
        if (rate_limit) pace_sleep(k);
        int stop = wait_first ? wait_readable(c, d, from) : 0;
        if (stop) return stop;
        int piped;
        ssize_t n = read_chunk(c, k, from, want, &piped);
        if (n == 0) break; /* EOF */
        if (n < 0) {
            if (n != READ_ENDED && retry_or_end(c, from, errno, d)) continue;
            return MOVE_ENDED;
        }
        touch(c);
        if (too_slow(c, d, (size_t)n)) return MOVE_ENDED;
        if (piped ? drain_pipe(c, k, to, (size_t)n) : copy_send(c, to, k->buf, (size_t)n))
            return MOVE_ENDED;
        moved += (uint64_t)n;
        if (rate_limit) copy_pace_spend(k, mono_ns(), (size_t)n, rate_limit);
    }
    return (int64_t)moved;
}

int64_t copy_bytes(struct conn *c, struct copier *k, int from, int to, uint64_t limit) {
    return move(c, k, from, to, limit, 0, read_dir(c, from));
}

enum streamed copy_stream(struct conn *c, struct copier *k, enum dir d) {
    int from = d == UP ? c->client : c->server;
    int to = d == UP ? c->server : c->client;
    int64_t moved = move(c, k, from, to, UINT64_MAX, cfg.park_after != 0, d);
    if (moved == MOVE_LEFT) return STREAM_LEAVE;
    if (moved < 0) return STREAM_ENDED;
    shutdown(to, SHUT_WR); /* EOF: pass the half-close on; the other direction goes on */
    c->eof[d] = 1;
    copy_loop_done(c, d);
    return STREAM_EOF;
}
