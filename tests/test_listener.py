"""The accept/dispatch layer without a lab: per-worker connection caps, descriptor budget, and a failure
while dispatching one connection of a batch (issue 6, defects 2 and 14)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import structlog

from nodeproxy.config import RelayConfig
from nodeproxy.proxy import listener as listener_module
from nodeproxy.proxy.listener import (
    FDS_PER_CONNECTION,
    OutboundListener,
    descriptor_cap,
    worker_share,
)
from nodeproxy.proxy.outbound import Decision, Passthrough
from nodeproxy.proxy.relay import Completion, Ending, RelayPool
from nodeproxy.state.routing import RoutingState, StateUpdater


def make_listener(
    relay: RelayConfig,
    worker: int = 0,
    workers: int = 1,
    started: bool = False,
    on_load_change: Callable[[int], None] | None = None,
) -> OutboundListener:
    pool = RelayPool(1, 65536)
    if started:
        pool.start()
    return OutboundListener(
        ("127.0.0.1", 1),
        relay,
        StateUpdater(),
        pool,
        access_log=True,
        worker=worker,
        workers=workers,
        on_load_change=on_load_change,
    )


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 7])
def test_worker_caps_add_up_to_exactly_max_connections(workers: int) -> None:
    for max_connections in [*range(1, 20), 99, 1000]:  # all far below the descriptor cap
        relay = RelayConfig(max_connections=max_connections)
        caps = []
        for index in range(workers):
            listener = make_listener(relay, index, workers)
            assert listener.fd_connection_cap > 1000
            caps.append(listener.connection_cap)
            os.close(listener.pool.notify_fd)
        assert sum(caps) == max_connections, (max_connections, caps)
        assert max(caps) - min(caps) <= 1


def test_max_connections_one_over_two_workers_admits_one() -> None:
    relay = RelayConfig(max_connections=1)
    caps = []
    for index in range(2):
        listener = make_listener(relay, index, 2)
        caps.append(listener.connection_cap)
        os.close(listener.pool.notify_fd)
    assert sorted(caps) == [0, 1]


def test_worker_share_rejects_an_unknown_worker() -> None:
    assert [worker_share(5, 3, i) for i in range(3)] == [2, 2, 1]
    with pytest.raises(ValueError):
        worker_share(5, 3, 3)


def test_a_reload_changes_the_cap() -> None:
    listener = make_listener(RelayConfig(max_connections=10), 1, 3)
    assert listener.connection_cap == 3
    listener.relay_config = RelayConfig(max_connections=11)
    assert listener.connection_cap == 4
    os.close(listener.pool.notify_fd)


def test_descriptor_budget_is_what_a_bulk_connection_holds() -> None:
    # Two sockets and a pipe (two fds) per direction: six, not three.
    assert FDS_PER_CONNECTION == 6
    assert descriptor_cap(20_000, 300) == (20_000 - 300) // 6
    assert descriptor_cap(100, 300) == 0
    listener = make_listener(RelayConfig())
    assert listener.fd_connection_cap == (listener.fd_limit - listener.fds_reserved) // 6
    # What this process already holds plus the relay's pooled pipes is reserved.
    assert listener.fds_reserved > len(os.listdir("/proc/self/fd")) + 2 * 128
    os.close(listener.pool.notify_fd)


def test_descriptor_cap_warning_names_the_numbers() -> None:
    listener = make_listener(RelayConfig(max_connections=10_000_000), 0, 2)
    with structlog.testing.capture_logs() as logs:
        listener.warn_if_descriptors_cap_connections()
    os.close(listener.pool.notify_fd)
    (warning,) = [entry for entry in logs if entry["log_level"] == "warning"]
    assert warning["max_connections"] == 10_000_000
    assert warning["connection_cap"] == 2 * listener.fd_connection_cap
    assert warning["fd_limit_per_worker"] == listener.fd_limit
    assert warning["fd_limit_needed"] == listener.fds_reserved + 5_000_000 * FDS_PER_CONNECTION
    other = make_listener(RelayConfig(max_connections=10_000_000), 1, 2)
    with structlog.testing.capture_logs() as logs:
        other.warn_if_descriptors_cap_connections()  # worker 0 speaks for the daemon: said once
    os.close(other.pool.notify_fd)
    assert logs == []


# -- a failing dispatch -------------------------------------------------------------------------------


@pytest.fixture
def backend() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    try:
        yield server
    finally:
        server.close()


def test_an_exception_while_dispatching_resets_that_client_only(
    backend: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    front = socket.create_server(("127.0.0.1", 0))
    backend_address = backend.getsockname()
    clients = [socket.create_connection(front.getsockname(), timeout=5) for _ in range(3)]
    poisoned = clients[1].getsockname()[1]

    def decide(state: RoutingState, ip: str, port: int, *args: object, **kwargs: object) -> Decision:
        # The accepted socket's peer port is the client's local port; fail for the middle one only.
        if current_client_port[0] == poisoned:
            raise ZeroDivisionError("a bug in a balancer")
        return Passthrough(*backend_address)

    current_client_port = [0]
    real_route = OutboundListener._route_and_connect

    def route(self: OutboundListener, conn: listener_module.Connection) -> None:
        current_client_port[0] = conn.client_port
        real_route(self, conn)

    monkeypatch.setattr(listener_module, "decide", decide)
    monkeypatch.setattr(OutboundListener, "_route_and_connect", route)
    loop = asyncio.new_event_loop()
    loads: list[int] = []  # what the worker publishes to the reuseport load table
    listener = make_listener(RelayConfig(), started=True, on_load_change=loads.append)
    fds_before = len(os.listdir("/proc/self/fd"))
    try:
        listener.start(loop, front)
        time.sleep(0.1)  # all three are in the accept queue
        with structlog.testing.capture_logs() as logs:
            listener._on_acceptable()
        assert listener.stats.accepted == 3
        assert listener.stats.dispatch_errors == 1
        upstreams = [backend.accept()[0] for _ in range(2)]  # the other two were relayed
        for upstream in upstreams:
            upstream.close()
        clients[1].settimeout(5)
        with pytest.raises(ConnectionResetError):
            clients[1].recv(1)
        (error,) = [entry for entry in logs if entry["log_level"] == "error"]
        assert "ZeroDivisionError" in str(error["traceback"]) and error["conn"] == 2
        assert len(listener.connections) == 2  # the failed one is not tracked (and not leaked)
        assert loads == [0, 2]  # zeroed at start, then the live connections after the batch
    finally:
        for client in clients:
            client.close()
        listener.close()
        loop.close()
    assert listener.connections == {}
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_load_is_republished_while_idle() -> None:
    """The kernel program counts every connection it hands out, even a SYN that never completes; an
    idle worker must still correct its published load."""
    front = socket.create_server(("127.0.0.1", 0))
    loads: list[int] = []
    loop = asyncio.new_event_loop()
    listener = make_listener(RelayConfig(), started=True, on_load_change=loads.append)
    try:
        listener.start(loop, front)
        loop.run_until_complete(asyncio.sleep(2.5))
        assert len(loads) >= 2 and set(loads) == {0}  # at start, then about once a second
        published = len(loads)
        listener.stop_accepting()
        loop.run_until_complete(asyncio.sleep(1.2))
        assert len(loads) == published  # not after the listener stopped
    finally:
        listener.close()
        loop.close()


# -- local shortages ----------------------------------------------------------------------------------


class RecordingWorker:
    """Stands in for a RelayWorker: records connect() calls, optionally failing at once."""

    def __init__(self, error: int | None = None) -> None:
        self.error = error
        self.connects: list[tuple[object, ...]] = []

    def connect(self, *args: object) -> None:
        self.connects.append(args)
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))

    def wake(self) -> None:
        pass


def routed_listener(access_fd: int) -> OutboundListener:
    from nodeproxy.config import parse_config
    from nodeproxy.lab import Lab

    pool = RelayPool(1, 65536)
    updater = StateUpdater()
    updater.apply(parse_config(Lab(backends=3).config_yaml()))
    return OutboundListener(("127.0.0.1", 15001), RelayConfig(), updater, pool, access_log_fd=access_fd)


def access_records(read_fd: int) -> list[dict[str, object]]:
    import json

    with os.fdopen(read_fd, "rb") as reader:
        return [json.loads(line) for line in reader.read().splitlines()]


@pytest.mark.parametrize("err", [errno.EADDRNOTAVAIL, errno.ENOBUFS, errno.EMFILE])
def test_a_local_shortage_is_reported_as_local_not_blamed_on_the_endpoint(err: int) -> None:
    """A connect that fails for want of this host's resources (ports, buffers, descriptors) resets the
    client as a local shortage: no other endpoint is tried and the endpoint's failure count stays."""
    read_fd, write_fd = os.pipe()
    listener = routed_listener(write_fd)
    client, peer = socket.socketpair()
    try:
        for asynchronous in (False, True):
            worker = RecordingWorker(None if asynchronous else err)
            conn = listener_module.Connection(
                7,
                os.dup(peer.fileno()),
                "10.244.1.10",
                40000,
                "10.96.0.10",
                80,
                time.monotonic(),
                worker,  # type: ignore[arg-type]
            )
            listener._dispatch(conn)
            if asynchronous:  # the connect failed later, in the relay thread
                assert conn.endpoint is not None and conn.endpoint.active == 1
                listener._on_completion(Completion(7, int(Ending.CONNECT_FAILED), err, 0, 0, conn.client_fd))
            assert len(worker.connects) == 1, "no other endpoint was tried"
        endpoints = listener.updater.current.lookup("10.96.0.10", 80)
        assert endpoints is not None
        assert all(e.connect_failures == 0 and e.active == 0 for e in endpoints.endpoints)
        assert listener.connections == {}
    finally:
        client.close()
        peer.close()
        os.close(listener.pool.notify_fd)
        os.close(write_fd)
    records = access_records(read_fd)
    assert [r["event"] for r in records] == ["connection refused", "connection refused"]
    assert all(str(r["reason"]).startswith("local_resources: ") for r in records)


def test_a_local_ending_of_a_relayed_connection_is_logged_as_local() -> None:
    read_fd, write_fd = os.pipe()
    listener = routed_listener(write_fd)
    local_ending = getattr(Ending, "LOCAL_RESOURCES", None)
    try:
        if local_ending is None:
            pytest.skip("this relay has no LOCAL_RESOURCES ending")
        worker: object = RecordingWorker()
        conn = listener_module.Connection(
            9,
            -1,
            "10.244.1.10",
            40001,
            "10.96.0.10",
            80,
            time.monotonic(),
            worker,  # type: ignore[arg-type]
        )
        listener._dispatch(conn)
        listener._on_completion(Completion(9, int(local_ending), errno.EMFILE, 10, 0, -1))
        assert listener.stats.closed == {"local_resources": 1}
    finally:
        os.close(listener.pool.notify_fd)
        os.close(write_fd)
    (record,) = access_records(read_fd)
    assert record["ending"] == "local_resources" and record["errno"] == errno.EMFILE
