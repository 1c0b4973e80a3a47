/* config.c — reads proxy.ini with inih into a struct config, checking every key against one
 * table (its type, range, default, and whether only a restart changes it), then the keys
 * against each other. Every error is "FILE:LINE: what is wrong". What is in force is
 * running.c's; what a config costs, plan.c's. */
#include "proxy.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <ini.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct config cfg;

/* ---- the keys ------------------------------------------------------------------------- */

enum kind { INT, SIZE, ENUM, TEXT, ADDR, UPSTREAMS, CIDRS, DESTINATIONS, PORTS, USER };

struct key {
    const char *section, *name; /* name "*": any key (a user name) */
    enum kind kind;
    int restart;       /* only a restart changes it: a reload keeps the running value */
    size_t off, size;  /* the field in struct config (F: the initializers skip restart) */
    const char *def;   /* the default, parsed like a value in the file; NULL: none */
    int min, max;      /* INT and SIZE: the range; TEXT: max is the field's size */
    const char *enums; /* ENUM: the words, in the order of the enum's values */
};

/* The pool, the listeners and the mode are made once, at start: their keys are restart-only
 * (R). Every other key is read per connection or per request, from a snapshot. */
#define F(field) .off = offsetof(struct config, field), .size = sizeof(((struct config *)0)->field)
#define R        .restart = 1
static const struct key keys[] = {
    {"proxy", "listen", ADDR, F(listen), "127.0.0.1:8888", R},
    {"proxy", "mode", ENUM, F(mode), "http", .enums = "tcp http", R},
    {"proxy", "upstream", UPSTREAMS, F(up)},
    {"proxy", "balance", ENUM, F(balance), "source", .enums = "source roundrobin"},
    {"proxy", "workers", INT, F(workers), "64", 1, 50000, R},
    {"proxy", "queue", INT, F(queue), "1024", 0, 1000000, R},
    {"proxy", "max_connections", INT, F(max_connections), "8192", 1, 10000000, R},
    {"proxy", "park_after", INT, F(park_after), "200", 0, 60000, R}, /* ms; 0: never */
    {"proxy", "time_slice", INT, F(time_slice), "50", 0, 60000, R},  /* ms; 0: no turns */
    {"proxy", "buffer_size", SIZE, F(buffer_size), "64k", 1024, 64 << 20, R},
    {"proxy", "copy", ENUM, F(copy), "splice", .enums = "splice buffer", R},
    {"proxy", "connect_timeout", INT, F(connect_timeout), "5", 1, 600},
    {"proxy", "idle_timeout", INT, F(idle_timeout), "300", 0, 604800},
    {"proxy", "keepalive_timeout", INT, F(keepalive_timeout), "60", 0, 604800},
    {"proxy", "header_timeout", INT, F(header_timeout), "10", 1, 3600},
    {"proxy", "min_rate", SIZE, F(min_rate), "500", 0, 0x7fffffff}, /* bytes/s; 0: none */
    {"proxy", "head_buffers", INT, F(head_buffers), "1024", 0, 1000000, R},
    {"proxy", "rate_limit", SIZE, F(rate_limit), "0", 0, 0x7fffffff},
    {"proxy", "send_proxy", ENUM, F(send_proxy), "off", .enums = "off v1 v2"},
    {"proxy", "reuse_port", ENUM, F(reuse_port), "no", .enums = "no yes", R},
    {"proxy", "log", TEXT, F(log), "-", 0, sizeof cfg.log},
    {"access", "allow", CIDRS, F(allow), "127.0.0.0/8, ::1"}, /* loopback only */
    {"access", "connect_ports", PORTS, F(connect_ports), "443"},
    {"access", "forward_ports", PORTS, F(forward_ports), "80, 443, 1025-65535"}, /* squid's */
    {"access", "local_destinations", ENUM, F(local_destinations), "auto",
     .enums = "auto allow deny"},
    {"access", "deny_destinations", DESTINATIONS, F(deny_destinations)},
    {"access", "allow_destinations", DESTINATIONS, F(allow_destinations)},
    {"access", "trusted_proxies", CIDRS, F(trusted_proxies)},
    {"limits", "connections_per_client", INT, F(connections_per_client), "0", 0, 10000000},
    {"limits", "requests_per_second", INT, F(requests_per_second), "0", 0, 1000000000},
    {"limits", "request_burst", INT, F(request_burst), "0", 0, 1000000000},
    {"limits", "limit_by", ENUM, F(limit_by), "address", .enums = "address user"},
    {"limits", "clients", INT, F(clients), "65536", 1, 100000000, R},
    {"limits", "exempt", CIDRS, F(exempt)},
    {"auth", "realm", TEXT, F(realm), "proxy", 0, sizeof cfg.realm},
    {"users", "*", USER, F(users)}, /* none: auth is off */
    {"stats", "listen", ADDR, F(stats_listen), "127.0.0.1:9100", R},
};
#define NKEYS (sizeof keys / sizeof keys[0])

