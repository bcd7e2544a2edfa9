"""The resilience layers put together for the HTTP engine: what to call at which event.

One :class:`ServiceGuards` per service, kept across config reloads like the Endpoint objects (its
budget, breaker counts, ejections and rate-limit tokens are live state); one :class:`RouteGuards`
per route and snapshot (immutable). The engine's Python side calls, per request:

1. request head: :meth:`ServiceGuards.admit` -> a :class:`LocalAnswer` to send at once (429 RL rate
   limited, 503 UO overflow, fault abort FI) or an :class:`Admission` (deadline, retry state,
   fault delay, headers to set upstream);
2. each attempt: pick the endpoint with the service's balancer (:meth:`ServiceGuards.balancer`,
   which skips ejected endpoints and prefers the node's own), passing ``admission.retry.tried`` as
   the addresses to avoid (:func:`nodeproxy.resilience.retry.exclude_for_retry` when none is left);
   then ``admission.retry.attempt_started(address)``, send with the timeout
   ``admission.attempt_timeout`` (first) or ``Retry.timeout`` (later);
3. each attempt's end (response head, or failure incl. the attempt's timeout):
   :meth:`ServiceGuards.attempt_ended` -> :class:`Retry` (wait `delay`, go to 2) or :class:`GiveUp`;
   on GiveUp forward the response if there was one, else send :func:`failure_answer`;
4. request over (answered, or client gone): :meth:`ServiceGuards.request_ended`, exactly once.

Nothing here does I/O or keeps timers: the engine owns sockets and timers; these objects only keep
counts and decide.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodeproxy.balance import Balancer, Clock, Endpoint, make_balancer
from nodeproxy.resilience.circuit import CircuitBreaker, Resource, overflow_answer
from nodeproxy.resilience.config import RateLimitConfig, RouteResilience, ServiceResilience
from nodeproxy.resilience.deadline import (
    GRPC_TIMEOUT_HEADER,
    NO_DEADLINE,
    TIMEOUT_HEADER,
    Deadline,
    deadline_exceeded,
)
from nodeproxy.resilience.fault import FaultPolicy
from nodeproxy.resilience.outcome import (
    GATEWAY_ERROR_STATUSES,
    AttemptResult,
    Failure,
    GrpcStatus,
    LocalAnswer,
)
from nodeproxy.resilience.outlier import Ejection, OutlierDetector
from nodeproxy.resilience.ratelimit import RateLimiter
from nodeproxy.resilience.retry import GiveUp, Retry, RetryOn, RetryPolicy, RetryState

__all__ = [
    "HOLD_GRPC_ONLY",
    "Admission",
    "RouteGuards",
    "ServiceGuards",
    "failure_answer",
    "hold_min_status_for",
]


@dataclass(frozen=True, slots=True)
class RouteGuards:
    """A route's compiled resilience settings (one per route per snapshot)."""

    name: str
    timeout: float  # seconds, 0: none
    honor_caller_timeout: bool
    retry_policy: RetryPolicy
    fault: FaultPolicy | None
    # What the engine is asked to do for this route's attempts (see hold_min_status_for).
    hold_min_status: int = 0
    replay_limit: int = 0

    def __post_init__(self) -> None:
        # admit() computes the deadline without Deadline.for_request's checks: they are made here.
        if not self.timeout >= 0:
            raise ValueError(f"route {self.name}: timeout must be >= 0 seconds, not {self.timeout}")

    @classmethod
    def from_config(cls, name: str, config: RouteResilience) -> RouteGuards:
        policy = config.retries.policy()
        retrying = policy.max_retries > 0
        return cls(
            name,
            config.timeout,
            config.honor_caller_timeout,
            policy,
            config.fault.policy() if config.fault is not None else None,
            hold_min_status_for(policy) if retrying else 0,
            policy.max_replay_body if retrying else 0,
        )

    @property
    def header_names(self) -> frozenset[str]:
        """Request headers the engine must pass to admit(): the deadline's and the fault's."""
        names = {"grpc-timeout", "x-nodeproxy-timeout-ms"}
        if self.fault is not None:
            names |= self.fault.header_names
        return frozenset(names)


