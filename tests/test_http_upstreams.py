"""tests/test_http_upstreams.py — http mode against upstreams that misbehave the way real ones
do: keep-alive connections that close or reset just as a request goes out, stray bytes after a
response, cuts mid-body, close-delimited bodies, early answers to uploads, hop-by-hop fields in
responses, HTTP/1.0 clients, odd status lines and framing, and the log lines and metrics all
this leaves.

Every backend here is a small script on lib.Server speaking raw HTTP/1.1, so each test controls
every byte the proxy gets, counts the upstream connections and records what each received.
Every test name starts with test_http_ (run.py -k test_http_)."""
import gzip
import os
import re
import socket
import struct
import threading
import time

from lib import TMP, Server
from test_http import (Client, Message, Reader, assert_error, curl, early_handler, get,
                       http_proxy, origin, read_body, reply, request, url, via, wait_for)

# TIME PEER USER METHOD TARGET STATUS up=N down=N ms=F
LOG = re.compile(r"^\S+ \S+ (\S+) (\S+) (\S+) (\S+) up=(\d+) down=(\d+) ms=\S+ error=\S+$")


# ---- helpers ------------------------------------------------------------------------------

def scripted(script, name=b""):
    """A backend that runs script(c, reader, i, server) on each accepted connection, i counting
    connections from 1. server.requests holds (i, request) for every request read whole by
    read_request; server.done counts scripts that returned."""
    def handler(c, server):
        with server.lock:
            server.index += 1
            i = server.index
        try:
            script(c, Reader(c), i, server)
        except (EOFError, ValueError, OSError):
            pass
        finally:
            with server.lock:
                server.done += 1

    srv = Server(handler, name=name)
    srv.index, srv.done, srv.requests = 0, 0, []
    return srv


def read_request(r, server, i):
    """Reads one whole request (head and body) from r and records it."""
    req = Message(r.until(b"\r\n\r\n"))
    req.body = read_body(r, req)
    with server.lock:
        server.requests.append((i, req))
    return req


def keep_serving(c, r, i, server, body=b"fresh"):
    """Answers every further request on the connection with 200 and body, until EOF."""
    while True:
        read_request(r, server, i)
        c.sendall(reply(200, body))


def reset(s):
    """Closes s with a TCP reset instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def log_lines(px, method=None):
    """The access log lines as (user, method, target, status, up, down), optionally of one
    method only."""
    out = []
    for line in px.text().splitlines():
        m = LOG.match(line)
        if m and (method is None or m.group(2) == method):
            out.append((m.group(1), m.group(2), m.group(3), m.group(4), int(m.group(5)),
                        int(m.group(6))))
    return out


def wait_log(px, method, count, timeout=5):
    """Waits for count log lines of method, then a little longer for any extra one; returns
    them all."""
    deadline = time.monotonic() + timeout
    while len(log_lines(px, method)) < count:
        if time.monotonic() > deadline:
            raise AssertionError("want %d %s log line(s), got:\n%s" % (count, method, px.text()))
        time.sleep(0.02)
    time.sleep(0.3)
    return log_lines(px, method)


def assert_bad_gateway(resp):
    """The proxy's own 502 page (Connection: close is not required of it here)."""
    assert resp.status == 502, "want our 502, got %r" % resp.head
    assert resp.body.startswith(b"502 Bad Gateway: "), "not our error page: %r" % resp.body
    assert resp.get("content-length") == [str(len(resp.body))], resp.head


def tokens(resp, name):
    """The lowercased list items of every field called name."""
    return [t.strip().lower() for v in resp.get(name) for t in v.split(",")]


def limit(seconds):
    """Sets the test's time limit in run.py."""
    def set_limit(fn):
        fn.limit = seconds
        return fn
    return set_limit


# ---- 1. a reused upstream connection that closes is retried -------------------------------

