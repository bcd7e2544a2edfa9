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
import functools
import math
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from nodeproxy import _l7
from nodeproxy.accesslog import AccessLog, structlog_level
from nodeproxy.authz.engine import RequestDenied
from nodeproxy.authz.policy import L4Request
from nodeproxy.balance import Endpoint
from nodeproxy.config import HttpConfig, RelayConfig
from nodeproxy.proxy.http_route import (
    Forward,
    LocalReply,
    RequestAttrs,
    draw_destination,
    forward_to,
    is_grpc_request,
    match_route,
    no_route,
)
from nodeproxy.proxy.relay import RelayPool
from nodeproxy.resilience.deadline import (
    GRPC_TIMEOUT_HEADER,
    TIMEOUT_HEADER,
    deadline_exceeded,
    format_grpc_timeout,
)
from nodeproxy.resilience.guard import Admission, failure_answer
from nodeproxy.resilience.outcome import AttemptResult, Failure, GrpcStatus, LocalAnswer
from nodeproxy.resilience.outlier import Ejection
from nodeproxy.resilience.retry import GiveUp, Retry, exclude_for_retry
from nodeproxy.routes import CompiledDestination, CompiledRoute, HttpServiceRoutes
from nodeproxy.state.routing import RoutingState
from nodeproxy.tracing import Tracer, TraceStart

if TYPE_CHECKING:  # type aliases of the engine's answers, declared once in its stub
    from nodeproxy._l7 import ForwardAnswer, ReplyAnswer
    from nodeproxy.authz.engine import AuthzEngine
    from nodeproxy.metrics import WorkerMetrics

    Answers = tuple[list[ForwardAnswer], list[ReplyAnswer], list[int]]

log = structlog.get_logger("nodeproxy.http")

# How an attempt failed, by the engine's ATTEMPT_FAILED failure kinds (FAIL_HELD: a response head
# the engine holds for a decision, see RouteGuards.hold_min_status).
_UPE: int = _l7.FLAGS["UPE"]
_HEAD: int = _l7.HEAD  # the record kinds of every request, read without the module attribute
_DONE: int = _l7.DONE
_TIMEOUT_MS = TIMEOUT_HEADER.encode()
_GRPC_TIMEOUT = GRPC_TIMEOUT_HEADER.encode()
_FAILURES: dict[int, Failure] = {
    _l7.FAIL_CONNECT: Failure.CONNECT_FAILURE,
    _l7.FAIL_REFUSED_STREAM: Failure.REFUSED_STREAM,
    _l7.FAIL_RESET: Failure.RESET,
    _l7.FAIL_TIMEOUT: Failure.TIMEOUT,
}

FLAG_NAMES: tuple[tuple[int, str], ...] = tuple(sorted((bit, name) for name, bit in _l7.FLAGS.items()))

# (conn_id, client_fd, client_ip, client_port, orig_ip, orig_port) of a connection that is not HTTP/1.
NotHttpHandler = Callable[[int, int, str, int, str, int], None]
# (source pod address, endpoint) -> True: through the mTLS tunnel; False: directly; str: refused, why
# (nodeproxy.proxy.mesh.MeshWorker.http_path).
MeshPath = Callable[[str, Endpoint], "bool | str"]


def _with_trace_fields(
    request: PendingRequest, add: tuple[tuple[bytes, bytes], ...], remove: tuple[bytes, ...]
) -> tuple[tuple[tuple[bytes, bytes], ...], tuple[bytes, ...]]:
    """The upstream's header edits with the proxy's span as its parent (and, when the caller sent trace
    headers, theirs removed). Tuples are concatenated, no list in between; an empty one is not rebuilt."""
    trace = request.trace
    if trace is None or not trace.set_headers:
        return add, remove
    add = add + trace.set_fields if add else trace.set_fields
    if request.trace_sent:  # replace what the caller sent
        remove = remove + trace.replaced_names
    return add, remove


