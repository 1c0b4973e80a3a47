/* acceptor.c — the acceptor thread and its waiting room. One thread, one epoll set: the
 * listening socket, the pool's mailbox of parked connections, and the sockets of every parked
 * connection. A new client is admitted (allow-list, max_connections, the queue) and handed to
 * the pool; a parked connection whose socket becomes readable or hangs up goes back into the
 * pool's queue, to whichever worker is free; one that waits too long is closed here. This is
 * Apache httpd's event MPM: blocking workers for connections with work, one poll set for those
 * without. Nothing here blocks but epoll_wait. */
#include "proxy.h"

#include <fcntl.h>
#include <linux/filter.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define EVENTS       256 /* events taken from epoll per wait */
#define ACCEPT_BATCH 64  /* clients accepted per wait, so that wake-ups are not kept waiting */

/* The acceptor's state. All of it belongs to the acceptor thread; acceptor_start and acceptor_end
 * run before and after it. */
static struct {
    pthread_t thread;
    int listen_fd, ep, stop_fd;
    int listening;         /* the listener is watched: 0 while it rests */
    int stopped;           /* the stop: the listener is no longer watched, ever */
    uint64_t paused_until; /* accept failed for want of fds: the listener rests until then */
    int intake_closed;     /* the queue had no room for a new one: it rests until it has */
    /* Every parked connection, in a binary min-heap by deadline (those with none last), each
     * knowing its place (c->slot): the nearest deadline is at the top, and a connection that
     * leaves early is taken out in O(log n). */
    struct conn **heap;
    int nheap;
} acceptor;

/* The stop, in two steps, each set by its function, which rings stop_fd: no more clients
 * (acceptor_stop); then the waiting room closes too (acceptor_end). */
static _Atomic int stopping, ending;
static _Atomic int drain; /* acceptor_stop: the backlog is ours to take in first */

/* acceptor_stop waits here until the acceptor has taken in the backlog and let the listener
 * go: only then may the listener close. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;        /* the acceptor no longer touches the listener */
    uint64_t closed; /* connections between requests it closed then */
} step = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* Tags in epoll's data for the sockets that are not connections'. */
static struct watch listener_tag, mailbox_tag, stop_tag;

/* ---- admitting new clients ------------------------------------------------------------ */

/* Lets one accepted client in: it must be in the newest config's [access] allow, fewer than
 * max_connections may be open, and its per-client limits must let it (limits.c). A client
 * from trusted_proxies is a balancer: who the real client is, and so whether it may come in,
 * is known only from its PROXY header, which a worker reads (pool.c). Only this thread adds to
 * stats.active, so the check and the count cannot race past the limit. */
static void admit_client(int fd, struct addr *peer) {
    struct config *now = config_hold(); /* what it is served by, if it is let in */
    int behind, entry = -1, why = -1;
    addr_unmap(peer); /* a dual-stack listener's IPv4 clients are IPv4 from here on */
    atomic_fetch_add(&stats.accepted, 1);
    behind = nets_match(&now->trusted_proxies, peer);
    if (!behind && !nets_match(&now->allow, peer))
        why = REFUSED_NOT_ALLOWED;
    else if (atomic_load(&stats.active) >= (uint64_t)cfg.max_connections)
        why = REFUSED_MAX_CONNECTIONS;
    else if (!behind)
        why = limits_admit(now, peer, cfg.mode == MODE_TCP, &entry);
    if (why >= 0) {
        pool_turn_away(fd, peer, (enum refusal)why);
        close(fd);
    } else {
        atomic_fetch_add(&stats.active, 1);
        if (pool_submit(fd, peer, now, entry, behind) == 0) return;
        atomic_fetch_sub(&stats.active, 1); /* the pool is stopping */
        limits_leave(entry);
        close(fd);
    }
    config_drop(now);
}

/* Accepts one client and admits it. Returns 0, or -1 with accept's errno (EAGAIN: the backlog
 * is empty). Nothing slow here: accepted sockets inherit their options from the listener. */
static int accept_one(void) {
    struct addr peer = {.len = sizeof peer.sa};
    int fd = accept4(acceptor.listen_fd, (struct sockaddr *)&peer.sa, &peer.len, SOCK_CLOEXEC);
    if (fd < 0) return -1;
    admit_client(fd, &peer);
    return 0;
}

/* Stops watching the listener: new clients wait in the kernel's backlog meanwhile. */
static void accept_rest(void) {
    struct epoll_event off = {.events = 0, .data.ptr = &listener_tag};
    epoll_ctl(acceptor.ep, EPOLL_CTL_MOD, acceptor.listen_fd, &off);
    acceptor.listening = 0;
}