@limit(30)
def test_http_reused_upstream_closed_after_reading_the_next_request_is_retried():
    """The keep-alive timeout race: the upstream answered request 1 and kept the connection,
    then reads request 2 and closes without answering (its idle timer fired as the request
    crossed). A GET that was never answered is safe to send again: the client must get 200
    from a fresh upstream connection, keep its own connection, and the log must show one line
    per request and no 502."""
    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(reply(200, b"first"))
        if i == 1:
            read_request(r, server, i)
            return  # closes without answering
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(up, "/1")).body == b"first"
        resp = c.ask(get(up, "/2"))  # retried: the first request on connection 2
        assert resp.status == 200 and resp.body == b"first", \
            "a GET lost to a closing keep-alive connection was not retried: %r" % resp.head
        assert up.conns == 2, "upstream connections: %d" % up.conns
        resp = c.ask(get(up, "/3"))
        assert resp.status == 200 and resp.body == b"fresh", resp.head
        statuses = [line[3] for line in wait_log(px, "GET", 3)]
        assert statuses == ["200"] * 3, "log statuses: %r" % statuses


@limit(30)
def test_http_reused_upstream_reset_while_idle_is_replaced_for_the_next_request():
    """An upstream that resets idle keep-alive connections (SO_LINGER 0 then close) instead of
    closing them. The next GET on the same client connection must be answered 200 on a fresh
    upstream connection; the client connection must not pay for the upstream's reset."""
    reset_done = threading.Event()

    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(reply(200, b"first"))
        if i == 1:
            time.sleep(0.1)
            reset(c)
            reset_done.set()
            return
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(up, "/1")).body == b"first"
        assert reset_done.wait(5)
        time.sleep(0.3)  # the reset has reached the proxy
        try:
            resp = c.ask(get(up, "/2"))
        except (EOFError, ConnectionResetError) as e:
            raise AssertionError("the client connection died with the upstream's: %s" % e)
        assert resp.status == 200 and resp.body == b"first", resp.head
        assert up.conns == 2, "upstream connections: %d" % up.conns


@limit(30)
def test_http_reused_upstream_reset_on_reading_the_next_request_is_retried():
    """The reset variant of the keep-alive race: the upstream reads request 2 on its reused
    connection and resets it (SO_LINGER 0) without answering. The GET must be retried on a
    fresh connection and answered 200."""
    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(reply(200, b"first"))
        if i == 1:
            read_request(r, server, i)
            reset(c)
            return
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(up, "/1")).body == b"first"
        resp = c.ask(get(up, "/2"))
        assert resp.status == 200 and resp.body == b"first", \
            "a GET lost to a reset keep-alive connection was not retried: %r" % resp.head
        assert up.conns == 2, "upstream connections: %d" % up.conns
        assert c.ask(get(up, "/3")).status == 200


@limit(30)
def test_http_stray_bytes_after_a_response_do_not_break_the_next_request():
    """A buggy upstream sends more than its Content-Length says ('hi' then 'ok\\r\\n' in the same
    send). The client must get exactly 'hi'; the upstream connection is unusable after that, so
    the next GET on the same client connection must get a proper 200 from a fresh upstream
    connection — never a 502 or a closed connection."""
    def script(c, r, i, server):
        read_request(r, server, i)
        if i == 1:
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhiok\r\n")
            keep_serving(c, r, i, server, b"reused")
        c.sendall(reply(200, b"fresh"))
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        resp = c.ask(get(up, "/1"))
        assert resp.status == 200 and resp.body == b"hi", (resp.head, resp.body)
        try:
            resp = c.ask(get(up, "/2"))
        except EOFError as e:
            raise AssertionError("the client connection was closed: %s" % e)
        assert resp.status == 200 and resp.body == b"fresh", \
            "after stray bytes: %r %r" % (resp.head, resp.body)
        assert up.conns == 2, "upstream connections: %d" % up.conns


