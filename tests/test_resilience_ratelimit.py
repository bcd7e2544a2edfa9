"""Local rate limiting (issue 8 point 6): token buckets per service and route, 429 + retry-after."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.resilience.outcome import GrpcStatus
from nodeproxy.resilience.ratelimit import RateLimiter, TokenBucket, rate_limited


class FakeClock:
    def __init__(self, now: float = 50.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_and_refills_at_the_rate() -> None:
    bucket = TokenBucket(requests_per_second=10.0, burst=3)
    for _ in range(3):
        assert bucket.wait(0.0) == 0.0
        bucket.take()
    assert bucket.wait(0.0) == pytest.approx(0.1)
    assert bucket.wait(0.05) == pytest.approx(0.05)
    assert bucket.wait(0.1) == 0.0
    assert bucket.wait(100.0) == 0.0 and bucket.tokens == 3  # never above burst
    with pytest.raises(RuntimeError, match="without an available token"):
        bucket.tokens = 0.5
        bucket.take()


def test_bucket_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="requests_per_second"):
        TokenBucket(0.0, 1)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(1.0, 0)


def test_rate_limited_answer() -> None:
    answer = rate_limited(0.2, "route r")
    assert (answer.status, answer.flag, answer.grpc_status) == (429, "RL", GrpcStatus.UNAVAILABLE)
    assert answer.headers == (("retry-after", "1"),)
    assert rate_limited(2.01, "x").headers == (("retry-after", "3"),)


def test_route_and_service_buckets_both_apply_and_take_together() -> None:
    clock = FakeClock()
    limiter = RateLimiter(TokenBucket(100.0, 3), clock)
    limiter.set_route_bucket("slow", TokenBucket(1.0, 1))
    assert limiter.check("slow") is None
    answer = limiter.check("slow")  # the route's bucket is empty: the service's is not charged
    assert answer is not None and "route slow" in answer.detail and answer.headers == (("retry-after", "1"),)
    assert limiter.check("other", "reviews") is None
    assert limiter.check("other", "reviews") is None
    answer = limiter.check("other", "reviews")  # service bucket: 3 taken
    assert answer is not None and answer.detail == "local rate limit of reviews"
    assert limiter.limited == 2
    limiter.set_route_bucket("slow", None)
    clock.now += 1.0
    assert limiter.check("slow") is None


def test_no_buckets_never_limits() -> None:
    limiter = RateLimiter(None, FakeClock())
    assert all(limiter.check("r") is None for _ in range(1000))


def test_holds_the_rate_within_ten_percent() -> None:
    clock = FakeClock()
    limiter = RateLimiter(TokenBucket(200.0, 20), clock)
    admitted = 0
    for _ in range(10_000):  # 1,000 req/s offered for 10 s against a 200/s limit
        clock.now += 0.001
        admitted += limiter.check("r") is None
    assert abs(admitted - 200 * 10) <= 0.1 * 2000, admitted


@settings(max_examples=300, deadline=None)
@given(
    st.floats(0.5, 500.0),
    st.integers(1, 50),
    st.lists(st.integers(0, 2000), min_size=1, max_size=300),
)
def test_never_more_than_burst_plus_rate_times_interval(rate: float, burst: int, gaps_us: list[int]) -> None:
    clock = FakeClock(10.0)
    limiter = RateLimiter(TokenBucket(rate, burst), clock)
    admitted: list[float] = []
    for gap in gaps_us:
        clock.now += gap / 1e6 * 100
        if limiter.check("r") is None:
            admitted.append(clock.now)
        else:
            assert limiter.service_bucket is not None and limiter.service_bucket.tokens < 1  # only when empty
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            count = j - i + 1
            assert count <= burst + rate * (admitted[j] - start) + 1e-6, (count, start, admitted[j])
