"""Peak-EWMA balancing, locality and health filtering (issue 8 point 1): pure, with a fake clock."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nodeproxy.balance import (
    DEFAULT_EWMA_DECAY,
    DEFAULT_RTT,
    Balancer,
    Endpoint,
    PeakEwma,
    PowerOfTwoChoices,
    PreferLocal,
    RoundRobin,
    SkipUnhealthy,
    make_balancer,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80) for i in range(n)]


def test_linkerd_defaults() -> None:
    assert DEFAULT_RTT == 0.030
    assert DEFAULT_EWMA_DECAY == 10.0


def test_unmeasured_endpoint_costs_the_default_rtt() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock)
    ep = Endpoint("10.0.0.1", 80)
    assert ewma.estimate(ep, clock.now) == DEFAULT_RTT
    ep.active = 2
    assert ewma.cost(ep, clock.now) == pytest.approx(3 * DEFAULT_RTT)  # Linkerd: ewma x (in flight + 1)


def test_peak_replaces_the_estimate_at_once_and_lower_samples_blend() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock)
    ep = Endpoint("10.0.0.1", 80)
    ewma.observe(ep, 0.010)
    assert ep.rtt_estimate == 0.010  # the first sample is taken as is
    ewma.observe(ep, 0.200)
    assert ep.rtt_estimate == 0.200  # a peak replaces the estimate at once, no averaging
    clock.now += 1.0
    ewma.observe(ep, 0.010)
    kept = math.exp(-1.0 / DEFAULT_EWMA_DECAY)
    # The estimate decayed for a second toward zero, then the lower sample is blended in.
    assert ep.rtt_estimate == pytest.approx(0.200 * kept * kept + 0.010 * (1 - kept))
    # A sample in the same instant as the last one carries no weight (a burst moves it little).
    before = ep.rtt_estimate
    ewma.observe(ep, 0.001)
    assert ep.rtt_estimate == pytest.approx(before)


def test_estimate_decays_toward_zero_between_samples() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock)
    ep = Endpoint("10.0.0.1", 80)
    ewma.observe(ep, 0.5)
    assert ewma.estimate(ep, clock.now + DEFAULT_EWMA_DECAY) == pytest.approx(0.5 / math.e)
    assert ewma.estimate(ep, clock.now + 100 * DEFAULT_EWMA_DECAY) < 1e-6


def test_a_new_endpoint_among_faster_ones_is_probed_and_then_judged_by_its_samples() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(6))
    eps = endpoints(3)
    for e in eps[:2]:
        ewma.observe(e, 0.002)
    first_pick_of_new: float | None = None
    start = clock.now
    for _ in range(6000):  # 60 s at 100 req/s, sequential
        clock.now += 0.01
        chosen = ewma.pick(eps, ())
        assert chosen is not None
        if chosen is eps[2] and first_pick_of_new is None:
            first_pick_of_new = clock.now - start
        ewma.observe(chosen, 0.002)
    # The 30 ms default decays to the others' 2 ms in about 10 s x ln(15) = 27 s.
    assert first_pick_of_new is not None and 20 < first_pick_of_new < 35, first_pick_of_new
    assert eps[2].rtt_samples > 0 and eps[2].rtt_estimate == pytest.approx(0.002, rel=0.5)


def test_without_any_samples_it_is_least_request_even_for_late_endpoints() -> None:
    # No latency reports at all (e.g. L4): an endpoint added an hour later must not lose every
    # comparison to older ones because their defaults have decayed longer.
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(8))
    eps = endpoints(2)
    for _ in range(10):
        ewma.pick(eps, ())
    clock.now += 3600
    late = Endpoint("10.0.0.9", 80)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        chosen = ewma.pick([*eps, late], ())
        assert chosen is not None
        counts[chosen.address] += 1
    assert abs(counts[late.address] / 3000 - 1 / 3) < 0.05, counts
    eps[0].active = 5  # and in-flight requests still steer
    assert all(ewma.pick(eps, ()) is eps[1] for _ in range(50))


def test_two_endpoints_pick_the_cheaper_every_time() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(1))
    fast, slow = endpoints(2)
    ewma.observe(fast, 0.005)
    ewma.observe(slow, 0.050)
    assert all(ewma.pick([fast, slow], ()) is fast for _ in range(100))
    fast.active = 20  # 0.005 * 21 > 0.050 * 1: a queue costs as much as slowness
    assert all(ewma.pick([fast, slow], ()) is slow for _ in range(100))


def test_weight_divides_the_requests_in_flight() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(1))
    light, heavy = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.2", 80, weight=4)
    ewma.observe(light, 0.010)
    ewma.observe(heavy, 0.010)
    light.active, heavy.active = 2, 4  # costs 0.010 x 3 against 0.010 x (4/4 + 1)
    assert all(ewma.pick([light, heavy], ()) is heavy for _ in range(20))
    heavy.active = 9  # 0.010 x 3.25
    assert all(ewma.pick([light, heavy], ()) is light for _ in range(20))


def test_tried_endpoints_are_skipped_and_none_when_all_tried() -> None:
    ewma = PeakEwma(FakeClock(), random.Random(2))
    eps = endpoints(3)
    assert ewma.pick(eps, {"10.0.0.1", "10.0.0.2"}) is eps[2]
    assert ewma.pick(eps, {e.address for e in eps}) is None
    assert ewma.pick([], ()) is None


@pytest.mark.parametrize("bad", [-0.001, math.inf, math.nan])
def test_observe_refuses_impossible_times(bad: float) -> None:
    with pytest.raises(ValueError, match="response time"):
        PeakEwma(FakeClock()).observe(Endpoint("10.0.0.1", 80), bad)


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        PeakEwma(FakeClock(), default_rtt=0)
    with pytest.raises(ValueError, match="must be positive"):
        PeakEwma(FakeClock(), decay=-1)


def simulate(
    balancer: Balancer,
    clock: FakeClock,
    latencies: list[float],
    rate: float = 300.0,
    requests: int = 6000,
    seed: int = 11,
) -> list[float]:
    """Share of requests per endpoint. Poisson arrivals at `rate`/s; each request holds its endpoint
    for that endpoint's latency (+-20% jitter), then reports it to the balancer."""
    rng = random.Random(seed)
    eps = endpoints(len(latencies))
    index = {id(e): i for i, e in enumerate(eps)}
    finishing: list[tuple[float, int, int]] = []  # (time, seq, endpoint index)
    picks = [0] * len(eps)
    for seq in range(requests):
        clock.now += rng.expovariate(rate)
        arrival = clock.now
        while finishing and finishing[0][0] <= arrival:
            done_at, _, i = heapq.heappop(finishing)
            clock.now = done_at
            eps[i].active -= 1
            balancer.observe(eps[i], latencies[i])
        clock.now = arrival
        chosen = balancer.pick(eps, ())
        assert chosen is not None
        i = index[id(chosen)]
        picks[i] += 1
        chosen.active += 1
        heapq.heappush(finishing, (arrival + latencies[i] * rng.uniform(0.8, 1.2), seq, i))
    return [p / requests for p in picks]


