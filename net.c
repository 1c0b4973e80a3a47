/* net.c — sockets and addresses, the bottom layer: listeners, connects that do not block
 * (started, then finished once the socket is writable), the socket options the copy loops rely
 * on, name lookups on threads of their own that ring an eventfd when done, addresses
 * ("host:port"), and the lists access rules are made of: networks ("10.0.0.0/8"), host names,
 * ports. It calls nothing of the proxy's own. A failure is
 * -1 with errno, or -1 with a reason in err where a person has to read why (a config value). */
#include "proxy.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/time.h>
#include <unistd.h>

/* ---- sockets -------------------------------------------------------------------------- */

int net_listen(const struct addr *a, int reuse_port) {
    int one = 1;
    int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuse_port && setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) < 0)
        return close_failed(fd);
    if (bind(fd, (const struct sockaddr *)&a->sa, a->len) < 0) return close_failed(fd);
    if (listen(fd, SOMAXCONN) < 0) return close_failed(fd);
    return fd;
}

int net_local(int fd, struct addr *a) {
    a->len = sizeof a->sa;
    if (getsockname(fd, (struct sockaddr *)&a->sa, &a->len) < 0) return -1;
    addr_unmap(a);
    return 0;
}

void net_prepare(int fd) {
    /* Best-effort: a socket without these still works, only slower. Without TCP_NODELAY a
     * small reply waits for the peer's delayed ACK (~40 ms). Set on a listening socket, they
     * are inherited by every socket it accepts (Linux). */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &one, sizeof one);
}

void net_set_tick(int fd, int ms) {
    struct timeval tick = {ms / 1000, ms % 1000 * 1000L};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tick, sizeof tick);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tick, sizeof tick);
}

/* Why bind and not a list of interfaces: the kernel's own answer covers every interface, alias and
 * local route, and cannot go stale. */
int net_owns(const struct addr *a) {
    struct addr any = *a;
    int fd = socket(a->sa.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return 0;
    ((struct sockaddr_in *)&any.sa)->sin_port = 0; /* where sin6_port is, too */
    int rc = bind(fd, (const struct sockaddr *)&any.sa, any.len);
    close(fd);
    return rc == 0;
}

/* Why non-blocking: so that the wait for the connect can be given up on or left; a blocking connect
 * with SO_SNDTIMEO would hold its thread for the whole timeout. */
int net_connect_start(const struct addr *a) {
    int fd = socket(a->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (connect(fd, (const struct sockaddr *)&a->sa, a->len) < 0 && errno != EINPROGRESS)
        return close_failed(fd);
    return fd;
}

int net_connect_done(int fd, int tick_ms) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) return -1;
    if (err) {
        errno = err;
        return -1;
    }
    /* Blocking again: the copy loops wait in poll, then read or write. */
    if (fcntl(fd, F_SETFL, 0) < 0) return -1;
    net_prepare(fd);
    net_set_tick(fd, tick_ms);
    return 0;
}

/* ---- name lookups --------------------------------------------------------------------- */

/* A lookup handed to a thread of its own: getaddrinfo cannot be interrupted and may take many
 * seconds, and the asker must be able to give up on it (a stop, its deadline) or leave its
 * worker meanwhile. The resolver rings an eventfd when it is done, so that the asker can wait
 * for it in poll (copy_wait) and the waiting room in epoll. The asker and the resolver thread
 * share the record; the last of them to let go frees it. */
struct lookup {
    pthread_mutex_t mu;
    int holders;                /* (mu) the asker, and the thread once started; 0 frees */
    int done, rc;               /* (mu) the resolver has finished, with getaddrinfo's result */
    struct addrinfo *res;       /* (mu) its addresses, freed with the record */
    int done_fd;                /* eventfd: readable once done is set; closed with the record */
    char host[256], service[8]; /* written before the thread starts, then read-only */
};

static _Atomic int lookups; /* resolver threads running, abandoned ones included */

/* Copies up to max of res's addresses into out. Returns how many, or -1 with errno E_LOOKUP
 * when there was none. */
static int copy_addrs(const struct addrinfo *res, struct addr *out, int max) {
    int n = 0;
    for (const struct addrinfo *ai = res; ai && n < max; ai = ai->ai_next) {
        if (ai->ai_addrlen > sizeof out[n].sa) continue;
        memcpy(&out[n].sa, ai->ai_addr, ai->ai_addrlen);
        out[n].len = ai->ai_addrlen;
        n++;
    }
    if (n == 0) errno = E_LOOKUP;
    return n ? n : -1;
}

