"""bench/scenarios/memory.py — scenario 7, memory at many connections: echo connections held
through each proxy while its RSS, threads and the system's memory in use are sampled; its
run and its report section."""

import json
import statistics
import subprocess
import sys
import time

from common import (BENCH, cell, fmt_int, log, markdown_table, memory_in_use_kib,
                    proc_status, summary)
from systems import Direct, EchoServer, GoProxy, HAProxy, NginxStream, Ours, start_all

NUMBER = 7
TITLE = "memory at many connections"
HEADING = "Memory at many connections"
# A template: {conns}, {hold} and {rounds} come from the settings.
NOTE = ("{conns} connections through each proxy to an echo server (bench/echo.py, Python "
        "asyncio), each sending 800 random bytes on connect and then every 1–10 s "
        "(random) for {hold} s once all are connected, every "
        "echo checked byte for byte. Each system and the echo server are started fresh "
        "for their run ({rounds} round: a run takes up to half a minute). Ours "
        "runs `copy = buffer` with `workers = {conns}`, and the Go proxy `-copy buffer` "
        "(io.Copy through its 32 KiB buffer): with splice both hold a pipe, two fds, "
        "per direction for a connection's life, 6 fds a connection — 24000 at 4000 "
        "connections, past this machine's limit of 20000 (the plain Go proxy fails "
        "there with `too many open files`).\n"
        "\n"
        "- **peak RSS**: the sum of VmHWM over all the proxy's processes (nginx: master "
        "and workers); **idle RSS**: the sum of VmRSS just before the client started; "
        "**threads**: the most seen at once, all processes.\n"
        "- **in use**: system memory in use, MemTotal − MemAvailable, relative to just "
        "before the client started: at its **peak**, and the **median** over the hold "
        "period (every connection open), which a passing spike from another program "
        "does not move. Per-connection figures use the median. It includes the "
        "kernel's socket buffers and the Python client and echo server: the direct "
        "row is that baseline, so **over direct** is the proxy's own cost per "
        "connection.\n"
        "- **incl. start**: the peak counted from before the proxy started: for ours "
        "it includes every pre-made worker thread. **kernel stacks + page tables**: "
        "the growth of /proc/meminfo's KernelStack + PageTables over that same span — "
        "what threads cost the kernel, which no RSS shows.\n"
        "- System-wide figures move with anything else running on the machine (see "
        "the load averages above); RSS and thread counts do not.\n"
        "- A connection that fails to connect, an echo error or a single mismatched "
        "byte makes the row ERR.")


def run(b):
    s = b.settings
    n = s.memory_conns
    b.results.set_commands(NUMBER, [
        "python3 bench/echo.py server PORT",
        f"python3 bench/echo.py client PORT --conns {n} --hold {s.memory_hold}"])
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
            b.results.add(NUMBER, system.name, f"{n} conns", r)
            if r.get("error"):
                continue
            rss = f"peak RSS {r['rss_peak_kib'] / 1024:.1f} MB, " if r["rss_peak_kib"] else ""
            log(f"{NUMBER} round {rnd}/{s.rounds_memory}  {system.name}: {rss}"
                f"memory in use +{r['used_load_kib'] / 1024:.0f} MB, "
                f"{r['echoes']} echoes, {r['connect_seconds']}s to connect")


def memory_run(b, make_system, conns=None, hold=None, client_args=()):
    """One memory run: a fresh echo server and system, the echo client through it, and the
    proxy's RSS, threads and the system's memory in use sampled every 0.25 s. Memory in use
    is taken two ways: its peak, and its median over the hold period (every connection
    open), which a short spike from another program on a shared machine does not move.
    conns and hold default to scenario 7's settings (scenarios 10 and 13 pass their own, and
    13 more arguments for the client in client_args). A system with metrics (ours with
    stats on) also has the peaks of its parked connections, queue and busy workers sampled,
    and its accepted and refused connections, parks, wake-ups and turns counted."""
    s = b.settings
    conns = conns or s.memory_conns
    hold = hold or s.memory_hold
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
                "--conns", str(conns), "--hold", str(hold), *client_args]
        client_log = b.work / f"echo-client-{system.port}.log"
        metrics = getattr(system, "metrics_port", None)
        gauges = {"proxy_connections_parked": 0, "proxy_queue_length": 0,
                  "proxy_workers_busy": 0}
        counters = system.metrics() if metrics else {}
        with open(client_log, "w") as err:
            client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                      stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + conns / 100 + hold + 60
        peak_used, peak_kernel, peak_rss, peak_threads = used_before, kernel_before_start, 0, 0
        holding = []    # memory in use while every connection is open
        # The pool's gauges until just before the hold ends: when the client then closes
        # every connection at once, each parked one wakes (to see its end) and the queue's
        # peak would be that close storm rather than the load.
        gauges_until = deadline
        while client.poll() is None and time.monotonic() < deadline:
            if metrics and time.monotonic() < gauges_until:
                try:
                    values = system.metrics()
                except OSError:
                    values = {}
                for key in gauges:
                    gauges[key] = max(gauges[key], values.get(key, 0))
            statuses = [proc_status(p) for p in system.pids()]
            peak_rss = max(peak_rss, sum(st["VmRSS"] for st in statuses))
            peak_threads = max(peak_threads, sum(st["Threads"] for st in statuses))
            used, kernel = memory_in_use_kib()
            peak_used, peak_kernel = max(peak_used, used), max(peak_kernel, kernel)
            if "holding" in client_log.read_text():     # the client says all are connected
                if not holding:
                    gauges_until = time.monotonic() + hold - 0.5
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
        if metrics:
            after = system.metrics()
            run.update({"parked_peak": gauges["proxy_connections_parked"],
                        "queue_peak": gauges["proxy_queue_length"],
                        "busy_peak": gauges["proxy_workers_busy"]})
            for key in ("proxy_parks_total", "proxy_wakeups_total", "proxy_turns_total",
                        "proxy_connections_accepted_total"):
                run[key] = after.get(key, 0) - counters.get(key, 0)
            run["proxy_refused"] = sum(v - counters.get(k, 0) for k, v in after.items()
                                       if k.startswith("proxy_connections_refused_total"))
        run.update({
            "conns": conns,
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




def fmt_mb(kib):
    return f"{kib / 1024:.1f} MB"


def fmt_kib(kib):
    return f"{kib:.0f} KiB" if abs(kib) >= 10 else f"{kib:.1f} KiB"


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    n = s.memory_conns
    col = f"{n} conns"
    base = summary(r.get(NUMBER, "direct", col), "used_load_kib")
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, col)
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
        v = summary(r.get(NUMBER, x, col), "rss_peak_kib")
        peaks.append(tuple(k / 1024 for k in v) if v else None)
    note = NOTE.format(conns=n, hold=s.memory_hold, rounds=s.rounds_memory)
    chart = rep.chart("memory", f"{NUMBER}. peak RSS of the proxy at {n} connections",
                      "MB", proxies, [("peak RSS", peaks)])
    return rep.section(NUMBER, HEADING, note,
                       markdown_table(["system", "connected", "echoes checked", "peak RSS",
                                       "idle RSS", "threads", "in use, peak", "in use, median",
                                       "per conn", "per conn over direct", "incl. start",
                                       "kernel stacks + page tables"], table), chart)
