"""The least-loaded SO_REUSEPORT program (nodeproxy._reuseport): it follows the load table, spreads a
burst evenly, and runs for TPROXY's listener lookup too."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import _reuseport, netns
from nodeproxy.lab import Lab
from nodeproxy.proxy.listener import open_listener
from tests.conftest import running_lab

TPROXY_PORT = 15011
VIP = ("10.96.0.10", 80)


@contextlib.contextmanager
def reuseport_group(count: int, host: str = "127.0.0.1", port: int = 0) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port or (socks[0].getsockname()[1] if socks else 0)))
            sock.listen(128)
            sock.setblocking(False)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def accepted_per_listener(socks: list[socket.socket], expected: int, timeout: float = 5.0) -> list[int]:
    """Accept (and close) until `expected` connections came in over all listeners."""
    counts = [0] * len(socks)
    deadline = time.monotonic() + timeout
    while sum(counts) < expected and time.monotonic() < deadline:
        for index, sock in enumerate(socks):
            with contextlib.suppress(BlockingIOError):
                conn, _ = sock.accept()
                conn.close()
                counts[index] += 1
    return counts


def connect_many(address: tuple[str, int], count: int) -> list[socket.socket]:
    return [socket.create_connection(address, timeout=5) for _ in range(count)]


def test_connections_go_to_the_less_loaded_listener() -> None:
    with reuseport_group(2) as socks:
        table = _reuseport.attach_least_loaded([s.fileno() for s in socks])
        try:
            assert table.balancing and table.snapshot() == [0, 0]
            address = socks[0].getsockname()
            table.set(0, 1000)
            clients = connect_many(address, 20)
            assert accepted_per_listener(socks, 20) == [0, 20]
            assert table.snapshot() == [1000, 20]  # the program counted what it handed out
            table.set(0, 0)
            table.set(1, 1000)
            clients += connect_many(address, 20)
            assert accepted_per_listener(socks, 20) == [20, 0]
            for client in clients:
                client.close()
        finally:
            table.close()


def test_two_workers_take_turns() -> None:
    """Equal loads go to the lower index, so with two workers connections alternate (like Envoy's
    exact_balance): a control connection and then four streams leave two streams on each worker."""
    with reuseport_group(2) as socks:
        table = _reuseport.attach_least_loaded([s.fileno() for s in socks])
        try:
            order = []
            clients = []
            for _ in range(9):
                clients.append(socket.create_connection(socks[0].getsockname(), timeout=5))
                counts = accepted_per_listener(socks, 1)
                order.append(counts.index(1))
            assert order == [0, 1, 0, 1, 0, 1, 0, 1, 0]
            for client in clients:
                client.close()
        finally:
            table.close()


@pytest.mark.parametrize("workers", [2, 3, 4, 64])
def test_a_burst_is_spread_evenly(workers: int) -> None:
    """The kernel's hash gives uneven shares of a burst; counting each hand-out evens them out exactly
    (64: the most workers the config allows, so the unrolled program must pass the verifier)."""
    with reuseport_group(workers) as socks:
        table = _reuseport.attach_least_loaded([s.fileno() for s in socks])
        try:
            per_worker = 12 if workers < 10 else 2
            clients = connect_many(socks[0].getsockname(), per_worker * workers)
            counts = accepted_per_listener(socks, per_worker * workers)
            assert counts == [per_worker] * workers
            for client in clients:
                client.close()
        finally:
            table.close()


def test_a_replacement_listener_takes_the_old_ones_place() -> None:
    with reuseport_group(2) as socks:
        table = _reuseport.attach_least_loaded([s.fileno() for s in socks])
        try:
            address = socks[0].getsockname()
            socks[1].close()  # a dead worker's listener: the kernel drops it from the array
            with reuseport_group(1, *address) as (replacement,):
                table.add_listener(1, replacement.fileno())
                table.set(0, 1000)
                table.set(1, 0)
                clients = connect_many(address, 8)
                assert accepted_per_listener([socks[0], replacement], 8) == [0, 8]
                for client in clients:
                    client.close()
        finally:
            table.close()


def test_one_listener_needs_no_program() -> None:
    with reuseport_group(1) as socks:
        table = _reuseport.attach_least_loaded([socks[0].fileno()])
        assert not table.balancing and table.workers == 1
        table.set(0, 5)
        assert table.get(0) == 5
        with pytest.raises(IndexError):
            table.set(1, 0)
        table.close()
        with pytest.raises(ValueError):
            table.get(0)


def test_a_socket_that_does_not_listen_is_refused() -> None:
    with socket.socket() as idle, socket.socket() as other, pytest.raises(OSError, match="reuseport array"):
        _reuseport.attach_least_loaded([idle.fileno(), other.fileno()])
    with pytest.raises(ValueError):
        _reuseport.attach_least_loaded([])
    with pytest.raises(ValueError):
        _reuseport.LoadTable(0)


def test_program_validates_its_worker_count() -> None:
    with pytest.raises(ValueError):
        _reuseport.program(1, 3, 4)
    code = _reuseport.program(4, 3, 4)
    assert code[-1][0] == 0x95  # BPF_JMP | BPF_EXIT
    with pytest.raises(ValueError):
        _reuseport.program(257, 3, 4)  # the index must fit in the low 8 bits of a candidate


# -- TPROXY -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tproxy_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A lab whose capture rules send the client pod's connections to 127.0.0.1:TPROXY_PORT."""
    with running_lab(clients=1, backends=1) as lab:
        config = Path(tmp_path_factory.mktemp("capture")) / "config.yaml"
        config.write_text(lab.config_yaml(outbound_port=TPROXY_PORT))
        capture = [sys.executable, "-m", "nodeproxy", "capture"]
        try:
            subprocess.run(
                netns.exec_argv(lab.node_ns, [*capture, "install", "--config", str(config)]),
                check=True,
                capture_output=True,
            )
            yield lab
        finally:
            subprocess.run(
                netns.exec_argv(lab.node_ns, [*capture, "remove", "--config", str(config)]),
                capture_output=True,
            )


@pytest.mark.netns
def test_the_program_runs_for_tproxy_lookups(tproxy_lab: Lab) -> None:
    lab = tproxy_lab
    pod = lab.client_pods[0]
    with netns.entered(lab.node_ns):
        socks = [open_listener(("127.0.0.1", TPROXY_PORT)) for _ in range(2)]
    for sock in socks:
        sock.setblocking(False)
    table = _reuseport.attach_least_loaded([s.fileno() for s in socks])
    try:
        for loaded in (0, 1):
            table.set(loaded, 1000)
            table.set(1 - loaded, 0)
            with netns.entered(pod.ns):
                clients = connect_many(VIP, 16)
            counts = accepted_per_listener(socks, 16)
            for client in clients:
                client.close()
            expected = [16, 16]
            expected[loaded] = 0
            assert counts == expected, f"worker {loaded} was loaded, yet got {counts[loaded]} connections"
        # The accepted sockets are TPROXY's: their local address is the VIP the pod dialled.
        table.set(0, 0)
        table.set(1, 0)
        with netns.entered(pod.ns):
            client = socket.create_connection(VIP, timeout=5)
        deadline = time.monotonic() + 5
        accepted = None
        while accepted is None and time.monotonic() < deadline:
            for sock in socks:
                with contextlib.suppress(BlockingIOError):
                    accepted, _ = sock.accept()
        assert accepted is not None and accepted.getsockname() == VIP
        accepted.close()
        client.close()
    finally:
        table.close()
        for sock in socks:
            sock.close()
