/* stats.c — what the proxy tells the outside: lock-free counters and gauges with their
 * Prometheus text, and the log, where every line is one write(2) so that lines from many
 * threads never interleave. The layers above count into `stats` and publish their gauges
 * there; this file calls none of them. */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Why a client was turned away, for the log. */
const char *const refusal_texts[REFUSED_MAX] = {
    [REFUSED_NOT_ALLOWED] = "not in [access] allow",
    [REFUSED_MAX_CONNECTIONS] = "max_connections open",
    [REFUSED_PER_CLIENT] = "connections_per_client open from its address",
    [REFUSED_RATE] = "over requests_per_second",
    [REFUSED_PROXY_HEADER] = "from trusted_proxies without a valid PROXY header",
};

const char *const end_names[END_MAX] = {"none",         "done",           "idle",
                                        "client_error", "upstream_error", "no_upstream",
                                        "stopped",      "slow",           "refused"};
/* Upper bounds of the histograms' buckets in seconds; the last bucket is +Inf. A connection
 * lasts from a millisecond to hours; a wait in the queue from microseconds to seconds. */
static const double duration_le[HISTOGRAM_BUCKETS - 1] = {0.001, 0.01, 0.1, 1, 10, 60, 600};
static const double wait_le[HISTOGRAM_BUCKETS - 1] = {0.0001, 0.001, 0.01, 0.1, 1, 10, 60};
struct stats stats = {.duration.le = duration_le, .queue_wait.le = wait_le};

/* ---- the log -------------------------------------------------------------------------- */

static _Atomic int log_fd = 2; /* -1: off */

int log_open(const char *where) {
    if (!strcmp(where, "off") || !strcmp(where, "-")) {
        atomic_store(&log_fd, strcmp(where, "off") ? 2 : -1);
        return 0;
    }
    int fd = open(where, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0) return -1;
    int old = atomic_load(&log_fd);
    if (old > 2) {
        /* Reopening (SIGHUP): dup2 swaps the file under the same number atomically, so a
         * thread writing a line at this moment never writes to a closed or reused fd. */
        dup2(fd, old);
        close(fd);
    } else {
        atomic_store(&log_fd, fd);
    }
    return 0;
}

void log_raw(const char *buf, size_t len) {
    int fd = atomic_load(&log_fd);
    if (fd >= 0 && write(fd, buf, len) < 0) return; /* best-effort: nowhere to report it */
}

void log_refused(const char *why, const struct addr *peer) {
    static _Atomic uint64_t last;
    static _Atomic unsigned quiet;
    uint64_t now = mono_ns(), then = atomic_load(&last);
    char p[64] = "accept";
    if ((then && now - then < 1000000000u) || !atomic_compare_exchange_strong(&last, &then, now)) {
        atomic_fetch_add(&quiet, 1);
        return;
    }
    if (peer) addr_format(peer, p, sizeof p);
    log_line("%s refused: %s (%u more refusals not logged)", p, why, atomic_exchange(&quiet, 0));
}

void log_line(const char *fmt, ...) {
    char buf[1024];
    struct timespec ts;
    struct tm tm;
    if (atomic_load(&log_fd) < 0) return;
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    n += (size_t)snprintf(buf + n, sizeof buf - n, ".%03ldZ ", ts.tv_nsec / 1000000);
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - n, fmt, ap);
    va_end(ap);
    if (m > 0) n += (size_t)m;
    if (n > sizeof buf - 1) n = sizeof buf - 1; /* vsnprintf cut it: keep room for the newline */
    buf[n++] = '\n';
    log_raw(buf, n);
}

/* ---- counting a connection ------------------------------------------------------------ */

