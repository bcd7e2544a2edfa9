"""The supervisor under faults (issue 6): a stopped worker during a reload storm, crashed workers and crash
loops, readiness, the supervisor's own death with capture.on_failure open and closed, a second instance,
and signals that arrive while the daemon starts."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.config import parse_config
from nodeproxy.daemon import CRASH_LOOP_LIMIT, HEARTBEAT_TIMEOUT
from nodeproxy.lab import Lab, stop_process
from tests.conftest import RunningProxy, running_lab, spawn_proxy, start_proxy, wait_ready
from tests.helpers import child_pids, connect, http_get, wait_for

pytestmark = pytest.mark.netns

LISTEN_PORT = 15001


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


def two_workers(lab: Lab, on_failure: str = "open", extra: str = "") -> str:
    drain = "" if "drain_timeout" in extra else "  drain_timeout: 1s\n"
    config = lab.config_yaml(extra=f"relay:\n  threads: 2\n{drain}{extra}")
    return config.replace("capture:\n", f"capture:\n  on_failure: {on_failure}\n", 1)


def many_services(lab: Lab, count: int) -> str:
    """Services enough to make one config line a sizeable share of a 64 KiB pipe."""
    endpoints = "".join(f"      - address: {p.ip}\n" for p in lab.backend_pods)
    return "".join(
        f"  - name: extra{i}\n    vip: 10.96.{1 + i // 200}.{1 + i % 200}\n"
        f"    ports: [{{port: 80, target_port: 8080}}]\n    endpoints:\n{endpoints}"
        for i in range(count)
    )


def live_workers(proxy: RunningProxy) -> list[int]:
    """The supervisor's children that are not zombies."""
    alive = []
    for pid in child_pids(proxy.proc.pid):
        with contextlib.suppress(FileNotFoundError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
    return alive


def listening_inodes(pid: int, port: int) -> set[int]:
    """Inodes of the TCP sockets listening on `port` in the network namespace of process `pid`."""
    inodes = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
            inodes.add(int(fields[9]))
    return inodes


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def rules_present(lab: Lab) -> tuple[bool, bool, bool]:
    save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
    rules = netns.run(lab.node_ns, ["ip", "rule", "show"])
    routes = netns.run(lab.node_ns, ["ip", "route", "show", "table", "133"], check=False)  # may not exist
    return "NODEPROXY" in save, "lookup 133" in rules, "local" in routes


def cleanup(lab: Lab, proxy: RunningProxy) -> None:
    subprocess.run(
        netns.exec_argv(
            lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(proxy.config_path)]
        ),
        capture_output=True,
        timeout=60,
    )


# -- defect 6: the supervisor never blocks on a worker -----------------------------------------------------


def test_stopped_worker_during_reload_storm_does_not_wedge_the_supervisor(
    fresh_lab: Lab, tmp_path: Path
) -> None:
    lab = fresh_lab
    config = two_workers(lab) + many_services(lab, 40)
    line = parse_config(config).model_dump_json()
    assert len(line) * 40 > 2 * 65536, "the reloads must overflow a stopped worker's control pipe"
    proxy = start_proxy(lab, tmp_path, config)
    stuck: int | None = None
    try:
        stuck, other = live_workers(proxy)
        os.kill(stuck, signal.SIGSTOP)
        for reloads in range(1, 41):  # one at a time: a pending SIGHUP absorbs another

            def reloaded(n: int = reloads) -> bool:
                return proxy.log().count("config reloaded") == n

            proxy.proc.send_signal(signal.SIGHUP)
            wait_for(reloaded, 5, f"reload {reloads}")
        # The supervisor still reaps and replaces a crashed worker ...
        os.kill(other, signal.SIGKILL)
        wait_for(lambda: len([p for p in live_workers(proxy) if p not in (stuck, other)]) >= 1, 10, "respawn")
        log = proxy.wait_log('"signal": "SIGKILL"')
        assert "worker died; replacing it" in log
        # ... and kills and replaces the stopped one once its heartbeat is overdue.
        wait_for(
            lambda: stuck not in live_workers(proxy) and len(live_workers(proxy)) == 2,
            HEARTBEAT_TIMEOUT + 10,
            "the stopped worker to be replaced",
        )
        assert "worker stopped answering; killing it" in proxy.log()
        for _ in range(6):
            assert http_get(lab.client_pods[0].ns, "10.96.1.1").startswith("backend=")
        # And it still answers SIGTERM.
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.proc.wait(timeout=20) == 0, proxy.log()[-3000:]
        assert rules_present(lab) == (False, False, False)
    finally:
        if stuck is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stuck, signal.SIGKILL)
        stop_process(proxy.proc)
        cleanup(lab, proxy)


