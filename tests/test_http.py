"""tests/test_http.py — http mode end to end: curl with and without credentials, absolute- and
origin-form forwarding, request bodies, CONNECT (to openssl s_server, and raw bytes), keep-alive
reuse, Upgrade, authentication on every request, strict framing against the known smuggling CVE
shapes, header_timeout, the 503 when full, and the access log and metrics all this leaves.

The backends here speak just enough HTTP/1.1 to record exactly what the proxy sent them; the
clients are raw sockets (or curl), so every assertion is on bytes, status lines, backend
records, log lines and metrics. Every test name starts with test_http_ (run.py -k test_http_)."""
import base64
import os
import re
import select
import socket
import subprocess
import tempfile
import threading
import time

from lib import (TMP, Proxy, Server, blackhole, closed_port, connect, echo_handler,
                 got_within, random_bytes, refusals, sha)

USER, PASSWORD, WRONG = "alice", "s3cr3t-Pa55", "wr0ng-Gue55"
MARK = "zq7-marker"  # put in requests that must not be echoed back in error pages
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


# ---- requests, credentials, proxies -----------------------------------------------------

def b64(text):
    return base64.b64encode(text.encode()).decode()


def basic(user=USER, password=PASSWORD, name="Proxy-Authorization"):
    return "%s: Basic %s" % (name, b64("%s:%s" % (user, password)))


AUTH = basic()


def request(method, target, *fields, body=b"", version="HTTP/1.1"):
    """The bytes of one request: fields are whole lines like 'Host: x', without CRLF."""
    head = "%s %s %s\r\n%s\r\n" % (method, target, version, "".join(f + "\r\n" for f in fields))
    return head.encode("latin-1") + body


def url(server, path="/"):
    return "http://%s%s" % (server.addr, path)


def get(server, path, *fields):
    """GET http://server/path, with a Host field that the proxy must replace."""
    return request("GET", url(server, path), "Host: h", *fields)


def http_proxy(upstream=None, users=True, ports=None, **keys):
    """An http-mode Proxy; with users, alice must authenticate (realm test-realm)."""
    sections = {}
    if users:
        sections["users"] = {USER: PASSWORD}
        sections["auth"] = {"realm": "test-realm"}
    if ports:
        sections["access"] = {"connect_ports": ports}
    keys.setdefault("header_timeout", 5)
    return Proxy(upstream, mode="http", sections=sections, **keys)


def via(px):
    return "1.1 proxy-%d" % px.p.pid


def wait_for(what, pred, timeout=5):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


# ---- reading HTTP from a socket ---------------------------------------------------------

class Reader:
    """Buffered reads from a socket: up to a separator, an exact count, or EOF."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _more(self):
        d = self.sock.recv(65536)
        if not d:
            raise EOFError("connection closed; unread: %r" % self.buf[:200])
        self.buf += d

    def until(self, sep, limit=1 << 20):
        while sep not in self.buf:
            if len(self.buf) > limit:
                raise ValueError("no %r in %d bytes" % (sep, limit))
            self._more()
        i = self.buf.index(sep) + len(sep)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exactly(self, n):
        while len(self.buf) < n:
            self._more()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self):
        try:
            while True:
                self._more()
        except (EOFError, ConnectionResetError):
            out, self.buf = self.buf, b""
            return out


class Message:
    """A request or response head (and later its body), as bytes and as fields."""

    def __init__(self, head):
        self.head, self.body = head, b""
        lines = head[:-4].decode("latin-1").split("\r\n")
        self.line = lines[0]
        self.fields = [tuple(p.strip() for p in l.split(":", 1)) for l in lines[1:]]
        parts = self.line.split(" ", 2)
        self.target = parts[1] if len(parts) > 1 else ""
        self.status = int(parts[1]) if self.line.startswith("HTTP/") else 0

    def get(self, name):
        """Every value of the fields called name (case-insensitive)."""
        return [v for n, v in self.fields if n.lower() == name.lower()]

    def names(self):
        return [n.lower() for n, _ in self.fields]


def read_chunked(r):
    """A chunked body, raw: size lines, data, trailers, the final empty line."""
    out = b""
    while True:
        line = r.until(b"\r\n", 4096)
        out += line
        size = int(line.split(b";")[0].strip(), 16)  # ValueError on garbage
        if size == 0:
            break
        data = r.exactly(size + 2)
        if not data.endswith(b"\r\n"):
            raise ValueError("chunk data not followed by CRLF")
        out += data
    while True:
        line = r.until(b"\r\n", 4096)
        out += line
        if line == b"\r\n":
            return out


def read_body(r, m, response=False):
    """m's body from r: chunked (kept raw), by Content-Length, or (a response with neither)
    up to EOF; none for 1xx, 204 and 304."""
    te, cl = m.get("transfer-encoding"), m.get("content-length")
    if 100 <= m.status < 200 or m.status in (204, 304):
        return b""
    if te:
        return read_chunked(r)
    if cl:
        return r.exactly(int(cl[0]))
    return r.rest() if response else b""


class Client:
    """A raw-socket HTTP client of the proxy."""

    def __init__(self, px, timeout=10):
        self.sock = connect(px.addr, timeout)
        self.r = Reader(self.sock)

    def send(self, data):
        self.sock.sendall(data)

    def response(self):
        m = Message(self.r.until(b"\r\n\r\n"))
        m.body = read_body(self.r, m, response=True)
        return m

    def ask(self, data):
        self.send(data)
        return self.response()

    def closed(self, timeout=5):
        """Whether the proxy closes the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.r.buf == b"" and self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def assert_error(resp, status, text):
    """A complete error page: status, Content-Length, Connection: close, a one-line body."""
    assert resp.status == status, "want %d, got %r" % (status, resp.head)
    assert resp.get("connection") == ["close"], resp.head
    assert resp.get("content-length") == [str(len(resp.body))], resp.head
    line = b"%d %s" % (status, text.encode())  # then ": why", if it says (test_truth)
    assert resp.body.count(b"\n") == 1 and resp.body.endswith(b"\n"), resp.body
    assert resp.body == line + b"\n" or resp.body.startswith(line + b": "), resp.body
    assert MARK.encode() not in resp.head + resp.body, "request echoed: %r" % resp.head


