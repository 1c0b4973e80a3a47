"""bench/scenarios/http_auth.py — scenario 6, HTTP proxies with Basic auth on every request:
ours in mode http, haproxy in mode http and tinyproxy; its run and its report section."""

from common import (AUTH_HEADER, PASSWORD, USER, cell, fmt_int, fmt_rps, fmt_us,
                    markdown_table, ratio, summary)
from load import progress, wrk
from systems import Direct, HAProxy, Ours, Tinyproxy, measure, running

NUMBER = 6
TITLE = "HTTP with auth"
HEADING = "HTTP proxies with Basic auth on every request"
NOTE = (f"wrk -c100 on `/index.html` with `Proxy-Authorization: {AUTH_HEADER}` "
        f"(`{USER}:{PASSWORD}`) on every request. Ours runs `mode = http` with a "
        "`[users]` entry (every request authenticated, origin-form `GET /index.html` "
        "sent to `upstream`); haproxy `mode http` denies with 407 unless the header "
        "matches, and removes it; tinyproxy uses `BasicAuth` and needs absolute-form "
        "targets (`GET http://127.0.0.1:BACKEND/index.html`, from a wrk Lua script), and "
        "closes the client connection after every response, so its row is a new "
        "connection per request; it does so without `Connection: close`, so wrk "
        "sends its next request on the closed connection, counts a read error and "
        "reconnects: up to one read error per request is expected for tinyproxy (and "
        "shown), any other error is not. The `ours http, absolute-form` row sends the same "
        "absolute-form requests to ours, for a like-for-like comparison. The direct row "
        "sends the same header to the backend, which ignores it. A 407 or any other "
        "non-2xx response makes the cell ERR.")


def run(b):
    s = b.settings
    script = b.work / "absolute-form.lua"
    script.write_text(
        "-- absolute-form request target, for proxies that need it (tinyproxy)\n"
        f'wrk.path = "http://127.0.0.1:{b.backend.port}/index.html"\n'
        f'wrk.headers["Host"] = "127.0.0.1:{b.backend.port}"\n')
    b.results.set_commands(NUMBER, [
        f"wrk -t1 -c100 -d{s.http_seconds}s --latency -H 'Proxy-Authorization: {AUTH_HEADER}' "
        f"http://127.0.0.1:PORT/index.html",
        "the same with -s absolute-form.lua for the absolute-form rows, which says:",
        '  wrk.path = "http://127.0.0.1:BACKEND/index.html"',
        '  wrk.headers["Host"] = "127.0.0.1:BACKEND"'])
    systems = [Direct(b.work, b.backend.port),
               Ours(b.work, b.backend.port, "splice", mode="http", workers=s.workers,
                    name="ours http"),
               Ours(b.work, b.backend.port, "splice", mode="http", workers=s.workers,
                    absolute=True, name="ours http, absolute-form"),
               HAProxy(b.work, b.backend.port, "http"),
               Tinyproxy(b.work, b.backend.port)]
    with running(systems, b.backend):
        for rnd in range(1, s.rounds + 1):
            for system in systems:
                r = measure(system, lambda: wrk(
                    system.port, "/index.html", 100, s.http_seconds,
                    headers=[f"Proxy-Authorization: {AUTH_HEADER}"],
                    script=script if system.absolute else None,
                    closes_after_response=system.closes_after_response))
                b.results.add(NUMBER, system.name, "c100", r)
                progress(NUMBER, rnd, s.rounds, system.name, r)


def report(rep):
    r, rows = rep.results, rep.rows(NUMBER)
    table = []
    for name in rows:
        runs = r.get(NUMBER, name, "c100")
        table.append([name, cell(runs, "rps", fmt_rps),
                      ratio(runs, r.get(NUMBER, "haproxy http", "c100"), "rps"),
                      cell(runs, "p50_us", fmt_us), cell(runs, "p99_us", fmt_us),
                      cell(runs, "read", fmt_int)])
    chart = rep.chart("http", f"{NUMBER}. HTTP proxy with auth on every request, wrk -c100",
                      "requests per second", rows,
                      [("req/s", [summary(r.get(NUMBER, n, "c100"), "rps") for n in rows])])
    return rep.section(NUMBER, HEADING, NOTE,
                       markdown_table(["system", "req/s", "× haproxy http", "p50", "p99",
                                       "wrk read errors"], table), chart)
