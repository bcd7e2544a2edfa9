"""The mesh entry: how the HTTP engine's requests to pods on other nodes get into the mTLS tunnel.

The L4 path hands a captured client socket straight to the tunnel engine (nodeproxy/proxy/mesh.py). The
HTTP engine (nodeproxy/_l7.pyx) cannot: it owns the client connection, parses every request and chooses
an endpoint per request, and its upstream connections are pooled per (source pod, endpoint). So for an
endpoint on a peer node it connects, instead of to the pod, to this worker's mesh entry: a loopback
listener on an ephemeral port. Its first bytes are a PROXY protocol v2 header (the format HAProxy
defined; nothing of it is parsed by anyone else) naming the source pod and the endpoint, with a
per-process secret in a TLV. The entry reads exactly the header, decides the path as the L4 path does
(MeshDirectory.outbound_path) and adopts the socket into the tunnel as that pod's identity, asking it
to announce the open stream with one 0x00 byte. The engine sends its request only after that byte, so a
tunnel that cannot open (or a refusal here: a reset) is a connect failure of the attempt, which the
retry policy sends to another endpoint. From then on bytes flow engine -> loopback -> tunnel engine ->
TLS -> peer node -> pod, and a reset travels back the same way.

Why the token: any process of the node's network namespace can connect to a loopback port, and a
header naming a source pod would otherwise let it travel as that pod's identity. The token is random per
worker process and compared in constant time; a connection without it is reset.

:func:`parse_entry_header` is pure (bytes in, a header out); :class:`MeshEntry` does the I/O.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import NamedTuple

import structlog

from nodeproxy import _fastpath, _l7

log = structlog.get_logger("nodeproxy.mesh")

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_FIXED = 16  # signature, version/command, family, length
PROXY_V2_VERSION_PROXY = 0x21
PROXY_V2_TCP4 = 0x11
TLV_TOKEN = 0xE0  # the first of the types PROXY v2 leaves to applications (PP2_TYPE_MIN_CUSTOM)
TOKEN_BYTES = _l7.MESH_TOKEN_BYTES
# The engine's header is this long (checked at import: the parser and the engine must agree).
HEADER_BYTES = PROXY_V2_FIXED + 12 + 3 + TOKEN_BYTES
assert HEADER_BYTES == _l7.PROXY_V2_HEADER_BYTES, "nodeproxy._l7 writes another PROXY v2 header size"
# Largest header accepted (addresses + a few TLVs); a longer one is not ours.
MAX_HEADER_BYTES = 256
# How long a connection may take to deliver its header (the engine writes it with its first request,
# so it is normally there at accept); past it the connection is reset.
HEADER_TIMEOUT = 2.0
ACCEPT_BATCH = 128


class EntryHeader(NamedTuple):
    """Who the engine's upstream connection is for: the source pod and the endpoint."""

    source_ip: str
    destination_ip: str
    destination_port: int
    length: int  # bytes of the header on the wire (to consume before the payload)


class BadEntryHeader(ValueError):
    """The first bytes are not a PROXY v2 header from this process's engine."""


def parse_entry_header(data: bytes, token: bytes) -> EntryHeader | None:
    """The header at the start of `data`; None while it is incomplete; BadEntryHeader if it is not a
    PROXY v2 TCP/IPv4 header carrying `token` (or names no source or no port)."""
    if len(data) < PROXY_V2_FIXED:
        if not PROXY_V2_SIGNATURE.startswith(data[: len(PROXY_V2_SIGNATURE)]):
            raise BadEntryHeader("not a PROXY v2 header")
        return None
    if data[:12] != PROXY_V2_SIGNATURE:
        raise BadEntryHeader("not a PROXY v2 header")
    if data[12] != PROXY_V2_VERSION_PROXY or data[13] != PROXY_V2_TCP4:
        raise BadEntryHeader(f"PROXY v2 command/family {data[12]:#x}/{data[13]:#x}, not PROXY TCP4")
    length = PROXY_V2_FIXED + int.from_bytes(data[14:16], "big")
    if length > MAX_HEADER_BYTES or length < PROXY_V2_FIXED + 12:
        raise BadEntryHeader(f"PROXY v2 header of {length} bytes")
    if len(data) < length:
        return None
    source = str(ipaddress.IPv4Address(data[16:20]))
    destination = str(ipaddress.IPv4Address(data[20:24]))
    port = int.from_bytes(data[26:28], "big")
    found: bytes | None = None
    offset = PROXY_V2_FIXED + 12
    while offset < length:
        if offset + 3 > length:
            raise BadEntryHeader("truncated TLV")
        kind, size = data[offset], int.from_bytes(data[offset + 1 : offset + 3], "big")
        value = data[offset + 3 : offset + 3 + size]
        if len(value) != size or offset + 3 + size > length:
            raise BadEntryHeader("truncated TLV")
        if kind == TLV_TOKEN:
            found = value
        offset += 3 + size
    if found is None or not hmac.compare_digest(found, token):
        raise BadEntryHeader("no valid token: not this process's HTTP engine")
    if source == "0.0.0.0" or port == 0:
        raise BadEntryHeader(f"header names no source pod or no port ({source} -> {destination}:{port})")
    return EntryHeader(source, destination, port, length)


