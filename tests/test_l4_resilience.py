"""Resilience on TCP ports (issue 8 at L4): connect failures count for outlier detection, ejected
endpoints get no new connections, and circuit_breakers.max_connections bounds a service's
connections. The relay is a stand-in that records connect() calls; completions are fed by hand."""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections.abc import Iterator

import pytest

from nodeproxy.config import RelayConfig, parse_config
from nodeproxy.proxy import listener as listener_module
from nodeproxy.proxy.listener import OutboundListener
from nodeproxy.proxy.relay import Completion, Ending, RelayPool
from nodeproxy.resilience.circuit import Resource
from nodeproxy.state.routing import StateUpdater
from tests.test_listener import RecordingWorker

VIP, BAD, GOOD = "10.96.0.50", "10.244.1.20", "10.244.1.21"


def config(resilience: str) -> str:
    return (
        "node:\n  name: node-a\ncapture:\n  pod_cidrs: [10.244.1.0/24]\n"
        f"services:\n  - name: db\n    vip: {VIP}\n    ports: [{{port: 5432}}]\n"
        f"    endpoints: [{{address: {BAD}}}, {{address: {GOOD}}}]\n"
        f"    resilience: {resilience}\n"
    )


class L4:
    def __init__(self, resilience: str) -> None:
        self.updater = StateUpdater()
        self.updater.apply(parse_config(config(resilience)))
        self.listener = OutboundListener(
            ("127.0.0.1", 15001), RelayConfig(), self.updater, RelayPool(1, 65536), access_log=False
        )
        self.worker = RecordingWorker()
        self.ids = itertools.count(1)
        self.peers: list[socket.socket] = []

    def connect(self) -> listener_module.Connection:
        ours, theirs = socket.socketpair()
        self.peers += [ours, theirs]
        conn = listener_module.Connection(
            next(self.ids),
            os.dup(theirs.fileno()),
            "10.244.1.10",
            40000,
            VIP,
            5432,
            time.monotonic(),
            self.worker,  # type: ignore[arg-type]
        )
        self.listener._dispatch(conn)
        return conn

    def complete(self, conn: listener_module.Connection, ending: Ending, err: int = 0) -> None:
        self.listener._on_completion(Completion(conn.id, int(ending), err, 0, 0, conn.client_fd))

    @property
    def guards(self):  # type: ignore[no-untyped-def]
        route = self.updater.current.lookup(VIP, 5432)
        assert route is not None and route.guards is not None
        return route.guards

    def close(self) -> None:
        for conn in list(self.listener.connections.values()):
            if conn.client_fd >= 0:
                os.close(conn.client_fd)
        for sock in self.peers:
            sock.close()
        os.close(self.listener.pool.notify_fd)


@pytest.fixture()
def make_l4() -> Iterator[type[L4]]:
    made: list[L4] = []

    class Made(L4):
        def __init__(self, resilience: str) -> None:
            super().__init__(resilience)
            made.append(self)

    try:
        yield Made
    finally:
        for l4 in made:
            l4.close()


def test_connect_failures_eject_the_endpoint_and_new_connections_avoid_it(make_l4: type[L4]) -> None:
    l4 = make_l4("{outlier_detection: {consecutive_gateway_failures: 2, max_ejection_percent: 50}}")
    failures = 0
    for _ in range(20):
        conn = l4.connect()
        while conn.endpoint is not None and conn.endpoint.address == BAD:
            failures += 1
            l4.complete(conn, Ending.CONNECT_FAILED, errno.ECONNREFUSED)  # retried on the other one
        assert conn.endpoint is not None and conn.endpoint.address == GOOD
        l4.complete(conn, Ending.CLOSED)
    assert failures == 2, "two consecutive connect failures eject: no third attempt on it"
    assert [e.address for e in l4.guards.outlier.ejected()] == [BAD]


def test_a_connection_that_was_established_ends_a_failure_streak(make_l4: type[L4]) -> None:
    l4 = make_l4("{outlier_detection: {consecutive_gateway_failures: 2}}")
    bad = next(e for e in l4.guards.outlier._health if e.address == BAD)
    l4.guards.outlier.record_connect_failure(bad)
    conn = l4.connect()
    while conn.endpoint is not None and conn.endpoint.address != BAD:
        l4.complete(conn, Ending.CLOSED)
        conn = l4.connect()
    l4.complete(conn, Ending.CLOSED)  # BAD connected this time
    assert l4.guards.outlier.record_connect_failure(bad) is None, "the streak restarted at 1"


def test_max_connections_refuses_the_connection_over_the_limit(make_l4: type[L4]) -> None:
    l4 = make_l4("{circuit_breakers: {max_connections: 1}}")
    first = l4.connect()
    assert first.endpoint is not None and first.holds_slot
    second = l4.connect()
    assert second.endpoint is None and second.client_fd == -1, "reset at once"
    assert l4.guards.breaker.overflows[Resource.CONNECTIONS] == 1
    l4.complete(first, Ending.CLOSED)
    assert l4.guards.breaker.in_use[Resource.CONNECTIONS] == 0
    third = l4.connect()
    assert third.endpoint is not None, "the slot came back"
    # A connection retried after a connect failure keeps its one slot.
    l4.complete(third, Ending.CONNECT_FAILED, errno.ECONNREFUSED)
    assert l4.guards.breaker.in_use[Resource.CONNECTIONS] == 1
    assert l4.listener.connections, "retried on the other endpoint"