# ---- backends ---------------------------------------------------------------------------

def reply(status, body=b""):
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)


def ok_answer(server, req, r):
    return reply(200, server.name + b" " + req.target.encode())


def upgrade_answer(server, req, r):
    """101 to a request asking to upgrade, then echo raw bytes until EOF."""
    if not req.get("upgrade"):
        return ok_answer(server, req, r)
    r.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                   b"Upgrade: %s\r\n\r\n" % req.get("upgrade")[0].encode())
    data, r.buf = r.buf, b""
    while True:
        if data:
            r.sock.sendall(data)
        data = r.sock.recv(65536)
        if not data:
            return None


def early_handler(c, server):
    """Answers a request as soon as its head arrives, then reads its body (servers may)."""
    r = Reader(c)
    try:
        req = Message(r.until(b"\r\n\r\n"))
        c.sendall(reply(200, b"early"))
        req.body = read_body(r, req)
        with server.lock:
            server.received.append(req)
    except EOFError:
        pass


def origin(answer=ok_answer, name=b"origin"):
    """A keep-alive HTTP/1.1 backend on 127.0.0.1. Records every head (.heads), every request
    that arrived whole, body included, raw (.received), and connections ended (.ended); conns
    counts accepts. answer(server, req, reader) returns the response, or None when it has
    taken the connection over."""
    def handler(c, server):
        r = Reader(c)
        try:
            while True:
                req = Message(r.until(b"\r\n\r\n"))
                with server.lock:
                    server.heads.append(req)
                req.body = read_body(r, req)
                with server.lock:
                    server.received.append(req)
                out = answer(server, req, r)
                if out is None:
                    return
                c.sendall(out)
        except (EOFError, ValueError):
            pass  # the peer ended, mid-request or not: what arrived whole is recorded
        finally:
            with server.lock:
                server.ended += 1

    srv = Server(handler, name=name)
    srv.heads, srv.ended = [], 0
    return srv


def curl(*args):
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True,
                          timeout=20)


# ---- curl, forwarding, bodies -----------------------------------------------------------

def test_http_curl_gets_407_without_credentials_and_200_with_them():
    with origin() as o, http_proxy() as px:
        proxy = "http://%s:%d" % px.addr
        r = curl("-i", "-x", proxy, url(o, "/first"))
        assert r.stdout.startswith(b"HTTP/1.1 407 "), r.stdout
        assert b'Proxy-Authenticate: Basic realm="test-realm"\r\n' in r.stdout, r.stdout
        assert o.conns == 0, "a request without credentials reached the backend"
        for args in (["-U", "%s:%s" % (USER, PASSWORD), "-x", proxy],
                     ["-x", "http://%s:%s@%s:%d" % (USER, PASSWORD, *px.addr)]):
            r = curl(*args, url(o, "/ok"))
            assert r.returncode == 0 and r.stdout == b"origin /ok", (r.stdout, r.stderr)
        assert len(o.received) == 2, o.received
        for req in o.received:
            assert req.line == "GET /ok HTTP/1.1", req.line
            assert req.get("host") == [o.addr], req.head
            assert req.get("via") == [via(px)], req.head
            for hop in ("proxy-authorization", "proxy-connection"):
                assert hop not in req.names(), "%s forwarded: %r" % (hop, req.head)
        assert px.metric('proxy_auth_failures_total{reason="missing"}') == 1


