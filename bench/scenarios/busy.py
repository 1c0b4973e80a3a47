"""bench/scenarios/busy.py — scenario 11, busy keep-alive unchanged by the waiting room:
ours in tcp and http mode with park_after at its default and at 0, side by side in
interleaved rounds (wrk -c1, -c100, -c1000), and the system calls per request of each; its
run and its report section."""

import re
import signal
import subprocess
import threading
import time

from common import (AUTH_HEADER, cell, fmt_int, fmt_rps, fmt_us, log, markdown_table, ratio,
                    run as run_command, summary)
from load import progress, wrk
from systems import Ours, measure, running

NUMBER = 11
TITLE = "busy keep-alive, waiting room on and off"
HEADING = "Busy keep-alive: park_after default vs 0"
# A template: {seconds}, {rounds}, {settle}, {workers} and {sys_seconds} come from the
# settings.
NOTE = ("Whether the waiting room costs busy connections anything. Ours (`copy = splice`, "
        "`workers = {workers}`, `log = off`) in `mode = tcp` and in `mode = http` (with "
        "`Proxy-Authorization` on every request, as scenario 6), each with `park_after` at "
        "its default (200 ms) and with `park_after = 0` (never park: the old behaviour), "
        "all four running at once and measured one after another in each "
        "of {rounds} round(s), {seconds} s per wrk run, with a {settle} s pause before each "
        "system's three runs (the -c1000 run before leaves queued work behind): one "
        "connection (`/test2`, 13 B: average latency), `-c100` and `-c1000` keep-alive "
        "(`/index.html`: req/s and p99). "
        "**÷ park 0** is the default row's median over the park_after = 0 row's (req/s: "
        "higher is better; latency: lower is better).\n"
        "\n"
        "**System calls per request**: the proxy's system calls, all threads, during a "
        "fixed `wrk -t1 -c1 -d{sys_seconds}s` on `/test2`, divided by wrk's requests. "
        "First with `perf stat -e raw_syscalls:sys_enter -p PID -- sleep {sys_seconds}` "
        "started together with wrk (a kernel counter, nearly free), once a round: median "
        "(min–max); **idle** is the same "
        "counter over 1 s with no load just before (timers ticking in the background, "
        "included in the per-request figure). Then, in a second wrk run, with `strace -c "
        "-f -p PID` attached to every thread, for which calls they are (strace slows "
        "every call, so its requests are fewer and the background weighs more; the "
        "per-request split is what it is for).")

LOADS = [("c1", "/test2", 1), ("c100", "/index.html", 100), ("c1000", "/index.html", 1000)]


def systems(b):
    s = b.settings
    out = []
    for mode in ("tcp", "http"):
        for park in (None, 0):
            keys = {} if park is None else {"park_after": park}
            name = f"ours {mode}, park_after " + ("default" if park is None else "= 0")
            out.append(Ours(b.work, b.backend.port, "splice", mode=mode, workers=s.workers,
                            keys=keys, name=name))
    return out


def run(b):
    s = b.settings
    header = f" -H 'Proxy-Authorization: {AUTH_HEADER}'"
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{c} -d{s.busy_seconds}s --latency [{header.strip()}   (http)] "
        f"http://127.0.0.1:PORT{path}" for _, path, c in LOADS] + [
        "perf stat -e raw_syscalls:sys_enter -x, -p PID -- sleep 1   (idle)",
        f"perf stat -e raw_syscalls:sys_enter -x, -p PID -- sleep {s.syscall_seconds}   "
        f"together with   wrk -t1 -c1 -d{s.syscall_seconds}s http://127.0.0.1:PORT/test2",
        f"strace -c -f -p PID   during   wrk -t1 -c1 -d{s.syscall_seconds}s "
        "http://127.0.0.1:PORT/test2"])
    ours = systems(b)
    with running(ours, b.backend):
        for rnd in range(1, s.rounds + 1):
            order = ours if rnd % 2 else list(reversed(ours))   # neither always first
            for system in order:
                # The -c1000 run before leaves a second or so of queued work in the system
                # that ran it (its p99 is about that); without a pause, whichever -c1 run
                # comes next measures that instead of one connection's latency.
                time.sleep(s.busy_settle)
                for col, path, conns in LOADS:
                    r = measure(system, lambda: wrk(
                        system.port, path, conns, s.busy_seconds, headers=headers(system)))
                    b.results.add(NUMBER, system.name, col, r)
                    progress(NUMBER, rnd, s.rounds, f"{system.name} -c{conns}", r)
        # One perf window moved between 3.9 and 4.8 calls a request for the same build, so
        # perf (nearly free) runs once a round for each system and the table shows the
        # median; strace only says which calls, so once is enough.
        for tool in ["perf"] * s.rounds + ["strace"]:
            for system in ours:
                r = measure(system, lambda: count_syscalls(b, system, tool))
                b.results.add(NUMBER, system.name, tool, r)
                if r.get("error"):
                    continue
                top = "".join(f", {k} {v:.2f}" for k, v in r.get("top", [])[:5])
                idle = (f", idle {r['background_per_s']}/s" if "background_per_s" in r
                        else "")
                log(f"{NUMBER} {tool:6s} {system.name}: {r['per_request']:.2f} system calls "
                    f"per request ({r['calls']} over {r['requests']} requests{idle}){top}")


def headers(system):
    return [f"Proxy-Authorization: {AUTH_HEADER}"] if system.mode == "http" else []


def count_syscalls(b, system, tool):
    """System calls of the proxy (all threads) per request of a wrk -c1 run on /test2."""
    if tool == "perf":
        return perf_count(b, system)
    return strace_count(b, system)


