/* proxy.c — main: the command line, the config, the listeners, the acceptor thread, signals,
 * and tcp mode's serve function. Start reading here; proxy.h lists what the others offer. */
#include "proxy.h"

#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static int listen_fd = -1;
static _Atomic int stopping;

/* The -h text. */
static void usage(FILE *out) {
    fprintf(out, "usage: proxy [-c FILE] [-t] [-h] [-V]\n"
                 "  -c FILE  configuration (default proxy.ini)\n"
                 "  -t       check the configuration, print the memory plan, exit\n"
                 "  -h       this help\n"
                 "  -V       version\n"
                 "Signals: TERM/INT stop gracefully, HUP reopens the log, USR1 logs the "
                 "metrics.\n");
}

/* Opens a listening socket on a; -1 with errno on failure. With reuse_port, several proxy
 * processes may listen on the same address and the kernel spreads connections over them. */
static int open_listener(const struct addr *a, int reuse_port) {
    int one = 1, fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if ((reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0) ||
        bind(fd, (const struct sockaddr *)&a->sa, a->len) < 0 || listen(fd, SOMAXCONN) < 0)
        return close_failed(fd);
    return fd;
}

/* The address a listener really got (port 0 becomes the port the kernel chose). */
static char *bound(int fd, char *buf, size_t len) {
    struct addr a = {.len = sizeof a.sa};
    getsockname(fd, (struct sockaddr *)&a.sa, &a.len);
    return addr_format(&a, buf, len);
}

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

/* The acceptor thread: accept, check the allow-list, hand to the pool. Nothing slow here:
 * the sockets it accepts inherit their options from the listener. When stopping, it takes
 * what is already in the backlog (those clients are connected) without blocking, then ends. */
