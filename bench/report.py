"""bench/report.py — the report writer: bench/results/BASE.md (the machine, program versions,
the systems table, the headline table, then each scenario's own section), BASE.json (every
raw number) and the BASE-NAME.png charts. What a scenario's section says lives in its module
under bench/scenarios/; this file only frames and orders the sections."""

import datetime
import json
import os
import socket
import sys

from common import (AUTH_HEADER, LOAD_AT_START, RESULTS, ROOT, bar_chart, first_line,
                    load_average, markdown_table, run, summary)
from scenarios import SCENARIOS
from systems import TCP_ROWS, index_html, systems_table


class Report:
    """What a scenario's report() builds its section with: the results, the settings, charts
    drawn next to the report, and the section's frame (heading, note, commands)."""

    def __init__(self, b, base):
        self.results, self.settings, self.base = b.results, b.settings, base
        self.charts = []

    def chart(self, name, title, ylabel, labels, series, log_scale=False):
        """Draw a chart next to the report and return the markdown line that shows it."""
        path = RESULTS / f"{self.base}-{name}.png"
        if bar_chart(path, title, ylabel, labels, series, log_scale):
            self.charts.append(path.name)
            return f"\n![{title}]({path.name})\n"
        return "\n(chart not drawn: gnuplot failed)\n"

    def rows(self, scenario, order=None):
        """The row names a scenario has results for, in `order` or else as they ran."""
        present = list(self.results.runs.get(str(scenario), {}))
        return [n for n in (order or present) if n in present]

    def commands(self, scenario):
        lines = self.results.commands.get(str(scenario), [])
        return "\nCommands (PORT is the system's port):\n\n```\n" + "\n".join(lines) + "\n```\n"

    def section(self, number, heading, note, table, chart):
        """A scenario's section: heading, note, table, chart, and the commands it ran."""
        text = [f"## {number}. {heading}\n", note + "\n", table, chart, self.commands(number)]
        return "\n".join(text)

    def headline(self):
        """One table of medians: each scenario's HEADLINE rows, for the TCP systems."""
        r = self.results
        table = []
        for scenario in SCENARIOS:
            if not r.has(scenario.NUMBER):
                continue
            for label, col, key, fmt in getattr(scenario, "HEADLINE", []):
                row = [label]
                for name in TCP_ROWS:
                    runs = r.get(scenario.NUMBER, name, col)
                    s = summary(runs, key)
                    row.append("—" if not runs else "ERR" if s is None else fmt(s[0]))
                table.append(row)
        if not table:
            return ""
        return ("## Headline (medians)\n\n" + markdown_table(["scenario"] + TCP_ROWS, table)
                + "\n")


def machine_info(fd_limit):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    distro = "?"
    if os.path.exists("/etc/os-release"):
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip().strip('"')
    return {"host": socket.gethostname(), "nproc": os.cpu_count(), "cpu": cpu,
            "kernel": os.uname().release, "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
            "os": distro, "open files limit": fd_limit,
            "load average at start": LOAD_AT_START, "load average at end": load_average()}


def versions():
    _, socat = run(["socat", "-V"], 10)
    socat = next((line.strip() for line in socat.splitlines() if "socat version" in line), "?")
    return {
        "proxy": first_line([str(ROOT / "proxy"), "-V"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "go": first_line(["go", "version"]),
        "socat": socat,
        "tinyproxy": first_line(["tinyproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
        "iperf3": first_line(["iperf3", "-v"]),
        "gnuplot": first_line(["gnuplot", "--version"]),
        "python": sys.version.split()[0],
    }


def write_report(b, base, args, fd_limit, elapsed):
    """Write RESULTS/base.md, base.json and the charts; return the .md path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rep = Report(b, base)
    machine, vers = machine_info(fd_limit), versions()
    command = "python3 bench/run.py" + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    s = b.settings
    failures = b.results.failures
    status = ("**All runs clean** (no socket errors, no non-2xx responses, no iperf3 errors, "
              "no bad echoes, every body checked)." if not failures else
              f"**{len(failures)} run(s) failed** — their cells show ERR, and the script "
              "exited 3:\n\n" + "\n".join(f"- {f}" for f in failures))
    body = [f"# Benchmark results: {datetime.date.today()}, {machine['host']}\n",
            f"`{command}` — {'quick' if s.quick else 'full'} mode, {s.rounds} round(s) "
            f"with the systems interleaved in each round; took {elapsed / 60:.1f} min. "
            "Cells are the median over rounds with (min–max); everything ran on 127.0.0.1, "
            "wrk with one thread (`-t1`). Charts show the medians with min–max bars and leave "
            "ERR cells out. bench/README.md says how to read each table.\n",
            status + "\n",
            "## Machine\n",
            markdown_table(["", ""], [[k, v] for k, v in machine.items()]) + "\n",
            markdown_table(["program", "version"], [[k, v] for k, v in vers.items()]) + "\n",
            "## Systems\n",
            "Each system is started by the bench on its own port in front of the same backend "
            "(nginx: `worker_processes 1`, `access_log off`, `keepalive_requests` 10⁹, "
            "`sendfile on`; `/test1` 64 KiB of random bytes, `/test2` `Hello, world!`, "
            f"`/index.html` {len(index_html())} B). Peers run with their default thread or "
            "process counts on this machine's "
            f"{machine['nproc']} CPUs; the client, the proxy and the backend share them.\n",
            systems_table(s) + "\n",
            rep.headline()]
    for scenario in SCENARIOS:
        if b.results.has(scenario.NUMBER):
            body.append(scenario.report(rep))
    md = RESULTS / f"{base}.md"
    md.write_text("\n".join(body).rstrip() + "\n")
    raw = {"date": str(datetime.date.today()), "command": command,
           "elapsed_seconds": round(elapsed, 1), "machine": machine, "versions": vers,
           "settings": vars(s), "auth_header": AUTH_HEADER, "commands": b.results.commands,
           "runs": b.results.runs, "failures": failures, "charts": rep.charts}
    (RESULTS / f"{base}.json").write_text(json.dumps(raw, indent=1) + "\n")
    return md
