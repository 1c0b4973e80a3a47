"""bench/systems.py — the systems the bench starts: the backend nginx, every proxy under test
(one `System` subclass per peer, which writes its config and returns its command line), the
far ends of the bulk and memory scenarios, which of them make up the TCP rows, and the
report's table of them. Also starting, checking and stopping them around a scenario."""

import contextlib
import datetime
import hashlib
import http.client
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request

from common import (AUTH_HEADER, BENCH, PASSWORD, ROOT, USER, free_port, is_listening, log,
                    log_tail, markdown_table, process_tree)


class System:
    """Something listening on 127.0.0.1:port: a proxy under test, or a backend.

    A subclass writes its configuration and returns its command line in `command()`;
    start() runs it in a process group of its own and waits until the port listens;
    stop() ends the whole group. `upstream` is the port it relays to."""

    name = "?"          # the row label in the tables
    auth = False        # HTTP scenario: requires Proxy-Authorization
    absolute = False    # HTTP scenario: needs absolute-form request targets
    closes_after_response = False   # HTTP scenario: closes without `Connection: close`

    def __init__(self, work, upstream):
        self.work = work
        self.upstream = upstream
        self.port = None
        self.proc = None
        self.failed = None          # why it could not start, if it could not
        self.log_path = None

    def command(self):
        raise NotImplementedError

    def start(self):
        self.port = self.port or free_port()
        argv = self.command()
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
        self.log_path = self.work / f"{slug}-{self.port}.log"
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.work,
                                         start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        while not is_listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: "
                                   + log_tail(self.log_path))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {self.port} in {timeout}s")
            time.sleep(0.05)

    def stop(self):
        """SIGTERM to the process group, then SIGKILL what is left after 15 s."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            log(f"  {self.name} did not stop in 15 s; killing it")
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)    # forked children (socat) too
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None

    def pids(self):
        return process_tree(self.proc.pid) if self.proc else []


class Direct(System):
    """No proxy: the client talks to the upstream itself. The floor every proxy is held to."""
    name = "direct"

    def start(self):
        self.port = self.upstream

    def stop(self):
        pass


class Backend(System):
    """The nginx every HTTP scenario fetches from: one worker, no access log, keep-alive
    for as many requests as a run makes."""
    name = "backend nginx"

    def __init__(self, work):
        super().__init__(work, None)
        self.html = work / "html"
        self.html.mkdir()
        self.files = {
            "/test1": random.Random(1).randbytes(65536),
            "/test2": b"Hello, world!",
            "/index.html": index_html(),
        }
        for path, body in self.files.items():
            (self.html / path.lstrip("/")).write_bytes(body)
            (self.html / path.lstrip("/")).chmod(0o644)
        self.html.chmod(0o755)

    def command(self):
        conf = self.work / "backend.conf"
        temp = self.work / "backend-temp"
        temp.mkdir(exist_ok=True)
        conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile 20000;
daemon off;
pid {self.work}/backend.pid;
error_log {self.work}/backend-error.log;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {self.html};
    }}
}}
""")
        return ["nginx", "-p", f"{self.work}/", "-e", f"{self.work}/backend-error.log",
                "-c", str(conf)]


def index_html():
    """A small page of about 600 bytes, like a typical index.html."""
    words = " ".join(["lorem ipsum dolor sit amet"] * 18)
    return (f"<!DOCTYPE html>\n<html>\n<head><title>Welcome</title></head>\n<body>\n"
            f"<h1>Welcome</h1>\n<p>{words}</p>\n</body>\n</html>\n").encode()


