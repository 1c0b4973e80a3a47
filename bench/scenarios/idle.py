"""bench/scenarios/idle.py — scenario 9, idle capacity: thousands of idle connections held
open (keep-alive clients between requests, or quiet CONNECT tunnels / TCP relays) while wrk
measures fresh connections beside them; ours with 64 workers and the waiting room, ours
with park_after = 0 (the old behaviour: it starves), and the peers; its run and its report
section."""

import json
import subprocess
import sys
import threading
import time

from common import (AUTH_HEADER, BENCH, cell, fmt_int, fmt_rps, fmt_us, log, markdown_table,
                    proc_status, ratio, summary)
from load import progress, wrk
from systems import GoProxy, HAProxy, NginxStream, Ours, running

NUMBER = 9
TITLE = "idle capacity"
HEADING = "Idle capacity (ours with workers = 64 and the waiting room)"
# A template: {conns}, {seconds}, {workers} and {maxconn} come from the settings.
NOTE = ("{conns} idle connections held open while `wrk -t1 -c50` runs {seconds} s on fresh "
        "connections (`/index.html`, with `Proxy-Authorization`), against the same wrk run "
        "on the same instance just before the idle connections were opened (**no idle**). "
        "Ours runs `mode = http`, `workers = {workers}`, `max_connections = {maxconn}`, "
        "`connect_ports` = the backend's port, `local_destinations = allow`, stats on; "
        "every system is started fresh for each half. The idle connections come from "
        "`bench/idle.py` (Python asyncio; several processes when one would hold too many "
        "fds), 200 exchanges in flight, 5 s per step:\n"
        "\n"
        "- **idle keep-alive**: each connection makes one keep-alive `GET /test2` through "
        "the proxy and then stays open, idle between requests (ours: parked in the waiting "
        "room with its upstream connection; haproxy `mode http`: idle client connections).\n"
        "- **idle tunnels**: each connection opens a `CONNECT 127.0.0.1:BACKEND` tunnel "
        "through ours, makes one `GET /test2` through it, then stays open with nothing "
        "moving either way. The peers have no CONNECT; for them the same idle holder "
        "opens a plain TCP relay to the backend (haproxy `mode tcp`, nginx stream, the Go "
        "proxy with `-copy buffer`: with splice it would hold 6 fds a connection), makes "
        "one GET through it and leaves it idle. A tunnel is two fds in the proxy, so "
        "{conns} tunnels are {fds} fds of the 20000 a process may have here.\n"
        "\n"
        "After wrk, **woken & checked**: every idle connection makes one more `GET /test2` "
        "(through its tunnel) and must get the right answer: the parked connections have "
        "to wake and work. **held** is how many of the {conns} opened; **RSS** the proxy's "
        "(all its processes) with them open. For ours, from /metrics: **parked** while "
        "they were idle, and the peaks of the queue and of busy workers during the wrk run "
        "(sampled every 0.2 s) with the connections refused. wrk does not count a "
        "request that never got an answer, so ours writes its access log to a file here "
        "(`log = PATH`): **wrk conns served** is how many of wrk's 50 connections had at "
        "least one request served during the run; fewer than 50 is an error (the log costs "
        "ours a `write(2)` per request that the peers, logging nothing, do not pay). "
        "**2xx req/s** "
        "leaves out non-2xx answers (ours answers `503` at once past `max_connections`).\n"
        "\n"
        "With `park_after = 0` an idle connection keeps its worker: the first {workers} "
        "hold all the workers, the next `queue` (1024) wait unanswered, the rest wait in "
        "the listen backlog and, once it is full, in their SYN retries, and so do wrk's "
        "fresh connections (wrk is stopped 5 s after its run should have ended; the holder "
        "waits 2 s for an answer, 1000 at once, and keeps the unanswered ones open as "
        "waiting clients would). Those rows show "
        "the starvation: their errors are expected and reported, not failures. For every "
        "other row a refused or unanswered idle connection, a failed check or any wrk "
        "error makes the cell ERR.")

WORKERS = 64
WRK_CONNS = 50


