"""bench/scenarios/wakeups.py — scenario 15, wake-ups: the voluntary context switches of each
system's threads over a fixed window while it holds many quiet relays (one echo, then
silent) or many trickling ones (100 bytes every 100 ms down to a client that never sends):
ours with 64 workers, ours with a thread pair per connection, and the peers; its run and
its report section."""

import json
import re
import subprocess
import sys
import time

from common import (BENCH, cell, fmt_int, log, markdown_table, summary, switch_delta,
                    thread_switches)
from scenarios.cliff import wait_idle
from systems import EchoServer, GoProxy, HAProxy, NginxStream, Ours, TrickleServer, running

NUMBER = 15
TITLE = "wake-ups"
HEADING = "Wake-ups: context switches while holding quiet and trickling relays"
# A template: {conns}, {window} and {settle} come from the settings.
NOTE = ("How often each system's threads wake while it holds {conns} relays (`mode = tcp` "
        "for ours) that have nothing or little to do: the sum of `voluntary_ctxt_switches` "
        "over every thread of every process of the system (`/proc/PID/task/*/status`), "
        "read at the start and the end of a fixed {window} s window, {settle} s after the "
        "last relay opened (past `park_after`). A blocked thread that wakes to look at a "
        "clock shows up here. **Goal**: no thread wakes more often than once a second "
        "unless its bytes or a deadline arrive.\n"
        "\n"
        "- **quiet**: each relay to an echo server (`bench/echo.py client --quiet`, 100 "
        "connects at a time) makes one 800 B echo round trip, checked, then stays silent "
        "both ways. "
        "Nothing arrives, so every wake is the system's own. All five systems hold their "
        "relays at once, each with its own client, and one window is read for all of them "
        "(quiet relays load nothing, so they do not disturb each other).\n"
        "- **trickling**: each relay carries a download of 100 bytes every 100 ms "
        "(`bench/trickle.py`: the server spreads the connections over the 100 ms) to a "
        "client that never sends: 10 arrivals a second per relay, each of which must wake "
        "someone. The systems are measured one at a time; **per arrival** is the switches "
        "over the arrivals (relays × 10 × seconds), and **delivered** the bytes per second "
        "a client connection got over its whole hold (1000 B/s when the relay keeps up).\n"
        "\n"
        "Systems: ours with `workers = 64` (the default) and `park_after` at its default "
        "(quiet relays park; trickling ones take turns: quiet for 100 ms between arrivals, "
        "less than `park_after`), ours with a thread pair per connection (`park_after = "
        "0`, `workers` = {conns} + 50: every relay keeps its two threads, blocked), haproxy "
        "`mode tcp`, nginx stream and the Go proxy, each with its default threads. Every "
        "system is started fresh for each kind, one round. **threads waking** counts the "
        "threads that switched about once a second or more in the window (at least "
        "window − 0.5 times: a thread on a 1 s clock) and, after the slash, those that "
        "switched more than once a second (the goal: none without bytes); **busiest "
        "thread** is the highest rate of one thread. A thread on a 1 s clock is within the "
        "goal's letter, but it is a look at a clock all the same: with `park_after = 0` a "
        "blocked read still wakes every second (its `SO_RCVTIMEO` tick) to check its "
        "deadlines, two threads a relay. A relay that fails to open, or a trickling one "
        "that ends early, makes the row ERR.")

SETTLE = 1.0        # seconds from the last relay up to the window: past park_after (200 ms)
KINDS = ["quiet", "trickling"]


def systems(b, up, n):
    return [
        Ours(b.work, up, "splice", workers=64, stats=True, name="ours, workers=64"),
        Ours(b.work, up, "splice", workers=n + 50, stats=True, keys={"park_after": 0},
             name="ours, thread pair each"),
        HAProxy(b.work, up, "tcp"),
        NginxStream(b.work, up),
        GoProxy(b.work, up),
    ]


