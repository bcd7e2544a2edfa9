"""OTLP/HTTP span export: protobuf ``ExportTraceServiceRequest`` batches POSTed to a collector.

One :class:`OtlpExporter` per worker process. :meth:`OtlpExporter.submit` is called on the event loop
for every sampled request and never blocks: it appends a plain tuple to a bounded queue, or drops and
counts the span when the queue is full (a slow or absent collector costs spans, never latency). A
daemon thread takes batches of up to `batch_size` spans from the queue (at once when a batch is full,
else every `export_interval`), builds the protobuf message with opentelemetry-proto's generated classes
and POSTs it over a kept-alive HTTP/1.1 connection (h11), bounded by `timeout` in all (connect, send,
response).

A failed export (no connection, a timeout, a non-2xx answer) drops its batch (counted in `failed`) and
holds the next export back by a backoff that doubles from 1 s to 30 s, or by the collector's
Retry-After within that bound, so a collector that is down sees one request per backoff period rather
than a retry storm. :meth:`close` exports what is queued until its deadline and counts the rest as
dropped.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import h11
import structlog
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans, Span, SpanFlags, Status

from nodeproxy.tracing import MAX_SPAN_TEXT

if TYPE_CHECKING:
    from nodeproxy.tracing import TracingConfig

__all__ = ["ExportError", "OtlpExporter", "SpanRecord", "encode_spans"]

log = structlog.get_logger("nodeproxy.otlp")

# What Tracer.finish queues: (trace_id 32 hex, span_id 16 hex, parent_span_id 16 hex | None,
# tracestate | None, start_ns, end_ns, method, authority, path, route, service, status, grpc_status,
# upstream "ip:port" | None, attempts, flags, request_id). A tuple: building it is the only cost the
# event loop pays per sampled request; the protobuf message is built in the export thread.
SpanRecord = tuple[
    str,
    str,
    "str | None",
    "str | None",
    int,
    int,
    "str | None",
    "str | None",
    "str | None",
    "str | None",
    "str | None",
    int,
    int,
    "str | None",
    int,
    str,
    str,
]

BACKOFF_FIRST: Final = 1.0  # seconds an export waits after the first failure
BACKOFF_MAX: Final = 30.0  # and at most, however many failures follow or what Retry-After asks
MAX_RESPONSE_BYTES: Final = 1 << 20  # a collector's answer is a few bytes; more ends the connection
MAX_ATTRIBUTE_TEXT: Final = MAX_SPAN_TEXT  # client text (path, authority, request id) is cut to this
SCOPE_NAME: Final = "nodeproxy"
SCOPE_VERSION: Final = "0.1.0"
_SAMPLED_REMOTE_PARENT: Final = (
    0x01 | SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
)
_SAMPLED_ROOT: Final = 0x01 | SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK


class ExportError(Exception):
    """An export that the collector did not take; `retry_after` is its Retry-After in seconds, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _NoAnswer(ExportError):
    """The connection closed before any answer."""


def _put_string(attributes: RepeatedCompositeFieldContainer[KeyValue], key: str, value: str) -> None:
    # add() and set in place: half the cost of building a KeyValue and appending a copy of it.
    attribute = attributes.add()
    attribute.key = key
    attribute.value.string_value = value


def _put_int(attributes: RepeatedCompositeFieldContainer[KeyValue], key: str, value: int) -> None:
    attribute = attributes.add()
    attribute.key = key
    attribute.value.int_value = value