/* The caller and the lookup's thread both hold l: the last holder frees it. */
void net_lookup_drop(struct lookup *l) {
    pthread_mutex_lock(&l->mu);
    int last = --l->holders == 0;
    pthread_mutex_unlock(&l->mu);
    if (!last) return;
    if (l->res) freeaddrinfo(l->res);
    close(l->done_fd);
    pthread_mutex_destroy(&l->mu);
    free(l);
}

/* The resolver thread: one getaddrinfo, its result handed over. Nobody joins it (detached):
 * the process may even exit while it is still blocked. */
static void *resolver_main(void *arg) {
    struct lookup *l = arg;
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    uint64_t one = 1;
    int rc = getaddrinfo(l->host, l->service, &hints, &res);
    pthread_mutex_lock(&l->mu);
    l->rc = rc;
    l->res = rc ? NULL : res;
    l->done = 1;
    if (write(l->done_fd, &one, sizeof one) < 0) { /* cannot fail: a fresh counter */
    }
    pthread_mutex_unlock(&l->mu);
    net_lookup_drop(l);
    atomic_fetch_sub(&lookups, 1);
    return NULL;
}

/* Makes a lookup record for host and service, held by the asker. Returns it, or NULL. */
static struct lookup *lookup_new(const char *host, const char *service) {
    struct lookup *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    l->done_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->done_fd < 0) {
        free(l);
        return NULL;
    }
    pthread_mutex_init(&l->mu, NULL);
    l->holders = 1;
    snprintf(l->host, sizeof l->host, "%s", host);
    snprintf(l->service, sizeof l->service, "%s", service);
    return l;
}

/* Starts l's resolver thread. Returns 0, or -1 with errno EAGAIN: too many lookups running
 * (LOOKUPS_MAX; abandoned ones still count), or no thread could be made. */
static int lookup_start(struct lookup *l) {
    pthread_attr_t attr;
    pthread_t t;
    if (atomic_fetch_add(&lookups, 1) >= LOOKUPS_MAX) {
        atomic_fetch_sub(&lookups, 1);
        errno = EAGAIN;
        return -1;
    }
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, STACK_SIZE); /* getaddrinfo needs more than 32 KiB */
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    l->holders = 2; /* before the thread runs: it may let go at once */
    int e = pthread_create(&t, &attr, resolver_main, l);
    pthread_attr_destroy(&attr);
    if (!e) return 0;
    l->holders = 1;
    atomic_fetch_sub(&lookups, 1);
    errno = EAGAIN;
    return -1;
}

int net_lookup_fd(const struct lookup *l) {
    return l->done_fd;
}

int net_lookup_take(struct lookup *l, struct addr *out, int max) {
    pthread_mutex_lock(&l->mu);
    int n = -1;
    errno = E_LOOKUP;
    if (l->done && !l->rc) n = copy_addrs(l->res, out, max); /* sets errno if it fails */
    int e = errno;
    pthread_mutex_unlock(&l->mu);
    net_lookup_drop(l);
    errno = e;
    return n;
}

int net_resolve(const char *host, int port, struct addr *out, int max, struct lookup **l) {
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICSERV | AI_NUMERICHOST};
    struct addrinfo *res;
    char service[8];
    snprintf(service, sizeof service, "%d", port);
    /* An address: no thread, nothing to wait for (127.0.0.1, the benchmarks). */
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc == 0) {
        int n = copy_addrs(res, out, max);
        freeaddrinfo(res);
        return n;
    }
    if (rc != EAI_NONAME) {
        errno = E_LOOKUP;
        return -1;
    }
    if (!(*l = lookup_new(host, service))) return -1;
    if (lookup_start(*l) == 0) return 0;
    int e = errno;
    net_lookup_drop(*l);
    *l = NULL;
    errno = e;
    return -1;
}

/* ---- addresses ------------------------------------------------------------------------ */

/* Reads s as 1 to max_digits decimal digits and nothing else. Returns 0 or -1. */
static int decimal(const char *s, size_t max_digits, long *out) {
    size_t n = strlen(s);
    if (n == 0 || n > max_digits || strspn(s, "0123456789") != n) return -1;
    *out = strtol(s, NULL, 10);
    return 0;
}

/* Writes why into err and fails: addr_parse's reasons are read by people. */
static int reason(char *err, size_t errlen, const char *why) {
    snprintf(err, errlen, "%s", why);
    return -1;
}

