"""Pure parts of the bench: tool output parsing, /proc CPU accounting, the ratio table and the goals.

None of these run a workload or build a namespace; nothing here is timed.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from bench import cpu, haproxy, latency, paths
from bench.run import (
    LABEL_WIDTH,
    PathResult,
    goals_report,
    path_status,
    render_table,
    render_unavailable,
    run_workload,
    selected_metrics,
)
from bench.workloads import (
    METRICS,
    WORKLOADS,
    Better,
    Cost,
    Measurement,
    Metric,
    Workload,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3,
    parse_wrk,
)
from nodeproxy.config import Config, ConfigError, parse_config

# -- /proc CPU accounting ----------------------------------------------------------------------------


def stat_line(
    pid: int, comm: str, ppid: int, utime: int, stime: int, cutime: int = 0, cstime: int = 0
) -> str:
    """A /proc/<pid>/stat line with the given fields and plausible values elsewhere (proc(5))."""
    # state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    head = ["S", ppid, pid, pid, 0, -1, 4194560, 100, 0, 0, 0]
    fields = [*head, utime, stime, cutime, cstime, 20, 0, 3, 0, 12345]
    return f"{pid} ({comm}) " + " ".join(str(f) for f in fields) + "\n"


def test_parse_stat_reads_the_time_fields_after_a_command_name_with_spaces_and_parentheses() -> None:
    stat = cpu.parse_stat(stat_line(4242, "py (worker) 1)", 17, utime=300, stime=40, cutime=7, cstime=2))
    assert stat == cpu.ProcStat(pid=4242, ppid=17, utime=300, stime=40, cutime=7, cstime=2)
    assert stat.ticks == 349


@pytest.mark.parametrize("text", ["", "garbage", "12 (x) S 1 2 3", "(x) S 1"])
def test_parse_stat_rejects_what_is_not_a_stat_line(text: str) -> None:
    with pytest.raises(ValueError):
        cpu.parse_stat(text)


def synthetic_stats() -> dict[int, cpu.ProcStat]:
    """init; a supervisor (100) with two workers, one with a child of its own; an unrelated process."""
    lines = [
        stat_line(1, "init", 0, 500, 500),
        stat_line(100, "nodeproxy", 1, utime=5, stime=3, cutime=7, cstime=1),  # reaped children: 8
        stat_line(101, "nodeproxy", 100, utime=50, stime=20),
        stat_line(102, "nodeproxy", 100, utime=40, stime=10, cutime=2),
        stat_line(103, "iptables", 101, utime=1, stime=1),
        stat_line(200, "unrelated", 1, utime=999, stime=999),
    ]
    return {s.pid: s for s in map(cpu.parse_stat, lines)}


def test_tree_is_the_root_and_all_its_descendants() -> None:
    stats = synthetic_stats()
    assert cpu.tree(stats, 100) == {100, 101, 102, 103}
    assert cpu.tree(stats, 102) == {102}
    assert cpu.tree(stats, 999) == set()  # not running


def test_tree_ticks_count_every_process_once_with_reaped_children() -> None:
    stats = synthetic_stats()
    # 100: 5+3+7+1, 101: 50+20, 102: 40+10+2, 103: 1+1
    assert cpu.tree_ticks(stats, [100]) == 16 + 70 + 52 + 2
    # A root inside another root's tree is not counted twice.
    assert cpu.tree_ticks(stats, [100, 101]) == 140
    assert cpu.tree_ticks(stats, [100, 200]) == 140 + 1998


def test_sample_reads_a_proc_directory(tmp_path: pathlib.Path) -> None:
    for stat in synthetic_stats().values():
        (tmp_path / str(stat.pid)).mkdir()
        (tmp_path / str(stat.pid) / "stat").write_text(
            stat_line(stat.pid, "x", stat.ppid, stat.utime, stat.stime, stat.cutime, stat.cstime)
        )
    (tmp_path / "self").mkdir()  # non-numeric entries are not processes
    (tmp_path / "300").mkdir()  # a process that exited between listing and reading: no stat file
    sample = cpu.sample([100], proc=tmp_path)
    assert sample == cpu.CpuSample(seconds=140 / cpu.CLOCK_TICKS, processes=4)
    assert cpu.sample([12345], proc=tmp_path) == cpu.CpuSample(seconds=0.0, processes=0)


def test_the_live_proc_has_this_process_and_its_child() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        stats = cpu.read_stats()
        assert stats[os.getpid()].ppid == os.getppid()
        assert cpu.tree(stats, os.getpid()) >= {os.getpid(), child.pid}
        assert cpu.sample([os.getpid()]).processes >= 2
    finally:
        child.communicate(b"", timeout=30)


def test_cost_is_cpu_per_unit_and_none_without_work() -> None:
    assert cpu.cost(0.5, 20_000, 10_000) == pytest.approx(0.25)
    assert cpu.cost(1.5, 3.0, 1) == pytest.approx(0.5)
    assert cpu.cost(1.0, 0, 100_000) is None


# -- tool output -------------------------------------------------------------------------------------

WRK_OUTPUT = """\
Running 1s test @ http://10.96.0.10:80/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   321.45us  123.45us   3.21ms   90.00%
    Req/Sec    45.12k     2.34k   50.00k    70.00%
  89765 requests in 1.00s, 12.34MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  89000.12
