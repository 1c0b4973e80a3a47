"""bench/echo.py — the echo server and the many-connections client for scenario 7 (memory).

    python3 bench/echo.py server PORT
    python3 bench/echo.py client PORT --conns 4000 --hold 20

The server echoes every byte back on every connection. The client opens `--conns`
connections to PORT (a proxy in front of the server, or the server itself), sends 800 random
bytes on each right after connecting and checks the echo, then, once every connection is up,
keeps each one sending 800 B at a random interval of 1-10 s for `--hold` seconds, checking
every echo byte for byte. It prints one JSON object on stdout with what happened:

    {"connected": 4000, "connect_errors": 0, "echoes": 17000, "mismatches": 0,
     "errors": 0, "connect_seconds": 2.1, "first_error": null}

Python standard library only (asyncio); the memory scenario (bench/scenarios/memory.py)
starts both sides, each in its own process.
"""

import argparse
import asyncio
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
        self.echoes = 0
        self.mismatches = 0
        self.errors = 0
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


async def one_connection(port, index, tally, connect_slots, all_up, deadline):
    """Connect, check one echo, wait for every other connection, then talk until deadline."""
    rng = random.Random(index)
    try:
        async with connect_slots:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), ECHO_TIMEOUT)
            await echo_once(reader, writer, rng, tally)
        tally.connected += 1
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        tally.connect_errors += 1
        if tally.first_error is None:
            tally.first_error = f"connect: {e!r}"
        return
    try:
        await all_up.wait()
        loop = asyncio.get_running_loop()
        while True:
            delay = rng.uniform(1.0, 10.0)
            if loop.time() + delay > deadline[0]:
                # Stay connected until the end of the hold period, then close.
                await asyncio.sleep(max(0.0, deadline[0] - loop.time()))
                break
            await asyncio.sleep(delay)
            await echo_once(reader, writer, rng, tally)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
        tally.error(f"echo: {e!r}")
    finally:
        writer.close()


async def client(port, conns, hold):
    """Open every connection, hold them for `hold` seconds, return the tally as a dict."""
    tally = Tally()
    connect_slots = asyncio.Semaphore(100)  # connects in flight at once
    all_up = asyncio.Event()
    deadline = [float("inf")]  # set once every connection is up
    started = time.monotonic()
    tasks = [asyncio.create_task(
        one_connection(port, i, tally, connect_slots, all_up, deadline))
        for i in range(conns)]
    # Wait until every connection has connected or failed, then start the hold period.
    while tally.connected + tally.connect_errors < conns:
        await asyncio.sleep(0.05)
    connect_seconds = time.monotonic() - started
    print(f"echo client: {tally.connected} connected in {connect_seconds:.1f}s, "
          f"holding {hold}s", file=sys.stderr, flush=True)
    deadline[0] = asyncio.get_running_loop().time() + hold
    all_up.set()
    await asyncio.gather(*tasks)
    result = dict(vars(tally))
    result["connect_seconds"] = round(connect_seconds, 2)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=4000)
    parser.add_argument("--hold", type=float, default=20.0)
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port))
    else:
        result = asyncio.run(client(args.port, args.conns, args.hold))
        print(json.dumps(result), flush=True)
        sys.exit(0 if result["errors"] == result["mismatches"] == result["connect_errors"] == 0
                 else 1)


if __name__ == "__main__":
    main()