@limit(30)
def test_http_post_lost_on_a_reused_upstream_connection_is_not_retried():
    """A POST is not idempotent: when the upstream reads it (body and all) on a reused
    keep-alive connection and closes without answering, it may have acted on it. The proxy must
    not send it again: the client gets our 502, and the upstream received the POST once."""
    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(reply(200, b"first"))
        if i == 1:
            read_request(r, server, i)
            return  # closes without answering
        keep_serving(c, r, i, server, b"retried")

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert c.ask(get(up, "/1")).body == b"first"
        resp = c.ask(request("POST", url(up, "/pay"), "Host: h", "Content-Length: 5",
                             body=b"12345"))
        assert_bad_gateway(resp)
        posts = [req for _, req in up.requests if req.line.startswith("POST ")]
        assert len(posts) == 1, "the upstream received the POST %d times" % len(posts)
        assert posts[0].body == b"12345"


@limit(30)
def test_http_failure_on_a_fresh_upstream_connection_is_not_retried():
    """An upstream that reads the request on a brand-new connection and closes without
    answering has failed, not raced a keep-alive timeout: the client gets our 502 and the
    proxy opens no second connection."""
    def script(c, r, i, server):
        read_request(r, server, i)
        if i == 1:
            return  # closes without answering
        c.sendall(reply(200, b"retried"))
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        assert_bad_gateway(c.ask(get(up, "/1")))
        assert up.conns == 1, "upstream connections: %d (retried)" % up.conns


@limit(30)
def test_http_upstream_cut_mid_body_ends_the_client_connection_without_a_502():
    """The upstream sends a head with Content-Length: 100, 10 body bytes, then closes. The
    client has already received a 200 head and part of its body: the proxy can only pass on the
    cut (close the client connection), never append a 502 after the 10 bytes. The log says 200:
    that is the status the client got."""
    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        c.send(get(up, "/cut"))
        head = Message(c.r.until(b"\r\n\r\n"))
        assert head.status == 200 and head.get("content-length") == ["100"], head.head
        rest = c.r.rest()
        assert rest == b"0123456789", "after the cut the client got %r" % rest[:200]
        statuses = [line[3] for line in wait_log(px, "GET", 1)]
        assert statuses == ["200"], "log statuses: %r" % statuses


# ---- 2. a response that ends the client connection ends it -----------------------------------

@limit(30)
def test_http_close_delimited_response_ends_the_connection_and_drops_pipelined_requests():
    """A response without Content-Length or chunked ends when the upstream closes, so the
    client connection must end with it (RFC 9112 9.6): the client gets the 200 with
    Connection: close, its body, then EOF at once (idle_timeout is 60). A POST the client
    pipelined behind the GET must never reach any upstream."""
    def script(c, r, i, server):
        read_request(r, server, i)
        c.sendall(b"HTTP/1.1 200 OK\r\n\r\nabc")
        c.shutdown(socket.SHUT_WR)  # the end of the body; then see what else arrives
        c.settimeout(3)
        extra = r.buf
        try:
            while True:
                d = c.recv(65536)
                if not d:
                    break
                extra += d
        except OSError:
            pass
        with server.lock:
            server.extra.append(extra)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        up.extra = []
        c = Client(px, timeout=5)
        c.send(get(up, "/get") + request("POST", url(up, "/post"), "Host: h",
                                         "Content-Length: 4", body=b"data"))
        try:
            resp = c.response()  # the body runs to EOF
        except socket.timeout:
            raise AssertionError("no EOF within 5 s after a close-delimited body")
        assert resp.status == 200 and resp.body == b"abc", (resp.head, resp.body)
        wait_for("the upstream script to end", lambda: up.done >= 1)
        assert up.conns == 1, "upstream connections: %d" % up.conns
        assert up.extra == [b""], "the pipelined POST reached the upstream: %r" % up.extra
        assert "close" in tokens(resp, "connection"), \
            "a close-delimited response without Connection: close: %r" % resp.head


