"""Configuration of the resilience layers: per service (:class:`ServiceResilience`) and per route
(:class:`RouteResilience`), with the defaults of Linkerd, Envoy and Istio (docs/resilience.md).

Durations take the same forms as everywhere in the config (``250ms``, ``1.5s``, ``2m``, or a bare
number of seconds) and, like the relay's timeouts, must be at least a millisecond (0 turns off the
ones documented as optional). Each model turns itself into the runtime object of its layer
(``policy()``, ``settings()``, ``limits()``, ``bucket()``, ``budget()``), so the state updater never
repeats a default.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nodeproxy.balance import DEFAULT_EWMA_DECAY, DEFAULT_RTT, Clock
from nodeproxy.resilience import budget as budget_layer
from nodeproxy.resilience import circuit, outlier, retry
from nodeproxy.resilience.deadline import DEFAULT_ROUTE_TIMEOUT
from nodeproxy.resilience.fault import FaultPolicy, HeaderCondition
from nodeproxy.resilience.ratelimit import TokenBucket
from nodeproxy.validation import (
    at_least_a_millisecond as _at_least_a_millisecond,
)
from nodeproxy.validation import (
    off_or_at_least_a_millisecond as _off_or_at_least_a_millisecond,
)
from nodeproxy.validation import (
    parse_duration_value as _duration,
)

__all__ = [
    "CircuitBreakersConfig",
    "FaultAbortConfig",
    "FaultConfig",
    "FaultDelayConfig",
    "HeaderConditionConfig",
    "LoadBalancingConfig",
    "OutlierDetectionConfig",
    "RateLimitConfig",
    "RetryBudgetConfig",
    "RetryConfig",
    "RouteResilience",
    "ServiceResilience",
]


def _at_most(limit: float, unit: str = "s") -> AfterValidator:
    def check(value: float) -> float:
        if value > limit:
            raise ValueError(f"must be at most {limit:g} {unit}")
        return value

    return AfterValidator(check)


_DAY = 86400.0
Seconds = Annotated[
    float, BeforeValidator(_duration), AfterValidator(_at_least_a_millisecond), _at_most(_DAY)
]
OffOrSeconds = Annotated[
    float, BeforeValidator(_duration), AfterValidator(_off_or_at_least_a_millisecond), _at_most(_DAY)
]
Percent = Annotated[float, Field(ge=0, le=100)]

_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _header_name(value: str) -> str:
    if not value or not set(value) <= _TCHAR:
        raise ValueError(
            "must be an HTTP field name: token characters only (letters, digits, !#$%&'*+-.^_`|~)"
        )
    return value.lower()


def _regex(pattern: str) -> str:
    from nodeproxy.routes import RouteRegex

    RouteRegex(pattern)  # raises ValueError with the reason
    return pattern


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# --------------------------------------------------------------------------------------------
# Per service


class LoadBalancingConfig(_Model):
    """Peak-EWMA tuning and locality (the balancer itself is the service's `balancer`)."""

    # Linkerd: a sample's weight halves in about 7 s; an unmeasured endpoint is assumed at 30 ms.
    decay: Annotated[Seconds, _at_most(3600)] = Field(
        default=DEFAULT_EWMA_DECAY, description="Peak-EWMA time constant of the response-time average."
    )
    default_rtt: Annotated[Seconds, _at_most(60)] = Field(
        default=DEFAULT_RTT, description="Peak-EWMA estimate of an endpoint with no sample yet."
    )
    prefer_same_node: bool = Field(
        default=False,
        description="Pick among healthy endpoints on this proxy's node when there is one, else among all.",
    )


class RetryBudgetConfig(_Model):
    """Linkerd's retry budget: retries <= retry_ratio x requests + min_retries_per_second x window."""

    retry_ratio: float = Field(
        default=budget_layer.DEFAULT_RETRY_RATIO, ge=0, le=10, description="Retries per original request."
    )
    min_retries_per_second: float = Field(
        default=budget_layer.DEFAULT_MIN_RETRIES_PER_SECOND,
        ge=0,
        le=1e6,
        description="Retries allowed per second on top of the ratio, even with little traffic.",
    )
    window: Annotated[Seconds, _at_most(3600)] = Field(
        default=budget_layer.DEFAULT_WINDOW, description="Sliding window the budget is counted over."
    )

    def budget(self, clock: Clock = time.monotonic) -> budget_layer.RetryBudget:
        return budget_layer.RetryBudget(
            self.retry_ratio, self.min_retries_per_second, self.window, clock=clock
        )


class OutlierDetectionConfig(_Model):
    """Envoy's outlier detection: eject endpoints that keep failing (nodeproxy/resilience/outlier.py)."""

    consecutive_5xx: int = Field(
        default=outlier.DEFAULT_CONSECUTIVE_5XX,
        ge=0,
        le=10_000,
        description="5xx or no answer in a row; 0: off.",
    )
    consecutive_gateway_failures: int = Field(
        default=outlier.DEFAULT_CONSECUTIVE_GATEWAY_FAILURES,
        ge=0,
        le=10_000,
        description="502/503/504, connect failures, resets or timeouts in a row; 0: off.",
    )
    interval: Annotated[Seconds, _at_most(3600)] = Field(
        default=outlier.DEFAULT_INTERVAL,
        description="Each interval admitted without ejection takes one off the ejection count.",
    )
    base_ejection_time: Annotated[Seconds, _at_most(_DAY)] = Field(
        default=outlier.DEFAULT_BASE_EJECTION_TIME, description="Ejection time x times ejected."
    )
    max_ejection_time: Annotated[Seconds, _at_most(_DAY)] = Field(
        default=outlier.DEFAULT_MAX_EJECTION_TIME, description="Longest ejection."
    )
    max_ejection_percent: Percent = Field(
        default=outlier.DEFAULT_MAX_EJECTION_PERCENT,
        description="Most endpoints ejected at once, in percent (at least one if above 0); 0: never eject.",
    )

    @model_validator(mode="after")
    def _base_within_max(self) -> Self:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError(
                f"max_ejection_time ({self.max_ejection_time:g} s) is below base_ejection_time "
                f"({self.base_ejection_time:g} s)"
            )
        return self

    def settings(self) -> outlier.OutlierSettings:
        return outlier.OutlierSettings(
            self.consecutive_5xx,
            self.consecutive_gateway_failures,
            self.interval,
            self.base_ejection_time,
            self.max_ejection_time,
            self.max_ejection_percent,
        )


class CircuitBreakersConfig(_Model):
    """Envoy's circuit breaker thresholds; a request over one is answered 503 with flag UO. Defaults:
    Istio's, no limit (circuit.UNLIMITED, the largest value accepted)."""

    max_connections: int = Field(
        default=circuit.DEFAULT_MAX_CONNECTIONS,
        ge=0,
        le=circuit.UNLIMITED,
        description="Upstream connections.",
    )
    max_pending_requests: int = Field(
        default=circuit.DEFAULT_MAX_PENDING_REQUESTS,
        ge=0,
        le=circuit.UNLIMITED,
        description="Requests waiting for an upstream connection.",
    )
    max_requests: int = Field(
        default=circuit.DEFAULT_MAX_REQUESTS, ge=0, le=circuit.UNLIMITED, description="Requests in flight."
    )
    max_retries: int = Field(
        default=circuit.DEFAULT_MAX_RETRIES, ge=0, le=circuit.UNLIMITED, description="Retries in flight."
    )

    def limits(self) -> circuit.CircuitLimits:
        return circuit.CircuitLimits(
            self.max_connections, self.max_pending_requests, self.max_requests, self.max_retries
        )


class RateLimitConfig(_Model):
    """A token bucket: `requests_per_second` sustained, `burst` at once (default: one second's worth)."""

    requests_per_second: float = Field(gt=0, le=1e7, description="Sustained rate.")
    burst: int | None = Field(default=None, ge=1, le=10_000_000, description="Bucket size; default the rate.")

    def bucket(self) -> TokenBucket:
        burst = self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_second))
        return TokenBucket(self.requests_per_second, burst)