def test_http_absolute_form_is_forwarded_in_origin_form_without_hop_by_hop_fields():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        resp = c.ask(request("GET", url(o, "/a/b?c=1"), "Host: wrong.example", AUTH,
                             "Connection: keep-alive, X-Hop", "X-Hop: 1", "Keep-Alive: 5",
                             "TE: trailers", "Trailer: X-T", "Proxy-Connection: keep-alive",
                             "X-Keep: yes"))
        assert resp.status == 200 and resp.body == b"origin /a/b?c=1", resp.head
        req, = o.received
        assert req.line == "GET /a/b?c=1 HTTP/1.1", req.line
        assert req.get("host") == [o.addr], "Host must come from the target: %r" % req.head
        assert req.get("x-keep") == ["yes"] and req.get("via") == [via(px)], req.head
        for hop in ("proxy-authorization", "connection", "x-hop", "keep-alive", "te",
                    "trailer", "proxy-connection"):
            assert hop not in req.names(), "%s forwarded: %r" % (hop, req.head)
        assert c.ask(request("GET", "http://" + o.addr, "Host: h", AUTH)).status == 200
        assert o.received[1].line == "GET / HTTP/1.1", "no path: %r" % o.received[1].line


def test_http_origin_form_goes_to_the_configured_upstream_like_wrk():
    with origin() as o:
        with http_proxy(o.addr) as px:
            c = Client(px)
            resp = c.ask(request("GET", "/index.html", "Host: bench.example", AUTH))
            assert resp.status == 200 and resp.body == b"origin /index.html", resp.head
            resp = c.ask(request("GET", "/again", "Host: bench.example"))
            assert resp.status == 407, "origin-form without credentials: %r" % resp.head
            req, = o.received
            assert req.line == "GET /index.html HTTP/1.1", req.line
            assert req.get("host") == ["bench.example"] and req.get("via") == [via(px)]
            assert "proxy-authorization" not in req.names(), req.head
            c = Client(px)  # HTTP/1.1 without Host is malformed
            assert_error(c.ask(request("GET", "/nohost", AUTH)), 400, "Bad Request")
        with http_proxy() as px:  # no upstream configured: nowhere to send /path
            assert_error(Client(px).ask(request("GET", "/x", "Host: h", AUTH)), 400,
                         "Bad Request")
        assert len(o.received) == 1, o.received


def test_http_post_bodies_chunked_and_content_length_reach_the_backend_byte_exact():
    data = random_bytes(200000)
    chunked = (b"5;ext=1\r\nhello\r\n%x\r\n%s\r\n0\r\nX-Trailer: t\r\n\r\n"
               % (len(data), data))
    with origin() as o, http_proxy() as px:
        c = Client(px)
        resp = c.ask(request("POST", url(o, "/chunked"), "Host: h", AUTH,
                             "Transfer-Encoding: chunked", body=chunked))
        assert resp.status == 200, resp.head
        resp = c.ask(request("POST", url(o, "/length"), "Host: h", AUTH,
                             "Content-Length: %d" % len(data), body=data))
        assert resp.status == 200, resp.head
        first, second = o.received
        assert first.get("transfer-encoding") == ["chunked"], first.head
        assert "content-length" not in first.names(), first.head
        assert first.body == chunked, "chunked body changed: sha %s" % sha(first.body)
        assert second.get("content-length") == [str(len(data))], second.head
        assert second.body == data, "body changed: %d bytes" % len(second.body)
        for req in (first, second):
            assert req.get("host") == [o.addr] and req.get("via") == [via(px)], req.head
            assert "proxy-authorization" not in req.names(), req.head
        assert o.conns == 1, "one keep-alive client, one upstream connection"


def answers_at_the_last_chunk(c, server):
    """An origin that answers a chunked request as soon as it has the last chunk's size line,
    then reads the end of the body (the empty line after the trailer section)."""
    r = Reader(c)
    while True:
        try:
            r.until(b"\r\n\r\n")  # the head
            r.until(b"\r\n0\r\n")  # up to the last chunk
        except EOFError:
            return
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        r.until(b"\r\n")


def test_http_a_body_that_ends_just_after_its_response_keeps_the_client_connection():
    """A server may answer once it has a body's last chunk, a moment before the body's very end
    (here the client sends the final CRLF 20 ms later). A body that ends within a moment of its
    response keeps the client's connection. Before, the response said Connection: close
    whenever the back thread had not yet said that the body was done, so keep-alive clients
    lost their connection now and then: 3 in 600 chunked POSTs beside busy loops, 1 in 25
    under valgrind (test_http_post_bodies failed in CI)."""
    with Server(answers_at_the_last_chunk) as o, http_proxy() as px:
        c = Client(px)
        for i in range(3):
            c.send(request("POST", url(o, "/%d" % i), "Host: h", AUTH,
                           "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n"))
            time.sleep(0.02)
            c.send(b"\r\n")
            resp = c.response()
            assert resp.status == 200 and resp.body == b"ok", resp.head
            assert not any("close" in v.lower() for v in resp.get("connection") or []), resp.head
        assert o.conns == 1, "one keep-alive client, one upstream connection"


