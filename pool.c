/* pool.c — the fixed pool: a slab of connection records sized at start, the queue of
 * connections that have work, `workers` pairs of threads that serve them in turns, the hand-off
 * between a worker's two threads, the relay whose two loops leave their worker together, the
 * mailbox through which connections that leave go to the acceptor, and the graceful stop. This
 * is the scheduler: it says when others wait (stats.waiting) and rings the workers that must hear
 * it; when a connection gives its worker up, and where it waits then, is room.c's (room_due,
 * asked in copy.c's copy_wait; the room, which the acceptor thread runs). How a connection is
 * served is its mode's business (tcp.c, http.c). */
#include "proxy.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* The queue, the slab and the mailbox, under one lock. Every open client connection has a
 * record from the slab: a queued one sits in the ring, a served one in its worker's w->conn, a
 * parked one in the mailbox or the waiting room (room.c). There are max_connections records,
 * as many as can be open at once (the acceptor admits no more), and the ring holds them all.
 * The mailbox is here, not in room.c, for this lock, which it shares with the stop's two flags:
 * park decides closed or parked, and the stop sets a flag and takes the mail, each in one hold
 * of it, so that none parks after the room took its last mail. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, all_idle; /* cv: a connection or the stop; all_idle: for pool_start */
    pthread_cond_t drained;      /* the stop: no connection is left (pool_drain); on the
                                    monotonic clock, set up by pool_start */
    struct conn **ring;          /* queued connections: len of them from first on */
    int size, first, len;
    int fresh;           /* of them, new ones (never served): what cfg.queue bounds */
    int intake_waits;    /* the acceptor found no room for new ones: ring it when there is */
    struct conn *slab;   /* every record, allocated once */
    struct conn **spare; /* the records not in use: a stack of nspare */
    int nspare;
    char *heads;       /* cfg.head_buffers head buffers of HEAD_MAX bytes, allocated once */
    char **spare_head; /* those not carrying a parked head: a stack of nspare_head */
    int nspare_head;
    int idle;                 /* front threads waiting in take() */
    int stopping;             /* the stop's end: workers take what is still queued, then exit */
    struct conn *mail, *last; /* parked, not yet taken by the acceptor: a list through next */
    int stop_begun;           /* the stop: one between requests that would park is closed */
    int room_closed;          /* the stop's end: any that would park is closed instead */
    int parked_fd;            /* eventfd, the acceptor's bell: mail, or room for new ones */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
          .cv = PTHREAD_COND_INITIALIZER,
          .all_idle = PTHREAD_COND_INITIALIZER};

static const struct mode *mode; /* set by pool_start, before any worker runs */
static struct worker *workers;
static int started;
static _Atomic int forced; /* the grace period is over: end every connection */

/* ---- the queue ------------------------------------------------------------------------ */

/* Rings the acceptor's bell (the mailbox's eventfd). */
static void ring_acceptor(void) {
    uint64_t one = 1;
    ssize_t n = write(pool.parked_fd, &one, sizeof one);
    (void)n; /* it fails only when the counter is full, and then it is readable anyway */
}

/* Rings every worker thread that waits for bytes with an eye on what pool.c publishes
 * (stats.waiting, stats.stopping): it must look again now. The caller has published first. */
static void ring_sleepers(void) {
    for (int i = 0; i < started; i++)
        for (int t = 0; t < 2; t++)
            if (atomic_load(&workers[i].seat[t].sleeping)) room_ring(&workers[i].seat[t]);
}

/* Publishes how many queued connections no idle worker is about to take (stats.waiting): while
 * there are any, connections take turns. When the number leaves 0, rings every thread that
 * waits for bytes with no eye on its time slice (copy_wait): it must look again now. A thread
 * says it sleeps before it reads stats.waiting, and this sets stats.waiting before it reads
 * that, so no thread misses the news. Under pool.mu. */
static void publish_waiting(void) {
    int n = pool.len > pool.idle ? pool.len - pool.idle : 0;
    if (atomic_exchange(&stats.waiting, (uint64_t)n) || !n) return;
    ring_sleepers();
}

