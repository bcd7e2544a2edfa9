"""Outlier detection (issue 8 point 4): ejection, its cap, re-admission and quick re-ejection."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from nodeproxy.balance import Endpoint, PeakEwma, make_balancer
from nodeproxy.resilience.outcome import AttemptResult, Failure
from nodeproxy.resilience.outlier import OutlierDetector, OutlierSettings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OK = AttemptResult(status=200)
E500 = AttemptResult(status=500)
E503 = AttemptResult(status=503)
CONNECT = AttemptResult(failure=Failure.CONNECT_FAILURE)


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80) for i in range(n)]


def detector(n: int = 3, **kwargs: float) -> tuple[OutlierDetector, list[Endpoint], FakeClock]:
    clock = FakeClock()
    eps = endpoints(n)
    settings = OutlierSettings(**kwargs) if kwargs else None  # type: ignore[arg-type]
    return OutlierDetector(settings, eps, clock), eps, clock


def test_envoy_defaults() -> None:
    s = OutlierSettings()
    assert (s.consecutive_5xx, s.consecutive_gateway_failures, s.interval) == (5, 5, 10.0)
    assert (s.base_ejection_time, s.max_ejection_time, s.max_ejection_percent) == (30.0, 300.0, 10.0)


def test_five_consecutive_5xx_eject_for_the_base_time() -> None:
    d, eps, clock = detector()
    for _ in range(4):
        assert d.record(eps[0], E503) is None
    ejection = d.record(eps[0], E503)
    assert ejection is not None and ejection.until == clock.now + 30.0 and ejection.times_ejected == 1
    assert not d.is_available(eps[0]) and d.ejected() == [eps[0]]
    clock.now += 29.9
    assert not d.is_available(eps[0])
    clock.now += 0.1
    assert d.is_available(eps[0]) and d.ejected() == []


def test_a_success_resets_the_count() -> None:
    d, eps, _ = detector()
    for _ in range(4):
        d.record(eps[0], E500)
    d.record(eps[0], AttemptResult(status=404))  # a 4xx is the client's problem, not the endpoint's
    for _ in range(4):
        assert d.record(eps[0], E500) is None
    assert d.is_available(eps[0])


def test_gateway_failures_count_connect_failures_and_not_500() -> None:
    d, eps, _ = detector(consecutive_5xx=0)
    for _ in range(4):
        d.record_connect_failure(eps[0])
    d.record(eps[0], E500)  # a 5xx, but not a gateway error: resets the gateway count
    for _ in range(4):
        assert d.record(eps[0], AttemptResult(status=502)) is None
    ejection = d.record(eps[0], AttemptResult(failure=Failure.RESET))
    assert ejection is not None and "gateway" in ejection.reason


def test_readmitted_endpoint_that_fails_again_is_ejected_at_once_for_longer() -> None:
    d, eps, clock = detector()
    for _ in range(5):
        d.record(eps[0], E503)
    clock.now += 30.0
    assert d.is_available(eps[0])
    ejection = d.record(eps[0], E503)  # one failure on probation is enough
    assert ejection is not None and ejection.times_ejected == 2
    assert ejection.until == clock.now + 60.0
    assert ejection.reason == "failed again after re-admission"


def test_a_success_after_readmission_ends_the_probation() -> None:
    d, eps, clock = detector()
    for _ in range(5):
        d.record(eps[0], E503)
    clock.now += 30.0
    d.record(eps[0], OK)
    for _ in range(4):
        assert d.record(eps[0], E503) is None
    assert d.record(eps[0], E503) is not None


def test_ejection_time_is_capped_and_the_count_decays_while_healthy() -> None:
    d, eps, clock = detector(base_ejection_time=30.0, max_ejection_time=70.0)
    for expected in (30.0, 60.0, 70.0, 70.0):
        ejection = d.record(eps[0], E503) or None
        while ejection is None:
            ejection = d.record(eps[0], E503)
        assert ejection.until - clock.now == expected
        clock.now = ejection.until  # re-admitted on probation, fails at once
    # Four ejections so far; 30 s healthy (3 intervals) takes three off: the next one is the 2nd.
    d.record(eps[0], OK)
    clock.now += 30.0
    ejection = None
    while ejection is None:
        ejection = d.record(eps[0], E503)
    assert ejection.times_ejected == 2 and ejection.until - clock.now == 60.0


def test_at_most_max_ejection_percent_but_at_least_one() -> None:
    d, eps, _ = detector(3)  # 10% of 3 rounds to 0: still one may go
    for _ in range(5):
        d.record(eps[0], E503)
    for _ in range(10):
        assert d.record(eps[1], E503) is None  # the cap refuses a second one
    assert d.ejected() == [eps[0]] and d.ejections_refused == 6
    d20, eps20, _ = detector(20, max_ejection_percent=25.0)
    for e in eps20:
        for _ in range(5):
            d20.record(e, CONNECT)
    assert len(d20.ejected()) == 5


def test_the_last_endpoint_and_percent_zero_are_never_ejected() -> None:
    d, eps, _ = detector(1, max_ejection_percent=100.0)
    for _ in range(20):
        assert d.record(eps[0], E503) is None
    d2, eps2, _ = detector(2, max_ejection_percent=100.0)
    for e in eps2:
        for _ in range(5):
            d2.record(e, E503)
    assert len(d2.ejected()) == 1
    d3, eps3, _ = detector(10, max_ejection_percent=0.0)
    for _ in range(20):
        assert d3.record(eps3[0], E503) is None


def test_reload_keeps_state_of_kept_endpoints_and_ignores_removed_ones() -> None:
    d, eps, _ = detector(3)
    for _ in range(5):
        d.record(eps[0], E503)
    newcomer = Endpoint("10.0.0.9", 80)
    d.update_endpoints([eps[0], eps[1], newcomer])
    assert d.ejected() == [eps[0]]
    assert d.record(eps[2], E503) is None  # removed: ignored
    assert d.is_available(eps[2]) and d.ejected_until(eps[2]) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"consecutive_5xx": -1}, "thresholds"),
        ({"interval": 0.0}, "interval"),
        ({"base_ejection_time": 10.0, "max_ejection_time": 5.0}, "max_ejection_time"),
        ({"max_ejection_percent": 101.0}, "max_ejection_percent"),
    ],
)
def test_settings_are_checked(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OutlierSettings(**kwargs)  # type: ignore[arg-type]


def test_an_always_failing_endpoint_loses_its_share_then_regains_it_after_recovery() -> None:
    """1 of 3 endpoints answers 503 (as fast as the others): it fails 5 times, is ejected, fails once
    more at each re-admission, and its share falls to ~0; once it recovers and its ejection ends it
    is re-admitted and carries its share again."""
    clock = FakeClock()
    eps = endpoints(3)
    d = OutlierDetector(OutlierSettings(), eps, clock)
    balancer = make_balancer("peak_ewma", clock=clock, rng=random.Random(5), healthy=d.is_available)
    for e in eps:
        balancer.observe(e, 0.002)

    def run(seconds: float, broken: bool) -> tuple[Counter[str], int]:
        picks: Counter[str] = Counter()
        failures = 0
        for _ in range(int(seconds * 100)):  # 100 req/s, sequential
            clock.now += 0.01
            chosen = balancer.pick(eps, ())
            assert chosen is not None
            picks[chosen.address] += 1
            bad = broken and chosen is eps[0]
            failures += bad
            d.record(chosen, E503 if bad else OK)
            balancer.observe(chosen, 0.002)
        return picks, failures

    picks, failures = run(200.0, broken=True)
    # Ejections of 30, 60, 90, 120 s, each re-admission costing one failure: 5 + 3 at most.
    assert d.ejections >= 3 and failures <= 5 + d.ejections - 1, (failures, d.ejections)
    assert picks[eps[0].address] / 20_000 < 0.001, picks
    until = d.ejected_until(eps[0])
    assert until is not None
    clock.now = until  # it recovered while ejected; the ejection ends
    later, failures = run(30.0, broken=False)
    assert failures == 0 and later[eps[0].address] > 3000 * 0.2, later


class EjectionMachine(RuleBasedStateMachine):
    """Random results on six endpoints and random time steps; the model tracks each ejection's end."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.eps = endpoints(6)
        self.settings = OutlierSettings(
            consecutive_5xx=3, consecutive_gateway_failures=2, base_ejection_time=5.0,
            max_ejection_time=20.0, max_ejection_percent=34.0, interval=2.0,
        )  # fmt: skip
        self.detector = OutlierDetector(self.settings, self.eps, self.clock)
        self.until: dict[int, float] = {}

    @rule(dt=st.floats(0, 12, allow_nan=False))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt

    @rule(
        i=st.integers(0, 5),
        result=st.sampled_from(
            [
                AttemptResult(status=200),
                AttemptResult(status=404),
                AttemptResult(status=500),
                AttemptResult(status=503),
                AttemptResult(failure=Failure.CONNECT_FAILURE),
                AttemptResult(failure=Failure.TIMEOUT),
            ]
        ),
    )
    def attempt(self, i: int, result: AttemptResult) -> None:
        was_ejected = self.clock.now < self.until.get(i, -1.0)
        ejection = self.detector.record(self.eps[i], result)
        if ejection is None:
            return
        assert not was_ejected and result.is_5xx
        duration = ejection.until - self.clock.now
        assert duration == pytest.approx(min(5.0 * ejection.times_ejected, 20.0))
        self.until[i] = ejection.until

    @invariant()
    def ejected_share_never_exceeds_the_cap(self) -> None:
        assert len(self.detector.ejected()) <= self.settings.max_ejected(len(self.eps)) == 2

    @invariant()
    def none_ejected_says_whether_any_ejection_is_in_force(self) -> None:
        in_force = any(self.clock.now < until for until in self.until.values())
        assert self.detector.none_ejected() is not in_force

    @invariant()
    def ejected_exactly_until_the_ejection_time(self) -> None:
        for i, e in enumerate(self.eps):
            expected = self.clock.now < self.until.get(i, -1.0)
            assert self.detector.is_available(e) is not expected


