"""Deadlines: a route timeout over all attempts, caller-supplied timeouts, and passing the remaining
time upstream.

A request's deadline is set once, when its head arrives: the route's `timeout` (Envoy's default
15 s; 0 means none), shortened (never lengthened) by what the caller asks for:

- gRPC callers send ``grpc-timeout`` (gRPC over HTTP/2 spec: 1 to 8 ASCII digits and a unit H, M,
  S, m, u or n, e.g. ``grpc-timeout: 250m``);
- HTTP callers may send ``x-nodeproxy-timeout-ms`` (1 to 10 ASCII digits of milliseconds, e.g.
  ``x-nodeproxy-timeout-ms: 250``), the counterpart of Envoy's ``x-envoy-upstream-rq-timeout-ms``.

A malformed value is ignored (the route timeout applies) rather than failing the request, as
Envoy does. The deadline covers everything up to the response head: every attempt, the backoff
between them, and each attempt's wait for its answer. A response whose head arrived in time may
stream its body for as long as it takes (idle timeouts govern that), so long gRPC streams and
downloads are not cut off. When the deadline passes before a response head, the proxy answers 504
(flag UT; gRPC: DEADLINE_EXCEEDED) at once and starts no further attempt.

Each attempt carries the time left upstream in the same header the protocol uses, so a chain of
proxies and services shares one deadline: ``grpc-timeout`` for gRPC, ``x-nodeproxy-timeout-ms``
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from nodeproxy.resilience.outcome import GrpcStatus, LocalAnswer

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "GRPC_TIMEOUT_HEADER",
    "NO_DEADLINE",
    "TIMEOUT_HEADER",
    "Deadline",
    "deadline_exceeded",
    "format_grpc_timeout",
    "format_timeout_ms",
    "parse_grpc_timeout",
    "parse_timeout_ms",
]

# Envoy's route timeout default (reference.md).
DEFAULT_ROUTE_TIMEOUT = 15.0
GRPC_TIMEOUT_HEADER = "grpc-timeout"
TIMEOUT_HEADER = "x-nodeproxy-timeout-ms"

# The gRPC spec allows at most 8 digits of TimeoutValue.
_GRPC_MAX_VALUE = 99_999_999
_GRPC_UNITS_NS = {"n": 1, "u": 1_000, "m": 1_000_000, "S": 10**9, "M": 60 * 10**9, "H": 3600 * 10**9}
# Units tried in order when formatting: the finest one that holds the value in 8 digits.
_GRPC_FORMAT_ORDER = ("n", "u", "m", "S", "M", "H")
# x-nodeproxy-timeout-ms: 10 digits is more than 115 days, beyond any sensible timeout.
_MAX_TIMEOUT_MS_DIGITS = 10


def parse_grpc_timeout(value: str) -> float | None:
    """Seconds in a ``grpc-timeout`` value, or None when it is malformed."""
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not (digits.isascii() and digits.isdigit()):
        return None
    scale = _GRPC_UNITS_NS.get(unit)
    if scale is None:
        return None
    return int(digits) * scale / 1e9


def format_grpc_timeout(seconds: float) -> str:
    """A ``grpc-timeout`` value for `seconds`, in the finest unit that fits 8 digits.

    Rounds up to that unit, as grpc-go does: the proxy enforces its own deadline anyway, and a value
    rounded down to 0 would make the upstream fail a request that still has time."""
    if not seconds > 0:
        return "0n"
    nanos = math.ceil(seconds * 1e9)
    for unit in _GRPC_FORMAT_ORDER:
        value = -(-nanos // _GRPC_UNITS_NS[unit])
        if value <= _GRPC_MAX_VALUE:
            return f"{value}{unit}"
    return f"{_GRPC_MAX_VALUE}H"  # more than 11,000 years: the longest the header can say


def parse_timeout_ms(value: str) -> float | None:
    """Seconds in an ``x-nodeproxy-timeout-ms`` value, or None when it is malformed."""
    value = value.strip(" \t")
    if not 1 <= len(value) <= _MAX_TIMEOUT_MS_DIGITS or not (value.isascii() and value.isdigit()):
        return None
    return int(value) / 1000


def format_timeout_ms(seconds: float) -> str:
    """Whole milliseconds left, rounded up (a request with 0.4 ms left still has time)."""
    return str(max(0, math.ceil(seconds * 1000)))


def deadline_exceeded(detail: str) -> LocalAnswer:
    """The reply when the deadline passes before a response head: 504 UT, gRPC DEADLINE_EXCEEDED."""
    return LocalAnswer(504, "UT", detail, grpc_status=GrpcStatus.DEADLINE_EXCEEDED)


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must have its response head, in clock seconds; None: no deadline."""

    expires_at: float | None

    @classmethod
    def for_request(
        cls,
        now: float,
        route_timeout: float,
        headers: Mapping[str, str],
        *,
        grpc: bool,
        honor_caller_timeout: bool = True,
    ) -> Deadline:
        """The deadline of a request whose head arrived at `now`.

        `route_timeout` is in seconds, 0 for none. `headers` maps lower-case names to values; only
        ``grpc-timeout`` (for gRPC requests) or ``x-nodeproxy-timeout-ms`` (for others) is read."""
        if route_timeout < 0 or math.isnan(route_timeout):
            raise ValueError(f"route timeout must be >= 0 seconds, not {route_timeout}")
        timeout = route_timeout if route_timeout > 0 else math.inf
        if honor_caller_timeout and headers:
            if grpc:
                raw = headers.get(GRPC_TIMEOUT_HEADER)
                asked = parse_grpc_timeout(raw) if raw is not None else None
            else:
                raw = headers.get(TIMEOUT_HEADER)
                asked = parse_timeout_ms(raw) if raw is not None else None
            if asked is not None:
                timeout = min(timeout, asked)
        return cls(None if math.isinf(timeout) else now + timeout)

    def remaining(self, now: float) -> float:
        """Seconds left (inf without a deadline, never below 0)."""
        if self.expires_at is None:
            return math.inf
        return max(0.0, self.expires_at - now)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def attempt_timeout(self, now: float, per_try_timeout: float | None) -> float | None:
        """How long the attempt starting at `now` may wait for its response head: the per-try
        timeout cut to the time left; None when neither applies."""
        left = self.remaining(now)
        if per_try_timeout is not None:
            left = min(left, per_try_timeout)
        return None if math.isinf(left) else left

    def upstream_headers(self, now: float, *, grpc: bool) -> tuple[tuple[str, str], ...]:
        """The header that tells the upstream how long it has (set, replacing the caller's); empty
        without a deadline."""
        if self.expires_at is None:
            return ()
        left = self.remaining(now)
        if grpc:
            return ((GRPC_TIMEOUT_HEADER, format_grpc_timeout(left)),)
        return ((TIMEOUT_HEADER, format_timeout_ms(left)),)


NO_DEADLINE = Deadline(None)  # shared by every request without one (a Deadline is immutable)