class Admission:
    """A request let through: wait `delay` (fault injection, 0 normally), then attempt; set
    `upstream_headers` on each attempt (recomputed per attempt with :meth:`headers_at`).

    `expires_at` is the deadline in clock seconds (None: none); its :class:`Deadline` object, and the
    RetryState, are made only when first needed (a failed attempt, or a caller asking for them): most
    requests never fail, and this runs for every request."""

    __slots__ = ("_deadline", "_first", "_guards", "_policy", "_retry", "delay", "expires_at", "grpc")

    def __init__(
        self, guards: ServiceGuards, policy: RetryPolicy, expires_at: float | None, delay: float, grpc: bool
    ) -> None:
        self._guards = guards
        self._policy = policy
        self.expires_at = expires_at
        self.delay = delay
        self.grpc = grpc
        self._deadline: Deadline | None = None
        self._retry: RetryState | None = None
        self._first: str | None = None  # the first attempt's endpoint, until a RetryState exists

    @property
    def deadline(self) -> Deadline:
        """The request's deadline (`expires_at`) as a Deadline, made on first use."""
        deadline = self._deadline
        if deadline is None:
            expires_at = self.expires_at
            deadline = self._deadline = NO_DEADLINE if expires_at is None else Deadline(expires_at)
        return deadline

    @property
    def retry(self) -> RetryState:
        """The request's retry bookkeeping (made on first use, with the first attempt in it)."""
        retry = self._retry
        if retry is None:
            guards = self._guards
            retry = self._retry = RetryState(
                self._policy,
                self.deadline,
                guards.clock,
                guards.rng,
                guards.budget,
                guards.breaker,
                count_request=False,  # admit() counted it
            )
            if self._first is not None:
                retry.attempt_started(self._first)
        return retry

    def attempt_started(self, endpoint_address: str) -> None:
        """An attempt (the first or a retry) was sent to this endpoint."""
        if self._retry is None and self._first is None:
            self._first = endpoint_address
        else:
            self.retry.attempt_started(endpoint_address)

    @property
    def tried(self) -> tuple[str, ...]:
        """Endpoint addresses attempted so far, in order."""
        if self._retry is not None:
            return self._retry.tried
        return (self._first,) if self._first is not None else ()

    @property
    def attempt_timeout(self) -> float | None:
        """Bound on the first attempt's wait for a response head (None: none): what
        ``deadline.attempt_timeout(clock(), per_try_timeout)`` gives, inline (every request asks)."""
        per_try = self._policy.per_try_timeout  # None or positive and finite (RetryPolicy checks)
        expires_at = self.expires_at
        if expires_at is None:
            return per_try
        left = expires_at - self._guards.clock()
        if left < 0.0:
            left = 0.0
        if per_try is not None and per_try < left:
            return per_try
        return None if left == math.inf else left

    def headers_at(self, now: float) -> tuple[tuple[str, str], ...]:
        """Headers to set (replacing the caller's) on an attempt sent at `now`: the time left."""
        return self.deadline.upstream_headers(now, grpc=self.grpc)

    def finished(self) -> None:
        """The request is over: frees an active-retry slot its RetryState may hold."""
        if self._retry is not None:
            self._retry.finished()


# The engine holds a response head for a decision when its status is at least this, or when it is a
# gRPC trailers-only response with a non-zero grpc-status (nodeproxy/_l7.pyx). HOLD_GRPC_ONLY is above
# every status, for policies that retry gRPC codes but no HTTP status; 0 holds nothing.
HOLD_GRPC_ONLY = 1000
_GRPC_CONDITIONS = frozenset(
    {
        RetryOn.CANCELLED,
        RetryOn.DEADLINE_EXCEEDED,
        RetryOn.INTERNAL,
        RetryOn.RESOURCE_EXHAUSTED,
        RetryOn.UNAVAILABLE,
    }
)


def hold_min_status_for(policy: RetryPolicy) -> int:
    """The lowest response status `policy` may retry (HOLD_GRPC_ONLY when it retries only gRPC
    codes, 0 when it retries no response at all): every response below it streams to the client at
    once, with no round trip to Python; only the rarer ones at or above it wait for a decision."""
    on = policy.retry_on
    lowest = HOLD_GRPC_ONLY if on & _GRPC_CONDITIONS else 0
    if RetryOn.HTTP_5XX in on:
        lowest = 500
    elif RetryOn.GATEWAY_ERROR in on:
        lowest = min(GATEWAY_ERROR_STATUSES)
    if RetryOn.RETRIABLE_STATUS_CODES in on and policy.retriable_status_codes:
        codes = min(policy.retriable_status_codes)
        lowest = codes if lowest == 0 else min(lowest, codes)
    return lowest


def failure_answer(result: AttemptResult, give_up: GiveUp) -> LocalAnswer | None:
    """What the client gets when the request gave up: None to forward the response that came back,
    else the local reply for the failure (504 UT when time ran out, 502 UF / UC otherwise)."""
    if result.status is not None:
        return None
    if give_up.reason == "deadline" or result.failure is Failure.TIMEOUT:
        return deadline_exceeded(f"no response head in time ({give_up.reason})")
    if result.failure is Failure.CONNECT_FAILURE:
        return LocalAnswer(502, "UF", f"upstream connect failed ({give_up.reason})", GrpcStatus.UNAVAILABLE)
    return LocalAnswer(
        502,
        "UC",
        f"upstream connection closed or reset before the response ({give_up.reason})",
        GrpcStatus.UNAVAILABLE,
    )


