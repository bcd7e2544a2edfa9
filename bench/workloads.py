"""The workloads: each runs a client inside the client pod for a bounded time and returns numbers.

Every client is started with `ip netns exec <pod>` and a subprocess timeout of its duration plus a
margin, so no run can outlive its budget.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from bench.latency import percentile
from bench.paths import REPO_ROOT, BenchError, TargetKind, Targets, python_env
from nodeproxy import netns

LATENCY_CLIENT = pathlib.Path(__file__).resolve().with_name("latency.py")
H2LOAD = "h2load"
TIMEOUT_MARGIN = 20.0
WRK_THREADS = 2
WRK_CONNECTIONS = 32
LATENCY_RATE = 1000.0
LATENCY_CONNECTIONS = 8
# New connections per second of the fixed-rate new-connection workload: well below what either proxy
# sustains on a 2-core machine (12-20k/s with wrk), so both get the same offered load and the CPU they
# spend per connection is comparable; high enough for /proc's 10 ms ticks to add up to a steady figure.
CONNECTION_RATE = 2000.0
# Most connections the new-connection client keeps open at once (a stalled path cannot make it open more).
CONNECTION_RATE_MAX_OPEN = 256
# Requests per second of the fixed-rate L7 CPU workloads, spread over this many keep-alive connections
# (HTTP/1.1) or HTTP/2 connections (one stream at a time each): a fixed load both proxies carry easily.
REQUEST_RATE = 5000.0
REQUEST_RATE_CONNECTIONS = 10
H2LOAD_THREADS = 2
H2LOAD_CONNECTIONS = 16
H2LOAD_STREAMS = 10
# A fixed-rate run that delivered less than this share of its rate did not get the offered load.
MIN_RATE_SHARE = 0.9


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
    # Work done, for the CPU cost: "gb" relayed, "connections" or "requests" completed.
    work: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Cost:
    """The proxy's own CPU seconds per `per` units of `work` during a workload (from /proc)."""

    metric: Metric
    work: str  # key of Measurement.work
    per: float


@dataclass(frozen=True)
class Workload:
    name: str
    metrics: tuple[Metric, ...]
    run: Callable[[str, Targets, int], Measurement]  # (client netns, targets, seconds) -> numbers
    target: TargetKind = "web"  # what it sends to; a path without that target reports it not available
    group: str = "l4"  # l4 | l7: selectable with bench.run --workloads
    cost: Cost | None = None

    @property
    def all_metrics(self) -> tuple[Metric, ...]:
        return self.metrics + ((self.cost.metric,) if self.cost else ())


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


@dataclass(frozen=True)
class Iperf3Report:
    received_bps: float
    received_bytes: float
    sent_bps: float
    retransmits: int | None
    cpu_utilization_percent: object


def parse_iperf3(report: dict[str, Any]) -> Iperf3Report:
    """The totals of an `iperf3 -c ... -J` report (the receiver's side counts what was relayed)."""
    if "error" in report:
        raise ValueError(f"iperf3 reported an error: {report['error']}")
    end = report["end"]
    return Iperf3Report(
        received_bps=float(end["sum_received"]["bits_per_second"]),
        received_bytes=float(end["sum_received"]["bytes"]),
        sent_bps=float(end["sum_sent"]["bits_per_second"]),
        retransmits=end["sum_sent"].get("retransmits"),
        cpu_utilization_percent=end.get("cpu_utilization_percent"),
    )


def iperf3(ns: str, target: tuple[str, int], duration: int, streams: int) -> Measurement:
    host, port = target
    argv = ["iperf3", "-c", host, "-p", str(port), "-t", str(duration), "-P", str(streams), "-J"]
    returncode, report = client_json(ns, argv, duration, "iperf3")
    if returncode != 0 or "error" in report:
        raise BenchError(f"iperf3 exited {returncode}: {report.get('error', 'no error message')}")
    try:
        totals = parse_iperf3(report)
    except (KeyError, TypeError, ValueError) as err:
        raise BenchError(f"iperf3 report without totals: {err!r}") from None
    raw = {
        "argv": argv,
        "sum_received_bps": totals.received_bps,
        "sum_received_bytes": totals.received_bytes,
        "sum_sent_bps": totals.sent_bps,
        "retransmits": totals.retransmits,
        "cpu_utilization_percent": totals.cpu_utilization_percent,
    }
    return Measurement(
        values={f"iperf3_{streams}_gbps": totals.received_bps / 1e9},
        raw=raw,
        work={"gb": totals.received_bytes / 1e9},
    )


