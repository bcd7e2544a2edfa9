"""nodeproxy's L7 HTTP/1.1 rate and CPU with metrics on and off (issue 9 wants on within 5% of off).

    python3 -m bench.metrics_overhead [--duration 4] [--rounds 2]

Builds the bench lab (bench.paths: one client pod, nginx in one backend pod), then runs the daemon with
`metrics.enabled: false` and `true` alternately (off, on, on, off, ... `rounds` pairs), each time with
`wrk -t2 -c32` keep-alive against the web-h1 VIP (HTTP/1.1 through the HTTP engine) for `duration`
seconds, and prints each leg's requests/s and the daemon's CPU per 1,000 requests (utime + stime of the
supervisor and its workers, from /proc), then the medians and the ratios on / off. The daemon runs as
bench.run runs it (--log-level warning, --no-access-log), so the difference is the metrics alone.
Everything stays inside the lab's namespaces and is torn down at the end.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile

from bench.cpu import sample
from bench.paths import (
    NODEPROXY_PORT,
    client_pod,
    new_lab,
    service_config,
    spawn_logged,
    start_servers,
    wait_for,
    with_l7_services,
)
from bench.workloads import wrk
from nodeproxy.lab import Lab, stop_process

READY_TIMEOUT = 30.0
WEB_H1 = "http://10.96.0.20:80/"  # bench.paths.L7_SERVICES' web-h1


def run_leg(
    lab: Lab, lab_dir: pathlib.Path, config_text: str, enabled: bool, duration: int
) -> tuple[float, float]:
    """(requests/s, CPU seconds per request) of one daemon run."""
    config = lab_dir / f"nodeproxy-{'on' if enabled else 'off'}.yaml"
    config.write_text(config_text + f"metrics:\n  enabled: {'true' if enabled else 'false'}\n")
    ready = lab_dir / "nodeproxy.ready"
    ready.unlink(missing_ok=True)
    log = lab_dir / "nodeproxy.log"
    argv = [sys.executable, "-m", "nodeproxy", "run", "--config", str(config), "--ready-file", str(ready)]
    proc = spawn_logged(lab, lab.node_ns, [*argv, "--log-level", "warning", "--no-access-log"], log)
    try:
        wait_for(ready.exists, "nodeproxy run", READY_TIMEOUT, proc, log)
        wrk(client_pod(lab).ns, WEB_H1, 1, close=False)  # warm up: pools, caches, metric series
        before = sample([proc.pid])
        measured = wrk(client_pod(lab).ns, WEB_H1, duration, close=False)
        after = sample([proc.pid])
    finally:
        stop_process(proc, timeout=15)
    rps = measured.values["wrk_keepalive_rps"]
    assert rps is not None, measured.raw
    requests = measured.work["requests"]
    return rps, (after.seconds - before.seconds) / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=4, help="seconds of wrk per leg (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs (default 2)")
    args = parser.parse_args()
    lab = new_lab()
    with tempfile.TemporaryDirectory(prefix="np-metrics-ab-") as tmp:
        workdir = pathlib.Path(tmp)
        try:
            lab.up()
            start_servers(lab, workdir)
            config_text = with_l7_services(service_config(lab, NODEPROXY_PORT), lab, declare_protocol=True)
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            # off, on, on, off, ...: drift of the machine weighs on both alike.
            order = [enabled for i in range(args.rounds) for enabled in ((False, True), (True, False))[i % 2]]
            for enabled in order:
                rps, cpu = run_leg(lab, workdir, config_text, enabled, args.duration)
                results[enabled].append((rps, cpu))
                state = "on " if enabled else "off"
                print(f"metrics {state}: {rps:10.0f} req/s  {cpu * 1e6:7.2f} CPU-ms per 1k requests")
        except subprocess.SubprocessError as err:
            raise SystemExit(f"bench failed: {err}") from err
        finally:
            lab.down()
    off_rps = statistics.median(r for r, _ in results[False])
    on_rps = statistics.median(r for r, _ in results[True])
    off_cpu = statistics.median(c for _, c in results[False])
    on_cpu = statistics.median(c for _, c in results[True])
    print(f"median off: {off_rps:.0f} req/s, {off_cpu * 1e6:.2f} CPU-ms/1k requests")
    print(f"median on:  {on_rps:.0f} req/s, {on_cpu * 1e6:.2f} CPU-ms/1k requests")
    print(f"on/off: rate {on_rps / off_rps:.3f}, CPU per request {on_cpu / off_cpu:.3f}")


if __name__ == "__main__":
    main()
