"""The outbound listener: accepts captured connections, asks `decide` where each goes, and hands the
socket pair to the relay. Only this layer does I/O; the decision is nodeproxy.proxy.outbound.decide."""

from __future__ import annotations

import asyncio
import errno
import itertools
import resource
import socket
import time
from dataclasses import dataclass, field

import structlog

from nodeproxy import _fastpath
from nodeproxy.balance import Endpoint
from nodeproxy.config import RelayConfig
from nodeproxy.proxy.outbound import Passthrough, Refuse, ToEndpoint, decide
from nodeproxy.proxy.relay import Completion, Ending, RelayPool
from nodeproxy.state.routing import StateUpdater

log = structlog.get_logger("nodeproxy.outbound")
IP_TRANSPARENT = 19
# Failures of our own resources, not of the endpoint: trying another endpoint cannot help.
LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
# Descriptors budgeted per connection when deriving a worker's connection cap from its fd limit: two
# sockets always, pipes (two fds each) only while bytes are in flight.
FDS_PER_CONNECTION = 3
FDS_RESERVED = 256
ACCEPT_BATCH = 128
ACCEPT_PAUSE_ON_EMFILE = 0.1  # seconds; a listener stays readable while we cannot accept, so back off


def open_listener(address: tuple[str, int], backlog: int = 65535) -> socket.socket:
    """A transparent listener; SO_REUSEPORT lets each worker have its own, and the kernel spreads new
    connections over them by 4-tuple hash (also for TPROXY's socket lookup), so no worker hogs them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # TPROXY hands us connections addressed to other hosts; the listener must be transparent to take them.
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    _fastpath.set_socket_options(sock.fileno())  # inherited by every accepted socket
    sock.bind(address)
    sock.listen(backlog)
    return sock


@dataclass(slots=True)
class Connection:
    """A captured connection on its way through the proxy (Python only tracks it, the relay moves it)."""

    id: int
    client_fd: int
    client_ip: str
    client_port: int
    orig_ip: str
    orig_port: int
    started: float
    worker: _fastpath.RelayWorker
    service: str | None = None
    endpoint: Endpoint | None = None
    target: tuple[str, int] | None = None
    tried: set[str] = field(default_factory=set)

    def log_fields(self) -> dict[str, object]:
        """What every access-log line about this connection says."""
        return {
            "conn": self.id,
            "src": f"{self.client_ip}:{self.client_port}",
            "dst": f"{self.orig_ip}:{self.orig_port}",
            "service": self.service,
            "upstream": f"{self.target[0]}:{self.target[1]}" if self.target else None,
        }


@dataclass
class ListenerStats:
    accepted: int = 0
    refused: int = 0
    connect_failures: int = 0
    closed: dict[str, int] = field(default_factory=dict)


class OutboundListener:
    def __init__(
        self,
        address: tuple[str, int],
        relay: RelayConfig,
        updater: StateUpdater,
        pool: RelayPool,
        access_log: bool = True,
        worker: int = 0,
        workers: int = 1,
    ) -> None:
        self.address = address
        self.relay_config = relay
        self.updater = updater
        self.pool = pool
        self.access_log = access_log
        self.connections: dict[int, Connection] = {}
        self.stats = ListenerStats()
        self.workers = workers
        # Interleaved so connection ids are unique across all workers of the daemon.
        self._ids = itertools.count(worker + 1, workers)
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.fd_connection_cap = max(1, (fd_limit - FDS_RESERVED) // FDS_PER_CONNECTION)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # set once the relay stops: connect failures are then refused, not retried

    def start(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Serve `sock` (this worker's SO_REUSEPORT listener from open_listener) on `loop`."""
        sock.setblocking(False)
        self._sock, self._loop = sock, loop
        loop.add_reader(sock.fileno(), self._on_acceptable)
        loop.add_reader(self.pool.notify_fd, self._on_completions)

    def stop_accepting(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self.stop_accepting()
        if self._loop is not None:
            self._loop.remove_reader(self.pool.notify_fd)
        self._closing = True
        for record in self.pool.stop():
            self._on_completion(record)

    @property
    def connection_cap(self) -> int:
        """New connections beyond this are reset: this worker's share of relay.max_connections, and never
        more than its descriptor limit allows (EMFILE mid-connect would fail connections at random)."""
        return min(max(1, self.relay_config.max_connections // self.workers), self.fd_connection_cap)

    # -- accepting -------------------------------------------------------------------------------------

    def _on_acceptable(self) -> None:
        assert self._sock is not None and self._loop is not None
        try:
            batch = _fastpath.accept_batch(self._sock.fileno(), ACCEPT_BATCH)
        except OSError as err:
            log.error("accept failed; pausing the listener", error=str(err), pause_s=ACCEPT_PAUSE_ON_EMFILE)
            fd = self._sock.fileno()
            self._loop.remove_reader(fd)
            self._loop.call_later(ACCEPT_PAUSE_ON_EMFILE, self._resume_accepting)
            return
        now = time.monotonic()
        for fd, client_ip, client_port, orig_ip, orig_port in batch:
            self.stats.accepted += 1
            conn = Connection(
                next(self._ids), fd, client_ip, client_port, orig_ip, orig_port, now, self.pool.next_worker()
            )
            if len(self.connections) >= self.connection_cap:
                self._refuse(conn, f"connection limit reached ({self.connection_cap} in this worker)")
                continue
            self._dispatch(conn)

    def _resume_accepting(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _dispatch(self, conn: Connection) -> None:
        decision = decide(self.updater.current, conn.orig_ip, conn.orig_port, self.address, conn.tried)
        if isinstance(decision, Refuse):
            self._refuse(conn, decision.reason)
            return
        if isinstance(decision, ToEndpoint):
            endpoint = decision.endpoint
            conn.service, conn.endpoint = decision.route.service, endpoint
            conn.target = (endpoint.address, endpoint.port)
            endpoint.active += 1
            endpoint.total += 1
        else:
            assert isinstance(decision, Passthrough)
            conn.target = (decision.ip, decision.port)
        self.connections[conn.id] = conn
        timeout_ms = int(self.relay_config.connect_timeout * 1000)
        if self._closing:
            del self.connections[conn.id]
            if conn.endpoint is not None:
                conn.endpoint.active -= 1
            self._refuse(conn, "proxy is shutting down")
            return
        try:
            conn.worker.connect(
                conn.id,
                conn.client_fd,
                conn.target[0],
                conn.target[1],
                timeout_ms,
                conn.client_ip,
                idle_timeout_ms=int(self.relay_config.idle_timeout * 1000),
            )
        except OSError as err:
            del self.connections[conn.id]
            if conn.endpoint is not None:
                conn.endpoint.active -= 1
            if err.errno in LOCAL_ERRORS:
                conn.endpoint = None
                self._refuse(conn, f"local resources exhausted: {err.strerror}")
                return
            self._connect_failed(conn, err.errno or 0)

    def _refuse(self, conn: Connection, reason: str) -> None:
        self.stats.refused += 1
        _fastpath.reset_and_close(conn.client_fd)
        if self.access_log:
            log.info(
                "connection refused",
                **conn.log_fields(),
                reason=reason,
                attempts=len(conn.tried),
            )

    # -- completions -----------------------------------------------------------------------------------

    def _on_completions(self) -> None:
        for record in self.pool.completions():
            self._on_completion(record)

    def _on_completion(self, record: Completion) -> None:
        conn = self.connections.pop(record.conn_id, None)
        if conn is None:
            return
        if conn.endpoint is not None:
            conn.endpoint.active -= 1
        ending = Ending(record.ending)
        if ending.connect_failed:
            conn.client_fd = record.client_fd
            self._connect_failed(conn, record.err)
            return
        name = ending.name.lower()
        self.stats.closed[name] = self.stats.closed.get(name, 0) + 1
        if self.access_log:
            log.info(
                "connection closed",
                **conn.log_fields(),
                ending=name,
                errno=record.err,
                bytes_up=record.bytes_up,
                bytes_down=record.bytes_down,
                duration_ms=round((time.monotonic() - conn.started) * 1000, 3),
                attempts=len(conn.tried) + 1,
            )

    def _connect_failed(self, conn: Connection, err: int) -> None:
        """Try another endpoint of the same service, or reset the client."""
        self.stats.connect_failures += 1
        if self.access_log:
            log.warning(
                "upstream connect failed",
                **conn.log_fields(),
                errno=err,
                error=_strerror(err),
            )
        if conn.endpoint is None:
            self._refuse(conn, f"connect to original destination failed: {_strerror(err)}")
            return
        conn.endpoint.connect_failures += 1
        conn.tried.add(conn.endpoint.address)
        conn.endpoint = None
        if len(conn.tried) >= self.relay_config.connect_attempts:
            self._refuse(conn, f"{len(conn.tried)} connect attempts failed, last: {_strerror(err)}")
            return
        self._dispatch(conn)


def _strerror(err: int) -> str:
    import os

    return os.strerror(err) if err else "unknown error"