def test_an_endpoint_50ms_slower_gets_under_10_percent() -> None:
    clock = FakeClock()
    shares = simulate(PeakEwma(clock, random.Random(3)), clock, [0.005, 0.005, 0.055])
    assert shares[2] < 0.10, shares
    # The same load under round robin gives the slow endpoint its third: the test can fail.
    clock = FakeClock()
    assert simulate(RoundRobin(), clock, [0.005, 0.005, 0.055])[2] > 0.30


def test_peak_ewma_beats_least_request_on_a_slow_endpoint() -> None:
    # At this load the in-flight counts rarely differ, so least-request barely sees the slowness.
    clock = FakeClock()
    ewma_share = simulate(PeakEwma(clock, random.Random(3)), clock, [0.005, 0.005, 0.055])[2]
    clock = FakeClock()
    p2c_share = simulate(PowerOfTwoChoices(random.Random(3)), clock, [0.005, 0.005, 0.055])[2]
    assert ewma_share < p2c_share / 2, (ewma_share, p2c_share)


def test_a_slow_endpoint_that_recovers_wins_its_share_back() -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(4))
    eps = endpoints(3)
    for e in eps[:2]:
        ewma.observe(e, 0.005)
    ewma.observe(eps[2], 0.055)
    counts: Counter[int] = Counter()
    for _ in range(4000):  # 40 s at 100 req/s, all endpoints now equally fast
        clock.now += 0.01
        chosen = ewma.pick(eps, ())
        assert chosen is not None
        counts[eps.index(chosen)] += 1
        ewma.observe(chosen, 0.005)
    # About 24 s pass before its decayed estimate reaches the others' 5 ms (docstring of PeakEwma);
    # from then on it is as good as they are.
    assert 4000 * 0.1 < counts[2] < 4000 * 0.3, counts


