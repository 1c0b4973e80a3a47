"""tests/test_tcp.py — tcp mode end to end: integrity, half-close, concurrency, the queue,
timeouts, balancing and failover, rate limit, PROXY protocol, signals, config errors, curl."""
import http.server
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import lib
from lib import (PROXY, SCALE, TMP, Server, blackhole, capture_handler, closed_port,
                 connect, echo_handler, exchange, got_within, hold_handler, random_bytes,
                 recv_all, refusals,
                 recv_line, sha, sink_handler, wait_received, write_ini)


def Proxy(*args, **keys):
    """A proxy in tcp mode (http is the default)."""
    keys.setdefault("mode", "tcp")
    return lib.Proxy(*args, **keys)


def limit(seconds):
    def mark(fn):
        fn.limit = seconds
        return fn
    return mark


@limit(240)
def test_bulk_integrity_every_copy_mode_and_buffer_size():
    data = random_bytes(int(64 * SCALE) << 20)
    with Server(echo_handler) as echo:
        for copy in ("splice", "buffer"):
            for size in ("1k", "16k", "64k", "1m"):
                with Proxy(echo.addr, copy=copy, buffer_size=size, workers=2) as px:
                    digest, n = exchange(px.addr, data)
                    assert (n, digest) == (len(data), sha(data)), (copy, size, n)
                    m = px.metrics()
                    assert m['proxy_bytes_total{direction="up"}'] == len(data)
                    assert m['proxy_bytes_total{direction="down"}'] == len(data)
                    assert px.stop() == 0


def test_half_close_client_gets_the_whole_reply():
    data = random_bytes(3 << 20)
    with Server(sink_handler) as sink, Proxy(sink.addr) as px:
        s = connect(px.addr)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # the request is complete; the reply comes after
        assert recv_all(s) == b"%d %s" % (len(data), sha(data).encode())
        px.wait_line(r"up=%d down=\d+ ms=\S+ end=done" % len(data))


@limit(120)
def test_200_concurrent_connections_every_byte_verified():
    data = random_bytes(1 << 20)
    results, threads = [], []
    with Server(echo_handler, backlog=512) as echo, Proxy(echo.addr, workers=256) as px:
        for i in range(200):
            t = threading.Thread(target=lambda: results.append(exchange(px.addr, data)))
            t.start()
            threads.append(t)
        for t in threads:
            t.join(90)
        assert results.count((sha(data), len(data))) == 200, len(results)
        px.wait_metric('proxy_connections_closed_total{reason="done"}', 200)
        assert px.metric("proxy_connections_active") == 0


def test_queue_full_keeps_new_clients_in_the_backlog_and_serves_them_later():
    # park_after = 0: the quiet relays keep their workers, so the pool is full however slowly
    # the test runs (with parking on, they would give their workers to the queued one).
    with Server(echo_handler) as echo, Proxy(echo.addr, workers=2, queue=1, park_after=0) as px:
        served = [connect(px.addr) for _ in range(2)]
        for s in served:
            s.sendall(b"a")
            assert s.recv(1) == b"a"
        time.sleep(0.4)  # as on a slow machine: past park_after's default (200 ms)
        queued = connect(px.addr)
        queued.sendall(b"q")
        px.wait_metric("proxy_queue_length", 1)
        # Beyond workers + queue: not refused, not even accepted. The kernel has completed
        # their handshakes; they wait in the listen backlog until the queue has room.
        waiting = [connect(px.addr, timeout=3) for _ in range(2)]
        for i, w in enumerate(waiting):
            w.sendall(b"%d" % i)
        time.sleep(0.5)
        for w in waiting:
            got = got_within(w, 0.1)
            assert got is None, "a client beyond the queue got %r: refused or served" % got
        m = px.metrics()
        assert m["proxy_connections_accepted_total"] == 3, m
        assert refusals(m) == 0, m
        assert m["proxy_workers_busy"] == 2 and m["proxy_connections_active"] == 3
        served[0].close()  # a worker frees: the queued connection is served, one more accepted
        queued.settimeout(5)
        assert queued.recv(1) == b"q"
        served[1].close()
        queued.close()
        for i, w in enumerate(waiting):  # the backlog drains as workers free up
            w.settimeout(5)
            assert w.recv(1) == b"%d" % i
            w.close()
        px.wait_metric("proxy_workers_busy", 0)
        assert px.metric("proxy_connections_accepted_total") == 5