# -- wrk ---------------------------------------------------------------------------------------------

_WRK_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)", re.MULTILINE)
_WRK_REQUESTS = re.compile(r"^\s+([0-9]+) requests in ([0-9.]+)(m?s)", re.MULTILINE)
_WRK_SOCKET_ERRORS = re.compile(
    r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)"
)
_WRK_NON_2XX = re.compile(r"Non-2xx or 3xx responses: ([0-9]+)")


@dataclass(frozen=True)
class WrkReport:
    rps: float
    requests: int | None  # completed requests (None when wrk did not print the count)
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx_3xx: int


def parse_wrk(output: str) -> WrkReport:
    """The summary wrk 4.x prints on stdout."""
    rps = _WRK_RPS.search(output)
    if rps is None:
        raise ValueError("no 'Requests/sec:' line in wrk's output")
    requests = _WRK_REQUESTS.search(output)
    socket_errors = _WRK_SOCKET_ERRORS.search(output)
    non_2xx = _WRK_NON_2XX.search(output)
    errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if socket_errors is not None:
        errors = dict(zip(errors, map(int, socket_errors.groups()), strict=True))
    return WrkReport(
        rps=float(rps.group(1)),
        requests=int(requests.group(1)) if requests else None,
        socket_errors=errors,
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk(ns: str, url: str, duration: int, close: bool, key: str | None = None) -> Measurement:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{duration}s"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    proc = client_run(ns, argv, duration)
    try:
        if proc.returncode != 0:
            raise ValueError("non-zero exit")
        report = parse_wrk(proc.stdout)
    except ValueError:
        raise BenchError(
            f"wrk exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
        ) from None
    raw: dict[str, object] = {
        "argv": argv,
        "requests": report.requests,
        "socket_errors": report.socket_errors,
        "non_2xx_3xx": report.non_2xx_3xx,
        "output": proc.stdout,
    }
    warnings = []
    if sum(report.socket_errors.values()) or report.non_2xx_3xx:
        warnings.append(f"wrk socket errors {report.socket_errors}, non-2xx answers {report.non_2xx_3xx}")
    key = key or ("wrk_close_cps" if close else "wrk_keepalive_rps")
    work = {} if report.requests is None else {"connections" if close else "requests": float(report.requests)}
    return Measurement(values={key: report.rps}, raw=raw, warnings=warnings, work=work)


# -- latency -----------------------------------------------------------------------------------------


def latency(
    ns: str,
    target: tuple[str, int],
    duration: int,
    prefix: str = "latency",
    rate: float = LATENCY_RATE,
    connections: int = LATENCY_CONNECTIONS,
    new_connections: bool = False,
) -> Measurement:
    """bench/latency.py at a fixed rate: percentiles as `<prefix>_<q>_us`, completed requests as work."""
    host, port = target
    argv = [
        sys.executable,
        str(LATENCY_CLIENT),
        "--host",
        host,
        "--port",
        str(port),
        "--rate",
        str(rate),
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]
    if new_connections:
        argv.append("--new-connections")
    _, report = client_json(ns, argv, duration, "latency client")
    if not report["ok"]:
        raise BenchError(f"latency client: no request succeeded ({report['errors']})")
    warnings = []
    if report["failed"]:
        warnings.append(f"{report['failed']} of {report['requests']} requests failed ({report['errors']})")
    warnings += rate_warnings(float(report["achieved_rate"]), rate)
    values = {f"{prefix}_{q}_us": float(report[f"{q}_us"]) for q in ("p50", "p90", "p99", "max")}
    work = {"connections" if new_connections else "requests": float(report["ok"])}
    return Measurement(values=values, raw={"argv": argv, **report}, warnings=warnings, work=work)


def rate_warnings(achieved: float, rate: float) -> list[str]:
    """A warning when a fixed-rate client delivered clearly less than its rate."""
    if achieved < MIN_RATE_SHARE * rate:
        return [f"achieved {achieved:,.0f}/s of the fixed {rate:,.0f}/s: the CPU cost is not at that rate"]
    return []


# -- h2load ------------------------------------------------------------------------------------------

_H2LOAD_FINISHED = re.compile(r"^finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", re.MULTILINE)
_H2LOAD_REQUESTS = re.compile(
    r"^requests: ([0-9]+) total, ([0-9]+) started, ([0-9]+) done, ([0-9]+) succeeded, "
    r"([0-9]+) failed, ([0-9]+) errored, ([0-9]+) timeout",
    re.MULTILINE,
)
_H2LOAD_STATUS = re.compile(
    r"^status codes: ([0-9]+) 2xx, ([0-9]+) 3xx, ([0-9]+) 4xx, ([0-9]+) 5xx", re.MULTILINE
)


@dataclass(frozen=True)
class H2loadReport:
    seconds: float
    rps: float
    requests: dict[str, int]  # total, started, done, succeeded, failed, errored, timeout
    status: dict[str, int]  # 2xx, 3xx, 4xx, 5xx


def parse_h2load(output: str) -> H2loadReport:
    """The summary h2load prints at the end of a run (nghttp2 1.52's format)."""
    finished = _H2LOAD_FINISHED.search(output)
    requests = _H2LOAD_REQUESTS.search(output)
    if finished is None or requests is None:
        raise ValueError("no h2load summary ('finished in ...' and 'requests: ...') in the output")
    status = _H2LOAD_STATUS.search(output)
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    names = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    return H2loadReport(
        seconds=seconds,
        rps=float(finished.group(3)),
        requests=dict(zip(names, map(int, requests.groups()), strict=True)),
        status=dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True))
        if status
        else {},
    )


