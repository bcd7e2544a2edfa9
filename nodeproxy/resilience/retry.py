"""Retries: which results are retried, how many times, after what backoff, and which requests can be.

One :class:`RetryState` per request, created when its head arrives. The engine tells it each
attempt's result and gets back what to do: :class:`Retry` (wait `delay`, then send the request to
another endpoint with `timeout` for the answer) or :class:`GiveUp` (forward this result, or if there
was none answer with the failure). Every check a retry must pass, in order:

1. the result matches a condition of the policy (``retry_on``);
2. attempts are left (``1 + max_retries`` in all);
3. the request can be replayed (its body was buffered whole: at most ``max_replay_body`` bytes,
   64 KiB by default as in Linkerd; a larger body has already been streamed and is gone);
4. the deadline leaves time for the backoff (no attempt ever starts after the deadline);
5. the circuit breaker has room for one more active retry;
6. the service's retry budget admits it (checked last so a retry refused for another reason
   does not spend budget).

Conditions (Envoy's names and meanings):

=====================  ============================================================================
connect-failure        no connection to the endpoint (refused, unreachable, connect timeout)
refused-stream         HTTP/2 REFUSED_STREAM or GOAWAY: the upstream never processed the request
reset                  no response head: connection closed or stream reset, or per-try timeout
5xx                    any 5xx, or no response head at all (includes the three above)
gateway-error          502, 503 or 504, or no response head at all
retriable-status-codes a status listed in ``retriable_status_codes``
cancelled, deadline-exceeded, internal, resource-exhausted, unavailable
                       the gRPC status of a trailers-only response (status in the response head)
=====================  ============================================================================

Backoff is Envoy's fully jittered exponential backoff: before retry n (1-based) wait a uniformly
random time in [0, min(backoff_max, backoff_base x 2^(n-1))); defaults 25 ms and 250 ms.

Each retry goes to an endpoint not tried yet when there is one (:func:`exclude_for_retry`).
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from nodeproxy.balance import Clock
from nodeproxy.resilience.budget import RetryBudget
from nodeproxy.resilience.circuit import CircuitBreaker, Resource
from nodeproxy.resilience.deadline import Deadline
from nodeproxy.resilience.outcome import AttemptResult, Failure, GrpcStatus

__all__ = [
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_MAX",
    "DEFAULT_MAX_REPLAY_BODY",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_RETRIABLE_STATUS_CODES",
    "DEFAULT_RETRY_ON",
    "GiveUp",
    "Retry",
    "RetryOn",
    "RetryPolicy",
    "RetryState",
    "body_replayable",
    "exclude_for_retry",
]


class RetryOn(enum.StrEnum):
    CONNECT_FAILURE = "connect-failure"
    REFUSED_STREAM = "refused-stream"
    RESET = "reset"
    HTTP_5XX = "5xx"
    GATEWAY_ERROR = "gateway-error"
    RETRIABLE_STATUS_CODES = "retriable-status-codes"
    CANCELLED = "cancelled"
    DEADLINE_EXCEEDED = "deadline-exceeded"
    INTERNAL = "internal"
    RESOURCE_EXHAUSTED = "resource-exhausted"
    UNAVAILABLE = "unavailable"


_GRPC_CONDITIONS = {
    RetryOn.CANCELLED: GrpcStatus.CANCELLED,
    RetryOn.DEADLINE_EXCEEDED: GrpcStatus.DEADLINE_EXCEEDED,
    RetryOn.INTERNAL: GrpcStatus.INTERNAL,
    RetryOn.RESOURCE_EXHAUSTED: GrpcStatus.RESOURCE_EXHAUSTED,
    RetryOn.UNAVAILABLE: GrpcStatus.UNAVAILABLE,
}

# Istio's default retry policy (reference.md): 2 retries on connect-failure, refused-stream,
# unavailable, cancelled and 503.
DEFAULT_MAX_RETRIES = 2
DEFAULT_RETRY_ON: frozenset[RetryOn] = frozenset(
    {
        RetryOn.CONNECT_FAILURE,
        RetryOn.REFUSED_STREAM,
        RetryOn.UNAVAILABLE,
        RetryOn.CANCELLED,
        RetryOn.RETRIABLE_STATUS_CODES,
    }
)
DEFAULT_RETRIABLE_STATUS_CODES: frozenset[int] = frozenset({503})
# Envoy's backoff defaults.
DEFAULT_BACKOFF_BASE = 0.025
DEFAULT_BACKOFF_MAX = 0.250
# Linkerd does not retry requests with bodies over 64 KiB; the engine buffers up to this much.
DEFAULT_MAX_REPLAY_BODY = 64 * 1024


def body_replayable(body_length: int | None, max_replay_body: int = DEFAULT_MAX_REPLAY_BODY) -> bool | None:
    """Whether a request can be replayed, from its head: True for no body or a Content-Length within
    the limit, False for a larger one, None for a body of unknown length (chunked, HTTP/2 without
    content-length): replayable only if it ends within the limit, which the engine learns as it
    buffers it."""
    if body_length is None:
        return None
    return body_length <= max_replay_body


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A route's retry settings (see the module docstring for their meaning)."""

    max_retries: int = DEFAULT_MAX_RETRIES
    retry_on: frozenset[RetryOn] = DEFAULT_RETRY_ON
    retriable_status_codes: frozenset[int] = DEFAULT_RETRIABLE_STATUS_CODES
    per_try_timeout: float | None = None  # seconds; None: only the deadline bounds an attempt
    backoff_base: float = DEFAULT_BACKOFF_BASE
    backoff_max: float = DEFAULT_BACKOFF_MAX
    max_replay_body: int = DEFAULT_MAX_REPLAY_BODY

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")
        if not 0 < self.backoff_base <= self.backoff_max < math.inf:
            raise ValueError(
                f"backoff needs 0 < base ({self.backoff_base}) <= max ({self.backoff_max}) < inf"
            )
        if self.per_try_timeout is not None and not 0 < self.per_try_timeout < math.inf:
            raise ValueError(f"per_try_timeout must be positive, not {self.per_try_timeout}")
        if self.max_replay_body < 0:
            raise ValueError(f"max_replay_body must be >= 0, not {self.max_replay_body}")

    def matches(self, result: AttemptResult) -> bool:
        """Whether `result` is one this policy retries (conditions only, nothing else)."""
        on = self.retry_on
        failure = result.failure
        if failure is not None:
            return (
                RetryOn.HTTP_5XX in on
                or RetryOn.GATEWAY_ERROR in on
                or (failure is Failure.CONNECT_FAILURE and RetryOn.CONNECT_FAILURE in on)
                or (failure is Failure.REFUSED_STREAM and RetryOn.REFUSED_STREAM in on)
                # A refused stream or a connect failure is also a reset of sorts, as in Envoy.
                or RetryOn.RESET in on
            )
        status = result.status
        assert status is not None  # AttemptResult holds exactly one of status and failure
        if (RetryOn.HTTP_5XX in on and status >= 500) or (
            RetryOn.GATEWAY_ERROR in on and result.is_gateway_error
        ):
            return True
        if RetryOn.RETRIABLE_STATUS_CODES in on and status in self.retriable_status_codes:
            return True
        grpc = result.grpc_status
        return grpc is not None and any(
            code == grpc and condition in on for condition, code in _GRPC_CONDITIONS.items()
        )

    def backoff(self, retry_number: int, rng: random.Random) -> float:
        """Seconds to wait before retry `retry_number` (1 for the first retry)."""
        if retry_number < 1:
            raise ValueError(f"retries are numbered from 1, not {retry_number}")
        # 2 ** 62 overflows nothing and is beyond any cap; clamp the exponent before the power.
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** min(retry_number - 1, 62))
        return rng.random() * ceiling


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the request again after `delay` seconds; `timeout` bounds the wait for its response head
    (None: no bound)."""

    delay: float
    timeout: float | None


@dataclass(frozen=True, slots=True)
class GiveUp:
    """No further attempt: forward the last result (or answer its failure). `reason` is for logs:
    "success", "not retriable", "attempts exhausted", "not replayable", "deadline", "overflow",
    "budget exhausted"."""

    reason: str


class RetryState:
    """The retry bookkeeping of one request; see the module docstring for the checks."""

    __slots__ = (
        "_holds_retry_slot",
        "attempts",
        "breaker",
        "budget",
        "clock",
        "deadline",
        "policy",
        "rng",
        "tried",
    )

    def __init__(
        self,
        policy: RetryPolicy,
        deadline: Deadline,
        clock: Clock,
        rng: random.Random,
        budget: RetryBudget | None = None,
        breaker: CircuitBreaker | None = None,
        *,
        count_request: bool = True,  # False: the caller recorded the request in the budget itself
    ) -> None:
        self.policy = policy
        self.deadline = deadline
        self.clock = clock
        self.rng = rng
        self.budget = budget
        self.breaker = breaker
        self.attempts = 0  # attempts started
        self.tried: tuple[str, ...] = ()  # endpoint addresses, in order
        self._holds_retry_slot = False
        if budget is not None and count_request:
            budget.record_request()

    def first_attempt_timeout(self) -> float | None:
        """Timeout of the first attempt's wait for a response head (see Retry.timeout)."""
        return self.deadline.attempt_timeout(self.clock(), self.policy.per_try_timeout)

    def attempt_started(self, endpoint_address: str) -> None:
        """The engine sent an attempt (the first or a retry) to this endpoint."""
        self.attempts += 1
        self.tried += (endpoint_address,)

    def on_result(self, result: AttemptResult, replayable: bool) -> Retry | GiveUp:
        """The attempt ended with `result`; `replayable` says whether the engine still holds the
        whole request body (see body_replayable)."""
        if self.attempts == 0:
            raise RuntimeError("on_result() before any attempt_started()")
        self._release_retry_slot()
        policy = self.policy
        if not policy.matches(result):
            good = result.failure is None and not result.is_5xx and result.grpc_status in (None, 0)
            return GiveUp("success" if good else "not retriable")
        if self.attempts > policy.max_retries:
            return GiveUp("attempts exhausted")
        if not replayable:
            return GiveUp("not replayable")
        now = self.clock()
        delay = policy.backoff(self.attempts, self.rng)
        if self.deadline.remaining(now) <= delay:
            return GiveUp("deadline")
        if self.breaker is not None:
            if not self.breaker.try_acquire(Resource.RETRIES):
                return GiveUp("overflow")
            self._holds_retry_slot = True
        if self.budget is not None and not self.budget.try_withdraw():
            self._release_retry_slot()
            return GiveUp("budget exhausted")
        return Retry(delay, self.deadline.attempt_timeout(now + delay, policy.per_try_timeout))

    def finished(self) -> None:
        """The request is over (answered, or the client went away): frees an active-retry slot."""
        self._release_retry_slot()

    def _release_retry_slot(self) -> None:
        if self._holds_retry_slot:
            self._holds_retry_slot = False
            assert self.breaker is not None
            self.breaker.release(Resource.RETRIES)


def exclude_for_retry(tried: Collection[str], addresses: Sequence[str]) -> Collection[str]:
    """The addresses a retry's balancer pick must skip: every tried one, unless that leaves none of
    `addresses`, in which case none (a retry on the same endpoint beats no retry)."""
    if tried and all(a in tried for a in addresses):
        return ()
    return tried