void stats_observe(struct histogram *h, uint64_t ns) {
    uint64_t us = ns / 1000;
    int b = 0;
    while (b < HISTOGRAM_BUCKETS - 1 && (double)us > h->le[b] * 1e6) b++;
    atomic_fetch_add_explicit(&h->count[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_us, us, memory_order_relaxed);
}

void stats_conn_done(const struct conn *c) {
    stats_observe(&stats.duration, mono_ns() - c->start_ns);
    atomic_fetch_add(&stats.ended[atomic_load(&c->end)], 1);
}

/* ---- Prometheus text ------------------------------------------------------------------ */

/* A family's HELP and TYPE lines. */
static void metric_head(FILE *f, const char *name, const char *type, const char *help) {
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

void metric_one(FILE *f, const char *name, const char *type, const char *help, uint64_t v) {
    metric_head(f, name, type, help);
    fprintf(f, "%s %llu\n", name, (unsigned long long)v);
}

void metric_family(FILE *f, const char *name, const char *type, const char *help, const char *label,
                   const char *const *keys, _Atomic uint64_t *v, int n) {
    metric_head(f, name, type, help);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s{%s=\"%s\"} %llu\n", name, label, keys[i],
                (unsigned long long)atomic_load(&v[i]));
}

/* A histogram family: cumulative buckets, the sum and the count. */
static void metric_histogram(FILE *f, const char *name, const char *help, struct histogram *h) {
    uint64_t total = 0;
    metric_head(f, name, "histogram", help);
    for (int b = 0; b < HISTOGRAM_BUCKETS; b++) {
        total += atomic_load(&h->count[b]);
        if (b < HISTOGRAM_BUCKETS - 1)
            fprintf(f, "%s_bucket{le=\"%g\"} %llu\n", name, h->le[b], (unsigned long long)total);
    }
    fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)total);
    fprintf(f, "%s_sum %.6f\n", name, (double)atomic_load(&h->sum_us) / 1e6);
    fprintf(f, "%s_count %llu\n", name, (unsigned long long)total);
}

/* Who came in and who was turned away. */
static void render_admission(FILE *f) {
    static const char *const refusals[REFUSED_MAX] = {[REFUSED_NOT_ALLOWED] = "not_allowed",
                                                      [REFUSED_MAX_CONNECTIONS] = "max_connections",
                                                      [REFUSED_PER_CLIENT] =
                                                          "connections_per_client",
                                                      [REFUSED_RATE] = "requests_per_second",
                                                      [REFUSED_PROXY_HEADER] = "proxy_header"};
    static const char *const limits[LIMIT_MAX] = {
        [LIMIT_CONNECTIONS] = "connections_per_client", [LIMIT_RATE] = "requests_per_second"};
    metric_one(f, "proxy_connections_accepted_total", "counter", "Connections accepted.",
               atomic_load(&stats.accepted));
    metric_family(f, "proxy_connections_refused_total", "counter", "Connections closed at once.",
                  "reason", refusals, stats.refused, REFUSED_MAX);
    metric_family(f, "proxy_limit_refusals_total", "counter",
                  "Connections and http requests a per-client limit turned away.", "limit", limits,
                  stats.limited, LIMIT_MAX);
    metric_one(f, "proxy_clients_tracked", "gauge",
               "Clients (addresses, users) in the per-client table now.",
               atomic_load(&stats.clients));
    metric_one(f, "proxy_clients_forgotten_total", "counter",
               "Clients forgotten to make room in the per-client table (the least recently seen "
               "without a connection open).",
               atomic_load(&stats.clients_forgotten));
    metric_one(f, "proxy_accept_errors_total", "counter",
               "accept() failures such as running out of file descriptors.",
               atomic_load(&stats.accept_errors));
}

