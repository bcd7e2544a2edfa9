"""Circuit breakers per service: caps on what one service may hold at once, so a slow or failing
service cannot take every connection, request slot and retry of the proxy with it.

Envoy's thresholds and defaults: 1024 connections, 1024 pending requests (waiting for a
connection), 1024 active requests, 3 active retries. A request that would go over a limit is not
queued: it is answered at once with 503 and response flag UO (gRPC: UNAVAILABLE), and counted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from nodeproxy.resilience.outcome import GrpcStatus, LocalAnswer

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_PENDING_REQUESTS",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_MAX_RETRIES",
    "UNLIMITED",
    "CircuitBreaker",
    "CircuitLimits",
    "Resource",
    "overflow_answer",
]

# Istio's defaults: no limit (the largest value the config accepts). Envoy's own are 1024 (3 for
# retries), which a node proxy reaches in normal use: 1024 connections of one TCP service reset
# the 1025th (relay.max_connections is what bounds a node), and 3 retries in flight per worker
# refused retries in the first burst of an endpoint's failures. The retry budget bounds retries.
UNLIMITED = 1_000_000
DEFAULT_MAX_CONNECTIONS = UNLIMITED
DEFAULT_MAX_PENDING_REQUESTS = UNLIMITED
DEFAULT_MAX_REQUESTS = UNLIMITED
DEFAULT_MAX_RETRIES = UNLIMITED


class Resource(enum.Enum):
    CONNECTIONS = "connections"  # upstream connections open to the service's endpoints
    PENDING = "pending"  # requests waiting for an upstream connection (pool full or connecting)
    REQUESTS = "requests"  # requests in flight to the service
    RETRIES = "retries"  # retries in flight to the service

    # Members are singletons compared by identity: hash them by identity too, in C, instead of
    # Enum's hash of the name in Python (two acquires per request hash a member).
    __hash__ = object.__hash__


# The member every request acquires and releases, read once here: an Enum member lookup on the class
# costs more than the counting itself.
_REQUESTS: Final = Resource.REQUESTS


@dataclass(frozen=True, slots=True)
class CircuitLimits:
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_pending_requests: int = DEFAULT_MAX_PENDING_REQUESTS
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")

    def limit(self, resource: Resource) -> int:
        if resource is Resource.CONNECTIONS:
            return self.max_connections
        if resource is Resource.PENDING:
            return self.max_pending_requests
        if resource is Resource.REQUESTS:
            return self.max_requests
        return self.max_retries


def overflow_answer(resource: Resource) -> LocalAnswer:
    """The reply to a request refused for `resource`: 503 UO (gRPC UNAVAILABLE)."""
    return LocalAnswer(
        503, "UO", f"circuit breaker: too many {resource.value} to the service", GrpcStatus.UNAVAILABLE
    )


class CircuitBreaker:
    """Counters of one service's resources in use against its limits.

    :meth:`try_acquire` takes a unit of a resource if the limit allows (else counts an overflow and
    returns False); every successful acquire is matched by exactly one :meth:`release`. Limits can
    change on reload (:meth:`update_limits`) without losing what is in use."""

    def __init__(self, limits: CircuitLimits | None = None) -> None:
        self.limits = limits or CircuitLimits()
        self.in_use: dict[Resource, int] = dict.fromkeys(Resource, 0)
        self.overflows: dict[Resource, int] = dict.fromkeys(Resource, 0)

    def update_limits(self, limits: CircuitLimits) -> None:
        self.limits = limits  # units over a lowered limit drain as they are released

    def try_acquire(self, resource: Resource) -> bool:
        if self.in_use[resource] >= self.limits.limit(resource):
            self.overflows[resource] += 1
            return False
        self.in_use[resource] += 1
        return True

    def release(self, resource: Resource) -> None:
        if self.in_use[resource] <= 0:
            # A release without an acquire would silently raise the limit for everyone after.
            raise RuntimeError(f"circuit breaker: {resource.value} released more often than acquired")
        self.in_use[resource] -= 1

    def try_acquire_request(self) -> bool:
        """try_acquire(Resource.REQUESTS), for every request head: the same counts, fewer lookups."""
        in_use = self.in_use
        held = in_use[_REQUESTS]
        if held >= self.limits.max_requests:
            self.overflows[_REQUESTS] += 1
            return False
        in_use[_REQUESTS] = held + 1
        return True

    def release_request(self) -> None:
        """release(Resource.REQUESTS), for every request's end."""
        in_use = self.in_use
        held = in_use[_REQUESTS]
        if held <= 0:
            raise RuntimeError("circuit breaker: requests released more often than acquired")
        in_use[_REQUESTS] = held - 1