/* The listener is readable: accepts up to ACCEPT_BATCH clients, while the queue has room for
 * them. When it has none, the listener rests until the pool rings (a worker took a new one):
 * a burst of clients waits in the kernel's backlog, connected, instead of being refused. Out
 * of fds or memory, it rests for 100 ms, and those clients are served once descriptors free
 * up. */
static void accept_some(void) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (!pool_intake_open()) {
            acceptor.intake_closed = 1;
            accept_rest();
            return;
        }
        if (accept_one() == 0) continue;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EAGAIN) return;
        atomic_fetch_add(&stats.accept_errors, 1);
        log_refused(strerror(errno), NULL);
        acceptor.paused_until = mono_ns() + 100000000u;
        accept_rest();
        return;
    }
}

/* The listener's rest is over (its time, and room in the queue): it is watched again. */
static void accept_again(uint64_t now) {
    struct epoll_event on = {.events = EPOLLIN, .data.ptr = &listener_tag};
    if (acceptor.listening || acceptor.stopped ||
        (acceptor.paused_until && now < acceptor.paused_until))
        return;
    if (acceptor.intake_closed && !pool_intake_open()) return;
    acceptor.paused_until = 0;
    acceptor.intake_closed = 0;
    acceptor.listening = 1;
    epoll_ctl(acceptor.ep, EPOLL_CTL_MOD, acceptor.listen_fd, &on);
}

/* ---- the waiting room ------------------------------------------------------------------- */

/* Puts c at place i of the heap. */
static void heap_set(int i, struct conn *c) {
    acceptor.heap[i] = c;
    c->slot = i;
}

