"""tests/test_turns.py — the scheduler: connections take turns on a fixed pool. While others wait
for a worker, a connection that has had its worker for time_slice gives it up at its next safe
point (between reads of a relay, between http exchanges) and queues again behind them; one with
nothing to do (new, and silent) gives it up at once; a burst of new
connections waits in the listen backlog instead of being refused; and a blocked thread wakes
for its bytes, its deadline or its bell, not to look at a clock.

What is checked: busy tcp relays and CONNECT tunnels beyond the pool all progress, every byte
intact (and starve with park_after = 0, the comparison mode); http clients beyond the pool,
pipelined ones too, get every answer in order; a burst of new connections within
max_connections is served, none refused; a tunnel that trickles a byte every 150 ms does not
hold its worker while a parked client's next request waits; a half-sent head parked in the
waiting room is still ended at header_timeout from its first byte; a head or a body that
trickles is ended by min_rate (and rate_limit's own pacing is not taken for a trickle); quiet
relays, and one whose other direction trickles, cost no wake-ups; the time_slice key and the
turn metrics. Every test name starts with test_turns_ (run.py -k test_turns_)."""
import hashlib
import os
import socket
import threading
import time

from lib import SCALE, Proxy, Server, blackhole, connect, echo_handler, write_ini
from test_http import Client, get, origin, reply, request, wait_for
from test_park import (StoppingProxy, held_upstream, limit, numbered_origin, readable,
                       run_proxy, tunnel_sections)


def stream_clients(addr, n, seconds, prologue=None, spans=None):
    """n clients that each send random 64 KiB chunks through addr for seconds while reading
    what comes back (an echo behind the proxy), then half-close and read to EOF. prologue(s),
    if given, runs first on each socket (a CONNECT). Returns, per client, the bytes that had
    come back when the sending stopped (taken at that moment: a client blocked in a send
    would otherwise only see the time once its send returns), and whether what came back in
    all was exactly what was sent. spans, if given, gets per client the time its first bytes
    came back and the time of its EOF."""
    stop = time.monotonic() + seconds
    got_back, intact = [0] * n, [False] * n
    if spans is not None:
        spans[:] = [[None, None] for _ in range(n)]

    def client(i):
        s = connect(addr, timeout=30)
        if prologue:
            prologue(s)
        chunk = os.urandom(65536)
        sent, got = hashlib.sha256(), hashlib.sha256()
        count = 0

        def reader():
            while True:
                d = s.recv(1 << 20)
                if spans is not None and spans[i][0] is None:
                    spans[i][0] = time.monotonic()
                if not d:
                    if spans is not None:
                        spans[i][1] = time.monotonic()
                    return
                got.update(d)
                got_back[i] += len(d)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        while time.monotonic() < stop:
            s.sendall(chunk)
            sent.update(chunk)
            count += len(chunk)
        s.shutdown(socket.SHUT_WR)
        t.join(60)
        intact[i] = count == got_back[i] and sent.digest() == got.digest()
        s.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, stop - time.monotonic()))
    early = list(got_back)
    for t in threads:
        t.join(seconds + 60)
    return early, intact


def connect_through(target):
    """A prologue: CONNECT target, and the 200."""
    def prologue(s):
        s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target.encode(), target.encode()))
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            d = s.recv(1)
            assert d, "closed before the CONNECT answer"
            head += d
        assert head.startswith(b"HTTP/1.1 200 "), head
    return prologue


# ---- busy connections beyond the pool --------------------------------------------------------

@limit(60)
def test_turns_busy_tcp_relays_beyond_the_pool_all_progress_bytes_intact():
    """Six relays streaming both ways at full speed through two workers: every one moves bytes
    while the others do (a busy relay is never quiet, so only turns can let the others in), and
    everything comes back intact. With park_after = 0 (a worker per connection, for
    comparison) the two first hold the pool and the others wait: never more than two are
    answered at once, and the others only once the first ones end (timed by when each client
    sees its bytes: on a loaded machine a count taken at a moment is taken late)."""
    with Server(echo_handler) as echo:
        with StoppingProxy(echo.addr, mode="tcp", workers=2) as px:
            early, intact = stream_clients(px.addr, 6, 2)
            assert all(intact), intact
            assert min(early) >= 1 << 20, "a relay starved while others streamed: %s" % early
            assert px.metric("proxy_turns_total") >= 4
        with StoppingProxy(echo.addr, mode="tcp", workers=2, park_after=0) as px:
            spans = []
            early, intact = stream_clients(px.addr, 4, 1, spans=spans)
            assert all(intact), intact
            # Each client sees its first bytes and its EOF a little late (its thread must be
            # scheduled): an overlap counts only if it lasts; a real third would stream for 1 s.
            lag = 0.25
            starts = sorted(first for first, _ in spans)
            at_once = max(sum(1 for first, last in spans if first <= t and last > t + lag)
                          for t in starts)
            assert at_once <= 2, "%d answered at once by two workers: %s" % (at_once, spans)
            assert starts[2] > starts[0] + 0.5, "nobody waited: %s" % spans


