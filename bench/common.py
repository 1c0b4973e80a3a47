"""bench/common.py — what every part of the bench shares: paths, the test user, the settings
(full and --quick), logging, running a command, reading /proc, the results of every run, and
turning them into table cells, markdown tables and gnuplot charts."""

import base64
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent   # the repository: ./proxy and the Makefile
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"

USER, PASSWORD = "alice", "secret"               # the [users] entry for the HTTP scenario
AUTH_HEADER = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


# ─── settings ────────────────────────────────────────────────────────────────────────────

class Settings:
    """How long and how often: one instance for full runs, one for --quick."""

    def __init__(self, quick):
        self.quick = quick
        self.rounds = 1 if quick else 3
        self.latency_seconds = 1 if quick else 3        # scenario 1
        self.sweep_seconds = 1 if quick else 2          # scenario 2
        self.sweep_sizes = (["1k", "8k", "64k"] if quick
                            else ["1k", "2k", "8k", "32k", "64k", "1m"])
        self.throughput_seconds = 1 if quick else 3     # scenario 3
        self.connrate_seconds = 1 if quick else 2       # scenario 4
        self.iperf_seconds = 1 if quick else 2          # scenario 5
        self.iperf_modes = ["1 stream"] if quick else ["1 stream", "4 streams", "bidir"]
        self.http_seconds = 1 if quick else 3           # scenario 6
        self.memory_conns = 500 if quick else 4000      # scenario 7
        self.memory_hold = 3 if quick else 20
        self.rounds_memory = 1                          # each run takes ~25 s: one round
        self.cliff_points = [1000] if quick else [1000, 2000]     # scenario 8: wrk -cN
        self.cliff_seconds = 2 if quick else 4          # scenario 8: each wrk run
        self.workers = 1100                             # ours, enough for wrk -c1000
        # Scenarios 9 and 10: connections held at once. Ours and haproxy hold two fds for
        # each (client and upstream), so 9000 + wrk's and the pipes stay under 20000.
        self.idle_conns = 500 if quick else 9000
        self.idle_seconds = 1 if quick else 3           # scenario 9: each wrk run
        self.scale_hold = 3 if quick else 12            # scenario 10
        self.busy_seconds = 1 if quick else 2           # scenario 11: each wrk run
        self.syscall_seconds = 1 if quick else 2        # scenario 11: wrk -c1 under perf/strace
        self.busy_settle = 1 if quick else 2            # scenario 11: pause before a system
        self.many_seconds = 2 if quick else 10          # scenario 12
        self.rounds_many = 1                            # 10 s a run: one round
        self.burst_conns = 1000 if quick else 8000      # scenario 13: opened at once
        self.burst_hold = 3 if quick else 10
        self.slow_seconds = 2 if quick else 6           # scenario 14: each wrk run
        self.wake_conns = 200 if quick else 1000        # scenario 15: relays held
        self.wake_window = 2 if quick else 5            # scenario 15: switches counted over


# ─── small helpers ───────────────────────────────────────────────────────────────────────

STARTED = time.monotonic()


def load_average():
    """The 1, 5 and 15 minute load averages: the machine is shared, so say how busy it was."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


LOAD_AT_START = load_average()


def log(message):
    """A progress line with the time since start."""
    elapsed = int(time.monotonic() - STARTED)
    print(f"[{elapsed // 60:2d}:{elapsed % 60:02d}] {message}", flush=True)


def free_port():
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_listening(port):
    """True when a socket listens on 127.0.0.1:port. Reads /proc/net/tcp instead of
    connecting, so that a readiness check never reaches the upstream (iperf3 would take a
    probe for a broken test)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == wanted and fields[3] == "0A":   # 0A = LISTEN
                return True
    return False


def run(argv, timeout, **kwargs):
    """Run a command to completion (bounded in time); returns (exit status, stdout+stderr)."""
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
        return p.returncode, p.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out + f"\n(timed out after {timeout}s)"


def log_tail(path, lines=3):
    """The last few non-empty lines of a log file on one line, for an error message."""
    text = [line.strip() for line in path.read_text(errors="replace").splitlines()
            if line.strip()]
    return " | ".join(text[-lines:])[-400:]


def first_line(argv):
    """The first non-empty output line of a version command, or '?'."""
    status, out = run(argv, 10)
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else "?"


def process_tree(pid):
    """pid and every process descended from it."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may contain spaces; the ppid is the 2nd field after ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def proc_status(pid):
    """VmRSS and VmHWM in KiB and the thread count of one process (zeros once it is gone)."""
    values = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in values:
                    values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def cpu_seconds(pids):
    """User + system CPU time of the processes (all their threads, the ones gone too), in
    seconds: utime + stime from /proc/PID/stat. A process already gone counts 0."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                # The command name may contain spaces; utime and stime are the 12th and 13th
                # fields after ')'.
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


def thread_switches(pids, kinds=("voluntary", "nonvoluntary")):
    """{(pid, tid): context switches} of every thread of the processes: the sum of the
    `kinds` of /proc/PID/task/TID/status's *_ctxt_switches. Counts are per thread (a
    process's own status shows only its first thread's), so a scenario takes this before and
    after and subtracts thread by thread (switch_delta)."""
    keys = {f"{k}_ctxt_switches" for k in kinds}
    counts = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            n = 0
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        key, _, rest = line.partition(":")
                        if key in keys:
                            n += int(rest)
            except (OSError, ValueError):
                continue
            counts[(pid, tid)] = n
    return counts


