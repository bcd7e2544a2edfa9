"""The HTTP engine on loopback (no namespaces, no root): the test backend of test_l7 on 127.0.0.1 and
HttpProxy / HttpWorker in this process. Covers the paths that need no pod addressing."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nodeproxy import _l7
from nodeproxy.authz.engine import AuthzEngine
from nodeproxy.config import HttpConfig, RelayConfig, parse_config
from nodeproxy.proxy import http as http_module
from nodeproxy.proxy.http import HttpProxy, NotHttpHandler
from nodeproxy.proxy.relay import RelayPool
from nodeproxy.state.routing import StateUpdater
from tests.test_l7 import blob, get, make_backend, read_response, wait_until

VIP = "10.96.0.30"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LoopbackProxy:
    """HttpProxy on its own asyncio loop thread behind a listener on 127.0.0.1 standing for VIP:80."""

    def __init__(
        self,
        endpoints: list[str],
        backend_port: int,
        connect_attempts: int = 2,
        splice_relay: RelayPool | None = None,
        not_http: NotHttpHandler | None = None,
        protocol: str = "http",
        http_config: HttpConfig | None = None,
        service_extra: str = "",
        authz: AuthzEngine | None = None,
    ) -> None:
        """not_http: serve the port as `auto` (sniff), handing what is not HTTP/1 to this handler.
        protocol: the service port's protocol (http, http2, grpc). service_extra: more YAML lines of
        the service (resilience, routes); authz: the policies and JWT rules to apply."""
        listed = "".join(f"      - {{address: {ip}}}\n" for ip in endpoints)
        updater = StateUpdater()
        updater.apply(
            parse_config(
                "node:\n  name: node-a\ncapture:\n  pod_cidrs: [10.244.1.0/24]\n"
                "services:\n"
                f"  - name: web\n    vip: {VIP}\n"
                f"    ports: [{{port: 80, target_port: {backend_port}, protocol: {protocol}}}]\n"
                f"    balancer: round_robin\n    endpoints:{' []' if not endpoints else ''}\n{listed}"
                + service_extra
            )
        )
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.loop = asyncio.new_event_loop()
        self.proxy = HttpProxy(
            lambda: updater.current,
            http_config or HttpConfig(),
            RelayConfig(connect_attempts=connect_attempts),
            access_log=False,
            bind_source=False,
            splice_relay=splice_relay,
            not_http=not_http,
            authz=(lambda: authz) if authz is not None else None,
        )
        self.sniff = not_http is not None
        self.proxy.start(self.loop)
        self.stopping = threading.Event()
        self.ids = itertools.count(1)
        self.threads = [
            threading.Thread(target=self.loop.run_forever, daemon=True),
            threading.Thread(target=self._accept, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, (ip, port) = self.listener.accept()
            except TimeoutError:
                continue
            fd = conn.detach()
            self.loop.call_soon_threadsafe(
                self.proxy.adopt, next(self.ids), fd, ip, port, VIP, 80, self.sniff
            )

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def close(self) -> None:
        self.stopping.set()
        self.threads[1].join(5)
        self.listener.close()
        asyncio.run_coroutine_threadsafe(_call(self.proxy.close), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.threads[0].join(5)
        self.loop.close()


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


@pytest.fixture(scope="module")
def backend() -> Iterator[int]:
    server = make_backend(("127.0.0.1", 0), "lo")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def proxy(backend: int) -> Iterator[LoopbackProxy]:
    running = LoopbackProxy(["127.0.0.1"], backend)
    try:
        yield running
    finally:
        running.close()


def test_a_routing_error_answers_500_and_spares_the_batch(
    proxy: LoopbackProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = http_module.match_route  # type: ignore[attr-defined]

    def broken(routes: Any, attrs: Any) -> Any:
        if attrs.path == "/boom":
            raise RuntimeError("a routing bug")
        return real(routes, attrs)

    monkeypatch.setattr(http_module, "match_route", broken)
    socks = [proxy.connect() for _ in range(6)]
    for i, sock in enumerate(socks):
        sock.sendall(f"GET {'/boom' if i % 2 else '/fine'} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    for i, sock in enumerate(socks):
        with sock.makefile("rb") as reader:
            response = read_response(reader)
        if i % 2:
            assert response.status == 500 and response.header("x-nodeproxy-flags") == "IE"
        else:
            assert response.status == 200 and b"path=/fine" in response.body
        sock.close()


def test_http10_client_gets_a_chunked_response_unchunked_then_close(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    sock.sendall(b"GET /blob/300000 HTTP/1.0\r\nHost: web\r\n\r\n")
    with sock.makefile("rb") as reader:
        response = read_response(reader)  # no framing: reads to EOF
    assert response.status == 200
    assert response.header("transfer-encoding") is None and response.header("connection") == "close"
    assert response.body == blob(300000)
    sock.close()


def test_http10_keep_alive_client_is_told_and_kept(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    with sock.makefile("rb") as reader:
        for i in range(3):
            sock.sendall(f"GET /k{i} HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n".encode())
            response = read_response(reader)
            assert response.status == 200 and f"path=/k{i}".encode() in response.body
            assert response.header("connection") == "keep-alive"
        sock.sendall(b"GET /plain HTTP/1.0\r\nHost: web\r\n\r\n")  # no keep-alive: closed after
        assert read_response(reader).header("connection") == "close"
        assert reader.read() == b""
    sock.close()


def test_until_close_response_body_then_close(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    sock.sendall(b"GET /until-close HTTP/1.1\r\nHost: web\r\n\r\n")
    with sock.makefile("rb") as reader:
        response = read_response(reader)
    assert response.header("connection") == "close"
    assert response.body == blob(100_000)
    sock.close()


def test_malformed_response_is_502_upe(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    with sock.makefile("rb") as reader:
        response = get(sock, "/bad-response", reader)
        assert response.status == 502 and response.header("x-nodeproxy-flags") == "UPE"
        # The client connection survives an upstream's mistake.
        assert get(sock, "/next", reader).status == 200
    sock.close()


def test_backend_closing_a_kept_alive_connection_is_not_the_clients_problem(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    with sock.makefile("rb") as reader:
        for _ in range(20):
            assert get(sock, "/silent-close", reader).status == 200
            assert get(sock, "/after", reader).status == 200
    sock.close()


def test_backpressure_bounds_what_the_engine_holds_both_ways(proxy: LoopbackProxy) -> None:
    """Bodies stream: while the client does not read a 64 MiB response, or the backend does not read a
    64 MiB request, the engine holds at most about HIGH_WATER + IO_CHUNK per buffer, not the body."""
    worker = proxy.proxy.workers[0]
    head_room = 61440 + 1024  # a buffer may also hold up to a head's worth of unparsed bytes
    size = 64 << 20
    sock = proxy.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # small, so the engine feels it soon
    sock.sendall(f"GET /blob/{size} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    time.sleep(1.0)
    (_, _, _, _, _, client_in, client_out, upstream_in, upstream_out), *_ = worker.debug_connections()
    assert client_out <= _l7.HIGH_WATER_BYTES + _l7.IO_CHUNK_BYTES + head_room, client_out
    assert upstream_in <= _l7.IO_CHUNK_BYTES + head_room, upstream_in
    with sock.makefile("rb") as reader:
        assert read_response(reader).body == blob(size)
    sock.close()

    sock = proxy.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    body = blob(size)
    sender = threading.Thread(
        target=sock.sendall,
        args=(f"POST /stall/1500 HTTP/1.1\r\nHost: web\r\nContent-Length: {size}\r\n\r\n".encode() + body,),
    )
    sender.start()
    time.sleep(1.0)  # the backend reads nothing for 1.5 s
    (_, _, _, _, _, client_in, client_out, upstream_in, upstream_out), *_ = worker.debug_connections()
    assert client_in <= _l7.IO_CHUNK_BYTES + head_room, client_in
    assert upstream_out <= _l7.HIGH_WATER_BYTES + _l7.IO_CHUNK_BYTES + head_room, upstream_out
    sender.join(30)
    with sock.makefile("rb") as reader:
        answer = read_response(reader).body.split()
    assert answer[:2] == [hashlib.sha256(body).hexdigest().encode(), str(size).encode()]
    sock.close()


def test_an_early_answer_to_an_upload_reaches_the_client(proxy: LoopbackProxy) -> None:
    """The backend answers 413 without reading the 8 MiB body and closes: the client gets the 413, not a
    502 for the failed send, and the connection closes after it."""
    size = 8 << 20
    sock = proxy.connect()
    sender = threading.Thread(
        target=_send_ignoring_resets,
        args=(
            sock,
            f"POST /early-413 HTTP/1.1\r\nHost: web\r\nContent-Length: {size}\r\n\r\n".encode() + bytes(size),
        ),
    )
    sender.start()
    with sock.makefile("rb") as reader:
        response = read_response(reader)
    assert response.status == 413 and response.body == b"too big\n", response.raw_head
    assert response.header("connection") == "close"
    sender.join(10)
    sock.close()


def _send_ignoring_resets(sock: socket.socket, data: bytes) -> None:
    # The proxy closes after the early answer, so the rest of the upload may be refused.
    with contextlib.suppress(OSError):
        sock.sendall(data)


@pytest.mark.parametrize(
    "extra",
    [
        "X-Big: " + "a" * 70_000 + "\r\n",  # over 60 KiB of head
        "".join(f"X-F{i}: v\r\n" for i in range(120)),  # over 100 fields
    ],
    ids=["bytes", "fields"],
)
def test_oversized_head_is_431_and_closes(proxy: LoopbackProxy, extra: str) -> None:
    sock = proxy.connect()
    with contextlib.suppress(OSError):  # the proxy may answer and close before it has read it all
        sock.sendall(f"GET /x HTTP/1.1\r\nHost: web\r\n{extra}\r\n".encode())
    with sock.makefile("rb") as reader:
        response = read_response(reader)
        assert response.status == 431 and response.header("x-nodeproxy-flags") == "DPE"
        assert response.header("connection") == "close"
        assert reader.read() == b""
    sock.close()


def test_draining_closes_idle_connections_and_ends_busy_ones_after_their_response(
    proxy: LoopbackProxy,
) -> None:
    idle, busy = proxy.connect(), proxy.connect()
    with idle.makefile("rb") as idle_reader, busy.makefile("rb") as busy_reader:
        assert get(idle, "/first", idle_reader).status == 200
        busy.sendall(b"GET /slow/500 HTTP/1.1\r\nHost: web\r\n\r\n")
        time.sleep(0.1)
        asyncio.run_coroutine_threadsafe(_call(proxy.proxy.begin_drain), proxy.loop).result(5)
        assert idle_reader.read() == b""  # closed without waiting for another request
        response = read_response(busy_reader)
        assert response.status == 200 and response.header("connection") == "close"
        assert busy_reader.read() == b""
    idle.close()
    busy.close()


def test_expect_100_continue_interim_response_then_body(proxy: LoopbackProxy) -> None:
    body = os.urandom(100_000)
    sock = proxy.connect()
    with sock.makefile("rb") as reader:
        sock.sendall(
            b"POST /sink HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = read_response(reader)  # the client sends no body byte before this
        assert interim.status == 100
        sock.sendall(body)
        final = read_response(reader)
        assert final.status == 200
        assert final.body.split()[:2] == [hashlib.sha256(body).hexdigest().encode(), b"100000"]
        assert get(sock, "/after", reader).status == 200
    sock.close()


def test_pipelined_heads_with_bodies_and_trailers_in_one_write(proxy: LoopbackProxy) -> None:
    sock = proxy.connect()
    sock.sendall(
        b"POST /sink HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"
        b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: web\r\n\r\n"
        b"POST /sink HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\nhi"
        b"GET /last HTTP/1.1\r\nHost: web\r\n\r\n"
    )
    with sock.makefile("rb") as reader:
        first = read_response(reader)
        assert first.body.split() == [hashlib.sha256(b"abc").hexdigest().encode(), b"3", b"x-t:1"]
        assert read_response(reader, head_request=True).status == 200
        assert read_response(reader).status == 204
        assert read_response(reader).body.split()[:2] == [hashlib.sha256(b"hi").hexdigest().encode(), b"2"]
        assert b"path=/last" in read_response(reader).body
    sock.close()


@pytest.mark.parametrize("spliced", [False, True], ids=["engine-tunnel", "splice-relay"])
def test_websocket_upgrade_becomes_a_tunnel(spliced: bool) -> None:
    """After the 101 the engine relays the bytes itself, or (given the worker's L4 RelayPool) hands both
    sockets to the splice relay once nothing is in flight."""
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        relay = RelayPool(1, 1 << 20) if spliced else None
        if relay is not None:
            relay.start()
        running = LoopbackProxy(["127.0.0.1"], server.socket.getsockname()[1], splice_relay=relay)
        try:
            with connect(f"ws://127.0.0.1:{running.port}/", sock=running.connect(), max_size=None) as ws:
                for message in (b"x", os.urandom(1 << 20), "text"):
                    ws.send(message)
                    assert ws.recv(timeout=10) == message
                if relay is not None:
                    assert relay.live_connections == 1 and running.proxy.live_connections == 0
            assert wait_until(lambda: running.proxy.live_connections == 0)
            assert running.proxy.upstream_connections == 0  # the tunnel's upstream socket went with it
            if relay is not None:
                assert wait_until(lambda: relay.live_connections == 0)
        finally:
            running.close()
            if relay is not None:
                relay.stop()
        server.shutdown()


def test_auto_port_hands_what_is_not_http_to_the_l4_path(backend: int) -> None:
    handed: list[tuple[int, socket.socket, str, int]] = []

    def to_l4(conn_id: int, fd: int, client_ip: str, client_port: int, orig_ip: str, orig_port: int) -> None:
        handed.append((conn_id, socket.socket(fileno=fd), orig_ip, orig_port))

    running = LoopbackProxy(["127.0.0.1"], backend, not_http=to_l4)
    try:
        http_client, other = running.connect(), running.connect()
        with http_client.makefile("rb") as reader:
            assert get(http_client, "/still-http", reader).status == 200
        other.sendall(b"HELLO not http\r\n")
        assert wait_until(lambda: len(handed) == 1)
        conn_id, sock, orig_ip, orig_port = handed[0]
        assert (orig_ip, orig_port) == (VIP, 80)
        assert sock.recv(100) == b"HELLO not http\r\n"  # nothing of it was consumed
        assert conn_id not in running.proxy.connections
        sock.close()
        other.close()
        http_client.close()
    finally:
        running.close()


def test_connect_failure_retried_on_another_endpoint(backend: int) -> None:
    # 127.0.0.2 is loopback too, but the backend listens on 127.0.0.1 only: connections there are refused.
    running = LoopbackProxy(["127.0.0.2", "127.0.0.1"], backend, connect_attempts=2)
    try:
        for _ in range(10):
            sock = running.connect()
            with sock.makefile("rb") as reader:
                assert get(sock, "/r", reader).status == 200
            sock.close()
        assert running.proxy.stats.attempts_failed >= 4  # round robin sends every other request there first
    finally:
        running.close()
    only_dead = LoopbackProxy(["127.0.0.2"], backend, connect_attempts=2)
    try:
        sock = only_dead.connect()
        with sock.makefile("rb") as reader:
            response = get(sock, "/r", reader)
        assert response.status == 502 and response.header("x-nodeproxy-flags") == "UF"
        sock.close()
    finally:
        only_dead.close()


# -- the engine alone (answers written by hand) --------------------------------------------------------


class BareWorker:
    """An HttpWorker whose decisions the test writes."""

    def __init__(self, pool_max_conns: int = 1024, pool_idle_timeout_ms: int = 4000) -> None:
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.worker = _l7.HttpWorker(
            self.notify, pool_max_conns=pool_max_conns, pool_idle_timeout_ms=pool_idle_timeout_ms
        )
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.listener = socket.create_server(("127.0.0.1", 0))

    def client(self) -> socket.socket:
        sock = socket.create_connection(self.listener.getsockname(), timeout=10)
        accepted, _ = self.listener.accept()
        self.worker.adopt(1, accepted.detach())
        return sock

    def wait_record(self, kind: int, timeout: float = 5) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.worker.drain():
                if record[0] == kind:
                    return record
            time.sleep(0.01)
        raise AssertionError(f"no record of kind {kind}")

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(5)
        self.listener.close()
        os.close(self.notify)


@pytest.fixture()
def bare() -> Iterator[BareWorker]:
    running = BareWorker()
    try:
        yield running
    finally:
        running.close()


def test_per_try_timeout_answers_504_ut(bare: BareWorker, backend: int) -> None:
    sock = bare.client()
    sock.sendall(b"GET /slow/3000 HTTP/1.1\r\nHost: web\r\n\r\n")
    head = bare.wait_record(_l7.HEAD)
    started = time.monotonic()
    bare.worker.answer([(head[1], "127.0.0.1", backend, (), (), (), (), 300)], [])
    with sock.makefile("rb") as reader:
        response = read_response(reader)
    elapsed = time.monotonic() - started
    assert response.status == 504 and response.header("x-nodeproxy-flags") == "UT"
    assert 0.25 < elapsed < 1.0, elapsed  # checked every 100 ms
    done = bare.wait_record(_l7.DONE)
    assert done[3] == 504 and done[4] & _l7.FLAGS["UT"]
    sock.close()


def test_a_request_waiting_for_a_pooled_connection_times_out_504(backend: int) -> None:
    bare = BareWorker(pool_max_conns=1)
    try:
        slow, waiting = bare.client(), bare.client()
        slow.sendall(b"GET /slow/1500 HTTP/1.1\r\nHost: web\r\n\r\n")
        bare.worker.answer([(bare.wait_record(_l7.HEAD)[1], "127.0.0.1", backend, (), (), (), (), 0)], [])
        time.sleep(0.1)
        waiting.sendall(b"GET /queued HTTP/1.1\r\nHost: web\r\n\r\n")
        head = bare.wait_record(_l7.HEAD)
        started = time.monotonic()
        bare.worker.answer([(head[1], "127.0.0.1", backend, (), (), (), (), 300)], [])
        with waiting.makefile("rb") as reader:
            response = read_response(reader)
        assert response.status == 504 and response.header("x-nodeproxy-flags") == "UT"
        assert time.monotonic() - started < 1.0
        with slow.makefile("rb") as reader:
            assert read_response(reader).status == 200  # the pool's one connection was busy all along
        slow.close()
        waiting.close()
    finally:
        bare.close()


def test_idle_pools_and_their_connections_are_freed(backend: int) -> None:
    bare = BareWorker(pool_idle_timeout_ms=200)
    try:
        for ip in ("127.0.0.1", "127.0.0.3"):  # one pool each (127.0.0.3 refuses: a pool with 0 conns)
            sock = bare.client()
            sock.sendall(b"GET /p HTTP/1.1\r\nHost: web\r\n\r\n")
            bare.worker.answer([(bare.wait_record(_l7.HEAD)[1], ip, backend, (), (), (), (), 0)], [])
            if ip == "127.0.0.1":
                with sock.makefile("rb") as reader:
                    assert read_response(reader).status == 200
            else:
                bare.wait_record(_l7.ATTEMPT_FAILED)
            sock.close()
        assert bare.worker.pools == 2
        # The idle connection closes after 200 ms, the empty pools go at the next sweep (10 s).
        assert wait_until(lambda: bare.worker.upstream_connections == 0, 2)
        assert wait_until(lambda: bare.worker.pools == 0, 15)
    finally:
        bare.close()


def test_auto_port_sniffing(bare: BareWorker, backend: int) -> None:
    """An `auto` port: an HTTP/1 request is proxied; other bytes, and silence for the peek timeout (a
    server-first protocol), come back as NOT_HTTP with the socket and its bytes unread."""
    client = socket.create_connection(bare.listener.getsockname(), timeout=10)
    accepted, _ = bare.listener.accept()
    bare.worker.adopt(1, accepted.detach(), None, 100)
    client.sendall(b"GET /auto HTTP/1.1\r\nHost: web\r\n\r\n")
    bare.worker.answer([(bare.wait_record(_l7.HEAD)[1], "127.0.0.1", backend, (), (), (), (), 0)], [])
    with client.makefile("rb") as reader:
        assert b"path=/auto" in read_response(reader).body
    client.close()

    tls = socket.create_connection(bare.listener.getsockname(), timeout=10)
    accepted, _ = bare.listener.accept()
    bare.worker.adopt(2, accepted.detach(), None, 1000)
    tls.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS ClientHello's start
    record = bare.wait_record(_l7.NOT_HTTP)
    assert record[1] == 2
    with socket.socket(fileno=record[2]) as returned:
        assert returned.recv(100) == b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"
    tls.close()

    silent = socket.create_connection(bare.listener.getsockname(), timeout=10)
    accepted, _ = bare.listener.accept()
    started = time.monotonic()
    bare.worker.adopt(3, accepted.detach(), None, 100)
    record = bare.wait_record(_l7.NOT_HTTP)
    assert record[1] == 3 and time.monotonic() - started < 0.5
    with socket.socket(fileno=record[2]) as returned:
        returned.sendall(b"220 smtp ready\r\n")  # the server speaks first, through the returned socket
        assert silent.recv(100) == b"220 smtp ready\r\n"
    silent.close()


def test_a_bad_endpoint_address_fails_only_its_request(bare: BareWorker, backend: int) -> None:
    first, second = bare.client(), bare.client()
    first.sendall(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
    head_a = bare.wait_record(_l7.HEAD)
    second.sendall(b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n")
    head_b = bare.wait_record(_l7.HEAD)
    bare.worker.answer(
        [
            (head_a[1], "fe80::1", backend, (), (), (), (), 0),
            (head_b[1], "127.0.0.1", backend, ((b"x-added", b"1"),), (b"user-agent",), (), (), 0),
        ],
        [],
    )
    with first.makefile("rb") as reader:
        bad = read_response(reader)
    with second.makefile("rb") as reader:
        good = read_response(reader)
    assert bad.status == 502 and bad.header("x-nodeproxy-flags") == "UF"
    assert good.status == 200 and b"path=/b" in good.body
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        bare.worker.answer([(1, "127.0.0.1", backend, ((b"x-evil", b"a\r\nb: c"),), (), (), (), 0)], [])
    first.close()
    second.close()