def test_idle_timeout_closes_idle_but_not_a_slow_one_way_transfer():
    with Server(echo_handler) as echo, Server(sink_handler) as sink:
        with Proxy(echo.addr, idle_timeout=1) as px:
            s = connect(px.addr)
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            start = time.monotonic()
            assert s.recv(1) == b""  # closed by the proxy
            assert 0.9 < time.monotonic() - start < 3.5
            px.wait_metric('proxy_connections_closed_total{reason="idle"}', 1)
        with Proxy(sink.addr, idle_timeout=1) as px:
            s = connect(px.addr)
            sent = b""
            end = time.monotonic() + 3
            while time.monotonic() < end:  # only client → upstream moves, for 3 s
                s.sendall(b"y" * 100)
                sent += b"y" * 100
                time.sleep(0.2)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == b"%d %s" % (len(sent), sha(sent).encode())
            assert px.metric('proxy_connections_closed_total{reason="idle"}') == 0


def name_of(addr, source=None):
    s = connect(addr, source=source)
    name = recv_line(s).strip()
    s.close()
    return name


def test_failover_to_the_next_upstream_when_the_first_refuses():
    dead = "127.0.0.1:%d" % closed_port()
    with Server(echo_handler, name=b"B") as b:
        with Proxy("%s, %s" % (dead, b.addr), balance="roundrobin") as px:
            for _ in range(4):
                assert name_of(px.addr) == b"B"
            m = px.metrics()
            # Tried once, then skipped for 10 s: one failure, not four.
            assert m['proxy_upstream_connect_failures_total{upstream="%s"}' % dead] == 1
            assert m['proxy_upstream_up{upstream="%s"}' % dead] == 0
            assert m['proxy_upstream_connects_total{upstream="%s"}' % b.addr] == 4
            px.wait_line("upstream %s is down: Connection refused" % dead)


def test_all_upstreams_down_closes_the_client_promptly():
    dead = ["127.0.0.1:%d" % closed_port() for _ in range(2)]
    with Proxy(", ".join(dead)) as px:
        for _ in range(2):  # the second time both are marked down: still tried
            s = connect(px.addr)
            start = time.monotonic()
            assert s.recv(1) == b""
            assert time.monotonic() - start < 1
        px.wait_metric('proxy_connections_closed_total{reason="no_upstream"}', 2)
        assert px.metric('proxy_upstream_connect_failures_total{upstream="%s"}' % dead[1]) == 2
    hole, keep = blackhole()
    with Proxy(hole, connect_timeout=1) as px:
        s = connect(px.addr)
        start = time.monotonic()
        assert s.recv(1) == b""
        assert 0.9 < time.monotonic() - start < 2.5  # connect_timeout plus a margin
        px.wait_line(r"upstream %s is down: Connection timed out" % hole)
    for k in keep:
        k.close()


def fnv_index(ip, n):
    h = 2166136261
    for b in socket.inet_aton(ip):
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % n


def test_balance_source_maps_one_client_to_one_upstream():
    with Server(echo_handler, name=b"0") as a, Server(echo_handler, name=b"1") as b:
        with Proxy("%s, %s" % (a.addr, b.addr), balance="source") as px:
            seen = set()
            for i in range(1, 9):
                ip = "127.0.0.%d" % i
                names = {name_of(px.addr, source=ip) for _ in range(3)}
                assert names == {str(fnv_index(ip, 2)).encode()}, (ip, names)
                seen |= names
            assert seen == {b"0", b"1"}


