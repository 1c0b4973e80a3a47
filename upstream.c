/* upstream.c — where a connection goes: balancing over the configured upstreams, skipping the
 * ones that failed recently and failing over to the next, and connecting to a host a request
 * names (its lookup, then its addresses in turn), each within connect_timeout; the dial's state,
 * which lets a connection leave its worker in the middle of it and go on from there; and which
 * destinations a request may not reach (the proxy's own listeners; local addresses with
 * local_destinations = deny). */
#include "proxy.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static _Atomic unsigned next_rr;
/* The proxy's listeners as bound: written by upstream_own before the workers start, then
 * read-only. */
static struct addr own[2];
static int nown;

/* FNV-1a over the address bytes, not the port: one client machine, one upstream. */
unsigned upstream_hash(const struct addr *client, unsigned n) {
    int len;
    const uint8_t *p = addr_ip(client, &len);
    uint32_t h = 2166136261u;
    for (int i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h % n;
}

int upstream_at_fault(int err) {
    /* EADDRNOTAVAIL: no ephemeral port is left to that address. Marking the upstream down for
     * it would move the load to the others and take a healthy backend out of service. */
    return !(err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM ||
             err == EADDRNOTAVAIL || err == ECANCELED);
}

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

/* The rules in the order the man page gives. The denied networks come before the allowed ones, and
 * apply even by_name, so that a name resolving into one is stopped too. */
enum reach upstream_reach(const struct config *cf, const struct addr *a, int by_name) {
    const struct destinations *allow = &cf->allow_destinations;
    struct addr t = reached(a);
    if (own_listener(&t)) return REACH_LOCAL;
    if (nets_match(&cf->deny_destinations.nets, &t)) return REACH_DENIED;
    if (!by_name && (allow->names.n || allow->nets.n) && !nets_match(&allow->nets, &t))
        return REACH_NOT_ALLOWED;
    if (cf->local_destinations == LOCAL_DENY && (addr_is_local(&t) || net_owns(&t)))
        return REACH_LOCAL;
    return REACH_OK;
}

/* The rules a request's host name meets before any lookup: a denied name (or .domain) is
 * refused; an allowed one needs no allowed network; with only names allowed, any other name
 * is refused now, for no address of it could be allowed. An address (host is one) meets the
 * network rules once "resolved" (at once). Returns REACH_OK or the rule that refuses it. */
static enum reach reach_by_name(struct dial *d, const char *host) {
    const struct destinations *allow = &d->cf->allow_destinations;
    struct cidr literal;
    if (names_match(&d->cf->deny_destinations.names, host)) return REACH_DENIED;
    d->by_name = names_match(&allow->names, host);
    if (allow->names.n && !allow->nets.n && !d->by_name && cidr_parse(host, &literal) < 0)
        return REACH_NOT_ALLOWED;
    return REACH_OK;
}

/* ---- dialling: a lookup, then connects in turn, which c may leave its worker in ---------- */

/* Lists the configured upstreams in d in the order they are tried: from where balance starts
 * c, first those that are up, then those marked down, which may have come back. */
static void list_upstreams(struct dial *d, const struct conn *c) {
    unsigned n = (unsigned)d->cf->nup;
    unsigned start = d->cf->balance == BALANCE_SOURCE ? upstream_hash(&c->peer, n)
                                                      : atomic_fetch_add(&next_rr, 1) % n;
    uint64_t now = mono_ns();
    for (int down = 0; down < 2; down++)
        for (unsigned i = 0; i < n; i++) {
            unsigned k = (start + i) % n;
            if ((atomic_load(&d->cf->up[k].st->down_until) > now) == down)
                d->up[d->n++] = (uint8_t)k;
        }
}

/* Whether every address of d's name may be dialled: one not allowed refuses the name, for
 * which of its addresses happens to be tried must not decide it. Returns 0, or -1 with errno
 * EACCES. */
static int dial_allowed(struct dial *d) {
    for (int i = 0; i < d->n; i++)
        if ((d->barred = upstream_reach(d->cf, &d->a[i], d->by_name)) != REACH_OK) {
            errno = EACCES;
            return -1;
        }
    return 0;
}

/* The lookup d waited for is done: its addresses become the candidates. Returns 0, or -1 with
 * errno. */
static int dial_resolved(struct dial *d) {
    d->n = net_lookup_take(d->lookup, d->a, DIAL_ADDRESSES);
    d->lookup = NULL;
    d->fd = -1;
    return d->n < 0 ? -1 : dial_allowed(d);
}

/* Starts d for c: the configured upstreams (host NULL), or host:port's (key: "host:port")
 * addresses, at once for an address, else by a lookup that d waits for. Returns 0, or -1 with
 * errno. */
static int dial_begin(struct dial *d, struct conn *c, const char *key, const char *host, int port) {
    d->fd = -1;
    d->cf = c->cfg;
    if (!host) {
        list_upstreams(d, c);
        return 0;
    }
    snprintf(d->key, sizeof d->key, "%s", key);
    if ((d->barred = reach_by_name(d, host)) != REACH_OK) {
        errno = EACCES;
        return -1;
    }
    d->deadline = mono_ns() + (uint64_t)d->cf->connect_timeout * 1000000000u;
    d->until = d->deadline;
    d->n = net_resolve(host, port, d->a, DIAL_ADDRESSES, &d->lookup);
    if (d->n < 0) return -1;
    if (!d->lookup) return dial_allowed(d);
    d->fd = net_lookup_fd(d->lookup);
    d->out = 0;
    return 0;
}

/* Starts a connect to d's next candidate. A configured upstream gets a whole connect_timeout;
 * a name's addresses share one, so that a black-holed address does not use up the time the
 * next one needs: each gets an equal share of what is left, the last all of it. Returns 0, or
 * -1 with errno (the connect failed at once). */
static int dial_next(struct dial *d) {
    uint64_t now = mono_ns();
    const struct addr *to = d->key[0] ? &d->a[d->next] : &d->cf->up[d->up[d->next]].addr;
    if (d->key[0])
        d->until = now + (d->deadline > now ? (d->deadline - now) / (uint64_t)(d->n - d->next) : 0);
    else
        d->until = now + (uint64_t)d->cf->connect_timeout * 1000000000u;
    d->fd = net_connect_start(to);
    d->out = 1;
    return d->fd < 0 ? -1 : 0;
}

/* d's try at its next candidate failed with err. Returns whether to try the one after: not
 * once c ended, nor past a configured upstream that failed for a reason of our own (fds,
 * memory: marking it down would move the load to the others for nothing). */
static int dial_failed(struct dial *d, int err) {
    d->err = err;
    if (d->fd >= 0) close(d->fd);
    d->fd = -1;
    int i = d->next++;
    if (err == ECANCELED) return 0;
    if (d->key[0]) return 1;
    const struct upstream *u = &d->cf->up[d->up[i]];
    if (!upstream_at_fault(err)) return 0;
    atomic_fetch_add(&u->st->failures, 1);
    uint64_t now = mono_ns();
    if (atomic_exchange(&u->st->down_until, now + DOWN_SECONDS * 1000000000ull) <= now)
        log_line("upstream %s is down: %s; skipped for %d s", u->name, strerror(err),
                 DOWN_SECONDS); /* the fall, not every failure while down */
    return 1;
}

/* d's connect succeeded: a configured upstream is up again, and counted. Returns the fd. */
static int dial_connected(struct dial *d, struct conn *c) {
    int fd = d->fd;
    d->fd = -1;
    if (!d->key[0]) {
        const struct upstream *u = &d->cf->up[d->up[d->next]];
        if (atomic_load(&u->st->down_until)) atomic_store(&u->st->down_until, 0);
        atomic_fetch_add(&u->st->connects, 1);
        c->chosen = u;
    }
    return fd;
}

/* Runs d until it connects, fails, or c leaves its worker (may_leave): the lookup if one is
 * in progress, then a connect to each candidate in turn, each wait in copy_wait (a worker's
 * safe point: nothing of c's is in flight). Returns the fd, or -1 with errno (EINPROGRESS: c
 * leaves, d stays). */
static int dial_run(struct dial *d, struct conn *c, int may_leave) {
    for (;;) {
        if (d->fd < 0) {
            if (d->next == d->n) break;
            if (atomic_load(&c->end)) {
                d->err = ECANCELED;
                break;
            }
            if (dial_next(d) < 0 && dial_failed(d, errno)) continue;
            if (d->fd < 0) break;
        }
        enum wake w = copy_wait(c, UP, d->fd, d->out ? POLLOUT : POLLIN, may_leave);
        if (w == WAKE_LEAVE) {
            errno = EINPROGRESS;
            return -1;
        }
        int err = w == WAKE_ENDED ? ECANCELED : ETIMEDOUT;
        if (d->lookup) { /* a name's lookup: its time is the whole dial's */
            if (w == WAKE_READY && dial_resolved(d) == 0) continue;
            d->err = w == WAKE_READY ? errno : err;
            break;
        }
        if (w == WAKE_READY && net_connect_done(d->fd, TICK_MS) == 0) return dial_connected(d, c);
        if (w == WAKE_READY) err = errno;
        if (!dial_failed(d, err)) break;
    }
    errno = d->err ? d->err : EHOSTUNREACH;
    return -1;
}

int upstream_connect(struct conn *c, const char *host, int port, int may_leave) {
    char key[sizeof c->dial->key] = "";
    int fd = -1;
    if (host) snprintf(key, sizeof key, "%s:%d", host, port);
    if (c->dial && strcmp(c->dial->key, key)) upstream_drop(c); /* not this one's: never */
    int ready = c->dial != NULL; /* back from the waiting room, in the middle of it */
    if (!ready && (c->dial = calloc(1, sizeof *c->dial)))
        ready = dial_begin(c->dial, c, key, host, port) == 0;
    if (ready) fd = dial_run(c->dial, c, may_leave);
    if (fd >= 0 || !ready || errno != EINPROGRESS) { /* done, or failed: the record goes */
        int e = errno;
        if (c->dial) c->barred = c->dial->barred;
        upstream_drop(c);
        errno = e;
    }
    return fd;
}

void upstream_drop(struct conn *c) {
    struct dial *d = c->dial;
    if (!d) return;
    if (d->lookup)
        net_lookup_drop(d->lookup); /* its eventfd goes with it */
    else if (d->fd >= 0)
        close(d->fd);
    free(d);
    c->dial = NULL;
}
