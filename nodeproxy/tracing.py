"""Trace propagation (sans-IO): W3C trace context and B3, sampling, request ids, and the proxy's span.

For every request head the HTTP engine calls :meth:`Tracer.start` with the request's trace headers
(:attr:`Tracer.header_names`); what it returns says which headers the upstream request carries instead
of the caller's. The proxy's span is a child of the caller's span and the parent of the upstream's: the
upstream request carries the same trace id, the proxy's new span id and the sampling decision, in the
format(s) the caller used (W3C ``traceparent`` when the caller sent none). When the request is done,
:meth:`Tracer.finish` hands a sampled span to the OTLP exporter (nodeproxy.otlp), which never blocks.

Formats:

- W3C trace context (https://www.w3.org/TR/trace-context/): ``traceparent: 00-<trace-id 32 hex>-
  <parent-id 16 hex>-<flags 2 hex>``, lower-case hex, all-zero ids invalid, version ff invalid, a higher
  version parsed by its first four fields. ``tracestate`` is passed on untouched with a valid
  traceparent and dropped without one (the spec forbids trusting it then).
- B3 single header (https://github.com/openzipkin/b3-propagation): ``b3: <trace-id>-<span-id>
  [-<sampling>[-<parent-span-id>]]`` with a 64- or 128-bit trace id and sampling 0, 1 or d (debug); a
  bare ``b3: 0``/``1``/``d`` carries only the decision.
- B3 multi headers: x-b3-traceid, x-b3-spanid, x-b3-parentspanid, x-b3-sampled (1/0, also the legacy
  true/false), x-b3-flags (1: debug).

When a caller sends several formats, W3C wins over B3 single, and B3 single over B3 multi (the
order OpenTelemetry's composite propagators use); all of them are re-emitted with the proxy's span.
A 64-bit B3 trace id is kept as it is in B3 and padded with zeros to 128 bits in W3C and OTLP.
``x-request-id``: the caller's is kept, else a random UUID (version 4) is added.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Final, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nodeproxy.validation import (
    parse_duration_value as _duration,
)

if TYPE_CHECKING:
    from nodeproxy.otlp import OtlpExporter

__all__ = [
    "HEADER_NAMES",
    "TraceContext",
    "TraceStart",
    "Tracer",
    "TracingConfig",
    "format_b3_multi",
    "format_b3_single",
    "format_traceparent",
    "parse_b3_multi",
    "parse_b3_single",
    "parse_traceparent",
    "trace_headers",
]
# --------------------------------------------------------------------------------------------
# Configuration


def _seconds_between(low: float, high: float) -> AfterValidator:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be at least {low:g} s and at most {high:g} s")
        return value

    return AfterValidator(check)


OTLP_HTTP_PORT = 4318  # the OTLP/HTTP port of the OpenTelemetry collector
OTLP_TRACES_PATH = "/v1/traces"


def _otlp_endpoint(value: str) -> str:
    """An OTLP/HTTP traces URL, normalized to ``http://host:port/path``: plain http only (the collector is
    a node-local or in-cluster address the operator names; TLS to it is not supported yet), no
    credentials, query or fragment; the port defaults to 4318 and the path to /v1/traces."""
    if len(value) > 2048:
        raise ValueError("URL is longer than 2048 characters")
    parts = urlsplit(value.strip())
    if parts.scheme != "http":
        raise ValueError("must be an http:// URL such as 'http://127.0.0.1:4318/v1/traces'")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    host = parts.hostname
    if not host or not _HOST_RE.fullmatch(host):
        raise ValueError("must name a host (an IPv4 address or a DNS name)")
    if port == 0:
        raise ValueError("has an invalid port")
    path = parts.path or OTLP_TRACES_PATH
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path):
        raise ValueError("path must be printable ASCII without spaces")
    return f"http://{host}:{port or OTLP_HTTP_PORT}{path}"


_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", re.ASCII)


class TracingConfig(BaseModel):
    """Trace propagation (always on: W3C trace context and B3 pass through, `x-request-id` is added) and
    span export over OTLP/HTTP (only when `otlp_endpoint` is set)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Istio's default sampling is 1% (meshConfig.defaultConfig.tracing.sampling); an incoming sampled
    # flag (W3C flags, B3 sampled/debug) always wins over it.
    sampling: float = Field(
        default=1.0,
        ge=0.0,
        le=100.0,
        allow_inf_nan=False,
        description="Percent of requests without an incoming sampling decision that are traced.",
    )
    # None: spans are not exported (propagation and request ids still work).
    otlp_endpoint: Annotated[str, AfterValidator(_otlp_endpoint)] | None = Field(
        default=None,
        description="OTLP/HTTP traces URL of the collector, e.g. http://127.0.0.1:4318/v1/traces.",
    )
    # The OpenTelemetry SDK's BatchSpanProcessor defaults: 512 spans per export, 2048 queued, 5 s delay.
    batch_size: int = Field(default=512, strict=True, ge=1, le=8192, description="Most spans in one export.")
    queue_size: int = Field(
        default=2048,
        strict=True,
        ge=1,
        le=1_000_000,
        description="Spans waiting for export per worker; beyond it new spans are dropped (and counted).",
    )
    export_interval: Annotated[float, BeforeValidator(_duration), _seconds_between(0.001, 3600)] = Field(
        default=5.0, description="Longest a span waits before a partial batch is sent."
    )
    # OTEL_EXPORTER_OTLP_TIMEOUT's default is 10 s.
    timeout: Annotated[float, BeforeValidator(_duration), _seconds_between(0.001, 300)] = Field(
        default=10.0, description="Bound on one export request (connect, send, response)."
    )
    service_name: str = Field(
        default="nodeproxy",
        min_length=1,
        max_length=255,
        pattern=r"^[!-~]([ -~]*[!-~])?$",
        description="The exported resource's service.name.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.batch_size > self.queue_size:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed queue_size ({self.queue_size})")
        return self


