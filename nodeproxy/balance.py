"""L4 load balancers: pick an endpoint for a new connection.

Each balancer sees the service's endpoints (with their live connection counts) and the set of addresses
this connection already tried, and returns another endpoint or None. They never do I/O.

Weights mean the same thing under every balancer: an endpoint with weight 2 is meant to carry twice the
connections of one with weight 1. Round robin hands out picks in proportion to weight; least_conn and
p2c compare load as active connections per unit of weight, and where loads tie (as they do when
connections are short and every endpoint is idle) choose in proportion to weight, so the split
follows the weights whether connections are long-lived or not.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "BALANCERS",
    "Balancer",
    "Endpoint",
    "LeastConnections",
    "PowerOfTwoChoices",
    "RoundRobin",
    "make_balancer",
]


@dataclass(eq=False)
class Endpoint:
    """One backend address of a service and its live statistics (kept across config reloads)."""

    address: str
    port: int
    weight: int = 1  # >= 1, checked in __post_init__: the balancers divide by it
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    active: int = 0  # connections open now
    total: int = 0  # connections ever picked
    connect_failures: int = 0
    current_weight: int = 0  # smooth weighted round robin state

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(
                f"endpoint {self.address}:{self.port}: weight must be at least 1, not {self.weight}"
            )

    @property
    def load(self) -> float:
        """Active connections per unit of weight: what least_conn and p2c compare."""
        return self.active / self.weight


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None: ...


def _candidates(endpoints: Sequence[Endpoint], tried: Collection[str]) -> list[Endpoint]:
    return [e for e in endpoints if e.address not in tried] if tried else list(endpoints)


def _weighted_choice(rng: random.Random, endpoints: Sequence[Endpoint], total_weight: int) -> int:
    """Index of an endpoint drawn with probability weight / total_weight."""
    point = rng.randrange(total_weight)
    for i, e in enumerate(endpoints):
        point -= e.weight
        if point < 0:
            return i
    raise AssertionError("total_weight exceeds the sum of the weights")  # callers pass the exact sum


class RoundRobin:
    """Smooth weighted round robin (as nginx): weights 5,1,1 give a,a,b,a,c,a,a rather than bursts."""

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if not candidates:
            return None
        total = 0
        best = candidates[0]
        for e in candidates:
            e.current_weight += e.weight
            total += e.weight
            if e.current_weight > best.current_weight:
                best = e
        best.current_weight -= total
        return best


class LeastConnections:
    """The endpoint with the fewest active connections per unit of weight; a tie goes to one of the tied
    endpoints chosen in proportion to weight (all idle: weight 2 gets twice the picks of weight 1)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if not candidates:
            return None
        lowest = min(e.load for e in candidates)
        # Equal ratios give equal floats (a correctly rounded division of the same rational number).
        tied = [e for e in candidates if e.load == lowest]
        if len(tied) == 1:
            return tied[0]
        return tied[_weighted_choice(self.rng, tied, sum(e.weight for e in tied))]


class PowerOfTwoChoices:
    """Weighted power of two choices: draw two distinct endpoints with probability in proportion to
    weight, keep the one with fewer active connections per unit of weight (the first drawn on a tie).

    Near least-connections quality at O(1) decisions, without every proxy herding onto the same
    least-loaded endpoint (Envoy's least_request, Linkerd's p2c). Drawing by weight makes the split
    follow the weights when loads tie, as they do for short connections; comparing load per unit of
    weight makes it follow them under sustained load.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = self._draw_two(candidates)
        return second if second.load < first.load else first

    def _draw_two(self, candidates: list[Endpoint]) -> tuple[Endpoint, Endpoint]:
        weight = candidates[0].weight
        if all(e.weight == weight for e in candidates):  # the common case: a uniform draw
            a, b = self.rng.sample(candidates, 2)
            return a, b
        total = sum(e.weight for e in candidates)
        i = _weighted_choice(self.rng, candidates, total)
        first = candidates[i]
        rest = candidates[:i] + candidates[i + 1 :]
        return first, rest[_weighted_choice(self.rng, rest, total - first.weight)]


BALANCERS: dict[str, type[RoundRobin] | type[LeastConnections] | type[PowerOfTwoChoices]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConnections,
    "p2c": PowerOfTwoChoices,
}


def make_balancer(name: str) -> Balancer:
    return BALANCERS[name]()
