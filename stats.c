/* stats.c — what the proxy tells the outside: lock-free counters and gauges, their Prometheus
 * text on the admin listener (served by its own thread), and the log, where every line is one
 * write(2) so that lines from many threads never interleave. */
#include "proxy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

struct stats stats;
const char *const end_names[END_MAX] = {"none",           "done",        "idle",   "client_error",
                                        "upstream_error", "no_upstream", "stopped"};
const char *const method_names[HTTP_METHODS] = {"GET",     "HEAD",  "POST",    "PUT",  "DELETE",
                                                "OPTIONS", "PATCH", "CONNECT", "other"};
/* Upper bounds of the duration buckets in seconds; the last bucket is +Inf. */
static const double bucket_le[DURATION_BUCKETS - 1] = {0.001, 0.01, 0.1, 1, 10, 60, 600};

/* ---- the log -------------------------------------------------------------------------- */

static _Atomic int log_fd = 2; /* -1: off */

int log_open(const char *where) {
    if (!strcmp(where, "off")) return atomic_store(&log_fd, -1), 0;
    if (!strcmp(where, "-")) return atomic_store(&log_fd, 2), 0;
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
    n = m < 0 ? n : n + (size_t)m < sizeof buf - 1 ? n + (size_t)m : sizeof buf - 1;
    buf[n++] = '\n';
    log_raw(buf, n);
}

/* ---- counting a connection ------------------------------------------------------------ */

void stats_conn_done(const struct conn *c) {
    int end = atomic_load(&c->end);
    if (end == END_NONE) end = END_DONE;
    uint64_t us = (mono_ns() - c->start_ns) / 1000;
    int b = 0;
    while (b < DURATION_BUCKETS - 1 && (double)us > bucket_le[b] * 1e6) b++;
    atomic_fetch_add(&stats.duration[b], 1);
    atomic_fetch_add(&stats.duration_us, us);
    atomic_fetch_add(&stats.ended[end], 1);
    atomic_fetch_sub(&stats.active, 1);

    if (cfg.mode == MODE_HTTP) return; /* http logs a line per request instead */
    char peer[64];
    log_line("%s -> %s up=%llu down=%llu ms=%.3f end=%s", addr_format(&c->peer, peer, sizeof peer),
             c->up ? c->up->name : "-", (unsigned long long)c->bytes[UP],
             (unsigned long long)c->bytes[DOWN], (double)us / 1000, end_names[end]);
}

void stats_method(const char *method, size_t len) {
    int i = 0;
    while (i < HTTP_METHODS - 1 &&
           !(strlen(method_names[i]) == len && !memcmp(method, method_names[i], len)))
        i++;
    atomic_fetch_add(&stats.methods[i], 1);
}

void stats_request(const struct conn *c, const struct exchange *x, int status) {
    char peer[64];
    if (status >= 100 && status < 600) atomic_fetch_add(&stats.classes[status / 100], 1);
    log_line("%s %s %s %s %d up=%llu down=%llu ms=%.3f", addr_format(&c->peer, peer, sizeof peer),
             x->user[0] ? x->user : "-", x->method, x->target, status, (unsigned long long)x->up,
             (unsigned long long)x->down, (double)(mono_ns() - x->start_ns) / 1e6);
}

/* ---- Prometheus text ------------------------------------------------------------------ */