int addr_parse(const char *s, struct addr *a, char *err, size_t errlen) {
    char host[256];
    const char *colon = strrchr(s, ':');
    long port;
    if (!colon) return reason(err, errlen, "expected host:port");
    size_t hl = (size_t)(colon - s);
    if (*s == '[') {
        if (hl < 2 || colon[-1] != ']') return reason(err, errlen, "expected [IPv6]:port");
        s++;
        hl -= 2;
    } else if (memchr(s, ':', hl)) {
        return reason(err, errlen, "IPv6 addresses go in brackets, like [::1]:8888");
    }
    if (hl == 0 || hl >= sizeof host) return reason(err, errlen, "expected a host before :");
    memcpy(host, s, hl);
    host[hl] = 0;
    if (decimal(colon + 1, 5, &port) < 0 || port > 65535)
        return reason(err, errlen, "port must be a number from 0 to 65535");
    if (!strcmp(host, "*")) strcpy(host, "0.0.0.0");

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV}, *res;
    int rc = getaddrinfo(host, colon + 1, &hints, &res);
    if (rc) {
        snprintf(err, errlen, "cannot resolve '%s': %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(&a->sa, res->ai_addr, res->ai_addrlen);
    a->len = res->ai_addrlen;
    freeaddrinfo(res);
    return 0;
}

const uint8_t *addr_ip(const struct addr *a, int *len) {
    const struct sockaddr_in *s4 = (const void *)&a->sa;
    const struct sockaddr_in6 *s6 = (const void *)&a->sa;
    if (s4->sin_family == AF_INET) {
        *len = 4;
        return (const uint8_t *)&s4->sin_addr;
    }
    *len = 16;
    return (const uint8_t *)&s6->sin6_addr;
}

int addr_port(const struct addr *a) {
    return ntohs(((const struct sockaddr_in *)&a->sa)->sin_port); /* where sin6_port is, too */
}

char *addr_format(const struct addr *a, char *buf, size_t len) {
    char ip[INET6_ADDRSTRLEN] = "?";
    int n;
    inet_ntop(a->sa.ss_family, addr_ip(a, &n), ip, sizeof ip);
    snprintf(buf, len, n == 4 ? "%s:%d" : "[%s]:%d", ip, addr_port(a));
    return buf;
}

void addr_unmap(struct addr *a) {
    struct sockaddr_in6 s6;
    memcpy(&s6, &a->sa, sizeof s6);
    if (s6.sin6_family != AF_INET6 || !IN6_IS_ADDR_V4MAPPED(&s6.sin6_addr)) return;
    struct sockaddr_in s4 = {.sin_family = AF_INET, .sin_port = s6.sin6_port};
    memcpy(&s4.sin_addr, &s6.sin6_addr.s6_addr[12], 4);
    memset(&a->sa, 0, sizeof a->sa);
    memcpy(&a->sa, &s4, sizeof s4);
    a->len = sizeof s4;
}

int addr_is_local(const struct addr *a) {
    struct addr t = *a;
    int len;
    addr_unmap(&t);
    const uint8_t *ip = addr_ip(&t, &len);
    if (len == 4) return ip[0] == 127 || ip[0] == 0 || (ip[0] == 169 && ip[1] == 254);
    const struct in6_addr *ip6 = (const struct in6_addr *)ip;
    return IN6_IS_ADDR_LOOPBACK(ip6) || IN6_IS_ADDR_UNSPECIFIED(ip6) || IN6_IS_ADDR_LINKLOCAL(ip6);
}

/* ---- networks ------------------------------------------------------------------------- */

int cidr_parse(const char *s, struct cidr *n) {
    char ip[INET6_ADDRSTRLEN];
    const char *slash = strchr(s, '/');
    size_t len = slash ? (size_t)(slash - s) : strlen(s);
    if (len >= sizeof ip) return -1;
    memcpy(ip, s, len);
    ip[len] = 0;
    memset(n, 0, sizeof *n);
    if (inet_pton(AF_INET, ip, n->net) == 1) {
        n->family = AF_INET;
        n->bits = 32;
    } else if (inet_pton(AF_INET6, ip, n->net) == 1) {
        n->family = AF_INET6;
        n->bits = 128;
    } else {
        return -1;
    }
    if (slash) {
        long bits;
        if (decimal(slash + 1, 3, &bits) < 0 || bits > n->bits) return -1;
        n->bits = (int)bits;
    }
    for (int i = n->bits; i < 128; i++) n->net[i / 8] &= (uint8_t) ~(0x80 >> (i % 8));
    if (n->family == AF_INET6 && n->bits >= 96 && IN6_IS_ADDR_V4MAPPED((struct in6_addr *)n->net)) {
        /* ::ffff:10.0.0.0/104 is 10.0.0.0/8: clients are matched as plain IPv4. */
        memmove(n->net, n->net + 12, 4);
        memset(n->net + 4, 0, 12);
        n->family = AF_INET;
        n->bits -= 96;
    }
    return 0;
}

int cidr_match(const struct cidr *list, int count, const struct addr *a) {
    int len;
    const uint8_t *ip = addr_ip(a, &len);
    for (int i = 0; i < count; i++) {
        const struct cidr *n = &list[i];
        int full = n->bits / 8, rest = n->bits % 8;
        if ((n->family == AF_INET) != (len == 4) || memcmp(ip, n->net, full)) continue;
        if (rest && ((ip[full] ^ n->net[full]) & (0xff << (8 - rest)) & 0xff)) continue;
        return 1;
    }
    return 0;
}

int nets_add(struct nets *l, const struct cidr *n) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        struct cidr *v = realloc(l->v, (size_t)cap * sizeof *v);
        if (!v) return -1;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = *n;
    return 0;
}

