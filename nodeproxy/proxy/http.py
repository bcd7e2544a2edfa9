"""Python side of the HTTP engine: HttpWorker threads, and one routing decision per request head.

The listener hands an accepted connection of an HTTP port to :meth:`HttpProxy.adopt`; from then on the
native engine (nodeproxy._l7) owns the socket. Whenever it has records, it writes the proxy's eventfd;
:meth:`HttpProxy.process_records` then takes each worker's batch: for every request head it builds the
:class:`RequestAttrs`, calls :func:`decide_request` with the routing snapshot current at that moment and
answers the whole batch at once; a failed upstream attempt is decided again (another endpoint) until
`connect_attempts` are used up; a finished request updates the endpoint's counters and the access log.
Python never sees a body byte. HTTP/2 needs nothing else here: every stream of an HTTP/2 client comes
as a head record like an HTTP/1.1 request (same connection id), a forward says which protocol the
upstream speaks (Forward.upstream_protocol), and a local reply carries its grpc-status for gRPC requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from nodeproxy import _l7
from nodeproxy.accesslog import AccessLog, structlog_level
from nodeproxy.balance import Endpoint
from nodeproxy.config import HttpConfig, RelayConfig
from nodeproxy.proxy.http_route import Forward, LocalReply, RequestAttrs, decide_request
from nodeproxy.proxy.relay import RelayPool
from nodeproxy.state.routing import RoutingState

if TYPE_CHECKING:  # type aliases of the engine's answers, declared once in its stub
    from nodeproxy._l7 import ForwardAnswer, ReplyAnswer

log = structlog.get_logger("nodeproxy.http")

# Local-reply details for failures the engine reports and Python answers.
UPSTREAM_CONNECT_FAILED = 502

FLAG_NAMES: tuple[tuple[int, str], ...] = tuple(sorted((bit, name) for name, bit in _l7.FLAGS.items()))

# (conn_id, client_fd, client_ip, client_port, orig_ip, orig_port) of a connection that is not HTTP/1.
NotHttpHandler = Callable[[int, int, str, int, str, int], None]


def flag_text(bits: int, local_flag: str | None = None) -> str:
    """Envoy-style flags, comma-separated (e.g. "UF,UC"); a Python-decided local reply adds its own."""
    names = [name for bit, name in FLAG_NAMES if bits & bit and name != "LR"]
    if local_flag:
        names.append(local_flag)
    return ",".join(names) or "-"


_FORBIDDEN_IN_FIELDS = re.compile(r"[\r\n\0]")


def _encode_fields(fields: tuple[tuple[str, str], ...]) -> tuple[tuple[bytes, bytes], ...]:
    for name, value in fields:
        # The engine checks too, but then a bad edit would fail the whole batch, not this request.
        if not name or ":" in name or " " in name or _FORBIDDEN_IN_FIELDS.search(name + value):
            raise ValueError(f"header edit {name!r}: {value!r} cannot be sent")
    return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in fields)


def _encode_names(names: tuple[str, ...]) -> tuple[bytes, ...]:
    for name in names:
        if not name or ":" in name or " " in name or _FORBIDDEN_IN_FIELDS.search(name):
            raise ValueError(f"header name {name!r} cannot be removed")
    return tuple(name.encode("latin-1") for name in names)


@dataclass(frozen=True, slots=True)
class _Edits:
    request_add: tuple[tuple[bytes, bytes], ...]
    request_remove: tuple[bytes, ...]
    response_add: tuple[tuple[bytes, bytes], ...]
    response_remove: tuple[bytes, ...]


_NO_EDITS = _Edits((), (), (), ())
_NO_HEADERS: dict[str, str] = {}  # shared, never mutated: RequestAttrs.headers when no route matches one


@dataclass(slots=True)
class HttpConnection:
    """A downstream connection the engine owns; Python keeps what routing and logs need."""

    id: int
    client_ip: str
    client_port: int
    orig_ip: str
    orig_port: int
    started: float
    worker: _l7.HttpWorker
    requests: int = 0


@dataclass(slots=True)
class PendingRequest:
    """A request between its head and its DONE record."""

    conn: HttpConnection
    attrs: RequestAttrs
    service: str | None = None
    route: str | None = None
    endpoint: Endpoint | None = None
    tried: tuple[str, ...] = ()  # endpoint addresses that failed this request (rarely any)
    local_flag: str | None = None


@dataclass
class HttpStats:
    requests: int = 0
    local_replies: int = 0
    attempts_failed: int = 0
    connections: int = 0
    # Finished requests by status class: [0] none (client left first), [1] 1xx ... [5] 5xx.
    status_classes: list[int] = field(default_factory=lambda: [0] * 6)


class HttpProxy:
    """The HTTP engine threads of one worker process and the decisions they ask for.

    `routing` returns the current routing snapshot (StateUpdater.current), read once per request head,
    so a config reload applies to the next request even on a kept-alive connection. pool_max_conns
    bounds the upstream connections per (source, endpoint) of each engine thread (1024, Envoy's circuit
    breaker default); requests beyond it wait for one to free up. With a `splice_relay` (the worker's L4
    RelayPool), a connection upgraded by a 101 (WebSocket) moves to the splice relay once no byte is in
    flight; without one the engine relays it itself. `not_http` takes the connections of `auto` ports
    that turn out not to be HTTP/1 (or stay silent for http.peek_timeout), with their first bytes still
    unread: the listener's L4 path. It owns the fd from the call on. `access_log_writer` writes the
    per-request records (default: a new AccessLog on stderr, enabled as `access_log` says).
    """

    def __init__(
        self,
        routing: Callable[[], RoutingState],
        http: HttpConfig,
        relay: RelayConfig,
        threads: int = 1,
        access_log: bool = True,
        bind_source: bool = True,
        pool_max_conns: int = 1024,
        splice_relay: RelayPool | None = None,
        not_http: NotHttpHandler | None = None,
        access_log_writer: AccessLog | None = None,
    ) -> None:
        self.routing = routing
        self.relay_config = relay
        self.access_log = access_log
        # Per-request records are rendered by hand and written with one write() below PIPE_BUF, as the
        # listener's connection records are (accesslog); structlog keeps the rarer events. The daemon
        # passes the listener's writer, so a worker has one.
        self._access_log = (
            access_log_writer
            if access_log_writer is not None
            else AccessLog(enabled=access_log, level=structlog_level())
        )
        self.bind_source = bind_source  # connect upstream from the client's address (transparent)
        self.splice_relay = splice_relay
        self.not_http = not_http
        self._peek_timeout_ms = max(1, int(http.peek_timeout * 1000))
        self._relay_idle_ms = int(relay.idle_timeout * 1000)
        self.notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.workers = [
            _l7.HttpWorker(
                self.notify_fd,
                max_head_bytes=http.max_head_bytes,
                max_fields=http.max_header_fields,
                header_timeout_ms=max(1, int(http.header_timeout * 1000)),
                connect_timeout_ms=max(1, int(relay.connect_timeout * 1000)),
                pool_max_idle=http.upstream_pool_size,
                pool_idle_timeout_ms=int(http.upstream_idle_timeout * 1000),
                pool_max_conns=pool_max_conns,
                hand_off_upgrades=splice_relay is not None,
            )
            for _ in range(threads)
        ]
        self._threads = [
            threading.Thread(target=w.run, name=f"nodeproxy-http-{i}", daemon=True)
            for i, w in enumerate(self.workers)
        ]
        self._next = 0
        self.connections: dict[int, HttpConnection] = {}
        self.requests: dict[int, PendingRequest] = {}
        self.stats = HttpStats()
        self._edits: dict[int, tuple[Forward, _Edits]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._headers_state: RoutingState | None = None
        self._with_headers = True

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine threads; with a loop, records are processed on it (else call process_records)."""
        for thread in self._threads:
            thread.start()
        if loop is not None:
            self._loop = loop
            loop.add_reader(self.notify_fd, self.process_records)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine threads (live connections are closed) and take their last records."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None:
            self._loop.remove_reader(self.notify_fd)
        for worker in self.workers:
            worker.stop()
        for thread in self._threads:
            thread.join(timeout)
        self.process_records()
        os.close(self.notify_fd)

    def begin_drain(self) -> None:
        """For Worker.drain_hooks: responses from now on carry `Connection: close` and end their
        connection; idle kept-alive connections close now. Does not block."""
        for worker in self.workers:
            worker.begin_draining()

    @property
    def live_connections(self) -> int:
        return sum(w.live_connections for w in self.workers)

    @property
    def upstream_connections(self) -> int:
        return sum(w.upstream_connections for w in self.workers)

    # -- connections -----------------------------------------------------------------------------------

    def adopt(
        self,
        conn_id: int,
        client_fd: int,
        client_ip: str,
        client_port: int,
        orig_ip: str,
        orig_port: int,
        sniff: bool = False,
    ) -> None:
        """Hand an accepted connection of an HTTP port to an engine thread, which owns the fd from then
        on; if this raises, the fd stays with the caller (nothing was queued). sniff: an `auto` port, see
        `not_http`."""
        if self._stopped:
            raise RuntimeError("http proxy is closed")
        if sniff and self.not_http is None:
            raise ValueError("sniffing needs a not_http handler for what is not HTTP")
        worker = self.workers[self._next]
        self._next = (self._next + 1) % len(self.workers)
        conn = HttpConnection(conn_id, client_ip, client_port, orig_ip, orig_port, time.monotonic(), worker)
        worker.adopt(
            conn_id, client_fd, client_ip if self.bind_source else None, self._peek_timeout_ms if sniff else 0
        )
        self.connections[conn_id] = conn
        self.stats.connections += 1

    # -- records ---------------------------------------------------------------------------------------

    def process_records(self) -> None:
        """Take every worker's records and answer the request heads among them, one batch per worker."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.notify_fd)
        state = self.routing()
        if state is not self._headers_state:
            # Header values are copied out of the engine only when some route matches on a header.
            self._headers_state = state
            self._with_headers = any(
                r.http is not None and r.http.matched_headers for r in state.routes.values()
            )
        for worker in self.workers:
            records = worker.drain(self._with_headers)
            if not records:
                continue
            forwards: list[ForwardAnswer] = []
            replies: list[ReplyAnswer] = []
            self._handle(records, state, forwards, replies)
            if (forwards or replies) and not self._stopped:
                worker.answer(forwards, replies)

    def _handle(
        self,
        records: Iterable[tuple[Any, ...]],
        state: RoutingState,
        forwards: list[ForwardAnswer],
        replies: list[ReplyAnswer],
    ) -> None:
        """Act on one batch; `state` is the routing snapshot read once for the whole batch."""
        for record in records:
            kind = record[0]
            try:
                if kind == _l7.HEAD:
                    self._on_head(record, state, forwards, replies)
                elif kind == _l7.DONE:
                    self._on_done(record)
                elif kind == _l7.ATTEMPT_FAILED:
                    self._on_attempt_failed(record, forwards, replies)
                elif kind == _l7.CONN_CLOSED:
                    self._on_conn_closed(record)
                elif kind == _l7.UPGRADED:
                    self._on_upgraded(record)
                elif kind == _l7.NOT_HTTP:
                    self._on_not_http(record)
                else:
                    raise AssertionError(f"unknown engine record kind {kind}")
            except Exception:
                # A bug in one decision must not strand the rest of the batch, nor leave this request's
                # client waiting forever: log it with its traceback and answer 500.
                log.exception("http record handling failed", record=record[:3])
                if kind in (_l7.HEAD, _l7.ATTEMPT_FAILED):
                    replies.append((record[1], 500, "IE", "internal error while routing the request"))

    def _on_head(
        self,
        record: tuple[Any, ...],
        state: RoutingState,
        forwards: list[ForwardAnswer],
        replies: list[ReplyAnswer],
    ) -> None:
        _, request_id, conn_id, method, _target, authority, path, query, headers = record
        conn = self.connections[conn_id]
        conn.requests += 1
        self.stats.requests += 1
        route = state.lookup(conn.orig_ip, conn.orig_port)
        picked: dict[str, str] = _NO_HEADERS
        if (
            headers
            and route is not None
            and route.http is not None
            and (matched := route.http.matched_headers)
        ):
            picked = {}
            for name, value in headers:
                if name in matched:
                    # Repeated fields are one comma-joined value (RFC 9110 §5.3).
                    picked[name] = f"{picked[name]}, {value}" if name in picked else value
        attrs = RequestAttrs(method, authority, path, query, picked)
        request = PendingRequest(conn, attrs)
        self.requests[request_id] = request
        if route is None or route.http is None:
            # The service or its HTTP protocol went away with a reload since the connection came in.
            self._reply(request_id, request, LocalReply(404, "NR", "service port is no longer HTTP"), replies)
            return
        request.service = route.service
        self._answer(request_id, request, decide_request(route.http, attrs), forwards, replies)

    def _answer(
        self,
        request_id: int,
        request: PendingRequest,
        decision: Forward | LocalReply,
        forwards: list[ForwardAnswer],
        replies: list[ReplyAnswer],
    ) -> None:
        if isinstance(decision, LocalReply):
            self._reply(request_id, request, decision, replies)
            return
        endpoint = decision.endpoint
        request.endpoint, request.route = endpoint, decision.route
        endpoint.active += 1
        endpoint.total += 1
        edits = self._edits_for(decision)
        forwards.append(
            (
                request_id,
                endpoint.address,
                endpoint.port,
                edits.request_add,
                edits.request_remove,
                edits.response_add,
                edits.response_remove,
                0,
                decision.upstream_protocol == "http2",
            )
        )

    def _edits_for(self, decision: Forward) -> _Edits:
        """Header edits encoded once per route (routes are immutable per snapshot), not per request."""
        if not (
            decision.request_headers_add
            or decision.request_headers_remove
            or decision.response_headers_add
            or decision.response_headers_remove
        ):
            return _NO_EDITS
        key = id(decision.request_headers_add) ^ id(decision.response_headers_add) * 31
        cached = self._edits.get(key)
        if cached is not None and _same_edits(cached[0], decision):
            return cached[1]
        edits = _Edits(
            _encode_fields(decision.request_headers_add),
            _encode_names(decision.request_headers_remove),
            _encode_fields(decision.response_headers_add),
            _encode_names(decision.response_headers_remove),
        )
        if len(self._edits) > 1024:
            self._edits.clear()  # routes of old snapshots
        self._edits[key] = (decision, edits)
        return edits

    def _reply(
        self, request_id: int, request: PendingRequest, reply: LocalReply, replies: list[ReplyAnswer]
    ) -> None:
        # grpc_status applies to gRPC requests over HTTP/2 (the engine knows which); an HTTP/1.1 client
        # gets the HTTP status itself.
        request.local_flag = reply.flag
        self.stats.local_replies += 1
        replies.append((request_id, reply.status, reply.flag, reply.detail, reply.grpc_status))

    def _on_attempt_failed(
        self, record: tuple[Any, ...], forwards: list[ForwardAnswer], replies: list[ReplyAnswer]
    ) -> None:
        _, request_id, _conn_id, err, flags, attempts = record
        request = self.requests[request_id]
        self.stats.attempts_failed += 1
        endpoint = request.endpoint
        if endpoint is not None:
            endpoint.active -= 1
            endpoint.connect_failures += 1
            request.tried += (endpoint.address,)
            request.endpoint = None
        error = os.strerror(err) if err else "unknown error"
        if self.access_log:
            log.warning(
                "upstream attempt failed",
                request=request_id,
                conn=request.conn.id,
                upstream=f"{endpoint.address}:{endpoint.port}" if endpoint else None,
                errno=err,
                error=error,
                flags=flag_text(flags),
                attempt=attempts,
            )
        route = self.routing().lookup(request.conn.orig_ip, request.conn.orig_port)
        reason = f"upstream connect failed ({error})"
        if attempts >= self.relay_config.connect_attempts or route is None or route.http is None:
            self._reply(
                request_id, request, LocalReply(502, "UF", f"{reason} after {attempts} attempts"), replies
            )
            return
        decision = decide_request(route.http, request.attrs, request.tried)
        if isinstance(decision, LocalReply):
            # No endpoint left to try: the client learns of the connect failure, not of "no endpoint".
            decision = LocalReply(502, "UF", f"{reason}; {decision.detail}")
        self._answer(request_id, request, decision, forwards, replies)

    def _on_done(self, record: tuple[Any, ...]) -> None:
        (_, request_id, conn_id, status, flags, err, bytes_in, bytes_out, decide_ns, upstream_ns, total_ns,
         attempts, reused) = record  # fmt: skip
        request = self.requests.pop(request_id, None)
        endpoint = request.endpoint if request is not None else None
        if endpoint is not None:
            endpoint.active -= 1
        self.stats.status_classes[status // 100] += 1  # 0: no response
        if not self._access_log.info_enabled:
            return
        conn = self.connections.get(conn_id)
        attrs = request.attrs if request is not None else None
        self._access_log.request(
            request_id,
            self._access_log.http_request_fields(
                conn_id,
                (conn.client_ip, conn.client_port) if conn else None,
                (conn.orig_ip, conn.orig_port) if conn else None,
                request.service if request else None,
                (endpoint.address, endpoint.port) if endpoint else None,
            ),
            method=attrs.method if attrs else None,
            authority=attrs.authority if attrs else None,
            path=attrs.path if attrs else None,
            route=request.route if request else None,
            status=status,
            flags=flag_text(flags, request.local_flag if request else None),
            err=err,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            decide_ms=decide_ns / 1e6,
            upstream_ms=upstream_ns / 1e6,
            duration_ms=total_ns / 1e6,
            attempts=attempts,
            reused=bool(reused),
        )

    def _on_upgraded(self, record: tuple[Any, ...]) -> None:
        """A 101 turned the connection into a byte stream: the splice relay carries it from here."""
        _, conn_id, _request_id, client_fd, upstream_fd = record
        assert self.splice_relay is not None  # the engine hands off only when it was given one
        try:
            self.splice_relay.next_worker().adopt_established(
                conn_id, client_fd, upstream_fd, self._relay_idle_ms
            )
        except BaseException:
            os.close(client_fd)
            os.close(upstream_fd)
            raise

    def _on_not_http(self, record: tuple[Any, ...]) -> None:
        _, conn_id, client_fd = record
        conn = self.connections.pop(conn_id)
        assert self.not_http is not None  # adopt() sniffs only with a handler
        try:
            self.not_http(conn_id, client_fd, conn.client_ip, conn.client_port, conn.orig_ip, conn.orig_port)
        except BaseException:
            os.close(client_fd)
            raise

    def _on_conn_closed(self, record: tuple[Any, ...]) -> None:
        _, conn_id, requests, err = record
        conn = self.connections.pop(conn_id, None)
        if conn is not None and self.access_log:
            log.info(
                "http connection closed",
                conn=conn_id,
                src=f"{conn.client_ip}:{conn.client_port}",
                dst=f"{conn.orig_ip}:{conn.orig_port}",
                requests=requests,
                errno=err,
                duration_ms=round((time.monotonic() - conn.started) * 1000, 3),
            )


def _same_edits(a: Forward, b: Forward) -> bool:
    return (
        a.request_headers_add is b.request_headers_add
        and a.request_headers_remove is b.request_headers_remove
        and a.response_headers_add is b.response_headers_add
        and a.response_headers_remove is b.response_headers_remove
    )