@functools.lru_cache(maxsize=1024)  # statuses x grpc codes seen; bounded against odd peers
def _response_result(status: int, grpc_status: int) -> AttemptResult:
    """The AttemptResult of a response (grpc_status -1: none), built once per distinct pair."""
    return AttemptResult(status=status, grpc_status=grpc_status if grpc_status >= 0 else None)


def flag_text(bits: int, local_flag: str | None = None, extra_flag: str | None = None) -> str:
    """Envoy-style flags, comma-separated (e.g. "UF,URX"); a Python-decided local reply adds its own,
    and so does a request whose retries ran out (URX)."""
    if not bits and not local_flag and not extra_flag:
        return "-"  # most requests: no cache lookup (hashing the arguments costs more than this test)
    return _flag_text(bits, local_flag, extra_flag)


@functools.lru_cache(maxsize=1024)  # flag bits x local flags: a handful in practice
def _flag_text(bits: int, local_flag: str | None, extra_flag: str | None) -> str:
    names = [name for bit, name in FLAG_NAMES if bits & bit and name != "LR"]
    if local_flag and local_flag not in names:
        names.append(local_flag)
    if extra_flag:
        names.append(extra_flag)
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
    # The SPIFFE ID of the source workload, for policies: the identity the mesh gives the client pod
    # (its requests travel with that SVID); None without the mesh or for a pod without identity.
    source_principal: str | None = None
    # adopt_inbound(): a plaintext connection for this pod of the node, from outside the mesh. Its
    # requests are not routed: each is checked against the pod's policies and JWT rules, then sent to
    # the pod (HTTP/2 when inbound_http2).
    inbound: Endpoint | None = None
    inbound_http2: bool = False


@dataclass(slots=True, eq=False, init=False)
class PendingRequest:
    """A request between its head and its DONE record. Built for every request head: __init__ is
    written out (one chained store per default) because the generated one costs more per field."""

    conn: HttpConnection
    attrs: RequestAttrs
    service: str | None = None
    route: str | None = None
    endpoint: Endpoint | None = None  # of the current (or last) attempt
    local_flag: str | None = None
    # Set once the request is routed: where its attempts go and its resilience state.
    routes: HttpServiceRoutes | None = None
    compiled: CompiledRoute | None = None
    destination: CompiledDestination | None = None
    admission: Admission | None = None
    grpc: bool = False
    in_flight: bool = False  # endpoint.active counts the current attempt
    retried: bool = False  # some attempt was retried
    extra_flag: str | None = None  # URX: retries ran out; logged with the engine's flags
    # The final response's result was already fed to outlier detection and the balancer (a held
    # response that was released): DONE must not count it again.
    result_counted: bool = False
    timer: asyncio.TimerHandle | threading.Timer | None = None  # a delayed attempt
    trace: TraceStart | None = None
    trace_sent: bool = False  # the caller sent trace headers (the upstream's must replace them)
    timeout_sent: bool = False  # the caller sent its deadline header (replaced by the time left)

    def __init__(
        self, conn: HttpConnection, attrs: RequestAttrs, service: str | None = None, route: str | None = None
    ) -> None:
        self.conn = conn
        self.attrs = attrs
        self.service = service
        self.route = route
        # The defaults declared above, which the dataclass does not apply with init=False.
        self.endpoint = self.local_flag = self.routes = self.compiled = self.destination = None
        self.admission = self.extra_flag = self.timer = self.trace = None
        self.grpc = self.in_flight = self.retried = self.result_counted = False
        self.trace_sent = self.timeout_sent = False


