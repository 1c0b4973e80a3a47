"""tests/lib.py — what the integration tests share: a Proxy that runs ./proxy on a generated
ini (port 0, so tests never collide), backends the tests control, and small socket helpers.
Everything binds and connects to loopback only, and every wait has a timeout."""
import hashlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request

PROXY = os.environ.get("PROXY_BIN", "./proxy")
# make valgrind runs the proxy under it: PROXY_WRAPPER="valgrind --error-exitcode=1 ..."
WRAPPER = os.environ.get("PROXY_WRAPPER", "").split()
# Sanitizer builds are slower: they move less data (set by run.py, 1 = full size).
SCALE = float(os.environ.get("PROXY_TEST_SCALE", "1"))
TMP = tempfile.mkdtemp(prefix="proxy-test-")
_started = []  # every Proxy of the current test, for finish()
last_logs = []  # finish()'s: each proxy's pid and last lines, for a failure's report
SANITIZER = re.compile(r"ERROR: (Address|Leak)Sanitizer|WARNING: ThreadSanitizer|runtime error:")


def finish():
    """After each test: stops the proxies still running (SIGTERM, so that a sanitizer build
    runs its leak check at exit) and returns what went wrong with them: a sanitizer report, a
    proxy that would not stop, or a failing exit status."""
    problems = []
    if _started:
        last_logs.clear()
    while _started:
        px = _started.pop()
        if px.p.poll() is None:
            px.p.send_signal(signal.SIGTERM)
            try:
                px.p.wait(15)
            except subprocess.TimeoutExpired:
                px.p.kill()
                px.p.wait()
                problems.append("proxy did not stop within 15 s of SIGTERM")
        with px.cond:  # let the reader thread take the last lines
            px.cond.wait_for(lambda: px.lines and px.lines[-1] is None, 5)
        text = px.text()
        last_logs.append((px.p.pid, text.splitlines()[-15:]))
        m = SANITIZER.search(text)
        if m:
            problems.append(text[max(0, m.start() - 200):m.start() + 3000])
        elif px.p.returncode not in (0, -signal.SIGKILL) and not px.expect_failure:
            problems.append("proxy exited with status %d:\n%s" % (px.p.returncode, text[-2000:]))
    return problems


def write_ini(sections, name="proxy.ini"):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        for section, keys in sections.items():
            f.write("[%s]\n" % section)
            for k, v in keys.items():
                f.write("%s = %s\n" % (k, v))
    return path


