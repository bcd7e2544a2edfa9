"""Cross-node traffic through the daemon (`nodeproxy run` on both nodes): mTLS tunnel vs plain, in one run.

    python3 -m bench.mesh_daemon [--duration SECONDS] [--rounds N] [--threads N] [--json PATH]

One mesh lab (nodeproxy.lab_mesh): a CA service and the daemon on both nodes, iperf3 -s and nginx (port
8080) in pod b1 on node-b (namespace lab: PERMISSIVE). Two clients on node-a, both captured by node-a's
daemon:

- tunnel: pod a0 has an identity, so its connections travel as HTTP/2 CONNECT streams over mTLS to
  node-b's 15008; node-b's daemon verifies, authorizes and connects to b1 from a0's address.
- plain: pod a2 has none; b1 accepts plaintext, so node-a connects to b1 from a2's address, and node-b's
  inbound capture takes it to 15006, where its relay connects to b1 (policy checked, no principal).
  Both paths are proxied on both nodes.

Workloads, each on both paths, legs in ABBA order per round; the ratio tunnel/plain is the median of
each round's ratio:
- iperf3 with 1 and 4 streams to b1 (L4: the splice relay vs the tunnel);
- wrk keep-alive (HTTP/1.1) to b1:8080 addressed directly (L4, as iperf3);
- wrk keep-alive to the `web` service (lab_mesh.WEB_VIP:80, protocol http): node-a's HTTP engine parses
  and routes every request and sends it to b1 through the tunnel (a0) or directly (a2).
Afterwards node-a's access log must show a0's L4 connections as tunnel streams and a2's as relayed
ones, and node-a's stats must show the HTTP engine's requests of a0 in the tunnel, or the run is
reported invalid (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.paths import NGINX, NGINX_CONFIG
from bench.workloads import iperf3, wrk
from nodeproxy.lab import HTTP_PORT, wait_listening
from nodeproxy.lab_mesh import WEB_PORT, WEB_VIP, MeshLab, running_mesh

IPERF_PORT = 5201
H2C_PORT = 8082  # nginx's h2c server (NGINX_CONFIG has one); unused here
PATHS = {"tunnel": 0, "plain": 2}  # path -> index of the client pod on node-a
TARGET_RATIO = 0.6  # the target (ztunnel reaches about 0.5)


def start_servers(mesh: MeshLab, directory: Path) -> None:
    """iperf3 -s and nginx in pod b1."""
    server = mesh.b.pods[1]
    nginx_dir = directory / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True)
    config = nginx_dir / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=nginx_dir, port=HTTP_PORT, h2c_port=H2C_PORT))
    with (directory / "servers.log").open("wb") as log:
        mesh.lab.spawn(server.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=log, stderr=log)
        mesh.lab.spawn(server.ns, [NGINX, "-c", str(config), "-p", str(nginx_dir)], stdout=log, stderr=log)
    for port in (IPERF_PORT, HTTP_PORT):
        wait_listening(mesh.b.ns, server.ip, port, 15)


def workloads(mesh: MeshLab, duration: int) -> dict[str, tuple[str, Callable[[str], float]]]:
    """name -> (unit, measure(path))."""
    server = mesh.b.pods[1]

    def client(path: str) -> str:
        return mesh.a.pods[PATHS[path]].ns

    def rps(path: str, url: str) -> float:
        measured = wrk(client(path), url, duration, close=False)
        if measured.warnings:
            raise RuntimeError(f"{url} from {path}: {measured.warnings}")
        return measured.values["wrk_keepalive_rps"]

    return {
        "iperf3_1": ("Gbit/s", lambda p: iperf3(client(p), (server.ip, IPERF_PORT), duration, 1).values[
            "iperf3_1_gbps"]),
        "iperf3_4": ("Gbit/s", lambda p: iperf3(client(p), (server.ip, IPERF_PORT), duration, 4).values[
            "iperf3_4_gbps"]),
        "http_l4_keepalive": ("req/s", lambda p: rps(p, f"http://{server.ip}:{HTTP_PORT}/")),
        "http_l7_keepalive": ("req/s", lambda p: rps(p, f"http://{WEB_VIP}:{WEB_PORT}/")),
    }  # fmt: skip


def compare(name: str, unit: str, measure: Callable[[str], float], rounds: int) -> dict[str, object]:
    """ABBA rounds of `measure` on both paths; the median of the rounds' tunnel/plain ratios."""
    ratios = []
    legs: dict[str, list[float]] = {"tunnel": [], "plain": []}
    for round_index in range(rounds):
        order = ("tunnel", "plain", "plain", "tunnel") if round_index % 2 == 0 else (
            "plain", "tunnel", "tunnel", "plain"
        )  # fmt: skip
        this_round: dict[str, list[float]] = {"tunnel": [], "plain": []}
        for path in order:
            value = measure(path)
            this_round[path].append(value)
            legs[path].append(value)
            print(f"{name} {path}: {value:.3f} {unit}", flush=True)
        ratios.append(statistics.mean(this_round["tunnel"]) / statistics.mean(this_round["plain"]))
    ratio = statistics.median(ratios)
    print(
        f"{name}: tunnel {statistics.median(legs['tunnel']):.3f} {unit}, plain "
        f"{statistics.median(legs['plain']):.3f} {unit}, ratio {ratio:.2f} (target {TARGET_RATIO})",
        flush=True,
    )
    return {"unit": unit, "tunnel": legs["tunnel"], "plain": legs["plain"], "round_ratios": ratios,
            "ratio": ratio}  # fmt: skip