def test_balance_roundrobin_alternates():
    with Server(echo_handler, name=b"A") as a, Server(echo_handler, name=b"B") as b:
        with Proxy("%s, %s" % (a.addr, b.addr), balance="roundrobin") as px:
            names = [name_of(px.addr) for _ in range(6)]
            assert names[0] != names[1] and names == names[:2] * 3, names


def source_handler(c, server):
    """Sends 1 MiB, then closes."""
    c.sendall(random_bytes(1 << 20))


def test_rate_limit_paces_each_direction():
    """1 MiB at 256 KiB/s takes 3.875 s of pacing; well under 10 s unless pacing oversleeps."""
    data = random_bytes(1 << 20)
    results = {}
    with Server(sink_handler) as sink, Server(source_handler) as source:
        with Proxy(sink.addr, rate_limit="256k") as up, Proxy(source.addr, rate_limit="256k") as down:
            def upload():
                start = time.monotonic()
                s = connect(up.addr, timeout=20)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                results["up"] = (recv_all(s), time.monotonic() - start)

            t = threading.Thread(target=upload)
            t.start()
            start = time.monotonic()
            got = recv_all(connect(down.addr, timeout=20))
            results["down"] = (sha(got), time.monotonic() - start)
            t.join(20)
    assert results["up"][0] == b"%d %s" % (len(data), sha(data).encode())
    assert results["down"][0] == sha(data)
    for direction, (_, took) in results.items():
        assert 3.5 <= took < 10, (direction, took)


def v2_header(src, dst):
    fam = socket.AF_INET6 if ":" in src[0] else socket.AF_INET
    alen = 4 if fam == socket.AF_INET else 16
    body = (socket.inet_pton(fam, src[0]) + socket.inet_pton(fam, dst[0]) +
            struct.pack("!HH", src[1], dst[1]))
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11 if alen == 4 else 0x21]) +
            struct.pack("!H", len(body)) + body)


def test_proxy_protocol_v1_and_v2_headers_are_byte_exact():
    for host in ("127.0.0.1", "::1"):
        for version in ("v1", "v2"):
            with Server(capture_handler) as cap:
                listen = "[::1]:0" if ":" in host else "127.0.0.1:0"
                with Proxy(cap.addr, listen=listen, send_proxy=version) as px:
                    s = connect(px.addr)
                    src, dst = s.getsockname()[:2], s.getpeername()[:2]
                    s.sendall(b"hello")
                    s.shutdown(socket.SHUT_WR)
                    assert recv_all(s) == b""
                    wait_received(cap)
                    if version == "v1":
                        want = ("PROXY TCP%s %s %s %d %d\r\n" % ("6" if ":" in host else "4",
                                src[0], dst[0], src[1], dst[1])).encode()
                    else:
                        want = v2_header(src, dst)
                    assert cap.received == [want + b"hello"], (cap.received, want)


def test_sigterm_lets_a_transfer_finish_then_exits_0():
    data = random_bytes(4 << 20)
    # Pauses of 0.2 s, well inside park_after: the connection stays busy, never parked (a
    # parked one would be closed at once by the stop).
    with Server(sink_handler) as sink, Proxy(sink.addr, park_after=2000) as px:
        s = connect(px.addr)
        s.sendall(data[:1 << 20])
        px.signal(signal.SIGTERM)
        px.wait_line("stopping: 1 connections open")
        for i in range(1, 4):  # the transfer goes on for another ~0.6 s
            time.sleep(0.2)
            s.sendall(data[i << 20:(i + 1) << 20])
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"%d %s" % (len(data), sha(data).encode())
        assert px.p.wait(10) == 0
        try:  # the listener is gone: new connections are refused
            connect(px.addr, timeout=2)
            assert False, "connected after stop"
        except ConnectionRefusedError:
            pass


