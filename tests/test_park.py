"""tests/test_park.py — the waiting room: connections idle between requests (http), and relays
and tunnels with no byte moving (tcp mode, CONNECT), leave their worker and wait in the
acceptor's epoll set, then go back to whichever worker is free when they become readable.

What is checked: a client is served while every worker's previous client sits idle (and is
starved with park_after = 0); a parked keep-alive connection wakes for its next request, a
pipelined pair included, on the same upstream connection; parked tunnels, upgrades and tcp
relays resume both ways with every byte intact over several park/wake cycles, half-closed ones
included; an upstream that closes its kept-alive connection while the client is parked;
keepalive_timeout and idle_timeout, counted from the last byte; 200 clients on 2 workers;
requests and bytes racing the park; SIGTERM with parked and busy connections;
max_connections, parked connections counted; a woken connection does not take a new one's
place in the queue; auth failures survive parking; when a connection must not park; the new
config keys, the fd plan and the metrics. Every test name starts with test_park_ (run.py -k
test_park_)."""
import base64
import hashlib
import os
import queue
import re
import resource
import select
import signal
import socket
import subprocess
import threading
import time

from lib import TMP, Proxy, Server, closed_port, connect, echo_handler, write_ini
from test_http import (ESTABLISHED, Client, Message, Reader, get, origin, read_body, reply,
                       request, wait_for)
from test_http_upstreams import reset, wait_log

# TIME CLIENT -> UPSTREAM up=N down=N ms=F end=REASON
TCP_LOG = re.compile(r"^\S+ (\S+) -> (\S+) up=(\d+) down=(\d+) ms=\S+ end=(\w+)$")


def limit(seconds):
    """Sets the test's time limit in run.py."""
    def set_limit(fn):
        fn.limit = seconds
        return fn
    return set_limit


# ---- helpers ------------------------------------------------------------------------------

class StoppingProxy(Proxy):
    """A Proxy whose with-block ends by starting its stop (SIGTERM) without waiting: finish()
    waits for it and checks how it ended after the test, so the proxies of a test stop side
    by side instead of a second or so each in turn."""

    def __exit__(self, *exc):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)


def http_px(upstream=None, sections=None, **keys):
    """An http-mode proxy without auth that parks after 100 ms unless told otherwise."""
    keys.setdefault("park_after", 100)
    keys.setdefault("header_timeout", 5)
    return StoppingProxy(upstream, mode="http", sections=sections, **keys)


def tcp_px(upstream, **keys):
    keys.setdefault("park_after", 100)
    return StoppingProxy(upstream, mode="tcp", **keys)


def tunnel_sections(port):
    """CONNECT may reach the test server's port on loopback."""
    return {"access": {"connect_ports": "443, %d" % port, "local_destinations": "allow"}}


def numbered_origin(after=None):
    """A keep-alive origin that answers each request '<connection number> <target>', so a
    response tells which upstream connection carried it. .seen holds (connection, target,
    method, body). after(connection number, socket), called after each answer, ends that
    connection when it returns true."""
    def handler(c, server):
        with server.lock:
            server.index += 1
            i = server.index
        r = Reader(c)
        try:
            while True:
                req = Message(r.until(b"\r\n\r\n"))
                req.body = read_body(r, req)
                with server.lock:
                    server.seen.append((i, req.target, req.line.split(" ")[0], req.body))
                c.sendall(reply(200, b"%d %s" % (i, req.target.encode())))
                if after and after(i, c):
                    return
        except (EOFError, ValueError, OSError):
            pass
        finally:
            with server.lock:
                server.ended += 1

    srv = Server(handler)
    srv.index, srv.ended, srv.seen = 0, 0, []
    return srv


def held_upstream():
    """A server that hands each accepted socket to the test (.socks, a queue) and keeps it open
    until .release is set, so the test can send and read on the upstream side itself."""
    def handler(c, server):
        c.settimeout(10)
        server.socks.put(c)
        server.release.wait(30)

    srv = Server(handler)
    srv.socks, srv.release = queue.Queue(), threading.Event()
    return srv


def recv_exactly(s, n):
    out = bytearray()
    while len(out) < n:
        d = s.recv(min(1 << 20, n - len(out)))
        if not d:
            raise EOFError("EOF after %d of %d bytes" % (len(out), n))
        out += d
    return bytes(out)


def through(src, dst, data, reader=None):
    """Sends data on src (from a thread) and returns the sha256 of the len(data) bytes that
    arrive on dst (or through reader, a test_http.Reader of dst)."""
    err = []

    def send():
        try:
            src.sendall(data)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    got = reader.exactly(len(data)) if reader else recv_exactly(dst, len(data))
    t.join(10)
    assert not err, "send failed: %s" % err
    return hashlib.sha256(got).hexdigest()


def sha(data):
    return hashlib.sha256(data).hexdigest()


def readable(s, timeout):
    """Whether s has a byte (or EOF) to read within timeout."""
    return bool(select.select([s], [], [], timeout)[0])