static void *acceptor_main(void *arg) {
    int left = -1; /* how many more it may take once stopping: a flood must not keep it */
    (void)arg;
    for (;;) {
        if (left < 0 && atomic_load(&stopping)) {
            fcntl(listen_fd, F_SETFL, O_NONBLOCK);
            left = cfg.queue + cfg.workers;
        }
        if (left == 0) break;
        struct addr peer = {.len = sizeof peer.sa};
        int fd = accept4(listen_fd, (struct sockaddr *)&peer.sa, &peer.len, SOCK_CLOEXEC);
        if (fd < 0) {
            /* EAGAIN: the listener's SO_RCVTIMEO tick, or, once stopping, an empty backlog. */
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (left >= 0) break;
            if (errno == EAGAIN) continue;
            /* Out of fds or memory: the connection stays in the kernel's backlog. Pause
             * instead of spinning on it; it is served once descriptors free up. */
            atomic_fetch_add(&stats.accept_errors, 1);
            log_refused(strerror(errno), NULL);
            usleep(100000);
            continue;
        }
        if (left > 0) left--; /* (accepted sockets never inherit O_NONBLOCK on Linux) */
        addr_unmap(&peer);    /* a dual-stack listener's IPv4 clients are IPv4 from here on */
        atomic_fetch_add(&stats.accepted, 1);
        if (!cidr_match(cfg.allow, cfg.nallow, &peer)) {
            atomic_fetch_add(&stats.refused[REFUSED_NOT_ALLOWED], 1);
            log_refused("not in [access] allow", &peer);
            close(fd);
            continue;
        }
        atomic_fetch_add(&stats.active, 1);
        if (pool_submit(fd, &peer) < 0) {
            atomic_fetch_sub(&stats.active, 1);
            atomic_fetch_add(&stats.refused[REFUSED_QUEUE_FULL], 1);
            log_refused("queue full", &peer);
            /* Best-effort and never blocking: the acceptor must not wait on one client. */
            if (cfg.mode == MODE_HTTP) {
                char busy[256];
                int n = http_error(busy, sizeof busy, 503, 0);
                send(fd, busy, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            }
            close(fd);
        }
    }
    return NULL;
}

/* tcp mode: connect an upstream, tell it who the client is if asked, relay both ways. */
static void tcp_serve(struct worker *w, struct conn *c) {
    int fd = upstream_open(c);
    if (fd < 0) return conn_end(c, END_NO_UPSTREAM);
    pool_set_upstream(w, fd);
    if (cfg.send_proxy != SEND_PROXY_OFF) {
        char hdr[128];
        struct addr local = {.len = sizeof local.sa};
        getsockname(c->client, (struct sockaddr *)&local.sa, &local.len);
        addr_unmap(&local);
        int n = upstream_proxy_header(cfg.send_proxy, &c->peer, &local, hdr);
        if (copy_send(c, c->upstream, hdr, (size_t)n) < 0) return;
    }
    pool_back_start(w, c, copy_down); /* the back thread: upstream → client */
    copy_stream(c, &w->cp[UP], UP);
    pool_back_wait(w);
}

/* Raises the soft fd limit to the hard one and warns when even that is below a full load. */
static void fd_limit(void) {
    struct rlimit rl;
    long long need = config_fds(&cfg);
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((unsigned long long)need > (unsigned long long)rl.rlim_cur)
        fprintf(stderr, "proxy: warning: a full load needs %lld fds, the limit is %llu\n", need,
                (unsigned long long)rl.rlim_cur);
}

/* Reads the options and the config, sets up the listeners, the pool and the threads, then
 * waits for signals until a SIGTERM or SIGINT stops it gracefully. */
int main(int argc, char **argv) {
    const char *file = "proxy.ini";
    int check = 0, opt, sig, admin_fd = -1;
    char msg[512], where[64], admin[64] = "off";
    while ((opt = getopt(argc, argv, "c:thV")) != -1) {
        switch (opt) {
        case 'c': file = optarg; break;
        case 't': check = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("proxy %s\n", PROXY_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) return usage(stderr), 2;
    if (config_load(&cfg, file, msg, sizeof msg) < 0) {
        fprintf(stderr, "%s\n", msg);
        return 2;
    }
    if (check) return config_plan(&cfg, stdout), 0;

    if (log_open(cfg.log) < 0) err(1, "cannot open log %s", cfg.log);
    /* A peer that closes while we write must cost one connection, never the process. */
    signal(SIGPIPE, SIG_IGN);
    /* Every thread inherits this mask; only main's sigwait below sees these signals. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    fd_limit();

    if ((listen_fd = open_listener(&cfg.listen, cfg.reuse_port)) < 0)
        err(1, "cannot listen on %s", addr_format(&cfg.listen, where, sizeof where));
    copy_prepare(listen_fd); /* accepted sockets inherit these options: no calls per client */
    if (cfg.stats_listen.len && (admin_fd = open_listener(&cfg.stats_listen, 0)) < 0)
        err(1, "cannot listen on %s", addr_format(&cfg.stats_listen, where, sizeof where));
    if (pool_start(cfg.mode == MODE_HTTP ? http_serve : tcp_serve) < 0)
        err(1, "cannot start %d workers", cfg.workers);
    if (admin_fd >= 0 && stats_start(admin_fd) < 0) err(1, "cannot start the metrics thread");
    pthread_t acceptor;
    if (pthread_create(&acceptor, NULL, acceptor_main, NULL)) errx(1, "cannot start the acceptor");
    if (admin_fd >= 0) bound(admin_fd, admin, sizeof admin);
    fprintf(stderr, "proxy: listening on %s (%s, %d workers), metrics on %s\n",
            bound(listen_fd, where, sizeof where), cfg.mode == MODE_HTTP ? "http" : "tcp",
            cfg.workers, admin);

    for (;;) {
        if (sigwait(&set, &sig)) continue;
        if (sig == SIGHUP && log_open(cfg.log) < 0)
            log_line("cannot reopen log: %s", strerror(errno));
        if (sig == SIGUSR1) {
            size_t len;
            char *text = stats_render(&len);
            if (text) log_raw(text, len);
            free(text);
        }
        if (sig == SIGTERM || sig == SIGINT) break;
    }
    /* The acceptor sees this within one tick of its accept(); no shutdown() of the listener,
     * which would reset the connections still waiting in its backlog. */
    atomic_store(&stopping, 1);
    pthread_join(acceptor, NULL);
    close(listen_fd);
    log_line("stopping: %llu connections open get up to %d s to finish",
             (unsigned long long)atomic_load(&stats.active), GRACE_SECONDS);
    pool_stop();
    stats_stop();
    log_line("stopped");
    return 0;
}