def run(b):
    s = b.settings
    n, window = s.wake_conns, s.wake_window
    b.results.set_commands(NUMBER, [
        "python3 bench/echo.py server PORT",
        f"python3 bench/echo.py client PORT --conns {n} --quiet --hold HOLD   (quiet: one "
        "per system, all at once)",
        "python3 bench/trickle.py server PORT",
        f"python3 bench/trickle.py client PORT --conns {n} --hold "
        f"{SETTLE + window + 0.5:g}   (trickling: one system at a time)",
        f"cat /proc/PID/task/*/status   ({SETTLE:g} s after the last relay is up, and "
        f"{window} s later)"])
    # Quiet relays: every system at once, one window.
    echo = EchoServer(b.work, None)
    try:
        echo.start()
        quiet = systems(b, echo.port, n)
        with running(quiet):
            for system, r in quiet_runs(b, quiet, n, window):
                record(b, system, "quiet", r, n, window)
    finally:
        echo.stop()
    # Trickling relays: one system at a time.
    trickle = TrickleServer(b.work, None)
    try:
        trickle.start()
        for system in systems(b, trickle.port, n):
            with running([system]):
                r = trickle_run(b, system, n, window)
            record(b, system, "trickling", r, n, window)
    finally:
        trickle.stop()


def record(b, system, kind, r, n, window):
    b.results.add(NUMBER, system.name, kind, r)
    if r.get("error"):
        return
    extra = (f", {r['per_arrival']:.2f} per arrival, delivered {r['delivered']:.0f} B/s "
             "per connection" if kind == "trickling" else "")
    parked = f", parked {r['parked']:.0f}" if r.get("parked") is not None else ""
    log(f"{NUMBER} {kind:9s} {system.name}: {r['per_s']:.0f} switches/s, "
        f"{r['per_conn_s']:.3f} per connection, busiest thread {r['busiest']:.1f}/s, "
        f"{r['threads_over']} of {r['threads']} threads over 1/s{extra}{parked}")


def start_client(b, system, argv, tag):
    """A holder client through the system: (process, its stderr log)."""
    path = b.work / f"wake-{tag}-{system.port}.log"
    with open(path, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                stdin=subprocess.DEVNULL)
    return proc, path


def wait_holding(clients, timeout):
    """Wait until every client says `holding` (all its relays up) or exits; returns the
    number each says connected (None for one that did not get there)."""
    deadline = time.monotonic() + timeout
    connected = [None] * len(clients)
    while time.monotonic() < deadline and None in connected:
        for i, (proc, path) in enumerate(clients):
            if connected[i] is None:
                text = path.read_text(errors="replace")
                if "holding" in text:
                    connected[i] = int(text.split(" connected")[0].split()[-1])
                elif proc.poll() is not None:
                    connected[i] = -1
        time.sleep(0.05)
    return [None if c == -1 else c for c in connected]


def window_counts(systems_, window):
    """Each system's switch deltas by thread over one window, read for all at once."""
    pids = [s.pids() for s in systems_]
    before = [thread_switches(p, ("voluntary",)) for p in pids]
    started = time.monotonic()
    time.sleep(window)
    after = [thread_switches(p, ("voluntary",)) for p in pids]
    took = time.monotonic() - started
    return [switch_delta(x, y) for x, y in zip(before, after)], took


def rates(delta, took, n):
    """The window's figures from one system's switch deltas by thread."""
    total = sum(delta.values())
    return {"switches": total, "seconds": round(took, 2), "per_s": total / took,
            "per_conn_s": total / took / n, "threads": len(delta),
            "busiest": max(delta.values(), default=0) / took,
            "threads_over": sum(1 for v in delta.values() if v / took > 1),
            "threads_each_s": sum(1 for v in delta.values() if v >= took - 0.5),
            "error": None}


