"""Fixtures: a namespace lab per test module and a nodeproxy daemon running in its node namespace.

Everything a fixture starts is torn down in a finally block, so a failing test leaves no namespaces,
rules or processes behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.lab import Lab, stop_process

NEEDS = ("ip", "iptables", "iptables-restore")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    reason = (
        ("needs root" if os.geteuid() != 0 else f"missing tools: {', '.join(missing)}")
        if (os.geteuid() != 0 or missing)
        else None
    )
    if reason:
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@dataclass
class RunningProxy:
    lab: Lab
    proc: subprocess.Popen[bytes]
    config_path: Path
    ready_file: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in daemon log:\n{self.log()[-4000:]}")

    def reload(self, config_yaml: str) -> None:
        self.config_path.write_text(config_yaml)
        self.proc.send_signal(1)  # SIGHUP

    def iptables_save(self) -> str:
        return netns.run(self.lab.node_ns, ["iptables-save", "-t", "mangle"])


def spawn_proxy(lab: Lab, tmp: Path, config_yaml: str, env: dict[str, str] | None = None) -> RunningProxy:
    """Start `nodeproxy run` in the lab's node namespace without waiting for it (see start_proxy)."""
    config_path, ready, log_path = tmp / "config.yaml", tmp / "ready", tmp / "daemon.log"
    config_path.write_text(config_yaml)
    ready.unlink(missing_ok=True)
    log_file = log_path.open("wb")
    proc = lab.spawn(
        lab.node_ns,
        [sys.executable, "-m", "nodeproxy", "run", "--config", str(config_path), "--ready-file", str(ready)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log_file.close()
    return RunningProxy(lab, proc, config_path, ready, log_path)


def wait_ready(proxy: RunningProxy, timeout: float = 20.0) -> RunningProxy:
    deadline = time.monotonic() + timeout
    while not proxy.ready_file.exists():
        if proxy.proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proxy.proc)
            raise RuntimeError(f"nodeproxy did not become ready:\n{proxy.log()}")
        time.sleep(0.05)
    return proxy


def start_proxy(
    lab: Lab, tmp: Path, config_yaml: str, timeout: float = 20.0, env: dict[str, str] | None = None
) -> RunningProxy:
    return wait_ready(spawn_proxy(lab, tmp, config_yaml, env), timeout)


def new_lab(clients: int = 2, backends: int = 3) -> Lab:
    return Lab(prefix=f"npt{secrets.token_hex(2)}", clients=clients, backends=backends)


@contextlib.contextmanager
def running_lab(clients: int = 2, backends: int = 3) -> Iterator[Lab]:
    """A lab with its backends serving, torn down however the block ends."""
    lab = new_lab(clients, backends)
    try:
        lab.up()
        lab.start_backends()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab() as lab:
        yield lab


@pytest.fixture(scope="module")
def proxy(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    running = start_proxy(lab, tmp_path_factory.mktemp("proxy"), lab.config_yaml())
    try:
        yield running
    finally:
        stop_process(running.proc)
        subprocess.run(
            netns.exec_argv(
                lab.node_ns,
                [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(running.config_path)],
            ),
            capture_output=True,
        )
