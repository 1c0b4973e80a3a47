/* plan.c — the plan -t prints: what a full load of this config costs in memory and file
 * descriptors (the pool's threads, stacks and buffers, the connections' records and sockets),
 * and whether the fd limit holds it. It reads the sizes of every layer, so it sits on top. */
#include "proxy.h"

#include <sys/resource.h>

/* File descriptors one worker holds for good: its two threads' bells (eventfds), and its two
 * pipes with copy = splice. */
static long long pool_fds(const struct config *c) {
    return 2 + (c->copy == COPY_SPLICE ? 4 : 0);
}

/* File descriptors held besides connections' and workers': the listeners, the acceptor's
 * epoll set and bells, the log, a few to spare; in http mode one eventfd per name lookup that
 * may run (a dial waits for it to ring). */
static long long other_fds(const struct config *c) {
    return 16 + (c->mode == MODE_HTTP ? LOOKUPS_MAX : 0);
}

/* All but the sockets and the workers' fds are counted in other_fds. */
long long config_fds(const struct config *c) {
    return (long long)c->max_connections * 2 + (long long)c->workers * pool_fds(c) + other_fds(c);
}

int config_fd_warning(const struct config *c, unsigned long long limit, const char *prefix,
                      FILE *out) {
    long long pool = (long long)c->workers * pool_fds(c) + other_fds(c);
    long long fit = ((long long)limit - pool) / 2;
    if ((unsigned long long)config_fds(c) <= limit) return 0;
    if (fit < 1) {
        fprintf(out,
                "%serror: before any connection the %d workers need %lld fds (%lld each%s, and "
                "%lld for the rest), the limit is %llu: lower workers%s or raise the limit "
                "(LimitNOFILE=, ulimit -n)\n",
                prefix, c->workers, pool, pool_fds(c),
                c->copy == COPY_SPLICE ? " with their pipes" : "", other_fds(c), limit,
                c->copy == COPY_SPLICE ? ", use copy = buffer (no pipes)," : "");
        return -1;
    }
    fprintf(out,
            "%swarning: a full load needs %lld fds, the limit is %llu: lower max_connections to "
            "%lld or raise the limit (LimitNOFILE=, ulimit -n)\n",
            prefix, config_fds(c), limit, fit);
    return 0;
}

/* What serves, and on which addresses. */
static void print_listeners(const struct config *c, FILE *o) {
    static const char *modes[] = {"tcp", "http"}, *copies[] = {"splice", "buffer"};
    char listen[64], admin[64] = "off";
    if (c->stats_listen.len) addr_format(&c->stats_listen, admin, sizeof admin);
    fprintf(o, "%s: configuration ok\nmode %s on %s, %d upstream(s), copy %s, metrics on %s\n",
            c->file, modes[c->mode], addr_format(&c->listen, listen, sizeof listen), c->nup,
            copies[c->copy], admin);
}

/* Where requests may go (http), and whose word on the client is taken. */
static void print_access(const struct config *c, FILE *o) {
    if (c->mode == MODE_HTTP) {
        fprintf(o, "local destinations: %s%s\n",
                c->local_destinations == LOCAL_DENY ? "deny" : "allow",
                c->local_auto ? " (auto)" : "");
        const struct destinations *deny = &c->deny_destinations, *allow = &c->allow_destinations;
        fprintf(o, "destinations: denied: %d names and %d networks; allowed: ", deny->names.n,
                deny->nets.n);
        if (allow->names.n || allow->nets.n)
            fprintf(o, "only %d names and %d networks\n", allow->names.n, allow->nets.n);
        else
            fprintf(o, "any other\n");
    }
    if (c->trusted_proxies.n)
        fprintf(o,
                "trusted proxies: %d networks, whose connections must start with a PROXY "
                "header naming the client\n",
                c->trusted_proxies.n);
}

/* The memory: the pool's, the connections', the parked heads'. */
static void print_memory(const struct config *c, FILE *o) {
    double w = c->workers, mib = 1 << 20, n = c->max_connections;
    fprintf(o,
            "pool: %d workers: %d threads, %.1f MiB of stacks (resident only as touched), %.1f MiB "
            "of %s",
            c->workers, 2 * c->workers, w * 2 * STACK_SIZE / mib, w * 2 * c->buffer_size / mib,
            c->copy == COPY_SPLICE ? "pipe buffers in the kernel at most" : "buffers");
    if (c->mode == MODE_HTTP) /* http.c: two input buffers and two rewritten heads */
        fprintf(o, ", %.1f MiB of http heads", w * 4 * HEAD_MAX / mib);
    fprintf(o, "; %lld fds\n", (long long)c->workers * pool_fds(c));
    /* pool.c's slab: a record for every connection that can be open at once, resident only
     * once used; and two sockets each. The kernel's socket buffers come on top. */
    fprintf(o,
            "connections: max_connections %d (busy, queued or parked; the queue holds %d new "
            "ones): %.1f MiB of records, %lld fds\n",
            c->max_connections, c->queue, n * sizeof(struct conn) / mib, (long long)n * 2);
    /* pool.c's head buffers: where a request head read in part waits while parked. */
    if (c->mode == MODE_HTTP)
        fprintf(o,
                "slow heads: %d head buffers, %.1f MiB (resident only as used); min_rate %d "
                "bytes/s for heads and bodies%s\n",
                c->head_buffers, (double)c->head_buffers * HEAD_MAX / mib, c->min_rate,
                c->min_rate ? "" : " (none)");
}

/* How to size the pool: what takes turns, and what holds a worker throughout. */
static void print_turns(const struct config *c, FILE *o) {
    if (c->park_after && c->time_slice)
        fprintf(o,
                "turns: beyond %d busy connections they take turns of %d ms (a round of N "
                "busy ones takes N / %d x %d ms); an http request waiting for its answer "
                "holds its worker throughout: add workers for those you expect at once\n",
                c->workers, c->time_slice, c->workers, c->time_slice);
    if (c->park_after)
        fprintf(o, "park_after %d ms, time_slice %d ms%s", c->park_after, c->time_slice,
                c->time_slice ? "" : " (no turns)");
    else
        fprintf(o, "park_after 0 (never park, no turns: a connection keeps its worker)");
    fprintf(o, ", keepalive_timeout %d s, idle_timeout %d s\n", c->keepalive_timeout,
            c->idle_timeout);
}

int config_plan(const struct config *c, FILE *o, char *err, size_t errlen) {
    if (config_check_log(c, err, errlen) < 0) return -1;
    print_listeners(c, o);
    print_access(c, o);
    print_memory(c, o);
    print_turns(c, o);
    limits_plan(c, o);
    struct rlimit rl = {0};
    getrlimit(RLIMIT_NOFILE, &rl);
    fprintf(o, "fds at full load: %lld (limit %llu)\n", config_fds(c),
            (unsigned long long)rl.rlim_max);
    return config_fd_warning(c, (unsigned long long)rl.rlim_max, "", o);
}