def parse_h2load_log(text: str) -> list[int]:
    """Per-request times (µs, start of request to end of response) of an h2load --log-file, sorted.

    Each line is tab-separated: start time (µs since the epoch), HTTP status, µs to the end of the
    response. Requests that got no response (status -1) are left out.
    """
    times: list[int] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if int(fields[1]) < 0:
            continue
        times.append(int(fields[2]))
    times.sort()
    return times


def h2load(
    ns: str,
    url: str,
    duration: int,
    *,
    http1: bool,
    connections: int,
    streams: int = 1,
    threads: int = 1,
    rate: float | None = None,
    log_latency: bool = False,
) -> tuple[H2loadReport, list[int], dict[str, object], list[str]]:
    """Run h2load; returns its summary, the sorted per-request times (with log_latency), raw, warnings."""
    argv = [H2LOAD, f"-c{connections}", f"-m{streams}", f"-t{threads}", f"-D{duration}"]
    if http1:
        argv.append("--h1")
    if rate is not None:
        argv.append(f"--rps={rate / connections:g}")  # h2load's rate is per client
    log_path: pathlib.Path | None = None
    if log_latency:
        fd, name = tempfile.mkstemp(prefix="npb-h2load-", suffix=".log")
        os.close(fd)
        log_path = pathlib.Path(name)
        argv.append(f"--log-file={log_path}")
    argv.append(url)
    try:
        proc = client_run(ns, argv, duration)
        try:
            report = parse_h2load(proc.stdout)
        except ValueError:
            raise BenchError(
                f"h2load exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-500:]}"
            ) from None
        times = parse_h2load_log(log_path.read_text()) if log_path else []
    finally:
        if log_path is not None:
            with contextlib.suppress(OSError):
                log_path.unlink()
    if not report.requests["succeeded"]:
        raise BenchError(f"h2load: no request succeeded ({report.requests}, status {report.status})")
    warnings = []
    unsuccessful = report.requests["done"] - report.requests["succeeded"]
    not_2xx = sum(n for code, n in report.status.items() if code != "2xx")
    if unsuccessful or report.requests["errored"] or report.requests["timeout"] or not_2xx:
        warnings.append(f"h2load requests {report.requests}, status codes {report.status}")
    if rate is not None:
        warnings += rate_warnings(report.rps, rate)
    raw: dict[str, object] = {
        "argv": argv,
        "seconds": report.seconds,
        "rps": report.rps,
        "requests": report.requests,
        "status": report.status,
        "output": proc.stdout[-3000:],
    }
    return report, times, raw, warnings