/* Moves the connection at place i up while its deadline is nearer than its parent's. */
static void heap_up(int i) {
    struct conn *c = acceptor.heap[i];
    while (i > 0 && acceptor.heap[(i - 1) / 2]->deadline > c->deadline) {
        heap_set(i, acceptor.heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    heap_set(i, c);
}

/* Moves the connection at place i down while a child's deadline is nearer. */
static void heap_down(int i) {
    struct conn *c = acceptor.heap[i];
    for (;;) {
        int k = 2 * i + 1;
        if (k >= acceptor.nheap) break;
        if (k + 1 < acceptor.nheap && acceptor.heap[k + 1]->deadline < acceptor.heap[k]->deadline)
            k++;
        if (c->deadline <= acceptor.heap[k]->deadline) break;
        heap_set(i, acceptor.heap[k]);
        i = k;
    }
    heap_set(i, c);
}

/* Takes c out of the heap: the last connection fills its place and moves up or down. */
static void heap_remove(struct conn *c) {
    struct conn *last = acceptor.heap[--acceptor.nheap];
    int i = c->slot;
    c->slot = -1;
    if (last == c) return;
    heap_set(i, last);
    heap_up(i);
    heap_down(last->slot);
}

/* Stops watching c's sockets. Its watches are cleared, so that an event for it still in this
 * round's batch is known to be stale. */
static void unwatch(struct conn *c) {
    for (int d = UP; d <= DOWN; d++) {
        if (!c->watch[d].c) continue;
        epoll_ctl(acceptor.ep, EPOLL_CTL_DEL, c->watch[d].fd, NULL);
        c->watch[d].c = NULL;
    }
}

/* Watches fd for direction d of c: for bytes or a hang-up, or (out) for a connect's end.
 * Returns 0 or -1. */
static int watch(struct conn *c, enum dir d, int fd, int out) {
    struct epoll_event ev = {.events = out ? EPOLLOUT : EPOLLIN | EPOLLRDHUP,
                             .data.ptr = &c->watch[d]};
    c->watch[d] = (struct watch){.c = c, .fd = fd};
    if (epoll_ctl(acceptor.ep, EPOLL_CTL_ADD, fd, &ev) == 0) return 0;
    c->watch[d].c = NULL;
    return -1;
}

/* Takes in a connection a worker parked. A relay is watched on each side that has not reached
 * EOF (a half-closed socket is always readable: watching it would bounce c between here and
 * the pool forever); a connection between requests or in a request head on its client, and on
 * its kept-alive upstream connection, which may close meanwhile; one in a dial on its lookup
 * or connect alone (its client may have sent more already: that waits for the upstream). Its
 * deadline is the one it had on its worker (copy_deadline): the same rule parked or not. */
static void enter(struct conn *c) {
    int ok = 1;
    c->watch[UP].c = c->watch[DOWN].c = NULL;
    if (c->dial)
        ok = watch(c, DOWN, c->dial->fd, c->dial->out) == 0;
    else if ((!c->relay || !c->eof[UP]) && !c->held_until)
        ok = watch(c, UP, c->client, 0) == 0;
    if (ok && !c->dial && c->upstream >= 0 && (!c->relay || !c->eof[DOWN]))
        ok = watch(c, DOWN, c->upstream, 0) == 0;
    if (!ok) { /* the kernel would not watch it (out of memory): serve it instead of losing it */
        unwatch(c);
        pool_resume(c);
        return;
    }
    c->deadline = c->held_until ? c->held_until : copy_deadline(c);
    if (!c->deadline) c->deadline = UINT64_MAX; /* never: it sorts last */
    heap_set(acceptor.nheap++, c);
    heap_up(c->slot);
}

/* Takes c out of the room: its watches and its place in the heap. */
static void leave_room(struct conn *c) {
    unwatch(c);
    heap_remove(c);
    c->held_until = 0;
}

/* A watched socket of a parked connection is readable or hung up. */
static void woken(struct watch *w) {
    struct conn *c = w->c;
    if (!c) return; /* stale: c left the room earlier in this batch */
    if (!c->relay && !c->dial && w == &c->watch[DOWN]) {
        /* The kept-alive upstream connection closed, or spoke out of turn: it can carry no
         * further request. The client stays parked; its next request opens a new one. */
        epoll_ctl(acceptor.ep, EPOLL_CTL_DEL, c->upstream, NULL);
        c->watch[DOWN].c = NULL;
        close(c->upstream);
        c->upstream = -1;
        return;
    }
    leave_room(c);
    pool_resume(c);
}

/* Ends the waits whose time is up: closed here, but for one in a request head, which is owed
 * a 408, and one in a dial, which tries its next address or is owed a 504: each goes back to a
 * worker for that. One held for its rate is watched from now on, as any other between
 * requests. */
static void expire(uint64_t now) {
    while (acceptor.nheap && acceptor.heap[0]->deadline <= now) {
        struct conn *c = acceptor.heap[0];
        int held = c->held_until != 0;
        leave_room(c);
        if (held) { /* the time it was not read is not its client's idle time */
            atomic_store(&c->last_ns, now);
            enter(c);
            continue;
        }
        atomic_fetch_add(&stats.room_timeouts, 1);
        if (c->head_deadline || c->dial)
            pool_resume(c);
        else
            pool_close_parked(c, END_IDLE);
    }
}

/* ms until the nearest deadline (a parked connection's, the listener's rest); -1: none. */
static int next_wait(uint64_t now) {
    uint64_t next =
        acceptor.nheap && acceptor.heap[0]->deadline < UINT64_MAX ? acceptor.heap[0]->deadline : 0;
    if (acceptor.paused_until && (!next || acceptor.paused_until < next))
        next = acceptor.paused_until;
    if (!next) return -1;
    uint64_t ms = next > now ? (next - now + 999999) / 1000000 : 0;
    return ms > 86400000u ? 86400000 : (int)ms;
}

/* ---- the stop ------------------------------------------------------------------------ */

/* Takes what is already in the listener's backlog (those clients are connected, and closing
 * the listener would reset them), at most max_connections of them, so that a flood cannot keep
 * the stop from going on. First the door shuts: a socket filter that drops every packet keeps
 * handshakes from completing, so that a client cannot slip into the backlog between the last
 * accept and the close, only to be reset there. One knocking now is refused once the listener
 * closes (its SYN is sent again after a second, and meets nothing). */
static void drain_backlog(void) {
    struct sock_filter drop_all = BPF_STMT(BPF_RET | BPF_K, 0);
    struct sock_fprog door = {.len = 1, .filter = &drop_all};
    if (setsockopt(acceptor.listen_fd, SOL_SOCKET, SO_ATTACH_FILTER, &door, sizeof door) < 0)
        log_line("stopping: the listener cannot be shut before its backlog is taken in (%s): "
                 "a client arriving meanwhile may be reset",
                 strerror(errno));
    int left = cfg.max_connections;
    while (left > 0) {
        if (accept_one() == 0)
            left--;
        else if (errno != EINTR && errno != ECONNABORTED)
            break; /* EAGAIN: the backlog is empty */
    }
}

/* The stop's first step: the backlog is taken in and the listener let go; of the parked
 * connections, those between http requests are closed (or served, if a request came), and the
 * rest (tunnels, relays, dials, heads begun) stay in the room for the grace period, where
 * their bytes wake them as before. Tells acceptor_stop. */
static void stop_accepting(void) {
    uint64_t closed = 0;
    if (atomic_load(&drain)) drain_backlog();
    epoll_ctl(acceptor.ep, EPOLL_CTL_DEL, acceptor.listen_fd, NULL);
    acceptor.stopped = 1;
    acceptor.listening = 0;
    /* From here on the pool closes, instead of parking, a connection between requests; those
     * that parked before are in the mail or the room. */
    for (struct conn *c = pool_stop_begin(), *next; c; c = next) {
        next = c->next;
        enter(c);
    }
    struct conn *idle = NULL;
    for (int i = 0; i < acceptor.nheap; i++)
        if (copy_between_requests(acceptor.heap[i])) {
            acceptor.heap[i]->next = idle;
            idle = acceptor.heap[i];
        }
    for (struct conn *c = idle, *next; c; c = next) {
        next = c->next;
        leave_room(c);
        closed += pool_stop_idle(c);
    }
    pthread_mutex_lock(&step.mu);
    step.done = 1;
    step.closed = closed;
    pthread_cond_signal(&step.cv);
    pthread_mutex_unlock(&step.mu);
}

/* The stop's last step, the grace period over: every connection still parked is closed. */
static void close_room(void) {
    for (struct conn *c = pool_room_close(), *next; c; c = next) {
        next = c->next;
        pool_close_parked(c, END_STOPPED);
    }
    while (acceptor.nheap) {
        struct conn *c = acceptor.heap[0];
        leave_room(c);
        pool_close_parked(c, END_STOPPED);
    }
}

/* The acceptor thread: waits on the listener, its bell, every parked socket and the nearest
 * deadline. Once the stop rings it takes no more clients, but keeps the room for the grace
 * period, until the stop rings again. */
static void *acceptor_main(void *arg) {
    struct epoll_event ev[EVENTS];
    (void)arg;
    while (!atomic_load(&ending)) {
        if (!acceptor.stopped && atomic_load(&stopping)) stop_accepting();
        int n = epoll_wait(acceptor.ep, ev, EVENTS, next_wait(mono_ns())), mail = 0;
        for (int i = 0; i < n; i++) {
            struct watch *w = ev[i].data.ptr;
            uint64_t rang;
            if (w == &listener_tag)
                accept_some();
            else if (w == &mailbox_tag)
                mail = 1;
            else if (w != &stop_tag)
                woken(w);
            else if (read(acceptor.stop_fd, &rang, sizeof rang) < 0) { /* EAGAIN: taken already */
            }
        }
        /* The mailbox last: a connection woken in this batch may have parked again already,
         * and its watches must not be set before the batch's stale events for it are past. */
        for (struct conn *c = mail ? pool_take_parked() : NULL, *next; c; c = next) {
            next = c->next;
            enter(c);
        }
        uint64_t now = mono_ns();
        expire(now);
        accept_again(now);
    }
    close_room();
    return NULL;
}

/* ---- start and stop ------------------------------------------------------------------- */

int acceptor_start(int listen_fd) {
    struct epoll_event on = {.events = EPOLLIN, .data.ptr = &listener_tag};
    struct epoll_event mail = {.events = EPOLLIN, .data.ptr = &mailbox_tag};
    struct epoll_event stop = {.events = EPOLLIN, .data.ptr = &stop_tag};
    acceptor.listen_fd = listen_fd;
    acceptor.listening = 1;
    acceptor.heap = calloc((size_t)cfg.max_connections, sizeof(struct conn *));
    if (!acceptor.heap) return -1;
    /* Accepted sockets do not inherit O_NONBLOCK on Linux: they stay blocking for the workers. */
    if (fcntl(listen_fd, F_SETFL, O_NONBLOCK) < 0) return -1;
    acceptor.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (acceptor.stop_fd < 0) return -1;
    acceptor.ep = epoll_create1(EPOLL_CLOEXEC);
    if (acceptor.ep < 0) return close_failed(acceptor.stop_fd);
    if (epoll_ctl(acceptor.ep, EPOLL_CTL_ADD, listen_fd, &on) < 0 ||
        epoll_ctl(acceptor.ep, EPOLL_CTL_ADD, pool_parked_fd(), &mail) < 0 ||
        epoll_ctl(acceptor.ep, EPOLL_CTL_ADD, acceptor.stop_fd, &stop) < 0 ||
        pthread_create(&acceptor.thread, NULL, acceptor_main, NULL)) {
        close(acceptor.stop_fd);
        return close_failed(acceptor.ep);
    }
    return 0;
}

/* Rings the acceptor's stop bell. */
static void ring_stop(void) {
    uint64_t one = 1;
    if (write(acceptor.stop_fd, &one, sizeof one) < 0) { /* full: it is readable anyway */
    }
}

/* Those closed were parked between requests: nothing of theirs was in progress. */
uint64_t acceptor_stop(int drain_backlog) {
    atomic_store(&drain, drain_backlog);
    atomic_store(&stopping, 1);
    ring_stop();
    pthread_mutex_lock(&step.mu);
    while (!step.done) pthread_cond_wait(&step.cv, &step.mu);
    uint64_t closed = step.closed;
    pthread_mutex_unlock(&step.mu);
    return closed;
}

void acceptor_end(void) {
    atomic_store(&ending, 1);
    ring_stop();
    pthread_join(acceptor.thread, NULL);
    close(acceptor.ep);
    close(acceptor.stop_fd);
    free(acceptor.heap);
}
