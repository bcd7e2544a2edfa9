"""The layers together, driven the way the HTTP engine will drive them (nodeproxy/resilience/guard.py),
against simulated endpoints on a fake clock: the issue 8 point 8 scenarios without sockets."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from nodeproxy.balance import Balancer, Endpoint
from nodeproxy.resilience.config import RouteResilience, ServiceResilience
from nodeproxy.resilience.guard import HOLD_GRPC_ONLY, Admission, RouteGuards, ServiceGuards, failure_answer
from nodeproxy.resilience.outcome import AttemptResult, Failure, LocalAnswer
from nodeproxy.resilience.retry import Retry, exclude_for_retry


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# An endpoint's behaviour: (result, seconds until it is known).
Behaviour = Callable[[Endpoint], tuple[AttemptResult, float]]


class Driver:
    def __init__(
        self,
        eps: list[Endpoint],
        service: dict[str, Any] | None = None,
        route: dict[str, Any] | None = None,
        balancer: str = "peak_ewma",
    ) -> None:
        self.clock = FakeClock()
        self.eps = eps
        route_config = RouteResilience.model_validate(route or {})
        self.guards = ServiceGuards(
            "svc",
            ServiceResilience.model_validate(service or {}),
            eps,
            {"r": route_config},
            clock=self.clock,
            rng=random.Random(1),
        )
        self.route = RouteGuards.from_config("r", route_config)
        self.balancer: Balancer = self.guards.balancer(balancer)
        self.attempts: list[tuple[float, str]] = []  # (start time, endpoint address)

    def request(self, behave: Behaviour, headers: dict[str, str] | None = None) -> int | LocalAnswer:
        admission = self.guards.admit(self.route, headers or {}, grpc=False)
        if isinstance(admission, LocalAnswer):
            return admission
        try:
            return self._attempts(admission, behave)
        finally:
            self.guards.request_ended(admission)

    def _attempts(self, admission: Admission, behave: Behaviour) -> int | LocalAnswer:
        self.clock.now += admission.delay
        timeout = admission.attempt_timeout
        while True:
            assert not admission.deadline.expired(self.clock.now), "an attempt after the deadline"
            avoid = exclude_for_retry(admission.retry.tried, [e.address for e in self.eps])
            endpoint = self.balancer.pick(self.eps, avoid)
            assert endpoint is not None
            admission.retry.attempt_started(endpoint.address)
            self.attempts.append((self.clock.now, endpoint.address))
            result, took = behave(endpoint)
            response_time: float | None = took
            if timeout is not None and took > timeout:
                result, took, response_time = AttemptResult(failure=Failure.TIMEOUT), timeout, None
            elif result.status is None:
                response_time = None
            self.clock.now += took
            decision, _ = self.guards.attempt_ended(
                admission,
                endpoint,
                result,
                replayable=True,
                response_time=response_time,
                balancer=self.balancer,
            )
            if isinstance(decision, Retry):
                self.clock.now += decision.delay
                timeout = decision.timeout
                continue
            answer = failure_answer(result, decision)
            if answer is not None:
                return answer
            assert result.status is not None
            return result.status


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80) for i in range(n)]


def ok_after(seconds: float) -> tuple[AttemptResult, float]:
    return AttemptResult(status=200), seconds


def test_one_of_three_always_503_gives_no_client_errors_and_is_ejected() -> None:
    eps = endpoints(3)
    d = Driver(eps)
    bad = eps[0]

    def behave(e: Endpoint) -> tuple[AttemptResult, float]:
        return (AttemptResult(status=503), 0.001) if e is bad else ok_after(0.002)

    answers = []
    for _ in range(1000):
        d.clock.now += 0.01
        answers.append(d.request(behave))
    assert answers == [200] * 1000  # every 503 was retried on a good endpoint
    assert not d.guards.outlier.is_available(bad)
    late = Counter(address for _, address in d.attempts[-500:])
    assert late[bad.address] <= 2, late  # its share fell to ~0 (a re-admission probe at most)
    # It recovers; once its ejection ends it is re-admitted and carries traffic again.
    until = d.guards.outlier.ejected_until(bad)
    assert until is not None
    d.clock.now = until
    d.attempts.clear()
    for _ in range(1000):
        d.clock.now += 0.01
        assert d.request(lambda e: ok_after(0.002)) == 200
    share = Counter(address for _, address in d.attempts)[bad.address] / len(d.attempts)
    assert share > 0.2, share


def test_an_endpoint_50ms_slower_gets_under_10_percent() -> None:
    eps = endpoints(3)
    d = Driver(eps)
    for _ in range(2000):
        d.clock.now += 0.01
        d.request(lambda e: ok_after(0.055 if e is eps[2] else 0.005))
    share = Counter(address for _, address in d.attempts)[eps[2].address] / len(d.attempts)
    assert share < 0.10, share


def test_an_endpoint_killed_mid_request_is_retried_elsewhere() -> None:
    eps = endpoints(3)
    # Round robin, so the dead endpoint keeps being picked (peak-EWMA would mostly avoid it).
    d = Driver(eps, route={"retries": {"retry_on": ["reset", "connect-failure"]}}, balancer="round_robin")
    dead = {eps[1].address}

    def behave(e: Endpoint) -> tuple[AttemptResult, float]:
        return (AttemptResult(failure=Failure.RESET), 0.003) if e.address in dead else ok_after(0.002)

    for _ in range(50):
        d.clock.now += 0.01
        assert d.request(behave) == 200
    retried = [i for i, (_, a) in enumerate(d.attempts) if a in dead]
    assert retried and all(d.attempts[i + 1][1] not in dead for i in retried)


def test_a_200ms_deadline_against_a_1s_backend_answers_504_at_the_deadline() -> None:
    eps = endpoints(3)
    d = Driver(eps, route={"timeout": "200ms", "retries": {"retry_on": ["5xx", "reset"], "max_retries": 5}})
    start = d.clock.now
    answer = d.request(lambda e: ok_after(1.0))
    assert isinstance(answer, LocalAnswer) and (answer.status, answer.flag) == (504, "UT")
    assert d.clock.now - start == pytest.approx(0.2)
    assert all(t < start + 0.2 for t, _ in d.attempts)  # no attempt started at or after the deadline
    # A caller's shorter deadline wins, and the remaining time goes upstream.
    start = d.clock.now
    admission = d.guards.admit(d.route, {"x-nodeproxy-timeout-ms": "50"}, grpc=False)
    assert isinstance(admission, Admission) and admission.attempt_timeout == pytest.approx(0.05)
    ((name, value),) = admission.headers_at(start + 0.02)
    assert name == "x-nodeproxy-timeout-ms" and int(value) in (30, 31)  # rounded up from ~30 ms
    d.guards.request_ended(admission)


def test_a_hard_failing_service_sees_retries_capped_by_the_budget() -> None:
    eps = endpoints(3)
    d = Driver(eps, route={"retries": {"retry_on": ["5xx"], "backoff_base": "1ms", "backoff_max": "1ms"}})
    for _ in range(1000):  # 100 req/s for 10 s, all failing
        d.clock.now += 0.01
        d.request(lambda e: (AttemptResult(status=500), 0.0))
    retries = len(d.attempts) - 1000
    assert retries <= 0.2 * 1000 + 10 * 10, retries  # without the budget: 2,000
    assert retries >= 250, retries


def test_circuit_breaker_overflow_answers_503_uo_at_once() -> None:
    d = Driver(endpoints(2), service={"circuit_breakers": {"max_requests": 2}})
    first = d.guards.admit(d.route, {}, grpc=False)
    second = d.guards.admit(d.route, {}, grpc=False)
    third = d.guards.admit(d.route, {}, grpc=False)
    assert isinstance(first, Admission) and isinstance(second, Admission)
    assert isinstance(third, LocalAnswer) and (third.status, third.flag) == (503, "UO")
    d.guards.request_ended(first)
    again = d.guards.admit(d.route, {}, grpc=False)
    assert isinstance(again, Admission)


def test_rate_limit_answers_429_with_retry_after() -> None:
    d = Driver(endpoints(2), route={"rate_limit": {"requests_per_second": 10, "burst": 5}})
    answers = [d.request(lambda e: ok_after(0.0)) for _ in range(6)]
    assert answers[:5] == [200] * 5
    limited = answers[5]
    assert isinstance(limited, LocalAnswer) and (limited.status, limited.flag) == (429, "RL")
    assert limited.headers == (("retry-after", "1"),)


def test_fault_abort_only_for_matching_headers_and_delay_counts_against_the_deadline() -> None:
    d = Driver(
        endpoints(2),
        route={
            "timeout": "1s",
            "fault": {
                "abort": {"status": 418, "percent": 100},
                "delay": {"duration": "300ms"},
                "headers": [{"name": "x-chaos", "exact": "on"}],
            },
        },
    )
    assert d.request(lambda e: ok_after(0.001)) == 200
    answer = d.request(lambda e: ok_after(0.001), {"x-chaos": "on"})
    assert isinstance(answer, LocalAnswer) and (answer.status, answer.flag) == (418, "FI")
    assert "x-chaos" in d.route.header_names and "grpc-timeout" in d.route.header_names


def test_reconfigure_keeps_live_state_and_applies_new_limits() -> None:
    eps = endpoints(3)
    d = Driver(eps, route={"rate_limit": {"requests_per_second": 1, "burst": 1}})
    for _ in range(5):
        d.guards.outlier.record(eps[0], AttemptResult(status=503))
    held = d.guards.admit(d.route, {}, grpc=False)
    assert isinstance(held, Admission)
    budget = d.guards.budget
    new_route = RouteResilience()
    d.guards.reconfigure(
        ServiceResilience.model_validate({"circuit_breakers": {"max_requests": 1}}), eps, {"r": new_route}
    )
    assert d.guards.budget is budget  # unchanged settings: same live budget
    assert not d.guards.outlier.is_available(eps[0])  # ejection kept
    assert d.guards.limiter.route_buckets == {}  # the route's limit went away
    refused = d.guards.admit(d.route, {}, grpc=False)  # 1 in use, new limit 1
    assert isinstance(refused, LocalAnswer) and refused.flag == "UO"
    d.guards.request_ended(held)
    d.guards.reconfigure(
        ServiceResilience.model_validate({"retry_budget": {"retry_ratio": 0.5}}), eps, {"r": new_route}
    )
    assert d.guards.budget is not budget


def test_failure_answers() -> None:
    from nodeproxy.resilience.retry import GiveUp

    assert failure_answer(AttemptResult(status=503), GiveUp("attempts exhausted")) is None
    connect = failure_answer(AttemptResult(failure=Failure.CONNECT_FAILURE), GiveUp("attempts exhausted"))
    assert connect is not None and (connect.status, connect.flag) == (502, "UF")
    reset = failure_answer(AttemptResult(failure=Failure.RESET), GiveUp("not retriable"))
    assert reset is not None and (reset.status, reset.flag) == (502, "UC")
    timeout = failure_answer(AttemptResult(failure=Failure.TIMEOUT), GiveUp("not retriable"))
    assert timeout is not None and (timeout.status, timeout.flag, timeout.grpc_status) == (504, "UT", 4)


@pytest.mark.parametrize(
    ("retries", "hold", "replay"),
    [
        ({}, 503, 65536),  # defaults: retriable-status-codes [503] and gRPC codes
        ({"max_retries": 0}, 0, 0),  # no retries: nothing held, nothing buffered
        ({"retry_on": ["connect-failure", "reset"]}, 0, 65536),  # no response is ever retried
        ({"retry_on": ["5xx"], "max_replay_body": 1024}, 500, 1024),
        ({"retry_on": ["gateway-error"]}, 502, 65536),
        ({"retry_on": ["unavailable"]}, HOLD_GRPC_ONLY, 65536),
        (
            {"retry_on": ["gateway-error", "retriable-status-codes"], "retriable_status_codes": [409]},
            409,
            65536,
        ),
    ],
)
def test_route_guards_tell_the_engine_what_to_hold_and_buffer(
    retries: dict[str, Any], hold: int, replay: int
) -> None:
    guards = RouteGuards.from_config("r", RouteResilience.model_validate({"retries": retries}))
    assert (guards.hold_min_status, guards.replay_limit) == (hold, replay)


class CountingClock(FakeClock):
    def __init__(self, now: float = 1000.0) -> None:
        super().__init__(now)
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.mark.parametrize("grpc", [False, True])
@pytest.mark.parametrize("timeout", [0.0, 2.5, 15.0])
@pytest.mark.parametrize("honor", [True, False])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"host": "web"},
        {"x-nodeproxy-timeout-ms": "250"},
        {"x-nodeproxy-timeout-ms": "junk"},
        {"grpc-timeout": "1S"},
        {"grpc-timeout": "100m", "x-nodeproxy-timeout-ms": "5000"},
    ],
)
def test_admit_reads_the_clock_once_and_sets_the_deadline_for_request_would(
    grpc: bool, timeout: float, honor: bool, headers: dict[str, str]
) -> None:
    """admit() computes the deadline inline when the caller sent no timeout header, and reads the clock
    once for the deadline and the retry budget: the same deadline as Deadline.for_request."""
    from nodeproxy.resilience.deadline import Deadline

    clock = CountingClock()
    config = RouteResilience.model_validate({"timeout": timeout, "honor_caller_timeout": honor})
    guards = ServiceGuards("svc", ServiceResilience(), [Endpoint("10.0.0.1", 80)], {"r": config}, clock=clock)
    route = RouteGuards.from_config("r", config)
    clock.reads = 0  # setting up read it
    admission = guards.admit(route, headers, grpc=grpc)
    assert isinstance(admission, Admission)
    assert clock.reads == 1
    assert admission.deadline == Deadline.for_request(
        clock.now, timeout, headers, grpc=grpc, honor_caller_timeout=honor
    )
    assert admission.expires_at == admission.deadline.expires_at and admission.deadline is admission.deadline
    assert guards.budget.available() == pytest.approx(guards.budget.reserve + guards.budget.retry_ratio)
    guards.request_ended(admission)


@pytest.mark.parametrize("timeout", [-1.0, math.nan])
def test_route_guards_refuse_a_timeout_admit_could_not_use(timeout: float) -> None:
    config = RouteResilience()
    with pytest.raises(ValueError, match="timeout must be >= 0"):
        RouteGuards("r", timeout, True, config.retries.policy(), None)


@pytest.mark.parametrize("per_try", [0.0, 0.3, 5.0])  # 0: none
@pytest.mark.parametrize("timeout", [0.0, 1.0])
@pytest.mark.parametrize("elapsed", [0.0, 0.5, 0.9, 1.0, 3.0])
def test_attempt_timeout_is_the_deadlines(per_try: float, timeout: float, elapsed: float) -> None:
    """Admission.attempt_timeout (inline) agrees with Deadline.attempt_timeout at every point in time,
    also after the deadline."""
    clock = FakeClock()
    route_config = RouteResilience.model_validate(
        {"timeout": timeout, "retries": {"per_try_timeout": per_try}}
    )
    guards = ServiceGuards("svc", ServiceResilience(), [Endpoint("10.0.0.1", 80)], clock=clock)
    admission = guards.admit(RouteGuards.from_config("r", route_config), {}, grpc=False)
    assert isinstance(admission, Admission)
    clock.now += elapsed
    assert admission.attempt_timeout == admission.deadline.attempt_timeout(clock.now, per_try or None)
