"""bench/trickle.py — the trickle server and its silent clients for scenario 15 (wake-ups).

    python3 bench/trickle.py server PORT
    python3 bench/trickle.py client PORT --conns 1000 --hold 8

The server sends 100 bytes down every connection every 100 ms (their phases spread over the
100 ms) and reads nothing but the end. The client opens
`--conns` connections to PORT (a relay in front of the server), 100 at a time, never sends a
byte, and reads and counts what arrives; once every connection has its first 100 bytes it
says `holding` on stderr, holds them all for `--hold` seconds, closes them and prints one
JSON object on stdout:

    {"connected": 1000, "connect_errors": 0, "errors": 0, "bytes": 8000000,
     "connect_seconds": 0.9, "first_error": null}

errors: connections that ended (closed or reset) before the hold was over. Python standard
library only (asyncio); the scenario starts both sides, each in its own process.
"""

import argparse
import asyncio
import json
import sys
import time

CHUNK = b"x" * 100      # bytes per tick, on every connection
TICK = 0.1              # seconds between ticks
SLOTS = 10              # steps a tick, each for a tenth of the connections
CONNECT_TIMEOUT = 10.0  # seconds for a connection's first bytes to arrive


async def serve(port):
    """CHUNK down every open connection every TICK. One timer for all of them, so that the
    server's own cost stays small, in SLOTS steps a tick: each connection has its slot, so
    that the chunks do not all arrive at the same instant."""
    loop = asyncio.get_running_loop()
    slots = [set() for _ in range(SLOTS)]
    made = [0]

    class Trickle(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.slot = transport, slots[made[0] % SLOTS]
            made[0] += 1
            self.slot.add(transport)
            transport.write(CHUNK)

        def data_received(self, data):
            pass

        def connection_lost(self, exc):
            self.slot.discard(self.transport)

    server = await loop.create_server(Trickle, "127.0.0.1", port, backlog=4096)
    print(f"trickle: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        step = 0
        next_at = loop.time()
        while True:
            next_at += TICK / SLOTS
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            for t in list(slots[step % SLOTS]):
                # A client that stops reading must not grow our buffers without bound.
                if not t.is_closing() and t.get_write_buffer_size() < 65536:
                    t.write(CHUNK)
            step += 1


class Tally:
    """What the client counts; one instance shared by all connections."""

    def __init__(self):
        self.connected = 0
        self.connect_errors = 0
        self.errors = 0
        self.bytes = 0
        self.first_error = None


class Silent(asyncio.Protocol):
    """A client connection that never sends: it counts what arrives, and whether it ended
    early."""

    def __init__(self, tally, holding):
        self.tally, self.holding = tally, holding
        self.first = asyncio.get_running_loop().create_future()
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.tally.bytes += len(data)
        if not self.first.done():
            self.first.set_result(None)

    def connection_lost(self, exc):
        if not self.first.done():
            self.first.set_exception(exc or ConnectionResetError("closed before any byte"))
        elif not self.holding[0]:
            return              # we closed it ourselves at the end
        else:
            self.tally.errors += 1
            if self.tally.first_error is None:
                self.tally.first_error = f"ended during the hold: {exc!r}"


async def client(port, conns, hold):
    """Open every connection, wait for each one's first bytes, hold them, return the tally."""
    loop = asyncio.get_running_loop()
    tally = Tally()
    holding = [True]
    slots = asyncio.Semaphore(100)
    protocols = []

    async def open_one():
        async with slots:
            try:
                _, p = await asyncio.wait_for(loop.create_connection(
                    lambda: Silent(tally, holding), "127.0.0.1", port), CONNECT_TIMEOUT)
                protocols.append(p)
                await asyncio.wait_for(asyncio.shield(p.first), CONNECT_TIMEOUT)
                tally.connected += 1
            except (OSError, asyncio.TimeoutError) as e:
                tally.connect_errors += 1
                if tally.first_error is None:
                    tally.first_error = f"connect: {e!r}"

    started = time.monotonic()
    await asyncio.gather(*(open_one() for _ in range(conns)))
    connect_seconds = time.monotonic() - started
    print(f"trickle client: {tally.connected} connected in {connect_seconds:.1f}s, "
          f"holding {hold}s", file=sys.stderr, flush=True)
    await asyncio.sleep(hold)
    holding[0] = False
    for p in protocols:
        if p.transport:
            p.transport.close()
    await asyncio.sleep(0.1)
    result = dict(vars(tally))
    result["connect_seconds"] = round(connect_seconds, 2)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["server", "client"])
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=8.0)
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(serve(args.port))
    else:
        result = asyncio.run(client(args.port, args.conns, args.hold))
        print(json.dumps(result), flush=True)
        sys.exit(0 if result["errors"] == result["connect_errors"] == 0 else 1)


if __name__ == "__main__":
    main()
