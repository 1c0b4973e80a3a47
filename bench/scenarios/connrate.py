"""bench/scenarios/connrate.py — scenario 4, the connection rate (a new connection per
request): its run, its report section and its headline row."""

from common import cell, fmt_rps, fmt_us, markdown_table, ratio, summary
from load import progress, wrk
from systems import TCP_ROWS, measure, running, tcp_systems

NUMBER = 4
TITLE = "connection rate"
HEADING = "Connection rate (a new connection per request)"
NOTE = ("wrk -c50 with `Connection: close`: the backend closes after each response, so "
        "every request is a new client connection and, through a proxy, a new upstream "
        "connection. Requests per second = connections per second.")
HEADLINE = [("new connection per request, conn/s", "close", "rps", fmt_rps)]


def run(b):
    s = b.settings
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c50 -d{s.connrate_seconds}s --latency -H 'Connection: close' "
        f"http://127.0.0.1:PORT/index.html"])
    systems = tcp_systems(b.work, b.backend.port, s.workers)
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                r = measure(system, lambda: wrk(system.port, "/index.html", 50, s.connrate_seconds,
                                                headers=["Connection: close"]))
                b.results.add(NUMBER, system.name, "close", r)
                progress(NUMBER, rnd, s.rounds, system.name, r)


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER, TCP_ROWS)
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, "close")
        table.append([name, cell(runs, "rps", fmt_rps),
                      ratio(runs, r.get(NUMBER, "haproxy tcp", "close"), "rps"),
                      ratio(runs, r.get(NUMBER, "direct", "close"), "rps"),
                      cell(runs, "p99_us", fmt_us)])
    chart = rep.chart("connrate", f"{NUMBER}. new connections per second (Connection: close)",
                      "connections per second", rows,
                      [("conn/s", [summary(r.get(NUMBER, n, "close"), "rps") for n in rows])])
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["system", "conn/s", "× haproxy", "× direct", "p99"],
                                      table), chart)