# --------------------------------------------------------------------------------------------
# Header names and formats

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
B3: Final = "b3"
X_B3_TRACEID: Final = "x-b3-traceid"
X_B3_SPANID: Final = "x-b3-spanid"
X_B3_PARENTSPANID: Final = "x-b3-parentspanid"
X_B3_SAMPLED: Final = "x-b3-sampled"
X_B3_FLAGS: Final = "x-b3-flags"
X_REQUEST_ID: Final = "x-request-id"
B3_MULTI_NAMES: Final = (X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED, X_B3_FLAGS)
_B3_MULTI_SET: Final = frozenset(B3_MULTI_NAMES)
# Every header start() reads; the engine copies only these out of a request head.
HEADER_NAMES: Final = frozenset((TRACEPARENT, TRACESTATE, B3, *B3_MULTI_NAMES, X_REQUEST_ID))

# Which formats a caller used (a bit set); the upstream request gets the proxy's span in the same ones.
W3C: Final = 1
B3_SINGLE: Final = 2
B3_MULTI_FORMAT: Final = 4

SAMPLED_FLAG: Final = 0x01  # W3C trace-flags: sampled
RANDOM_FLAG: Final = 0x02  # W3C trace context level 2: the trace id is random (kept as the caller set it)
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_SPAN_ID: Final = "0" * 16
_ZERO_PAD: Final = "0" * 16  # left padding of a 64-bit B3 trace id to 128 bits
_FLAG_TEXT: Final = tuple(f"{flags:02x}" for flags in range(4))  # the flags the proxy emits

_TRACEPARENT_RE: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})", re.ASCII)
_B3_RE: Final = re.compile(
    r"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?", re.ASCII
)
_TRACE_ID_RE: Final = re.compile(r"[0-9a-f]{32}|[0-9a-f]{16}", re.ASCII)
_SPAN_ID_RE: Final = re.compile(r"[0-9a-f]{16}", re.ASCII)


