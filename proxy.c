/* proxy.c — main: the command line, the config, the listeners, the signals and the stop; and the
 * acceptor thread, which admits each client and hands it to the pool. Start reading here;
 * proxy.h lists what the other files offer, layer by layer. */
#include "proxy.h"

#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static const struct mode *mode; /* tcp_mode or http_mode, chosen once by the config */
static int listen_fd = -1;
static pthread_t acceptor;
static _Atomic int stopping; /* set by main on SIGTERM; the acceptor reads it every tick */

/* ---- the acceptor --------------------------------------------------------------------- */

/* Logs a refused connection (peer NULL: accept itself failed), at most one line a second:
 * a flood of refusals must not flood the log too. Only the acceptor thread calls it. */
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

/* Lets one accepted client in: it must be in [access] allow, and the queue must have room;
 * else it is closed (after the mode's last word), counted and logged. */
static void admit_client(int fd, struct addr *peer) {
    addr_unmap(peer); /* a dual-stack listener's IPv4 clients are IPv4 from here on */
    atomic_fetch_add(&stats.accepted, 1);
    if (!cidr_match(cfg.allow, cfg.nallow, peer)) {
        atomic_fetch_add(&stats.refused[REFUSED_NOT_ALLOWED], 1);
        log_refused("not in [access] allow", peer);
        close(fd);
        return;
    }
    atomic_fetch_add(&stats.active, 1);
    if (pool_submit(fd, peer) == 0) return;
    atomic_fetch_sub(&stats.active, 1);
    atomic_fetch_add(&stats.refused[REFUSED_QUEUE_FULL], 1);
    log_refused("queue full", peer);
    if (mode->refuse) mode->refuse(fd);
    close(fd);
}

/* Accepts one client and admits it. Returns 0, or -1 with accept's errno: EAGAIN when the
 * listener's tick passed, or, once the listener is non-blocking, the backlog is empty. Nothing
 * slow here: accepted sockets inherit their options from the listener. */
static int accept_one(void) {
    struct addr peer = {.len = sizeof peer.sa};
    int fd = accept4(listen_fd, (struct sockaddr *)&peer.sa, &peer.len, SOCK_CLOEXEC);
    if (fd < 0) return -1;
    admit_client(fd, &peer);
    return 0;
}

/* Once stopping: takes what is already in the listener's backlog (those clients are connected,
 * and closing the listener would reset them) without blocking, and at most queue + workers of
 * them, so that a flood cannot keep the acceptor from ending. */
static void drain_backlog(void) {
    int left = cfg.queue + cfg.workers;
    fcntl(listen_fd, F_SETFL, O_NONBLOCK); /* accepted sockets never inherit it on Linux */
    while (left > 0) {
        if (accept_one() == 0)
            left--;
        else if (errno != EINTR && errno != ECONNABORTED)
            break; /* EAGAIN: the backlog is empty */
    }
}

/* The acceptor thread: accepts and admits until the stop, then drains the backlog. */
static void *acceptor_main(void *arg) {
    (void)arg;
    while (!atomic_load(&stopping)) {
        if (accept_one() == 0) continue;
        if (errno == EAGAIN || errno == EINTR || errno == ECONNABORTED) continue;
        /* Out of fds or memory: the connection stays in the kernel's backlog. Pause instead of
         * spinning on it; it is served once descriptors free up. */
        atomic_fetch_add(&stats.accept_errors, 1);
        log_refused(strerror(errno), NULL);
        usleep(100000);
    }
    drain_backlog();
    return NULL;
}

/* ---- main ----------------------------------------------------------------------------- */

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

/* Reads the command line into *file and *check. Returns the exit status when there is nothing
 * more to do (-h, -V, a usage error), else -1. */