/* The pool: workers, the queue, the waiting room and the turns. */
static void render_pool(FILE *f) {
    metric_one(f, "proxy_connections_active", "gauge",
               "Connections open now: queued, served or parked.", atomic_load(&stats.active));
    metric_one(f, "proxy_workers", "gauge", "Workers in the pool.", (uint64_t)cfg.workers);
    metric_one(f, "proxy_workers_busy", "gauge", "Workers serving a connection now.",
               atomic_load(&stats.busy));
    metric_one(f, "proxy_queue_length", "gauge", "Connections waiting for a worker.",
               atomic_load(&stats.queued));
    metric_one(f, "proxy_connections_parked", "gauge",
               "Idle connections in the waiting room, holding no worker.",
               atomic_load(&stats.parked));
    metric_one(f, "proxy_parks_total", "counter", "Times a connection went to the waiting room.",
               atomic_load(&stats.parks));
    metric_one(f, "proxy_wakeups_total", "counter",
               "Times a parked connection went back to the queue, readable or hung up.",
               atomic_load(&stats.wakeups));
    metric_one(f, "proxy_turns_total", "counter",
               "Times a connection gave its worker up because its time slice was over while "
               "others waited (straight back to the queue if it had bytes to read, else "
               "parked).",
               atomic_load(&stats.turns));
    metric_one(f, "proxy_waiting_room_timeouts_total", "counter",
               "Parked connections closed by keepalive_timeout or idle_timeout.",
               atomic_load(&stats.room_timeouts));
}

/* How connections ended and the bytes they moved. */
static void render_traffic(FILE *f) {
    static const char *const dirs[] = {"up", "down"};
    metric_family(f, "proxy_connections_closed_total", "counter", "Connections ended, by how.",
                  "reason", end_names + END_DONE, stats.ended + END_DONE, END_MAX - END_DONE);
    metric_family(f, "proxy_bytes_total", "counter",
                  "Bytes relayed: up is client to upstream, down is upstream to client.",
                  "direction", dirs, stats.bytes, 2);
}

/* Each upstream's connects and health. */
static void render_upstreams(FILE *f) {
    /* The upstreams the newest config lists: their health outlives a reload. */
    struct config *cf = config_hold();
    const struct upstream *up = cf->up;
    metric_head(f, "proxy_upstream_connects_total", "counter", "Successful connects, by upstream.");
    for (int i = 0; i < cf->nup; i++)
        fprintf(f, "proxy_upstream_connects_total{upstream=\"%s\"} %llu\n", up[i].name,
                (unsigned long long)atomic_load(&up[i].st->connects));
    metric_head(f, "proxy_upstream_connect_failures_total", "counter",
                "Failed connects, by upstream.");
    for (int i = 0; i < cf->nup; i++)
        fprintf(f, "proxy_upstream_connect_failures_total{upstream=\"%s\"} %llu\n", up[i].name,
                (unsigned long long)atomic_load(&up[i].st->failures));
    metric_head(f, "proxy_upstream_up", "gauge", "0 while an upstream is skipped after a failure.");
    for (int i = 0; i < cf->nup; i++)
        fprintf(f, "proxy_upstream_up{upstream=\"%s\"} %d\n", up[i].name,
                atomic_load(&up[i].st->down_until) <= mono_ns());
    config_drop(cf);
}

/* The config's reloads and the one in force. */
static void render_config(FILE *f) {
    static const char *const reload_results[] = {"ok", "failed"};
    metric_family(f, "proxy_config_reloads_total", "counter",
                  "SIGHUP reloads of the config file, by result.", "result", reload_results,
                  stats.reloads, 2);
    metric_one(f, "proxy_config_generation", "gauge",
               "The config in force: 1 as loaded at start, one more for each reload.",
               config_generation());
}

/* How long connections lasted and waited. */
static void render_durations(FILE *f) {
    metric_histogram(f, "proxy_connection_duration_seconds",
                     "How long connections lasted, from accept to close.", &stats.duration);
    metric_histogram(f, "proxy_queue_wait_seconds",
                     "How long connections waited in the queue for a worker, from accept or "
                     "from waking in the waiting room.",
                     &stats.queue_wait);
}

char *stats_render(render_fn more, size_t *len) {
    char *out = NULL;
    FILE *f = open_memstream(&out, len);
    if (!f) return NULL;
    render_admission(f);
    render_pool(f);
    render_traffic(f);
    render_upstreams(f);
    render_config(f);
    if (more) more(f); /* the mode's families */
    render_durations(f);
    if (fclose(f)) {
        free(out);
        return NULL;
    }
    return out;
}
