"""bench/idle.py — the idle-connection holder for scenario 9 (idle capacity).

    python3 bench/idle.py PORT --conns 4500 --mode http|connect|tcp [--target HOST:PORT]
                          [--auth 'Basic ...'] [--in-flight 200] [--timeout 5]

Opens `--conns` connections to PORT, and on each makes one exchange, then leaves it idle:

- http:    `GET /test2` (keep-alive, with `Proxy-Authorization` when --auth is given)
           straight to PORT, an HTTP proxy with an upstream, and reads the whole response;
- connect: `CONNECT TARGET` (with --auth), expects `200`, then `GET /test2` through the
           tunnel to TARGET (the backend) and reads the response;
- tcp:     `GET /test2` through PORT, a TCP relay to the backend.

Every response must be `200` with the body `Hello, world!`. Once all are open (or failed) it
prints one JSON line on stdout:

    {"opened": 4500, "refused": 0, "timed_out": 0, "failed": 0, "first_error": null,
     "open_seconds": 1.9}

- refused: closed, reset or answered `503` (the proxy refused it); timed_out: no answer
  within --timeout (it waits in a queue: the connection is kept open, as a client would keep
  waiting); failed: anything else (a wrong answer).

Then it holds every connection idle and reads commands on stdin, one a line:

    check   one more `GET /test2` on each connection that opened (through its tunnel in
            connect mode): the idle connection must still work. Prints
            {"checked": 4500, "check_errors": 0, "first_error": null, "check_seconds": 0.8}
    close   (or end of input) close everything and exit 0

Python standard library only (asyncio). The scenario starts several of these when one
process would hold too many fds (each connection is one fd here).
"""

import argparse
import asyncio
import json
import sys
import time

BODY = b"Hello, world!"     # /test2 on the bench's backend


class Refused(Exception):
    """The proxy closed, reset or answered 503."""


async def exchange(reader, writer, request, timeout):
    """Send one GET, read the response head and body, check them; raise on anything else."""
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b"?"
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    if status == b"503":
        raise Refused("503")
    if status != b"200" or body != BODY:
        raise ValueError(f"status {status.decode(errors='replace')}, {len(body)} B body")


class Holder:
    def __init__(self, args):
        self.args = args
        self.conns = []         # (reader, writer) of connections that opened
        self.waiting = []       # writers of connections that got no answer in time
        self.tally = {"opened": 0, "refused": 0, "timed_out": 0, "failed": 0,
                      "first_error": None}
        host = "127.0.0.1"
        auth = f"Proxy-Authorization: {args.auth}\r\n" if args.auth else ""
        self.get = (f"GET /test2 HTTP/1.1\r\nHost: {args.target or host}\r\n"
                    + (auth if args.mode == "http" else "") + "\r\n").encode()
        self.connect = (f"CONNECT {args.target} HTTP/1.1\r\nHost: {args.target}\r\n{auth}\r\n"
                        ).encode()

    def count(self, kind, error):
        self.tally[kind] += 1
        if self.tally["first_error"] is None:
            self.tally["first_error"] = f"{kind}: {error!r}"[:300]

    async def open_one(self, slots):
        a = self.args
        writer = None
        async with slots:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", a.port), a.timeout)
                if a.mode == "connect":
                    writer.write(self.connect)
                    await writer.drain()
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), a.timeout)
                    status = head.split(b" ", 2)[1]
                    if status == b"503":
                        raise Refused("503")
                    if status != b"200":
                        raise ValueError(f"CONNECT answered {head[:60]!r}")
                await exchange(reader, writer, self.get, a.timeout)
            except asyncio.TimeoutError as e:
                self.count("timed_out", e)
                if writer:
                    self.waiting.append(writer)
                return
            except (Refused, ConnectionError, asyncio.IncompleteReadError) as e:
                self.count("refused", e)
            except (OSError, ValueError, asyncio.LimitOverrunError) as e:
                self.count("failed", e)
            else:
                self.tally["opened"] += 1
                self.conns.append((reader, writer))
                return
        if writer:
            writer.close()

    async def check(self):
        tally = {"checked": 0, "check_errors": 0, "first_error": None}
        slots = asyncio.Semaphore(self.args.in_flight)

        async def one(reader, writer):
            async with slots:
                try:
                    await exchange(reader, writer, self.get, self.args.timeout)
                    tally["checked"] += 1
                except (Exception, asyncio.TimeoutError) as e:     # noqa: BLE001
                    tally["check_errors"] += 1
                    if tally["first_error"] is None:
                        tally["first_error"] = repr(e)[:300]

        started = time.monotonic()
        await asyncio.gather(*(one(r, w) for r, w in self.conns))
        tally["check_seconds"] = round(time.monotonic() - started, 2)
        return tally

    async def main(self):
        slots = asyncio.Semaphore(self.args.in_flight)
        started = time.monotonic()
        await asyncio.gather(*(self.open_one(slots) for _ in range(self.args.conns)))
        self.tally["open_seconds"] = round(time.monotonic() - started, 2)
        print(json.dumps(self.tally), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line.strip() == "check":
                print(json.dumps(await self.check()), flush=True)
            else:
                break
        for _, writer in self.conns:
            writer.close()
        for writer in self.waiting:
            writer.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--mode", choices=["http", "connect", "tcp"], default="http")
    parser.add_argument("--target", help="HOST:PORT: CONNECT's target and GET's Host")
    parser.add_argument("--auth", help="the Proxy-Authorization value (http, connect)")
    parser.add_argument("--in-flight", type=int, default=200, help="exchanges at once")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per step")
    args = parser.parse_args()
    if args.mode == "connect" and not args.target:
        parser.error("--mode connect needs --target")
    asyncio.run(Holder(args).main())


if __name__ == "__main__":
    main()
