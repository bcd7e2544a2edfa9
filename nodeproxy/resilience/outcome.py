"""What an upstream attempt ended with, and the local replies the resilience layers ask for.

One :class:`AttemptResult` per attempt feeds the retry policy (:mod:`.retry`) and outlier detection
(:mod:`.outlier`), so both classify failures the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from nodeproxy.balance import Clock

__all__ = [
    "GATEWAY_ERROR_STATUSES",
    "AttemptResult",
    "Clock",
    "Failure",
    "GrpcStatus",
    "LocalAnswer",
]


class GrpcStatus(enum.IntEnum):
    """gRPC status codes (grpc/doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Failure(enum.Enum):
    """How an attempt failed when no response head came back."""

    CONNECT_FAILURE = "connect-failure"  # no connection: refused, unreachable, connect timeout
    REFUSED_STREAM = "refused-stream"  # HTTP/2 REFUSED_STREAM or GOAWAY: never processed upstream
    RESET = "reset"  # connection closed or stream reset before the response head
    TIMEOUT = "per-try-timeout"  # the per-try timeout passed before the response head


# A proxy's "the gateway failed" answers (Envoy's gateway-error class).
GATEWAY_ERROR_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One attempt's end: a response head (`status`, and `grpc_status` when the response carried
    one in its head, i.e. a trailers-only gRPC response) or a transport `failure`, never both."""

    status: int | None = None
    failure: Failure | None = None
    grpc_status: int | None = None

    def __post_init__(self) -> None:
        if (self.status is None) == (self.failure is None):
            raise ValueError("an attempt ends with a status or a failure, exactly one of them")
        if self.status is not None and not 100 <= self.status <= 999:
            raise ValueError(f"HTTP status {self.status} is not three digits")

    @property
    def is_5xx(self) -> bool:
        """A 5xx answer, or no answer at all (which a client would see as 502/503/504)."""
        return self.failure is not None or (self.status is not None and self.status >= 500)

    @property
    def is_gateway_error(self) -> bool:
        """502, 503, 504, or no answer at all: the endpoint or the way to it failed."""
        return self.failure is not None or self.status in GATEWAY_ERROR_STATUSES


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """A reply the proxy sends itself instead of forwarding (or after giving up on) the request.

    `flag` is the response flag for ``x-nodeproxy-flags`` and access logs (Envoy's vocabulary: UO
    overflow, RL rate limited, UT upstream timeout, FI fault injected abort, ...). For a gRPC
    request the engine answers HTTP 200 with `grpc_status` instead of `status`. `headers` are added
    to the reply (e.g. ``retry-after``)."""

    status: int
    flag: str
    detail: str
    grpc_status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
