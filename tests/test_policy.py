"""tests/test_policy.py — what each client may do and where its requests may go (issue 22):
[limits] connections_per_client, requests_per_second with request_burst (GCRA), limit_by =
user, exempt, the bounded table of clients and its life across a reload; [access]
trusted_proxies (a balancer's PROXY header names the client for the log, allow and the limits);
deny_destinations and allow_destinations for absolute-form requests and CONNECT; and the
config's strictness about all of these.

Distinct clients are distinct loopback source addresses (127.0.0.2, 127.0.x.y), or the
addresses PROXY headers name. The rate tests use 1 request/s, the lowest rate there is, so a
client over it stays refused for about a second: when a run on a loaded machine took longer
than that and the answer was not the refusal, it proves nothing, and is tried again with a
fresh client (Slow) instead of asserting anything about speed. Names under .invalid never
resolve, so a name that gets 502 error=dns passed the name rules (which come before any
lookup), and one that gets 403 was stopped by them. Every test name starts with test_policy_
(run.py -k test_policy_)."""
import re
import socket
import struct
import time

from lib import (PROXY, WRAPPER, Proxy, Server, capture_handler, connect, echo_handler,
                 recv_all, refusals, wait_received)
from test_http import (AUTH, ESTABLISHED, PASSWORD, USER, WRONG, Client, Message, Reader, basic,
                       get, origin, read_body, request, url, wait_for)
from test_http_access import check_config
from test_ops import reload

LOG = r"^\S+ "  # the timestamp that starts an access log line


# ---- clients, headers, time -------------------------------------------------------------

class Peer(Client):
    """A Client from a loopback address of its own: to the proxy, a client of its own."""

    def __init__(self, px, source="127.0.0.1", timeout=10):
        self.sock = connect(px.addr, timeout, source=source)
        self.r = Reader(self.sock)


_sources = [0]


def fresh_source():
    """A loopback address no other client of this run has used: 127.1.x.y."""
    _sources[0] += 1
    return "127.1.%d.%d" % divmod(_sources[0], 250)


class Slow(Exception):
    """A run took longer than the window its assertion holds in: it proves nothing."""


def expect(ok, since, window, what):
    """Asserts ok, unless it failed only because more than window seconds went by since
    since (then Slow: the caller tries again with a fresh client)."""
    if not ok:
        if time.monotonic() - since >= window:
            raise Slow(what)
        raise AssertionError(what)


def tried(fn, tries=5):
    """fn(a fresh client address), again while it raises Slow."""
    for _ in range(tries):
        try:
            return fn(fresh_source())
        except Slow:
            continue
    raise AssertionError("%d tries all took longer than a rate window of a second" % tries)


def proxy_v1(src, sport, dst=None, dport=80):
    fam = "TCP6" if ":" in src else "TCP4"
    dst = dst or ("::1" if ":" in src else "127.0.0.1")  # the same family: the protocol says so
    return ("PROXY %s %s %s %d %d\r\n" % (fam, src, dst, sport, dport)).encode()


def proxy_v2(src, sport, dst=None, dport=80):
    """A version 2 header (PROXY command, TCP over IPv4 or IPv6), as haproxy sends it."""
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    dst = dst or ("::1" if ":" in src else "127.0.0.1")
    addrs = socket.inet_pton(fam, src) + socket.inet_pton(fam, dst) + struct.pack("!HH", sport,
                                                                                  dport)
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21 if fam == socket.AF_INET6 else 0x11])
            + struct.pack("!H", len(addrs)) + addrs)


def closed_at_once(s, timeout=5):
    """Whether the proxy closes s without a byte (EOF or reset)."""
    s.settimeout(timeout)
    try:
        return s.recv(64) == b""
    except ConnectionResetError:
        return True


def http_policy(upstream=None, limits=None, access=None, users=None, **keys):
    sections = {}
    if limits:
        sections["limits"] = limits
    if access:
        sections["access"] = access
    if users:
        sections["users"] = users
    keys.setdefault("header_timeout", 5)
    return Proxy(upstream, mode="http", sections=sections, **keys)


def is_429(resp, keep=True):
    """A rate refusal: 429, a whole Retry-After of at least a second, a text body; the
    connection kept (no Connection: close) when keep."""
    if resp.status != 429:
        return False
    retry = resp.get("retry-after")
    assert len(retry) == 1 and retry[0].isdigit() and int(retry[0]) >= 1, resp.head
    assert resp.get("content-type") == ["text/plain"], resp.head
    assert resp.body.startswith(b"429 Too Many Requests"), resp.body
    assert resp.get("content-length") == [str(len(resp.body))], resp.head
    assert resp.get("connection") == ([] if keep else ["close"]), resp.head
    return True


def log_count(px, pattern):
    return len(re.findall(pattern, px.text(), re.M))


def wait_log_count(px, pattern, n):
    wait_for("%d log lines /%s/" % (n, pattern), lambda: log_count(px, pattern) >= n)
    assert log_count(px, pattern) == n, (pattern, px.text())


# ---- requests_per_second, request_burst -------------------------------------------------

