/* pool.c — the fixed pool: a slab of connection records sized at start, a bounded queue of
 * accepted connections, `workers` pairs of threads that serve them, the hand-off between a
 * worker's two threads, and the graceful stop. How a connection is served is its mode's
 * business (tcp.c, http.c); how its bytes move is copy.c's. */
#include "proxy.h"

#include <assert.h>
#include <stdlib.h>
#include <unistd.h>

/* The queue and the slab, under one lock. Every open client connection has a record from the
 * slab: a queued one sits in the ring, a served one in its worker's w->conn. There are queue +
 * workers records, as many as can be open at once: pool_submit admits no more. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, all_idle; /* cv: a connection or the stop; all_idle: for pool_start */
    struct conn **ring;          /* queued connections: len of them from first on */
    int size, first, len;
    struct conn *slab;   /* every record, allocated once */
    struct conn **spare; /* the records not in use: a stack of nspare */
    int nspare;
    int idle;     /* front threads waiting in take() */
    int stopping; /* SIGTERM: the acceptor has stopped; drain what is queued, then exit */
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
    /* Idle workers take a connection at once, so they do not count against the queue. */
    int ok = !q.stopping && q.len < cfg.queue + q.idle;
    if (ok) {
        /* Never empty: at most queue + workers are open (queued, or served by the workers
         * that are not idle), and the slab has that many. */
        assert(q.nspare > 0);
        struct conn *c = q.spare[--q.nspare];
        *c = (struct conn){.client = fd, .upstream = -1, .peer = *peer};
        q.ring[(q.first + q.len++) % q.size] = c;
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

/* The front thread takes c: its clocks start, and a forced stop can now find it. */
static void begin(struct worker *w, struct conn *c) {
    c->start_ns = mono_ns();
    atomic_store(&c->last_ns, c->start_ns);
    atomic_fetch_add(&stats.busy, 1);
    pthread_mutex_lock(&w->mu);
    w->conn = c;
    /* Taken just as the grace period ran out: pool_stop may have passed this worker while
     * w->conn was still NULL, so end it here. */
    if (atomic_load(&forced)) conn_end(c, END_STOPPED);
    pthread_mutex_unlock(&w->mu);
}

/* The front thread is done with c: both sockets close, it is counted, its record goes back. */
static void finish(struct worker *w, struct conn *c) {
    pthread_mutex_lock(&w->mu);
    w->conn = NULL;
    pthread_mutex_unlock(&w->mu);
    close(c->client);
    if (c->upstream >= 0) close(c->upstream);
    copy_reset(&w->cp[UP]);
    copy_reset(&w->cp[DOWN]);
    stats_conn_done(c);
    if (mode->done) mode->done(c);
    atomic_fetch_sub(&stats.busy, 1);
    release(c);
}

/* The front thread: takes a connection, serves it by the mode, finishes it, takes the next. */
static void *front_main(void *arg) {
    struct worker *w = arg;
    struct conn *c;
    while ((c = take())) {
        begin(w, c);
        mode->serve(w, c);
        finish(w, c);
    }
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* ---- start and stop ------------------------------------------------------------------- */

/* Allocates w's scratch and starts its two threads. Returns 0 or -1. */
static int start_worker(struct worker *w, const pthread_attr_t *attr) {
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->cv, NULL);
    if (copy_init(&w->cp[UP]) < 0 || copy_init(&w->cp[DOWN]) < 0) return -1;
    if (mode->init && mode->init(w) < 0) return -1;
    if (pthread_create(&w->back, attr, back_main, w)) return -1;
    if (pthread_create(&w->front, attr, front_main, w)) return -1;
    return 0;
}

/* Creates cfg.workers workers that serve each connection by m, and returns once all of them
 * wait for work. Returns 0 or -1. */
int pool_start(const struct mode *m) {
    int records = cfg.queue + cfg.workers;
    mode = m;
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
    atomic_store(&forced, 1);
    pthread_mutex_lock(&q.mu);
    for (; q.len; q.len--, q.first = (q.first + 1) % q.size) {
        close(q.ring[q.first]->client);
        q.spare[q.nspare++] = q.ring[q.first];
        atomic_fetch_sub(&stats.queued, 1);
        atomic_fetch_sub(&stats.active, 1);
        atomic_fetch_add(&stats.ended[END_STOPPED], 1);
    }
    pthread_mutex_unlock(&q.mu);
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
}
