"""Linkerd's retry budget: retries may add at most `retry_ratio` of the requests plus a reserve of
`min_retries_per_second` over a sliding `window` (defaults 20%, 10/s, 10 s).

A budget is per service (shared by its routes and by all requests in this process), so a failing
service sees at most about 1.2x its normal load plus the reserve, never the 3x that every request
retrying twice would give: no retry storm.

Guarantee (checked by a property test): at the moment any retry is admitted at time t,

    retries admitted in (t - window, t]  <=  retry_ratio x requests in (t - window, t]
                                             + min_retries_per_second x window.

Counts live in `buckets` + 1 slots of window / buckets seconds each, so memory is constant at any
request rate. To keep the guarantee exact despite the slotting, retries are counted over every slot
that overlaps the window (a little more than the window) and requests only over the slots wholly
inside it (a little less): the budget errs by at most one slot toward refusing.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from nodeproxy.balance import Clock

__all__ = [
    "DEFAULT_MIN_RETRIES_PER_SECOND",
    "DEFAULT_RETRY_RATIO",
    "DEFAULT_WINDOW",
    "RetryBudget",
]

# Linkerd's defaults (linkerd2-proxy's retry budget; reference.md).
DEFAULT_RETRY_RATIO = 0.2
DEFAULT_MIN_RETRIES_PER_SECOND = 10.0
DEFAULT_WINDOW = 10.0
# Slots per window: 1 s slots for the default window; the budget is at most 1/10 conservative.
DEFAULT_BUCKETS = 10


@dataclass(slots=True)
class _Slot:
    index: int  # floor(time / slot width)
    requests: int = 0
    retries: int = 0


class RetryBudget:
    """Call :meth:`record_request` once per original request and :meth:`try_withdraw` before each
    retry; a retry goes ahead only when it returns True."""

    def __init__(
        self,
        retry_ratio: float = DEFAULT_RETRY_RATIO,
        min_retries_per_second: float = DEFAULT_MIN_RETRIES_PER_SECOND,
        window: float = DEFAULT_WINDOW,
        buckets: int = DEFAULT_BUCKETS,
        clock: Clock = time.monotonic,
    ) -> None:
        if not 0 <= retry_ratio <= 1000 or not 0 <= min_retries_per_second < math.inf:
            raise ValueError(
                f"retry_ratio ({retry_ratio}) must be in [0, 1000] and min_retries_per_second "
                f"({min_retries_per_second}) finite and >= 0"
            )
        if not 0 < window < math.inf or buckets < 1:
            raise ValueError(f"window ({window}) must be positive and buckets ({buckets}) at least 1")
        self.retry_ratio = retry_ratio
        self.reserve = min_retries_per_second * window
        self.window = window
        self.buckets = buckets
        self.slot_width = window / buckets
        self.clock = clock
        self._slots: deque[_Slot] = deque()
        self._latest = -(2**62)  # slot index of the newest slot; time never runs back past it
        self._slot_end = -math.inf  # clock time when the newest slot ends (record_request's shortcut)
        self.refused = 0  # retries refused, for metrics

    def _current(self, now: float | None = None) -> _Slot:
        index = max(math.floor((self.clock() if now is None else now) / self.slot_width), self._latest)
        self._latest = index
        self._slot_end = (index + 1) * self.slot_width
        slots = self._slots
        if not slots or slots[-1].index != index:
            slots.append(_Slot(index))
        # Keep the slots that can overlap the window: indices index - buckets .. index.
        while slots[0].index < index - self.buckets:
            slots.popleft()
        return slots[-1]

    def record_request(self, now: float | None = None) -> None:
        """An original request (not a retry) was sent: it earns retry_ratio of a retry. `now`: the
        budget's clock read by the caller for the same event (None: read it here)."""
        if now is None:
            now = self.clock()
        if now < self._slot_end:
            self._slots[-1].requests += 1  # every request: still in the newest slot
            return
        self._current(now).requests += 1

    def available(self) -> float:
        """Retries the budget would admit right now (may be fractional)."""
        current = self._current()
        retries = sum(s.retries for s in self._slots)  # every slot overlapping the window
        oldest_inside = current.index - self.buckets + 1
        requests = sum(s.requests for s in self._slots if s.index >= oldest_inside)
        return self.retry_ratio * requests + self.reserve - retries

    def try_withdraw(self) -> bool:
        """Admit one retry if the budget allows it (and count it), else count the refusal."""
        if self.available() >= 1:
            self._slots[-1].retries += 1
            return True
        self.refused += 1
        return False