def test_policy_over_the_rate_a_request_gets_429_with_retry_after_and_keeps_its_connection():
    """requests_per_second = 1, request_burst = 2: three requests back to back are served,
    the fourth gets 429 with Retry-After: 1 and a text body, and its connection stays open; a
    new connection from the same address is refused too, and a POST with a body gets 429 and
    its connection closes. Another address is served meanwhile. After Retry-After, the first
    connection's next request is served, and the one after it is refused again (one a second).
    Each 429 is in the log (error=requests_per_second) and counted; only the served requests
    reached the backend, and no connection was refused."""
    refused = []
    with origin() as o:
        px = http_policy(o.addr, limits={"requests_per_second": 1, "request_burst": 2})

        def run(src):
            c = Peer(px, src)
            start = time.monotonic()
            for i in range(3):
                resp = c.ask(get(o, "/%s/ok%d" % (src, i)))
                assert resp.status == 200, resp.head
            resp = c.ask(get(o, "/%s/over" % src))
            expect(is_429(resp), start, 1, "the 4th request in a burst of 2: %r" % resp.head)
            refused.append(src)
            retry = int(resp.get("retry-after")[0])
            assert retry == 1, "1 request/s: the next is at most a second away: %r" % resp.head
            resp = Peer(px, src).ask(get(o, "/%s/new-connection" % src))
            expect(is_429(resp), start, 1, "still over the rate: %r" % resp.head)
            refused.append(src)
            # Another client is not held back by this one.
            assert Peer(px, fresh_source()).ask(get(o, "/other")).status == 200
            # A refused request with a body: the body is not read, so the connection ends.
            post = Peer(px, src)
            resp = post.ask(request("POST", url(o, "/%s/post" % src), "Host: h",
                                    "Content-Length: 5", body=b"hello"))
            expect(resp.status == 429, start, 1, "a POST over the rate: %r" % resp.head)
            refused.append(src)
            assert is_429(resp, keep=False) and post.closed()
            # Retry-After later the connection that got the 429 is served; then one a second.
            time.sleep(retry + 0.05)
            resp = c.ask(get(o, "/%s/later" % src))
            assert resp.status == 200, resp.head
            resp = c.ask(get(o, "/%s/later-over" % src))
            expect(is_429(resp), start, 1.9, "one a second after the burst: %r" % resp.head)
            refused.append(src)
            return src

        src = tried(run)
        paths = [r.target.split("/", 2)[2] for r in o.received if r.target.startswith("/" + src)]
        assert paths == ["ok0", "ok1", "ok2", "later"], paths
        pattern = LOG + r"%s:\d+ - (GET|POST) \S+ 429 .*error=requests_per_second$"
        wait_log_count(px, pattern % re.escape(src), 4)
        m = px.metrics()
        assert m['proxy_limit_refusals_total{limit="requests_per_second"}'] == len(refused), m
        assert m['proxy_limit_refusals_total{limit="connections_per_client"}'] == 0, m
        assert refusals(m) == 0, "http requests over the rate are answered, not refused: %s" % m


def test_policy_every_request_counts_against_the_rate_407s_and_connect_too():
    """[users] on, requests_per_second = 1, request_burst = 1: a 407 without credentials and
    a 407 with a wrong password use up the burst, so the right password then gets 429, not a
    200 (guessing passwords is slow too). A CONNECT counts, and is itself refused over the
    rate."""
    with origin() as o, Server(echo_handler) as echo:
        px = http_policy(o.addr, limits={"requests_per_second": 1, "request_burst": 1},
                         access={"connect_ports": str(echo.port)}, users={USER: PASSWORD})

        def failures(src):
            c = Peer(px, src)
            start = time.monotonic()
            assert c.ask(get(o, "/none")).status == 407
            assert c.ask(get(o, "/wrong", basic(password=WRONG))).status == 407
            resp = c.ask(get(o, "/right", AUTH))
            expect(is_429(resp), start, 1, "after two 407s in a burst of 1: %r" % resp.head)

        def tunnels(src):
            start = time.monotonic()
            t = Peer(px, src)
            t.send(request("CONNECT", echo.addr, "Host: h", AUTH) + b"ping")
            assert t.r.exactly(len(ESTABLISHED) + 4) == ESTABLISHED + b"ping"
            assert Peer(px, src).ask(get(o, "/after-connect", AUTH)).status == 200
            c = Peer(px, src)
            resp = c.ask(request("CONNECT", echo.addr, "Host: h", AUTH))
            expect(is_429(resp), start, 1, "a CONNECT over the rate: %r" % resp.head)
            t.close()

        tried(failures)
        tried(tunnels)
        assert not [r for r in o.received if r.target == "/right"], "a 429 reached the backend"
        assert echo.conns == 1


def test_policy_limit_by_user_counts_a_user_across_addresses_and_the_rest_by_address():
    """limit_by = user, 1 request/s, burst 1: alice's two requests from one address use up
    her burst; her third, from another address, gets 429; bob, from her first address, is
    served; requests without credentials count against their address, which alice's did not
    touch: two 407s, then 429."""
    users = {USER: PASSWORD, "bob": "b0b-Pa55"}
    bob = basic("bob", "b0b-Pa55")
    with origin() as o:
        px = http_policy(o.addr, users=users, limits={"requests_per_second": 1,
                                                       "request_burst": 1, "limit_by": "user"})

        def run(src):
            other = fresh_source()
            start = time.monotonic()
            c = Peer(px, src)
            for i in range(2):
                assert c.ask(get(o, "/alice%d" % i, AUTH)).status == 200
            resp = Peer(px, other).ask(get(o, "/alice-elsewhere", AUTH))
            expect(is_429(resp), start, 1, "alice from another address: %r" % resp.head)
            resp = c.ask(get(o, "/bob", bob))
            assert resp.status == 200, "bob counted against alice or the address: %r" % resp.head
            assert c.ask(get(o, "/anon0")).status == 407
            assert c.ask(get(o, "/anon1")).status == 407
            resp = c.ask(get(o, "/anon2"))
            expect(is_429(resp), start, 1, "the 3rd unauthenticated request: %r" % resp.head)

        # alice's bucket is shared by every try: one try only, unless it was slow.
        for _ in range(3):
            try:
                run(fresh_source())
                break
            except Slow:
                time.sleep(2.1)  # alice's burst back
        else:
            raise AssertionError("every try took longer than the rate's second")
        assert [r.target for r in o.received][-3:] == ["/alice0", "/alice1", "/bob"], o.received


