"""Run the same workloads direct, through nodeproxy and through HAProxy; print ratios, save JSON.

    python -m bench.run [--duration 5] [--quick] [--only direct,nodeproxy,haproxy] [--workloads l4,l7]
                        [--nodeproxy-l7 auto|on|off] [--relay-threads N] [--rounds 1] [--keep-logs]

Needs root (it builds network namespaces). Each path gets a fresh `npb<pid>-*` lab that is torn down in a
`finally`, also on errors and Ctrl-C/SIGTERM; see bench/README.md for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from types import FrameType

if not __package__:  # `python bench/run.py`: import this checkout's packages like `python -m bench.run`
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import cpu, haproxy, resilience_overhead
from bench.paths import (
    L7_MODES,
    LAB_PREFIX,
    REPO_ROOT,
    BenchError,
    DirectPath,
    HAProxyPath,
    NodeProxyPath,
    Targets,
    TrafficPath,
    client_pod,
    leftover_capture,
    new_lab,
    probe,
    start_servers,
)
from bench.workloads import (
    CONNECTION_RATE,
    GROUPS,
    H2LOAD_CONNECTIONS,
    H2LOAD_STREAMS,
    H2LOAD_THREADS,
    LATENCY_CONNECTIONS,
    LATENCY_RATE,
    METRICS,
    REQUEST_RATE,
    REQUEST_RATE_CONNECTIONS,
    WORKLOADS,
    WRK_CONNECTIONS,
    WRK_THREADS,
    Better,
    Measurement,
    Metric,
    Workload,
    tcp_counters,
)
from nodeproxy import netns
from nodeproxy.lab import Lab

PATH_NAMES = ("direct", "nodeproxy", "haproxy")
Values = dict[str, dict[str, float]]  # path -> metric key -> number
Unavailable = dict[str, dict[str, str]]  # path -> metric key -> why the path cannot measure it
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DEFAULT_DURATION = 5
QUICK_DURATION = 1
PAUSE_BETWEEN_WORKLOADS = 0.5
# The ratios in the table: nodeproxy over each baseline.
RATIOS = (("nodeproxy", "direct"), ("nodeproxy", "haproxy"))


@dataclass(frozen=True)
class Goal:
    """nodeproxy's value against a baseline's: a ratio of at least / at most `bound`, or (for latencies)
    at most `bound` microseconds more."""

    metric: str
    baseline: str
    bound: float
    kind: str = "min_ratio"  # min_ratio | max_ratio | max_excess_us

    def describe(self) -> str:
        if self.kind == "min_ratio":
            return f">= {self.bound:g}x"
        if self.kind == "max_ratio":
            return f"<= {self.bound:g}x"
        return f"<= +{self.bound:g} us"


GOALS = (
    Goal("iperf3_1_gbps", "direct", 0.85),
    Goal("iperf3_4_gbps", "direct", 0.85),
    Goal("iperf3_1_gbps", "haproxy", 1.3),
    Goal("iperf3_4_gbps", "haproxy", 1.3),
    Goal("wrk_keepalive_rps", "haproxy", 1.1),
    Goal("wrk_close_cps", "haproxy", 1.2),  # issue 6
    # issue 7
    Goal("h1_rps", "haproxy", 1.0),
    Goal("cpu_h1_requests", "haproxy", 1.0, "max_ratio"),
    Goal("h2_rps", "haproxy", 0.7),
    Goal("h1_latency_p99_us", "haproxy", 200.0, "max_excess_us"),
)


@dataclass
class PathResult:
    """One path measured once, in a lab of its own."""

    name: str
    round: int = 1
    status: str = "not run"  # ok | partial (some workload failed) | failed
    error: str | None = None
    seconds: float = 0.0
    info: dict[str, object] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    not_available: dict[str, str] = field(default_factory=dict)  # metric key -> why
    workloads: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- signals -----------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up, so a second Ctrl-C cannot cut a teardown short."""
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# -- one path ----------------------------------------------------------------------------------------