def systems(b):
    """(row name, half, maker, expect_errors) for every run, in run order."""
    s = b.settings
    n = s.idle_conns
    up = b.backend.port
    maxconn = n + 600       # wrk's 50, and room to spare; 2 fds each in ours and haproxy

    def ours(park_after):
        def make():
            keys = {"max_connections": maxconn}
            if park_after is not None:
                keys["park_after"] = park_after
            return Ours(b.work, up, "splice", mode="http", workers=WORKERS, stats=True,
                        access_log=True,
                        name="ours" if park_after is None else f"ours park_after={park_after}",
                        keys=keys, access={"connect_ports": up,
                                           "local_destinations": "allow"})
        return make

    return [
        ("ours, park_after default", "keep-alive", ours(None), False),
        ("ours, park_after = 0", "keep-alive", ours(0), True),
        ("haproxy http", "keep-alive", lambda: HAProxy(b.work, up, "http", maxconn), False),
        ("ours, park_after default", "tunnels", ours(None), False),
        ("ours, park_after = 0", "tunnels", ours(0), True),
        ("haproxy tcp", "tunnels", lambda: HAProxy(b.work, up, "tcp", maxconn), False),
        ("nginx stream", "tunnels",
         lambda: NginxStream(b.work, up, worker_connections=2 * maxconn + 100), False),
        ("Go io.Copy, buffer", "tunnels", lambda: GoProxy(b.work, up, "buffer"), False),
    ]


def run(b):
    s = b.settings
    n = s.idle_conns
    procs = holder_processes(n)
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c50 -d{s.idle_seconds}s --latency -H 'Proxy-Authorization: {AUTH_HEADER}' "
        "http://127.0.0.1:PORT/index.html   (before and with the idle connections)",
        f"python3 bench/idle.py PORT --conns {n // procs} --mode http --auth '{AUTH_HEADER}' "
        f"   ({procs} process(es); ours, haproxy http)",
        f"python3 bench/idle.py PORT --conns {n // procs} --mode connect "
        f"--target 127.0.0.1:BACKEND --auth '{AUTH_HEADER}'   (ours)",
        f"python3 bench/idle.py PORT --conns {n // procs} --mode tcp   (haproxy tcp, nginx "
        "stream, Go)",
        "then `check` on the holders' stdin (one more GET on each), then `close`",
        "curl http://127.0.0.1:METRICS/metrics   (ours: before, during and after wrk)"])
    for name, half, make, starves in systems(b):
        system = make()
        row = f"{name}, idle {half}"
        with running([system], b.backend):
            if system.failed:
                for col in ("no idle", "idle"):
                    b.results.add(NUMBER, row, col, {"error": system.failed})
                continue
            base = drive(system, s.idle_seconds, False)
            b.results.add(NUMBER, row, "no idle", base)
            progress(NUMBER, 1, 1, f"{row}, no idle", base)
            r = idle_run(b, system, half, n, procs, starves)
            b.results.add(NUMBER, row, "idle", r)
            progress(NUMBER, 1, 1, f"{row}, {r.get('held', 0)} idle", r)
            log(f"  held {r.get('held')}, refused {r.get('idle_refused')}, unanswered "
                f"{r.get('idle_timed_out')}, woken & checked {r.get('checked')} "
                f"({r.get('check_errors')} errors), parked {r.get('parked')}, RSS "
                f"{(r.get('rss_kib') or 0) / 1024:.0f} MB, open {r.get('open_seconds')} s")


