/* tests/unit.c — unit tests for the pure parts: config validation (golden messages), addresses
 * and networks, the source hash, the PROXY protocol header, the rate limiter's arithmetic.
 * Prints one line per failed check and ends with "N passed, N failed" (tests, not checks). */
#include "proxy.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int passed, failed, test_failed;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            printf("  check failed at %s:%d: %s\n", __FILE__, __LINE__, #cond);                    \
            test_failed = 1;                                                                       \
        }                                                                                          \
    } while (0)
#define STR_EQ(got, want)                                                                          \
    do {                                                                                           \
        if (strcmp((got), (want))) {                                                               \
            printf("  at %s:%d:\n    got  '%s'\n    want '%s'\n", __FILE__, __LINE__, (got),       \
                   (want));                                                                        \
            test_failed = 1;                                                                       \
        }                                                                                          \
    } while (0)

static void run(const char *name, void (*fn)(void))
{
    test_failed = 0;
    fn();
    printf("%s %s\n", test_failed ? "FAIL" : "ok  ", name);
    if (test_failed)
        failed++;
    else
        passed++;
}

static char ini_path[] = "/tmp/proxy-unit-XXXXXX";
static struct config c;

/* Loads text as a config file; returns config_load's result, message in err. */
static int load(const char *text, char *err, size_t len)
{
    FILE *f = fopen(ini_path, "w");
    fputs(text, f);
    fclose(f);
    err[0] = 0;
    return config_load(&c, ini_path, err, len);
}

static void test_config_golden_errors(void)
{
    static const struct {
        const char *ini, *want; /* want: the message after "FILE:" */
    } cases[] = {
        {"[proxy]\nupstream = 127.0.0.1:80\nworkers = abc\n",
         "3: workers = 'abc': expected a whole number from 1 to 50000"},
        {"[proxy]\nupstream = 127.0.0.1:80\nworkers = 0\n",
         "3: workers = '0': expected a whole number from 1 to 50000"},
        {"[proxy]\nupstream = 127.0.0.1:80\nworkers = 1e3\n",
         "3: workers = '1e3': expected a whole number from 1 to 50000"},
        {"[proxy]\nupstream = 127.0.0.1:80\nqueue = -1\n",
         "3: queue = '-1': expected a whole number from 0 to 1000000"},
        {"[proxy]\nupstream = 127.0.0.1:80\nbuffer_size = 512\n",
         "3: buffer_size = '512': expected a whole number from 1024 to 67108864 (k, m, g allowed)"},
        {"[proxy]\nupstream = 127.0.0.1:80\nbuffer_size = 64q\n",
         "3: buffer_size = '64q': expected a whole number from 1024 to 67108864 (k, m, g allowed)"},
        {"[proxy]\nupstream = 127.0.0.1:80\nmode = udp\n", "3: mode = 'udp': expected one of: tcp"},
        {"[proxy]\nupstream = 127.0.0.1:80\ncopy = Splice\n",
         "3: copy = 'Splice': expected one of: splice buffer"},
        {"[proxy]\nupstream = 127.0.0.1:80\nsend_proxy = v3\n",
         "3: send_proxy = 'v3': expected one of: off v1 v2"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlisten = 127.0.0.1\n",
         "3: listen = '127.0.0.1': expected host:port"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlisten = ::1:80\n",
         "3: listen = '::1:80': IPv6 addresses go in brackets, like [::1]:8888"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlisten = 127.0.0.1:65536\n",
         "3: listen = '127.0.0.1:65536': port must be a number from 0 to 65535"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlisten = 1.2.3.4.5:80\n",
         "3: listen = '1.2.3.4.5:80': cannot resolve '1.2.3.4.5': Name or service not known"},
        {"[proxy]\nupstream = 127.0.0.1:80, 127.0.0.1\n",
         "2: upstream '127.0.0.1': expected host:port"},
        {"[proxy]\nupstream = 127.0.0.1:0\n", "2: upstream '127.0.0.1:0': port 0"},
        {"[proxy]\nupstream = 127.0.0.1:80,,127.0.0.1:81\n",
         "2: empty item in list '127.0.0.1:80,,127.0.0.1:81'"},
        {"[proxy]\nupstream = a\"b:80\n", "2: upstream 'a\"b:80': not a host:port"},
        {"[proxy]\nupstream = 127.0.0.1:80\nworkers = 4\nworkers = 5\n",
         "4: 'workers' is set twice (first on line 3)"},
        {"[proxy]\nupstream = 127.0.0.1:80\nworker = 4\n", "3: unknown key 'worker' in [proxy]"},
        {"[proxy]\nupstream = 127.0.0.1:80\n[prxy]\nx = 1\n", "4: unknown section [prxy]"},
        {"workers = 4\n[proxy]\nupstream = 127.0.0.1:80\n",
         "1: 'workers' is outside any [section]"},
        {"[proxy]\nupstream = 127.0.0.1:80\nthis is not a key\n",
         "3: expected 'key = value' or '[section]'"},
        {"[proxy]\nupstream = 127.0.0.1:80\n[proxy\n", "3: expected 'key = value' or '[section]'"},
        {"[proxy]\nupstream = 127.0.0.1:80\n[access]\nallow = 10.0.0.0/33\n",
         "4: allow: '10.0.0.0/33' is not an address or network like 10.0.0.0/8"},
        {"[proxy]\nupstream = 127.0.0.1:80\n[access]\nallow = 10.0.0.0/8, bogus\n",
         "4: allow: 'bogus' is not an address or network like 10.0.0.0/8"},
        {"[proxy]\nworkers = 4\n", "1: [proxy] needs 'upstream = host:port' in tcp mode"},
        {"; comment\n\n[proxy]\nworkers = 4\n",
         "3: [proxy] needs 'upstream = host:port' in tcp mode"},
        {"[proxy]\nlisten = 127.0.0.1:9100\nupstream = 127.0.0.1:80\n[stats]\nlisten = "
         "0.0.0.0:9100\n",
         "5: [stats] listen must differ from the proxy's listen address"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlog =\n", "3: log: expected -, off or a file path"},
        {"[proxy]\nupstream = 127.0.0.1:80\nidle_timeout = 99999999999999999999\n",
         "3: idle_timeout = '99999999999999999999': expected a whole number from 0 to 604800"},
    };
    char err[512], want[600];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        CHECK(load(cases[i].ini, err, sizeof err) == -1);
        snprintf(want, sizeof want, "%s:%s", ini_path, cases[i].want);
        STR_EQ(err, want);
    }
    /* A line too long for inih's buffer is an error, not two silently split lines. */
    char big[400] = "[proxy]\nupstream = 127.0.0.1:80\nlog = /tmp/";
    memset(big + strlen(big), 'x', 250);
    strcat(big, "\n");
    CHECK(load(big, err, sizeof err) == -1);
    CHECK(strstr(err, ":3: line longer than 198 characters") != NULL);
    CHECK(config_load(&c, "/nonexistent/proxy.ini", err, sizeof err) == -1);
    STR_EQ(err, "/nonexistent/proxy.ini: cannot open: No such file or directory");
}

