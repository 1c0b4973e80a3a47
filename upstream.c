/* upstream.c — where a connection goes: balancing over the configured upstreams, skipping the
 * ones that failed recently and failing over to the next, and connecting to a host a request
 * names, each within connect_timeout; and which destinations a request may not reach (the
 * proxy's own listeners; local addresses with local_destinations = deny). */
#include "proxy.h"

#include <errno.h>
#include <string.h>

static _Atomic unsigned next_rr;
/* The proxy's listeners as bound: written by upstream_own before the workers start, then
 * read-only. */
static struct addr own[2];
static int nown;

/* Which upstream a client starts at for balance = source: stable for one address. FNV-1a
 * over the address bytes, not the port: one client machine, one upstream. */
unsigned upstream_hash(const struct addr *client, unsigned n) {
    int len;
    const uint8_t *p = addr_ip(client, &len);
    uint32_t h = 2166136261u;
    for (int i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h % n;
}

/* Whether a connect that failed with err counts against the upstream (marks it down): not when
 * the shortage was our own (fds, memory, buffers, local ports) or the connection ended. */
int upstream_at_fault(int err) {
    /* EADDRNOTAVAIL: no ephemeral port is left to that address. Marking the upstream down for
     * it would move the load to the others and take a healthy backend out of service. */
    return !(err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM ||
             err == EADDRNOTAVAIL || err == ECANCELED);
}

/* Chooses an upstream for c by cfg.balance, skipping ones marked down, failing over in
 * order, and connects. Sets c->chosen; returns the fd, or -1 when every upstream failed. */
int upstream_open(struct conn *c) {
    unsigned n = (unsigned)cfg.nup, tried = 0;
    unsigned start = cfg.balance == BALANCE_SOURCE ? upstream_hash(&c->peer, n)
                                                   : atomic_fetch_add(&next_rr, 1) % n;
    uint64_t now = mono_ns();
    /* First the upstreams that are up, in order from start; only if all of those fail, the
     * ones marked down, which may have come back. */
    for (int pass = 0; pass < 2; pass++) {
        for (unsigned i = 0; i < n; i++) {
            unsigned k = (start + i) % n;
            struct upstream *u = &cfg.up[k];
            uint64_t down_until = atomic_load(&u->down_until);
            if ((tried & 1u << k) || (pass == 0 && down_until > now)) continue;
            if (atomic_load(&c->end)) return -1; /* stopped meanwhile: no more tries */
            tried |= 1u << k;
            uint64_t deadline = mono_ns() + (uint64_t)cfg.connect_timeout * 1000000000u;
            int fd = net_connect(&u->addr, deadline, &c->end, TICK_MS);
            if (fd >= 0) {
                if (down_until) atomic_store(&u->down_until, 0);
                atomic_fetch_add(&u->connects, 1);
                c->chosen = u;
                return fd;
            }
            int e = errno;
            if (!upstream_at_fault(e)) return -1; /* keep it up; ended: try no other */
            atomic_fetch_add(&u->failures, 1);
            atomic_store(&u->down_until, mono_ns() + DOWN_SECONDS * 1000000000ull);
            if (down_until <= now) /* log the fall, not every failure while down */
                log_line("upstream %s is down: %s; skipped for %d s", u->name, strerror(e),
                         DOWN_SECONDS);
        }
    }
    return -1;
}

/* Tells the dial path the proxy's own listeners (as bound: port 0 resolved, unmapped), which no
 * request may reach. Called once, before the pool starts. */
void upstream_own(const struct addr *listeners, int n) {
    for (nown = 0; nown < n && nown < (int)(sizeof own / sizeof own[0]); nown++)
        own[nown] = listeners[nown];
}

/* Whether the len bytes of ip are all zero: the unspecified address, a wildcard listener. */
static int unspecified(const uint8_t *ip, int len) {
    static const uint8_t zero[16];
    return !memcmp(ip, zero, (size_t)len);
}

/* The address a connection to a reaches: IPv4-mapped as IPv4, and the unspecified address as
 * loopback (Linux connects 0.0.0.0 to 127.0.0.1 and :: to ::1). */
static struct addr reached(const struct addr *a) {
    struct addr t = *a;
    int len;
    addr_unmap(&t);
    const uint8_t *ip = addr_ip(&t, &len);
    if (!unspecified(ip, len)) return t;
    if (len == 4)
        ((struct sockaddr_in *)&t.sa)->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    else
        ((struct sockaddr_in6 *)&t.sa)->sin6_addr = in6addr_loopback;
    return t;
}

/* Whether a connection to a (as reached) would come back to one of our own listeners. Checked
 * before connecting, so that no such connection is ever made: a listener on an address takes
 * that address; a wildcard one (0.0.0.0 for IPv4, [::] for both) takes every address this
 * host owns. */
static int own_listener(const struct addr *a) {
    int len, olen;
    const uint8_t *ip = addr_ip(a, &len);
    for (int i = 0; i < nown; i++) {
        const uint8_t *oip = addr_ip(&own[i], &olen);
        if (addr_port(&own[i]) != addr_port(a)) continue;
        if (olen == len && !memcmp(oip, ip, (size_t)len)) return 1;
        int covers = olen == 16 || len == 4; /* [::] takes IPv4 too; 0.0.0.0 no IPv6 */
        if (unspecified(oip, olen) && covers && net_owns(a)) return 1;
    }
    return 0;
}

/* Whether a request may be dialled to a: never to one of the proxy's own listeners; with
 * local_destinations = deny, not to a loopback, link-local or unspecified address, nor to any
 * address this host owns. */
int upstream_allowed(const struct addr *a) {
    struct addr t = reached(a);
    if (own_listener(&t)) return 0;
    return cfg.local_destinations != LOCAL_DENY || !(addr_is_local(&t) || net_owns(&t));
}

/* Connects c to host:port (a name from a request): its first DIAL_ADDRESSES addresses in
 * turn, all within one connect_timeout, giving up when c ends. Returns the fd, or -1 with
 * errno (EACCES when an address is not allowed, ETIMEDOUT on timeout, ECANCELED when c
 * ended). */
int upstream_dial(struct conn *c, const char *host, int port) {
    uint64_t deadline = mono_ns() + (uint64_t)cfg.connect_timeout * 1000000000u;
    struct addr a[DIAL_ADDRESSES];
    int n = net_resolve(host, port, a, DIAL_ADDRESSES, deadline, &c->end, TICK_MS);
    int fd = -1;
    if (n < 0) return -1;
    /* One address not allowed refuses the name: which of its addresses happens to be tried
     * must not decide it. */
    for (int i = 0; i < n; i++) {
        if (upstream_allowed(&a[i])) continue;
        errno = EACCES;
        return -1;
    }
    for (int i = 0; i < n && fd < 0; i++) {
        /* A black-holed address must not use up the time the next one needs: each gets an
         * equal share of what is left, the last all of it. */
        uint64_t now = mono_ns();
        uint64_t share = now < deadline ? (deadline - now) / (uint64_t)(n - i) : 0;
        fd = net_connect(&a[i], now + share, &c->end, TICK_MS);
        if (fd < 0 && errno == ECANCELED) break;
    }
    return fd;
}
