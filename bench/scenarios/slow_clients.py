"""bench/scenarios/slow_clients.py — scenario 14, slow clients beside busy ones: wrk -c300
through ours in http mode with a small pool (32 workers), alone and with 100 clients that
send half a request head and go silent (bench/slow.py), some of them until header_timeout
ends them, or with 100 CONNECTs to a black hole; its run and its report section."""

import json
import socket
import subprocess
import sys
import threading
import time

from common import (AUTH_HEADER, BENCH, cell, fmt_int, fmt_rps, fmt_us, log, markdown_table,
                    summary)
from load import progress, wrk
from scenarios.cliff import (errors_cell, fmt_ratio, met, round_ratios, sample_gauges, triple,
                             wait_idle)
from systems import Ours, measure, running

NUMBER = 14
TITLE = "slow clients beside busy ones"
HEADING = "Slow clients beside busy ones (http, workers = 32)"
# A template: {seconds}, {stuck_seconds} and {rounds} come from the settings.
NOTE = ("`wrk -t1 -c300 -d{seconds}s` keep-alive on `/index.html` with "
        "`Proxy-Authorization`, through ours in `mode = http` with a small pool, `workers "
        "= 32`, `header_timeout = 5` and `min_rate = 0` (else a silent half head is ended "
        "by `min_rate` after about a second, and the stuck clients below would not be "
        "stuck), stats on: **alone**, then beside **100 slow "
        "clients** (`bench/slow.py`): each connects, sends half a request head (`GET "
        "http://127.0.0.1:BACKEND/ HTTP/1.1`, `Host: x`, no blank line to end it), stays "
        "silent for a random 0.2–1 s and closes, over and over for the whole wrk run. "
        "**80 slow + 20 stuck**: 20 of the 100 stay silent instead until the proxy's "
        "`header_timeout` (5 s) ends them with a `408`, and start again (wrk runs "
        "{stuck_seconds} s there, to see them ended). **100 black-holed CONNECTs**: 100 "
        "clients each send `CONNECT` to a listener whose accept queue is full (SYNs dropped: "
        "a connect that hangs, as to a firewalled host), with `connect_timeout` a second "
        "longer than the run, so that their dials last all of it and end (`504`) soon after. The four one after another on the "
        "same instance in each of {rounds} round(s).\n"
        "\n"
        "**÷ alone** is the run's req/s over the alone run's in the same round, median "
        "(min–max). **Goal: ≥ 0.8** (slow clients cost the busy ones at most 20 %). From "
        "`/metrics`: the queue's peak (sampled every 0.2 s), parks and turns during the "
        "run, and the proxy's **4xx** answers (`proxy_http_responses_total{{code=\"4xx\"}}`: "
        "the 408s, and any answer to a head its client cut short; wrk's requests carry the "
        "right credentials). **slow cycles**: half heads sent and closed by the slow "
        "clients; **stuck ended**: stuck connections the proxy ended, with how many got a "
        "408 first (one each per 5 s when `header_timeout` holds).\n"
        "\n"
        "A proxy that does not park a connection in the middle of a request head (ours "
        "before cb3728a) fails here: each slow client holds one of the 32 workers for its "
        "whole silence, and wrk's connections wait for what is left; one whose connect holds "
        "its worker (ours before 31f426d) is pinned by the black-holed CONNECTs and "
        "completes no request at all. Such a drop is the "
        "finding, reported, not a failure: wrk's errors in the runs with slow clients are "
        "counted and shown, and only the alone run must be clean.")

WORKERS = 32
HEADER_TIMEOUT = 5      # seconds: the proxy's header_timeout here
WRK_CONNS = 300
SLOW = 100              # slow clients
HOLES = 100             # clients whose CONNECT goes to a black hole
VARIANTS = [            # (column, slow clients, of which stuck until header_timeout, holes)
    ("alone", 0, 0, 0),
    ("100 slow", SLOW, 0, 0),
    ("80 slow + 20 stuck", SLOW, 20, 0),
    ("100 black-holed CONNECTs", 0, 0, HOLES),
]


def run(b):
    s = b.settings
    target = f"127.0.0.1:{b.backend.port}"
    shown = "127.0.0.1:BACKEND"     # the command lines name ports as words
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c{WRK_CONNS} -d{s.slow_seconds}s --latency "
        f"-H 'Proxy-Authorization: {AUTH_HEADER}' http://127.0.0.1:PORT/index.html   "
        f"(-d{stuck_seconds(s)}s beside the stuck ones)",
        f"python3 bench/slow.py PORT --clients {SLOW} --target {shown} --seconds "
        f"{s.slow_seconds + 0.5}   (started 0.3 s before wrk)",
        f"python3 bench/slow.py PORT --clients {SLOW} --stuck 20 --target {shown} "
        f"--seconds {stuck_seconds(s) + 0.5}",
        f"{HOLES} x CONNECT 127.0.0.1:HOLE (a listener with listen(0), its queue full)",
        "curl http://127.0.0.1:METRICS/metrics   (before, every 0.2 s during, after)"])
    ours = Ours(b.work, b.backend.port, "splice", mode="http", workers=WORKERS, stats=True,
                keys={"header_timeout": HEADER_TIMEOUT, "min_rate": 0,
                      "connect_timeout": s.slow_seconds + 1},
                access={"connect_ports": "1-65535"}, name="ours http, workers=32")
    hole = black_hole()
    with running([ours], b.backend):
        for rnd in range(1, s.rounds + 1):
            for col, clients, stuck, holes in VARIANTS:
                r = measure(ours, lambda: one_run(b, ours, clients, stuck, target,
                                                  hole if holes else None))
                b.results.add(NUMBER, ours.name, col, r)
                progress(NUMBER, rnd, s.rounds, col, r)
                if "queue_peak" in r:
                    slow = r.get("slow") or {}
                    log(f"  queue peak {r['queue_peak']}, {r['parks']} parks, {r['turns']} "
                        f"turns, {r['http_4xx']} 4xx; slow clients: "
                        f"{slow.get('cycles', 0)} cycles, {slow.get('stuck_ended', 0)} stuck "
                        f"ended ({slow.get('answered_408', 0)} with 408), "
                        f"{slow.get('connect_errors', 0)} connect errors")


