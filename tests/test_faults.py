"""tests/test_faults.py — broken peers, exhaustion and overload: the proxy must end one
connection cleanly, free its worker, leak no file descriptor, and keep serving. Every test
counts the proxy's open fds (/proc/PID/fd) before and after."""
import os
import re
import resource
import signal
import socket
import struct
import threading
import time

from lib import (Proxy, Server, blackhole, connect, echo_handler, exchange, got_within,
                 random_bytes, recv_all, refusals, sha)


def fds(px):
    return len(os.listdir("/proc/%d/fd" % px.p.pid))


def settle(px, want, timeout=10):
    """Waits until the proxy has no connection open and holds want fds again."""
    px.wait_metric("proxy_connections_active", 0, timeout)
    deadline = time.monotonic() + timeout
    while fds(px) != want:
        if time.monotonic() > deadline:
            raise AssertionError("fd leak: %d open, %d before" % (fds(px), want))
        time.sleep(0.05)


def tcp(upstream, **keys):
    keys.setdefault("mode", "tcp")
    return Proxy(upstream, **keys)


def closed_or_reset(s):
    try:
        return recv_all(s)
    except ConnectionResetError:
        return b""


def reset(c):
    """Closes c with a TCP reset instead of a FIN."""
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()


def test_fault_upstream_accepts_and_closes_at_once():
    def close_at_once(c, server):
        pass  # _serve closes it

    with Server(close_at_once) as srv:
        with tcp(srv.addr) as px:
            before = fds(px)
            for _ in range(5):
                s = connect(px.addr)
                s.sendall(b"hello")
                assert closed_or_reset(s) == b""
                s.close()  # the upstream's FIN was passed on; the client may still talk
            settle(px, before)
        with Proxy(srv.addr, mode="http") as px:  # origin-form: a response never came
            before = fds(px)
            for _ in range(20):  # the upstream's close races the request: 502 either way
                s = connect(px.addr)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                got = recv_all(s)
                assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), got
                s.close()
            settle(px, before)


def test_fault_upstream_resets_mid_transfer():
    def reset_midway(c, server):
        got = 0
        while got < 1 << 20:
            d = c.recv(65536)
            if not d:
                return
            got += len(d)
            c.sendall(d)
        reset(c)

    for copy in ("splice", "buffer"):
        with Server(reset_midway) as srv, tcp(srv.addr, copy=copy) as px:
            before = fds(px)
            s = connect(px.addr)
            try:
                s.sendall(random_bytes(8 << 20))
            except OSError:
                pass
            closed_or_reset(s)
            s.close()
            px.wait_line("end=upstream_error")
            settle(px, before)
            assert exchange(px.addr, b"still serving") == (sha(b"still serving"), 13)


def test_fault_client_resets_mid_transfer():
    with Server(echo_handler) as echo:
        for mode in ("tcp", "http"):
            with Proxy(echo.addr, mode=mode, copy="buffer") as px:
                before = fds(px)
                s = connect(px.addr)
                if mode == "http":
                    s.sendall(b"CONNECT %s HTTP/1.1\r\n\r\n" % echo.addr.encode())
                s.sendall(random_bytes(1 << 20))
                time.sleep(0.2)
                reset(s)
                settle(px, before)


