/* auth.c — who may use the HTTP proxy: Proxy-Authorization Basic (RFC 7617) checked against
 * [users] on every request. Where a request may go is upstream.c's and net.c's. Credentials are
 * only compared here; nothing here logs or echoes them. */
#include "proxy.h"

#include <string.h>
#include <strings.h>

const char *const auth_names[AUTH_MAX] = {"ok", "missing", "malformed", "bad_credentials"};

/* The 6-bit value of a base64 character, or -1 for anything outside the alphabet. */
static int b64_value(unsigned char ch) {
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

int auth_base64_decode(const char *in, size_t len, unsigned char *out, size_t cap) {
    /* Strict: whole quads, the alphabet only, '=' only as the last one or two characters,
     * and zero padding bits, so that one credential has exactly one spelling. */
    size_t n = 0;
    if (len == 0 || len % 4) return -1;
    for (size_t i = 0; i < len; i += 4) {
        int v[4], pad = 0;
        for (int j = 0; j < 4; j++) {
            int last = i + 4 == len;
            if (in[i + j] == '=' && last && j >= 2 && (j == 3 || in[i + 3] == '=')) {
                v[j] = 0;
                pad++;
            } else if ((v[j] = b64_value((unsigned char)in[i + j])) < 0 || pad) {
                return -1;
            }
        }
        uint32_t quad = (uint32_t)(v[0] << 18 | v[1] << 12 | v[2] << 6 | v[3]);
        if ((pad == 1 && (quad & 0xff)) || (pad == 2 && (quad & 0xffff))) return -1;
        if (n + 3 - (size_t)pad > cap) return -1;
        out[n++] = (unsigned char)(quad >> 16);
        if (pad < 2) out[n++] = (unsigned char)(quad >> 8);
        if (pad < 1) out[n++] = (unsigned char)quad;
    }
    return (int)n;
}

/* Whether guess equals secret (1 or 0), in time that depends only on the stored secret's length,
 * not on the guess: not on where it differs, nor on whether its length is right. */
static unsigned same_secret(const unsigned char *guess, size_t glen, const char *secret) {
    size_t slen = strlen(secret);
    unsigned diff = glen != slen;
    for (size_t i = 0; i < slen; i++)
        diff |= (unsigned char)secret[i] ^ (glen ? guess[i % glen] : 0);
    return diff == 0;
}

enum auth auth_check(const struct config *cf, const struct msg *m, char *user, size_t cap) {
    unsigned char cred[256];
    user[0] = 0;
    if (!cf->nusers) return AUTH_OK;
    if (!m->nauth) return AUTH_MISSING;
    const struct field *f = m->auth;
    if (m->nauth > 1 || f->vlen < 7 || strncasecmp(f->value, "basic ", 6)) return AUTH_MALFORMED;
    const char *tok = f->value + 6, *end = f->value + f->vlen;
    while (tok < end && *tok == ' ') tok++;
    int n = auth_base64_decode(tok, (size_t)(end - tok), cred, sizeof cred);
    const unsigned char *colon = n > 0 ? memchr(cred, ':', (size_t)n) : NULL;
    if (!colon) return AUTH_MALFORMED;
    const unsigned char *pass = colon + 1;
    size_t ulen = (size_t)(colon - cred), plen = (size_t)(cred + n - pass);
    /* Every user, name and password both, with no early exit: the time taken depends on the
     * stored names and passwords, not on whether the guessed name exists or how much of the
     * guess was right. Names are unique, so at most one user matches. */
    unsigned found = 0; /* the matching user's index + 1; 0: none */
    for (int i = 0; i < cf->nusers; i++) {
        const struct user *u = &cf->users[i];
        unsigned match = same_secret(cred, ulen, u->name) & same_secret(pass, plen, u->pass);
        found |= match * (unsigned)(i + 1);
    }
    explicit_bzero(cred, sizeof cred); /* not left on the stack; memset may be optimised out */
    if (!found) return AUTH_BAD;
    snprintf(user, cap, "%s", cf->users[found - 1].name);
    return AUTH_OK;
}

int auth_may_retry(struct conn *c) {
    /* A guesser must reconnect every few tries (slower, and seen in the connection counters),
     * and a client stuck retrying bad credentials does not hold its worker for ever. */
    c->auth_failures++;
    return c->auth_failures < AUTH_FAILURES_MAX;
}
