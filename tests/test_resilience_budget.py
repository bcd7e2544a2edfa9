"""Retry budget (issue 8 point 2): Linkerd's 20% + 10/s over 10 s, exact under any interleaving."""

from __future__ import annotations

import bisect

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.resilience.budget import (
    DEFAULT_MIN_RETRIES_PER_SECOND,
    DEFAULT_RETRY_RATIO,
    DEFAULT_WINDOW,
    RetryBudget,
)


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_linkerd_defaults() -> None:
    assert (DEFAULT_RETRY_RATIO, DEFAULT_MIN_RETRIES_PER_SECOND, DEFAULT_WINDOW) == (0.2, 10.0, 10.0)


def test_reserve_alone_allows_ten_per_second_over_the_window() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(clock=clock)
    admitted = sum(budget.try_withdraw() for _ in range(500))
    assert admitted == 100  # 10/s x 10 s, with no request at all
    assert budget.refused == 400
    clock.now += 11.0  # the window has passed: the reserve is back
    assert budget.try_withdraw()


def test_hard_failing_service_sees_retries_capped_by_the_budget() -> None:
    # 100 req/s for 10 s, every request fails and wants 2 retries: without a budget 2,000 retries.
    clock = FakeClock(50.0)
    budget = RetryBudget(clock=clock)
    admitted = 0
    for i in range(1000):
        clock.now = 50.0 + i * 0.01
        budget.record_request()
        admitted += budget.try_withdraw() + budget.try_withdraw()
    cap = 0.2 * 1000 + 10 * 10
    assert admitted <= cap
    assert admitted >= 0.85 * cap, admitted  # conservative by at most a slot, not by much


def test_ratio_zero_and_no_reserve_never_retries() -> None:
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0.0, clock=FakeClock())
    budget.record_request()
    assert not budget.try_withdraw()


def test_clock_going_backwards_does_not_reopen_old_slots() -> None:
    clock = FakeClock(100.0)
    budget = RetryBudget(min_retries_per_second=0.5, clock=clock)  # reserve 5
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    clock.now = 10.0  # an injected clock that jumps back: still the same window
    assert not budget.try_withdraw()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retry_ratio": -0.1}, "retry_ratio"),
        ({"min_retries_per_second": -1.0}, "min_retries_per_second"),
        ({"window": 0.0}, "window"),
        ({"buckets": 0}, "buckets"),
    ],
)
def test_parameters_are_checked(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


# Times on a 1/16 s grid: slot boundaries (1 s) are then exact in binary floating point.
events = st.lists(
    st.tuples(st.integers(0, 48), st.sampled_from(["request", "request", "retry"])),
    min_size=1,
    max_size=400,
)


@settings(max_examples=500, deadline=None)
@given(
    events,
    st.sampled_from([0.0, 0.2, 0.5]),
    st.sampled_from([0.0, 0.3, 0.5, 1.0, 10.0]),
    st.sampled_from([(10.0, 10), (4.0, 8), (2.0, 1)]),
)
def test_budget_never_exceeds_ratio_plus_reserve_in_any_window(
    steps: list[tuple[int, str]], ratio: float, per_second: float, shape: tuple[float, int]
) -> None:
    window, buckets = shape
    clock = FakeClock(1000.0)
    budget = RetryBudget(ratio, per_second, window, buckets, clock)
    slot = window / buckets
    requests: list[float] = []
    retries: list[float] = []

    def count(times: list[float], start: float, end: float, *, closed_start: bool) -> int:
        lo = bisect.bisect_left(times, start) if closed_start else bisect.bisect_right(times, start)
        return bisect.bisect_right(times, end) - lo

    for ticks, kind in steps:
        clock.now += ticks / 16
        t = clock.now
        if kind == "request":
            budget.record_request()
            requests.append(t)
            continue
        # Surely admissible: requests counted only if well inside the window, retries over a slot more.
        sure = (
            ratio * count(requests, t - window + slot, t, closed_start=True)
            + per_second * window
            - count(retries, t - window - slot, t, closed_start=False)
        )
        if budget.try_withdraw():
            retries.append(t)
            in_window = count(retries, t - window, t, closed_start=False)
            allowed = ratio * count(requests, t - window, t, closed_start=False) + per_second * window
            assert in_window <= allowed + 1e-9, (t, in_window, allowed)
        else:
            assert sure < 1 + 1e-9, (t, sure)  # refused only when close to the limit