/* A family's HELP and TYPE lines. */
static void head(FILE *f, const char *name, const char *type, const char *help) {
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A family of one sample. */
static void one(FILE *f, const char *name, const char *type, const char *help, uint64_t v) {
    head(f, name, type, help);
    fprintf(f, "%s %llu\n", name, (unsigned long long)v);
}

/* A family of n samples that differ in one label: name{label="keys[i]"} v[i]. */
static void family(FILE *f, const char *name, const char *type, const char *help, const char *label,
                   const char *const *keys, _Atomic uint64_t *v, int n) {
    head(f, name, type, help);
    for (int i = 0; i < n; i++)
        fprintf(f, "%s{%s=\"%s\"} %llu\n", name, label, keys[i],
                (unsigned long long)atomic_load(&v[i]));
}

char *stats_render(size_t *len) {
    static const char *const refusals[] = {"queue_full", "not_allowed"}, *dirs[] = {"up", "down"};
    char *out = NULL;
    FILE *f = open_memstream(&out, len);
    if (!f) return NULL;
    one(f, "proxy_connections_accepted_total", "counter", "Connections accepted.",
        atomic_load(&stats.accepted));
    family(f, "proxy_connections_refused_total", "counter", "Connections closed at once.", "reason",
           refusals, stats.refused, 2);
    one(f, "proxy_accept_errors_total", "counter",
        "accept() failures such as running out of file descriptors.",
        atomic_load(&stats.accept_errors));
    one(f, "proxy_connections_active", "gauge", "Connections open now, queued or served.",
        atomic_load(&stats.active));
    one(f, "proxy_workers", "gauge", "Workers in the pool.", (uint64_t)cfg.workers);
    one(f, "proxy_workers_busy", "gauge", "Workers serving a connection now.",
        atomic_load(&stats.busy));
    one(f, "proxy_queue_length", "gauge", "Connections waiting for a worker.",
        (uint64_t)pool_queued());
    family(f, "proxy_connections_closed_total", "counter", "Connections ended, by how.", "reason",
           end_names + END_DONE, stats.ended + END_DONE, END_MAX - END_DONE);
    family(f, "proxy_bytes_total", "counter",
           "Bytes relayed: up is client to upstream, down is upstream to client.", "direction",
           dirs, stats.bytes, 2);
    head(f, "proxy_upstream_connects_total", "counter", "Successful connects, by upstream.");
    for (int i = 0; i < cfg.nup; i++)
        fprintf(f, "proxy_upstream_connects_total{upstream=\"%s\"} %llu\n", cfg.up[i].name,
                (unsigned long long)atomic_load(&cfg.up[i].connects));
    head(f, "proxy_upstream_connect_failures_total", "counter", "Failed connects, by upstream.");
    for (int i = 0; i < cfg.nup; i++)
        fprintf(f, "proxy_upstream_connect_failures_total{upstream=\"%s\"} %llu\n", cfg.up[i].name,
                (unsigned long long)atomic_load(&cfg.up[i].failures));
    head(f, "proxy_upstream_up", "gauge", "0 while an upstream is skipped after a failure.");
    for (int i = 0; i < cfg.nup; i++)
        fprintf(f, "proxy_upstream_up{upstream=\"%s\"} %d\n", cfg.up[i].name,
                atomic_load(&cfg.up[i].down_until) <= mono_ns());
    if (cfg.mode == MODE_HTTP) {
        static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
        family(f, "proxy_http_requests_total", "counter", "Requests by method.", "method",
               method_names, stats.methods, HTTP_METHODS);
        family(f, "proxy_http_responses_total", "counter",
               "Responses by status class, relayed or the proxy's own.", "code", classes,
               stats.classes + 1, 5);
        family(f, "proxy_auth_failures_total", "counter", "Requests answered 407, by reason.",
               "reason", auth_names + AUTH_MISSING, stats.auth_failures + AUTH_MISSING,
               AUTH_MAX - AUTH_MISSING);
        one(f, "proxy_http_tunnels_total", "counter", "CONNECT tunnels established.",
            atomic_load(&stats.tunnels));
        one(f, "proxy_http_upgrades_total", "counter", "Upgrades (101) relayed.",
            atomic_load(&stats.upgrades));
    }
    head(f, "proxy_connection_duration_seconds", "histogram",
         "How long connections lasted, from accept to close.");
    uint64_t total = 0;
    for (int b = 0; b < DURATION_BUCKETS; b++) {
        total += atomic_load(&stats.duration[b]);
        if (b < DURATION_BUCKETS - 1)
            fprintf(f, "proxy_connection_duration_seconds_bucket{le=\"%g\"} %llu\n", bucket_le[b],
                    (unsigned long long)total);
    }
    fprintf(f, "proxy_connection_duration_seconds_bucket{le=\"+Inf\"} %llu\n",
            (unsigned long long)total);
    fprintf(f, "proxy_connection_duration_seconds_sum %.6f\n",
            (double)atomic_load(&stats.duration_us) / 1e6);
    fprintf(f, "proxy_connection_duration_seconds_count %llu\n", (unsigned long long)total);
    if (fclose(f)) return free(out), NULL;
    return out;
}

/* ---- the admin listener --------------------------------------------------------------- */

static int admin_fd = -1;
static _Atomic int admin_stopping;
static pthread_t admin;

/* Answers one request on fd: GET /metrics, or an error. One request per connection. */
static void admin_serve(int fd) {
    char req[2048] = "", hdr[256];
    size_t got = 0;
    struct timeval tv = {0, 200000};
    uint64_t deadline = mono_ns() + 2000000000u; /* a slow client holds this thread 2 s at most */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    while (got < sizeof req - 1) {
        if (mono_ns() > deadline) return;
        ssize_t n = recv(fd, req + got, sizeof req - 1 - got, 0);
        if (n < 0 && errno == EAGAIN) continue;
        if (n <= 0) return;
        got += (size_t)n;
        req[got] = 0;
        if (strstr(req, "\r\n\r\n") || strstr(req, "\n\n")) break;
    }
    size_t len = 0;
    char *body = NULL;
    const char *status = "404 Not Found", *type = "text/plain";
    if (strncmp(req, "GET ", 4) && strncmp(req, "HEAD ", 5)) {
        status = "405 Method Not Allowed";
    } else if (!strncmp(strchr(req, ' ') + 1, "/metrics ", 9)) {
        body = stats_render(&len);
        status = body ? "200 OK" : "500 Internal Server Error";
        type = "text/plain; version=0.0.4; charset=utf-8";
    }
    int n = snprintf(hdr, sizeof hdr,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, type, len);
    send(fd, hdr, (size_t)n, MSG_NOSIGNAL);
    if (body && req[0] == 'G')
        for (size_t off = 0; off < len;) {
            ssize_t w = send(fd, body + off, len - off, MSG_NOSIGNAL);
            if (w <= 0) break;
            off += (size_t)w;
        }
    free(body);
}

/* The admin thread: one request per connection, one connection at a time; a slow client
 * holds it at most two seconds (admin_serve). */
static void *admin_main(void *arg) {
    (void)arg;
    while (!atomic_load(&admin_stopping)) {
        int fd = accept4(admin_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0) {
            admin_serve(fd);
            close(fd);
        } else if (errno != EINTR && errno != ECONNABORTED && !atomic_load(&admin_stopping)) {
            usleep(100000); /* out of fds, say: wait rather than spin */
        }
    }
    return NULL;
}

int stats_start(int fd) {
    pthread_attr_t attr;
    admin_fd = fd;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    int rc = pthread_create(&admin, &attr, admin_main, NULL);
    pthread_attr_destroy(&attr);
    return rc ? -1 : 0;
}

void stats_stop(void) {
    if (admin_fd < 0) return;
    atomic_store(&admin_stopping, 1);
    shutdown(admin_fd, SHUT_RDWR); /* wakes accept() */
    pthread_join(admin, NULL);
    close(admin_fd);
}