class Ours(System):
    """./proxy with a generated ini. Listens on port 0 and reads the port from its banner."""

    def __init__(self, work, upstream, copy="splice", buffer_size="64k", workers=1100,
                 mode="tcp", stats=False, absolute=False, name=None, binary=None,
                 keys=None, access=None, access_log=False, extra=""):
        super().__init__(work, upstream)
        self.binary = binary or ROOT / "proxy"  # bench/ab.py runs two builds
        self.copy, self.buffer_size, self.workers = copy, buffer_size, workers
        self.mode, self.stats = mode, stats
        self.auth = mode == "http"
        self.absolute = absolute
        self.metrics_port = None
        self.name = name or f"ours {copy}"
        # More [proxy] keys (park_after, max_connections, ...) and [access] keys, as
        # {key: value}; the defaults when not given.
        self.keys, self.access = dict(keys or {}), dict(access or {})
        self.extra = extra  # more of the ini, as it is: [limits], more [users] (bench/policy.py)
        # access_log: log every request/connection to a file in work/ (requests_by_client()
        # reads it), instead of log = off.
        self.access_log = None
        if access_log:
            slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")
            self.access_log = work / f"{slug}-{mode}-{workers}-access.log"

    def command(self):
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower())
        ini = self.work / f"{slug}-{self.mode}-{self.copy}-{self.buffer_size}-{self.workers}.ini"
        users = f"\n[users]\n{USER} = {PASSWORD}\n" if self.mode == "http" else ""
        stats = "127.0.0.1:0" if self.stats else ""
        keys = "".join(f"{k} = {v}\n" for k, v in self.keys.items())
        access = "".join(f"{k} = {v}\n" for k, v in self.access.items())
        access = f"\n[access]\n{access}" if access else ""
        ini.write_text(f"""[proxy]
listen = 127.0.0.1:0
mode = {self.mode}
upstream = 127.0.0.1:{self.upstream}
workers = {self.workers}
copy = {self.copy}
buffer_size = {self.buffer_size}
log = {self.access_log or "off"}
{keys}{users}{access}
[stats]
listen = {stats}
{self.extra}""")
        return [str(self.binary), "-c", str(ini)]

    def start(self):
        self.port = 0
        super().start()

    def wait_ready(self, timeout=15):
        """Wait for `proxy: listening on HOST:PORT (...), metrics on HOST:PORT|off`."""
        deadline = time.monotonic() + timeout
        banner = re.compile(r"listening on [\d.]+:(\d+) .*metrics on (?:[\d.]+:(\d+)|off)")
        while True:
            match = banner.search(self.log_path.read_text())
            if match:
                self.port = int(match.group(1))
                self.metrics_port = int(match.group(2)) if match.group(2) else None
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"./proxy exited with status {self.proc.returncode}: "
                                   + log_tail(self.log_path))
            if time.monotonic() > deadline:
                raise RuntimeError(f"./proxy printed no banner in {timeout}s")
            time.sleep(0.05)

    def log_size(self):
        """Where the access log ends now: requests_by_client() counts from there."""
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def requests_by_client(self, offset, until):
        """{client host:port: requests answered} from the access log's lines after
        `offset` stamped no later than `until` (time.time()) (http mode: one line per
        request once its response is done; a line whose status is `-` never reached the
        client and is not counted). `until` matters: when wrk stops, the connections it
        left waiting in the queue are served after all, to a client that has gone."""
        counts = {}
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                fields = line.split()
                if len(fields) < 6 or not fields[5].isdigit() or fields[3] == "CONNECT":
                    continue
                try:
                    stamp = datetime.datetime.strptime(fields[0], "%Y-%m-%dT%H:%M:%S.%fZ")
                except ValueError:
                    continue
                if stamp.replace(tzinfo=datetime.timezone.utc).timestamp() <= until:
                    counts[fields[1]] = counts.get(fields[1], 0) + 1
        return counts

    def bytes_by_client(self, offset):
        """{client host:port: bytes down} from the access log's lines after `offset` (tcp
        mode: one line per connection, `TIME CLIENT -> UPSTREAM up=N down=N ms=F end=R`,
        written once it is closed: wait for the connections to end before reading). A
        connection that sent nothing is left out: wrk opens one to check the address before
        its run."""
        counts = {}
        with open(self.access_log, "rb") as f:
            f.seek(offset)
            for line in f.read().decode(errors="replace").splitlines():
                fields = line.split()
                if (len(fields) < 6 or fields[2] != "->" or not fields[5].startswith("down=")
                        or fields[4] == "up=0"):
                    continue
                counts[fields[1]] = counts.get(fields[1], 0) + int(fields[5][5:])
        return counts

    def metrics(self):
        """The /metrics text as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


class HAProxy(System):
    """haproxy in mode tcp, or mode http with a Proxy-Authorization check. Default nbthread
    (one thread per CPU); maxconn raised so that it never limits a scenario."""

    def __init__(self, work, upstream, mode="tcp", maxconn=9000):
        super().__init__(work, upstream)
        self.mode = mode
        self.maxconn = maxconn      # haproxy sizes its fd limit from it: 2 fds a connection
        self.auth = mode == "http"
        self.name = f"haproxy {mode}"

    def command(self):
        cfg = self.work / f"haproxy-{self.mode}-{self.port}.cfg"
        http = ""
        if self.mode == "http":
            check = f'{{ req.hdr(proxy-authorization) -m str "{AUTH_HEADER}" }}'
            http = f"""    http-request deny deny_status 407 unless {check}
    http-request del-header proxy-authorization
