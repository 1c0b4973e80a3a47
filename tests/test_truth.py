"""tests/test_truth.py — what the proxy says about itself must be true: the config loader and -t
refuse what start-up would refuse, and say what is wrong and where.

What is checked: a directory, or any file that cannot be read, is an error naming it, never
"configuration ok"; a ':' between a key and its value (inih would split `al:ice = secret`
into user "al" with password "ice = secret") is refused at its line; an error about [users]
in tcp mode points at [users]; the first messages a newcomer meets say what to do (a config file not found: -c FILE;
a stray argument; a '#' comment after a value; which listener could not listen); -t opens the
log as start-up does and fails where start-up fails, also when the fd limit cannot hold even
the workers, saying so instead of advising max_connections = 0; a tunnel closed while parked
(idle_timeout, a stop) still gets its access log line; refusals are counted under their real
reason; an idle proxy stops at once; on SIGTERM, http keep-alive
connections end at a response boundary (the last response says Connection: close) and the
process exits as soon as nothing is left; a connection's clock (its log line, header_timeout)
starts at accept, and a request that came in time is never refused 408 for the proxy's own
delay; every 502 and 504 (and a 400 for a path with no upstream) says why, in its body and in
the log's error= field. Every test name starts with test_truth_ (run.py -k
test_truth_)."""
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time

from lib import (PROXY, TMP, Proxy, Server, blackhole, closed_port, connect, echo_handler,
                 recv_all, write_ini)
from test_http import ESTABLISHED, Client, ok_answer, origin, request, wait_for
from test_park import held_upstream, tunnel_sections


def run_proxy(*args, cwd=None, preexec_fn=None):
    return subprocess.run([os.path.abspath(PROXY), *args], capture_output=True, text=True,
                          timeout=10, cwd=cwd, preexec_fn=preexec_fn)


def write(name, text):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_truth_config_errors_name_the_file_and_line_of_what_inih_would_misread():
    """Each case exits 2 from -t and from start-up, naming FILE:LINE and what is wrong. Before:
    the colon cases printed "configuration ok"; [users] in tcp mode
    pointed at the [proxy] line; the '#' case did not say why."""
    cases = [
        ("[proxy]\nmode = http\n\n[users]\nal:ice = secret\n",
         r":5: expected 'key = value': a ':' cannot separate them"),
        ("[proxy]\nworkers: 8\n", r":2: expected 'key = value': a ':' cannot separate them"),
        ("[proxy]\nmode = tcp\nupstream = 127.0.0.1:80\n\n[users]\nalice = secret\n",
         r":6: \[users\] needs mode = http"),
        ("[proxy]\nmode = http\nsend_proxy = v1\n", r":3: send_proxy works in tcp mode only"),
        ("[proxy]\nworkers = 8 # eight\n",
         r":2: workers = '8 # eight': expected a whole number .*'#' starts a comment only at "
         r"the start of a line"),
    ]
    for text, want in cases:
        path = write("truth.ini", text)
        for args in (["-t", "-c", path], ["-c", path]):
            r = run_proxy(*args)
            assert r.returncode == 2, (text, r)
            assert re.match(re.escape(path) + want, r.stderr), (text, r.stderr, want)
            assert "secret" not in r.stderr, r.stderr
    # What inih is right to take stays taken: an inline comment after a value (a user's too,
    # as proxy.ini's sample has one), a ':' in a value, a ';' in a password with no space.
    path = write("truth-ok.ini", "[proxy]\nmode = http\nlisten = 127.0.0.1:0 ; any port\n"
                 "[users]\nalice = pa;ss:word ; the team's\n")
    r = run_proxy("-t", "-c", path)
    assert r.returncode == 0 and "configuration ok" in r.stdout, r


def test_truth_a_config_that_cannot_be_read_and_a_stray_argument_say_what_to_do():
    """A directory given as the config: exit 2 naming it (before: "configuration ok", and the
    proxy ran on the defaults). No proxy.ini where it is run from: the message says proxy: and
    -c FILE. A stray argument is named before the usage."""
    d = os.path.join(TMP, "truth-dir")
    os.makedirs(d, exist_ok=True)
    for args in (["-t", "-c", d], ["-c", d]):
        r = run_proxy(*args)
        assert r.returncode == 2, r
        assert r.stderr.startswith("proxy: %s: cannot read: Is a directory" % d), r.stderr
        assert "configuration ok" not in r.stdout, r.stdout
    r = run_proxy(cwd=d)
    assert r.returncode == 2, r
    assert r.stderr.startswith("proxy: proxy.ini: cannot open: No such file or directory"), r
    assert "-c FILE" in r.stderr, r.stderr
    r = run_proxy("foo")
    assert r.returncode == 2 and r.stderr.startswith("proxy: unexpected argument 'foo'"), r


