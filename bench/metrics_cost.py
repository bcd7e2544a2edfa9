"""CPU cost of the metrics (issue 9): per request and per connection in a worker, per scrape in the
supervisor.

    python3 -m bench.metrics_cost [--number 200000] [--repeat 5] [--series 500]

Prints this thread's CPU time (thread_time, so other processes on a shared machine do not inflate it),
the best of `repeat` runs:

- WorkerMetrics.http_request for a request whose label set was seen before (every request after a
  series' first), one series and `series` distinct ones (a bigger dict, colder caches);
- tcp_opened + tcp_closed for one relayed connection;
- one scrape: two workers' snapshots (JSON through the status pipe included), merge and render, with
  `series` request series and as many TCP series per worker.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

from nodeproxy.balance import Endpoint
from nodeproxy.config import Config, parse_config
from nodeproxy.metrics import SupervisorMetrics, WorkerMetrics, render


def best_us(run: Callable[[], None], number: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        began = time.thread_time()
        for _ in range(number):
            run()
        best = min(best, (time.thread_time() - began) / number)
    return best * 1e6


def lab_config(endpoints: int) -> Config:
    lines = "".join(
        f"      - {{address: 10.244.{1 + i // 250}.{1 + i % 250}, "
        f"labels: {{app: app{i % 20}, version: v{i % 3}}}}}\n"
        for i in range(endpoints)
    )
    return parse_config(
        "node: {name: n}\ncapture: {pod_cidrs: [10.244.0.0/16]}\nservices:\n"
        "  - name: reviews\n    vip: 10.96.0.20\n    ports: [{port: 80, protocol: http}]\n"
        f"    endpoints:\n{lines}",
        source="bench",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--series", type=int, default=500)
    args = parser.parse_args()
    config = lab_config(max(args.series, 1))
    endpoints = [
        Endpoint(str(ep.address), 8080, labels=dict(ep.labels)) for ep in config.services[0].endpoints
    ]

    metrics = WorkerMetrics(config)
    one = endpoints[0]

    def one_series() -> None:
        metrics.http_request("reviews", "10.244.9.9", one, "http", 200, -1, "-", 0.0021, 0, 612)

    spread = WorkerMetrics(config)
    index = [0]
    count = len(endpoints)

    def many_series() -> None:
        i = index[0] = (index[0] + 1) % count
        spread.http_request("reviews", "10.244.9.9", endpoints[i], "http", 200, -1, "-", 0.0021, 0, 612)

    tcp = WorkerMetrics(config)

    def connection() -> None:
        tcp.tcp_opened("reviews", "10.244.9.9", "10.244.1.1")
        tcp.tcp_closed("reviews", "10.244.9.9", "10.244.1.1", "-", 1000, 20000)

    print(f"http_request, one series:          {best_us(one_series, args.number, args.repeat):6.3f} us")
    print(f"http_request, {count} series:  {best_us(many_series, args.number, args.repeat):10.3f} us")
    print(f"tcp_opened + tcp_closed:           {best_us(connection, args.number, args.repeat):6.3f} us")

    workers = [WorkerMetrics(config) for _ in range(2)]
    for worker in workers:
        for i, endpoint in enumerate(endpoints):
            worker.http_request(
                "reviews", "10.244.9.9", endpoint, "http", 200 + i % 5, -1, "-", 0.002, 10, 600
            )
            worker.tcp_closed("reviews", "10.244.9.9", endpoint.address, "-", 10, 20)
    state = SupervisorMetrics()
    size = [0]

    def scrape() -> None:
        answered = {pid: json.loads(json.dumps(w.snapshot())) for pid, w in enumerate(workers)}
        aggregate, _missing = state.merge(answered, answered)
        size[0] = len(render(aggregate))

    scrape_ms = best_us(scrape, 3, args.repeat) / 1000
    print(f"scrape, 2 workers x {count} request + {count} TCP series: {scrape_ms:.1f} ms ({size[0]} bytes)")


if __name__ == "__main__":
    main()