def test_policy_the_rate_is_per_address_an_ipv6_client_by_its_64_behind_a_balancer():
    """Clients named by a trusted balancer's PROXY headers, 1 request/s, no burst:
    2001:db8:N:1::1 is served, 2001:db8:N:1:ffff::9 (the same /64) is refused, 2001:db8:N:2::1
    (the next /64) is served; so is the balancer's own next client, 192.0.2.N. With
    connections_per_client = 1, a second connection naming 192.0.2.10 gets 429 and closes,
    while one naming 192.0.2.11 through the same balancer is served."""
    with origin() as o:
        px = http_policy(o.addr, limits={"requests_per_second": 1},
                         access={"trusted_proxies": "127.0.0.1",
                                 "allow": "127.0.0.0/8, 192.0.2.0/24, 2001:db8::/32"})
        n = [0]

        def ask(src, path):
            c = Peer(px, "127.0.0.1")
            c.send(proxy_v1(src, 4000))
            return c.ask(get(o, path))

        def run(_):
            n[0] += 1
            start = time.monotonic()
            assert ask("2001:db8:%x:1::1" % n[0], "/a").status == 200
            resp = ask("2001:db8:%x:1:ffff::9" % n[0], "/same64")
            expect(is_429(resp), start, 1, "the same /64 within a second: %r" % resp.head)
            assert ask("2001:db8:%x:2::1" % n[0], "/next64").status == 200
            assert ask("192.0.2.%d" % n[0], "/v4").status == 200

        tried(run)
        assert "/same64" not in [r.target for r in o.received]
        wait_log_count(px, LOG + r"\[2001:db8:%x:1:ffff::9\]:4000 - GET \S+ 429 " % n[0], 1)

        # connections_per_client counts the client named, not the balancer.
        px = http_policy(o.addr, limits={"connections_per_client": 1},
                         access={"trusted_proxies": "127.0.0.1", "allow": "192.0.2.0/24"})
        first = Peer(px, "127.0.0.1")
        assert first.ask(proxy_v1("192.0.2.10", 1) + get(o, "/first")).status == 200
        second = Peer(px, "127.0.0.1")
        second.send(proxy_v1("192.0.2.10", 2))
        resp = second.response()
        assert resp.status == 429 and b"connections" in resp.body, resp.head + resp.body
        assert second.closed()
        third = Peer(px, "127.0.0.1")
        assert third.ask(proxy_v1("192.0.2.11", 3) + get(o, "/third")).status == 200
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="connections_per_client"}'] == 1, m
        # Counted as it is retired, which may come just after the client saw it close.
        px.wait_metric('proxy_connections_closed_total{reason="refused"}', 1)


def test_policy_exempt_clients_meet_no_limit():
    """connections_per_client = 1, requests_per_second = 1, exempt = 127.0.9.0/24: from
    127.0.9.9 three connections at once, three requests each, all served; from 127.0.8.8 the
    second connection is refused (429) and the second request too. The exempt client takes no
    entry of the table."""
    with origin() as o:
        px = http_policy(o.addr, limits={"connections_per_client": 1, "requests_per_second": 1,
                                         "exempt": "10.0.0.0/8, 127.0.9.0/24"})
        conns = [Peer(px, "127.0.9.9") for _ in range(3)]
        for i in range(3):
            for j, c in enumerate(conns):
                resp = c.ask(get(o, "/exempt%d-%d" % (i, j)))
                assert resp.status == 200, resp.head
        c = Peer(px, "127.0.8.8")
        start = time.monotonic()  # the rate's second starts later, at the request
        assert c.ask(get(o, "/limited")).status == 200
        resp = Peer(px, "127.0.8.8").response()
        assert resp.status == 429 and b"connections" in resp.body, resp.head + resp.body
        resp = c.ask(get(o, "/limited-again"))
        if resp.status == 200:  # only when the machine stalled for a second: try once more
            assert time.monotonic() - start >= 1, resp.head
            resp = c.ask(get(o, "/limited-again"))
        assert is_429(resp), resp.head
        m = px.metrics()
        assert m['proxy_limit_refusals_total{limit="connections_per_client"}'] == 1, m
        assert m['proxy_limit_refusals_total{limit="requests_per_second"}'] == 1, m
        assert m["proxy_clients_tracked"] == 1, "an exempt client took an entry: %s" % m


# ---- connections_per_client ---------------------------------------------------------------

def test_policy_connections_per_client_refuses_the_next_with_429_in_http_mode():
    """connections_per_client = 2: two connections from 127.0.0.2 are served; a third gets
    429 (its body about connections) and is closed before it reaches anything; 127.0.0.3 is
    served meanwhile; once one of the two closes, 127.0.0.2 may connect again. Each refusal is
    counted both as a refused connection and as a limit's refusal."""
    with origin() as o:
        px = http_policy(o.addr, limits={"connections_per_client": 2})
        a, b = Peer(px, "127.0.0.2"), Peer(px, "127.0.0.2")
        for c in (a, b):
            assert c.ask(get(o, "/in")).status == 200
        third = Peer(px, "127.0.0.2")
        resp = third.response()
        assert resp.status == 429 and resp.head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
        assert b"connections" in resp.body and resp.get("connection") == ["close"], resp.body
        assert third.closed()
        assert Peer(px, "127.0.0.3").ask(get(o, "/other")).status == 200
        assert b.ask(get(o, "/still")).status == 200, "the refusal disturbed an open one"
        a.close()
        seen = [1]

        def admitted():
            c = Peer(px, "127.0.0.2")
            c.send(get(o, "/again"))
            resp = c.response()
            if resp.status == 429:
                seen[0] += 1
                return False
            assert resp.status == 200, resp.head
            return True

        wait_for("a place for 127.0.0.2 once one of its connections closed", admitted)
        assert [r.target for r in o.received].count("/again") == 1
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="connections_per_client"}'] == seen[0]
        assert m['proxy_limit_refusals_total{limit="connections_per_client"}'] == seen[0], m
        assert refusals(m) == seen[0], m


