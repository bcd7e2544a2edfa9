"""The outbound listener: accepts captured connections, asks `decide` where each goes, and hands the
socket pair to the relay. Only this layer does I/O; the decision is nodeproxy.proxy.outbound.decide."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import resource
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from nodeproxy import _fastpath
from nodeproxy.accesslog import AccessLog, LevelSource, structlog_level
from nodeproxy.balance import Endpoint
from nodeproxy.config import RelayConfig
from nodeproxy.proxy.outbound import Passthrough, Refuse, ToEndpoint, decide
from nodeproxy.proxy.relay import Completion, Ending, RelayPool
from nodeproxy.resilience.circuit import Resource
from nodeproxy.state.routing import StateUpdater

if TYPE_CHECKING:
    from nodeproxy.metrics import WorkerMetrics
    from nodeproxy.proxy.http import (
        HttpProxy,
    )  # http imports the relay pool, not the listener; the engine is handed in at run time
    from nodeproxy.proxy.mesh import MeshRefusal, MeshWorker, TunnelTo
    from nodeproxy.proxy.tunnel import StreamDone
    from nodeproxy.resilience.guard import ServiceGuards

log = structlog.get_logger("nodeproxy.outbound")

# Failures of our own resources, not of the endpoint: trying another endpoint cannot help.
LOCAL_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
# The most descriptors one relayed connection holds at once: its two sockets, plus a pipe (two fds) per
# direction while bytes are in flight. A bulk connection holds all six, so a budget of fewer lets the
# relay run out of descriptors mid-stream (issue 6, defect 2). The relay exports its own figure.
FDS_PER_CONNECTION: int = getattr(_fastpath, "FDS_PER_CONNECTION_MAX", 6)
# Descriptors a relay thread holds whatever its load (epoll, wake-up eventfd, and up to 128 empty pooled
# pipes of two fds): the fallback when the relay does not export its own figure.
FDS_PER_RELAY_THREAD_FALLBACK = 2 + 2 * 128
# Descriptors kept spare beyond what the process held at start and its relay threads may hold: logging,
# the control pipe, a connect in progress.
FDS_SPARE = 32
ACCEPT_BATCH = 128
# Port protocols the HTTP engine serves: HTTP/1.1 and HTTP/2 (by the client's preface) on all of them;
# `auto` also hands what is not HTTP back as TCP.
HTTP_ENGINE_PROTOCOLS = frozenset({"http", "auto", "http2", "grpc"})
ACCEPT_PAUSE_ON_EMFILE = 0.1  # seconds; a listener stays readable while we cannot accept, so back off
LOAD_REFRESH_INTERVAL = 1.0  # seconds between publications of a worker's load besides batch ends
LOCAL_ENDING_NAME = "local_resources"  # access-log `ending` of a connection this host could not carry
# Envoy-style response flags of the TCP metrics (istio_tcp_connections_closed_total{response_flags}).
FLAG_NONE = "-"
FLAG_OVERFLOW = "UO"  # the connection limit was reached
FLAG_NO_HEALTHY_UPSTREAM = "UH"  # the service has no endpoints
FLAG_CONNECT_FAILED = "UF"  # every connect attempt failed
FLAG_NO_ROUTE = "NR"  # a connection to the listener itself
FLAG_LOCAL_RESET = "LR"  # reset by the proxy: short of resources, stopping, or an internal error
FLAG_UPSTREAM_RESET = "UR"  # the tunnel's peer refused the stream (policy: 403) or reset it
FLAG_NO_IDENTITY = "UAEX"  # the mesh refused it: no identity/SVID for the source, or STRICT destination
# CONNECT answers of a peer that could not reach the pod: connect failed (503), timed out (504).
UNREACHABLE_STATUSES = frozenset({502, 503, 504})
# The tunnel's StreamDone endings (nodeproxy.proxy.tunnel.StreamEnding values) and their response flags.
TUNNEL_FLAGS: dict[str, str] = {
    "CLOSED": FLAG_NONE,
    "PLAIN_RESET": FLAG_NONE,  # the client reset its own connection
    "PEER_RESET": FLAG_UPSTREAM_RESET,
    "REFUSED": FLAG_UPSTREAM_RESET,
    "TUNNEL_FAILED": FLAG_CONNECT_FAILED,
    "CONNECT_FAILED": FLAG_CONNECT_FAILED,
    "ABORTED": FLAG_LOCAL_RESET,
    "LOCAL_RESOURCES": FLAG_LOCAL_RESET,
}

assert FDS_PER_CONNECTION >= 2, "a connection holds at least its two sockets"


def open_listener(address: tuple[str, int], backlog: int = 65535) -> socket.socket:
    """A transparent listener; SO_REUSEPORT lets each worker have its own, and the kernel spreads new
    connections over them by 4-tuple hash (also for TPROXY's socket lookup), so no worker hogs them."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # TPROXY hands us connections addressed to other hosts; the listener must be transparent to take them.
    sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
    _fastpath.set_socket_options(sock.fileno())  # inherited by every accepted socket
    sock.bind(address)
    sock.listen(backlog)
    return sock


def worker_share(max_connections: int, workers: int, index: int) -> int:
    """Worker `index`'s share of `max_connections`: the shares of all workers add up to exactly
    max_connections (the first max_connections % workers workers take one more), so the node-wide cap is
    never exceeded. The cap is per worker share: a worker whose share is full refuses new connections even
    while another worker has room, as SO_REUSEPORT (not the proxy) chose the worker."""
    if workers < 1 or not 0 <= index < workers:
        raise ValueError(f"worker {index} of {workers}")
    return max_connections // workers + (1 if index < max_connections % workers else 0)


def descriptor_cap(fd_limit: int, fds_reserved: int) -> int:
    """Connections a process with `fd_limit` descriptors can carry when `fds_reserved` are spoken for."""
    return max(0, (fd_limit - fds_reserved) // FDS_PER_CONNECTION)


class Connection:
    """A captured connection on its way through the proxy (Python only tracks it, the relay moves it).

    A plain slotted class rather than a dataclass: one is built per accepted connection, so its
    constructor is on the hot path; `tried` is created only when a connect fails."""

    __slots__ = (
        "client_fd",
        "client_ip",
        "client_port",
        "endpoint",
        "guards",
        "holds_slot",
        "id",
        "metered",
        "orig_ip",
        "orig_port",
        "service",
        "sniffed",
        "started",
        "target",
        "tried",
        "tunnel_peer",
        "worker",
    )

    def __init__(
        self,
        conn_id: int,
        client_fd: int,
        client_ip: str,
        client_port: int,
        orig_ip: str,
        orig_port: int,
        started: float,
        worker: _fastpath.RelayWorker,
    ) -> None:
        self.id = conn_id
        self.client_fd = client_fd
        self.client_ip = client_ip
        self.client_port = client_port
        self.orig_ip = orig_ip
        self.orig_port = orig_port
        self.started = started
        self.worker = worker
        self.service: str | None = None
        self.endpoint: Endpoint | None = None
        self.target: tuple[str, int] | None = None
        self.tried: set[str] | None = None
        # The service's resilience state, and whether this connection holds one of its
        # circuit_breakers.max_connections slots (taken once, whatever its connect retries).
        self.guards: ServiceGuards | None = None
        self.holds_slot = False
        self.sniffed = False  # an `auto` port's connection the HTTP engine found not to be HTTP
        self.metered = False  # counted as opened in the TCP metrics (once, whatever its retries)
        self.tunnel_peer: str | None = None  # the peer node whose tunnel carries it (None: the relay)

    @property
    def attempts_failed(self) -> int:
        return len(self.tried) if self.tried else 0


@dataclass
class ListenerStats:
    accepted: int = 0
    refused: int = 0
    connect_failures: int = 0
    dispatch_errors: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    # Bytes the splice relay moved (counted natively per connection, added here once it ends), also of
    # connections the HTTP engine handed over after a 101.
    relay_bytes_up: int = 0  # client -> upstream
    relay_bytes_down: int = 0


def _ending_names() -> dict[int, str]:
    """Access-log names of the relay's completion kinds (lower-case enum names)."""
    names = {int(ending): ending.name.lower() for ending in Ending}
    local = getattr(_fastpath, "LOCAL_RESOURCES", None)
    if local is not None:
        names[int(local)] = LOCAL_ENDING_NAME
    return names


ENDING_NAMES = _ending_names()
CONNECT_FAILED_ENDINGS = frozenset({int(Ending.CONNECT_FAILED), int(Ending.CONNECT_TIMEOUT)})
# Endings the proxy itself caused: short of resources, or stopped with the connection still open.
LOCAL_RESET_ENDINGS = frozenset({int(Ending.LOCAL_RESOURCES), int(Ending.ABORTED)})


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
        access_log_fd: int | None = None,
        on_load_change: Callable[[int], None] | None = None,
        log_level: LevelSource | None = None,
        metrics: WorkerMetrics | None = None,
        access_log_writer: AccessLog | None = None,
    ) -> None:
        """access_log_writer: the worker's access log (accesslog.AccessLog.from_config); without one, a
        log on `access_log_fd` (default stderr) enabled as `access_log` says, at `log_level`."""
        self.address = address
        self.updater = updater
        self.pool = pool
        self.worker = worker
        self.workers = workers
        self.access_log = (
            access_log_writer
            if access_log_writer is not None
            else AccessLog(
                access_log_fd,
                enabled=access_log,
                level=log_level if log_level is not None else structlog_level(),
            )
        )
        self.connections: dict[int, Connection] = {}
        self.stats = ListenerStats()
        # Interleaved so connection ids are unique across all workers of the daemon.
        self._ids = itertools.count(worker + 1, workers)
        self.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        pool_reserve = getattr(pool, "fds_reserved", 1 + FDS_PER_RELAY_THREAD_FALLBACK * len(pool.workers))
        self.fds_reserved = _open_descriptors() + pool_reserve + FDS_SPARE
        self.fd_connection_cap = descriptor_cap(self.fd_limit, self.fds_reserved)
        # Called with this worker's live connection count when it changes by a batch (the reuseport
        # balancer's load table); None when no balancer is attached.
        self.on_load_change = on_load_change
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False  # set once the relay stops: connect failures are then refused, not retried
        self._relays_to_wake = False  # connections were submitted without waking their relay thread
        self._load_timer: asyncio.TimerHandle | None = None
        self.relay_config = relay
        # The worker's HTTP engine: connections to ports whose protocol it serves go there instead of
        # the splice relay (None: everything is relayed as TCP).
        self.http: HttpProxy | None = None
        # Istio's TCP metrics of the connections this listener relays (None: not recorded).
        self.metrics = metrics
        # The worker's mTLS tunnel (nodeproxy.proxy.mesh): connections to pods of peer nodes go there
        # instead of the splice relay (None: no mesh configured).
        self.mesh: MeshWorker | None = None
        self.stats_tunneled = 0  # connections handed to the tunnel

    @property
    def relay_config(self) -> RelayConfig:
        return self._relay_config

    @relay_config.setter
    def relay_config(self, relay: RelayConfig) -> None:
        """Applied by a reload; the per-connection numbers are derived here once, not per connection."""
        self._relay_config = relay
        self._connect_timeout_ms = relay.connect_timeout_ms
        self._idle_timeout_ms = relay.idle_timeout_ms
        self._connect_attempts = relay.connect_attempts
        self.connection_cap = min(
            worker_share(relay.max_connections, self.workers, self.worker), self.fd_connection_cap
        )

    def start(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        """Serve `sock` (this worker's SO_REUSEPORT listener from open_listener) on `loop`."""
        sock.setblocking(False)
        self._sock, self._loop = sock, loop
        self.warn_if_descriptors_cap_connections()
        # Zero at once (a replacement worker does not inherit its predecessor's load), then refreshed.
        self._publish_load_periodically()
        loop.add_reader(sock.fileno(), self._on_acceptable)
        loop.add_reader(self.pool.notify_fd, self._on_completions)

    def warn_if_descriptors_cap_connections(self) -> None:
        """Once per daemon (worker 0 speaks for all: they share one limit): say so when RLIMIT_NOFILE,
        not relay.max_connections, is what limits the node's connections."""
        share = worker_share(self._relay_config.max_connections, self.workers, self.worker)
        if self.worker != 0 or self.fd_connection_cap >= share:
            return
        node_cap = sum(
            min(worker_share(self._relay_config.max_connections, self.workers, i), self.fd_connection_cap)
            for i in range(self.workers)
        )
        log.warning(
            "descriptor limit caps connections below relay.max_connections",
            max_connections=self._relay_config.max_connections,
            connection_cap=node_cap,
            workers=self.workers,
            fd_limit_per_worker=self.fd_limit,
            fds_per_connection=FDS_PER_CONNECTION,
            fds_reserved_per_worker=self.fds_reserved,
            fd_limit_needed=self.fds_reserved + share * FDS_PER_CONNECTION,
        )

    def _publish_load_periodically(self) -> None:
        """Publish the live connections every LOAD_REFRESH_INTERVAL too, not only after batches: the
        kernel program counts every connection it hands out, also a SYN that never became one, and
        an idle worker would otherwise keep that inflated count."""
        if self.on_load_change is None or self._loop is None or self._sock is None:
            return
        self.on_load_change(len(self.connections))
        self._load_timer = self._loop.call_later(LOAD_REFRESH_INTERVAL, self._publish_load_periodically)

    def stop_accepting(self) -> None:
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
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
        next_id = self._ids.__next__
        relay = self.pool.next_worker
        connections = self.connections
        cap = self.connection_cap - (self.http.live_connections if self.http is not None else 0)
        self.stats.accepted += len(batch)
        try:
            for fd, client_ip, client_port, orig_ip, orig_port in batch:
                conn = Connection(next_id(), fd, client_ip, client_port, orig_ip, orig_port, now, relay())
                if len(connections) >= cap:
                    self._refuse(conn, f"connection limit reached ({cap} in this worker)", FLAG_OVERFLOW)
                    continue
                self._dispatch(conn)
        finally:
            self._wake_relays()
        if self.on_load_change is not None:
            self.on_load_change(len(connections))

    def _resume_accepting(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_acceptable)

    def _dispatch(self, conn: Connection) -> None:
        """Route one connection and hand it to the relay. Never raises: a failure of this connection
        (even a bug) resets its client and is logged, and the rest of the batch goes on."""
        try:
            self._route_and_connect(conn)
        except Exception as err:
            self.stats.dispatch_errors += 1
            if self.connections.pop(conn.id, None) is not None and conn.endpoint is not None:
                conn.endpoint.active -= 1
            log.error(
                "connection dispatch failed; resetting the client",
                conn=conn.id,
                error=repr(err),
                traceback=traceback.format_exc(),
            )
            conn.endpoint = None
            self._refuse(conn, f"internal error: {err!r}", FLAG_LOCAL_RESET)

    def _route_and_connect(self, conn: Connection) -> None:
        if self._closing:
            self._refuse(conn, "proxy is shutting down", FLAG_LOCAL_RESET)
            return
        if self.http is not None and not conn.sniffed:
            route = self.updater.current.lookup(conn.orig_ip, conn.orig_port)
            if route is not None and route.protocol in HTTP_ENGINE_PROTOCOLS:
                # The engine owns the socket from here on and decides per request (if adopt raises,
                # the fd is still ours and _dispatch resets it).
                self.http.adopt(
                    conn.id,
                    conn.client_fd,
                    conn.client_ip,
                    conn.client_port,
                    conn.orig_ip,
                    conn.orig_port,
                    route.protocol == "auto",
                )
                return
        decision = decide(self.updater.current, conn.orig_ip, conn.orig_port, self.address, conn.tried or ())
        if isinstance(decision, ToEndpoint):
            endpoint = decision.endpoint
            guards = conn.guards = decision.route.guards
            if guards is not None and not conn.holds_slot:
                if not guards.breaker.try_acquire(Resource.CONNECTIONS):
                    conn.service = decision.route.service
                    if self.metrics is not None:
                        self.metrics.overflow(conn.service, Resource.CONNECTIONS.value)
                    self._refuse(conn, "circuit breaker: too many connections to the service", FLAG_OVERFLOW)
                    return
                conn.holds_slot = True
            conn.service, conn.endpoint = decision.route.service, endpoint
            conn.target = target = (endpoint.address, endpoint.port)
            endpoint.active += 1
            endpoint.total += 1
        elif isinstance(decision, Passthrough):
            conn.target = target = (decision.ip, decision.port)
        else:
            assert isinstance(decision, Refuse)
            self._refuse(conn, decision.reason, self._refusal_flag(conn))
            return
        mesh = self.mesh
        if mesh is not None:
            path = mesh.directory.outbound_path(
                conn.client_ip, target[0], target[1], conn.endpoint.node if conn.endpoint else None
            )
            if path is not None:
                self._tunnel(conn, mesh, path, target)
                return
        if self.metrics is not None and not conn.metered:
            conn.metered = True
            self.metrics.tcp_opened(conn.service, conn.client_ip, target[0])
        self.connections[conn.id] = conn
        try:
            # Positional arguments only: Cython parses keywords far more slowly, once per connection.
            # The client socket comes from accept_batch (non-blocking, SO_LINGER set: "prepared"), and
            # the relay thread is woken once for the whole batch (_wake_relays), not per connection.
            conn.worker.connect(
                conn.id,
                conn.client_fd,
                target[0],
                target[1],
                self._connect_timeout_ms,
                conn.client_ip,
                self._idle_timeout_ms,
                True,
                False,
            )
            self._relays_to_wake = True
        except OSError as err:
            del self.connections[conn.id]
            if conn.endpoint is not None:
                conn.endpoint.active -= 1
            self._connect_failed(conn, err.errno or 0)

    def _tunnel(
        self, conn: Connection, mesh: MeshWorker, path: TunnelTo | MeshRefusal, target: tuple[str, int]
    ) -> None:
        """Hand the connection to the mTLS tunnel (TunnelTo), or refuse it (MeshRefusal)."""
        from nodeproxy.proxy.mesh import MeshRefusal  # not at import time: it loads the tunnel stack

        if isinstance(path, MeshRefusal):
            self._unchoose_endpoint(conn)
            self._refuse(conn, f"mesh: {path.reason}", FLAG_NO_IDENTITY)
            return
        self.connections[conn.id] = conn
        try:
            mesh.adopt(conn.id, conn.client_fd, path, f"{target[0]}:{target[1]}", conn.client_ip)
        except (LookupError, ValueError, OSError) as err:
            # No SVID for the source (yet, or expired without renewal), or the engine refused it: the
            # socket is still ours. Not the endpoint's fault, so no retry elsewhere.
            del self.connections[conn.id]
            self._unchoose_endpoint(conn)
            self._refuse(conn, f"mesh: cannot tunnel to {path.peer_node}: {err}", FLAG_NO_IDENTITY)
            return
        conn.client_fd = -1  # the engine's now
        conn.tunnel_peer = path.peer_node
        self.stats_tunneled += 1
        if self.metrics is not None and not conn.metered:
            conn.metered = True
            self.metrics.tcp_opened(conn.service, conn.client_ip, target[0])

    @staticmethod
    def _unchoose_endpoint(conn: Connection) -> None:
        if conn.endpoint is not None:
            conn.endpoint.active -= 1
            conn.endpoint = None

    def tunnel_done(self, record: StreamDone) -> None:
        """A tunnelled connection ended (the engine's StreamDone for our conn_id): account for it like a
        relay completion. A tunnel that could not be opened counts against the endpoint (outlier
        detection) but is not retried: the engine has closed the client socket by then."""
        stats = self.stats
        stats.relay_bytes_up += record.bytes_up
        stats.relay_bytes_down += record.bytes_down
        conn = self.connections.pop(record.id, None)
        if conn is None:
            return
        ending = record.ending.name
        # The stream never reached the pod: the tunnel to its node failed, or the peer could not connect
        # to it (503) or timed out (504). A policy refusal (403) says nothing about the endpoint.
        failed_to_open = not record.bytes_down and (
            ending in ("TUNNEL_FAILED", "CONNECT_FAILED")
            or (ending == "REFUSED" and record.status in UNREACHABLE_STATUSES)
        )
        if conn.endpoint is not None:
            conn.endpoint.active -= 1
            if failed_to_open:
                self._endpoint_connect_failed(conn, conn.endpoint)
            elif conn.guards is not None and ending != "REFUSED":
                conn.guards.outlier.record_success(conn.endpoint)
        self._release_slot(conn)
        if failed_to_open:
            stats.connect_failures += 1
        name = f"tunnel_{ending.lower()}"
        stats.closed[name] = stats.closed.get(name, 0) + 1
        flag = FLAG_CONNECT_FAILED if failed_to_open else TUNNEL_FLAGS.get(ending, FLAG_LOCAL_RESET)
        self._report_closed(
            conn,
            name if not record.status else f"{name}_{record.status}",
            flag,
            record.err,
            record.bytes_up,
            record.bytes_down,
        )
        if self.on_load_change is not None:
            self.on_load_change(len(self.connections))

    def http_inbound(
        self, fd: int, client_ip: str, client_port: int, pod_ip: str, pod_port: int, http2: bool
    ) -> bool:
        """A plaintext inbound connection whose pod's policies need its requests: to the HTTP engine
        (HttpProxy.adopt_inbound). False when there is no engine or it refused: the fd is still the
        caller's."""
        if self.http is None:
            return False
        try:
            self.http.adopt_inbound(next(self._ids), fd, client_ip, client_port, pod_ip, pod_port, http2)
        except (OSError, RuntimeError, ValueError) as err:
            log.error("inbound HTTP adoption failed", error=str(err), destination=f"{pod_ip}:{pod_port}")
            return False
        self.stats.accepted += 1
        return True

    def relay_inbound(
        self, fd: int, client_ip: str, client_port: int, pod_ip: str, pod_port: int, started: float
    ) -> None:
        """A plaintext inbound connection the mesh allowed (accepted on mesh.inbound_port): relay it to
        the local pod from the caller's own address, accounted like any relayed connection. Call
        wake_relays() after a batch."""
        conn = Connection(
            next(self._ids), fd, client_ip, client_port, pod_ip, pod_port, started, self.pool.next_worker()
        )
        conn.target = (pod_ip, pod_port)
        self.stats.accepted += 1
        if len(self.connections) >= self.connection_cap:
            self._refuse(
                conn, f"connection limit reached ({self.connection_cap} in this worker)", FLAG_OVERFLOW
            )
            return
        if self.metrics is not None:
            conn.metered = True
            self.metrics.tcp_opened(None, client_ip, pod_ip)
        self.connections[conn.id] = conn
        try:
            conn.worker.connect(
                conn.id,
                fd,
                pod_ip,
                pod_port,
                self._connect_timeout_ms,
                client_ip,
                self._idle_timeout_ms,
                True,
                False,
            )
            self._relays_to_wake = True
        except OSError as err:
            del self.connections[conn.id]
            self._connect_failed(conn, err.errno or 0)

    def wake_relays(self) -> None:
        self._wake_relays()

    def adopt_tcp(
        self, conn_id: int, fd: int, client_ip: str, client_port: int, orig_ip: str, orig_port: int
    ) -> None:
        """The HTTP engine's `not_http` handler: a connection of an `auto` port that is not HTTP (or
        stayed silent for http.peek_timeout) is relayed as TCP, its first bytes still unread."""
        conn = Connection(
            conn_id, fd, client_ip, client_port, orig_ip, orig_port, time.monotonic(), self.pool.next_worker()
        )
        conn.sniffed = True
        try:
            self._dispatch(conn)
        finally:
            self._wake_relays()

    def _wake_relays(self) -> None:
        """One wake-up per relay thread for everything submitted since the last one."""
        if self._relays_to_wake:
            self._relays_to_wake = False
            for worker in self.pool.workers:
                worker.wake()

    def _refuse(self, conn: Connection, reason: str, flag: str) -> None:
        """Reset the client; the connection is not (or no longer) in self.connections. `flag`: its
        response flag in the TCP metrics."""
        self.stats.refused += 1
        self._release_slot(conn)
        if conn.client_fd >= 0:
            _fastpath.reset_and_close(conn.client_fd)
            conn.client_fd = -1
        if self.metrics is not None:
            service = conn.service
            if service is None:  # refused before a decision named it (limit, no endpoint)
                route = self.updater.current.lookup(conn.orig_ip, conn.orig_port)
                service = route.service if route is not None else None
            if not conn.metered:
                conn.metered = True
                self.metrics.tcp_opened(service, conn.client_ip, None)
            self.metrics.tcp_closed(service, conn.client_ip, None, flag, 0, 0)
        if self.access_log.warning_enabled:  # refusals are failures: written at warning level
            self.access_log.refused(self._log_fields(conn), reason, conn.attempts_failed, flag)

    @staticmethod
    def _release_slot(conn: Connection) -> None:
        if conn.holds_slot:
            conn.holds_slot = False
            assert conn.guards is not None
            conn.guards.breaker.release(Resource.CONNECTIONS)

    def _refusal_flag(self, conn: Connection) -> str:
        """The response flag of a connection `decide` refused."""
        if conn.tried:
            return FLAG_CONNECT_FAILED
        route = self.updater.current.lookup(conn.orig_ip, conn.orig_port)
        return FLAG_NO_HEALTHY_UPSTREAM if route is not None else FLAG_NO_ROUTE

    def _log_fields(self, conn: Connection) -> str:
        metrics = self.metrics
        if metrics is None:
            source_workload = destination_workload = None
        else:  # the workload names the metrics use, where the config knows them
            source_workload = metrics.workload(conn.client_ip)
            destination_workload = metrics.workload(conn.target[0] if conn.target else None, conn.service)
        source_identity = destination_identity = None
        if conn.tunnel_peer is not None and self.mesh is not None:  # what the tunnel carried and expects
            directory = self.mesh.directory
            source_identity = directory.identity_of(conn.client_ip)
            destination_identity = directory.workload_identity(conn.target[0]) if conn.target else None
        return self.access_log.connection_fields(
            conn.id,
            (conn.client_ip, conn.client_port),
            (conn.orig_ip, conn.orig_port),
            conn.service,
            conn.target,
            source_workload=source_workload,
            source_identity=source_identity,
            destination_workload=destination_workload,
            destination_identity=destination_identity,
        )

    # -- completions -----------------------------------------------------------------------------------

    def _on_completions(self) -> None:
        try:
            for record in self.pool.completions():
                try:
                    self._on_completion(record)
                except Exception as err:  # one bad record must not lose the rest of the batch
                    self.stats.dispatch_errors += 1
                    log.error(
                        "completion handling failed",
                        conn=record.conn_id,
                        error=repr(err),
                        traceback=traceback.format_exc(),
                    )
        finally:
            self._wake_relays()  # retries on another endpoint
        if self.on_load_change is not None:
            self.on_load_change(len(self.connections))

    def _on_completion(self, record: Completion) -> None:
        stats = self.stats
        stats.relay_bytes_up += record.bytes_up
        stats.relay_bytes_down += record.bytes_down
        conn = self.connections.pop(record.conn_id, None)
        if conn is None:
            return
        if conn.endpoint is not None:
            conn.endpoint.active -= 1
        ending = record.ending
        if ending in CONNECT_FAILED_ENDINGS:
            conn.client_fd = record.client_fd
            self._connect_failed(conn, record.err)
            return
        self._release_slot(conn)
        if conn.guards is not None and conn.endpoint is not None:
            conn.guards.outlier.record_success(conn.endpoint)  # it connected: ends a failure streak
        name = ENDING_NAMES.get(ending) or f"ending_{ending}"
        closed = stats.closed
        closed[name] = closed.get(name, 0) + 1
        flag = FLAG_LOCAL_RESET if ending in LOCAL_RESET_ENDINGS else FLAG_NONE
        self._report_closed(conn, name, flag, record.err, record.bytes_up, record.bytes_down)

    def _report_closed(
        self, conn: Connection, ending: str, flag: str, err: int, bytes_up: int, bytes_down: int
    ) -> None:
        """A relayed (or tunnelled) connection ended: TCP metrics and its access-log record."""
        if self.metrics is not None:
            self.metrics.tcp_closed(
                conn.service,
                conn.client_ip,
                conn.target[0] if conn.target is not None else None,
                flag,
                bytes_up,
                bytes_down,
            )
        # A flagged ending is a failure, written at warning level; the fields are built only if kept.
        if self.access_log.info_enabled if flag == FLAG_NONE else self.access_log.warning_enabled:
            self.access_log.closed(
                self._log_fields(conn),
                ending,
                err,
                bytes_up,
                bytes_down,
                (time.monotonic() - conn.started) * 1000,
                conn.attempts_failed + 1,
                flag,
            )

    def _endpoint_connect_failed(self, conn: Connection, endpoint: Endpoint) -> None:
        """Count a failed connect against `endpoint` (outlier detection may eject it)."""
        endpoint.connect_failures += 1
        if conn.guards is None:
            return
        ejection = conn.guards.outlier.record_connect_failure(endpoint)
        if ejection is not None:
            if self.metrics is not None and conn.service is not None:
                self.metrics.ejection(conn.service)
            log.warning("endpoint ejected", service=conn.service, **ejection.log_fields(time.monotonic()))

    def _connect_failed(self, conn: Connection, err: int) -> None:
        """Try another endpoint of the same service, or reset the client."""
        error = os.strerror(err) if err else "unknown error"
        if err in LOCAL_ERRORS:
            # This host ran short (descriptors, ports, buffers): another endpoint cannot help, and
            # neither the endpoint nor the peer is to blame.
            conn.endpoint = None
            self._refuse(conn, f"{LOCAL_ENDING_NAME}: {error}", FLAG_LOCAL_RESET)
            return
        self.stats.connect_failures += 1
        if self.access_log.warning_enabled:
            self.access_log.connect_failed(self._log_fields(conn), err)
        if conn.endpoint is None:
            self._refuse(conn, f"connect to original destination failed: {error}", FLAG_CONNECT_FAILED)
            return
        self._endpoint_connect_failed(conn, conn.endpoint)
        if conn.tried is None:
            conn.tried = set()
        conn.tried.add(conn.endpoint.address)
        conn.endpoint = None
        if len(conn.tried) >= self._connect_attempts:
            self._refuse(
                conn, f"{len(conn.tried)} connect attempts failed, last: {error}", FLAG_CONNECT_FAILED
            )
            return
        self._dispatch(conn)


def _open_descriptors() -> int:
    """Descriptors this process holds now (listener, event loop, control pipe, stdio, relay threads)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64  # no /proc: a generous guess for a Python process
