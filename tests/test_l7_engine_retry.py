"""The HTTP engine's retry interface (notes: engine-retry-spec): 11-item forwards, ATTEMPT_FAILED with
failure kinds, held responses (release / retry / reply with fields), request body replay, per-try
timeouts, response_ns and grpc_status in DONE. HttpWorker is driven directly on loopback, with scripted
backends (tests/l7_retry_backends.py) and HTTP/1.1 and HTTP/2 clients."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest

from nodeproxy import _l7
from tests.l7_retry_backends import ScriptedBackend, ScriptedH2Backend, grpc_message

# Record item positions (see HttpWorker.drain).
DONE_STATUS, DONE_FLAGS, DONE_ATTEMPTS, DONE_RESPONSE_NS, DONE_GRPC = 3, 4, 11, 13, 14
AF_ERR, AF_FLAGS, AF_ATTEMPTS, AF_FAILURE, AF_STATUS, AF_GRPC, AF_REPLAYABLE, AF_RESPONSE_NS = range(3, 11)
REPLAY_LIMIT = 65536
DEAD_PORT = 9  # discard: nothing listens on loopback here


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


class Engine:
    """An HttpWorker on its own thread; the test writes every decision."""

    def __init__(self, **settings: Any) -> None:
        self.notify = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.worker = _l7.HttpWorker(self.notify, **settings)
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.conn_ids = itertools.count(1)
        self.pending: list[tuple[Any, ...]] = []

    def client(self) -> socket.socket:
        sock = socket.create_connection(self.listener.getsockname(), timeout=10)
        accepted, _ = self.listener.accept()
        self.worker.adopt(next(self.conn_ids), accepted.detach())
        return sock

    def record(self, kind: int, request_id: int | None = None, timeout: float = 5.0) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            self.pending.extend(self.worker.drain())
            for record in self.pending:
                if record[0] == kind and (request_id is None or record[1] == request_id):
                    self.pending.remove(record)
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no record of kind {kind} for {request_id}: {self.pending}")
            time.sleep(0.005)

    def no_record(self, kind: int, request_id: int, wait: float = 0.3) -> None:
        time.sleep(wait)
        self.pending.extend(self.worker.drain())
        assert not [r for r in self.pending if r[0] == kind and r[1] == request_id], self.pending

    def close(self) -> None:
        self.worker.stop()
        self.thread.join(5)
        self.listener.close()
        os.close(self.notify)


def forward(
    request_id: int,
    port: int,
    try_timeout_ms: int = 0,
    http2: bool = False,
    hold_min_status: int = 500,
    replay_limit: int = REPLAY_LIMIT,
    response_add: tuple[tuple[bytes, bytes], ...] = (),
) -> _l7.ForwardAnswer:
    """An 11-item (resilient) forward to 127.0.0.1:port."""
    return (request_id, "127.0.0.1", port, (), (), response_add, (), try_timeout_ms, http2, hold_min_status,
            replay_limit)  # fmt: skip


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def read_response(sock: socket.socket) -> Response:
    """One HTTP/1.1 response with a Content-Length body (what the engine and the backends send here)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response head: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the response body"
        rest += chunk
    assert len(rest) == length, "bytes after the response"
    return Response(int(lines[0].split()[1]), headers, rest)


def post(sock: socket.socket, path: str, body: bytes) -> None:
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: web\r\ncontent-length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
    )