def test_truth_a_listener_that_cannot_listen_is_named_by_its_key():
    """The admin listener's port is taken: start-up exits 1 naming [stats] listen, not only an
    address a newcomer may not recognize."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    path = write_ini({"proxy": {"listen": "127.0.0.1:0", "mode": "http", "log": "-"},
                      "stats": {"listen": "127.0.0.1:%d" % port}}, "truth-stats.ini")
    r = run_proxy("-c", path)
    taken.close()
    assert r.returncode == 1, r
    assert "cannot listen on 127.0.0.1:%d ([stats] listen)" % port in r.stderr, r.stderr


def test_truth_t_fails_where_start_up_fails_the_log_and_the_fd_limit():
    """-t opens the log as start-up does, without creating it: a log in a directory that does
    not exist is an error at its line (before: "configuration ok", then start-up failed). A
    hard fd limit below what the workers alone need: -t and start-up say to lower workers or
    use copy = buffer, and fail (before: "lower max_connections to 0", exit 0)."""
    log = os.path.join(TMP, "no-such-dir", "access.log")
    path = write("truth-log.ini", "[proxy]\nmode = http\nlog = %s\n" % log)
    r = run_proxy("-t", "-c", path)
    assert r.returncode == 2, r
    assert r.stderr.startswith("%s:3: log = %s: cannot open: No such file" % (path, log)), r
    fine = os.path.join(TMP, "truth-new.log")
    if os.path.exists(fine):
        os.unlink(fine)
    path = write("truth-log-ok.ini", "[proxy]\nmode = http\nlog = %s\n" % fine)
    r = run_proxy("-t", "-c", path)
    assert r.returncode == 0, r
    assert not os.path.exists(fine), "-t created the log file"

    low = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
    path = write("truth-fds.ini", "[proxy]\nmode = http\nlisten = 127.0.0.1:0\n[stats]\n"
                 "listen =\n")
    want = r"error: before any connection the 64 workers need \d+ fds .* lower workers, use " \
           r"copy = buffer"
    r = run_proxy("-t", "-c", path, preexec_fn=low)
    assert r.returncode == 2 and re.search(want, r.stdout), r
    assert "max_connections to 0" not in r.stdout, r.stdout
    r = run_proxy("-c", path, preexec_fn=low)
    assert r.returncode == 1 and re.search("proxy: " + want, r.stderr), r


# ---- logs: every request gets its line --------------------------------------------------------

def open_tunnel(px, up):
    """A CONNECT tunnel through px to held_upstream up, a byte each way: (client, upstream)."""
    c = Client(px, timeout=10)
    c.send(request("CONNECT", up.addr, "Host: " + up.addr))
    assert c.r.exactly(len(ESTABLISHED)) == ESTABLISHED, c.r.buf
    u = up.socks.get(timeout=5)
    c.send(b"u")
    assert u.recv(1) == b"u"
    u.sendall(b"d")
    assert c.r.exactly(1) == b"d"
    return c, u


def tunnel_lines(px, up):
    return [l for l in px.text().splitlines() if " CONNECT %s 200 " % up.addr in l]


def test_truth_a_tunnel_closed_while_parked_gets_its_log_line():
    """A CONNECT tunnel that goes quiet parks; closed there by idle_timeout, and another by
    SIGTERM, each still gets its access log line with its 200 and its bytes, and its 200 is
    counted. Before, neither got a line (tcp mode logged these)."""
    with held_upstream() as up:
        px = Proxy(mode="http", idle_timeout=2, sections=tunnel_sections(up.port))
        c, u = open_tunnel(px, up)
        wait_for("the tunnel to park", lambda: px.metric("proxy_connections_parked") == 1)
        c.sock.settimeout(10)
        assert c.sock.recv(1) == b"", "idle_timeout did not close the parked tunnel"
        wait_for("its log line", lambda: tunnel_lines(px, up), timeout=5)
        want = " up=1 down=%d " % (len(ESTABLISHED) + 1)  # the 200 and a byte
        assert want in tunnel_lines(px, up)[0], tunnel_lines(px, up)
        assert px.metric('proxy_http_responses_total{code="2xx"}') == 1
        assert px.stop() == 0
        assert len(tunnel_lines(px, up)) == 1, px.text()

        px = Proxy(mode="http", sections=tunnel_sections(up.port))
        c, u = open_tunnel(px, up)
        wait_for("the tunnel to park", lambda: px.metric("proxy_connections_parked") == 1)
        assert px.stop() == 0
        assert len(tunnel_lines(px, up)) == 1, px.text()
        up.release.set()


# ---- the stop ---------------------------------------------------------------------------------

def slow_answer(server, req, r):
    """/slow is answered after a second; anything else at once."""
    if req.target == "/slow":
        time.sleep(1)
    return ok_answer(server, req, r)


def test_truth_sigterm_ends_http_keep_alive_at_a_response_boundary_and_exits_when_done():
    """SIGTERM while a request waits for its answer, while a client sends requests back to back,
    and while another sits idle between requests on its worker (park_after 60 s keeps it
    there): the answer in progress says Connection: close and the connection ends after it,
    whole; the busy client's connection ends at a request boundary (its last response says
    Connection: close, or nothing of a response came); the idle one is closed; and the proxy
    exits as soon as nothing is left, not at the end of the 10 s grace period. Before, the
    connections were served through the whole grace period, then cut, and no response said
    Connection: close."""
    with origin(answer=slow_answer) as o:
        px = Proxy(o.addr, mode="http", park_after=60000)
        idle = Client(px)
        assert idle.ask(request("GET", "/idle", "Host: h")).status == 200
        busy = Client(px)
        seen, ended = [], []

        def loop():
            try:
                while True:
                    r = busy.ask(request("GET", "/busy", "Host: h"))
                    seen.append(r)
                    if r.get("Connection") == ["close"]:
                        return
            except (EOFError, ConnectionError) as e:
                ended.append(e)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        wait_for("some requests", lambda: len(seen) > 20)
        slow = Client(px, timeout=15)
        slow.send(request("GET", "/slow", "Host: h"))
        time.sleep(0.3)  # the slow request is with the origin now
        start = time.monotonic()
        px.signal(signal.SIGTERM)
        resp = slow.response()
        assert resp.status == 200 and resp.get("Connection") == ["close"], resp.head
        assert slow.closed(5), "the connection stayed open after Connection: close"
        t.join(15)
        assert seen[-1].get("Connection") == ["close"] or ended, seen[-1].head
        assert busy.closed(5) and idle.closed(5)
        assert px.p.wait(15) == 0
        took = time.monotonic() - start
        assert took < 5, "the stop took %.1f s with nothing left to serve" % took


def test_truth_an_idle_proxy_stops_at_once():
    """SIGTERM to an idle proxy: it exits at once (the stop rings the acceptor's eventfd),
    not at the acceptor's next look at a clock (before: 0.5-1.0 s, a tick of TICK_MS)."""
    took = []
    for _ in range(3):
        px = Proxy(mode="http", listen="127.0.0.1:0")
        time.sleep(0.2)
        start = time.monotonic()
        assert px.stop() == 0
        took.append(time.monotonic() - start)
    took.sort()
    assert took[1] < 0.4, "an idle proxy took %s s to stop" % ["%.2f" % t for t in took]


def test_truth_refusals_are_counted_under_their_real_reason():
    """max_connections = 1 (tcp) and four clients opening one connection after another, each
    sending a byte and waiting for its echo: those refused are closed at once, and every
    refusal the metrics count is one a client saw, under max_connections alone. Before,
    some were counted queue_full with the queue empty (17 of about 1,000 here), because the
    count of active connections dropped before the record went back."""
    with Server(echo_handler) as e:
        px = Proxy(e.addr, mode="tcp", max_connections=1)
        seen = []

        def churn():
            got = {"echoed": 0, "refused": 0}
            for _ in range(300):
                s = connect(px.addr)
                try:
                    s.sendall(b"x")
                    got["echoed" if s.recv(1) == b"x" else "refused"] += 1
                except ConnectionError:
                    got["refused"] += 1
                s.close()
            seen.append(got)

        threads = [threading.Thread(target=churn) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(seen) == 4 and sum(g["echoed"] for g in seen) > 0, seen
        refused = sum(g["refused"] for g in seen)
        counted = {k: v for k, v in px.metrics().items()
                   if k.startswith("proxy_connections_refused_total") and v}
        want = {'proxy_connections_refused_total{reason="max_connections"}': refused}
        assert counted == (want if refused else {}), (counted, refused)


# ---- clocks -----------------------------------------------------------------------------------

def slower_answer(server, req, r):
    """/slow is answered after 1.5 s; anything else at once."""
    if req.target == "/slow":
        time.sleep(1.5)
    return ok_answer(server, req, r)


def line_ms(line):
    return float(re.search(r" ms=([0-9.]+)", line).group(1))


def test_truth_a_connections_clock_starts_at_accept():
    """One worker, held for 1.5 s by a request waiting for its answer (http) or by a relay
    that never leaves it (tcp, park_after = 0): a client accepted meanwhile waits in the queue,
    and that wait is part of what it saw. Its request's log line counts from accept (before:
    from when a worker took it, a few ms). header_timeout (1 s) counts from accept too: a
    silent client is answered 408 as soon as a worker is free, not 1 s after that (before:
    about 2.5 s after accept); and one whose request came in time is served, though a worker
    reads it after the second is over."""
    with origin(answer=slower_answer) as o:
        px = Proxy(o.addr, mode="http", workers=1, header_timeout=1)
        holder = Client(px, timeout=10)
        holder.send(request("GET", "/slow", "Host: h"))
        wait_for("the worker to be busy", lambda: px.metric("proxy_workers_busy") == 1)
        start = time.monotonic()
        waiting = Client(px, timeout=10)
        waiting.send(request("GET", "/waited", "Host: h"))
        silent = connect(px.addr, timeout=10)
        assert holder.response().status == 200
        assert waiting.response().status == 200
        got = silent.recv(4096)  # 408, or the close alone
        took = time.monotonic() - start
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:60]
        assert 0.9 < took < 2.2, "header_timeout = 1 ended it %.1f s after accept" % took
        lines = [ln for ln in px.text().splitlines() if " GET " in ln]  # the holder's first
        assert len(lines) == 2 and line_ms(lines[1]) > 1000, lines
        assert px.stop() == 0
    with Server(echo_handler) as e:
        px = Proxy(e.addr, mode="tcp", workers=1, park_after=0, time_slice=0)
        holder = connect(px.addr, timeout=10)
        holder.sendall(b"x")
        assert holder.recv(1) == b"x"
        waiting = connect(px.addr, timeout=10)
        waiting.sendall(b"yy")
        time.sleep(1.5)
        holder.close()
        got = b""
        while len(got) < 2:
            got += waiting.recv(2)
        waiting.close()
        line = px.wait_line(r" up=2 down=2 .*").group(0)
        assert line_ms(line) > 1400, line
        assert px.stop() == 0


# ---- why an error -----------------------------------------------------------------------------

def test_truth_a_502_or_504_says_why_in_its_body_and_the_log():
    """Each way an upstream can fail gets its reason in the reply's body and an error= word in
    the access log: a name that does not resolve, a refused connection, a black hole, an
    upstream that closes or resets the connection before answering, or answers nonsense; and a
    path asked of a proxy with no upstream gets a 400 that says so. Before: a bare
    '502 Bad Gateway' for all of them."""
    from test_http_dial import dial_proxy

    def closes(c, server):
        c.recv(65536)

    def resets(c, server):
        c.recv(65536)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def nonsense(c, server):
        c.recv(65536)
        c.sendall(b"HELLO THERE\r\n\r\n")

    hole, keep = blackhole()
    with Server(closes) as a, Server(resets) as b, Server(nonsense) as n:
        cases = [
            (b"GET http://nonexistent.invalid/ HTTP/1.1\r\nHost: nonexistent.invalid\r\n\r\n",
             502, "dns", "the upstream's name did not resolve"),
            (b"CONNECT nonexistent.invalid:443 HTTP/1.1\r\nHost: nonexistent.invalid\r\n\r\n",
             502, "dns", "the upstream's name did not resolve"),
            (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: h\r\n\r\n" % closed_port(),
             502, "refused", "the upstream refused the connection"),
            (b"GET http://%s/ HTTP/1.1\r\nHost: h\r\n\r\n" % hole.encode(),
             504, "connect_timeout", "the upstream did not accept a connection in time"),
            (b"GET http://%s/ HTTP/1.1\r\nHost: h\r\n\r\n" % a.addr.encode(),
             502, "closed", "the upstream closed the connection without a response"),
            (b"GET http://%s/ HTTP/1.1\r\nHost: h\r\n\r\n" % b.addr.encode(),
             502, "reset", "the upstream reset the connection before a response"),
            (b"GET http://%s/ HTTP/1.1\r\nHost: h\r\n\r\n" % n.addr.encode(),
             502, "bad_response", "the upstream's response was not valid HTTP/1.1"),
            (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 400, "no_upstream",
             "the request names a path, not a URL, and this proxy has no upstream to send it "
             "to: ask for the whole URL (http://host/path)"),
        ]
        with dial_proxy(connect_timeout=1, local="allow") as px:
            for req, status, word, text in cases:
                s = connect(px.addr)
                s.sendall(req)
                got = recv_all(s)
                s.close()
                head, _, body = got.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 %d " % status), (req, got[:80])
                reason = head.split(b"\r\n")[0].split(b" ", 2)[2]
                assert body == b"%d %s: %s\n" % (status, reason, text.encode()), (req, body)
            want = [w for _, _, w, _ in cases]
            wait_for("the log lines", lambda: len(errors(px)) == len(want))
            assert errors(px) == want, px.text()
    for k in keep:
        k.close()


def errors(px):
    return re.findall(r" error=(\S+)$", px.text(), re.M)
