/* pool.c — the fixed pool: a bounded queue of accepted sockets, `workers` pairs of threads that
 * serve them, and the graceful stop. How a connection is served is the serve function's
 * business (tcp or http mode); how its bytes move is copy.c's. */
#include "proxy.h"

#include <stdlib.h>
#include <unistd.h>

struct pending {
    int fd;
    struct addr peer;
};

/* The queue: a ring of accepted sockets, room for `queue` beyond the idle workers. */
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv, all_idle; /* cv: a connection or the stop; all_idle: for pool_start */
    struct pending *ring;
    int size, head, len;
    int idle;     /* front threads waiting in take() */
    int stopping; /* SIGTERM: the acceptor has stopped; drain what is queued, then exit */
} q = {.mu = PTHREAD_MUTEX_INITIALIZER,
       .cv = PTHREAD_COND_INITIALIZER,
       .all_idle = PTHREAD_COND_INITIALIZER};

static struct worker *workers;
static int started;
static _Atomic int forced; /* the grace period is over: end every connection */
static serve_fn serve;

int pool_submit(int fd, const struct addr *peer) {
    pthread_mutex_lock(&q.mu);
    /* Idle workers take a connection at once, so they do not count against the queue. */
    int ok = !q.stopping && q.len < cfg.queue + q.idle;
    if (ok) {
        q.ring[(q.head + q.len++) % q.size] = (struct pending){fd, *peer};
        pthread_cond_signal(&q.cv);
    }
    pthread_mutex_unlock(&q.mu);
    return ok ? 0 : -1;
}

int pool_queued(void) {
    pthread_mutex_lock(&q.mu);
    int n = q.len;
    pthread_mutex_unlock(&q.mu);
    return n;
}

/* Blocks until a connection is queued; -1 once the pool stops and the queue is empty. */
static int take(struct pending *p) {
    pthread_mutex_lock(&q.mu);
    if (++q.idle == cfg.workers) pthread_cond_signal(&q.all_idle);
    while (!q.len && !q.stopping) pthread_cond_wait(&q.cv, &q.mu);
    q.idle--;
    int got = q.len > 0;
    if (got) {
        *p = q.ring[q.head];
        q.head = (q.head + 1) % q.size;
        q.len--;
    }
    pthread_mutex_unlock(&q.mu);
    return got ? 0 : -1;
}

void pool_set_upstream(struct worker *w, int fd) {
    pthread_mutex_lock(&w->mu);
    int old = w->conn->upstream;
    w->conn->upstream = fd;
    /* A forced stop that came while this connection was still connecting saw no upstream fd
     * to shut down; do it now, or the relay would outlive the stop. */
    if (fd >= 0 && atomic_load(&w->conn->end)) shutdown(fd, SHUT_RDWR);
    pthread_mutex_unlock(&w->mu);
    if (old >= 0) close(old);
}

void pool_back_start(struct worker *w, struct conn *c, serve_fn fn) {
    pthread_mutex_lock(&w->mu);
    w->job = c;
    w->back_fn = fn;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

void pool_back_wait(struct worker *w) {
    pthread_mutex_lock(&w->mu);
    while (w->job) pthread_cond_wait(&w->cv, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* The back thread: runs the upstream → client side of each connection the front hands it. */
static void *back_main(void *arg) {
    struct worker *w = arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->job && !w->quit) pthread_cond_wait(&w->cv, &w->mu);
        struct conn *c = w->job;
        serve_fn fn = w->back_fn;
        if (!c) break;
        pthread_mutex_unlock(&w->mu);
        fn(w, c);
        pthread_mutex_lock(&w->mu);
        w->job = NULL;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* The front thread: takes a connection, serves it, cleans up, takes the next. */
static void *front_main(void *arg) {
    struct worker *w = arg;
    struct pending p;
    while (take(&p) == 0) {
        struct conn c = {.client = p.fd, .upstream = -1, .peer = p.peer, .start_ns = mono_ns()};
        atomic_store(&c.last_ns, c.start_ns);
        atomic_fetch_add(&stats.busy, 1);
        pthread_mutex_lock(&w->mu);
        w->conn = &c;
        /* Taken just as the grace period ran out: pool_stop may have passed this worker
         * while w->conn was still NULL, so end it here. */
        if (atomic_load(&forced)) conn_end(&c, END_STOPPED);
        pthread_mutex_unlock(&w->mu);

        serve(w, &c);

        pthread_mutex_lock(&w->mu);
        w->conn = NULL;
        pthread_mutex_unlock(&w->mu);
        close(c.client);
        if (c.upstream >= 0) close(c.upstream);
        copy_reset(&w->cp[UP]);
        copy_reset(&w->cp[DOWN]);
        stats_conn_done(&c);
        atomic_fetch_sub(&stats.busy, 1);
    }
    pthread_mutex_lock(&w->mu);
    w->quit = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

int pool_start(serve_fn fn) {
    pthread_attr_t attr;
    serve = fn;
    q.size = cfg.queue + cfg.workers;
    q.ring = calloc((size_t)q.size, sizeof *q.ring);
    workers = calloc((size_t)cfg.workers, sizeof *workers);
    if (!q.ring || !workers) return -1;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    for (; started < cfg.workers; started++) {
        struct worker *w = &workers[started];
        pthread_mutex_init(&w->mu, NULL);
        pthread_cond_init(&w->cv, NULL);
        if (copy_init(&w->cp[UP]) < 0 || copy_init(&w->cp[DOWN]) < 0) return -1;
        if (cfg.mode == MODE_HTTP && http_init(w) < 0) return -1;
        if (pthread_create(&w->back, &attr, back_main, w)) return -1;
        if (pthread_create(&w->front, &attr, front_main, w)) return -1;
    }
    pthread_attr_destroy(&attr);
    /* Ready means every worker waits for work: with queue = 0, a connection that came before
     * they did would otherwise be refused. */
    pthread_mutex_lock(&q.mu);
    while (q.idle < cfg.workers) pthread_cond_wait(&q.all_idle, &q.mu);
    pthread_mutex_unlock(&q.mu);
    return 0;
}

void pool_stop(void) {
    pthread_mutex_lock(&q.mu);
    q.stopping = 1;
    pthread_cond_broadcast(&q.cv);
    pthread_mutex_unlock(&q.mu);

    uint64_t deadline = mono_ns() + GRACE_SECONDS * 1000000000ull;
    while (atomic_load(&stats.active) > 0 && mono_ns() < deadline) usleep(20000);

    /* Out of time: close what still waits in the queue, end what is still being served. */
    atomic_store(&forced, 1);
    pthread_mutex_lock(&q.mu);
    for (; q.len; q.len--, q.head = (q.head + 1) % q.size) {
        close(q.ring[q.head].fd);
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
    for (int i = 0; i < started; i++) {
        pthread_join(workers[i].front, NULL);
        pthread_join(workers[i].back, NULL);
        copy_free(&workers[i].cp[UP]);
        copy_free(&workers[i].cp[DOWN]);
        if (cfg.mode == MODE_HTTP) http_free(&workers[i]);
    }
    free(workers);
    free(q.ring);
}