class ServiceGuards:
    """Live resilience state of one service; see the module docstring for the calls."""

    def __init__(
        self,
        name: str,
        config: ServiceResilience,
        endpoints: Iterable[Endpoint],
        routes: Mapping[str, RouteResilience] | None = None,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        local_node: str | None = None,
    ) -> None:
        self.name = name
        self.clock = clock
        self.rng = rng or random.Random()
        self.local_node = local_node
        self.config = config
        self.breaker = CircuitBreaker(config.circuit_breakers.limits())
        self.budget = config.retry_budget.budget(clock)
        self.outlier = OutlierDetector(config.outlier_detection.settings(), endpoints, clock)
        self.limiter = RateLimiter(config.rate_limit.bucket() if config.rate_limit else None, clock)
        self._limit_scope = f"service {name}"  # the 429's detail names it
        self._route_limits: dict[str, RateLimitConfig] = {}
        self._set_route_limits(routes or {})

    def _set_route_limits(self, routes: Mapping[str, RouteResilience]) -> None:
        wanted = {name: r.rate_limit for name, r in routes.items() if r.rate_limit is not None}
        for route in set(self._route_limits) - set(wanted):
            self.limiter.set_route_bucket(route, None)
        for route, limit in wanted.items():
            if self._route_limits.get(route) != limit:  # a changed limit starts a full bucket
                self.limiter.set_route_bucket(route, limit.bucket())
        self._route_limits = wanted

    def reconfigure(
        self,
        config: ServiceResilience,
        endpoints: Iterable[Endpoint],
        routes: Mapping[str, RouteResilience],
    ) -> None:
        """A reload: new limits and settings, live counts kept. The budget and buckets restart only
        when their own settings changed."""
        if config.retry_budget != self.config.retry_budget:
            self.budget = config.retry_budget.budget(self.clock)
        if config.rate_limit != self.config.rate_limit:
            self.limiter.service_bucket = config.rate_limit.bucket() if config.rate_limit else None
        self.breaker.update_limits(config.circuit_breakers.limits())
        self.outlier.update_settings(config.outlier_detection.settings())
        self.outlier.update_endpoints(endpoints)
        self._set_route_limits(routes)
        self.config = config

    def balancer(self, name: str) -> Balancer:
        """The service's balancer `name`, skipping ejected endpoints and, when configured, preferring
        endpoints on this node."""
        lb = self.config.load_balancing
        return make_balancer(
            name,
            clock=self.clock,
            rng=self.rng,
            default_rtt=lb.default_rtt,
            decay=lb.decay,
            local_node=self.local_node if lb.prefer_same_node else None,
            healthy=self.outlier.is_available,
            all_healthy=self.outlier.none_ejected,
        )

    def admit(self, route: RouteGuards, headers: Mapping[str, str], *, grpc: bool) -> Admission | LocalAnswer:
        """A request head arrived for `route`; `headers` holds at least route.header_names.

        This runs for every request: what is not configured costs an attribute test, and the clock
        is read once for the deadline and the budget."""
        limiter = self.limiter
        if limiter.service_bucket is not None or limiter.route_buckets:  # else check() has nothing to do
            limited = limiter.check(route.name, self._limit_scope)
            if limited is not None:
                return limited
        delay = 0.0
        fault = route.fault
        if fault is not None:
            action = fault.decide(headers, self.rng)
            if action.abort is not None:
                return action.abort
            delay = action.delay
        if not self.breaker.try_acquire_request():
            return overflow_answer(Resource.REQUESTS)
        now = self.clock()
        timeout = route.timeout  # >= 0 (RouteGuards checks), 0: none
        expires_at: float | None
        if (
            route.honor_caller_timeout
            and headers
            and (GRPC_TIMEOUT_HEADER if grpc else TIMEOUT_HEADER) in headers
        ):
            expires_at = Deadline.for_request(now, timeout, headers, grpc=grpc).expires_at
        elif 0 < timeout < math.inf:  # Deadline.for_request without a caller's header, inline
            expires_at = now + timeout
        else:
            expires_at = None
        # The injected delay is spent from the deadline too (the caller waits for it).
        self.budget.record_request(now)  # an original request: it earns its share of the retry budget
        return Admission(self, route.retry_policy, expires_at, delay, grpc)

    def attempt_ended(
        self,
        admission: Admission,
        endpoint: Endpoint,
        result: AttemptResult,
        *,
        replayable: bool,
        response_time: float | None,
        balancer: Balancer | None = None,
    ) -> tuple[Retry | GiveUp, Ejection | None]:
        """An attempt on `endpoint` ended. `response_time` (seconds from sending to the response
        head) feeds `balancer`'s latency estimate when there was a response."""
        ejection = self.outlier.record(endpoint, result)
        if balancer is not None and response_time is not None and result.status is not None:
            balancer.observe(endpoint, response_time)
        return admission.retry.on_result(result, replayable), ejection

    def request_ended(self, admission: Admission) -> None:
        """The request is over: frees its request slot (and an active-retry slot it may hold)."""
        if admission._retry is not None:  # admission.finished(), without the call for most requests
            admission._retry.finished()
        self.breaker.release_request()
