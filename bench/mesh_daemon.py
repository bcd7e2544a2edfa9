"""Cross-node throughput through the daemon (`nodeproxy run` on both nodes): mTLS tunnel vs plain, in one run.

    python3 -m bench.mesh_daemon [--duration SECONDS] [--rounds N] [--threads N] [--json PATH]

One mesh lab (nodeproxy.lab_mesh): a CA service and the daemon on both nodes, iperf3 -s in pod b1 on
node-b (namespace lab: PERMISSIVE). Two clients on node-a, both captured by node-a's daemon:

- tunnel: pod a0 has an identity, so its connections travel as HTTP/2 CONNECT streams over mTLS to
  node-b's 15008; node-b's daemon verifies, authorizes and connects to b1 from a0's address.
- plain: pod a2 has none; b1 accepts plaintext, so node-a's splice relay connects to b1 from a2's
  address, and node-b's inbound capture takes it to 15006, where its relay connects to b1 (policy
  checked, no principal). Both paths are proxied on both nodes.

iperf3 with 1 and 4 streams per path, legs in ABBA order per round; the ratio tunnel/plain is the median
of each round's ratio. Afterwards node-a's access log must show a0's connections as tunnel streams and
a2's as relayed ones, or the run is reported invalid (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.workloads import iperf3
from nodeproxy.lab import wait_listening
from nodeproxy.lab_mesh import MeshLab, running_mesh

IPERF_PORT = 5201
PATHS = {"tunnel": 0, "plain": 2}  # path -> index of the client pod on node-a


def leg(mesh: MeshLab, path: str, streams: int, duration: int) -> float:
    client = mesh.a.pods[PATHS[path]]
    server = mesh.b.pods[1]
    return iperf3(client.ns, (server.ip, IPERF_PORT), duration, streams).values[f"iperf3_{streams}_gbps"]


def endings(mesh: MeshLab, pod_index: int) -> dict[str, int]:
    """How node-a's access log says the connections of a pod to the iperf3 server ended."""
    source = mesh.a.pods[pod_index].ip
    counts: dict[str, int] = {}
    for record in mesh.daemons["node-a"].records():
        if (
            record.get("event") == "connection closed"
            and str(record.get("src", "")).startswith(f"{source}:")
            and record.get("dst") == f"{mesh.b.pods[1].ip}:{IPERF_PORT}"
        ):
            ending = str(record["ending"])
            counts[ending] = counts.get(ending, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per leg (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="daemon workers per node (default 1)")
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
            server = mesh.b.pods[1]
            with (directory / "iperf3.log").open("wb") as log:
                mesh.lab.spawn(server.ns, ["iperf3", "-s", "-p", str(IPERF_PORT)], stdout=log, stderr=log)
            wait_listening(mesh.b.ns, server.ip, IPERF_PORT, 15)
            time.sleep(0.5)
            for streams in (1, 4):
                ratios = []
                legs: dict[str, list[float]] = {"tunnel": [], "plain": []}
                for round_index in range(args.rounds):
                    order = ("tunnel", "plain", "plain", "tunnel") if round_index % 2 == 0 else (
                        "plain", "tunnel", "tunnel", "plain"
                    )  # fmt: skip
                    this_round: dict[str, list[float]] = {"tunnel": [], "plain": []}
                    for path in order:
                        gbps = leg(mesh, path, streams, args.duration)
                        this_round[path].append(gbps)
                        legs[path].append(gbps)
                        print(f"iperf3 -P{streams} {path}: {gbps:.3f} Gbit/s", flush=True)
                    ratios.append(
                        statistics.mean(this_round["tunnel"]) / statistics.mean(this_round["plain"])
                    )
                ratio = statistics.median(ratios)
                results[f"iperf3_{streams}"] = {
                    "tunnel_gbps": legs["tunnel"],
                    "plain_gbps": legs["plain"],
                    "round_ratios": ratios,
                    "ratio": ratio,
                }
                print(
                    f"iperf3 -P{streams}: tunnel {statistics.median(legs['tunnel']):.3f} Gbit/s, plain "
                    f"{statistics.median(legs['plain']):.3f} Gbit/s, ratio {ratio:.2f}",
                    flush=True,
                )
            tunnel_endings, plain_endings = endings(mesh, PATHS["tunnel"]), endings(mesh, PATHS["plain"])
    # iperf3 resets some data connections at the end of a test, so endings vary; the path shows in
    # the kind: every tunnelled connection ends as tunnel_*, no relayed one does.
    valid = (
        bool(tunnel_endings)
        and bool(plain_endings)
        and all(e.startswith("tunnel_") for e in tunnel_endings)
        and not any(e.startswith("tunnel_") for e in plain_endings)
    )
    results.update(tunnel_endings=tunnel_endings, plain_endings=plain_endings, valid=valid)
    verdict = "paths as intended" if valid else "INVALID: a path did not take the route it names"
    print(f"node-a access log: tunnel path {tunnel_endings}, plain path {plain_endings}: {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if valid else 1


if __name__ == "__main__":
    sys.exit(main())
