"""tests/test_http_dial.py — how http mode dials: connect_timeout is one deadline for a name's
resolution and all its addresses; a stop ends a connect or a name lookup in progress, so
SIGTERM is never held past the grace period by a black-holed upstream or a slow resolver;
requests never reach the proxy's own listeners; [access] local_destinations.

Names with several addresses and names that resolve slowly come from a small getaddrinfo shim
(FAKE_DNS below) preloaded into the proxy: the machine's resolver cannot be told to do either,
and every address the shim hands out is on loopback. Every test name starts with test_http_."""
import os
import re
import signal
import subprocess
import time

from lib import PROXY, TMP, Proxy, Server, blackhole, closed_port, echo_handler, recv_all, write_ini
from test_http import (ESTABLISHED, Client, Reader, assert_error, http_proxy, origin, request,
                       url, wait_for)

GRACE_SECONDS = 10  # proxy.h

# ---- a resolver the test controls -------------------------------------------------------

FAKE_DNS = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

/* slow.test: sleeps FAKE_DNS_SLOW seconds, then does not resolve. many.test: the addresses of
 * FAKE_DNS_MANY ("ip port,ip port,..."), in that order, whatever port was asked for. Anything
 * else, and any numeric-only lookup, goes to the real getaddrinfo. */
int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
                struct addrinfo **res) {
    gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    const char *many = getenv("FAKE_DNS_MANY"), *slow = getenv("FAKE_DNS_SLOW");
    int numeric = hints && (hints->ai_flags & AI_NUMERICHOST);
    if (!node || numeric) return real(node, service, hints, res);
    if (slow && !strcmp(node, "slow.test")) {
        sleep((unsigned)atoi(slow));
        return EAI_AGAIN;
    }
    if (!many || strcmp(node, "many.test")) return real(node, service, hints, res);
    char list[512], *save = NULL;
    struct addrinfo *first = NULL, **tail = &first;
    struct addrinfo numeric_hints = {.ai_socktype = SOCK_STREAM,
                                     .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    strncpy(list, many, sizeof list - 1);
    list[sizeof list - 1] = 0;
    for (char *item = strtok_r(list, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        char ip[64], port[8];
        struct addrinfo *one;
        if (sscanf(item, " %63s %7s", ip, port) != 2) return EAI_FAIL;
        if (real(ip, port, &numeric_hints, &one)) return EAI_FAIL;
        *tail = one;
        while (*tail) tail = &(*tail)->ai_next;
    }
    *res = first;
    return first ? 0 : EAI_NONAME;
}
"""


def fake_dns():
    """Builds the shim once; returns its path."""
    lib = os.path.join(TMP, "fake_dns.so")
    if not os.path.exists(lib):
        src = os.path.join(TMP, "fake_dns.c")
        with open(src, "w") as f:
            f.write(FAKE_DNS)
        subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", lib, src, "-ldl"], check=True,
                       capture_output=True, timeout=60)
    return lib


def with_fake_dns(many=None, slow=None):
    """A preexec_fn that preloads the shim into the proxy with what it should answer."""
    lib = fake_dns()

    def preexec():
        os.environ["LD_PRELOAD"] = lib
        # A sanitizer build wants its runtime first among the libraries; the shim is not
        # instrumented and only forwards, so the order does not matter here.
        os.environ["ASAN_OPTIONS"] = os.environ.get("ASAN_OPTIONS", "") + \
            ":verify_asan_link_order=0"
        if many:
            os.environ["FAKE_DNS_MANY"] = ",".join("%s %d" % a for a in many)
        if slow:
            os.environ["FAKE_DNS_SLOW"] = str(slow)
    return preexec


def host_port(addr):
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def dial_proxy(upstream=None, ports="*", local=None, preexec_fn=None, **keys):
    """An http-mode proxy without users, CONNECT to any port, local_destinations as asked."""
    access = {"connect_ports": ports}
    if local:
        access["local_destinations"] = local
    keys.setdefault("header_timeout", 5)
    return Proxy(upstream, mode="http", sections={"access": access}, preexec_fn=preexec_fn,
                 **keys)


def answer(c, timeout):
    """What the client gets: its bytes up to the close, or b'' on a reset."""
    c.sock.settimeout(timeout)
    try:
        return c.r.buf + recv_all(c.sock)
    except ConnectionResetError:
        return b""


# ThreadSanitizer sleeps a second at exit (its atexit_sleep_ms) to catch threads still running.
EXIT_SLEEP = 1.0 if "/tsan/" in PROXY else 0.0


def stop_within(px, limit):
    """SIGTERM; the proxy must exit 0 within limit seconds (and a sanitizer's own sleep at
    exit). Returns how long it took."""
    limit += EXIT_SLEEP
    start = time.monotonic()
    px.signal(signal.SIGTERM)
    try:
        rc = px.p.wait(limit + 30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the proxy did not stop within %.0f s of SIGTERM" % (limit + 30))
    took = time.monotonic() - start
    assert rc == 0, "exit status %d" % rc
    assert took < limit, "SIGTERM took %.1f s, more than %.1f s" % (took, limit)
    return took


def busy(px, n, timeout=10):
    """Waits until n workers are busy: the requests are in, their connects under way."""
    deadline = time.monotonic() + timeout
    while px.metric("proxy_workers_busy") != n:
        assert time.monotonic() < deadline, "workers busy: %s" % px.metric("proxy_workers_busy")
        time.sleep(0.05)


# ---- bounded connects --------------------------------------------------------------------

def test_http_sigterm_during_blackholed_connects_stops_within_the_grace_period():
    """CONNECT and absolute-form (upstream_dial) and origin-form to a configured upstream
    (upstream_open), each connecting to a black hole with connect_timeout = 25: before, SIGTERM
    waited out the 25 s connect, past the 10 s grace period."""
    hole, keep = blackhole()
    with dial_proxy(hole, connect_timeout=25) as px:
        clients = []
        for req in (request("CONNECT", hole, "Host: " + hole),
                    request("GET", "http://%s/" % hole, "Host: h"),
                    request("GET", "/", "Host: h")):
            c = Client(px, timeout=60)
            c.send(req)
            clients.append(c)
        busy(px, 3)
        took = stop_within(px, GRACE_SECONDS + 1)
        for c in clients:  # the close, or our error page: never a wait
            got = answer(c, 5)
            assert got == b"" or got.startswith(b"HTTP/1.1 5"), got[:80]
        assert "is down" not in px.text(), "a stop marked the upstream down:\n" + px.text()
        print("     SIGTERM during 3 black-holed connects: exit after %.1f s" % took)
    for k in keep:
        k.close()


def test_http_connect_timeout_is_one_deadline_for_every_address_of_a_name():
    """many.test has three black-holed addresses: before, each had the whole connect_timeout
    (9 s for 3); now the three share it."""
    hole, keep = blackhole()
    three = [host_port(hole)] * 3
    with dial_proxy(connect_timeout=3, preexec_fn=with_fake_dns(many=three)) as px:
        for req in (request("GET", "http://many.test/", "Host: h"),
                    request("CONNECT", "many.test:443", "Host: many.test:443")):
            start = time.monotonic()
            resp = Client(px, timeout=30).ask(req)
            took = time.monotonic() - start
            assert_error(resp, 504, "Gateway Timeout")
            assert took < 6.5, "%.1f s for a 3 s connect_timeout" % took
    for k in keep:
        k.close()


def test_http_a_name_whose_first_addresses_fail_still_connects_within_connect_timeout():
    """many.test: a refused address, a black-holed one, then the origin. The black hole gets a
    share of the deadline, not all of it, so the origin is reached within connect_timeout."""
    hole, keep = blackhole()
    with origin() as o:
        addrs = [("::1", closed_port()), host_port(hole), host_port(o.addr)]
        with dial_proxy(connect_timeout=8, preexec_fn=with_fake_dns(many=addrs)) as px:
            start = time.monotonic()
            resp = Client(px, timeout=30).ask(request("GET", "http://many.test/x", "Host: h"))
            took = time.monotonic() - start
            assert resp.status == 200 and resp.body == b"origin /x", resp.head
            assert took < 7, "%.1f s: the black hole took the whole connect_timeout" % took
    for k in keep:
        k.close()


def test_http_a_slow_name_lookup_ends_at_connect_timeout_and_does_not_hold_sigterm():
    """slow.test takes 60 s to fail. A lookup is part of the connect: 504 at connect_timeout;
    and a stop abandons it (the process exits while the lookup still runs)."""
    with dial_proxy(connect_timeout=2, preexec_fn=with_fake_dns(slow=60)) as px:
        for req in (request("GET", "http://slow.test/", "Host: h"),
                    request("CONNECT", "slow.test:443", "Host: slow.test:443")):
            start = time.monotonic()
            resp = Client(px, timeout=30).ask(req)
            took = time.monotonic() - start
            assert_error(resp, 504, "Gateway Timeout")
            assert took < 8, "%.1f s for a 2 s connect_timeout" % took
        resp = Client(px).ask(request("GET", "http://127.0.0.1:%d/" % closed_port(), "Host: h"))
        assert_error(resp, 502, "Bad Gateway")  # numeric hosts never wait for a lookup
    with dial_proxy(connect_timeout=25, preexec_fn=with_fake_dns(slow=60)) as px:
        c = Client(px, timeout=60)
        c.send(request("GET", "http://slow.test/", "Host: h"))
        busy(px, 1)
        took = stop_within(px, GRACE_SECONDS + 1)
        got = answer(c, 5)
        assert got == b"" or got.startswith(b"HTTP/1.1 5"), got[:80]
        print("     SIGTERM during a 60 s lookup: exit after %.1f s" % took)


# ---- dials wait parked while others wait for a worker --------------------------------------

def dialling_now(px):
    """Connections on a worker or parked, none queued."""
    m = px.metrics()
    if m.get("proxy_queue_length"):
        return -1
    return m.get("proxy_workers_busy", 0) + m.get("proxy_connections_parked", 0)


def test_http_black_holed_connects_and_slow_lookups_do_not_pin_the_pool():
    """Two workers, five requests dialling: two CONNECTs and a GET to a black hole, two GETs to
    a name whose lookup takes 30 s. A request to a live origin behind them is answered at once:
    each dial leaves its worker while others wait, and waits parked. Each of the five still gets
    its 504 at connect_timeout, from the waiting room's deadline. Before, the first two held
    both workers for the whole connect_timeout."""
    hole, keep = blackhole()
    with origin() as o, dial_proxy(connect_timeout=8, workers=2,
                                   preexec_fn=with_fake_dns(slow=30)) as px:
        dialling = []
        for req in (request("CONNECT", hole, "Host: " + hole),
                    request("GET", "http://%s/" % hole, "Host: h"),
                    request("CONNECT", hole, "Host: " + hole),
                    request("GET", "http://slow.test/", "Host: h"),
                    request("GET", "http://slow.test/x", "Host: h")):
            c = Client(px, timeout=30)
            c.send(req)
            dialling.append(c)
        # Every dial under way, on a worker or parked (all five may park: a dial leaves while
        # any other connection waits, and a new one waits for a moment before its bytes come).
        wait_for("the five dials", lambda: dialling_now(px) == 5)
        start = time.monotonic()
        resp = Client(px).ask(request("GET", url(o, "/live"), "Host: h"))
        took = time.monotonic() - start
        assert resp.status == 200 and resp.body == b"origin /live", resp.head
        assert took < 4, "a live request waited %.1f s behind five dials" % took
        for c in dialling:
            assert_error(c.response(), 504, "Gateway Timeout")
            c.sock.close()  # else its worker lingers 2 s for the client to close (drain_client)
        took = time.monotonic() - start
        assert took < 8 + 6, "%.1f s for connect_timeout = 8" % took
        assert "is down" not in px.text(), px.text()
    for k in keep:
        k.close()


def test_http_a_dial_that_waited_parked_carries_its_request_whole_and_counts_it_once():
    """One worker. A POST with a body, and a GET pipelined behind it, to a black hole; a request
    to a live origin makes the dial leave the worker, with the bytes read so far. Then the black
    hole's queue is emptied and the connect completes in the waiting room: the POST arrives
    upstream whole, the GET after it on the same connection, both answers come back in order,
    and the POST is counted and logged once, though it was handled twice."""
    hole, keep = blackhole()
    listener = keep[0]
    body = bytes(range(256)) * 4
    with origin() as o, dial_proxy(connect_timeout=30, workers=1) as px:
        a = Client(px, timeout=30)
        a.send(request("POST", "http://%s/first" % hole, "Host: h",
                       "Content-Length: %d" % len(body), body=body) +
               request("GET", "http://%s/second" % hole, "Host: h"))
        busy(px, 1)
        resp = Client(px).ask(request("GET", url(o, "/live"), "Host: h", "Connection: close"))
        assert resp.status == 200, resp.head
        wait_for("the dial to wait parked", lambda: px.metric("proxy_connections_parked") == 1)
        for k in keep[1:]:  # the black hole's own clients go; its queue empties
            k.close()
        listener.settimeout(20)
        while True:  # the queued connection first, then the proxy's, at its next SYN
            up, _ = listener.accept()
            up.settimeout(10)
            r = Reader(up)
            try:
                head = r.until(b"\r\n\r\n")
                break
            except (ConnectionError, AssertionError, EOFError):
                up.close()
        assert head.startswith(b"POST /first HTTP/1.1\r\n"), head
        assert r.exactly(len(body)) == body
        up.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        head = r.until(b"\r\n\r\n")
        assert head.startswith(b"GET /second HTTP/1.1\r\n"), head
        up.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
        for want in (b"first", b"second"):
            resp = a.response()
            assert resp.status == 200 and resp.body == want, (resp.head, resp.body)
        # The log line follows the answer (and the log reaches us through a pipe): wait for it.
        wait_for("the POST's log line", lambda: " POST " in px.text())
        posts = [l for l in px.text().splitlines() if " POST " in l]
        assert len(posts) == 1 and " 200 " in posts[0], posts
        assert px.metric('proxy_http_requests_total{method="POST"}') == 1
        up.close()
    listener.close()


# ---- never the proxy's own listeners; local destinations ---------------------------------

def refused(px, target):
    """Asks for target by CONNECT and by absolute-form GET: both must get our 403."""
    for req in (request("CONNECT", target, "Host: " + target),
                request("GET", "http://%s/metrics" % target, "Host: h")):
        c = Client(px)
        assert_error(c.ask(req), 403, "Forbidden")
        assert c.closed(), target


def test_http_the_admin_listener_is_not_reachable_through_the_proxy():
    """Before, GET http://127.0.0.1:ADMIN/metrics through the proxy returned the metrics."""
    with dial_proxy() as px:
        port = px.metrics_addr[1]
        for target in ("127.0.0.1:%d", "localhost:%d", "[::ffff:127.0.0.1]:%d", "0.0.0.0:%d",
                       "127.1:%d"):
            refused(px, target % port)
        assert px.metric("proxy_http_tunnels_total") == 0


def test_http_the_proxy_own_port_is_refused_without_connecting_to_itself():
    """Before, GET http://localhost:PORT/ went round through the proxy (508 from the inner
    hop) and CONNECT localhost:PORT opened a tunnel to itself."""
    with dial_proxy() as px:
        port = px.addr[1]
        targets = ("localhost:%d", "127.0.0.1:%d", "[::ffff:127.0.0.1]:%d", "0.0.0.0:%d")
        for target in targets:
            refused(px, target % port)
        # Only the test's own clients were accepted: the proxy never connected to itself.
        assert px.metric("proxy_connections_accepted_total") == 2 * len(targets)


def test_http_local_destinations_deny_refuses_loopback_and_allow_permits_it():
    with origin() as o, Server(echo_handler) as echo:
        oport, eport = host_port(o.addr)[1], echo.port
        with dial_proxy(o.addr, local="deny") as px:
            for target in ("127.0.0.1:%d", "localhost:%d", "127.0.0.2:%d", "[::1]:%d",
                           "[::ffff:127.0.0.1]:%d", "0.0.0.0:%d", "[::]:%d"):
                refused(px, target % oport)
                refused(px, target % eport)
            assert (o.conns, echo.conns) == (0, 0), "a denied destination was connected"
            # Origin-form goes to the configured upstream: the operator chose it.
            resp = Client(px).ask(request("GET", "/configured", "Host: h"))
            assert resp.status == 200 and resp.body == b"origin /configured", resp.head
        with dial_proxy(local="allow") as px:
            resp = Client(px).ask(request("GET", url(o, "/allowed"), "Host: h"))
            assert resp.status == 200 and resp.body == b"origin /allowed", resp.head
            resp = Client(px).ask(request("GET", "http://localhost:%d/by-name" % oport, "Host: h"))
            assert resp.status == 200 and resp.body == b"origin /by-name", resp.head
            c = Client(px)
            c.send(request("CONNECT", echo.addr, "Host: " + echo.addr) + b"ping")
            assert c.r.exactly(len(ESTABLISHED) + 4) == ESTABLISHED + b"ping"
            c.close()


def test_http_local_destinations_bad_value_exits_2_and_t_shows_what_auto_chose():
    def run_proxy(*args):
        return subprocess.run([PROXY, *args], capture_output=True, text=True, timeout=10)

    path = os.path.join(TMP, "local.ini")
    with open(path, "w") as f:
        f.write("[proxy]\nmode = http\n[access]\nconnect_ports = 443\n"
                "local_destinations = maybe\n")
    for args in (["-c", path], ["-t", "-c", path]):
        r = run_proxy(*args)
        assert r.returncode == 2, r
        want = "%s:5: local_destinations = 'maybe': expected one of: auto allow deny" % path
        assert r.stderr.strip() == want, r.stderr
    for listen, value, want in (("127.0.0.1:8888", "auto", "allow (auto)"),
                                ("[::1]:8888", "auto", "allow (auto)"),
                                ("0.0.0.0:8888", "auto", "deny (auto)"),
                                ("0.0.0.0:8888", "allow", "allow")):
        ini = write_ini({"proxy": {"listen": listen, "mode": "http"},
                         "access": {"local_destinations": value}}, "local-t.ini")
        r = run_proxy("-t", "-c", ini)  # -t binds nothing
        assert r.returncode == 0, r
        assert "\nlocal destinations: %s\n" % want in r.stdout, (listen, value, r.stdout)