def make_path(name: str, lab: Lab, workdir: pathlib.Path, args: argparse.Namespace) -> TrafficPath:
    if name == "nodeproxy":
        return NodeProxyPath(
            lab, workdir, args.relay_threads, l7=args.nodeproxy_l7 if "l7" in args.groups else "off"
        )
    if name == "haproxy":
        return HAProxyPath(lab, workdir, l7="l7" in args.groups)
    return DirectPath(lab, workdir)


def proxy_cpu_report(seconds: float, processes: int, measurement: Measurement) -> dict[str, object]:
    """The proxy's CPU seconds during a workload, also per unit of every kind of work it did."""
    return {
        "seconds": round(seconds, 3),
        "processes": processes,
        # The kernel truncates each process's time to a clock tick, so the difference of two samples is
        # off by less than one tick per process.
        "resolution_s": processes / cpu.CLOCK_TICKS,
        # CPU seconds per GB / per connection / per request: whatever work the workload counted.
        "seconds_per_unit": {
            unit: float(f"{value:.4g}")
            for unit, amount in measurement.work.items()
            if (value := cpu.cost(seconds, amount, 1.0)) is not None
        },
    }


def run_workload(
    label: str,
    workload: Workload,
    ns: str,
    targets: Targets,
    duration: int,
    result: PathResult,
    cpu_roots: Sequence[int] = (),
) -> None:
    """Run one workload; its numbers go into result.values, its report (or error) into result.workloads.

    With cpu_roots (the proxy's processes), the proxy's CPU time during the workload is recorded too,
    and the workload's cost metric computed from it.
    """
    if targets.get(workload.target) is None:
        reason = targets.why_unavailable(workload.target)
        result.not_available.update(dict.fromkeys((m.key for m in workload.all_metrics), reason))
        result.workloads[workload.name] = {"not_available": reason}
        progress(f"[{label}] {workload.name}: not available ({reason})")
        return
    began = time.monotonic()
    before = tcp_counters(ns)
    cpu_before = cpu.sample(cpu_roots) if cpu_roots else None
    try:
        measurement = workload.run(ns, targets, duration)
    except BenchError as err:
        progress(f"[{label}] {workload.name}: FAILED: {err}")
        result.workloads[workload.name] = {"error": str(err)}
        return
    cpu_after = cpu.sample(cpu_roots) if cpu_roots else None
    after = tcp_counters(ns)
    client_tcp = {key: after[key] - before.get(key, 0) for key in after}
    result.values.update(measurement.values)
    report: dict[str, object] = {**measurement.raw, "work": measurement.work, "client_tcp": client_tcp}
    if cpu_before is not None and cpu_after is not None:
        # Never negative, even if a process of the tree was lost (see bench/cpu.py).
        seconds = max(0.0, cpu_after.seconds - cpu_before.seconds)
        report["proxy_cpu"] = proxy_cpu_report(seconds, cpu_after.processes, measurement)
        if cpu_after.processes == 0:
            result.warnings.append(f"{workload.name}: the proxy's processes were gone when its CPU was read")
        elif workload.cost is not None:
            cost = workload.cost
            value = cpu.cost(seconds, measurement.work.get(cost.work, 0.0), cost.per)
            if value is not None:
                result.values[cost.metric.key] = value
    elif workload.cost is not None:
        result.not_available[workload.cost.metric.key] = "no proxy on this path"
    result.workloads[workload.name] = report
    result.warnings += [f"{workload.name}: {w}" for w in measurement.warnings]
    if syn_retransmits := client_tcp.get("TcpExt:TCPSynRetrans"):
        result.warnings.append(
            f"{workload.name}: {syn_retransmits} SYN retransmits in the client pod "
            "(each stalls a connect for at least 1 s)"
        )
    shown = ", ".join(
        f"{metric.label.strip()} {format_value(metric, result.values[metric.key])}"
        for metric in workload.all_metrics
        if metric.key in result.values
    )
    progress(f"[{label}] {workload.name}: {shown or 'done'}  ({time.monotonic() - began:.1f} s)")


