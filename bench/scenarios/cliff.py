"""bench/scenarios/cliff.py — scenario 8, many busy connections: wrk -c1000 and -c2000 keep-
alive, in tcp and http mode, through ours with the default pool of 64 workers (connections
take turns) against ours with a thread pair per connection (the shape that falls off the
concurrency cliff) and the peers, with fairness from our access log and the CPU time and
context switches per request of every system; its run and its report section. Also
wait_idle and sample_gauges, which the other scenarios of ours use."""

import socket
import statistics
import time

from common import (AUTH_HEADER, cell, cpu_seconds, fmt_int, fmt_rps, fmt_us, log,
                    markdown_table, summary, switch_delta, thread_switches)
from load import progress, wrk
from systems import GoProxy, HAProxy, NginxStream, Ours, measure, running

NUMBER = 8
TITLE = "many busy connections"
HEADING = "Many busy connections (64 workers taking turns vs a thread pair per connection)"
# A template: {points}, {seconds} and {rounds} come from the settings.
NOTE = ("`wrk -t1 -cN -d{seconds}s --latency` keep-alive on `/index.html`, N = {points}, "
        "in `mode = tcp` and in `mode = http` (with `Proxy-Authorization`, as scenario 6), "
        "through ours with `workers = 64` (the default pool: 64 connections served at once, "
        "the rest take turns: one that has had its worker for `time_slice`, 50 ms, while "
        "others wait gives it up at its next safe point and queues again), ours with a "
        "thread pair per connection (`park_after = 0`, `workers` = N + 100: no turns, no "
        "parking, the old shape), and the peers: haproxy `mode tcp`, nginx stream and the "
        "Go proxy for tcp, haproxy `mode http` for http. Ours runs `copy = splice` at "
        "-c1000 and `copy = buffer` at -c2000 in both rows (2100 thread pairs with splice's "
        "pipes would hold 6 fds a worker; like for like, the 64-worker row does the same), "
        "stats on, and logs to a file (`log = PATH`), which costs each request or "
        "connection a `write(2)` that the peers, logging nothing, do not pay. All of a "
        "load's systems run at once and are measured one after another in each of "
        "{rounds} round(s), the order reversed every other round.\n"
        "\n"
        "- **× thread pair**: the 64-worker row's req/s over the thread-pair row's in the "
        "same round, median (min–max) over the rounds. **Goal: ≥ 1.3.**\n"
        "- **fairness**, from our access log: how evenly wrk's connections were served. "
        "tcp: the bytes each client connection got (one line per connection, written at "
        "its close: read once the proxy has no connection left after wrk; the connection "
        "wrk opens to check the address, which sends nothing, is left out); http: the "
        "requests answered on each client connection, from the lines stamped before wrk's "
        "end (as scenario 12). A connection with no line counts 0. **p10 / mean**: the "
        "10th percentile over the mean (1 is perfectly even; **goal: ≥ 0.3** for the "
        "64-worker row); **min / median**: KB down (tcp) or requests (http) per "
        "connection.\n"
        "- wrk does not count a request that never got an answer, so a connection that got "
        "none is only seen in the log: in tcp mode one with no more than one response's "
        "worth of bytes (one may go out after wrk stopped: the proxy serves what wrk left "
        "behind, to no one). In the 64-worker row that, or any wrk socket error or timeout "
        "(wrk's default 2 s), makes the cell ERR (**unanswered connections** still shows "
        "its count). The thread-pair rows ({points} × 2 threads on 2 cores) may time out "
        "and leave connections unanswered for the whole run: reported, not failures.\n"
        "- **CPU / request**: the system's user + system CPU time (`/proc/PID/stat`, all "
        "its processes) from just before wrk to just after, over wrk's requests, in µs. "
        "**switches / request**: voluntary + involuntary context switches of all its "
        "threads (`/proc/PID/task/*/status`) over the same span.\n"
        "- **turns** and **parks** during the run, from ours' `/metrics` "
        "(`proxy_turns_total`, `proxy_parks_total`).")

POOL = 64           # workers: the default pool


def loads(s):
    """(mode, connections) of every load, in run and table order."""
    return [(mode, n) for mode in ("tcp", "http") for n in s.cliff_points]


def column(mode, n):
    return f"{mode} c{n}"


def copy_for(n):
    """Ours' copy at n connections: a thread pair each with splice's pipes would hold 6 fds
    a worker, past the 20000-fd limit at 2000."""
    return "splice" if n <= 1000 else "buffer"


def ours_names(n):
    """(the 64-worker row, the thread-pair row) at n connections."""
    copy = copy_for(n)
    return f"ours {copy}, workers=64", f"ours {copy}, thread pair each"


def systems(b, mode, n):
    """(system, expect_errors) for one load, in row order."""
    up = b.backend.port
    copy = copy_for(n)
    pool, pairs = ours_names(n)
    out = [(Ours(b.work, up, copy, mode=mode, workers=POOL, stats=True, access_log=True,
                 name=pool), False),
           (Ours(b.work, up, copy, mode=mode, workers=n + 100, stats=True, access_log=True,
                 keys={"park_after": 0}, name=pairs), True)]
    if mode == "tcp":
        peers = [HAProxy(b.work, up, "tcp"), NginxStream(b.work, up), GoProxy(b.work, up)]
    else:
        peers = [HAProxy(b.work, up, "http")]
    return out + [(p, False) for p in peers]


