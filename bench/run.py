#!/usr/bin/env python3
"""bench/run.py — side-by-side benchmarks of ./proxy against peer proxies, on loopback.

    python3 bench/run.py              # full: 3 rounds of every scenario, < 15 min on 2 cores
    python3 bench/run.py --quick      # smoke test: 1 round, short runs, fewer points, < 2 min
    python3 bench/run.py --only 1,3   # only the scenarios named (for development)

What it does, in order:

1. Installs missing Debian packages with apt-get when run as root (else prints the apt-get
   line and exits 2), builds ./proxy with `make` and the Go peer (bench/peers/goproxy.go)
   into a temporary directory, and raises the open-files limit to its hard limit.
2. Starts a backend nginx (one worker) serving /test1 (64 KiB), /test2 (13 B) and
   /index.html (~600 B), and each system under test on its own port in front of it: direct
   (no proxy), our proxy (copy = splice and copy = buffer), haproxy, nginx stream, a Go
   io.Copy proxy, socat, and for the HTTP scenario haproxy in http mode and tinyproxy.
3. Runs the scenarios (see bench/README.md), systems interleaved within each round, and
   writes bench/results/DATE-HOST.md (tables, notes, exact commands), DATE-HOST.json (every
   raw number) and DATE-HOST-NAME.png charts drawn with gnuplot. Quick and partial runs add
   "-quick" / "-partial" to the name so they never overwrite a full run's results.

Every run is checked: socket errors, non-2xx responses, iperf3 errors, mismatched echoes or a
wrong body make that cell "ERR", and the script exits 1 after writing the report. A fast
wrong answer must never look like a win. Only the concurrency-cliff scenario expects errors
(past the pool size), and it reports them instead of failing.

Everything listens on 127.0.0.1 only, every run is bounded in time, and every process the
script starts is stopped before it exits. Python 3 standard library only.
"""

import argparse
import base64
import contextlib
import datetime
import hashlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the repository: ./proxy and the Makefile
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"

USER, PASSWORD = "alice", "secret"               # the [users] entry for the HTTP scenario
AUTH_HEADER = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

# Debian package -> a file that shows it is installed.
PACKAGES = {
    "haproxy": "/usr/sbin/haproxy",
    "nginx": "/usr/sbin/nginx",
    "libnginx-mod-stream": "/usr/lib/nginx/modules/ngx_stream_module.so",
    "socat": "/usr/bin/socat",
    "tinyproxy": "/usr/bin/tinyproxy",
    "golang-go": "/usr/bin/go",
    "wrk": "/usr/bin/wrk",
    "iperf3": "/usr/bin/iperf3",
    "gnuplot": "/usr/bin/gnuplot",
}


# ─── settings ────────────────────────────────────────────────────────────────────────────

class Settings:
    """How long and how often: one instance for full runs, one for --quick."""

    def __init__(self, quick):
        self.quick = quick
        self.rounds = 1 if quick else 3
        self.latency_seconds = 1 if quick else 3        # scenario 1
        self.sweep_seconds = 1 if quick else 2          # scenario 2
        self.sweep_sizes = (["1k", "8k", "64k"] if quick
                            else ["1k", "2k", "8k", "32k", "64k", "1m"])
        self.throughput_seconds = 1 if quick else 3     # scenario 3
        self.connrate_seconds = 1 if quick else 2       # scenario 4
        self.iperf_seconds = 1 if quick else 2          # scenario 5
        self.iperf_modes = ["1 stream"] if quick else ["1 stream", "4 streams", "bidir"]
        self.http_seconds = 1 if quick else 3           # scenario 6
        self.memory_conns = 500 if quick else 4000      # scenario 7
        self.memory_hold = 3 if quick else 20
        self.rounds_memory = 1                          # each run takes ~25 s: one round
        self.cliff_points = [64, 256, 1024] if quick else [64, 128, 256, 512, 1024, 2048]
        self.cliff_seconds = 1 if quick else 2          # scenario 8
        self.workers = 1100                             # ours, enough for wrk -c1000


# ─── small helpers ───────────────────────────────────────────────────────────────────────

STARTED = time.monotonic()


def load_average():
    """The 1, 5 and 15 minute load averages: the machine is shared, so say how busy it was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


LOAD_AT_START = load_average()


def log(message):
    """A progress line with the time since start."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {message}", flush=True)


def free_port():
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port):
    """True when a socket listens on 127.0.0.1:port. Reads /proc/net/tcp instead of
    connecting, so that a readiness check never reaches the upstream (iperf3 would take a
    probe for a broken test)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":   # 0A = LISTEN
                return True
    return False


def run(argv, timeout, **kwargs):
    """Run a command to completion (bounded in time); returns (exit status, stdout+stderr)."""
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out + f"\n(timed out after {timeout}s)"


def log_tail(path, lines=3):
    """The last few non-empty lines of a log file on one line, for an error message."""
    text = [line.strip() for line in path.read_text(errors="replace").splitlines()
            if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def first_line(argv):
    """The first non-empty output line of a version command, or '?'."""
    status, out = run(argv, 10)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else "?"


def process_tree(pid):
    """pid and every process descended from it."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may contain spaces; the ppid is the 2nd field after ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def proc_status(pid):
    """VmRSS and VmHWM in KiB and the thread count of one process (zeros once it is gone)."""
    values = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def memory_in_use_kib():
    """System-wide (memory in use, kernel stacks + page tables), in KiB. Memory in use is
    MemTotal - MemAvailable; the second figure is what threads cost the kernel."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    return info["MemTotal"] - info["MemAvailable"], info["KernelStack"] + info["PageTables"]


# ─── setup: packages, builds, limits ─────────────────────────────────────────────────────

def install_packages():
    """Install missing Debian packages as root, or name them and exit 2."""
    missing = [name for name, path in PACKAGES.items() if not os.path.exists(path)]
    if not missing:
        return
    line = "apt-get install -y " + " ".join(missing)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"bench: missing packages; run: sudo {line}", file=sys.stderr)
        sys.exit(2)
    log(f"installing {' '.join(missing)} with apt-get")
    argv = ["apt-get", "install", "-y", "-q"] + missing
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    status, out = run(argv, 900, env=env)
    if status != 0:
        run(["apt-get", "update", "-q"], 600, env=env)
        status, out = run(argv, 900, env=env)
    if status != 0:
        print(out[-3000:], file=sys.stderr)
        sys.exit(f"bench: {line} failed")


def build(work):
    """Build ./proxy with make and the Go peer into work/; returns the Go binary's path."""
    log("building ./proxy (make)")
    status, out = run(["make"], 600, cwd=ROOT)
    if status != 0:
        print(out[-3000:], file=sys.stderr)
        sys.exit("bench: make failed")
    log("building bench/peers/goproxy.go")
    env = dict(os.environ)
    if "HOME" not in env and "XDG_CACHE_HOME" not in env and "GOCACHE" not in env:
        env["GOCACHE"] = str(work / "gocache")
    goproxy = work / "goproxy"
    status, out = run(["go", "build", "-o", str(goproxy), str(BENCH / "peers" / "goproxy.go")],
                      600, env=env)
    if status != 0:
        print(out[-3000:], file=sys.stderr)
        sys.exit("bench: go build failed")
    return goproxy