def holder_processes(n):
    """Idle holders to start: each holds at most 5000 connections (one fd each)."""
    return max(1, -(-n // 5000))


def drive(system, seconds, expect_errors):
    """wrk -c50 through the system. For ours, also how many of wrk's 50 connections got an
    answer, from the access log (wrk does not count a request that never got one)."""
    offset = system.log_size() if getattr(system, "access_log", None) else None
    until = time.time() + seconds      # when wrk stops; what the log shows later is not its
    r = wrk(system.port, "/index.html", WRK_CONNS, seconds,
            headers=[f"Proxy-Authorization: {AUTH_HEADER}"], expect_errors=expect_errors,
            wall=seconds + 5 if expect_errors else None)
    # Requests answered 2xx per second: a refusal (ours: 503 past max_connections) must not
    # count as throughput.
    r["ok_rps"] = (r["rps"] or 0) * (r["requests"] - r["non2xx"]) / max(1, r["requests"])
    if offset is not None:
        r["answered_conns"] = len(system.requests_by_client(offset, until))
        if r["answered_conns"] < WRK_CONNS:
            problem = (f"{WRK_CONNS - r['answered_conns']} of wrk's {WRK_CONNS} connections "
                       "had no request served")
            key = "expected_errors" if expect_errors else "error"
            r[key] = ", ".join(filter(None, [r.get(key), problem]))
    return r


def idle_run(b, system, half, n, procs, starves):
    """Open n idle connections through `system`, run wrk beside them, wake each once."""
    s = b.settings
    mode = {"keep-alive": "http", "tunnels": "tcp"}[half]
    if half == "tunnels" and isinstance(system, Ours):
        mode = "connect"
    holders = []
    try:
        for i in range(procs):
            share = n // procs + (1 if i < n % procs else 0)
            argv = [sys.executable, str(BENCH / "idle.py"), str(system.port),
                    "--conns", str(share), "--mode", mode,
                    "--target", f"127.0.0.1:{b.backend.port}", "--auth", AUTH_HEADER]
            if starves:     # most wait unanswered: do not wait 5 s for each 200 of them
                argv += ["--in-flight", "1000", "--timeout", "2"]
            holders.append(subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=open(b.work / f"idle-{system.port}-{i}.log", "w"), text=True))
        opened = [read_json(h, 60 + n / 200) for h in holders]
        if any(o is None for o in opened):
            return {"error": "idle holder printed no result: "
                    + (b.work / f"idle-{system.port}-0.log").read_text()[-300:]}
        r = {"held": sum(o["opened"] for o in opened),
             "idle_refused": sum(o["refused"] for o in opened),
             "idle_timed_out": sum(o["timed_out"] for o in opened),
             "idle_failed": sum(o["failed"] for o in opened),
             "open_seconds": max(o["open_seconds"] for o in opened),
             "first_idle_error": next((o["first_error"] for o in opened if o["first_error"]),
                                      None)}
        time.sleep(0.5)     # past park_after: the last ones park
        metrics = getattr(system, "metrics_port", None)
        before = system.metrics() if metrics else {}
        r["parked"] = before.get("proxy_connections_parked")
        r["rss_kib"] = sum(proc_status(p)["VmRSS"] for p in system.pids())
        peaks = {"proxy_queue_length": 0, "proxy_workers_busy": 0}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_gauges, args=(system, peaks, stop))
        if metrics:
            sampler.start()
        r.update(drive(system, s.idle_seconds, True))
        stop.set()
        if metrics:
            sampler.join()
            after = system.metrics()
            r["queue_peak"] = int(peaks["proxy_queue_length"])
            r["busy_peak"] = int(peaks["proxy_workers_busy"])
            r["refused"] = int(sum(v - before.get(k, 0) for k, v in after.items()
                                   if k.startswith("proxy_connections_refused_total")))
        checks = []
        for h in holders:
            h.stdin.write("check\n")
            h.stdin.flush()
        for h in holders:
            checks.append(read_json(h, 30 + n / 200))
        if any(c is None for c in checks):
            r["checked"], r["check_errors"] = None, None
            r["first_check_error"] = "an idle holder printed no check result"
        else:
            r["checked"] = sum(c["checked"] for c in checks)
            r["check_errors"] = sum(c["check_errors"] for c in checks)
            r["first_check_error"] = next((c["first_error"] for c in checks
                                           if c["first_error"]), None)
        problems = []
        if r["held"] < n:
            problems.append(f"{n - r['held']} of {n} idle connections did not open "
                            f"(refused {r['idle_refused']}, unanswered {r['idle_timed_out']}, "
                            f"wrong {r['idle_failed']}; first: {r['first_idle_error']})")
        if r["check_errors"] or r["checked"] is None:
            problems.append(f"{r['check_errors']} idle connections failed their check "
                            f"(first: {r['first_check_error']})")
        if r.get("expected_errors"):
            problems.append(f"wrk: {r['expected_errors']}")
        if problems and not starves:
            r["error"] = "; ".join(problems)
        elif problems:
            r["expected_errors"] = "; ".join(problems)
        return r
    finally:
        for h in holders:
            try:
                h.stdin.write("close\n")
                h.stdin.close()
            except OSError:
                pass
        for h in holders:
            try:
                h.wait(timeout=30)
            except subprocess.TimeoutExpired:
                h.kill()
                h.wait()