def body_of(size: int) -> bytes:
    return (hashlib.sha256(b"replay").digest() * (size // 32 + 1))[:size]


@pytest.fixture()
def engine() -> Iterator[Engine]:
    running = Engine(pool_idle_timeout_ms=300)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture()
def first() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend("first")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture()
def second() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend("second")
    try:
        yield backend
    finally:
        backend.close()


# -- HTTP/1.1 clients --------------------------------------------------------------------------------


def test_record_shapes_and_response_ns(engine: Engine, first: ScriptedBackend) -> None:
    client = engine.client()
    client.sendall(b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    assert read_response(client).status == 200
    done = engine.record(_l7.DONE, head[1])
    assert len(done) == 15
    assert done[DONE_STATUS] == 200 and done[DONE_ATTEMPTS] == 1 and done[DONE_GRPC] == -1
    upstream_ns = done[9]
    assert 0 < done[DONE_RESPONSE_NS] <= upstream_ns + 1_000_000
    # The old 8-item form: the same DONE shape, the engine's behaviour unchanged.
    client.sendall(b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([(head[1], "127.0.0.1", first.port, (), (), (), (), 0)], [])
    assert read_response(client).status == 200
    done = engine.record(_l7.DONE, head[1])
    assert len(done) == 15 and done[DONE_RESPONSE_NS] > 0
    client.close()


@pytest.mark.parametrize("resilient", [True, False], ids=["11-item", "8-item"])
def test_an_empty_content_length_response_ends_the_exchange(
    engine: Engine, first: ScriptedBackend, resilient: bool
) -> None:
    """Content-Length: 0 has no body byte to end it: the exchange ends with the head (it hung before,
    with no DONE and the client's next request never read)."""
    first.plan = ["empty"]
    client = engine.client()
    for path in ("/empty", "/after"):
        client.sendall(b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % path.encode())
        head = engine.record(_l7.HEAD)
        answer = (
            forward(head[1], first.port)
            if resilient
            else (head[1], "127.0.0.1", first.port, (), (), (), (), 0)
        )
        engine.worker.answer([answer], [])
        response = read_response(client)
        assert response.status == 200 and response.body == (b"" if path == "/empty" else response.body)
        assert engine.record(_l7.DONE, head[1])[DONE_STATUS] == 200
    client.close()


def test_connect_failure_then_retry(engine: Engine, first: ScriptedBackend) -> None:
    client = engine.client()
    post(client, "/c", b"hello")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], DEAD_PORT)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert len(failed) == 11
    assert failed[AF_FAILURE] == _l7.FAIL_CONNECT and failed[AF_FLAGS] == _l7.FLAGS["UF"]
    assert (failed[AF_STATUS], failed[AF_GRPC], failed[AF_REPLAYABLE], failed[AF_RESPONSE_NS]) == (
        0,
        -1,
        True,
        0,
    )
    engine.worker.answer([forward(head[1], first.port)], [])
    response = read_response(client)
    assert response.status == 200 and response.body.endswith(b" 5")
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_ATTEMPTS] == 2 and done[DONE_STATUS] == 200
    client.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_held_503_is_retried_elsewhere_with_the_body_replayed(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend, chunked: bool
) -> None:
    first.plan = ["503"]
    body = body_of(60 * 1024)
    client = engine.client()
    if chunked:  # in pieces, framing and all, as the client sent them (and the replay copy holds them)
        client.sendall(b"POST /upload HTTP/1.1\r\nHost: web\r\ntransfer-encoding: chunked\r\n\r\n")
        for at in range(0, len(body), 20000):
            piece = body[at : at + 20000]
            client.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        client.sendall(b"0\r\n\r\n")
    else:
        post(client, "/upload", body)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    held = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert held[AF_FAILURE] == _l7.FAIL_HELD and held[AF_STATUS] == 503 and held[AF_GRPC] == -1
    assert held[AF_REPLAYABLE] is True and held[AF_RESPONSE_NS] > 0
    engine.worker.answer([forward(head[1], second.port)], [])
    response = read_response(client)
    assert response.status == 200 and response.headers["x-backend"] == "second"
    assert response.body == b"ok second %s %d" % (hashlib.sha256(body).hexdigest().encode(), len(body))
    assert first.received[0] == second.received[0]  # the same head and body, byte for byte
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_STATUS] == 200 and done[DONE_ATTEMPTS] == 2 and done[DONE_RESPONSE_NS] > 0
    # The held 503 had come whole: its connection went back to the pool and serves the next request.
    client.sendall(b"GET /again HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    assert read_response(client).headers["x-backend"] == "first"
    assert first.connections == 1 and first.closed_connections == 0
    client.close()


def test_release_sends_the_held_response_unchanged(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["503"]
    client = engine.client()
    client.sendall(b"GET /r HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port, response_add=((b"x-edit", b"1"),))], [])
    held = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert held[AF_FAILURE] == _l7.FAIL_HELD
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(1)  # nothing reaches the client while held
    client.settimeout(10)
    engine.worker.answer([], [], [head[1]])
    response = read_response(client)
    assert response.status == 503 and response.body == b"backend unavailable\n"
    assert response.headers["x-backend"] == "first" and response.headers["retry-after"] == "7"
    assert response.headers["x-edit"] == "1"  # the forward's response edits apply as usual
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_STATUS] == 503 and done[DONE_ATTEMPTS] == 1
    assert 0 < done[DONE_RESPONSE_NS] < 300_000_000  # measured at the head, not at the release
    # The connection goes on: a next request on it is served (the held connection was pooled after).
    client.sendall(b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    assert read_response(client).status == 200
    assert first.connections == 1
    client.close()


def test_reply_to_a_held_response_carries_its_fields(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["503"]
    client = engine.client()
    client.sendall(b"GET /q HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    engine.record(_l7.ATTEMPT_FAILED, head[1])
    engine.worker.answer([], [(head[1], 429, "RL", "rate limited", None, ((b"retry-after", b"2"),))])
    response = read_response(client)
    assert response.status == 429 and response.headers["retry-after"] == "2"
    assert response.headers["x-nodeproxy-flags"] == "RL" and response.body == b"rate limited\n"
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_STATUS] == 429 and done[DONE_FLAGS] & _l7.FLAGS["LR"] and done[DONE_RESPONSE_NS] == 0
    assert wait_until(lambda: first.closed_connections == 1)  # pooled, then closed idle (300 ms)
    with pytest.raises(ValueError, match="set by the engine"):
        engine.worker.answer([], [(1, 503, "UO", "x", None, ((b"Content-Length", b"1"),))])
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        engine.worker.answer([], [(1, 503, "UO", "x", None, ((b"retry-after", b"1\r\nx: y"),))])
    client.close()


def test_close_mid_request_is_reset_and_replayed(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend
) -> None:
    first.plan = ["close-mid"]
    body = body_of(60 * 1024)
    client = engine.client()
    post(client, "/mid", body)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_RESET and failed[AF_FLAGS] & _l7.FLAGS["UC"]
    assert failed[AF_REPLAYABLE] is True and failed[AF_RESPONSE_NS] > 0
    engine.worker.answer([forward(head[1], second.port)], [])
    response = read_response(client)
    assert response.body == b"ok second %s %d" % (hashlib.sha256(body).hexdigest().encode(), len(body))
    assert second.received[0][0] == first.partial[0]
    client.close()


def test_a_body_over_the_replay_limit_is_not_replayable(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["hang"]
    body = body_of(100 * 1024)
    client = engine.client()
    post(client, "/big", body)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port, try_timeout_ms=500)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_TIMEOUT and failed[AF_REPLAYABLE] is False
    # Python should not retry it; if it does, the engine answers 502 UC itself.
    engine.worker.answer([forward(head[1], first.port)], [])
    response = read_response(client)
    assert response.status == 502 and response.headers["x-nodeproxy-flags"] == "UC"
    assert response.headers.get("connection") == "close"
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_STATUS] == 502 and done[DONE_ATTEMPTS] == 1
    assert len(first.received) == 1  # no second attempt reached a backend
    client.close()


def test_try_timeout_posts_fail_timeout(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend
) -> None:
    first.plan = ["hang"]
    client = engine.client()
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    started = time.monotonic()
    engine.worker.answer([forward(head[1], first.port, try_timeout_ms=230)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    elapsed = time.monotonic() - started
    # The loop wakes for the deadline itself (not the next 100 ms scan): a deadline answer is on time.
    assert 0.229 < elapsed < 0.27, elapsed
    assert failed[AF_FAILURE] == _l7.FAIL_TIMEOUT and failed[AF_FLAGS] == _l7.FLAGS["UT"]
    assert 0.2e9 < failed[AF_RESPONSE_NS] < 0.27e9
    assert wait_until(lambda: first.closed_connections == 1)  # the attempt's connection is dropped
    engine.worker.answer([forward(head[1], second.port)], [])
    assert read_response(client).status == 200
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_ATTEMPTS] == 2 and done[DONE_FLAGS] & _l7.FLAGS["UT"]
    client.close()


def test_old_form_try_timeout_is_on_time_too(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["hang"]
    client = engine.client()
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    started = time.monotonic()
    engine.worker.answer([(head[1], "127.0.0.1", first.port, (), (), (), (), 230)], [])
    response = read_response(client)
    assert 0.229 < time.monotonic() - started < 0.27
    assert response.status == 504 and response.headers["x-nodeproxy-flags"] == "UT"
    client.close()


def test_try_timeout_covers_the_wait_for_a_pooled_connection(first: ScriptedBackend) -> None:
    engine = Engine(pool_max_conns=1)
    try:
        first.plan = ["hang"]
        busy, waiting = engine.client(), engine.client()
        busy.sendall(b"GET /busy HTTP/1.1\r\nHost: web\r\n\r\n")
        head = engine.record(_l7.HEAD)
        engine.worker.answer([forward(head[1], first.port)], [])
        assert wait_until(lambda: len(first.received) == 1)
        waiting.sendall(b"GET /queued HTTP/1.1\r\nHost: web\r\n\r\n")
        queued = engine.record(_l7.HEAD)
        started = time.monotonic()
        engine.worker.answer([forward(queued[1], first.port, try_timeout_ms=200)], [])
        failed = engine.record(_l7.ATTEMPT_FAILED, queued[1])
        assert 0.199 < time.monotonic() - started < 0.25
        assert failed[AF_FAILURE] == _l7.FAIL_TIMEOUT and failed[AF_RESPONSE_NS] == 0  # never sent
        engine.worker.answer([], [(queued[1], 504, "UT", "deadline")])
        assert read_response(waiting).status == 504
        busy.close()
        waiting.close()
    finally:
        engine.close()


def test_reset_before_the_head(engine: Engine, first: ScriptedBackend, second: ScriptedBackend) -> None:
    first.plan = ["reset"]
    client = engine.client()
    client.sendall(b"GET /rst HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_RESET and failed[AF_REPLAYABLE] is True
    engine.worker.answer([forward(head[1], second.port)], [])
    assert read_response(client).headers["x-backend"] == "second"
    client.close()


def test_a_malformed_response_is_a_reset_with_upe(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend
) -> None:
    first.plan = ["garbage"]
    client = engine.client()
    client.sendall(b"GET /bad HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_RESET and failed[AF_FLAGS] == _l7.FLAGS["UPE"]
    engine.worker.answer([forward(head[1], second.port)], [])
    assert read_response(client).headers["x-backend"] == "second"
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_FLAGS] & _l7.FLAGS["UPE"] and done[DONE_STATUS] == 200
    client.close()


def test_old_forms_answer_failures_locally(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["reset", "503"]
    client = engine.client()
    client.sendall(b"GET /old HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([(head[1], "127.0.0.1", first.port, (), (), (), (), 0, False)], [])
    response = read_response(client)
    assert response.status == 502 and response.headers["x-nodeproxy-flags"] == "UC"
    engine.no_record(_l7.ATTEMPT_FAILED, head[1], wait=0.05)
    client.close()
    client = engine.client()
    client.sendall(b"GET /old HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([(head[1], "127.0.0.1", first.port, (), (), (), (), 0)], [])
    assert read_response(client).status == 503  # nothing is held with the old forms
    client.close()


def test_client_leaving_while_held_ends_the_request(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["503"]
    client = engine.client()
    client.sendall(b"GET /gone HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    engine.record(_l7.ATTEMPT_FAILED, head[1])
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # an RST: the engine sees the error at once
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_FLAGS] & _l7.FLAGS["DC"]
    engine.worker.answer([], [], [head[1]])  # too late: ignored
    assert wait_until(lambda: engine.worker.live_connections == 0 and engine.worker.upstream_connections == 0)


def test_header_names_filter(engine: Engine, first: ScriptedBackend) -> None:
    client = engine.client()
    client.sendall(
        b"GET /h HTTP/1.1\r\nHost: web\r\nGRPC-Timeout: 1S\r\nX-Other: 1\r\nTraceparent: 00-ab\r\n\r\n"
    )
    wanted = frozenset({b"grpc-timeout", b"TraceParent"})  # names of any case match
    deadline = time.monotonic() + 5
    heads: list[tuple[Any, ...]] = []
    while not heads and time.monotonic() < deadline:
        heads = [r for r in engine.worker.drain(wanted) if r[0] == _l7.HEAD]
        time.sleep(0.005)
    assert heads[0][8] == (("grpc-timeout", "1S"), ("traceparent", "00-ab"))
    with pytest.raises(TypeError, match="holds bytes"):
        engine.worker.drain(frozenset({"traceparent"}))  # type: ignore[arg-type]  # str, not bytes
    engine.worker.answer([], [(heads[0][1], 404, "NR", "none")])
    assert read_response(client).status == 404
    client.close()


def test_no_descriptor_or_connection_leaks(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend
) -> None:
    def one_round() -> None:
        first.plan = ["503", "hang", "close-mid", "reset"]
        client = engine.client()
        outcomes = []
        for action in first.plan[:]:
            post(client, f"/{action}", body_of(2000))
            head = engine.record(_l7.HEAD)
            engine.worker.answer([forward(head[1], first.port, try_timeout_ms=200)], [])
            failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
            outcomes.append(failed[AF_FAILURE])
            engine.worker.answer([forward(head[1], second.port)], [])
            assert read_response(client).status == 200
        assert outcomes == [_l7.FAIL_HELD, _l7.FAIL_TIMEOUT, _l7.FAIL_RESET, _l7.FAIL_RESET]
        client.close()

    one_round()
    assert wait_until(lambda: engine.worker.live_connections == 0 and engine.worker.upstream_connections == 0)
    assert wait_until(lambda: first.closed_connections == first.connections)
    baseline = fd_count()
    for _ in range(3):
        one_round()
    assert wait_until(lambda: engine.worker.live_connections == 0 and engine.worker.upstream_connections == 0)
    assert wait_until(lambda: first.closed_connections == first.connections)
    assert wait_until(lambda: fd_count() <= baseline, 3), (fd_count(), baseline)


# -- HTTP/2 clients ----------------------------------------------------------------------------------


class H2Client:
    """A small blocking h2c client (prior knowledge) on the `h2` package."""

    def __init__(self, engine: Engine) -> None:
        self.sock = engine.client()
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="latin-1")
        )
        self.conn.initiate_connection()
        self.headers: dict[int, dict[str, str]] = {}
        self.data: dict[int, bytearray] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()
        self.flush()

    def flush(self) -> None:
        self.sock.sendall(self.conn.data_to_send())

    def request(self, path: str, body: bytes = b"", grpc: bool = False, length: bool = True) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        fields = [(":method", "POST"), (":path", path), (":scheme", "http"), (":authority", "web")]
        if grpc:
            fields += [("content-type", "application/grpc"), ("te", "trailers")]
        if length:
            fields.append(("content-length", str(len(body))))
        self.conn.send_headers(sid, fields, end_stream=not body)
        self.flush()
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.read_once()
                continue
            self.conn.send_data(sid, bytes(view[:window]), end_stream=len(view) <= window)
            view = view[window:]
            self.flush()
        return sid

    def read_once(self, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 20)
        assert data, "the proxy closed the connection"
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers[event.stream_id] = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.DataReceived):
                self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers[event.stream_id] = {str(k): str(v) for k, v in event.headers}
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
        self.flush()

    def wait(self, sid: int) -> None:
        deadline = time.monotonic() + 10
        while sid not in self.ended:
            assert time.monotonic() < deadline
            self.read_once(deadline - time.monotonic())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def h2_first() -> Iterator[ScriptedH2Backend]:
    backend = ScriptedH2Backend("h2-first")
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture()
def h2_second() -> Iterator[ScriptedH2Backend]:
    backend = ScriptedH2Backend("h2-second")
    try:
        yield backend
    finally:
        backend.close()


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "chunked-upstream"])
def test_http2_client_held_503_retried_with_replay(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend, length: bool
) -> None:
    first.plan = ["503"]
    body = body_of(60 * 1024)
    client = H2Client(engine)
    sid = client.request("/h2-upload", body, length=length)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    held = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert held[AF_FAILURE] == _l7.FAIL_HELD and held[AF_STATUS] == 503 and held[AF_REPLAYABLE] is True
    engine.worker.answer([forward(head[1], second.port)], [])
    client.wait(sid)
    assert client.headers[sid][":status"] == "200"
    assert bytes(client.data[sid]) == b"ok second %s %d" % (
        hashlib.sha256(body).hexdigest().encode(),
        len(body),
    )
    assert first.received[0] == second.received[0]
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_ATTEMPTS] == 2 and done[DONE_RESPONSE_NS] > 0
    client.close()


def test_many_http2_streams_held_and_retried_at_once(
    engine: Engine, first: ScriptedBackend, second: ScriptedBackend
) -> None:
    streams = 40
    first.plan = ["503"] * streams
    client = H2Client(engine)
    bodies = {client.request(f"/s{i}", body_of(1000 + i)): body_of(1000 + i) for i in range(streams)}
    heads = [engine.record(_l7.HEAD) for _ in range(streams)]
    engine.worker.answer([forward(head[1], first.port) for head in heads], [])
    held = [engine.record(_l7.ATTEMPT_FAILED, head[1]) for head in heads]
    assert {record[AF_FAILURE] for record in held} == {_l7.FAIL_HELD}
    engine.worker.answer([forward(head[1], second.port) for head in heads], [])
    for sid, body in bodies.items():
        client.wait(sid)
        assert client.headers[sid][":status"] == "200"
        assert bytes(client.data[sid]).split()[2] == hashlib.sha256(body).hexdigest().encode()
    assert all(engine.record(_l7.DONE, head[1])[DONE_ATTEMPTS] == 2 for head in heads)
    client.close()
    assert wait_until(lambda: engine.worker.live_connections == 0)


def test_http2_both_sides_try_timeout_cancels_the_upstream_stream(
    engine: Engine, h2_first: ScriptedH2Backend, h2_second: ScriptedH2Backend
) -> None:
    h2_first.plan = ["hang"]
    client = H2Client(engine)
    sid = client.request("/slow", b"abc")
    head = engine.record(_l7.HEAD)
    started = time.monotonic()
    engine.worker.answer([forward(head[1], h2_first.port, try_timeout_ms=200, http2=True)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert 0.199 < time.monotonic() - started < 0.25
    assert failed[AF_FAILURE] == _l7.FAIL_TIMEOUT and failed[AF_REPLAYABLE] is True
    assert wait_until(lambda: h2_first.resets == [8])  # CANCEL: the server stops working on it
    engine.worker.answer([forward(head[1], h2_second.port, http2=True)], [])
    client.wait(sid)
    assert bytes(client.data[sid]).startswith(b"ok h2-second")
    assert h2_second.received[0][1] == b"abc"
    client.close()


def test_http2_client_cancelling_a_held_request(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["503"]
    client = H2Client(engine)
    sid = client.request("/cancel", b"abc")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    engine.record(_l7.ATTEMPT_FAILED, head[1])
    client.conn.reset_stream(sid)
    client.flush()
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_FLAGS] & _l7.FLAGS["DC"]
    engine.worker.answer([], [], [head[1]])  # too late: ignored
    assert wait_until(lambda: first.closed_connections == 1)  # the held connection is not kept
    client.close()


def test_http2_client_body_over_the_limit_is_not_replayable(engine: Engine, first: ScriptedBackend) -> None:
    first.plan = ["close-mid"]
    client = H2Client(engine)
    client.request("/h2-big", body_of(100 * 1024))
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_RESET and failed[AF_REPLAYABLE] is False
    engine.worker.answer([], [(head[1], 503, "URX", "retry not possible")])
    assert engine.record(_l7.DONE, head[1])[DONE_STATUS] == 503
    client.close()


@pytest.mark.parametrize("action", ["refuse", "goaway"])
def test_http2_upstream_refused_stream(
    engine: Engine, h2_first: ScriptedH2Backend, h2_second: ScriptedH2Backend, action: str
) -> None:
    h2_first.plan = [action]
    client = engine.client()
    post(client, "/refused", b"payload")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], h2_first.port, http2=True)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[AF_FAILURE] == _l7.FAIL_REFUSED_STREAM, failed
    assert failed[AF_REPLAYABLE] is True
    engine.worker.answer([forward(head[1], h2_second.port, http2=True)], [])
    response = read_response(client)
    assert response.status == 200 and response.body.startswith(b"ok h2-second")
    assert h2_second.received[0][1] == b"payload"
    client.close()


def test_grpc_trailers_only_unavailable_is_held_then_retried(
    engine: Engine, h2_first: ScriptedH2Backend, h2_second: ScriptedH2Backend
) -> None:
    h2_first.plan = ["grpc-unavailable"]
    h2_second.plan = ["grpc-ok"]
    client = H2Client(engine)
    sid = client.request("/pkg.Svc/Call", grpc_message(b"req"), grpc=True)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], h2_first.port, http2=True)], [])
    held = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert held[AF_FAILURE] == _l7.FAIL_HELD and held[AF_STATUS] == 200 and held[AF_GRPC] == 14
    engine.worker.answer([forward(head[1], h2_second.port, http2=True)], [])
    client.wait(sid)
    assert bytes(client.data[sid]) == grpc_message(b"h2-second")
    assert client.trailers[sid]["grpc-status"] == "0"
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_GRPC] == 0 and done[DONE_ATTEMPTS] == 2  # from the trailers
    client.close()