def raise_fd_limit():
    """Soft RLIMIT_NOFILE up to the hard limit, for this process and every child."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# ─── systems under test ──────────────────────────────────────────────────────────────────

class System:
    """Something listening on 127.0.0.1:port: a proxy under test, or a backend.

    A subclass writes its configuration and returns its command line in `command()`;
    start() runs it in a process group of its own and waits until the port listens;
    stop() ends the whole group. `upstream` is the port it relays to."""

    name = "?"          # the row label in the tables
    threads = ""        # how it uses threads/processes, for the systems table
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
    threads = "—"

    def start(self):
        self.port = self.upstream

    def stop(self):
        pass


class Backend(System):
    """The nginx every HTTP scenario fetches from: one worker, no access log, keep-alive
    for as many requests as a run makes."""
    name = "backend nginx"
    threads = "worker_processes 1"

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
    threads = "workers × 2 threads (fixed pool)"

    def __init__(self, work, upstream, copy="splice", buffer_size="64k", workers=1100,
                 mode="tcp", stats=False, absolute=False, name=None):
        super().__init__(work, upstream)
        self.copy, self.buffer_size, self.workers = copy, buffer_size, workers
        self.mode, self.stats = mode, stats
        self.auth = mode == "http"
        self.absolute = absolute
        self.metrics_port = None
        self.name = name or f"ours {copy}"
        self.threads = f"workers = {workers} (2 threads each)"

    def command(self):
        ini = self.work / f"ours-{self.mode}-{self.copy}-{self.buffer_size}-{self.workers}.ini"
        users = f"\n[users]\n{USER} = {PASSWORD}\n" if self.mode == "http" else ""
        stats = "127.0.0.1:0" if self.stats else ""
        ini.write_text(f"""[proxy]
listen = 127.0.0.1:0
mode = {self.mode}
upstream = 127.0.0.1:{self.upstream}
workers = {self.workers}
copy = {self.copy}
buffer_size = {self.buffer_size}
log = off
{users}
[stats]
listen = {stats}
""")
        return [str(ROOT / "proxy"), "-c", str(ini)]

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

    def __init__(self, work, upstream, mode="tcp"):
        super().__init__(work, upstream)
        self.mode = mode
        self.auth = mode == "http"
        self.name = f"haproxy {mode}"
        self.threads = "default nbthread (= CPUs)"

    def command(self):
        cfg = self.work / f"haproxy-{self.mode}-{self.port}.cfg"
        http = ""
        if self.mode == "http":
            check = f'{{ req.hdr(proxy-authorization) -m str "{AUTH_HEADER}" }}'
            http = f"""    http-request deny deny_status 407 unless {check}
    http-request del-header proxy-authorization
"""
        cfg.write_text(f"""global
    maxconn 9000

