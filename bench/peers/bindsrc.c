/* bench/peers/bindsrc.c — an LD_PRELOAD shim for load generators that cannot choose their
 * source address (wrk): every IPv4 connect() first binds to $BIND_SRC, so that the load plays
 * a client of its own. Any 127.0.0.0/8 address is loopback, so 127.0.0.2 is a second client
 * on the same machine. bench/policy.py builds and uses it. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>

int connect(int fd, const struct sockaddr *sa, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    const char *src = getenv("BIND_SRC");
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    if (src && sa->sa_family == AF_INET) {
        struct sockaddr_in b = {.sin_family = AF_INET};
        if (inet_pton(AF_INET, src, &b.sin_addr) == 1) bind(fd, (struct sockaddr *)&b, sizeof b);
    }
    return real(fd, sa, len);
}