def run(b):
    s = b.settings
    header = f"-H 'Proxy-Authorization: {AUTH_HEADER}' "
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{{{','.join(str(n) for n in s.cliff_points)}}} -d{s.cliff_seconds}s "
        f"--latency [{header}  (http)] http://127.0.0.1:PORT/index.html",
        "cat /proc/PID/stat /proc/PID/task/*/status   (every process of the system: "
        "before and after wrk)",
        "curl http://127.0.0.1:METRICS/metrics   (ours: before and after wrk)"])
    size = response_size(b.backend.port)
    for mode, n in loads(s):
        rows = systems(b, mode, n)
        with running([x for x, _ in rows], b.backend):
            for rnd in range(1, s.rounds + 1):
                order = rows if rnd % 2 else list(reversed(rows))
                for system, expect in order:
                    r = measure(system, lambda: one_run(b, system, mode, n, expect, size))
                    b.results.add(NUMBER, system.name, column(mode, n), r)
                    progress(NUMBER, rnd, s.rounds, f"{mode} -c{n} {system.name}", r)
                    if r.get("requests"):
                        fair = (f"fairness p10/mean {r['fair_ratio']:.2f}, "
                                if "fair_ratio" in r else "")
                        log(f"  {fair}{r['cpu_us']:.1f} µs CPU and {r['switches']:.2f} "
                            "switches per request"
                            + (f", {r['turns']} turns, {r['parks']} parks, queue wait "
                               f"{r['queue_wait_ms']:.1f} ms mean" if "turns" in r else ""))


