"""The sd_notify protocol against a real NOTIFY_SOCKET datagram receiver (issue 10, point 4): READY=1 only
once the capture rules, the listeners and the admin socket are up; STATUS= with connection counts;
WATCHDOG=1 only while every worker answers its heartbeats; STOPPING=1 on SIGTERM."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.ctl import AdminClient
from nodeproxy.daemon import HEARTBEAT_TIMEOUT, WATCHDOG_HEARTBEAT_AGE
from nodeproxy.lab import Lab, stop_process
from tests.conftest import running_lab, spawn_proxy, wait_ready
from tests.helpers import connect, wait_for
from tests.test_supervisor import live_workers

pytestmark = pytest.mark.netns

WATCHDOG_USEC = 1_500_000  # the daemon pings every third of it: 0.5 s


@dataclass
class Notification:
    at: float  # monotonic
    fields: dict[str, str]
    # What was true when the datagram arrived (READY=1 only): checked by the receiver at once.
    observed: dict[str, object] = field(default_factory=dict)


class NotifyReceiver:
    """systemd's side of NOTIFY_SOCKET: a datagram socket that records every notification."""

    def __init__(self, path: Path, on_ready: object = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.notifications: list[Notification] = []
        self.on_ready = on_ready
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            note = Notification(time.monotonic(), fields)
            if fields.get("READY") == "1" and callable(self.on_ready):
                note.observed = self.on_ready()
            self.notifications.append(note)

    def with_field(self, name: str) -> list[Notification]:
        return [n for n in list(self.notifications) if name in n.fields]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


def test_ready_status_watchdog_and_stopping(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab

    def observe() -> dict[str, object]:
        """At READY=1: are the capture rules in, does the admin socket answer?"""
        save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
        opened = [
            line for line in (tmp_path / "daemon.log").read_text().splitlines() if "admin socket open" in line
        ]
        try:
            ready = AdminClient(json.loads(opened[0])["path"], timeout=2).get("/v1/ready")["ready"]
        except (RuntimeError, IndexError) as err:
            ready = repr(err)
        return {"tproxy_rules": "TPROXY" in save, "admin_ready": ready}

    receiver = NotifyReceiver(tmp_path / "notify.sock", on_ready=observe)
    env = {**os.environ, "NOTIFY_SOCKET": str(receiver.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    config = lab.config_yaml(extra="relay:\n  threads: 2\n  drain_timeout: 1s\n")
    proxy = spawn_proxy(lab, tmp_path, config, env=env)
    try:
        wait_for(lambda: bool(receiver.with_field("READY")), 20, "READY=1")
        ready = receiver.with_field("READY")
        assert len(ready) == 1 and ready[0].fields["MAINPID"] == str(proxy.proc.pid)
        assert ready[0].observed == {"tproxy_rules": True, "admin_ready": True}, ready[0].observed
        assert ready[0].fields["STATUS"].startswith("serving: 2 workers, 0 active connections")

        # Watchdog pings come every 0.5 s while both workers answer.
        time.sleep(2)
        pings = [n.at for n in receiver.with_field("WATCHDOG")]
        assert len(pings) >= 3 and max(b - a for a, b in itertools.pairwise(pings)) < 1.0

        # STATUS= follows the connection count.
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
            established.sendall(b"x")
            assert established.recv(1) == b"x"
            wait_for(
                lambda: any(
                    "1 active connections" in n.fields["STATUS"] for n in receiver.with_field("STATUS")
                ),
                8,
                "STATUS= with 1 active connection",
            )

        # A stopped worker: pings stop within WATCHDOG_HEARTBEAT_AGE (+ a heartbeat and a ping interval),
        # and resume once the supervisor has replaced the worker after HEARTBEAT_TIMEOUT.
        stopped = live_workers(proxy)[0]
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.monotonic()
        time.sleep(WATCHDOG_HEARTBEAT_AGE + 2)
        silent_from = stopped_at + WATCHDOG_HEARTBEAT_AGE + 1.5
        time.sleep(max(0.0, stopped_at + 8 - time.monotonic()))
        during = [n.at for n in receiver.with_field("WATCHDOG") if silent_from < n.at < stopped_at + 8]
        assert during == [], "WATCHDOG=1 while a worker did not answer"
        wait_for(
            lambda: any(n.at > stopped_at + HEARTBEAT_TIMEOUT for n in receiver.with_field("WATCHDOG")),
            HEARTBEAT_TIMEOUT + 10,
            "watchdog pings again after the worker was replaced",
        )
        assert "worker stopped answering; killing it" in proxy.log()

        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=20) == 0
        stopping = receiver.with_field("STOPPING")
        assert len(stopping) == 1 and stopping[0].fields["STOPPING"] == "1"
    finally:
        stop_process(proxy.proc)
        receiver.close()


def test_an_unreachable_notify_socket_does_not_stop_the_daemon(fresh_lab: Lab, tmp_path: Path) -> None:
    """systemd gone for a moment (or NOTIFY_SOCKET wrong): READY=1 and the pings fail, the daemon serves."""
    lab = fresh_lab
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "nobody.sock"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    proxy = spawn_proxy(lab, tmp_path, lab.config_yaml(), env=env)
    try:
        wait_ready(proxy)
        time.sleep(1)  # a few watchdog pings
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as sock:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        assert "sd_notify failed" in proxy.log()
        assert stop_process(proxy.proc) == 0
    finally:
        stop_process(proxy.proc)