def test_prefer_local_keeps_traffic_on_the_node() -> None:
    eps = [
        Endpoint("10.0.0.1", 80, node="a"),
        Endpoint("10.0.0.2", 80, node="b"),
        Endpoint("10.0.0.3", 80, node="a"),
    ]
    local = PreferLocal(RoundRobin(), "a")
    assert {local.pick(eps, ()).address for _ in range(10)} == {"10.0.0.1", "10.0.0.3"}  # type: ignore[union-attr]
    # Local ones tried: fall back to the rest.
    assert local.pick(eps, {"10.0.0.1", "10.0.0.3"}) is eps[1]
    # A local endpoint that is unhealthy does not count as local.
    sick = {"10.0.0.1", "10.0.0.3"}
    healthy = lambda e: e.address not in sick  # noqa: E731
    guarded = PreferLocal(SkipUnhealthy(RoundRobin(), healthy), "a", healthy)
    assert guarded.pick(eps, ()) is eps[1]
    # No endpoint on the node at all.
    assert PreferLocal(RoundRobin(), "z").pick(eps, {"10.0.0.1", "10.0.0.2"}) is eps[2]


def test_skip_unhealthy_and_panic_when_all_are_unhealthy() -> None:
    eps = endpoints(3)
    sick = {"10.0.0.1"}
    picker = SkipUnhealthy(RoundRobin(), lambda e: e.address not in sick)
    assert all(picker.pick(eps, ()) is not eps[0] for _ in range(20))
    sick = {e.address for e in eps}
    assert picker.pick(eps, {"10.0.0.2", "10.0.0.3"}) is eps[0]  # panic: still an answer
    assert picker.pick(eps, {e.address for e in eps}) is None


def test_wrappers_forward_observations() -> None:
    clock = FakeClock()
    inner = PeakEwma(clock)
    ep = Endpoint("10.0.0.1", 80)
    PreferLocal(SkipUnhealthy(inner, lambda e: True), "a").observe(ep, 0.25)
    assert ep.rtt_estimate == 0.25


def test_make_balancer_builds_the_stack() -> None:
    clock = FakeClock()
    plain = make_balancer("peak_ewma", clock=clock, default_rtt=0.1, decay=5.0)
    assert isinstance(plain, PeakEwma) and plain.default_rtt == 0.1 and plain.decay == 5.0
    stacked = make_balancer("peak_ewma", clock=clock, local_node="a", healthy=lambda e: True)
    assert isinstance(stacked, PreferLocal) and isinstance(stacked.inner, SkipUnhealthy)
    assert isinstance(stacked.inner.inner, PeakEwma)
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        make_balancer("nope")
    for name in ("round_robin", "least_conn", "p2c"):
        make_balancer(name).observe(Endpoint("10.0.0.1", 80), 0.1)  # latency-blind: accepted, ignored