def _fill_span(span: Span, record: SpanRecord) -> None:
    (trace_id, span_id, parent_span_id, tracestate, start_ns, end_ns, method, authority, path, route,
     service, status, grpc_status, upstream, attempts, flags, request_id) = record  # fmt: skip
    span.trace_id = bytes.fromhex(trace_id)
    span.span_id = bytes.fromhex(span_id)
    if parent_span_id is not None:
        span.parent_span_id = bytes.fromhex(parent_span_id)
        span.flags = _SAMPLED_REMOTE_PARENT
    else:
        span.flags = _SAMPLED_ROOT
    if tracestate:
        span.trace_state = tracestate
    span.name = f"{method or 'HTTP'} {service}" if service else (method or "HTTP")
    # The sidecar-outbound view Istio takes: the proxy is the client of the upstream.
    span.kind = Span.SpanKind.SPAN_KIND_CLIENT
    span.start_time_unix_nano = start_ns
    span.end_time_unix_nano = max(end_ns, start_ns)
    attributes = span.attributes
    if method is not None:
        # Both the current semantic conventions and the older names Istio's dashboards query.
        _put_string(attributes, "http.request.method", method)
        _put_string(attributes, "http.method", method)
    if authority is not None:
        _put_string(attributes, "server.address", authority[:MAX_ATTRIBUTE_TEXT])
    if path is not None:
        _put_string(attributes, "url.path", path[:MAX_ATTRIBUTE_TEXT])
    if status:
        _put_int(attributes, "http.response.status_code", status)
        _put_int(attributes, "http.status_code", status)
    if grpc_status >= 0:
        _put_int(attributes, "rpc.grpc.status_code", grpc_status)
    if route is not None:
        _put_string(attributes, "nodeproxy.route", route)
    if service is not None:
        _put_string(attributes, "nodeproxy.service", service)
    if upstream is not None:
        _put_string(attributes, "upstream.address", upstream)
    _put_int(attributes, "nodeproxy.attempts", attempts)
    if attempts > 1:
        _put_int(attributes, "http.request.resend_count", attempts - 1)
    _put_string(attributes, "response_flags", flags)  # Envoy's tag name
    _put_string(attributes, "guid:x-request-id", request_id[:MAX_ATTRIBUTE_TEXT])  # Envoy's tag name
    if status >= 500 or status == 0 or grpc_status > 0:
        span.status.code = Status.StatusCode.STATUS_CODE_ERROR
        span.status.message = f"{status or 'no response'} {flags}"


