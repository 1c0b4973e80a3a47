/* pool.c — the fixed pool: a slab of connection records sized at start, a bounded queue of
 * connections that have work, `workers` pairs of threads that serve them, the hand-off between
 * a worker's two threads, the relay that leaves its worker when quiet, the mailbox through
 * which quiet connections go to the acceptor's waiting room, and the graceful stop. How a
 * connection is served is its mode's business (tcp.c, http.c); how its bytes move is
 * copy.c's; where a parked connection waits is acceptor.c's. */
#include "proxy.h"

#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* The queue, the slab and the mailbox, under one lock. Every open client connection has a
 * record from the slab: a queued one sits in the ring, a served one in its worker's w->conn, a
 * parked one in the mailbox or the acceptor's waiting room. There are max_connections records,
 * as many as can be open at once (the acceptor admits no more), and the ring holds them all. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, all_idle; /* cv: a connection or the stop; all_idle: for pool_start */
    struct conn **ring;          /* queued connections: len of them from first on */
    int size, first, len;
    int fresh;           /* of them, new ones (never served): what cfg.queue bounds */
    struct conn *slab;   /* every record, allocated once */
    struct conn **spare; /* the records not in use: a stack of nspare */
    int nspare;
    int idle;     /* front threads waiting in take() */
    int stopping; /* SIGTERM: the acceptor has stopped; drain what is queued, then exit */
    struct conn *mail, *last; /* parked, not yet taken by the acceptor: a list through next */
    int room_closed;          /* the stop: a connection that would park is closed instead */
    int parked_fd;            /* eventfd: written when mail stops being empty */
} q = {.mu = PTHREAD_MUTEX_INITIALIZER,
       .cv = PTHREAD_COND_INITIALIZER,
       .all_idle = PTHREAD_COND_INITIALIZER};

static const struct mode *mode; /* set by pool_start, before any worker runs */
static struct worker *workers;
static int started;
static _Atomic int forced; /* the grace period is over: end every connection */

/* ---- the queue ------------------------------------------------------------------------ */

/* Hands an accepted socket to the pool. Returns 0, or -1 when the queue is full or the pool is
 * stopping (the caller closes fd). */
int pool_submit(int fd, const struct addr *peer) {
    pthread_mutex_lock(&q.mu);
    /* Idle workers take a connection at once, so they do not count against the queue, nor do
     * parked connections back with work: they were admitted long ago. A spare record is there
     * unless a closed connection is still on its way back to the slab. */
    int ok = !q.stopping && q.fresh < cfg.queue + q.idle && q.nspare > 0;
    if (ok) {
        struct conn *c = q.spare[--q.nspare];
        *c = (struct conn){.client = fd, .upstream = -1, .peer = *peer};
        q.ring[(q.first + q.len++) % q.size] = c;
        q.fresh++;
        atomic_fetch_add(&stats.queued, 1);
        pthread_cond_signal(&q.cv);
    }
    pthread_mutex_unlock(&q.mu);
    return ok ? 0 : -1;
}

/* Blocks until a connection is queued and returns it; NULL once the pool stops and the queue
 * is empty. */
static struct conn *take(void) {
    struct conn *c = NULL;
    pthread_mutex_lock(&q.mu);
    if (++q.idle == cfg.workers) pthread_cond_signal(&q.all_idle);
    while (!q.len && !q.stopping) pthread_cond_wait(&q.cv, &q.mu);
    q.idle--;
    if (q.len) {
        c = q.ring[q.first];
        q.first = (q.first + 1) % q.size;
        q.len--;
        if (!c->start_ns) q.fresh--; /* begin() starts its clock */
        atomic_fetch_sub(&stats.queued, 1);
    }
    pthread_mutex_unlock(&q.mu);
    return c;
}

/* Returns a closed connection's record to the slab. */
static void release(struct conn *c) {
    pthread_mutex_lock(&q.mu);
    q.spare[q.nspare++] = c;
    pthread_mutex_unlock(&q.mu);
}

/* ---- a worker's two threads ----------------------------------------------------------- */

/* Makes fd the upstream socket of w's connection (closing the one before, if any). Only
 * through here, so that a forced stop never shuts down an fd number already reused. */