# ---- CONNECT ----------------------------------------------------------------------------

def tls_server(workdir):
    """openssl s_server -www on a loopback port with a throwaway self-signed certificate."""
    key, cert = os.path.join(workdir, "key.pem"), os.path.join(workdir, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj",
                    "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
                   capture_output=True, timeout=60, check=True)
    port = closed_port()
    p = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:%d" % port, "-cert", cert,
                          "-key", key, "-www"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            connect(("127.0.0.1", port), timeout=1).close()
            return p, port
        except OSError:
            if time.monotonic() > deadline or p.poll() is not None:
                p.kill()
                raise AssertionError("openssl s_server did not start")
            time.sleep(0.1)


def test_http_curl_over_connect_reaches_a_local_tls_server():
    p, port = tls_server(tempfile.mkdtemp(dir=TMP))
    try:
        with http_proxy(ports="%d" % port) as px:
            r = curl("-k", "-U", "%s:%s" % (USER, PASSWORD), "-x", "http://%s:%d" % px.addr,
                     "https://127.0.0.1:%d/" % port)
            assert r.returncode == 0, r.stderr
            assert b"s_server" in r.stdout, "not the s_server status page: %r" % r.stdout[:200]
            px.wait_line(r" %s CONNECT 127\.0\.0\.1:%d 200 " % (USER, port))
            assert px.metric("proxy_http_tunnels_total") == 1
    finally:
        p.kill()
        p.wait(10)


def test_http_connect_forwards_bytes_pipelined_after_the_head():
    data = random_bytes(1 << 20)
    with Server(echo_handler) as echo, http_proxy(ports="443, %d" % echo.port) as px:
        c = Client(px)
        c.send(request("CONNECT", echo.addr, "Host: " + echo.addr, AUTH) + b"early bytes")
        assert c.r.exactly(len(ESTABLISHED)) == ESTABLISHED, c.r.buf
        assert c.r.exactly(11) == b"early bytes", "bytes sent with the CONNECT head were lost"
        threading.Thread(target=c.send, args=(data,), daemon=True).start()
        assert sha(c.r.exactly(len(data))) == sha(data), "tunnel corrupted the stream"
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed(), "half-close not passed through the tunnel"


def test_http_connect_refusals_403_502_and_504():
    dead = closed_port()
    hole, keep = blackhole()
    with Server(echo_handler) as echo, http_proxy(ports="443, %d, %s" % (
            dead, hole.split(":")[1]), connect_timeout=1) as px:
        cases = [(echo.addr, 403, "Forbidden"),  # a port not in connect_ports
                 ("127.0.0.1:%d" % dead, 502, "Bad Gateway"),  # refused
                 ("nonexistent.invalid:443", 502, "Bad Gateway"),  # DNS failure
                 (hole, 504, "Gateway Timeout")]  # connect_timeout
        for target, status, text in cases:
            c = Client(px, timeout=30)  # a slow resolver may take a while to say "no"
            assert_error(c.ask(request("CONNECT", target, "Host: " + target, AUTH)),
                         status, text)
            assert c.closed(), target
        assert echo.conns == 0, "CONNECT to a port not allowed reached it"
        assert px.metric("proxy_http_tunnels_total") == 0
    for k in keep:
        k.close()


# ---- authentication on every request ----------------------------------------------------

def test_http_keepalive_second_request_with_bad_credentials_gets_407_not_the_backend():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        assert c.ask(get(o, "/1", AUTH)).status == 200
        resp = c.ask(get(o, "/2", basic(password=WRONG)))
        assert resp.status == 407, resp.head
        assert resp.get("proxy-authenticate") == ['Basic realm="test-realm"'], resp.head
        assert resp.get("connection") == [], "a 407 without body keeps the connection"
        assert c.ask(get(o, "/3", AUTH)).status == 200
        assert [r.target for r in o.heads] == ["/1", "/3"], "/2 must never reach the backend"
        resp = c.ask(request("POST", url(o, "/4"), "Host: h", "Content-Length: 5"))
        assert resp.status == 407 and resp.get("connection") == ["close"], resp.head
        assert c.closed(), "after a 407 to a request with a body, the connection ends"
        assert px.metric('proxy_auth_failures_total{reason="bad_credentials"}') == 1
        assert px.metric('proxy_auth_failures_total{reason="missing"}') == 1