def eof_within(s, timeout, buffered=b""):
    """Whether the peer closes s (EOF or reset) within timeout, with nothing read first."""
    s.settimeout(timeout)
    try:
        return buffered == b"" and s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def wait_parks(px, at_least, timeout=5):
    """Waits until proxy_parks_total reaches at_least; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        got = px.metric("proxy_parks_total")
        if got is not None and got >= at_least:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("proxy_parks_total is %s, want >= %d" % (got, at_least))
        time.sleep(0.05)


def wait_parked(px, n, timeout=5):
    px.wait_metric("proxy_connections_parked", n, timeout)


def run_proxy(*args, **kw):
    return subprocess.run([os.environ.get("PROXY_BIN", "./proxy"), *args], capture_output=True,
                          text=True, timeout=10, **kw)


# ---- 1. idle clients do not hold the workers ---------------------------------------------

@limit(30)
def test_park_a_third_client_is_served_while_both_workers_hold_idle_keepalive_clients():
    with origin() as o:
        with http_px(o.addr, workers=2) as px:
            idle = [Client(px, timeout=5) for _ in range(2)]
            for i, c in enumerate(idle):
                assert c.ask(get(o, "/idle%d" % i)).status == 200
            third = Client(px, timeout=5)
            start = time.monotonic()
            try:
                resp = third.ask(get(o, "/third"))
            except socket.timeout:
                raise AssertionError("the third client got no response in 5 s: the two idle "
                                     "keep-alive clients still hold both workers")
            assert time.monotonic() - start < 3, "answered only after %.1f s" % (
                time.monotonic() - start)
            assert resp.status == 200 and resp.body == b"origin /third", resp.head
            wait_parked(px, 3)  # all three now idle, in the waiting room
            m = px.metrics()
            assert m["proxy_workers_busy"] == 0 and m["proxy_connections_active"] == 3, m
            for c in idle:  # and the idle ones still work
                assert c.ask(get(o, "/again")).status == 200
        # park_after = 0 is the old behaviour: the third client starves while the others idle.
        with http_px(o.addr, workers=2, park_after=0) as px:
            idle = [Client(px, timeout=5) for _ in range(2)]
            for c in idle:
                assert c.ask(get(o, "/idle")).status == 200
            third = Client(px, timeout=5)
            third.send(get(o, "/starved"))
            assert not readable(third.sock, 2), "served with park_after = 0: nothing holds?"
            assert px.metric("proxy_parks_total") == 0
            idle[0].close()  # a worker frees: now the third is served
            resp = third.response()
            assert resp.status == 200 and resp.body == b"origin /starved", resp.head


# ---- 2. a parked keep-alive connection wakes for its next request ------------------------

@limit(30)
def test_park_a_parked_keepalive_connection_wakes_on_another_worker_and_reuses_its_upstream():
    with numbered_origin() as o, http_px(o.addr, workers=1) as px:
        a = Client(px, timeout=5)
        assert a.ask(get(o, "/a1")).body == b"1 /a1"
        wait_parked(px, 1)
        m = px.metrics()
        assert m["proxy_parks_total"] == 1 and m["proxy_workers_busy"] == 0, m
        # The only worker is free: another client is served while a is parked.
        b = Client(px, timeout=5)
        try:
            assert b.ask(get(o, "/b1")).body == b"2 /b1"
        except socket.timeout:
            raise AssertionError("a parked connection still holds the only worker")
        wait_parked(px, 2)
        # a's next request wakes it; it goes on on its own upstream connection.
        assert a.ask(get(o, "/a2")).body == b"1 /a2", "upstream connection not reused"
        assert px.metric("proxy_wakeups_total") >= 1
        assert b.ask(get(o, "/b2")).body == b"2 /b2"
        wait_parked(px, 2)
        parks = wait_parks(px, 4)
        # A pipelined pair sent to a parked connection: both answered, in order.
        a.send(get(o, "/a3") + get(o, "/a4"))
        r3, r4 = a.response(), a.response()
        assert (r3.body, r4.body) == (b"1 /a3", b"1 /a4"), (r3.head, r3.body, r4.body)
        assert b.ask(get(o, "/b3")).body == b"2 /b3"
        wait_parked(px, 2)
        m = px.metrics()
        assert m["proxy_parks_total"] > parks, m
        assert m["proxy_wakeups_total"] >= 4, m  # a2, b2, a3 + a4, b3
        assert m["proxy_wakeups_total"] <= m["proxy_parks_total"], m
        assert o.index == 2 and o.ended == 0, "upstream connections: %d, ended %d" % (
            o.index, o.ended)
        assert [t for i, t, _, _ in o.seen if i == 1] == ["/a1", "/a2", "/a3", "/a4"], o.seen
        statuses = [line[3] for line in wait_log(px, "GET", 7)]
        assert statuses == ["200"] * 7, statuses
        # Clients that leave while parked: woken by the hang-up, closed with their upstream
        # connections.
        wakeups = px.metric("proxy_wakeups_total")
        a.close()
        b.close()
        px.wait_metric("proxy_connections_active", 0)
        wait_for("the parked upstream connections to close", lambda: o.ended == 2)
        m = px.metrics()
        assert m["proxy_connections_parked"] == 0 and m["proxy_wakeups_total"] >= wakeups + 1, m


# ---- 3. parked tunnels and relays resume both ways -----------------------------------------

def park_wake_cycles(px, client_sock, up_sock, reader=None, cycles=3):
    """Several times: wait until the connection parked (again), send a random payload from
    the client, then after the next park one from the upstream; each must arrive intact."""
    parks = px.metric("proxy_parks_total") or 0
    for cycle in range(cycles):
        for direction in ("up", "down"):
            parks = wait_parks(px, parks + 1)
            wait_parked(px, 1)
            data = os.urandom((256 << 10) + cycle * 1000 + (direction == "up"))
            if direction == "up":
                got = through(client_sock, up_sock, data)
            else:
                got = through(up_sock, client_sock, data, reader)
            assert got == sha(data), "cycle %d, %s: bytes changed" % (cycle, direction)
    assert px.metric("proxy_wakeups_total") >= 2 * cycles


@limit(45)
def test_park_a_parked_connect_tunnel_and_tcp_relay_resume_both_ways_bytes_intact():
    with held_upstream() as up:
        try:
            with http_px(sections=tunnel_sections(up.port), workers=1) as px:
                c = Client(px, timeout=10)
                c.send(request("CONNECT", up.addr, "Host: " + up.addr))
                assert c.r.exactly(len(ESTABLISHED)) == ESTABLISHED, c.r.buf
                u = up.socks.get(timeout=5)
                park_wake_cycles(px, c.sock, u, c.r)
                # a parked tunnel does not hold the only worker
                other = Client(px, timeout=5)
                other.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")  # origin-form, no upstream
                assert other.response().status == 400
                other.close()  # else the worker drains it for 2 s
                c.sock.shutdown(socket.SHUT_WR)
                assert u.recv(1) == b"", "the client's EOF did not cross the tunnel"
                u.close()
                assert eof_within(c.sock, 5, c.r.buf)
                lines = wait_log(px, "CONNECT", 1)
                assert len(lines) == 1 and lines[0][3] == "200", lines
            with tcp_px(up.addr, workers=1) as px:
                s = connect(px.addr)
                u = up.socks.get(timeout=5)
                s.sendall(b"hello")
                assert recv_exactly(u, 5) == b"hello"
                park_wake_cycles(px, s, u)
                # Half-closed: the client's side at EOF is not watched while parked (no wake-up
                # loop on it), and the other direction still wakes the relay.
                s.shutdown(socket.SHUT_WR)
                assert u.recv(1) == b"", "the client's EOF did not reach the upstream"
                parks = wait_parks(px, px.metric("proxy_parks_total") + 1)
                wait_parked(px, 1)
                wakeups = px.metric("proxy_wakeups_total")
                time.sleep(0.5)
                m = px.metrics()
                assert (m["proxy_wakeups_total"], m["proxy_parks_total"]) == (wakeups, parks), \
                    "a half-closed parked relay keeps waking: %s" % m
                data = os.urandom(100000)
                assert through(u, s, data) == sha(data)
                u.shutdown(socket.SHUT_WR)
                assert eof_within(s, 5)
                s.close()
                px.wait_line(r"end=done")
        finally:
            up.release.set()


@limit(30)
def test_park_a_parked_101_upgrade_resumes_both_ways_bytes_intact():
    def handler(c, server):
        c.settimeout(10)
        r = Reader(c)
        Message(r.until(b"\r\n\r\n"))
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\n")
        server.socks.put(c)
        server.release.wait(30)

    with Server(handler) as up:
        up.socks, up.release = queue.Queue(), threading.Event()
        try:
            with http_px(up.addr, workers=1) as px:
                c = Client(px, timeout=10)
                resp = c.ask(get(up, "/ws", "Connection: Upgrade", "Upgrade: websocket"))
                assert resp.status == 101, resp.head
                u = up.socks.get(timeout=5)
                park_wake_cycles(px, c.sock, u, c.r, cycles=2)
                assert px.metric("proxy_http_upgrades_total") == 1
                other = Client(px, timeout=5)  # a parked upgrade does not hold the only worker
                other.send(request("GET", "http://127.0.0.1:%d/" % closed_port(), "Host: h"))
                assert other.response().status == 502
                other.close()
                # The upstream half-closes: the client sees EOF; the relay parks again without
                # watching the side at EOF, and the client's bytes still go up.
                u.shutdown(socket.SHUT_WR)
                assert eof_within(c.sock, 5, c.r.buf), "the upstream's EOF did not arrive"
                parks = wait_parks(px, px.metric("proxy_parks_total") + 1)
                wait_parked(px, 1)
                wakeups = px.metric("proxy_wakeups_total")
                time.sleep(0.3)
                m = px.metrics()
                assert (m["proxy_wakeups_total"], m["proxy_parks_total"]) == (wakeups, parks), \
                    "a half-closed parked upgrade keeps waking: %s" % m
                data = os.urandom(100000)
                assert through(c.sock, u, data) == sha(data)
        finally:
            up.release.set()


# ---- 4. the upstream closes while the client is parked -------------------------------------

@limit(30)
def test_park_upstream_closing_its_connection_while_the_client_is_parked_is_replaced():
    """Upstream connection 1 closes (FIN) and connection 2 resets while their client is parked.
    Each next request, a POST included, must be answered on a new upstream connection, sent
    exactly once, and the client connection must outlive them."""
    closed = {1: threading.Event(), 2: threading.Event()}
    go = {1: threading.Event(), 2: threading.Event()}

    def close_after_go(i, c):
        if i not in go:
            return False
        go[i].wait(10)
        if i == 1:
            c.shutdown(socket.SHUT_RDWR)
        else:
            reset(c)
        closed[i].set()
        return True

    with numbered_origin(close_after_go) as up, http_px(up.addr, workers=1) as px:
        c = Client(px, timeout=5)
        body = b"post body, once"
        asks = [get(up, "/1"),
                request("POST", "http://%s/2" % up.addr, "Host: h",
                        "Content-Length: %d" % len(body), body=body),
                get(up, "/3")]
        for n, ask in enumerate(asks, 1):
            resp = c.ask(ask)
            assert resp.status == 200 and resp.body == b"%d /%d" % (n, n), (n, resp.head,
                                                                            resp.body)
            if n in go:
                wait_parked(px, 1)
                go[n].set()
                assert closed[n].wait(5)
                time.sleep(0.3)  # the FIN or reset has reached the waiting room
                assert not readable(c.sock, 0.2), "the client connection ended with the " \
                                                  "upstream's"
                wait_parked(px, 1)
        assert up.conns == 3, "upstream connections: %d" % up.conns
        assert up.seen == [(1, "/1", "GET", b""), (2, "/2", "POST", body),
                           (3, "/3", "GET", b"")], up.seen
        assert px.metric("proxy_http_retries_total") == 0
        assert [l[3] for l in wait_log(px, None, 3)] == ["200"] * 3


# ---- 5. timeouts in the waiting room -------------------------------------------------------

@limit(30)
def test_park_keepalive_timeout_closes_a_parked_http_connection():
    with origin() as o, http_px(o.addr, keepalive_timeout=1, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(o, "/1")).status == 200
        done = time.monotonic()
        wait_parked(px, 1)
        assert eof_within(c.sock, 4, c.r.buf), "still open 4 s after keepalive_timeout = 1"
        took = time.monotonic() - done
        assert 0.8 < took < 4, "closed %.1f s after the response" % took
        px.wait_metric("proxy_waiting_room_timeouts_total", 1)
        px.wait_metric('proxy_connections_closed_total{reason="idle"}', 1)
        m = px.metrics()
        assert m["proxy_connections_parked"] == 0 and m["proxy_connections_active"] == 0, m
        # keepalive_timeout is about the time between requests, not the connection's age
        c = Client(px, timeout=5)
        for i in range(3):
            assert c.ask(get(o, "/%d" % i)).status == 200
            time.sleep(0.5)
        assert px.metric("proxy_waiting_room_timeouts_total") == 1
    # Not parked (park_after = 60 s): keepalive_timeout still closes it, in its worker.
    with origin() as o, http_px(o.addr, keepalive_timeout=1, park_after=60000) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(o, "/1")).status == 200
        assert eof_within(c.sock, 4, c.r.buf), "an unparked idle connection outlived " \
                                               "keepalive_timeout = 1"
        px.wait_metric('proxy_connections_closed_total{reason="idle"}', 1)
        m = px.metrics()
        assert (m["proxy_parks_total"], m["proxy_waiting_room_timeouts_total"]) == (0, 0), m


@limit(30)
def test_park_idle_timeout_closes_a_parked_tcp_relay_with_one_log_line():
    with Server(echo_handler) as echo, tcp_px(echo.addr, idle_timeout=1) as px:
        s = connect(px.addr, timeout=5)
        me = "%s:%d" % s.getsockname()
        sent = 0
        for i in range(3):  # three park/wake cycles, each well within idle_timeout
            msg = b"ping %d" % i
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
            sent += len(msg)
            wait_parks(px, i + 1)
        wait_parked(px, 1)
        start = time.monotonic()
        assert eof_within(s, 4), "still open 4 s after idle_timeout = 1"
        assert time.monotonic() - start < 4
        px.wait_metric("proxy_waiting_room_timeouts_total", 1)
        px.wait_metric('proxy_connections_closed_total{reason="idle"}', 1)
        px.wait_line(r"^\S+ %s -> " % re.escape(me))
        time.sleep(0.3)
        lines = [TCP_LOG.match(l) for l in px.text().splitlines()]
        mine = [m for m in lines if m and m.group(1) == me]
        assert len(mine) == 1, "log lines for %s: %s" % (me, px.text())
        assert mine[0].group(3, 4, 5) == (str(sent), str(sent), "idle"), mine[0].group(0)
        assert px.metric("proxy_parks_total") >= 3


@limit(30)
def test_park_timeouts_count_from_the_last_byte_not_from_when_it_parked():
    """keepalive_timeout is the time idle between requests, idle_timeout the time without a
    byte either way, parked or not: the park_after before parking counts too. park_after = 2 s,
    timeouts 3 s: closed about 3 s after the last byte, not about 5 s (park_after + 3)."""
    with origin() as o, Server(echo_handler) as echo, \
            http_px(o.addr, park_after=2000, keepalive_timeout=3, idle_timeout=60) as hx, \
            tcp_px(echo.addr, park_after=2000, idle_timeout=3) as tx:
        c = Client(hx, timeout=10)
        assert c.ask(get(o, "/1")).status == 200
        http_last = time.monotonic()
        s = connect(tx.addr, timeout=10)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        tcp_last = time.monotonic()
        left = {c.sock: ("http", http_last), s: ("tcp", tcp_last)}
        closed = {}
        deadline = time.monotonic() + 8
        while left and time.monotonic() < deadline:
            for sock in select.select(list(left), [], [], deadline - time.monotonic())[0]:
                assert sock.recv(1) == b"", "bytes instead of a close"
                name, last = left.pop(sock)
                closed[name] = round(time.monotonic() - last, 2)
        assert set(closed) == {"http", "tcp"}, "not closed within 8 s: %s" % closed
        for px in (hx, tx):  # counted once closed, a moment after the client sees the close
            px.wait_metric('proxy_connections_closed_total{reason="idle"}', 1)
            m = px.metrics()
            assert m["proxy_parks_total"] == 1, "it never parked: %s" % m
        assert all(2.5 < t < 4.5 for t in closed.values()), \
            "seconds from the last byte to the close, with timeouts of 3 s: %s" % closed


# ---- many idle clients, and bytes racing the park ------------------------------------------

@limit(45)
def test_park_two_workers_serve_200_keepalive_clients_in_turn():
    # header_timeout = 30: the first head counts from accept, and the last of 200 clients
    # served in turn by 2 workers may wait seconds on a loaded machine; this is about turns.
    with origin() as o, http_px(o.addr, workers=2, max_connections=300,
                                header_timeout=30) as px:
        clients = [Client(px, timeout=10) for _ in range(200)]
        for rnd in range(2):
            for i, c in enumerate(clients):
                c.send(get(o, "/%d-%d" % (rnd, i)))
            for i, c in enumerate(clients):
                resp = c.response()
                assert resp.status == 200 and resp.body == b"origin /%d-%d" % (rnd, i), (
                    rnd, i, resp.head)
        wait_parked(px, 200, timeout=10)
        m = px.metrics()
        assert m["proxy_connections_active"] == 200 and m["proxy_workers_busy"] == 0, m
        assert o.conns == 200, "upstream connections: %d (one per client, reused)" % o.conns
        for c in clients:
            c.close()
        px.wait_metric("proxy_connections_active", 0, timeout=10)


@limit(40)
def test_park_staggered_deadlines_each_close_on_time():
    """Keep-alive clients (keepalive_timeout 3 s) and CONNECT tunnels (idle_timeout 1 s)
    parked in turn, 0.1 s apart, so that a later one often has the nearer deadline: each is
    closed its own timeout after its own last byte. The waiting room keeps their deadlines
    in a heap and wakes for the nearest, so none waits for another's."""
    with origin() as o, Server(echo_handler) as echo, \
            http_px(o.addr, workers=2, keepalive_timeout=3, idle_timeout=1, park_after=50,
                    sections=tunnel_sections(echo.port)) as px:
        socks, last, timeout = [], [], []
        for i in range(24):
            c = Client(px, timeout=10)
            if i % 2:
                c.send(request("CONNECT", echo.addr, "Host: " + echo.addr))
                assert Message(c.r.until(b"\r\n\r\n")).status == 200
                c.send(b"x")
                assert c.r.exactly(1) == b"x"
                timeout.append(1)
            else:
                assert c.ask(get(o, "/%d" % i)).status == 200
                timeout.append(3)
            last.append(time.monotonic())
            socks.append(c.sock)
            time.sleep(0.1)
        closed = {}
        deadline = time.monotonic() + 15
        while len(closed) < len(socks) and time.monotonic() < deadline:
            open_ = [s for i, s in enumerate(socks) if i not in closed]
            for s in select.select(open_, [], [], 1)[0]:
                try:
                    gone = s.recv(1) == b""
                except ConnectionResetError:
                    gone = True
                if gone:
                    closed[socks.index(s)] = time.monotonic()
        off = {i: round(closed[i] - last[i], 2) for i in closed
               if not timeout[i] - 0.2 < closed[i] - last[i] < timeout[i] + 1.5}
        assert len(closed) == len(socks) and not off, (len(closed), off)