def test_a_long_drain_is_not_mistaken_for_a_stuck_worker(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    drain = HEARTBEAT_TIMEOUT + 4
    proxy = start_proxy(lab, tmp_path, two_workers(lab, extra=f"  drain_timeout: {drain}s\n"))
    try:
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.wait_log("draining")
            time.sleep(HEARTBEAT_TIMEOUT + 2)
            established.sendall(b"still here")
            assert established.recv(16) == b"still here"
        assert proxy.proc.wait(timeout=10) == 0
        assert "stopped answering" not in proxy.log()
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


# -- defect 7: readiness, dead workers' listeners, crash causes, crash loops ---------------------------------


def test_ready_only_once_every_worker_serves(fresh_lab: Lab, tmp_path: Path) -> None:
    """Worker start-up is slowed by 2 s (strace delays the eventfd2() that only a worker's event loop and
    relay call); whenever the ready file appears, a captured connection must be answered at once."""
    lab = fresh_lab
    strace = [
        "strace", "-f", "-qq", "-o", "/dev/null",
        "-e", "trace=eventfd2", "-e", "inject=eventfd2:delay_enter=2000000",
    ]  # fmt: skip
    config_path, ready, log_path = tmp_path / "config.yaml", tmp_path / "ready", tmp_path / "daemon.log"
    config_path.write_text(two_workers(lab))
    with log_path.open("wb") as log_file:
        tracer = lab.spawn(
            lab.node_ns,
            [
                *strace,
                sys.executable, "-m", "nodeproxy", "run", "--config", str(config_path),
                "--ready-file", str(ready),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or tracer.poll() is not None, 40, "the ready file")
        assert ready.exists(), log_path.read_text()
        started = time.monotonic()
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000, timeout=10) as sock:
            sock.sendall(b"ping")
            assert sock.recv(8) == b"ping"
        assert time.monotonic() - started < 1.0, "ready was reported before the workers served"
    finally:
        supervisor = int(ready.read_text()) if ready.exists() else None
        if supervisor is not None:
            os.kill(supervisor, signal.SIGTERM)
        stop_process(tracer, timeout=20)
        subprocess.run(
            netns.exec_argv(
                lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(config_path)]
            ),
            capture_output=True,
            timeout=60,
        )


def test_a_dead_workers_listener_dies_with_it(fresh_lab: Lab, tmp_path: Path) -> None:
    """Only workers hold listeners, so a dead worker's share of new connections is not queued on a socket
    nobody accepts from (the kernel resets its queue and hashes new SYNs over the live listeners)."""
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, two_workers(lab))
    try:
        workers = live_workers(proxy)
        listening = listening_inodes(proxy.proc.pid, LISTEN_PORT)
        assert len(listening) == 2
        assert not listening & socket_inodes(proxy.proc.pid), "the supervisor keeps listener copies"
        held = {pid: listening & socket_inodes(pid) for pid in workers}
        assert all(len(inodes) == 1 for inodes in held.values()), held
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len([p for p in live_workers(proxy) if p != victim]) == 2, 10, "a replacement")
        after = listening_inodes(proxy.proc.pid, LISTEN_PORT)
        assert len(after) == 2 and not held[victim] & after, "the dead worker's listener lives on"
        for _ in range(20):
            assert http_get(lab.client_pods[0].ns, "10.96.0.10").startswith("backend=")
    finally:
        stop_process(proxy.proc)