def switch_delta(before, after):
    """{thread: switches between two thread_switches() readings}; a thread that started in
    between counts from 0, one that ended is left out (its count went with it)."""
    return {t: n - before.get(t, 0) for t, n in after.items()}


def memory_in_use_kib():
    """System-wide (memory in use, kernel stacks + page tables), in KiB. Memory in use is
    MemTotal - MemAvailable; the second figure is what threads cost the kernel."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    return info["MemTotal"] - info["MemAvailable"], info["KernelStack"] + info["PageTables"]


# ─── results: runs, summaries, failures ──────────────────────────────────────────────────

class Results:
    """Every run of every scenario: results.runs[scenario][row][column] = [run, ...] where a
    run is a dict of numbers with 'error' set when it must not count. Also the failures
    that make the script exit non-zero. Scenarios are keyed by their number as a string,
    as the JSON file has them; the methods take the number either way."""

    def __init__(self):
        self.runs = {}
        self.commands = {}      # scenario -> command lines as run (ports as PORT)
        self.failures = []

    def add(self, scenario, row, column, run):
        scenario = str(scenario)
        self.runs.setdefault(scenario, {}).setdefault(row, {}).setdefault(column, []).append(run)
        if run.get("error"):
            self.failures.append(f"scenario {scenario}, {row}, {column}: {run['error']}")
            log(f"  ERR {row} {column}: {run['error']}")

    def get(self, scenario, row, column):
        return self.runs.get(str(scenario), {}).get(row, {}).get(column, [])

    def set_commands(self, scenario, lines):
        self.commands[str(scenario)] = lines

    def has(self, scenario):
        return str(scenario) in self.runs


class Bench:
    """What every scenario needs: settings, the temp directory, the backend, the results."""

    def __init__(self, settings, work, backend, results):
        self.settings, self.work, self.backend, self.results = settings, work, backend, results


def summary(runs, key):
    """(median, min, max) of `key` over runs, or None when a run failed or none exist."""
    if not runs or any(r.get("error") for r in runs):
        return None
    values = [r[key] for r in runs if r.get(key) is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt_us(v):
    if v >= 1e6:
        return f"{v / 1e6:.3g} s"
    return f"{v / 1000:.3g} ms" if v >= 1000 else f"{v:.0f} µs"


def fmt_rps(v):
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def fmt_gbps(v):
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def fmt_int(v):
    return f"{v:.0f}"


def cell(runs, key, fmt):
    """'median (min–max)' for a table, or ERR when any run failed, or — when not run."""
    if not runs:
        return "—"
    s = summary(runs, key)
    if s is None:
        return "ERR"
    median, low, high = s
    if len(runs) == 1 or fmt(low) == fmt(high):
        return fmt(median)
    return f"{fmt(median)} ({fmt(low)}–{fmt(high)})"


def ratio(runs, base_runs, key):
    """Median over median of the base row, as '1.02×'."""
    a, b = summary(runs, key), summary(base_runs, key)
    if a is None or b is None or not b[0]:
        return "—"
    x = a[0] / b[0]
    return f"{x:.2f}×" if x < 10 else f"{x:.0f}×"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path, title, ylabel, labels, series, log_scale=False):
    """A grouped bar chart with min–max error bars, drawn by gnuplot into `path` (PNG).
    series: [(name, [(median, min, max) or None per label])]. Returns True when drawn."""
    data = path.with_suffix(".dat")
    with open(data, "w") as f:
        for i, label in enumerate(labels):
            cols = [label.replace(" ", "\\n", 1) if len(label) > 12 else label]
            for _, values in series:
                v = values[i]
                cols += ["NaN"] * 3 if v is None else [f"{x:.6g}" for x in v]
            f.write("\t".join(cols) + "\n")
    plots = []
    for n, (name, _) in enumerate(series):
        c = 2 + 3 * n
        using = f"{c}:{c + 1}:{c + 2}" + (":xtic(1)" if n == 0 else "")
        plots.append(f"'{data}' using {using} title '{name}'")
    script = f"""set terminal pngcairo size 1000,520 font "sans,10"
set output '{path}'
set title "{title}"
set ylabel "{ylabel}"
set datafile separator "\\t"
set datafile missing "NaN"
set style data histogram
set style histogram errorbars gap 1 lw 1
set style fill solid 0.7 border -1
set boxwidth 0.9
set grid ytics
set key top left
set xtics scale 0 noenhanced
set bmargin 4
{"set logscale y" if log_scale else "set yrange [0:*]"}
plot {", ".join(plots)}
"""
    try:
        p = subprocess.run(["gnuplot"], input=script, text=True, capture_output=True, timeout=60)
        ok = p.returncode == 0 and path.exists()
        if not ok:
            log(f"  gnuplot failed for {path.name}: {p.stderr.strip()[-300:]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"  gnuplot failed for {path.name}: {e}")
        ok = False
    data.unlink(missing_ok=True)
    return ok