@limit(45)
def test_park_requests_and_bytes_racing_the_park_are_never_lost():
    """park_after = 20 ms and pauses of 0 to 40 ms: requests (some pipelined in pairs) and
    relay bytes often arrive just as the connection parks or wakes."""
    rnd = __import__("random").Random(13)
    with numbered_origin() as o, Server(echo_handler) as echo, \
            http_px(o.addr, workers=2, park_after=20) as hx, \
            tcp_px(echo.addr, workers=2, park_after=20) as tx:
        c = Client(hx, timeout=5)
        for i in range(50):
            time.sleep(rnd.random() * 0.04)
            if i % 3 == 0:
                c.send(get(o, "/p%d" % i) + get(o, "/q%d" % i))
                got = (c.response().body, c.response().body)
                assert got == (b"1 /p%d" % i, b"1 /q%d" % i), (i, got)
            else:
                assert c.ask(get(o, "/%d" % i)).body == b"1 /%d" % i, i
        assert hx.metric("proxy_parks_total") > 5, "hardly parked: the test tested nothing"
        s = connect(tx.addr, timeout=5)
        for i in range(50):
            time.sleep(rnd.random() * 0.04)
            data = os.urandom(rnd.randint(1, 20000))
            assert through(s, s, data) == sha(data), i
        assert tx.metric("proxy_parks_total") > 5, "hardly parked: the test tested nothing"
        assert o.index == 1 and echo.conns == 1


