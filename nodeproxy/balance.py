"""L4 load balancers: pick an endpoint for a new connection.

Each balancer sees the service's endpoints (with their live connection counts) and the set of addresses
this connection already tried, and returns another endpoint or None. They never do I/O.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(eq=False)
class Endpoint:
    """One backend address of a service and its live statistics (kept across config reloads)."""

    address: str
    port: int
    weight: int = 1
    node: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    active: int = 0  # connections open now
    total: int = 0  # connections ever picked
    connect_failures: int = 0
    current_weight: int = 0  # smooth weighted round robin state

    @property
    def load(self) -> float:
        return self.active / self.weight


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None: ...


def _candidates(endpoints: Sequence[Endpoint], tried: Collection[str]) -> list[Endpoint]:
    return [e for e in endpoints if e.address not in tried] if tried else list(endpoints)


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
    """The endpoint with the fewest active connections per unit of weight; ties go to a random one."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if not candidates:
            return None
        lowest = min(e.load for e in candidates)
        return self.rng.choice([e for e in candidates if e.load == lowest])


class PowerOfTwoChoices:
    """Two endpoints at random, keep the less loaded: near least-connections quality at O(1) cost,
    without every proxy herding onto the same least-loaded endpoint (Envoy least_request, Linkerd p2c)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        a, b = self.rng.sample(candidates, 2)
        return a if a.load <= b.load else b


BALANCERS: dict[str, type[RoundRobin] | type[LeastConnections] | type[PowerOfTwoChoices]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConnections,
    "p2c": PowerOfTwoChoices,
}


def make_balancer(name: str) -> Balancer:
    return BALANCERS[name]()
