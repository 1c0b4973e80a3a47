"""tests/test_ops.py — running it as a daemon: SIGHUP reloads proxy.ini without dropping a
connection.

What is checked: a reload puts [users] and the access rules in force at once, for the next
request of a keep-alive connection opened before it too; new connections use the new upstreams,
while an open one keeps its own; a config that does not load leaves the running one in force,
says why (FILE:LINE), is counted, and the log is reopened anyway (logrotate sends SIGHUP too);
keys only a restart changes keep their running values and are named in the log; a changed mode
is refused; an upstream's health and counters outlive a reload that still lists it; reloads
under load lose no request. Every test name starts with test_ops_ (run.py -k test_ops_)."""
import functools
import os
import re
import signal
import socket
import subprocess
import threading
import time

from lib import PROXY, TMP, Proxy, Server, closed_port, connect, echo_handler, write_ini
from test_http import Client, basic, origin, request, wait_for


def reload(px, text):
    """Writes text as px's config file, sends SIGHUP, and returns the log line that says how
    the reload went."""
    with open(px.ini, "w") as f:
        f.write(text)
    seen = len(re.findall(r"reload(ed| failed)", px.text()))
    px.signal(signal.SIGHUP)
    wait_for("the reload's log line",
             lambda: len(re.findall(r"reload(ed| failed)", px.text())) > seen)
    return re.findall(r".*reload(?:ed| failed).*", px.text())[-1]


def config(px):
    with open(px.ini) as f:
        return f.read()


def test_ops_reload_revokes_a_user_at_the_next_request_of_an_open_connection():
    """[users] alice, a keep-alive connection served as alice; the reload replaces alice by
    bob: alice's next request on that same connection gets 407, and bob is served on a new
    one. The reload is counted and the generation moves on. Before: SIGHUP only reopened the
    log, and alice was served until she closed."""
    with origin() as o:
        px = Proxy(o.addr, mode="http", sections={"users": {"alice": "a-secret"}})
        alice = Client(px)
        ask = lambda c, who, pw: c.ask(request("GET", "/", "Host: h", basic(who, pw)))
        assert ask(alice, "alice", "a-secret").status == 200
        line = reload(px, config(px).replace("alice = a-secret", "bob = b-secret"))
        assert "reloaded" in line and "generation 2" in line, line
        assert ask(alice, "alice", "a-secret").status == 407
        assert ask(Client(px), "bob", "b-secret").status == 200
        assert ask(Client(px), "alice", "a-secret").status == 407
        m = px.metrics()
        assert m['proxy_config_reloads_total{result="ok"}'] == 1, m
        assert m["proxy_config_generation"] == 2, m


def test_ops_a_config_that_does_not_load_keeps_the_running_one_and_the_log_is_reopened():
    """A reload with a bad line: the old config stays in force (alice still served), the
    error names FILE:LINE, the failure is counted; and the log file, moved away as logrotate
    does, is opened again under its name. Before: the new users were never read at all."""
    log = os.path.join(TMP, "reload.log")
    for f in (log, log + ".1"):
        if os.path.exists(f):
            os.unlink(f)
    with origin() as o:
        px = Proxy(o.addr, mode="http", log=log, sections={"users": {"alice": "a-secret"}})
        alice = Client(px)
        ask = lambda c: c.ask(request("GET", "/", "Host: h", basic("alice", "a-secret")))
        assert ask(alice).status == 200
        os.rename(log, log + ".1")
        bad = config(px).replace("[proxy]\n", "[proxy]\nworkers = many\n")
        with open(px.ini, "w") as f:
            f.write(bad)
        px.signal(signal.SIGHUP)
        wait_for("the new log file", lambda: os.path.exists(log) and "reload failed" in
                 open(log).read())
        text = open(log).read()
        n = bad.splitlines().index("workers = many") + 1
        assert "%s:%d: workers = 'many'" % (px.ini, n) in text, text
        assert ask(alice).status == 200 and ask(Client(px)).status == 200
        m = px.metrics()
        assert m['proxy_config_reloads_total{result="failed"}'] == 1, m
        assert m["proxy_config_generation"] == 1, m


