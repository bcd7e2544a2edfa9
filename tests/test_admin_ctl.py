"""`nodeproxy ctl` (issue 10, point 3): tables by default, --json for scripts, clear errors when the socket
is missing or permission is denied."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.ctl import table
from nodeproxy.lab import Lab, stop_process
from tests.conftest import RunningProxy, running_lab, start_proxy
from tests.helpers import connect

NOBODY = 65534
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2


def ctl(
    *args: str, ns: str | None = None, without_dac_override: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "nodeproxy", "ctl", *args]
    return subprocess.run(
        netns.exec_argv(ns, argv),
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_drop_dac_override if without_dac_override else None,
    )


def _drop_dac_override() -> None:
    """Root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH after exec: file modes apply to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    assert table(["NAME", "N"], [["a", 1], ["long-name", 100]]).splitlines() == [
        "NAME         N",
        "a            1",
        "long-name  100",
    ]


def test_the_parser_with_ctl_imports_nothing_slow() -> None:
    """`nodeproxy run` blocks its signals only after parsing: the parser (ctl included) must not import
    the heavy modules first (see cli.py)."""
    probe = (
        "import sys; import nodeproxy.cli as cli; cli.build_parser(); "
        "slow = ('yaml', 'h11', 'structlog', 'pydantic', 'pyroute2', 'uvloop'); "
        "print(sorted(m for m in slow if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_missing_socket_is_named_with_a_hint(tmp_path: Path) -> None:
    result = ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert result.returncode == 1
    assert f"no admin socket at {tmp_path / 'none.sock'}: is nodeproxy running?" in result.stderr
    assert "Traceback" not in result.stderr


def test_stale_socket_says_nothing_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    result = ctl("--socket", str(path), "workers")
    assert result.returncode == 1 and "nothing listens on" in result.stderr


def test_permission_denied_explains_the_socket_mode(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (it drops CAP_DAC_OVERRIDE for the client)")
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        os.chown(path, NOBODY, NOBODY)  # a socket of someone else, mode 0600: we may not connect
        path.chmod(0o600)
        server.listen(1)
        result = ctl("--socket", str(path), "status", without_dac_override=True)
    assert result.returncode == 1
    assert f"permission denied on {path}" in result.stderr and "--admin-group" in result.stderr


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


@pytest.fixture
def proxy(fresh_lab: Lab, tmp_path: Path) -> Iterator[RunningProxy]:
    running = start_proxy(fresh_lab, tmp_path, fresh_lab.config_yaml(extra="relay:\n  threads: 2\n"))
    try:
        yield running
    finally:
        stop_process(running.proc)


@pytest.mark.netns
def test_ctl_commands_in_the_daemons_namespace(fresh_lab: Lab, proxy: RunningProxy, tmp_path: Path) -> None:
    """Run inside the node namespace, ctl finds the daemon's socket without --socket."""
    lab, ns = fresh_lab, fresh_lab.node_ns
    status = ctl("status", ns=ns)
    assert status.returncode == 0, status.stderr
    assert "state:        serving (ready)" in status.stdout and "workers:      2 of 2" in status.stdout

    with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
        established.sendall(b"x")
        assert established.recv(1) == b"x"
        clusters = ctl("clusters", ns=ns)
        assert clusters.returncode == 0, clusters.stderr
        header, *rows = clusters.stdout.splitlines()
        assert header.split() == ["SERVICE", "VIP", "ENDPOINT", "WEIGHT", "ACTIVE", "TOTAL", "FAILURES"]
        echo_rows = [row.split() for row in rows if row.startswith("echo ")]
        assert len(echo_rows) == 3 and sum(int(row[4]) for row in echo_rows) == 1
        as_json = json.loads(ctl("--json", "clusters", ns=ns).stdout)
        assert {c["service"] for c in as_json["clusters"]} == {"echo", "iperf", "sink", "web"}

    workers = ctl("workers", ns=ns).stdout.splitlines()
    assert (
        workers[0].split() == ["WORKER", "PID", "READY", "HEARD", "ACTIVE", "ACCEPTED"] and len(workers) == 3
    )
    assert [w["index"] for w in json.loads(ctl("--json", "workers", ns=ns).stdout)["workers"]] == [0, 1]

    shown = ctl("config", "get", ns=ns).stdout
    assert shown.startswith("# version 1, sha256:") and "services:" in shown

    # diff: nothing for the running file, the change for an edited one.
    assert ctl("config", "diff", str(proxy.config_path), ns=ns).stdout == "no difference\n"
    edited = tmp_path / "edited.yaml"
    edited.write_text(lab.config_yaml(extra="relay:\n  threads: 2\n  connect_timeout: 2s\n"))
    diff = ctl("config", "diff", str(edited), ns=ns)
    assert diff.returncode == 1 and "-  connect_timeout: 1.0\n+  connect_timeout: 2.0\n" in diff.stdout

    applied = ctl("config", "apply", str(edited), "--if-version", "1", ns=ns)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.startswith("applied: version 2 (sha256:")
    stale = ctl("config", "apply", str(edited), "--if-version", "1", ns=ns)
    assert stale.returncode == 2 and "the running config is at version 2" in stale.stderr

    invalid = tmp_path / "invalid.yaml"
    invalid.write_text(lab.config_yaml(extra="relay:\n  threads: 2\n  connect_timeout: -1s\n"))
    rejected = ctl("config", "apply", str(invalid), ns=ns)
    assert rejected.returncode == 2 and "rejected (400): invalid config" in rejected.stderr
    assert any(line.startswith("relay.connect_timeout ") for line in rejected.stderr.splitlines())

    assert ctl("log-level", ns=ns).stdout == "info\n"
    assert ctl("log-level", "debug", ns=ns).stdout == "debug\n"
    assert ctl("--json", "log-level", ns=ns).stdout.strip() == '{\n  "level": "debug"\n}'
    assert ctl("access-log-level", ns=ns).stdout == "info\n"
    assert ctl("access-log-level", "warning", ns=ns).stdout == "warning\n"
    assert ctl("access-log-level", ns=ns).stdout == "warning\n"
    metrics = ctl("metrics", ns=ns)
    assert metrics.returncode == 0, metrics.stderr
    assert "# TYPE istio_tcp_connections_opened_total counter" in metrics.stdout
    assert (
        "istio_tcp_connections_opened_total{" in metrics.stdout
        and 'destination_service="echo"' in metrics.stdout
    )

    drained = ctl("drain", ns=ns)
    assert drained.returncode == 0 and drained.stdout.startswith("draining:")
    not_ready = ctl("status", ns=ns)
    assert not_ready.returncode == 3 and "state:        draining (not ready)" in not_ready.stdout
