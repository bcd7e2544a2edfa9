"""Cross-node throughput and request rate through the mTLS tunnel vs the plain L4 path, in one run.

    python3 -m bench.tunnel [--duration SECONDS] [--json PATH]

One two-node lab (nodeproxy.lab_nodes): iperf3 and nginx in pod b0 on node-b, clients in pod a0 on
node-a. Each path runs nodeproxy.proxy.tunnel_node on both nodes:

- plain: node-a's L4 splice relay connects to the pod on node-b transparently (the original source
  address), straight over the underlay; node-b only routes.
- tunnel: node-a sends each connection as an HTTP/2 CONNECT stream over TLS 1.3 to node-b's 15008, as
  a0's identity; node-b verifies, decides and connects to the pod from a0's address.

Workloads per path: iperf3 with 1 and 4 streams, wrk keep-alive (2 threads, 32 connections) and wrk with
`Connection: close` (a new tunnelled stream per request). Also the CPU seconds the two node agents used
(from /proc), per GB and per 1,000 requests. The ratio tunnel/plain is printed for every metric; the
issue's target is >= 0.6 for throughput and request rate. Results go to bench/results/tunnel-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.cpu import sample
from bench.paths import H2C_PORT, NGINX, NGINX_CONFIG, REPO_ROOT
from bench.workloads import Measurement, iperf3, wrk
from nodeproxy.lab import wait_listening
from nodeproxy.lab_nodes import NodeLab, RunningNode, start_tunnel_nodes, write_pki

HTTP_PORT = 8080
IPERF_PORT = 5201
TARGET_RATIO = 0.6
PATHS = ("plain", "tunnel")


def start_servers(lab: NodeLab, directory: Path) -> None:
    _, b = lab.nodes
    pod = b.pods[0]
    nginx_dir = directory / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)
    config = nginx_dir / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=nginx_dir, port=HTTP_PORT, h2c_port=H2C_PORT))
    log = (directory / "servers.log").open("wb")
    lab.spawn(pod.ns, [NGINX, "-c", str(config)], stdout=log, stderr=log)
    lab.spawn(pod.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=log, stderr=log)
    for port in (HTTP_PORT, IPERF_PORT):
        wait_listening(b.ns, pod.ip, port, 15)


def run_path(
    lab: NodeLab, directory: Path, mode: str, duration: int
) -> tuple[dict[str, float], dict[str, object]]:
    a, b = lab.nodes
    client, server = a.pods[0], b.pods[0]
    nodes = start_tunnel_nodes(lab, directory, mode)
    values: dict[str, float] = {}
    raw: dict[str, object] = {}
    try:
        workloads: list[tuple[str, Callable[[], Measurement], str, float]] = [
            ("iperf3_1", lambda: iperf3(client.ns, (server.ip, IPERF_PORT), duration, 1), "gb", 1.0),
            ("iperf3_4", lambda: iperf3(client.ns, (server.ip, IPERF_PORT), duration, 4), "gb", 1.0),
            (
                "wrk_keepalive",
                lambda: wrk(client.ns, f"http://{server.ip}:{HTTP_PORT}/", duration, close=False),
                "requests",
                1000.0,
            ),
            (
                "wrk_close",
                lambda: wrk(client.ns, f"http://{server.ip}:{HTTP_PORT}/", duration, close=True),
                "connections",
                1000.0,
            ),
        ]
        for name, workload, work_key, per in workloads:
            pids = [node.proc.pid for node in nodes]
            before = sample(pids)
            measurement = workload()
            after = sample(pids)
            values.update(measurement.values)
            cpu = after.seconds - before.seconds
            work = measurement.work.get(work_key)
            if work:
                values[f"{name}_cpu_per_{'gb' if work_key == 'gb' else '1k'}"] = cpu / (work / per)
            raw[name] = {"raw": measurement.raw, "warnings": measurement.warnings, "cpu_seconds": cpu}
            time.sleep(1)
        failed = [e for node in nodes for e in node.events() if e.get("event") in ("tls_failed", "refused")]
        if failed:
            raw["failures"] = failed[:20]
    finally:
        for node in nodes:
            node.stop()
    check_path(nodes, mode)
    return values, raw


def check_path(nodes: tuple[RunningNode, RunningNode], mode: str) -> None:
    """The traffic really took the path it is named after (a bench that measured the wrong thing would
    print a ratio all the same)."""
    node_a = nodes[0]
    paths = {e.get("path") for e in node_a.events() if e.get("event") in ("stream_done", "relay_done")}
    expected = "tunnel" if mode == "tunnel" else "relay"
    if paths != {expected}:
        raise RuntimeError(f"{mode} path: node-a carried connections as {sorted(map(str, paths))}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per workload (default 10)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="plain,tunnel,tunnel,plain rounds, averaged (default 1)"
    )
    parser.add_argument("--json", type=Path, default=None, help="where to write the results")
    args = parser.parse_args(argv)
    lab = NodeLab(prefix=f"npb{secrets.token_hex(2)}", pods_per_node=1)
    legs: dict[str, list[dict[str, float]]] = {mode: [] for mode in PATHS}
    raw: dict[str, list[object]] = {mode: [] for mode in PATHS}
    # Legs in ABBA order: a machine whose load drifts during the run favours neither path.
    order = [mode for _ in range(args.rounds) for mode in ("plain", "tunnel", "tunnel", "plain")]
    with tempfile.TemporaryDirectory(prefix="np-bench-tunnel-") as tmp:
        directory = Path(tmp)
        try:
            lab.up()
            write_pki(directory, lab)
            start_servers(lab, directory)
            for mode in order:
                values, details = run_path(lab, directory, mode, args.duration)
                legs[mode].append(values)
                raw[mode].append(details)
        finally:
            lab.down()
    results = {mode: _mean(legs[mode]) for mode in PATHS}
    ratios = {
        key: results["tunnel"][key] / results["plain"][key]
        for key in results["plain"]
        if key in results["tunnel"] and results["plain"][key]
    }
    print(f"{'metric':34} {'plain':>12} {'tunnel':>12} {'tunnel/plain':>13}")
    for key, plain in results["plain"].items():
        tunnel = results["tunnel"].get(key, float("nan"))
        print(f"{key:34} {plain:12.3f} {tunnel:12.3f} {ratios.get(key, float('nan')):13.2f}")
    headline = {k: v for k, v in ratios.items() if "cpu" not in k}
    worst = min(headline.values()) if headline else 0.0
    print(f"lowest throughput/rate ratio: {worst:.2f} (target >= {TARGET_RATIO})")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    output = args.json or REPO_ROOT / "bench" / "results" / f"tunnel-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    report = {
        "when": stamp,
        "commit": git.stdout.strip(),
        "duration": args.duration,
        "order": order,
        "results": results,
        "ratios": ratios,
        "legs": legs,
        "raw": raw,
    }
    output.write_text(json.dumps(report, indent=2))
    print(f"results: {output}")
    return 0


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = [key for key in rows[0] if all(key in row for row in rows)]
    return {key: sum(row[key] for row in rows) / len(rows) for key in keys}


if __name__ == "__main__":
    sys.exit(main())
