"""The README's commands, run as a user would: the demo and `nodeproxy lab up|down`."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time

import pytest

from nodeproxy import netns
from tests.conftest import running_lab
from tests.helpers import connect

pytestmark = pytest.mark.netns


def nodeproxy(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeproxy", *argv], capture_output=True, text=True, timeout=timeout
    )


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


def test_lab_echo_backend_keeps_no_descriptor_per_finished_connection() -> None:
    with running_lab(clients=1, backends=1) as lab:
        backend = lab.backend_pods[0]
        (pid,) = netns.pids(backend.ns)

        def open_fds() -> int:
            return len(os.listdir(f"/proc/{pid}/fd"))

        before = open_fds()
        for _ in range(40):
            with connect(lab.client_pods[0].ns, backend.ip, 9000) as sock:
                sock.sendall(b"echo me")
                sock.shutdown(socket.SHUT_WR)
                received = b""
                while chunk := sock.recv(64):
                    received += chunk
                assert received == b"echo me"
        deadline = time.monotonic() + 5
        while open_fds() > before + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_fds() <= before + 2, (before, open_fds())
