"""Load balancers: pick an endpoint for a new connection (L4) or a request (L7).

Each balancer sees the service's endpoints (with their live connection or in-flight request counts) and
the set of addresses this connection or request already tried, and returns another endpoint or None.
They never do I/O; the ones that need time or randomness take an injected clock and random source.

Balancers: ``peak_ewma`` (Linkerd's model: power of two choices on a peak-sensitive moving average
of response time times the requests in flight), ``p2c`` (power of two choices on in-flight load, the
least-request balancer), ``least_conn`` and ``round_robin``. :class:`PreferLocal` wraps any of them to
keep traffic on the caller's node when a healthy endpoint there exists.

Weights mean the same thing under every balancer: an endpoint with weight 2 is meant to carry twice the
connections of one with weight 1. Round robin hands out picks in proportion to weight; least_conn and
p2c compare load as active connections per unit of weight, and where loads tie (as they do when
connections are short and every endpoint is idle) choose in proportion to weight, so the split
follows the weights whether connections are long-lived or not.

:meth:`Balancer.prepare` specialises a balancer's pick for one fixed tuple of endpoints (a route's
destination in a routing snapshot): the HTTP engine asks for one decision per request, and p2c's
prepared picker reads the weights once instead of on every pick.
"""

from __future__ import annotations

import functools
import math
import random
import time
from bisect import bisect_right
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Protocol

__all__ = [
    "BALANCERS",
    "DEFAULT_EWMA_DECAY",
    "DEFAULT_RTT",
    "Balancer",
    "Clock",
    "Endpoint",
    "LeastConnections",
    "PeakEwma",
    "Picker",
    "PowerOfTwoChoices",
    "PreferLocal",
    "RoundRobin",
    "SkipUnhealthy",
    "make_balancer",
]

Clock = Callable[[], float]
"""Seconds on a monotonic clock (time.monotonic in production, a fake in tests)."""

# Linkerd's defaults (linkerd2-proxy, tower's PeakEwma): an unmeasured endpoint is assumed to answer
# in 30 ms, and a sample's weight in the estimate halves in about 7 s (time constant 10 s).
DEFAULT_RTT = 0.030
DEFAULT_EWMA_DECAY = 10.0


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
    # Peak-EWMA state: the response-time estimate (seconds) as of rtt_updated_at (clock seconds).
    # Until the first sample the estimate is the balancer's default RTT, set (and decaying from)
    # when a balancer first considers the endpoint; rtt_samples counts the samples taken.
    rtt_estimate: float = 0.0
    rtt_updated_at: float | None = None
    rtt_samples: int = 0

    def __post_init__(self) -> None:
        if self.weight < 1:
            raise ValueError(
                f"endpoint {self.address}:{self.port}: weight must be at least 1, not {self.weight}"
            )

    @property
    def load(self) -> float:
        """Active connections per unit of weight: what least_conn and p2c compare."""
        return self.active / self.weight


Picker = Callable[[Collection[str]], Endpoint | None]
"""A balancer's pick over endpoints fixed in advance: picker(tried) is pick(endpoints, tried)."""


class Balancer(Protocol):
    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None: ...

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        """A picker over `endpoints` (copied now) that picks as pick(endpoints, tried) does, except
        that a balancer may read the endpoints' weights now rather than at each pick."""
        ...

    def observe(self, endpoint: Endpoint, rtt: float) -> None:
        """Record how long `endpoint` took to answer (seconds); only latency-aware balancers use it."""
        ...


def _candidates(endpoints: Sequence[Endpoint], tried: Collection[str]) -> list[Endpoint]:
    return [e for e in endpoints if e.address not in tried] if tried else list(endpoints)


def _below(rng: random.Random, n: int) -> int:
    """A uniform integer in [0, n), n >= 1: random.Random's own rejection method (exact, unbiased)
    without randrange's argument handling, which costs more than the draw."""
    bits = (n - 1).bit_length()
    r = rng.getrandbits(bits)
    while r >= n:
        r = rng.getrandbits(bits)
    return r