@limit(60)
def test_turns_busy_connect_tunnels_beyond_the_pool_all_progress_bytes_intact():
    with Server(echo_handler) as echo, \
            StoppingProxy(mode="http", workers=2, sections=tunnel_sections(echo.port)) as px:
        early, intact = stream_clients(px.addr, 5, 2, connect_through(echo.addr))
        assert all(intact), intact
        assert min(early) >= 1 << 20, "a tunnel starved while others streamed: %s" % early
        assert px.metric("proxy_turns_total") >= 3


@limit(60)
def test_turns_http_clients_beyond_the_pool_get_every_answer_in_order_pipelined_too():
    """Three keep-alive clients on one worker, each sending its requests as fast as it gets
    answers, one of them in pipelined batches of five: they all progress, and each gets its
    answers in order, none lost or doubled. A connection with pipelined requests in its
    buffer is served to the end of them before it can yield. time_slice = 1 ms: every wait for
    a request past the first millisecond is the end of a turn."""
    with numbered_origin() as o, StoppingProxy(o.addr, mode="http", workers=1,
                                               time_slice=1) as px:
        stop = time.monotonic() + 1.5
        done, errors = [0, 0, 0], []

        def client(i, batch):
            c = Client(px, timeout=20)
            n = 0
            try:
                while time.monotonic() < stop:
                    targets = ["/c%d/%d" % (i, n + k) for k in range(batch)]
                    c.send(b"".join(get(o, t) for t in targets))
                    for t in targets:
                        resp = c.response()
                        if resp.status != 200 or not resp.body.endswith(t.encode()):
                            errors.append((t, resp.status, resp.body))
                            return
                    n += batch
                    done[i] = n
            finally:
                c.close()

        threads = [threading.Thread(target=client, args=(i, 5 if i == 2 else 1), daemon=True)
                   for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors[:3]
        assert min(done) >= 10, "a client starved: %s requests answered" % done
        assert px.metric("proxy_turns_total") >= 3
        seen = [t for _, t, _, _ in o.seen]
        for i in range(3):  # the origin got each client's requests once, in order
            mine = [t for t in seen if t.startswith("/c%d/" % i)]
            assert mine == ["/c%d/%d" % (i, k) for k in range(len(mine))], mine[:10]


@limit(40)
def test_turns_one_waiting_on_its_client_gives_way_at_once_one_awaiting_an_answer_at_its_slice():
    """While another waits for the only worker (time_slice = 3 s, park_after = 60 s): a relay
    whose last byte went to its client has what it asked for, and gives its worker up after
    QUIET_MS (10 ms), not at the end of its slice; one whose last byte went upstream awaits an
    answer, and keeps its worker until its slice ends (parking those under load filled the
    queue with their own wake-ups)."""
    with Server(echo_handler) as echo, \
            StoppingProxy(echo.addr, mode="tcp", workers=1, time_slice=3000,
                          park_after=60000) as px:
        start = time.monotonic()
        a = connect(px.addr)
        a.sendall(b"a")
        assert a.recv(1) == b"a"  # answered: now it waits on its client
        b = connect(px.addr)
        b.sendall(b"b")
        assert b.recv(1) == b"b"
        took = time.monotonic() - start
        assert took < 2.5, "b waited %.1f s: a kept the worker to its slice's end" % took
    with held_upstream() as up, \
            StoppingProxy(up.addr, mode="tcp", workers=1, time_slice=3000,
                          park_after=60000) as px:
        start = time.monotonic()
        a = connect(px.addr)
        a.sendall(b"question")  # it goes up, and no answer comes
        up.socks.get(timeout=5)
        b = connect(px.addr)
        b.sendall(b"b")
        px.wait_metric("proxy_queue_length", 1)
        time.sleep(max(0.0, 1.0 - (time.monotonic() - start)))
        if time.monotonic() - start < 2.5:  # a's slice (3 s) cannot be over yet
            assert px.metric("proxy_queue_length") == 1, "a gave its worker up early"
        wait_for("a's slice to end and b to be served",
                 lambda: px.metric("proxy_queue_length") == 0, timeout=10)
        assert time.monotonic() - start > 2.5
        assert px.metric("proxy_turns_total") >= 1
        up.release.set()


# ---- new connections --------------------------------------------------------------------------

@limit(60)
def test_turns_a_burst_of_new_connections_within_max_connections_is_served_none_refused():
    """300 connections opened as fast as the client can, through 2 workers and a queue of 8,
    before any of them sends a byte; then each sends and reads an echo. A new connection that
    has moved no byte parks at once, and beyond the queue the listener rests while the kernel's
    backlog holds the rest: nobody is refused."""
    n = 300
    with Server(echo_handler, backlog=1024) as echo, \
            StoppingProxy(echo.addr, mode="tcp", workers=2, queue=8) as px:
        socks = [connect(px.addr, timeout=30) for _ in range(n)]
        for i, s in enumerate(socks):
            s.sendall(b"%05d" % i)
        for i, s in enumerate(socks):
            got = b""
            while len(got) < 5:
                d = s.recv(5 - len(got))
                assert d, "connection %d closed after %r" % (i, got)
                got += d
            assert got == b"%05d" % i
        for s in socks:
            s.close()
        m = px.metrics()
        assert sum(v for k, v in m.items() if "refused" in k) == 0, m
        assert m["proxy_connections_accepted_total"] == n


# ---- connections with nothing to do ---------------------------------------------------------

@limit(60)
def test_turns_a_trickling_tunnel_does_not_hold_its_worker_while_a_request_waits():
    """Two CONNECT tunnels to an upstream that never answers, each client sending a byte every
    150 ms (never quiet for park_after, never idle for idle_timeout), on two workers: a parked
    keep-alive client's next request is still answered at once, and every trickled byte
    reaches the upstream in order."""
    with held_upstream() as up, numbered_origin() as o:
        sections = tunnel_sections(up.port)
        with StoppingProxy(o.addr, mode="http", workers=2, sections=sections) as px:
            keep = Client(px, timeout=10)
            assert keep.ask(get(o, "/first")).status == 200
            wait_for("the keep-alive client to park",
                     lambda: px.metric("proxy_connections_parked") == 1)
            stop = threading.Event()
            tunnels = []
            for _ in range(2):
                s = connect(px.addr)
                connect_through(up.addr)(s)
                tunnels.append((s, up.socks.get(timeout=5)))

            sent = [b"", b""]

            def trickle(i):
                k = 0
                while not stop.is_set():
                    byte = bytes([65 + i * 10 + k % 10])
                    tunnels[i][0].sendall(byte)
                    sent[i] += byte
                    k += 1
                    time.sleep(0.15)

            threads = [threading.Thread(target=trickle, args=(i,), daemon=True)
                       for i in range(2)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            start = time.monotonic()
            resp = keep.ask(get(o, "/next"))
            took = time.monotonic() - start
            stop.set()
            for t in threads:
                t.join(5)
            assert resp.status == 200 and took < 2, "answered after %.1f s" % took
            for i, (s, far) in enumerate(tunnels):
                got = b""
                far.settimeout(5)
                while len(got) < len(sent[i]):
                    d = far.recv(4096)
                    assert d, "the upstream side closed after %r" % got
                    got += d
                assert got == sent[i], (got, sent[i])
                s.close()
            up.release.set()


def test_turns_a_tcp_connect_to_a_black_hole_does_not_pin_the_pool():
    """One worker; upstreams a black hole, then an echo server, in turn (roundrobin). The first
    client's connect goes to the black hole; the second's to the echo server, and it is served
    at once: the first leaves its worker while its connect waits, and waits parked. At
    connect_timeout the parked dial comes back to a worker, marks the black hole down and fails
    over to the echo server: both clients echo. Before, the first held the only worker for the
    whole connect_timeout."""
    hole, keep = blackhole()
    with Server(echo_handler) as echo:
        with Proxy("%s, %s" % (hole, echo.addr), mode="tcp", balance="roundrobin", workers=1,
                   connect_timeout=6) as px:
            first = connect(px.addr)
            first.sendall(b"first")
            wait_for("the first connect to take the worker",
                     lambda: px.metric("proxy_workers_busy") == 1)
            start = time.monotonic()
            second = connect(px.addr)
            second.sendall(b"second")
            second.settimeout(10)
            got2 = second.recv(64)
            assert got2 == b"second", (got2, px.text())
            took = time.monotonic() - start
            assert took < 3, "the second client was echoed after %.1f s" % took
            assert px.metric("proxy_connections_parked") >= 1  # the dial, and the second
            first.settimeout(20)
            got = b""
            while len(got) < 5:
                d = first.recv(64)
                assert d, "the first client was closed: %s" % px.text()
                got += d
            assert got == b"first"
            assert "is down" in px.text(), px.text()
            first.close()
            second.close()
    for k in keep:
        k.close()


# ---- slow heads and bodies ------------------------------------------------------------------

@limit(40)
def test_turns_a_parked_half_head_is_ended_at_header_timeout_from_its_first_byte():
    """A half-sent head parked in the waiting room (others wait for the only worker) gets its
    408 header_timeout after its first byte, as it would on a worker (min_rate = 0 leaves
    header_timeout alone to bound it)."""
    with numbered_origin() as o, StoppingProxy(o.addr, mode="http", workers=1, time_slice=1,
                                               min_rate=0, header_timeout=2) as px:
        half = Client(px, timeout=10)
        start = time.monotonic()
        half.send(get(o, "/half")[:20])
        time.sleep(0.3)
        other = Client(px, timeout=10)
        assert other.ask(get(o, "/other")).status == 200
        assert px.metric("proxy_connections_parked") >= 1
        resp = half.response()
        took = time.monotonic() - start
        assert resp.status == 408 and 1.9 < took < 5, (resp.status, took)
        assert half.closed()


@limit(30)
def test_turns_a_partial_head_pipelined_behind_a_request_is_timed_from_then():
    """Half of a second request head that came in the same packet as the first request is
    bounded by header_timeout from then, not by keepalive_timeout (60 s)."""
    with numbered_origin() as o, StoppingProxy(o.addr, mode="http", workers=2, min_rate=0,
                                               header_timeout=2) as px:
        c = Client(px, timeout=10)
        start = time.monotonic()
        c.send(get(o, "/a") + get(o, "/b")[:12])
        assert c.response().status == 200
        resp = c.response()
        assert resp.status == 408 and time.monotonic() - start < 6, resp.status


@limit(40)
def test_turns_a_trickling_head_is_ended_by_min_rate_long_before_header_timeout():
    """A head that keeps coming, a byte every 0.2 s (slowloris), is ended by min_rate (the
    first second free, then a second per min_rate bytes) in about a second, not after
    header_timeout (30 s) that a silent one would get."""
    with numbered_origin() as o, StoppingProxy(o.addr, mode="http", workers=2,
                                               header_timeout=30) as px:
        c = Client(px, timeout=10)
        start = time.monotonic()
        head = get(o, "/slowloris")
        for b in head:
            if readable(c.sock, 0.2):
                break
            c.sock.sendall(bytes([b]))
        took = time.monotonic() - start
        assert c.response().status == 408 and took < 5, took
        assert c.closed()


def trickle_answer(server, req, r):
    """An origin's answers: /trickle a 100-byte body, a byte every 0.1 s; /paced 600 bytes
    0.3 s after the head (so that the proxy relays them paced, not with the head); anything
    else "ok"."""
    if req.target == "/trickle":
        r.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            time.sleep(0.1)
            r.sock.sendall(b"t")
        return b""
    if req.target == "/paced":
        r.sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 600\r\n\r\n")
        time.sleep(0.3)
        r.sock.sendall(b"p" * 600)
        return b""
    return reply(200, b"ok")


@limit(40)
def test_turns_trickling_bodies_are_ended_by_min_rate_and_free_their_worker():
    """A request body that trickles in (a byte every 0.1 s) and a response body that trickles
    down are each ended by min_rate (reason "slow"), well before idle_timeout, which bytes
    that keep coming never trip; the worker they held serves the next client. rate_limit
    below min_rate does not make a paced body look slow: min_rate is at most half of it."""
    with origin(trickle_answer) as o, \
            StoppingProxy(o.addr, mode="http", workers=1, min_rate=100) as px:
        up = Client(px, timeout=10)
        up.send(request("POST", "http://%s/up" % o.addr, "Host: h", "Content-Length: 100"))
        start = time.monotonic()
        for _ in range(100):
            if readable(up.sock, 0.1):
                break
            up.sock.sendall(b"x")
        assert up.closed() and time.monotonic() - start < 6
        down = Client(px, timeout=10)
        down.send(get(o, "/trickle"))
        start = time.monotonic()
        try:
            down.response()
            raise AssertionError("a trickling response body was relayed whole")
        except (EOFError, ConnectionError, ValueError):
            pass
        assert time.monotonic() - start < 6
        # Counted as the connection is retired, which may come just after the client saw EOF.
        px.wait_metric('proxy_connections_closed_total{reason="slow"}', 2)
        assert Client(px, timeout=5).ask(get(o, "/next")).status == 200
    # rate_limit = 200 B/s paces the 600-byte answer over 3 s: below min_rate (500), which is
    # therefore taken as 100, half of rate_limit; unclamped it would end the body at ~1.7 s.
    with origin(trickle_answer) as o, \
            StoppingProxy(o.addr, mode="http", workers=1, rate_limit=200) as px:
        c = Client(px, timeout=15)
        resp = c.ask(get(o, "/paced"))
        assert resp.status == 200 and resp.body == b"p" * 600, resp.head
        assert px.metric('proxy_connections_closed_total{reason="slow"}') == 0


def task_switches(pid):
    """Voluntary context switches of every thread of pid so far: a blocked thread that wakes
    and blocks again is one."""
    total = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass  # the thread ended meanwhile
    return total


@limit(60)
def test_turns_no_thread_wakes_to_look_at_a_clock():
    """Eight quiet relays held by their workers (park_after = 0: sixteen blocked threads) cost
    at most a wake-up a second each (a blocked send or read checks idle_timeout once a second),
    not one every few milliseconds. With parking on, a relay whose download trickles (a chunk
    every 100 ms: not quiet for park_after) while its client is silent wakes only its back
    thread, once a chunk; the front thread, waiting on the silent client, sleeps."""
    with Server(echo_handler) as echo, \
            StoppingProxy(echo.addr, mode="tcp", workers=8, park_after=0) as px:
        socks = [connect(px.addr) for _ in range(8)]
        for s in socks:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
        px.wait_metric("proxy_workers_busy", 8)
        time.sleep(0.5)
        before = task_switches(px.p.pid)
        time.sleep(2)
        woke = task_switches(px.p.pid) - before
        assert woke <= 16 * 2 * 2 + 10, "%d wake-ups in 2 s from 16 blocked threads" % woke
        for s in socks:
            s.close()

    def dribble(c, server):
        for _ in range(60):
            c.sendall(b"d" * 100)
            time.sleep(0.1)

    with Server(dribble) as down, StoppingProxy(down.addr, mode="tcp", workers=2) as px:
        # What the process does alone first: 0 for ours, but a sanitizer's runtime has a
        # thread of its own that wakes about ten times a second (TSan's background thread).
        time.sleep(0.5)
        before = task_switches(px.p.pid)
        time.sleep(2)
        alone = task_switches(px.p.pid) - before
        s = connect(px.addr)
        assert s.recv(100) == b"d" * 100
        time.sleep(0.5)
        before = task_switches(px.p.pid)
        time.sleep(2)
        woke = task_switches(px.p.pid) - before - alone
        # About 20 chunks in 2 s, each waking the back thread once.
        assert woke <= 40, "%d wake-ups in 2 s for 20 chunks (%d alone)" % (woke, alone)
        s.close()


# ---- config and metrics ----------------------------------------------------------------------

def test_turns_time_slice_is_range_checked_and_the_turn_metrics_are_exported():
    for line in ("time_slice = 60001", "time_slice = -1", "time_slice = 5s"):
        path = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80"}})
        with open(path, "a") as f:
            f.write(line + "\n")
        out = run_proxy("-t", "-c", path)
        assert out.returncode == 2 and ":4: time_slice = " in out.stderr, out.stderr
    path = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80", "time_slice": 0}})
    out = run_proxy("-t", "-c", path)
    assert out.returncode == 0 and "time_slice 0 ms (no turns)" in out.stdout, out.stdout
    with Server(echo_handler) as echo, StoppingProxy(echo.addr, mode="tcp") as px:
        s = connect(px.addr)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        m = px.metrics()
        assert m["proxy_turns_total"] == 0
        assert m["proxy_queue_wait_seconds_count"] == 1, m
        assert m['proxy_queue_wait_seconds_bucket{le="+Inf"}'] == 1
        assert m['proxy_queue_wait_seconds_bucket{le="0.0001"}'] <= 1
        s.close()