def stuck_seconds(s):
    """wrk's run beside the stuck clients: long enough for header_timeout to end them."""
    return max(s.slow_seconds, HEADER_TIMEOUT + 1)


def black_hole():
    """A listener whose accept queue is full, so that new SYNs are dropped and a connect to it
    hangs until its timeout. Returns (its "host:port", the sockets to keep open)."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(0)
    keep = [lsn]
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(lsn.getsockname())
        keep.append(c)
    time.sleep(0.2)
    return "127.0.0.1:%d" % lsn.getsockname()[1], keep


def dial_holes(ours, hole, n):
    """n clients, each with a CONNECT to the black hole sent: their dials hang."""
    socks = []
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", ours.port), timeout=5)
        c.sendall((f"CONNECT {hole} HTTP/1.1\r\nHost: {hole}\r\n"
                   f"Proxy-Authorization: {AUTH_HEADER}\r\n\r\n").encode())
        socks.append(c)
    return socks


def one_run(b, ours, clients, stuck, target, hole=None):
    s = b.settings
    seconds = stuck_seconds(s) if stuck else s.slow_seconds
    wait_idle(ours)
    before = ours.metrics()
    peaks = {"proxy_queue_length": 0}
    stop = threading.Event()
    sampler = threading.Thread(target=sample_gauges, args=(ours, peaks, stop))
    slow = None
    holes = []
    err = b.work / f"slow-{ours.port}.log"
    try:
        if hole:
            holes = dial_holes(ours, hole[0], HOLES)
            time.sleep(0.3)     # their dials are under way before wrk's first request
        if clients:
            argv = [sys.executable, str(BENCH / "slow.py"), str(ours.port), "--clients",
                    str(clients), "--stuck", str(stuck), "--target", target, "--seconds",
                    str(seconds + 0.5)]
            with open(err, "w") as f:
                slow = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=f, text=True,
                                        stdin=subprocess.DEVNULL)
            time.sleep(0.3)     # the slow clients are in before wrk's first request
        sampler.start()
        r = wrk(ours.port, "/index.html", WRK_CONNS, seconds,
                headers=[f"Proxy-Authorization: {AUTH_HEADER}"],
                expect_errors=bool(clients or hole))
        if slow:
            try:
                out, _ = slow.communicate(timeout=seconds + 30)
                r["slow"] = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                r["slow"] = None
                r["error"] = "bench/slow.py printed no result: " + err.read_text()[-300:]
    finally:
        stop.set()
        if sampler.is_alive():
            sampler.join()
        if slow and slow.poll() is None:
            slow.kill()
            slow.wait()
        for c in holes:
            c.close()
    after = ours.metrics()
    r["queue_peak"] = int(peaks["proxy_queue_length"])
    for key, metric in (("parks", "proxy_parks_total"), ("turns", "proxy_turns_total"),
                        ("http_4xx", 'proxy_http_responses_total{code="4xx"}')):
        r[key] = int(after.get(metric, 0) - before.get(metric, 0))
    if r.get("slow"):
        r["slow_cycles"] = r["slow"]["cycles"]
        r["stuck_ended"] = r["slow"]["stuck_ended"]
        r["answered_408"] = r["slow"]["answered_408"]
        r["slow_connect_errors"] = r["slow"]["connect_errors"]
    return r


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    s = rep.settings
    table = []
    for name in rows:
        alone = r.get(NUMBER, name, "alone")
        for col, clients, stuck, holes in VARIANTS:
            runs = r.get(NUMBER, name, col)
            if not runs:
                continue
            beside = clients or holes
            vs = round_ratios(runs, alone) if beside else None
            table.append([
                col,
                cell(runs, "rps", fmt_rps), triple(vs, fmt_ratio) if beside else "",
                met(vs, 0.8) if beside else "", cell(runs, "p50_us", fmt_us),
                cell(runs, "p99_us", fmt_us), errors_cell(runs),
                cell(runs, "slow_cycles", fmt_int) if clients else "—",
                (cell(runs, "stuck_ended", fmt_int) + " ("
                 + cell(runs, "answered_408", fmt_int) + " with 408)") if stuck else "—",
                cell(runs, "slow_connect_errors", fmt_int) if clients else "—",
                cell(runs, "queue_peak", fmt_int), cell(runs, "parks", fmt_int),
                cell(runs, "turns", fmt_int), cell(runs, "http_4xx", fmt_int)])
    note = NOTE.format(seconds=s.slow_seconds, stuck_seconds=stuck_seconds(s),
                       rounds=s.rounds)
    cols = [c for c, _, _, _ in VARIANTS]
    name = rows[0] if rows else None
    chart = rep.chart("slow-clients", f"{NUMBER}. wrk -c300 req/s through 32 workers, alone "
                      "and beside slow clients", "requests per second", cols,
                      [("req/s", [summary(r.get(NUMBER, name, c), "rps") for c in cols])])
    return rep.section(NUMBER, HEADING, note, markdown_table(
        ["run", "req/s", "÷ alone", "≥ 0.8?", "p50", "p99",
         "wrk socket errors + timeouts (max)", "slow cycles", "stuck ended",
         "slow connect errors", "queue peak", "parks", "turns", "4xx"], table), chart)
