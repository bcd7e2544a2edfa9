"""Retries (issue 8 point 2) and circuit breakers (point 5): conditions, attempts, backoff,
replayability, deadline, active-retry limit and budget, in the order the module documents."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.resilience.budget import RetryBudget
from nodeproxy.resilience.circuit import (
    CircuitBreaker,
    CircuitLimits,
    Resource,
    overflow_answer,
)
from nodeproxy.resilience.deadline import Deadline
from nodeproxy.resilience.outcome import AttemptResult, Failure, GrpcStatus
from nodeproxy.resilience.retry import (
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_MAX,
    DEFAULT_MAX_REPLAY_BODY,
    DEFAULT_RETRY_ON,
    GiveUp,
    Retry,
    RetryOn,
    RetryPolicy,
    RetryState,
    body_replayable,
    exclude_for_retry,
)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def status(code: int, grpc: int | None = None) -> AttemptResult:
    return AttemptResult(status=code, grpc_status=grpc)


def failed(kind: Failure) -> AttemptResult:
    return AttemptResult(failure=kind)


def test_attempt_result_holds_exactly_one_of_status_and_failure() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AttemptResult()
    with pytest.raises(ValueError, match="exactly one"):
        AttemptResult(status=200, failure=Failure.RESET)
    with pytest.raises(ValueError, match="three digits"):
        AttemptResult(status=42)
    assert failed(Failure.RESET).is_5xx and failed(Failure.RESET).is_gateway_error
    assert status(500).is_5xx and not status(500).is_gateway_error
    assert status(503).is_gateway_error and not status(404).is_5xx


def test_istio_defaults() -> None:
    policy = RetryPolicy()
    assert policy.max_retries == 2
    assert (
        policy.retry_on
        == DEFAULT_RETRY_ON
        == {
            RetryOn.CONNECT_FAILURE,
            RetryOn.REFUSED_STREAM,
            RetryOn.UNAVAILABLE,
            RetryOn.CANCELLED,
            RetryOn.RETRIABLE_STATUS_CODES,
        }
    )
    assert policy.retriable_status_codes == {503}
    assert (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX, DEFAULT_MAX_REPLAY_BODY) == (0.025, 0.25, 65536)


CASES: list[tuple[RetryOn, AttemptResult, bool]] = [
    (RetryOn.CONNECT_FAILURE, failed(Failure.CONNECT_FAILURE), True),
    (RetryOn.CONNECT_FAILURE, failed(Failure.RESET), False),
    (RetryOn.CONNECT_FAILURE, status(503), False),
    (RetryOn.REFUSED_STREAM, failed(Failure.REFUSED_STREAM), True),
    (RetryOn.REFUSED_STREAM, failed(Failure.TIMEOUT), False),
    (RetryOn.RESET, failed(Failure.RESET), True),
    (RetryOn.RESET, failed(Failure.TIMEOUT), True),
    (RetryOn.RESET, status(502), False),
    (RetryOn.HTTP_5XX, status(500), True),
    (RetryOn.HTTP_5XX, status(599), True),
    (RetryOn.HTTP_5XX, failed(Failure.CONNECT_FAILURE), True),
    (RetryOn.HTTP_5XX, status(499), False),
    (RetryOn.GATEWAY_ERROR, status(502), True),
    (RetryOn.GATEWAY_ERROR, status(504), True),
    (RetryOn.GATEWAY_ERROR, status(500), False),
    (RetryOn.GATEWAY_ERROR, failed(Failure.TIMEOUT), True),
    (RetryOn.RETRIABLE_STATUS_CODES, status(503), True),
    (RetryOn.RETRIABLE_STATUS_CODES, status(502), False),
    (RetryOn.UNAVAILABLE, status(200, GrpcStatus.UNAVAILABLE), True),
    (RetryOn.UNAVAILABLE, status(200, GrpcStatus.INTERNAL), False),
    (RetryOn.CANCELLED, status(200, GrpcStatus.CANCELLED), True),
    (RetryOn.RESOURCE_EXHAUSTED, status(200, GrpcStatus.RESOURCE_EXHAUSTED), True),
    (RetryOn.DEADLINE_EXCEEDED, status(200, GrpcStatus.DEADLINE_EXCEEDED), True),
    (RetryOn.INTERNAL, status(200, GrpcStatus.INTERNAL), True),
    (RetryOn.INTERNAL, status(200, GrpcStatus.OK), False),
    (RetryOn.HTTP_5XX, status(200, GrpcStatus.UNAVAILABLE), False),
]


@pytest.mark.parametrize(("condition", "result", "retried"), CASES)
def test_each_condition(condition: RetryOn, result: AttemptResult, retried: bool) -> None:
    policy = RetryPolicy(retry_on=frozenset({condition}))
    assert policy.matches(result) is retried


def test_backoff_is_fully_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    for n, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (40, 0.25), (10**6, 0.25)]:
        samples = [policy.backoff(n, rng) for _ in range(500)]
        assert all(0 <= s < ceiling for s in samples)
        assert max(samples) > 0.9 * ceiling and min(samples) < 0.1 * ceiling  # spread over the range
    with pytest.raises(ValueError, match="numbered from 1"):
        policy.backoff(0, rng)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"backoff_base": 0.0}, "backoff"),
        ({"backoff_base": 0.5, "backoff_max": 0.1}, "backoff"),
        ({"per_try_timeout": 0.0}, "per_try_timeout"),
        ({"max_replay_body": -1}, "max_replay_body"),
    ],
)
def test_policy_checks(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_replayability_from_the_head() -> None:
    assert body_replayable(0) is True
    assert body_replayable(65536) is True
    assert body_replayable(65537) is False
    assert body_replayable(None) is None  # chunked: known once buffered
    assert body_replayable(10, max_replay_body=5) is False


def state(
    policy: RetryPolicy | None = None,
    deadline: Deadline | None = None,
    clock: FakeClock | None = None,
    budget: RetryBudget | None = None,
    breaker: CircuitBreaker | None = None,
) -> RetryState:
    return RetryState(
        policy or RetryPolicy(),
        deadline or Deadline(None),
        clock or FakeClock(),
        random.Random(3),
        budget,
        breaker,
    )


def test_retries_until_attempts_are_used_up() -> None:
    s = state()
    s.attempt_started("10.0.0.1")
    first = s.on_result(status(503), replayable=True)
    assert isinstance(first, Retry) and 0 <= first.delay < 0.025 and first.timeout is None
    s.attempt_started("10.0.0.2")
    assert isinstance(s.on_result(status(503), replayable=True), Retry)
    s.attempt_started("10.0.0.3")
    assert s.on_result(status(503), replayable=True) == GiveUp("attempts exhausted")
    assert s.attempts == 3 and s.tried == ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def test_success_and_non_retriable_results_end_the_request() -> None:
    s = state()
    s.attempt_started("a")
    assert s.on_result(status(200), replayable=True) == GiveUp("success")
    assert s.on_result(status(404), replayable=True) == GiveUp("success")
    assert s.on_result(status(500), replayable=True) == GiveUp("not retriable")
    assert s.on_result(status(200, GrpcStatus.NOT_FOUND), replayable=True) == GiveUp("not retriable")


def test_an_unreplayable_request_is_not_retried() -> None:
    s = state()
    s.attempt_started("a")
    assert s.on_result(failed(Failure.CONNECT_FAILURE), replayable=False) == GiveUp("not replayable")


def test_no_attempt_starts_after_the_deadline() -> None:
    clock = FakeClock(100.0)
    s = state(deadline=Deadline(100.010), clock=clock, policy=RetryPolicy(backoff_base=0.02))
    s.attempt_started("a")
    clock.now = 100.011
    assert s.on_result(status(503), replayable=True) == GiveUp("deadline")
    # With time left, the retry's timeout is what remains after the backoff, cut by per-try.
    clock.now = 100.0
    s = state(deadline=Deadline(101.0), clock=clock, policy=RetryPolicy(per_try_timeout=0.3))
    assert s.first_attempt_timeout() == 0.3
    s.attempt_started("a")
    retry = s.on_result(status(503), replayable=True)
    assert isinstance(retry, Retry) and retry.timeout == 0.3
    clock.now = 100.9
    s.attempt_started("b")
    retry = s.on_result(status(503), replayable=True)
    assert isinstance(retry, Retry)
    assert retry.timeout == pytest.approx(101.0 - 100.9 - retry.delay)


def test_retry_budget_refuses_and_is_spent_only_on_admitted_retries() -> None:
    clock = FakeClock()
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0.1, window=10.0, clock=clock)  # 1 retry
    s = state(clock=clock, budget=budget)
    s.attempt_started("a")
    assert isinstance(s.on_result(status(503), replayable=True), Retry)
    s.attempt_started("b")
    assert s.on_result(status(503), replayable=True) == GiveUp("budget exhausted")
    # A retry refused earlier (not replayable) does not touch the budget.
    clock.now += 20.0
    s2 = state(clock=clock, budget=budget)
    s2.attempt_started("a")
    assert s2.on_result(status(503), replayable=False) == GiveUp("not replayable")
    assert budget.available() >= 1


def test_retry_state_records_the_original_request_in_the_budget() -> None:
    clock = FakeClock()
    budget = RetryBudget(retry_ratio=0.5, min_retries_per_second=0.0, clock=clock)
    for _ in range(4):
        state(clock=clock, budget=budget)
    assert budget.available() == pytest.approx(2.0)


def test_active_retries_are_capped_by_the_circuit_breaker_and_released() -> None:
    breaker = CircuitBreaker(CircuitLimits(max_retries=1))
    a, b = state(breaker=breaker), state(breaker=breaker)
    a.attempt_started("x")
    b.attempt_started("x")
    assert isinstance(a.on_result(status(503), replayable=True), Retry)
    assert b.on_result(status(503), replayable=True) == GiveUp("overflow")
    assert breaker.overflows[Resource.RETRIES] == 1
    a.attempt_started("y")
    assert a.on_result(status(200), replayable=True) == GiveUp("success")  # the retry ended
    assert breaker.in_use[Resource.RETRIES] == 0
    b2 = state(breaker=breaker)
    b2.attempt_started("x")
    assert isinstance(b2.on_result(status(503), replayable=True), Retry)
    b2.finished()  # client went away during the retry
    assert breaker.in_use[Resource.RETRIES] == 0
    b2.finished()  # idempotent
    assert breaker.in_use[Resource.RETRIES] == 0


def test_budget_refusal_gives_back_the_retry_slot() -> None:
    breaker = CircuitBreaker(CircuitLimits(max_retries=5))
    budget = RetryBudget(retry_ratio=0.0, min_retries_per_second=0.0, clock=FakeClock())
    s = state(breaker=breaker, budget=budget)
    s.attempt_started("x")
    assert s.on_result(status(503), replayable=True) == GiveUp("budget exhausted")
    assert breaker.in_use[Resource.RETRIES] == 0


def test_exclude_for_retry_prefers_another_endpoint() -> None:
    assert exclude_for_retry(("a",), ["a", "b"]) == ("a",)
    assert exclude_for_retry(("a", "b"), ["a", "b"]) == ()  # none left: the same one again
    assert exclude_for_retry((), ["a"]) == ()


def test_circuit_breaker_limits_overflow_and_release() -> None:
    breaker = CircuitBreaker(CircuitLimits(max_connections=2, max_pending_requests=0, max_requests=1))
    assert breaker.try_acquire(Resource.CONNECTIONS) and breaker.try_acquire(Resource.CONNECTIONS)
    assert not breaker.try_acquire(Resource.CONNECTIONS)
    assert not breaker.try_acquire(Resource.PENDING)
    assert breaker.try_acquire(Resource.REQUESTS) and not breaker.try_acquire(Resource.REQUESTS)
    assert breaker.overflows == {
        Resource.CONNECTIONS: 1,
        Resource.PENDING: 1,
        Resource.REQUESTS: 1,
        Resource.RETRIES: 0,
    }
    breaker.release(Resource.REQUESTS)
    assert breaker.try_acquire(Resource.REQUESTS)
    with pytest.raises(RuntimeError, match="released more often"):
        breaker.release(Resource.RETRIES)
    # A lowered limit refuses new units until enough are released.
    breaker.update_limits(CircuitLimits(max_connections=1))
    assert not breaker.try_acquire(Resource.CONNECTIONS)
    breaker.release(Resource.CONNECTIONS)
    breaker.release(Resource.CONNECTIONS)
    assert breaker.try_acquire(Resource.CONNECTIONS)
    with pytest.raises(ValueError, match="max_requests"):
        CircuitLimits(max_requests=-1)


def test_envoy_circuit_defaults_and_overflow_answer() -> None:
    limits = CircuitLimits()
    assert (limits.max_connections, limits.max_pending_requests, limits.max_requests, limits.max_retries) == (
        1_000_000,
        1_000_000,
        1_000_000,
        1_000_000,
    )
    answer = overflow_answer(Resource.REQUESTS)
    assert (answer.status, answer.flag, answer.grpc_status) == (503, "UO", GrpcStatus.UNAVAILABLE)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(list(Resource)), st.booleans()), max_size=200))
def test_circuit_breaker_never_exceeds_its_limits(ops: list[tuple[Resource, bool]]) -> None:
    limits = CircuitLimits(max_connections=3, max_pending_requests=1, max_requests=2, max_retries=0)
    breaker = CircuitBreaker(limits)
    held = dict.fromkeys(Resource, 0)
    for resource, acquire in ops:
        if acquire:
            if breaker.try_acquire(resource):
                held[resource] += 1
            else:
                assert held[resource] == limits.limit(resource)  # refused only when full
        elif held[resource]:
            breaker.release(resource)
            held[resource] -= 1
        assert breaker.in_use == held
        assert all(held[r] <= limits.limit(r) for r in Resource)


def test_result_before_any_attempt_is_a_caller_bug() -> None:
    with pytest.raises(RuntimeError, match="before any attempt_started"):
        state().on_result(status(503), replayable=True)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 4),
    st.floats(0.001, 2.0),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    status(200),
                    status(503),
                    status(500),
                    failed(Failure.CONNECT_FAILURE),
                    failed(Failure.RESET),
                ]
            ),
            st.floats(0, 0.5),  # time the attempt took
            st.booleans(),  # replayable
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_retry_state_never_exceeds_attempts_or_the_deadline_and_frees_slots(
    max_retries: int, timeout: float, attempts: list[tuple[AttemptResult, float, bool]]
) -> None:
    clock = FakeClock(10.0)
    breaker = CircuitBreaker(CircuitLimits(max_retries=2))
    s = RetryState(
        RetryPolicy(max_retries=max_retries, retry_on=frozenset({RetryOn.HTTP_5XX})),
        Deadline(10.0 + timeout),
        clock,
        random.Random(0),
        RetryBudget(clock=clock),
        breaker,
    )
    for result, took, replayable in attempts:
        assert not s.deadline.expired(clock.now)  # every attempt starts before the deadline
        s.attempt_started(f"10.0.0.{s.attempts}")
        clock.now += took
        decision = s.on_result(result, replayable)
        if isinstance(decision, GiveUp):
            break
        assert result.is_5xx and replayable and s.attempts <= max_retries
        assert decision.delay < s.deadline.remaining(clock.now)
        assert (
            decision.timeout is not None
            and decision.timeout <= s.deadline.remaining(clock.now) - decision.delay + 1e-9
        )
        clock.now += decision.delay
    assert s.attempts <= max_retries + 1
    s.finished()
    assert breaker.in_use[Resource.RETRIES] == 0


def test_request_slots_fast_path_shares_the_counts_of_try_acquire() -> None:
    """try_acquire_request / release_request (every request) count in the same place as
    try_acquire / release(Resource.REQUESTS), overflow at the same limit and refuse a release too many."""
    breaker = CircuitBreaker(CircuitLimits(max_requests=2))
    assert breaker.try_acquire_request()
    assert breaker.try_acquire(Resource.REQUESTS)
    assert not breaker.try_acquire_request()
    assert not breaker.try_acquire(Resource.REQUESTS)
    assert breaker.in_use[Resource.REQUESTS] == 2 and breaker.overflows[Resource.REQUESTS] == 2
    breaker.release(Resource.REQUESTS)
    breaker.release_request()
    assert breaker.in_use[Resource.REQUESTS] == 0
    with pytest.raises(RuntimeError, match="requests released more often than acquired"):
        breaker.release_request()
    assert breaker.in_use[Resource.REQUESTS] == 0