/* Puts c at the tail of the queue. Under pool.mu. */
static void enqueue(struct conn *c) {
    c->queued_ns = mono_ns();
    pool.ring[(pool.first + pool.len++) % pool.size] = c;
    atomic_fetch_add(&stats.queued, 1);
    publish_waiting();
    pthread_cond_signal(&pool.cv);
}

/* While there is no room the acceptor stops accepting, instead of refusing: the clients wait in the
 * kernel's listen backlog meanwhile, connected. */
int pool_intake_open(void) {
    pthread_mutex_lock(&pool.mu);
    int open = pool.fresh < cfg.queue + pool.idle;
    if (!open) pool.intake_waits = 1;
    pthread_mutex_unlock(&pool.mu);
    return open;
}

void pool_turn_away(int fd, const struct addr *peer, enum refusal why) {
    atomic_fetch_add(&stats.refused[why], 1);
    log_refused(refusal_texts[why], peer);
    if (why != REFUSED_NOT_ALLOWED && mode->last_word) mode->last_word(fd, why);
}

/* Why there is always room: the ring has a place and the slab a record for every connection that
 * may be open (the acceptor admits at most max_connections, and a record is back before it stops
 * counting as active). */
int pool_submit(int fd, const struct addr *peer, struct config *cf, int entry, int behind) {
    pthread_mutex_lock(&pool.mu);
    int ok = !pool.stopping && pool.nspare > 0;
    if (ok) {
        struct conn *c = pool.spare[--pool.nspare];
        /* Its clocks start now: the time it waits for a worker is part of what its client
         * sees (the log, header_timeout, the duration histogram). */
        *c = (struct conn){.client = fd,
                           .server = -1,
                           .peer = *peer,
                           .cfg = cf,
                           .slot = -1,
                           .entry = entry,
                           .behind = behind,
                           .start_ns = mono_ns()};
        atomic_store(&c->last_ns, c->start_ns);
        pool.fresh++;
        enqueue(c);
    }
    pthread_mutex_unlock(&pool.mu);
    return ok ? 0 : -1;
}

/* Blocks until a connection is queued and returns it; NULL once the pool stops and the queue
 * is empty. */
static struct conn *take(void) {
    struct conn *c = NULL;
    pthread_mutex_lock(&pool.mu);
    if (++pool.idle == cfg.workers) pthread_cond_signal(&pool.all_idle);
    /* An idle worker is room for one more new connection (taking one changes nothing: both
     * fresh and idle go down). */
    if (pool.intake_waits && pool.fresh < cfg.queue + pool.idle) {
        pool.intake_waits = 0;
        ring_acceptor();
    }
    publish_waiting();
    while (!pool.len && !pool.stopping) pthread_cond_wait(&pool.cv, &pool.mu);
    pool.idle--;
    if (pool.len) {
        c = pool.ring[pool.first];
        pool.first = (pool.first + 1) % pool.size;
        pool.len--;
        atomic_fetch_sub(&stats.queued, 1);
        if (!c->turns) pool.fresh--;
    }
    publish_waiting();
    pthread_mutex_unlock(&pool.mu);
    return c;
}

char *pool_head_take(void) {
    pthread_mutex_lock(&pool.mu);
    char *buf = pool.nspare_head ? pool.spare_head[--pool.nspare_head] : NULL;
    pthread_mutex_unlock(&pool.mu);
    return buf;
}

void pool_head_give(char *buf) {
    pthread_mutex_lock(&pool.mu);
    pool.spare_head[pool.nspare_head++] = buf;
    pthread_mutex_unlock(&pool.mu);
}

/* Returns a closed connection's record to the slab; only then does it stop counting as
 * active, so that the acceptor, which admits up to max_connections active ones, always finds a
 * record for the next. The last one out in the stop says so. */
static void release(struct conn *c) {
    pthread_mutex_lock(&pool.mu);
    pool.spare[pool.nspare++] = c;
    if (atomic_fetch_sub(&stats.active, 1) == 1 && pool.stop_begun)
        pthread_cond_broadcast(&pool.drained);
    pthread_mutex_unlock(&pool.mu);
}

