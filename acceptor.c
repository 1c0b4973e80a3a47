/* acceptor.c — the acceptor thread. One thread, one epoll set: the listening socket, the pool's
 * mailbox of parked connections, and the sockets of every parked connection, which room.c
 * watches there. A new client is admitted (allow-list, max_connections, the queue) and handed
 * to the pool; a parked connection is let into the room, and what comes out of it goes back into
 * the pool's queue, to whichever worker is free (woken: its socket is readable or hung up), or
 * is closed here (its wait was too long). This is Apache httpd's event MPM: blocking workers for
 * connections with work, one poll set for those without. Nothing here blocks but epoll_wait. */
#include "proxy.h"

#include <fcntl.h>
#include <linux/filter.h>
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

/* ---- the waiting room's doors (room.c) ------------------------------------------------ */

/* Lets c into the room. */
static void enter(struct conn *c) {
    /* The kernel would not watch it (out of memory): serve it instead of losing it. */
    if (room_enter(c) < 0) pool_resume(c);
}

/* A watched socket of a parked connection is readable or hung up. */
static void woken(struct watch *w) {
    struct conn *c = room_woken(w);
    if (c) pool_resume(c);
}

/* Ends the waits whose time is up: closed here, but for one in a request head, which is owed
 * a 408, and one in a dial, which tries its next address or is owed a 504: each goes back to a
 * worker for that. */
static void expire(uint64_t now) {
    struct conn *c;
    int serve;
    while ((c = room_expire(now, &serve))) {
        if (serve)
            pool_resume(c);
        else
            pool_close_parked(c, END_IDLE);
    }
}

/* ms until the nearest deadline (a parked connection's, the listener's rest); -1: none. */
static int next_wait(uint64_t now) {
    uint64_t next = room_next_deadline();
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
 * accept and the close, only to be reset there. One knocking now sends its SYN again after a
 * second, and meets a closed port then, or with reuse_port another process's listener. */
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
    for (struct conn *c = room_take_idle(), *next; c; c = next) {
        next = c->next;
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
    for (struct conn *c; (c = room_take_any());) pool_close_parked(c, END_STOPPED);
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
    /* Accepted sockets do not inherit O_NONBLOCK on Linux: they stay blocking for the workers. */
    if (fcntl(listen_fd, F_SETFL, O_NONBLOCK) < 0) return -1;
    acceptor.stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (acceptor.stop_fd < 0) return -1;
    acceptor.ep = epoll_create1(EPOLL_CLOEXEC);
    if (acceptor.ep < 0) return close_failed(acceptor.stop_fd);
    if (room_start(acceptor.ep) < 0 || epoll_ctl(acceptor.ep, EPOLL_CTL_ADD, listen_fd, &on) < 0 ||
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
    room_end();
}
