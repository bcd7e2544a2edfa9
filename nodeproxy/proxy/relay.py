"""Python side of the native relay: a pool of RelayWorker threads and their completion records."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from enum import IntEnum
from typing import NamedTuple

from nodeproxy import _fastpath


class Ending(IntEnum):
    """How a relayed connection ended (the worker's completion kinds)."""

    CLOSED = _fastpath.CLOSED
    CLIENT_RESET = _fastpath.CLIENT_RESET
    UPSTREAM_RESET = _fastpath.UPSTREAM_RESET
    CONNECT_FAILED = _fastpath.CONNECT_FAILED
    CONNECT_TIMEOUT = _fastpath.CONNECT_TIMEOUT
    ABORTED = _fastpath.ABORTED
    IDLE_TIMEOUT = _fastpath.IDLE_TIMEOUT
    # This host ran short (EMFILE/ENFILE, memory, socket buffers) mid-connection: not a peer's reset.
    LOCAL_RESOURCES = _fastpath.LOCAL_RESOURCES

    @property
    def connect_failed(self) -> bool:
        return self in (Ending.CONNECT_FAILED, Ending.CONNECT_TIMEOUT)

    @property
    def local(self) -> bool:
        """The proxy itself ended the connection for want of resources."""
        return self is Ending.LOCAL_RESOURCES


# The descriptor budget of the relay, for sizing connection limits against RLIMIT_NOFILE: one connection
# holds at most FDS_PER_CONNECTION_MAX descriptors at once (its two sockets, and a pipe of two fds per
# direction while bytes are in flight); each relay thread holds FDS_PER_RELAY_THREAD whatever its load
# (epoll, eventfd, and up to 128 empty pipes kept for reuse).
FDS_PER_CONNECTION_MAX: int = _fastpath.FDS_PER_CONNECTION_MAX
FDS_PER_RELAY_THREAD: int = _fastpath.WORKER_FDS + _fastpath.PIPE_POOL_FDS_MAX


class Completion(NamedTuple):
    conn_id: int
    ending: int
    err: int
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client
    client_fd: int  # >= 0 only when the connect failed: the caller owns the client socket again


class RelayPool:
    """N relay workers, each on its own thread; connections are spread over them round robin."""

    def __init__(self, threads: int, pipe_size: int) -> None:
        # One eventfd wakes the asyncio loop for completions from any worker.
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.workers = [_fastpath.RelayWorker(self.notify_fd, pipe_size) for _ in range(threads)]
        self._threads = [
            threading.Thread(target=w.run, name=f"nodeproxy-relay-{i}", daemon=True)
            for i, w in enumerate(self.workers)
        ]
        self._next = 0

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def next_worker(self) -> _fastpath.RelayWorker:
        worker = self.workers[self._next]
        self._next = (self._next + 1) % len(self.workers)
        return worker

    @property
    def live_connections(self) -> int:
        return sum(w.live_connections for w in self.workers)

    def completions(self) -> Iterator[Completion]:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.notify_fd)
        for worker in self.workers:
            for record in worker.drain():
                yield Completion._make(record)

    @property
    def fds_reserved(self) -> int:
        """Descriptors the pool's threads may hold apart from their connections' (and its notify eventfd)."""
        return 1 + FDS_PER_RELAY_THREAD * len(self.workers)

    def stop(self, timeout: float = 5.0) -> list[Completion]:
        """Stop the workers (live connections are reset) and return their last records."""
        for worker in self.workers:
            worker.stop()
        for t in self._threads:
            t.join(timeout)
        records = list(self.completions())
        os.close(self.notify_fd)
        return records
