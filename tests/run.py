#!/usr/bin/env python3
"""tests/run.py — runs the C unit tests, then every test_* function of tests/test_*.py against
a real ./proxy, each under its own time limit, and ends with the line 'N passed, N failed'.

    python3 tests/run.py --proxy ./proxy --unit build/unit [-k substring,substring]
"""
import argparse
import glob
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


class Timeout(Exception):
    pass


def on_alarm(signum, frame):
    raise Timeout("test ran out of time")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proxy", default="./proxy")
    ap.add_argument("--unit", default="build/unit")
    ap.add_argument("-k", default="", help="run only tests whose name contains one of these "
                    "comma-separated substrings (and skip the unit tests)")
    args = ap.parse_args()
    os.environ["PROXY_BIN"] = os.path.abspath(args.proxy)
    if "/asan/" in args.proxy or "/tsan/" in args.proxy:
        os.environ.setdefault("PROXY_TEST_SCALE", "0.25")
    sys.path.insert(0, HERE)
    import lib

    passed = failed = 0
    failures = []  # repeated above the last line, which is what a cut CI log still shows
    if not args.k:
        out = subprocess.run([args.unit], capture_output=True, text=True, timeout=120)
        sys.stdout.write(out.stdout + out.stderr)
        m = re.search(r"^(\d+) passed, (\d+) failed$", out.stdout, re.M)
        if m and out.returncode in (0, 1):
            passed, failed = int(m.group(1)), int(m.group(2))
        else:
            print("FAIL unit tests did not finish (exit %d)" % out.returncode)
            failed += 1

    signal.signal(signal.SIGALRM, on_alarm)
    for path in sorted(glob.glob(os.path.join(HERE, "test_*.py"))):
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for name, fn in list(vars(mod).items()):
            if not name.startswith("test_") or not callable(fn):
                continue
            if args.k and not any(k in name for k in args.k.split(",")):
                continue
            start = time.monotonic()
            lib.last_logs.clear()
            signal.alarm(getattr(fn, "limit", 60))
            try:
                fn()
                signal.alarm(0)
                problems = lib.finish()
                if problems:
                    raise AssertionError("\n".join(problems))
                passed += 1
                print("ok   %s (%.1fs)" % (name, time.monotonic() - start), flush=True)
            except BaseException as e:
                signal.alarm(0)
                if isinstance(e, KeyboardInterrupt):
                    raise
                failed += 1
                print("FAIL %s (%.1fs): %s" % (name, time.monotonic() - start, e), flush=True)
                tb = traceback.format_exc().strip().splitlines()
                print("     " + "\n     ".join(tb[-8:]))
                lib.finish()  # stops its proxies, so that their last log lines are in
                for pid, lines in lib.last_logs:  # what the proxy saw, for a failure in CI
                    print("     proxy %d, its last lines:\n       %s"
                          % (pid, "\n       ".join(lines)))
                failures.append("FAIL %s: %s" % (name, str(e).splitlines()[0][:300] if str(e)
                                                  else type(e).__name__))
            finally:
                lib.finish()
    for line in failures:
        print(line)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