class TraceContext:
    """A caller's trace context as one header format carried it.

    trace_id: 32 lower-case hex digits, or 16 for a 64-bit B3 id; None for a B3 header that carries only
    a sampling decision. span_id: the caller's span (the proxy span's parent). sampled: the caller's
    decision, None when it left it to the proxy (B3 without a sampling state). debug: B3 debug (implies
    sampled). parent_span_id: the caller's parent (B3 only, informative). flags: W3C trace-flags as sent.
    """

    __slots__ = ("debug", "flags", "parent_span_id", "sampled", "span_id", "trace_id")

    def __init__(
        self,
        trace_id: str | None,
        span_id: str | None,
        sampled: bool | None,
        *,
        debug: bool = False,
        parent_span_id: str | None = None,
        flags: int = 0,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled
        self.debug = debug
        self.parent_span_id = parent_span_id
        self.flags = flags

    def _key(self) -> tuple[object, ...]:
        return (self.trace_id, self.span_id, self.sampled, self.debug, self.parent_span_id, self.flags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceContext) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"TraceContext(trace_id={self.trace_id!r}, span_id={self.span_id!r}, sampled={self.sampled!r}, "
            f"debug={self.debug!r}, parent_span_id={self.parent_span_id!r}, flags={self.flags:#04x})"
        )


def parse_traceparent(value: str) -> TraceContext | None:
    """A W3C traceparent, or None if it is invalid (then the caller's trace is not continued)."""
    match = _TRACEPARENT_RE.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    if version == "00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55] != "-":
        # A later version may append fields, each after a '-'; anything else is not a traceparent.
        return None
    flag_bits = int(flags, 16)
    return TraceContext(trace_id, span_id, bool(flag_bits & SAMPLED_FLAG), flags=flag_bits)


def format_traceparent(trace_id: str, span_id: str, flags: int) -> str:
    """A version-00 traceparent; a 64-bit (16-digit) trace id is padded with zeros to 128 bits."""
    if len(trace_id) == 16:
        trace_id = _ZERO_PAD + trace_id
    return f"00-{trace_id}-{span_id}-{flags:02x}"


def parse_b3_single(value: str) -> TraceContext | None:
    """The `b3` header, or None if it is invalid. A bare sampling state (`0`, `1`, `d`) gives a
    context without ids."""
    if len(value) == 1:
        if value == "0":
            return TraceContext(None, None, False)
        if value == "1":
            return TraceContext(None, None, True)
        if value == "d":
            return TraceContext(None, None, True, debug=True)
        return None
    match = _B3_RE.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id, sampling, parent = match.groups()
    if trace_id.count("0") == len(trace_id) or span_id == _ZERO_SPAN_ID or parent == _ZERO_SPAN_ID:
        return None
    if sampling is None:
        return TraceContext(trace_id, span_id, None)
    return TraceContext(trace_id, span_id, sampling != "0", debug=sampling == "d", parent_span_id=parent)


def format_b3_single(context: TraceContext) -> str:
    """The `b3` header for a context (ids present); a parent is written only with a sampling state, as
    the format requires."""
    if context.trace_id is None or context.span_id is None:
        return _sampling_state(context) or "0"
    value = f"{context.trace_id}-{context.span_id}"
    state = _sampling_state(context)
    if state is not None:
        value = f"{value}-{state}"
        if context.parent_span_id is not None:
            value = f"{value}-{context.parent_span_id}"
    return value


def _sampling_state(context: TraceContext) -> str | None:
    if context.debug:
        return "d"
    if context.sampled is None:
        return None
    return "1" if context.sampled else "0"


_B3_SAMPLED_VALUES: Final = {"1": True, "0": False, "true": True, "false": False}


