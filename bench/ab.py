#!/usr/bin/env python3
"""bench/ab.py — two builds of ./proxy side by side: the same loads through each, the builds
alternating within every round, so that a change is measured against the build before it in
the same minute on the same machine. For a change meant to be faster, or meant to change
nothing (a restructuring).

    python3 bench/ab.py BEFORE [AFTER]         # AFTER defaults to ./proxy (built with make)
    python3 bench/ab.py --rounds 5 --seconds 3 /tmp/old/proxy

Each round runs every load through BEFORE, then AFTER, then the next load (the order flips
every other round, so neither build always goes first). Loads, with wrk -t1 in front of the
bench's backend nginx (see bench/README.md): one connection sequential 13 B GETs (average
latency, scenario 1), 100 keep-alive connections (req/s, scenario 3), a new connection per
request (conn/s, scenario 4), and http mode with auth on every request (req/s, scenario 6;
one connection, avg µs; a new connection per request, conn/s). --only http runs just those.
Prints, per load, each build's median and min-max over the rounds and the ratio of the
medians, AFTER / BEFORE. Exit status 3 when a run failed (as bench/run.py), 1 on a crash.
"""

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from common import AUTH_HEADER, ROOT, log, markdown_table, run
from load import wrk
from run import install_packages, raise_fd_limit
from systems import Backend, Ours, running

# (label, mode, how to drive it, the number to compare, whether higher is better)
LOADS = [
    ("1 conn, 13 B GET, avg µs", "tcp", lambda p, s: wrk(p, "/test2", 1, s), "avg_us", False),
    ("wrk -c100, req/s", "tcp", lambda p, s: wrk(p, "/index.html", 100, s), "rps", True),
    ("new connection per request, conn/s", "tcp",
     lambda p, s: wrk(p, "/index.html", 50, s, headers=["Connection: close"]), "rps", True),
    ("http, auth on every request, req/s", "http",
     lambda p, s: wrk(p, "/index.html", 100, s, headers=[f"Proxy-Authorization: {AUTH_HEADER}"]),
     "rps", True),
    ("http, 1 conn, 13 B GET, avg µs", "http",
     lambda p, s: wrk(p, "/test2", 1, s, headers=[f"Proxy-Authorization: {AUTH_HEADER}"]),
     "avg_us", False),
    ("http, new connection per request, conn/s", "http",
     lambda p, s: wrk(p, "/index.html", 50, s,
                      headers=[f"Proxy-Authorization: {AUTH_HEADER}", "Connection: close"]),
     "rps", True),
]


def fmt(v):
    """A number as the table shows it: whole above 100, one decimal below; ERR for none."""
    if v is None:
        return "ERR"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def main():
    ap = argparse.ArgumentParser(description="Two builds of ./proxy, side by side.")
    ap.add_argument("before", help="the proxy binary to compare against")
    ap.add_argument("after", nargs="?", help="the proxy binary under test (default: ./proxy)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=2, help="each wrk run")
    ap.add_argument("--only", default="", help="run only the loads whose label contains this "
                    "(e.g. http)")
    args = ap.parse_args()
    LOADS[:] = [load for load in LOADS if args.only in load[0]]
    builds = {"before": Path(args.before).resolve()}
    if args.after:
        builds["after"] = Path(args.after).resolve()
    else:
        status, out = run(["make"], 600, cwd=ROOT)
        if status != 0:
            sys.exit("ab: make failed:\n" + out[-2000:])
        builds["after"] = ROOT / "proxy"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    install_packages()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="proxy-ab-"))
    work.chmod(0o755)  # the nginx workers run as nobody and must read the files
    runs = {(label, name): [] for label, *_ in LOADS for name in builds}
    failures = []
    backend = Backend(work)
    try:
        backend.start()
        systems = [Ours(work, backend.port, mode=mode, name=f"{name} {mode}", binary=path)
                   for name, path in builds.items() for mode in ("tcp", "http")]
        with running(systems, backend):
            for rnd in range(args.rounds):
                for label, mode, drive, key, _ in LOADS:
                    order = list(builds) if rnd % 2 == 0 else list(reversed(builds))
                    for name in order:
                        system = next(s for s in systems if s.name == f"{name} {mode}")
                        r = {"error": system.failed} if system.failed else drive(system.port,
                                                                                args.seconds)
                        if r["error"]:
                            failures.append(f"{label}, {name}: {r['error']}")
                        runs[(label, name)].append(None if r["error"] else r[key])
                        log(f"round {rnd + 1}/{args.rounds} {label}: {name} "
                            f"{fmt(runs[(label, name)][-1])}")
    finally:
        backend.stop()
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for label, _, _, _, higher in LOADS:
        cells, medians = [label], {}
        for name in builds:
            good = [v for v in runs[(label, name)] if v is not None]
            medians[name] = statistics.median(good) if len(good) == len(runs[(label, name)]) else None
            spread = f" ({fmt(min(good))}–{fmt(max(good))})" if medians[name] else ""
            cells.append(fmt(medians[name]) + spread)
        b, a = medians["before"], medians["after"]
        cells.append(f"{a / b:.3f} ({'higher' if higher else 'lower'} is better)" if a and b
                     else "ERR")
        rows.append(cells)
    print()
    print(f"{args.rounds} rounds of {args.seconds} s; before = {builds['before']}, "
          f"after = {builds['after']}")
    print(markdown_table(["load", "before: median (min–max)", "after", "after / before"], rows))
    if failures:
        print("ab: failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
