/* limits.c — what each client may take: its connections open at once (connections_per_client)
 * and its rate of requests (requests_per_second, request_burst). A client is an address (an
 * IPv6 one by its /64: one host usually owns a whole /64) or, with limit_by = user, the user a
 * request authenticated as. Its state lives in one table sized at start, [limits] clients
 * entries: never an allocation per client, never a refusal because the table is full. An entry
 * with connections open is never forgotten (config.c checks that clients >= max_connections,
 * so there is always room); when the table is full the least recently seen of the others is
 * forgotten. This is nginx's limit_conn / limit_req zone and haproxy's stick-table. */
#include "proxy.h"

#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define NONE (-1)

enum kind { IPV4 = 1, IPV6, USER };

/* One client. 48 bytes. */
struct client {
    uint8_t key[16];    /* IPV4: the address; IPV6: its /64; USER: a 128-bit hash of the name */
    uint8_t kind;       /* enum kind */
    uint32_t open;      /* connections open from it (addresses only) */
    uint64_t tat;       /* GCRA: when the next request conforms, ns; 0: never seen */
    int32_t chain;      /* the next entry in its hash bucket, + 1; 0: none */
    int32_t prev, next; /* in the idle list (no connection open), most recent first */
};

/* The table, under mu. */
static struct {
    pthread_mutex_t mu;
    struct client *v;
    int32_t *bucket; /* mask + 1 heads of hash chains: an entry + 1; 0: none (calloc's) */
    uint64_t mask, seed;
    int size, used;               /* entries [0, used) have held a client; the rest never */
    int32_t idle_head, idle_tail; /* no connection open: most recently seen first */
} t = {.mu = PTHREAD_MUTEX_INITIALIZER, .idle_head = NONE, .idle_tail = NONE};

/* ---- the table ------------------------------------------------------------------------ */

/* The buckets for n entries: a power of two, at least n. */
static uint64_t buckets_for(int n) {
    uint64_t b = 16;
    while (b < (uint64_t)n) b *= 2;
    return b;
}

int limits_start(int clients) {
    t.size = clients;
    t.mask = buckets_for(clients) - 1;
    /* calloc of these sizes maps fresh pages: resident only as entries are first used. */
    t.v = calloc((size_t)clients, sizeof *t.v);
    t.bucket = calloc(t.mask + 1, sizeof *t.bucket);
    if (!t.v || !t.bucket) return -1;
    /* A secret seed: a client choosing its addresses (a /48 holds 65,536 /64s) must not be
     * able to put them all in one bucket. */
    if (getrandom(&t.seed, sizeof t.seed, 0) != sizeof t.seed) t.seed = (uint64_t)mono_ns();
    return 0;
}

/* The bucket of key: a multiply-xorshift mix of its two halves with the seed. */
static uint64_t bucket_of(const uint8_t *key, int kind) {
    uint64_t a, b, h = t.seed ^ (uint64_t)kind;
    memcpy(&a, key, 8);
    memcpy(&b, key + 8, 8);
    h = (h ^ a) * 0x9e3779b97f4a7c15ull;
    h = (h ^ (h >> 29) ^ b) * 0xbf58476d1ce4e5b9ull;
    return (h ^ (h >> 32)) & t.mask;
}

/* Takes entry i out of the idle list. */
static void idle_unlink(int32_t i) {
    struct client *e = &t.v[i];
    if (e->prev != NONE)
        t.v[e->prev].next = e->next;
    else
        t.idle_head = e->next;
    if (e->next != NONE)
        t.v[e->next].prev = e->prev;
    else
        t.idle_tail = e->prev;
}

/* Puts entry i at the head of the idle list: the most recently seen. */
static void idle_push(int32_t i) {
    struct client *e = &t.v[i];
    e->prev = NONE;
    e->next = t.idle_head;
    if (t.idle_head != NONE) t.v[t.idle_head].prev = i;
    t.idle_head = i;
    if (t.idle_tail == NONE) t.idle_tail = i;
}

/* Takes entry i out of its hash chain. */
static void chain_unlink(int32_t i) {
    int32_t *p = &t.bucket[bucket_of(t.v[i].key, t.v[i].kind)];
    while (*p != i + 1) p = &t.v[*p - 1].chain;
    *p = t.v[i].chain;
}

/* A free entry: one never used (touched only now: the table is resident only as it fills),
 * else the least recently seen one with no connection open, forgotten. NONE only when every
 * entry has connections open. */
static int32_t entry_new(void) {
    if (t.used < t.size) {
        atomic_fetch_add(&stats.clients, 1);
        return t.used++;
    }
    int32_t i = t.idle_tail;
    if (i == NONE) return NONE;
    idle_unlink(i);
    chain_unlink(i);
    atomic_fetch_add(&stats.clients_forgotten, 1);
    return i;
}

/* The entry of key (kind), found or made; it counts as seen now. NONE when every entry has
 * connections open (only when there is no room for the caller's own: see entry_new). */
static int32_t entry_get(const uint8_t *key, int kind) {
    uint64_t b = bucket_of(key, kind);
    for (int32_t k = t.bucket[b]; k; k = t.v[k - 1].chain) {
        int32_t i = k - 1;
        struct client *e = &t.v[i];
        if (e->kind != kind || memcmp(e->key, key, 16)) continue;
        if (!e->open) { /* seen: to the head of the idle list */
            idle_unlink(i);
            idle_push(i);
        }
        return i;
    }
    int32_t i = entry_new();
    if (i == NONE) return NONE;
    struct client *e = &t.v[i];
    *e = (struct client){.kind = (uint8_t)kind, .chain = t.bucket[b]};
    memcpy(e->key, key, 16);
    t.bucket[b] = i + 1;
    idle_push(i);
    return i;
}

