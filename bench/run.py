#!/usr/bin/env python3
"""bench/run.py — side-by-side benchmarks of ./proxy against peer proxies, on loopback.

    python3 bench/run.py              # full: 3 rounds of every scenario, ~27 min on 2 cores
    python3 bench/run.py --quick      # smoke test: 1 round, short runs, fewer points, < 5 min
    python3 bench/run.py --only 1,3   # only the scenarios named (for development)
    python3 bench/run.py --keep       # keep the temporary directory: every config and log

Exit status: 0 when every run was clean; 3 when a run failed (its cells show ERR, and the
report is written all the same); 2 when packages are missing and this is not root; 1 when
the script itself failed.

This file is the entry point and the setup: it reads the arguments, installs missing Debian
packages (as root), builds ./proxy and the Go peer into a temporary directory, raises the
open-files limit, starts the backend, runs the chosen scenarios and writes the report.
bench/README.md says what each scenario measures, how to read the report, and which module
holds what. Python 3 standard library only.
"""

import argparse
import datetime
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import BENCH, ROOT, STARTED, Bench, Results, Settings, log, run
from report import write_report
from scenarios import SCENARIOS
from systems import Backend, GoProxy

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


def main():
    by_number = {s.NUMBER: s for s in SCENARIOS}
    parser = argparse.ArgumentParser(description="Benchmarks of ./proxy against peer proxies.")
    parser.add_argument("--quick", action="store_true",
                        help="one round, short runs, fewer points (CI smoke test, < 5 min)")
    parser.add_argument("--only", metavar="N,N",
                        help=f"run only these scenarios (1-{len(SCENARIOS)})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs and logs of every system)")
    args = parser.parse_args()
    only = sorted(by_number)
    if args.only:
        try:
            only = sorted({int(n) for n in args.only.split(",")})
        except ValueError:
            parser.error("--only takes scenario numbers, e.g. --only 1,3")
        if not set(only) <= set(by_number):
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
            scenario = by_number[number]
            log(f"scenario {number}: {scenario.TITLE}")
            scenario.run(b)
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