static void test_config_values(void)
{
    char err[512];
    int rc = load("[proxy]\n"
                  "listen = [::1]:0 ; inline comment\n"
                  "upstream = 127.0.0.1:81, [::1]:82,\n"
                  "  localhost:83\n"
                  "balance = roundrobin\nworkers = 3\nqueue = 0\nbuffer_size = 64k\n"
                  "copy = buffer\nconnect_timeout = 2\nidle_timeout = 0\nrate_limit = 1m\n"
                  "send_proxy = v2\nlog = off\n"
                  "[access]\nallow = 10.0.0.0/8\n"
                  "[stats]\nlisten =\n",
                  err, sizeof err);
    STR_EQ(err, "");
    CHECK(rc == 0);
    CHECK(c.nup == 3);
    STR_EQ(c.up[1].name, "[::1]:82");
    STR_EQ(c.up[2].name, "localhost:83");
    CHECK(c.balance == BALANCE_ROUNDROBIN && c.workers == 3 && c.queue == 0);
    CHECK(c.buffer_size == 65536 && c.rate_limit == 1048576);
    CHECK(c.copy == COPY_BUFFER && c.send_proxy == SEND_PROXY_V2 && c.idle_timeout == 0);
    STR_EQ(c.log, "off");
    CHECK(c.nallow == 1); /* the file's list replaces the default */
    CHECK(c.stats_listen.len == 0);
    CHECK(c.listen.sa.ss_family == AF_INET6);

    CHECK(load("[proxy]\nupstream = 127.0.0.1:80\n", err, sizeof err) == 0);
    CHECK(c.workers == 256 && c.queue == 1024 && c.copy == COPY_SPLICE && c.nallow == 2);
    CHECK(c.mode == MODE_TCP && c.balance == BALANCE_SOURCE && c.idle_timeout == 300);
    CHECK(c.stats_listen.len != 0);
}

