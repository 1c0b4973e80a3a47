/* tests/unit.c — unit tests for the pure parts, bottom-up by layer: addresses and networks
 * (net.c); config values and errors against golden messages (config.c); the rate limiter's
 * arithmetic (copy.c); the source hash (upstream.c); the PROXY protocol header (tcp.c);
 * request and response heads with every smuggling shape, chunk sizes, trailers, authorities
 * and ports (http_parse.c); strict base64 and Basic credentials (auth.c).
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

static void run(const char *name, void (*fn)(void)) {
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

/* Loads text as a config file into c (freeing the lists of the one before); returns
 * config_load's result, message in err. */
static int load(const char *text, char *err, size_t len) {
    config_free(&c);
    FILE *f = fopen(ini_path, "w");
    fputs(text, f);
    fclose(f);
    err[0] = 0;
    return config_load(&c, ini_path, err, len);
}

static void test_config_golden_errors(void) {
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
        {"[proxy]\nupstream = 127.0.0.1:80\nmode = udp\n",
         "3: mode = 'udp': expected one of: tcp http"},
        {"[proxy]\nupstream = 127.0.0.1:80\ncopy = Splice\n",
         "3: copy = 'Splice': expected one of: splice buffer"},
        {"[proxy]\nupstream = 127.0.0.1:80\nsend_proxy = v3\n",
         "3: send_proxy = 'v3': expected one of: off v1 v2"},
        {"[proxy]\n[access]\nlocal_destinations = yes\n",
         "3: local_destinations = 'yes': expected one of: auto allow deny"},
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
        {"[proxy]\nmode = tcp\n", "1: [proxy] needs 'upstream = host:port' in tcp mode"},
        {"; comment\n\n[proxy]\nmode = tcp\n",
         "3: [proxy] needs 'upstream = host:port' in tcp mode"},
        {"[proxy]\nmode = tcp\nupstream = 127.0.0.1:80\n[users]\na = b\n",
         "5: [users] needs mode = http: tcp mode has no way to ask"}, /* the [users] line */
        {"[proxy]\nsend_proxy = v1\n", "2: send_proxy works in tcp mode only"},
        {"[users]\nalice = x\nalice = y\n", "3: user 'alice' is listed twice"},
        {"[access]\nconnect_ports = 443, 70000\n",
         "2: connect_ports: '70000' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[access]\nconnect_ports = 9-8\n",
         "2: connect_ports: '9-8' is not a port (1-65535), a range like 8000-8999, or *"},
        /* '*' is every port, but only alone: *-5 and *-junk were once read as '*'. */
        {"[access]\nconnect_ports = *-5\n",
         "2: connect_ports: '*-5' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[access]\nforward_ports = 80,\n  *-junk\n",
         "3: forward_ports: '*-junk' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[access]\nforward_ports = 1-2-3\n",
         "2: forward_ports: '1-2-3' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[access]\nforward_ports = 0-80\n",
         "2: forward_ports: '0-80' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[access]\nforward_ports = 5-\n",
         "2: forward_ports: '5-' is not a port (1-65535), a range like 8000-8999, or *"},
        {"[auth]\nrealm = a\"b\n",
         "2: realm = 'a\"b': empty, too long, or has a quote or backslash"},
        {"[access]\nallow = 10.0.0.0/8\nallow = 0.0.0.0/0\n",
         "3: 'allow' is set twice (first on line 2)"}, /* only indented lines go on */
        {"[proxy]\nmode = tcp\nlisten = 0.0.0.0:7000\nupstream = 127.0.0.1:7000\n",
         "4: upstream 127.0.0.1:7000 is this proxy's own listen address"},
        {"[proxy]\nmode = tcp\nlisten = [::]:7000\nupstream = 127.0.0.1:9, 127.0.0.1:7000\n",
         "4: upstream 127.0.0.1:7000 is this proxy's own listen address"},
        {"[proxy]\nheader_timeout = 0\n",
         "2: header_timeout = '0': expected a whole number from 1 to 3600"},
        {"[proxy]\nlisten = 127.0.0.1:9100\nupstream = 127.0.0.1:80\n[stats]\nlisten = "
         "0.0.0.0:9100\n",
         "5: [stats] listen must differ from the proxy's listen address"},
        {"[proxy]\nupstream = 127.0.0.1:80\nlog =\n",
         "3: log = '': empty, too long, or has a quote or backslash"},
        {"[proxy]\nupstream = 127.0.0.1:80\nidle_timeout = 99999999999999999999\n",
         "3: idle_timeout = '99999999999999999999': expected a whole number from 0 to 604800"},
        {"[access]\ndeny_destinations = example.com,\n  *.example.org\n",
         "3: deny_destinations: '*.example.org': write .example.org for a domain and every name "
         "under it"},
        {"[access]\nallow_destinations = exa mple.com\n",
         "2: allow_destinations: 'exa mple.com' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\ndeny_destinations = a..b\n",
         "2: deny_destinations: 'a..b' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\ndeny_destinations = [example.com]\n",
         "2: deny_destinations: '[example.com]' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\ndeny_destinations = 10.0.0\n",
         "2: deny_destinations: '10.0.0' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\nallow_destinations = *\n",
         "2: allow_destinations: '*' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\ndeny_destinations = 10.0.0.0/33\n",
         "2: deny_destinations: '10.0.0.0/33' is not a host name, a .domain or a network like "
         "10.0.0.0/8"},
        {"[access]\ntrusted_proxies = 10.0.0.0/8, nope\n",
         "2: trusted_proxies: 'nope' is not an address or network like 10.0.0.0/8"},
        {"[limits]\nexempt = ::1/129\n",
         "2: exempt: '::1/129' is not an address or network like 10.0.0.0/8"},
        {"[proxy]\nmax_connections = 2000\n[limits]\nclients = 1000\n",
         "4: [limits] clients = 1000 must be at least max_connections (2000): a client with "
         "connections open is never forgotten"},
        {"[limits]\nlimit_by = user\n",
         "2: limit_by = user needs [users]: without them no request has a user"},
        {"[limits]\nlimit_by = host\n", "2: limit_by = 'host': expected one of: address user"},
        {"[limits]\nrequests_per_second = 0\nrequest_burst = 5\n",
         "3: request_burst needs requests_per_second: a burst above which rate?"},
        {"[limits]\nconnections_per_client = -1\n",
         "2: connections_per_client = '-1': expected a whole number from 0 to 10000000"},
        {"[access]\nallow =\n", "2: empty item in list ''"},
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
    STR_EQ(err, "proxy: /nonexistent/proxy.ini: cannot open: No such file or directory (name "
                "the file with -c FILE)");
}