def parse_b3_multi(headers: Mapping[str, str]) -> TraceContext | None:
    """The x-b3-* headers, or None if there are none or they are invalid. Valid sampling headers
    without (valid) ids give a context without ids, so the decision is still honoured."""
    sampled = _B3_SAMPLED_VALUES.get(headers.get(X_B3_SAMPLED, ""))
    debug = headers.get(X_B3_FLAGS) == "1"
    if debug:
        sampled = True
    trace_id = headers.get(X_B3_TRACEID)
    span_id = headers.get(X_B3_SPANID)
    parent = headers.get(X_B3_PARENTSPANID)
    if (
        trace_id is not None
        and span_id is not None
        and _TRACE_ID_RE.fullmatch(trace_id)
        and trace_id.count("0") != len(trace_id)
        and _SPAN_ID_RE.fullmatch(span_id)
        and span_id != _ZERO_SPAN_ID
        and (parent is None or (_SPAN_ID_RE.fullmatch(parent) is not None and parent != _ZERO_SPAN_ID))
    ):
        return TraceContext(trace_id, span_id, sampled, debug=debug, parent_span_id=parent)
    if sampled is None:
        return None
    return TraceContext(None, None, sampled, debug=debug)


def format_b3_multi(context: TraceContext) -> tuple[tuple[str, str], ...]:
    """The x-b3-* headers for a context: debug is sent as x-b3-flags: 1 without x-b3-sampled (debug
    implies it), a deferred decision without x-b3-sampled."""
    fields: list[tuple[str, str]] = []
    if context.trace_id is not None and context.span_id is not None:
        fields += ((X_B3_TRACEID, context.trace_id), (X_B3_SPANID, context.span_id))
        if context.parent_span_id is not None:
            fields.append((X_B3_PARENTSPANID, context.parent_span_id))
    if context.debug:
        fields.append((X_B3_FLAGS, "1"))
    elif context.sampled is not None:
        fields.append((X_B3_SAMPLED, "1" if context.sampled else "0"))
    return tuple(fields)


# --------------------------------------------------------------------------------------------
# Ids

# getrandbits: the ids need to be unique, not secret, and os.urandom costs a system call per request.
# The random module reseeds itself in a forked child, so worker processes do not repeat each other.
_getrandbits: Final = random.getrandbits
_random: Final = random.random
_UUID_CLEAR: Final = ~((0xF << 76) | (0x3 << 62))
_UUID_SET: Final = (0x4 << 76) | (0x2 << 62)  # version 4, RFC 9562 variant


def new_trace_id() -> str:
    """A random, non-zero 128-bit trace id in lower-case hex."""
    return (_getrandbits(128) or 1).to_bytes(16, "big").hex()  # 3x faster than a format spec


def new_span_id() -> str:
    """A random, non-zero 64-bit span id in lower-case hex."""
    return (_getrandbits(64) or 1).to_bytes(8, "big").hex()


def new_request_id() -> str:
    """A random UUID (version 4) in its canonical text form, as Envoy's x-request-id."""
    digits = ((_getrandbits(128) & _UUID_CLEAR) | _UUID_SET).to_bytes(16, "big").hex()
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# Tracer.start draws a request's ids in one call: a trace id (128 bits), a span id (64) and, when the
# caller sent no x-request-id, a UUID (128, the lowest bits). Same distribution as the three calls above.
_IDS_BITS: Final = 128 + 64
_IDS_BYTES: Final = _IDS_BITS // 8
_IDS_AND_UUID_BITS: Final = _IDS_BITS + 128
_IDS_AND_UUID_BYTES: Final = _IDS_AND_UUID_BITS // 8


# --------------------------------------------------------------------------------------------
# The proxy's span