class PeakEwmaMachine(RuleBasedStateMachine):
    """Random interleavings of time passing, samples, requests starting and ending, and picks."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.ewma = PeakEwma(self.clock, random.Random(0))
        self.eps = endpoints(4)
        self.samples: dict[int, list[float]] = {i: [] for i in range(4)}

    @rule(dt=st.floats(0, 30, allow_nan=False))
    def time_passes(self, dt: float) -> None:
        self.clock.now += dt

    @rule(i=st.integers(0, 3), rtt=st.floats(0, 5, allow_nan=False))
    def sample(self, i: int, rtt: float) -> None:
        endpoint = self.eps[i]
        previous = self.ewma.estimate(endpoint, self.clock.now)
        had_data = endpoint.rtt_samples > 0
        self.ewma.observe(endpoint, rtt)
        self.samples[i].append(rtt)
        if not had_data or rtt > previous:
            assert endpoint.rtt_estimate == rtt  # peak-sensitive: taken at once
        else:
            assert rtt - 1e-12 <= endpoint.rtt_estimate <= previous + 1e-12  # a blend of the two

    @rule(i=st.integers(0, 3))
    def start(self, i: int) -> None:
        self.eps[i].active += 1

    @precondition(lambda self: any(e.active for e in self.eps))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        busy = [e for e in self.eps if e.active]
        data.draw(st.sampled_from(busy)).active -= 1

    @rule(tried=st.sets(st.integers(0, 3), max_size=4))
    def pick_respects_tried(self, tried: set[int]) -> None:
        addresses = {self.eps[i].address for i in tried}
        chosen = self.ewma.pick(self.eps, addresses)
        if len(tried) == 4:
            assert chosen is None
        else:
            assert chosen is not None and chosen.address not in addresses

    @rule(a=st.integers(0, 3), b=st.integers(0, 3))
    def pair_pick_is_the_cheaper(self, a: int, b: int) -> None:
        if a == b:
            return
        pair = [self.eps[a], self.eps[b]]
        chosen = self.ewma.pick(pair, ())
        assert chosen is not None
        now = self.clock.now
        if all(e.rtt_samples == 0 for e in pair):  # no data on either: requests in flight decide
            assert chosen.active == min(e.active for e in pair)
        else:
            assert self.ewma.cost(chosen, now) == min(self.ewma.cost(e, now) for e in pair)

    @invariant()
    def estimates_stay_within_the_samples(self) -> None:
        for i, e in enumerate(self.eps):
            estimate = self.ewma.estimate(e, self.clock.now)
            assert estimate >= 0
            if self.samples[i]:
                assert estimate <= max(self.samples[i]) + 1e-12
            else:
                assert estimate <= DEFAULT_RTT  # the default, decaying since a pick first saw it


TestPeakEwmaMachine = PeakEwmaMachine.TestCase
TestPeakEwmaMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.lists(st.floats(0.001, 1.0), min_size=2, max_size=6), st.integers(0, 2**32))
def test_never_picks_a_strictly_costlier_endpoint_of_two(latencies: list[float], seed: int) -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(seed))
    eps = endpoints(len(latencies))
    for e, rtt in zip(eps, latencies, strict=True):
        ewma.observe(e, rtt)
    worst = max(eps, key=lambda e: ewma.cost(e, clock.now))
    if sum(ewma.cost(e, clock.now) == ewma.cost(worst, clock.now) for e in eps) == 1:
        assert all(ewma.pick(eps, ()) is not worst for _ in range(50))


def reference_observe(ewma: PeakEwma, endpoint: Endpoint, rtt: float, now: float) -> None:
    """PeakEwma.observe as its docstring defines it, through estimate(): observe() computes it inline."""
    current = ewma.estimate(endpoint, now)
    if endpoint.rtt_samples == 0 or endpoint.rtt_updated_at is None or rtt > current:
        endpoint.rtt_estimate = rtt
    else:
        kept = math.exp(-max(0.0, now - endpoint.rtt_updated_at) / ewma.decay)
        endpoint.rtt_estimate = current * kept + rtt * (1.0 - kept)
    endpoint.rtt_updated_at = now
    endpoint.rtt_samples += 1


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=-5.0, max_value=30.0),  # clock step, backwards too
            st.floats(min_value=0.0, max_value=2.0),  # response time
            st.booleans(),  # a pick considers the endpoint first (sets the default estimate)
        ),
        min_size=1,
        max_size=30,
    )
)
def test_observe_is_exactly_its_definition(steps: list[tuple[float, float, bool]]) -> None:
    clock = FakeClock()
    ewma = PeakEwma(clock, random.Random(1))
    measured, expected = Endpoint("10.0.0.1", 80), Endpoint("10.0.0.1", 80)
    for step, rtt, considered in steps:
        clock.now += step
        if considered and measured.rtt_updated_at is None:  # as pick() does on first look
            for ep in (measured, expected):
                ep.rtt_estimate, ep.rtt_updated_at = ewma.default_rtt, clock.now
        ewma.observe(measured, rtt)
        reference_observe(ewma, expected, rtt, clock.now)
        assert (measured.rtt_estimate, measured.rtt_updated_at, measured.rtt_samples) == (
            expected.rtt_estimate,
            expected.rtt_updated_at,
            expected.rtt_samples,
        )
