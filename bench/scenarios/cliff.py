"""bench/scenarios/cliff.py — scenario 8, the concurrency cliff: ours with a pool of 256
workers as wrk's connections grow past it (some take turns through the waiting room),
watched through /metrics; its run and its report section."""

import statistics
import threading
import time

from common import cell, fmt_int, fmt_rps, fmt_us, log, markdown_table, summary
from load import progress, wrk
from systems import Ours, running

NUMBER = 8
TITLE = "concurrency cliff"
HEADING = "Concurrency cliff (ours, workers = 256, queue = 1024)"
NOTE = ("Our proxy (`mode = tcp`) with a pool of 256 workers as wrk's keep-alive "
        "connections grow. Past 256 the extra connections wait in the queue. A tcp relay "
        "has no request boundary: while others wait, it yields its worker only when it has "
        "been quiet for one read tick (at most 10 ms) after its last byte went to the "
        "client, and parks until its next request. wrk's connections pause that long now "
        "and then (one wrk thread drives them all), so some take turns and p99 grows to "
        "about a second, while others wait for most or all of the run. wrk does not count "
        "a request that never got an answer, so **queue peak** (the queue's highest length "
        "from /metrics, sampled every 0.2 s) is where those show; **busy workers peak** is "
        "the same for busy workers. Only new connections count against `queue` (1024): "
        "past 256 + 1024 arriving at once the proxy refuses the rest at once "
        "(`proxy_connections_refused_total{reason=\"queue_full\"}`, read from /metrics "
        "before and after each run), which wrk sees as socket errors and reconnects. These "
        "errors are expected and reported, not counted as failures.")

NAME = "ours splice, workers=256"


def refused(m):
    """Connections the proxy refused so far, for any reason."""
    return sum(v for k, v in m.items() if k.startswith("proxy_connections_refused_total"))


def run(b):
    s = b.settings
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{{{','.join(str(c) for c in s.cliff_points)}}} -d{s.cliff_seconds}s "
        f"--latency http://127.0.0.1:PORT/index.html",
        "curl http://127.0.0.1:METRICS/metrics   (before and after each run)"])
    ours = Ours(b.work, b.backend.port, "splice", workers=256, stats=True, name=NAME)
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
                    r["refused"] = int(refused(after) - refused(before))
                    r["accepted"] = int(after["proxy_connections_accepted_total"]
                                        - before["proxy_connections_accepted_total"])
                    r["queue_peak"] = int(peaks["proxy_queue_length"])
                    r["busy_peak"] = int(peaks["proxy_workers_busy"])
                b.results.add(NUMBER, ours.name, f"c{conns}", r)
                progress(NUMBER, rnd, s.rounds, f"-c{conns}", r)
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


def report(rep):
    r = rep.results
    cols = list(r.runs.get(str(NUMBER), {}).get(NAME, {}))
    table = []
    for col in cols:
        runs = r.get(NUMBER, NAME, col)
        errors = [sum(x.get(k, 0) for k in ("connect", "read", "write")) for x in runs
                  if not x.get("error")]
        table.append([col.lstrip("c"), cell(runs, "rps", fmt_rps),
                      cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us),
                      cell(runs, "timeout", fmt_int),
                      f"{statistics.median(errors):.0f}" if errors else "ERR",
                      cell(runs, "refused", fmt_int), cell(runs, "queue_peak", fmt_int),
                      cell(runs, "busy_peak", fmt_int)])
    chart = rep.chart("cliff", f"{NUMBER}. ours with workers = 256: req/s as connections grow",
                      "requests per second", [c.lstrip("c") for c in cols],
                      [("req/s", [summary(r.get(NUMBER, NAME, c), "rps") for c in cols])])
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["connections", "req/s", "p50", "p99", "wrk timeouts",
                                       "wrk socket errors", "refused (queue full)",
                                       "queue peak", "busy workers peak"],
                                      table), chart)
