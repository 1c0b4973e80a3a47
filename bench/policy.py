#!/usr/bin/env python3
"""bench/policy.py — what the per-client limits buy, and what the policy checks cost.

    python3 bench/policy.py [--rounds 3] [--seconds 3]

1. A neighbour over its rate. http mode, auth on; [limits] requests_per_second = RATE,
   request_burst = BURST, limit_by = user. bob (wrk -c50 from 127.0.0.2, an exempt network:
   no limit reached) runs alone, then beside alice (wrk -c50 from 127.0.0.1, as fast as wrk
   goes: many times RATE), through the same proxy, and once more beside alice through a
   proxy without limits. Per
   round and median: bob's req/s and p99, alice's answers (200s, and 429s: each holds its
   connection unread until Retry-After), and her timeouts and socket errors (none: a 429 is an
   answer). The goal: bob beside a limited alice within 25% of bob alone.
2. The cost of the checks on the request path. http mode, absolute-form GETs (the destination
   rules apply only to those) with auth, through a proxy without policy and one whose limits
   are set but never reached (connections_per_client, requests_per_second) and whose
   deny_destinations lists 10,000 names: 100 keep-alive connections (req/s), one connection
   (avg µs), a new connection per request (conn/s: the per-client count at accept and close).
   The two alternate within every round. The goal: a ratio within noise of 1.

wrk cannot choose its source address: bench/peers/bindsrc.c, preloaded, binds its sockets.
Exit status 3 when a run failed (as bench/run.py).
"""

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from common import AUTH_HEADER, BENCH, ROOT, log, markdown_table, run
from load import wrk
from run import install_packages, raise_fd_limit
from systems import Backend, Ours, running

RATE, BURST = 200, 20
BOB = "Basic Ym9iOmh1bnRlcjI="  # bob:hunter2


def shim(work):
    """Builds the source-address shim; returns wrk's environment for a client at an address."""
    so = work / "bindsrc.so"
    status, out = run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so),
                       str(BENCH / "peers" / "bindsrc.c"), "-ldl"], 120)
    if status != 0:
        sys.exit("policy: cannot build the shim:\n" + out)
    return lambda src: dict(os.environ, LD_PRELOAD=str(so), BIND_SRC=src)


