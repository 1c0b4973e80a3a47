"""bench/scenarios/echo_scale.py — scenario 10, evproxy's echo test at scale: thousands of
slow echo connections through ours with only 64 workers (the waiting room holds the quiet
ones) beside haproxy, nginx stream and Go, with the memory each uses; its run and its report
section. The run itself is scenario 7's (memory.memory_run), at another size."""

from common import cell, fmt_int, log, markdown_table, summary
from scenarios.memory import fmt_kib, fmt_mb, memory_run
from systems import Direct, GoProxy, HAProxy, NginxStream, Ours

NUMBER = 10
TITLE = "echo test at scale"
HEADING = "Echo test at scale (ours with workers = 64)"
# A template: {conns}, {hold}, {workers} and {maxconn} come from the settings.
NOTE = ("evproxy's echo test, as scenario 7 runs it, at {conns} connections: each sends "
        "800 random bytes on connect and then every 1–10 s (random) for {hold} s once all "
        "are connected, and every echo is checked byte for byte (`bench/echo.py`, one "
        "client process: {conns} fds, well under the 20000 a process may have; the echo "
        "server is another). Ours runs `mode = tcp` with only `workers = {workers}` and "
        "`max_connections = {maxconn}`, stats on, with `copy = splice` (two 64 KiB "
        "pipes a worker, 256 fds in all: they belong to the workers, not to the "
        "connections) and with `copy = "
        "buffer`: a connection quiet for `park_after` (200 ms; one tick, 10 ms, when others wait and its last byte went to the client) parks in the waiting room "
        "and comes back to a free worker when its next message arrives. The peers hold "
        "every connection themselves: haproxy `mode tcp` (maxconn {maxconn}), nginx "
        "stream (worker_connections raised to hold them all in one worker), the Go proxy "
        "with `-copy buffer` (with splice it holds 6 fds a connection, past the fd limit "
        "here). Each system and the echo server are started fresh for their run, one "
        "round.\n"
        "\n"
        "Columns as in scenario 7: **peak RSS** the sum of VmHWM over the proxy's "
        "processes, and **per conn over idle** its growth from just before the client "
        "started, (peak − idle) / {conns}: what a connection costs the proxy's memory; "
        "**in use** the system's memory in use (MemTotal − MemAvailable) over "
        "the hold period, median, relative to just before the client started, **per "
        "conn** and **per conn over direct** (the direct row carries the Python client, "
        "the echo server and the kernel's socket buffers); **kernel stacks + page "
        "tables** their growth from before the proxy started. For ours, from /metrics "
        "sampled every 0.25 s: the peaks of **parked** connections, of the **queue** and "
        "of **busy workers**, and the parks and wake-ups during the run. A connection that "
        "fails to connect, an echo error (none may take over 10 s) or a single mismatched "
        "byte makes the row ERR.")

WORKERS = 64


def run(b):
    s = b.settings
    n = s.idle_conns
    maxconn = n + 600
    b.results.set_commands(NUMBER, [
        "python3 bench/echo.py server PORT",
        f"python3 bench/echo.py client PORT --conns {n} --hold {s.scale_hold}",
        "curl http://127.0.0.1:METRICS/metrics   (ours: every 0.25 s)"])
    keys = {"max_connections": maxconn}
    makers = [
        lambda up: Direct(b.work, up),
        lambda up: Ours(b.work, up, "splice", workers=WORKERS, stats=True, keys=keys,
                        name="ours splice, workers=64"),
        lambda up: Ours(b.work, up, "buffer", workers=WORKERS, stats=True, keys=keys,
                        name="ours buffer, workers=64"),
        lambda up: HAProxy(b.work, up, "tcp", maxconn),
        lambda up: NginxStream(b.work, up, worker_connections=2 * maxconn + 100),
        lambda up: GoProxy(b.work, up, "buffer"),
    ]
    for make in makers:
        system, r = memory_run(b, make, n, s.scale_hold)
        b.results.add(NUMBER, system.name, "scale", r)
        if r.get("error"):
            continue
        rss = f"peak RSS {r['rss_peak_kib'] / 1024:.1f} MB, " if r["rss_peak_kib"] else ""
        pool = ""
        if "parked_peak" in r:
            pool = (f", parked peak {r['parked_peak']:.0f}, queue peak {r['queue_peak']:.0f}, "
                    f"busy peak {r['busy_peak']:.0f}, {r['proxy_parks_total']:.0f} parks")
        log(f"{NUMBER}  {system.name}: {rss}memory in use +{r['used_load_kib'] / 1024:.0f} MB, "
            f"{r['echoes']} echoes, {r['connect_seconds']}s to connect{pool}")


def growth(runs, n):
    """(median, min, max) of the proxy's RSS growth per connection, (peak - idle) / n, in
    KiB; None when a run failed."""
    if not runs or any(x.get("error") for x in runs):
        return None
    values = [(x["rss_peak_kib"] - x["rss_idle_kib"]) / n for x in runs
              if x.get("rss_peak_kib") is not None and x.get("rss_idle_kib") is not None]
    return (sorted(values)[len(values) // 2], min(values), max(values)) if values else None


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    n = s.idle_conns
    base = summary(r.get(NUMBER, "direct", "scale"), "used_load_kib")
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, "scale")
        load = summary(runs, "used_load_kib")
        rss = growth(runs, n)
        proxy = name != "direct"
        ours = name.startswith("ours")
        table.append([
            name, cell(runs, "connected", fmt_int), cell(runs, "echoes", fmt_int),
            cell(runs, "rss_peak_kib", fmt_mb) if proxy else "—",
            fmt_kib(rss[0]) if proxy and rss else ("—" if not proxy else "ERR"),
            cell(runs, "threads", fmt_int) if proxy else "—",
            cell(runs, "used_load_kib", fmt_mb),
            fmt_kib(load[0] / n) if load else "ERR",
            fmt_kib((load[0] - base[0]) / n) if load and base and proxy else "—",
            cell(runs, "kernel_stacks_kib", fmt_mb),
            cell(runs, "parked_peak", fmt_int) if ours else "—",
            cell(runs, "queue_peak", fmt_int) if ours else "—",
            cell(runs, "busy_peak", fmt_int) if ours else "—",
            cell(runs, "proxy_parks_total", fmt_int) if ours else "—"])
    proxies = [x for x in rows if x != "direct"]
    per_conn = [growth(r.get(NUMBER, x, "scale"), n) for x in proxies]
    note = NOTE.format(conns=n, hold=s.scale_hold, workers=WORKERS, maxconn=n + 600)
    chart = rep.chart("echo-scale", f"{NUMBER}. the proxy's RSS per connection at {n} echo "
                      "connections: (peak - idle) / connections", "KiB per connection",
                      proxies, [("RSS growth / connection", per_conn)])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["system", "connected", "echoes checked", "peak RSS", "RSS per conn over idle",
         "threads",
         "in use, median", "per conn", "per conn over direct",
         "kernel stacks + page tables", "parked peak", "queue peak", "busy workers peak",
         "parks"], table), chart)
