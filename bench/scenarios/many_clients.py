"""bench/scenarios/many_clients.py — scenario 12, more clients than workers: wrk -c1000 in
http mode through ours with 64 workers (the waiting room takes the connections between
requests), beside 1100 workers, and 64 workers with park_after = 0 (the old starvation); its
run and its report section."""

import statistics
import threading
import time

from common import AUTH_HEADER, cell, fmt_int, fmt_rps, fmt_us, markdown_table, summary
from load import progress, wrk
from scenarios.cliff import sample_gauges, wait_idle
from systems import Ours, running

NUMBER = 12
TITLE = "more clients than workers"
HEADING = "More clients than workers (http, wrk -c1000)"
# A template: {seconds} and {rounds} come from the settings.
NOTE = ("`wrk -t1 -c1000 -d{seconds}s` keep-alive on `/index.html` with "
        "`Proxy-Authorization`, through ours in `mode = http` (`copy = splice`, stats on): "
        "with `workers = 64` and the waiting room (`park_after` default), against "
        "`workers = 1100` (a worker for every connection, as scenario 3), and `workers = "
        "64` with `park_after = 0` (no parking: a keep-alive connection holds its worker, "
        "so 64 connections are served and the other 936 wait in the queue for the whole "
        "run — the concurrency cliff). {rounds} round(s), the three one "
        "after another. With 64 workers and the waiting room no socket error, timeout or "
        "non-2xx response is allowed; the park_after = 0 row's errors are expected and "
        "reported, not failures. From /metrics, sampled every 0.2 s: the peaks of the "
        "queue, busy workers and parked connections, and the parks during the run.\n"
        "\n"
        "wrk does not count a request that never got an answer, so a connection starved "
        "for the whole run is invisible in its output. Ours therefore writes its access "
        "log to a file here (`log = PATH`, in all three rows: one line per answered "
        "request, with the client's address): **wrk connections served** is how many "
        "distinct client connections had at least one request served during the run "
        "(log lines stamped before wrk's end: once wrk stops, the connections it left in "
        "the queue are served, to no one), and "
        "**requests per connection** spreads them (unanswered ones count as 0). A wrk "
        "connection that got no answer makes the row ERR, except in the park_after = 0 "
        "row. Writing the log costs each request a `write(2)`, so these req/s are a "
        "little below a run with `log = off`.")

CONNS = 1000


def systems(b):
    up = b.backend.port
    return [                # (system, whether it is expected to starve)
        (Ours(b.work, up, "splice", mode="http", workers=64, stats=True,
              access_log=True, name="ours http, workers=64"), False),
        (Ours(b.work, up, "splice", mode="http", workers=1100, stats=True,
              access_log=True, name="ours http, workers=1100"), False),
        (Ours(b.work, up, "splice", mode="http", workers=64, stats=True,
              keys={"park_after": 0}, access_log=True,
              name="ours http, workers=64, park_after=0"), True),
    ]


def run(b):
    s = b.settings
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{CONNS} -d{s.many_seconds}s --latency "
        f"-H 'Proxy-Authorization: {AUTH_HEADER}' http://127.0.0.1:PORT/index.html",
        "curl http://127.0.0.1:METRICS/metrics   (before, every 0.2 s during, after)"])
    pairs = systems(b)
    with running([x for x, _ in pairs], b.backend):
        for rnd in range(1, s.rounds_many + 1):
            for system, starves in pairs:
                if system.failed:
                    r = {"error": system.failed}
                else:
                    r = one_run(b, system, starves)
                b.results.add(NUMBER, system.name, "c1000", r)
                progress(NUMBER, rnd, s.rounds_many, system.name, r)


def one_run(b, system, starves):
    wait_idle(system)
    before = system.metrics()
    offset = system.log_size()
    peaks = {"proxy_queue_length": 0, "proxy_workers_busy": 0, "proxy_connections_parked": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_gauges, args=(system, peaks, stop))
    sampler.start()
    until = time.time() + b.settings.many_seconds     # when wrk stops (see below)
    try:
        r = wrk(system.port, "/index.html", CONNS, b.settings.many_seconds,
                headers=[f"Proxy-Authorization: {AUTH_HEADER}"], expect_errors=starves)
    finally:
        stop.set()
        sampler.join()
    after = system.metrics()
    r["ok_rps"] = (r["rps"] or 0) * (r["requests"] - r["non2xx"]) / max(1, r["requests"])
    r["queue_peak"] = int(peaks["proxy_queue_length"])
    r["busy_peak"] = int(peaks["proxy_workers_busy"])
    r["parked_peak"] = int(peaks["proxy_connections_parked"])
    r["parks"] = int(after.get("proxy_parks_total", 0) - before.get("proxy_parks_total", 0))
    r["refused"] = int(sum(v - before.get(k, 0) for k, v in after.items()
                           if k.startswith("proxy_connections_refused_total")))
    # wrk counts no request that never got an answer: the access log says which of its
    # connections got answers, and how many each, up to the moment wrk stopped (then the
    # connections it left in the queue are served to no one).
    counts = sorted(system.requests_by_client(offset, until).values())
    r["answered_conns"] = len(counts)
    r["unanswered_conns"] = max(0, CONNS - len(counts))
    r["per_conn_min"] = 0 if len(counts) < CONNS else counts[0]
    r["per_conn_median"] = statistics.median(counts + [0] * r["unanswered_conns"])
    r["per_conn_max"] = counts[-1] if counts else 0
    if r["unanswered_conns"]:
        problem = f"{r['unanswered_conns']} of wrk's {CONNS} connections had no request served"
        if starves:
            r["expected_errors"] = ", ".join(filter(None, [r.get("expected_errors"), problem]))
        else:
            r["error"] = ", ".join(filter(None, [r.get("error"), problem]))
    return r


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, "c1000")
        errors = [sum(x.get(k, 0) for k in ("connect", "read", "write", "timeout"))
                  for x in runs if not x.get("error")]
        p99 = ("—" if runs and not any(x.get("error") for x in runs)
               and all(x.get("p99_us") is None for x in runs) else cell(runs, "p99_us", fmt_us))
        table.append([
            name + (" — starves, expected" if "park_after=0" in name else ""),
            cell(runs, "ok_rps", fmt_rps), cell(runs, "p50_us", fmt_us), p99,
            cell(runs, "answered_conns", fmt_int),
            " / ".join(cell(runs, k, fmt_int) for k in
                       ("per_conn_min", "per_conn_median", "per_conn_max")),
            f"{max(errors):.0f}" if errors else "ERR", cell(runs, "non2xx", fmt_int),
            cell(runs, "queue_peak", fmt_int), cell(runs, "busy_peak", fmt_int),
            cell(runs, "parked_peak", fmt_int), cell(runs, "parks", fmt_int),
            cell(runs, "refused", fmt_int)])
    note = NOTE.format(seconds=s.many_seconds, rounds=s.rounds_many)
    chart = rep.chart("many-clients", f"{NUMBER}. wrk -c1000 req/s through ours in http mode",
                      "requests per second", rows,
                      [("2xx req/s", [summary(r.get(NUMBER, n, "c1000"), "ok_rps") for n in rows])])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["system", "2xx req/s", "p50", "p99", "wrk connections served",
         "requests per connection min / median / max", "wrk socket errors + timeouts (max)",
         "non-2xx",
         "queue peak", "busy workers peak", "parked peak", "parks", "refused"], table), chart)