def test_http_a_second_host_after_a_good_request_still_needs_credentials():
    with origin(name=b"A") as a, origin(name=b"B") as b, http_proxy() as px:
        sneaks = [get(b, "/sneak", *fields)
                  for fields in ((), (basic(password=WRONG),), ("Proxy-Authorization: Basic",),
                                 (AUTH, AUTH))]
        sneaks.append(request("CONNECT", b.addr, "Host: " + b.addr))  # nor a tunnel
        for sneak in sneaks:  # a connection each: a few 407s close one (AUTH_FAILURES_MAX)
            c = Client(px)
            assert c.ask(get(a, "/1", AUTH)).status == 200
            resp = c.ask(sneak)
            assert resp.status == 407, (sneak, resp.head)
        assert b.conns == 0 and b.heads == [], "an unauthenticated request reached B"
        assert c.ask(get(b, "/2", AUTH)).status == 200
        assert [r.target for r in b.heads] == ["/2"]


def test_http_pipelined_requests_are_each_authenticated():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        c.send(get(o, "/a", AUTH) + get(o, "/b") + get(o, "/c", AUTH))
        got = [c.response() for _ in range(3)]
        assert [r.status for r in got] == [200, 407, 200], [r.line for r in got]
        assert got[0].body == b"origin /a" and got[2].body == b"origin /c"
        assert [r.target for r in o.heads] == ["/a", "/c"], [r.target for r in o.heads]
        for user, status in ((USER, 200), ("-", 407)):
            px.wait_line(r" %s GET %s %d " % (user, re.escape(o.addr), status))


def test_http_proxy_authorization_name_is_case_insensitive_and_must_be_single():
    with origin() as o, http_proxy() as px:
        for name in ("proxy-authorization", "PROXY-AUTHORIZATION", "pRoXy-AuThOrIzAtIoN"):
            resp = Client(px).ask(get(o, "/" + name, basic(name=name)))
            assert resp.status == 200, (name, resp.head)
        c = Client(px)
        resp = c.ask(get(o, "/twice", AUTH, basic(user="bob")))
        assert resp.status == 407, "two Proxy-Authorization fields: %r" % resp.head
        resp = c.ask(get(o, "/twice-same", AUTH, AUTH))
        assert resp.status == 407, "two identical Proxy-Authorization fields: %r" % resp.head
        assert len(o.received) == 3 and not any("twice" in r.target for r in o.heads)
        assert px.metric('proxy_auth_failures_total{reason="malformed"}') == 2


# ---- timeouts and the full queue --------------------------------------------------------

def test_http_slow_head_is_cut_at_header_timeout_and_the_worker_freed():
    # min_rate = 0: a field every 0.4 s is 50 bytes/s, which min_rate (500) would end sooner.
    with origin() as o, http_proxy(workers=1, header_timeout=2, min_rate=0) as px:
        slow = Client(px)
        start = time.monotonic()
        slow.send(b"GET %s HTTP/1.1\r\n" % url(o).encode())
        for i in range(16):  # a field every 0.4 s, until the proxy answers: the head never ends
            if select.select([slow.sock], [], [], 0.4)[0]:
                break
            slow.send(b"X-Slow-%d: 1\r\n" % i)
        took = time.monotonic() - start
        assert 1.5 < took < 4.5, "cut after %.1f s with header_timeout = 2" % took
        assert_error(slow.response(), 408, "Request Timeout")
        assert slow.closed()
        resp = Client(px).ask(get(o, "/next", AUTH))
        assert resp.status == 200, "the only worker was not freed: %r" % resp.head
        assert [r.target for r in o.heads] == ["/next"]


def test_http_silent_client_is_cut_at_header_timeout():
    with http_proxy(workers=1, header_timeout=2) as px:
        silent = Client(px)
        start = time.monotonic()
        resp = silent.response()
        took = time.monotonic() - start
        assert 1.5 < took < 4.5, "cut after %.1f s with header_timeout = 2" % took
        assert_error(resp, 408, "Request Timeout")
        px.wait_line(r" - - - 408 ")


def test_http_a_full_queue_keeps_new_clients_waiting_then_serves_them():
    # park_after = 0: the kept-alive client keeps the only worker, however slowly the test runs
    # (with parking on it would give it up: test_park.py). The new client is neither refused
    # (no 503: that is for max_connections) nor accepted: it waits in the listen backlog.
    with origin() as o, http_proxy(workers=1, queue=0, users=False, park_after=0) as px:
        held = Client(px)
        assert held.ask(get(o, "/held")).status == 200
        time.sleep(0.4)  # as on a slow machine: past park_after's default (200 ms)
        c = Client(px)
        c.send(get(o, "/waits"))
        got = got_within(c.sock, 0.5)
        assert got is None, "the client beyond the queue got %r" % got
        m = px.metrics()
        assert m["proxy_connections_accepted_total"] == 1, m
        assert refusals(m) == 0, m
        held.close()
        c.sock.settimeout(10)
        assert c.response().status == 200
        assert px.metric("proxy_connections_accepted_total") == 2


