"""Socket helpers for tests: clients and servers created inside lab namespaces."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nodeproxy import netns


def connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    with netns.entered(ns):
        return socket.create_connection((host, port), timeout=timeout)


def listen(ns: str, port: int, host: str = "0.0.0.0") -> socket.socket:
    with netns.entered(ns):
        server = socket.create_server((host, port), backlog=128)
    server.settimeout(10)
    return server


def recv_all(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    chunks = []
    total = 0
    while total < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def http_get(ns: str, host: str, port: int = 80) -> str:
    with connect(ns, host, port) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = recv_all(sock).decode()
    return response.split("\r\n\r\n", 1)[1]


def pattern(size: int, seed: int = 7) -> bytes:
    """Deterministic, incompressible-looking data."""
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def stream_echo(sock: socket.socket, total: int, chunk: bytes) -> tuple[str, str, int]:
    """Send `total` bytes (chunk repeated) while reading the echo.

    Returns (sha256 sent, sha256 received, bytes received)."""
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            left = total
            view = memoryview(chunk)
            while left > 0:
                piece = view[: min(len(chunk), left)]
                sock.sendall(piece)
                sent_hash.update(piece)
                left -= len(piece)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as err:  # surfaced in the main thread
            errors.append(err)

    thread = threading.Thread(target=sender)
    thread.start()
    received = 0
    buf = bytearray(1 << 20)
    while True:
        n = sock.recv_into(buf)
        if n == 0:
            break
        recv_hash.update(memoryview(buf)[:n])
        received += n
    thread.join()
    if errors:
        raise errors[0]
    return sent_hash.hexdigest(), recv_hash.hexdigest(), received


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (e.g. a nodeproxy supervisor's workers)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(child) for child in text.split()]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `predicate` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