@limit(30)
def test_http_client_connection_close_ends_after_one_response_despite_pipelining():
    """A client that says Connection: close on a GET and still pipelines a second request
    behind it: only the first reaches the upstream, the client gets one response saying
    Connection: close, then EOF at once (idle_timeout is 60)."""
    with origin() as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        c.send(get(o, "/1", "Connection: close") + get(o, "/2"))
        resp = c.response()
        assert resp.status == 200 and resp.body == b"origin /1", resp.head
        assert c.closed(5), "the connection stayed open after Connection: close"
        wait_for("the upstream connection to end", lambda: o.ended == o.conns)
        assert [h.target for h in o.heads] == ["/1"], [h.target for h in o.heads]
        assert "close" in tokens(resp, "connection"), \
            "the last response lacks Connection: close: %r" % resp.head


@limit(30)
def test_http_upstream_connection_close_ends_only_the_upstream_connection():
    """An upstream that answers with Connection: close (and a Content-Length) ends its own
    connection, not the client's: Connection is hop-by-hop. The client must not see
    Connection: close, its connection stays open, and its next request is answered on a new
    upstream connection, whose response reaches the client."""
    def script(c, r, i, server):
        read_request(r, server, i)
        body = b"conn %d" % i
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                  % (len(body), body))

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        resp = c.ask(get(up, "/1"))
        assert resp.status == 200 and resp.body == b"conn 1", resp.head
        assert "close" not in tokens(resp, "connection"), \
            "the upstream's Connection: close reached the client: %r" % resp.head
        try:
            resp = c.ask(get(up, "/2"))
        except EOFError as e:
            raise AssertionError("the client connection ended with the upstream's: %s" % e)
        assert resp.status == 200 and resp.body == b"conn 2", (resp.head, resp.body)
        assert up.conns == 2, "upstream connections: %d" % up.conns


# ---- 3. an early final response to an upload ------------------------------------------------

def early_413(c, r, i, server):
    """Reads a request head and refuses its body at once: 413, close, body never read."""
    req = Message(r.until(b"\r\n\r\n"))
    with server.lock:
        server.requests.append((i, req))
    c.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n"
              b"\r\ntoo large")


def upload_file():
    """A 20 MB file of random bytes in lib.TMP, made once."""
    path = os.path.join(TMP, "upload-20m")
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(os.urandom(20 << 20))
    return path


@limit(30)
def test_http_early_413_to_a_big_upload_reaches_curl_every_time():
    """An upstream that refuses a 20 MB upload (413) as soon as it has the head, and closes
    without reading the body — what nginx does past client_max_body_size. curl -T through the
    proxy must print 413 every time (as it does without the proxy), never fail with a send
    error (55) because the proxy closed or reset the connection while curl was still sending.
    Five runs as curl does by default (Expect: 100-continue, so it waits before sending the
    body), ten with -H 'Expect:' (the body goes at once, as browsers and most HTTP libraries
    send it; the proxy loses the race about half the time today)."""
    path = upload_file()
    with scripted(early_413) as up, http_proxy(users=False, idle_timeout=60) as px:
        proxy = "http://%s:%d" % px.addr
        runs = []
        for extra in [()] * 5 + [("-H", "Expect:")] * 10:
            r = curl("--max-time", "2", "-o", "/dev/null", "-w", "%{http_code}", "-x", proxy,
                     "-T", path, *extra, url(up, "/up"))
            runs.append((" ".join(extra) or "default", r.stdout.decode(),
                         r.stderr.decode().strip()))
        bad = [run for run in runs if run[1] != "413"]
        assert not bad, "%d of 15 curl runs did not print 413: %r" % (len(bad), bad)
        statuses = [line[3] for line in wait_log(px, "PUT", 15)]
        assert statuses == ["413"] * 15, "log statuses: %r" % statuses