void pool_set_upstream(struct worker *w, int fd) {
    pthread_mutex_lock(&w->mu);
    int old = w->conn->upstream;
    w->conn->upstream = fd;
    atomic_store(&w->conn->upstream_failed, 0);
    /* A forced stop that came while this connection was still connecting saw no upstream fd
     * to shut down; do it now, or the relay would outlive the stop. */
    if (fd >= 0 && atomic_load(&w->conn->end)) shutdown(fd, SHUT_RDWR);
    pthread_mutex_unlock(&w->mu);
    if (old >= 0) close(old);
}

/* Starts the back thread running job(w, c); the job handles the upstream → client side. */
void pool_back_start(struct worker *w, struct conn *c, job_fn job) {
    pthread_mutex_lock(&w->mu);
    w->job = c;
    w->back_job = job;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

/* Waits until the back thread has finished with its job. */
void pool_back_wait(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    while (w->job) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* The usual back job: copies upstream → client until EOF (copy_stream). */
void pool_copy_down(struct worker *w, struct conn *c) {
    copy_stream(c, &w->cp[DOWN], DOWN);
}

/* The back thread: runs the upstream → client side of each connection the front hands it. */
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

/* The front thread takes c: a new connection's clocks start, and a forced stop can now find
 * it. */
static void begin(struct worker *w, struct conn *c) {
    if (!c->start_ns) {
        c->start_ns = mono_ns();
        atomic_store(&c->last_ns, c->start_ns);
    }
    atomic_fetch_add(&stats.busy, 1);
    pthread_mutex_lock(&w->mu);
    w->conn = c;
    /* Taken just as the grace period ran out: pool_stop may have passed this worker while
     * w->conn was still NULL, so end it here. */
    if (atomic_load(&forced)) conn_end(c, END_STOPPED);
    pthread_mutex_unlock(&w->mu);
}

/* The front thread is done with its connection, for now or for good. */
static void leave(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    w->conn = NULL;
    pthread_mutex_unlock(&w->mu);
    copy_reset(&w->cp[UP]);
    copy_reset(&w->cp[DOWN]);
    atomic_fetch_sub(&stats.busy, 1);
}

/* c is over: both sockets close, it is counted and logged, its record goes back. */
static void retire(struct conn *c) {
    close(c->client);
    if (c->upstream >= 0) close(c->upstream);
    stats_conn_done(c);
    if (mode->done) mode->done(c);
    release(c);
}

/* Hands quiet c to the waiting room, through the mailbox. Returns 0, or -1 when the room is
 * closed (the stop): the caller closes c. */
static int park(struct conn *c) {
    uint64_t one = 1;
    pthread_mutex_lock(&q.mu);
    int closed = q.room_closed, wake = !q.mail;
    if (!closed) {
        c->next = NULL;
        if (q.mail)
            q.last->next = c;
        else
            q.mail = c;
        q.last = c;
        c->parks++;
        atomic_fetch_add(&stats.parked, 1);
        atomic_fetch_add(&stats.parks, 1);
    }
    pthread_mutex_unlock(&q.mu);
    if (closed) {
        conn_end(c, END_STOPPED);
        return -1;
    }
    /* Only the first letter rings: the acceptor takes the whole mailbox at once. */
    if (wake) {
        ssize_t n = write(q.parked_fd, &one, sizeof one);
        (void)n; /* it fails only when the counter is full, and then it is readable anyway */
    }
    return 0;
}

/* The front thread: takes a connection, serves it by the mode, then parks or finishes it,
 * takes the next. */
static void *front_main(void *arg) {
    struct worker *w = arg;
    struct conn *c;
    while ((c = take())) {
        begin(w, c);
        enum served s = mode->serve(w, c);
        leave(w);
        if (s == SERVED_PARK && park(c) == 0) continue;
        retire(c);
    }
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- the relay: two copy loops that leave together ------------------------------------- */

/* Waits up to ms for the back thread to finish its job. Returns whether it did. */
static int back_wait_for(struct worker *w, int ms) {
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    until.tv_sec += ms / 1000;
    until.tv_nsec += ms % 1000 * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    int waiting = 0; /* 0, or ETIMEDOUT once the time is up */
    pthread_mutex_lock(&w->mu);
    while (w->job && waiting == 0) waiting = pthread_cond_timedwait(&w->cv, &w->mu, &until);
    int done = !w->job;
    pthread_mutex_unlock(&w->mu);
    return done;
}

/* The front found c quiet: asks the back's loop to leave at its next quiet tick and waits up to
 * two ticks for it. Returns 1 once both loops have left (or the back's had already ended), 0
 * when the back is still moving bytes: then the question is taken back and the front goes on.
 * Only one of the two compare-and-swaps on c->parking can win, so they never disagree. */
static int leave_together(struct worker *w, struct conn *c) {
    int asked = PARKING_ASKED;
    atomic_store(&c->parking, PARKING_ASKED);
    if (!back_wait_for(w, 2 * cfg.park_tick)) {
        if (atomic_compare_exchange_strong(&c->parking, &asked, PARKING_NO)) return 0;
        pool_back_wait(w); /* it agreed: it is on its way out */
    }
    return 1;
}

/* Relays c raw both ways, down (its job: copy_stream DOWN, after anything of the mode's own)
 * on the back thread and client → upstream here, skipping directions already at EOF:
 * SERVED_DONE once both reached EOF or c ended; SERVED_PARK once neither moved a byte for
 * park_after and both loops left (copy_stream's hand-shake). */
enum served pool_relay(struct worker *w, struct conn *c, job_fn down) {
    atomic_store(&c->parking, PARKING_NO);
    if (!c->eof[DOWN]) pool_back_start(w, c, down);
    for (;;) {
        if (!c->eof[UP]) {
            enum streamed r = copy_stream(c, &w->cp[UP], UP);
            if (r == STREAM_ENDED) break;
            if (r == STREAM_EOF) continue;
        } else if (back_wait_for(w, cfg.park_tick)) {
            break; /* both directions are done */
        } else if (!copy_quiet(c)) {
            continue; /* only the back's direction is left, and it is moving */
        }
        if (leave_together(w, c)) {
            if (atomic_load(&c->end) || (c->eof[UP] && c->eof[DOWN])) return SERVED_DONE;
            return SERVED_PARK;
        }
    }
    pool_back_wait(w);
    return SERVED_DONE;
}

/* ---- the waiting room's side ---------------------------------------------------------- */

/* An eventfd that is readable once connections have parked since pool_take_parked. */
int pool_parked_fd(void) {
    return q.parked_fd;
}

/* Empties the mailbox. Under q.mu. */
static struct conn *take_mail(void) {
    struct conn *list = q.mail;
    q.mail = q.last = NULL;
    return list;
}

/* The connections parked since the last call, oldest first, linked by next; NULL: none. */
struct conn *pool_take_parked(void) {
    uint64_t rang;
    /* First the bell, then the mail: a letter that comes in between is taken now, and one that
     * comes after rings again, into an empty mailbox. */
    if (read(q.parked_fd, &rang, sizeof rang) < 0) rang = 0; /* EAGAIN: nothing rang */
    pthread_mutex_lock(&q.mu);
    struct conn *list = take_mail();
    pthread_mutex_unlock(&q.mu);
    return list;
}

/* A parked connection has work (its socket is readable or hung up): back into the queue. New
 * connections wait for room in it (cfg.queue); this one was admitted long ago, and the ring
 * has a place for every record. */
void pool_resume(struct conn *c) {
    pthread_mutex_lock(&q.mu);
    q.ring[(q.first + q.len++) % q.size] = c;
    atomic_fetch_add(&stats.queued, 1);
    atomic_fetch_sub(&stats.parked, 1);
    atomic_fetch_add(&stats.wakeups, 1);
    pthread_cond_signal(&q.cv);
    pthread_mutex_unlock(&q.mu);
}

/* Closes a parked connection for why: its sockets, its counts, its log line, its record. */
void pool_close_parked(struct conn *c, enum end why) {
    int none = END_NONE;
    atomic_compare_exchange_strong(&c->end, &none, (int)why);
    atomic_fetch_sub(&stats.parked, 1);
    retire(c);
}

/* From now on a connection that would park is closed instead (the stop). Returns those that
 * parked since the last pool_take_parked, as that does. */
struct conn *pool_room_close(void) {
    pthread_mutex_lock(&q.mu);
    q.room_closed = 1;
    struct conn *list = take_mail();
    pthread_mutex_unlock(&q.mu);
    return list;
}

/* ---- start and stop ------------------------------------------------------------------- */

/* Allocates w's scratch and starts its two threads. Returns 0 or -1. */
static int start_worker(struct worker *w, const pthread_attr_t *attr) {
    pthread_condattr_t monotonic;
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC); /* back_wait_for's deadlines */
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, &monotonic);
    pthread_condattr_destroy(&monotonic);
    if (copy_init(&w->cp[UP]) < 0 || copy_init(&w->cp[DOWN]) < 0) return -1;
    if (mode->init && mode->init(w) < 0) return -1;
    if (pthread_create(&w->back, attr, back_main, w)) return -1;
    if (pthread_create(&w->front, attr, front_main, w)) return -1;
    return 0;
}

/* Creates cfg.workers workers that serve each connection by m, and returns once all of them
 * wait for work. Returns 0 or -1. */
int pool_start(const struct mode *m) {
    int records = cfg.max_connections;
    mode = m;
    q.parked_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q.parked_fd < 0) return -1;
    q.size = records;
    q.ring = calloc((size_t)records, sizeof(struct conn *));
    q.slab = calloc((size_t)records, sizeof *q.slab);
    q.spare = calloc((size_t)records, sizeof(struct conn *));
    workers = calloc((size_t)cfg.workers, sizeof *workers);
    if (!q.ring || !q.slab || !q.spare || !workers) return -1;
    for (int i = 0; i < records; i++) q.spare[q.nspare++] = &q.slab[i];
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    while (started < cfg.workers && start_worker(&workers[started], &attr) == 0) started++;
    pthread_attr_destroy(&attr);
    if (started < cfg.workers) return -1;
    /* Ready means every worker waits for work: with queue = 0, a connection that came before
     * they did would otherwise be refused. */
    pthread_mutex_lock(&q.mu);
    while (q.idle < cfg.workers) pthread_cond_wait(&q.all_idle, &q.mu);
    pthread_mutex_unlock(&q.mu);
    return 0;
}