/* The parse in progress: inih calls our reader and handler, which share this. */
struct loader {
    struct config *c;
    FILE *f;
    int line;              /* the line inih is handling now */
    int indented;          /* it starts with whitespace: a list's continuation */
    int proxy_line;        /* where [proxy] starts, for errors about missing keys */
    int err_line;          /* first error, 0: none */
    int read_errno;        /* reading the file failed with this (a directory: EISDIR) */
    const char *value;     /* the value being set: a '#' in it earns a hint in its error */
    int seen[NKEYS];       /* the line each key was first set on */
    const struct key *key; /* the key being set: list items name it in errors */
    char *err;
    size_t errlen;
};

/* Records the first error only (later ones are often its consequences); returns -1. A value
 * with " #" in it gets a hint: '#' starts a comment only at the start of a line, and a reader
 * who wrote `workers = 8 # eight` should learn that, not only that 8 # eight is no number. */
static int fail(struct loader *l, int line, const char *fmt, ...) {
    if (l->err_line) return -1;
    va_list ap;
    int n = snprintf(l->err, l->errlen, "%s:%d: ", l->c->file, line);
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < l->errlen) n += vsnprintf(l->err + n, l->errlen - n, fmt, ap);
    va_end(ap);
    if (l->value && strstr(l->value, " #") && n > 0 && (size_t)n < l->errlen)
        snprintf(l->err + n, l->errlen - n,
                 " ('#' starts a comment only at the start of a line; after a value, write "
                 "' ; comment')");
    l->err_line = line;
    return -1;
}

/* Parses a whole number with an optional k, m or g (binary) suffix. */
static int parse_number(const char *s, int suffixes, long long *out) {
    char *end;
    if (!isdigit((unsigned char)*s)) return -1;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno) return -1;
    if (suffixes && *end) {
        const char *units = "kmg";
        const char *u = strchr(units, tolower((unsigned char)*end));
        if (!u || end[1]) return -1;
        for (long i = 0; i <= u - units; i++) {
            if (v > (1LL << 40)) return -1;
            v *= 1024;
        }
        end++;
    }
    if (*end) return -1;
    *out = v;
    return 0;
}

/* Splits a comma-separated value into trimmed items and calls add for each. A trailing comma
 * is allowed, so that a long list can go on on the next, indented line. */
static int each_item(struct loader *l, const char *value, int (*add)(struct loader *, char *)) {
    char buf[256];
    if (strlen(value) >= sizeof buf) return fail(l, l->line, "value too long");
    strcpy(buf, value);
    for (char *tok = buf, *next; tok; tok = next) {
        if ((next = strchr(tok, ','))) *next++ = 0;
        while (isspace((unsigned char)*tok)) tok++;
        char *e = tok + strlen(tok);
        while (e > tok && isspace((unsigned char)e[-1])) *--e = 0;
        if (!*tok && !next && tok != buf) break; /* the trailing comma */
        if (!*tok) return fail(l, l->line, "empty item in list '%s'", value);
        if (add(l, tok) < 0) return -1;
    }
    return 0;
}

/* One item of upstream: a host:port of safe characters (it becomes a metric label),
 * resolved now so that a bad name stops start-up instead of failing every connection. */