@limit(40)
def test_sigterm_ends_a_connection_that_outlives_the_grace_period():
    # park_after = 0: the quiet connection keeps its worker, so it is busy and gets the grace
    # period (a parked one is closed at once: test_park.py).
    with Server(echo_handler) as echo, Proxy(echo.addr, park_after=0) as px:
        s = connect(px.addr, timeout=20)
        s.sendall(b"x")
        assert s.recv(1) == b"x"
        px.signal(signal.SIGTERM)
        start = time.monotonic()
        assert s.recv(1) == b""
        assert 9 < time.monotonic() - start < 13
        assert px.p.wait(5) == 0
        px.wait_line("end=stopped")


def run_proxy(*args):
    return subprocess.run([PROXY, *args], capture_output=True, text=True, timeout=10)


def test_bad_configs_exit_2_naming_file_and_line_and_t_prints_the_plan():
    cases = {
        "[proxy]\nupstream = 127.0.0.1:80\nworkers = lots\n": r":3: workers = 'lots': expected",
        "[proxy]\nupstream = 127.0.0.1:80\n[nope]\n a = 1\n": r":4: unknown section \[nope\]",
        "[proxy]\nmode = tcp\n": r":1: \[proxy\] needs 'upstream = host:port'",
        "[proxy]\nupstream = 127.0.0.1:80\n[access]\nallow = 300.0.0.0/8\n": r":4: allow:",
    }
    for text, want in cases.items():
        path = os.path.join(TMP, "bad.ini")
        with open(path, "w") as f:
            f.write(text)
        for args in (["-c", path], ["-t", "-c", path]):
            r = run_proxy(*args)
            assert r.returncode == 2, (text, r)
            assert re.match(re.escape(path) + want, r.stderr), (r.stderr, want)
    r = run_proxy("-c", os.path.join(TMP, "missing.ini"))
    assert r.returncode == 2 and "cannot open" in r.stderr
    good = write_ini({"proxy": {"mode": "tcp", "upstream": "127.0.0.1:80", "workers": 100,
                                "copy": "buffer"}})
    r = run_proxy("-t", "-c", good)
    assert r.returncode == 0, r
    assert "configuration ok" in r.stdout and "100 workers: 200 threads" in r.stdout, r.stdout
    assert "12.5 MiB of buffers" in r.stdout and "http heads" not in r.stdout, r.stdout
    assert run_proxy("-V").stdout.startswith("proxy ")
    assert run_proxy("-h").returncode == 0
    assert run_proxy("-x").returncode == 2
    r = run_proxy("-c", write_ini({"proxy": {"listen": "8.8.8.8:1"}}))
    assert r.returncode == 1 and "cannot listen on 8.8.8.8:1" in r.stderr, r


def test_curl_through_the_relay_gets_the_right_body():
    body = random_bytes(300000)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with Proxy("127.0.0.1:%d" % srv.server_address[1]) as px:
            url = "http://%s:%d/file" % px.addr
            out = os.path.join(TMP, "curl.out")
            r = subprocess.run(["curl", "-sS", "--fail", "-o", out, url, "-o", out + "2", url],
                               capture_output=True, timeout=20)
            assert r.returncode == 0, r.stderr
            for f in (out, out + "2"):
                with open(f, "rb") as fh:
                    assert fh.read() == body
    finally:
        srv.shutdown()
        srv.server_close()


def test_allow_list_refuses_other_clients_and_counts_them():
    with Server(echo_handler) as echo:
        with Proxy(echo.addr, sections={"access": {"allow": "10.0.0.0/8, ::1"}}) as px:
            s = connect(px.addr)
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            px.wait_metric('proxy_connections_refused_total{reason="not_allowed"}', 1)
            px.wait_line(r"127\.0\.0\.1:\d+ refused: not in \[access\] allow")
            assert echo.conns == 0


