"""bench/scenarios/latency.py — scenario 1, the proxy-bench latency test (one connection,
one request at a time): its run, its report section and its headline rows. Scenario 2 (the
buffer-size sweep) measures and tabulates the same way, through other systems, with
measure_rounds() and row() from here."""

from common import cell, fmt_us, markdown_table, ratio, summary
from load import progress, wrk
from systems import TCP_ROWS, measure, running, tcp_systems

NUMBER = 1
TITLE = "proxy-bench latency"
HEADING = "proxy-bench latency (one connection, sequential GETs)"
NOTE = ("One keep-alive connection, one request at a time: `/test1` is a 64 KiB body, "
        "`/test2` is `Hello, world!` (13 B). Average and p99 latency per request as wrk "
        "reports them, and the average as a ratio to direct (lower is better).")
HEADLINE = [("1 conn, 64 KiB GET, avg", "/test1", "avg_us", fmt_us),
            ("1 conn, 13 B GET, avg", "/test2", "avg_us", fmt_us)]

PATHS = ("/test1", "/test2")
COLUMNS = ["/test1 avg", "× direct", "/test1 p99", "/test2 avg", "× direct", "/test2 p99"]


def run(b):
    s = b.settings
    measure_rounds(b, NUMBER, tcp_systems(b.work, b.backend.port, s.workers),
                   s.latency_seconds)


def measure_rounds(b, number, systems, seconds):
    """wrk -c1 on /test1 and /test2 through each system, round after round, as scenario
    `number`."""
    b.results.set_commands(number, [
        f"wrk -t1 -c1 -d{seconds}s --latency http://127.0.0.1:PORT{path}" for path in PATHS])
    with running(systems, b.backend):
        for rnd in range(1, b.settings.rounds + 1):
            for system in systems:
                for path in PATHS:
                    r = measure(system, lambda: wrk(system.port, path, 1, seconds))
                    b.results.add(number, system.name, path, r)
                    progress(number, rnd, b.settings.rounds, f"{system.name} {path}", r)


def row(results, scenario, name):
    """The cells after the name for one row of COLUMNS. Ratios are always to direct in this
    scenario, so that scenario 2's rows compare with these."""
    cells = []
    for path in PATHS:
        runs = results.get(scenario, name, path)
        direct = results.get(NUMBER, "direct", path)
        cells += [cell(runs, "avg_us", fmt_us), ratio(runs, direct, "avg_us"),
                  cell(runs, "p99_us", fmt_us)]
    return cells


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER, TCP_ROWS)
    table = markdown_table(["system"] + COLUMNS, [[name] + row(r, NUMBER, name) for name in rows])
    chart = rep.chart("latency", f"{NUMBER}. latency per request, one connection (log scale)",
                      "average latency, µs", rows,
                      [(p, [summary(r.get(NUMBER, n, p), "avg_us") for n in rows])
                       for p in PATHS], log_scale=True)
    return rep.section(NUMBER, HEADING, NOTE, table, chart)
