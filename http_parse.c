/* http_parse.c — HTTP/1.1 message heads, request targets and chunk-size lines, parsed strictly
 * (RFC 9112): this is where request smuggling lives, so anything ambiguous is refused. Pure
 * functions over a buffer: no I/O, no allocation; pointers in struct msg point into it. */
#include "proxy.h"

#include <ctype.h>
#include <string.h>
#include <strings.h>

/* tchar (RFC 9110 5.6.2): the characters of a token, such as a method or a field name. */
static int is_tchar(unsigned char ch) {
    return isalnum(ch) || (ch && strchr("!#$%&'*+-.^_`|~", ch));
}

/* Visible ASCII: the characters a request-target may use. */
static int is_visible(unsigned char ch) {
    return ch > 0x20 && ch < 0x7f;
}

/* Field-value characters: VCHAR, obs-text, SP and HTAB; never a control character. */
static int is_vchar(unsigned char ch) {
    return ch == ' ' || ch == '\t' || (ch > 0x20 && ch != 0x7f);
}

/* How many tchars start at p (a method, a field name). */
static int token_len(const char *p, const char *end) {
    const char *s = p;
    while (p < end && is_tchar((unsigned char)*p)) p++;
    return (int)(p - s);
}

int http_is(const char *s, size_t len, const char *word) {
    return strlen(word) == len && !strncasecmp(s, word, len);
}

int http_list_has(const char *list, size_t len, const char *item, size_t ilen) {
    const char *p = list, *end = list + len;
    while (p < end) {
        while (p < end && (*p == ',' || *p == ' ' || *p == '\t')) p++;
        const char *s = p;
        while (p < end && *p != ',') p++;
        const char *e = p;
        while (e > s && (e[-1] == ' ' || e[-1] == '\t')) e--;
        if ((size_t)(e - s) == ilen && !strncasecmp(s, item, ilen)) return 1;
    }
    return 0;
}

enum scan http_head_end(const char *buf, size_t len, size_t *scanned, size_t *end) {
    /* Scans only what is new since the last call, so a head that arrives a byte at a time
     * costs linear, not quadratic, time. */
    for (size_t i = *scanned; i < len; i++) {
        if (buf[i] == 0) return SCAN_BAD;
        if (buf[i] == '\n' && (i == 0 || buf[i - 1] != '\r')) return SCAN_BAD; /* bare LF */
        if (i > 0 && buf[i - 1] == '\r' && buf[i] != '\n') return SCAN_BAD;    /* bare CR */
        if (i == 1 && !memcmp(buf, "\r\n", 2)) return SCAN_BAD;                /* no request line */
        if (i >= 3 && !memcmp(buf + i - 3, "\r\n\r\n", 4)) {
            *end = i + 1;
            return SCAN_DONE;
        }
    }
    *scanned = len;
    return SCAN_MORE;
}

/* Parses "HTTP/1.x" at p; returns the minor version (0 or 1), or -1. */
static int version(const char *p, const char *end, int *major_ok) {
    *major_ok = 1;
    if (end - p != 8 || memcmp(p, "HTTP/", 5) || !isdigit((unsigned char)p[5]) || p[6] != '.' ||
        !isdigit((unsigned char)p[7]))
        return -1;
    if (p[5] != '1') *major_ok = 0;
    return p[7] == '0' ? 0 : 1;
}

/* The request line: method SP request-target SP HTTP-version. Returns 0 or a status. */
static int request_line(const char *p, const char *end, struct msg *m) {
    int n = token_len(p, end), ok;
    if (n == 0 || p + n >= end || p[n] != ' ') return 400; /* no method */
    m->method = p;
    m->mlen = (size_t)n;
    p += n + 1;
    m->target = p;
    while (p < end && is_visible((unsigned char)*p)) p++;
    m->tlen = (size_t)(p - m->target);
    if (m->tlen == 0 || p == end || *p != ' ') return 400;
    if ((m->version = version(p + 1, end, &ok)) < 0) return 400;
    return ok ? 0 : 505;
}

/* The status line: HTTP-version SP 3DIGIT [SP reason]. Returns 0 or 502. */
static int status_line(const char *p, const char *end, struct msg *m) {
    int ok;
    if (end - p < 12 || (m->version = version(p, p + 8, &ok)) < 0 || !ok || p[8] != ' ') return 502;
    for (int i = 9; i < 12; i++)
        if (!isdigit((unsigned char)p[i])) return 502;
    m->status = (p[9] - '0') * 100 + (p[10] - '0') * 10 + (p[11] - '0');
    if (m->status < 100) return 502; /* not interim, not final: nothing to wait for */
    if (end - p > 12 && p[12] != ' ') return 502;
    for (p += 12; p < end; p++)
        if (!is_vchar((unsigned char)*p)) return 502;
    return 0;
}

/* Whether a response's Transfer-Encoding list ends with chunked, and names it only there: then
 * its framing is chunked, whatever codings come before (RFC 9112 6.3). */
static int final_chunked(const char *v, size_t len) {
    const char *comma = v + len;
    while (comma > v && comma[-1] != ',') comma--;
    const char *last = comma;
    while (last < v + len && (*last == ' ' || *last == '\t')) last++;
    if (!http_is(last, (size_t)(v + len - last), "chunked")) return 0;
    return comma == v || !http_list_has(v, (size_t)(comma - v - 1), "chunked", 7);
}

/* Records what the proxy must know of one field (of a request if request). Returns 0 or a
 * status. Requests are held to one spelling of their framing; responses may repeat an
 * identical Content-Length and put codings before chunked, as RFC 9110 8.6 and 9112 6.1
 * allow: refusing those would break real servers, and we relay the body as it comes. */
