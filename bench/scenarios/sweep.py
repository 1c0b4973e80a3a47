"""bench/scenarios/sweep.py — scenario 2, the buffer-size sweep: scenario 1's measurement
through ours at each buffer size; its run and its report section."""

from common import markdown_table, summary
from scenarios import latency
from systems import Ours

NUMBER = 2
TITLE = "buffer-size sweep"
HEADING = "Buffer-size sweep (scenario 1 through ours)"
NOTE = ("Scenario 1 through our proxy in `copy = buffer` at each `buffer_size`, and in "
        "`copy = splice` (pipe of 64 KiB). A buffer size that hit the Nagle/delayed-ACK "
        "stall would show ~40 ms on `/test1`, as socat does; the direct and socat rows "
        "are copied from scenario 1 for reference. Ratios are to direct in scenario 1.")


def run(b):
    s = b.settings
    systems = [Ours(b.work, b.backend.port, "buffer", size, workers=16, name=f"buffer {size}")
               for size in s.sweep_sizes]
    systems.append(Ours(b.work, b.backend.port, "splice", "64k", workers=16,
                        name="splice 64k"))
    latency.measure_rounds(b, NUMBER, systems, s.sweep_seconds)


def report(rep):
    r = rep.results
    refs = [n for n in ("direct", "socat") if r.get(latency.NUMBER, n, "/test1")]
    table, labels, series = [], [], {p: [] for p in latency.PATHS}
    for scenario, name in ([(NUMBER, n) for n in rep.rows(NUMBER)]
                           + [(latency.NUMBER, n) for n in refs]):
        label = name if scenario == NUMBER else f"{name} (from {latency.NUMBER})"
        table.append([label] + latency.row(r, scenario, name))
        for path in latency.PATHS:
            series[path].append(summary(r.get(scenario, name, path), "avg_us"))
        labels.append(label)
    chart = rep.chart("sweep", f"{NUMBER}. buffer-size sweep: latency per request (log scale)",
                      "average latency, µs", labels, list(series.items()), log_scale=True)
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["ours"] + latency.COLUMNS, table), chart)
