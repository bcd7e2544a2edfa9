"""The native relay on its own: a RelayWorker thread relaying real TCP sockets inside a test namespace."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeproxy import _fastpath, netns
from nodeproxy.proxy.relay import Completion, Ending

pytestmark = pytest.mark.netns

# Sizes around the relay's thresholds: BULK_EXIT (4 KiB), COPY_SIZE (16 KiB), a default pipe (64 KiB).
SIZES = st.sampled_from([1, 7, 4095, 4096, 4097, 16383, 16384, 16385, 65536, 65537, 300_000])


@dataclass
class Rig:
    ns: str
    worker: _fastpath.RelayWorker
    notify_fd: int
    front: socket.socket  # where "captured" clients connect; accepted sockets go to the worker
    back: socket.socket  # the upstream server
    next_id: int = 1
    records: dict[int, Completion] = field(default_factory=dict)

    def pair(self, timeout_ms: int = 2000) -> tuple[socket.socket, socket.socket, int]:
        """A client socket and the server socket it is relayed to, plus the connection id."""
        conn_id, self.next_id = self.next_id, self.next_id + 1
        with netns.entered(self.ns):
            client = socket.create_connection(self.front.getsockname(), timeout=10)
            accepted, _ = self.front.accept()
            self.worker.connect(
                conn_id, accepted.detach(), "127.0.0.1", self.back.getsockname()[1], timeout_ms
            )
        server, _ = self.back.accept()
        server.settimeout(10)
        return client, server, conn_id

    def completion(self, conn_id: int, timeout: float = 10.0) -> Completion:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.notify_fd)
            for record in self.worker.drain():
                self.records[record[0]] = Completion._make(record)
            if conn_id in self.records:
                return self.records.pop(conn_id)
            select.select([self.notify_fd], [], [], 0.05)
        raise AssertionError(f"no completion for connection {conn_id}")


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    ns = f"npt{secrets.token_hex(2)}-fp"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    worker = _fastpath.RelayWorker(notify_fd)
    thread = threading.Thread(target=worker.run)
    try:
        netns.run(ns, ["ip", "link", "set", "lo", "up"])
        with netns.entered(ns):
            front = socket.create_server(("127.0.0.1", 0), backlog=64)
            back = socket.create_server(("127.0.0.1", 0), backlog=64)
        front.settimeout(10)
        back.settimeout(10)
        thread.start()
        yield Rig(ns, worker, notify_fd, front, back)
        front.close()
        back.close()
    finally:
        worker.stop()
        if thread.is_alive():
            thread.join(10)
        os.close(notify_fd)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(1 << 20, size - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {size} bytes"
        buf += chunk
    return bytes(buf)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    exchanges=st.lists(st.tuples(st.booleans(), SIZES), min_size=1, max_size=8),
    client_closes_first=st.booleans(),
)
def test_bytes_and_half_closes_arrive_intact(
    rig: Rig, exchanges: list[tuple[bool, int]], client_closes_first: bool
) -> None:
    client, server, conn_id = rig.pair()
    up = down = 0
    with client, server:
        for upward, size in exchanges:
            data = secrets.token_bytes(size)
            src, dst = (client, server) if upward else (server, client)
            sender = threading.Thread(target=src.sendall, args=(data,))
            sender.start()
            assert recv_exactly(dst, size) == data
            sender.join()
            up, down = (up + size, down) if upward else (up, down + size)
        first, second = (client, server) if client_closes_first else (server, client)
        first.shutdown(socket.SHUT_WR)
        assert second.recv(1) == b""  # the FIN went through
        second.sendall(b"late")  # the other direction still works after a half-close
        assert recv_exactly(first, 4) == b"late"
        second.shutdown(socket.SHUT_WR)
        assert first.recv(1) == b""
    if client_closes_first:
        down += 4
    else:
        up += 4
    done = rig.completion(conn_id)
    assert (Ending(done.ending), done.bytes_up, done.bytes_down, done.client_fd) == (
        Ending.CLOSED,
        up,
        down,
        -1,
    )


def test_refused_connect_hands_the_client_back(rig: Rig) -> None:
    with netns.entered(rig.ns):
        unused = socket.create_server(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        unused.close()
        client = socket.create_connection(rig.front.getsockname(), timeout=10)
        accepted, _ = rig.front.accept()
        fd = accepted.detach()
        rig.worker.connect(999_001, fd, "127.0.0.1", port, 2000)
    done = rig.completion(999_001)
    assert Ending(done.ending) is Ending.CONNECT_FAILED and done.err == 111  # ECONNREFUSED
    assert done.client_fd >= 0
    # The socket comes back untouched: the caller can still use it.
    returned = socket.socket(fileno=done.client_fd)
    with client, returned:
        returned.sendall(b"still yours")
        assert recv_exactly(client, 11) == b"still yours"


def test_connect_timeout_hands_the_client_back(rig: Rig) -> None:
    drop = ["iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"]
    netns.run(rig.ns, drop)
    try:
        with netns.entered(rig.ns):
            client = socket.create_connection(rig.front.getsockname(), timeout=10)
            accepted, _ = rig.front.accept()
            rig.worker.connect(999_002, accepted.detach(), "127.0.0.1", 9, 200)
        done = rig.completion(999_002)
        assert Ending(done.ending) is Ending.CONNECT_TIMEOUT and done.client_fd >= 0
        os.close(done.client_fd)
        client.close()
    finally:
        netns.run(rig.ns, ["iptables", "-D", *drop[2:]])


def test_reset_is_reported_and_propagated(rig: Rig) -> None:
    import struct

    client, server, conn_id = rig.pair()
    with client, server:
        client.sendall(b"x")
        assert recv_exactly(server, 1) == b"x"
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(ConnectionResetError):
            client.recv(1)
    done = rig.completion(conn_id)
    assert Ending(done.ending) is Ending.UPSTREAM_RESET and done.err == 104  # ECONNRESET
    assert done.bytes_up == 1
