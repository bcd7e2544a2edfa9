"""Local rate limiting: token buckets per service and per route.

A bucket holds up to `burst` tokens and refills continuously at `requests_per_second`; each
request takes one token. A request that finds no token (in its route's bucket or its service's) is
answered at once with 429, response flag RL and ``retry-after`` (whole seconds until a token is
back, at least 1; gRPC: UNAVAILABLE, as gRPC maps HTTP 429). Over any interval of length T a bucket
admits at most burst + requests_per_second x T requests.

The limits are local: each proxy process enforces them on its own traffic (Envoy's local rate
limit), without a shared service.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from nodeproxy.balance import Clock
from nodeproxy.resilience.outcome import GrpcStatus, LocalAnswer

__all__ = ["RateLimiter", "TokenBucket", "rate_limited"]


def rate_limited(retry_after: float, scope: str) -> LocalAnswer:
    """The 429 reply; `retry_after` in seconds, sent rounded up to whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return LocalAnswer(
        429,
        "RL",
        f"local rate limit of {scope}",
        GrpcStatus.UNAVAILABLE,
        headers=(("retry-after", str(seconds)),),
    )


@dataclass(slots=True)
class TokenBucket:
    requests_per_second: float
    burst: int
    tokens: float = math.nan  # starts full (set in __post_init__)
    updated_at: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.requests_per_second < math.inf:
            raise ValueError(f"requests_per_second must be positive, not {self.requests_per_second}")
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, not {self.burst}")
        if math.isnan(self.tokens):
            self.tokens = float(self.burst)

    def _refill(self, now: float) -> None:
        if self.updated_at is not None and now > self.updated_at:
            self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.requests_per_second)
        if self.updated_at is None or now > self.updated_at:
            self.updated_at = now  # a clock that steps back adds nothing and takes nothing

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.requests_per_second

    def take(self) -> None:
        """Take a token; only after wait() returned 0 at the same time."""
        if self.tokens < 1:
            raise RuntimeError("token bucket: take() without an available token")
        self.tokens -= 1


class RateLimiter:
    """The buckets of one service: its own (None: no service limit) and one per limited route.

    :meth:`check` is called once per request head with the route's name; it takes a token from the
    route's bucket and the service's, or from neither."""

    def __init__(self, service_bucket: TokenBucket | None = None, clock: Clock = time.monotonic) -> None:
        self.service_bucket = service_bucket
        self.route_buckets: dict[str, TokenBucket] = {}
        self.clock = clock
        self.limited = 0  # requests answered 429, for metrics

    def set_route_bucket(self, route: str, bucket: TokenBucket | None) -> None:
        if bucket is None:
            self.route_buckets.pop(route, None)
        else:
            self.route_buckets[route] = bucket

    def check(self, route: str, service: str = "the service") -> LocalAnswer | None:
        """None: go ahead (tokens taken). Otherwise the 429 answer to send."""
        if self.service_bucket is None and not self.route_buckets:
            return None  # no limit configured: the common case, without reading the clock
        now = self.clock()
        route_bucket = self.route_buckets.get(route)
        waits = []
        if route_bucket is not None:
            waits.append((route_bucket.wait(now), f"route {route}"))
        if self.service_bucket is not None:
            waits.append((self.service_bucket.wait(now), service))
        blocked = [(w, scope) for w, scope in waits if w > 0]
        if blocked:
            self.limited += 1
            wait, scope = max(blocked)
            return rate_limited(wait, scope)
        if route_bucket is not None:
            route_bucket.take()
        if self.service_bucket is not None:
            self.service_bucket.take()
        return None
