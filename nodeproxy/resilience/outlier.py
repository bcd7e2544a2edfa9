"""Outlier detection: eject an endpoint that keeps failing, re-admit it later, eject it again quickly
if it still fails.

Envoy's model with its defaults: `consecutive_5xx` (5) answers that are 5xx or no answer at all, or
`consecutive_gateway_failures` (5) that are 502/503/504 or no answer at all (connect failures,
resets, timeouts; at L4 a failed connect counts too), eject the endpoint for
`base_ejection_time` (30 s) x the times it was ejected, at most `max_ejection_time` (300 s). Any
other answer resets the counts. Each `interval` (10 s) an endpoint spends admitted without being
ejected takes one off its ejection count, so an endpoint that recovered for good is not punished
for old failures forever.

At most `max_ejection_percent` (10%) of the service's endpoints are ejected at once, but at least
one when the percentage is above 0 (as Envoy: with 3 endpoints 10% would be none) and never the
last admitted endpoint. An ejection the cap refuses is counted and tried again on the next failure.

When its ejection time has passed the endpoint is re-admitted on probation: its next failure ejects
it again at once (for longer), its first success ends the probation.

State is kept per Endpoint object (they survive config reloads); time comes from the injected clock
and re-admission happens lazily when the state is looked at, so no timer is needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from nodeproxy.balance import Clock, Endpoint
from nodeproxy.resilience.outcome import AttemptResult, Failure

__all__ = [
    "DEFAULT_BASE_EJECTION_TIME",
    "DEFAULT_CONSECUTIVE_5XX",
    "DEFAULT_CONSECUTIVE_GATEWAY_FAILURES",
    "DEFAULT_INTERVAL",
    "DEFAULT_MAX_EJECTION_PERCENT",
    "DEFAULT_MAX_EJECTION_TIME",
    "Ejection",
    "OutlierDetector",
    "OutlierSettings",
]

# Envoy's outlier detection defaults (reference.md; max_ejection_time from Envoy's API docs).
DEFAULT_CONSECUTIVE_5XX = 5
DEFAULT_CONSECUTIVE_GATEWAY_FAILURES = 5
DEFAULT_INTERVAL = 10.0
DEFAULT_BASE_EJECTION_TIME = 30.0
DEFAULT_MAX_EJECTION_TIME = 300.0
DEFAULT_MAX_EJECTION_PERCENT = 10.0


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    consecutive_5xx: int = DEFAULT_CONSECUTIVE_5XX  # 0: this trigger is off
    consecutive_gateway_failures: int = DEFAULT_CONSECUTIVE_GATEWAY_FAILURES  # 0: off
    interval: float = DEFAULT_INTERVAL
    base_ejection_time: float = DEFAULT_BASE_EJECTION_TIME
    max_ejection_time: float = DEFAULT_MAX_EJECTION_TIME
    max_ejection_percent: float = DEFAULT_MAX_EJECTION_PERCENT  # 0: never eject

    def __post_init__(self) -> None:
        if self.consecutive_5xx < 0 or self.consecutive_gateway_failures < 0:
            raise ValueError("consecutive failure thresholds must be >= 0 (0 turns one off)")
        if not 0 < self.interval < math.inf or not 0 < self.base_ejection_time < math.inf:
            raise ValueError("interval and base_ejection_time must be positive and finite")
        if not self.base_ejection_time <= self.max_ejection_time < math.inf:
            raise ValueError(
                f"max_ejection_time ({self.max_ejection_time}) must be at least base_ejection_time "
                f"({self.base_ejection_time})"
            )
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent must be in [0, 100], not {self.max_ejection_percent}")

    def max_ejected(self, endpoints: int) -> int:
        """How many of `endpoints` may be ejected at once."""
        if self.max_ejection_percent == 0 or endpoints < 2:
            return 0
        share = math.floor(endpoints * self.max_ejection_percent / 100)
        return min(endpoints - 1, max(1, share))


@dataclass(slots=True)
class _Health:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_at: float | None = None
    ejected_until: float | None = None  # set while ejected
    admitted_at: float | None = None  # last re-admission (or first sight): for the count's decay
    probation: bool = False


@dataclass(frozen=True, slots=True)
class Ejection:
    """An endpoint was just ejected (for logs and metrics)."""

    endpoint: Endpoint
    until: float
    times_ejected: int
    reason: str

    def log_fields(self, now: float) -> dict[str, object]:
        """The fields of the "endpoint ejected" log record (HTTP engine and L4 listener alike)."""
        return {
            "endpoint": f"{self.endpoint.address}:{self.endpoint.port}",
            "seconds": round(self.until - now, 3),
            "times": self.times_ejected,
            "reason": self.reason,
        }


_CONNECT_FAILURE = AttemptResult(failure=Failure.CONNECT_FAILURE)
_CONNECTED = AttemptResult(status=200)  # what an established TCP connection counts as


class OutlierDetector:
    """Outlier detection over one service's endpoints.

    Feed it every attempt's result with :meth:`record` (and L4 connect failures with
    :meth:`record_connect_failure`); ask :meth:`is_available` when balancing (it plugs into
    ``nodeproxy.balance.SkipUnhealthy`` / ``make_balancer(healthy=...)``). Results for endpoints
    that are no longer members (a reload removed them while a request was in flight) are ignored.
    """

    def __init__(
        self,
        settings: OutlierSettings | None = None,
        endpoints: Iterable[Endpoint] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings or OutlierSettings()
        self.clock = clock
        self._health: dict[Endpoint, _Health] = {}
        self.ejections = 0  # ejections so far, for metrics
        self.ejections_refused = 0  # ejections the max_ejection_percent cap refused
        self._ejected_now = 0  # endpoints whose ejection is in force (until _readmit_due sees it end)
        self.update_endpoints(endpoints)

    def update_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The service's endpoints after a reload: new ones start healthy, kept ones keep their
        state, removed ones are forgotten."""
        now = self.clock()
        self._health = {e: self._health.get(e) or _Health(admitted_at=now) for e in endpoints}
        self._ejected_now = sum(1 for h in self._health.values() if h.ejected_until is not None)

    def update_settings(self, settings: OutlierSettings) -> None:
        self.settings = settings  # current ejections keep their end time

    def _readmit_due(self, now: float) -> None:
        for health in self._health.values():
            if health.ejected_until is not None and now >= health.ejected_until:
                health.ejected_until = None
                health.admitted_at = now
                health.probation = True
                health.consecutive_5xx = health.consecutive_gateway = 0
                self._ejected_now -= 1

    def none_ejected(self) -> bool:
        """True when no endpoint is ejected now: a cheap check for the balancer's every pick."""
        if self._ejected_now == 0:
            return True
        self._readmit_due(self.clock())
        return self._ejected_now == 0

    def is_available(self, endpoint: Endpoint) -> bool:
        """False while `endpoint` is ejected (unknown endpoints are available)."""
        health = self._health.get(endpoint)
        if health is None or health.ejected_until is None:
            return True
        if self.clock() >= health.ejected_until:
            self._readmit_due(self.clock())
            return True
        return False

    def ejected(self) -> list[Endpoint]:
        """The endpoints ejected now."""
        self._readmit_due(self.clock())
        return [e for e, h in self._health.items() if h.ejected_until is not None]

    def ejected_until(self, endpoint: Endpoint) -> float | None:
        """When `endpoint`'s ejection ends (clock seconds); None if it is not ejected."""
        self._readmit_due(self.clock())
        health = self._health.get(endpoint)
        return health.ejected_until if health is not None else None

    def record_connect_failure(self, endpoint: Endpoint) -> Ejection | None:
        """An L4 connection to `endpoint` could not be established."""
        return self.record(endpoint, _CONNECT_FAILURE)

    def record_success(self, endpoint: Endpoint) -> None:
        """An L4 connection to `endpoint` was established (and has ended): not a failure."""
        self.record(endpoint, _CONNECTED)

    def record(self, endpoint: Endpoint, result: AttemptResult) -> Ejection | None:
        """Count one attempt's result; returns the ejection it caused, if any."""
        health = self._health.get(endpoint)
        if health is None:
            return None
        status = result.status  # not None: a response (then failure is None), not a 5xx below 500
        if status is not None and status < 500 and health.ejected_until is None:
            # The common case, every successful request: no clock, no scan of the other endpoints
            # (and `not result.is_5xx` inline).
            health.consecutive_5xx = health.consecutive_gateway = 0
            health.probation = False
            return None
        now = self.clock()
        self._readmit_due(now)
        if health.ejected_until is not None:
            return None  # an attempt that started before the ejection: already dealt with
        settings = self.settings
        if not result.is_5xx:
            health.consecutive_5xx = health.consecutive_gateway = 0
            health.probation = False
            return None
        health.consecutive_5xx += 1
        if result.is_gateway_error:
            health.consecutive_gateway += 1
        else:
            health.consecutive_gateway = 0
        if health.probation:
            reason = "failed again after re-admission"
        elif 0 < settings.consecutive_5xx <= health.consecutive_5xx:
            reason = f"{health.consecutive_5xx} consecutive 5xx"
        elif 0 < settings.consecutive_gateway_failures <= health.consecutive_gateway:
            reason = f"{health.consecutive_gateway} consecutive gateway failures"
        else:
            return None
        ejected_now = sum(1 for h in self._health.values() if h.ejected_until is not None)
        if ejected_now >= settings.max_ejected(len(self._health)):
            self.ejections_refused += 1
            return None
        return self._eject(endpoint, health, now, reason)

    def _eject(self, endpoint: Endpoint, health: _Health, now: float, reason: str) -> Ejection:
        settings = self.settings
        if health.admitted_at is not None and health.times_ejected:
            quiet_intervals = math.floor((now - health.admitted_at) / settings.interval)
            health.times_ejected = max(0, health.times_ejected - quiet_intervals)
        health.times_ejected += 1
        duration = min(settings.base_ejection_time * health.times_ejected, settings.max_ejection_time)
        health.ejected_at = now
        health.ejected_until = now + duration
        self._ejected_now += 1
        health.probation = False
        health.consecutive_5xx = health.consecutive_gateway = 0
        self.ejections += 1
        return Ejection(endpoint, health.ejected_until, health.times_ejected, reason)
