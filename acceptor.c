/* acceptor.c — the acceptor thread and its waiting room. One thread, one epoll set: the
 * listening socket, the pool's mailbox of parked connections, and the sockets of every parked
 * connection. A new client is admitted (allow-list, max_connections, the queue) and handed to
 * the pool; a parked connection whose socket becomes readable or hangs up goes back into the
 * pool's queue, to whichever worker is free; one that waits too long is closed here. This is
 * Apache httpd's event MPM: blocking workers for connections with work, one poll set for those
 * without. Nothing here blocks but epoll_wait. */
#include "proxy.h"

#include <fcntl.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#define EVENTS       256 /* events taken from epoll per wait */
#define ACCEPT_BATCH 64  /* clients accepted per wait, so that wake-ups are not kept waiting */

/* How long a parked connection may wait, by what it waits for. */
enum kind {
    KEEPALIVE, /* an http connection between requests: keepalive_timeout */
    RELAY,     /* raw bytes both ways (tcp mode, tunnels, upgrades): idle_timeout */
    KINDS
};

/* A queue of parked connections in deadline order, linked through prev and next. All of a kind
 * share one timeout counted from their last byte, and they park a little after it (park_after,
 * or at once when others queue), so each joins at the tail or a step or two before it: the
 * head always has the nearest deadline, and no timer tree is needed. */
struct fifo {
    struct conn *head, *tail;
    uint64_t timeout_ns; /* 0: never */
};

/* All of it belongs to the acceptor thread; acceptor_start and acceptor_stop run before and
 * after it. */
static struct {
    const struct mode *mode;
    pthread_t thread;
    int listen_fd, ep;
    uint64_t paused_until; /* accept failed for want of fds: the listener rests until then */
    struct fifo fifo[KINDS];
} a;

static _Atomic int stopping; /* set by acceptor_stop; the acceptor sees it within a tick */

/* Tags in epoll's data for the two sockets that are not connections'. */
static struct watch listener_tag, mailbox_tag;

/* ---- admitting new clients ------------------------------------------------------------ */

/* Logs a refused connection (peer NULL: accept itself failed), at most one line a second:
 * a flood of refusals must not flood the log too. */
static void log_refused(const char *why, const struct addr *peer) {
    static uint64_t last;
    static unsigned quiet;
    uint64_t now = mono_ns();
    char p[64] = "accept";
    if (last && now - last < 1000000000u) {
        quiet++;
        return;
    }
    if (peer) addr_format(peer, p, sizeof p);
    log_line("%s refused: %s (%u more refusals not logged)", p, why, quiet);
    last = now;
    quiet = 0;
}

/* Turns a client away: counted, logged, the mode's last word, closed. */
static void refuse(int fd, const struct addr *peer, enum refusal why, const char *reason) {
    atomic_fetch_add(&stats.refused[why], 1);
    log_refused(reason, peer);
    if (why != REFUSED_NOT_ALLOWED && a.mode->refuse) a.mode->refuse(fd);
    close(fd);
}

/* Lets one accepted client in: it must be in [access] allow, fewer than max_connections may be
 * open, and the queue must have room. Only this thread adds to stats.active, so the check and
 * the count cannot race past the limit. */
static void admit_client(int fd, struct addr *peer) {
    addr_unmap(peer); /* a dual-stack listener's IPv4 clients are IPv4 from here on */
    atomic_fetch_add(&stats.accepted, 1);
    if (!cidr_match(cfg.allow, cfg.nallow, peer)) {
        refuse(fd, peer, REFUSED_NOT_ALLOWED, "not in [access] allow");
        return;
    }
    if (atomic_load(&stats.active) >= (uint64_t)cfg.max_connections) {
        refuse(fd, peer, REFUSED_MAX_CONNECTIONS, "max_connections open");
        return;
    }
    atomic_fetch_add(&stats.active, 1);
    if (pool_submit(fd, peer) == 0) return;
    atomic_fetch_sub(&stats.active, 1);
    refuse(fd, peer, REFUSED_QUEUE_FULL, "queue full");
}

/* Accepts one client and admits it. Returns 0, or -1 with accept's errno (EAGAIN: the backlog
 * is empty). Nothing slow here: accepted sockets inherit their options from the listener. */
static int accept_one(void) {
    struct addr peer = {.len = sizeof peer.sa};
    int fd = accept4(a.listen_fd, (struct sockaddr *)&peer.sa, &peer.len, SOCK_CLOEXEC);
    if (fd < 0) return -1;
    admit_client(fd, &peer);
    return 0;
}

