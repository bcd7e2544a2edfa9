"""Resilience layers for the L7 path (issue 8): pure, I/O-free state machines with injected clocks.

Each module is one layer, composable as in linkerd2-proxy (balance, retry, timeout):

- :mod:`.outcome` -- what one upstream attempt ended with, and local replies the layers ask for;
- :mod:`.budget` -- Linkerd's retry budget (retries <= 20% of requests + 10/s over 10 s);
- :mod:`.retry` -- retry conditions, attempts, backoff with jitter, replayability;
- :mod:`.deadline` -- route timeouts over all attempts, ``grpc-timeout`` and ``x-nodeproxy-timeout-ms``;
- :mod:`.outlier` -- consecutive-failure ejection with growing ejection times;
- :mod:`.circuit` -- per-service limits on connections, pending and active requests, retries;
- :mod:`.ratelimit` -- token buckets per service and per route;
- :mod:`.fault` -- delay and abort injection;
- :mod:`.config` -- their pydantic configuration models with defaults;
- :mod:`.guard` -- the layers put together, and which call the HTTP engine makes at which event.

Peak-EWMA balancing lives with the other balancers in :mod:`nodeproxy.balance`.
None of these modules does I/O, reads the clock on its own or draws random numbers from a global
source: the caller injects a clock (``time.monotonic``) and a ``random.Random``.
"""
