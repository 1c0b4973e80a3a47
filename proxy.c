/* proxy.c — main: the command line, the config, the listeners, the signals and the stop. The
 * acceptor thread (acceptor.c) admits each client and hands it to the pool. Start reading here;
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
/* Listening sockets systemd passed (socket activation), by what they serve: [0] listen, [1]
 * [stats] listen; -1: none, we open it. */
static int passed[2] = {-1, -1};

/* ---- main ----------------------------------------------------------------------------- */

/* The -h text. */
static void usage(FILE *out) {
    fprintf(out, "usage: proxy [-c FILE] [-t] [-h] [-V]\n"
                 "  -c FILE  configuration (default proxy.ini)\n"
                 "  -t       check the configuration, print the memory plan, exit\n"
                 "  -h       this help\n"
                 "  -V       version\n"
                 "Signals: TERM/INT stop gracefully, HUP reloads the config and reopens the log, "
                 "USR1 logs the metrics.\n");
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
    fprintf(stderr, "proxy: unexpected argument '%s' (the config file goes after -c)\n",
            argv[optind]);
    usage(stderr);
    return 2;
}

/* Raises the soft fd limit to the hard one and warns when even that is below a full load;
 * exits when not even the workers fit (the same words as -t). */
static void fd_limit(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0) return;
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (config_fd_warning(&cfg, (unsigned long long)rl.rlim_cur, "proxy: ", stderr) < 0) exit(1);
}

/* Takes the listening sockets systemd passed (socket activation: LISTEN_FDS sockets from fd 3
 * on, when LISTEN_PID is ours; systemd-socket-activate does the same). Each must be a listening
 * socket on listen's address or [stats] listen's, and serves that listener in place of one we
 * would open; one on any other address is a mistake in the socket unit: exits 1 naming it. No
 * libsystemd: the protocol is these two variables. */
static void take_passed_sockets(void) {
    const char *pid = getenv("LISTEN_PID"), *fds = getenv("LISTEN_FDS");
    if (!pid || !fds || strtol(pid, NULL, 10) != (long)getpid()) return;
    int n = (int)strtol(fds, NULL, 10);
    unsetenv("LISTEN_PID"); /* for nothing we start: they were for us */
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    for (int fd = 3; fd < 3 + n; fd++) {
        struct addr a;
        char where[64], want[64], admin[64] = "off";
        int listening = 0;
        socklen_t len = sizeof listening;
        fcntl(fd, F_SETFD, FD_CLOEXEC);
        if (net_local(fd, &a) < 0 ||
            getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0 || !listening)
            errx(1, "fd %d passed in LISTEN_FDS is not a listening socket", fd);
        addr_format(&a, where, sizeof where);
        addr_format(&cfg.listen, want, sizeof want);
        if (cfg.stats_listen.len) addr_format(&cfg.stats_listen, admin, sizeof admin);
        if (!strcmp(where, want) && passed[0] < 0)
            passed[0] = fd;
        else if (!strcmp(where, admin) && passed[1] < 0)
            passed[1] = fd;
        else
            errx(1,
                 "the socket passed on %s matches neither [proxy] listen (%s) nor [stats] "
                 "listen (%s): make the socket unit's ListenStream= name the same address",
                 where, want, admin);
    }
}