/* The listener is readable: accepts up to ACCEPT_BATCH clients. Out of fds or memory, the
 * clients stay in the kernel's backlog and the listener rests for 100 ms instead of waking
 * this thread again at once; they are served once descriptors free up. */
static void accept_some(void) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (accept_one() == 0) continue;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EAGAIN) return;
        atomic_fetch_add(&stats.accept_errors, 1);
        log_refused(strerror(errno), NULL);
        struct epoll_event off = {.events = 0, .data.ptr = &listener_tag};
        epoll_ctl(a.ep, EPOLL_CTL_MOD, a.listen_fd, &off);
        a.paused_until = mono_ns() + 100000000u;
        return;
    }
}

/* The listener's rest is over: it is watched again. */
static void accept_again(void) {
    struct epoll_event on = {.events = EPOLLIN, .data.ptr = &listener_tag};
    a.paused_until = 0;
    epoll_ctl(a.ep, EPOLL_CTL_MOD, a.listen_fd, &on);
}

/* Once stopping: takes what is already in the listener's backlog (those clients are connected,
 * and closing the listener would reset them), at most max_connections of them, so that a
 * flood cannot keep the acceptor from ending. */
static void drain_backlog(void) {
    int left = cfg.max_connections;
    while (left > 0) {
        if (accept_one() == 0)
            left--;
        else if (errno != EINTR && errno != ECONNABORTED)
            break; /* EAGAIN: the backlog is empty */
    }
}

/* ---- the waiting room ------------------------------------------------------------------- */

/* Puts c in deadline order, walking from the tail. */
static void fifo_insert(struct fifo *f, struct conn *c) {
    struct conn *after = f->tail;
    while (after && after->deadline > c->deadline) after = after->prev;
    c->prev = after;
    c->next = after ? after->next : f->head;
    if (c->next)
        c->next->prev = c;
    else
        f->tail = c;
    if (after)
        after->next = c;
    else
        f->head = c;
}

static void fifo_unlink(struct fifo *f, struct conn *c) {
    if (c->prev)
        c->prev->next = c->next;
    else
        f->head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        f->tail = c->prev;
}

/* Stops watching c's sockets. Its watches are cleared, so that an event for it still in this
 * round's batch is known to be stale. */
static void unwatch(struct conn *c) {
    for (int d = UP; d <= DOWN; d++) {
        if (!c->watch[d].c) continue;
        epoll_ctl(a.ep, EPOLL_CTL_DEL, c->watch[d].fd, NULL);
        c->watch[d].c = NULL;
    }
}

/* Watches fd for direction d of c. Returns 0 or -1. */
static int watch(struct conn *c, enum dir d, int fd) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = &c->watch[d]};
    c->watch[d] = (struct watch){.c = c, .fd = fd};
    if (epoll_ctl(a.ep, EPOLL_CTL_ADD, fd, &ev) == 0) return 0;
    c->watch[d].c = NULL;
    return -1;
}

/* Takes in a connection a worker parked. A relay is watched on each side that has not reached
 * EOF (a half-closed socket is always readable: watching it would bounce c between here and
 * the pool forever); a connection between requests on its client, and on its kept-alive
 * upstream connection, which may close meanwhile. Its time counts from its last byte. */
static void enter(struct conn *c) {
    enum kind k = c->relay ? RELAY : KEEPALIVE;
    int ok = 1;
    c->watch[UP].c = c->watch[DOWN].c = NULL;
    if (!c->relay || !c->eof[UP]) ok = watch(c, UP, c->client) == 0;
    if (ok && c->upstream >= 0 && (!c->relay || !c->eof[DOWN]))
        ok = watch(c, DOWN, c->upstream) == 0;
    if (!ok) { /* the kernel would not watch it (out of memory): serve it instead of losing it */
        unwatch(c);
        pool_resume(c);
        return;
    }
    c->deadline = atomic_load(&c->last_ns) + a.fifo[k].timeout_ns;
    fifo_insert(&a.fifo[k], c);
}

/* Takes c out of the room: its watches and its place in the FIFO. */
static void leave_room(struct conn *c) {
    unwatch(c);
    fifo_unlink(&a.fifo[c->relay ? RELAY : KEEPALIVE], c);
}

/* A watched socket of a parked connection is readable or hung up. */
static void woken(struct watch *w) {
    struct conn *c = w->c;
    if (!c) return; /* stale: c left the room earlier in this batch */
    if (!c->relay && w == &c->watch[DOWN]) {
        /* The kept-alive upstream connection closed, or spoke out of turn: it can carry no
         * further request. The client stays parked; its next request opens a new one. */
        epoll_ctl(a.ep, EPOLL_CTL_DEL, c->upstream, NULL);
        c->watch[DOWN].c = NULL;
        close(c->upstream);
        c->upstream = -1;
        return;
    }
    leave_room(c);
    pool_resume(c);
}

