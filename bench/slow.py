"""bench/slow.py — the slow clients of scenario 14 (slow clients beside busy ones).

    python3 bench/slow.py PORT --clients 100 --stuck 20 --seconds 6 --target HOST:PORT

Each of `--clients` clients, over and over until `--seconds` are over: connects to PORT (an
HTTP proxy), sends half a request head (`GET http://TARGET/ HTTP/1.1`, `Host:`, and no blank
line to end it), stays silent for a random 0.2-1 s and closes. `--stuck` of them (counted
among the clients) stay silent instead until the proxy answers or closes (its
`header_timeout`), and then start again. At `--seconds` every connection is closed and one
JSON object is printed on stdout:

    {"cycles": 480, "connect_errors": 0, "stuck_ended": 20, "answered_408": 20,
     "answered_other": 0, "first_error": null}

cycles: half heads sent and closed by the client; stuck_ended: stuck connections the proxy
ended, of which answered_408 got a `408` first (answered_other: any other answer). Loopback
only, bounded in clients and time. Python standard library only (asyncio); the scenario
starts it beside wrk.
"""

import argparse
import asyncio
import json
import random
import sys

CONNECT_TIMEOUT = 5.0


class Tally:
    def __init__(self):
        self.cycles = 0
        self.connect_errors = 0
        self.stuck_ended = 0
        self.answered_408 = 0
        self.answered_other = 0
        self.first_error = None

    def error(self, what):
        self.connect_errors += 1
        if self.first_error is None:
            self.first_error = what[:300]


async def slow_client(index, args, half_head, tally, deadline):
    """Half a head, a random silence, close; again until the deadline. A stuck client waits
    for the proxy to end it instead."""
    loop = asyncio.get_running_loop()
    rng = random.Random(index)
    stuck = index < args.stuck
    while loop.time() < deadline:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", args.port), CONNECT_TIMEOUT)
            writer.write(half_head)
            await writer.drain()
            left = deadline - loop.time()
            if stuck:
                try:
                    answer = await asyncio.wait_for(reader.read(65536), max(0.0, left))
                except asyncio.TimeoutError:
                    break           # the run is over before the proxy ended it
                tally.stuck_ended += 1
                if answer.startswith(b"HTTP/1.1 408") or answer.startswith(b"HTTP/1.0 408"):
                    tally.answered_408 += 1
                elif answer:
                    tally.answered_other += 1
            else:
                await asyncio.sleep(min(left, rng.uniform(0.2, 1.0)))
                tally.cycles += 1
        except (OSError, asyncio.TimeoutError) as e:
            tally.error(f"connect: {e!r}")
            await asyncio.sleep(0.1)
        finally:
            if writer:
                writer.close()


async def main_async(args):
    loop = asyncio.get_running_loop()
    tally = Tally()
    half_head = f"GET http://{args.target}/ HTTP/1.1\r\nHost: x\r\n".encode()
    deadline = loop.time() + args.seconds
    print(f"slow: {args.clients} clients ({args.stuck} stuck) for {args.seconds}s",
          file=sys.stderr, flush=True)
    await asyncio.gather(*(slow_client(i, args, half_head, tally, deadline)
                           for i in range(args.clients)))
    return dict(vars(tally))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--stuck", type=int, default=0,
                        help="of the clients, how many wait for the proxy to end them")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--target", default="127.0.0.1:80",
                        help="HOST:PORT of the absolute-form target in the half head")
    args = parser.parse_args()
    if not 0 <= args.stuck <= args.clients <= 1000 or not 0 < args.seconds <= 600:
        parser.error("0 <= --stuck <= --clients <= 1000 and 0 < --seconds <= 600")
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