# ---- strict framing: the CVE shapes -----------------------------------------------------

def test_http_cve_2023_49606_connection_naming_connection_survives():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        resp = c.ask(get(o, "/uaf", AUTH, "Connection: Connection, Proxy-Connection",
                         "Proxy-Connection: keep-alive"))
        if resp.status == 200:  # forwarded: without the fields it named
            req, = o.received
            assert not {"connection", "proxy-connection"} & set(req.names()), req.head
        else:
            assert_error(resp, 400, "Bad Request")
            assert o.conns == 0
        assert px.p.poll() is None, "the proxy died"
        assert Client(px).ask(get(o, "/after", AUTH)).status == 200


def rejections(o, echo):
    """(what, request bytes, status) for heads the proxy must refuse before any upstream."""
    h, m = "Host: h", "X-M: " + MARK
    bad_get = lambda *f, target=url(o, "/" + MARK), **kw: request("GET", target, h, AUTH, m,
                                                                  *f, **kw)
    post = lambda *f: request("POST", url(o, "/" + MARK), h, AUTH, m, *f)
    flood = ["X-F%d: %s" % (i, MARK) for i in range(98)]  # with Host, AUTH, X-M: 101
    return [
        ("CVE-2022-40468 no method", b" %s HTTP/1.1\r\nHost: h\r\n\r\n" % url(o).encode(), 400),
        ("no target", b"GET HTTP/1.1\r\nHost: h\r\n\r\n", 400),
        ("empty request line", b"\r\nGET / HTTP/1.1\r\n\r\n", 400),
        ("CVE-2012-3505 header flood", bad_get(*flood), 431),
        ("TE chunked, gzip", post("Transfer-Encoding: chunked, gzip"), 400),
        ("TE chunked,", post("Transfer-Encoding: chunked,"), 400),
        ("TE gzip", post("Transfer-Encoding: gzip"), 400),
        ("TE twice", post("Transfer-Encoding: chunked", "Transfer-Encoding: chunked"), 400),
        ("space before colon", post("Content-Length : 5"), 400),
        ("CVE-2020-15049 CL +5", post("Content-Length: +5"), 400),
        ("CL -1", post("Content-Length: -1"), 400),
        ("CL 5 5", post("Content-Length: 5 5"), 400),
        ("CL 0x5", post("Content-Length: 0x5"), 400),
        ("CL list", post("Content-Length: 5, 5"), 400),
        ("duplicate CL", post("Content-Length: 5", "Content-Length: 5"), 400),
        ("CL and TE", post("Content-Length: 5", "Transfer-Encoding: chunked"), 400),
        ("obs-fold", bad_get("X-A: 1", " folded"), 400),
        ("bare LF", bad_get("X-A: 1\nX-B: 2"), 400),
        ("bare CR", bad_get("X-A: 1\rX-B: 2"), 400),
        ("NUL", bad_get("X-A: 1\0"), 400),
        ("two Host", bad_get("Host: other"), 400),
        ("CONNECT port overflow", request("CONNECT", "127.0.0.1:65979", h, AUTH), 400),
        ("CONNECT without port", request("CONNECT", "127.0.0.1", h, AUTH), 400),
        ("userinfo in the target", bad_get(target="http://u:%s@%s/" % (MARK, o.addr)), 400),
        ("https outside CONNECT", bad_get(target="https://%s/" % echo.addr), 400),
        ("HTTP/2.0", bad_get(version="HTTP/2.0"), 505),
        # Exactly HEAD_MAX bytes, so the proxy reads all we sent and its close is not a reset.
        ("over-long request line", b"GET /" + b"a" * (16384 - 5), 414),
        ("over-long head", b"GET / HTTP/1.1\r\nX-L: " + b"b" * (16384 - 21), 431),
    ]


def test_http_cve_shapes_and_bad_framing_get_exact_errors_and_reach_nothing():
    texts = {400: "Bad Request", 414: "URI Too Long", 431: "Request Header Fields Too Large",
             505: "HTTP Version Not Supported"}
    failures = []
    with origin() as o, Server(echo_handler) as echo, \
            http_proxy(ports="443, %d" % echo.port) as px:
        for what, data, status in rejections(o, echo):
            c = Client(px)
            try:
                c.send(data)
                assert_error(c.response(), status, texts[status])
                assert c.closed(), "connection left open"
            except (AssertionError, OSError, EOFError, ValueError) as e:
                failures.append("%s: %s" % (what, e))
            c.close()
        if px.p.poll() is not None:
            failures.append("the proxy died")
        if o.conns or echo.conns:
            failures.append("refused requests reached a backend: %r" % [r.line for r in o.heads])
    assert not failures, "\n".join(failures)