TestEjectionMachine = EjectionMachine.TestCase
TestEjectionMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)


def test_peak_ewma_stack_skips_ejected_endpoints_but_panics_rather_than_fail() -> None:
    clock = FakeClock()
    eps = endpoints(2)
    d = OutlierDetector(OutlierSettings(max_ejection_percent=100.0), eps, clock)
    for _ in range(5):
        d.record(eps[0], E503)
    picker = make_balancer("peak_ewma", clock=clock, healthy=d.is_available)
    assert all(picker.pick(eps, ()) is eps[1] for _ in range(20))
    assert picker.pick(eps, {eps[1].address}) is eps[0]  # only the ejected one is left: use it
    assert isinstance(PeakEwma(clock), PeakEwma)


@pytest.mark.parametrize("name", ["p2c", "peak_ewma", "round_robin", "least_conn"])
def test_prepared_pickers_skip_ejected_endpoints_once_one_is_ejected(name: str) -> None:
    # The fast path (nobody ejected: the inner balancer's own prepared picker) must not outlive an
    # ejection, nor the slow path the re-admission.
    clock = FakeClock()
    eps = endpoints(3)
    d = OutlierDetector(OutlierSettings(base_ejection_time=10.0), eps, clock)
    pick = make_balancer(name, clock=clock, healthy=d.is_available, all_healthy=d.none_ejected).prepare(eps)
    assert {pick(()) for _ in range(60)} == set(eps)
    for _ in range(5):
        d.record(eps[0], E503)
    assert not d.none_ejected()
    assert eps[0] not in {pick(()) for _ in range(60)}
    clock.now += 10.0
    assert d.none_ejected()
    assert {pick(()) for _ in range(60)} == set(eps)
