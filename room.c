/* room.c — the waiting room: when a connection gives its worker up, and where it waits until its
 * bytes come. Two halves. The decision, on the worker threads: whether a connection that is about
 * to wait for bytes should leave its worker (room_due: a turn, or nothing to do), the bells that
 * ask a thread to look again (room_ring), the deadline that governs a connection on a worker and
 * parked alike (room_deadline). The room, on the acceptor thread: the heap of parked connections
 * by deadline and their watches in the acceptor's epoll set. copy.c's copy_wait asks the
 * decision; pool.c hands a connection that leaves through its mailbox to the acceptor, which lets
 * it enter here and hands back to the pool what comes out (woken, expired, the stop). The room
 * calls neither: it is below both, and returns the connections instead. */
#include "proxy.h"

#include <poll.h>
#include <stdlib.h>
#include <sys/epoll.h>

/* The room. All of it belongs to the acceptor thread; room_start and room_end run before and
 * after it. The decision's half keeps no state: it reads the connection and what pool.c
 * publishes (stats.waiting, stats.stopping). */
static struct {
    int ep; /* the acceptor's epoll set, where parked sockets are watched */
    /* Every parked connection, in a binary min-heap by deadline (those with none last), each
     * knowing its place (c->slot): the nearest deadline is at the top, and a connection that
     * leaves early is taken out in O(log n). */
    struct conn **heap;
    int nheap;
} room;

/* ---- the decision: whether a connection leaves its worker -------------------------------- */

void room_ring(struct seat *s) {
    uint64_t one = 1;
    ssize_t n = write(s->bell, &one, sizeof one);
    (void)n; /* it fails only when the counter is full, and then the bell rings anyway */
}

/* Rings the other loop's thread, wherever it waits, so that it leaves too at its next safe
 * point. */
void room_ask_leave(struct conn *c, enum dir d, enum leave why) {
    int no = LEAVE_NO;
    atomic_compare_exchange_strong(&c->leave, &no, (int)why);
    if (c->relay) room_ring(&c->seats[!d]);
}

uint64_t room_deadline(struct conn *c) {
    if (c->dial) return c->dial->until;
    if (c->head_deadline) return c->head_deadline;
    int s = c->relay ? c->cfg->idle_timeout : c->cfg->keepalive_timeout;
    return s ? atomic_load(&c->last_ns) + (uint64_t)s * 1000000000u : 0;
}

/* Why close and not keep: nginx and haproxy close idle keep-alive connections at a stop too. A tcp
 * connection is never between requests: when it can wait it is always a relay or a dial. */
int room_between_requests(const struct conn *c) {
    return cfg.mode == MODE_HTTP && !c->relay && !c->dial && !c->head_first;
}

/* The earlier of two deadlines, 0 meaning none. */
static uint64_t earlier(uint64_t a, uint64_t b) {
    return !a || (b && b < a) ? b : a;
}

/* Whether c waits on its client: an http connection waiting for a request, or the rest of a
 * head, does; a relay does when its last byte went to the client, which has what it asked for;
 * a relay whose last byte went upstream waits for the server's answer. */
static int on_client(struct conn *c) {
    return !c->relay || atomic_load_explicit(&c->last_dir, memory_order_relaxed) == DOWN;
}

/* While others wait: at once in a dial (its connect or lookup is nothing a worker can speed up,
 * and a black-holed upstream would hold one for connect_timeout); once its time slice is over (a
 * turn); or, with nothing to do (LEAVE_PARK), at once if it never moved a byte, and after
 * QUIET_MS if it waits on its client, which may think for seconds. One waiting for an upstream's
 * answer keeps its worker to the end of its slice: the answer is on its way, and parking those
 * under load filled the queue with their own wake-ups. With nobody waiting: once it was quiet for
 * park_after, and a dial never (it is bounded by connect_timeout anyway). Only the last loop to
 * wait keeps an eye on the clock; the other is woken by its bytes or its bell. */