static int add_upstream(struct loader *l, char *s) {
    struct config *c = l->c;
    char why[160];
    if (c->nup == MAX_UPSTREAMS) return fail(l, l->line, "more than %d upstreams", MAX_UPSTREAMS);
    if (strlen(s) >= sizeof c->up[0].name || strspn(s, "abcdefghijklmnopqrstuvwxyz"
                                                       "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                                       "0123456789.-_:[]") != strlen(s))
        return fail(l, l->line, "upstream '%s': not a host:port", s);
    struct upstream *u = &c->up[c->nup];
    if (addr_parse(s, &u->addr, why, sizeof why) < 0)
        return fail(l, l->line, "upstream '%s': %s", s, why);
    if (addr_port(&u->addr) == 0) return fail(l, l->line, "upstream '%s': port 0", s);
    strcpy(u->name, s);
    c->nup++;
    return 0;
}

/* Parses "port" or "lo-hi" with 1 <= lo <= hi <= 65535. Returns 0 or -1. */
static int parse_port_range(const char *s, long long *lo, long long *hi) {
    char first[32];
    size_t n = strcspn(s, "-");
    if (n >= sizeof first) return -1;
    memcpy(first, s, n);
    first[n] = 0;
    if (parse_number(first, 0, lo) < 0) return -1;
    *hi = *lo;
    if (s[n] && parse_number(s + n + 1, 0, hi) < 0) return -1;
    return *lo >= 1 && *lo <= *hi && *hi <= 65535 ? 0 : -1;
}

/* One item of a port list (connect_ports, forward_ports): a port, a range lo-hi, or * alone
 * for all; sets their bits. Nothing else, so that a typo like *-5 never widens the list. */
static int add_ports(struct loader *l, char *s) {
    uint8_t *bits = (uint8_t *)l->c + l->key->off;
    long long lo = 1, hi = 65535;
    if (strcmp(s, "*") && parse_port_range(s, &lo, &hi) < 0)
        return fail(l, l->line, "%s: '%s' is not a port (1-65535), a range like 8000-8999, or *",
                    l->key->name, s);
    for (long long p = lo; p <= hi; p++) bits[p / 8] |= (uint8_t)(1 << (p % 8));
    return 0;
}

/* One [users] line. Names cannot hold a colon: Basic credentials split at the first one. */
static int add_user(struct loader *l, const char *name, const char *pass) {
    struct config *c = l->c;
    if (c->nusers == MAX_USERS) return fail(l, l->line, "more than %d users", MAX_USERS);
    if (strlen(name) >= sizeof c->users[0].name || strchr(name, ':'))
        return fail(l, l->line, "user name '%s': too long or has a ':'", name);
    if (!*pass || strlen(pass) >= sizeof c->users[0].pass)
        return fail(l, l->line, "user '%s': the password is empty or too long", name);
    for (int i = 0; i < c->nusers; i++)
        if (!strcmp(c->users[i].name, name))
            return fail(l, l->line, "user '%s' is listed twice", name);
    strcpy(c->users[c->nusers].name, name);
    strcpy(c->users[c->nusers].pass, pass);
    c->nusers++;
    return 0;
}

/* One item of a list of networks (allow, exempt, trusted_proxies): an address or a network. */
static int add_cidr(struct loader *l, char *s) {
    struct cidr n;
    if (cidr_parse(s, &n) < 0)
        return fail(l, l->line, "%s: '%s' is not an address or network like 10.0.0.0/8",
                    l->key->name, s);
    if (nets_add((struct nets *)((char *)l->c + l->key->off), &n) < 0)
        return fail(l, l->line, "out of memory");
    return 0;
}

/* Whether s could be a host name: letters, digits, '-', '_' and dots, no empty label (a
 * leading dot, the suffix form, aside), a last label not all digits (10.0.0 is a mistyped
 * network, not a name), at most 253 bytes. */
static int host_name(const char *s) {
    size_t n = strlen(s), last = 0;
    if (*s == '.') s++, n--;
    if (n && s[n - 1] == '.') n--; /* a trailing dot: the root, the same name */
    if (!n || n > 253 ||
        strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.") < n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '.' && (i == 0 || s[i - 1] == '.' || i + 1 == n)) return 0;
        if (s[i] == '.') last = i + 1;
    }
    return strspn(s + last, "0123456789") < n - last;
}

/* One item of deny_destinations or allow_destinations: a network (10.0.0.0/8, an address, an
 * IPv6 one in brackets too), a host name, or a .suffix for a domain and every name under it. */
static int add_destination(struct loader *l, char *s) {
    struct destinations *d = (struct destinations *)((char *)l->c + l->key->off);
    struct cidr n;
    char bare[256];
    const char *close = *s == '[' ? strchr(s, ']') : NULL;
    /* An IPv6 address in brackets as in a URL, [::1] or [2001:db8::]/32: without them. */
    if (close && memchr(s, ':', (size_t)(close - s)) && (!close[1] || close[1] == '/'))
        snprintf(bare, sizeof bare, "%.*s%s", (int)(close - s - 1), s + 1, close + 1);
    else
        snprintf(bare, sizeof bare, "%s", s);
    if (cidr_parse(bare, &n) == 0)
        return nets_add(&d->nets, &n) < 0 ? fail(l, l->line, "out of memory") : 0;
    if (s[0] == '*' && s[1] == '.')
        return fail(l, l->line, "%s: '%s': write %s for a domain and every name under it",
                    l->key->name, s, s + 1);
    if (strchr(s, '/') || strchr(s, ':') || !host_name(s))
        return fail(l, l->line,
                    "%s: '%s' is not a host name, a .domain or a network like 10.0.0.0/8",
                    l->key->name, s);
    return names_add(&d->names, s) < 0 ? fail(l, l->line, "out of memory") : 0;
}

void config_free(struct config *c) {
    nets_free(&c->allow);
    nets_free(&c->trusted_proxies);
    nets_free(&c->exempt);
    nets_free(&c->deny_destinations.nets);
    nets_free(&c->allow_destinations.nets);
    names_free(&c->deny_destinations.names);
    names_free(&c->allow_destinations.names);
}

/* Where value is among words (space-separated), counting from 0; -1 if it is not: an ENUM
 * key's words are listed in the order of its enum's values. */
static int word_index(const char *words, const char *value) {
    const char *w = words;
    for (int i = 0; *w; i++) {
        size_t n = strcspn(w, " ");
        if (strlen(value) == n && !strncmp(w, value, n)) return i;
        w += n + (w[n] == ' ');
    }
    return -1;
}

/* Sets key k (called name in the file) to value: a default, or a line of the file. Returns 0,
 * or -1 on an error (recorded by fail). */
static int set(struct loader *l, const struct key *k, const char *name, const char *value) {
    struct config *c = l->c;
    void *field = (char *)c + k->off;
    long long v;
    char why[160];
    l->key = k;
    l->value = value;
    switch (k->kind) {
    case INT:
    case SIZE:
        if (parse_number(value, k->kind == SIZE, &v) < 0 || v < k->min || v > k->max)
            return fail(l, l->line, "%s = '%s': expected a whole number from %d to %d%s", name,
                        value, k->min, k->max, k->kind == SIZE ? " (k, m, g allowed)" : "");
        *(int *)field = (int)v;
        return 0;
    case ENUM:
        if ((v = word_index(k->enums, value)) < 0)
            return fail(l, l->line, "%s = '%s': expected one of: %s", name, value, k->enums);
        *(int *)field = (int)v;
        return 0;
    case ADDR:
        if (!*value && field == &c->stats_listen) {
            c->stats_listen.len = 0; /* the admin listener is off */
            return 0;
        }
        if (addr_parse(value, field, why, sizeof why) < 0)
            return fail(l, l->line, "%s = '%s': %s", name, value, why);
        return 0;
    case UPSTREAMS: return each_item(l, value, add_upstream);
    case CIDRS:
    case DESTINATIONS:
        /* An empty list is none (exempt =), but nobody at all may not be allowed in. */
        if (!*value && field != &c->allow) return 0;
        return each_item(l, value, k->kind == CIDRS ? add_cidr : add_destination);
    case PORTS: return each_item(l, value, add_ports);
    case USER: return add_user(l, name, value);
    case TEXT:
        if (!*value || strlen(value) >= (size_t)k->max || strpbrk(value, "\"\\"))
            return fail(l, l->line, "%s = '%s': empty, too long, or has a quote or backslash", name,
                        value);
        strcpy(field, value);
        return 0;
    }
    return -1;
}

/* Finds the key a line of the file names and sets it. Returns 0 or -1 (recorded by fail). */
static int apply(struct loader *l, const char *section, const char *name, const char *value) {
    const struct key *k = NULL;
    int known_section = 0;
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(keys[i].section, section)) continue;
        known_section = 1;
        if (!strcmp(keys[i].name, name) || !strcmp(keys[i].name, "*")) k = &keys[i];
    }
    if (!*section) return fail(l, l->line, "'%s' is outside any [section]", name);
    if (!known_section) return fail(l, l->line, "unknown section [%s]", section);
    if (!k) return fail(l, l->line, "unknown key '%s' in [%s]", name, section);

    int *first = &l->seen[k - keys];
    int list =
        k->kind == UPSTREAMS || k->kind == CIDRS || k->kind == DESTINATIONS || k->kind == PORTS;
    /* A key may come once; a list may go on, but only on indented lines; [users] are many. */
    if (k->kind != USER && *first && (!list || !l->indented))
        return fail(l, l->line, "'%s' is set twice (first on line %d)", name, *first);
    if (!*first) *first = l->line;
    return set(l, k, name, value);
}

