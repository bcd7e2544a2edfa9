"""The descriptor budget on a real lab (issue 6, defect 2): under a descriptor limit, a worker admits
only as many connections as it can carry when every one of them is moving bulk data both ways (two
sockets and two pipes: six descriptors), so established connections are never cut short for want of
descriptors; connections beyond that are refused at once and logged as a local limit."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.lab import Lab, stop_process
from tests.conftest import running_lab
from tests.helpers import connect, listen
from tests.test_accesslog import parse_access_log

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        shutil.which("setpriv") is None or shutil.which("prlimit") is None,
        reason="needs setpriv and prlimit (util-linux)",
    ),
]

BULK_PORT = 9310
CONNECTIONS = 200
# The worker reserves what it holds at start (~30), the relay's pooled pipes (258) and 32 spare: about
# 320. With this limit the six-descriptor budget admits about 113 connections; a three-descriptor budget
# would admit about 226, and 200 stalled bulk connections need 1,200 descriptors: EMFILE mid-stream.
FD_LIMIT = 1000
SMALL_BUFFERS = "4096 16384 65536"  # tcp_rmem/tcp_wmem: a stalled connection fills its pipes quickly


@pytest.fixture
def small_buffer_lab() -> Iterator[Lab]:
    with running_lab(clients=1, backends=1) as lab:
        for ns in (lab.node_ns, lab.client_pods[0].ns, lab.backend_pods[0].ns):
            for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
                netns.run(ns, ["sysctl", "-q", "-w", f"{key}={SMALL_BUFFERS}"])
        yield lab


def start_limited_proxy(lab: Lab, tmp: Path, config_yaml: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    config_path, ready, log_path = tmp / "config.yaml", tmp / "ready", tmp / "daemon.log"
    config_path.write_text(config_yaml)
    with log_path.open("wb") as log_file:
        # Without CAP_SYS_RESOURCE the daemon cannot raise the hard limit prlimit sets (as in a pod).
        proc = lab.spawn(
            lab.node_ns,
            [
                "setpriv",
                "--inh-caps=-sys_resource",
                "--bounding-set=-sys_resource",
                "prlimit",
                f"--nofile={FD_LIMIT}:{FD_LIMIT}",
                "--",
                sys.executable,
                "-m",
                "nodeproxy",
                "run",
                "--config",
                str(config_path),
                "--ready-file",
                str(ready),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise RuntimeError(f"nodeproxy did not become ready:\n{log_path.read_text()}")
        time.sleep(0.05)
    return proc, config_path, log_path


def fill(socks: list[socket.socket], quiet_for: float = 0.5, limit: float = 10.0) -> list[int]:
    """Send on every socket until the paths to peers that do not read are full (no progress on any for
    `quiet_for`); returns the bytes each one sent."""
    chunk = b"x" * 65536
    sent = [0] * len(socks)
    for sock in socks:
        sock.setblocking(False)
    started = last_progress = time.monotonic()
    while time.monotonic() - last_progress < quiet_for and time.monotonic() - started < limit:
        progressed = False
        for i, sock in enumerate(socks):
            try:
                sent[i] += sock.send(chunk)
                progressed = True
            except BlockingIOError:
                pass
        if progressed:
            last_progress = time.monotonic()
        else:
            time.sleep(0.01)
    return sent


def drain(sock: socket.socket, expected: int, timeout: float = 20.0) -> int:
    """Read until `expected` bytes arrived (or EOF, an error or the timeout)."""
    sock.settimeout(timeout)
    received = 0
    try:
        while received < expected:
            data = sock.recv(1 << 16)
            if not data:
                break
            received += len(data)
    except OSError:
        pass
    return received


def test_stalled_bulk_connections_under_a_descriptor_limit(small_buffer_lab: Lab, tmp_path: Path) -> None:
    lab = small_buffer_lab
    pod, backend = lab.client_pods[0], lab.backend_pods[0]
    proc, config_path, log_path = start_limited_proxy(
        lab, tmp_path, lab.config_yaml(extra="relay:\n  threads: 1\n  pipe_size: 65536\n")
    )
    upstreams: list[socket.socket] = []
    clients: list[socket.socket] = []
    try:
        startup = log_path.read_text()
        warning = next(
            json.loads(line) for line in startup.splitlines() if "descriptor limit caps connections" in line
        )
        assert warning["fd_limit_per_worker"] == FD_LIMIT and warning["fds_per_connection"] == 6
        cap = int(warning["connection_cap"])
        assert 50 <= cap < CONNECTIONS, warning

        with listen(backend.ns, BULK_PORT) as server:
            server.settimeout(0.5)
            stop = threading.Event()

            def accept_all() -> None:
                while not stop.is_set():
                    try:
                        upstreams.append(server.accept()[0])
                    except TimeoutError:
                        continue

            acceptor = threading.Thread(target=accept_all)
            acceptor.start()
            try:
                for _ in range(CONNECTIONS):
                    try:
                        clients.append(connect(pod.ns, backend.ip, BULK_PORT))
                    except OSError:
                        continue  # a refusal can beat the handshake's end
                deadline = time.monotonic() + 10
                while len(upstreams) < cap and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
            finally:
                stop.set()
                acceptor.join()
        admitted = min(cap, CONNECTIONS)
        assert len(upstreams) == admitted, (len(upstreams), cap)

        # Both directions of every admitted connection fill up: each holds its two sockets and two pipes.
        # Pair each upstream with its client: the proxy picks its own source port, so each client says
        # which one it is. A refused client's send fails (reset) or goes nowhere.
        for index, client in enumerate(clients):
            with contextlib.suppress(OSError):
                client.sendall(index.to_bytes(4, "big"))
        by_index = {}
        for upstream in upstreams:
            upstream.settimeout(5)
            by_index[int.from_bytes(upstream.recv(4, socket.MSG_WAITALL), "big")] = upstream
        pairs = [(clients[i], upstream) for i, upstream in sorted(by_index.items())]
        assert len(pairs) == admitted
        worker = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        fds_idle = len(os.listdir(f"/proc/{worker}/fd"))
        sent = fill([s for pair in pairs for s in pair])
        fds_stalled = len(os.listdir(f"/proc/{worker}/fd"))
        # Stalled both ways, every admitted connection holds its two pipes as well as its two sockets,
        # and the worker still has descriptors to spare: it never met EMFILE, which would have refused
        # connections at random or pushed the relay off splice.
        assert fds_stalled - fds_idle >= 4 * admitted, (fds_idle, fds_stalled, admitted)
        assert fds_stalled <= FD_LIMIT - 32, (fds_idle, fds_stalled, admitted)
        # Now read everything: every admitted connection delivers every byte both ways.
        for index, (client, upstream) in enumerate(pairs):
            up, down = sent[2 * index], sent[2 * index + 1]
            assert drain(upstream, up) == up, f"connection {index}: upstream got {up} bytes"
            assert drain(client, down) == down, f"connection {index}: client got {down} bytes"
    finally:
        for sock in clients + upstreams:
            sock.close()
        stop_process(proc)
        subprocess.run(
            netns.exec_argv(
                lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(config_path)]
            ),
            capture_output=True,
        )
    records = parse_access_log(log_path.read_text())
    refused = [r for r in records if r.get("event") == "connection refused"]
    assert len(refused) >= CONNECTIONS - admitted
    assert all("connection limit reached" in str(r["reason"]) for r in refused)
    endings = {r["ending"] for r in records if r.get("event") == "connection closed"}
    assert endings <= {"closed", "aborted"}, endings  # aborted: still open when the daemon stopped