def read_json(proc, timeout):
    """The next JSON line a holder prints, or None (it died or took longer than timeout)."""
    result = [None]

    def reader():
        line = proc.stdout.readline()
        try:
            result[0] = json.loads(line)
        except ValueError:
            pass

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def sample_gauges(system, peaks, stop):
    """Keep the highest value of each gauge in `peaks` until `stop` is set."""
    while not stop.wait(0.2):
        try:
            values = system.metrics()
        except OSError:
            continue
        for key in peaks:
            peaks[key] = max(peaks[key], values.get(key, 0))


def chart_label(row):
    """A short two-line label for the chart: 'ours-park0 tunnels' for 'ours, park_after =
    0, idle tunnels' (the chart splits a label at its first space)."""
    name, _, half = row.rpartition(", idle ")
    short = {"ours, park_after default": "ours", "ours, park_after = 0": "ours-park0",
             "Go io.Copy, buffer": "Go-buffer"}.get(name, name.replace(" ", "-"))
    return f"{short} {half}"


def fmt_mb(kib):
    return f"{kib / 1024:.0f} MB"


def maybe(runs, key, fmt):
    """cell(), but — instead of ERR or 0 where a clean run has no value (no request was
    answered)."""
    if runs and not any(x.get("error") for x in runs) and all(
            x.get(key) is None or not x.get("requests") for x in runs):
        return "—"
    return cell(runs, key, fmt)


def errors_cell(runs):
    """wrk's socket errors and timeouts in one number, for rows that may have them."""
    if not runs:
        return "—"
    if any(x.get("error") for x in runs):
        return "ERR"
    return f"{sum(x.get(k, 0) for x in runs for k in ('connect', 'read', 'write', 'timeout')):.0f}"


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for name in rows:
        base, idle = r.get(NUMBER, name, "no idle"), r.get(NUMBER, name, "idle")
        starves = "park_after = 0" in name
        shown = idle
        table.append([
            name + (" — starves, expected" if starves else ""),
            cell(shown, "held", fmt_int),
            cell(base, "ok_rps", fmt_rps), cell(shown, "ok_rps", fmt_rps),
            ratio(shown, base, "ok_rps"),
            cell(base, "p99_us", fmt_us), maybe(shown, "p99_us", fmt_us),
            errors_cell(shown), cell(shown, "non2xx", fmt_int),
            maybe(shown, "answered_conns", fmt_int) if "ours" in name else "—",
            cell(shown, "checked", fmt_int),
            cell(shown, "rss_kib", fmt_mb),
            cell(shown, "parked", fmt_int) if "ours" in name else "—",
            cell(shown, "queue_peak", fmt_int) if "ours" in name else "—",
            cell(shown, "busy_peak", fmt_int) if "ours" in name else "—",
            cell(shown, "refused", fmt_int) if "ours" in name else "—"])
    note = NOTE.format(conns=s.idle_conns, seconds=s.idle_seconds, workers=WORKERS,
                       maxconn=s.idle_conns + 600, fds=2 * s.idle_conns)
    chart = rep.chart("idle", f"{NUMBER}. wrk -c50 2xx req/s on fresh connections, without "
                      f"and with {s.idle_conns} idle (ours-park0: park after = 0)",
                      "requests per second",
                      [chart_label(x) for x in rows],
                      [("no idle", [summary(r.get(NUMBER, x, "no idle"), "ok_rps") for x in rows]),
                       (f"{s.idle_conns} idle", [summary(r.get(NUMBER, x, "idle"), "ok_rps")
                                                 for x in rows])])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["system, idle kind", "idle held", "2xx req/s no idle", "2xx req/s with idle", "× no idle",
         "p99 no idle", "p99 with idle", "wrk socket errors + timeouts", "non-2xx",
         "wrk conns served",
         "idle woken & checked", "RSS with idle", "parked", "queue peak",
         "busy workers peak", "refused"], table), chart)