# ---- 6. SIGTERM ----------------------------------------------------------------------------

def slow_answer(server, req, r):
    """/slow: a 10-byte body, a byte every 0.25 s (min_rate = 0 lets it through: the tests
    that use it want a worker held by a body); anything else: 200 at once."""
    if req.target != "/slow":
        return reply(200, b"quick")
    r.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    for i in range(10):
        time.sleep(0.25)
        r.sock.sendall(b"%d" % i)
    return b""


@limit(40)
def test_park_sigterm_closes_parked_keepalive_at_once_and_gives_parked_tunnels_the_grace():
    """SIGTERM with a keep-alive client parked between requests, a CONNECT tunnel parked, and
    a response in progress: the keep-alive client is closed at once (nothing of it was in
    progress); the tunnel goes on relaying through the grace period, parked or not, and so
    does the response; the proxy exits as soon as they are done. Before, the parked tunnel
    was cut at SIGTERM, and any relay that went quiet for park_after during the grace period
    was cut too: its client's next bytes met a closed socket (seen in CI as a reset)."""
    with origin(slow_answer) as o, Server(echo_handler) as echo, \
            http_px(o.addr, sections=tunnel_sections(echo.port), workers=4, min_rate=0) as px:
        keep = Client(px, timeout=5)
        assert keep.ask(get(o, "/quick")).body == b"quick"
        tun = Client(px, timeout=5)
        tun.send(request("CONNECT", echo.addr, "Host: " + echo.addr))
        assert tun.r.exactly(len(ESTABLISHED)) == ESTABLISHED
        tun.send(b"x")
        assert tun.r.exactly(1) == b"x"
        wait_parked(px, 2)
        busy = Client(px, timeout=10)
        busy.send(get(o, "/slow"))
        head = Message(busy.r.until(b"\r\n\r\n"))
        assert head.status == 200, head.head
        assert px.metric("proxy_workers_busy") == 1, "the parked ones still hold workers"
        px.signal(signal.SIGTERM)
        px.wait_line("stopping")
        assert eof_within(keep.sock, 2, keep.r.buf), "parked keep-alive client not closed"
        px.wait_metric('proxy_connections_closed_total{reason="stopped"}', 1, timeout=2)
        for b in (b"y", b"z"):  # woken from the room, then parked again, then woken
            tun.send(b)
            assert tun.r.exactly(1) == b, "the parked tunnel was cut by the stop"
            wait_parked(px, 1)
        assert busy.r.exactly(10) == b"0123456789", "the busy response was cut"
        # it would park now, but the proxy is stopping: closed instead
        assert eof_within(busy.sock, 3, busy.r.buf), "busy client not closed after its response"
        assert px.p.poll() is None, "the proxy left while the tunnel was open"
        tun.sock.shutdown(socket.SHUT_WR)
        assert eof_within(tun.sock, 3, tun.r.buf), "the tunnel did not end with its client"
        finished = time.monotonic()
        assert px.p.wait(5) == 0
        assert time.monotonic() - finished < 3, "the proxy waited out the grace period"
        px.wait_line(r"\bstopped$")
    # tcp mode: a parked relay, and one that goes quiet for park_after during the stop, relay on.
    with Server(echo_handler) as echo, tcp_px(echo.addr) as px:
        s = connect(px.addr, timeout=5)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        wait_parked(px, 1)
        px.signal(signal.SIGTERM)
        px.wait_line("stopping")
        for b in (b"y", b"z"):
            s.sendall(b)
            assert s.recv(1) == b, "the tcp relay was cut by the stop"
            wait_parked(px, 1)
        s.shutdown(socket.SHUT_WR)
        assert eof_within(s, 3), "the relay did not end with its client"
        finished = time.monotonic()
        assert px.p.wait(5) == 0
        assert time.monotonic() - finished < 3, "the proxy waited out the grace period"
        px.wait_line(r"end=done")