def _prepared_pick(balancer: Balancer, endpoints: Sequence[Endpoint]) -> Picker:
    """prepare() for balancers that read everything at pick time: pick over a copy of `endpoints`.

    Over a single endpoint every balancer here picks it unless it was tried, and changes no state
    doing so (round robin's current_weight gains and loses the same weight), so that picker does
    only that. The wrappers that consult health do not use this (see _pick_every_time)."""
    members = tuple(endpoints)
    if len(members) == 1:
        only = members[0]

        def pick_the_only_one(tried: Collection[str]) -> Endpoint | None:
            return None if tried and only.address in tried else only

        return pick_the_only_one
    return functools.partial(balancer.pick, members)


def _pick_every_time(balancer: Balancer, endpoints: Sequence[Endpoint]) -> Picker:
    """prepare() that calls pick() for every request, whatever the endpoints."""
    return functools.partial(balancer.pick, tuple(endpoints))


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

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        return _prepared_pick(self, endpoints)

    def observe(self, endpoint: Endpoint, rtt: float) -> None:
        """Round robin ignores latency."""


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

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        return _prepared_pick(self, endpoints)

    def observe(self, endpoint: Endpoint, rtt: float) -> None:
        """Least connections ignores latency."""


class PowerOfTwoChoices:
    """Weighted power of two choices: draw two distinct endpoints with probability in proportion to
    weight, keep the one with fewer active connections per unit of weight (the first drawn on a tie).

    Near least-connections quality at O(1) decisions, without every proxy herding onto the same
    least-loaded endpoint (Envoy's least_request, Linkerd's p2c). Drawing by weight makes the split
    follow the weights when loads tie, as they do for short connections; comparing load per unit of
    weight makes it follow them under sustained load. Loads are compared exactly, as
    active_a * weight_b against active_b * weight_a.
    """

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried) if tried else endpoints
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = _draw_two(self.rng, candidates)
        return second if second.active * first.weight < first.active * second.weight else first

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        """pick() specialised for `endpoints` and their weights as of now (the HTTP routing compiles
        one per destination and routing snapshot; a reload builds new ones with the new weights).

        Picks exactly as pick() does when nothing was tried, with the same distribution: two
        endpoints, or one endpoint and a coin for a tie, instead of a draw and a check of the
        weights on every request. A request that already tried endpoints goes through pick()."""
        members = tuple(endpoints)
        if len(members) <= 1:
            return _prepared_pick(self, members)
        weights = tuple(e.weight for e in members)
        if len(members) == 2:
            return self._prepare_pair(members[0], members[1])
        if len(set(weights)) == 1:
            return self._prepare_uniform(members)
        return self._prepare_weighted(members, weights)

    def observe(self, endpoint: Endpoint, rtt: float) -> None:
        """Least-request P2C compares in-flight load only."""

    def _draw_two(self, candidates: Sequence[Endpoint]) -> tuple[Endpoint, Endpoint]:
        return _draw_two(self.rng, candidates)

    def _prepare_pair(self, a: Endpoint, b: Endpoint) -> Picker:
        # Both endpoints are always drawn: the lower load wins; on a tie the first drawn, which is
        # `a` with probability weight_a / (weight_a + weight_b).
        pick, rng = self.pick, self.rng
        members = (a, b)
        weight_a, weight_b = a.weight, b.weight
        if weight_a == weight_b:

            def pick_of_equal_pair(tried: Collection[str]) -> Endpoint | None:
                if tried:
                    return pick(members, tried)
                if a.active != b.active:
                    return a if a.active < b.active else b
                return b if rng.getrandbits(1) else a

            return pick_of_equal_pair
        total = weight_a + weight_b

        def pick_of_pair(tried: Collection[str]) -> Endpoint | None:
            if tried:
                return pick(members, tried)
            load_a, load_b = a.active * weight_b, b.active * weight_a
            if load_a != load_b:
                return a if load_a < load_b else b
            return a if _below(rng, total) < weight_a else b

        return pick_of_pair

    def _prepare_uniform(self, members: tuple[Endpoint, ...]) -> Picker:
        # One draw from the n * (n - 1) ordered pairs of distinct endpoints.
        pick, rng = self.pick, self.rng
        others = len(members) - 1
        pairs = len(members) * others
        bits = (pairs - 1).bit_length()

        def pick_of_equals(tried: Collection[str]) -> Endpoint | None:
            if tried:
                return pick(members, tried)
            r = rng.getrandbits(bits)
            while r >= pairs:
                r = rng.getrandbits(bits)
            i, j = r // others, r % others
            first, second = members[i], members[j + 1 if j >= i else j]
            return second if second.active < first.active else first

        return pick_of_equals

    def _prepare_weighted(self, members: tuple[Endpoint, ...], weights: tuple[int, ...]) -> Picker:
        pick, rng = self.pick, self.rng
        cumulative = tuple(accumulate(weights))

        def pick_by_weight(tried: Collection[str]) -> Endpoint | None:
            if tried:
                return pick(members, tried)
            i, j = _draw_two_indexes(rng, cumulative)
            first, second = members[i], members[j]
            return second if second.active * weights[i] < first.active * weights[j] else first

        return pick_by_weight


