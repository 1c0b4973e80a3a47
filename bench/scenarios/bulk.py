"""bench/scenarios/bulk.py — scenario 5, bulk transfer: iperf3 through each TCP relay to an
iperf3 server; its run, its report section and its headline row."""

from common import cell, fmt_gbps, markdown_table, ratio, summary
from load import iperf, progress
from systems import TCP_ROWS, IperfServer, measure, running, tcp_systems

NUMBER = 5
TITLE = "bulk (iperf3)"
HEADING = "Bulk transfer (iperf3)"
NOTE = ("iperf3 through each TCP relay to an iperf3 server on loopback, Gbit/s as the "
        "receiver counts it: one stream, four parallel streams (`-P 4`), and `--bidir` "
        "(the sum of both directions). Ratios are for one stream (higher is better).")
HEADLINE = [("iperf3 1 stream, Gbit/s", "1 stream", "gbps", fmt_gbps)]


def run(b):
    s = b.settings
    flags = {"1 stream": "", "4 streams": " -P 4", "bidir": " --bidir"}
    b.results.set_commands(NUMBER, ["iperf3 -s -B 127.0.0.1 -p PORT"] + [
        f"iperf3 -c 127.0.0.1 -p PORT -t {s.iperf_seconds} --json{flags[m]}"
        for m in s.iperf_modes])
    server = IperfServer(b.work, None)
    try:
        server.start()
        systems = tcp_systems(b.work, server.port, s.workers)
        with running(systems):
            for rnd in range(1, s.rounds + 1):
                for system in systems:
                    for mode in s.iperf_modes:
                        r = measure(system, lambda: iperf(system.port, s.iperf_seconds, mode))
                        b.results.add(NUMBER, system.name, mode, r)
                        progress(NUMBER, rnd, s.rounds, f"{system.name} {mode}", r)
    finally:
        server.stop()


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER, TCP_ROWS)
    modes = rep.settings.iperf_modes
    table = []
    for name in rows:
        row = [name] + [cell(r.get(NUMBER, name, m), "gbps", fmt_gbps) for m in modes]
        runs = r.get(NUMBER, name, "1 stream")
        row += [ratio(runs, r.get(NUMBER, "Go io.Copy", "1 stream"), "gbps"),
                ratio(runs, r.get(NUMBER, "direct", "1 stream"), "gbps")]
        table.append(row)
    chart = rep.chart("iperf3", f"{NUMBER}. iperf3 through each relay", "Gbit/s", rows,
                      [(m, [summary(r.get(NUMBER, n, m), "gbps") for n in rows])
                       for m in modes])
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["system"] + [f"{m}, Gbit/s" for m in modes]
                                      + ["1 stream × Go", "1 stream × direct"], table), chart)