def test_ops_keys_only_a_restart_changes_are_named_and_keep_their_running_values():
    """workers, listen and [stats] listen changed in the file: the reload applies the rest
    (a new forward_ports), names these in the log, and the pool and listeners stay as they
    were (the old address serves; the new one is not opened). A changed mode is refused as a
    whole."""
    with origin() as o:
        px = Proxy(o.addr, mode="http", workers=4)
        free = closed_port()
        text = config(px).replace("workers = 4", "workers = 9").replace(
            "listen = 127.0.0.1:0", "listen = 127.0.0.1:%d" % free, 1)
        text += "[access]\nforward_ports = 1-65535\n"
        line = reload(px, text)
        assert "reloaded" in line, line
        assert "[proxy] listen" in line and "[proxy] workers" in line, line
        assert "[access]" not in line, line
        assert px.metric("proxy_workers") == 4
        assert Client(px).ask(request("GET", "http://%s/" % o.addr, "Host: h")).status == 200
        try:
            s = socket.create_connection(("127.0.0.1", free), timeout=2)
            s.close()
            raise AssertionError("the new listen address was opened")
        except ConnectionRefusedError:
            pass
        line = reload(px, text.replace("mode = http", "mode = tcp"))
        assert "reload failed" in line and "mode" in line and "restart" in line, line
        assert px.metric("proxy_config_generation") == 2


def test_ops_new_tcp_connections_use_the_new_upstream_and_an_open_one_keeps_its_own():
    """tcp mode, upstream A; a connection is open through it; the reload names B: a new
    connection reaches B, the open one still talks to A, both whole."""
    with Server(echo_handler, name=b"A") as a, Server(echo_handler, name=b"B") as b:
        px = Proxy(a.addr, mode="tcp")
        old = connect(px.addr)
        assert old.recv(2) == b"A\n"
        line = reload(px, config(px).replace(a.addr, b.addr))
        assert "reloaded" in line, line
        new = connect(px.addr)
        assert new.recv(2) == b"B\n"
        for s, word in ((old, b"old"), (new, b"new")):
            s.sendall(word)
            got = b""
            while len(got) < len(word):
                got += s.recv(16)
            assert got == word
            s.close()


def test_ops_an_upstreams_health_and_counters_outlive_a_reload_that_lists_it():
    """Two upstreams, one down (refused): it is counted and marked down. A reload that keeps
    both and adds a third: the down one is still down with its counts, the other keeps its
    connects, the new one starts at zero; one the reload drops is no longer exported."""
    with origin() as o:
        dead = "127.0.0.1:%d" % closed_port()
        px = Proxy("%s, %s" % (dead, o.addr), mode="http", balance="roundrobin")
        for _ in range(4):
            assert Client(px).ask(request("GET", "/", "Host: h")).status == 200
        m = px.metrics()
        up = lambda name, u: m.get('%s{upstream="%s"}' % (name, u))
        assert up("proxy_upstream_up", dead) == 0 and up("proxy_upstream_connect_failures_total",
                                                          dead) >= 1, m
        before = (up("proxy_upstream_connect_failures_total", dead),
                  up("proxy_upstream_connects_total", o.addr))
        third = "127.0.0.1:%d" % closed_port()
        line = reload(px, config(px).replace(o.addr, "%s, %s" % (o.addr, third)))
        assert "reloaded" in line, line
        m = px.metrics()
        assert (up("proxy_upstream_connect_failures_total", dead),
                up("proxy_upstream_connects_total", o.addr)) == before, m
        assert up("proxy_upstream_up", dead) == 0, m
        assert up("proxy_upstream_connects_total", third) == 0, m
        line = reload(px, config(px).replace(dead + ", ", ""))
        assert "reloaded" in line, line
        assert 'proxy_upstream_up{upstream="%s"}' % dead not in px.metrics()