/* inih calls this for every key = value; inih's convention is nonzero for a good line. */
static int handler(void *user, const char *section, const char *name, const char *value) {
    return apply(user, section, name, value) == 0;
}

/* Refuses what inih would take in a way the writer did not mean: a ':' between a key and its
 * value (inih splits at the first ':' as at '=', so `al:ice = secret` would become user "al"
 * with password "ice = secret"). Continuation lines (indented) and comments pass. A " ;"
 * starts an inline comment everywhere, [users] too (proxy.ini's own sample user line has
 * one), so a password cannot hold one: the man page and proxy.ini say so. Returns 0 or -1
 * (recorded by fail). */
static int check_line(struct loader *l, const char *s) {
    if (l->indented || !*s || strchr("[;#\r\n", *s)) return 0;
    const char *eq = strchr(s, '='), *colon = strchr(s, ':');
    if (colon && (!eq || colon < eq))
        return fail(l, l->line,
                    "expected 'key = value': a ':' cannot separate them, nor be part "
                    "of a key or a user name");
    return 0;
}

/* inih reads lines through this so that we know each line's number, catch lines too long
 * for inih's fixed buffer instead of letting it split them silently, see a read that fails (a
 * directory) and check what inih would misread (check_line). */
static char *reader(char *buf, int size, void *user) {
    struct loader *l = user;
    if (!fgets(buf, size, l->f)) {
        if (ferror(l->f)) l->read_errno = errno;
        return NULL;
    }
    l->line++;
    size_t n = strlen(buf);
    if (n == (size_t)size - 1 && buf[n - 1] != '\n' && !feof(l->f)) {
        fail(l, l->line, "line longer than %d characters (continue a list on an indented line)",
             size - 2);
        int ch;
        do ch = fgetc(l->f);
        while (ch != EOF && ch != '\n');
        buf[0] = 0;
    }
    const char *s = buf + strspn(buf, " \t");
    l->indented = s != buf;
    if (!strncmp(s, "[proxy]", 7)) l->proxy_line = l->line;
    if (check_line(l, s) < 0) buf[0] = 0; /* the error is recorded; inih sees a blank line */
    return buf;
}