Transfer/sec:     12.34MB
"""


def test_parse_wrk() -> None:
    report = parse_wrk(WRK_OUTPUT)
    assert report.rps == pytest.approx(89000.12)
    assert report.requests == 89765
    assert report.socket_errors == {"connect": 0, "read": 3, "write": 1, "timeout": 2}
    assert report.non_2xx_3xx == 7
    clean = "\n".join(
        line for line in WRK_OUTPUT.splitlines() if "Socket" not in line and "Non-2xx" not in line
    )
    assert parse_wrk(clean).socket_errors == dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    assert parse_wrk(clean).non_2xx_3xx == 0
    with pytest.raises(ValueError):
        parse_wrk("unable to connect to 10.96.0.10:80 Connection refused\n")


H2LOAD_OUTPUT = """\
starting benchmark...
spawning thread #0: 2 total client(s). Timing-based test with 0s of warm-up time and 1s of main duration.
Application protocol: h2c
finished in 1.00s, 4999.50 req/s, 13.38KB/s
requests: 5000 total, 5002 started, 4999 done, 4990 succeeded, 9 failed, 1 errored, 0 timeout
status codes: 4990 2xx, 0 3xx, 9 4xx, 0 5xx
traffic: 13.38KB (13698) total, 9.38KB (9600) headers (space savings 51.02%), 400B (400) data
                     min         max         mean         sd        +/- sd