def test_policy_tcp_mode_limits_open_connections_and_new_connections_per_second():
    """tcp mode: with connections_per_client = 1 a second connection from the same address is
    closed without a byte while the first relays; another address is served; after the first
    closes, a new one is. With requests_per_second = 1 and request_burst = 1, the third new
    connection within a second is closed at accept and counted as such."""
    with Server(echo_handler, name=b"E") as echo:
        px = Proxy(echo.addr, mode="tcp", sections={"limits": {"connections_per_client": 1}})
        first = connect(px.addr, source="127.0.0.2")
        assert first.recv(2) == b"E\n"
        second = connect(px.addr, source="127.0.0.2")
        assert closed_at_once(second), "a second connection from the same address was served"
        other = connect(px.addr, source="127.0.0.3")
        assert other.recv(2) == b"E\n"
        first.sendall(b"ping")
        assert first.recv(4) == b"ping"
        first.close()
        turned = [1]

        def admitted():
            s = connect(px.addr, source="127.0.0.2")
            s.settimeout(5)
            try:
                if s.recv(2) == b"E\n":
                    return True
            except ConnectionResetError:
                pass
            turned[0] += 1
            return False

        wait_for("127.0.0.2 admitted after its connection closed", admitted)
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="connections_per_client"}'] == turned[0]
        assert m['proxy_limit_refusals_total{limit="connections_per_client"}'] == turned[0], m
        assert echo.conns == 3, echo.conns

        px = Proxy(echo.addr, mode="tcp", sections={"limits": {"requests_per_second": 1,
                                                               "request_burst": 1}})
        def run(src):
            start = time.monotonic()
            for _ in range(2):
                s = connect(px.addr, source=src)
                assert s.recv(2) == b"E\n"
                s.close()
            s = connect(px.addr, source=src)
            shut = closed_at_once(s)
            expect(shut, start, 1, "the 3rd new connection within a second was served")

        tried(run)
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="requests_per_second"}'] == 1, m
        assert m['proxy_limit_refusals_total{limit="requests_per_second"}'] == 1, m


# ---- the table of clients -----------------------------------------------------------------

def rss_kib(px):
    with open("/proc/%d/status" % px.p.pid) as f:
        return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))


