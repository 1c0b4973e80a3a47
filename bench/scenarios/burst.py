"""bench/scenarios/burst.py — scenario 13, burst intake: evproxy's echo test as real clients
run it, every connection opened at once with no throttle, through ours with its default
configuration (the queue of new connections fills, the listen backlog holds the rest),
beside haproxy and Go; its run and its report section. The run itself is scenario 7's
(memory.memory_run), with the echo client's connect throttle off."""

from common import cell, fmt_int, log, markdown_table, summary
from scenarios.memory import fmt_mb, memory_run
from systems import GoProxy, HAProxy, Ours

NUMBER = 13
TITLE = "burst intake"
HEADING = "Burst intake (ours with its default configuration)"
# A template: {conns} and {hold} come from the settings.
NOTE = ("evproxy's echo test as its clients really run it: `bench/echo.py` opens {conns} "
        "connections **all at once** (`--connect-in-flight 0`: no throttle, as fast as one "
        "Python asyncio process can; scenarios 7 and 10 open 100 at a time), each sends 800 "
        "random bytes on connect, and once all are up each sends 800 B every 1–10 s "
        "(random) for {hold} s, every echo checked byte for byte. Ours runs `mode = tcp` "
        "with its **default configuration** but for what the bench sets (listen, upstream, "
        "`log = off`, stats on; `workers = 64` (the default), `queue` 1024 and "
        "`max_connections` 8192 as they come): while the queue of new connections is "
        "full the acceptor stops accepting and the kernel's listen backlog (4096 here) "
        "holds the rest, so a burst should wait, never be refused. Beside it, for "
        "contrast, haproxy `mode tcp` (maxconn 9000) and the Go proxy (`-copy buffer`: "
        "splice would hold 6 fds a connection). Each system and the echo server are "
        "started fresh for their run, one round.\n"
        "\n"
        "**refused** is from the client's tally (closed or reset before the first echo "
        "came back) and, for ours, from `/metrics` (`proxy_connections_refused_total`, "
        "any reason); **connect errors** every connection that did not get its first "
        "echo (refused, or nothing within 10 s); **failed echoes** echoes of the hold "
        "that failed, mismatched or took over 10 s; **late** those back after more than "
        "1 s, and the **slowest echo** of the hold; **slowest first echo** the longest "
        "connect + first echo, what a client of the burst waited; **time to open all** "
        "until every connection had its first echo. "
        "For ours, from `/metrics`: connections **accepted**, and sampled every 0.25 s the "
        "peaks of the **queue** of connections waiting for a worker and of **parked** ones. "
        "**Goal: none refused, no failed echo** (any connect error, failed or mismatched "
        "echo makes the row ERR).")


def run(b):
    s = b.settings
    n = s.burst_conns
    args = ["--connect-in-flight", "0"]
    b.results.set_commands(NUMBER, [
        "python3 bench/echo.py server PORT",
        f"python3 bench/echo.py client PORT --conns {n} --hold {s.burst_hold} "
        + " ".join(args),
        "curl http://127.0.0.1:METRICS/metrics   (ours: every 0.25 s)"])
    makers = [
        lambda up: Ours(b.work, up, "splice", workers=64, stats=True,
                        name="ours, default config"),
        lambda up: HAProxy(b.work, up, "tcp"),
        lambda up: GoProxy(b.work, up, "buffer"),
    ]
    for make in makers:
        system, r = memory_run(b, make, n, s.burst_hold, args)
        b.results.add(NUMBER, system.name, "burst", r)
        if r.get("error") and "connected" not in r:
            continue
        pool = ""
        if "queue_peak" in r:
            pool = (f", accepted {r['proxy_connections_accepted_total']:.0f}, refused "
                    f"(metrics) {r['proxy_refused']:.0f}, queue peak {r['queue_peak']:.0f}, "
                    f"parked peak {r['parked_peak']:.0f}")
        log(f"{NUMBER}  {system.name}: {r['connected']} of {n} connected in "
            f"{r['connect_seconds']} s (slowest first echo {r['first_echo_max']} s), refused "
            f"{r['refused']}, {r['echoes']} echoes, {r['errors'] + r['mismatches']} failed, "
            f"{r['late']} late{pool}")


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, "burst")
        ours = name.startswith("ours")
        # The counts of a failed run stay readable (they say what failed); its timings and
        # sizes show ERR, as everywhere.
        counted = [dict(x, error=None) for x in runs if "connected" in x] or runs
        failed = [x for x in counted if "errors" in x]
        table.append([
            name, cell(counted, "connected", fmt_int),
            cell(counted, "refused", fmt_int),
            cell(counted, "proxy_refused", fmt_int) if ours else "—",
            cell(counted, "connect_errors", fmt_int),
            f"{sum(x['errors'] + x['mismatches'] for x in failed):.0f}" if failed else "ERR",
            cell(runs, "late", fmt_int),
            cell(runs, "echo_max", lambda v: f"{v:.2f} s"),
            cell(runs, "first_echo_max", lambda v: f"{v:.2f} s"),
            cell(runs, "connect_seconds", lambda v: f"{v:.1f} s"),
            cell(counted, "proxy_connections_accepted_total", fmt_int) if ours else "—",
            cell(counted, "queue_peak", fmt_int) if ours else "—",
            cell(counted, "parked_peak", fmt_int) if ours else "—",
            cell(runs, "rss_peak_kib", fmt_mb)])
    note = NOTE.format(conns=s.burst_conns, hold=s.burst_hold)
    chart = rep.chart("burst", f"{NUMBER}. {s.burst_conns} echo connections opened at once: "
                      "time until every one had its first echo", "seconds", rows,
                      [("time to open all", [summary(r.get(NUMBER, x, "burst"),
                                                     "connect_seconds") for x in rows])])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["system", "connected", "refused (client)", "refused (/metrics)", "connect errors",
         "failed echoes", "late echoes", "slowest echo", "slowest first echo",
         "time to open all",
         "accepted", "queue peak", "parked peak", "peak RSS"], table), chart)