/* Whether two listen addresses would collide: the same port on the same host, or on a
 * wildcard that covers it ([::] covers IPv4 too, 0.0.0.0 only IPv4). */
static int same_listener(const struct addr *a, const struct addr *b) {
    char x[64], y[64];
    addr_format(a, x, sizeof x);
    addr_format(b, y, sizeof y);
    const char *px = strrchr(x, ':'), *py = strrchr(y, ':');
    if (!a->len || !b->len || strcmp(px, py) || !strcmp(px, ":0")) return 0;
    int v4x = a->sa.ss_family == AF_INET, v4y = b->sa.ss_family == AF_INET;
    return !strcmp(x, y) || !strncmp(x, "[::]:", 5) || !strncmp(y, "[::]:", 5) ||
           (!strncmp(x, "0.0.0.0:", 8) && v4y) || (!strncmp(y, "0.0.0.0:", 8) && v4x);
}

/* Whether a is a loopback address (IPv4-mapped too): where auto allows local destinations. */
static int loopback(const struct addr *a) {
    struct addr t = *a;
    struct cidr lo[2];
    addr_unmap(&t);
    cidr_parse("127.0.0.0/8", &lo[0]);
    cidr_parse("::1", &lo[1]);
    return cidr_match(lo, 2, &t);
}