static int options(int argc, char **argv, const char **file, int *check) {
    int opt;
    while ((opt = getopt(argc, argv, "c:thV")) != -1) {
        switch (opt) {
        case 'c': *file = optarg; break;
        case 't': *check = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("proxy %s\n", PROXY_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind == argc) return -1;
    usage(stderr);
    return 2;
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

/* Opens a listener on a or exits, naming the address. */
static int listen_or_die(const struct addr *a, int reuse_port) {
    int fd = net_listen(a, reuse_port);
    if (fd < 0) {
        char where[64];
        err(1, "cannot listen on %s", addr_format(a, where, sizeof where));
    }
    return fd;
}

/* Starts everything, or exits: the log, the signal mask, the listeners, the pool, the admin
 * thread and the acceptor. Signals in set are left for main's sigwait. */
static void start(sigset_t *set) {
    if (log_open(cfg.log) < 0) err(1, "cannot open log %s", cfg.log);
    /* A peer that closes while we write must cost one connection, never the process. */
    signal(SIGPIPE, SIG_IGN);
    /* Every thread inherits this mask, so only main's sigwait sees these signals. */
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, set, NULL);
    fd_limit();

    listen_fd = listen_or_die(&cfg.listen, cfg.reuse_port);
    /* Set once on the listener, these are inherited by every accepted socket: no calls per
     * client. The tick also wakes the acceptor's accept() to check for a stop. */
    net_prepare(listen_fd);
    net_set_tick(listen_fd, TICK_MS);
    int admin_fd = cfg.stats_listen.len ? listen_or_die(&cfg.stats_listen, 0) : -1;
    /* The listeners as bound (port 0 chosen by now), which no request may be dialled to; told
     * before any worker runs, so they need no lock. */
    struct addr own[2];
    int nown = admin_fd >= 0 ? 2 : 1;
    if (net_local(listen_fd, &own[0]) < 0) err(1, "cannot read the listening address");
    if (admin_fd >= 0 && net_local(admin_fd, &own[1]) < 0) err(1, "cannot read the admin address");
    upstream_own(own, nown);
    if (pool_start(mode) < 0) err(1, "cannot start %d workers", cfg.workers);
    if (admin_fd >= 0 && admin_start(admin_fd, mode->metrics) < 0)
        err(1, "cannot start the metrics thread");
    if (pthread_create(&acceptor, NULL, acceptor_main, NULL)) errx(1, "cannot start the acceptor");

    char where[64], admin[64] = "off";
    if (admin_fd >= 0) addr_format(&own[1], admin, sizeof admin);
    fprintf(stderr, "proxy: listening on %s (%s, %d workers), metrics on %s\n",
            addr_format(&own[0], where, sizeof where), mode->name, cfg.workers, admin);
}

/* Waits for signals until SIGTERM or SIGINT: SIGHUP reopens the log, SIGUSR1 logs the
 * metrics. */
static void wait_for_stop(const sigset_t *set) {
    for (;;) {
        int sig;
        if (sigwait(set, &sig)) continue;
        if (sig == SIGTERM || sig == SIGINT) return;
        if (sig == SIGHUP && log_open(cfg.log) < 0)
            log_line("cannot reopen log: %s", strerror(errno));
        if (sig == SIGUSR1) {
            size_t len;
            char *text = stats_render(mode->metrics, &len);
            if (text) log_raw(text, len);
            free(text);
        }
    }
}

/* The graceful stop: the acceptor ends, the pool gives open connections GRACE_SECONDS, the
 * admin thread ends. */
static void stop(void) {
    /* The acceptor sees this within one tick of its accept(); no shutdown() of the listener,
     * which would reset the connections still waiting in its backlog. */
    atomic_store(&stopping, 1);
    pthread_join(acceptor, NULL);
    close(listen_fd);
    log_line("stopping: %llu connections open get up to %d s to finish",
             (unsigned long long)atomic_load(&stats.active), GRACE_SECONDS);
    pool_stop();
    admin_stop();
    log_line("stopped");
}

/* Options, the config, start, wait for a stop signal, stop. */
int main(int argc, char **argv) {
    const char *file = "proxy.ini";
    char msg[512];
    int check = 0;
    int status = options(argc, argv, &file, &check);
    if (status >= 0) return status;
    if (config_load(&cfg, file, msg, sizeof msg) < 0) {
        fprintf(stderr, "%s\n", msg);
        return 2;
    }
    if (check) {
        config_plan(&cfg, stdout);
        return 0;
    }
    mode = cfg.mode == MODE_HTTP ? &http_mode : &tcp_mode;
    sigset_t set;
    start(&set);
    wait_for_stop(&set);
    stop();
    return 0;
}