# ---- 7. max_connections --------------------------------------------------------------------

@limit(30)
def test_park_max_connections_refuses_with_503_in_http_counting_parked_connections():
    with origin() as o, http_px(o.addr, workers=8, max_connections=3) as px:
        held = [Client(px, timeout=5) for _ in range(3)]
        for i, c in enumerate(held):
            assert c.ask(get(o, "/%d" % i)).status == 200
        wait_parked(px, 3)
        assert px.metric("proxy_workers_busy") == 0, "idle clients still hold workers"
        extra = Client(px, timeout=5)  # sends nothing: a refusal does not drain what it got
        start = time.monotonic()
        resp = extra.response()
        assert time.monotonic() - start < 3
        assert resp.status == 503 and resp.get("retry-after") == ["1"], resp.head
        assert resp.get("content-length") == [str(len(resp.body))], resp.head
        assert extra.closed(), "a refused client was kept open"
        m = px.metrics()
        assert m['proxy_connections_refused_total{reason="max_connections"}'] == 1, m
        assert m.get('proxy_connections_refused_total{reason="queue_full"}', 0) == 0, m
        held[0].close()
        px.wait_metric("proxy_connections_active", 2)
        assert Client(px, timeout=5).ask(get(o, "/after")).status == 200
        for c in held[1:]:
            assert c.ask(get(o, "/still")).status == 200


