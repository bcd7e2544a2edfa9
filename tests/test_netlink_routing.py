"""Policy routing goes through netlink (pyroute2), never through the `ip` command (issue 10, point 5).

Each test runs `nodeproxy capture ...` in a namespace of its own with a PATH that holds iptables but no
`ip`, and checks the kernel's view with `ip` from outside that PATH.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns

pytestmark = pytest.mark.netns

CONFIG = """\
node: {name: netlink-test}
capture:
  pod_cidrs: [10.77.0.0/16]
  route_table: 177
  rule_priority: 177
  chain_prefix: NPNL
"""


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"npt{secrets.token_hex(2)}-nl"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        netns.run(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def no_ip_path(tmp_path: Path) -> str:
    """A PATH with the iptables tools and nothing else: running `ip` from it fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("iptables", "iptables-restore", "iptables-save"):
        real = shutil.which(tool)
        assert real is not None, f"{tool} is needed"
        (bin_dir / tool).symlink_to(real)
    return str(bin_dir)


def nodeproxy_capture(ns: str, path: str, config: Path, action: str) -> str:
    env = {**os.environ, "PATH": path}
    ip = shutil.which("ip")  # found on this process's PATH: the command under test gets one without `ip`
    assert ip is not None
    proc = subprocess.run(
        [
            ip,
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "nodeproxy",
            "capture",
            action,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rules(ns: str) -> list[str]:
    return [line for line in netns.run(ns, ["ip", "rule", "show"]).splitlines() if "lookup 177" in line]


def routes(ns: str) -> list[str]:
    return netns.run(ns, ["ip", "route", "show", "table", "177"], check=False).splitlines()


def test_install_show_remove_without_the_ip_command(namespace: str, no_ip_path: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    nodeproxy_capture(namespace, no_ip_path, config, "install")
    nodeproxy_capture(namespace, no_ip_path, config, "install")  # idempotent: still one of each
    assert rules(namespace) == ["177:\tfrom all fwmark 0x539/0xfff lookup 177"]
    assert [r.split()[:3] for r in routes(namespace)] == [["local", "default", "dev"]]
    shown = nodeproxy_capture(namespace, no_ip_path, config, "show").splitlines()
    assert "177:\tfrom all fwmark 0x539/0xfff lookup 177" in shown
    assert "local default dev #1 table 177" in shown  # lo is ifindex 1 in a new namespace
    assert any("TPROXY" in line for line in shown)
    nodeproxy_capture(namespace, no_ip_path, config, "remove")
    assert rules(namespace) == [] and routes(namespace) == []
    nodeproxy_capture(namespace, no_ip_path, config, "remove")  # nothing left: still succeeds
    assert "NPNL" not in netns.run(namespace, ["iptables-save", "-t", "mangle"])


def test_install_completes_and_remove_clears_a_half_installed_routing(
    namespace: str, no_ip_path: str, tmp_path: Path
) -> None:
    """What a kill -9 between the rule and the route leaves: install completes it, remove clears it."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    netns.run(namespace, ["ip", "rule", "add", "fwmark", "0x539/0xfff", "lookup", "177", "priority", "177"])
    nodeproxy_capture(namespace, no_ip_path, config, "install")
    assert len(rules(namespace)) == 1 and len(routes(namespace)) == 1
    nodeproxy_capture(namespace, no_ip_path, config, "remove")
    netns.run(namespace, ["ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "177"])
    nodeproxy_capture(namespace, no_ip_path, config, "remove")  # a route without its rule
    assert rules(namespace) == [] and routes(namespace) == []