"""
        cfg.write_text(f"""global
    maxconn {self.maxconn}

defaults
    mode {self.mode}
    maxconn {self.maxconn}
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s

frontend front
    bind 127.0.0.1:{self.port}
{http}    default_backend back

backend back
    server upstream 127.0.0.1:{self.upstream}
""")
        return ["haproxy", "-db", "-f", str(cfg)]


class NginxStream(System):
    """nginx's stream module (TCP proxy), worker_processes auto. A relayed connection takes
    two of a worker's worker_connections, and one worker may get most of them."""
    name = "nginx stream"

    def __init__(self, work, upstream, worker_connections=10000):
        super().__init__(work, upstream)
        self.worker_connections = worker_connections

    def command(self):
        conf = self.work / f"nginx-stream-{self.port}.conf"
        conf.write_text(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
daemon off;
pid {self.work}/nginx-stream-{self.port}.pid;
error_log {self.work}/nginx-stream-{self.port}-error.log;
events {{ worker_connections {self.worker_connections}; }}
stream {{
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        proxy_pass 127.0.0.1:{self.upstream};
    }}
}}
""")
        return ["nginx", "-p", f"{self.work}/", "-e", f"{self.work}/nginx-stream-error.log",
                "-c", str(conf)]


class GoProxy(System):
    """bench/peers/goproxy.go: net.Listen, two goroutines with io.Copy per connection.
    copy="buffer" hides Go's splice path (see the Go file) for the memory scenario."""
    binary = None   # set once built

    def __init__(self, work, upstream, copy="splice"):
        super().__init__(work, upstream)
        self.copy = copy
        self.name = "Go io.Copy" if copy == "splice" else "Go io.Copy, buffer"

    def command(self):
        return [str(self.binary), "-listen", f"127.0.0.1:{self.port}",
                "-upstream", f"127.0.0.1:{self.upstream}", "-copy", self.copy]


class Socat(System):
    """socat with fork: one process per connection."""
    name = "socat"

    def command(self):
        return ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                f"TCP:127.0.0.1:{self.upstream}"]


class Tinyproxy(System):
    """tinyproxy with BasicAuth. It needs absolute-form targets and closes the client
    connection after every response."""
    name = "tinyproxy"
    auth = True
    absolute = True
    closes_after_response = True

    def command(self):
        conf = self.work / f"tinyproxy-{self.port}.conf"
        conf.write_text(f"""Port {self.port}
Listen 127.0.0.1
Timeout 600
MaxClients 1000
BasicAuth {USER} {PASSWORD}
Allow 127.0.0.1
LogLevel Critical
DisableViaHeader Yes
PidFile "{self.work}/tinyproxy-{self.port}.pid"
""")
        return ["tinyproxy", "-d", "-c", str(conf)]


class IperfServer(System):
    """iperf3 -s: the far end of scenario 5."""
    name = "iperf3 server"

    def command(self):
        return ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.port)]


class EchoServer(System):
    """bench/echo.py server: the far end of scenarios 7, 10, 13 and 15."""
    name = "echo server"

    def command(self):
        return [sys.executable, str(BENCH / "echo.py"), "server", str(self.port)]


class TrickleServer(System):
    """bench/trickle.py server: 100 bytes every 100 ms down every connection, the far end
    of scenario 15's trickling relays."""
    name = "trickle server"

    def command(self):
        return [sys.executable, str(BENCH / "trickle.py"), "server", str(self.port)]


def tcp_systems(work, upstream, workers):
    """Every TCP relay under test, in table order, in front of `upstream`."""
    return [Direct(work, upstream),
            Ours(work, upstream, "splice", workers=workers),
            Ours(work, upstream, "buffer", workers=workers),
            HAProxy(work, upstream, "tcp"),
            NginxStream(work, upstream),
            GoProxy(work, upstream),
            Socat(work, upstream)]