class TraceStart:
    """What :meth:`Tracer.start` decided for one request.

    set_headers: fields the upstream request carries, each replacing the caller's field of that name;
    remove_headers: the caller's trace fields the upstream request must not carry. trace_id: 32 hex
    digits (a 64-bit B3 id padded), as exported and logged. span_id: the proxy's span;
    parent_span_id: the caller's span (None: the proxy's span is the trace's root). set_fields:
    set_headers encoded for the HTTP engine (name ASCII, value latin-1); computed here unless given.
    """

    __slots__ = (
        "parent_span_id",
        "remove_headers",
        "request_id",
        "sampled",
        "set_fields",
        "set_headers",
        "span_id",
        "trace_id",
        "tracestate",
    )

    def __init__(
        self,
        set_headers: tuple[tuple[str, str], ...],
        remove_headers: tuple[str, ...],
        trace_id: str,
        span_id: str,
        parent_span_id: str | None,
        sampled: bool,
        request_id: str,
        tracestate: str | None,
        set_fields: tuple[tuple[bytes, bytes], ...] | None = None,
    ) -> None:
        self.set_headers = set_headers
        self.remove_headers = remove_headers
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self.sampled = sampled
        self.request_id = request_id
        self.tracestate = tracestate
        self.set_fields = (
            set_fields
            if set_fields is not None
            else tuple([(_ENCODED_NAMES[name], value.encode("latin-1")) for name, value in set_headers])
        )

    @property
    def replaced_names(self) -> tuple[bytes, ...]:
        """The caller's fields to remove upstream when it sent trace headers: those set_headers replaces
        and remove_headers, encoded."""
        return (
            *[_ENCODED_NAMES[name] for name, _ in self.set_headers],
            *[_ENCODED_NAMES[name] for name in self.remove_headers],
        )


_NO_NAMES: Final[tuple[str, ...]] = ()
EXPORT_COUNTERS: Final = ("queued", "dropped", "exported", "rejected", "failed", "batches", "pending")