def test_ops_five_reloads_under_load_lose_no_request_and_no_connection():
    """wrk -c50 keep-alive through the proxy while it reloads five times (a new forward_ports
    each time): every request answered 2xx, no socket error, every reload in force."""
    with origin() as o:
        px = Proxy(o.addr, mode="http", workers=8)
        base = config(px)
        out = {}

        def load():
            out["wrk"] = subprocess.run(
                ["wrk", "-t2", "-c50", "-d6s", "--timeout", "5s",
                 "http://%s:%d/" % (px.addr[0], px.addr[1])],
                capture_output=True, text=True, timeout=60).stdout

        t = threading.Thread(target=load)
        t.start()
        time.sleep(1)
        for i in range(5):
            line = reload(px, base + "[access]\nforward_ports = %d-65535\n" % (80 + i))
            assert "reloaded" in line, line
            time.sleep(0.6)
        t.join(60)
        text = out["wrk"]
        assert re.search(r"(\d+) requests in", text) and int(
            re.search(r"(\d+) requests in", text).group(1)) > 100, text
        assert "Socket errors" not in text, text
        assert "Non-2xx" not in text, text
        assert px.metric("proxy_config_generation") == 6


def test_ops_only_restart_only_keys_are_read_from_the_config_loaded_at_start():
    """cfg is the config loaded at start; a key a reload may change read from it would
    silently ignore every reload. Outside config.c, cfg.KEY must be a key the table marks
    restart-only (R), or proxy.c's use of the file name and the log it opens at start, or
    running.c's of the file name and of cfg's place among the snapshots."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "config.c")) as f:
        table = f.read()
    fields = set(re.findall(r"\bF\((\w+)\).*\bR\}", table))
    assert {"workers", "listen", "stats_listen", "mode"} <= fields, fields
    allowed = {"proxy.c": ("file", "log"), "running.c": ("file", "generation", "refs")}
    bad = []
    for name in sorted(os.listdir(here)):
        if not name.endswith(".c") or name == "config.c":
            continue
        with open(os.path.join(here, name)) as f:
            for n, line in enumerate(f, 1):
                for key in re.findall(r"\bcfg\.(\w+)", line):
                    if key not in fields and key not in allowed.get(name, ()):
                        bad.append("%s:%d: cfg.%s" % (name, n, key))
    assert not bad, "read from the config at start, so no reload changes them:\n" + "\n".join(bad)


# ---- socket activation ------------------------------------------------------------------------

def held_listener():
    """A listening socket on a free loopback port, as systemd's socket unit holds one."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


_launched = []


def activated(sock, ini):
    """Starts the proxy with sock passed as systemd passes it: fd 3, LISTEN_FDS=1, LISTEN_PID
    its own pid (the shell's, which exec keeps). Returns the Popen; killed after the test
    (reap) if it is still running."""
    fd = sock.fileno()
    script = 'exec 3<&%d; LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" -c "$1"' % fd
    p = subprocess.Popen(["sh", "-c", script, os.path.abspath(PROXY), ini], pass_fds=(fd,),
                         stderr=subprocess.PIPE, text=True)
    _launched.append(p)
    return p


def reap():
    """Kills what activated started and a failed test left running."""
    while _launched:
        p = _launched.pop()
        if p.poll() is None:
            p.kill()
            p.wait(5)


def reaped(test):
    """Runs test, then kills what it started with activated and left running."""
    @functools.wraps(test)
    def run():
        try:
            test()
        finally:
            reap()
    return run


def started(p):
    """Waits for p's 'listening on' line; returns it."""
    for line in p.stderr:
        if "listening on" in line:
            threading.Thread(target=p.stderr.read, daemon=True).start()  # keep it drained
            return line
    raise AssertionError("the proxy did not start: exit %s" % p.wait(5))


def echoed(addr, data=b"x" * 1000, timeout=10):
    s = socket.create_connection(addr, timeout=timeout)
    try:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            d = s.recv(65536)
            if not d:
                break
            got += d
        return got == data
    finally:
        s.close()