def measure_path(name: str, round_: int, args: argparse.Namespace, workdir: pathlib.Path) -> PathResult:
    """Build a lab, bring the path up, run every workload on it, tear everything down (always)."""
    result = PathResult(name, round_)
    label = name if args.rounds == 1 else f"{name} #{round_}"
    progress(f"[{label}] setting up")
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    lab = new_lab()
    try:
        lab.up()
        result.info["servers"] = start_servers(lab, workdir)
        path = make_path(name, lab, workdir, args)
        # Issue 8: nodeproxy's L7 HTTP/1.1 bench with its resilience features on and off, same daemon.
        resilience_problem = (
            resilience_overhead.add_services(path)
            if isinstance(path, NodeProxyPath)
            else resilience_overhead.NODEPROXY_ONLY
        )
        try:
            path.setup()
            targets = path.targets()
            result.info["targets"] = asdict(targets)
            pod = client_pod(lab)
            seen = probe(lab, targets)
            result.info["backend_saw_client"] = seen
            if seen != pod.ip:
                result.warnings.append(f"not transparent: nginx saw {seen}, the client pod is {pod.ip}")
            for workload in workloads_with_resilience(resilience_overhead.workload(path.cpu_roots)):
                if workload.group not in args.groups:
                    continue
                if workload.name == resilience_overhead.WORKLOAD_NAME and resilience_problem is not None:
                    result.not_available.update(
                        dict.fromkeys((m.key for m in workload.metrics), resilience_problem)
                    )
                    continue
                run_workload(label, workload, pod.ns, targets, args.duration, result, path.cpu_roots())
                path.check()
                time.sleep(PAUSE_BETWEEN_WORKLOADS)
        finally:
            with signals_deferred():
                result.warnings += path.teardown()
                result.info.update(path.info())
                if leftovers := leftover_capture(lab):
                    result.warnings.append(f"capture rules left after teardown: {leftovers}")
    except Exception as err:  # one broken path must not cost the other paths their numbers
        result.error = str(err) if isinstance(err, BenchError) else traceback.format_exc(limit=6)
        progress(f"[{label}] FAILED: {result.error}")
    finally:
        with signals_deferred():
            lab.down()
        result.seconds = round(time.monotonic() - started, 1)
    result.status = path_status(result)
    return result


def workloads_with_resilience(pair: Workload) -> tuple[Workload, ...]:
    """WORKLOADS with the resilience on/off `pair` right after the L7 HTTP/1.1 wrk workload it compares
    with (so both run close together in time)."""
    names = [w.name for w in WORKLOADS]
    at = names.index("http/1.1 keep-alive") + 1 if "http/1.1 keep-alive" in names else len(names)
    return (*WORKLOADS[:at], pair, *WORKLOADS[at:])


def metrics_with_resilience(metrics: Sequence[Metric]) -> tuple[Metric, ...]:
    """`metrics` with the resilience pair's after the L7 HTTP/1.1 wrk row, when that row is there."""
    keys = [m.key for m in metrics]
    if "h1_rps" not in keys:
        return tuple(metrics)
    at = keys.index("h1_rps") + 1
    return (*metrics[:at], *resilience_overhead.METRICS, *metrics[at:])


def path_status(result: PathResult) -> str:
    """failed: set-up failed or nothing was measured; partial: some workload failed; ok otherwise.

    A workload the path cannot run ("not available") is no failure: a path whose every selected
    workload is not available is ok.
    """
    if result.error is not None or not (result.values or result.not_available):
        return "failed"
    if any(isinstance(raw, dict) and "error" in raw for raw in result.workloads.values()):
        return "partial"
    return "ok"


# -- results -----------------------------------------------------------------------------------------


def format_value(metric: Metric, value: float | None, missing: str = "-") -> str:
    if value is None:
        return missing
    if metric.unit == "Gb/s":
        return f"{value:.2f}"
    if metric.unit.startswith("CPU-s"):
        return f"{value:.3f}"
    if metric.unit == "us":
        return f"{value:.0f}"
    return f"{value:,.0f}"


