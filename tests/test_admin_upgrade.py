"""Upgrade without dropping connections (issue 10, point 7): `nodeproxy ctl upgrade` starts a successor that
takes the listeners and the instance lock over the admin socket (SCM_RIGHTS); the old daemon stops accepting
and relays its established connections until they end; the capture rules stay in place throughout.

50 long-lived streams with continuous traffic and continuous short connections run across the upgrade:
no connection fails, none is reset, no byte is lost (sha256 of each stream)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.admin import AdminApi, Request, Response
from nodeproxy.ctl import AdminClient
from nodeproxy.lab import Lab
from tests.conftest import RunningProxy, running_lab, start_proxy
from tests.helpers import connect, pattern, wait_for

ECHO_VIP, ECHO_PORT = "10.96.0.11", 9000
STREAMS = 50
CHUNK = 4096
MAX_STREAM_BYTES = 8 << 20  # per stream: bounds the test's traffic however long the upgrade takes


@dataclass
class Stream:
    """One long-lived connection that keeps sending and reading back its echo until told to stop."""

    index: int
    sock: socket.socket
    sent: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: hashlib._Hash = field(default_factory=hashlib.sha256)
    bytes: int = 0
    rounds: int = 0
    error: str | None = None

    def run(self, stop: threading.Event) -> None:
        chunk = pattern(CHUNK, seed=self.index)
        try:
            while not stop.is_set() and self.bytes < MAX_STREAM_BYTES:
                self.sock.sendall(chunk)
                self.sent.update(chunk)
                got = 0
                while got < len(chunk):
                    data = self.sock.recv(len(chunk) - got)
                    if not data:
                        raise ConnectionError("the proxy closed the stream")
                    self.received.update(data)
                    got += len(data)
                self.bytes += len(chunk)
                self.rounds += 1
                time.sleep(0.01)
            self.sock.shutdown(socket.SHUT_WR)
            if self.sock.recv(1) != b"":  # the echo server half-closes after our FIN
                raise ConnectionError("bytes after the echo")
        except OSError as err:
            self.error = repr(err)


@dataclass
class ShortConnections:
    """Connect, exchange a few bytes, close: over and over."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    ok_times: list[float] = field(default_factory=list)

    def run(self, ns: str, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with connect(ns, ECHO_VIP, ECHO_PORT, timeout=5) as sock:
                    sock.sendall(b"short")
                    reply = b""
                    while len(reply) < 5:
                        data = sock.recv(5 - len(reply))
                        if not data:
                            break
                        reply += data
                    if reply != b"short":
                        raise ConnectionError(f"got {reply!r}")
                self.ok += 1
                self.ok_times.append(time.monotonic())
            except OSError as err:
                self.failures.append(repr(err))
            time.sleep(0.02)


def capture_watch(lab: Lab, stop: threading.Event, gaps: list[str]) -> None:
    """Record every moment the TPROXY rules or the policy routing are missing."""
    while not stop.is_set():
        save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
        rules = netns.run(lab.node_ns, ["ip", "rule", "show"])
        if "TPROXY" not in save or "lookup 133" not in rules:
            gaps.append(f"{time.monotonic():.3f}")
        time.sleep(0.1)


def admin_path(proxy: RunningProxy) -> str:
    for line in proxy.wait_log("admin socket open").splitlines():
        if "admin socket open" in line:
            return str(json.loads(line)["path"])
    raise AssertionError("unreachable")


def ctl(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeproxy", "ctl", "--socket", path, *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def stop_pid(pid: int, timeout: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


@pytest.mark.netns
def test_upgrade_drops_no_connection_and_loses_no_byte(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    ns = lab.client_pods[0].ns
    proxy = start_proxy(lab, tmp_path, lab.config_yaml(extra="relay:\n  threads: 2\n  drain_timeout: 60s\n"))
    successor = 0
    stop_streams, stop_short, stop_watch = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    try:
        path = admin_path(proxy)
        streams = [Stream(i, connect(ns, ECHO_VIP, ECHO_PORT, timeout=10)) for i in range(STREAMS)]
        threads += [threading.Thread(target=s.run, args=(stop_streams,)) for s in streams]
        short = [ShortConnections() for _ in range(2)]
        threads += [threading.Thread(target=s.run, args=(ns, stop_short)) for s in short]
        gaps: list[str] = []
        threads.append(threading.Thread(target=capture_watch, args=(lab, stop_watch, gaps)))
        for thread in threads:
            thread.start()
        wait_for(lambda: all(s.rounds > 0 for s in streams), 20, "every stream flowing")

        upgraded = ctl(path, "upgrade")
        assert upgraded.returncode == 0, upgraded.stderr + proxy.log()[-3000:]
        upgraded_at = time.monotonic()
        successor = int(upgraded.stdout.split("-> ")[1].split(";")[0])
        assert AdminClient(path).get("/v1/workers")["supervisor_pid"] == successor
        assert proxy.proc.poll() is None, "the old daemon relays its established streams"
        rounds_at_upgrade = [s.rounds for s in streams]
        time.sleep(2)  # traffic goes on: streams through the old daemon, new connections the new one
        assert all(s.rounds > r for s, r in zip(streams, rounds_at_upgrade, strict=True)), "a stream stalled"
        assert all(any(t > upgraded_at + 0.5 for t in s.ok_times) for s in short)

        stop_streams.set()
        stop_short.set()
        for thread in threads[:-1]:
            thread.join(timeout=30)
        # The last stream has ended: the old daemon finishes well before its 60 s drain deadline.
        assert proxy.proc.wait(timeout=15) == 0
        stop_watch.set()
        threads[-1].join(timeout=10)

        assert [s.error for s in streams if s.error] == []
        assert all(s.sent.digest() == s.received.digest() for s in streams), "bytes lost or changed"
        assert [f for s in short for f in s.failures] == []
        assert sum(s.ok for s in short) > 20
        assert gaps == [], "capture rules or routing were missing during the upgrade"
        assert "capture left in place: the successor owns it" in proxy.log()

        # The successor serves on its own and cleans up like any daemon.
        assert proxy.ready_file.read_text().strip() == str(successor)
        with connect(ns, ECHO_VIP, ECHO_PORT) as sock:
            sock.sendall(b"after")
            assert sock.recv(5) == b"after"
        assert ctl(path, "status").returncode == 0
        assert AdminClient(path).request("POST", "/v1/quit")[0] == 202
        wait_for(lambda: not alive(successor), 20, "the successor to stop")
        assert "TPROXY" not in netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
        assert not os.path.exists(path)
    finally:
        stop_streams.set()
        stop_short.set()
        stop_watch.set()
        for thread in threads:
            thread.join(timeout=30)
        if successor:
            stop_pid(successor)
        proxy.proc.kill()
        proxy.proc.wait()


@pytest.mark.netns
def test_a_failed_successor_leaves_the_old_daemon_serving(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    ns = lab.client_pods[0].ns
    good = lab.config_yaml(extra="relay:\n  threads: 2\n")
    proxy = start_proxy(lab, tmp_path, good)
    successor = 0
    try:
        path = admin_path(proxy)
        with connect(ns, ECHO_VIP, ECHO_PORT) as established:
            established.sendall(b"1")
            assert established.recv(1) == b"1"
            # The successor reads the file: with another worker count it refuses the listeners.
            proxy.config_path.write_text(lab.config_yaml(extra="relay:\n  threads: 3\n"))
            failed = ctl(path, "upgrade", "--wait", "15")
            assert failed.returncode == 1 and "still serves" in failed.stderr
            proxy.wait_log("change those with a restart")
            proxy.wait_log("upgrade abandoned")
            established.sendall(b"2")
            assert established.recv(1) == b"2"
            with connect(ns, ECHO_VIP, ECHO_PORT) as sock:
                sock.sendall(b"3")
                assert sock.recv(1) == b"3"
            assert AdminClient(path).get("/v1/ready")["ready"] is True
            assert "TPROXY" in proxy.iptables_save()
            # Once the file is right again, the upgrade goes through.
            proxy.config_path.write_text(good)
            upgraded = ctl(path, "upgrade")
            assert upgraded.returncode == 0, upgraded.stderr
            successor = int(upgraded.stdout.split("-> ")[1].split(";")[0])
            established.sendall(b"4")
            assert established.recv(1) == b"4"
        assert proxy.proc.wait(timeout=15) == 0
    finally:
        if successor:
            stop_pid(successor)
        proxy.proc.kill()
        proxy.proc.wait()


@pytest.mark.parametrize("target", ["/v1/handoff", "/v1/handoff/commit"])
def test_only_root_may_take_the_listeners(target: str) -> None:
    """A member of --admin-group may use the API, but not take the listeners (or the capture) away."""
    answers: list[Response] = []
    api = AdminApi(control=None)  # type: ignore[arg-type]  # refused before the control is asked
    request = Request("POST", target, "", {}, b"", "pid 7 uid 1000", peer_pid=7, peer_uid=1000)
    api(request, answers.append)
    assert [(a.status, a.body) for a in answers] == [
        (403, {"error": "only root may take over the listeners"})
    ]
