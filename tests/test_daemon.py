"""Daemon behaviour on a real lab: failover between endpoints, reloads, rules lifecycle, bad config."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.lab import Lab, stop_process
from tests.conftest import RunningProxy, running_lab, start_proxy
from tests.helpers import connect, http_get, listen

pytestmark = pytest.mark.netns

FLAKY_VIP = "10.96.0.20"
DEAD_ADDRESS = "10.244.1.250"  # inside the pod CIDR, but no pod: the node has no route to it


def flaky_service(lab: Lab, endpoints: list[str], port: int = 9200) -> str:
    lines = "".join(f"      - address: {ip}\n" for ip in endpoints)
    return (
        f"  - name: flaky\n    vip: {FLAKY_VIP}\n    ports: [{{port: 80, target_port: {port}}}]\n"
        f"    balancer: round_robin\n    endpoints:\n{lines}"
    )


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


def rules_present(lab: Lab) -> tuple[bool, bool, bool]:
    save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
    rules = netns.run(lab.node_ns, ["ip", "rule", "show"])
    routes = netns.run(lab.node_ns, ["ip", "route", "show", "table", "133"])
    return "NODEPROXY" in save, "lookup 133" in rules, "local" in routes


def serve_forever(server: socket.socket, name: bytes) -> None:
    import threading

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(name)

    threading.Thread(target=loop, daemon=True).start()


def test_failed_endpoints_are_skipped_for_the_next_one(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    be = lab.backend_pods
    # be0 refuses (nothing listens on 9200), DEAD_ADDRESS is unroutable, be2 drops SYNs (connect timeout);
    # only be1 serves. Every connection must still succeed, within connect_attempts=4.
    netns.run(be[2].ns, ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "9200", "-j", "DROP"])
    extra = "relay:\n  connect_timeout: 300ms\n  connect_attempts: 4\n"
    config = lab.config_yaml(extra=extra) + flaky_service(lab, [be[0].ip, DEAD_ADDRESS, be[2].ip, be[1].ip])
    with listen(be[1].ns, 9200) as server:
        serve_forever(server, b"be1")
        proxy = start_proxy(lab, tmp_path, config)
        try:
            for _ in range(8):
                with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
                    assert sock.recv(16) == b"be1"
            log = proxy.log()
            assert "Connection refused" in log and "Connection timed out" in log
            assert "unreachable" in log.lower()
        finally:
            stop_process(proxy.proc)


def test_all_endpoints_down_resets_the_client(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    config = lab.config_yaml() + flaky_service(lab, [lab.backend_pods[0].ip, DEAD_ADDRESS])
    proxy = start_proxy(lab, tmp_path, config)
    try:
        # Both endpoints fail within microseconds (refused, unroutable), so the reset can even beat
        # connect() back to user space; either way the client sees a reset.
        with pytest.raises(ConnectionResetError), connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
            sock.recv(16)
        proxy.wait_log("all 2 endpoints failed")
        # The daemon is unharmed and keeps serving others.
        assert http_get(lab.client_pods[0].ns, "10.96.0.10").startswith("backend=")
    finally:
        stop_process(proxy.proc)


def test_reload_changes_endpoints_without_touching_established(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    be = lab.backend_pods
    proxy = start_proxy(lab, tmp_path, lab.config_yaml() + flaky_service(lab, [be[0].ip]))
    servers = [listen(p.ns, 9200) for p in be]
    try:
        for server, pod in zip(servers, be, strict=True):
            serve_forever(server, pod.ns.encode())
        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
            established.sendall(b"before")
            assert established.recv(16) == b"before"
            # Move the flaky service to be1+be2 only.
            proxy.reload(lab.config_yaml() + flaky_service(lab, [be[1].ip, be[2].ip]))
            proxy.wait_log("config reloaded")
            time.sleep(0.2)
            answers = set()
            for _ in range(10):
                with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
                    answers.add(sock.recv(64).decode())
            assert answers == {be[1].ns, be[2].ns}
            established.sendall(b"after")
            assert established.recv(16) == b"after"

            # A bad config is rejected with a precise message and the running one stays.
            proxy.reload(lab.config_yaml() + flaky_service(lab, ["10.244.1.999"]))
            log = proxy.wait_log("config reload rejected")
            assert "services[4].endpoints[0].address" in log
            with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
                assert sock.recv(64).decode() in answers
            established.sendall(b"still")
            assert established.recv(16) == b"still"
    finally:
        for server in servers:
            server.close()
        stop_process(proxy.proc)


def test_connection_to_the_listener_itself_is_refused(lab: Lab, proxy: RunningProxy) -> None:
    # The reset may even beat connect() back to user space on loopback; either way it is a reset.
    with pytest.raises(ConnectionResetError), netns.entered(lab.node_ns):
        sock = socket.create_connection(("127.0.0.1", 15001), timeout=5)
        with sock:
            sock.recv(1)
    proxy.wait_log("own listener")


def test_rules_removed_after_sigterm_and_reinstall_is_idempotent(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    config = tmp_path / "c.yaml"
    config.write_text(lab.config_yaml())
    install = [sys.executable, "-m", "nodeproxy", "capture", "install", "--config", str(config)]
    netns.run(lab.node_ns, install)
    netns.run(lab.node_ns, install)  # twice: still exactly one hook and one rule
    save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
    assert save.count("-A PREROUTING -j NODEPROXY_PREROUTING") == 1
    assert netns.run(lab.node_ns, ["ip", "rule", "show"]).count("lookup 133") == 1
    proxy = start_proxy(lab, tmp_path, lab.config_yaml())
    assert rules_present(lab) == (True, True, True)
    assert stop_process(proxy.proc) == 0
    assert rules_present(lab) == (False, False, False)
    assert not proxy.ready_file.exists()


def test_cleanup_removes_what_a_killed_daemon_left(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    # on_failure closed: the rules outlive the daemon (with open, its last worker removes them itself).
    config = lab.config_yaml().replace("capture:\n", "capture:\n  on_failure: closed\n", 1)
    proxy = start_proxy(lab, tmp_path, config)
    supervisor = proxy.proc.pid
    proxy.proc.send_signal(signal.SIGKILL)
    proxy.proc.wait()
    # Orphaned workers notice their supervisor is gone (control pipe EOF) and exit on their own.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        Path(f"/proc/{pid}/status").exists() for pid in netns.pids(lab.node_ns)
    ):
        time.sleep(0.1)
    assert not netns.pids(lab.node_ns), "workers outlived their supervisor"
    assert rules_present(lab) == (True, True, True)
    out = netns.run(
        lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(proxy.config_path)]
    )
    assert "removed" in out and supervisor
    assert rules_present(lab) == (False, False, False)
    assert (
        netns.run(
            lab.node_ns, [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(proxy.config_path)]
        ).strip()
        == "nothing to remove"
    )


def test_invalid_config_is_rejected_with_field_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "node: {name: node-a}\ncapture: {pod_cidrs: [10.244.1.0/24]}\nservices:\n"
        "  - name: web\n    vip: 10.96.0.10\n    ports: [{port: 70000}]\n"
    )
    for argv in (["run", "--config", str(bad)], ["check-config", str(bad)]):
        proc = subprocess.run(
            [sys.executable, "-m", "nodeproxy", *argv], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 2
        assert "services[0].ports[0].port" in proc.stderr and "65535" in proc.stderr, proc.stderr


def test_drain_keeps_established_connections_and_stops_capturing_new_ones(
    fresh_lab: Lab, tmp_path: Path
) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, lab.config_yaml(extra="relay:\n  drain_timeout: 8s\n"))
    pod, backend = lab.client_pods[0], lab.backend_pods[0]
    try:
        with connect(pod.ns, "10.96.0.11", 9000) as established:
            established.sendall(b"one")
            assert established.recv(8) == b"one"
            proxy.proc.send_signal(signal.SIGTERM)
            proxy.wait_log("draining")
            # Still relayed while draining.
            established.sendall(b"two")
            assert established.recv(8) == b"two"
            # New connections are no longer captured: passthrough traffic goes straight to the pod.
            assert "NODEPROXY_DIVERT" in proxy.iptables_save() and "TPROXY" not in proxy.iptables_save()
            body = http_get(pod.ns, backend.ip, 8080)
            assert body.startswith("backend=be0") and f"client={pod.ip}:" in body
            started = time.monotonic()
        # The last connection closed: the daemon exits well before the 8 s drain deadline.
        assert proxy.proc.wait(timeout=8) == 0
        assert time.monotonic() - started < 4
        assert rules_present(lab) == (False, False, False)
    finally:
        stop_process(proxy.proc)


def test_idle_connections_are_closed_and_busy_ones_kept(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, lab.config_yaml(extra="relay:\n  idle_timeout: 1s\n"))
    pod, backend = lab.client_pods[0], lab.backend_pods[0]
    try:
        with (
            listen(backend.ns, 9105) as server,
            connect(pod.ns, backend.ip, 9105) as idle,
            connect(pod.ns, "10.96.0.11", 9000) as busy,
        ):
            upstream, _ = server.accept()
            with upstream:
                idle.sendall(b"hello")
                assert upstream.recv(8) == b"hello"
                idle.setblocking(False)
                silent_since = time.monotonic()
                closed_after = None
                # The busy connection talks every 0.2 s, never silent for the timeout, for 3.2 s in all;
                # meanwhile the idle one must close after the 1 s timeout plus at most the 1 s scan period.
                for i in range(16):
                    busy.sendall(b"%02d" % i)
                    assert busy.recv(2) == b"%02d" % i
                    if closed_after is None:
                        try:
                            if idle.recv(8) == b"":
                                closed_after = time.monotonic() - silent_since
                        except BlockingIOError:
                            pass
                    time.sleep(0.2)
                assert closed_after is not None and 1.0 <= closed_after <= 2.5, closed_after
                upstream.settimeout(5)
                assert upstream.recv(8) == b""  # a FIN reached the backend too
        log = proxy.wait_log('"ending": "idle_timeout"')
        assert log.count('"ending": "idle_timeout"') == 1, log
    finally:
        stop_process(proxy.proc)
