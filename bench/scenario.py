"""Scenario bench (issue 8): success rate and latency with one of three endpoints failing or slow, with and
without nodeproxy's resilience features.

    sudo python -m bench.scenario [--duration 3] [--rate 400] [--connections 8] [--keep-logs]

One lab (a client pod, three backend pods running `nodeproxy.lab_backend` on SCENARIO_PORT) and one
`nodeproxy run` serve four HTTP services, one per scenario and feature set, so no state (ejections,
latency estimates) carries from one measurement to the next:

- scenario "failing": be2 answers 503; scenario "slow": be2 answers 50 ms late (be0 and be1 healthy);
- without features (FEATURES_OFF): p2c, retries on connect failure only, no ejection, no deadline;
- with features (FEATURES_ON): peak-EWMA, retries on gateway errors and resets within the retry budget,
  outlier detection, a route timeout.

"Without" is nodeproxy before issue 8 (p2c, a connect failure tried on another endpoint); "with" is the
features of docs/resilience.md (FEATURES_ON). Each measurement is `h2load --h1` at a fixed rate over
keep-alive connections for --duration seconds (bounded: h2load runs under a timeout), with every
request's status and time from its log: success = 2xx / requests sent; p50/p99 over answered requests.
The lab (`npb<pid>s-*`) is torn down in a `finally`, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from types import FrameType
from typing import Any

if not __package__:  # `python bench/scenario.py`: import this checkout's packages like `python -m`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench.latency import percentile
from bench.paths import LAB_PREFIX, READY_TIMEOUT, BenchError, log_tail, spawn_logged, wait_for
from bench.workloads import H2LOAD, TIMEOUT_MARGIN, client_run
from nodeproxy.lab import Lab, stop_process
from nodeproxy.lab_backend import Behaviour
from nodeproxy.lab_resilience import HttpClient, ScenarioBackends, scenario_config, scenario_service

SCENARIO_PREFIX = f"{LAB_PREFIX}s"
DEFAULT_DURATION = 3
DEFAULT_RATE = 400.0
DEFAULT_CONNECTIONS = 8
SLOW_DELAY_MS = 50.0
BAD_BACKEND = 2  # be2 fails or is slow; be0 and be1 are healthy

# Without: what nodeproxy did before issue 8: least-request, a connect failure retried on another
# endpoint (relay.connect_attempts 3), no ejection, no deadline.
FEATURES_OFF: dict[str, Any] = {
    "balancer": "p2c",
    "resilience": {"outlier_detection": {"consecutive_5xx": 0, "consecutive_gateway_failures": 0}},
    "route_resilience": {"timeout": 0, "retries": {"max_retries": 2, "retry_on": ["connect-failure"]}},
}
# With: peak-EWMA; two retries on another endpoint for gateway errors (502/503/504), resets and connect
# failures within the default budget (20% + 10/s); ejection after 5 failures in a row (default 30 s).
FEATURES_ON: dict[str, Any] = {
    "balancer": "peak_ewma",
    "resilience": {"outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_failures": 5}},
    "route_resilience": {
        "timeout": "5s",
        "retries": {"max_retries": 2, "retry_on": ["gateway-error", "reset", "connect-failure"]},
    },
}


@dataclass(frozen=True)
class Case:
    scenario: str  # failing | slow
    features: str  # off | on
    vip: str

    @property
    def service(self) -> str:
        return f"{self.scenario}-{self.features}"


CASES = (
    Case("failing", "off", "10.96.0.60"),
    Case("failing", "on", "10.96.0.61"),
    Case("slow", "off", "10.96.0.62"),
    Case("slow", "on", "10.96.0.63"),
)
SCENARIOS = {
    "failing": ("1 of 3 endpoints answers 503", Behaviour(status=503)),
    "slow": (f"1 of 3 endpoints {SLOW_DELAY_MS:g} ms slower", Behaviour(delay_ms=SLOW_DELAY_MS)),
}


@dataclass
class Result:
    scenario: str
    features: str
    sent: int
    ok: int
    statuses: dict[str, int]
    p50_ms: float
    p99_ms: float
    bad_backend_attempts: int
    seconds: float

    @property
    def success(self) -> float:
        return self.ok / self.sent if self.sent else 0.0


def services(addresses: Sequence[str]) -> list[dict[str, object]]:
    found = []
    for case in CASES:
        features = FEATURES_ON if case.features == "on" else FEATURES_OFF
        found.append(
            scenario_service(
                case.service,
                case.vip,
                addresses,
                balancer=features["balancer"],
                resilience=features["resilience"],
                route_resilience=features["route_resilience"],
            )
        )
    return found


def parse_log(text: str) -> list[tuple[int, int]]:
    """(status, µs) of each request in an h2load --log-file (status -1: no response)."""
    rows = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            rows.append((int(fields[1]), int(fields[2])))
    return rows


def measure(
    ns: str, case: Case, backends: ScenarioBackends, duration: int, rate: float, connections: int
) -> Result:
    """h2load --h1 at `rate` over `connections` keep-alive connections for `duration` seconds."""
    fd, name = tempfile.mkstemp(prefix="npb-scenario-", suffix=".log")
    os.close(fd)
    log = pathlib.Path(name)
    argv = [H2LOAD, "--h1", f"-c{connections}", "-m1", f"-D{duration}", f"--rps={rate / connections:g}"]
    argv += [f"--log-file={log}", f"http://{case.vip}/"]
    began = time.monotonic()
    try:
        proc = client_run(ns, argv, duration)
        rows = parse_log(log.read_text())
    finally:
        with contextlib.suppress(OSError):
            log.unlink()
    seconds = time.monotonic() - began
    if not rows:
        raise BenchError(
            f"h2load logged no request ({proc.returncode}): {(proc.stderr or proc.stdout)[-500:]}"
        )
    answered = sorted(us for status, us in rows if status > 0)
    statuses: dict[str, int] = {}
    for status, _ in rows:
        key = str(status) if status > 0 else "no response"
        statuses[key] = statuses.get(key, 0) + 1
    return Result(
        case.scenario,
        case.features,
        sent=len(rows),
        ok=sum(1 for status, _ in rows if 200 <= status < 300),
        statuses=statuses,
        p50_ms=percentile(answered, 50) / 1000 if answered else float("nan"),
        p99_ms=percentile(answered, 99) / 1000 if answered else float("nan"),
        bad_backend_attempts=len(backends.requests(BAD_BACKEND, since=began)),
        seconds=round(seconds, 2),
    )


def render(results: Sequence[Result]) -> str:
    header = (
        f"{'scenario':<36}{'features':>9}{'sent':>8}{'success':>10}{'p50 ms':>9}{'p99 ms':>9}{'be2 hits':>10}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{SCENARIOS[r.scenario][0]:<36}{r.features:>9}{r.sent:>8}{r.success:>10.2%}"
            f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.bad_backend_attempts:>10}"
        )
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def run(args: argparse.Namespace, workdir: pathlib.Path) -> list[Result]:
    lab = Lab(prefix=SCENARIO_PREFIX, clients=1, backends=3)
    backends = ScenarioBackends(lab, workdir / "backends")
    proc = None
    try:
        lab.up()
        backends.start()
        config = workdir / "nodeproxy.yaml"
        ready = workdir / "nodeproxy.ready"
        daemon_log = workdir / "nodeproxy.log"
        config.write_text(scenario_config(services(backends.addresses), threads=args.threads))
        proc = spawn_logged(
            lab,
            lab.node_ns,
            [
                *(sys.executable, "-m", "nodeproxy", "run", "--config", str(config)),
                *("--ready-file", str(ready), "--log-level", "warning", "--no-access-log"),
            ],
            daemon_log,
        )
        wait_for(ready.exists, "nodeproxy run", READY_TIMEOUT, proc, daemon_log)
        ns = lab.client_pods[0].ns
        for case in CASES:  # every service answers before anything is measured
            with HttpClient(ns, case.vip) as client:
                status = client.request().status
            if status != 200:
                raise BenchError(f"{case.service} ({case.vip}) answers {status} with healthy backends")
        results = []
        for scenario, (label, behaviour) in SCENARIOS.items():
            backends.set_all()
            backends.set(BAD_BACKEND, behaviour)
            for case in (c for c in CASES if c.scenario == scenario):
                print(f"[scenario] {label}, features {case.features} ...", file=sys.stderr, flush=True)
                results.append(measure(ns, case, backends, args.duration, args.rate, args.connections))
                if proc.poll() is not None:
                    raise BenchError(f"nodeproxy exited with {proc.returncode}:\n{log_tail(daemon_log)}")
        return results
    finally:
        with signals_deferred():
            if proc is not None:
                stop_process(proc, timeout=15)
            backends.close()
            lab.down()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scenario", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=int, default=DEFAULT_DURATION, help="seconds per measurement (1..30)"
    )
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE, help="requests per second in all")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS, help="keep-alive connections")
    parser.add_argument("--threads", type=int, default=1, help="nodeproxy relay.threads (workers; default 1)")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    parser.add_argument("--keep-logs", action="store_true", help="keep the config and logs (path printed)")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 30 or not 1 <= args.rate <= 5000 or not 1 <= args.connections <= 64:
        parser.error("--duration 1..30, --rate 1..5000, --connections 1..64")
    if not 1 <= args.threads <= 8:
        parser.error("--threads 1..8")
    if os.geteuid() != 0:
        print("bench.scenario needs root: it creates network namespaces and iptables rules", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="npb-scenario-"))
    bound = len(CASES) * (args.duration + TIMEOUT_MARGIN) + 60
    print(
        f"[scenario] lab {SCENARIO_PREFIX}-*, {args.duration} s per case (at most {bound:g} s)",
        file=sys.stderr,
    )
    try:
        results = run(args, workdir)
    except KeyboardInterrupt:
        print("[scenario] interrupted; lab torn down", file=sys.stderr)
        return 130
    except BenchError as err:
        print(f"[scenario] FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        if args.keep_logs:
            print(f"[scenario] config and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"h2load --h1 -c{args.connections} at {args.rate:g} req/s for {args.duration} s per row; "
        "success = 2xx / sent; p50/p99 over answered requests; be2 hits = attempts the bad endpoint saw"
    )
    print(render(results))
    if args.json is not None:
        args.json.write_text(
            json.dumps([{**asdict(r), "success": r.success} for r in results], indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