/* Opens a listener on a (the key what names it) or exits, naming the key and the address. */
static int listen_or_die(const struct addr *a, int reuse_port, const char *what) {
    int fd = net_listen(a, reuse_port);
    if (fd < 0) {
        char where[64];
        err(1, "cannot listen on %s (%s)", addr_format(a, where, sizeof where), what);
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

    listen_fd =
        passed[0] >= 0 ? passed[0] : listen_or_die(&cfg.listen, cfg.reuse_port, "[proxy] listen");
    /* Set once on the listener, these are inherited by every accepted socket: no calls per
     * client. */
    net_prepare(listen_fd);
    net_set_tick(listen_fd, TICK_MS);
    int admin_fd = passed[1] >= 0         ? passed[1]
                   : cfg.stats_listen.len ? listen_or_die(&cfg.stats_listen, 0, "[stats] listen")
                                          : -1;
    /* The listeners as bound (port 0 chosen by now), which no request may be dialled to; told
     * before any worker runs, so they need no lock. */
    struct addr own[2];
    int nown = admin_fd >= 0 ? 2 : 1;
    if (net_local(listen_fd, &own[0]) < 0) err(1, "cannot read the listening address");
    if (admin_fd >= 0 && net_local(admin_fd, &own[1]) < 0) err(1, "cannot read the admin address");
    upstream_own(own, nown);
    if (limits_start(cfg.clients) < 0) err(1, "cannot make the table of %d clients", cfg.clients);
    if (pool_start(mode) < 0) err(1, "cannot start %d workers", cfg.workers);
    if (admin_fd >= 0 && admin_start(admin_fd, mode->metrics) < 0)
        err(1, "cannot start the metrics thread");
    if (acceptor_start(listen_fd) < 0) err(1, "cannot start the acceptor");

    char where[64], admin[64] = "off";
    if (admin_fd >= 0) addr_format(&own[1], admin, sizeof admin);
    fprintf(stderr, "proxy: listening on %s (%s, %d workers), metrics on %s\n",
            addr_format(&own[0], where, sizeof where), mode->name, cfg.workers, admin);
}

/* SIGHUP: loads the config file again and puts it in force, or keeps the running one and says
 * why; and reopens the log either way (logrotate sends SIGHUP too), the new config's if it
 * names another. */
static void reload(void) {
    char why[600], note[600];
    int ok = config_reload(why, sizeof why, note, sizeof note) == 0;
    struct config *now = config_hold();
    if (log_open(now->log) < 0) log_line("cannot reopen log %s: %s", now->log, strerror(errno));
    config_drop(now);
    atomic_fetch_add(&stats.reloads[!ok], 1);
    if (!ok)
        log_line("reload failed, the config before stays in force: %s", why);
    else
        log_line("reloaded %s: generation %llu%s%s", cfg.file,
                 (unsigned long long)config_generation(),
                 note[0] ? "; changed, but in force only after a restart: " : "", note);
}

/* Waits for signals until SIGTERM or SIGINT: SIGHUP reloads the config and reopens the log,
 * SIGUSR1 logs the metrics. */
static void wait_for_stop(const sigset_t *set) {
    for (;;) {
        int sig;
        if (sigwait(set, &sig)) continue;
        if (sig == SIGTERM || sig == SIGINT) return;
        if (sig == SIGHUP) reload();
        if (sig == SIGUSR1) {
            size_t len;
            char *text = stats_render(mode->metrics, &len);
            if (text) log_raw(text, len);
            free(text);
        }
    }
}

/* The graceful stop: the acceptor takes no more clients and closes the parked connections
 * between requests; the rest (served, or parked with work in progress) get up to
 * GRACE_SECONDS, and the process exits as soon as none is left; then the waiting room closes,
 * the pool ends what is left, the admin thread ends. */
static void stop(void) {
    /* No shutdown() of the listener, which would reset the connections still waiting in its
     * backlog: the acceptor takes them in first. */
    /* A socket systemd passed stays open in systemd: the clients in its backlog are our
     * successor's (a restart), not ours to take in and end. */
    uint64_t idle = acceptor_stop(passed[0] < 0);
    close(listen_fd);
    log_line("stopping: %llu connections open get up to %d s to finish (%llu idle ones closed)",
             (unsigned long long)atomic_load(&stats.active), GRACE_SECONDS,
             (unsigned long long)idle);
    pool_drain(GRACE_SECONDS);
    acceptor_end();
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
        msg[0] = 0;
        if (config_plan(&cfg, stdout, msg, sizeof msg) == 0) return 0;
        if (msg[0]) fprintf(stderr, "%s\n", msg);
        return 2;
    }
    mode = cfg.mode == MODE_HTTP ? &http_mode : &tcp_mode;
    config_start();
    take_passed_sockets();
    sigset_t set;
    start(&set);
    wait_for_stop(&set);
    stop();
    return 0;
}