@limit(30)
def test_park_max_connections_closes_the_extra_tcp_client_at_once_counting_parked_ones():
    with Server(echo_handler) as echo, tcp_px(echo.addr, workers=8, max_connections=3) as px:
        held = [connect(px.addr, timeout=5) for _ in range(3)]
        for s in held:
            s.sendall(b"a")
            assert s.recv(1) == b"a"
        wait_parked(px, 3)
        extra = connect(px.addr, timeout=5)
        try:
            extra.sendall(b"lost")
        except OSError:
            pass
        assert eof_within(extra, 3), "the 4th tcp client was not closed"
        assert echo.conns == 3, "the refused client reached the upstream"
        px.wait_metric('proxy_connections_refused_total{reason="max_connections"}', 1)
        held[0].close()
        px.wait_metric("proxy_connections_active", 2)
        again = connect(px.addr, timeout=5)
        again.sendall(b"z")
        assert again.recv(1) == b"z"
        for s in held[1:]:
            s.sendall(b"b")
            assert s.recv(1) == b"b"


@limit(30)
def test_park_a_woken_connection_in_the_queue_does_not_take_a_new_clients_place():
    """queue = 1 bounds the NEW connections waiting for a worker; a parked connection coming
    back was admitted long ago and must not count against it (README, Limits)."""
    with origin(slow_answer) as o, http_px(o.addr, workers=1, queue=1, min_rate=0) as px:
        back = Client(px, timeout=10)
        assert back.ask(get(o, "/1")).status == 200
        wait_parked(px, 1)
        busy = Client(px, timeout=10)  # holds the only worker for 2.5 s
        busy.send(get(o, "/slow"))
        assert Message(busy.r.until(b"\r\n\r\n")).status == 200
        back.send(get(o, "/2"))  # wakes, and waits in the queue
        px.wait_metric("proxy_queue_length", 1)
        new = Client(px, timeout=10)
        new.send(get(o, "/new"))
        # Taken in at once, beside the woken one: not left in the listen backlog as if the
        # woken one filled the queue's one place.
        wait_for("the new client accepted into the queue",
                 lambda: px.metric("proxy_queue_length") == 2)
        assert px.metric("proxy_connections_accepted_total") == 3
        resp = new.response()
        assert resp.status == 200 and resp.body == b"quick", resp.head
        assert busy.r.exactly(10) == b"0123456789"
        assert back.response().body == b"quick"