def h2load_rps(ns: str, url: str, duration: int, key: str) -> Measurement:
    """HTTP/2 requests/s at saturation: h2load -c16 -m10 (prior-knowledge h2c)."""
    report, _, raw, warnings = h2load(
        ns,
        url,
        duration,
        http1=False,
        connections=H2LOAD_CONNECTIONS,
        streams=H2LOAD_STREAMS,
        threads=H2LOAD_THREADS,
    )
    work = {"requests": float(report.requests["succeeded"])}
    return Measurement(values={key: report.rps}, raw=raw, warnings=warnings, work=work)


def h2load_latency(ns: str, url: str, duration: int, prefix: str) -> Measurement:
    """HTTP/2 percentiles at a fixed LATENCY_RATE over LATENCY_CONNECTIONS connections, from h2load's log."""
    report, times, raw, warnings = h2load(
        ns,
        url,
        duration,
        http1=False,
        connections=LATENCY_CONNECTIONS,
        rate=LATENCY_RATE,
        log_latency=True,
    )
    if not times:
        raise BenchError("h2load logged no completed request")
    values = {
        f"{prefix}_{q}_us": float(percentile(times, pct))
        for q, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }
    raw["logged_requests"] = len(times)
    work = {"requests": float(report.requests["succeeded"])}
    return Measurement(values=values, raw=raw, warnings=warnings, work=work)


def fixed_rate_requests(ns: str, url: str, duration: int, http1: bool, rate: float) -> Measurement:
    """h2load at a fixed request rate, for the proxy's CPU per request (no table value of its own)."""
    report, _, raw, warnings = h2load(
        ns, url, duration, http1=http1, connections=REQUEST_RATE_CONNECTIONS, rate=rate
    )
    work = {"requests": float(report.requests["succeeded"])}
    return Measurement(values={}, raw=raw, warnings=warnings, work=work)


# -- the list the runner goes through ----------------------------------------------------------------


def _target(targets: Targets, kind: TargetKind) -> tuple[str, int]:
    address = targets.get(kind)
    if address is None:  # the runner checks availability first; this is a bug if reached
        raise BenchError(f"no {kind} target on this path")
    return address


def _url(targets: Targets, kind: TargetKind) -> str:
    host, port = _target(targets, kind)
    return f"http://{host}:{port}/"


def _latency_metrics(
    prefix: str, what: str, quantiles: Sequence[str], rate: float = LATENCY_RATE
) -> tuple[Metric, ...]:
    return tuple(
        Metric(f"{prefix}_{q}_us", f"{what} {q} @{rate:g}/s (us)", "us", Better.LOWER) for q in quantiles
    )


CPU_PER_GB = "CPU-s/GB"
CPU_PER_10K_CONNECTIONS = "CPU-s/10k conn"
CPU_PER_100K_REQUESTS = "CPU-s/100k req"


def _request_cost_workload(protocol: str, target: Literal["h1", "h2"], label: str) -> Workload:
    """Requests at a fixed rate over `protocol` to `target`: no rate metric, only the proxy's CPU per
    100k requests at the same offered load on every proxy."""
    http1 = target == "h1"
    return Workload(
        f"{protocol} fixed rate",
        (),
        lambda ns, t, d: fixed_rate_requests(ns, _url(t, target), d, http1=http1, rate=REQUEST_RATE),
        target=target,
        group="l7",
        cost=Cost(
            Metric(
                f"cpu_{target}_requests",
                f"  proxy CPU-s per 100k {label} req @{REQUEST_RATE:g}/s",
                CPU_PER_100K_REQUESTS,
                Better.LOWER,
            ),
            "requests",
            100_000,
        ),
    )