def perf_window(b, system, seconds, tag):
    """perf stat's count of the proxy's system calls over `seconds`, or an error string."""
    out = b.work / f"perf-{system.port}-{tag}.txt"
    argv = ["perf", "stat", "-e", "raw_syscalls:sys_enter", "-x", ",", "-o", str(out),
            "-p", str(system.proc.pid), "--", "sleep", str(seconds)]
    status, text = run_command(argv, seconds + 60)
    calls, _ = parse_count("perf", out.read_text(errors="replace") if out.exists() else "")
    if status != 0 or calls is None:
        return f"perf exited with {status}: {text.strip()[-300:]}"
    return calls


def perf_count(b, system):
    """Background calls per second while idle (1 s), then the calls over a window of wrk's
    length started together with wrk -c1."""
    s = b.settings
    idle = perf_window(b, system, 1, "idle")
    if isinstance(idle, str):
        return {"error": idle}
    during = []
    t = threading.Thread(target=lambda: during.append(
        perf_window(b, system, s.syscall_seconds, "wrk")))
    t.start()
    r = wrk(system.port, "/test2", 1, s.syscall_seconds, headers=headers(system))
    t.join()
    if r.get("error"):
        return r
    if not during or isinstance(during[0], str):
        return {"error": during[0] if during else "perf gave no count"}
    return {"calls": during[0], "requests": r["requests"],
            "per_request": during[0] / r["requests"], "background_per_s": idle,
            "error": None}


def strace_count(b, system):
    """strace -c -f attached to every thread, wrk -c1, then SIGINT: calls by name."""
    s = b.settings
    out = b.work / f"strace-{system.port}.txt"
    err = b.work / f"strace-{system.port}.err"
    argv = ["strace", "-c", "-f", "-o", str(out), "-p", str(system.proc.pid)]
    with open(err, "w") as f:
        tracer = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f,
                                  stdin=subprocess.DEVNULL)
    try:
        # strace attaches to each thread in turn (two a worker) and says so on stderr for
        # each; wait until it is quiet.
        time.sleep(0.5)
        attached_wait(tracer, err)
        if tracer.poll() is not None:
            return {"error": f"strace exited with {tracer.returncode}: "
                    + err.read_text(errors="replace")[-300:]}
        r = wrk(system.port, "/test2", 1, s.syscall_seconds, headers=headers(system))
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    if r.get("error"):
        return r
    calls, top = parse_count("strace", out.read_text(errors="replace") if out.exists() else "")
    if calls is None:
        return {"error": f"strace: no count in its output: {err.read_text()[-300:]}"}
    requests = r["requests"]
    return {"calls": calls, "requests": requests, "per_request": calls / requests,
            "top": [(name, n / requests) for name, n in top], "error": None}


def attached_wait(tracer, err, quiet=0.5, limit=60):
    """Wait until strace's 'Process N attached' lines stop coming for `quiet` seconds."""
    deadline = time.monotonic() + limit
    size, last = -1, time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - last < quiet:
        if err.stat().st_size != size:
            size, last = err.stat().st_size, time.monotonic()
        if tracer.poll() is not None:
            return
        time.sleep(0.05)


def parse_count(tool, text):
    """(total calls, [(name, calls)] largest first) from perf -x or strace -c output."""
    if tool == "perf":
        for line in text.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and "raw_syscalls:sys_enter" in line and fields[0].isdigit():
                return int(fields[0]), []
        return None, []
    top, total = [], None
    for line in text.splitlines():
        # % time  seconds  usecs/call  calls  errors  syscall
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\S+)\s*$", line)
        if m and m.group(2) != "total":
            top.append((m.group(2), int(m.group(1))))
        elif m:
            total = int(m.group(1))
    top.sort(key=lambda x: -x[1])
    return total, top


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for name in rows:
        other = name.replace("default", "= 0") if "default" in name else None
        row = [name]
        for col, key, fmt in (("c1", "avg_us", fmt_us), ("c100", "rps", fmt_rps),
                              ("c100", "p99_us", fmt_us), ("c1000", "rps", fmt_rps),
                              ("c1000", "p99_us", fmt_us)):
            runs = r.get(NUMBER, name, col)
            row.append(cell(runs, key, fmt))
            row.append(ratio(runs, r.get(NUMBER, other, col), key) if other else "")
        for tool in ("perf", "strace"):
            row.append(cell(r.get(NUMBER, name, tool), "per_request", lambda v: f"{v:.2f}"))
        row.append(cell(r.get(NUMBER, name, "perf"), "background_per_s", fmt_int))
        top = [x for x in r.get(NUMBER, name, "strace") if not x.get("error")]
        row.append(", ".join(f"{k} {v:.2f}" for k, v in top[0]["top"][:6]) if top else "—")
        table.append(row)
    note = NOTE.format(seconds=s.busy_seconds, rounds=s.rounds, settle=s.busy_settle,
                       workers=s.workers, sys_seconds=s.syscall_seconds)
    chart = rep.chart("busy", f"{NUMBER}. keep-alive req/s, park after default vs 0",
                      "requests per second", rows,
                      [(f"-{c}", [summary(r.get(NUMBER, n, c), "rps") for n in rows])
                       for c in ("c100", "c1000")])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["system", "1 conn avg", "÷ park 0", "-c100 req/s", "÷ park 0", "-c100 p99",
         "÷ park 0", "-c1000 req/s", "÷ park 0", "-c1000 p99", "÷ park 0",
         "syscalls / request (perf)", "(strace)", "idle: syscalls / s",
         "strace: calls per request, top 6"],
        table), chart)
