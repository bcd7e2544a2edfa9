"""CPU cost per request of trace propagation and of the access-log record (issue 9).

    python3 -m bench.trace_log_cost [--number 50000] [--repeat 5]

Prints microseconds of this thread's CPU time (thread_time, so other processes on a shared machine do
not inflate it), the best of `repeat` runs:

- Tracer.start + Tracer.finish for the header shapes a request may carry (unsampled: nothing is
  queued, which is what 99% of requests cost at Istio's default 1% sampling);
- one request access-log record as http.py writes it (http_request_fields + request, rendered and
  written to /dev/null), without and with the tracing fields;
- the same record through the daemon's structlog chain (level filter, add_log_level, TimeStamper,
  JSONRenderer, one write per line), the alternative accesslog.py does not use.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import structlog

from nodeproxy.accesslog import AccessLog, AtomicLineLogger
from nodeproxy.daemon import LogLevel
from nodeproxy.tracing import Tracer, TracingConfig

TRACE_HEADERS: dict[str, dict[str, str]] = {
    "no trace headers": {},
    "x-request-id only": {"x-request-id": "dab83714-c3e6-46ce-8bd5-32141a2efc57"},
    "traceparent + tracestate + x-request-id": {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
        "tracestate": "congo=t61rcWkgMzE",
        "x-request-id": "dab83714-c3e6-46ce-8bd5-32141a2efc57",
    },
    "b3 single": {"b3": "80f198ee56343ba8-e457b5a2e4d86bd1-0"},
    "b3 multi": {"x-b3-traceid": "80f198ee56343ba8", "x-b3-spanid": "e457b5a2e4d86bd1", "x-b3-sampled": "0"},
}


def best_us(run: Callable[[], None], number: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.thread_time()
        for _ in range(number):
            run()
        best = min(best, (time.thread_time() - began) / number)
    return best * 1e6


def tracer_case(headers: dict[str, str]) -> Callable[[], None]:
    tracer = Tracer(TracingConfig(sampling=0))

    def run() -> None:
        start = tracer.start(headers)
        tracer.finish(
            start, start_ns=0, end_ns=0, method="GET", authority="web", path="/", route="default",
            service="web", status=200, grpc_status=-1, upstream="10.244.2.7:8080", attempts=1, flags="-",
        )  # fmt: skip

    return run


def access_log_case(fd: int, tracing_fields: bool) -> Callable[[], None]:
    log = AccessLog(fd)
    extra: dict[str, object] = (
        {"grpc_status": -1, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
         "x_request_id": "dab83714-c3e6-46ce-8bd5-32141a2efc57"}
        if tracing_fields
        else {}
    )  # fmt: skip

    def run() -> None:
        fields = log.http_request_fields(
            5, ("10.244.1.5", 40000), ("10.96.0.30", 80), "web", ("10.244.2.7", 8080)
        )
        log.request(
            9, fields, method="GET", authority="web.example", path="/api/v1/items", route="default",
            status=200, flags="-", err=0, bytes_in=120, bytes_out=4000, decide_ms=0.02, upstream_ms=1.5,
            duration_ms=2.0, attempts=1, reused=True, **extra,  # type: ignore[arg-type]
        )  # fmt: skip

    return run


def structlog_case(fd: int) -> Callable[[], None]:
    structlog.configure(
        processors=[
            LogLevel("info"),
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(10),
        logger_factory=lambda *_args: AtomicLineLogger(fd),
        cache_logger_on_first_use=True,
    )
    log = structlog.get_logger("bench")

    def run() -> None:
        log.info(
            "request", request=9, conn=5, src="10.244.1.5:40000", dst="10.96.0.30:80", service="web",
            upstream="10.244.2.7:8080", method="GET", authority="web.example", path="/api/v1/items",
            route="default", status=200, flags="-", errno=0, bytes_in=120, bytes_out=4000, decide_ms=0.02,
            upstream_ms=1.5, duration_ms=2.0, attempts=1, reused=True,
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736", request_id="dab83714-c3e6-46ce-8bd5-32141a2efc57",
        )  # fmt: skip

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name, headers in TRACE_HEADERS.items():
        cost = best_us(tracer_case(headers), args.number, args.repeat)
        print(f"tracer start+finish, {name:42s} {cost:6.2f} us")
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        for tracing_fields in (False, True):
            cost = best_us(access_log_case(fd, tracing_fields), args.number, args.repeat)
            label = "with trace_id/request_id/grpc_status" if tracing_fields else "without tracing fields"
            print(f"access-log request record, {label:37s} {cost:6.2f} us")
        cost = best_us(structlog_case(fd), args.number, args.repeat)
        print(f"same record through structlog's JSON chain            {cost:6.2f} us")
    finally:
        structlog.reset_defaults()
        os.close(fd)


if __name__ == "__main__":
    main()