@reaped
def test_ops_systemd_socket_activate_hands_the_proxy_its_socket():
    """systemd-socket-activate listens, and hands the socket to the proxy it starts for the
    first client: the proxy serves on it instead of opening its own (which would fail: the
    port is taken). A socket on an address the config does not name is refused at start,
    naming both."""
    with Server(echo_handler) as e:
        port = closed_port()
        ini = write_ini({"proxy": {"mode": "tcp", "listen": "127.0.0.1:%d" % port,
                                   "upstream": e.addr, "log": "-"},
                         "stats": {"listen": "127.0.0.1:0"}}, name="activated.ini")
        p = subprocess.Popen(["systemd-socket-activate", "-l", "127.0.0.1:%d" % port,
                              os.path.abspath(PROXY), "-c", ini],
                             stderr=subprocess.PIPE, text=True)
        _launched.append(p)
        try:
            deadline = time.monotonic() + 10
            while True:  # systemd-socket-activate listens first; the proxy starts on a client
                try:
                    ok = echoed(("127.0.0.1", port))
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "systemd-socket-activate never listened"
                    time.sleep(0.05)
            assert ok
            assert echoed(("127.0.0.1", port))
        finally:
            p.send_signal(signal.SIGTERM)
            assert p.wait(15) == 0
        text = p.stderr.read()
        assert "listening on 127.0.0.1:%d" % port in text, text
    other = held_listener()
    ini = write_ini({"proxy": {"mode": "tcp", "listen": "127.0.0.1:%d" % closed_port(),
                               "upstream": "127.0.0.1:9"}, "stats": {"listen": "127.0.0.1:0"}},
                    name="activated.ini")
    p = activated(other, ini)
    assert p.wait(10) == 1
    err = p.stderr.read()
    assert "matches neither [proxy] listen" in err and "127.0.0.1:%d" % other.getsockname()[
        1] in err, err
    other.close()


@reaped
def test_ops_a_stopping_proxy_leaves_its_backlog_to_the_next_one():
    """One worker held by a relay that never leaves it (park_after 0), queue 0: three more
    clients wait in the backlog of the socket systemd holds. SIGTERM, and a second proxy
    started on the same socket while the first still serves its relay: the second serves the
    three at once. Before, the stopping proxy took them in, where no worker came for them
    until its grace period ended and closed them."""
    with Server(echo_handler) as e:
        sock = held_listener()
        addr = sock.getsockname()
        ini = write_ini({"proxy": {"mode": "tcp", "listen": "127.0.0.1:%d" % addr[1],
                                   "upstream": e.addr, "workers": 1, "queue": 0,
                                   "park_after": 0, "time_slice": 0},
                         "stats": {"listen": "127.0.0.1:0"}}, name="activated.ini")
        first = activated(sock, ini)
        started(first)
        holder = socket.create_connection(addr, timeout=10)
        holder.sendall(b"h")
        assert holder.recv(1) == b"h"
        waiting = []
        for i in range(3):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"w%d" % i)
            waiting.append(s)
        time.sleep(0.3)  # the acceptor has had every chance to take them
        first.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        second = activated(sock, ini)
        started(second)
        for i, s in enumerate(waiting):
            s.settimeout(5)  # the second proxy serves them at once
            got = b""
            while len(got) < 2:
                d = s.recv(2)
                assert d, "closed unserved, after %r" % got
                got += d
            assert got == b"w%d" % i
            s.close()
        holder.sendall(b"i")  # the first still relays its own
        assert holder.recv(1) == b"i"
        holder.close()
        assert first.wait(10) == 0
        second.send_signal(signal.SIGTERM)
        assert second.wait(10) == 0
        sock.close()


@reaped
def test_ops_a_restart_with_the_socket_held_refuses_no_connection():
    """Clients connect without pause while the proxy is stopped and started again on the
    socket systemd would hold (a restart): every one is served, none refused or reset; those
    that came between the two processes waited in the backlog."""
    with Server(echo_handler) as e:
        sock = held_listener()
        addr = sock.getsockname()
        ini = write_ini({"proxy": {"mode": "tcp", "listen": "127.0.0.1:%d" % addr[1],
                                   "upstream": e.addr},
                         "stats": {"listen": "127.0.0.1:0"}}, name="activated.ini")
        p = activated(sock, ini)
        started(p)
        results, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                try:
                    results.append(echoed(addr))
                except OSError as err:
                    results.append(err)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1)
        for _ in range(2):  # two restarts: stop, wait for the exit, start again
            p.send_signal(signal.SIGTERM)
            assert p.wait(15) == 0
            p = activated(sock, ini)
            started(p)
            time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join(30)
        p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0
        sock.close()
    bad = [r for r in results if r is not True]
    assert len(results) > 50 and not bad, "%d of %d failed: %s" % (len(bad), len(results),
                                                                   bad[:3])