def _draw_two_indexes(rng: random.Random, cumulative: Sequence[int]) -> tuple[int, int]:
    """Two distinct indexes, each drawn with probability in proportion to its weight; `cumulative`
    holds the running sums of the weights (all >= 1, at least two of them)."""
    total = cumulative[-1]
    i = bisect_right(cumulative, _below(rng, total))
    weight = cumulative[i] - (cumulative[i - 1] if i else 0)
    # A uniform point outside the first one's interval [cumulative[i] - weight, cumulative[i]).
    point = _below(rng, total - weight)
    if point >= cumulative[i] - weight:
        point += weight
    return i, bisect_right(cumulative, point)


def _draw_two(rng: random.Random, candidates: Sequence[Endpoint]) -> tuple[Endpoint, Endpoint]:
    """Two distinct endpoints, each drawn with probability in proportion to weight (len >= 2)."""
    weight = candidates[0].weight
    if all(e.weight == weight for e in candidates):  # the common case: a uniform draw
        i = _below(rng, len(candidates))
        j = _below(rng, len(candidates) - 1)
        return candidates[i], candidates[j + 1 if j >= i else j]
    i, j = _draw_two_indexes(rng, tuple(accumulate(e.weight for e in candidates)))
    return candidates[i], candidates[j]


class PeakEwma:
    """Power of two choices on cost = response-time estimate x (requests in flight / weight + 1).

    Linkerd's balancer (tower's PeakEwma). The estimate is an exponentially weighted moving average
    of response times with time constant `decay` seconds, but peak-sensitive: a sample above the
    estimate replaces it at once, so an endpoint that turns slow loses traffic on its first slow
    answer, while one that turns fast again wins traffic back only as the average decays. Between
    samples the estimate decays toward zero with the same time constant, so an endpoint that lost all
    traffic is probed again after a while instead of never (a 55 ms endpoint among 5 ms ones after
    about decay x ln(11) = 24 s), and a sample below the decayed estimate is blended in with weight
    1 - exp(-time since the last sample / decay). Before its first sample an endpoint's estimate is
    `default_rtt`, decaying from when a pick first considered it (as tower's), so a new endpoint
    among faster ones is still tried; its first sample replaces the default outright.

    In-flight requests are `Endpoint.active`, which the caller keeps (+1 when a request is sent, -1
    when it ends); multiplying by them makes a queue of requests on one endpoint as expensive as
    slowness.

    Weights mean capacity here: endpoints are drawn in proportion to weight and their in-flight
    count is divided by it. Without latency samples (nothing reports them) this is exactly p2c and
    the split follows the weights; with samples, latency decides between idle endpoints, so at low
    load the split follows latency more than weight (Linkerd has no endpoint weights at all). Use
    p2c or round_robin where an exact weighted split matters.

    The caller reports each response time with :meth:`observe` (for HTTP: request sent to response
    head received; at L4: connect time).
    """

    def __init__(
        self,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        default_rtt: float = DEFAULT_RTT,
        decay: float = DEFAULT_EWMA_DECAY,
    ) -> None:
        if not default_rtt > 0 or not decay > 0:
            raise ValueError(f"default_rtt ({default_rtt}) and decay ({decay}) must be positive")
        self.clock = clock
        self.rng = rng or random.Random()
        self.default_rtt = default_rtt
        self.decay = decay

    def estimate(self, endpoint: Endpoint, now: float) -> float:
        """The endpoint's response-time estimate at `now` (seconds), decayed since its last sample."""
        if endpoint.rtt_updated_at is None:
            return self.default_rtt
        elapsed = max(0.0, now - endpoint.rtt_updated_at)
        return endpoint.rtt_estimate * math.exp(-elapsed / self.decay)

    def cost(self, endpoint: Endpoint, now: float) -> float:
        # (in flight + 1) with the in-flight count per unit of weight: with weight 1 Linkerd's
        # ewma x (in flight + 1); idle endpoints of equal latency tie whatever their weights, so
        # the draw by weight decides and the split follows the weights (as for p2c).
        return self.estimate(endpoint, now) * (endpoint.load + 1)

    def observe(self, endpoint: Endpoint, rtt: float) -> None:
        if not 0 <= rtt < math.inf:  # also refuses NaN
            raise ValueError(f"response time must be finite and >= 0, not {rtt}")
        now = self.clock()
        updated_at = endpoint.rtt_updated_at
        if updated_at is None or endpoint.rtt_samples == 0:
            endpoint.rtt_estimate = rtt  # the first sample replaces the default outright
        else:
            # estimate(endpoint, now), inline: the decay factor is also the old estimate's weight
            # in the blend below (this runs for every response).
            elapsed = now - updated_at
            kept = math.exp(-elapsed / self.decay) if elapsed > 0 else 1.0
            current = endpoint.rtt_estimate * kept
            if rtt > current:
                endpoint.rtt_estimate = rtt  # the peak is taken at once
            else:
                # A sample's weight grows with the time since the last one: after a long quiet spell
                # the new sample dominates, after a burst each one moves the estimate only a little.
                endpoint.rtt_estimate = current * kept + rtt * (1.0 - kept)
        endpoint.rtt_updated_at = now
        endpoint.rtt_samples += 1

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        candidates = _candidates(endpoints, tried)
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        first, second = _draw_two(self.rng, candidates)
        now = self.clock()
        for e in (first, second):
            if e.rtt_updated_at is None:  # first look: the default starts decaying now
                e.rtt_estimate, e.rtt_updated_at = self.default_rtt, now
        if first.rtt_samples == 0 and second.rtt_samples == 0:
            # Two defaults that started decaying at different times say nothing about either
            # endpoint (and without any samples, as at L4 with no reports, an endpoint added later
            # would lose every comparison for good): compare the requests in flight only.
            return second if second.load < first.load else first
        return second if self.cost(second, now) < self.cost(first, now) else first

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        """pick() over fixed endpoints, with what does not change between picks worked out once:
        the same choice as pick(), at about half its cost (this runs for every request)."""
        members = tuple(endpoints)
        if len(members) <= 1 or any(e.weight != members[0].weight for e in members):
            return _prepared_pick(self, members)
        count, pick, rng, clock, default_rtt = len(members), self.pick, self.rng, self.clock, self.default_rtt
        bits, rate, exp = (count - 1).bit_length(), 1.0 / self.decay, math.exp
        per_weight = 1.0 / members[0].weight  # Endpoint.load = active / weight
        getrandbits = rng.getrandbits

        others, other_bits = count - 1, (count - 2).bit_length()

        def pick_peak_ewma(tried: Collection[str]) -> Endpoint | None:
            if tried:
                return pick(members, tried)
            # Two distinct uniform indexes, as _draw_two (equal weights): _below(rng, count) and
            # _below(rng, count - 1), inline.
            i = getrandbits(bits)
            while i >= count:
                i = getrandbits(bits)
            j = getrandbits(other_bits)
            while j >= others:
                j = getrandbits(other_bits)
            first, second = members[i], members[j + 1 if j >= i else j]
            now = clock()
            if first.rtt_updated_at is None:
                first.rtt_estimate, first.rtt_updated_at = default_rtt, now
            if second.rtt_updated_at is None:
                second.rtt_estimate, second.rtt_updated_at = default_rtt, now
            if first.rtt_samples == 0 and second.rtt_samples == 0:
                return second if second.active < first.active else first
            # cost() of each, inline: estimate decayed since its last sample x (in flight + 1); no
            # time passed (or the clock stepped back) decays nothing: exp(-0.0) is 1.0
            elapsed = now - first.rtt_updated_at
            first_cost = first.rtt_estimate * exp(-elapsed * rate) if elapsed > 0 else first.rtt_estimate
            elapsed = now - second.rtt_updated_at
            second_cost = second.rtt_estimate * exp(-elapsed * rate) if elapsed > 0 else second.rtt_estimate
            first_cost *= first.active * per_weight + 1
            second_cost *= second.active * per_weight + 1
            return second if second_cost < first_cost else first

        return pick_peak_ewma


