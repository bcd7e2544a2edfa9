"""Fixed-rate HTTP/1.1 latency client: prints percentiles of request → response time as JSON.

Open-loop-ish: request i is due at start + i/rate, dealt round-robin over `connections` keep-alive
connections. A connection sends its next request when it is due, or as soon as the previous response has
arrived if that is later (HTTP/1.1 without pipelining cannot do better); `behind_schedule_p99_us` shows how
far sends slipped. Each latency is measured from the send to the end of the response body with
time.perf_counter_ns, so event-loop timer granularity does not inflate it. The run is bounded: exactly
rate * duration requests, each with a timeout, and at most duration + timeout + 1 seconds overall.

With `--new-connections`, every request opens a connection of its own at its due time, sends the request
with `Connection: close`, reads the response and waits for the server's FIN (as wrk does with that
header); its latency runs from the start of the connect to the end of the response. At most
`--connections` are open at once (a request due while the cap is reached waits and counts as behind
schedule), so a stalled path cannot make the client open connections without bound.

    python bench/latency.py --host 10.96.0.10 --port 80 --rate 1000 --connections 8 --duration 5
    python bench/latency.py --host 10.96.0.10 --port 80 --rate 2000 --new-connections --duration 5

Standalone on purpose (standard library and uvloop only): bench.run starts it inside a client pod's
network namespace with `ip netns exec`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvloop

# What one failed request may raise (IncompleteReadError is an EOFError); anything else is a bug.
REQUEST_ERRORS = (OSError, TimeoutError, ValueError, EOFError, asyncio.LimitOverrunError)


@dataclass
class Tally:
    latencies_ns: list[int] = field(default_factory=list)
    behind_ns: list[int] = field(default_factory=list)
    sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, err: BaseException) -> None:
        name = type(err).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def read_response(reader: asyncio.StreamReader) -> int:
    """Read one response with a Content-Length body; returns the status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, _, rest = head.partition(b"\r\n")
    status = int(status_line.split(b" ", 2)[1])
    length = 0
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if length:
        await reader.readexactly(length)
    return status


async def connection_loop(
    host: str,
    port: int,
    offsets_ns: Sequence[int],
    request: bytes,
    timeout: float,
    start: asyncio.Future[int],
    tally: Tally,
) -> None:
    """On one connection, send a request at each offset after the start time, one after the other."""
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    with contextlib.suppress(OSError, TimeoutError):  # retried (and counted) at the first request
        streams = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    t0 = await start
    for offset in offsets_ns:
        due = t0 + offset
        delay = due - time.perf_counter_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        try:
            if streams is None:  # not connected yet, or the previous request broke the connection
                streams = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            reader, writer = streams
            sent = time.perf_counter_ns()
            tally.sent += 1
            tally.behind_ns.append(max(0, sent - due))
            writer.write(request)
            status = await asyncio.wait_for(read_response(reader), timeout)
            elapsed = time.perf_counter_ns() - sent
            if status != 200:
                raise ValueError(f"HTTP {status}")
            tally.latencies_ns.append(elapsed)
        except REQUEST_ERRORS as err:
            tally.fail(err)
            if streams is not None:
                streams[1].close()
            streams = None
    if streams is not None:
        streams[1].close()


async def new_connection_request(
    host: str, port: int, request: bytes, due: int, timeout: float, tally: Tally
) -> None:
    """One request on a connection of its own: connect, send, read the response and the server's FIN."""
    writer: asyncio.StreamWriter | None = None
    try:
        started = time.perf_counter_ns()
        tally.sent += 1
        tally.behind_ns.append(max(0, started - due))
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            status = await read_response(reader)
            elapsed = time.perf_counter_ns() - started
            if await reader.read(1):
                raise ValueError("data after the response on a Connection: close request")
        if status != 200:
            raise ValueError(f"HTTP {status}")
        tally.latencies_ns.append(elapsed)
    except REQUEST_ERRORS as err:
        tally.fail(err)
    finally:
        if writer is not None:
            writer.close()


async def new_connections_loop(
    host: str,
    port: int,
    offsets_ns: Sequence[int],
    request: bytes,
    timeout: float,
    max_open: int,
    t0: int,
    tally: Tally,
) -> None:
    """Start one new-connection request at each offset after t0, with at most max_open in flight."""
    in_flight: set[asyncio.Task[None]] = set()
    for offset in offsets_ns:
        due = t0 + offset
        delay = due - time.perf_counter_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        while len(in_flight) >= max_open:
            await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(new_connection_request(host, port, request, due, timeout, tally))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
    if in_flight:
        await asyncio.wait(in_flight)


def percentile(sorted_values: Sequence[int], pct: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def measure(
    host: str,
    port: int,
    rate: float,
    connections: int,
    duration: float,
    timeout: float,
    path: str,
    new_connections: bool = False,
) -> dict[str, object]:
    total = max(1, round(rate * duration))
    close = "Connection: close\r\n" if new_connections else ""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: nodeproxy-bench\r\n{close}\r\n".encode()
    tally = Tally()
    start: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    offsets = [round(i * 1e9 / rate) for i in range(total)]
    if new_connections:
        t0 = time.perf_counter_ns()
        start.set_result(t0)
        tasks = [
            asyncio.create_task(
                new_connections_loop(host, port, offsets, request, timeout, connections, t0, tally)
            )
        ]
    else:
        # Request i goes on connection i % connections, due i/rate seconds after the start.
        tasks = [
            asyncio.create_task(
                connection_loop(host, port, offsets[c::connections], request, timeout, start, tally)
            )
            for c in range(connections)
        ]
        await asyncio.sleep(0.2)  # connections are opened before the clock starts
        t0 = time.perf_counter_ns()
        start.set_result(t0)
    # Bounded even when every request times out: whatever is not done by then counts as failed.
    _, late = await asyncio.wait(tasks, timeout=duration + timeout + 1)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed_s = (time.perf_counter_ns() - t0) / 1e9
    lat = sorted(tally.latencies_ns)
    behind = sorted(tally.behind_ns)
    us = 1000.0
    return {
        "target": f"{host}:{port}",
        "mode": "new connections" if new_connections else "keep-alive",
        "rate": rate,
        "connections": connections,
        "duration_s": duration,
        "requests": total,
        "sent": tally.sent,
        "ok": len(lat),
        "failed": total - len(lat),
        "gave_up": bool(late),
        "errors": tally.errors,
        "achieved_rate": round(len(lat) / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "p50_us": percentile(lat, 50) / us,
        "p90_us": percentile(lat, 90) / us,
        "p99_us": percentile(lat, 99) / us,
        "max_us": (lat[-1] if lat else 0) / us,
        "mean_us": round(sum(lat) / len(lat) / us, 1) if lat else 0.0,
        "behind_schedule_p99_us": percentile(behind, 99) / us,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--path", default="/")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second (default 1000)")
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="keep-alive connections; with --new-connections the most open at once (default 8)",
    )
    parser.add_argument(
        "--new-connections",
        action="store_true",
        help="a new connection per request, with Connection: close",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-request timeout in seconds")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.connections <= 0 or args.duration <= 0:
        parser.error("--rate, --connections and --duration must be positive")
    result = uvloop.run(
        measure(
            args.host,
            args.port,
            args.rate,
            args.connections,
            args.duration,
            args.timeout,
            args.path,
            args.new_connections,
        )
    )
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