# Called with (entry conn id, socket fd, header); returns None when the fd was taken (into the tunnel),
# else the reason the connection is refused (the entry resets it).
EntryHandler = Callable[[int, int, EntryHeader], str | None]


class MeshEntry:
    """A worker's loopback listener for the HTTP engine's connections into the tunnel."""

    def __init__(self, handler: EntryHandler, host: str = "127.0.0.1") -> None:
        self.token = os.urandom(TOKEN_BYTES)
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))  # ephemeral: one entry per worker, found by its engine only
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.address: tuple[str, int] = self.sock.getsockname()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._next_id = 1 << 56  # apart from the listener's connection ids in the tunnel's records
        self.accepted = 0
        self.refused = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_accept)

    def close(self) -> None:
        loop = self._loop
        if loop is not None:
            loop.remove_reader(self.sock.fileno())
        for fd, (sock, timer) in list(self._waiting.items()):
            timer.cancel()
            if loop is not None:
                loop.remove_reader(fd)
            _reset(sock)
        self._waiting.clear()
        self.sock.close()

    def _on_accept(self) -> None:
        try:
            batch = _fastpath.accept_batch(self.sock.fileno(), ACCEPT_BATCH)
        except OSError as err:
            log.error("mesh entry accept failed", error=str(err))
            return
        for fd, *_ in batch:
            self._read_header(socket.socket(fileno=fd))

    def _read_header(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        try:
            data = sock.recv(MAX_HEADER_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            self._wait(sock)
            return
        except OSError as err:
            self._refuse(sock, f"read failed: {err}")
            return
        if not data:
            self._refuse(sock, "closed before its header")
            return
        try:
            header = parse_entry_header(data, self.token)
        except (BadEntryHeader, ValueError) as err:
            self._refuse(sock, str(err))
            return
        if header is None:
            self._wait(sock)
            return
        self._unwait(fd)
        sock.recv(header.length)  # exactly the header: the payload stays for the tunnel
        entry_id = self._next_id
        self._next_id += 1
        try:
            reason = self.handler(entry_id, fd, header)
        except Exception as err:  # one connection's failure must not lose the others
            log.exception("mesh entry handler failed")
            reason = f"internal error: {err}"
        if reason is not None:
            self._refuse(sock, reason, header)
            return
        sock.detach()  # the tunnel engine's now
        self.accepted += 1

    def _wait(self, sock: socket.socket) -> None:
        loop = self._loop
        fd = sock.fileno()
        if loop is None or fd in self._waiting:
            return
        timer = loop.call_later(HEADER_TIMEOUT, self._timed_out, fd)
        self._waiting[fd] = (sock, timer)
        loop.add_reader(fd, self._read_header, sock)

    def _unwait(self, fd: int) -> None:
        waiting = self._waiting.pop(fd, None)
        if waiting is not None:
            waiting[1].cancel()
            if self._loop is not None:
                self._loop.remove_reader(fd)

    def _timed_out(self, fd: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._refuse(waiting[0], f"no header within {HEADER_TIMEOUT} s")

    def _refuse(self, sock: socket.socket, reason: str, header: EntryHeader | None = None) -> None:
        self._unwait(sock.fileno())
        self.refused += 1
        log.warning(
            "mesh entry refused a connection",
            reason=reason,
            source=header.source_ip if header else None,
            destination=f"{header.destination_ip}:{header.destination_port}" if header else None,
        )
        _reset(sock)


def _reset(sock: socket.socket) -> None:
    """Close with an RST before the open byte: the engine's attempt fails to connect (retried elsewhere)."""
    _fastpath.reset_and_close(sock.detach())