def test_policy_twenty_thousand_clients_one_after_another_fit_a_table_of_a_thousand():
    """[limits] clients = 1000 (max_connections 1000), one connection a client, one request
    each, 1 request/s and 1 connection per client: 20,000 distinct addresses (127.2.x.y) one
    after another are all answered, none refused (a forgotten client's entry, reused, starts
    afresh); the table holds at most 1000 and has forgotten some; the proxy's RSS after 20,000
    clients is within 2 MiB of what it was after 2,000. The request is one the proxy answers
    itself after counting it (a denied destination), so that no backend takes 20,000
    connections. About 4 s here."""
    total, first = 20000, 2000
    px = http_policy(log="off", max_connections=1000,
                     limits={"clients": 1000, "connections_per_client": 1,
                             "requests_per_second": 1},
                     access={"deny_destinations": "denied.invalid"})
    req = request("GET", "http://denied.invalid/", "Host: denied.invalid", "Connection: close")
    answers, rss = {}, []
    for n in range(total):
        if n == first:
            wait_for("%d connections closed" % first,
                     lambda: px.metric("proxy_connections_active") == 0)
            rss.append(rss_kib(px))
        s = connect(px.addr, source="127.%d.%d.%d" % (2 + n // 62500, n // 250 % 250, n % 250 + 1))
        s.sendall(req)
        got = recv_all(s)
        s.close()
        status = got[:12]
        answers[status] = answers.get(status, 0) + 1
    assert answers == {b"HTTP/1.1 403": total}, answers
    wait_for("every connection closed", lambda: px.metric("proxy_connections_active") == 0)
    rss.append(rss_kib(px))
    m = px.metrics()
    assert refusals(m) == 0, m
    assert m['proxy_limit_refusals_total{limit="requests_per_second"}'] == 0, m
    assert m['proxy_limit_refusals_total{limit="connections_per_client"}'] == 0, m
    assert m["proxy_connections_accepted_total"] == total, m
    assert 0 < m["proxy_clients_tracked"] <= 1000, m
    assert m["proxy_clients_forgotten_total"] > 0, m
    # AddressSanitizer holds freed memory back (its quarantine), and valgrind's heap is its
    # own: the RSS says something only of the plain build.
    if "/asan/" not in PROXY and not WRAPPER:
        assert rss[1] - rss[0] < 2048, "RSS grew from %d KiB to %d KiB" % tuple(rss)


test_policy_twenty_thousand_clients_one_after_another_fit_a_table_of_a_thousand.limit = 120


# ---- a reload ------------------------------------------------------------------------------

def test_policy_a_reload_keeps_the_clients_and_their_rates():
    """1 request/s, burst 1: a client uses its burst and gets 429; a reload of the same file
    (a comment added) does not forget it: its next request still gets 429, and the table
    holds as many clients as before. A reload that makes the client exempt lets it in at
    once (and names [limits] clients, which only a restart changes). A reload keeps the count
    of a client's open connections: lowered to 1 with two open, a new one is refused until
    both have closed."""
    with origin() as o:
        px = http_policy(o.addr, limits={"requests_per_second": 1, "request_burst": 1})
        with open(px.ini) as f:
            text = f.read()
        gen = [1]

        def run(src):
            c = Peer(px, src)
            start = time.monotonic()
            for i in range(2):
                assert c.ask(get(o, "/r%d" % i)).status == 200
            resp = c.ask(get(o, "/over"))
            expect(is_429(resp), start, 1, "the 3rd request in a burst of 1: %r" % resp.head)
            tracked = px.metric("proxy_clients_tracked")
            gen[0] += 1
            line = reload(px, text + "; reloaded %d\n" % gen[0])
            assert "reloaded" in line and "generation %d" % gen[0] in line, line
            resp = Peer(px, src).ask(get(o, "/after-reload"))
            expect(is_429(resp), start, 1, "a reload forgot the client's rate: %r" % resp.head)
            assert px.metric("proxy_clients_tracked") == tracked
            return src

        src = tried(run)
        gen[0] += 1
        line = reload(px, text.replace("[limits]\n", "[limits]\nexempt = %s\nclients = 9000\n"
                                       % src))
        assert "reloaded" in line and "restart: [limits] clients" in line, line
        assert Peer(px, src).ask(get(o, "/exempt")).status == 200
        assert "/after-reload" not in [r.target for r in o.received]

        # Open connections stay counted: two open, the limit lowered to 1 by a reload, a third
        # is refused, and so is one after the first closes; after both close, one comes in.
        a, b = Peer(px, "127.0.0.2"), Peer(px, "127.0.0.2")
        for c in (a, b):
            assert c.ask(request("GET", "/open", "Host: h")).status == 200
        rates = "requests_per_second = 1\nrequest_burst = 1\n"
        assert rates in text
        line = reload(px, text.replace(rates, "connections_per_client = 1\n"))
        assert "reloaded" in line, line
        resp = Peer(px, "127.0.0.2").response()
        assert resp.status == 429 and b"connections" in resp.body, resp.head
        a.close()
        wait_for("a's close counted", lambda: px.metric("proxy_connections_active") == 1)
        resp = Peer(px, "127.0.0.2").response()
        assert resp.status == 429 and b"connections" in resp.body, resp.head
        b.close()
        wait_for("b's close counted", lambda: px.metric("proxy_connections_active") == 0)
        assert Peer(px, "127.0.0.2").ask(request("GET", "/back", "Host: h")).status == 200


# ---- trusted_proxies: the PROXY header ------------------------------------------------------

def test_policy_a_trusted_balancers_proxy_header_names_the_client_in_http_mode():
    """trusted_proxies = 127.0.0.1, allow 127.0.0.0/8 and 192.0.2.0/24: a v1 header naming
    192.0.2.7:5555 then requests: served, and the log names 192.0.2.7:5555 for each request of
    the connection; a v2 header likewise; a header naming 198.51.100.9 (not allowed): closed
    without an answer; no header, or a malformed one, from the balancer: 400 and closed,
    counted as proxy_header refusals. A v2 header with a TLV, and headers arriving in two
    parts, are read whole. From 127.0.0.2 (not trusted) a PROXY header is a bad request: 400,
    error=proxy_header in the log. With allow = 192.0.2.0/24 only, the balancer is still
    taken, and PROXY UNKNOWN or a v2 LOCAL header leave it the client: refused."""
    with origin() as o:
        px = http_policy(o.addr, access={"trusted_proxies": "127.0.0.1",
                                         "allow": "127.0.0.0/8, 192.0.2.0/24"})
        c = Peer(px, "127.0.0.1")
        c.send(proxy_v1("192.0.2.7", 5555))
        for path in ("/v1-first", "/v1-second"):
            resp = c.ask(get(o, path))
            assert resp.status == 200 and resp.body == b"origin " + path.encode(), resp.head
        c = Peer(px, "127.0.0.1")
        resp = c.ask(proxy_v2("192.0.2.8", 6666) + get(o, "/v2"))
        assert resp.status == 200 and resp.body == b"origin /v2", resp.head
        # A v2 header with a TLV (the authority, as haproxy sends it): the TLV is skipped.
        v2 = proxy_v2("192.0.2.9", 7777)
        tlv = v2[16:] + b"\x02" + struct.pack("!H", 9) + b"a.invalid"
        resp = Peer(px, "127.0.0.1").ask(v2[:14] + struct.pack("!H", len(tlv)) + tlv +
                                         get(o, "/tlv"))
        assert resp.status == 200 and resp.body == b"origin /tlv", resp.head
        # A header in two parts (two segments) is read whole.
        for header, path in ((proxy_v1("192.0.2.7", 5555), "/split-v1"),
                             (proxy_v2("192.0.2.8", 6666), "/split-v2")):
            c = Peer(px, "127.0.0.1")
            c.send(header[:10])
            time.sleep(0.1)
            resp = c.ask(header[10:] + get(o, path))
            assert resp.status == 200 and resp.body == b"origin " + path.encode(), resp.head
        wait_log_count(px, LOG + r"192\.0\.2\.7:5555 - GET \S+ 200 ", 3)
        wait_log_count(px, LOG + r"192\.0\.2\.8:6666 - GET \S+ 200 ", 2)
        wait_log_count(px, LOG + r"192\.0\.2\.9:7777 - GET \S+ 200 ", 1)

        c = Peer(px, "127.0.0.1")
        c.send(proxy_v1("198.51.100.9", 5555) + get(o, "/not-allowed"))
        assert closed_at_once(c.sock), "a client outside allow was answered"
        for bad in (b"", b"PROXY TCP4 192.0.2.7 nonsense\r\n", b"PROXY TCP4 192.0.2.7\r\n"):
            c = Peer(px, "127.0.0.1")
            resp = c.ask(bad + get(o, "/no-header"))
            assert resp.status == 400 and resp.get("connection") == ["close"], (bad, resp.head)
            assert c.closed()
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="not_allowed"}'] == 1, m
        assert m['proxy_connections_refused_total{reason="proxy_header"}'] == 3, m
        # Counted as each is retired, which may come just after the client saw it close.
        px.wait_metric('proxy_connections_closed_total{reason="refused"}', 4)

        c = Peer(px, "127.0.0.2")
        resp = c.ask(proxy_v1("192.0.2.7", 5555) + get(o, "/untrusted"))
        assert resp.status == 400 and resp.get("connection") == ["close"], resp.head
        assert b"PROXY" in resp.body, resp.body
        wait_log_count(px, LOG + r"127\.0\.0\.2:\d+ .* 400 .*error=proxy_header$", 1)
        assert [r.target for r in o.received] == ["/v1-first", "/v1-second", "/v2", "/tlv",
                                                  "/split-v1", "/split-v2"], o.received

        # The balancer itself need not be in allow; PROXY UNKNOWN and a v2 LOCAL (a health
        # check) leave it the client, which allow then refuses.
        px = http_policy(o.addr, access={"trusted_proxies": "127.0.0.1", "allow": "192.0.2.0/24"})
        resp = Peer(px, "127.0.0.1").ask(proxy_v1("192.0.2.7", 1) + get(o, "/named"))
        assert resp.status == 200, resp.head
        local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
        for header in (b"PROXY UNKNOWN\r\n", local):
            c = Peer(px, "127.0.0.1")
            c.send(header + get(o, "/unknown"))
            assert closed_at_once(c.sock), header
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="not_allowed"}'] == 2, m
        assert "/unknown" not in [r.target for r in o.received]


