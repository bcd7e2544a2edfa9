"""CPU cost of one HTTP routing decision (decide_request), and of the whole Python part of a request.

    python3 bench/route_decision.py [--number 200000] [--repeat 5]

Prints microseconds of this thread's CPU time (thread_time, so other processes on a shared machine
do not inflate it), the best of `repeat` runs:

- per decision, for the common shapes of a decision on the documented routing example
  (docs/routing.md) and on services without routes;
- per request, for what the engine's Python layer does with one request: its HEAD record (look up
  the service port, build RequestAttrs, decide, queue the answer) and its DONE record (counters;
  access log off, as in the wrk bench), fed to HttpProxy._handle in batches of 32 (wrk -c32) on
  a service without routes over 3 endpoints (the wrk lab's `web`). The engine thread gets no
  connection: the records are built here, and building them is measured apart and subtracted.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeproxy.config import HttpConfig, RelayConfig, parse_config
from nodeproxy.proxy.http_route import RequestAttrs, decide_request
from nodeproxy.routes import HttpServiceRoutes
from nodeproxy.state.routing import RoutingState, StateUpdater

ROUTING_DOC = Path(__file__).resolve().parent.parent / "docs" / "routing.md"
PLAIN_SERVICES = """
  - name: plain
    vip: 10.96.0.22
    ports: [{port: 80, protocol: http}]
    endpoints: [{address: 10.244.1.50}, {address: 10.244.1.51}]
  - name: web
    vip: 10.96.0.23
    ports: [{port: 80, protocol: http}]
    endpoints: [{address: 10.244.1.52}, {address: 10.244.1.53}, {address: 10.244.1.54}]
  - name: single
    vip: 10.96.0.24
    ports: [{port: 80, protocol: http}]
    balancer: round_robin
    endpoints: [{address: 10.244.1.55}]
"""
WEB = ("10.96.0.23", 80)
BATCH = 32  # records of each kind per batch: wrk -c32 keeps 32 requests in flight


def http_routes(state: RoutingState, vip: str, port: int) -> HttpServiceRoutes:
    route = state.lookup(vip, port)
    assert route is not None and route.http is not None, f"{vip}:{port} is not an HTTP service port"
    return route.http


def best_of(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds of thread CPU time per call, the best of `repeat` runs of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat, timer=time.thread_time)) / number


def decision_costs(state: RoutingState, number: int, repeat: int) -> None:
    reviews = http_routes(state, "10.96.0.20", 80)
    ratings = http_routes(state, "10.96.0.21", 50051)
    plain = http_routes(state, "10.96.0.22", 80)
    web = http_routes(state, *WEB)
    single = http_routes(state, "10.96.0.24", 80)
    grpc = {"content-type": "application/grpc"}
    cases = {
        "service without routes (p2c over 2)": (plain, RequestAttrs("GET", "plain", "/", "", {})),
        "service without routes (p2c over 3)": (web, RequestAttrs("GET", "web", "/", "", {})),
        "one endpoint, round_robin (bench.run's web-h1)": (single, RequestAttrs("GET", "s", "/", "", {})),
        "header exact, first route": (reviews, RequestAttrs("GET", "reviews", "/", "", {"x-env": "staging"})),
        "90/10 canary after 3 header routes": (reviews, RequestAttrs("GET", "reviews", "/", "", {})),
        "same, with a query to parse": (reviews, RequestAttrs("GET", "reviews", "/", "a=1&b=x%20y", {})),
        "gRPC, regex on the path": (
            ratings,
            RequestAttrs("POST", "r", "/ratings.v2.Ratings/GetRating", "", grpc),
        ),
    }
    print("per decision (decide_request):")
    for name, (routes, attrs) in cases.items():
        cost = best_of(functools.partial(decide_request, routes, attrs), number, repeat)
        print(f"  {name:46s} {cost * 1e6:6.2f} us")


def engine_layer_cost(state: RoutingState, number: int, repeat: int, observed: bool = False) -> None:
    """observed: with Istio's request metrics and the tracer (1% sampling, no exporter) on."""
    # Imported here: the engine module loads the native extension, which the decision part does not need.
    from nodeproxy import _l7
    from nodeproxy.metrics import WorkerMetrics
    from nodeproxy.proxy.http import HttpConnection, HttpProxy
    from nodeproxy.tracing import Tracer

    proxy = HttpProxy(
        lambda: state,
        HttpConfig(),
        RelayConfig(),
        access_log=False,
        metrics=WorkerMetrics() if observed else None,
        tracer=Tracer() if observed else None,
    )
    proxy.start()  # its engine thread idles (no connection is adopted); started so close() can stop it
    try:
        worker = proxy.workers[0]
        for conn_id in range(BATCH):
            proxy.connections[conn_id] = HttpConnection(
                conn_id, "10.244.1.2", 40000 + conn_id, WEB[0], WEB[1], time.monotonic(), worker
            )
        headers = (("host", f"{WEB[0]}:{WEB[1]}"),)  # what wrk sends
        batches = max(1, number // BATCH)
        next_id = [0]

        def records() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
            base = next_id[0]
            next_id[0] += BATCH
            heads = [
                (_l7.HEAD, base + c, c, "GET", "/", f"{WEB[0]}:{WEB[1]}", "/", "", headers)
                for c in range(BATCH)
            ]
            dones = [
                (_l7.DONE, base + c, c, 200, 0, 0, 100, 200, 1000, 2000, 3000, 1, 1, 1500, -1)
                for c in range(BATCH)
            ]
            return heads, dones

        def handle() -> None:
            for _ in range(batches):
                heads, dones = records()
                forwards: list[Any] = []
                replies: list[Any] = []
                proxy._handle(heads, state, (forwards, replies, []))
                assert len(forwards) == BATCH and not replies, replies[:1]
                proxy._handle(dones, state, ([], [], []))

        def build_only() -> None:
            for _ in range(batches):
                records()

        per_request = (best_of(handle, 1, repeat) - best_of(build_only, 1, repeat)) / (batches * BATCH)
        if not observed:
            print("per request (HEAD + DONE records through HttpProxy._handle, access log off):")
        name = "same, with metrics and tracing" if observed else "service without routes (p2c over 3)"
        print(f"  {name:46s} {per_request * 1e6:6.2f} us")
    finally:
        proxy.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="decisions (requests) per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best one counts")
    args = parser.parse_args()
    match = re.search(r"```yaml\n(.*?)```", ROUTING_DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "docs/routing.md has no yaml example"
    state = StateUpdater(rng=random.Random(1)).apply(parse_config(match.group(1) + PLAIN_SERVICES))
    decision_costs(state, args.number, args.repeat)
    engine_layer_cost(state, args.number, args.repeat)
    engine_layer_cost(state, args.number, args.repeat, observed=True)


if __name__ == "__main__":
    main()
