"""Endpoint weights under every balancer (issue 6, defect 13): the split of new connections follows them.

A seeded discrete-event simulation: connections arrive as a Poisson process, each picks an endpoint
and holds it for an exponential time. With zero holding time every endpoint is always idle (short
connections: loads always tie); with a long one the balancer works against sustained load. Seeds
make each run exact, so the tolerance only covers how closely a balancer can follow the weights,
not chance.
"""

from __future__ import annotations

import heapq
import random

import pytest

from nodeproxy.balance import (
    Balancer,
    Endpoint,
    LeastConnections,
    PeakEwma,
    PowerOfTwoChoices,
    RoundRobin,
    make_balancer,
)

ARRIVALS = 10_000
# Largest difference between an endpoint's share of picks and its share of the total weight.
TOLERANCE = 0.02


def simulate(balancer: Balancer, weights: list[int], mean_hold: float, seed: int = 1) -> list[float]:
    """Each endpoint's share of ARRIVALS picks; arrivals at rate 1, so mean_hold is the mean load."""
    rng = random.Random(seed)
    endpoints = [Endpoint(f"10.0.0.{i + 1}", 80, weight=w) for i, w in enumerate(weights)]
    index = {id(e): i for i, e in enumerate(endpoints)}
    ends: list[tuple[float, int]] = []
    picks = [0] * len(endpoints)
    now = 0.0
    for _ in range(ARRIVALS):
        now += rng.expovariate(1.0)
        while ends and ends[0][0] <= now:
            endpoints[heapq.heappop(ends)[1]].active -= 1
        chosen = balancer.pick(endpoints, ())
        assert chosen is not None
        i = index[id(chosen)]
        picks[i] += 1
        if mean_hold > 0:
            chosen.active += 1
            heapq.heappush(ends, (now + rng.expovariate(1.0 / mean_hold), i))
    return [p / ARRIVALS for p in picks]


def weight_shares(weights: list[int]) -> list[float]:
    return [w / sum(weights) for w in weights]


def seeded_balancer(name: str) -> Balancer:
    if name == "round_robin":
        return RoundRobin()
    if name == "peak_ewma":  # no latency reports here: in-flight load per unit of weight decides
        return PeakEwma(rng=random.Random(7))
    return LeastConnections(random.Random(7)) if name == "least_conn" else PowerOfTwoChoices(random.Random(7))


BALANCER_NAMES = ["round_robin", "least_conn", "p2c", "peak_ewma"]


@pytest.mark.parametrize("name", BALANCER_NAMES)
@pytest.mark.parametrize("weights", [[1, 2, 3, 4], [1, 1, 1, 10, 5, 2], [1, 9]])
@pytest.mark.parametrize("mean_hold", [0.0, 200.0], ids=["short-connections", "sustained-load"])
def test_picks_follow_weights(name: str, weights: list[int], mean_hold: float) -> None:
    shares = simulate(seeded_balancer(name), weights, mean_hold)
    expected = weight_shares(weights)
    worst = max(abs(s - e) for s, e in zip(shares, expected, strict=True))
    assert worst <= TOLERANCE, f"{name}: shares {[round(s, 3) for s in shares]}, weights say {expected}"


@pytest.mark.parametrize("name", ["least_conn", "p2c", "peak_ewma"])
def test_equal_weights_split_evenly(name: str) -> None:
    shares = simulate(seeded_balancer(name), [3, 3, 3, 3], 20.0)
    assert max(abs(s - 0.25) for s in shares) <= TOLERANCE, shares


def test_least_conn_compares_load_per_unit_of_weight() -> None:
    endpoints = [Endpoint("10.0.0.1", 80, weight=1), Endpoint("10.0.0.2", 80, weight=4)]
    endpoints[0].active, endpoints[1].active = 1, 3  # loads 1.0 and 0.75: the heavier one wins
    assert LeastConnections(random.Random(1)).pick(endpoints, ()) is endpoints[1]
    endpoints[1].active = 5  # 1.25
    assert LeastConnections(random.Random(1)).pick(endpoints, ()) is endpoints[0]


def test_p2c_keeps_the_less_loaded_per_unit_of_weight() -> None:
    # With two candidates both are always drawn, so the pick is the lower active/weight every time.
    endpoints = [Endpoint("10.0.0.1", 80, weight=1), Endpoint("10.0.0.2", 80, weight=10)]
    endpoints[0].active, endpoints[1].active = 1, 9  # 1.0 against 0.9
    p2c = PowerOfTwoChoices(random.Random(3))
    assert all(p2c.pick(endpoints, ()) is endpoints[1] for _ in range(200))


def test_p2c_draws_two_distinct_endpoints_by_weight() -> None:
    endpoints = [Endpoint(f"10.0.0.{i}", 80, weight=w) for i, w in enumerate([1, 1000, 1], start=1)]
    p2c = PowerOfTwoChoices(random.Random(5))
    for _ in range(300):
        first, second = p2c._draw_two(endpoints)
        assert first is not second


def test_weight_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="weight must be at least 1"):
        Endpoint("10.0.0.1", 80, weight=0)


def test_make_balancer_names() -> None:
    assert isinstance(make_balancer("p2c"), PowerOfTwoChoices)
    assert isinstance(make_balancer("least_conn"), LeastConnections)
    assert isinstance(make_balancer("round_robin"), RoundRobin)
    assert isinstance(make_balancer("peak_ewma"), PeakEwma)