def summarize(runs: dict[str, list[PathResult]], metrics: Sequence[Metric] = METRICS) -> Values:
    """Per path, the median of each metric over the rounds that produced it."""
    return {
        name: {
            m.key: statistics.median(samples)
            for m in metrics
            if (samples := [r.values[m.key] for r in results if m.key in r.values])
        }
        for name, results in runs.items()
    }


def unavailable(runs: dict[str, list[PathResult]]) -> Unavailable:
    """Per path, the metrics it could not measure and why (from the first round that said so)."""
    found: Unavailable = {}
    for name, results in runs.items():
        for result in results:
            for key, reason in result.not_available.items():
                found.setdefault(name, {}).setdefault(key, reason)
    return found


def ratio(values: Values, metric: Metric, top: str, bottom: str) -> float | None:
    a = values.get(top, {}).get(metric.key)
    b = values.get(bottom, {}).get(metric.key)
    return round(a / b, 3) if a is not None and b else None


def selected_metrics(groups: Sequence[str]) -> tuple[Metric, ...]:
    """The metrics of the workloads in `groups`, in table order."""
    return tuple(m for w in WORKLOADS if w.group in groups for m in w.all_metrics)


def metrics_table(
    runs: dict[str, list[PathResult]],
    values: Values,
    missing: Unavailable,
    metrics: Sequence[Metric] = METRICS,
) -> list[dict[str, object]]:
    return [
        {
            **asdict(metric),
            "values": {name: values[name].get(metric.key) for name in runs},
            "samples": {name: [r.values.get(metric.key) for r in results] for name, results in runs.items()},
            "not_available": {
                name: reason for name in runs if (reason := missing.get(name, {}).get(metric.key))
            },
            "ratios": {f"{top}/{bottom}": ratio(values, metric, top, bottom) for top, bottom in RATIOS},
        }
        for metric in metrics
    ]


def goals_report(values: Values, metrics: Sequence[Metric] = METRICS) -> list[dict[str, object]]:
    """Every goal on one of `metrics`: what was measured and whether it was met (None: no number)."""
    by_key = {m.key: m for m in metrics}
    report: list[dict[str, object]] = []
    for goal in GOALS:
        if goal.metric not in by_key:
            continue
        metric = by_key[goal.metric]
        measured: float | None
        if goal.kind == "max_excess_us":
            ours = values.get("nodeproxy", {}).get(metric.key)
            theirs = values.get(goal.baseline, {}).get(metric.key)
            measured = None if ours is None or theirs is None else round(ours - theirs, 1)
            met = None if measured is None else measured <= goal.bound
        else:
            measured = ratio(values, metric, "nodeproxy", goal.baseline)
            if measured is None:
                met = None
            else:
                met = measured >= goal.bound if goal.kind == "min_ratio" else measured <= goal.bound
        report.append(
            {
                **asdict(goal),
                "label": metric.label.strip(),
                "wanted": goal.describe(),
                "measured": measured,
                "met": met,
            }
        )
    return report


LABEL_WIDTH = 46


def render_table(
    values: Values, missing: Unavailable | None = None, metrics: Sequence[Metric] = METRICS
) -> str:
    missing = missing or {}
    header = f"{'workload':<{LABEL_WIDTH}}" + "".join(f"{n:>12}" for n in PATH_NAMES)
    header += "".join(f"{'np/' + b:>12}" for _, b in RATIOS) + "  better"
    lines = [header, "-" * len(header)]
    for metric in metrics:
        # "-": path not run; "n/a": the path cannot measure it; "error": run, but no number.
        cells = [
            "-"
            if name not in values
            else format_value(
                metric,
                values[name].get(metric.key),
                "n/a" if metric.key in missing.get(name, {}) else "error",
            )
            for name in PATH_NAMES
        ]
        ratios = [ratio(values, metric, top, bottom) for top, bottom in RATIOS]
        line = f"{metric.label:<{LABEL_WIDTH}}" + "".join(f"{c:>12}" for c in cells)
        line += "".join(f"{'-' if v is None else f'{v:.2f}':>12}" for v in ratios)
        line += f"  {metric.better}" + (" (np/x < 1 is better)" if metric.better is Better.LOWER else "")
        lines.append(line)
    return "\n".join(lines)