class SkipUnhealthy:
    """Picks among the endpoints `healthy` accepts (outlier detection's ``is_available``); when none
    of the untried ones is healthy it picks among all of them rather than fail the request (Envoy's
    panic mode: a guess at a possibly recovered endpoint beats a certain 503)."""

    def __init__(
        self,
        inner: Balancer,
        healthy: Callable[[Endpoint], bool],
        all_healthy: Callable[[], bool] | None = None,
    ) -> None:
        self.inner = inner
        # The inner balancer's observe itself, not a method that calls it: one call less per response.
        self.observe: Callable[[Endpoint, float], None] = inner.observe
        self.healthy = healthy
        # Optional cheap "nobody is unhealthy now" (no ejection in force): then a pick skips the
        # per-endpoint questions and goes straight to the inner balancer.
        self.all_healthy = all_healthy

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        if self.all_healthy is not None and self.all_healthy():
            return self.inner.pick(endpoints, tried)
        usable = [e for e in endpoints if e.address not in tried and self.healthy(e)]
        if usable:
            return self.inner.pick(usable, ())
        return self.inner.pick(endpoints, tried)

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        # Health changes between picks, and asking may change the detector's state: ask every time,
        # unless nobody is unhealthy, when the inner balancer's prepared picker does.
        all_healthy = self.all_healthy
        if all_healthy is None:
            return _pick_every_time(self, endpoints)
        prepared = self.inner.prepare(endpoints)
        members = tuple(endpoints)
        pick = self.pick

        def pick_skipping_unhealthy(tried: Collection[str]) -> Endpoint | None:
            return prepared(tried) if all_healthy() else pick(members, tried)

        return pick_skipping_unhealthy