def test_crashes_are_logged_and_a_crash_loop_ends_the_daemon(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, two_workers(lab))
    killed: set[int] = set()
    try:
        for _ in range(CRASH_LOOP_LIMIT + 1):
            wait_for(lambda: len(set(live_workers(proxy)) - killed) == 2, 10, "two live workers")
            victim = min(set(live_workers(proxy)) - killed)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
            if len(killed) == 1:
                log = proxy.wait_log("worker died; replacing it")
                assert '"signal": "SIGKILL"' in log and f'"pid": {victim}' in log
        assert proxy.proc.wait(timeout=20) == 1
        log = proxy.log()
        assert "crash loop: 6 worker deaths within 60 s (limit 5); stopping nodeproxy" in log
        assert rules_present(lab) == (False, False, False)  # on_failure open: the capture is removed
        assert not proxy.ready_file.exists()
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


# -- defect 9: capture.on_failure when the supervisor is killed ---------------------------------------------


def kill_supervisor_and_wait_for_workers(lab: Lab, proxy: RunningProxy) -> None:
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    wait_for(lambda: not netns.pids(lab.node_ns), 15, "the orphaned workers to exit")


def direct_connect_works(lab: Lab) -> bool:
    """A pod-to-pod connection that the capture would send to the (now absent) proxy."""
    try:
        with connect(lab.client_pods[0].ns, lab.backend_pods[0].ip, 9000, timeout=2) as sock:
            sock.sendall(b"direct")
            return sock.recv(8) == b"direct"
    except OSError:
        return False


def test_supervisor_death_fails_open_by_default(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, two_workers(lab, "open", extra="  drain_timeout: 3s\n"))
    try:
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
            established.sendall(b"before")
            assert established.recv(8) == b"before"
            proxy.proc.send_signal(signal.SIGKILL)
            proxy.proc.wait()
            proxy.wait_log("supervisor is gone; taking no new connections")
            # While the workers drain: established connections still relayed, new ones go direct.
            established.sendall(b"during")
            assert established.recv(8) == b"during"
            assert direct_connect_works(lab)
            # systemd's ExecStopPost runs about now; it waits for the draining workers, which clean up.
            after_stop = [sys.executable, "-m", "nodeproxy", "cleanup", "--after-stop"]
            out = netns.run(lab.node_ns, [*after_stop, "--config", str(proxy.config_path)])
            assert out.strip() == "nothing to remove"
        assert not netns.pids(lab.node_ns)
        assert rules_present(lab) == (False, False, False)
        log = proxy.log()
        assert log.count("removed the capture after the supervisor died") == 1, log
        assert direct_connect_works(lab)
        # The instance lock died with the last process: a new daemon starts.
        (tmp_path / "again").mkdir()
        again = start_proxy(lab, tmp_path / "again", proxy.config_path.read_text())
        assert stop_process(again.proc) == 0
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


def test_supervisor_death_with_on_failure_closed_keeps_the_capture(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, two_workers(lab, "closed"))
    try:
        kill_supervisor_and_wait_for_workers(lab, proxy)
        assert rules_present(lab) == (True, True, True)
        assert "capture stays in place (capture.on_failure: closed)" in proxy.log()
        assert not direct_connect_works(lab)
        # What systemd's ExecStopPost runs honours the setting; a plain cleanup removes the rules.
        after_stop = [sys.executable, "-m", "nodeproxy", "cleanup", "--after-stop"]
        out = netns.run(lab.node_ns, [*after_stop, "--config", str(proxy.config_path)])
        assert "left in place" in out and rules_present(lab) == (True, True, True)
        cleanup(lab, proxy)
        assert rules_present(lab) == (False, False, False)
        assert direct_connect_works(lab)
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


# -- defect 10: one daemon per network namespace and chain prefix -------------------------------------------