def test_a_hold_threshold_above_599_holds_only_grpc_errors(
    engine: Engine, first: ScriptedBackend, h2_first: ScriptedH2Backend
) -> None:
    """A policy retrying only gRPC codes holds trailers-only errors, and no HTTP status."""
    first.plan = ["503"]
    client = engine.client()
    client.sendall(b"GET /plain HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], first.port, hold_min_status=1000)], [])
    assert read_response(client).status == 503
    client.close()
    h2_first.plan = ["grpc-unavailable"]
    grpc_client = H2Client(engine)
    grpc_client.request("/pkg.Svc/Call", grpc_message(b"req"), grpc=True)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], h2_first.port, http2=True, hold_min_status=1000)], [])
    held = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert held[AF_FAILURE] == _l7.FAIL_HELD and held[AF_GRPC] == 14
    engine.worker.answer([], [(head[1], 503, "UO", "gave up")])
    engine.record(_l7.DONE, head[1])
    grpc_client.close()


def test_grpc_status_of_a_released_trailers_only_head(engine: Engine, h2_first: ScriptedH2Backend) -> None:
    h2_first.plan = ["grpc-unavailable"]
    client = H2Client(engine)
    sid = client.request("/pkg.Svc/Call", grpc_message(b"req"), grpc=True)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([forward(head[1], h2_first.port, http2=True)], [])
    engine.record(_l7.ATTEMPT_FAILED, head[1])
    engine.worker.answer([], [], [head[1]])
    client.wait(sid)
    assert client.headers[sid]["grpc-status"] == "14"
    done = engine.record(_l7.DONE, head[1])
    assert done[DONE_GRPC] == 14 and done[DONE_STATUS] == 200  # from the head
    client.close()


def test_grpc_local_reply_reports_its_grpc_status(engine: Engine) -> None:
    client = H2Client(engine)
    sid = client.request("/pkg.Svc/Call", grpc_message(b"req"), grpc=True)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([], [(head[1], 503, "UO", "overflow", None, ((b"retry-after", b"1"),))])
    client.wait(sid)
    assert client.headers[sid]["grpc-status"] == "14" and client.headers[sid]["retry-after"] == "1"
    assert engine.record(_l7.DONE, head[1])[DONE_GRPC] == 14
    client.close()