def test_fault_client_that_connects_and_sends_nothing_is_freed():
    with Server(echo_handler) as echo, tcp(echo.addr, workers=1, idle_timeout=1) as px:
        before = fds(px)
        silent = connect(px.addr)
        assert closed_or_reset(silent) == b""  # idle_timeout frees the only worker
        settle(px, before)
        assert exchange(px.addr, b"next") == (sha(b"next"), 4)
    with Proxy(echo.addr, mode="http", workers=1, header_timeout=1) as px:
        before = fds(px)
        silent = connect(px.addr)
        assert recv_all(silent).startswith(b"HTTP/1.1 408 ")
        settle(px, before)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_fault_out_of_fds_the_acceptor_neither_spins_nor_dies_and_recovers():
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
    with Server(echo_handler) as echo:
        px = Proxy(echo.addr, mode="tcp", workers=4, queue=64, copy="buffer", preexec_fn=limit)
        held = []
        for _ in range(40):  # far more than 32 fds: accept fails with EMFILE
            try:
                held.append(connect(px.addr, timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        start = cpu_seconds(px.p.pid)
        time.sleep(2)
        used = cpu_seconds(px.p.pid) - start
        assert used < 0.5, "the acceptor spins: %.2f s of CPU in 2 s" % used
        assert px.metric("proxy_accept_errors_total") > 0
        for s in held:
            s.close()
        px.wait_metric("proxy_connections_active", 0, 15)
        assert px.p.poll() is None, "the proxy died"
        assert exchange(px.addr, b"back") == (sha(b"back"), 4)


def test_fault_overload_at_twice_the_workers_waits_and_recovers():
    """Twice as many busy clients as workers, with no room in the queue: the excess is neither
    refused nor dropped. It waits in the listen backlog, the served ones do not notice, and each
    waiting client is served once a worker frees."""
    with Server(echo_handler) as echo:
        for mode in ("tcp", "http"):
            # park_after = 0: the quiet relays and tunnels keep their workers, so the pool is
            # full however slowly the test runs (with parking on they would give them up).
            with Proxy(echo.addr, mode=mode, workers=8, queue=0, park_after=0,
                       sections={"access": {"connect_ports": "*"}}) as px:
                before = fds(px)
                served = []
                for i in range(8):
                    s = connect(px.addr)
                    if mode == "http":  # a tunnel holds its worker like a tcp relay
                        s.sendall(b"CONNECT %s HTTP/1.1\r\n\r\n" % echo.addr.encode())
                        assert s.recv(64).startswith(b"HTTP/1.1 200 ")
                    s.sendall(b"%d" % i)
                    assert s.recv(8) == b"%d" % i
                    served.append(s)
                time.sleep(0.4)  # as on a slow machine: past park_after's default (200 ms)
                waiting = []
                for i in range(8):
                    s = connect(px.addr)
                    if mode == "http":
                        s.sendall(b"CONNECT %s HTTP/1.1\r\n\r\n" % echo.addr.encode())
                    else:
                        s.sendall(b"w%d" % i)
                    waiting.append(s)
                time.sleep(0.3)
                for s in waiting:
                    got = got_within(s, 0.05)
                    assert got is None, "a client beyond the pool got %r" % got
                m = px.metrics()
                assert refusals(m) == 0, m
                assert m["proxy_connections_accepted_total"] == 8, m
                for i, s in enumerate(served):  # the served ones did not notice
                    s.sendall(b"again%d" % i)
                    assert s.recv(16) == b"again%d" % i
                    s.close()
                for i, s in enumerate(waiting):  # then each waiting one is served
                    s.settimeout(10)
                    if mode == "http":
                        assert s.recv(64).startswith(b"HTTP/1.1 200 ")
                        s.sendall(b"w%d" % i)
                    assert recv_exactly(s, len(b"w%d" % i)) == b"w%d" % i
                    s.close()
                px.wait_metric("proxy_workers_busy", 0)
                if mode == "tcp":
                    assert exchange(px.addr, b"recovered") == (sha(b"recovered"), 9)
                settle(px, before)


def recv_exactly(s, n):
    out = b""
    while len(out) < n:
        d = s.recv(n - len(out))
        if not d:
            raise EOFError("EOF after %r" % out)
        out += d
    return out


def test_fault_sigterm_under_load_completed_transfers_are_intact_and_exit_0():
    """Every connection the proxy took in comes back whole. One that reached the kernel's
    backlog in the instant the listener shut may be reset by the kernel: the proxy never had it
    (it is not in the log), so none of its bytes went anywhere."""
    data = random_bytes(256 << 10)
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            ports = []
            try:
                results.append((exchange(px.addr, data, timeout=20, ports=ports), ports))
            except (OSError, AssertionError) as e:  # refused, reset, or our bytes met a close
                results.append((repr(e), ports))
                time.sleep(0.05)

    with Server(echo_handler) as echo, tcp(echo.addr, workers=16) as px:
        threads = [threading.Thread(target=client) for _ in range(12)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        px.signal(signal.SIGTERM)
        assert px.p.wait(15) == 0
        stop.set()
        for t in threads:
            t.join(20)
        with px.cond:  # every line read, to the end of the proxy's stderr
            px.cond.wait_for(lambda: px.lines[-1:] == [None], 5)
        log = {}
        for line in px.text().splitlines():
            m = re.search(r"127\.0\.0\.1:(\d+) -> \S+ (up=.*)", line)
            if m:
                log[int(m.group(1))] = m.group(2)
    whole = "up=%d down=%d " % (len(data), len(data))
    cut = ["%s %s" % (port, line) for port, line in log.items()
           if not line.startswith(whole) or not line.endswith("end=done")]
    assert not cut, "%d of %d connections taken in were cut: %s" % (len(cut), len(log), cut[:3])
    done = [r for r, _ in results if r == (sha(data), len(data))]
    assert len(done) > 12, len(done)
    lost = ["%s %s" % (ports, r) for r, ports in results
            if r != (sha(data), len(data)) and ports and ports[0] in log]
    assert not lost, "%d taken in came back wrong: %s" % (len(lost), lost[:3])


def test_fault_dns_failure_and_unreachable_hosts_in_absolute_form_and_connect():
    hole, keep = blackhole()
    with Proxy(None, mode="http", connect_timeout=1,
               sections={"access": {"connect_ports": "*"}}) as px:
        before = fds(px)
        for req, status in (
                (b"GET http://nonexistent.invalid/ HTTP/1.1\r\n\r\n", b"502"),
                (b"CONNECT nonexistent.invalid:443 HTTP/1.1\r\n\r\n", b"502"),
                (b"GET http://%s/ HTTP/1.1\r\n\r\n" % hole.encode(), b"504"),
                (b"CONNECT %s HTTP/1.1\r\n\r\n" % hole.encode(), b"504")):
            s = connect(px.addr)
            s.sendall(req)
            got = recv_all(s)
            assert got.startswith(b"HTTP/1.1 " + status + b" "), (req, got[:60])
        settle(px, before)
    for k in keep:
        k.close()