/* The line a key was set on, or def if it was not: where to point an error about it. */
static int line_of(const struct loader *l, const char *section, const char *name, int def) {
    for (size_t i = 0; i < NKEYS; i++)
        if (!strcmp(keys[i].section, section) && !strcmp(keys[i].name, name) && l->seen[i])
            return l->seen[i];
    return def;
}

/* Gives c the running value of each restart-only key (keep's), naming in note, comma-separated,
 * those whose value the file changed. A changed mode fails: other keys' checks depend on it. */
static int keep_restart_keys(struct loader *l, const struct config *keep, char *note,
                             size_t notelen) {
    struct config *c = l->c;
    size_t used = 0;
    if (c->mode != keep->mode)
        return fail(l, line_of(l, "proxy", "mode", 1), "mode: a change of mode needs a restart");
    note[0] = 0;
    for (size_t i = 0; i < NKEYS; i++) {
        const struct key *k = &keys[i];
        char *field = (char *)c + k->off;
        const char *running = (const char *)keep + k->off;
        if (!k->restart || !memcmp(field, running, k->size)) continue;
        if (used < notelen)
            used += (size_t)snprintf(note + used, notelen - used, "%s[%s] %s", used ? ", " : "",
                                     k->section, k->name);
        memcpy(field, running, k->size);
    }
    return 0;
}

/* Reads l->c->file through inih into l->c: the keys it sets, no defaults yet. Returns 0, or -1
 * with the error in l->err. */
static int read_file(struct loader *l) {
    const char *file = l->c->file;
    l->f = fopen(file, "r");
    if (!l->f) {
        snprintf(l->err, l->errlen, "proxy: %s: cannot open: %s (name the file with -c FILE)", file,
                 strerror(errno));
        return -1;
    }
    int bad = ini_parse_stream(reader, l, handler, l);
    fclose(l->f);
    l->value = NULL;
    if (l->read_errno) { /* a directory opens, then fails to read: never "configuration ok" */
        snprintf(l->err, l->errlen, "proxy: %s: cannot read: %s", file, strerror(l->read_errno));
        return -1;
    }
    if (bad > 0) fail(l, bad, "expected 'key = value' or '[section]'");
    if (bad < 0) fail(l, l->line, "out of memory");
    return bad || l->err_line ? -1 : 0;
}

/* Sets the keys the file left out to their defaults, checked like the file's values. A list
 * the file gives replaces the default instead of adding to it. */
static void set_defaults(struct loader *l) {
    struct config *c = l->c;
    for (size_t i = 0; i < NKEYS; i++)
        if (keys[i].def && !l->seen[i]) set(l, &keys[i], keys[i].name, keys[i].def);
    l->value = NULL;
    /* The table of clients left out grows to hold max_connections (set, it must:
     * check_across_keys). */
    if (!line_of(l, "limits", "clients", 0) && c->clients < c->max_connections)
        c->clients = c->max_connections;
}

/* The checks across keys, each error pointing at the line of the key to change (else at
 * [proxy]); fail() keeps the first only. */