def test_a_second_instance_is_refused(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first = start_proxy(lab, tmp_path / "first", two_workers(lab))
    try:
        second = spawn_proxy(lab, tmp_path / "second", two_workers(lab))
        assert second.proc.wait(timeout=30) == 1
        assert not second.ready_file.exists()
        assert f"another nodeproxy (pid {first.proc.pid}) owns the capture" in second.log(), second.log()
        # `nodeproxy cleanup` / `capture remove` do not pull the rules from under the running daemon either.
        for command in (["cleanup"], ["capture", "remove"]):
            proc = subprocess.run(
                netns.exec_argv(
                    lab.node_ns,
                    [sys.executable, "-m", "nodeproxy", *command, "--config", str(first.config_path)],
                ),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 1 and "owns the capture" in proc.stderr, proc.stderr
        assert rules_present(lab) == (True, True, True)
        assert http_get(lab.client_pods[0].ns, "10.96.0.10").startswith("backend=")
        assert first.proc.poll() is None
    finally:
        stop_process(first.proc)
        cleanup(lab, first)


# -- defect 14: signals while the daemon starts -------------------------------------------------------------


def wait_until_importing_pydantic(pid: int, timeout: float = 20) -> None:
    """Until the daemon has loaded pydantic_core: well into its start, long before its handlers exist."""

    def loaded() -> bool:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            return "_pydantic_core" in Path(f"/proc/{pid}/maps").read_text()
        return False

    wait_for(loaded, timeout, "pydantic_core to be loaded", interval=0.001)


def test_sighup_storm_while_starting_does_not_kill_the_daemon(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = spawn_proxy(lab, tmp_path, two_workers(lab))
    try:
        wait_until_importing_pydantic(proxy.proc.pid)
        deadline = time.monotonic() + 30
        sent = 0
        while not proxy.ready_file.exists() and proxy.proc.poll() is None and time.monotonic() < deadline:
            proxy.proc.send_signal(signal.SIGHUP)
            sent += 1
            time.sleep(0.005)
        assert proxy.proc.poll() is None, f"died after {sent} SIGHUPs: {proxy.log()[-2000:]}"
        wait_ready(proxy)
        assert http_get(lab.client_pods[0].ns, "10.96.0.10").startswith("backend=")
        assert stop_process(proxy.proc) == 0
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


def test_sigint_while_starting_stops_the_daemon_cleanly(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = spawn_proxy(lab, tmp_path, two_workers(lab))
    try:
        wait_until_importing_pydantic(proxy.proc.pid)
        proxy.proc.send_signal(signal.SIGINT)
        assert proxy.proc.wait(timeout=30) == 0, proxy.log()[-3000:]
        log = proxy.log()
        assert '"signal": "SIGINT"' in log and "Traceback" not in log, log
        assert rules_present(lab) == (False, False, False)
    finally:
        stop_process(proxy.proc)
        cleanup(lab, proxy)


# -- defects 3 and 4: a hostile file on SIGHUP is rejected and the daemon keeps serving ---------------------

ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(9)
)
HOSTILE_FILES = {
    "impossible date": "node: {name: 2024-02-30}\n",
    "date as a VIP": "services:\n  - {name: web, vip: 2024-13-45, ports: [{port: 80}]}\n",
    "deep nesting": "node: " + "[" * 500 + "]" * 500 + "\n",
    "alias bomb": ALIAS_BOMB,
    "not UTF-8": "node: {name: \udcff}\n",
}


def rejections_reach(proxy: RunningProxy, count: int) -> bool:
    return proxy.log().count("config reload rejected") >= count


def test_hostile_files_on_sighup_are_rejected_and_the_daemon_keeps_serving(
    fresh_lab: Lab, tmp_path: Path
) -> None:
    """Before the fix the date and nesting cases escaped reload() as ValueError/RecursionError and took
    the daemon down (rules removed, workers killed); the alias bomb stalled the supervisor for seconds."""
    lab = fresh_lab
    good = lab.config_yaml()
    proxy = start_proxy(lab, tmp_path, good)
    try:
        for number, (name, text) in enumerate(HOSTILE_FILES.items(), start=1):
            proxy.config_path.write_bytes(text.encode("utf-8", "surrogateescape"))
            started = time.monotonic()
            proxy.proc.send_signal(signal.SIGHUP)
            wait_for(functools.partial(rejections_reach, proxy, number), 10, name)
            assert time.monotonic() - started < 3, f"{name}: the supervisor took too long"
            assert proxy.proc.poll() is None, f"{name}: the daemon died:\n{proxy.log()[-3000:]}"
            assert "backend=" in http_get(lab.client_pods[0].ns, "10.96.0.10", 80), name
        assert "Traceback" not in proxy.log()
        assert rules_present(lab) == (True, True, True)
    finally:
        stop_process(proxy.proc)