def test_policy_a_trusted_balancer_in_tcp_mode_passes_only_the_bytes_after_its_header():
    """tcp mode, trusted_proxies = 127.0.0.1, send_proxy = v1: a connection starting with a
    v1 (then a v2) header naming 192.0.2.7:5555 reaches the upstream as our own v1 header
    naming that client, then the bytes after the balancer's header alone. Without a header it
    is closed and reaches nothing, and so is one that sends nothing, at header_timeout. With
    send_proxy = off the upstream gets the bytes alone, and a PROXY header from a client not
    trusted is relayed like any bytes. A per-client limit applies to the named client, not
    the balancer."""
    with Server(capture_handler) as cap:
        px = Proxy(cap.addr, mode="tcp", send_proxy="v1",
                   sections={"access": {"trusted_proxies": "127.0.0.1",
                                        "allow": "127.0.0.0/8, 192.0.2.0/24"}})
        for header in (proxy_v1("192.0.2.7", 5555), proxy_v2("192.0.2.7", 5555)):
            s = connect(px.addr, source="127.0.0.1")
            s.sendall(header + b"hello after the header")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(16) == b""
            s.close()
            wait_for("the upstream's copy", lambda: len(cap.received) == 1)
            got = cap.received.pop()
            want = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 %d\r\nhello after the header" % px.addr[1]
            assert got == want, got
        s = connect(px.addr, source="127.0.0.1")
        s.sendall(b"no header here")
        assert closed_at_once(s)
        assert cap.conns == 2
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="proxy_header"}'] == 1, m
        # A balancer's connection that sends nothing is closed at header_timeout.
        px = Proxy(cap.addr, mode="tcp", header_timeout=1,
                   sections={"access": {"trusted_proxies": "127.0.0.1"}})
        s = connect(px.addr, source="127.0.0.1")
        assert closed_at_once(s, timeout=30), "a silent balancer's connection stayed open"
        assert cap.conns == 2
        assert px.metric('proxy_connections_refused_total{reason="proxy_header"}') == 1

    with Server(capture_handler) as cap, Server(echo_handler, name=b"E") as echo:
        px = Proxy(cap.addr, mode="tcp", sections={"access": {"trusted_proxies": "127.0.0.1"}})
        s = connect(px.addr, source="127.0.0.1")
        s.sendall(proxy_v1("127.0.0.9", 1234) + b"bytes alone")
        s.shutdown(socket.SHUT_WR)
        assert wait_received(cap) == [b"bytes alone"], cap.received
        # From a client that is not trusted, tcp mode relays a PROXY header as any bytes.
        cap.received.clear()
        s = connect(px.addr, source="127.0.0.2")
        s.sendall(proxy_v1("192.0.2.7", 1234) + b"relayed")
        s.shutdown(socket.SHUT_WR)
        assert wait_received(cap) == [proxy_v1("192.0.2.7", 1234) + b"relayed"], cap.received
        px = Proxy(echo.addr, mode="tcp",
                   sections={"access": {"trusted_proxies": "127.0.0.1",
                                        "allow": "127.0.0.0/8, 192.0.2.0/24"},
                             "limits": {"connections_per_client": 1}})
        a = connect(px.addr, source="127.0.0.1")
        a.sendall(proxy_v1("192.0.2.7", 1))
        assert a.recv(2) == b"E\n"
        b = connect(px.addr, source="127.0.0.1")
        b.sendall(proxy_v1("192.0.2.7", 2))
        assert closed_at_once(b), "a second connection of 192.0.2.7 was served"
        c = connect(px.addr, source="127.0.0.1")
        c.sendall(proxy_v1("192.0.2.8", 3))
        assert c.recv(2) == b"E\n", "the balancer itself was limited"
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="connections_per_client"}'] == 1, m


# ---- deny_destinations, allow_destinations -----------------------------------------------

def ask_target(px, method, target):
    """One request on a new connection: a GET of an absolute URL, or a CONNECT."""
    c = Client(px)
    if method == "CONNECT":
        c.send(request("CONNECT", target, "Host: " + target))
        resp = Message(c.r.until(b"\r\n\r\n"))
        if resp.status != 200:  # a tunnel's 200 has no body: its bytes are the tunnel's
            resp.body = read_body(c.r, resp, response=True)
        return c, resp
    c.send(request("GET", "http://%s/" % target, "Host: h"))
    return c, c.response()


def check_targets(px, cases):
    """cases: (method, target, status, error word); each answer checked, and its log line."""
    problems = []
    for method, target, status, word in cases:
        c, resp = ask_target(px, method, target)
        if resp.status != status:
            problems.append("%s %s: %r, want %d" % (method, target, resp.head, status))
            continue
        if status == 403 and word == "destination_denied":
            ok = b"list of denied destinations" in resp.body
        elif status == 403 and word == "destination_not_allowed":
            ok = b"not on this proxy's list of allowed ones" in resp.body
        else:
            ok = True
        if not ok:
            problems.append("%s %s: body %r" % (method, target, resp.body))
        if resp.status == 200 and method == "CONNECT":
            c.send(b"ping")
            if c.r.exactly(4) != b"ping":
                problems.append("CONNECT %s: no echo" % target)
        c.close()
    for method, target, status, word in cases:
        if status != 200:
            n = sum(1 for m, t, s, w in cases if (m, s, w) == (method, status, word))
            pattern = LOG + r"\S+ - %s \S+ %d .*error=%s$" % (method, status, word)
            try:
                wait_log_count(px, pattern, n)
            except AssertionError as e:
                problems.append(str(e)[:300])
    assert not problems, "\n".join(problems)


def test_policy_deny_destinations_by_name_suffix_and_network_for_get_and_connect():
    """deny_destinations = blocked.invalid, .Banned.Invalid. (on continued lines),
    198.51.100.0/24, [::2]: the exact name in any case and with a trailing dot, the domain
    and every name under it, and IP literals in the networks (IPv4 and IPv6) get 403
    error=destination_denied, by GET and by CONNECT, before any lookup or connect; a name
    under the exact one, or one merely ending in the suffix's letters, passes the rule (then
    fails its lookup: 502 error=dns); the origin and the echo server are reached."""
    with origin() as o, Server(echo_handler) as echo:
        deny = "blocked.invalid,\n    .Banned.Invalid.,\n  198.51.100.0/24, [::2]"
        px = http_policy(o.addr, connect_timeout=2,
                         access={"deny_destinations": deny,
                                 "connect_ports": "443, %d" % echo.port})
        cases = [(m, t, 403, "destination_denied") for m, t in (
            ("GET", "blocked.invalid"), ("GET", "BLOCKED.Invalid."), ("GET", "banned.invalid"),
            ("GET", "a.b.BANNED.invalid:8080"), ("GET", "198.51.100.7:8080"),
            ("GET", "[::2]:8080"), ("CONNECT", "blocked.invalid:443"),
            ("CONNECT", "x.banned.invalid.:443"), ("CONNECT", "198.51.100.250:443"),
            ("CONNECT", "[::2]:443"))]
        cases += [("GET", "www.blocked.invalid", 502, "dns"),
                  ("GET", "notbanned.invalid", 502, "dns"),
                  ("CONNECT", "www.blocked.invalid:443", 502, "dns"),
                  ("GET", "%s" % o.addr, 200, None),
                  ("CONNECT", echo.addr, 200, None)]
        check_targets(px, cases)
        assert o.conns == 1 and echo.conns == 1, (o.conns, echo.conns)


