"""Backend pod application for the lab: small servers whose answers make the proxy's work visible.

- HTTP_PORT (or --http-port): HTTP/1.1 keep-alive; every response body is
  "backend=<name> client=<ip>:<port>\\n", so a caller sees which endpoint answered and which source address
  that endpoint saw.
- ECHO_PORT: echoes bytes; on the peer's FIN it finishes echoing and then half-closes its own side.
- SINK_PORT: reads to EOF, then answers "<sha256 hex> <byte count>\\n" and closes.

The HTTP server can misbehave on purpose, for the resilience scenarios (docs/resilience.md): a
:class:`Behaviour` says which status to answer, how long to wait first and whether to answer at all
(close or reset the connection after reading the head, close it halfway through the response, or never
answer). It comes from `--behaviour JSON`, else the environment variable NP_LAB_BEHAVIOUR, else the
default (200 at once, as before these options existed); with `--behaviour-file PATH` the file's JSON
replaces it and is read again whenever the file changes, so a test can turn an endpoint bad and good
again while it runs (write it with :func:`write_behaviour`: atomically). `--request-log PATH` appends one
JSON line per request as it arrives (CLOCK_MONOTONIC time, comparable with the test's
``time.monotonic()`` on the same machine), so a test can count the attempts each endpoint saw and when.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import IO, Literal, cast, get_args

import uvloop

from nodeproxy.lab import ECHO_PORT, HTTP_PORT, SINK_PORT

BEHAVIOUR_ENV = "NP_LAB_BEHAVIOUR"
# Largest request head kept while waiting for its end; a longer one closes the connection.
MAX_HEAD_BYTES = 65536
# Largest chunk-size line of a chunked request body.
MAX_CHUNK_LINE = 1024

Action = Literal["answer", "close-after-head", "reset-after-head", "close-mid-response", "hang"]
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the HTTP server treats each request (defaults: answer 200 at once).

    - status: the status answered (also by close-mid-response, whose head announces the whole body);
    - delay_ms: waited after the request arrived, before the action;
    - action: answer; close-after-head (FIN without a response); reset-after-head (RST); close-mid-response
      (the head and half the body, then FIN); hang (never answer, keep the connection open).
    """

    status: int = 200
    delay_ms: float = 0.0
    action: Action = "answer"

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599 or isinstance(self.status, bool):
            raise ValueError(f"status must be 100..599, got {self.status!r}")
        if not 0 <= self.delay_ms <= 3_600_000:
            raise ValueError(f"delay_ms must be 0..3600000, got {self.delay_ms!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {self.action!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Behaviour:
        unknown = set(data) - {"status", "delay_ms", "action"}
        if unknown:
            raise ValueError(f"unknown behaviour keys: {', '.join(sorted(unknown))}")
        status = data.get("status", 200)
        delay_ms = data.get("delay_ms", 0.0)
        action = data.get("action", "answer")
        if (
            not isinstance(status, int)
            or not isinstance(delay_ms, int | float)
            or not isinstance(action, str)
        ):
            raise ValueError(f"behaviour has a value of the wrong type: {dict(data)!r}")
        return cls(status, float(delay_ms), cast(Action, action))

    @classmethod
    def parse(cls, text: str) -> Behaviour:
        """A behaviour from JSON text; empty text is the default."""
        if not text.strip():
            return cls()
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a behaviour is a JSON object, got {text!r}")
        return cls.from_mapping(data)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def write_behaviour(path: Path, behaviour: Behaviour) -> None:
    """Replace the behaviour file atomically (a backend never reads a half-written one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(behaviour.to_json())
    os.replace(tmp, path)


class BehaviourSource:
    """The current behaviour: the file's when there is one, else `fallback`.

    The file is stat()ed per request (cheap) and read again when its identity, size or mtime changed.
    A file that cannot be parsed keeps the previous behaviour and is reported on stderr once per change.
    """

    def __init__(self, fallback: Behaviour, path: Path | None = None) -> None:
        self.fallback = fallback
        self.path = path
        self._seen: tuple[int, int, int, int] | None = None
        self._current = fallback

    def current(self) -> Behaviour:
        if self.path is None:
            return self._current
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._seen, self._current = None, self.fallback
            return self._current
        key = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
        if key != self._seen:
            self._seen = key
            try:
                self._current = Behaviour.parse(self.path.read_text())
            except (OSError, ValueError) as err:
                print(f"lab_backend: bad behaviour file {self.path}: {err}", file=sys.stderr, flush=True)
        return self._current


class RequestLog:
    """One JSON line per request; line-buffered so a test reads it while the server runs."""

    def __init__(self, name: str, out: IO[str] | None) -> None:
        self.name = name
        self.out = out

    def record(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: int | None,
        b: Behaviour,
        body_sha256: str | None = None,
    ) -> None:
        if self.out is None:
            return
        entry = {
            "t": time.monotonic(),
            "name": self.name,
            "method": method,
            "target": target,
            "body_bytes": body,  # None: not read (the request died with its head)
            "body_sha256": body_sha256,
            "status": b.status,
            "action": b.action,
            "delay_ms": b.delay_ms,
            # The x- headers carry the test's own tags and the proxy's x-nodeproxy-timeout-ms.
            "headers": {k: v for k, v in headers.items() if k.startswith("x-")},
        }
        self.out.write(json.dumps(entry) + "\n")


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]
    keep_alive: bool


class HttpResponder(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining, one request at a time per connection (responses in order);
    request bodies (Content-Length or chunked) are read and counted, never answered early."""

    def __init__(self, name: str, source: BehaviourSource, log: RequestLog) -> None:
        self.name = name
        self.source = source
        self.log = log
        self.buffer = b""
        self.request: _Request | None = None  # head read, body not complete yet
        self.body_left = 0  # Content-Length bytes still to read
        self.chunked = False
        self.body_bytes = 0
        self.body_digest = hashlib.sha256()
        self.crlf_left = 0  # bytes of the CRLF after a chunk's data still to skip
        self.busy = False  # a response is waiting for its delay
        self.closed = False
        self.hanging = False
        self.peer_done = False  # the client half-closed: answer what it sent, then close

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        host, port = self.transport.get_extra_info("peername")[:2]
        self.body = f"backend={self.name} client={host}:{port}\n".encode()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.hanging:
            return  # read and drop: a hung server still drains its socket
        self.buffer += data
        self._process()

    def eof_received(self) -> bool:
        self.peer_done = True
        self._process()
        return True  # keep the transport: requests read before the EOF may still be answered

    def _process(self) -> None:
        self._serve_buffered()
        if self.peer_done and not self.busy and not self.closed and not self.hanging:
            self._close()  # everything the client sent before its EOF is answered

    def _serve_buffered(self) -> None:
        while not self.busy and not self.closed and not self.hanging:
            if self.request is None:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buffer) > MAX_HEAD_BYTES:
                        self._close()
                    return
                head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
                if not self._start_request(head):
                    self._close()
                    return
                assert self.request is not None
                behaviour = self.source.current()
                if behaviour.action in ("close-after-head", "reset-after-head"):
                    # The request dies with its head read: the proxy sees no response at all.
                    self.log.record(
                        self.request.method, self.request.target, self.request.headers, None, behaviour
                    )
                    self._after_delay(behaviour, functools.partial(self._die, behaviour))
                    return
            if not self._read_body():
                return
            request, self.request = self.request, None
            assert request is not None
            behaviour = self.source.current()
            self.log.record(
                request.method,
                request.target,
                request.headers,
                self.body_bytes,
                behaviour,
                self.body_digest.hexdigest(),
            )
            self._after_delay(behaviour, functools.partial(self._respond, request, behaviour))

    def _start_request(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return False
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (parts[2] == "HTTP/1.1" or "keep-alive" in connection)
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length", "0")
        if not length.isdigit():
            return False
        self.body_left = 0 if self.chunked else int(length)
        self.body_bytes = 0
        self.body_digest = hashlib.sha256()
        self.crlf_left = 0
        self.request = _Request(parts[0], parts[1], headers, keep_alive)
        return True

    def _read_body(self) -> bool:
        """Consume the current request's body from the buffer; True once it is complete."""
        if not self.chunked:
            self._take_body_data()
            return self.body_left == 0
        while True:
            if self.body_left > 0:  # inside a chunk's data
                self._take_body_data()
                if self.body_left > 0:
                    return False
                self.crlf_left = 2
                continue
            if self.crlf_left > 0:  # the CRLF that ends a chunk's data
                taken = min(self.crlf_left, len(self.buffer))
                self.buffer = self.buffer[taken:]
                self.crlf_left -= taken
                if self.crlf_left > 0:
                    return False
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                if len(self.buffer) > MAX_CHUNK_LINE:
                    self._close()
                return False
            line, rest = self.buffer[:end], self.buffer[end + 2 :]
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._close()
                return False
            if size == 0:  # last chunk: skip the trailer section up to its empty line
                if rest.startswith(b"\r\n"):
                    self.buffer = rest[2:]
                    return True
                trailer_end = rest.find(b"\r\n\r\n")
                if trailer_end < 0:
                    return False
                self.buffer = rest[trailer_end + 4 :]
                return True
            self.buffer = rest
            self.body_left = size

    def _take_body_data(self) -> None:
        """Move up to body_left bytes of body data from the buffer into the count and the digest."""
        taken = min(self.body_left, len(self.buffer))
        self.body_digest.update(self.buffer[:taken])
        self.buffer = self.buffer[taken:]
        self.body_left -= taken
        self.body_bytes += taken

    def _after_delay(self, behaviour: Behaviour, action: Callable[[], None]) -> None:
        if behaviour.delay_ms <= 0:
            action()
            return
        self.busy = True
        due = time.monotonic() + behaviour.delay_ms / 1000
        asyncio.get_running_loop().call_later(behaviour.delay_ms / 1000, self._delayed, action, due)

    def _delayed(self, action: Callable[[], None], due: float) -> None:
        # uvloop's timers run on libuv's millisecond clock, cached per loop turn: they may fire up to about
        # a millisecond before `due`. The behaviour promises at least delay_ms: wait out the rest.
        left = due - time.monotonic()
        if left > 0:
            asyncio.get_running_loop().call_later(left + 0.0005, self._delayed, action, due)
            return
        self.busy = False
        if not self.closed:
            action()
            self._process()

    def _response(self, status: int, keep_alive: bool) -> tuple[bytes, bytes]:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(self.body)}\r\n"
            + ("" if keep_alive else "Connection: close\r\n")
            + "\r\n"
        ).encode()
        return head, self.body

    def _respond(self, request: _Request, behaviour: Behaviour) -> None:
        if behaviour.action == "hang":
            self.hanging = True
            self.buffer = b""
            return
        head, body = self._response(behaviour.status, request.keep_alive)
        if behaviour.action == "close-mid-response":
            self.transport.write(head + body[: len(body) // 2])
            self._close()
            return
        self.transport.write(head + body)
        if not request.keep_alive:
            self._close()

    def _die(self, behaviour: Behaviour) -> None:
        if behaviour.action == "reset-after-head":
            sock = self.transport.get_extra_info("socket")
            if sock is not None:  # SO_LINGER 0: close() sends RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.closed = True
            self.transport.abort()
            return
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.transport.close()


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        # Backpressure: stop reading while our peer is not reading our echo.
        if self.transport.get_write_buffer_size() > 4 << 20:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        # False: the transport closes itself once the echo still buffered is written, so our FIN follows
        # the last byte. Keeping it open (True) after write_eof() leaked the socket: nothing closed it.
        return False


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        self.digest = hashlib.sha256()
        self.count = 0

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def eof_received(self) -> bool:
        self.transport.write(f"{self.digest.hexdigest()} {self.count}\n".encode())
        self.transport.close()
        return True


async def serve(
    name: str,
    source: BehaviourSource | None = None,
    log: RequestLog | None = None,
    http_port: int = HTTP_PORT,
    http_only: bool = False,
    host: str = "0.0.0.0",
) -> None:
    loop = asyncio.get_running_loop()
    behaviour = source or BehaviourSource(Behaviour())
    request_log = log or RequestLog(name, None)
    servers = [
        await loop.create_server(
            lambda: HttpResponder(name, behaviour, request_log), host, http_port, backlog=8192
        )
    ]
    if not http_only:
        servers.append(await loop.create_server(Echo, host, ECHO_PORT, backlog=8192))
        servers.append(await loop.create_server(Sink, host, SINK_PORT, backlog=8192))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--http-port", type=int, default=HTTP_PORT, help=f"default {HTTP_PORT}")
    parser.add_argument("--http-only", action="store_true", help="serve HTTP only (no echo, no sink)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: the pod's)")
    parser.add_argument(
        "--behaviour",
        default=None,
        help=f"JSON, e.g. '{{\"status\": 503}}' (default: ${BEHAVIOUR_ENV}, else answer 200 at once)",
    )
    parser.add_argument(
        "--behaviour-file", type=Path, default=None, help="JSON behaviour, read again whenever it changes"
    )
    parser.add_argument("--request-log", type=Path, default=None, help="append a JSON line per request")
    args = parser.parse_args()
    try:
        fallback = Behaviour.parse(
            args.behaviour if args.behaviour is not None else os.environ.get(BEHAVIOUR_ENV, "")
        )
    except ValueError as err:
        parser.error(f"bad behaviour: {err}")
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log_file = args.request_log.open("a", buffering=1) if args.request_log else None
    try:
        uvloop.run(
            serve(
                args.name,
                BehaviourSource(fallback, args.behaviour_file),
                RequestLog(args.name, log_file),
                args.http_port,
                args.http_only,
                args.host,
            )
        )
    finally:
        if log_file is not None:
            log_file.close()


if __name__ == "__main__":
    main()