def quiet_runs(b, quiet, n, window):
    """Open n quiet relays through every system at once, read one window for all. The
    clients are ended after it: a quiet relay has nothing more to check than its first
    echo, which the client's `holding` line counts."""
    up = [x for x in quiet if not x.failed]
    hold = SETTLE + window + 30     # longer than the window: they are ended after it
    clients = [start_client(b, x, [sys.executable, str(BENCH / "echo.py"), "client",
                                   str(x.port), "--conns", str(n), "--quiet", "--hold",
                                   str(hold)], "quiet") for x in up]
    try:
        connected = wait_holding(clients, 60 + n / 50)
        time.sleep(SETTLE)
        deltas, took = window_counts(up, window)
        results = {}
        for x, delta, c, (proc, path) in zip(up, deltas, connected, clients):
            r = rates(delta, took, n)
            r["parked"] = metric(x, "proxy_connections_parked")
            r["connected"] = c
            mismatched = re.search(r"(\d+) mismatched", path.read_text(errors="replace"))
            if c != n:
                r["error"] = (f"{n - (c or 0)} of {n} quiet relays did not open: "
                              + path.read_text(errors="replace")[-300:])
            elif mismatched and int(mismatched.group(1)):
                r["error"] = f"{mismatched.group(1)} first echoes mismatched"
            elif proc.poll() is not None:
                r["error"] = "the echo client ended before the window did"
            results[x.name] = r
    finally:
        for proc, _ in clients:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return [(x, results[x.name] if x in up else {"error": x.failed}) for x in quiet]


def trickle_run(b, system, n, window):
    """Open n trickling relays through the system, read one window, check the client."""
    if system.failed:
        return {"error": system.failed}
    hold = SETTLE + window + 0.5
    proc, path = start_client(b, system, [sys.executable, str(BENCH / "trickle.py"),
                                          "client", str(system.port), "--conns", str(n),
                                          "--hold", str(hold)], "trickle")
    try:
        connected = wait_holding([(proc, path)], 60 + n / 50)[0]
        if connected != n:
            return {"error": f"{n - (connected or 0)} of {n} trickling relays did not open: "
                    + path.read_text()[-300:]}
        time.sleep(SETTLE)
        deltas, took = window_counts([system], window)
        r = rates(deltas[0], took, n)
        r["parked"] = metric(system, "proxy_connections_parked")
        r["per_arrival"] = r["per_s"] / (n * 10)
        try:
            out, _ = proc.communicate(timeout=hold + 30)
            tally = json.loads(out.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            return dict(r, error="trickle client printed no result: " + path.read_text()[-300:])
        r["connected"] = tally["connected"]
        r["delivered"] = tally["bytes"] / n / (hold + tally["connect_seconds"])
        if tally["errors"] or tally["connect_errors"]:
            r["error"] = (f"{tally['errors']} relays ended early, {tally['connect_errors']} "
                          f"did not open (first: {tally['first_error']})")
        return r
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if getattr(system, "metrics_port", None):
            wait_idle(system)


def metric(system, key):
    """One of ours' /metrics values, None for a peer."""
    if not getattr(system, "metrics_port", None):
        return None
    return system.metrics().get(key)


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for kind in KINDS:
        for name in rows:
            runs = r.get(NUMBER, name, kind)
            if not runs:
                continue
            ours = name.startswith("ours")
            trickling = kind == "trickling"
            table.append([
                kind, name, cell(runs, "per_s", fmt_int),
                cell(runs, "per_conn_s", lambda v: f"{v:.3f}"),
                cell(runs, "per_arrival", lambda v: f"{v:.2f}") if trickling else "—",
                cell(runs, "busiest", lambda v: f"{v:.1f}"),
                cell(runs, "threads_each_s", fmt_int) + " / "
                + cell(runs, "threads_over", fmt_int) + " of " + cell(runs, "threads", fmt_int),
                cell(runs, "parked", fmt_int) if ours else "—",
                cell(runs, "delivered", fmt_int) if trickling else "—"])
    note = NOTE.format(conns=s.wake_conns, window=s.wake_window, settle=f"{SETTLE:g}")
    chart = rep.chart("wakeups", f"{NUMBER}. voluntary context switches per second while "
                      f"holding {s.wake_conns} quiet relays", "switches per second", rows,
                      [("quiet", [summary(r.get(NUMBER, x, "quiet"), "per_s") for x in rows])])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["relays", "system", "switches / s", "per relay / s", "per arrival",
         "busiest thread / s", "threads waking ≈ 1/s or more / > 1/s", "parked",
         "delivered B/s per relay"],
        table), chart)