def test_http_transfer_encoding_chunked_is_case_insensitive():
    body = b"3\r\nabc\r\n0\r\n\r\n"
    with origin() as o, http_proxy() as px:
        resp = Client(px).ask(request("POST", url(o, "/ci"), "Host: h", AUTH,
                                      "Transfer-Encoding: Chunked", body=body))
        assert resp.status == 200, resp.head
        req, = o.received
        assert req.get("transfer-encoding") == ["Chunked"] and req.body == body, req.head


def test_http_chunk_size_of_17_hex_digits_ends_the_connection_before_the_body():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        c.send(request("POST", url(o, "/big"), "Host: h", AUTH, "Transfer-Encoding: chunked",
                       body=b"10000000000000000\r\nabc\r\n0\r\n\r\n"))
        assert c.r.rest() == b"", "want the connection closed, got a response"
        wait_for("the upstream connection to close", lambda: o.ended == o.conns)
        assert o.received == [], "a body with a 17-digit chunk size arrived whole"
        assert px.p.poll() is None


# ---- keep-alive, loops, Upgrade ---------------------------------------------------------

def test_http_keepalive_reuses_the_upstream_connection_and_switches_hosts():
    with origin(name=b"A") as a, origin(name=b"B") as b, http_proxy() as px:
        c = Client(px)
        bodies = [c.ask(get(s, p, AUTH)).body
                  for s, p in ((a, "/1"), (a, "/2"), (b, "/3"), (a, "/4"))]
        assert bodies == [b"A /1", b"A /2", b"B /3", b"A /4"], bodies
        assert (a.conns, b.conns) == (2, 1), "A /1 and /2 share one connection; A /4 is new"
        wait_for("A's first connection to close", lambda: a.ended >= 1)


def test_http_request_that_loops_back_to_the_proxy_gets_508():
    with http_proxy(users=False) as px:
        # To the proxy's own address: refused before any connection (test_http_dial.py).
        self_url = "http://%s:%d/loop" % px.addr
        resp = Client(px).ask(request("GET", self_url, "Host: h"))
        assert resp.status == 403, "a request to the proxy itself: %r" % resp.head
        # A loop through other proxies comes back with our Via.
        resp = Client(px).ask(request("GET", "http://127.0.0.1:1/", "Via: " + via(px)))
        assert_error(resp, 508, "Loop Detected")
    with http_proxy() as px:  # seen before auth: a looped request has no credentials left
        resp = Client(px).ask(request("GET", "http://127.0.0.1:1/", "Via: " + via(px)))
        assert_error(resp, 508, "Loop Detected")


def test_http_error_reply_to_a_request_with_a_big_body_ends_cleanly_not_with_a_reset():
    """The proxy stops reading after a 407; closing with the body unread would send a reset
    that can destroy the reply in flight. It must close its side and drain instead."""
    body = random_bytes(100 * 1024)
    with origin() as o, http_proxy() as px:
        for _ in range(5):
            s = connect(px.addr)
            s.sendall(request("POST", url(o, "/up"), "Host: h",
                              "Content-Length: %d" % len(body), body=body))
            time.sleep(0.05)
            got = b""
            try:
                while True:
                    d = s.recv(65536)
                    if not d:
                        break
                    got += d
            except ConnectionResetError:
                raise AssertionError("reset after %r" % got[:80])
            assert got.startswith(b"HTTP/1.1 407 ") and got.endswith(b"(Basic)\n"), got
            s.close()
        assert o.heads == []


def test_http_upgrade_101_then_raw_bytes_both_ways():
    with origin(upgrade_answer) as o, http_proxy() as px:
        c = Client(px)
        resp = c.ask(get(o, "/ws", AUTH, "Connection: Upgrade", "Upgrade: websocket"))
        assert resp.status == 101, resp.head
        for raw in (b"\x81\x05hello", b"GET / HTTP/1.1\r\n\r\n", b"\x00\xff" * 1000):
            c.send(raw)
            assert c.r.exactly(len(raw)) == raw, "raw bytes after 101 not relayed"
        req, = o.received
        assert req.get("upgrade") == ["websocket"], req.head
        assert [v.lower() for v in req.get("connection")] == ["upgrade"], req.head
        assert px.metric("proxy_http_upgrades_total") == 1


def test_http_upgrade_answered_200_keeps_speaking_http():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        resp = c.ask(get(o, "/ws", AUTH, "Connection: upgrade", "Upgrade: websocket"))
        assert resp.status == 200 and resp.body == b"origin /ws", resp.head
        resp = c.ask(get(o, "/next", AUTH))
        assert resp.status == 200 and resp.body == b"origin /next", resp.head
        assert o.conns == 1, "upstream connections: %d" % o.conns
        assert px.metric("proxy_http_upgrades_total") == 0