defaults
    mode {self.mode}
    maxconn 9000
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
    """nginx's stream module (TCP proxy), worker_processes auto."""
    name = "nginx stream"
    threads = "worker_processes auto (= CPUs)"

    def command(self):
        conf = self.work / f"nginx-stream-{self.port}.conf"
        conf.write_text(f"""load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
daemon off;
pid {self.work}/nginx-stream-{self.port}.pid;
error_log {self.work}/nginx-stream-{self.port}-error.log;
events {{ worker_connections 10000; }}
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
    threads = "default GOMAXPROCS (= CPUs)"
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
    threads = "fork per connection"

    def command(self):
        return ["socat", f"TCP-LISTEN:{self.port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                f"TCP:127.0.0.1:{self.upstream}"]


class Tinyproxy(System):
    """tinyproxy with BasicAuth. It needs absolute-form targets and closes the client
    connection after every response."""
    name = "tinyproxy"
    threads = "thread per connection, MaxClients 1000"
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
    """bench/echo.py server: the far end of scenario 7."""
    name = "echo server"

    def command(self):
        return [sys.executable, str(BENCH / "echo.py"), "server", str(self.port)]


def tcp_systems(work, upstream, workers):
    """Every TCP relay under test, in table order, in front of `upstream`."""
    return [Direct(work, upstream),
            Ours(work, upstream, "splice", workers=workers),
            Ours(work, upstream, "buffer", workers=workers),
            HAProxy(work, upstream, "tcp"),
            NginxStream(work, upstream),
            GoProxy(work, upstream),
            Socat(work, upstream)]


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


# ─── load generators ─────────────────────────────────────────────────────────────────────

def to_us(number, unit):
    """wrk's '222.00us' / '1.23ms' / '1.02s' as microseconds."""
    return float(number) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(port, path, conns, seconds, headers=(), script=None, expect_errors=False,
        closes_after_response=False, timeout=None):
    """Run wrk -t1 and return its numbers; 'error' is set when anything went wrong
    (unless expect_errors, where the errors are only counted).

    closes_after_response: the server closes the connection after each response without
    saying `Connection: close` (tinyproxy). wrk then sends its next request on the closed
    connection, counts one read error and reconnects; up to one read error per request is
    expected then, and nothing else is."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if timeout:
        argv.append(f"--timeout={timeout}s")
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    status, out = run(argv, seconds + 60)
    result = {"requests": 0, "rps": None, "avg_us": None, "p50_us": None, "p99_us": None,
              "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0, "error": None}
    unit = r"([\d.]+)(us|ms|s)\b"
    if m := re.search(r"Latency\s+" + unit, out):
        result["avg_us"] = to_us(*m.groups())
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}%\s+" + unit, out, re.M):
            result[f"p{pct}_us"] = to_us(*m.groups())
    if m := re.search(r"(\d+) requests in", out):
        result["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups()):
            result[key] = int(value)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non2xx"] = int(m.group(1))

    kinds = ("connect", "read", "write", "timeout", "non2xx")
    if closes_after_response and result["read"] <= result["requests"] + conns:
        result["expected_errors"] = f"read {result['read']} (closes after each response)"
        kinds = ("connect", "write", "timeout", "non2xx")
    problems = [f"{k} {result[k]}" for k in kinds if result[k]]
    if status != 0:
        problems.insert(0, f"wrk exit status {status}: {out.strip()[-200:]}")
    elif result["requests"] == 0 or result["rps"] is None:
        problems.insert(0, "no requests completed")
    if problems and not expect_errors:
        result["error"] = ", ".join(problems)
    elif problems:
        result["expected_errors"] = ", ".join(problems)
    return result


def iperf(port, seconds, mode):
    """One iperf3 client run through `port`; Gbit/s received (both directions for bidir)."""
    flags = {"1 stream": [], "4 streams": ["-P", "4"], "bidir": ["--bidir"]}[mode]
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "--json"] + flags
    for attempt in range(3):
        status, out = run(argv, seconds + 30)
        try:
            data = json.loads(out[out.find("{"):])
        except ValueError:
            data = {"error": f"exit status {status}, no JSON: {out.strip()[-200:]}"}
        if "busy" in str(data.get("error", "")) and attempt < 2:
            time.sleep(1)   # the server is still finishing the previous test
            continue
        break
    if data.get("error"):
        return {"gbps": None, "error": f"iperf3: {data['error']}"}
    end = data["end"]
    bits = end["sum_received"]["bits_per_second"]
    if mode == "bidir":
        bits += end["sum_received_bidir_reverse"]["bits_per_second"]
    return {"gbps": bits / 1e9, "error": None}


# ─── results: runs, summaries, failures ──────────────────────────────────────────────────

class Results:
    """Every run of every scenario: results.runs[scenario][row][column] = [run, ...] where a
    run is a dict of numbers with 'error' set when it must not count. Also the failures
    that make the script exit non-zero."""

    def __init__(self):
        self.runs = {}
        self.commands = {}      # scenario -> command lines as run (ports as PORT)
        self.notes = {}         # scenario -> extra lines for the report
        self.failures = []

    def add(self, scenario, row, column, run):
        self.runs.setdefault(scenario, {}).setdefault(row, {}).setdefault(column, []).append(run)
        if run.get("error"):
            self.failures.append(f"scenario {scenario}, {row}, {column}: {run['error']}")
            log(f"  ERR {row} {column}: {run['error']}")

    def get(self, scenario, row, column):
        return self.runs.get(scenario, {}).get(row, {}).get(column, [])


def summary(runs, key):
    """(median, min, max) of `key` over runs, or None when a run failed or none exist."""
    if not runs or any(r.get("error") for r in runs):
        return None
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt_us(v):
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.0f} µs"


def fmt_rps(v):
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_gbps(v):
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def cell(runs, key, fmt):
    """'median (min–max)' for a table, or ERR when any run failed, or — when not run."""
    if not runs:
        return "—"
    s = summary(runs, key)
    if s is None:
        return "ERR"
    median, low, high = s
    if len(runs) == 1 or fmt(low) == fmt(high):
        return fmt(median)
    return f"{fmt(median)} ({fmt(low)}–{fmt(high)})"


def ratio(runs, base_runs, key):
    """Median over median of the base row, as '1.02×'."""
    a, b = summary(runs, key), summary(base_runs, key)
    if a is None or b is None or not b[0]:
        return "—"
    x = a[0] / b[0]
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path, title, ylabel, labels, series, log_scale=False):
    """A grouped bar chart with min–max error bars, drawn by gnuplot into `path` (PNG).
    series: [(name, [(median, min, max) or None per label])]. Returns True when drawn."""
    data = path.with_suffix(".dat")
    with open(data, "w") as f:
        for i, label in enumerate(labels):
            cols = [label.replace(" ", "\\n", 1) if len(label) > 12 else label]
            for _, values in series:
                v = values[i]
                cols += ["NaN"] * 3 if v is None else [f"{x:.6g}" for x in v]
            f.write("\t".join(cols) + "\n")
    plots = []
    for n, (name, _) in enumerate(series):
        c = 2 + 3 * n
        using = f"{c}:{c + 1}:{c + 2}" + (":xtic(1)" if n == 0 else "")
        plots.append(f"'{data}' using {using} title '{name}'")
    script = f"""set terminal pngcairo size 1000,520 font "sans,10"
set output '{path}'
set title "{title}"
set ylabel "{ylabel}"
set datafile separator "\\t"
set datafile missing "NaN"
set style data histogram
set style histogram errorbars gap 1 lw 1
set style fill solid 0.7 border -1
set boxwidth 0.9
set grid ytics
set key top left
set xtics scale 0 noenhanced
set bmargin 4
{"set logscale y" if log_scale else "set yrange [0:*]"}
plot {", ".join(plots)}
"""
    try:
        p = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True, timeout=60)
        ok = p.returncode == 0 and path.exists()
        if not ok:
            log(f"  gnuplot failed for {path.name}: {p.stderr.strip()[-300:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"  gnuplot failed for {path.name}: {e}")
        ok = False
    data.unlink(missing_ok=True)
    return ok


# ─── scenarios ───────────────────────────────────────────────────────────────────────────

class Bench:
    """What every scenario needs: settings, the temp directory, the backend, the results."""

    def __init__(self, settings, work, backend, results):
        self.settings, self.work, self.backend, self.results = settings, work, backend, results


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


def progress(scenario, rnd, rounds, what, r):
    """One progress line for one run, e.g. '3 round 1/3  haproxy tcp -c100: 80.5k req/s …'."""
    if "gbps" in r and not r.get("error"):
        text = f"{fmt_gbps(r['gbps'])} Gbit/s"
    else:
        text = wrk_line(r)
    log(f"{scenario} round {rnd}/{rounds}  {what}: {text}")


def wrk_line(r):
    """A short progress description of one wrk run."""
    if r.get("error"):
        return "ERR " + r["error"]
    text = f"{fmt_rps(r['rps'])} req/s, avg {fmt_us(r['avg_us'])}, p99 {fmt_us(r['p99_us'])}"
    if r.get("expected_errors"):
        text += f" ({r['expected_errors']})"
    return text


def latency_rounds(b, number, systems, seconds):
    """Scenario 1's measurement (wrk -c1 on /test1 and /test2), round after round."""
    b.results.commands[number] = [
        f"wrk -t1 -c1 -d{seconds}s --latency http://127.0.0.1:PORT{path}"
        for path in ("/test1", "/test2")]
    with running(systems, b.backend):
        for rnd in range(1, b.settings.rounds + 1):
            for system in systems:
                for path in ("/test1", "/test2"):
                    r = measure(system, lambda: wrk(system.port, path, 1, seconds))
                    b.results.add(number, system.name, path, r)
                    progress(int(number), rnd, b.settings.rounds, f"{system.name} {path}", r)


def scenario_latency(b):
    """1. proxy-bench latency: one connection, sequential keep-alive GETs (wrk -t1 -c1)."""
    s = b.settings
    latency_rounds(b, "1", tcp_systems(b.work, b.backend.port, s.workers), s.latency_seconds)


def scenario_sweep(b):
    """2. Buffer-size sweep: scenario 1 through ours in buffer mode at each buffer size,
    and in splice mode."""
    s = b.settings
    systems = [Ours(b.work, b.backend.port, "buffer", size, workers=16, name=f"buffer {size}")
               for size in s.sweep_sizes]
    systems.append(Ours(b.work, b.backend.port, "splice", "64k", workers=16,
                        name="splice 64k"))
    latency_rounds(b, "2", systems, s.sweep_seconds)


def scenario_throughput(b):
    """3. Throughput: wrk -c100 and -c1000 keep-alive on /index.html."""
    s = b.settings
    b.results.commands["3"] = [
        f"wrk -t1 -c{c} -d{s.throughput_seconds}s --latency http://127.0.0.1:PORT/index.html"
        for c in (100, 1000)]
    systems = tcp_systems(b.work, b.backend.port, s.workers)
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                for conns in (100, 1000):
                    r = measure(system, lambda: wrk(system.port, "/index.html", conns,
                                                    s.throughput_seconds))
                    b.results.add("3", system.name, f"c{conns}", r)
                    progress(3, rnd, s.rounds, f"{system.name} -c{conns}", r)


def scenario_connrate(b):
    """4. Connection rate: every request on a new connection (Connection: close)."""
    s = b.settings
    b.results.commands["4"] = [
        f"wrk -t1 -c50 -d{s.connrate_seconds}s --latency -H 'Connection: close' "
        f"http://127.0.0.1:PORT/index.html"]
    systems = tcp_systems(b.work, b.backend.port, s.workers)
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                r = measure(system, lambda: wrk(system.port, "/index.html", 50, s.connrate_seconds,
                                                headers=["Connection: close"]))
                b.results.add("4", system.name, "close", r)
                progress(4, rnd, s.rounds, system.name, r)


def scenario_bulk(b):
    """5. Bulk: iperf3 through each TCP relay (and direct) to an iperf3 server."""
    s = b.settings
    flags = {"1 stream": "", "4 streams": " -P 4", "bidir": " --bidir"}
    b.results.commands["5"] = [f"iperf3 -s -B 127.0.0.1 -p PORT"] + [
        f"iperf3 -c 127.0.0.1 -p PORT -t {s.iperf_seconds} --json{flags[m]}"
        for m in s.iperf_modes]
    server = IperfServer(b.work, None)
    try:
        server.start()
        systems = tcp_systems(b.work, server.port, s.workers)
        with running(systems):
            for rnd in range(1, s.rounds + 1):
                for system in systems:
                    for mode in s.iperf_modes:
                        r = measure(system, lambda: iperf(system.port, s.iperf_seconds, mode))
                        b.results.add("5", system.name, mode, r)
                        progress(5, rnd, s.rounds, f"{system.name} {mode}", r)
    finally:
        server.stop()


def scenario_http(b):
    """6. HTTP proxies with Basic auth on every request: wrk -c100 on /index.html."""
    s = b.settings
    script = b.work / "absolute-form.lua"
    script.write_text(
        "-- absolute-form request target, for proxies that need it (tinyproxy)\n"
        f'wrk.path = "http://127.0.0.1:{b.backend.port}/index.html"\n'
        f'wrk.headers["Host"] = "127.0.0.1:{b.backend.port}"\n')
    b.results.commands["6"] = [
        f"wrk -t1 -c100 -d{s.http_seconds}s --latency -H 'Proxy-Authorization: {AUTH_HEADER}' "
        f"http://127.0.0.1:PORT/index.html",
        "the same with -s absolute-form.lua for the absolute-form rows, which says:",
        '  wrk.path = "http://127.0.0.1:BACKEND/index.html"',
        '  wrk.headers["Host"] = "127.0.0.1:BACKEND"']
    systems = [Direct(b.work, b.backend.port),
               Ours(b.work, b.backend.port, "splice", mode="http", workers=s.workers,
                    name="ours http"),
               Ours(b.work, b.backend.port, "splice", mode="http", workers=s.workers,
                    absolute=True, name="ours http, absolute-form"),
               HAProxy(b.work, b.backend.port, "http"),
               Tinyproxy(b.work, b.backend.port)]
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                r = measure(system, lambda: wrk(
                    system.port, "/index.html", 100, s.http_seconds,
                    headers=[f"Proxy-Authorization: {AUTH_HEADER}"],
                    script=script if system.absolute else None,
                    closes_after_response=system.closes_after_response))
                b.results.add("6", system.name, "c100", r)
                progress(6, rnd, s.rounds, system.name, r)


def memory_run(b, make_system):
    """One memory run: a fresh echo server and system, the echo client through it, and the
    proxy's RSS, threads and the system's memory in use sampled every 0.25 s. Memory in use
    is taken two ways: its peak, and its median over the hold period (every connection
    open), which a short spike from another program on a shared machine does not move."""
    s = b.settings
    echo = EchoServer(b.work, None)
    system = None
    try:
        echo.start()
        time.sleep(0.3)
        used_before_start, kernel_before_start = memory_in_use_kib()
        system = make_system(echo.port)
        start_all([system])
        if system.failed:
            return system, {"error": system.failed}
        time.sleep(0.5)     # let it settle (threads created, pages touched)
        idle = [proc_status(p) for p in system.pids()]
        before = []
        for _ in range(5):
            before.append(memory_in_use_kib()[0])
            time.sleep(0.1)
        used_before = statistics.median(before)
        argv = [sys.executable, str(BENCH / "echo.py"), "client", str(system.port),
                "--conns", str(s.memory_conns), "--hold", str(s.memory_hold)]
        client_log = b.work / f"echo-client-{system.port}.log"
        with open(client_log, "w") as err:
            client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + s.memory_conns / 100 + s.memory_hold + 60
        peak_used, peak_kernel, peak_rss, peak_threads = used_before, kernel_before_start, 0, 0
        holding = []    # memory in use while every connection is open
        while client.poll() is None and time.monotonic() < deadline:
            statuses = [proc_status(p) for p in system.pids()]
            peak_rss = max(peak_rss, sum(st["VmRSS"] for st in statuses))
            peak_threads = max(peak_threads, sum(st["Threads"] for st in statuses))
            used, kernel = memory_in_use_kib()
            peak_used, peak_kernel = max(peak_used, used), max(peak_kernel, kernel)
            if "holding" in client_log.read_text():     # the client says all are connected
                holding.append(used)
            time.sleep(0.25)
        hwm = sum(proc_status(p)["VmHWM"] for p in system.pids())
        if client.poll() is None:
            client.kill()
            client.wait()
            return system, {"error": f"echo client still running after its time limit"}
        try:
            tally = json.loads(client.stdout.read().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return system, {"error": "echo client printed no result: "
                            + client_log.read_text()[-300:]}
        run = dict(tally)
        run.update({
            "conns": s.memory_conns,
            "rss_idle_kib": sum(st["VmRSS"] for st in idle) if system.proc else None,
            "rss_peak_kib": hwm if system.proc else None,
            "rss_peak_sampled_kib": peak_rss if system.proc else None,
            "threads": peak_threads if system.proc else None,
            "used_peak_kib": peak_used - used_before,
            "used_load_kib": (statistics.median(holding) if holding else peak_used) - used_before,
            "used_total_kib": peak_used - used_before_start,
            "kernel_stacks_kib": peak_kernel - kernel_before_start,
            "error": None})
        problems = [f"{k} {tally[k]}" for k in ("connect_errors", "errors", "mismatches")
                    if tally[k]]
        if problems:
            run["error"] = ", ".join(problems) + f" (first: {tally.get('first_error')})"
        return system, run
    finally:
        if system:
            system.stop()
        echo.stop()


def scenario_memory(b):
    """7. Memory at many connections: N echo connections held through each proxy."""
    s = b.settings
    n = s.memory_conns
    b.results.commands["7"] = [
        "python3 bench/echo.py server PORT",
        f"python3 bench/echo.py client PORT --conns {n} --hold {s.memory_hold}"]
    makers = [
        lambda up: Direct(b.work, up),
        lambda up: Ours(b.work, up, "buffer", workers=n, name="ours buffer"),
        lambda up: HAProxy(b.work, up, "tcp"),
        lambda up: NginxStream(b.work, up),
        lambda up: GoProxy(b.work, up, "buffer"),
    ]
    for rnd in range(1, s.rounds_memory + 1):
        for make in makers:
            system, r = memory_run(b, make)
            b.results.add("7", system.name, f"{n} conns", r)
            if r.get("error"):
                continue
            rss = f"peak RSS {r['rss_peak_kib'] / 1024:.1f} MB, " if r["rss_peak_kib"] else ""
            log(f"7 round {rnd}/{s.rounds_memory}  {system.name}: {rss}"
                f"memory in use +{r['used_load_kib'] / 1024:.0f} MB, "
                f"{r['echoes']} echoes, {r['connect_seconds']}s to connect")


def scenario_cliff(b):
    """8. Concurrency cliff: ours with workers = 256 as wrk connections grow past it."""
    s = b.settings
    b.results.commands["8"] = [
        f"wrk -t1 -c{{{','.join(str(c) for c in s.cliff_points)}}} -d{s.cliff_seconds}s "
        f"--latency http://127.0.0.1:PORT/index.html",
        "curl http://127.0.0.1:METRICS/metrics   (before and after each run)"]
    ours = Ours(b.work, b.backend.port, "splice", workers=256, stats=True,
                name="ours splice, workers=256")
    refused_key = 'proxy_connections_refused_total{reason="queue_full"}'
    with running([ours], b.backend):
        for rnd in range(1, s.rounds + 1):
            for conns in s.cliff_points:
                if ours.failed:
                    r = {"error": ours.failed}
                else:
                    wait_idle(ours)
                    before = ours.metrics()
                    peaks = {"proxy_queue_length": 0, "proxy_workers_busy": 0}
                    stop = threading.Event()
                    sampler = threading.Thread(target=sample_gauges, args=(ours, peaks, stop))
                    sampler.start()
                    r = wrk(ours.port, "/index.html", conns, s.cliff_seconds,
                            expect_errors=True)
                    stop.set()
                    sampler.join()
                    after = ours.metrics()
                    r["refused"] = int(after[refused_key] - before[refused_key])
                    r["accepted"] = int(after["proxy_connections_accepted_total"]
                                        - before["proxy_connections_accepted_total"])
                    r["queue_peak"] = int(peaks["proxy_queue_length"])
                    r["busy_peak"] = int(peaks["proxy_workers_busy"])
                b.results.add("8", ours.name, f"c{conns}", r)
                progress(8, rnd, s.rounds, f"-c{conns}", r)
                if not r.get("error"):
                    log(f"  refused {r['refused']}, queue peak {r['queue_peak']}, "
                        f"busy workers peak {r['busy_peak']}")


def wait_idle(ours, timeout=20):
    """Wait until ./proxy has no connection open, so runs do not overlap."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ours.metrics().get("proxy_connections_active", 0) == 0:
            return
        time.sleep(0.1)
    log("  ./proxy still has open connections; going on")


def sample_gauges(ours, peaks, stop):
    """Keep the highest value of each gauge in `peaks` until `stop` is set."""
    while not stop.wait(0.2):
        try:
            values = ours.metrics()
        except OSError:
            continue
        for key in peaks:
            peaks[key] = max(peaks[key], values.get(key, 0))


SCENARIOS = {
    1: ("proxy-bench latency", scenario_latency),
    2: ("buffer-size sweep", scenario_sweep),
    3: ("throughput", scenario_throughput),
    4: ("connection rate", scenario_connrate),
    5: ("bulk (iperf3)", scenario_bulk),
    6: ("HTTP with auth", scenario_http),
    7: ("memory at many connections", scenario_memory),
    8: ("concurrency cliff", scenario_cliff),
}


# ─── the report: markdown, JSON, charts ──────────────────────────────────────────────────

TCP_ROWS = ["direct", "ours splice", "ours buffer", "haproxy tcp", "nginx stream",
            "Go io.Copy", "socat"]


def fmt_mb(kib):
    return f"{kib / 1024:.1f} MB"


def fmt_kib(kib):
    return f"{kib:.0f} KiB" if abs(kib) >= 10 else f"{kib:.1f} KiB"


def fmt_int(v):
    return f"{v:.0f}"


class Report:
    """Builds the markdown text and the charts from the results, one method per scenario."""

    def __init__(self, b, base):
        self.b, self.r, self.base = b, b.results, base
        self.charts = []

    def chart(self, name, title, ylabel, labels, series, log_scale=False):
        """Draw a chart next to the report and return the markdown line that shows it."""
        path = RESULTS / f"{self.base}-{name}.png"
        if bar_chart(path, title, ylabel, labels, series, log_scale):
            self.charts.append(path.name)
            return f"\n![{title}]({path.name})\n"
        return "\n(chart not drawn: gnuplot failed)\n"

    def rows(self, scenario, order=None):
        present = list(self.r.runs.get(scenario, {}))
        return [n for n in (order or present) if n in present]

    def commands(self, scenario):
        lines = self.r.commands.get(scenario, [])
        return "\nCommands (PORT is the system's port):\n\n```\n" + "\n".join(lines) + "\n```\n"

    def section_latency(self):
        r, rows = self.r, self.rows("1", TCP_ROWS)
        table = []
        for name in rows:
            row = [name]
            for path in ("/test1", "/test2"):
                runs = r.get("1", name, path)
                direct = r.get("1", "direct", path)
                row += [cell(runs, "avg_us", fmt_us), ratio(runs, direct, "avg_us"),
                        cell(runs, "p99_us", fmt_us)]
            table.append(row)
        text = ["## 1. proxy-bench latency (one connection, sequential GETs)\n",
                "One keep-alive connection, one request at a time: `/test1` is a 64 KiB body, "
                "`/test2` is `Hello, world!` (13 B). Average and p99 latency per request as wrk "
                "reports them, and the average as a ratio to direct (lower is better).\n",
                markdown_table(["system", "/test1 avg", "× direct", "/test1 p99",
                                "/test2 avg", "× direct", "/test2 p99"], table),
                self.chart("latency", "1. latency per request, one connection (log scale)",
                           "average latency, µs", rows,
                           [(p, [summary(r.get("1", n, p), "avg_us") for n in rows])
                            for p in ("/test1", "/test2")], log_scale=True),
                self.commands("1")]
        return "\n".join(text)

    def section_sweep(self):
        r = self.r
        rows = self.rows("2")
        refs = [n for n in ("direct", "socat") if r.get("1", n, "/test1")]
        table, labels, series = [], [], {"/test1": [], "/test2": []}
        for scenario, name in [("2", n) for n in rows] + [("1", n) for n in refs]:
            label = name if scenario == "2" else f"{name} (from 1)"
            row = [label]
            for path in ("/test1", "/test2"):
                runs = r.get(scenario, name, path)
                direct = r.get("1", "direct", path)
                row += [cell(runs, "avg_us", fmt_us), ratio(runs, direct, "avg_us"),
                        cell(runs, "p99_us", fmt_us)]
                series[path].append(summary(runs, "avg_us"))
            table.append(row)
            labels.append(label)
        text = ["## 2. Buffer-size sweep (scenario 1 through ours)\n",
                "Scenario 1 through our proxy in `copy = buffer` at each `buffer_size`, and in "
                "`copy = splice` (pipe of 64 KiB). A buffer size that hit the Nagle/delayed-ACK "
                "stall would show ~40 ms on `/test1`, as socat does; the direct and socat rows "
                "are copied from scenario 1 for reference. Ratios are to direct in scenario 1.\n",
                markdown_table(["ours", "/test1 avg", "× direct", "/test1 p99",
                                "/test2 avg", "× direct", "/test2 p99"], table),
                self.chart("sweep", "2. buffer-size sweep: latency per request (log scale)",
                           "average latency, µs", labels,
                           [(p, v) for p, v in series.items()], log_scale=True),
                self.commands("2")]
        return "\n".join(text)

    def section_throughput(self):
        r, rows = self.r, self.rows("3", TCP_ROWS)
        table = []
        for name in rows:
            row = [name]
            for col in ("c100", "c1000"):
                runs = r.get("3", name, col)
                haproxy = r.get("3", "haproxy tcp", col)
                row += [cell(runs, "rps", fmt_rps), ratio(runs, haproxy, "rps"),
                        cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us)]
            table.append(row)
        text = ["## 3. Throughput (keep-alive, many connections)\n",
                "wrk with 100 and with 1000 keep-alive connections on `/index.html` (~600 B), "
                "one wrk thread: requests per second, and latency p50/p99. Ratios are to "
                "haproxy (higher is better).\n",
                markdown_table(["system", "-c100 req/s", "× haproxy", "p50", "p99",
                                "-c1000 req/s", "× haproxy", "p50", "p99"], table),
                self.chart("throughput", "3. keep-alive throughput on /index.html",
                           "requests per second", rows,
                           [(f"-{c}", [summary(r.get("3", n, c), "rps") for n in rows])
                            for c in ("c100", "c1000")]),
                self.commands("3")]
        return "\n".join(text)

    def section_connrate(self):
        r, rows = self.r, self.rows("4", TCP_ROWS)
        table = []
        for name in rows:
            runs = r.get("4", name, "close")
            table.append([name, cell(runs, "rps", fmt_rps),
                          ratio(runs, r.get("4", "haproxy tcp", "close"), "rps"),
                          ratio(runs, r.get("4", "direct", "close"), "rps"),
                          cell(runs, "p99_us", fmt_us)])
        text = ["## 4. Connection rate (a new connection per request)\n",
                "wrk -c50 with `Connection: close`: the backend closes after each response, so "
                "every request is a new client connection and, through a proxy, a new upstream "
                "connection. Requests per second = connections per second.\n",
                markdown_table(["system", "conn/s", "× haproxy", "× direct", "p99"], table),
                self.chart("connrate", "4. new connections per second (Connection: close)",
                           "connections per second", rows,
                           [("conn/s", [summary(r.get("4", n, "close"), "rps") for n in rows])]),
                self.commands("4")]
        return "\n".join(text)

    def section_bulk(self):
        r, rows = self.r, self.rows("5", TCP_ROWS)
        modes = self.b.settings.iperf_modes
        table = []
        for name in rows:
            row = [name] + [cell(r.get("5", name, m), "gbps", fmt_gbps) for m in modes]
            runs = r.get("5", name, "1 stream")
            row += [ratio(runs, r.get("5", "Go io.Copy", "1 stream"), "gbps"),
                    ratio(runs, r.get("5", "direct", "1 stream"), "gbps")]
            table.append(row)
        text = ["## 5. Bulk transfer (iperf3)\n",
                "iperf3 through each TCP relay to an iperf3 server on loopback, Gbit/s as the "
                "receiver counts it: one stream, four parallel streams (`-P 4`), and `--bidir` "
                "(the sum of both directions). Ratios are for one stream (higher is better).\n",
                markdown_table(["system"] + [f"{m}, Gbit/s" for m in modes]
                               + ["1 stream × Go", "1 stream × direct"], table),
                self.chart("iperf3", "5. iperf3 through each relay", "Gbit/s", rows,
                           [(m, [summary(r.get("5", n, m), "gbps") for n in rows]) for m in modes]),
                self.commands("5")]
        return "\n".join(text)

    def section_http(self):
        r, rows = self.r, self.rows("6")
        table = []
        for name in rows:
            runs = r.get("6", name, "c100")
            table.append([name, cell(runs, "rps", fmt_rps),
                          ratio(runs, r.get("6", "haproxy http", "c100"), "rps"),
                          cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us),
                          cell(runs, "read", fmt_int)])
        text = ["## 6. HTTP proxies with Basic auth on every request\n",
                f"wrk -c100 on `/index.html` with `Proxy-Authorization: {AUTH_HEADER}` "
                f"(`{USER}:{PASSWORD}`) on every request. Ours runs `mode = http` with a "
                "`[users]` entry (every request authenticated, origin-form `GET /index.html` "
                "sent to `upstream`); haproxy `mode http` denies with 407 unless the header "
                "matches, and removes it; tinyproxy uses `BasicAuth` and needs absolute-form "
                "targets (`GET http://127.0.0.1:BACKEND/index.html`, from a wrk Lua script), and "
                "closes the client connection after every response, so its row is a new "
                "connection per request; it does so without `Connection: close`, so wrk "
                "sends its next request on the closed connection, counts a read error and "
                "reconnects: up to one read error per request is expected for tinyproxy (and "
                "shown), any other error is not. The `ours http, absolute-form` row sends the same "
                "absolute-form requests to ours, for a like-for-like comparison. The direct row "
                "sends the same header to the backend, which ignores it. A 407 or any other "
                "non-2xx response makes the cell ERR.\n",
                markdown_table(["system", "req/s", "× haproxy http", "p50", "p99",
                                "wrk read errors"], table),
                self.chart("http", "6. HTTP proxy with auth on every request, wrk -c100",
                           "requests per second", rows,
                           [("req/s", [summary(r.get("6", n, "c100"), "rps") for n in rows])]),
                self.commands("6")]
        return "\n".join(text)

    def section_memory(self):
        r, rows = self.r, self.rows("7")
        n = self.b.settings.memory_conns
        col = f"{n} conns"
        base = summary(r.get("7", "direct", col), "used_load_kib")
        table = []
        for name in rows:
            runs = r.get("7", name, col)
            load = summary(runs, "used_load_kib")
            over = "—"
            if load and base and name != "direct":
                over = fmt_kib((load[0] - base[0]) / n)
            proxy = name != "direct"
            table.append([
                name, cell(runs, "connected", fmt_int), cell(runs, "echoes", fmt_int),
                cell(runs, "rss_peak_kib", fmt_mb) if proxy else "—",
                cell(runs, "rss_idle_kib", fmt_mb) if proxy else "—",
                cell(runs, "threads", fmt_int) if proxy else "—",
                cell(runs, "used_peak_kib", fmt_mb),
                cell(runs, "used_load_kib", fmt_mb),
                fmt_kib(load[0] / n) if load else "ERR",
                over,
                cell(runs, "used_total_kib", fmt_mb),
                cell(runs, "kernel_stacks_kib", fmt_mb)])
        proxies = [x for x in rows if x != "direct"]
        peaks = []
        for x in proxies:
            v = summary(r.get("7", x, col), "rss_peak_kib")
            peaks.append(tuple(k / 1024 for k in v) if v else None)
        rounds = self.b.settings.rounds_memory
        text = ["## 7. Memory at many connections\n",
                f"{n} connections through each proxy to an echo server (bench/echo.py, Python "
                "asyncio), each sending 800 random bytes on connect and then every 1–10 s "
                f"(random) for {self.b.settings.memory_hold} s once all are connected, every "
                "echo checked byte for byte. Each system and the echo server are started fresh "
                f"for their run ({rounds} round: a run takes up to half a minute). Ours "
                f"runs `copy = buffer` with `workers = {n}`, and the Go proxy `-copy buffer` "
                "(io.Copy through its 32 KiB buffer): with splice both hold a pipe, two fds, "
                "per direction for a connection's life, 6 fds a connection — 24000 at 4000 "
                "connections, past this machine's limit of 20000 (the plain Go proxy fails "
                "there with `too many open files`).\n",
                "- **peak RSS**: the sum of VmHWM over all the proxy's processes (nginx: master "
                "and workers); **idle RSS**: the sum of VmRSS just before the client started; "
                "**threads**: the most seen at once, all processes.",
                "- **in use**: system memory in use, MemTotal − MemAvailable, relative to just "
                "before the client started: at its **peak**, and the **median** over the hold "
                "period (every connection open), which a passing spike from another program "
                "does not move. Per-connection figures use the median. It includes the "
                "kernel's socket buffers and the Python client and echo server: the direct "
                "row is that baseline, so **over direct** is the proxy's own cost per "
                "connection.",
                "- **incl. start**: the peak counted from before the proxy started: for ours "
                "it includes every pre-made worker thread. **kernel stacks + page tables**: "
                "the growth of /proc/meminfo's KernelStack + PageTables over that same span — "
                "what threads cost the kernel, which no RSS shows.",
                "- System-wide figures move with anything else running on the machine (see "
                "the load averages above); RSS and thread counts do not.",
                "- A connection that fails to connect, an echo error or a single mismatched "
                "byte makes the row ERR.\n",
                markdown_table(["system", "connected", "echoes checked", "peak RSS",
                                "idle RSS", "threads", "in use, peak", "in use, median",
                                "per conn", "per conn over direct", "incl. start",
                                "kernel stacks + page tables"], table),
                self.chart("memory", f"7. peak RSS of the proxy at {n} connections",
                           "MB", proxies, [("peak RSS", peaks)]),
                self.commands("7")]
        return "\n".join(text)

    def section_cliff(self):
        r = self.r
        name = "ours splice, workers=256"
        cols = list(r.runs.get("8", {}).get(name, {}))
        table = []
        for col in cols:
            runs = r.get("8", name, col)
            errors = [sum(x.get(k, 0) for k in ("connect", "read", "write")) for x in runs
                      if not x.get("error")]
            table.append([col.lstrip("c"), cell(runs, "rps", fmt_rps),
                          cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us),
                          cell(runs, "timeout", fmt_int),
                          f"{statistics.median(errors):.0f}" if errors else "ERR",
                          cell(runs, "refused", fmt_int), cell(runs, "queue_peak", fmt_int),
                          cell(runs, "busy_peak", fmt_int)])
        text = ["## 8. Concurrency cliff (ours, workers = 256, queue = 1024)\n",
                "Our proxy with a pool of 256 workers as wrk's keep-alive connections grow. "
                "A keep-alive connection holds its worker for the whole run, so past 256 the "
                "extra connections wait in the queue and never get an answer within the run. "
                "wrk does not report a request that never got an answer (this wrk counted no "
                "timeouts for them in testing), so **waiting unanswered** is the queue's peak "
                "length from /metrics: those connections waited the whole run; req/s and "
                "latencies are those of the served connections (**busy workers peak**). Past "
                "256 + 1024 the proxy refuses connections at once "
                "(`proxy_connections_refused_total{reason=\"queue_full\"}`, read from /metrics "
                "before and after each run), which wrk sees as socket errors. These errors are "
                "expected and reported, not counted as failures. Queue and busy peaks are "
                "sampled from /metrics every 0.2 s.\n",
                markdown_table(["connections", "req/s", "p50", "p99", "wrk timeouts",
                                "wrk socket errors", "refused (queue full)",
                                "waiting unanswered (queue peak)", "busy workers peak"], table),
                self.chart("cliff", "8. ours with workers = 256: req/s as connections grow",
                           "requests per second", [c.lstrip("c") for c in cols],
                           [("req/s", [summary(r.get("8", name, c), "rps") for c in cols])]),
                self.commands("8")]
        return "\n".join(text)

    def headline(self):
        """One table in the shape of shared/REFERENCES.md's, medians only."""
        r = self.r
        lines = [("1 conn, 64 KiB GET, avg", "1", "/test1", "avg_us", fmt_us),
                 ("1 conn, 13 B GET, avg", "1", "/test2", "avg_us", fmt_us),
                 ("wrk -c100, req/s", "3", "c100", "rps", fmt_rps),
                 ("wrk -c100, p99", "3", "c100", "p99_us", fmt_us),
                 ("wrk -c1000, req/s", "3", "c1000", "rps", fmt_rps),
                 ("new connection per request, conn/s", "4", "close", "rps", fmt_rps),
                 ("iperf3 1 stream, Gbit/s", "5", "1 stream", "gbps", fmt_gbps)]
        table = []
        for label, scenario, col, key, fmt in lines:
            if scenario not in r.runs:
                continue
            row = [label]
            for name in TCP_ROWS:
                s = summary(r.get(scenario, name, col), key)
                row.append("—" if not r.get(scenario, name, col) else
                           "ERR" if s is None else fmt(s[0]))
            table.append(row)
        if not table:
            return ""
        return ("## Headline (medians)\n\n" + markdown_table(["scenario"] + TCP_ROWS, table)
                + "\n")


def machine_info(fd_limit):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    distro = "?"
    if os.path.exists("/etc/os-release"):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    return {"host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": cpu,
            "kernel": os.uname().release, "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
            "os": distro, "open files limit": fd_limit,
            "load average at start": LOAD_AT_START, "load average at end": load_average()}


def versions():
    _, socat = run(["socat", "-V"], 10)
    socat = next((line.strip() for line in socat.splitlines() if "socat version" in line), "?")
    return {
        "proxy": first_line([str(ROOT / "proxy"), "-V"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "go": first_line(["go", "version"]),
        "socat": socat,
        "tinyproxy": first_line(["tinyproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "iperf3": first_line(["iperf3", "-v"]),
        "gnuplot": first_line(["gnuplot", "--version"]),
        "python": sys.version.split()[0],
    }


def systems_table(settings):
    s = settings
    return markdown_table(["system", "what", "threads / processes"], [
        ["direct", "wrk/iperf3/echo client straight to the backend: the floor",
         "backend nginx: worker_processes 1"],
        ["ours splice", "./proxy, mode tcp, copy = splice (64 KiB pipes), log off, stats off",
         f"workers = {s.workers} (2 threads each); 16 in 2, 256 in 8"],
        ["ours buffer", "./proxy, mode tcp, copy = buffer, buffer_size = 64k, log off",
         f"workers = {s.workers}; {s.memory_conns} in 7 (splice would need 6 fds a worker)"],
        ["ours http", "./proxy, mode http, copy = splice, [users] alice, log off",
         f"workers = {s.workers}"],
        ["haproxy tcp / http", "mode tcp; mode http with a Proxy-Authorization check; "
         "maxconn 9000, no logging", "default nbthread (one thread per CPU)"],
        ["nginx stream", "stream { proxy_pass } via libnginx-mod-stream",
         "worker_processes auto (one per CPU)"],
        ["Go io.Copy", "bench/peers/goproxy.go: two goroutines with io.Copy per connection",
         "default GOMAXPROCS (= CPUs)"],
        ["socat", "TCP-LISTEN:PORT,fork,reuseaddr TCP:127.0.0.1:UPSTREAM",
         "one process per connection"],
        ["tinyproxy", "BasicAuth alice secret, MaxClients 1000", "thread per connection"],
    ])


def write_report(b, base, args, fd_limit, elapsed):
    """Write RESULTS/base.md, base.json and the charts; return the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rep = Report(b, base)
    machine, vers = machine_info(fd_limit), versions()
    command = "python3 bench/run.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    s = b.settings
    failures = b.results.failures
    status = ("**All runs clean** (no socket errors, no non-2xx responses, no iperf3 errors, "
              "no bad echoes, every body checked)." if not failures else
              f"**{len(failures)} run(s) failed** — their cells show ERR, and the script "
              "exited 1:\n\n" + "\n".join(f"- {f}" for f in failures))
    sections = {1: rep.section_latency, 2: rep.section_sweep, 3: rep.section_throughput,
                4: rep.section_connrate, 5: rep.section_bulk, 6: rep.section_http,
                7: rep.section_memory, 8: rep.section_cliff}
    body = [f"# Benchmark results: {datetime.date.today()}, {machine['host']}\n",
            f"`{command}` — {'quick' if s.quick else 'full'} mode, {s.rounds} round(s) "
            f"with the systems interleaved in each round; took {elapsed / 60:.1f} min. "
            "Cells are the median over rounds with (min–max); everything ran on 127.0.0.1, "
            "wrk with one thread (`-t1`). Charts show the medians with min–max bars and leave "
            "ERR cells out. bench/README.md says how to read each table.\n",
            status + "\n",
            "## Machine\n",
            markdown_table(["", ""], [[k, v] for k, v in machine.items()]) + "\n",
            markdown_table(["program", "version"], [[k, v] for k, v in vers.items()]) + "\n",
            "## Systems\n",
            "Each system is started by the bench on its own port in front of the same backend "
            "(nginx: `worker_processes 1`, `access_log off`, `keepalive_requests` 10⁹, "
            "`sendfile on`; `/test1` 64 KiB of random bytes, `/test2` `Hello, world!`, "
            f"`/index.html` {len(index_html())} B). Peers run with their default thread or "
            "process counts on this machine's "
            f"{machine['nproc']} CPUs; the client, the proxy and the backend share them.\n",
            systems_table(s) + "\n",
            rep.headline()]
    for number in sorted(sections):
        if str(number) in b.results.runs:
            body.append(sections[number]())
    md = RESULTS / f"{base}.md"
    md.write_text("\n".join(body).rstrip() + "\n")
    raw = {"date": str(datetime.date.today()), "command": command,
           "elapsed_seconds": round(elapsed, 1), "machine": machine, "versions": vers,
           "settings": vars(s), "auth_header": AUTH_HEADER, "commands": b.results.commands,
           "runs": b.results.runs, "failures": failures, "charts": rep.charts}
    (RESULTS / f"{base}.json").write_text(json.dumps(raw, indent=1) + "\n")
    return md


# ─── main ────────────────────────────────────────────────────────────────────────────────

def main():
    parser = argparse.ArgumentParser(description="Benchmarks of ./proxy against peer proxies.")
    parser.add_argument("--quick", action="store_true",
                        help="one round, short runs, fewer points (CI smoke test, < 2 min)")
    parser.add_argument("--only", metavar="N,N", help="run only these scenarios (1-8)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs and logs of every system)")
    args = parser.parse_args()
    only = sorted(SCENARIOS)
    if args.only:
        try:
            only = sorted({int(n) for n in args.only.split(",")})
        except ValueError:
            parser.error("--only takes scenario numbers, e.g. --only 1,3")
        if not set(only) <= set(SCENARIOS):
            parser.error(f"scenarios are 1-{len(SCENARIOS)}")
    settings = Settings(args.quick)
    # A SIGTERM (a CI time limit, say) unwinds like an exception, so every finally runs and
    # no process is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    install_packages()
    fd_limit = raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="proxy-bench-"))
    work.chmod(0o755)       # the nginx workers run as nobody and must read the files
    base = f"{datetime.date.today()}-{socket.gethostname()}"
    if args.quick:
        base += "-quick"
    if args.only:
        base += "-partial"
    log(f"bench: {'quick' if args.quick else 'full'} mode, scenarios "
        f"{','.join(map(str, only))}, work in {work}, results as bench/results/{base}.*")
    backend = None
    try:
        GoProxy.binary = build(work)
        backend = Backend(work)
        backend.start()
        b = Bench(settings, work, backend, Results())
        for number in only:
            title, scenario = SCENARIOS[number]
            log(f"scenario {number}: {title}")
            scenario(b)
    finally:
        if backend:
            backend.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - STARTED
    md = write_report(b, base, args, fd_limit, elapsed)
    log(f"wrote {md.relative_to(ROOT)} and {md.with_suffix('.json').relative_to(ROOT)}")
    if b.results.failures:
        print(f"bench: {len(b.results.failures)} run(s) failed:", file=sys.stderr)
        for f in b.results.failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(3)  # 3: runs failed, report written; a crash of this script exits 1
    log(f"done in {elapsed / 60:.1f} min, all runs clean")


if __name__ == "__main__":
    main()