/* The key of a client address: IPv4 whole, IPv6 by its /64. Returns its kind. */
static int address_key(const struct addr *a, uint8_t key[16]) {
    int len;
    const uint8_t *ip = addr_ip(a, &len);
    memset(key, 0, 16);
    memcpy(key, ip, len == 4 ? 4 : 8);
    return len == 4 ? IPV4 : IPV6;
}

/* The key of a user: two 64-bit FNV-1a hashes of the name. Only users in [users] are keyed
 * (a request counts against its user once authenticated), a few hundred names at most, among
 * which a collision of 128 bits will not happen. */
static void user_key(const char *name, uint8_t key[16]) {
    uint64_t h[2] = {14695981039346656037ull, 0x84222325cbf29ce4ull};
    for (int k = 0; k < 2; k++)
        for (const char *p = name; *p; p++) h[k] = (h[k] ^ (uint8_t)*p) * 1099511628211ull;
    memcpy(key, h, 16);
}

/* ---- the limits ----------------------------------------------------------------------- */

/* GCRA (the token bucket as one timestamp): a request conforms when it comes no earlier than
 * tat - tau, where each request moves tat on by the interval T = 1 s / rate and tau = burst x T
 * lets burst requests come early. Returns 0, or the ns until one would conform. */
static uint64_t take_turn(struct client *e, const struct config *cf, uint64_t now) {
    uint64_t interval = 1000000000u / (uint64_t)cf->requests_per_second;
    uint64_t tau = (uint64_t)cf->request_burst * interval;
    uint64_t tat = e->tat > now ? e->tat : now;
    if (tat - now > tau) return tat - tau - now;
    e->tat = tat + interval;
    return 0;
}

/* Counts a refusal by limit. */
static void refused(enum limit which) {
    atomic_fetch_add(&stats.limited[which], 1);
}

int limits_admit(const struct config *cf, const struct addr *peer, int is_request, int *entry) {
    uint8_t key[16];
    int kind = address_key(peer, key), why = -1;
    *entry = NONE;
    if (nets_match(&cf->exempt, peer)) return -1;
    pthread_mutex_lock(&t.mu);
    /* NONE only if the table were full of entries with connections open, which clients >=
     * max_connections rules out; kept as a guard: then the client is let in, uncounted. */
    int32_t i = entry_get(key, kind);
    struct client *e = i == NONE ? NULL : &t.v[i];
    if (!e) {
    } else if (cf->connections_per_client && e->open >= (uint32_t)cf->connections_per_client) {
        why = REFUSED_PER_CLIENT;
    } else if (is_request && cf->requests_per_second && take_turn(e, cf, mono_ns())) {
        why = REFUSED_RATE;
    } else {
        if (!e->open++) idle_unlink(i); /* an entry with connections open is never forgotten */
        *entry = i;
    }
    pthread_mutex_unlock(&t.mu);
    if (why >= 0) refused(why == REFUSED_RATE ? LIMIT_RATE : LIMIT_CONNECTIONS);
    return why;
}

void limits_leave(int entry) {
    if (entry == NONE) return;
    pthread_mutex_lock(&t.mu);
    if (!--t.v[entry].open) idle_push(entry);
    pthread_mutex_unlock(&t.mu);
}

int limits_request(const struct config *cf, const struct addr *peer, const char *user) {
    uint8_t key[16];
    uint64_t wait = 0;
    if (!cf->requests_per_second || nets_match(&cf->exempt, peer)) return 0;
    pthread_mutex_lock(&t.mu);
    int32_t i = NONE;
    if (cf->limit_by == LIMIT_BY_USER && user && *user) {
        user_key(user, key);
        i = entry_get(key, USER);
    }
    if (i == NONE) i = entry_get(key, address_key(peer, key));
    if (i != NONE) wait = take_turn(&t.v[i], cf, mono_ns());
    pthread_mutex_unlock(&t.mu);
    if (!wait) return 0;
    refused(LIMIT_RATE);
    return (int)((wait + 999999999u) / 1000000000u); /* Retry-After: whole seconds, at least 1 */
}

void limits_plan(const struct config *c, FILE *o) {
    double mib = (double)((size_t)c->clients * sizeof(struct client) +
                          buckets_for(c->clients) * sizeof(int32_t)) /
                 (1 << 20);
    fprintf(o, "limits: ");
    if (c->connections_per_client)
        fprintf(o, "%d connections per client address", c->connections_per_client);
    else
        fprintf(o, "connections per client: no limit");
    if (c->requests_per_second)
        fprintf(o, ", %d requests/s (burst %d) per %s", c->requests_per_second, c->request_burst,
                c->limit_by == LIMIT_BY_USER ? "user" : "address");
    else
        fprintf(o, ", requests per second: no limit");
    fprintf(o,
            "; %d exempt networks; a table of %d clients: %.1f MiB (%zu bytes each, resident only "
            "as used)\n",
            c->exempt.n, c->clients, mib, sizeof(struct client));
}