def render_unavailable(missing: Unavailable) -> str:
    """One line per path and reason: which rows show n/a and why."""
    lines: list[str] = []
    for name, reasons in missing.items():
        by_reason: dict[str, list[str]] = {}
        for key, reason in reasons.items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"  {name}: n/a for {', '.join(keys)}: {reason}")
    return "not available:\n" + "\n".join(lines) if lines else ""


def render_goals(goals: list[dict[str, object]]) -> str:
    lines = ["targets (nodeproxy against a baseline, measured side by side in this run):"]
    for g in goals:
        measured = g["measured"]
        verdict = "n/a" if g["met"] is None else ("met" if g["met"] else "MISSED")
        if not isinstance(measured, float):
            shown = "-"
        elif g["kind"] == "max_excess_us":
            shown = f"{measured:+.0f} us"
        else:
            shown = f"{measured:.2f}x"
        lines.append(f"  {g['label']:<44} vs {g['baseline']:<8} {g['wanted']:<11} got {shown:<9} {verdict}")
    return "\n".join(lines)


def command_output(argv: Sequence[str]) -> str:
    """First line a version command prints (on stdout or stderr)."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"unavailable: {err}"
    text = (proc.stdout.strip() or proc.stderr.strip()).splitlines()
    return text[0] if text else ""


def machine_info() -> dict[str, object]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    dirty = command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"])
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": haproxy.version(),
        "nginx": command_output(["nginx", "-v"]),
        "iperf3": command_output(["iperf3", "--version"]),
        "wrk": command_output(["wrk", "-v"]),
        "h2load": command_output(["h2load", "--version"]),
        "nodeproxy_rev": command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"]),
        "nodeproxy_tree_dirty": bool(dirty),
        "loadavg_at_start": os.getloadavg(),
    }


def save(report: dict[str, object], directory: pathlib.Path) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(report, indent=2, default=str) + "\n"
    out = directory / f"{stamp}.json"
    out.write_text(text)
    (directory / "latest.json").write_text(text)
    return out


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Run iperf3, wrk, h2load and fixed-rate clients direct, through nodeproxy and through "
        "HAProxy on one namespace lab; print nodeproxy's ratios and each proxy's own CPU per unit of work "
        "(from /proc), and save JSON.",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=DEFAULT_DURATION,
        help=f"seconds per workload (default {DEFAULT_DURATION})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_DURATION} s per workload, for smoke tests (overrides --duration)",
    )
    parser.add_argument(
        "--only",
        default=",".join(PATH_NAMES),
        help="comma-separated paths to run (default: direct,nodeproxy,haproxy)",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(GROUPS),
        help="comma-separated workload groups: l4 (iperf3, wrk, latency, new connections) and l7 "
        "(HTTP/1.1 and HTTP/2); default: l4,l7",
    )
    parser.add_argument(
        "--nodeproxy-l7",
        choices=L7_MODES,
        default="auto",
        help="nodeproxy's L7 path for the L7 workloads: auto (default: give it the L7 services with "
        "`protocol`, report n/a unless it really proxies HTTP), on (measure even then), off (L4 only)",
    )
    parser.add_argument(
        "--relay-threads",
        type=int,
        default=None,
        help="nodeproxy relay.threads (default: the daemon's own default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every path this many times, alternating the order; the table shows medians",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the configs and logs of nginx, iperf3, nodeproxy and HAProxy (path printed at the end)",
    )
    parser.add_argument("--results-dir", type=pathlib.Path, default=RESULTS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.paths = [p.strip() for p in args.only.split(",") if p.strip()]
    if (unknown := [p for p in args.paths if p not in PATH_NAMES]) or not args.paths:
        parser.error(f"--only takes a comma-separated subset of {','.join(PATH_NAMES)} (got {unknown})")
    args.groups = [g.strip() for g in args.workloads.split(",") if g.strip()]
    if (unknown := [g for g in args.groups if g not in GROUPS]) or not args.groups:
        parser.error(f"--workloads takes a comma-separated subset of {','.join(GROUPS)} (got {unknown})")
    if args.quick:
        args.duration = QUICK_DURATION
    if args.duration < 1 or args.duration > 60:
        parser.error("--duration must be 1..60 seconds")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be 1..10")
    if args.relay_threads is not None and not 0 <= args.relay_threads <= 64:
        parser.error("--relay-threads must be 0..64")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.run needs root: it creates network namespaces and iptables rules", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.monotonic()
    machine = machine_info()
    runs: dict[str, list[PathResult]] = {name: [] for name in PATH_NAMES if name in args.paths}
    progress(
        f"bench: {', '.join(runs)}; {args.duration} s per workload; {args.rounds} round(s); "
        f"lab {LAB_PREFIX}-*"
    )
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="npb-bench-"))
    try:
        for round_ in range(1, args.rounds + 1):
            # Alternate the order so slow drift of the machine does not always favour the same path.
            for name in list(runs) if round_ % 2 else list(runs)[::-1]:
                runs[name].append(measure_path(name, round_, args, workdir / f"{name}-{round_}"))
    except KeyboardInterrupt:
        progress("bench: interrupted; labs torn down, nothing saved")
        return 130
    finally:
        if args.keep_logs:
            progress(f"bench: configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    left = [ns for ns in netns.list_names() if ns.startswith(f"{LAB_PREFIX}-")]
    results = [r for results in runs.values() for r in results]
    warnings = [f"{r.name} #{r.round}: {w}" for r in results for w in r.warnings]
    if left:
        warnings.append(f"namespaces left behind: {left}")
    values = summarize(runs, metrics_with_resilience(METRICS))
    missing = unavailable(runs)
    shown_metrics = metrics_with_resilience(selected_metrics(args.groups))
    goals = goals_report(values, shown_metrics)
    report: dict[str, object] = {
        "schema": 2,
        "started_utc": started.isoformat(timespec="seconds"),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "argv": sys.argv,
        "options": {
            "paths": list(runs),
            "workload_groups": args.groups,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "relay_threads": args.relay_threads,
            "nodeproxy_l7": args.nodeproxy_l7,
            "wrk": {"threads": WRK_THREADS, "connections": WRK_CONNECTIONS},
            "latency": {"rate": LATENCY_RATE, "connections": LATENCY_CONNECTIONS},
            "new_connections": {"rate": CONNECTION_RATE},
            "h2load": {
                "threads": H2LOAD_THREADS,
                "connections": H2LOAD_CONNECTIONS,
                "streams": H2LOAD_STREAMS,
            },
            "fixed_request_rate": {"rate": REQUEST_RATE, "connections": REQUEST_RATE_CONNECTIONS},
            "cpu": "utime+stime(+cutime+cstime) of the proxy's process tree, /proc/<pid>/stat",
        },
        "machine": {**machine, "loadavg_at_end": os.getloadavg()},
        "metrics": metrics_table(runs, values, missing, shown_metrics),
        "goals": goals,
        "resilience_overhead": resilience_overhead.report([r.values for r in runs.get("nodeproxy", [])]),
        "paths": {name: [asdict(r) for r in results] for name, results in runs.items()},
        "warnings": warnings,
        "ok": all(r.status == "ok" for r in results) and not left,
    }
    out = save(report, args.results_dir)
    if args.rounds > 1:
        print(f"medians of {args.rounds} rounds (every sample is in the JSON)")
    print(render_table(values, missing, shown_metrics))
    if notes := render_unavailable(missing):
        print("\n" + notes)
    print()
    print(render_goals(goals))
    if "l7" in args.groups and "nodeproxy" in runs:
        print(resilience_overhead.render([r.values for r in runs["nodeproxy"]]))
    for r in results:
        if r.status != "ok":
            print(f"\n{r.name} #{r.round}: {r.status}" + (f": {r.error}" if r.error else ""))
    if warnings:
        print("\nwarnings:\n" + "\n".join(f"  {w}" for w in warnings))
    shown = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
    print(f"\nresults: {shown} ({report['elapsed_s']} s)")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
