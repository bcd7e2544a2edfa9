"""The workloads: each runs a client inside the client pod for a bounded time and returns numbers.

Every client is started with `ip netns exec <pod>` and a subprocess timeout of its duration plus a
margin, so no run can outlive its budget.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bench.paths import REPO_ROOT, BenchError, Targets, python_env
from nodeproxy import netns

LATENCY_CLIENT = pathlib.Path(__file__).resolve().with_name("latency.py")
TIMEOUT_MARGIN = 20.0
WRK_THREADS = 2
WRK_CONNECTIONS = 32
LATENCY_RATE = 1000.0
LATENCY_CONNECTIONS = 8


class Better(StrEnum):
    HIGHER = "higher"
    LOWER = "lower"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    better: Better


@dataclass
class Measurement:
    values: dict[str, float]  # metric key -> number
    raw: dict[str, object] = field(default_factory=dict)  # the client's own report, for the JSON
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Workload:
    name: str
    metrics: tuple[Metric, ...]
    run: Callable[[str, Targets, int], Measurement]  # (client netns, targets, seconds) -> numbers


def client_run(ns: str, argv: Sequence[str], duration: float) -> subprocess.CompletedProcess[str]:
    """Run a client inside `ns`, bounded by its duration plus a margin."""
    try:
        return subprocess.run(
            netns.exec_argv(ns, argv),
            capture_output=True,
            text=True,
            timeout=duration + TIMEOUT_MARGIN,
            cwd=REPO_ROOT,
            env=python_env(),
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{argv[0]} did not finish within {duration + TIMEOUT_MARGIN:g} s") from err


def client_json(ns: str, argv: Sequence[str], duration: float, name: str) -> tuple[int, dict[str, Any]]:
    """Run a client that reports JSON on stdout; returns (exit code, report)."""
    proc = client_run(ns, argv, duration)
    try:
        report: dict[str, Any] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise BenchError(
            f"{name} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
        ) from None
    return proc.returncode, report


# -- kernel TCP counters -----------------------------------------------------------------------------

# Client-pod counters recorded around every workload: a SYN retransmit costs a connection at least 1 s
# and shows a proxy or the capture rules dropping new connections; resets show connections cut short.
TCP_COUNTERS = (
    "TcpExt:TCPSynRetrans",
    "Tcp:RetransSegs",
    "Tcp:OutRsts",
    "Tcp:EstabResets",
    "Tcp:AttemptFails",
)


def tcp_counters(ns: str) -> dict[str, int]:
    """TCP_COUNTERS as the kernel counts them in `ns` (/proc/net/snmp and /proc/net/netstat)."""
    out = subprocess.run(
        netns.exec_argv(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"]),
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout.splitlines()
    counters: dict[str, int] = {}
    # Each group is a line of names followed by a line of values, both starting with "<Group>:".
    for names, values in zip(out[::2], out[1::2], strict=False):
        group, _, keys = names.partition(" ")
        for key, value in zip(keys.split(), values.split()[1:], strict=False):
            name = f"{group}{key}"
            if name in TCP_COUNTERS:
                counters[name] = int(value)
    return counters


# -- iperf3 ------------------------------------------------------------------------------------------


def iperf3(ns: str, target: tuple[str, int], duration: int, streams: int) -> Measurement:
    host, port = target
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"]
    returncode, report = client_json(ns, argv, duration, "iperf3")
    if returncode != 0 or "error" in report:
        raise BenchError(f"iperf3 exited {returncode}: {report.get('error', 'no error message')}")
    end = report["end"]
    received = float(end["sum_received"]["bits_per_second"])
    raw = {
        "argv": argv,
        "sum_received_bps": received,
        "sum_sent_bps": end["sum_sent"]["bits_per_second"],
        "retransmits": end["sum_sent"].get("retransmits"),
        "cpu_utilization_percent": end.get("cpu_utilization_percent"),
    }
    return Measurement(values={f"iperf3_{streams}_gbps": received / 1e9}, raw=raw)


# -- wrk ---------------------------------------------------------------------------------------------

_WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_WRK_REQUESTS = re.compile(r"^\s+([0-9]+) requests in ([0-9.]+)(m?s)", re.MULTILINE)
_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)"
)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")


def wrk(ns: str, url: str, duration: int, close: bool) -> Measurement:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{duration}s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    proc = client_run(ns, argv, duration)
    rps = _WRK_RPS.search(proc.stdout)
    if proc.returncode != 0 or rps is None:
        raise BenchError(f"wrk exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}")
    requests = _WRK_REQUESTS.search(proc.stdout)
    socket_errors = _WRK_SOCKET_ERRORS.search(proc.stdout)
    non_2xx = _WRK_NON_2XX.search(proc.stdout)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if socket_errors is not None:
        errors = dict(zip(errors, map(int, socket_errors.groups()), strict=True))
    raw: dict[str, object] = {
        "argv": argv,
        "requests": int(requests.group(1)) if requests else None,
        "socket_errors": errors,
        "non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0,
        "output": proc.stdout,
    }
    warnings = []
    if sum(errors.values()) or raw["non_2xx_3xx"]:
        warnings.append(f"wrk socket errors {errors}, non-2xx answers {raw['non_2xx_3xx']}")
    key = "wrk_close_cps" if close else "wrk_keepalive_rps"
    return Measurement(values={key: float(rps.group(1))}, raw=raw, warnings=warnings)


# -- latency -----------------------------------------------------------------------------------------


def latency(ns: str, target: tuple[str, int], duration: int) -> Measurement:
    host, port = target
    argv = [
        sys.executable,
        str(LATENCY_CLIENT),
        "--host",
        host,
        "--port",
        str(port),
        "--rate",
        str(LATENCY_RATE),
        "--connections",
        str(LATENCY_CONNECTIONS),
        "--duration",
        str(duration),
    ]
    _, report = client_json(ns, argv, duration, "latency client")
    if not report["ok"]:
        raise BenchError(f"latency client: no request succeeded ({report['errors']})")
    warnings = []
    if report["failed"]:
        warnings.append(f"{report['failed']} of {report['requests']} requests failed ({report['errors']})")
    values = {f"latency_{q}_us": float(report[f"{q}_us"]) for q in ("p50", "p90", "p99", "max")}
    return Measurement(values=values, raw={"argv": argv, **report}, warnings=warnings)


# -- the list the runner goes through ----------------------------------------------------------------

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "iperf3 1 stream",
        (Metric("iperf3_1_gbps", "iperf3 1 stream (Gb/s)", "Gb/s", Better.HIGHER),),
        lambda ns, t, d: iperf3(ns, t.iperf, d, streams=1),
    ),
    Workload(
        "iperf3 4 streams",
        (Metric("iperf3_4_gbps", "iperf3 -P 4 (Gb/s)", "Gb/s", Better.HIGHER),),
        lambda ns, t, d: iperf3(ns, t.iperf, d, streams=4),
    ),
    Workload(
        "wrk keep-alive",
        (Metric("wrk_keepalive_rps", f"wrk -c{WRK_CONNECTIONS} keep-alive (req/s)", "req/s", Better.HIGHER),),
        lambda ns, t, d: wrk(ns, t.url, d, close=False),
    ),
    Workload(
        "latency",
        tuple(
            Metric(f"latency_{q}_us", f"latency {q} @{LATENCY_RATE:g}/s (us)", "us", Better.LOWER)
            for q in ("p50", "p90", "p99", "max")
        ),
        lambda ns, t, d: latency(ns, t.web, d),
    ),
    # Last: it leaves tens of thousands of TIME_WAIT sockets in the backend pod.
    Workload(
        "wrk Connection: close",
        (Metric("wrk_close_cps", f"wrk -c{WRK_CONNECTIONS} new conns (conn/s)", "conn/s", Better.HIGHER),),
        lambda ns, t, d: wrk(ns, t.url, d, close=True),
    ),
)

METRICS: tuple[Metric, ...] = tuple(m for w in WORKLOADS for m in w.metrics)