WORKLOADS: tuple[Workload, ...] = (
    Workload(
        "iperf3 1 stream",
        (Metric("iperf3_1_gbps", "iperf3 1 stream (Gb/s)", "Gb/s", Better.HIGHER),),
        lambda ns, t, d: iperf3(ns, _target(t, "iperf"), d, streams=1),
        target="iperf",
        cost=Cost(
            Metric("cpu_iperf3_1", "  proxy CPU-s per GB, 1 stream", CPU_PER_GB, Better.LOWER), "gb", 1
        ),
    ),
    Workload(
        "iperf3 4 streams",
        (Metric("iperf3_4_gbps", "iperf3 -P 4 (Gb/s)", "Gb/s", Better.HIGHER),),
        lambda ns, t, d: iperf3(ns, _target(t, "iperf"), d, streams=4),
        target="iperf",
        cost=Cost(Metric("cpu_iperf3_4", "  proxy CPU-s per GB, -P 4", CPU_PER_GB, Better.LOWER), "gb", 1),
    ),
    Workload(
        "wrk keep-alive",
        (Metric("wrk_keepalive_rps", f"wrk -c{WRK_CONNECTIONS} keep-alive (req/s)", "req/s", Better.HIGHER),),
        lambda ns, t, d: wrk(ns, _url(t, "web"), d, close=False),
    ),
    Workload(
        "latency",
        _latency_metrics("latency", "latency", ("p50", "p90", "p99", "max")),
        lambda ns, t, d: latency(ns, _target(t, "web"), d),
    ),
    # HTTP-aware proxying (issue 7): HTTP/1.1 to nginx, HTTP/2 (h2c) to nginx's http2 listener.
    Workload(
        "http/1.1 keep-alive",
        (Metric("h1_rps", f"L7 HTTP/1.1 wrk -c{WRK_CONNECTIONS} (req/s)", "req/s", Better.HIGHER),),
        lambda ns, t, d: wrk(ns, _url(t, "h1"), d, close=False, key="h1_rps"),
        target="h1",
        group="l7",
    ),
    Workload(
        "http/1.1 latency",
        _latency_metrics("h1_latency", "L7 HTTP/1.1", ("p50", "p99")),
        lambda ns, t, d: latency(ns, _target(t, "h1"), d, prefix="h1_latency"),
        target="h1",
        group="l7",
    ),
    _request_cost_workload("http/1.1", "h1", "HTTP/1.1"),
    Workload(
        "http/2 h2load",
        (
            Metric(
                "h2_rps",
                f"L7 HTTP/2 h2load -c{H2LOAD_CONNECTIONS} -m{H2LOAD_STREAMS} (req/s)",
                "req/s",
                Better.HIGHER,
            ),
        ),
        lambda ns, t, d: h2load_rps(ns, _url(t, "h2"), d, key="h2_rps"),
        target="h2",
        group="l7",
    ),
    Workload(
        "http/2 latency",
        _latency_metrics("h2_latency", "L7 HTTP/2", ("p50", "p99")),
        lambda ns, t, d: h2load_latency(ns, _url(t, "h2"), d, prefix="h2_latency"),
        target="h2",
        group="l7",
    ),
    _request_cost_workload("http/2", "h2", "HTTP/2"),
    # New connections at a fixed rate (issue 6): the proxy's CPU per connection at the same offered load
    # on both proxies. Before wrk Connection: close, which leaves far more TIME_WAIT sockets behind.
    Workload(
        "new connections fixed rate",
        _latency_metrics("conn_latency", "new conn", ("p50", "p99"), CONNECTION_RATE),
        lambda ns, t, d: latency(
            ns,
            _target(t, "web"),
            d,
            prefix="conn_latency",
            rate=CONNECTION_RATE,
            connections=CONNECTION_RATE_MAX_OPEN,
            new_connections=True,
        ),
        cost=Cost(
            Metric(
                "cpu_connections",
                f"  proxy CPU-s per 10k new conn @{CONNECTION_RATE:g}/s",
                CPU_PER_10K_CONNECTIONS,
                Better.LOWER,
            ),
            "connections",
            10_000,
        ),
    ),
    # Last: it leaves tens of thousands of TIME_WAIT sockets in the backend pod.
    Workload(
        "wrk Connection: close",
        (Metric("wrk_close_cps", f"wrk -c{WRK_CONNECTIONS} new conns (conn/s)", "conn/s", Better.HIGHER),),
        lambda ns, t, d: wrk(ns, _url(t, "web"), d, close=True),
    ),
)

METRICS: tuple[Metric, ...] = tuple(m for w in WORKLOADS for m in w.all_metrics)
GROUPS = ("l4", "l7")