def test_access_log_file_sighup_reopens_and_sigusr1_dumps_metrics():
    log = os.path.join(TMP, "access.log")
    for f in (log, log + ".1"):
        if os.path.exists(f):
            os.unlink(f)
    with Server(echo_handler) as echo, Proxy(echo.addr, log=log) as px:
        assert exchange(px.addr, b"hello") == (sha(b"hello"), 5)
        line_re = (r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1:\d+ -> %s "
                   r"up=5 down=5 ms=\d+\.\d{3} end=done$" % re.escape(echo.addr))

        def lines(path):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if os.path.exists(path):
                    with open(path) as f:
                        text = f.read()
                    if re.search(line_re, text, re.M):
                        return text
                time.sleep(0.05)
            raise AssertionError("no access line in %s" % path)

        lines(log)
        os.rename(log, log + ".1")  # what logrotate does
        px.signal(signal.SIGHUP)
        time.sleep(0.3)
        assert exchange(px.addr, b"hello") == (sha(b"hello"), 5)
        text = lines(log)
        # the new file holds only what came after: the reload's line and the new access line
        assert len(text.splitlines()) == 2 and " reloaded " in text.splitlines()[0], text
        px.signal(signal.SIGUSR1)
        time.sleep(0.3)
        with open(log) as f:
            assert "proxy_connections_accepted_total 2\n" in f.read()
        assert px.stop() == 0


def test_an_idle_proxy_counts_no_accept_errors_and_logs_nothing():
    with Server(echo_handler) as echo, Proxy(echo.addr) as px:
        time.sleep(2.5)  # past two ticks of the listener's timeout
        assert px.metric("proxy_accept_errors_total") == 0
        assert exchange(px.addr, b"x") == (sha(b"x"), 1)
        px.wait_line(r"up=1 down=1 ")
        assert "refused" not in px.text(), px.text()


def test_metrics_are_well_formed_prometheus_text():
    with Server(echo_handler) as echo, Proxy(echo.addr) as px:
        exchange(px.addr, b"x" * 1000)
        px.wait_metric("proxy_connection_duration_seconds_count", 1)  # counted after the close
        import urllib.request
        with urllib.request.urlopen("http://%s:%d/metrics" % px.metrics_addr) as r:
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            body = r.read().decode()
        typed = set(re.findall(r"^# TYPE (\S+) (?:counter|gauge|histogram)$", body, re.M))
        helped = set(re.findall(r"^# HELP (\S+) .+$", body, re.M))
        assert typed == helped and len(typed) >= 12
        for line in body.splitlines():
            if line.startswith("#"):
                continue
            m = re.match(r'^([a-z_]+)(\{[a-z_]+="[^"]*"\})? [0-9.e+-]+$', line)
            assert m, line
            family = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
            assert m.group(1) in typed or family in typed, line
        assert 'proxy_connection_duration_seconds_bucket{le="+Inf"} 1' in body
        assert "proxy_connection_duration_seconds_count 1" in body
        s = connect(px.metrics_addr)
        s.sendall(b"GET /other HTTP/1.1\r\n\r\n")
        assert recv_all(s).startswith(b"HTTP/1.1 404 ")


def stall_handler(c, server):
    """Accepts and never reads."""
    while not server.closed:
        time.sleep(0.1)


def test_idle_timeout_cuts_a_connection_whose_upstream_stopped_reading():
    for copy in ("splice", "buffer"):
        with Server(stall_handler) as stall, Proxy(stall.addr, idle_timeout=1, copy=copy) as px:
            s = connect(px.addr, timeout=30)

            def fill():  # fills every buffer on the way, then blocks until the proxy cuts
                try:
                    s.sendall(random_bytes(16 << 20))
                except OSError:
                    pass

            threading.Thread(target=fill, daemon=True).start()
            # A trickle of window updates may move a few bytes now and then, and moving
            # bytes is activity; but the connection must end idle, and soon.
            px.wait_line("end=idle", timeout=25)
            s.close()


