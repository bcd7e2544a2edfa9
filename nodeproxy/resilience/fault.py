"""Fault injection per route: delay and abort a share of requests, optionally only those whose
headers match, to test how callers cope (Envoy's and Istio's HTTP fault filter).

Delay and abort are drawn independently, each with its own percentage. A delayed request waits
`delay` seconds before its first attempt (response flag DI); an aborted one is answered at once
with `abort_status` (flag FI; a gRPC request gets HTTP 200 and `abort_grpc_status`, or the status's
usual gRPC mapping when none is set). When both hit, the delay comes first, then the abort.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeproxy.resilience.outcome import LocalAnswer

if TYPE_CHECKING:
    # nodeproxy.routes may import the resilience config, which imports this module.
    from nodeproxy.routes import RouteRegex

__all__ = ["FaultAction", "FaultPolicy", "HeaderCondition"]


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """`name` (lower case) and at most one of exact, prefix, regex (whole value, RE2); none of them:
    the header must be present. Repeated fields are one value joined with ', '."""

    name: str
    exact: str | None = None
    prefix: str | None = None
    regex: RouteRegex | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.exact, self.prefix, self.regex)) > 1:
            raise ValueError("a header condition takes at most one of exact, prefix, regex")
        if not self.name or self.name != self.name.lower():
            raise ValueError(f"header name {self.name!r} must be non-empty and lower case")

    def test(self, headers: Mapping[str, str]) -> bool:
        value = headers.get(self.name)
        if value is None:
            return False
        if self.exact is not None:
            return value == self.exact
        if self.prefix is not None:
            return value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value)
        return True


@dataclass(frozen=True, slots=True)
class FaultAction:
    """What to do to one request: wait `delay` seconds (0: none), then answer `abort` if set."""

    delay: float
    abort: LocalAnswer | None


_NO_FAULT = FaultAction(0.0, None)


@dataclass(frozen=True, slots=True)
class FaultPolicy:
    delay: float = 0.0  # seconds
    delay_percent: float = 0.0
    abort_status: int | None = None
    abort_grpc_status: int | None = None
    abort_percent: float = 0.0
    headers: tuple[HeaderCondition, ...] = ()  # all must hold; empty: every request

    def __post_init__(self) -> None:
        for name in ("delay_percent", "abort_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} must be in [0, 100], not {getattr(self, name)}")
        if not 0 <= self.delay < 3600:
            raise ValueError(f"delay must be in [0, 3600) seconds, not {self.delay}")
        if self.abort_percent > 0 and self.abort_status is None:
            raise ValueError("an abort needs abort_status")
        if self.abort_status is not None and not 200 <= self.abort_status <= 599:
            raise ValueError(f"abort_status must be in [200, 599], not {self.abort_status}")
        if self.abort_grpc_status is not None and not 0 <= self.abort_grpc_status <= 16:
            raise ValueError(f"abort_grpc_status must be a gRPC code 0-16, not {self.abort_grpc_status}")

    @property
    def header_names(self) -> frozenset[str]:
        """Header names the engine must pass in the request attributes for this policy."""
        return frozenset(c.name for c in self.headers)

    def decide(self, headers: Mapping[str, str], rng: random.Random) -> FaultAction:
        """The fault for one request (no fault when the headers do not match)."""
        if not all(c.test(headers) for c in self.headers):
            return _NO_FAULT
        delayed = self.delay_percent > 0 and self.delay > 0 and rng.random() * 100 < self.delay_percent
        aborted = self.abort_percent > 0 and rng.random() * 100 < self.abort_percent
        if not delayed and not aborted:
            return _NO_FAULT
        abort = None
        if aborted:
            assert self.abort_status is not None  # checked in __post_init__
            abort = LocalAnswer(self.abort_status, "FI", "fault injected", self.abort_grpc_status)
        return FaultAction(self.delay if delayed else 0.0, abort)