def endings(mesh: MeshLab, pod_index: int, port: int) -> dict[str, int]:
    """How node-a's access log says the L4 connections of a pod to b1:port ended."""
    source = mesh.a.pods[pod_index].ip
    counts: dict[str, int] = {}
    for record in mesh.daemons["node-a"].records():
        if (
            record.get("event") == "connection closed"
            and str(record.get("src", "")).startswith(f"{source}:")
            and record.get("dst") == f"{mesh.b.pods[1].ip}:{port}"
        ):
            ending = str(record["ending"])
            counts[ending] = counts.get(ending, 0) + 1
    return counts


def inbound_streams(mesh: MeshLab, pod_index: int, port: int) -> int:
    """Tunnel streams node-b allowed from a pod of node-a to b1:port."""
    source = mesh.a.pods[pod_index].ip
    return sum(
        1
        for record in mesh.daemons["node-b"].records()
        if record.get("event") == "tunnel stream"
        and record.get("authority") == f"{mesh.b.pods[1].ip}:{port}"
        and record.get("source_ip") == source
        and record.get("allowed") is True
    )


def check_paths(mesh: MeshLab) -> dict[str, object]:
    """Did each leg take the path it names? iperf3 resets some data connections at the end of a test,
    so endings vary; the path shows in the kind: every tunnelled L4 connection ends as tunnel_*, no
    relayed one does. The HTTP engine's connections leave no L4 record on node-a: node-b counts more
    streams from a0 to b1:8080 than node-a's L4 legs sent, and none from a2."""
    tunnel, plain = PATHS["tunnel"], PATHS["plain"]
    l4 = {path: endings(mesh, index, IPERF_PORT) for path, index in PATHS.items()}
    http_l4_tunnelled = sum(n for e, n in endings(mesh, tunnel, HTTP_PORT).items() if e.startswith("tunnel_"))
    http_streams = {
        "tunnel": inbound_streams(mesh, tunnel, HTTP_PORT),
        "plain": inbound_streams(mesh, plain, HTTP_PORT),
    }
    valid = (
        bool(l4["tunnel"])
        and bool(l4["plain"])
        and all(e.startswith("tunnel_") for e in l4["tunnel"])
        and not any(e.startswith("tunnel_") for e in l4["plain"])
        and http_streams["tunnel"] > http_l4_tunnelled
        and http_streams["plain"] == 0
    )
    return {
        "iperf3_endings": l4,
        "http_l4_tunnelled": http_l4_tunnelled,
        "http_streams_at_node_b": http_streams,
        "valid": valid,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per leg (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="daemon workers per node (default 1)")
    parser.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 60 or not 1 <= args.rounds <= 10 or not 1 <= args.threads <= 8:
        parser.error("duration 1..60, rounds 1..10, threads 1..8")
    results: dict[str, object] = {"duration": args.duration, "rounds": args.rounds, "threads": args.threads}
    with tempfile.TemporaryDirectory(prefix="np-mesh-bench-") as tmp:
        directory = Path(tmp)
        with running_mesh(
            directory, f"npb{secrets.token_hex(2)}", relay_threads=args.threads, backends=False
        ) as mesh:
            start_servers(mesh, directory)
            time.sleep(0.5)
            chosen = workloads(mesh, args.duration)
            only = [name for name in args.only.split(",") if name]
            unknown = set(only) - set(chosen)
            if unknown:
                parser.error(f"unknown workloads {sorted(unknown)}; known: {sorted(chosen)}")
            for name, (unit, measure) in chosen.items():
                if not only or name in only:
                    results[name] = compare(name, unit, measure, args.rounds)
            paths = check_paths(mesh)
    results.update(paths)
    valid = bool(paths["valid"])
    verdict = "paths as intended" if valid else "INVALID: a path did not take the route it names"
    print(f"paths: {json.dumps({k: v for k, v in paths.items() if k != 'valid'})}: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