@limit(30)
def test_http_early_413_reaches_a_client_still_sending_its_body():
    """The same early 413, to a raw client that sends the 20 MB body as fast as it can from a
    thread while it reads: it must get the whole 413 (head and body) — not a reset, not a bare
    close — and then the connection closes. Twenty runs (the proxy loses the race in about
    half of them today), each with a log line saying 413."""
    size = 20 << 20
    with open(upload_file(), "rb") as f:
        body = f.read()
    with scripted(early_413) as up, http_proxy(users=False, idle_timeout=60) as px:
        failures = []
        for run in range(20):
            c = Client(px, timeout=3)
            c.send(request("POST", url(up, "/up/%d" % run), "Host: h",
                           "Content-Length: %d" % size))

            def send_body():
                try:
                    c.sock.sendall(body)
                except OSError:
                    pass  # the proxy stops taking it once it has answered

            t = threading.Thread(target=send_body, daemon=True)
            t.start()
            try:
                resp = c.response()
                if resp.status != 413 or resp.body != b"too large":
                    failures.append("run %d: %r %r" % (run, resp.head, resp.body))
                elif not c.closed(3):
                    failures.append("run %d: the connection stayed open after the 413" % run)
            except ConnectionResetError:
                failures.append("run %d: reset before the 413 was read" % run)
            except EOFError as e:
                failures.append("run %d: closed without the 413 (%s)" % (run, e))
            t.join(3)
            c.close()
        assert not failures, "%d of 20 runs failed:\n%s" % (len(failures), "\n".join(failures))
        statuses = [line[3] for line in wait_log(px, "POST", 20)]
        assert statuses == ["413"] * 20, "log statuses: %r" % statuses


# ---- 4. hop-by-hop fields in responses ----------------------------------------------------

def test_http_hop_by_hop_fields_are_removed_from_responses_and_via_added():
    """RFC 9110 7.6.1: a proxy removes the hop-by-hop fields of a response too (Connection,
    the fields it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade outside a 101) and
    adds Via. The end-to-end X-Keep and the body pass untouched, and the connection stays
    usable."""
    def answer(server, req, r):
        body = b"body " + req.target.encode()
        return (b"HTTP/1.1 200 OK\r\nConnection: X-Foo, keep-alive\r\nX-Foo: 1\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
                b"Trailer: X-T\r\nUpgrade: h2c\r\nX-Keep: yes\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        resp = c.ask(get(o, "/hop"))
        assert resp.status == 200 and resp.body == b"body /hop", (resp.head, resp.body)
        left = [n for n in ("connection", "x-foo", "keep-alive", "proxy-connection", "te",
                            "trailer", "upgrade") if n in resp.names()]
        assert not left, "hop-by-hop fields relayed: %r in %r" % (left, resp.head)
        assert resp.get("x-keep") == ["yes"], resp.head
        assert any(via(px) in v for v in resp.get("via")), "no Via %r: %r" % (via(px), resp.head)
        resp = c.ask(get(o, "/again"))
        assert resp.status == 200 and resp.body == b"body /again", resp.head


def test_http_a_101_the_client_asked_for_keeps_its_upgrade_fields():
    """Stripping hop-by-hop fields from responses must spare a 101 the client asked for: a
    WebSocket client needs the 101's Upgrade: websocket and Connection: upgrade, and then the
    raw bytes both ways."""
    def answer(server, req, r):
        r.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                       b"Upgrade: websocket\r\n\r\n")
        while True:
            d = r.buf or r.sock.recv(65536)
            r.buf = b""
            if not d:
                return None
            r.sock.sendall(d)

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        resp = c.ask(get(o, "/ws", "Connection: Upgrade", "Upgrade: websocket"))
        assert resp.status == 101, resp.head
        assert resp.get("upgrade") == ["websocket"], resp.head
        assert "upgrade" in tokens(resp, "connection"), resp.head
        c.send(b"\x81\x05hello")
        assert c.r.exactly(7) == b"\x81\x05hello"


# ---- 5. HTTP/1.0 ------------------------------------------------------------------------