/* ---- a worker's two threads ----------------------------------------------------------- */

void pool_set_server(struct worker *w, int fd) {
    pthread_mutex_lock(&w->mu);
    int old = w->conn->server;
    w->conn->server = fd;
    atomic_store(&w->conn->server_failed, 0);
    /* A forced stop that came while this connection was still connecting saw no server fd
     * to shut down; do it now, or the relay would outlive the stop. */
    if (fd >= 0 && atomic_load(&w->conn->end)) shutdown(fd, SHUT_RDWR);
    pthread_mutex_unlock(&w->mu);
    if (old >= 0) close(old);
}

void pool_back_start(struct worker *w, struct conn *c, job_fn job) {
    pthread_mutex_lock(&w->mu);
    w->job = c;
    w->back_job = job;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void pool_back_wait(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    while (w->job) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

int pool_back_wait_for(struct worker *w, int ms) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_nsec += (long)ms % 1000 * 1000000;
    until.tv_sec += ms / 1000 + until.tv_nsec / 1000000000;
    until.tv_nsec %= 1000000000;
    pthread_mutex_lock(&w->mu);
    while (w->job && pthread_cond_timedwait(&w->cv, &w->mu, &until) != ETIMEDOUT) {
    }
    int done = !w->job;
    pthread_mutex_unlock(&w->mu);
    return done;
}

void pool_copy_down(struct worker *w, struct conn *c) {
    copy_stream(c, &w->cp[DOWN], DOWN);
}

/* The back thread: runs the job the front hands it (a relay's upstream → client side, http's
 * request body). */
static void *back_main(void *arg) {
    struct worker *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->job && !w->quit) pthread_cond_wait(&w->cv, &w->mu);
        struct conn *c = w->job;
        job_fn job = w->back_job;
        if (!c) break;
        pthread_mutex_unlock(&w->mu);
        job(w, c);
        pthread_mutex_lock(&w->mu);
        w->job = NULL;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* The front thread takes c: its time in the queue is counted, its turn begins, and a forced
 * stop can now find it. */
static void begin(struct worker *w, struct conn *c) {
    uint64_t now = mono_ns();
    stats_observe(&stats.queue_wait, now - c->queued_ns);
    c->turns++;
    c->slice_end = now + (uint64_t)cfg.time_slice * 1000000u;
    atomic_store(&c->leave, LEAVE_NO);
    atomic_store(&c->awake, 1);
    atomic_fetch_add(&stats.busy, 1);
    pthread_mutex_lock(&w->mu);
    w->conn = c;
    c->seats = w->seat;
    /* Taken just as the grace period ran out: pool_stop may have passed this worker while
     * w->conn was still NULL, so end it here. */
    if (atomic_load(&forced)) conn_end(c, END_STOPPED);
    pthread_mutex_unlock(&w->mu);
}

/* The front thread is done with its connection, for now or for good. */
static void leave(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    w->conn->seats = NULL;
    w->conn = NULL;
    pthread_mutex_unlock(&w->mu);
    copy_reset(&w->cp[UP]);
    copy_reset(&w->cp[DOWN]);
    atomic_fetch_sub(&stats.busy, 1);
}

/* c is over: both sockets close, it is counted and logged, its record goes back. */
static void retire(struct conn *c) {
    if (c->stash) pool_head_give(c->stash);
    upstream_drop(c);
    conn_close(c, mode->done);
    config_drop(c->cfg);
    limits_leave(c->entry); /* before release: an entry with connections open is kept */
    release(c);
}

/* Hands quiet c to the waiting room, through the mailbox. Returns 0, or -1 when the room is
 * closed to it (the stop: to every connection once the grace period is over, before that to
 * one between requests): the caller closes c. */
static int park(struct conn *c) {
    pthread_mutex_lock(&pool.mu);
    int closed = pool.room_closed || (pool.stop_begun && room_between_requests(c)),
        wake = !pool.mail;
    if (!closed) {
        c->next = NULL;
        if (pool.mail)
            pool.last->next = c;
        else
            pool.mail = c;
        pool.last = c;
        atomic_fetch_add(&stats.parked, 1);
        atomic_fetch_add(&stats.parks, 1);
    }
    pthread_mutex_unlock(&pool.mu);
    if (closed) {
        conn_end(c, END_STOPPED);
        return -1;
    }
    /* Only the first letter rings: the acceptor takes the whole mailbox at once. */
    if (wake) ring_acceptor();
    return 0;
}

/* Puts c, whose turn is over, at the tail of the queue. */
static void requeue(struct conn *c) {
    pthread_mutex_lock(&pool.mu);
    enqueue(c);
    pthread_mutex_unlock(&pool.mu);
}

/* c came from a trusted balancer: its PROXY header names the client, who must be in [access]
 * allow and within its per-client limits, as the acceptor checks any other client. Read on a
 * worker, by header_timeout from accept; until its first bytes come c waits as any new
 * connection does, and may leave its worker meanwhile (a balancer may send the header only
 * with its client's first bytes). Returns SERVED_DONE when c is turned away (counted, logged,
 * the mode's last word), SERVED_PARK when it leaves to wait, else -1: serve it. */
static int admit_behind(struct conn *c) {
    struct addr client = c->peer;
    int why = -1;
    if (!c->head_deadline)
        c->head_deadline = c->head_cap =
            c->start_ns + (uint64_t)c->cfg->header_timeout * 1000000000u;
    enum wake w = copy_wait(c, UP, c->client, POLLIN, cfg.park_after != 0);
    char byte = 0;
    if (w == WAKE_LEAVE) return SERVED_PARK;
    /* Gone before a byte (a balancer's health check, or the stop): nothing to refuse. */
    if (w == WAKE_ENDED ||
        (w == WAKE_READY && recv(c->client, &byte, 1, MSG_PEEK | MSG_DONTWAIT) == 0))
        return SERVED_DONE;
    c->behind = 0;
    c->head_deadline = 0; /* head_cap stays: the first request head counts from accept too */
    if (w != WAKE_READY || proxy_protocol_read(c->client, c->head_cap, &client) < 0) {
        why = REFUSED_PROXY_HEADER;
    } else {
        addr_unmap(&client);
        c->peer = client;
        if (!nets_match(&c->cfg->allow, &c->peer))
            why = REFUSED_NOT_ALLOWED;
        else
            why = limits_admit(c->cfg, &c->peer, cfg.mode == MODE_TCP, &c->entry);
    }
    if (why < 0) return -1;
    pool_turn_away(c->client, &c->peer, (enum refusal)why);
    conn_end(c, END_REFUSED);
    return SERVED_DONE;
}

/* The front thread: takes a connection, serves it by the mode (after reading a trusted
 * balancer's PROXY header, admit_behind; a relay back from the waiting room it relays itself),
 * then finishes it or lets it go:
 * to the waiting room, or, when its turn is over and it has bytes to read already, straight to
 * the tail of the queue (the room would send it there at once; the direct way saves the trip:
 * a handful of system calls and a wake of the acceptor), and takes the next. */
static void *front_main(void *arg) {
    struct worker *w = arg;
    struct conn *c;
    while ((c = take())) {
        begin(w, c);
        int behind = c->behind ? admit_behind(c) : -1;
        enum served s;
        if (behind >= 0)
            s = (enum served)behind;
        else if (c->relay) /* back from the waiting room: it left between reads, nothing held */
            s = pool_relay(w, c, pool_copy_down);
        else
            s = mode->serve(w, c);
        leave(w);
        if (s == SERVED_PARK) {
            int turn = atomic_load(&c->leave) == LEAVE_TURN;
            if (turn) atomic_fetch_add(&stats.turns, 1);
            /* In the stop, one between requests that has a request waiting is served, not
             * closed by park. */
            if ((turn || atomic_load(&stats.stopping)) && room_has_bytes(c)) {
                requeue(c);
                continue;
            }
            if (park(c) == 0) continue;
        }
        retire(c);
    }
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- the relay: two copy loops that leave together -------------------------------------- */

/* The loop that decides that c leaves rings the other, which leaves at its next safe point. A loop
 * at EOF is done; the front then only waits for the back. */
enum served pool_relay(struct worker *w, struct conn *c, job_fn down) {
    atomic_store(&c->awake, !c->eof[UP] + !c->eof[DOWN]);
    if (!c->eof[DOWN]) pool_back_start(w, c, down);
    if (!c->eof[UP]) copy_stream(c, &w->cp[UP], UP);
    pool_back_wait(w);
    if (atomic_load(&c->end) || (c->eof[UP] && c->eof[DOWN])) return SERVED_DONE;
    return SERVED_PARK;
}

/* ---- the waiting room's side ---------------------------------------------------------- */

int pool_parked_fd(void) {
    return pool.parked_fd;
}

/* Empties the mailbox. Under pool.mu. */
static struct conn *take_mail(void) {
    struct conn *list = pool.mail;
    pool.mail = pool.last = NULL;
    return list;
}

struct conn *pool_take_parked(void) {
    uint64_t rang;
    /* First the bell, then the mail: a letter that comes in between is taken now, and one that
     * comes after rings again, into an empty mailbox. */
    if (read(pool.parked_fd, &rang, sizeof rang) < 0) rang = 0; /* EAGAIN: nothing rang */
    pthread_mutex_lock(&pool.mu);
    struct conn *list = take_mail();
    pthread_mutex_unlock(&pool.mu);
    return list;
}

/* Why no wait for room in the queue (cfg.queue), as new connections have: this one was admitted
 * long ago, and the ring has a place for every record. */
void pool_resume(struct conn *c) {
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_sub(&stats.parked, 1);
    atomic_fetch_add(&stats.wakeups, 1);
    enqueue(c);
    pthread_mutex_unlock(&pool.mu);
}

void pool_close_parked(struct conn *c, enum end why) {
    conn_why(c, why);
    atomic_fetch_sub(&stats.parked, 1);
    retire(c);
}

/* Closing instead of parking takes effect in park; ending at the next request boundary goes
 * through stats.stopping. Every thread that sleeps with an eye on either is rung to look. */
struct conn *pool_stop_begin(void) {
    pthread_mutex_lock(&pool.mu);
    pool.stop_begun = 1;
    atomic_store(&stats.stopping, 1);
    ring_sleepers();
    struct conn *list = take_mail();
    pthread_mutex_unlock(&pool.mu);
    return list;
}

int pool_stop_idle(struct conn *c) {
    if (room_has_bytes(c)) {
        pool_resume(c);
        return 0;
    }
    pool_close_parked(c, END_STOPPED);
    return 1;
}

struct conn *pool_room_close(void) {
    pthread_mutex_lock(&pool.mu);
    pool.room_closed = 1;
    struct conn *list = take_mail();
    pthread_mutex_unlock(&pool.mu);
    return list;
}

/* ---- start and stop ------------------------------------------------------------------- */

/* A condition variable whose timed waits run on the monotonic clock: a change of the wall
 * clock neither cuts them short nor stretches them. */
static void monotonic_cond(pthread_cond_t *cv) {
    pthread_condattr_t monotonic;
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(cv, &monotonic);
    pthread_condattr_destroy(&monotonic);
}

/* Allocates w's scratch and starts its two threads. Returns 0 or -1. */
static int start_worker(struct worker *w, const pthread_attr_t *attr) {
    pthread_mutex_init(&w->mu, NULL);
    monotonic_cond(&w->cv);
    for (int t = 0; t < 2; t++)
        if ((w->seat[t].bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) return -1;
    if (copy_init(&w->cp[UP]) < 0 || copy_init(&w->cp[DOWN]) < 0) return -1;
    if (mode->init && mode->init(w) < 0) return -1;
    if (pthread_create(&w->back, attr, back_main, w)) return -1;
    if (pthread_create(&w->front, attr, front_main, w)) return -1;
    return 0;
}

int pool_start(const struct mode *m) {
    int records = cfg.max_connections;
    mode = m;
    monotonic_cond(&pool.drained);
    pool.parked_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (pool.parked_fd < 0) return -1;
    pool.size = records;
    pool.ring = calloc((size_t)records, sizeof(struct conn *));
    pool.slab = calloc((size_t)records, sizeof *pool.slab);
    pool.spare = calloc((size_t)records, sizeof(struct conn *));
    /* Resident only once used, as the slab: a head buffer is touched when a head parks in it.
     * Only http reads heads. */
    int heads = cfg.mode == MODE_HTTP ? cfg.head_buffers : 0;
    pool.heads = calloc((size_t)heads + 1, HEAD_MAX);
    pool.spare_head = calloc((size_t)heads + 1, sizeof(char *));
    workers = calloc((size_t)cfg.workers, sizeof *workers);
    if (!pool.ring || !pool.slab || !pool.spare || !pool.heads || !pool.spare_head || !workers)
        return -1;
    for (int i = 0; i < records; i++) pool.spare[pool.nspare++] = &pool.slab[i];
    for (int i = 0; i < heads; i++)
        pool.spare_head[pool.nspare_head++] = pool.heads + (size_t)i * HEAD_MAX;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    while (started < cfg.workers && start_worker(&workers[started], &attr) == 0) started++;
    pthread_attr_destroy(&attr);
    if (started < cfg.workers) return -1;
    /* Ready means every worker waits for work: with queue = 0, a connection that came before
     * they did would otherwise be refused. */
    pthread_mutex_lock(&pool.mu);
    while (pool.idle < cfg.workers) pthread_cond_wait(&pool.all_idle, &pool.mu);
    pthread_mutex_unlock(&pool.mu);
    return 0;
}

/* Out of time: closes what still waits in the queue and ends what is still being served. */
static void force_stop(void) {
    struct conn *left[64];
    int n;
    atomic_store(&forced, 1);
    do { /* in batches: retire() takes pool.mu to give the record back */
        pthread_mutex_lock(&pool.mu);
        for (n = 0; pool.len && n < 64; n++) {
            left[n] = pool.ring[pool.first];
            pool.first = (pool.first + 1) % pool.size;
            pool.len--;
            if (!left[n]->turns) pool.fresh--;
        }
        atomic_fetch_sub(&stats.queued, (uint64_t)n);
        publish_waiting();
        pthread_mutex_unlock(&pool.mu);
        for (int i = 0; i < n; i++) {
            atomic_store(&left[i]->end, END_STOPPED);
            retire(left[i]);
        }
    } while (n);
    for (int i = 0; i < started; i++) {
        struct worker *w = &workers[i];
        pthread_mutex_lock(&w->mu);
        if (w->conn) conn_end(w->conn, END_STOPPED);
        pthread_mutex_unlock(&w->mu);
    }
}

/* The last connection out rings, so the wait ends as soon as none is left. */
void pool_drain(int seconds) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += seconds;
    pthread_mutex_lock(&pool.mu);
    while (atomic_load(&stats.active) > 0 &&
           pthread_cond_timedwait(&pool.drained, &pool.mu, &until) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&pool.mu);
}

/* The workers take what is left in the queue, and each ends at once. */
void pool_stop(void) {
    force_stop();
    pthread_mutex_lock(&pool.mu);
    pool.stopping = 1;
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < started; i++) {
        struct worker *w = &workers[i];
        pthread_join(w->front, NULL);
        pthread_join(w->back, NULL);
        copy_free(&w->cp[UP]);
        copy_free(&w->cp[DOWN]);
        close(w->seat[0].bell);
        close(w->seat[1].bell);
        if (mode->free) mode->free(w);
    }
    free(workers);
    free(pool.ring);
    free(pool.slab);
    free(pool.spare);
    free(pool.heads);
    free(pool.spare_head);
    close(pool.parked_fd);
}