def response_size(port):
    """Bytes of one /index.html response, head and body, straight from the backend: tcp
    fairness counts bytes, and a response's worth tells an answered connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            more = c.recv(65536)
            if not more:
                raise RuntimeError("the backend closed before its response head")
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return len(head) + 4 + length


def one_run(b, system, mode, n, expect_errors, size):
    s = b.settings
    ours = getattr(system, "access_log", None) is not None    # ours, logging to a file
    if ours:
        wait_idle(system)
        before = system.metrics()
        offset = system.log_size()
    pids = system.pids()
    cpu, switches = cpu_seconds(pids), thread_switches(pids)
    until = time.time() + s.cliff_seconds      # when wrk stops (see scenario 12)
    headers = [f"Proxy-Authorization: {AUTH_HEADER}"] if mode == "http" else []
    r = wrk(system.port, "/index.html", n, s.cliff_seconds, headers=headers,
            expect_errors=expect_errors)
    cpu = cpu_seconds(pids) - cpu
    switches = sum(switch_delta(switches, thread_switches(pids)).values())
    requests = max(1, r["requests"])
    r["cpu_us"] = cpu * 1e6 / requests
    r["switches"] = switches / requests
    if not ours:
        return r
    after = system.metrics()
    for key, metric in (("turns", "proxy_turns_total"), ("parks", "proxy_parks_total")):
        r[key] = int(after.get(metric, 0) - before.get(metric, 0))
    waits = after.get("proxy_queue_wait_seconds_count", 0) - before.get(
        "proxy_queue_wait_seconds_count", 0)
    wait_sum = after.get("proxy_queue_wait_seconds_sum", 0) - before.get(
        "proxy_queue_wait_seconds_sum", 0)
    r["queue_wait_ms"] = wait_sum * 1e3 / waits if waits else 0.0
    if mode == "tcp":
        wait_idle(system)       # each connection's line is written at its close
        time.sleep(0.3)
        per_conn = list(system.bytes_by_client(offset).values())
        answered = sum(1 for v in per_conn if v > size)
    else:
        per_conn = list(system.requests_by_client(offset, until).values())
        answered = len(per_conn)
    per_conn += [0] * max(0, n - len(per_conn))
    r.update(fairness(per_conn))
    r["unanswered"] = max(0, n - answered)
    if r["unanswered"]:
        problem = f"{r['unanswered']} of wrk's {n} connections got no answer"
        key = "expected_errors" if expect_errors else "error"
        r[key] = ", ".join(filter(None, [r.get(key), problem]))
    return r


def fairness(values):
    """How evenly the connections were served: the 10th percentile (nearest rank), mean,
    min and median of their shares, and p10 / mean."""
    values = sorted(values)
    mean = statistics.mean(values)
    p10 = values[max(0, -(-len(values) // 10) - 1)]
    return {"fair_p10": p10, "fair_mean": mean, "fair_ratio": p10 / mean if mean else 0.0,
            "fair_min": values[0], "fair_median": statistics.median(values)}


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


def round_ratios(runs, base_runs):
    """(median, min, max) of runs[i]['rps'] / base_runs[i]['rps'] over the rounds (the i-th
    run of each row or column is round i), or None when a run of the first failed."""
    if not runs or any(x.get("error") for x in runs):
        return None
    values = [(a.get("rps") or 0) / b["rps"] for a, b in zip(runs, base_runs)
              if b.get("rps") and not b.get("error")]
    return (statistics.median(values), min(values), max(values)) if values else None


def fmt_ratio(v):
    return f"{v:.2f}"


def fmt_share(mode):
    """min / median of a share: KB of bytes down (tcp) or requests (http)."""
    return (lambda v: f"{v / 1000:.1f}") if mode == "tcp" else fmt_int


def errors_cell(runs):
    """wrk's socket errors (connect, read, write) and timeouts, most in a round: counts that
    say what failed, so shown for failed runs too; ERR when a run has none (it did not
    run)."""
    if not runs:
        return "—"
    if any("timeout" not in x for x in runs):
        return "ERR"
    return " + ".join(
        f"{max(sum(x.get(k, 0) for k in kinds) for x in runs):.0f}"
        for kinds in (("connect", "read", "write"), ("timeout",)))


def triple(t, fmt):
    """'median (min–max)' of a (median, min, max), or ERR."""
    if t is None:
        return "ERR"
    median, low, high = t
    return fmt(median) if fmt(low) == fmt(high) else f"{fmt(median)} ({fmt(low)}–{fmt(high)})"


def report(rep):
    r, s = rep.results, rep.settings
    table, goals, labels, series = [], [], [], {}
    for mode, n in loads(s):
        col = column(mode, n)
        pool, pairs = ours_names(n)
        names = [x for x in [pool, pairs] + rep.rows(NUMBER) if r.get(NUMBER, x, col)]
        names = list(dict.fromkeys(names))     # ours first, then the peers as they ran
        if not names:
            continue
        labels.append(f"{mode} -c{n}")
        for name in names:
            runs = r.get(NUMBER, name, col)
            ours = name.startswith("ours")
            vs = round_ratios(runs, r.get(NUMBER, pairs, col)) if name == pool else None
            table.append([
                f"{mode} -c{n}", name + (" — may time out, expected" if name == pairs else ""),
                cell(runs, "rps", fmt_rps), triple(vs, fmt_ratio) if name == pool else "",
                cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us),
                errors_cell(runs),
                cell(counted(runs), "unanswered", fmt_int) if ours else "—",
                cell(runs, "fair_ratio", fmt_ratio) if ours else "—",
                " / ".join(cell(runs, k, fmt_share(mode)) for k in ("fair_min", "fair_median"))
                if ours else "—",
                cell(runs, "cpu_us", lambda v: f"{v:.1f}"),
                cell(runs, "switches", fmt_ratio),
                cell(runs, "turns", fmt_int) if ours else "—",
                cell(runs, "parks", fmt_int) if ours else "—"])
            kind = ("ours, 64 workers" if name == pool else "ours, thread pair each"
                    if name == pairs else "haproxy (tcp / http)" if name.startswith("haproxy")
                    else name)
            series.setdefault(kind, {})[labels[-1]] = summary(runs, "rps")
        pool_runs = r.get(NUMBER, pool, col)
        vs = round_ratios(pool_runs, r.get(NUMBER, pairs, col))
        fair = summary(pool_runs, "fair_ratio")
        goals.append([f"{mode} -c{n}", triple(vs, fmt_ratio) + why_err(pool_runs),
                      met(vs, 1.3), triple(fair, fmt_ratio) + why_err(pool_runs),
                      met(fair, 0.3)])
    note = NOTE.format(points=" and ".join(str(n) for n in s.cliff_points),
                       seconds=s.cliff_seconds, rounds=s.rounds)
    chart = rep.chart("cliff", f"{NUMBER}. wrk keep-alive req/s with many busy connections",
                      "requests per second", labels,
                      [(kind, [by_load.get(x) for x in labels])
                       for kind, by_load in series.items()])
    goal_table = ("\n**The goals** (the 64-worker row): req/s ≥ 1.3 × a thread pair per "
                  "connection in the same round, fairness p10 / mean ≥ 0.3.\n\n"
                  + markdown_table(["load", "64 workers ÷ thread pair, req/s", "≥ 1.3?",
                                    "fairness p10 / mean", "≥ 0.3?"], goals) + "\n")
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["load", "system", "req/s", "× thread pair", "p50", "p99",
         "wrk socket errors + timeouts (max)", "unanswered connections",
         "fairness p10 / mean",
         "min / median per connection (tcp: KB, http: requests)", "CPU µs / request",
         "switches / request", "turns", "parks"], table) + "\n" + goal_table, chart)


def counted(runs):
    """The runs with their error cleared, for a count that says what failed (ERR when a run
    has no such count)."""
    return [dict(x, error=None) for x in runs if "unanswered" in x] or runs


def why_err(runs):
    """For a goal that shows ERR: in how many runs, and the first run's reason, short."""
    failed = [x["error"] for x in runs if x.get("error")]
    if not failed:
        return ""
    return f" ({len(failed)} of {len(runs)} runs: {failed[0][:40]})"


def met(t, goal):
    """'yes' / 'no' for a (median, min, max) against a goal to reach, or ERR."""
    if t is None:
        return "ERR"
    return "yes" if t[0] >= goal else "no"
