"""bench/scenarios/throughput.py — scenario 3, keep-alive throughput at 100 and 1000
connections: its run, its report section and its headline rows."""

from common import cell, fmt_rps, fmt_us, markdown_table, ratio, summary
from load import progress, wrk
from systems import TCP_ROWS, measure, running, tcp_systems

NUMBER = 3
TITLE = "throughput"
HEADING = "Throughput (keep-alive, many connections)"
NOTE = ("wrk with 100 and with 1000 keep-alive connections on `/index.html` (~600 B), "
        "one wrk thread: requests per second, and latency p50/p99. Ratios are to "
        "haproxy (higher is better).")
HEADLINE = [("wrk -c100, req/s", "c100", "rps", fmt_rps),
            ("wrk -c100, p99", "c100", "p99_us", fmt_us),
            ("wrk -c1000, req/s", "c1000", "rps", fmt_rps)]

CONNS = (100, 1000)


def run(b):
    s = b.settings
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{c} -d{s.throughput_seconds}s --latency http://127.0.0.1:PORT/index.html"
        for c in CONNS])
    systems = tcp_systems(b.work, b.backend.port, s.workers)
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                for conns in CONNS:
                    r = measure(system, lambda: wrk(system.port, "/index.html", conns,
                                                    s.throughput_seconds))
                    b.results.add(NUMBER, system.name, f"c{conns}", r)
                    progress(NUMBER, rnd, s.rounds, f"{system.name} -c{conns}", r)


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER, TCP_ROWS)
    cols = [f"c{c}" for c in CONNS]
    table = []
    for name in rows:
        row = [name]
        for col in cols:
            runs = r.get(NUMBER, name, col)
            haproxy = r.get(NUMBER, "haproxy tcp", col)
            row += [cell(runs, "rps", fmt_rps), ratio(runs, haproxy, "rps"),
                    cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us)]
        table.append(row)
    chart = rep.chart("throughput", f"{NUMBER}. keep-alive throughput on /index.html",
                      "requests per second", rows,
                      [(f"-{c}", [summary(r.get(NUMBER, n, c), "rps") for n in rows])
                       for c in cols])
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["system", "-c100 req/s", "× haproxy", "p50", "p99",
                                       "-c1000 req/s", "× haproxy", "p50", "p99"], table),
                       chart)