def test_policy_a_name_resolving_into_a_denied_network_is_refused_origin_form_is_not():
    """deny_destinations = 127.0.0.0/8: localhost (which resolves to 127.0.0.1) is refused
    after its lookup, by GET and CONNECT, and so is 127.0.0.1 itself, in its other spellings
    too (127.1, 2130706433, [::ffff:127.0.0.1]), with 403 error=destination_denied, and
    nothing is connected; the proxy's own port is still refused by the older rule, first
    (error=destination); origin-form requests go to the configured upstream, which no
    destination rule checks."""
    with origin() as o, Server(echo_handler) as echo:
        oport, eport = o.port, echo.port
        px = http_policy(o.addr, access={"deny_destinations": "127.0.0.0/8",
                                         "connect_ports": str(eport)})
        check_targets(px, [("GET", "localhost:%d" % oport, 403, "destination_denied"),
                           ("GET", "LocalHost:%d" % oport, 403, "destination_denied"),
                           ("GET", "127.0.0.1:%d" % oport, 403, "destination_denied"),
                           ("GET", "127.1:%d" % oport, 403, "destination_denied"),
                           ("GET", "2130706433:%d" % oport, 403, "destination_denied"),
                           ("GET", "[::ffff:127.0.0.1]:%d" % oport, 403, "destination_denied"),
                           ("CONNECT", "localhost:%d" % eport, 403, "destination_denied"),
                           ("CONNECT", "127.0.0.1:%d" % eport, 403, "destination_denied"),
                           ("GET", "127.0.0.1:%d" % px.addr[1], 403, "destination")])
        assert (o.conns, echo.conns) == (0, 0), "a denied destination was connected"
        resp = Client(px).ask(request("GET", "/configured", "Host: h"))
        assert resp.status == 200 and resp.body == b"origin /configured", resp.head


def test_policy_allow_destinations_by_name_and_by_network():
    """allow_destinations = localhost, .ok.invalid, 192.0.2.0/24: localhost is served by GET
    and CONNECT though 127.0.0.1 is no allowed network (a name allowed needs no network); the
    .ok.invalid domain passes (502 dns); 127.0.0.1 and [::1] as literals are not allowed (403
    error=destination_not_allowed), nor a name on the deny list. With networks only
    (127.0.0.0/8, ::1): 127.0.0.1 and localhost are served, [::2] and 192.0.2.1 are not, any
    name is looked up. With a name only: any other name is refused before its lookup. An
    allowed name resolving into a denied network is refused as denied."""
    with origin() as o, Server(echo_handler) as echo:
        oport, eport = o.port, echo.port
        access = {"connect_ports": "443, %d" % eport}
        px = http_policy(connect_timeout=2, access=dict(
            access, allow_destinations="localhost, .ok.invalid, 192.0.2.0/24",
            deny_destinations="bad.ok.invalid"))
        check_targets(px, [("GET", "localhost:%d" % oport, 200, None),
                           ("GET", "LOCALHOST:%d" % oport, 200, None),
                           ("CONNECT", "localhost:%d" % eport, 200, None),
                           ("GET", "ok.invalid", 502, "dns"),
                           ("GET", "a.b.OK.invalid.", 502, "dns"),
                           ("CONNECT", "x.ok.invalid:443", 502, "dns"),
                           ("GET", "bad.ok.invalid", 403, "destination_denied"),
                           ("GET", "127.0.0.1:%d" % oport, 403, "destination_not_allowed"),
                           ("GET", "[::1]:%d" % oport, 403, "destination_not_allowed"),
                           ("CONNECT", "127.0.0.1:%d" % eport, 403, "destination_not_allowed")])
        assert (o.conns, echo.conns) == (2, 1), (o.conns, echo.conns)

        px = http_policy(connect_timeout=2, access=dict(
            access, allow_destinations="127.0.0.0/8, ::1"))
        check_targets(px, [("GET", "127.0.0.1:%d" % oport, 200, None),
                           ("GET", "localhost:%d" % oport, 200, None),
                           ("CONNECT", "127.0.0.1:%d" % eport, 200, None),
                           ("GET", "[::2]:8080", 403, "destination_not_allowed"),
                           ("GET", "192.0.2.1:8080", 403, "destination_not_allowed"),
                           ("CONNECT", "192.0.2.1:443", 403, "destination_not_allowed"),
                           ("GET", "name.invalid", 502, "dns")])

        px = http_policy(connect_timeout=2, access=dict(access, allow_destinations="localhost"))
        check_targets(px, [("GET", "localhost:%d" % oport, 200, None),
                           ("GET", "other.invalid", 403, "destination_not_allowed"),
                           ("CONNECT", "other.invalid:443", 403, "destination_not_allowed"),
                           ("GET", "127.0.0.1:%d" % oport, 403, "destination_not_allowed")])

        px = http_policy(access=dict(access, allow_destinations="localhost",
                                     deny_destinations="127.0.0.0/8"))
        check_targets(px, [("GET", "localhost:%d" % oport, 403, "destination_denied")])
        assert o.conns == 5, o.conns


# ---- the config ------------------------------------------------------------------------------

