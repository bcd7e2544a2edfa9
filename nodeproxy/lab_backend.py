"""Backend pod application for the lab: small servers whose answers make the proxy's work visible.

- HTTP_PORT: HTTP/1.1 keep-alive; every response body is "backend=<name> client=<ip>:<port>\\n", so a caller
  sees which endpoint answered and which source address that endpoint saw.
- ECHO_PORT: echoes bytes; on the peer's FIN it finishes echoing and then half-closes its own side.
- SINK_PORT: reads to EOF, then answers "<sha256 hex> <byte count>\\n" and closes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
from typing import cast

import uvloop

from nodeproxy.lab import ECHO_PORT, HTTP_PORT, SINK_PORT


class HttpResponder(asyncio.Protocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass it
        host, port = self.transport.get_extra_info("peername")[:2]
        body = f"backend={self.name} client={host}:{port}\n".encode()
        self.response = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            self.transport.write(self.response)
            if b"connection: close" in head.lower():
                self.transport.close()
                return
        if len(self.buffer) > 65536:
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


async def serve(name: str) -> None:
    loop = asyncio.get_running_loop()
    servers = [
        await loop.create_server(lambda: HttpResponder(name), "0.0.0.0", HTTP_PORT, backlog=8192),
        await loop.create_server(Echo, "0.0.0.0", ECHO_PORT, backlog=8192),
        await loop.create_server(Sink, "0.0.0.0", SINK_PORT, backlog=8192),
    ]
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
    args = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.name))


if __name__ == "__main__":
    main()