enum leave room_due(struct conn *c, uint64_t now, int last_awake, uint64_t *until) {
    int others = atomic_load(&stats.waiting) > 0;
    uint64_t last_ns = atomic_load(&c->last_ns), quiet = (uint64_t)cfg.park_after;
    if (c->dial) return others ? LEAVE_PARK : LEAVE_NO;
    /* The stop: an http connection between requests, quiet for QUIET_MS (a client that sends
     * its requests back to back is not idle between them), leaves here to be closed (park). */
    if (atomic_load(&stats.stopping) && room_between_requests(c)) {
        uint64_t at = last_ns + (uint64_t)QUIET_MS * 1000000u;
        if (now >= at) return LEAVE_PARK;
        *until = earlier(*until, at);
    }
    if (others && cfg.time_slice && now >= c->slice_end) return LEAVE_TURN;
    if (!last_awake) return LEAVE_NO;
    if (others && last_ns == c->start_ns) return LEAVE_PARK;
    if (others && cfg.time_slice) *until = earlier(*until, c->slice_end);
    if (others && on_client(c) && QUIET_MS < quiet) quiet = QUIET_MS;
    uint64_t at = last_ns + quiet * 1000000u;
    if (now >= at) return LEAVE_PARK;
    *until = earlier(*until, at);
    return LEAVE_NO;
}

int room_has_bytes(const struct conn *c) {
    struct pollfd p[2];
    nfds_t n = 0;
    if (!c->relay || !c->eof[UP]) p[n++] = (struct pollfd){.fd = c->client, .events = POLLIN};
    if (c->relay && !c->eof[DOWN]) p[n++] = (struct pollfd){.fd = c->server, .events = POLLIN};
    return poll(p, n, 0) > 0;
}

/* ---- the heap of parked connections, by deadline --------------------------------------- */

/* Puts c at place i of the heap. */
static void heap_set(int i, struct conn *c) {
    room.heap[i] = c;
    c->slot = i;
}

