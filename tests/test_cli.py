"""The README's commands, run as a user would: the demo and `nodeproxy lab up|down`."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest

from nodeproxy import netns

pytestmark = pytest.mark.netns


def nodeproxy(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeproxy", *argv], capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_end_to_end_and_cleans_up() -> None:
    proc = nodeproxy("demo")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "sha256 matches: True" in proc.stdout
    assert "NODEPROXY rules left: 0" in proc.stdout
    assert not [ns for ns in netns.list_names() if ns.startswith("npdemo-")]


def test_lab_up_and_down() -> None:
    prefix = f"npt{secrets.token_hex(2)}"
    try:
        up = nodeproxy("lab", "up", "--prefix", prefix, "--clients", "1", "--backends", "2")
        assert up.returncode == 0, up.stderr
        assert {f"{prefix}-node", f"{prefix}-pod0", f"{prefix}-be0", f"{prefix}-be1"} <= set(
            netns.list_names()
        )
        # The backends answer, and the node has no route to anywhere outside the lab.
        out = netns.run(f"{prefix}-pod0", ["curl", "-s", "-m", "5", "http://10.244.1.101:8080/"])
        assert out.startswith("backend=be1 client=10.244.1.10:")
        assert "default" not in netns.run(f"{prefix}-node", ["ip", "route", "show"])
    finally:
        down = nodeproxy("lab", "down", "--prefix", prefix)
    assert down.returncode == 0
    assert not [ns for ns in netns.list_names() if ns.startswith(prefix)]
