"""Balancer.prepare: a picker over fixed endpoints picks as pick() does (the HTTP routing's fast path).

PowerOfTwoChoices specialises its prepared picker by shape (two endpoints, equal weights, weights
that differ); every shape is checked against the exact probabilities of weighted p2c computed here
from its definition, and through the routing decision across a reload that changes the weights.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.balance import (
    Balancer,
    Endpoint,
    LeastConnections,
    PeakEwma,
    PowerOfTwoChoices,
    PreferLocal,
    RoundRobin,
    SkipUnhealthy,
)
from nodeproxy.config import Config
from nodeproxy.proxy.http_route import Forward, RequestAttrs, decide_request
from nodeproxy.state.routing import StateUpdater


def endpoints(weights: Sequence[int], active: Sequence[int] | None = None) -> list[Endpoint]:
    eps = [Endpoint(f"10.0.0.{i + 1}", 80, weight=w) for i, w in enumerate(weights)]
    for e, a in zip(eps, active or [0] * len(eps), strict=True):
        e.active = a
    return eps


def p2c_probabilities(eps: Sequence[Endpoint]) -> list[float]:
    """P(pick) per endpoint under weighted p2c, from its definition: the first endpoint drawn by
    weight, the second by weight among the others, the lower active/weight kept (the first on a tie)."""
    total = sum(e.weight for e in eps)
    shares = [0.0] * len(eps)
    for i, first in enumerate(eps):
        for j, second in enumerate(eps):
            if i == j:
                continue
            p = first.weight / total * second.weight / (total - first.weight)
            winner = j if second.active / second.weight < first.active / first.weight else i
            shares[winner] += p
    return shares


def assert_follows(counts: Counter[int], expected: list[float], draws: int) -> None:
    for i, p in enumerate(expected):
        p = min(1.0, p)  # a sum of floats may exceed 1 by an ulp
        # Binomial standard deviation; 5 sigma makes a false failure about one in two million.
        sigma = math.sqrt(p * (1 - p) / draws)
        assert abs(counts[i] / draws - p) <= 5 * sigma + 1e-9, (i, counts, expected)


SHAPES = [
    pytest.param([1, 1], [0, 0], id="pair-equal-weights-tied"),
    pytest.param([1, 1], [2, 1], id="pair-equal-weights-loaded"),
    pytest.param([1, 3], [0, 0], id="pair-weighted-tied"),
    pytest.param([1, 3], [1, 3], id="pair-weighted-equal-load"),
    pytest.param([2, 3], [1, 1], id="pair-weighted-loaded"),
    pytest.param([1, 1, 1], [0, 0, 0], id="three-equal-idle"),
    pytest.param([4, 4, 4, 4, 4], [3, 0, 1, 1, 7], id="five-equal-loaded"),
    pytest.param([1, 2, 3, 4], [0, 0, 0, 0], id="weighted-idle"),
    pytest.param([1, 2, 3, 4], [1, 1, 2, 9], id="weighted-loaded"),
    pytest.param([1, 1000, 1], [0, 2, 0], id="one-heavy"),
]
DRAWS = 20_000


@pytest.mark.parametrize(("weights", "active"), SHAPES)
def test_prepared_p2c_has_the_distribution_of_its_definition(weights: list[int], active: list[int]) -> None:
    eps = endpoints(weights, active)
    picker = PowerOfTwoChoices(random.Random(11)).prepare(eps)
    counts: Counter[int] = Counter()
    for _ in range(DRAWS):
        chosen = picker(())
        assert chosen is not None
        counts[eps.index(chosen)] += 1
    assert_follows(counts, p2c_probabilities(eps), DRAWS)


@pytest.mark.parametrize(("weights", "active"), SHAPES)
def test_p2c_pick_has_the_distribution_of_its_definition(weights: list[int], active: list[int]) -> None:
    eps = endpoints(weights, active)
    p2c = PowerOfTwoChoices(random.Random(12))
    counts: Counter[int] = Counter()
    for _ in range(DRAWS):
        chosen = p2c.pick(eps, ())
        assert chosen is not None
        counts[eps.index(chosen)] += 1
    assert_follows(counts, p2c_probabilities(eps), DRAWS)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.integers(min_value=2, max_value=6).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(1, 50), min_size=n, max_size=n),
            st.lists(st.integers(0, 6), min_size=n, max_size=n),
        )
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_prepared_p2c_follows_weights_and_loads(shape: tuple[list[int], list[int]], seed: int) -> None:
    weights, active = shape
    eps = endpoints(weights, active)
    picker = PowerOfTwoChoices(random.Random(seed)).prepare(eps)
    draws = 4000
    counts: Counter[int] = Counter()
    for _ in range(draws):
        chosen = picker(())
        assert chosen is not None
        counts[eps.index(chosen)] += 1
    assert_follows(counts, p2c_probabilities(eps), draws)


def test_prepared_p2c_sees_load_changes_between_picks() -> None:
    eps = endpoints([1, 1, 1])
    picker = PowerOfTwoChoices(random.Random(3)).prepare(eps)
    eps[0].active = eps[1].active = 5
    # Endpoint 2 is in two of the three pairs and wins both; it is never skipped for a busier one.
    assert Counter(picker(()) is eps[2] for _ in range(600))[True] == pytest.approx(400, abs=60)
    eps[2].active = 9
    assert all(picker(()) is not eps[2] for _ in range(200))


def all_balancers() -> list[Balancer]:
    healthy = lambda e: e.address != "10.0.0.2"  # noqa: E731
    return [
        RoundRobin(),
        LeastConnections(random.Random(1)),
        PowerOfTwoChoices(random.Random(1)),
        PeakEwma(rng=random.Random(1)),
        SkipUnhealthy(PowerOfTwoChoices(random.Random(1)), healthy),
        PreferLocal(PowerOfTwoChoices(random.Random(1)), "node-a", healthy),
    ]


@settings(max_examples=150, deadline=None)
@given(
    weights=st.lists(st.integers(1, 5), min_size=0, max_size=5),
    data=st.data(),
)
def test_prepared_pickers_never_pick_a_tried_endpoint(weights: list[int], data: st.DataObject) -> None:
    eps = endpoints(weights)
    tried = (
        set(data.draw(st.lists(st.sampled_from([e.address for e in eps]), max_size=len(eps))))
        if eps
        else set()
    )
    for balancer in all_balancers():
        picker = balancer.prepare(eps)
        for _ in range(5):
            chosen = picker(tried)
            if len(tried) == len(eps):
                assert chosen is None, balancer
            else:
                assert chosen is not None and chosen in eps and chosen.address not in tried, balancer


def test_prepared_picker_keeps_its_own_copy_of_the_endpoints() -> None:
    eps = endpoints([1, 1, 1])
    picker = PowerOfTwoChoices(random.Random(1)).prepare(eps)
    first = eps[0]
    eps.clear()
    assert {picker(()) for _ in range(100)} >= {first}


def _service_config(weights: list[int]) -> Config:
    data: dict[str, Any] = {
        "node": {"name": "node-a"},
        "capture": {"pod_cidrs": ["10.244.1.0/24"]},
        "services": [
            {
                "name": "web",
                "vip": "10.96.0.30",
                "ports": [{"port": 80, "protocol": "http"}],
                "balancer": "p2c",
                "endpoints": [{"address": f"10.244.1.{10 + i}", "weight": w} for i, w in enumerate(weights)],
            }
        ],
    }
    return Config.model_validate(data)


def test_routing_follows_endpoint_weights_across_a_reload() -> None:
    """The prepared picker reads weights once per snapshot: a reload that changes them takes effect."""
    updater = StateUpdater(rng=random.Random(5))
    request = RequestAttrs(method="GET", authority="web", path="/", query="", headers={})
    for weights in ([1, 1, 1], [1, 1, 8], [6, 1, 1]):
        route = updater.apply(_service_config(weights)).lookup("10.96.0.30", 80)
        assert route is not None and route.http is not None
        counts: Counter[str] = Counter()
        for _ in range(DRAWS):
            decision = decide_request(route.http, request)
            assert isinstance(decision, Forward)
            counts[decision.endpoint.address] += 1
        # Idle endpoints tie, so the first drawn wins: each endpoint's share is its weight's.
        eps = endpoints(weights)
        assert_follows(
            Counter({i: counts[f"10.244.1.{10 + i}"] for i in range(len(weights))}),
            p2c_probabilities(eps),
            DRAWS,
        )


@pytest.mark.parametrize("weights", [[1], [3], [5, 1, 1], [2, 2], [1, 2, 3, 4]])
def test_prepared_round_robin_picks_the_same_sequence_as_pick(weights: list[int]) -> None:
    prepared_eps, plain_eps = endpoints(weights), endpoints(weights)
    picker, plain = RoundRobin().prepare(prepared_eps), RoundRobin()
    for _ in range(3 * sum(weights)):
        a, b = picker(()), plain.pick(plain_eps, ())
        assert a is not None and b is not None
        assert prepared_eps.index(a) == plain_eps.index(b)
    assert [e.current_weight for e in prepared_eps] == [e.current_weight for e in plain_eps]
    assert picker({e.address for e in prepared_eps}) is None


@settings(max_examples=200, deadline=None)
@given(
    weight=st.integers(1, 4),
    states=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 3), st.floats(0.0001, 0.2), st.floats(0, 30)),
        min_size=2,
        max_size=6,
    ),
    seed=st.integers(0, 2**32),
    steps=st.lists(st.tuples(st.floats(0, 5), st.floats(0.0001, 0.3)), min_size=1, max_size=30),
)
def test_prepared_peak_ewma_picks_exactly_as_pick(
    weight: int, states: list[tuple[int, int, float, float]], seed: int, steps: list[tuple[float, float]]
) -> None:
    # The prepared picker inlines pick()'s draw and cost: same seed, same clock, same endpoint states
    # -> the same endpoint every time, also as samples come in between picks.
    def make() -> tuple[PeakEwma, list[Endpoint], list[float]]:
        now = [100.0]
        balancer = PeakEwma(lambda: now[0], random.Random(seed), default_rtt=0.03, decay=10.0)
        endpoints = []
        for i, (active, samples, estimate, age) in enumerate(states):
            e = Endpoint(f"10.0.0.{i + 1}", 80, weight=weight)
            e.active = active
            if samples:
                e.rtt_samples, e.rtt_estimate, e.rtt_updated_at = samples, estimate, now[0] - age
            endpoints.append(e)
        return balancer, endpoints, now

    plain, plain_eps, plain_now = make()
    prepared, prepared_eps, prepared_now = make()
    picker = prepared.prepare(prepared_eps)
    for advance, rtt in steps:
        plain_now[0] += advance
        prepared_now[0] += advance
        a = plain.pick(plain_eps, ())
        b = picker(())
        assert a is not None and b is not None and a.address == b.address
        plain.observe(a, rtt)
        prepared.observe(b, rtt)
