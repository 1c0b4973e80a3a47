#!/usr/bin/env python3
"""tests/soak.py — `make soak`: mixed load through a tcp-mode and an http-mode proxy (with auth)
for SOAK_SECONDS (default 600): keep-alive requests, a new connection per request, CONNECT
tunnels, bulk transfers and slow clients, every byte checked. Every 10 s it samples each
proxy's RSS, open fds and threads; at the end it prints them and fails if a single byte came
back wrong, if fds or threads did not return to where they started, or if RSS kept growing."""
import base64
import http.server
import os
import random
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402
from lib import Proxy, Server, connect, echo_handler, exchange, random_bytes, recv_all, sha  # noqa

SECONDS = int(os.environ.get("SOAK_SECONDS", "600"))
BODY = random_bytes(100000)
AUTH = "Proxy-Authorization: Basic " + base64.b64encode(b"soak:s3cret").decode()
stats = {"ok": 0, "corrupt": 0, "errors": 0}
lock = threading.Lock()


def count(what):
    with lock:
        stats[what] += 1


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


def read_response(s, buf=b""):
    """One response with a Content-Length body; returns (body, rest of buffer)."""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise EOFError
        buf += d
    head, buf = buf.split(b"\r\n\r\n", 1)
    n = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(buf) < n:
        d = s.recv(65536)
        if not d:
            raise EOFError
        buf += d
    return buf[:n], buf[n:]


def keepalive(px, until):
    while time.monotonic() < until:
        try:
            s, buf = connect(px.addr), b""
            for _ in range(random.randint(1, 50)):
                s.sendall(b"GET /x HTTP/1.1\r\nHost: b\r\n%s\r\n\r\n" % AUTH.encode())
                body, buf = read_response(s, buf)
                count("ok" if body == BODY else "corrupt")
            s.close()
        except OSError:
            count("errors")


def one_shot(px, until):
    while time.monotonic() < until:
        try:
            s = connect(px.addr)
            s.sendall(b"GET /y HTTP/1.1\r\nHost: b\r\nConnection: close\r\n%s\r\n\r\n" % AUTH.encode())
            body, _ = read_response(s)
            count("ok" if body == BODY else "corrupt")
            s.close()
        except OSError:
            count("errors")


def tunnel(px, echo, until):
    data = random_bytes(1 << 20)
    while time.monotonic() < until:
        try:
            s = connect(px.addr)
            s.sendall(b"CONNECT %s HTTP/1.1\r\n%s\r\n\r\n" % (echo.addr.encode(), AUTH.encode()))
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += s.recv(1)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            count("ok" if recv_all(s) == data else "corrupt")
        except OSError:
            count("errors")


def bulk(px, until):
    data = random_bytes(8 << 20)
    while time.monotonic() < until:
        try:
            count("ok" if exchange(px.addr, data) == (sha(data), len(data)) else "corrupt")
        except OSError:
            count("errors")


def slow(px, until):
    while time.monotonic() < until:
        try:
            s = connect(px.addr)
            req = b"GET /z HTTP/1.1\r\nHost: b\r\n%s\r\n\r\n" % AUTH.encode()
            for i in range(0, len(req), 16):  # a slow writer, inside header_timeout
                s.sendall(req[i:i + 16])
                time.sleep(0.05)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            body = b""
            while len(body) < 1000:  # and a slow reader
                body += s.recv(100)
                time.sleep(0.01)
            s.close()
            count("ok")
        except OSError:
            count("errors")


def sample(px):
    with open("/proc/%d/status" % px.p.pid) as f:
        st = dict(l.split(":", 1) for l in f)
    return (int(st["VmRSS"].split()[0]), len(os.listdir("/proc/%d/fd" % px.p.pid)),
            int(st["Threads"]))


def main():
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    web_addr = "127.0.0.1:%d" % web.server_address[1]
    echo = Server(echo_handler, backlog=512)
    users = {"users": {"soak": "s3cret"}, "access": {"connect_ports": "*"}}
    hp = Proxy(web_addr, mode="http", workers=64, log="off", sections=users)
    tp = Proxy(echo.addr, mode="tcp", workers=64, log="off")
    base = {"http": sample(hp), "tcp": sample(tp)}
    until = time.monotonic() + SECONDS
    load = [(keepalive, hp), (keepalive, hp), (one_shot, hp), (one_shot, hp), (slow, hp),
            (bulk, tp), (bulk, tp)]
    threads = [threading.Thread(target=f, args=(px, until)) for f, px in load]
    threads += [threading.Thread(target=tunnel, args=(hp, echo, until)) for _ in range(2)]
    for t in threads:
        t.start()
    rows = []
    while time.monotonic() < until:
        time.sleep(min(10, max(0, until - time.monotonic())))
        rows.append((int(SECONDS - (until - time.monotonic())), sample(hp), sample(tp),
                     dict(stats)))
        print("%4ds http rss %6d KiB fds %4d threads %3d | tcp rss %6d KiB fds %4d threads %3d"
              " | %s" % (rows[-1][0], *rows[-1][1], *rows[-1][2], rows[-1][3]), flush=True)
    for t in threads:
        t.join(60)
    time.sleep(2)
    end = {"http": sample(hp), "tcp": sample(tp)}
    problems = []
    if stats["corrupt"]:
        problems.append("%d transfers came back wrong" % stats["corrupt"])
    for name, i in (("http", 1), ("tcp", 2)):
        if end[name][1:] != base[name][1:]:
            problems.append("%s: fds/threads %s at the end, %s at the start" %
                            (name, end[name][1:], base[name][1:]))
        warm = rows[len(rows) // 4][i][0] if rows else base[name][0]
        if end[name][0] > warm * 1.10 + 4096:  # more than 10 % + 4 MiB past warm-up
            problems.append("%s: RSS grew from %d KiB (warm) to %d KiB" % (name, warm, end[name][0]))
    print("start %s\nend   %s\ntotals %s" % (base, end, stats))
    for px in (hp, tp):
        px.signal(signal.SIGTERM)
        if px.p.wait(20) != 0:
            problems.append("a proxy exited with %d" % px.p.returncode)
    lib.finish()
    web.shutdown()
    echo.close()
    print("\n".join(problems) or "soak ok: no corrupt byte, fds and threads flat, RSS flat")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