static void check_across_keys(struct loader *l) {
    const struct config *c = l->c;
    int where = l->proxy_line ? l->proxy_line : 1;
    if (c->mode == MODE_TCP && c->nup == 0)
        fail(l, where, "[proxy] needs 'upstream = host:port' in tcp mode");
    if (c->mode == MODE_TCP && c->nusers)
        fail(l, line_of(l, "users", "*", where),
             "[users] needs mode = http: tcp mode has no way to ask");
    if (c->mode == MODE_HTTP && c->send_proxy)
        fail(l, line_of(l, "proxy", "send_proxy", where), "send_proxy works in tcp mode only");
    for (int i = 0; i < c->nup; i++)
        if (same_listener(&c->listen, &c->up[i].addr))
            fail(l, line_of(l, "proxy", "upstream", where),
                 "upstream %s is this proxy's own listen address", c->up[i].name);
    if (same_listener(&c->listen, &c->stats_listen))
        fail(l, line_of(l, "stats", "listen", where),
             "[stats] listen must differ from the proxy's listen address");
    /* An entry with open connections is never forgotten: the table must hold them all. */
    if (c->clients < c->max_connections)
        fail(l, line_of(l, "limits", "clients", line_of(l, "proxy", "max_connections", where)),
             "[limits] clients = %d must be at least max_connections (%d): a client with "
             "connections open is never forgotten",
             c->clients, c->max_connections);
    if (c->limit_by == LIMIT_BY_USER && !c->nusers)
        fail(l, line_of(l, "limits", "limit_by", where),
             "limit_by = user needs [users]: without them no request has a user");
    if (c->request_burst && !c->requests_per_second)
        fail(l, line_of(l, "limits", "request_burst", where),
             "request_burst needs requests_per_second: a burst above which rate?");
}

/* What follows from the keys once all are set: min_rate within rate_limit, where log was set,
 * and what local_destinations = auto means for this listen address. */
static void derive(struct loader *l) {
    struct config *c = l->c;
    /* Our own pacing must not make a body look slow. */
    if (c->rate_limit && c->min_rate > c->rate_limit / 2) c->min_rate = c->rate_limit / 2;
    c->log_line = line_of(l, "proxy", "log", l->proxy_line ? l->proxy_line : 1);
    /* A proxy on loopback serves this host's own users, who can reach its local services
     * anyway; on any other address, clients from elsewhere could reach them through it. */
    c->local_auto = c->local_destinations == LOCAL_AUTO;
    if (c->local_auto) c->local_destinations = loopback(&c->listen) ? LOCAL_ALLOW : LOCAL_DENY;
}

/* Both loads (keep: config_load_keeping's). On failure c may still hold lists: the callers free
 * them. */
static int load(struct config *c, const char *file, const struct config *keep, char *note,
                size_t notelen, char *err, size_t errlen) {
    struct loader l = {.c = c, .err = err, .errlen = errlen};
    memset(c, 0, sizeof *c);
    c->file = file;
    if (read_file(&l) < 0) return -1;
    set_defaults(&l);
    if (keep && keep_restart_keys(&l, keep, note, notelen) < 0) return -1;
    check_across_keys(&l);
    derive(&l);
    return l.err_line ? -1 : 0;
}

int config_load(struct config *c, const char *file, char *err, size_t errlen) {
    return config_load_keeping(c, file, NULL, NULL, 0, err, errlen);
}

int config_load_keeping(struct config *c, const char *file, const struct config *keep, char *note,
                        size_t notelen, char *err, size_t errlen) {
    if (load(c, file, keep, note, notelen, err, errlen) == 0) return 0;
    config_free(c);
    return -1;
}

/* Without creating the log: an existing file must open for writing, a new one's directory
 * must take it. */
int config_check_log(const struct config *c, char *err, size_t errlen) {
    if (!strcmp(c->log, "-") || !strcmp(c->log, "off")) return 0;
    int fd = open(c->log, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd >= 0) {
        close(fd);
        return 0;
    }
    int e = errno;
    if (e == ENOENT) {
        char dir[sizeof c->log];
        snprintf(dir, sizeof dir, "%s", c->log);
        char *slash = strrchr(dir, '/');
        if (slash == dir)
            slash[1] = 0; /* a file in / */
        else if (slash)
            *slash = 0;
        if (access(slash ? dir : ".", W_OK | X_OK) == 0) return 0;
        e = errno;
    }
    snprintf(err, errlen, "%s:%d: log = %s: cannot open: %s", c->file, c->log_line, c->log,
             strerror(e));
    return -1;
}