class PreferLocal:
    """Keeps requests on `node` when it can: picks among the endpoints on that node that are not yet
    tried and that `healthy` accepts (outlier detection plugs in here); only when there is none
    does it pick among all endpoints. The inner balancer does the picking either way."""

    def __init__(
        self,
        inner: Balancer,
        node: str,
        healthy: Callable[[Endpoint], bool] | None = None,
    ) -> None:
        self.inner = inner
        self.observe: Callable[[Endpoint, float], None] = inner.observe  # as SkipUnhealthy's
        self.node = node
        self.healthy = healthy

    def pick(self, endpoints: Sequence[Endpoint], tried: Collection[str]) -> Endpoint | None:
        local = [
            e
            for e in endpoints
            if e.node == self.node and e.address not in tried and (self.healthy is None or self.healthy(e))
        ]
        if local:
            return self.inner.pick(local, ())
        return self.inner.pick(endpoints, tried)

    def prepare(self, endpoints: Sequence[Endpoint]) -> Picker:
        # Health changes between picks, and asking may change the detector's state: ask every time.
        return _pick_every_time(self, endpoints)


BALANCERS: dict[str, type[RoundRobin] | type[LeastConnections] | type[PowerOfTwoChoices] | type[PeakEwma]] = {
    "round_robin": RoundRobin,
    "least_conn": LeastConnections,
    "p2c": PowerOfTwoChoices,
    "peak_ewma": PeakEwma,
}


def make_balancer(
    name: str,
    *,
    clock: Clock = time.monotonic,
    rng: random.Random | None = None,
    default_rtt: float = DEFAULT_RTT,
    decay: float = DEFAULT_EWMA_DECAY,
    local_node: str | None = None,
    healthy: Callable[[Endpoint], bool] | None = None,
    all_healthy: Callable[[], bool] | None = None,
) -> Balancer:
    """The balancer called `name` (a key of BALANCERS); wrapped in SkipUnhealthy when `healthy` is
    given (`all_healthy`: see SkipUnhealthy), then in PreferLocal when `local_node` is.
    `default_rtt` and `decay` apply to peak_ewma."""
    balancer: Balancer
    if name == "peak_ewma":
        balancer = PeakEwma(clock, rng, default_rtt, decay)
    elif name == "round_robin":
        balancer = RoundRobin()
    elif name == "least_conn":
        balancer = LeastConnections(rng)
    elif name == "p2c":
        balancer = PowerOfTwoChoices(rng)
    else:
        raise ValueError(f"unknown balancer {name!r}; known: {', '.join(sorted(BALANCERS))}")
    if healthy is not None:
        balancer = SkipUnhealthy(balancer, healthy, all_healthy)
    return PreferLocal(balancer, local_node, healthy) if local_node is not None else balancer