class Proxy:
    """Runs ./proxy with the given [proxy] keys (and other sections), reading its stderr."""

    def __init__(self, upstream=None, sections=None, preexec_fn=None, **keys):
        proxy = {"listen": "127.0.0.1:0", "workers": 8, "log": "-"}
        if upstream is not None:
            proxy["upstream"] = upstream
        proxy.update(keys)
        ini = {"proxy": proxy, "stats": {"listen": "127.0.0.1:0"}}
        ini.update(sections or {})
        self.ini = write_ini(ini)
        self.lines = []
        self.expect_failure = False  # set by a test that makes the proxy fail on purpose
        self.cond = threading.Condition()
        self.p = subprocess.Popen(WRAPPER + [PROXY, "-c", self.ini], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
        _started.append(self)
        threading.Thread(target=self._read, daemon=True).start()
        m = self.wait_line(r"listening on (\S+):(\d+) .*metrics on (\S+)", 60 if WRAPPER else 10)
        host = m.group(1).strip("[]")
        self.addr = (host, int(m.group(2)))
        mh, _, mp = m.group(3).rpartition(":")
        self.metrics_addr = (mh.strip("[]"), int(mp)) if mp.isdigit() else None

    def _read(self):
        for line in self.p.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # EOF marker
            self.cond.notify_all()

    def wait_line(self, pattern, timeout=10, start=0):
        """Waits for a stderr line matching pattern; returns the match."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    line = self.lines[i]
                    i += 1
                    if line is None:
                        raise AssertionError("proxy exited; stderr: %s" % self.text())
                    m = re.search(pattern, line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no line /%s/ in: %s" % (pattern, self.text()))
                self.cond.wait(left)

    def text(self):
        with self.cond:
            return "\n".join(l for l in self.lines if l is not None)

    def metrics(self):
        """The /metrics page as {'name{labels}': value}."""
        url = "http://%s:%d/metrics" % self.metrics_addr
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
            body = r.read().decode()
        out = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def metric(self, name):
        return self.metrics().get(name)

    def wait_metric(self, name, want, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            got = self.metric(name)
            if got == want:
                return
            if time.monotonic() > deadline:
                raise AssertionError("%s is %s, want %s" % (name, got, want))
            time.sleep(0.05)

    def signal(self, sig):
        self.p.send_signal(sig)

    def stop(self, timeout=20):
        """SIGTERM, then the exit status."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.p.wait(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass  # finish() stops it after the test, and checks how it stopped


class Server:
    """A loopback TCP server calling handler(conn, server) on a thread per connection."""

    def __init__(self, handler, host="127.0.0.1", backlog=128, name=b""):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.addr = ("[%s]:%d" if fam == socket.AF_INET6 else "%s:%d") % (host, self.port)
        self.handler, self.name = handler, name
        self.conns = 0
        self.received = []  # what capture_handler stored
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        try:
            c.settimeout(30)
            self.handler(c, self)
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def echo_handler(c, server):
    if server.name:
        c.sendall(server.name + b"\n")
    buf = bytearray(256 * 1024)
    view = memoryview(buf)
    while True:
        n = c.recv_into(buf)
        if not n:
            break
        c.sendall(view[:n])
    c.shutdown(socket.SHUT_WR)


def sink_handler(c, server):
    """Reads to EOF, then answers '<count> <sha256>' (the half-close case)."""
    h, count = hashlib.sha256(), 0
    while True:
        d = c.recv(256 * 1024)
        if not d:
            break
        h.update(d)
        count += len(d)
    c.sendall(b"%d %s" % (count, h.hexdigest().encode()))


def capture_handler(c, server):
    """Stores everything received until EOF, then closes."""
    data = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
    with server.lock:
        server.received.append(data)


def wait_received(server, timeout=5):
    """What a capture_handler server has stored, once it has stored something."""
    deadline = time.monotonic() + timeout
    while not server.received and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.received


def hold_handler(c, server):
    """Holds the connection open until the peer closes."""
    while c.recv(65536):
        pass


def closed_port():
    """A loopback port where nothing listens: connects are refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def blackhole():
    """A listener whose accept queue is full, so that new SYNs are dropped and connects time
    out. Returns (address, sockets to keep alive)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    keep = [s]
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(s.getsockname())
        keep.append(c)
    time.sleep(0.2)
    return "127.0.0.1:%d" % s.getsockname()[1], keep


def connect(addr, timeout=10, source=None):
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect(addr)
    return s


def recv_all(s, limit=1 << 30):
    out = bytearray()
    while len(out) < limit:
        d = s.recv(1 << 20)
        if not d:
            break
        out += d
    return bytes(out)


def got_within(s, timeout, n=64):
    """What s receives within timeout (b"" at EOF), or None when nothing comes: for a client
    that must be neither answered nor refused yet."""
    s.settimeout(timeout)
    try:
        return s.recv(n)
    except socket.timeout:
        return None


def refusals(metrics):
    """Connections refused so far, for any reason, from a Proxy.metrics() dict."""
    return sum(v for k, v in metrics.items() if k.startswith("proxy_connections_refused_total"))


def recv_line(s):
    out = b""
    while not out.endswith(b"\n"):
        d = s.recv(1)
        if not d:
            break
        out += d
    return out


_random = {}


def random_bytes(n):
    if n not in _random:
        _random[n] = os.urandom(n)
    return _random[n]


def exchange(addr, data, timeout=60, ports=None):
    """Sends data (from a thread) while reading the reply until EOF; returns the sha256 and
    length of what came back. The local port goes into the list ports, if given."""
    s = connect(addr, timeout)
    if ports is not None:
        ports.append(s.getsockname()[1])
    err = []

    def send():
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=send, daemon=True)
    t.start()
    h, n = hashlib.sha256(), 0
    while True:
        d = s.recv(1 << 20)
        if not d:
            break
        h.update(d)
        n += len(d)
    t.join(timeout)
    s.close()
    assert not err, "send failed: %s" % err
    return h.hexdigest(), n


def sha(data):
    return hashlib.sha256(data).hexdigest()