int nets_match(const struct nets *l, const struct addr *a) {
    return cidr_match(l->v, l->n, a);
}

int ports_match(const uint8_t *ports, int port) {
    return port > 0 && port < 65536 && (ports[port / 8] >> (port % 8) & 1);
}

void nets_free(struct nets *l) {
    free(l->v);
    *l = (struct nets){0};
}

/* ---- host names ----------------------------------------------------------------------- */

/* FNV-1a: the set's keys are the operator's own list, not a client's choice, and a client's
 * name is looked up a handful of times (once per label), so a plain hash serves. */
static uint64_t name_hash(const char *s, size_t len) {
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < len; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h;
}

/* Writes name into out (cap bytes) as a set keeps it: lower case, without a trailing dot.
 * Returns its length, or -1 when it does not fit or is empty. */
static long name_fold(const char *name, char *out, size_t cap) {
    size_t n = strlen(name);
    if (n && name[n - 1] == '.') n--;
    if (!n || n >= cap) return -1;
    for (size_t i = 0; i < n; i++) out[i] = (char)tolower((unsigned char)name[i]);
    out[n] = 0;
    return (long)n;
}

/* The slot of s[0, len) in l's table: where it is, or the empty one where it would go. */
static char **name_slot(const struct names *l, const char *s, size_t len) {
    for (size_t i = name_hash(s, len) & l->mask;; i = (i + 1) & l->mask) {
        char *e = l->table[i];
        if (!e || (strlen(e) == len && !memcmp(e, s, len))) return &l->table[i];
    }
}

/* Makes the table twice as large (at least 16) and puts every name back. Returns 0 or -1. */
static int names_grow(struct names *l) {
    size_t size = l->mask ? 2 * (l->mask + 1) : 16;
    struct names bigger = {.table = calloc(size, sizeof(char *)), .mask = size - 1, .n = l->n};
    if (!bigger.table) return -1;
    for (size_t i = 0; l->table && i <= l->mask; i++)
        if (l->table[i]) *name_slot(&bigger, l->table[i], strlen(l->table[i])) = l->table[i];
    free(l->table);
    *l = bigger;
    return 0;
}

int names_add(struct names *l, const char *name) {
    char folded[256];
    long n = name_fold(name, folded, sizeof folded);
    if (n < 0) return -1;
    if ((size_t)(l->n + 1) * 2 > (l->table ? l->mask + 1 : 0) && names_grow(l) < 0) return -1;
    char **slot = name_slot(l, folded, (size_t)n);
    if (*slot) return 0; /* listed twice: once is enough */
    if (!(*slot = strdup(folded))) return -1;
    l->n++;
    return 0;
}

int names_match(const struct names *l, const char *name) {
    char folded[257];
    if (!l->n) return 0;
    folded[0] = '.'; /* so that ".example.com" can match example.com itself */
    long n = name_fold(name, folded + 1, sizeof folded - 1);
    if (n < 0) return 0;
    if (*name_slot(l, folded + 1, (size_t)n)) return 1;
    /* ".example.com", then ".com" for www.example.com: each suffix that starts at a dot. */
    for (long i = 0; i <= n; i++)
        if (folded[i] == '.' && *name_slot(l, folded + i, (size_t)(n + 1 - i))) return 1;
    return 0;
}

void names_free(struct names *l) {
    for (size_t i = 0; l->table && i <= l->mask; i++) free(l->table[i]);
    free(l->table);
    *l = (struct names){0};
}
