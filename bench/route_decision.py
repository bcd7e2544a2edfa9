"""CPU cost of one HTTP routing decision (decide_request), on the documented routing example.

    python3 bench/route_decision.py [--number 200000]

Prints microseconds of this thread's CPU time per decision (thread_time, so other processes on a
shared machine do not inflate it), the best of five runs, for the common shapes of a decision.
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import time
import timeit
from pathlib import Path

from nodeproxy.config import parse_config
from nodeproxy.proxy.http_route import RequestAttrs, decide_request
from nodeproxy.routes import HttpServiceRoutes
from nodeproxy.state.routing import StateUpdater

ROUTING_DOC = Path(__file__).resolve().parent.parent / "docs" / "routing.md"
PLAIN_SERVICE = """
  - name: plain
    vip: 10.96.0.22
    ports: [{port: 80, protocol: http}]
    endpoints: [{address: 10.244.1.50}, {address: 10.244.1.51}]
"""


def http_routes(vip: str, port: int, state_text: str) -> HttpServiceRoutes:
    route = StateUpdater(rng=random.Random(1)).apply(parse_config(state_text)).lookup(vip, port)
    assert route is not None and route.http is not None, f"{vip}:{port} is not an HTTP service port"
    return route.http


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="decisions per run")
    args = parser.parse_args()
    match = re.search(r"```yaml\n(.*?)```", ROUTING_DOC.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, "docs/routing.md has no yaml example"
    text = match.group(1) + PLAIN_SERVICE
    reviews = http_routes("10.96.0.20", 80, text)
    ratings = http_routes("10.96.0.21", 50051, text)
    plain = http_routes("10.96.0.22", 80, text)
    grpc = {"content-type": "application/grpc"}
    cases = {
        "service without routes (p2c over 2)": (plain, RequestAttrs("GET", "plain", "/", "", {})),
        "header exact, first route": (reviews, RequestAttrs("GET", "reviews", "/", "", {"x-env": "staging"})),
        "90/10 canary after 3 header routes": (reviews, RequestAttrs("GET", "reviews", "/", "", {})),
        "same, with a query to parse": (reviews, RequestAttrs("GET", "reviews", "/", "a=1&b=x%20y", {})),
        "gRPC, regex on the path": (
            ratings,
            RequestAttrs("POST", "r", "/ratings.v2.Ratings/GetRating", "", grpc),
        ),
    }
    for name, (routes, attrs) in cases.items():
        best = min(
            timeit.repeat(
                functools.partial(decide_request, routes, attrs),
                number=args.number,
                repeat=5,
                timer=time.thread_time,
            )
        )
        print(f"{name:40s} {best / args.number * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