/* Out of time: closes what still waits in the queue and ends what is still being served. */
static void force_stop(void) {
    struct conn *left[64];
    int n;
    atomic_store(&forced, 1);
    do { /* in batches: retire() takes q.mu to give the record back */
        pthread_mutex_lock(&q.mu);
        for (n = 0; q.len && n < 64; n++) {
            left[n] = q.ring[q.first];
            q.first = (q.first + 1) % q.size;
            q.len--;
            if (!left[n]->start_ns) q.fresh--;
        }
        atomic_fetch_sub(&stats.queued, (uint64_t)n);
        pthread_mutex_unlock(&q.mu);
        for (int i = 0; i < n; i++) {
            atomic_store(&left[i]->end, END_STOPPED);
            if (!left[i]->start_ns) left[i]->start_ns = mono_ns(); /* never served */
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

/* Stops taking connections, lets active ones finish for GRACE_SECONDS, ends the rest, joins
 * every thread. */
void pool_stop(void) {
    pthread_mutex_lock(&q.mu);
    q.stopping = 1;
    pthread_cond_broadcast(&q.cv);
    pthread_mutex_unlock(&q.mu);

    uint64_t deadline = mono_ns() + GRACE_SECONDS * 1000000000ull;
    while (atomic_load(&stats.active) > 0 && mono_ns() < deadline) usleep(20000);
    force_stop();
    for (int i = 0; i < started; i++) {
        struct worker *w = &workers[i];
        pthread_join(w->front, NULL);
        pthread_join(w->back, NULL);
        copy_free(&w->cp[UP]);
        copy_free(&w->cp[DOWN]);
        if (mode->free) mode->free(w);
    }
    free(workers);
    free(q.ring);
    free(q.slab);
    free(q.spare);
    close(q.parked_fd);
}