def test_park_auth_failures_are_counted_across_parks():
    """AUTH_FAILURES_MAX (3) 407s per connection: a guesser pausing between tries (so that the
    connection parks and comes back on another worker) does not get more."""
    with origin() as o, http_px(o.addr, sections={"users": {"alice": "s3cr3t"}}) as px:
        c = Client(px, timeout=5)
        wrong = "Proxy-Authorization: Basic " + base64.b64encode(b"alice:guess").decode()
        for i in range(3):
            if i:
                wait_parked(px, 1)
            resp = c.ask(get(o, "/%d" % i, wrong))
            assert resp.status == 407, resp.head
        assert resp.get("connection") == ["close"], "the third 407 must end it: %r" % resp.head
        assert c.closed()
        assert px.metric("proxy_parks_total") >= 2 and o.conns == 0


# ---- when a connection parks, and when not -------------------------------------------------

@limit(30)
def test_park_queue_pressure_parks_an_idle_keepalive_connection_at_once():
    """park_after = 60 s: an idle keep-alive client would hold the only worker for a minute,
    but a connection waiting in the queue makes it park at once."""
    with origin() as o, http_px(o.addr, workers=1, park_after=60000) as px:
        a = Client(px, timeout=5)
        assert a.ask(get(o, "/a")).status == 200
        time.sleep(0.5)
        assert px.metric("proxy_connections_parked") == 0, "parked before park_after"
        b = Client(px, timeout=5)
        try:
            resp = b.ask(get(o, "/b"))
        except socket.timeout:
            raise AssertionError("the queued client waited: the idle one did not park")
        assert resp.status == 200
        assert px.metric("proxy_parks_total") >= 1
        assert a.ask(get(o, "/a2")).status == 200


@limit(30)
def test_park_a_new_silent_connection_parks_at_once_when_others_wait_and_still_gets_408():
    """Fast intake: a new connection that sent nothing gives its worker up at once while
    another waits for it, and header_timeout still counts from accept, parked or not: it gets
    its 408 on time, from a worker it is given back for that."""
    with origin() as o, http_px(o.addr, workers=1, header_timeout=2, park_after=60000) as px:
        start = time.monotonic()
        silent = Client(px, timeout=10)
        time.sleep(0.2)  # the silent one has the worker
        queued = Client(px, timeout=5)
        queued.send(get(o, "/queued"))
        assert readable(queued.sock, 1.5), "a new silent connection kept the only worker"
        assert queued.response().status == 200
        assert px.metric("proxy_parks_total") >= 1
        assert silent.response().status == 408
        took = time.monotonic() - start
        assert 1.9 < took < 6, "408 after %.1f s, header_timeout is 2 s from accept" % took
        assert silent.closed()


@limit(30)
def test_park_never_in_the_middle_of_a_body():
    """A connection in the middle of a request body keeps its worker even while another
    connection waits in the queue: bytes of it may be inside the proxy (min_rate = 0, or the
    pause would end it)."""
    with origin() as o, http_px(o.addr, workers=1, min_rate=0) as px:
        up = Client(px, timeout=5)
        up.send(request("POST", "http://%s/up" % o.addr, "Host: h", "Content-Length: 10",
                        body=b"12345"))
        time.sleep(0.3)
        parks = px.metric("proxy_parks_total")
        waiting = Client(px, timeout=5)
        waiting.send(get(o, "/waiting"))
        assert not readable(waiting.sock, 1), "served while a body was half sent: it parked"
        assert px.metric("proxy_parks_total") == parks
        up.send(b"67890")
        assert up.response().status == 200
        assert waiting.response().status == 200
        assert [r.body for r in o.received if r.target == "/up"] == [b"1234567890"]