@dataclass
class HttpStats:
    requests: int = 0
    local_replies: int = 0
    attempts_failed: int = 0
    retries: int = 0
    ejections: int = 0
    connections: int = 0
    # Local replies of the resilience layers by flag (RL rate limited, UO overflow, FI fault, UT ...).
    local_replies_by_flag: dict[str, int] = field(default_factory=dict)
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
        metrics: WorkerMetrics | None = None,
        tracer: Tracer | None = None,
        authz: Callable[[], AuthzEngine | None] | None = None,
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
        # Per request: Istio's request metrics (None: not recorded) and W3C / B3 propagation with
        # sampled spans (None: trace headers pass through untouched).
        self.metrics = metrics
        self.tracer = tracer
        self._trace_names: frozenset[str] = tracer.header_names if tracer is not None else frozenset()
        # The current snapshot's authentication and authorization (JWT, ALLOW/DENY policies), read
        # once per batch like the routing state; None: every request is allowed.
        self.authz = authz
        self._authz_state: AuthzEngine | None = None
        # With the mTLS mesh (use_mesh): per attempt, whether the endpoint is reached through the
        # tunnel. None: every endpoint is connected to directly.
        self._mesh_path: MeshPath | None = None
        self._principal_of: Callable[[str], str | None] | None = None
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
        self._copied_headers: frozenset[bytes] = frozenset()
        # Delayed attempts when there is no event loop: (due time, callback), run by process_records.
        self._due: list[tuple[float, Callable[[], None]]] = []

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

    def use_mesh(
        self,
        entry: tuple[str, int],
        token: bytes,
        path: MeshPath,
        principal_of: Callable[[str], str | None],
    ) -> None:
        """Send requests to endpoints on peer nodes through the mTLS tunnel: the engines connect to the
        mesh entry at `entry` (nodeproxy.proxy.mesh_entry) with `token`, for every attempt that `path`
        (source pod address, endpoint) answers True; a string is a refusal (503 UAEX, as the L4 path
        refuses), False a direct connection. principal_of (pod address -> SPIFFE ID or None) names the
        source workload of new connections for the policies."""
        for worker in self.workers:
            worker.set_mesh_entry(entry[0], entry[1], token)
        self._mesh_path = path
        self._principal_of = principal_of

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
        conn = self._new_connection(conn_id, client_ip, client_port, orig_ip, orig_port)
        if self._principal_of is not None:
            conn.source_principal = self._principal_of(client_ip)
        self._hand_over(conn, client_fd, self._peek_timeout_ms if sniff else 0)

    def adopt_inbound(
        self,
        conn_id: int,
        client_fd: int,
        client_ip: str,
        client_port: int,
        pod_ip: str,
        pod_port: int,
        http2: bool,
    ) -> None:
        """A plaintext connection for an HTTP port of a pod of this node, from a caller outside the mesh
        (the mesh's inbound port), whose policies need the requests: each request is authorized (JWT,
        L7 rules; no principal) and sent to pod_ip:pod_port from the caller's address, HTTP/2 when
        `http2`. No routing, balancing or retries: the destination is the pod. Owns the fd unless this
        raises."""
        if self._stopped:
            raise RuntimeError("http proxy is closed")
        conn = self._new_connection(conn_id, client_ip, client_port, pod_ip, pod_port)
        conn.inbound, conn.inbound_http2 = Endpoint(pod_ip, pod_port), http2
        self._hand_over(conn, client_fd, 0)

    def _new_connection(
        self, conn_id: int, client_ip: str, client_port: int, orig_ip: str, orig_port: int
    ) -> HttpConnection:
        """A connection record on the next engine thread (round robin)."""
        worker = self.workers[self._next]
        self._next = (self._next + 1) % len(self.workers)
        return HttpConnection(conn_id, client_ip, client_port, orig_ip, orig_port, time.monotonic(), worker)

    def _hand_over(self, conn: HttpConnection, client_fd: int, sniff_timeout_ms: int) -> None:
        """The engine thread takes the socket (if this raises, the fd is still the caller's)."""
        conn.worker.adopt(conn.id, client_fd, conn.client_ip if self.bind_source else None, sniff_timeout_ms)
        self.connections[conn.id] = conn
        self.stats.connections += 1

    # -- records ---------------------------------------------------------------------------------------

    def process_records(self) -> None:
        """Take every worker's records and answer the request heads among them, one batch per worker."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.notify_fd)
        state = self.routing()
        authz = self.authz() if self.authz is not None else None
        if state is not self._headers_state or authz is not self._authz_state:
            # Header values are copied out of the engine only for the names routing and the guards
            # read (computed once per snapshot).
            self._headers_state, self._authz_state = state, authz
            self._copied_headers = frozenset(
                name.encode("latin-1")
                for names in (
                    *(r.http.copied_headers for r in state.routes.values() if r.http is not None),
                    self._trace_names,
                    authz.header_names if authz is not None else (),
                )
                for name in names
            )
        self._run_due_attempts()
        for worker in self.workers:
            records = worker.drain(self._copied_headers)
            if not records:
                continue
            answers: Answers = ([], [], [])
            self._handle(records, state, answers)
            self._send(worker, answers)

    def _send(self, worker: _l7.HttpWorker, answers: Answers) -> None:
        forwards, replies, releases = answers
        if (forwards or replies or releases) and not self._stopped:
            worker.answer(forwards, replies, releases)

    def _handle(self, records: Iterable[tuple[Any, ...]], state: RoutingState, answers: Answers) -> None:
        """Act on one batch; `state` is the routing snapshot read once for the whole batch."""
        on_head, on_done = self._on_head, self._on_done  # the two kinds of every request, bound once
        for record in records:
            kind = record[0]
            try:
                if kind == _HEAD:
                    on_head(record, state, answers)
                elif kind == _DONE:
                    on_done(record)
                elif kind == _l7.ATTEMPT_FAILED:
                    self._on_attempt_failed(record, answers)
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
                    answers[1].append((record[1], 500, "IE", "internal error while routing the request"))

    def _on_head(self, record: tuple[Any, ...], state: RoutingState, answers: Answers) -> None:
        _, request_id, conn_id, method, _target, authority, path, query, headers = record
        conn = self.connections[conn_id]
        conn.requests += 1
        self.stats.requests += 1
        route = state.lookup(conn.orig_ip, conn.orig_port)
        picked: dict[str, str] = _NO_HEADERS
        trace_headers: dict[str, str] = _NO_HEADERS
        if headers:
            # The engine copied only the names some route, guard or the tracer reads (process_records).
            picked = {}
            trace_names = self._trace_names
            for name, value in headers:
                if name in trace_names:
                    if trace_headers is _NO_HEADERS:
                        trace_headers = {}
                    trace_headers[name] = (
                        f"{trace_headers[name]}, {value}" if name in trace_headers else value
                    )
                    continue
                # Repeated fields are one comma-joined value (RFC 9110 §5.3).
                picked[name] = f"{picked[name]}, {value}" if name in picked else value
        attrs = RequestAttrs(method, authority, path, query, picked)
        request = PendingRequest(conn, attrs)
        self.requests[request_id] = request
        tracer = self.tracer
        if tracer is not None:
            request.trace = tracer.start(trace_headers)
            request.trace_sent = trace_headers is not _NO_HEADERS
        if conn.inbound is not None:
            self._inbound_request(request_id, request, conn.inbound, answers)
            return
        if route is None or route.http is None:
            # The service or its HTTP protocol went away with a reload since the connection came in.
            self._reply(request_id, request, LocalReply(404, "NR", "service port is no longer HTTP"), answers)
            return
        routes = route.http
        request.service = route.service
        compiled = match_route(routes, attrs)
        if compiled is None:
            self._reply(request_id, request, no_route(routes, attrs), answers)
            return
        request.route = compiled.name
        request.grpc = grpc = is_grpc_request(routes, attrs)
        admission = routes.guards.admit(compiled.guards, picked, grpc=grpc)
        if isinstance(admission, LocalAnswer):  # rate limited, fault-injected abort, overflow
            self._reply(request_id, request, admission, answers)
            return
        request.routes, request.compiled, request.admission = routes, compiled, admission
        if picked and (TIMEOUT_HEADER in picked or GRPC_TIMEOUT_HEADER in picked):
            request.timeout_sent = True
        request.destination = draw_destination(routes, compiled)
        if admission.delay > 0:  # an injected delay, spent from the deadline
            self._attempt_later(request_id, request, admission.delay, admission.attempt_timeout)
        else:
            self._attempt(request_id, request, admission.attempt_timeout, answers)

    def _attempt(
        self, request_id: int, request: PendingRequest, timeout: float | None, answers: Answers
    ) -> None:
        """Send the request to an endpoint it has not tried (the first attempt or a retry). This runs
        for every request: the common case (first attempt, no authz, no edits) is kept short."""
        admission, routes, compiled, destination = (
            request.admission,
            request.routes,
            request.compiled,
            request.destination,
        )
        assert (
            admission is not None and routes is not None and compiled is not None and destination is not None
        )
        now = time.monotonic()
        expires_at = admission.expires_at
        if expires_at is not None and now >= expires_at:  # a fault delay or a backoff took the rest
            self._reply(
                request_id, request, deadline_exceeded("the deadline passed before an attempt"), answers
            )
            return
        tried: Collection[str] = ()
        # request.endpoint is set only below, together with admission.attempt_started(): None means
        # the first attempt, nothing tried (spares the `tried` property for every request).
        if request.endpoint is not None:
            tried = admission.tried
            if tried:  # a retry: another endpoint if there is one
                tried = exclude_for_retry(tried, [e.address for e in destination.endpoints])
        decision = forward_to(routes, compiled, destination, request.attrs, tried)
        if isinstance(decision, LocalReply):
            self._reply(request_id, request, decision, answers)
            return
        endpoint = decision.endpoint
        # Most routes edit no header: tested here, without a call.
        edits = (
            self._edits_for(decision)
            if decision.request_headers_add
            or decision.request_headers_remove
            or decision.response_headers_add
            or decision.response_headers_remove
            else _NO_EDITS
        )
        request_add, request_remove = edits.request_add, edits.request_remove
        if self._authz_state is not None:
            checked = self._authorize(request_id, request, endpoint, answers)
            if checked is None:
                return  # denied: answered
            if checked[0] or checked[1]:
                request_add, request_remove = (*request_add, *checked[0]), (*request_remove, *checked[1])
        via_mesh = False
        if self._mesh_path is not None:
            path = self._mesh_path(request.conn.client_ip, endpoint)
            if isinstance(path, str):
                self._reply(request_id, request, LocalReply(503, "UAEX", f"mesh: {path}"), answers)
                return
            via_mesh = path
        admission.attempt_started(endpoint.address)
        request.endpoint, request.in_flight = endpoint, True
        endpoint.active += 1
        endpoint.total += 1
        if request.trace is not None:
            request_add, request_remove = _with_trace_fields(request, request_add, request_remove)
        if expires_at is not None:  # the time left, replacing the caller's value
            if admission.grpc:
                name, value = _GRPC_TIMEOUT, format_grpc_timeout(expires_at - now).encode()
            else:
                name, value = _TIMEOUT_MS, b"%d" % math.ceil((expires_at - now) * 1000)  # > 0: checked above
            request_add = request_add + ((name, value),)  # noqa: RUF005 (concatenation: no list built)
            if request.timeout_sent:
                request_remove = request_remove + (name,)  # noqa: RUF005
        guards = compiled.guards
        answers[0].append(
            (
                request_id,
                endpoint.address,
                endpoint.port,
                request_add,
                request_remove,
                edits.response_add,
                edits.response_remove,
                (math.ceil(timeout * 1000) or 1) if timeout is not None else 0,  # 0 would mean none
                decision.upstream_protocol == "http2",
                guards.hold_min_status,
                guards.replay_limit,
                via_mesh,
            )
        )

    def _inbound_request(
        self, request_id: int, request: PendingRequest, pod: Endpoint, answers: Answers
    ) -> None:
        """A request of an adopt_inbound() connection: the pod's JWT rules and policies, then the pod.
        Without an authorization snapshot (no mesh any more after a reload) it is refused: the
        connection was let in only to be checked per request."""
        if self._authz_state is None:
            self._reply(
                request_id, request, LocalReply(403, "RBAC", "no policies to check the request"), answers
            )
            return
        checked = self._authorize(request_id, request, pod, answers)
        if checked is None:
            return  # denied: answered
        request_add, request_remove = checked
        if request.trace is not None:
            request_add, request_remove = _with_trace_fields(request, request_add, request_remove)
        request.endpoint, request.in_flight = pod, True
        pod.active += 1
        pod.total += 1
        answers[0].append(
            (
                request_id,
                pod.address,
                pod.port,
                request_add,
                request_remove,
                (),
                (),
                0,
                request.conn.inbound_http2,
            )
        )

    def _authorize(
        self, request_id: int, request: PendingRequest, endpoint: Endpoint, answers: Answers
    ) -> tuple[tuple[tuple[bytes, bytes], ...], tuple[bytes, ...]] | None:
        """JWT and policies of the workload the request is about to reach (its pod address and port):
        None when denied (answered here), else the header edits to add and remove (claims forwarded,
        the token removed)."""
        authz = self._authz_state
        assert authz is not None
        conn = request.conn
        verdict = authz.check_request(
            L4Request(conn.client_ip, conn.source_principal, endpoint.address, endpoint.port), request.attrs
        )
        if isinstance(verdict, RequestDenied):
            if self.access_log:
                log.info("request denied", request=request_id, conn=conn.id, reason=verdict.reason)
            self._reply(request_id, request, verdict.local_answer(request.grpc), answers)
            return None
        if verdict.headers_add or verdict.headers_remove:
            return _encode_fields(verdict.headers_add), _encode_names(verdict.headers_remove)
        return (), ()

    def _attempt_later(
        self, request_id: int, request: PendingRequest, delay: float, timeout: float | None
    ) -> None:
        """Attempt after `delay` seconds (a retry's backoff, an injected delay)."""

        def due() -> None:
            request.timer = None
            if self.requests.get(request_id) is not request or self._stopped:
                return  # the client left (DONE came) meanwhile
            answers: Answers = ([], [], [])
            try:
                self._attempt(request_id, request, timeout, answers)
            except Exception:
                log.exception("delayed http attempt failed", request=request_id)
                answers[1].append((request_id, 500, "IE", "internal error while retrying the request"))
            self._send(request.conn.worker, answers)

        if self._loop is not None:
            request.timer = self._loop.call_later(delay, due)
        else:  # no event loop (tests driving process_records): a timer thread wakes process_records
            self._due.append((time.monotonic() + delay, due))
            timer = threading.Timer(delay, self._wake)
            timer.daemon = True
            timer.start()
            request.timer = timer

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.notify_fd, 1)

    def _run_due_attempts(self) -> None:
        if not self._due:
            return
        now = time.monotonic()
        due = [fn for at, fn in self._due if at <= now]
        self._due = [(at, fn) for at, fn in self._due if at > now]
        for fn in due:
            fn()

    def _edits_for(self, decision: Forward) -> _Edits:
        """Header edits encoded once per route (routes are immutable per snapshot), not per request.
        Called only for a decision that edits something (_attempt tests that inline: most do not)."""
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
        self, request_id: int, request: PendingRequest, reply: LocalReply | LocalAnswer, answers: Answers
    ) -> None:
        # grpc_status applies to gRPC requests over HTTP/2 (the engine knows which); an HTTP/1.1 client
        # gets the HTTP status itself.
        request.local_flag = reply.flag
        self.stats.local_replies += 1
        by_flag = self.stats.local_replies_by_flag
        by_flag[reply.flag] = by_flag.get(reply.flag, 0) + 1
        if isinstance(reply, LocalAnswer):
            metrics = self.metrics
            if metrics is not None and request.service is not None:
                flag, route = reply.flag, request.route or "-"
                if flag == "RL":
                    metrics.rate_limited(request.service, route)
                elif flag == "UO":
                    metrics.overflow(request.service, "requests")
                elif flag == "FI":
                    metrics.fault_injected(request.service, route)
            answers[1].append(
                (
                    request_id,
                    reply.status,
                    reply.flag,
                    reply.detail,
                    reply.grpc_status if request.grpc else None,
                    _encode_fields(reply.headers),
                )
            )
            return
        answers[1].append((request_id, reply.status, reply.flag, reply.detail, reply.grpc_status))

    def _on_attempt_failed(self, record: tuple[Any, ...], answers: Answers) -> None:
        (_, request_id, _conn_id, err, flags, attempts, failure, status, grpc_status, replayable,
         response_ns) = record  # fmt: skip
        request = self.requests.get(request_id)
        if request is None:
            return
        self.stats.attempts_failed += 1
        endpoint, admission, routes = request.endpoint, request.admission, request.routes
        if endpoint is not None and request.in_flight:
            endpoint.active -= 1
            request.in_flight = False
        held = failure == _l7.FAIL_HELD
        if held:
            result = _response_result(status, grpc_status)
        else:
            result = AttemptResult(failure=_FAILURES[failure])
            if endpoint is not None and failure == _l7.FAIL_CONNECT:
                endpoint.connect_failures += 1
        if admission is None or routes is None or endpoint is None:
            raise AssertionError(f"attempt of request {request_id} failed before it was routed")
        outcome, ejection = routes.guards.attempt_ended(
            admission,
            endpoint,
            result,
            replayable=bool(replayable),
            response_time=response_ns / 1e9 if held and response_ns else None,
            balancer=routes.balancer,
        )
        if ejection is not None:
            self._ejected(request, ejection)
        if self.access_log:
            log.info(
                "upstream attempt failed",
                request=request_id,
                conn=request.conn.id,
                upstream=f"{endpoint.address}:{endpoint.port}",
                result=f"status {status}" if held else result.failure.value if result.failure else None,
                errno=err or None,
                flags=flag_text(flags),
                attempt=attempts,
                then="retry" if not isinstance(outcome, GiveUp) else f"give up: {outcome.reason}",
            )
        if (
            isinstance(outcome, GiveUp)
            and failure == _l7.FAIL_CONNECT
            and outcome.reason in ("not retriable", "attempts exhausted")
            and attempts < self.relay_config.connect_attempts
        ):
            # A connect failure never reached a server: like the L4 path, try up to
            # relay.connect_attempts endpoints whatever the route's retry policy says, at once.
            outcome = Retry(0.0, admission.deadline.attempt_timeout(time.monotonic(), None))
        if isinstance(outcome, GiveUp):
            if outcome.reason == "overflow" and self.metrics is not None and request.service is not None:
                self.metrics.overflow(request.service, "retries")
            if held:
                request.result_counted = True  # counted above; DONE must not count it again
                if request.retried and outcome.reason == "attempts exhausted":
                    request.extra_flag = "URX"
                answers[2].append(request_id)
                return
            answer = failure_answer(result, outcome)
            assert answer is not None  # a failure without a response always has an answer
            if flags & _UPE and answer.flag == "UC":  # the reset was the engine's, for a bad response
                answer = LocalAnswer(502, "UPE", "upstream protocol error", GrpcStatus.INTERNAL)
            if request.retried and outcome.reason == "attempts exhausted":
                request.extra_flag = "URX"  # Envoy's "upstream retry limit exceeded", for the log
            self._reply(request_id, request, answer, answers)
            return
        self.stats.retries += 1
        request.retried = True
        if self.metrics is not None and request.service is not None:
            self.metrics.retry(request.service)
        if outcome.delay > 0:
            self._attempt_later(request_id, request, outcome.delay, outcome.timeout)
        else:
            self._attempt(request_id, request, outcome.timeout, answers)

    def _ejected(self, request: PendingRequest, ejection: Ejection) -> None:
        self.stats.ejections += 1
        if self.metrics is not None and request.service is not None:
            self.metrics.ejection(request.service)
        log.warning("endpoint ejected", service=request.service, **ejection.log_fields(time.monotonic()))

    def _on_done(self, record: tuple[Any, ...]) -> None:
        (_, request_id, conn_id, status, flags, err, bytes_in, bytes_out, decide_ns, upstream_ns, total_ns,
         attempts, reused, response_ns, grpc_status) = record  # fmt: skip
        request = self.requests.pop(request_id, None)
        if request is None:
            endpoint = attrs = trace = service = route = None
            protocol = "http"
            flags_text = flag_text(flags)
        else:
            # Each field read once into a local: this runs for every request.
            endpoint = request.endpoint
            if request.timer is not None:
                request.timer.cancel()
                request.timer = None
            routes = request.routes
            if endpoint is not None and request.in_flight:
                endpoint.active -= 1
                request.in_flight = False
                # The response the client got (or the lack of one, when it left first) ends the last
                # attempt: outlier detection and the balancer's latency estimate learn it.
                if status and routes is not None and not request.result_counted:
                    ejection = routes.guards.outlier.record(endpoint, _response_result(status, grpc_status))
                    if ejection is not None:
                        self._ejected(request, ejection)
                    if response_ns:
                        routes.balancer.observe(endpoint, response_ns / 1e9)
            admission = request.admission
            if admission is not None and routes is not None:
                routes.guards.request_ended(admission)
            flags_text = flag_text(flags, request.local_flag, request.extra_flag)
            attrs, trace, service, route = request.attrs, request.trace, request.service, request.route
            protocol = "grpc" if request.grpc else "http"
        self.stats.status_classes[status // 100] += 1  # 0: no response
        metrics = self.metrics
        if metrics is not None:
            conn = self.connections.get(conn_id)
            metrics.http_request(
                service,
                conn.client_ip if conn is not None else "",
                endpoint,
                protocol,
                status,
                grpc_status,
                flags_text,
                total_ns / 1e9,
                bytes_in,
                bytes_out,
            )
        if trace is not None and trace.sampled and self.tracer is not None:
            end_ns = time.time_ns()
            self.tracer.finish(
                trace,
                start_ns=end_ns - total_ns,
                end_ns=end_ns,
                method=attrs.method if attrs else None,
                authority=attrs.authority if attrs else None,
                path=attrs.path if attrs else None,
                route=route,
                service=service,
                status=status,
                grpc_status=grpc_status,
                upstream=f"{endpoint.address}:{endpoint.port}" if endpoint else None,
                attempts=attempts,
                flags=flags_text,
            )
        access_log = self._access_log
        # Before gathering the fields; `enabled` first spares the call when the log is off (request_wanted
        # is False then).
        if not access_log.enabled or not access_log.request_wanted(status, flags_text):
            return
        conn = self.connections.get(conn_id)
        access_log.request(
            request_id,
            access_log.http_request_fields(
                conn_id,
                (conn.client_ip, conn.client_port) if conn else None,
                (conn.orig_ip, conn.orig_port) if conn else None,
                service,
                (endpoint.address, endpoint.port) if endpoint else None,
            ),
            method=attrs.method if attrs else None,
            authority=attrs.authority if attrs else None,
            path=attrs.path if attrs else None,
            route=route,
            status=status,
            flags=flags_text,
            err=err,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            decide_ms=decide_ns / 1e6,
            upstream_ms=upstream_ns / 1e6,
            duration_ms=total_ns / 1e6,
            attempts=attempts,
            reused=bool(reused),
            grpc_status=grpc_status,
            trace_id=trace.trace_id if trace is not None else None,
            x_request_id=trace.request_id if trace is not None else None,
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
