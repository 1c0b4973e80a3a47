/* http_head.c — the heads http mode forwards, written anew from parsed ones: the
 * request target in origin-form, Host from an absolute-form target, the hop-by-hop fields
 * (RFC 9110 7.6.1) dropped both ways, our own Connection, and Via, which is also how a request
 * that loops through this proxy is seen. Pure functions over buffers: no sockets here. */
#include "proxy.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static char via[48]; /* "1.1 proxy-PID"; written once by http_head_init, then read-only */

void http_head_init(void) {
    snprintf(via, sizeof via, "1.1 proxy-%d", (int)getpid());
}

const char *http_via(void) {
    return via;
}

/* A head being written into a buffer of OUT_MAX bytes; full once something did not fit. */
struct out {
    char *p;
    size_t n;
    int full;
};

static void put(struct out *o, const char *s, size_t len) {
    if (o->full || o->n + len > OUT_MAX) {
        o->full = 1;
        return;
    }
    memcpy(o->p + o->n, s, len);
    o->n += len;
}

static void put_str(struct out *o, const char *s) {
    put(o, s, strlen(s));
}

/* Whether f is hop-by-hop (RFC 9110 7.6.1): it describes this connection, not the message, so
 * it stops here, either way. Upgrade goes on only with an upgrade (keep_upgrade); credentials
 * are for this proxy alone. Framing fields are never dropped because Connection names them:
 * that would make us and the next hop disagree on where the body ends. */
static int hop_by_hop(const struct msg *m, const struct field *f, int keep_upgrade) {
    static const char *const hop[] = {
        "connection", "proxy-connection",    "keep-alive",        "te",
        "trailer",    "proxy-authorization", "proxy-authenticate"};
    if (http_is(f->name, f->nlen, "upgrade")) return !keep_upgrade;
    if (http_is(f->name, f->nlen, "content-length") ||
        http_is(f->name, f->nlen, "transfer-encoding"))
        return 0;
    for (size_t i = 0; i < sizeof hop / sizeof hop[0]; i++)
        if (http_is(f->name, f->nlen, hop[i])) return 1;
    for (int i = 0; i < m->nfields; i++)
        if (http_is(m->field[i].name, m->field[i].nlen, "connection") &&
            http_list_has(m->field[i].value, m->field[i].vlen, f->name, f->nlen))
            return 1;
    return 0;
}

/* Writes m's end-to-end fields (all but the hop-by-hop ones, and Host when skip_host). */
static void put_fields(struct out *o, const struct msg *m, int keep_upgrade, int skip_host) {
    for (int i = 0; i < m->nfields; i++) {
        const struct field *f = &m->field[i];
        if (hop_by_hop(m, f, keep_upgrade)) continue;
        if (skip_host && http_is(f->name, f->nlen, "host")) continue;
        put(o, f->name, f->nlen);
        put_str(o, ": ");
        put(o, f->value, f->vlen);
        put_str(o, "\r\n");
    }
}

long http_rewrite_request(char *buf, const struct msg *m, const struct target *t, int upgrade) {
    struct out o = {.p = buf};
    put(&o, m->method, m->mlen);
    put_str(&o, t->plen && *t->path != '?' ? " " : " /"); /* "/" for an empty path or a query */
    put(&o, t->path, t->plen);
    put_str(&o, m->version ? " HTTP/1.1\r\n" : " HTTP/1.0\r\n");
    if (t->authority) {
        put_str(&o, "Host: ");
        put(&o, t->authority, t->alen);
        put_str(&o, "\r\n");
    }
    put_fields(&o, m, upgrade, t->authority != NULL);
    /* HTTP/1.0 closes after each response unless asked not to; 1.1 stays open unless told. */
    if (upgrade) put_str(&o, "Connection: upgrade\r\n");
    if (!upgrade && !m->version && !m->close) put_str(&o, "Connection: keep-alive\r\n");
    put_str(&o, "Via: ");
    put_str(&o, via);
    put_str(&o, "\r\n\r\n");
    return o.full ? -1 : (long)o.n;
}

long http_rewrite_response(char *buf, const char *head, const struct msg *r, const struct msg *req,
                           int close) {
    struct out o = {.p = buf};
    const char *eol = memchr(head, '\r', r->size);
    put_str(&o, "HTTP/1.1");
    put(&o, head + 8, (size_t)(eol - head) - 8); /* " 200 OK": parsed, so it is there */
    put_str(&o, "\r\n");
    put_fields(&o, r, r->status == 101, 0);
    if (r->status == 101) put_str(&o, "Connection: upgrade\r\n");
    if (r->status != 101 && close) put_str(&o, "Connection: close\r\n");
    if (r->status != 101 && !close && !req->version) put_str(&o, "Connection: keep-alive\r\n");
    put_str(&o, "Via: ");
    put_str(&o, via);
    put_str(&o, "\r\n\r\n");
    return o.full ? -1 : (long)o.n;
}
