/* admin.c — the admin listener: its own thread answers GET /metrics with stats_render's text,
 * one request per connection, one connection at a time, never on the proxy's own port. It has
 * no authentication: keep it on loopback. */
#include "proxy.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int admin_fd = -1; /* set before the thread starts, closed after it ends */
static _Atomic int admin_stopping;
static pthread_t admin;
static render_fn mode_metrics; /* set before the thread starts */

/* Answers one request on fd: GET /metrics, or an error. One request per connection. */
static void admin_serve(int fd) {
    char req[2048] = "", hdr[256];
    size_t got = 0;
    uint64_t deadline = mono_ns() + 2000000000u; /* a slow client holds this thread 2 s at most */
    net_set_tick(fd, 200);                       /* so that recv wakes to check it */
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
        body = stats_render(mode_metrics, &len);
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

int admin_start(int fd, render_fn more) {
    pthread_attr_t attr;
    admin_fd = fd;
    mode_metrics = more;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE);
    int rc = pthread_create(&admin, &attr, admin_main, NULL);
    pthread_attr_destroy(&attr);
    return rc ? -1 : 0;
}

void admin_stop(void) {
    if (admin_fd < 0) return;
    atomic_store(&admin_stopping, 1);
    shutdown(admin_fd, SHUT_RDWR); /* wakes accept() */
    pthread_join(admin, NULL);
    close(admin_fd);
}