static void test_addresses(void)
{
    struct addr a;
    char err[128], buf[64];
    CHECK(addr_parse("127.0.0.1:80", &a, err, sizeof err) == 0);
    STR_EQ(addr_format(&a, buf, sizeof buf), "127.0.0.1:80");
    CHECK(addr_parse("[::1]:443", &a, err, sizeof err) == 0);
    STR_EQ(addr_format(&a, buf, sizeof buf), "[::1]:443");
    CHECK(addr_parse("*:8080", &a, err, sizeof err) == 0);
    STR_EQ(addr_format(&a, buf, sizeof buf), "0.0.0.0:8080");
    CHECK(addr_parse("[::1]80", &a, err, sizeof err) == -1);
    CHECK(addr_parse(":80", &a, err, sizeof err) == -1);
    CHECK(addr_parse("127.0.0.1:", &a, err, sizeof err) == -1);
    CHECK(addr_parse("127.0.0.1:+80", &a, err, sizeof err) == -1);
    CHECK(addr_parse("[::ffff:10.1.2.3]:5", &a, err, sizeof err) == 0);
    addr_unmap(&a);
    STR_EQ(addr_format(&a, buf, sizeof buf), "10.1.2.3:5");
}

static int matches(const char *net, const char *ip)
{
    struct cidr n;
    struct addr a;
    char err[128], hostport[80];
    snprintf(hostport, sizeof hostport, strchr(ip, ':') ? "[%s]:1" : "%s:1", ip);
    if (cidr_parse(net, &n) < 0 || addr_parse(hostport, &a, err, sizeof err) < 0) return -1;
    return cidr_match(&n, 1, &a);
}

static void test_cidr(void)
{
    struct cidr n;
    CHECK(matches("10.0.0.0/8", "10.200.3.4") == 1);
    CHECK(matches("10.0.0.0/8", "11.0.0.1") == 0);
    CHECK(matches("10.0.0.1/8", "10.9.9.9") == 1); /* host bits are masked off */
    CHECK(matches("192.168.1.0/25", "192.168.1.127") == 1);
    CHECK(matches("192.168.1.0/25", "192.168.1.128") == 0);
    CHECK(matches("0.0.0.0/0", "203.0.113.9") == 1);
    CHECK(matches("127.0.0.1", "127.0.0.1") == 1);
    CHECK(matches("127.0.0.1", "127.0.0.2") == 0);
    CHECK(matches("::1", "::1") == 1);
    CHECK(matches("::1", "127.0.0.1") == 0);
    CHECK(matches("2001:db8::/32", "2001:db8:ffff::1") == 1);
    CHECK(matches("2001:db8::/33", "2001:db8:8000::1") == 0);
    CHECK(matches("127.0.0.0/8", "::ffff:127.1.2.3") == 1); /* v4-mapped counts as v4 */
    CHECK(matches("::/0", "127.0.0.1") == 0);
    CHECK(cidr_parse("10.0.0.0/", &n) == -1);
    CHECK(cidr_parse("10.0.0.0/-1", &n) == -1);
    CHECK(cidr_parse("10.0.0.0/129", &n) == -1);
    CHECK(cidr_parse("::/129", &n) == -1);
    CHECK(cidr_parse("10.0.0", &n) == -1);
    CHECK(cidr_parse("", &n) == -1);
}

static void test_source_hash(void)
{
    struct addr a, b;
    char err[128];
    addr_parse("192.0.2.7:1000", &a, err, sizeof err);
    addr_parse("192.0.2.7:2000", &b, err, sizeof err);
    CHECK(upstream_hash(&a, 7) == upstream_hash(&b, 7)); /* the port does not matter */
    CHECK(upstream_hash(&a, 1000) == 214);               /* pinned: FNV-1a of 192.0.2.7 */
    addr_parse("[::ffff:192.0.2.7]:3000", &b, err, sizeof err);
    CHECK(upstream_hash(&a, 1000) == upstream_hash(&b, 1000)); /* mapped = plain v4 */
    int seen[4] = {0};
    for (int i = 1; i <= 200; i++) {
        char s[32];
        snprintf(s, sizeof s, "10.0.%d.%d:1", i / 50, i);
        addr_parse(s, &a, err, sizeof err);
        seen[upstream_hash(&a, 4)]++;
    }
    for (int i = 0; i < 4; i++) CHECK(seen[i] > 20); /* spread, roughly */
}