class ServiceResilience(_Model):
    """The resilience settings of one service (all of its routes and ports)."""

    load_balancing: LoadBalancingConfig = LoadBalancingConfig()
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    outlier_detection: OutlierDetectionConfig = OutlierDetectionConfig()
    circuit_breakers: CircuitBreakersConfig = CircuitBreakersConfig()
    rate_limit: RateLimitConfig | None = Field(
        default=None, description="Service-wide limit; none by default."
    )


# --------------------------------------------------------------------------------------------
# Per route

RetryCondition = Literal[
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
]


class RetryConfig(_Model):
    """When and how a route retries (nodeproxy/resilience/retry.py); Istio's defaults."""

    max_retries: int = Field(
        default=retry.DEFAULT_MAX_RETRIES,
        ge=0,
        le=10,
        description="Retries after the first attempt; 0: none.",
    )
    retry_on: list[RetryCondition] = Field(
        default=sorted(c.value for c in retry.DEFAULT_RETRY_ON),
        min_length=1,
        description="Results that are retried.",
    )
    retriable_status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default=sorted(retry.DEFAULT_RETRIABLE_STATUS_CODES),
        description="Statuses retried under retriable-status-codes.",
    )
    per_try_timeout: OffOrSeconds = Field(
        default=0.0, description="Longest wait for each attempt's response head; 0: only the route timeout."
    )
    backoff_base: Annotated[Seconds, _at_most(60)] = Field(
        default=retry.DEFAULT_BACKOFF_BASE,
        description="Jittered backoff before retry n: up to base x 2^(n-1).",
    )
    backoff_max: Annotated[Seconds, _at_most(600)] = Field(
        default=retry.DEFAULT_BACKOFF_MAX, description="Cap of the backoff."
    )
    max_replay_body: int = Field(
        default=retry.DEFAULT_MAX_REPLAY_BODY,
        ge=0,
        le=16 * 1024 * 1024,
        description="Bytes of request body buffered for a retry; larger requests are not retried.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.backoff_max < self.backoff_base:
            raise ValueError(
                f"backoff_max ({self.backoff_max:g} s) is below backoff_base ({self.backoff_base:g} s)"
            )
        if "retriable-status-codes" in self.retry_on and not self.retriable_status_codes:
            raise ValueError("retry_on lists retriable-status-codes but retriable_status_codes is empty")
        return self

    def policy(self) -> retry.RetryPolicy:
        return retry.RetryPolicy(
            max_retries=self.max_retries,
            retry_on=frozenset(retry.RetryOn(c) for c in self.retry_on),
            retriable_status_codes=frozenset(self.retriable_status_codes),
            per_try_timeout=self.per_try_timeout or None,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            max_replay_body=self.max_replay_body,
        )


class HeaderConditionConfig(_Model):
    """A header that must be sent: `name`, and at most one of exact, prefix, regex (RE2, whole value)."""

    name: Annotated[str, AfterValidator(_header_name)]
    exact: str | None = None
    prefix: str | None = None
    regex: Annotated[str, AfterValidator(_regex)] | None = None

    @model_validator(mode="after")
    def _at_most_one(self) -> Self:
        given = [f for f in ("exact", "prefix", "regex") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"at most one of exact, prefix, regex may be set (got {', '.join(given)})")
        return self

    def condition(self) -> HeaderCondition:
        from nodeproxy.routes import RouteRegex

        regex = RouteRegex(self.regex) if self.regex is not None else None
        return HeaderCondition(self.name, self.exact, self.prefix, regex)


class FaultDelayConfig(_Model):
    duration: Annotated[Seconds, _at_most(3599)] = Field(description="Added before the first attempt.")
    percent: Percent = Field(default=100.0, description="Share of (matching) requests delayed.")


class FaultAbortConfig(_Model):
    status: int = Field(ge=200, le=599, description="HTTP status answered.")
    grpc_status: int | None = Field(
        default=None, ge=0, le=16, description="gRPC status for gRPC requests; default: mapped from status."
    )
    percent: Percent = Field(default=100.0, description="Share of (matching) requests aborted.")


class FaultConfig(_Model):
    """Fault injection: delay and/or abort a share of the requests whose headers match."""

    delay: FaultDelayConfig | None = None
    abort: FaultAbortConfig | None = None
    headers: list[HeaderConditionConfig] = Field(
        default=[], description="All must hold; empty: every request."
    )

    @model_validator(mode="after")
    def _does_something(self) -> Self:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort or both")
        return self

    def policy(self) -> FaultPolicy:
        return FaultPolicy(
            delay=self.delay.duration if self.delay else 0.0,
            delay_percent=self.delay.percent if self.delay else 0.0,
            abort_status=self.abort.status if self.abort else None,
            abort_grpc_status=self.abort.grpc_status if self.abort else None,
            abort_percent=self.abort.percent if self.abort else 0.0,
            headers=tuple(h.condition() for h in self.headers),
        )


class RouteResilience(_Model):
    """The resilience settings of one route."""

    # Envoy's route timeout. It bounds the wait for the response head over all attempts; a body that
    # started in time may stream on (docs/resilience.md).
    timeout: OffOrSeconds = Field(
        default=DEFAULT_ROUTE_TIMEOUT,
        description="Deadline for the response head over all attempts; 0: none.",
    )
    honor_caller_timeout: bool = Field(
        default=True, description="Let grpc-timeout / x-nodeproxy-timeout-ms shorten the deadline."
    )
    retries: RetryConfig = RetryConfig()
    rate_limit: RateLimitConfig | None = Field(default=None, description="Route limit; none by default.")
    fault: FaultConfig | None = None