def test_a_pipe_left_full_by_a_dead_connection_is_not_handed_on():
    first = []

    def stall_then_capture(c, server):
        with server.lock:
            first.append(1)
            stall = len(first) == 1
        if stall:
            return stall_handler(c, server)
        capture_handler(c, server)

    with Server(stall_then_capture) as srv, Proxy(srv.addr, workers=1, idle_timeout=1) as px:
        s = connect(px.addr, timeout=30)

        def fill():
            try:
                s.sendall(random_bytes(16 << 20))
            except OSError:
                pass  # cut by the proxy, as intended

        threading.Thread(target=fill, daemon=True).start()
        px.wait_line("end=idle", timeout=25)  # the worker's pipe held bytes for the stalled one
        s.close()
        t = connect(px.addr)
        t.sendall(b"hello")
        t.shutdown(socket.SHUT_WR)
        recv_all(t)
        got = wait_received(srv)
        assert got == [b"hello"], got[0][:64] if got else None


def test_urgent_data_is_relayed_in_line_in_both_copy_modes():
    for copy in ("splice", "buffer"):
        with Server(capture_handler) as cap, Proxy(cap.addr, copy=copy) as px:
            s = connect(px.addr)
            s.sendall(b"abc")
            time.sleep(0.1)
            s.send(b"X", socket.MSG_OOB)
            time.sleep(0.1)
            s.sendall(b"def")
            s.shutdown(socket.SHUT_WR)
            recv_all(s)
            assert wait_received(cap) == [b"abcXdef"], (copy, cap.received)


def test_a_dual_stack_listener_sees_v4_clients_as_v4_in_allow_list_and_log():
    with Server(echo_handler) as echo:
        with Proxy(echo.addr, listen="[::]:0", sections={"access": {"allow": "127.0.0.0/8"}}) as px:
            v4 = connect(("127.0.0.1", px.addr[1]))  # arrives as ::ffff:127.0.0.1
            v4.sendall(b"4")
            assert v4.recv(1) == b"4"
            v6 = connect(("::1", px.addr[1]))
            try:
                assert v6.recv(1) == b""
            except ConnectionResetError:
                pass
            px.wait_metric('proxy_connections_refused_total{reason="not_allowed"}', 1)
            v4.close()
            px.wait_line(r"^\S+ 127\.0\.0\.1:\d+ -> ")  # logged as IPv4, not [::ffff:127.0.0.1]


def test_no_nagle_stall_on_small_writes_either_way():
    def two_part_handler(c, server):  # reads a 2-byte request, answers in two writes
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # any stall left is the proxy's
        while True:
            req = b""
            while len(req) < 2:
                d = c.recv(2 - len(req))
                if not d:
                    return
                req += d
            c.sendall(b"A")
            time.sleep(0.001)
            c.sendall(b"B")

    for copy in ("splice", "buffer"):
        with Server(two_part_handler) as srv, Proxy(srv.addr, copy=copy) as px:
            s = connect(px.addr)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.monotonic()
            for _ in range(30):  # with Nagle, each round trip waits ~40 ms for a delayed ACK
                s.sendall(b"x")
                time.sleep(0.001)
                s.sendall(b"y")
                got = b""
                while len(got) < 2:
                    got += s.recv(2)
                assert got == b"AB"
            assert time.monotonic() - start < 0.6, (copy, time.monotonic() - start)


def test_reuse_port_lets_several_processes_share_one_port():
    port = closed_port()
    with Server(echo_handler, name=b"") as echo:
        a = Proxy(echo.addr, listen="127.0.0.1:%d" % port, reuse_port="yes")
        b = Proxy(echo.addr, listen="127.0.0.1:%d" % port, reuse_port="yes")
        for i in range(40):
            assert exchange(a.addr, b"%d" % i) == (sha(b"%d" % i), len(b"%d" % i))
        served = [px.metric("proxy_connections_accepted_total") for px in (a, b)]
        assert sum(served) == 40 and min(served) > 0, served  # the kernel spread them
    r = subprocess.run([PROXY, "-c", write_ini({"proxy": {"mode": "tcp", "listen":
                        "127.0.0.1:%d" % port, "upstream": "127.0.0.1:9"}})],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "Address already in use" in r.stderr, r  # without it: taken