time for request:       16us       334us        44us        47us    92.00%
"""


def test_parse_h2load() -> None:
    report = parse_h2load(H2LOAD_OUTPUT)
    assert report.seconds == 1.0
    assert report.rps == pytest.approx(4999.5)
    assert report.requests == {
        "total": 5000,
        "started": 5002,
        "done": 4999,
        "succeeded": 4990,
        "failed": 9,
        "errored": 1,
        "timeout": 0,
    }
    assert report.status == {"2xx": 4990, "3xx": 0, "4xx": 9, "5xx": 0}
    assert parse_h2load(H2LOAD_OUTPUT.replace("in 1.00s", "in 750.25ms")).seconds == pytest.approx(0.75025)
    with pytest.raises(ValueError):
        parse_h2load("connect failed\nNo protocol negotiated\n")


def test_parse_h2load_log_sorts_times_and_skips_requests_without_response() -> None:
    log = "1795681167249566\t200\t269\n1795681167249532\t200\t34\n1795681167260035\t-1\t99\n\n"
    assert parse_h2load_log(log) == [34, 269]


def test_parse_iperf3_uses_the_receiver_totals() -> None:
    report = {
        "end": {
            "sum_sent": {"bits_per_second": 9.5e9, "bytes": 1_200_000_000, "retransmits": 3},
            "sum_received": {"bits_per_second": 9.4e9, "bytes": 1_180_000_000},
            "cpu_utilization_percent": {"host_total": 50.0},
        }
    }
    totals = parse_iperf3(report)
    assert (totals.received_bps, totals.received_bytes, totals.retransmits) == (9.4e9, 1.18e9, 3)
    with pytest.raises(ValueError):
        parse_iperf3({"error": "unable to connect to server"})


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 101))
    assert [latency.percentile(values, pct) for pct in (50, 99, 100)] == [50, 99, 100]
    assert latency.percentile([7], 99) == 7
    assert latency.percentile([], 50) == 0


# -- the ratio table and the goals -------------------------------------------------------------------

VALUES = {
    "direct": {"wrk_keepalive_rps": 100_000.0, "iperf3_1_gbps": 20.0, "h1_rps": 90_000.0},
    "nodeproxy": {"wrk_keepalive_rps": 50_000.0, "iperf3_1_gbps": 10.0, "cpu_iperf3_1": 0.25},
    "haproxy": {
        "wrk_keepalive_rps": 40_000.0,
        "iperf3_1_gbps": 8.0,
        "cpu_iperf3_1": 1.0,
        "h1_rps": 80_000.0,
        "h1_latency_p99_us": 400.0,
        "cpu_h1_requests": 1.5,
    },
}
MISSING = {
    "direct": {"cpu_iperf3_1": "no proxy on this path"},
    "nodeproxy": {"h1_rps": "nodeproxy's config rejects the L7 services: protocol"},
}


def table_row(table: str, label_start: str) -> list[str]:
    """The five cells (direct, nodeproxy, haproxy, np/direct, np/haproxy) and the direction of a row."""
    rows = [line for line in table.splitlines() if line.strip().startswith(label_start)]
    assert len(rows) == 1, rows
    cells = rows[0][LABEL_WIDTH:]
    return [cells[i * 12 : (i + 1) * 12].strip() for i in range(5)] + [cells[60:].strip()]


def test_render_table_shows_values_ratios_and_why_cells_are_empty() -> None:
    table = render_table(VALUES, MISSING)
    # direct, nodeproxy, haproxy, np/direct, np/haproxy
    assert table_row(table, "wrk -c32 keep-alive") == [
        "100,000",
        "50,000",
        "40,000",
        "0.50",
        "1.25",
        "higher",
    ]
    assert table_row(table, "iperf3 1 stream")[:5] == ["20.00", "10.00", "8.00", "0.50", "1.25"]
    # The CPU cost: n/a on the direct path (no proxy), lower is better, ratio against HAProxy only.
    assert table_row(table, "proxy CPU-s per GB, 1 stream") == [
        "n/a",
        "0.250",
        "1.000",
        "-",
        "0.25",
        "lower (np/x < 1 is better)",
    ]
    # n/a: the path cannot measure it; error: it should have and did not.
    assert table_row(table, "L7 HTTP/1.1 wrk")[:5] == ["90,000", "n/a", "80,000", "-", "-"]
    assert table_row(table, "L7 HTTP/2 h2load")[:5] == ["error", "error", "error", "-", "-"]
    notes = render_unavailable(MISSING)
    assert "direct: n/a for cpu_iperf3_1: no proxy on this path" in notes
    assert "nodeproxy: n/a for h1_rps: nodeproxy's config rejects" in notes
    assert render_unavailable({}) == ""


def test_render_table_marks_paths_not_run() -> None:
    table = render_table({"nodeproxy": {"wrk_keepalive_rps": 1.0}})
    assert table_row(table, "wrk -c32 keep-alive")[:5] == ["-", "1", "-", "-", "-"]


def test_only_the_selected_workload_groups_are_shown() -> None:
    l4 = selected_metrics(["l4"])
    table = render_table(VALUES, MISSING, l4)
    assert "wrk -c32 keep-alive" in table and "proxy CPU-s per 10k new conn" in table
    assert "L7" not in table and "HTTP/2" not in table
    assert {g["metric"] for g in goals_report(VALUES, l4)} == {
        "iperf3_1_gbps",
        "iperf3_4_gbps",
        "wrk_keepalive_rps",
        "wrk_close_cps",
    }
    assert selected_metrics(["l4", "l7"]) == METRICS


def test_goals_report_checks_minimum_and_maximum_ratios_and_latency_excess() -> None:
    values = {
        "nodeproxy": {
            "wrk_keepalive_rps": 50_000.0,
            "h1_rps": 80_000.0,
            "cpu_h1_requests": 1.6,
            "h1_latency_p99_us": 550.0,
        },
        **{k: v for k, v in VALUES.items() if k != "nodeproxy"},
    }
    goals = {(g["metric"], g["baseline"]): g for g in goals_report(values)}
    keepalive = goals[("wrk_keepalive_rps", "haproxy")]
    assert (keepalive["measured"], keepalive["met"]) == (1.25, True)
    h1 = goals[("h1_rps", "haproxy")]
    assert (h1["measured"], h1["met"]) == (1.0, True)
    cpu_h1 = goals[("cpu_h1_requests", "haproxy")]  # at most HAProxy's CPU per request
    assert (cpu_h1["measured"], cpu_h1["met"]) == (pytest.approx(1.067), False)
    p99 = goals[("h1_latency_p99_us", "haproxy")]  # within +200 us of HAProxy's
    assert (p99["measured"], p99["met"]) == (150.0, True)
    assert goals[("h2_rps", "haproxy")]["met"] is None  # not measured: neither met nor missed


# -- running a workload: not available, CPU cost -----------------------------------------------------

TARGETS_WITHOUT_L7 = paths.Targets(
    web=("10.96.0.10", 80), iperf=("10.96.0.13", 5201), unavailable={"h1": "no L7 here"}
)


def test_run_workload_reports_a_target_the_path_lacks_as_not_available() -> None:
    workload = next(w for w in WORKLOADS if w.name == "http/1.1 fixed rate")
    result = PathResult("nodeproxy")
    run_workload("nodeproxy", workload, "npb-nonexistent", TARGETS_WITHOUT_L7, 1, result, [os.getpid()])
    assert result.values == {}
    assert result.not_available == {"cpu_h1_requests": "no L7 here"}
    assert result.workloads == {"http/1.1 fixed rate": {"not_available": "no L7 here"}}


def test_run_workload_turns_proxy_cpu_into_cost(monkeypatch: pytest.MonkeyPatch) -> None:
    samples = iter([cpu.CpuSample(10.0, 3), cpu.CpuSample(10.6, 3)])
    monkeypatch.setattr("bench.run.cpu.sample", lambda roots: next(samples))
    monkeypatch.setattr("bench.run.tcp_counters", lambda ns: {})
    metric = Metric("cpu_test", "cpu per 100k", "CPU-s/100k req", Better.LOWER)
    workload = Workload(
        "test",
        (Metric("test_rps", "test", "req/s", Better.HIGHER),),
        lambda ns, t, d: Measurement(values={"test_rps": 30_000.0}, work={"requests": 30_000.0}),
        cost=Cost(metric, "requests", 100_000),
    )
    result = PathResult("haproxy")
    run_workload("haproxy", workload, "npb-nonexistent", TARGETS_WITHOUT_L7, 1, result, [1234])
    assert result.values["test_rps"] == 30_000.0
    assert result.values["cpu_test"] == pytest.approx(0.6 * 100_000 / 30_000)
    report = result.workloads["test"]
    assert isinstance(report, dict)
    assert report["proxy_cpu"]["seconds"] == pytest.approx(0.6)

    # Without a proxy (the direct path), the cost is not available rather than zero.
    direct = PathResult("direct")
    run_workload("direct", workload, "npb-nonexistent", TARGETS_WITHOUT_L7, 1, direct, [])
    assert "cpu_test" not in direct.values
    assert direct.not_available == {"cpu_test": "no proxy on this path"}


# -- configs: L7 services, HAProxy in HTTP mode, nodeproxy's L7 availability -------------------------


def test_l7_services_are_added_with_or_without_a_protocol() -> None:
    lab = paths.new_lab()  # not brought up: only its addresses are used
    base = paths.service_config(lab, paths.HAPROXY_PORT)
    plain = parse_config(paths.with_l7_services(base, lab, declare_protocol=False))
    names = [s.name for s in plain.services]
    assert names[-2:] == ["web-h1", "web-h2"]
    assert [(s.name, str(s.vip), s.ports[0].backend_port) for s in plain.services[-2:]] == [
        ("web-h1", "10.96.0.20", 8080),
        ("web-h2", "10.96.0.21", paths.H2C_PORT),
    ]
    declared = paths.with_l7_services(base, lab, declare_protocol=True)
    assert "protocol: http\n" in declared and "protocol: http2\n" in declared
    assert "protocol" not in paths.with_l7_services(base, lab, declare_protocol=False)


def test_haproxy_config_switches_l7_services_to_http_mode() -> None:
    lab = paths.new_lab()
    config = parse_config(
        paths.with_l7_services(paths.service_config(lab, paths.HAPROXY_PORT), lab, declare_protocol=False)
    )
    text = haproxy.render_config(config, 2, http_services={"web-h1": "h1", "web-h2": "h2"})
    lines = text.splitlines()
    assert "    tcp-request content switch-mode http proto h1 if { dst 10.96.0.20 } { dst_port 80 }" in lines
    assert "    tcp-request content switch-mode http proto h2 if { dst 10.96.0.21 } { dst_port 80 }" in lines
    h2_backend = text.split("backend web-h2_80\n")[1].split("\n\n")[0]
    assert "mode http" in h2_backend and f":{paths.H2C_PORT} proto h2" in h2_backend
    assert "usesrc" not in h2_backend
    l4_backend = text.split("backend web_80\n")[1].split("\n\n")[0]
    assert "usesrc clientip" in l4_backend and "mode http" not in l4_backend
    with pytest.raises(ValueError):
        haproxy.render_config(config, 2, http_services={"nosuch": "h1"})
    if shutil.which(haproxy.BINARY):  # HAProxy itself agrees the config is valid
        cfg = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"npb-test-{os.getpid()}.cfg"
        cfg.write_text(text)
        try:
            check = subprocess.run([haproxy.BINARY, "-c", "-f", str(cfg)], capture_output=True, text=True)
        finally:
            cfg.unlink()
        assert check.returncode == 0, check.stdout + check.stderr


def test_nodeproxy_l7_is_not_available_while_its_config_rejects_protocol(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    def rejecting(text: str, source: str = "<string>") -> Config:
        if "protocol:" in text:
            raise ConfigError("services[4].ports[0].protocol: unknown key", source)
        return parse_config(text, source)

    monkeypatch.setattr("bench.paths.parse_config", rejecting)
    path = paths.NodeProxyPath(paths.new_lab(), tmp_path)
    assert "protocol" not in path.config_text and path.config_text == path.l4_config_text
    targets = path.targets()
    assert targets.h1 is None and targets.h2 is None
    assert "rejects the L7 services" in targets.why_unavailable("h1")
    assert targets.web == ("10.96.0.10", 80)  # L4 unchanged
    # The L7 workloads then report n/a rather than failing.
    result = PathResult("nodeproxy")
    for workload in WORKLOADS:
        if workload.group == "l7":
            run_workload("nodeproxy", workload, "npb-nonexistent", targets, 1, result, [])
    assert set(result.not_available) == {m.key for w in WORKLOADS if w.group == "l7" for m in w.all_metrics}
    assert result.values == {}


def test_nodeproxy_l7_targets_when_its_config_takes_protocol(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    def accepting(text: str, source: str = "<string>") -> Config:
        return parse_config(re.sub(r"\n *protocol: \w+", "", text), source)

    monkeypatch.setattr("bench.paths.parse_config", accepting)
    path = paths.NodeProxyPath(paths.new_lab(), tmp_path)
    assert "protocol: http2" in path.config_text
    targets = path.targets()
    assert (targets.h1, targets.h2) == (("10.96.0.20", 80), ("10.96.0.21", 80))
    # setup() found nodeproxy relaying h2c as opaque TCP: only that target goes.
    path.l7_problems["h2"] = "relayed as opaque TCP"
    assert path.targets().h2 is None and path.targets().h1 == ("10.96.0.20", 80)
    assert path.targets().why_unavailable("h2") == "relayed as opaque TCP"


# -- the fixed-rate client, against a loopback server ------------------------------------------------


def test_latency_client_new_connections_mode_counts_each_request_on_its_own_connection() -> None:
    """50 requests at 200/s (0.25 s), each on a new connection that the server closes after answering."""
    connections: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        connections.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def scenario() -> dict[str, object]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await latency.measure("127.0.0.1", port, 200.0, 8, 0.25, 2.0, "/", new_connections=True)

    report = asyncio.run(scenario())
    assert (report["requests"], report["ok"], report["failed"]) == (50, 50, 0)
    assert report["mode"] == "new connections"
    assert len(connections) == 50
    assert all(b"Connection: close\r\n" in head for head in connections)


def test_path_status() -> None:
    assert path_status(PathResult("nodeproxy", error="lab setup failed")) == "failed"
    assert path_status(PathResult("nodeproxy")) == "failed"  # nothing measured
    measured = PathResult("nodeproxy", values={"wrk_keepalive_rps": 1.0}, workloads={"wrk": {}})
    assert path_status(measured) == "ok"
    measured.workloads["h2load"] = {"error": "h2load exited 1"}
    assert path_status(measured) == "partial"
    # Only L7 workloads selected, none available on this path: not a failure.
    only_na = PathResult(
        "nodeproxy", not_available={"h1_rps": "opaque"}, workloads={"h1": {"not_available": "x"}}
    )
    assert path_status(only_na) == "ok"