def encode_spans(records: Sequence[SpanRecord], service_name: str) -> bytes:
    """One ExportTraceServiceRequest holding `records` under one resource (this process) and scope."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource = resource_spans.resource
    _put_string(resource.attributes, "service.name", service_name)
    _put_string(resource.attributes, "host.name", socket.gethostname())
    _put_int(resource.attributes, "process.pid", os.getpid())
    scope_spans: ScopeSpans = resource_spans.scope_spans.add()
    scope_spans.scope.name = SCOPE_NAME
    scope_spans.scope.version = SCOPE_VERSION
    spans = scope_spans.spans
    for record in records:
        _fill_span(spans.add(), record)
    return request.SerializeToString()


class OtlpExporter:
    """A bounded span queue and the thread that exports it (see the module docstring).

    Counters (each written by one thread only): `queued` spans accepted, `dropped` spans the full queue
    refused, `exported` spans the collector accepted, `rejected` spans it reported as rejected in a
    partial success, `failed` spans in exports that failed, `dropped_at_close` spans still queued when
    close() ran out of time, `batches` successful exports.
    """

    def __init__(self, config: TracingConfig) -> None:
        endpoint = config.otlp_endpoint
        if endpoint is None:
            raise ValueError("an exporter needs tracing.otlp_endpoint")
        parts = urlsplit(endpoint)
        if parts.hostname is None or parts.port is None:  # TracingConfig normalizes both in
            raise ValueError(f"OTLP endpoint {endpoint!r} lacks a host or port")
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.service_name = config.service_name
        self.batch_size = config.batch_size
        self.capacity = config.queue_size
        self.interval = config.export_interval
        self.timeout = config.timeout
        self.queued = 0
        self.dropped = 0
        self.exported = 0
        self.rejected = 0
        self.failed = 0
        self.dropped_at_close = 0
        self.batches = 0
        self._queue: deque[SpanRecord] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._sock: socket.socket | None = None
        self._http: h11.Connection | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._failing = False
        self._warned_answer = False

    # -- event loop side -------------------------------------------------------------------------------

    def submit(self, record: SpanRecord) -> None:
        """Queue one span; drops it (counted) when the queue is full or the exporter is closing."""
        queue = self._queue
        if len(queue) >= self.capacity or self._closing:
            self.dropped += 1
            return
        queue.append(record)
        self.queued += 1
        if self._thread is None:
            self._start_thread()
        if len(queue) == self.batch_size:
            self._wake.set()

    def stats(self) -> dict[str, int]:
        return {
            "queued": self.queued,
            "dropped": self.dropped + self.dropped_at_close,
            "exported": self.exported,
            "rejected": self.rejected,
            "failed": self.failed,
            "batches": self.batches,
            "pending": len(self._queue),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued within `timeout` seconds, then stop the thread; spans still queued are
        counted in dropped_at_close. Idempotent."""
        if self._closing:
            return
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        thread = self._thread
        if thread is None:
            self.dropped_at_close += len(self._queue)
            self._queue.clear()
            return
        self._wake.set()
        thread.join(timeout + 0.5)  # the thread bounds each export by the deadline; 0.5 s for the rest
        if thread.is_alive():
            log.warning("span export thread did not stop in time", pending=len(self._queue))

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    # -- export thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
            self._flush()
        except Exception:  # a bug here must not go unseen, nor take the worker down
            log.exception("span export thread failed")
        finally:
            self._disconnect()
            if self._queue:
                self.dropped_at_close += len(self._queue)
                self._queue.clear()

    def _loop(self) -> None:
        queue = self._queue
        last_export = time.monotonic()
        while not self._closing:
            self._wake.clear()  # before looking at the queue, so a submit after the look wakes the wait
            now = time.monotonic()
            if now < self._retry_at:
                wait = self._retry_at - now
            elif len(queue) >= self.batch_size or (queue and now - last_export >= self.interval):
                self._export(now + self.timeout)
                last_export = time.monotonic()
                continue
            else:
                wait = self.interval - (now - last_export) if queue else self.interval
            self._wake.wait(max(wait, 0.001))

    def _flush(self) -> None:
        """Export what is left until the close deadline; the backoff still holds (a collector that just
        failed is tried again only if its backoff ends before the deadline), and a failure ends it."""
        while self._queue:
            now = time.monotonic()
            if self._retry_at > now:
                if self._retry_at >= self._close_deadline:
                    return
                time.sleep(self._retry_at - now)
                now = time.monotonic()
            if now >= self._close_deadline:
                return
            if not self._export(min(now + self.timeout, self._close_deadline)):
                return

    def _export(self, deadline: float) -> bool:
        queue = self._queue
        batch = [queue.popleft() for _ in range(min(len(queue), self.batch_size))]
        if not batch:
            return True
        try:
            answer = self._post(encode_spans(batch, self.service_name), deadline)
        except (OSError, h11.ProtocolError, ExportError, ValueError) as err:
            self._failed(len(batch), err)
            return False
        except Exception as err:  # a bug: logged with its traceback, and the export thread goes on
            log.exception("span export failed unexpectedly")
            self._failed(len(batch), err)
            return False
        rejected = min(len(batch), self._rejected_spans(answer))
        self.rejected += rejected
        self.exported += len(batch) - rejected
        self.batches += 1
        self._backoff = 0.0
        self._retry_at = 0.0
        if self._failing:
            self._failing = False
            log.info("span export works again", endpoint=f"{self.host}:{self.port}{self.path}")
        return True

    def _rejected_spans(self, answer: bytes) -> int:
        """Spans a 2xx answer reports as rejected (a partial success). An answer that is not an
        ExportTraceServiceResponse (a proxy's page, JSON) still means the spans were taken."""
        if not answer:
            return 0
        response = ExportTraceServiceResponse()
        try:
            response.ParseFromString(answer)
        except DecodeError:
            if not self._warned_answer:
                self._warned_answer = True
                log.warning(
                    "collector answer is not an OTLP ExportTraceServiceResponse; spans count as taken",
                    endpoint=f"{self.host}:{self.port}{self.path}",
                    answer=answer[:64].decode("ascii", "replace"),
                )
            return 0
        rejected = response.partial_success.rejected_spans
        if rejected:
            log.warning(
                "collector rejected spans",
                rejected=rejected,
                message=response.partial_success.error_message[:512],
            )
        return rejected

    def _failed(self, spans: int, err: Exception) -> None:
        """An export failed: its spans are dropped (counted) and the next export waits for the backoff."""
        self._disconnect()
        self.failed += spans
        retry_after = err.retry_after if isinstance(err, ExportError) else None
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        wait = min(BACKOFF_MAX, max(self._backoff, retry_after or 0.0))
        self._retry_at = time.monotonic() + wait
        if not self._failing:  # one line when exports start failing, one when they work again
            self._failing = True
            log.warning(
                "span export failed; spans are dropped until the collector answers",
                endpoint=f"{self.host}:{self.port}{self.path}",
                error=str(err)[:512],
                spans=spans,
                retry_in_s=round(wait, 3),
            )

    def _connect(self, deadline: float) -> tuple[socket.socket, h11.Connection]:
        if self._sock is not None and self._http is not None:
            # An idle kept-alive connection has nothing to read unless the collector closed it (its
            # idle timeout): then open a new one rather than lose the batch to a dead socket.
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return self._sock, self._http
            self._disconnect()
        sock = socket.create_connection((self.host, self.port), timeout=_remaining(deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._http = sock, h11.Connection(h11.CLIENT)
        return sock, self._http

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._http = None

    def _post(self, body: bytes, deadline: float) -> bytes:
        """POST one export; the response body (an ExportTraceServiceResponse) on a 2xx answer. A kept-
        alive connection that the collector closed just as it was reused (no answer at all) is retried
        once on a new connection, as HTTP clients do for idempotent requests."""
        reused = self._sock is not None
        try:
            return self._post_once(body, deadline)
        except (ConnectionError, h11.ProtocolError, _NoAnswer):
            if not reused:
                raise
            self._disconnect()
            return self._post_once(body, deadline)

    def _post_once(self, body: bytes, deadline: float) -> bytes:
        sock, http = self._connect(deadline)
        request = h11.Request(
            method="POST",
            target=self.path,
            headers=[
                ("Host", f"{self.host}:{self.port}"),
                ("Content-Type", "application/x-protobuf"),
                ("Content-Length", str(len(body))),
                ("User-Agent", f"nodeproxy/{SCOPE_VERSION}"),
            ],
        )
        out = http.send(request) or b""
        out += http.send(h11.Data(data=body)) or b""
        out += http.send(h11.EndOfMessage()) or b""
        sock.settimeout(_remaining(deadline))
        sock.sendall(out)  # the timeout bounds the whole sendall (Python >= 3.5)
        status = 0
        retry_after: float | None = None
        answer = bytearray()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                sock.settimeout(_remaining(deadline))
                http.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
                retry_after = _retry_after(event.headers)
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > MAX_RESPONSE_BYTES:
                    raise ExportError("collector answer too long")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _NoAnswer("collector closed the connection before answering")
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()
        else:
            self._disconnect()
        if not 200 <= status < 300:
            raise ExportError(f"collector answered {status}", retry_after)
        return bytes(answer)


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError("export timed out")
    return remaining


def _retry_after(headers: Sequence[tuple[bytes, bytes]]) -> float | None:
    for name, value in headers:
        if name == b"retry-after":
            try:
                return float(int(value))
            except ValueError:
                return None  # an HTTP date: the backoff applies
    return None