static int known_field(struct msg *m, const struct field *f, int request) {
    if (http_is(f->name, f->nlen, "content-length")) {
        int64_t length = 0;
        if (f->vlen == 0 || f->vlen > 18) return 400;
        for (size_t i = 0; i < f->vlen; i++) {
            if (!isdigit((unsigned char)f->value[i])) return 400; /* +5, -1, 5 5, 0x5 */
            length = length * 10 + (f->value[i] - '0');
        }
        if (m->length >= 0 && (request || length != m->length)) return 400;
        m->length = length;
    } else if (http_is(f->name, f->nlen, "transfer-encoding")) {
        int chunked =
            request ? http_is(f->value, f->vlen, "chunked") : final_chunked(f->value, f->vlen);
        if (m->chunked || !chunked) return 400;
        m->chunked = 1;
    } else if (http_is(f->name, f->nlen, "host")) {
        if (m->host) return 400;
        m->host = f;
    } else if (http_is(f->name, f->nlen, "connection")) {
        m->close |= http_list_has(f->value, f->vlen, "close", 5);
        m->keep_alive |= http_list_has(f->value, f->vlen, "keep-alive", 10);
        m->upgrade |= http_list_has(f->value, f->vlen, "upgrade", 7);
    } else if (http_is(f->name, f->nlen, "proxy-authorization")) {
        m->auth = f;
        m->nauth++;
    } else if (http_is(f->name, f->nlen, "upgrade")) {
        m->upgrade_to = f;
    }
    return 0;
}

int http_parse(const char *buf, size_t len, struct msg *m, int request) {
    const char *p = buf, *end = buf + len - 2; /* the head ends with an empty line */
    const char *eol = memchr(p, '\r', (size_t)(end - p));
    int bad = request ? 400 : 502, rc;
    memset(m, 0, sizeof *m);
    m->size = len;
    m->length = -1;
    if (!eol) return bad;
    if ((rc = request ? request_line(p, eol, m) : status_line(p, eol, m))) return rc;
    for (p = eol + 2; p < end; p = eol + 2) {
        eol = memchr(p, '\r', (size_t)(end - p + 1));
        struct field f;
        if (http_field(p, (size_t)(eol - p), &f) < 0) return bad;
        if (m->nfields == HTTP_MAX_FIELDS) return request ? 431 : 502;
        m->field[m->nfields++] = f;
        if ((rc = known_field(m, &m->field[m->nfields - 1], request))) return request ? rc : 502;
    }
    if (m->chunked && m->length >= 0) return bad; /* both framings: refuse, never guess */
    if (m->chunked && !m->version) return bad;    /* HTTP/1.0 has no chunked: faulty framing */
    if (!m->version && !m->keep_alive) m->close = 1;
    if (!m->upgrade_to) m->upgrade = 0;
    return 0;
}

int http_field(const char *p, size_t len, struct field *f) {
    /* obs-fold, and whitespace between the name and the colon, are refused: both were ways
     * to make two parsers disagree on where a field starts or what it is called. */
    int n = token_len(p, p + len);
    if (n == 0 || (size_t)n == len || p[n] != ':') return -1;
    const char *v = p + n + 1, *ve = p + len;
    while (v < ve && (*v == ' ' || *v == '\t')) v++;
    while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
    for (const char *c = v; c < ve; c++)
        if (!is_vchar((unsigned char)*c)) return -1;
    *f = (struct field){p, v, (size_t)n, (size_t)(ve - v)};
    return 0;
}

int http_chunk_size(const char *line, size_t len, uint64_t *size) {
    size_t n = 0;
    *size = 0;
    while (n < len && isxdigit((unsigned char)line[n])) {
        if (n == 16) return -1; /* more than 64 bits: refuse, never wrap */
        int d = (unsigned char)line[n];
        *size = *size << 4 | (uint64_t)(isdigit(d) ? d - '0' : (tolower(d) - 'a' + 10));
        n++;
    }
    if (n == 0) return -1;
    if (n == len) return 0;
    if (line[n] != ';' && line[n] != ' ' && line[n] != '\t') return -1;
    for (; n < len; n++) /* chunk extensions: passed on as they are, but no control bytes */
        if (!is_vchar((unsigned char)line[n])) return -1;
    return 0;
}

int http_authority(const char *s, size_t len, char *host, size_t cap, int *port, int def) {
    const char *end = s + len, *h = s, *he;
    int v6 = len && *s == '[';
    if (v6) {
        if (!(he = memchr(s, ']', len))) return -1;
        h = s + 1;
        s = he + 1;
    } else {
        for (he = s; he < end && *he != ':'; he++)
            if (!isalnum((unsigned char)*he) && !strchr(".-_", *he)) return -1; /* no user@ */
        s = he;
    }
    if (he == h || (size_t)(he - h) >= cap) return -1;
    memcpy(host, h, (size_t)(he - h));
    host[he - h] = 0;
    if (v6 && strspn(host, "0123456789abcdefABCDEF:.") != strlen(host)) return -1;
    if (s == end) {
        if (!def) return -1;
        *port = def;
        return 0;
    }
    if (*s != ':' || end - s < 2 || end - s > 6) return -1; /* ":" then 1-5 digits */
    *port = 0;
    for (s++; s < end; s++) {
        if (!isdigit((unsigned char)*s)) return -1;
        *port = *port * 10 + (*s - '0');
    }
    return *port >= 1 && *port <= 65535 ? 0 : -1; /* 65979 is refused, never wrapped to 443 */
}