BAD = [  # (text after check_config's 5 lines, the line at fault, what the error must say)
    ("[access]\ndeny_destinations = *.example.com\n", 7,
     "deny_destinations: '*.example.com': write .example.com"),
    ("[access]\nallow_destinations = a.invalid,\n  *.example.com\n", 8,
     "allow_destinations: '*.example.com': write .example.com"),
    ("[access]\ndeny_destinations = a..b\n", 7, "deny_destinations: 'a..b'"),
    ("[access]\ndeny_destinations = http://a.invalid/\n", 7, "deny_destinations: 'http:"),
    ("[access]\ndeny_destinations = 10.0.0.0/33\n", 7, "deny_destinations: '10.0.0.0/33'"),
    ("[access]\ntrusted_proxies = lb.invalid\n", 7, "trusted_proxies: 'lb.invalid'"),
    ("[limits]\nexempt = 10.0.0.0/33\n", 7, "exempt: '10.0.0.0/33'"),
    ("[limits]\nexempt = 10.0.0.0/8,\n  ::1/129\n", 8, "exempt: '::1/129'"),
    ("[limits]\nrequest_burst = 5\n", 7, "request_burst"),
    ("[limits]\nlimit_by = user\n", 7, "limit_by"),
    ("[limits]\nlimit_by = ip\n", 7, "limit_by"),
    ("[limits]\nconnections_per_client = -1\n", 7, "connections_per_client"),
    ("[limits]\nclients = 10\n", 7, "clients"),
]
GOOD = [
    "[access]\ndeny_destinations = a.invalid,\n  .b.invalid,\n\t10.0.0.0/8, [::2], ::3\n"
    "allow_destinations = Example.COM., 192.0.2.0/24\ntrusted_proxies = 127.0.0.1, ::1\n",
    "[limits]\nconnections_per_client = 10\nrequests_per_second = 5\nrequest_burst = 10\n"
    "clients = 10000\nexempt = 10.0.0.0/8,\n  fd00::/8\n",
    "[users]\nalice = x\n[limits]\nlimit_by = user\nrequests_per_second = 1\n",
    "[limits]\nexempt =\n[access]\ndeny_destinations =\n",
]


def test_policy_bad_items_exit_2_naming_file_and_line_and_good_lists_load():
    failures = []
    for text, line, want in BAD:
        path, results = check_config(text)
        for status, err in results:
            if status != 2 or not err.startswith("%s:%d: " % (path, line)) or want not in err:
                failures.append("%r: exit %s, %r (want line %d, %r)" % (text, status, err, line,
                                                                        want))
    for text in GOOD:
        _, ((status, err),) = check_config(text, serve=False)
        if status != 0:
            failures.append("%r refused: %r" % (text, err))
    assert not failures, "\n".join(failures)


def test_policy_silent_balancer_connections_hold_no_worker_while_their_header_is_awaited():
    """workers = 2, trusted_proxies = 127.0.0.1: two connections from the balancer that send
    nothing yet (a balancer may send the header only with its client's first bytes) wait
    parked, as any new connection does: a request from another client is answered at once,
    not after header_timeout. A header that then comes is read and its request served, and a
    header alone still leaves the first request head its header_timeout from accept (408); a
    header that never comes is refused with 400 at header_timeout, counted as proxy_header; a
    connection closed before any byte (a health check) is no refusal."""
    with origin() as o:
        px = http_policy(o.addr, workers=2, header_timeout=3, keepalive_timeout=60,
                         access={"trusted_proxies": "127.0.0.1",
                                 "allow": "127.0.0.0/8, 192.0.2.0/24"})
        quiet = [Peer(px, "127.0.0.1") for _ in range(2)]
        late, headless = Peer(px, "127.0.0.1"), Peer(px, "127.0.0.1")
        px.wait_metric("proxy_connections_parked", 4)  # none holds a worker
        resp = Peer(px, "127.0.0.2", timeout=2).ask(get(o, "/beside"))
        assert resp.status == 200, resp.head
        resp = late.ask(proxy_v1("192.0.2.7", 5555) + get(o, "/late"))
        assert resp.status == 200 and resp.body == b"origin /late", resp.head
        wait_log_count(px, LOG + r"192\.0\.2\.7:5555 - GET \S+ 200 ", 1)
        # A header alone, after the wait: the first request head is still due header_timeout
        # from accept (408), not keepalive_timeout.
        headless.send(proxy_v1("192.0.2.8", 5555))
        headless.sock.settimeout(20)
        resp = headless.response()
        assert resp.status == 408, resp.head
        Peer(px, "127.0.0.1").close()  # a balancer's health check: connect, close
        for c in quiet:
            c.sock.settimeout(10)
            resp = c.response()
            assert resp.status == 400 and resp.get("connection") == ["close"], resp.head
        px.wait_metric('proxy_connections_refused_total{reason="proxy_header"}', 2)
        for c in quiet + [late, headless]:
            c.close()
        wait_for("every connection closed", lambda: px.metric("proxy_connections_active") == 0)
        m = px.metrics()  # the health check was no refusal
        assert m['proxy_connections_refused_total{reason="proxy_header"}'] == 2, m
        assert m['proxy_connections_closed_total{reason="refused"}'] == 2, m


def test_policy_a_client_told_to_wait_is_made_to_wait_holding_no_worker():
    """requests_per_second = 1: a second request at once gets 429 with Retry-After: 1 on a
    kept connection, and the next request sent at once on that connection is not read until
    then: its answer comes no sooner than a second after the 429, while the connection waits
    parked (holding no worker); then it is served, even with keepalive_timeout = 1: the time
    it was not read is not idle time."""
    with origin() as o:
        px = http_policy(o.addr, limits={"requests_per_second": 1}, keepalive_timeout=1)

        def run(src):
            c = Peer(px, src)
            start = time.monotonic()
            assert c.ask(get(o, "/first")).status == 200
            asked = time.monotonic()  # the hold starts later, when the 429 goes out
            resp = c.ask(get(o, "/second"))
            expect(is_429(resp), start, 1, "the second request in a second: %r" % resp.head)
            c.send(get(o, "/third"))
            px.wait_metric("proxy_connections_parked", 1)
            resp = c.response()
            waited = time.monotonic() - asked
            assert waited >= 0.95, "answered %.2f s after Retry-After: 1" % waited
            assert resp.status == 200 and resp.body == b"origin /third", resp.head
            return src

        tried(run)