class Tracer:
    """Per worker process: propagation for every request and, when `otlp_endpoint` is set, one exported
    span per sampled request. The span's export thread starts with the first sampled span (so a Tracer
    made before a fork works in the child); :meth:`close` flushes what is queued within a bound."""

    header_names: frozenset[str] = HEADER_NAMES

    def __init__(self, config: TracingConfig | None = None) -> None:
        self.config = config if config is not None else TracingConfig()
        self._sample_below = self.config.sampling / 100.0
        self.exporter: OtlpExporter | None = None
        if self.config.otlp_endpoint is not None:
            from nodeproxy.otlp import OtlpExporter

            self.exporter = OtlpExporter(self.config)

    def start(self, headers: Mapping[str, str]) -> TraceStart:
        """Continue the caller's trace (or start one) for a request with these header fields (lower-case
        names; a repeated field's values joined by ", "; only HEADER_NAMES are read)."""
        request_id = headers.get(X_REQUEST_ID)
        if len(headers) == (request_id is not None):
            # No trace header at all: the common case, kept short (one draw for every id).
            sampled = _random() < self._sample_below
            if request_id:
                callers_request_id = True  # kept as it came
                digits = _getrandbits(_IDS_BITS).to_bytes(_IDS_BYTES, "big").hex()
            else:
                callers_request_id = False
                digits = (
                    ((_getrandbits(_IDS_AND_UUID_BITS) & _UUID_CLEAR) | _UUID_SET)
                    .to_bytes(_IDS_AND_UUID_BYTES, "big")
                    .hex()
                )
                # The UUID's 32 digits after the trace and span ids, as new_request_id() writes them.
                request_id = f"{digits[48:56]}-{digits[56:60]}-{digits[60:64]}-{digits[64:68]}-{digits[68:]}"
            trace_id, span_id = digits[:32], digits[32:48]
            if trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:  # invalid ids (1 in 2**64)
                trace_id, span_id = new_trace_id(), new_span_id()
            traceparent = f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"
            # set_fields built here: the values are ASCII (hex digits; a kept request id is not sent). Two
            # literal constructors: building the tuples by concatenation cost 1.2k instructions per request.
            if callers_request_id:
                return TraceStart(
                    ((TRACEPARENT, traceparent),),
                    _NO_NAMES,
                    trace_id,
                    span_id,
                    None,
                    sampled,
                    request_id,
                    None,
                    ((_TRACEPARENT_FIELD, traceparent.encode()),),
                )
            return TraceStart(
                ((TRACEPARENT, traceparent), (X_REQUEST_ID, request_id)),
                _NO_NAMES,
                trace_id,
                span_id,
                None,
                sampled,
                request_id,
                None,
                ((_TRACEPARENT_FIELD, traceparent.encode()), (_X_REQUEST_ID_FIELD, request_id.encode())),
            )
        return self._start_from(headers, request_id)

    def start_fields(self, fields: Sequence[tuple[str, str]]) -> TraceStart:
        """start() for a request head's header fields as the engine's HEAD record holds them: (lower-case
        name, value) pairs, other names ignored (see trace_headers)."""
        return self.start(trace_headers(fields) if fields else _NO_HEADERS)

    def _start_from(self, headers: Mapping[str, str], request_id: str | None) -> TraceStart:
        formats = 0
        context: TraceContext | None = None
        traceparent = headers.get(TRACEPARENT)
        w3c_context: TraceContext | None = None
        if traceparent is not None:
            formats |= W3C
            context = w3c_context = parse_traceparent(traceparent)
        b3 = headers.get(B3)
        has_b3_multi = not _B3_MULTI_SET.isdisjoint(headers)
        if w3c_context is not None and b3 is None and not has_b3_multi:
            # A valid traceparent alone (with its tracestate): what meshed callers send, kept short.
            trace_id = w3c_context.trace_id
            assert trace_id is not None  # a parsed traceparent has both ids
            span_id = new_span_id()
            sampled = w3c_context.sampled is True
            flags = (w3c_context.flags & RANDOM_FLAG) | sampled
            traceparent_out = (TRACEPARENT, f"00-{trace_id}-{span_id}-{_FLAG_TEXT[flags]}")
            if request_id:
                set_headers_out: tuple[tuple[str, str], ...] = (traceparent_out,)
            else:
                request_id = new_request_id()
                set_headers_out = (traceparent_out, (X_REQUEST_ID, request_id))
            return TraceStart(
                set_headers_out,
                _NO_NAMES,
                trace_id,
                span_id,
                w3c_context.span_id,
                sampled,
                request_id,
                headers.get(TRACESTATE),
            )
        if b3 is not None:
            formats |= B3_SINGLE
            context = _prefer(context, parse_b3_single(b3))
        if has_b3_multi:
            formats |= B3_MULTI_FORMAT
            context = _prefer(context, parse_b3_multi(headers))
        if formats == 0:
            formats = W3C  # only tracestate and/or x-request-id came
        if context is not None and context.trace_id is not None:
            trace_id, parent_span_id = context.trace_id, context.span_id
        else:
            trace_id, parent_span_id = new_trace_id(), None
        debug = context is not None and context.debug
        if context is not None and context.sampled is not None:
            sampled = context.sampled
        else:
            sampled = _random() < self._sample_below
        span_id = new_span_id()
        ours = TraceContext(trace_id, span_id, sampled, debug=debug, parent_span_id=parent_span_id)

        set_headers: list[tuple[str, str]] = []
        remove: list[str] = []
        tracestate: str | None = None
        if formats & W3C:
            flags = (w3c_context.flags & RANDOM_FLAG if context is w3c_context and w3c_context else 0) | (
                SAMPLED_FLAG if sampled else 0
            )
            set_headers.append((TRACEPARENT, format_traceparent(trace_id, span_id, flags)))
        if context is w3c_context and w3c_context is not None:
            tracestate = headers.get(TRACESTATE)  # passed on as it came
        elif TRACESTATE in headers:
            remove.append(TRACESTATE)  # it belongs to a traceparent that is not continued
        if formats & B3_SINGLE:
            set_headers.append((B3, format_b3_single(ours)))
        if formats & B3_MULTI_FORMAT:
            multi_fields = format_b3_multi(ours)
            set_headers += multi_fields
            emitted = {name for name, _ in multi_fields}
            remove += [name for name in B3_MULTI_NAMES if name not in emitted and name in headers]
        if not request_id:
            request_id = new_request_id()
            set_headers.append((X_REQUEST_ID, request_id))
        return TraceStart(
            tuple(set_headers),
            tuple(remove),
            trace_id if len(trace_id) == 32 else _ZERO_PAD + trace_id,
            span_id,
            parent_span_id,
            sampled,
            request_id,
            tracestate,
        )

    def finish(
        self,
        start: TraceStart,
        *,
        start_ns: int,
        end_ns: int,
        method: str | None,
        authority: str | None,
        path: str | None,
        route: str | None,
        service: str | None,
        status: int,
        grpc_status: int,
        upstream: str | None,
        attempts: int,
        flags: str,
    ) -> None:
        """The request is done: queue its span for export if it was sampled. Never blocks; a full queue
        drops the span (counted in exporter.dropped). start_ns/end_ns: time.time_ns() based;
        status 0: no response; grpc_status -1: none; upstream "ip:port" of the last attempt; flags as in
        the access log ("-" for none)."""
        exporter = self.exporter
        if exporter is None or not start.sampled:
            return
        # Client text is cut before it is queued: a queue of full-size heads would hold megabytes.
        tracestate = start.tracestate
        if tracestate is not None and len(tracestate) > MAX_EXPORTED_TRACESTATE:
            tracestate = None  # cutting would break its list syntax
        exporter.submit(
            (
                start.trace_id,
                start.span_id,
                start.parent_span_id,
                tracestate,
                start_ns,
                end_ns,
                _cut(method),
                _cut(authority),
                _cut(path),
                route,
                service,
                status,
                grpc_status,
                upstream,
                attempts,
                flags,
                start.request_id[:MAX_SPAN_TEXT],
            )
        )

    def stats(self) -> dict[str, int]:
        """Span export counters of this process (all zero without an exporter): queued, dropped (queue
        full or left at close), exported, rejected (by the collector), failed (exports that failed),
        batches, pending."""
        if self.exporter is None:
            return dict.fromkeys(EXPORT_COUNTERS, 0)
        return self.exporter.stats()

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued (within `timeout` seconds) and stop the export thread."""
        if self.exporter is not None:
            self.exporter.close(timeout)


_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})
# Every name TraceStart sets or removes, encoded once (TraceStart.set_fields / replaced_names).
_ENCODED_NAMES: Final[Mapping[str, bytes]] = {name: name.encode("ascii") for name in HEADER_NAMES}
_TRACEPARENT_FIELD: Final = _ENCODED_NAMES[TRACEPARENT]
_X_REQUEST_ID_FIELD: Final = _ENCODED_NAMES[X_REQUEST_ID]
MAX_SPAN_TEXT: Final = 256  # client text (method, authority, path, request id) in an exported span
# W3C asks vendors to pass on at least 512 characters of tracestate; a longer one is not exported.
MAX_EXPORTED_TRACESTATE: Final = 512


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= MAX_SPAN_TEXT else text[:MAX_SPAN_TEXT]


def trace_headers(fields: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The trace headers among a head's (lower-case name, value) fields; a repeated field's values are
    joined with ", " (RFC 9110 5.3), which makes two traceparent fields invalid, as the spec wants, and
    two tracestate fields one list."""
    headers: dict[str, str] = {}
    for name, value in fields:
        if name in HEADER_NAMES:
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _prefer(first: TraceContext | None, second: TraceContext | None) -> TraceContext | None:
    """The first format's context unless only the second carries ids (a bare sampling decision from a
    higher-ranked format loses to full ids from a lower one)."""
    if first is None:
        return second
    if first.trace_id is None and second is not None and second.trace_id is not None:
        return second
    return first
