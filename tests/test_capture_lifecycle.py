"""Capture lifecycle under contention (issue 6, defect 11): routing is in place before the TPROXY rules and
leaves after them; a held xtables lock delays or fails a stop cleanly, never with an uncaught timeout.

This host's iptables is iptables-nft, which ignores the xtables lock, and the real lock (/run/xtables.lock)
is shared with every namespace on the machine. So the daemon under test runs with a stand-in `iptables` /
`iptables-restore` first in its PATH that behaves like iptables-legacy on a private lock file: `-w N` waits
at most N seconds and then fails with exit status 4, `-w` alone waits forever. The stand-in also records
whether the policy routing existed whenever TPROXY rules went in or the hook came out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.lab import Lab, stop_process
from tests.conftest import RunningProxy, running_lab, start_proxy

pytestmark = pytest.mark.netns

STAND_IN = r"""#!/bin/sh
real="{real}"
wait=""
prev=""
for arg in "$@"; do
    if [ "$prev" = "-w" ]; then
        case "$arg" in ''|*[!0-9]*) ;; *) wait="$arg" ;; esac
    fi
    prev="$arg"
done
exec 9>"{lock}"
if [ -n "$wait" ]; then
    flock -w "$wait" 9 || {{
        echo "Another app is currently holding the xtables lock. Stopped waiting after ${{wait}}s." >&2
        exit 4
    }}
else
    flock 9
fi
routed() {{ if ip rule show | grep -q "lookup 133"; then echo routed; else echo unrouted; fi; }}
case "$(basename "$0")" in
iptables-restore)
    input="$(cat)"
    case "$input" in *TPROXY*) echo "tproxy-rules-in $(routed)" >> "{record}" ;; esac
    printf '%s\n' "$input" | "$real" "$@"
    exit $?
    ;;
esac
case " $* " in *" -D PREROUTING "*) echo "hook-out $(routed)" >> "{record}" ;; esac
exec "$real" "$@"
"""


@dataclass
class StandIn:
    env: dict[str, str]
    lock: Path
    record: Path

    @contextlib.contextmanager
    def lock_held(self) -> Iterator[None]:
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock, however the test ends


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


@pytest.fixture
def stand_in(tmp_path: Path) -> StandIn:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    lock, record = tmp_path / "xtables.lock", tmp_path / "record"
    for name in ("iptables", "iptables-restore"):
        real = shutil.which(name)
        assert real is not None
        script = bin_dir / name
        script.write_text(STAND_IN.format(real=real, lock=lock, record=record))
        script.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    return StandIn(env, lock, record)


def config(lab: Lab) -> str:
    return lab.config_yaml(extra="relay:\n  drain_timeout: 1s\n")


def nodeproxy_cleanup(lab: Lab, proxy: RunningProxy) -> None:
    subprocess.run(
        netns.exec_argv(
            lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(proxy.config_path)]
        ),
        capture_output=True,
        timeout=60,
    )


def rules_present(lab: Lab) -> bool:
    return "NODEPROXY" in netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])


def test_routing_is_installed_first_and_removed_last(
    fresh_lab: Lab, tmp_path: Path, stand_in: StandIn
) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, config(lab), env=stand_in.env)
    try:
        assert stop_process(proxy.proc) == 0
        record = stand_in.record.read_text().split("\n")
        assert "tproxy-rules-in routed" in record and "hook-out routed" in record, record
        assert not [line for line in record if line.endswith("unrouted")], record
        assert not rules_present(lab)
    finally:
        stop_process(proxy.proc)
        nodeproxy_cleanup(lab, proxy)


def test_a_briefly_held_xtables_lock_delays_the_stop(
    fresh_lab: Lab, tmp_path: Path, stand_in: StandIn
) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, config(lab), env=stand_in.env)
    try:
        with stand_in.lock_held():
            proxy.proc.send_signal(signal.SIGTERM)
            time.sleep(3)
            assert proxy.proc.poll() is None  # waiting for the lock, within its budget
        assert proxy.proc.wait(timeout=20) == 0, proxy.log()[-3000:]
        assert not rules_present(lab)
        assert "Traceback" not in proxy.log()
    finally:
        stop_process(proxy.proc)
        nodeproxy_cleanup(lab, proxy)


def test_a_held_xtables_lock_fails_the_stop_cleanly_and_in_bounded_time(
    fresh_lab: Lab, tmp_path: Path, stand_in: StandIn
) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, config(lab), env=stand_in.env)
    try:
        with stand_in.lock_held():
            proxy.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = proxy.proc.wait(timeout=30)
            took = time.monotonic() - started
        log = proxy.log()
        assert code == 1, log[-3000:]
        assert took < 25, took
        assert "Traceback" not in log and "TimeoutExpired" not in log, log[-3000:]
        assert "held the xtables lock for more than" in log and "run `nodeproxy cleanup`" in log, log
        assert '"event": "worker stopped"' in log  # the workers still drained and stopped
        assert not proxy.ready_file.exists()
        # The rules stay (with the routing, so nothing is half removed) until cleanup runs.
        assert rules_present(lab)
        nodeproxy_cleanup(lab, proxy)
        assert not rules_present(lab)
    finally:
        stop_process(proxy.proc)
        nodeproxy_cleanup(lab, proxy)