static void test_config_values(void) {
    char err[512];
    int rc = load("[proxy]\n"
                  "mode = tcp\n"
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
    CHECK(c.allow.n == 1); /* the file's list replaces the default */
    CHECK(c.stats_listen.len == 0);
    CHECK(c.listen.sa.ss_family == AF_INET6);

    /* 0.0.0.0 does not cover [::1]; the metrics may share a port with it. */
    CHECK(load("[proxy]\nlisten = 0.0.0.0:7001\n[stats]\nlisten = [::1]:7001\n", err, sizeof err) ==
          0);
    CHECK(load("[proxy]\nupstream = 127.0.0.1:80\n", err, sizeof err) == 0);
    CHECK(c.workers == 64 && c.queue == 1024 && c.copy == COPY_SPLICE && c.allow.n == 2);
    CHECK(c.time_slice == 50 && c.min_rate == 500 && c.head_buffers == 1024);
    CHECK(c.mode == MODE_HTTP && c.balance == BALANCE_SOURCE && c.idle_timeout == 300);
    CHECK(c.stats_listen.len != 0 && c.header_timeout == 10 && c.nusers == 0);
    /* Our own pacing must not look like a trickle: min_rate is at most half of rate_limit. */
    CHECK(load("[proxy]\nupstream = 127.0.0.1:80\nrate_limit = 200\n", err, sizeof err) == 0);
    CHECK(c.min_rate == 100);
    CHECK(load("[proxy]\nupstream = 127.0.0.1:80\nrate_limit = 4k\nmin_rate = 1k\n", err,
               sizeof err) == 0);
    CHECK(c.min_rate == 1024);
    CHECK(load("[proxy]\nupstream = 127.0.0.1:80\n", err, sizeof err) == 0);
    STR_EQ(c.realm, "proxy");
    STR_EQ(c.log, "-");
    CHECK(c.buffer_size == 65536 && c.rate_limit == 0 && c.connect_timeout == 5);
    CHECK(addr_port(&c.listen) == 8888 && addr_port(&c.stats_listen) == 9100);
    CHECK(c.connect_ports[443 / 8] == 1 << (443 % 8) && c.connect_ports[0] == 0);

    CHECK(load("[proxy]\n[access]\nconnect_ports = 8000-8002, 22\n[users]\nalice = s3cret ; c\n"
               "Bob = p=q\n",
               err, sizeof err) == 0);
    STR_EQ(err, "");
    CHECK(c.nup == 0 && c.nusers == 2);
    STR_EQ(c.users[0].name, "alice");
    STR_EQ(c.users[0].pass, "s3cret");
    STR_EQ(c.users[1].name, "Bob");
    STR_EQ(c.users[1].pass, "p=q");
    const uint8_t *ports = c.connect_ports;
    CHECK(ports_match(ports, 8000) && ports_match(ports, 8002));
    CHECK(ports_match(ports, 22) && !ports_match(ports, 443));
    CHECK(!ports_match(ports, 8003) && !ports_match(ports, 0));
    /* forward_ports defaults to squid's Safe_ports: no SSH, no SMTP, nothing privileged. */
    ports = c.forward_ports;
    CHECK(ports_match(ports, 80) && ports_match(ports, 443));
    CHECK(ports_match(ports, 1025) && ports_match(ports, 65535));
    CHECK(!ports_match(ports, 22) && !ports_match(ports, 25));
    CHECK(!ports_match(ports, 1024) && !ports_match(ports, 0));
    CHECK(load("[access]\nconnect_ports = *\nforward_ports = 8080\n", err, sizeof err) == 0);
    ports = c.connect_ports;
    CHECK(ports_match(ports, 1) && ports_match(ports, 65535));
    CHECK(!ports_match(ports, 65536) && !ports_match(ports, 0));
    ports = c.forward_ports; /* the file's list replaces the default */
    CHECK(ports_match(ports, 8080) && !ports_match(ports, 80));
    /* A list is the union of its items, so '*' beside others is still every port. */
    CHECK(load("[access]\nforward_ports = 80, *\n", err, sizeof err) == 0);
    CHECK(ports_match(c.forward_ports, 1) && ports_match(c.forward_ports, 65535));

    /* local_destinations = auto: allowed on loopback, denied on any other listen address. */
    static const struct {
        const char *listen, *value;
        int want, autos;
    } local[] = {
        {"127.0.0.1:1", "auto", LOCAL_ALLOW, 1}, {"127.0.0.2:1", "auto", LOCAL_ALLOW, 1},
        {"[::1]:1", "auto", LOCAL_ALLOW, 1},     {"[::ffff:127.0.0.1]:1", "auto", LOCAL_ALLOW, 1},
        {"0.0.0.0:1", "auto", LOCAL_DENY, 1},    {"[::]:1", "auto", LOCAL_DENY, 1},
        {"192.0.2.1:1", "auto", LOCAL_DENY, 1},  {"192.0.2.1:1", "allow", LOCAL_ALLOW, 0},
        {"127.0.0.1:1", "deny", LOCAL_DENY, 0},
    };
    for (size_t i = 0; i < sizeof local / sizeof local[0]; i++) {
        char ini[128];
        snprintf(ini, sizeof ini, "[proxy]\nlisten = %s\n[access]\nlocal_destinations = %s\n",
                 local[i].listen, local[i].value);
        CHECK(load(ini, err, sizeof err) == 0);
        CHECK(c.local_destinations == local[i].want && c.local_auto == local[i].autos);
    }
}

static void test_addresses(void) {
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

static int matches(const char *net, const char *ip) {
    struct cidr n;
    struct addr a;
    char err[128], hostport[80];
    snprintf(hostport, sizeof hostport, strchr(ip, ':') ? "[%s]:1" : "%s:1", ip);
    if (cidr_parse(net, &n) < 0 || addr_parse(hostport, &a, err, sizeof err) < 0) return -1;
    addr_unmap(&a); /* as the acceptor does */
    return cidr_match(&n, 1, &a);
}

static void test_cidr(void) {
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
    CHECK(matches("::ffff:10.0.0.0/104", "10.1.2.3") == 1); /* a mapped network is v4 too */
    CHECK(matches("::ffff:10.0.0.0/104", "11.1.2.3") == 0);
    CHECK(cidr_parse("10.0.0.0/", &n) == -1);
    CHECK(cidr_parse("10.0.0.0/-1", &n) == -1);
    CHECK(cidr_parse("10.0.0.0/129", &n) == -1);
    CHECK(cidr_parse("::/129", &n) == -1);
    CHECK(cidr_parse("10.0.0", &n) == -1);
    CHECK(cidr_parse("", &n) == -1);
}

static void test_source_hash(void) {
    struct addr a, b;
    char err[128];
    addr_parse("192.0.2.7:1000", &a, err, sizeof err);
    addr_parse("192.0.2.7:2000", &b, err, sizeof err);
    CHECK(upstream_hash(&a, 7) == upstream_hash(&b, 7)); /* the port does not matter */
    CHECK(upstream_hash(&a, 1000) == 214);               /* pinned: FNV-1a of 192.0.2.7 */
    addr_parse("[::ffff:192.0.2.7]:3000", &b, err, sizeof err);
    addr_unmap(&b);                                            /* as the acceptor does */
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

/* a parsed from "host:port" (numeric). */
static struct addr at(const char *s) {
    struct addr a = {0};
    char err[128];
    if (addr_parse(s, &a, err, sizeof err) < 0) printf("  bad address in a test: %s\n", s);
    return a;
}

static void test_local_addresses(void) {
    static const char *const local[] = {"127.0.0.1:1",
                                        "127.255.0.9:1",
                                        "0.0.0.0:1",
                                        "0.1.2.3:1",
                                        "169.254.169.254:80",
                                        "[::1]:1",
                                        "[::]:1",
                                        "[fe80::1]:1",
                                        "[febf::1]:1",
                                        "[::ffff:127.0.0.1]:1",
                                        "[::ffff:0.0.0.0]:1",
                                        "[::ffff:169.254.0.1]:1"};
    static const char *const remote[] = {"10.0.0.1:1",      "128.0.0.1:1", "169.255.0.1:1",
                                         "[2001:db8::1]:1", "[fec0::1]:1", "[::ffff:10.0.0.1]:1",
                                         "[::2]:1"};
    for (size_t i = 0; i < sizeof local / sizeof local[0]; i++) {
        struct addr a = at(local[i]);
        if (!addr_is_local(&a)) printf("  not local: %s\n", local[i]);
        CHECK(addr_is_local(&a));
    }
    for (size_t i = 0; i < sizeof remote / sizeof remote[0]; i++) {
        struct addr a = at(remote[i]);
        if (addr_is_local(&a)) printf("  local: %s\n", remote[i]);
        CHECK(!addr_is_local(&a));
    }
    struct addr lo = at("127.0.0.5:9"), doc = at("198.51.100.77:9");
    CHECK(net_owns(&lo));   /* all of 127/8 is this host's */
    CHECK(!net_owns(&doc)); /* a documentation address: nobody's */
}

static void test_own_listeners(void) {
    char err[512];
    CHECK(load("[proxy]\nlisten = 127.0.0.1:8888\n", err, sizeof err) == 0); /* auto: allow */
    memcpy(&cfg, &c, sizeof c);
    /* Listening on 127.0.0.1:8888 and [::1]:9100: those, and the addresses that reach them. */
    struct addr own[2] = {at("127.0.0.1:8888"), at("[::1]:9100")};
    upstream_own(own, 2);
    static const char *const us[] = {
        "127.0.0.1:8888",        "0.0.0.0:8888", "[::ffff:127.0.0.1]:8888",
        "[::ffff:0.0.0.0]:8888", "[::1]:9100",   "[::]:9100"};
    static const char *const others[] = {"127.0.0.1:8889", "127.0.0.2:8888", "[::1]:8888",
                                         "127.0.0.1:9100", "10.0.0.1:8888",  "0.0.0.0:9100"};
    for (size_t i = 0; i < sizeof us / sizeof us[0]; i++) {
        struct addr a = at(us[i]);
        if (upstream_reach(&cfg, &a, 0) == REACH_OK) printf("  allowed: %s\n", us[i]);
        CHECK(upstream_reach(&cfg, &a, 0) != REACH_OK);
    }
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        struct addr a = at(others[i]);
        if (upstream_reach(&cfg, &a, 0) != REACH_OK) printf("  refused: %s\n", others[i]);
        CHECK(upstream_reach(&cfg, &a, 0) == REACH_OK);
    }
    /* A wildcard listener is every address this host owns, on its port, in its families. */
    own[0] = at("0.0.0.0:8888");
    own[1] = at("[::]:9100");
    upstream_own(own, 2);
    static const char *const wild_us[] = {"127.0.0.9:8888", "0.0.0.0:8888", "127.0.0.9:9100",
                                          "[::1]:9100", "[::ffff:127.0.0.1]:9100"};
    static const char *const wild_others[] = {"[::1]:8888", "198.51.100.77:8888",
                                              "198.51.100.77:9100", "127.0.0.1:8887"};
    for (size_t i = 0; i < sizeof wild_us / sizeof wild_us[0]; i++) {
        struct addr a = at(wild_us[i]);
        if (upstream_reach(&cfg, &a, 0) == REACH_OK) printf("  allowed: %s\n", wild_us[i]);
        CHECK(upstream_reach(&cfg, &a, 0) != REACH_OK);
    }
    for (size_t i = 0; i < sizeof wild_others / sizeof wild_others[0]; i++) {
        struct addr a = at(wild_others[i]);
        if (upstream_reach(&cfg, &a, 0) != REACH_OK) printf("  refused: %s\n", wild_others[i]);
        CHECK(upstream_reach(&cfg, &a, 0) == REACH_OK);
    }
    /* deny: no local address, whatever the port; a remote one still goes. */
    cfg.local_destinations = LOCAL_DENY;
    struct addr a = at("127.0.0.1:80"), b = at("[fe80::1]:80"), d = at("198.51.100.77:80");
    CHECK(upstream_reach(&cfg, &a, 0) != REACH_OK && upstream_reach(&cfg, &b, 0) != REACH_OK &&
          upstream_reach(&cfg, &d, 0) == REACH_OK);
    upstream_own(own, 0);
}

static void test_upstream_fault(void) {
    CHECK(upstream_at_fault(ECONNREFUSED));
    CHECK(upstream_at_fault(ETIMEDOUT));
    CHECK(upstream_at_fault(EHOSTUNREACH));
    CHECK(upstream_at_fault(ENETUNREACH));
    CHECK(!upstream_at_fault(EMFILE));
    CHECK(!upstream_at_fault(ENFILE));
    CHECK(!upstream_at_fault(ENOBUFS));
    CHECK(!upstream_at_fault(ENOMEM));
    CHECK(!upstream_at_fault(EADDRNOTAVAIL)); /* no local port left: ours */
    CHECK(!upstream_at_fault(ECANCELED));     /* the connection ended: a stop */
}

static void test_proxy_header(void) {
    struct addr s, d, m;
    char err[128], buf[128];
    addr_parse("192.0.2.1:56324", &s, err, sizeof err);
    addr_parse("198.51.100.2:443", &d, err, sizeof err);
    int n = proxy_protocol_write(1, &s, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n");

    static const unsigned char v2_4[] = {0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49,
                                         0x54, 0x0a, 0x21, 0x11, 0x00, 0x0c, 192,  0,    2,    1,
                                         198,  51,   100,  2,    0xdc, 0x04, 0x01, 0xbb};
    n = proxy_protocol_write(2, &s, &d, buf);
    CHECK(n == (int)sizeof v2_4 && !memcmp(buf, v2_4, sizeof v2_4));

    addr_parse("[2001:db8::1]:1234", &s, err, sizeof err);
    addr_parse("[::1]:80", &d, err, sizeof err);
    n = proxy_protocol_write(1, &s, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP6 2001:db8::1 ::1 1234 80\r\n");
    n = proxy_protocol_write(2, &s, &d, buf);
    CHECK(n == 16 + 36 && buf[13] == 0x21 && buf[14] == 0 && buf[15] == 36);
    CHECK((unsigned char)buf[16] == 0x20 && buf[17] == 0x01 && buf[31] == 1 && buf[47] == 1);
    CHECK((unsigned char)buf[48] == 0x04 && (unsigned char)buf[49] == 0xd2 && buf[51] == 80);

    addr_parse("[::ffff:127.0.0.1]:5000", &m, err, sizeof err); /* dual-stack listener */
    addr_parse("[::ffff:127.0.0.1]:80", &d, err, sizeof err);
    addr_unmap(&m), addr_unmap(&d); /* as the acceptor and tcp_serve do */
    n = proxy_protocol_write(1, &m, &d, buf);
    buf[n] = 0;
    STR_EQ(buf, "PROXY TCP4 127.0.0.1 127.0.0.1 5000 80\r\n");
    addr_parse("127.0.0.1:80", &d, err, sizeof err);
    n = proxy_protocol_write(1, &s, &d, buf); /* families differ */
    buf[n] = 0;
    STR_EQ(buf, "PROXY UNKNOWN\r\n");
    n = proxy_protocol_write(2, &s, &d, buf);
    CHECK(n == 16 && buf[13] == 0 && buf[15] == 0);
}

static void test_pacing(void) {
    struct copier k = {0};
    uint64_t s = 1000000000ull, t0 = 50 * s;
    int rate = 256 * 1024;
    CHECK(copy_pace_delay(&k, t0) == 0); /* a fresh copier may start at once */
    copy_pace_spend(&k, t0, 32 * 1024, rate);
    CHECK(copy_pace_delay(&k, t0) == s / 8);  /* 32 KiB at 256 KiB/s: 1/8 s */
    copy_pace_spend(&k, t0, 32 * 1024, rate); /* spent early: the debt adds up */
    CHECK(copy_pace_delay(&k, t0) == s / 4);
    CHECK(copy_pace_delay(&k, t0 + s / 4) == 0);
    /* An idle minute earns no credit: the next chunk is charged from now. */
    copy_pace_spend(&k, t0 + 60 * s, 1024, rate);
    CHECK(copy_pace_delay(&k, t0 + 60 * s) == s / 256);
    /* 1 MiB in chunks of rate/8 takes (1 MiB - one chunk) / rate of waiting: 3.875 s. */
    struct copier m = {0};
    uint64_t now = 0;
    for (int sent = 0; sent < 1 << 20; sent += rate / 8) {
        now += copy_pace_delay(&m, now);
        copy_pace_spend(&m, now, (size_t)rate / 8, rate);
    }
    CHECK(now == 3 * s + 7 * s / 8);
    struct copier big = {0}; /* no overflow at the largest rate and buffer */
    copy_pace_spend(&big, 0, 64 << 20, 0x7fffffff);
    CHECK(copy_pace_delay(&big, 0) >= s / 32 && copy_pace_delay(&big, 0) < s / 31);
}

/* Parses a head; returns http_parse's status, 400 when http_head_end refused it, or -1 when
 * the head is incomplete. */
static struct msg m;
static int parse(const char *head, int request) {
    size_t scanned = 0, end, len = strlen(head);
    enum scan found = http_head_end(head, len, &scanned, &end);
    if (found == SCAN_MORE) return -1;
    if (found == SCAN_BAD) return 400;
    return http_parse(head, end, &m, request);
}

static void test_http_request_heads(void) {
    CHECK(parse("GET /a?b=c HTTP/1.1\r\nHost: x\r\nAccept:  */*  \r\n\r\n", 1) == 0);
    CHECK(m.mlen == 3 && m.tlen == 6 && m.version == 1 && m.nfields == 2 && m.length == -1);
    CHECK(m.host && m.field[1].vlen == 3 && !memcmp(m.field[1].value, "*/*", 3));
    CHECK(parse("GET http://h/ HTTP/1.0\r\n\r\n", 1) == 0 && m.version == 0 && m.close);
    CHECK(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 1) == 0 && !m.close);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: foo, close\r\n\r\n", 1) == 0 && m.close);
    CHECK(parse("POST / HTTP/1.1\r\nContent-Length: 0042\r\n\r\n", 1) == 0 && m.length == 42);
    CHECK(parse("POST / HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n", 1) == 0 && m.chunked);
    CHECK(parse("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 1) == 0 &&
          m.upgrade);
    CHECK(parse("GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n", 1) == 0 && !m.upgrade);
    CHECK(parse("GET / HTTP/1.1\r\nproxy-AUTHORIZATION: Basic x\r\n\r\n", 1) == 0 && m.nauth == 1);
    CHECK(parse("GET / HTTP/1.1\r\nEmpty:\r\n\r\n", 1) == 0 && m.field[0].vlen == 0);
    CHECK(parse("GET / HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n", 1) == 0); /* obs-text */
    CHECK(parse("GET / HTTP/1.1\r\n", 1) == -1);                      /* incomplete */

    static const struct {
        const char *head;
        int status;
    } bad[] = {
        {"/ HTTP/1.1\r\n\r\n", 400}, /* CVE-2022-40468 */
        {" / HTTP/1.1\r\n\r\n", 400},
        {"GET HTTP/1.1\r\n\r\n", 400}, /* no target */
        {"GET  / HTTP/1.1\r\n\r\n", 400},
        {"GET / HTTP/1.1 \r\n\r\n", 400},
        {"GET / http/1.1\r\n\r\n", 400},
        {"GET / HTTP/2.0\r\n\r\n", 505},
        {"GET /\x7f HTTP/1.1\r\n\r\n", 400},
        {"GET /\xc3\xa9 HTTP/1.1\r\n\r\n", 400},
        {"\r\nGET / HTTP/1.1\r\n\r\n", 400},
        {"GET / HTTP/1.1\nHost: x\r\n\r\n", 400},      /* bare LF */
        {"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n", 400}, /* bare CR */
        {"GET / HTTP/1.1\r\nHost: x\r\n\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length : 5\r\n\r\n", 400}, /* space before colon */
        {"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\n: x\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400}, /* obs-fold */
        {"GET / HTTP/1.1\r\nA: b\x01\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nA: b\x7f\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: +5\r\n\r\n", 400}, /* CVE-2020-15049 */
        {"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 5 5\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length:\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 1234567890123456789\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400},
        {"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400},
        {"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400}, /* 1.0: faulty */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int got = parse(bad[i].head, 1);
        if (got != bad[i].status) printf("  case %zu: got %d, want %d\n", i, got, bad[i].status);
        CHECK(got == bad[i].status);
    }
    char *NUL = "GET / HTTP/1.1\r\nA: b\0c\r\n\r\n"; /* strlen stops at the NUL: */
    size_t scanned = 0, end;
    CHECK(http_head_end(NUL, 28, &scanned, &end) == SCAN_BAD);

    /* CVE-2012-3505: a header flood is refused, not stored. */
    char flood[4096] = "GET / HTTP/1.1\r\n";
    for (int i = 0; i <= HTTP_MAX_FIELDS; i++) strcat(flood, "X: y\r\n");
    strcat(flood, "\r\n");
    CHECK(parse(flood, 1) == 431);
}

static void test_http_response_heads(void) {
    CHECK(parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 0) == 0);
    CHECK(m.status == 200 && m.length == 5);
    CHECK(parse("HTTP/1.1 204\r\n\r\n", 0) == 0 && m.status == 204);
    CHECK(parse("HTTP/1.0 200 \r\n\r\n", 0) == 0 && m.close);
    CHECK(parse("HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", 0) == 0);
    CHECK(parse("HTTP/1.1 20 OK\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 2000 OK\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/2 200 OK\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 0) ==
          502);
    /* A status below 100 is neither interim nor final. */
    CHECK(parse("HTTP/1.1 099 X\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 100 Continue\r\n\r\n", 0) == 0 && m.status == 100);
    /* Responses may repeat an identical Content-Length and put codings before chunked. */
    CHECK(parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", 0) == 0);
    CHECK(m.length == 5);
    CHECK(parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 0) == 0);
    CHECK(m.chunked);
    CHECK(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,chunked\r\n\r\n", 0) == 0);
    CHECK(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", 0) == 502);
    CHECK(parse("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0) == 502);
}

static void test_http_chunks_and_authority(void) {
    uint64_t n;
    CHECK(http_chunk_size("1a", 2, &n) == 0 && n == 26);
    CHECK(http_chunk_size("FFFFFFFFFFFFFFFF", 16, &n) == 0 && n == UINT64_MAX);
    CHECK(http_chunk_size("0000000000000001", 16, &n) == 0 && n == 1);
    CHECK(http_chunk_size("10000000000000000", 17, &n) == -1); /* over 16 digits */
    CHECK(http_chunk_size("00000000000000001", 17, &n) == -1); /* leading zeros count too */
    CHECK(http_chunk_size("5;name=value", 12, &n) == 0 && n == 5);
    CHECK(http_chunk_size("5 ;x", 4, &n) == 0 && n == 5);
    CHECK(http_chunk_size("", 0, &n) == -1);
    CHECK(http_chunk_size("-5", 2, &n) == -1);
    CHECK(http_chunk_size("+5", 2, &n) == -1);
    CHECK(http_chunk_size("0x5", 3, &n) == -1);
    CHECK(http_chunk_size("5g", 2, &n) == -1);
    CHECK(http_chunk_size("5;\x01", 3, &n) == -1);
    struct field f;
    CHECK(http_field("Expires: never", 14, &f) == 0 && f.vlen == 5);
    CHECK(http_field("Bad Name: x", 11, &f) == -1 && http_field("NoColon", 7, &f) == -1);

    char host[64];
    int port;
    CHECK(http_authority("example.com", 11, host, sizeof host, &port, 80) == 0 && port == 80);
    STR_EQ(host, "example.com");
    CHECK(http_authority("h:8080", 6, host, sizeof host, &port, 80) == 0 && port == 8080);
    CHECK(http_authority("[::1]:443", 9, host, sizeof host, &port, 0) == 0 && port == 443);
    STR_EQ(host, "::1");
    CHECK(http_authority("h:65979", 7, host, sizeof host, &port, 0) == -1); /* never 443 */
    CHECK(http_authority("h:0", 3, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("h:", 2, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("h:0000443", 9, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("h", 1, host, sizeof host, &port, 0) == -1); /* CONNECT needs a port */
    CHECK(http_authority("user@h:80", 9, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority(":80", 3, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("[::1", 4, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("[nothex]:1", 10, host, sizeof host, &port, 0) == -1);
    CHECK(http_authority("h:+80", 5, host, sizeof host, &port, 0) == -1);
}

static void test_base64_and_credentials(void) {
    unsigned char out[64];
    CHECK(auth_base64_decode("YWxpY2U6czNjcmV0", 16, out, sizeof out) == 12 &&
          !memcmp(out, "alice:s3cret", 12));
    CHECK(auth_base64_decode("YQ==", 4, out, sizeof out) == 1 && out[0] == 'a');
    CHECK(auth_base64_decode("YWI=", 4, out, sizeof out) == 2);
    CHECK(auth_base64_decode("YQ=", 3, out, sizeof out) == -1);  /* not whole quads */
    CHECK(auth_base64_decode("YR==", 4, out, sizeof out) == -1); /* pad bits set */
    CHECK(auth_base64_decode("YWJ=", 4, out, sizeof out) == -1);
    CHECK(auth_base64_decode("Y===", 4, out, sizeof out) == -1);
    CHECK(auth_base64_decode("=YWI", 4, out, sizeof out) == -1);
    CHECK(auth_base64_decode("YQ==YQ==", 8, out, sizeof out) == -1); /* padding mid-way */
    CHECK(auth_base64_decode("Y W=", 4, out, sizeof out) == -1);
    CHECK(auth_base64_decode("YW-_", 4, out, sizeof out) == -1); /* base64url */
    CHECK(auth_base64_decode("", 0, out, sizeof out) == -1);
    CHECK(auth_base64_decode("YWFhYWFh", 8, out, 5) == -1); /* would overflow out */

    char err[512], user[64];
    CHECK(load("[users]\nalice = s3cret\nbob = hunter2\n", err, sizeof err) == 0);
    memcpy(&cfg, &c, sizeof c);
    static const struct {
        const char *field;
        enum auth want;
    } cases[] = {
        {"Proxy-Authorization: Basic YWxpY2U6czNjcmV0", AUTH_OK},
        {"Proxy-Authorization: basic   YWxpY2U6czNjcmV0", AUTH_OK},
        {"Proxy-Authorization: Basic Ym9iOmh1bnRlcjI=", AUTH_OK},
        {"Proxy-Authorization: Basic YWxpY2U6czNjcmV1", AUTH_BAD},     /* alice:s3creu */
        {"Proxy-Authorization: Basic YWxpY2U6czNjcmV0eA==", AUTH_BAD}, /* alice:s3cretx */
        {"Proxy-Authorization: Basic YWxpY2U6", AUTH_BAD},             /* alice: */
        {"Proxy-Authorization: Basic Ym9iOnMzY3JldA==", AUTH_BAD},     /* bob:s3cret */
        {"Proxy-Authorization: Basic ZXZlOnMzY3JldA==", AUTH_BAD},     /* eve:s3cret */
        {"Proxy-Authorization: Basic YWxpY2Vz", AUTH_MALFORMED},       /* no colon */
        {"Proxy-Authorization: Basic YWxpY2U6czNjcmV0=", AUTH_MALFORMED},
        {"Proxy-Authorization: Bearer YWxpY2U6czNjcmV0", AUTH_MALFORMED},
        {"Proxy-Authorization: BasicYWxpY2U6czNjcmV0", AUTH_MALFORMED},
        {"Proxy-Authorization: Basic", AUTH_MALFORMED},
        {"X-Other: 1", AUTH_MISSING},
    };
    char head[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(head, sizeof head, "GET / HTTP/1.1\r\n%s\r\n\r\n", cases[i].field);
        CHECK(parse(head, 1) == 0);
        enum auth got = auth_check(&cfg, &m, user, sizeof user);
        if (got != cases[i].want) printf("  case %zu: got %s\n", i, auth_names[got]);
        CHECK(got == cases[i].want);
        if (got == AUTH_OK) CHECK(!strcmp(user, "alice") || !strcmp(user, "bob"));
        if (got != AUTH_OK) CHECK(user[0] == 0);
    }
    CHECK(parse("GET / HTTP/1.1\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n"
                "Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n",
                1) == 0);
    CHECK(auth_check(&cfg, &m, user, sizeof user) == AUTH_MALFORMED); /* sent twice */
    cfg.nusers = 0;
    CHECK(parse("GET / HTTP/1.1\r\n\r\n", 1) == 0 &&
          auth_check(&cfg, &m, user, sizeof user) == AUTH_OK);
}

/* Writes "Proxy-Authorization: Basic BASE64(cred)" into out. */
static void basic_field(const char *cred, char *out, size_t cap) {
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *in = (const unsigned char *)cred;
    size_t n = strlen(cred), o = (size_t)snprintf(out, cap, "Proxy-Authorization: Basic ");
    for (size_t i = 0; i < n && o + 5 < cap; i += 3) {
        uint32_t v =
            (uint32_t)in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        out[o++] = a[v >> 18 & 63];
        out[o++] = a[v >> 12 & 63];
        out[o++] = i + 1 < n ? a[v >> 6 & 63] : '=';
        out[o++] = i + 2 < n ? a[v & 63] : '=';
    }
    out[o] = 0;
}

/* auth_check compares every user without an early exit; these make sure that doing so still
 * finds exactly the right user, and nobody for a near miss. */
static void test_credentials_against_every_user(void) {
    static const struct {
        const char *cred, *user; /* user: who it authenticates, NULL: nobody */
    } cases[] = {
        {"alice:s3cret", "alice"},
        {"al:pw1", "al"},            /* a name that is a prefix of another */
        {"carol:s3cret", "carol"},   /* alice's password, but carol's too */
        {"dave:a:b", "dave"},        /* a password with a colon */
        {"al:s3cret", NULL},         /* the prefix user, the longer user's password */
        {"alice:pw1", NULL},         /* the longer user, the prefix user's password */
        {"alic:s3cret", NULL},       /* a name one short */
        {"alicex:s3cret", NULL},     /* a name one long */
        {"alice:s3cre", NULL},       /* a password one short */
        {"alice:s3crett", NULL},     /* a password one long */
        {"alice:S3cret", NULL},      /* case matters */
        {"alice:", NULL},            /* an empty password */
        {":s3cret", NULL},           /* an empty name */
        {":", NULL},                 /* both empty */
        {"eve:s3cret", NULL},        /* no such user */
        {"dave:a", NULL},            /* the password up to its colon */
        {"alice:s3cretalice", NULL}, /* the password repeated */
        {"alicealice:s3cret", NULL}, /* the name repeated */
    };
    char err[512], user[64], field[256], head[512];
    CHECK(load("[users]\nalice = s3cret\nal = pw1\ncarol = s3cret\ndave = a:b\n", err,
               sizeof err) == 0);
    STR_EQ(err, "");
    memcpy(&cfg, &c, sizeof c);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        basic_field(cases[i].cred, field, sizeof field);
        snprintf(head, sizeof head, "GET / HTTP/1.1\r\n%s\r\n\r\n", field);
        CHECK(parse(head, 1) == 0);
        enum auth got = auth_check(&cfg, &m, user, sizeof user);
        enum auth want = cases[i].user ? AUTH_OK : AUTH_BAD;
        if (got != want) printf("  '%s': got %s\n", cases[i].cred, auth_names[got]);
        CHECK(got == want);
        STR_EQ(user, cases[i].user ? cases[i].user : "");
    }
    cfg.nusers = 0;
}

/* Reading a PROXY header: what the writer writes reads back; a prefix asks for more; anything
 * else is refused, never guessed. */
static void test_proxy_header_read(void) {
    struct addr s, d, got, keep;
    char err[128], buf[1100];
    size_t used;
    char a[64];
    addr_parse("192.0.2.1:56324", &s, err, sizeof err);
    addr_parse("198.51.100.2:443", &d, err, sizeof err);
    addr_parse("10.9.9.9:1", &keep, err, sizeof err);
    for (int v = 1; v <= 2; v++) {
        int n = proxy_protocol_write(v, &s, &d, buf);
        memcpy(buf + n, "GET", 3); /* the client's own bytes follow */
        for (int len = 1; len < n; len++)
            CHECK(proxy_protocol_parse(buf, (size_t)len, &got, &used) == 0);
        got = keep;
        CHECK(proxy_protocol_parse(buf, (size_t)n + 3, &got, &used) == 1 && used == (size_t)n);
        STR_EQ(addr_format(&got, a, sizeof a), "192.0.2.1:56324");
    }
    addr_parse("[2001:db8::1]:1234", &s, err, sizeof err);
    addr_parse("[::1]:80", &d, err, sizeof err);
    for (int v = 1; v <= 2; v++) {
        int n = proxy_protocol_write(v, &s, &d, buf);
        CHECK(proxy_protocol_parse(buf, (size_t)n, &got, &used) == 1 && used == (size_t)n);
        STR_EQ(addr_format(&got, a, sizeof a), "[2001:db8::1]:1234");
    }
    /* UNKNOWN, and v2's LOCAL (a balancer's health check): the connection's own address. */
    static const char *const keeps[] = {"PROXY UNKNOWN\r\n", "PROXY UNKNOWN ffff::1 ::1 1 2\r\n",
                                        "\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"};
    for (size_t i = 0; i < sizeof keeps / sizeof keeps[0]; i++) {
        size_t n = i == 2 ? 16 : strlen(keeps[i]);
        got = keep;
        CHECK(proxy_protocol_parse(keeps[i], n, &got, &used) == 1 && used == n);
        STR_EQ(addr_format(&got, a, sizeof a), "10.9.9.9:1");
    }
    static const char *const bad[] = {
        "GET / HTTP/1.1\r\n",
        "PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",       /* no CR */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 70000\r\n", /* no such port */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",   /* one too many */
        "PROXY TCP4 ::1 ::1 1 2\r\n",             /* not IPv4 */
        "PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",     /* not IPv6 */
        "PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        "PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",     /* a sign is no digit */
        "PROXY TCP4 1.2.3.4 5.6.7.8 1 000080\r\n", /* six digits */
        "PROXY TCP4 1.2.3.4 ::1 1 2\r\n",          /* the destination's family differs */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(proxy_protocol_parse(bad[i], strlen(bad[i]), &got, &used) == -1);
    memset(buf, 'x', 200); /* a line that never ends within 107 bytes */
    memcpy(buf, "PROXY ", 6);
    CHECK(proxy_protocol_parse(buf, 200, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x11\x11\x00\x0c", 16); /* version 1 in a v2 header */
    CHECK(proxy_protocol_parse(buf, 28, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c", 16); /* command 2 */
    CHECK(proxy_protocol_parse(buf, 28, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c", 16); /* UDP over TCP */
    CHECK(proxy_protocol_parse(buf, 28, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04", 16); /* too short for TCP4 */
    CHECK(proxy_protocol_parse(buf, 20, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x21\x11\x04\x01", 16); /* 1025 bytes of body */
    CHECK(proxy_protocol_parse(buf, 16, &got, &used) == -1);
    memcpy(buf, "\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x20", 16); /* TLVs after the addresses */
    memset(buf + 16, 1, 32);
    CHECK(proxy_protocol_parse(buf, 48, &got, &used) == 1 && used == 48);
}

/* Destination names: exact or .suffix, any case, a trailing dot ignored; a large set. */
static void test_destination_names(void) {
    struct names l = {0};
    CHECK(names_add(&l, "Example.COM.") == 0 && names_add(&l, ".corp.example") == 0);
    CHECK(names_add(&l, "") == -1);
    CHECK(names_match(&l, "example.com") && names_match(&l, "EXAMPLE.com.") &&
          !names_match(&l, "www.example.com") && !names_match(&l, "example.co") &&
          !names_match(&l, "xexample.com"));
    CHECK(names_match(&l, "corp.example") && names_match(&l, "a.b.Corp.Example.") &&
          !names_match(&l, "xcorp.example") && !names_match(&l, "example"));
    char name[64];
    for (int i = 0; i < 10000; i++) {
        snprintf(name, sizeof name, "host%d.example.net", i);
        CHECK(names_add(&l, name) == 0);
    }
    CHECK(l.n == 10002 && l.mask + 1 >= 2 * 10002);
    CHECK(names_match(&l, "host9999.example.net") && !names_match(&l, "host10000.example.net") &&
          !names_match(&l, "example.net"));
    names_free(&l);
    CHECK(!names_match(&l, "example.com"));
}

/* The destination rules on addresses: our listeners, denied networks, allowed ones, and an
 * allowed name whose addresses need not be. */
static void test_destination_networks(void) {
    char err[512];
    CHECK(load("[access]\ndeny_destinations = 10.0.0.0/8, [2001:db8::]/32, .bad.example\n"
               "allow_destinations = 192.0.2.0/24, 10.1.0.0/16, good.example\n",
               err, sizeof err) == 0);
    CHECK(c.deny_destinations.nets.n == 2 && c.deny_destinations.names.n == 1 &&
          c.allow_destinations.nets.n == 2 && c.allow_destinations.names.n == 1);
    struct addr in = at("192.0.2.9:443"), denied = at("10.1.2.3:443"), v6 = at("[2001:db8::5]:80"),
                other = at("198.51.100.1:80");
    CHECK(upstream_reach(&c, &in, 0) == REACH_OK);
    CHECK(upstream_reach(&c, &denied, 0) == REACH_DENIED); /* deny before allow */
    CHECK(upstream_reach(&c, &denied, 1) == REACH_DENIED); /* an allowed name, too */
    CHECK(upstream_reach(&c, &v6, 0) == REACH_DENIED);
    CHECK(upstream_reach(&c, &other, 0) == REACH_NOT_ALLOWED);
    CHECK(upstream_reach(&c, &other, 1) == REACH_OK); /* allowed by its name */
    config_free(&c);
}

/* The per-client table: the connection cap, GCRA's rate and burst, IPv6 by /64, exempt
 * networks, users, and forgetting only the least recently seen without connections open. */
static void test_limits(void) {
    char err[512];
    int e[8];
    /* Left out, the table grows to hold max_connections; set, it must. */
    CHECK(load("[proxy]\nmax_connections = 70000\n", err, sizeof err) == 0 && c.clients == 70000);
    config_free(&c);
    CHECK(load("[proxy]\nmax_connections = 4\n[limits]\nclients = 4\nconnections_per_client = 2\n"
               "requests_per_second = 1\nrequest_burst = 2\nexempt = 127.0.0.9\n",
               err, sizeof err) == 0);
    CHECK(limits_start(4) == 0);
    struct addr a = at("192.0.2.1:1"), a2 = at("192.0.2.1:2"), b = at("[2001:db8:0:1::1]:1"),
                b2 = at("[2001:db8:0:1:ffff::9]:2"), b3 = at("[2001:db8:0:2::1]:1"),
                ex = at("127.0.0.9:1");
    CHECK(limits_admit(&c, &a, 0, &e[0]) == -1 && e[0] >= 0);
    CHECK(limits_admit(&c, &a2, 0, &e[1]) == -1 && e[1] == e[0]); /* any port: one client */
    CHECK(limits_admit(&c, &a, 0, &e[2]) == REFUSED_PER_CLIENT && e[2] == -1);
    limits_leave(e[1]);
    CHECK(limits_admit(&c, &a, 0, &e[1]) == -1);
    CHECK(limits_admit(&c, &b, 0, &e[3]) == -1 && limits_admit(&c, &b2, 0, &e[4]) == -1 &&
          e[3] == e[4]); /* one /64 */
    CHECK(limits_admit(&c, &b2, 0, &e[5]) == REFUSED_PER_CLIENT);
    CHECK(limits_admit(&c, &b3, 0, &e[5]) == -1 && e[5] != e[3]);
    for (int i = 0; i < 10; i++) CHECK(limits_admit(&c, &ex, 0, &e[6]) == -1 && e[6] == -1);
    /* Burst 2 at 1/s: three at once, then the fourth waits a second. */
    CHECK(limits_request(&c, &b3, NULL) == 0 && limits_request(&c, &b3, "") == 0 &&
          limits_request(&c, &b3, NULL) == 0);
    CHECK(limits_request(&c, &b3, NULL) == 1);
    CHECK(limits_request(&c, &ex, NULL) == 0);
    /* Three clients hold connections; a user fills the fourth entry. */
    c.limit_by = LIMIT_BY_USER;
    for (int i = 0; i < 3; i++) CHECK(limits_request(&c, &a, "alice") == 0);
    CHECK(limits_request(&c, &a, "alice") == 1 && limits_request(&c, &a, "bob") == 0);
    CHECK(atomic_load(&stats.clients) == 4);
    /* bob took alice's entry (the least recently seen without connections): alice starts
     * afresh; the clients with connections were never forgotten. */
    CHECK(atomic_load(&stats.clients_forgotten) == 1);
    CHECK(limits_request(&c, &a, "alice") == 0);
    CHECK(limits_admit(&c, &a, 0, &e[7]) == REFUSED_PER_CLIENT);
    CHECK(atomic_load(&stats.limited[LIMIT_CONNECTIONS]) == 3 &&
          atomic_load(&stats.limited[LIMIT_RATE]) == 2);
    config_free(&c);
}

int main(void) {
    int fd = mkstemp(ini_path);
    if (fd < 0) return 1;
    close(fd);
    run("config: every bad value, key and section gives its golden FILE:LINE message",
        test_config_golden_errors);
    run("config: values, suffixes, lists, continuation lines, defaults", test_config_values);
    run("addresses: parse, format, brackets, v4-mapped", test_addresses);
    run("cidr: parse and match, v4, v6, v4-mapped", test_cidr);
    run("source hash: stable, port-blind, spread", test_source_hash);
    run("addresses: loopback, link-local, unspecified; this host's own", test_local_addresses);
    run("upstream: never to our own listeners; local_destinations = deny", test_own_listeners);
    run("upstream: our shortages never mark an upstream down", test_upstream_fault);
    run("PROXY protocol v1 and v2 headers are byte-exact", test_proxy_header);
    run("PROXY protocol headers read back; prefixes wait, anything else is refused",
        test_proxy_header_read);
    run("destination names: exact, .suffix, case, trailing dot, 10,000 of them",
        test_destination_names);
    run("destination networks: deny before allow, allowed names", test_destination_networks);
    run("limits: connections, rate and burst, /64, exempt, users, forgetting", test_limits);
    run("rate limit pacing arithmetic", test_pacing);
    run("http: request heads, strict framing, the CVE shapes", test_http_request_heads);
    run("http: response heads", test_http_response_heads);
    run("http: chunk sizes, trailers, authorities and ports", test_http_chunks_and_authority);
    run("auth: strict base64, Basic credentials, constant-time check", test_base64_and_credentials);
    run("auth: every user compared; the right one found, near misses refused",
        test_credentials_against_every_user);
    unlink(ini_path);
    printf("%d passed, %d failed\n", passed, failed);
    return failed != 0;
}
