"""bench/echo.py — the echo server and the many-connections client for scenarios 7 and 10
(memory, echo test at scale), 13 (burst intake) and 15 (wake-ups, quiet relays).

    python3 bench/echo.py server PORT
    python3 bench/echo.py client PORT --conns 4000 --hold 20 [--connect-in-flight 100]
                                      [--quiet] [--late 1]

The server echoes every byte back on every connection. The client opens `--conns`
connections to PORT (a proxy in front of the server, or the server itself), at most
`--connect-in-flight` at a time (0: all at once, as fast as the client can), sends 800 random
bytes on each right after connecting and checks the echo, then, once every connection is up,
keeps each one sending 800 B at a random interval of 1-10 s for `--hold` seconds, checking
every echo byte for byte (`--quiet`: sends nothing more, holds each connection silent). It
says `holding` on stderr once every connection is up, and prints one JSON object on stdout
with what happened:

    {"connected": 4000, "connect_errors": 0, "refused": 0, "echoes": 17000,
     "mismatches": 0, "errors": 0, "late": 0, "first_echo_max": 0.4, "echo_max": 0.02,
     "connect_seconds": 2.1, "first_error": null}

connect_errors: connections that failed before their first echo came back, of which
`refused` were closed or reset by the other side; errors: echoes that failed later
(including any not back within 10 s); late: echoes of the hold period back after more than
`--late` seconds; first_echo_max: the slowest connect and first echo; echo_max: the slowest
echo of the hold period, in seconds.

Python standard library only (asyncio); the scenarios start both sides, each in its own
process.
"""

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time

MESSAGE = 800  # bytes per message, as in evproxy's memory test
ECHO_TIMEOUT = 10.0  # seconds for one echo to come back before it counts as an error


async def serve(port):
    """Echo everything back until the peer closes."""

    async def echo(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", port, backlog=4096)
    print(f"echo: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


class Tally:
    """What the client counts; one instance shared by all connections."""

    def __init__(self):
        self.connected = 0
        self.connect_errors = 0
        self.refused = 0
        self.echoes = 0
        self.mismatches = 0
        self.errors = 0
        self.late = 0
        self.first_echo_max = 0.0
        self.echo_max = 0.0
        self.first_error = None

    def error(self, what):
        self.errors += 1
        if self.first_error is None:
            self.first_error = what


async def echo_once(reader, writer, rng, tally):
    """Send one message, read the same number of bytes back, compare them."""
    payload = rng.randbytes(MESSAGE)
    writer.write(payload)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(MESSAGE), ECHO_TIMEOUT)
    if got == payload:
        tally.echoes += 1
    else:
        tally.mismatches += 1


async def one_connection(port, index, tally, connect_slots, all_up, deadline, opts):
    """Connect, check one echo, wait for every other connection, then talk until deadline
    (or, quiet, stay silent until then)."""
    rng = random.Random(index)
    loop = asyncio.get_running_loop()
    try:
        async with connect_slots:
            started = loop.time()
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), ECHO_TIMEOUT)
            await echo_once(reader, writer, rng, tally)
            tally.first_echo_max = max(tally.first_echo_max, loop.time() - started)
        tally.connected += 1
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        tally.connect_errors += 1
        if isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
            tally.refused += 1      # refused, reset or closed by the other side
        if tally.first_error is None:
            tally.first_error = f"connect: {e!r}"
        return
    try:
        await all_up.wait()
        while True:
            delay = rng.uniform(1.0, 10.0)
            if opts.quiet or loop.time() + delay > deadline[0]:
                # Stay connected until the end of the hold period, then close.
                await asyncio.sleep(max(0.0, deadline[0] - loop.time()))
                break
            await asyncio.sleep(delay)
            started = loop.time()
            await echo_once(reader, writer, rng, tally)
            took = loop.time() - started
            tally.echo_max = max(tally.echo_max, took)
            tally.late += took > opts.late
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        tally.error(f"echo: {e!r}")
    finally:
        writer.close()


async def client(port, conns, hold, opts):
    """Open every connection, hold them for `hold` seconds, return the tally as a dict."""
    tally = Tally()
    # Connects (each with its first echo) in flight at once; 0: no limit, every connection
    # at once.
    connect_slots = (asyncio.Semaphore(opts.connect_in_flight) if opts.connect_in_flight
                     else contextlib.nullcontext())
    all_up = asyncio.Event()
    deadline = [float("inf")]  # set once every connection is up
    started = time.monotonic()
    tasks = [asyncio.create_task(
        one_connection(port, i, tally, connect_slots, all_up, deadline, opts))
        for i in range(conns)]
    # Wait until every connection has connected or failed, then start the hold period.
    while tally.connected + tally.connect_errors < conns:
        await asyncio.sleep(0.05)
    connect_seconds = time.monotonic() - started
    print(f"echo client: {tally.connected} connected in {connect_seconds:.1f}s "
          f"({tally.mismatches} mismatched), holding {hold}s", file=sys.stderr, flush=True)
    deadline[0] = asyncio.get_running_loop().time() + hold
    all_up.set()
    await asyncio.gather(*tasks)
    result = dict(vars(tally))
    result["connect_seconds"] = round(connect_seconds, 2)
    result["first_echo_max"] = round(tally.first_echo_max, 3)
    result["echo_max"] = round(tally.echo_max, 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=4000)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--connect-in-flight", type=int, default=100,
                        help="connects (with their first echo) at once; 0: no limit")
    parser.add_argument("--quiet", action="store_true",
                        help="after the first echo, send nothing: hold each connection silent")
    parser.add_argument("--late", type=float, default=1.0,
                        help="seconds after which an echo of the hold period counts as late")
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port))
    else:
        result = asyncio.run(client(args.port, args.conns, args.hold, args))
        print(json.dumps(result), flush=True)
        sys.exit(0 if result["errors"] == result["mismatches"] == result["connect_errors"] == 0
                 else 1)


if __name__ == "__main__":
    main()