static void test_proxy_header(void)
{
    struct addr s, d, m;
    char err[128], buf[128];
    addr_parse("192.0.2.1:56324", &s, err, sizeof err);
    addr_parse("198.51.100.2:443", &d, err, sizeof err);
    int n = upstream_proxy_header(1, &s, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");

    static const unsigned char v2_4[] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49,
                                         0x54, 0x0a, 0x21, 0x11, 0x00, 0x0c, 192,  0,    2,    1,
                                         198,  51,   100,  2,    0xdc, 0x04, 0x01, 0xbb};
    n = upstream_proxy_header(2, &s, &d, buf);
    CHECK(n == (int)sizeof v2_4 && !memcmp(buf, v2_4, sizeof v2_4));

    addr_parse("[2001:db8::1]:1234", &s, err, sizeof err);
    addr_parse("[::1]:80", &d, err, sizeof err);
    n = upstream_proxy_header(1, &s, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP6 2001:db8::1 ::1 1234 80\r\n");
    n = upstream_proxy_header(2, &s, &d, buf);
    CHECK(n == 16 + 36 && buf[13] == 0x21 && buf[14] == 0 && buf[15] == 36);
    CHECK((unsigned char)buf[16] == 0x20 && buf[17] == 0x01 && buf[31] == 1 && buf[47] == 1);
    CHECK((unsigned char)buf[48] == 0x04 && (unsigned char)buf[49] == 0xd2 && buf[51] == 80);

    addr_parse("[::ffff:127.0.0.1]:5000", &m, err, sizeof err); /* dual-stack listener */
    addr_parse("[::ffff:127.0.0.1]:80", &d, err, sizeof err);
    n = upstream_proxy_header(1, &m, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP4 127.0.0.1 127.0.0.1 5000 80\r\n");
    addr_parse("127.0.0.1:80", &d, err, sizeof err);
    n = upstream_proxy_header(1, &s, &d, buf); /* families differ */
    buf[n] = 0;
    STR_EQ(buf, "PROXY UNKNOWN\r\n");
    n = upstream_proxy_header(2, &s, &d, buf);
    CHECK(n == 16 && buf[13] == 0 && buf[15] == 0);
}

static void test_pacing(void)
{
    struct copier k = {0};
    uint64_t s = 1000000000ull, t0 = 50 * s;
    int rate = 256 * 1024;
    CHECK(copy_pace_wait(&k, t0) == 0); /* a fresh copier may start at once */
    copy_pace_spend(&k, t0, 32 * 1024, rate);
    CHECK(copy_pace_wait(&k, t0) == s / 8);   /* 32 KiB at 256 KiB/s: 1/8 s */
    copy_pace_spend(&k, t0, 32 * 1024, rate); /* spent early: the debt adds up */
    CHECK(copy_pace_wait(&k, t0) == s / 4);
    CHECK(copy_pace_wait(&k, t0 + s / 4) == 0);
    /* An idle minute earns no credit: the next chunk is charged from now. */
    copy_pace_spend(&k, t0 + 60 * s, 1024, rate);
    CHECK(copy_pace_wait(&k, t0 + 60 * s) == s / 256);
    /* 1 MiB in chunks of rate/8 takes (1 MiB - one chunk) / rate of waiting: 3.875 s. */
    struct copier m = {0};
    uint64_t now = 0;
    for (int sent = 0; sent < 1 << 20; sent += rate / 8) {
        now += copy_pace_wait(&m, now);
        copy_pace_spend(&m, now, (size_t)rate / 8, rate);
    }
    CHECK(now == 3 * s + 7 * s / 8);
    struct copier big = {0}; /* no overflow at the largest rate and buffer */
    copy_pace_spend(&big, 0, 64 << 20, 0x7fffffff);
    CHECK(copy_pace_wait(&big, 0) >= s / 32 && copy_pace_wait(&big, 0) < s / 31);
}

int main(void)
{
    int fd = mkstemp(ini_path);
    if (fd < 0) return 1;
    close(fd);
    run("config: every bad value, key and section gives its golden FILE:LINE message",
        test_config_golden_errors);
    run("config: values, suffixes, lists, continuation lines, defaults", test_config_values);
    run("addresses: parse, format, brackets, v4-mapped", test_addresses);
    run("cidr: parse and match, v4, v6, v4-mapped", test_cidr);
    run("source hash: stable, port-blind, spread", test_source_hash);
    run("PROXY protocol v1 and v2 headers are byte-exact", test_proxy_header);
    run("rate limit pacing arithmetic", test_pacing);
    unlink(ini_path);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