@limit(30)
def test_park_a_half_sent_head_parks_with_its_bytes_when_others_wait():
    """Slow heads: a client that sends half a request head and stalls gives its worker up
    (time_slice = 1 ms: at once) while another waits, the half it sent going with it in a head
    buffer; when the rest comes, on another turn, the request is whole and served, byte for
    byte. With head_buffers = 0 there is nowhere to carry it: it keeps its worker, and the
    other waits."""
    for buffers in (1, 0):
        with origin() as o, http_px(o.addr, workers=1, time_slice=1, min_rate=0,
                                    head_buffers=buffers, header_timeout=10) as px:
            half = Client(px, timeout=10)
            head = get(o, "/split", "X-Pad: %s" % ("p" * 3000))
            half.send(head[:1500])
            time.sleep(0.3)  # it holds the only worker, half a head read
            other = Client(px, timeout=10)
            other.send(get(o, "/other"))
            if buffers:
                assert readable(other.sock, 3), "a half-sent head kept the only worker"
                assert other.response().status == 200
                assert px.metric("proxy_parks_total") >= 1
            else:
                assert not readable(other.sock, 1), "parked a head with no buffer to carry it"
            half.send(head[1500:])
            resp = half.response()
            assert resp.status == 200 and resp.body == b"origin /split", resp.head
            got = [r for r in o.received if r.target == "/split"]
            assert len(got) == 1 and got[0].get("x-pad") == ["p" * 3000], got
            if not buffers:
                assert other.response().status == 200


# ---- config and metrics --------------------------------------------------------------------

def test_park_metrics_gauges_and_counters_are_exported():
    with origin() as o, http_px(o.addr) as px:
        import urllib.request
        with urllib.request.urlopen("http://%s:%d/metrics" % px.metrics_addr, timeout=5) as r:
            body = r.read().decode()
        for name, kind in (("proxy_connections_parked", "gauge"),
                           ("proxy_workers_busy", "gauge"),
                           ("proxy_queue_length", "gauge"),
                           ("proxy_connections_active", "gauge"),
                           ("proxy_parks_total", "counter"),
                           ("proxy_wakeups_total", "counter"),
                           ("proxy_waiting_room_timeouts_total", "counter")):
            assert re.search(r"^# TYPE %s %s$" % (name, kind), body, re.M), (name, body)
            assert re.search(r"^%s 0$" % name, body, re.M), (name, body)
        assert 'proxy_connections_refused_total{reason="max_connections"} 0' in body, body
        c = Client(px, timeout=5)
        assert c.ask(get(o, "/x")).status == 200
        wait_parked(px, 1)
        m = px.metrics()
        assert (m["proxy_connections_active"], m["proxy_workers_busy"],
                m["proxy_queue_length"], m["proxy_parks_total"]) == (1, 0, 0, 1), m


def test_park_config_keys_are_range_checked():
    base = "[proxy]\nmode = tcp\nupstream = 127.0.0.1:80\n"
    for line in ("park_after = 60001", "park_after = -1", "keepalive_timeout = 604801",
                 "keepalive_timeout = x", "max_connections = lots"):
        path = os.path.join(TMP, "park-bad.ini")
        with open(path, "w") as f:
            f.write(base + line + "\n")
        r = run_proxy("-t", "-c", path)
        assert r.returncode == 2, (line, r)
        assert r.stderr.startswith(path + ":4: "), (line, r.stderr)
    good = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80", "park_after": 0,
                                "keepalive_timeout": 0, "max_connections": 12345}},
                     "park-good.ini")
    r = run_proxy("-t", "-c", good)
    assert r.returncode == 0 and "configuration ok" in r.stdout, r
    assert "12345" in r.stdout, "the plan does not mention max_connections: %s" % r.stdout
    # A full load the fd limit cannot hold: -t and the start-up say so.
    big = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80", "workers": 8,
                               "max_connections": 5000}}, "park-fds.ini")
    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    warning = "lower max_connections to "
    r = run_proxy("-t", "-c", big, preexec_fn=low)
    assert r.returncode == 0 and warning in r.stdout + r.stderr, r
    small = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80", "workers": 8,
                                 "max_connections": 100}}, "park-fds-ok.ini")
    r = run_proxy("-t", "-c", small, preexec_fn=low)
    assert r.returncode == 0 and warning not in r.stdout + r.stderr, r
    with Server(echo_handler) as echo:
        px = Proxy(echo.addr, mode="tcp", workers=8, max_connections=5000, preexec_fn=low)
        px.wait_line(r"proxy: warning: a full load needs \d+ fds, the limit is 1024: lower "
                     r"max_connections to 4\d\d ", 2)  # the same words as -t
    for value in ("60000", "0"):
        path = write_ini({"proxy": {"mode": "http", "park_after": value,
                                    "keepalive_timeout": 604800}}, "park-edge.ini")
        assert run_proxy("-t", "-c", path).returncode == 0, value