/* Moves the connection at place i up while its deadline is nearer than its parent's. */
static void heap_up(int i) {
    struct conn *c = room.heap[i];
    while (i > 0 && room.heap[(i - 1) / 2]->deadline > c->deadline) {
        heap_set(i, room.heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    heap_set(i, c);
}

/* Moves the connection at place i down while a child's deadline is nearer. */
static void heap_down(int i) {
    struct conn *c = room.heap[i];
    for (;;) {
        int k = 2 * i + 1;
        if (k >= room.nheap) break;
        if (k + 1 < room.nheap && room.heap[k + 1]->deadline < room.heap[k]->deadline) k++;
        if (c->deadline <= room.heap[k]->deadline) break;
        heap_set(i, room.heap[k]);
        i = k;
    }
    heap_set(i, c);
}

/* Takes c out of the heap: the last connection fills its place and moves up or down. */
static void heap_remove(struct conn *c) {
    struct conn *last = room.heap[--room.nheap];
    int i = c->slot;
    c->slot = -1;
    if (last == c) return;
    heap_set(i, last);
    heap_up(i);
    heap_down(last->slot);
}

/* ---- the room: watches, entering, leaving ----------------------------------------------- */

int room_start(int ep) {
    room.ep = ep;
    room.heap = calloc((size_t)cfg.max_connections, sizeof(struct conn *));
    return room.heap ? 0 : -1;
}

void room_end(void) {
    free(room.heap);
}

/* Stops watching c's sockets. Its watches are cleared, so that an event for it still in this
 * round's batch is known to be stale. */
static void unwatch(struct conn *c) {
    for (int d = UP; d <= DOWN; d++) {
        if (!c->watch[d].c) continue;
        epoll_ctl(room.ep, EPOLL_CTL_DEL, c->watch[d].fd, NULL);
        c->watch[d].c = NULL;
    }
}

/* Watches fd for direction d of c: for bytes or a hang-up, or (out) for a connect's end.
 * Returns 0 or -1. */
static int watch(struct conn *c, enum dir d, int fd, int out) {
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN | EPOLLRDHUP,
                             .data.ptr = &c->watch[d]};
    c->watch[d] = (struct watch){.c = c, .fd = fd};
    if (epoll_ctl(room.ep, EPOLL_CTL_ADD, fd, &ev) == 0) return 0;
    c->watch[d].c = NULL;
    return -1;
}

/* A relay is watched on each side that has not reached EOF (a half-closed socket is always
 * readable: watching it would bounce c between here and the pool forever); a connection between
 * requests or in a request head on its client, and on its kept-alive server connection, which
 * may close meanwhile; one in a dial on its lookup or connect alone (its client may have sent
 * more already: that waits for the upstream). Its deadline is the one it had on its worker
 * (room_deadline): the same rule parked or not. */
int room_enter(struct conn *c) {
    int ok = 1;
    c->watch[UP].c = c->watch[DOWN].c = NULL;
    if (c->dial)
        ok = watch(c, DOWN, c->dial->fd, c->dial->out) == 0;
    else if ((!c->relay || !c->eof[UP]) && !c->held_until)
        ok = watch(c, UP, c->client, 0) == 0;
    if (ok && !c->dial && c->server >= 0 && (!c->relay || !c->eof[DOWN]))
        ok = watch(c, DOWN, c->server, 0) == 0;
    if (!ok) {
        unwatch(c);
        return -1;
    }
    c->deadline = c->held_until ? c->held_until : room_deadline(c);
    if (!c->deadline) c->deadline = UINT64_MAX; /* never: it sorts last */
    heap_set(room.nheap++, c);
    heap_up(c->slot);
    return 0;
}

/* Takes c out of the room: its watches and its place in the heap. */
static void leave_room(struct conn *c) {
    unwatch(c);
    heap_remove(c);
    c->held_until = 0;
}

struct conn *room_woken(struct watch *w) {
    struct conn *c = w->c;
    if (!c) return NULL; /* stale: c left the room earlier in this batch */
    if (!c->relay && !c->dial && w == &c->watch[DOWN]) {
        /* The kept-alive server connection closed, or spoke out of turn: it can carry no
         * further request. The client stays parked; its next request opens a new one. */
        epoll_ctl(room.ep, EPOLL_CTL_DEL, c->server, NULL);
        c->watch[DOWN].c = NULL;
        close(c->server);
        c->server = -1;
        return NULL;
    }
    leave_room(c);
    return c;
}

/* One held for its rate is watched from now on, as any other between requests. */
struct conn *room_expire(uint64_t now, int *serve) {
    while (room.nheap && room.heap[0]->deadline <= now) {
        struct conn *c = room.heap[0];
        int held = c->held_until != 0;
        leave_room(c);
        if (held) { /* the time it was not read is not its client's idle time */
            atomic_store(&c->last_ns, now);
            if (room_enter(c) == 0) continue;
            *serve = 1;
            return c;
        }
        atomic_fetch_add(&stats.room_timeouts, 1);
        *serve = c->head_deadline || c->dial;
        return c;
    }
    return NULL;
}

uint64_t room_next_deadline(void) {
    return room.nheap && room.heap[0]->deadline < UINT64_MAX ? room.heap[0]->deadline : 0;
}

/* Collected first, then taken out: taking one out moves others in the heap. */
struct conn *room_take_idle(void) {
    struct conn *idle = NULL;
    for (int i = 0; i < room.nheap; i++)
        if (room_between_requests(room.heap[i])) {
            room.heap[i]->next = idle;
            idle = room.heap[i];
        }
    for (struct conn *c = idle; c; c = c->next) leave_room(c);
    return idle;
}

struct conn *room_take_any(void) {
    if (!room.nheap) return NULL;
    struct conn *c = room.heap[0];
    leave_room(c);
    return c;
}