def test_http_a_101_to_a_request_that_did_not_ask_to_upgrade_gets_502():
    def rogue(server, req, r):  # switches protocols unasked, then would relay raw bytes
        return b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"
    with origin(rogue) as o, http_proxy() as px:
        c = Client(px)
        assert_error(c.ask(get(o, "/", AUTH)), 502, "Bad Gateway")
        assert px.metric("proxy_http_upgrades_total") == 0


def test_http_lowercase_head_is_not_head_so_its_response_body_is_relayed():
    with origin() as o, http_proxy() as px:
        c = Client(px)
        c.send(request("head", url(o, "/a"), "Host: h", AUTH) + get(o, "/b", AUTH))
        first, second = c.response(), c.response()
        assert first.status == 200 and first.body == b"origin /a", first.head
        assert second.status == 200 and second.body == b"origin /b", second.head


# ---- access log and metrics -------------------------------------------------------------

def test_http_access_log_and_metrics_name_the_user_never_the_password():
    # TIME CLIENT USER METHOD TARGET STATUS up=N down=N ms=X
    line = (r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 127\.0\.0\.1:\d+ %s %s %s %d "
            r"up=%s down=%s ms=\d+\.\d{3} error=\S+$")
    with origin() as o, Server(echo_handler) as echo, \
            http_proxy(ports="%d" % echo.port) as px:
        target = re.escape(o.addr)
        # A connection each: a few 407s close one (AUTH_FAILURES_MAX).
        missing = Client(px).ask(get(o, "/"))
        bad = Client(px).ask(get(o, "/", basic(password=WRONG)))
        malformed = Client(px).ask(get(o, "/", "Proxy-Authorization: Basic !!" + PASSWORD))
        assert [r.status for r in (missing, bad, malformed)] == [407] * 3
        c = Client(px)
        ok = c.ask(get(o, "/", AUTH))
        posted = c.ask(request("POST", url(o, "/p"), "Host: h", AUTH, "Content-Length: 3",
                               body=b"abc"))
        assert ok.status == 200 and posted.status == 200
        t = Client(px)
        t.send(request("CONNECT", echo.addr, "Host: h", AUTH) + b"ping")
        assert t.r.exactly(len(ESTABLISHED) + 4) == ESTABLISHED + b"ping"
        t.close()
        for resp in (missing, bad, malformed):
            px.wait_line(line % ("-", "GET", target, 407, "0", len(resp.head + resp.body)))
        px.wait_line(line % (USER, "GET", target, 200, r"\d+", len(ok.head + ok.body)))
        px.wait_line(line % (USER, "POST", target, 200, r"\d+", len(posted.head + posted.body)))
        px.wait_line(line % (USER, "CONNECT", re.escape(echo.addr), 200, "4", r"\d+"))
        m = px.metrics()
        want = {'proxy_http_requests_total{method="GET"}': 4,
                'proxy_http_requests_total{method="POST"}': 1,
                'proxy_http_requests_total{method="CONNECT"}': 1,
                'proxy_http_responses_total{code="2xx"}': 3,
                'proxy_http_responses_total{code="4xx"}': 3,
                'proxy_auth_failures_total{reason="missing"}': 1,
                'proxy_auth_failures_total{reason="malformed"}': 1,
                'proxy_auth_failures_total{reason="bad_credentials"}': 1,
                "proxy_http_tunnels_total": 1}
        got = {k: m.get(k) for k in want}
        assert got == want, got
        for secret in (PASSWORD, WRONG, b64("%s:%s" % (USER, PASSWORD)),
                       b64("%s:%s" % (USER, WRONG))):
            assert secret not in px.text(), "%r in the log" % secret


def test_http_access_log_up_counts_what_went_upstream_even_when_the_answer_is_quick():
    """up= in a request's log line is what went upstream for it. The back thread writes the
    line when the response is through, which may be before the front thread has finished
    sending (or recorded what it sent): the line must still count the head at least. (The
    same race, without a body, logs up=0 for about 1 plain GET in 300.)"""
    with Server(early_handler) as early, http_proxy(users=False) as px:
        c = Client(px)
        c.send(request("POST", url(early, "/early"), "Host: h", "Content-Length: 4"))
        assert c.response().body == b"early"
        c.send(b"body")
        wait_for("the body upstream", lambda: early.received)
        req, = early.received
        up = int(px.wait_line(r" POST \S+ 200 up=(\d+) ").group(1))
        assert up >= len(req.head), "up=%d, but the %d-byte head had gone upstream before " \
            "the response came" % (up, len(req.head))