def test_http_10_request_with_transfer_encoding_is_refused():
    """Transfer-Encoding does not exist in HTTP/1.0 (RFC 9112 6.1: a server MUST treat a 1.0
    message with it as faulty framing); a 1.0 POST that claims to be chunked is a smuggling
    shape. 400, the connection closes, and the upstream sees no connection at all."""
    with origin() as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        resp = c.ask(request("POST", url(o, "/"), "Host: h", "Transfer-Encoding: chunked",
                             body=b"5\r\nhello\r\n0\r\n\r\n", version="HTTP/1.0"))
        assert_error(resp, 400, "Bad Request")
        assert c.closed(5), "connection left open"
        assert o.conns == 0, "the upstream saw %d connection(s)" % o.conns


def test_http_10_client_keep_alive_is_honoured():
    """An HTTP/1.0 client that sends Connection: keep-alive (old clients, ab, some monitors)
    gets a persistent connection: each response says Connection: keep-alive, both requests are
    answered on one client connection, and the upstream connection is reused for them."""
    with origin() as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        for path in ("/1", "/2"):
            try:
                resp = c.ask(request("GET", url(o, path), "Host: h", "Connection: keep-alive",
                                     version="HTTP/1.0"))
            except EOFError as e:
                raise AssertionError("connection closed before %s: %s" % (path, e))
            assert resp.status == 200 and resp.body == b"origin " + path.encode(), resp.head
            assert "keep-alive" in tokens(resp, "connection"), \
                "a 1.0 keep-alive response without Connection: keep-alive: %r" % resp.head
        assert o.conns == 1, "upstream connections: %d" % o.conns


# ---- 6. status lines and framing ------------------------------------------------------------

def test_http_status_below_100_gets_502_not_a_hang():
    """A status code below 100 is not a valid status (RFC 9110 15): the proxy must answer
    502 at once, not take it for an interim response and wait for a final one."""
    def answer(server, req, r):
        return b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        try:
            resp = c.ask(get(o, "/"))
        except socket.timeout:
            raise AssertionError("no response within 5 s to a 099 status")
        assert_bad_gateway(resp)


def test_http_response_with_gzip_chunked_transfer_encoding_is_relayed():
    """Transfer-Encoding: gzip, chunked is a valid response framing (chunked last): the
    response is relayed, 200, with its chunked bytes intact."""
    data = gzip.compress(b"hello world " * 20)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)

    def answer(server, req, r):
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + chunked

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        resp = Client(px, timeout=5).ask(get(o, "/gz"))
        assert resp.status == 200, resp.head
        assert resp.body == chunked, "chunked body changed: %r" % resp.body[:100]


def test_http_response_with_a_repeated_identical_content_length_is_relayed():
    """Two Content-Length fields with the same value (RFC 9110 8.6 allows a recipient to accept
    them as one): the response is relayed with its 5-byte body."""
    def answer(server, req, r):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        resp = Client(px, timeout=5).ask(get(o, "/cl"))
        assert resp.status == 200 and resp.body == b"hello", (resp.head, resp.body)


def test_http_response_with_two_different_content_lengths_gets_502():
    """Two different Content-Length values in a response: its end is unknowable, and relaying
    it could desynchronise the client. The client gets our 502."""
    def answer(server, req, r):
        return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        assert_bad_gateway(Client(px, timeout=5).ask(get(o, "/cl")))


# ---- 7. logs and metrics tell the truth ----------------------------------------------------

def reset_client_after_upstream_read(px, up, path):
    """Sends GET path, waits until the upstream has read it, then resets the connection."""
    c = Client(px, timeout=5)
    c.send(get(up, path))
    assert up.got.wait(5), "the request did not reach the upstream"
    reset(c.sock)


