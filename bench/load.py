"""bench/load.py — the load tools the scenarios drive: wrk (HTTP requests) and iperf3 (bulk
TCP), run once each and parsed into a dict of numbers with 'error' set when the run must not
count, and the progress line for one such run."""

import json
import re
import time

from common import fmt_gbps, fmt_rps, fmt_us, log, run


def to_us(number, unit):
    """wrk's '222.00us' / '1.23ms' / '1.02s' as microseconds."""
    return float(number) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def wrk(port, path, conns, seconds, headers=(), script=None, expect_errors=False,
        closes_after_response=False, timeout=None, wall=None, env=None):
    """Run wrk -t1 and return its numbers; 'error' is set when anything went wrong
    (unless expect_errors, where the errors are only counted). env: wrk's environment
    (default: ours; bench/policy.py preloads a shim that picks the source address). wall:
    seconds after which wrk is killed (default seconds + 60): a run that is expected to
    starve passes less, since wrk's first connect then waits in a full listen backlog.

    closes_after_response: the server closes the connection after each response without
    saying `Connection: close` (tinyproxy). wrk then sends its next request on the closed
    connection, counts one read error and reconnects; up to one read error per request is
    expected then, and nothing else is."""
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if timeout:
        argv.append(f"--timeout={timeout}s")
    for h in headers:
        argv += ["-H", h]
    if script:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    status, out = run(argv, wall or seconds + 60, env=env)
    result = {"requests": 0, "rps": None, "avg_us": None, "p50_us": None, "p99_us": None,
              "connect": 0, "read": 0, "write": 0, "timeout": 0, "non2xx": 0, "error": None}
    unit = r"([\d.]+)(us|ms|s)\b"
    if m := re.search(r"Latency\s+" + unit, out):
        result["avg_us"] = to_us(*m.groups())
    for pct in ("50", "99"):
        if m := re.search(rf"^\s+{pct}%\s+" + unit, out, re.M):
            result[f"p{pct}_us"] = to_us(*m.groups())
    if m := re.search(r"(\d+) requests in", out):
        result["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        for key, value in zip(("connect", "read", "write", "timeout"), m.groups()):
            result[key] = int(value)
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non2xx"] = int(m.group(1))

    kinds = ("connect", "read", "write", "timeout", "non2xx")
    if closes_after_response and result["read"] <= result["requests"] + conns:
        result["expected_errors"] = f"read {result['read']} (closes after each response)"
        kinds = ("connect", "write", "timeout", "non2xx")
    problems = [f"{k} {result[k]}" for k in kinds if result[k]]
    if status != 0:
        problems.insert(0, f"wrk exit status {status}: {out.strip()[-200:]}")
    elif result["requests"] == 0 or result["rps"] is None:
        problems.insert(0, "no requests completed")
    if problems and not expect_errors:
        result["error"] = ", ".join(problems)
    elif problems:
        result["expected_errors"] = ", ".join(problems)
    return result


def iperf(port, seconds, mode):
    """One iperf3 client run through `port`; Gbit/s received (both directions for bidir)."""
    flags = {"1 stream": [], "4 streams": ["-P", "4"], "bidir": ["--bidir"]}[mode]
    argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "--json"] + flags
    for attempt in range(3):
        status, out = run(argv, seconds + 30)
        try:
            data = json.loads(out[out.find("{"):])
        except ValueError:
            data = {"error": f"exit status {status}, no JSON: {out.strip()[-200:]}"}
        if "busy" in str(data.get("error", "")) and attempt < 2:
            time.sleep(1)   # the server is still finishing the previous test
            continue
        break
    if data.get("error"):
        return {"gbps": None, "error": f"iperf3: {data['error']}"}
    end = data["end"]
    bits = end["sum_received"]["bits_per_second"]
    if mode == "bidir":
        bits += end["sum_received_bidir_reverse"]["bits_per_second"]
    return {"gbps": bits / 1e9, "error": None}


def progress(scenario, rnd, rounds, what, r):
    """One progress line for one run, e.g. '3 round 1/3  haproxy tcp -c100: 80.5k req/s …'."""
    if "gbps" in r and not r.get("error"):
        text = f"{fmt_gbps(r['gbps'])} Gbit/s"
    else:
        text = wrk_line(r)
    log(f"{scenario} round {rnd}/{rounds}  {what}: {text}")


def wrk_line(r):
    """A short progress description of one wrk run."""
    if r.get("error"):
        return "ERR " + r["error"]
    if r.get("rps") is None or r.get("avg_us") is None or r.get("p99_us") is None:
        text = "no requests completed"      # an expected failure: wrk printed no figures
    else:
        text = (f"{fmt_rps(r['rps'])} req/s, avg {fmt_us(r['avg_us'])}, "
                f"p99 {fmt_us(r['p99_us'])}")
    if r.get("expected_errors"):
        text += f" ({r['expected_errors']})"
    return text