# The row order of the TCP scenarios' tables and of the headline: the names of
# tcp_systems(), so that a peer added there gets its row everywhere. Building the objects
# starts nothing.
TCP_ROWS = [s.name for s in tcp_systems(None, None, 0)]


def start_all(systems):
    """Start each system; one that fails is marked (its cells become ERR), not fatal."""
    for s in systems:
        try:
            s.start()
        except (RuntimeError, OSError) as e:
            s.failed = f"did not start: {e}"
            log(f"  {s.name}: {s.failed}")


def stop_all(systems):
    for s in systems:
        s.stop()


def check_body(system, backend, path="/test1"):
    """Fetch `path` once through the system and compare it byte for byte with the file.
    A proxy that answers fast but wrong is marked failed before anything is measured."""
    if system.failed:
        return
    target = f"http://127.0.0.1:{backend.port}{path}" if system.absolute else path
    headers = {"Proxy-Authorization": AUTH_HEADER} if system.auth else {}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", system.port, timeout=10)
        conn.request("GET", target, headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        system.failed = f"GET {path} failed: {e!r}"
    else:
        expected = backend.files[path]
        if response.status != 200:
            system.failed = f"GET {path}: status {response.status}, expected 200"
        elif body != expected:
            system.failed = (f"GET {path}: wrong body: {len(body)} bytes, sha256 "
                             f"{hashlib.sha256(body).hexdigest()[:16]}; expected {len(expected)} "
                             f"bytes, sha256 {hashlib.sha256(expected).hexdigest()[:16]}")
    if system.failed:
        log(f"  {system.name}: {system.failed}")

@contextlib.contextmanager
def running(systems, backend=None):
    """Start the systems (and check each returns /test1 byte for byte when `backend` is
    given), yield, and stop them all whatever happens."""
    try:
        start_all(systems)
        if backend:
            for s in systems:
                check_body(s, backend)
        yield systems
    finally:
        stop_all(systems)


def measure(system, fn):
    """fn() for a system that is up; an error run for one that failed to start or check."""
    if system.failed:
        return {"error": system.failed}
    return fn()


def systems_table(settings):
    """The report's table of every system: what it runs and how it uses threads."""
    s = settings
    return markdown_table(["system", "what", "threads / processes"], [
        ["direct", "wrk/iperf3/echo client straight to the backend: the floor",
         "backend nginx: worker_processes 1"],
        ["ours splice", "./proxy, mode tcp, copy = splice (64 KiB pipes), log off, stats off",
         f"workers = {s.workers} (2 threads each); 16 in 2"],
        ["ours buffer", "./proxy, mode tcp, copy = buffer, buffer_size = 64k, log off",
         f"workers = {s.workers}; {s.memory_conns} in 7 (splice would need 6 fds a worker)"],
        ["ours http", "./proxy, mode http, copy = splice, [users] alice, log off",
         f"workers = {s.workers}"],
        ["ours, workers = 64", "./proxy with the waiting room: idle connections park in "
         "the acceptor's epoll set (park_after, default 200 ms; = 0 in the rows that show "
         "the old behaviour), busy ones take turns (time_slice, 50 ms); max_connections = "
         f"{s.idle_conns + 600} in 9 and 10; the default configuration in 13",
         "64 workers (128 threads; the default) for thousands of connections in 8-10, "
         "12, 13, 15; 32 in 14; beside them in 8 and 15 a thread pair per connection "
         "(park_after = 0, workers = N + 100 and N + 50)"],
        ["haproxy tcp / http", "mode tcp; mode http with a Proxy-Authorization check; "
         f"maxconn 9000 ({s.idle_conns + 600} in 9 and 10), no logging",
         "default nbthread (one thread per CPU)"],
        ["nginx stream", "stream { proxy_pass } via libnginx-mod-stream",
         "worker_processes auto (one per CPU)"],
        ["Go io.Copy", "bench/peers/goproxy.go: two goroutines with io.Copy per connection",
         "default GOMAXPROCS (= CPUs)"],
        ["socat", "TCP-LISTEN:PORT,fork,reuseaddr TCP:127.0.0.1:UPSTREAM",
         "one process per connection"],
        ["tinyproxy", "BasicAuth alice secret, MaxClients 1000", "thread per connection"],
    ])