def both(runs):
    """Runs each (name, thunk) at once on threads; returns {name: result}."""
    out = {}
    threads = [threading.Thread(target=lambda n=n, f=f: out.__setitem__(n, f())) for n, f in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def fmt(v, unit=""):
    return "ERR" if v is None else (f"{v:,.0f}{unit}" if v >= 100 else f"{v:.1f}{unit}")


def median(values):
    good = [v for v in values if v is not None]
    return statistics.median(good) if good and len(good) == len(values) else None


def neighbour(backend, work, env, rounds, seconds, failures):
    """Scenario 1: bob alone, bob beside a limited alice, bob beside an unlimited alice."""
    limits = (f"[limits]\nrequests_per_second = {RATE}\nrequest_burst = {BURST}\n"
              "limit_by = user\nexempt = 127.0.0.2\n"
              "[users]\nbob = hunter2\n")
    limited = Ours(work, backend.port, mode="http", workers=64, name="limited", extra=limits)
    open_ = Ours(work, backend.port, mode="http", workers=64, name="no limits",
                 extra="[users]\nbob = hunter2\n")
    bob_h = [f"Proxy-Authorization: {BOB}"]
    alice_h = [f"Proxy-Authorization: {AUTH_HEADER}"]
    rows = {k: [] for k in ("alone", "beside limited", "beside unlimited")}
    alice = {k: [] for k in ("beside limited", "beside unlimited")}
    with running([limited, open_], backend):
        for rnd in range(rounds):
            bob = lambda px: lambda: wrk(px.port, "/index.html", 50, seconds, headers=bob_h,
                                         env=env("127.0.0.2"))
            her = lambda px: lambda: wrk(px.port, "/index.html", 50, seconds, headers=alice_h,
                                         env=env("127.0.0.1"), expect_errors=True)
            rows["alone"].append(bob(limited)())
            for key, px in (("beside limited", limited), ("beside unlimited", open_)):
                r = both([("bob", bob(px)), ("alice", her(px))])
                rows[key].append(r["bob"])
                alice[key].append(r["alice"])
            for key, rs in rows.items():
                if rs[-1]["error"]:
                    failures.append(f"bob {key}: {rs[-1]['error']}")
            log(f"round {rnd + 1}/{rounds}: bob alone {fmt(rows['alone'][-1]['rps'])} req/s "
                f"(p99 {fmt(rows['alone'][-1]['p99_us'], ' µs')}); beside limited alice "
                f"{fmt(rows['beside limited'][-1]['rps'])} "
                f"(p99 {fmt(rows['beside limited'][-1]['p99_us'], ' µs')}) "
                f"(alice {alice['beside limited'][-1]['requests']} answers, "
                f"{alice['beside limited'][-1]['non2xx']} of them 429); beside unlimited "
                f"{fmt(rows['beside unlimited'][-1]['rps'])}")
    base = median([r["rps"] for r in rows["alone"]])
    table = []
    for key, rs in rows.items():
        rps, p99 = median([r["rps"] for r in rs]), median([r["p99_us"] for r in rs])
        a = alice.get(key)
        if a:
            ok = statistics.median((x["requests"] - x["non2xx"]) / seconds for x in a)
            refused = statistics.median(x["non2xx"] / seconds for x in a)
            stalls = max(x["timeout"] + x["connect"] + x["read"] + x["write"] for x in a)
            her_text = f"{fmt(ok)} 200/s, {fmt(refused)} 429/s, {stalls} timeouts or errors"
        else:
            her_text = "-"
        table.append([f"bob {key}", fmt(rps), fmt(p99, " µs"),
                      f"{rps / base:.2f}" if rps and base else "ERR", her_text])
    print(f"\n1. A neighbour over its rate: requests_per_second = {RATE}, request_burst = "
          f"{BURST}, limit_by = user; "
          f"wrk -t1 -c50 each, {rounds} rounds of {seconds} s, medians")
    print(markdown_table(["bob (exempt, -c50)", "req/s", "p99", "/ alone", "alice (-c50)"], table))


def cost(backend, work, rounds, seconds, failures):
    """Scenario 2: no policy against limits never reached and 10,000 denied names."""
    names = ",\n  ".join(f"host{i}.example.net" for i in range(10000))
    policy = (f"[limits]\nconnections_per_client = 100000\nrequests_per_second = 1000000000\n"
              f"clients = 100000\n[access]\ndeny_destinations = {names}\n")
    plain = Ours(work, backend.port, mode="http", workers=256, name="no policy")
    checked = Ours(work, backend.port, mode="http", workers=256, name="policy", extra=policy)
    script = work / "absolute.lua"
    script.write_text(f'wrk.path = "http://127.0.0.1:{backend.port}/index.html"\n')
    auth = f"Proxy-Authorization: {AUTH_HEADER}"
    loads = [
        ("absolute-form GETs, wrk -c100, req/s", "rps", True,
         lambda p: wrk(p, "/", 100, seconds, headers=[auth], script=script)),
        ("absolute-form GETs, 1 conn, avg µs", "avg_us", False,
         lambda p: wrk(p, "/", 1, seconds, headers=[auth], script=script)),
        ("a new connection per request, conn/s", "rps", True,
         lambda p: wrk(p, "/", 50, seconds, headers=[auth, "Connection: close"], script=script)),
    ]
    runs = {(label, s.name): [] for label, *_ in loads for s in (plain, checked)}
    with running([plain, checked], backend):
        for rnd in range(rounds):
            for label, key, _, drive in loads:
                order = [plain, checked] if rnd % 2 == 0 else [checked, plain]
                for s in order:
                    r = {"error": s.failed} if s.failed else drive(s.port)
                    if r["error"]:
                        failures.append(f"{label}, {s.name}: {r['error']}")
                    runs[(label, s.name)].append(None if r["error"] else r[key])
                    log(f"round {rnd + 1}/{rounds} {label}: {s.name} "
                        f"{fmt(runs[(label, s.name)][-1])}")
    rows = []
    for label, _, higher, _ in loads:
        b, a = median(runs[(label, "no policy")]), median(runs[(label, "policy")])
        spread = lambda name: (f" ({fmt(min(runs[(label, name)]))}–"
                               f"{fmt(max(runs[(label, name)]))})"
                               if None not in runs[(label, name)] else "")
        rows.append([label, fmt(b) + spread("no policy"), fmt(a) + spread("policy"),
                     f"{a / b:.3f} ({'higher' if higher else 'lower'} is better)" if a and b
                     else "ERR"])
    print(f"\n2. The cost of the checks: limits set but never reached, 10,000 denied names; "
          f"{rounds} rounds of {seconds} s, medians (min–max)")
    print(markdown_table(["load", "no policy", "policy", "policy / none"], rows))


def main():
    ap = argparse.ArgumentParser(description="Per-client limits and destination rules.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=3, help="each wrk run")
    ap.add_argument("--only", choices=["neighbour", "cost"], help="one scenario")
    args = ap.parse_args()
    status, out = run(["make"], 600, cwd=ROOT)
    if status != 0:
        sys.exit("policy: make failed:\n" + out[-2000:])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    install_packages()
    raise_fd_limit()
    work = Path(tempfile.mkdtemp(prefix="proxy-policy-"))
    work.chmod(0o755)  # the nginx workers run as nobody and must read the files
    failures = []
    backend = Backend(work)
    try:
        env = shim(work)
        backend.start()
        if args.only != "cost":
            neighbour(backend, work, env, args.rounds, args.seconds, failures)
        if args.only != "neighbour":
            cost(backend, work, args.rounds, args.seconds, failures)
    finally:
        backend.stop()
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print("policy: failed runs:\n  " + "\n  ".join(failures), file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