@limit(30)
def test_http_client_gone_before_a_502_logs_no_status_and_counts_no_5xx():
    """The client resets its connection right after sending; the upstream then fails (closes
    after 0.5 s without answering). No status line reached the client: the log line must say
    '-', not 502, and proxy_http_responses_total{code="5xx"} must not rise."""
    def script(c, r, i, server):
        read_request(r, server, i)
        server.got.set()
        time.sleep(0.5)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        up.got = threading.Event()
        before = px.metric('proxy_http_responses_total{code="5xx"}') or 0
        reset_client_after_upstream_read(px, up, "/gone")
        wait_for("the upstream script to end", lambda: up.done >= 1)
        lines = wait_log(px, "GET", 1)
        assert [line[3] for line in lines] == ["-"], "log: %r" % lines
        after = px.metric('proxy_http_responses_total{code="5xx"}') or 0
        assert after == before, "5xx rose from %s to %s" % (before, after)


@limit(30)
def test_http_client_gone_before_the_response_logs_one_line_without_status():
    """The client resets right after sending; 0.5 s later the upstream answers 200 with a body,
    which cannot be written. The request still gets exactly one log line, with status '-'."""
    def script(c, r, i, server):
        read_request(r, server, i)
        server.got.set()
        time.sleep(0.5)
        c.sendall(reply(200, b"x" * 1000))
        keep_serving(c, r, i, server)

    with scripted(script) as up, http_proxy(users=False, idle_timeout=60) as px:
        up.got = threading.Event()
        reset_client_after_upstream_read(px, up, "/gone")
        time.sleep(0.7)  # the upstream has answered
        lines = wait_log(px, "GET", 1)
        assert len(lines) == 1 and lines[0][3] == "-", "log: %r" % lines


def test_http_interim_response_bytes_are_counted_in_down():
    """A 100 Continue before the final 200 is part of what the client received for the
    exchange: down= in the log line must equal both heads and the body, as the client read them
    (the proxy may rewrite heads, so the client's count is the reference)."""
    def answer(server, req, r):
        return b"HTTP/1.1 100 Continue\r\n\r\n" + reply(200, b"y" * 500)

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        c.send(get(o, "/interim"))
        interim, final = c.response(), c.response()
        assert interim.status == 100 and final.status == 200, (interim.head, final.head)
        got = len(interim.head) + len(final.head) + len(final.body)
        lines = wait_log(px, "GET", 1)
        assert len(lines) == 1, lines
        assert lines[0][5] == got, "down=%d, but the client received %d bytes (the 100 head " \
            "is %d)" % (lines[0][5], got, len(interim.head))


def test_http_10_client_never_gets_an_interim_response():
    """RFC 9110 15.2: a server must not send a 1xx to an HTTP/1.0 client, which cannot tell it
    from the final answer. The proxy drops the upstream's 100 Continue for a 1.0 request and
    relays only the final 200."""
    def answer(server, req, r):
        return b"HTTP/1.1 100 Continue\r\n\r\n" + reply(200, b"final")

    with origin(answer) as o, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        c.send(request("GET", url(o, "/old"), "Host: h", version="HTTP/1.0"))
        first = c.response()
        assert first.status == 200 and first.body == b"final", first.head


def test_http_chunked_upload_size_is_logged_once_the_body_is_done():
    """An upstream that answers as soon as it has the head (early_handler), while the client
    sends its chunked body only after reading that answer: up= in the log line must count
    everything that reached the upstream for the request, head and whole chunked body."""
    body = b"5\r\nhello\r\n400\r\n%s\r\n0\r\n\r\n" % (b"z" * 1024)
    with Server(early_handler) as early, http_proxy(users=False, idle_timeout=60) as px:
        c = Client(px, timeout=5)
        c.send(request("POST", url(early, "/up"), "Host: h", "Transfer-Encoding: chunked"))
        assert c.response().body == b"early"
        c.send(body)
        wait_for("the body upstream", lambda: early.received)
        req, = early.received
        assert req.body == body, req.body[:100]
        want = len(req.head) + len(req.body)
        wait_for("a POST log line", lambda: log_lines(px, "POST"))
        time.sleep(0.3)
        lines = log_lines(px, "POST")
        assert len(lines) == 1, lines
        assert lines[0][4] == want, "up=%d, but %d bytes reached the upstream (head %d)" % (
            lines[0][4], want, len(req.head))