/* Closes the connections whose time in the room is up. */
static void expire(uint64_t now) {
    for (int k = 0; k < KINDS; k++) {
        struct fifo *f = &a.fifo[k];
        while (f->timeout_ns && f->head && f->head->deadline <= now) {
            struct conn *c = f->head;
            leave_room(c);
            atomic_fetch_add(&stats.room_timeouts, 1);
            pool_close_parked(c, END_IDLE);
        }
    }
}

/* ms until the nearest deadline, at most TICK_MS (the stop is checked every tick). */
static int next_wait(uint64_t now) {
    uint64_t wait = (uint64_t)TICK_MS * 1000000u;
    for (int k = 0; k < KINDS; k++) {
        struct conn *head = a.fifo[k].head;
        if (a.fifo[k].timeout_ns && head && head->deadline < now + wait)
            wait = head->deadline > now ? head->deadline - now : 0;
    }
    if (a.paused_until && a.paused_until < now + wait)
        wait = a.paused_until > now ? a.paused_until - now : 0;
    return (int)((wait + 999999) / 1000000);
}

/* The acceptor thread: waits on the listener, the mailbox and every parked socket, until the
 * stop; then drains the backlog and closes the room. */
static void *acceptor_main(void *arg) {
    struct epoll_event ev[EVENTS];
    (void)arg;
    while (!atomic_load(&stopping)) {
        int n = epoll_wait(a.ep, ev, EVENTS, next_wait(mono_ns())), mail = 0;
        for (int i = 0; i < n; i++) {
            struct watch *w = ev[i].data.ptr;
            if (w == &listener_tag)
                accept_some();
            else if (w == &mailbox_tag)
                mail = 1;
            else
                woken(w);
        }
        /* The mailbox last: a connection woken in this batch may have parked again already,
         * and its watches must not be set before the batch's stale events for it are past. */
        for (struct conn *c = mail ? pool_take_parked() : NULL, *next; c; c = next) {
            next = c->next;
            enter(c);
        }
        uint64_t now = mono_ns();
        expire(now);
        if (a.paused_until && now >= a.paused_until) accept_again();
    }
    drain_backlog();
    return NULL;
}

/* ---- start and stop ------------------------------------------------------------------- */

/* Starts the acceptor thread on the listening socket fd (made non-blocking here), handing
 * clients to the pool, which runs mode. Returns 0 or -1. */
int acceptor_start(int listen_fd, const struct mode *mode) {
    struct epoll_event on = {.events = EPOLLIN, .data.ptr = &listener_tag};
    struct epoll_event mail = {.events = EPOLLIN, .data.ptr = &mailbox_tag};
    a.mode = mode;
    a.listen_fd = listen_fd;
    a.fifo[KEEPALIVE].timeout_ns = (uint64_t)cfg.keepalive_timeout * 1000000000u;
    a.fifo[RELAY].timeout_ns = (uint64_t)cfg.idle_timeout * 1000000000u;
    /* Accepted sockets do not inherit O_NONBLOCK on Linux: they stay blocking for the workers. */
    if (fcntl(listen_fd, F_SETFL, O_NONBLOCK) < 0) return -1;
    a.ep = epoll_create1(EPOLL_CLOEXEC);
    if (a.ep < 0) return -1;
    if (epoll_ctl(a.ep, EPOLL_CTL_ADD, listen_fd, &on) < 0 ||
        epoll_ctl(a.ep, EPOLL_CTL_ADD, pool_parked_fd(), &mail) < 0 ||
        pthread_create(&a.thread, NULL, acceptor_main, NULL))
        return close_failed(a.ep);
    return 0;
}

/* Stops accepting (the backlog is taken in first), and closes every parked connection: only
 * connections with work in progress get the grace period. Returns how many were closed. */
uint64_t acceptor_stop(void) {
    uint64_t closed = 0;
    atomic_store(&stopping, 1);
    pthread_join(a.thread, NULL);
    for (struct conn *c = pool_room_close(), *next; c; c = next, closed++) {
        next = c->next;
        pool_close_parked(c, END_STOPPED);
    }
    for (int k = 0; k < KINDS; k++)
        for (struct conn *c; (c = a.fifo[k].head); closed++) {
            leave_room(c);
            pool_close_parked(c, END_STOPPED);
        }
    close(a.ep);
    return closed;
}
