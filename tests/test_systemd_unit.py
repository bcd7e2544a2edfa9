"""systemd/nodeproxy.service (issue 10, point 4): `systemd-analyze verify` accepts it, `systemd-analyze
security` rates it 3.0 or better, and the daemon captures traffic with no more capabilities than the unit's
bounding set grants. Skipped where systemd-analyze (or setpriv) is missing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy.ctl import AdminClient
from nodeproxy.lab import Lab, stop_process
from tests.conftest import RunningProxy, running_lab, wait_ready
from tests.helpers import connect

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "nodeproxy.service"
MAX_EXPOSURE = 3.0

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


def unit_setting(name: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{name}=")]


def installable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart & co. pointing at this checkout's `nodeproxy` (verify checks they exist)."""
    entry = shutil.which("nodeproxy")
    if entry is None:
        pytest.skip("the nodeproxy entry point is not installed")
    unit = tmp_path / "nodeproxy.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/nodeproxy", entry))
    return unit


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = installable_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [
        line for line in (result.stdout + result.stderr).splitlines() if "nodeproxy.service" in line
    ]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr


@needs_analyze
def test_security_exposure_is_at_most_three(tmp_path: Path) -> None:
    unit = installable_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for nodeproxy\.service: ([0-9.]+)", result.stdout)
    if match is None and "--offline" in result.stderr:
        pytest.skip("this systemd-analyze cannot rate a unit file offline (systemd < 252)")
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_the_unit_keeps_what_capture_and_the_admin_api_need() -> None:
    assert unit_setting("Type") == ["notify"] and unit_setting("NotifyAccess") == ["main"]
    assert unit_setting("WatchdogSec") and unit_setting("RuntimeDirectory") == ["nodeproxy"]
    assert set(unit_setting("CapabilityBoundingSet")[0].split()) == {
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_BPF",
    }
    assert set(unit_setting("RestrictAddressFamilies")[0].split()) >= {"AF_INET", "AF_NETLINK", "AF_UNIX"}
    assert unit_setting("PrivateNetwork") == [] and unit_setting("PrivateUsers") == []
    assert "/etc/nodeproxy" in unit_setting("ReadWritePaths")[0].split()  # config.yaml.pushed


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


@pytest.mark.netns
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv (util-linux)")
def test_capture_works_with_only_the_units_capabilities(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    caps = ",".join(
        "+" + cap.removeprefix("CAP_").lower() for cap in unit_setting("CapabilityBoundingSet")[0].split()
    )
    config_path, ready, log_path = tmp_path / "config.yaml", tmp_path / "ready", tmp_path / "daemon.log"
    config_path.write_text(lab.config_yaml(extra="relay:\n  threads: 2\n"))
    admin_socket = str(tmp_path / "admin.sock")
    argv = [
        "setpriv",
        f"--bounding-set=-all,{caps}",
        "--inh-caps=-all",
        "--",
        sys.executable,
        "-m",
        "nodeproxy",
        "run",
        "--config",
        str(config_path),
        "--ready-file",
        str(ready),
        "--admin-socket",
        admin_socket,
    ]
    with log_path.open("wb") as log_file:
        proc = lab.spawn(lab.node_ns, argv, stdout=log_file, stderr=subprocess.STDOUT)
    proxy = wait_ready(RunningProxy(lab, proc, config_path, ready, log_path))
    try:
        status = Path(f"/proc/{_daemon_pid(proxy)}/status").read_text()
        effective = int(re.search(r"CapEff:\s*([0-9a-f]+)", status)[1], 16)  # type: ignore[index]
        assert effective == (1 << 12) | (1 << 13) | (1 << 39), f"{effective:#x}"  # NET_ADMIN, NET_RAW, BPF
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as sock:
            sock.sendall(b"captured")
            assert sock.recv(16) == b"captured"
        assert AdminClient(admin_socket).get("/v1/stats")["accepted"] == 1
        assert stop_process(proxy.proc) == 0
        assert "Traceback" not in proxy.log()
        if _reuseport_loads_here():  # the unit's capabilities are enough for the balancer too
            assert "least-loaded balancing unavailable" not in proxy.log()
    finally:
        stop_process(proxy.proc)


def _daemon_pid(proxy: RunningProxy) -> int:
    """`ip netns exec` and setpriv exec in place: the Popen pid is the supervisor's."""
    return proxy.proc.pid


def _reuseport_loads_here() -> bool:
    """Whether this kernel (and our full privileges) can load the reuseport balancer at all."""
    from nodeproxy import _reuseport

    try:
        _reuseport.LoadTable(2)
    except OSError:
        return False
    return True
