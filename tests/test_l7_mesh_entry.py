"""The HTTP engine's way into the mTLS tunnel (nodeproxy/proxy/mesh_entry.py): forwards with via_mesh
connect to the mesh entry with a PROXY v2 header naming the source pod and the endpoint, and a token;
the entry parses it (pure) and hands the socket on, or resets it. The engine is driven directly on
loopback; the entry runs on a real event loop with real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import h2.config
import h2.connection
import h2.events
import pytest

from nodeproxy import _l7
from nodeproxy.proxy import mesh_entry
from nodeproxy.proxy.mesh_entry import (
    HEADER_BYTES,
    PROXY_V2_SIGNATURE,
    BadEntryHeader,
    EntryHeader,
    MeshEntry,
    parse_entry_header,
)
from tests.test_l7_engine_retry import Engine, read_response

TOKEN = bytes(range(16))
SOURCE_POD = "10.244.1.10"
ENDPOINT = ("10.244.2.20", 8080)


def header(token: bytes = TOKEN, source: str = SOURCE_POD, port: int = 8080, extra: bytes = b"") -> bytes:
    body = (
        socket.inet_aton(source)
        + socket.inet_aton(ENDPOINT[0])
        + struct.pack("!HH", 0, port)
        + bytes([0xE0])
        + struct.pack("!H", len(token))
        + token
        + extra
    )
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


def truncated_tlv() -> bytes:
    """A token TLV announcing 16 bytes with 4 left in the header (whose own length is honest)."""
    body = header()[16 : 16 + 12 + 3 + 4]
    return PROXY_V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


# -- the parser --------------------------------------------------------------------------------------


def test_a_whole_header_names_source_endpoint_and_its_length() -> None:
    data = header() + b"GET / HTTP/1.1\r\n"
    assert parse_entry_header(data, TOKEN) == EntryHeader(SOURCE_POD, ENDPOINT[0], 8080, HEADER_BYTES)


@pytest.mark.parametrize("cut", [0, 1, 11, 12, 15, 16, 30, HEADER_BYTES - 1])
def test_an_incomplete_header_asks_for_more(cut: int) -> None:
    assert parse_entry_header(header()[:cut], TOKEN) is None


def test_other_tlvs_are_skipped() -> None:
    noop = bytes([0x04]) + struct.pack("!H", 3) + b"xyz"  # PP2_TYPE_NOOP
    parsed = parse_entry_header(header(extra=noop), TOKEN)
    assert parsed is not None and parsed.length == HEADER_BYTES + len(noop)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not a PROXY v2"),
        (b"\r\n\r\nX", "not a PROXY v2"),
        (header(token=bytes(16)), "token"),
        (header(token=TOKEN[:8]), "token"),
        (header()[:12] + bytes([0x20]) + header()[13:], "command"),  # LOCAL, not PROXY
        (header()[:13] + bytes([0x21]) + header()[14:], "family"),  # IPv6
        (header()[:14] + struct.pack("!H", 4000) + header()[16:], "bytes"),
        (header(source="0.0.0.0"), "no source"),
        (header(port=0), "no source"),
        (truncated_tlv(), "truncated TLV"),
    ],
)
def test_anything_else_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(BadEntryHeader, match=why):
        parse_entry_header(data, TOKEN)


# -- the engine writes it --------------------------------------------------------------------------------


class FakeEntry:
    """A loopback listener standing in for the mesh entry: records the first bytes of each connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.address = self.sock.getsockname()

    def accept(self) -> socket.socket:
        conn, _ = self.sock.accept()
        conn.settimeout(10)
        return conn

    def close(self) -> None:
        self.sock.close()


def read_header(conn: socket.socket, announce: bool = True) -> EntryHeader:
    """The engine's header; then, as the tunnel does once its CONNECT is answered, the open byte."""
    data = b""
    while (parsed := parse_entry_header(data, TOKEN)) is None:
        chunk = conn.recv(HEADER_BYTES - len(data))
        assert chunk, f"closed after {data!r}"
        data += chunk
    if announce:
        conn.sendall(b"\0")
    return parsed


def recv_until(conn: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = conn.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.fixture()
def engine() -> Iterator[Engine]:
    running = Engine(pool_idle_timeout_ms=2000)
    try:
        yield running
    finally:
        running.close()


def via_mesh_forward(request_id: int, http2: bool = False) -> _l7.ForwardAnswer:
    return (request_id, ENDPOINT[0], ENDPOINT[1], (), (), (), (), 0, http2, 0, 65536, True)


def adopt_from(engine: Engine, source_ip: str) -> socket.socket:
    client = socket.create_connection(engine.listener.getsockname(), timeout=10)
    accepted, _ = engine.listener.accept()
    engine.worker.adopt(next(engine.conn_ids), accepted.detach(), source_ip)
    return client


@pytest.fixture()
def entry(engine: Engine) -> Iterator[FakeEntry]:
    """A FakeEntry the engine's via-mesh forwards go to."""
    running = FakeEntry()
    try:
        engine.worker.set_mesh_entry(running.address[0], running.address[1], TOKEN)
        yield running
    finally:
        running.close()


def request_via_mesh(engine: Engine, client: socket.socket, request: bytes, http2: bool = False) -> int:
    """Send `request`, answer its head with a via-mesh forward; its request id."""
    client.sendall(request)
    head = engine.record(_l7.HEAD)
    engine.worker.answer([via_mesh_forward(head[1], http2)], [])
    return int(head[1])


def test_a_via_mesh_forward_goes_to_the_entry_with_the_header_first(engine: Engine, entry: FakeEntry) -> None:
    client = adopt_from(engine, SOURCE_POD)
    for i in range(2):  # the second request reuses the pooled connection: one header per connection
        request_id = request_via_mesh(engine, client, b"GET /x%d HTTP/1.1\r\nHost: web\r\n\r\n" % i)
        if i == 0:
            upstream = entry.accept()
            assert read_header(upstream) == EntryHeader(SOURCE_POD, *ENDPOINT, HEADER_BYTES)
        request = recv_until(upstream, b"\r\n\r\n")
        assert request.startswith(b"GET /x%d HTTP/1.1\r\n" % i), request
        upstream.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        assert read_response(client).body == b"ok"
        engine.record(_l7.DONE, request_id)
    client.close()
    upstream.close()


def test_a_direct_forward_to_the_same_endpoint_uses_another_pool(engine: Engine, entry: FakeEntry) -> None:
    """The header names the endpoint; a direct connection must never be taken from the mesh pool (nor
    the other way): here the direct attempt fails (nothing listens at the pod address) while the mesh
    connection sits idle."""
    client = adopt_from(engine, "127.0.0.1")
    client.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([(head[1], "127.0.0.1", 9, (), (), (), (), 0, False, 0, 65536, True)], [])
    upstream = entry.accept()
    assert read_header(upstream).destination_port == 9
    upstream.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert read_response(client).status == 200
    engine.record(_l7.DONE, head[1])
    client.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    head = engine.record(_l7.HEAD)
    engine.worker.answer([(head[1], "127.0.0.1", 9, (), (), (), (), 0, False, 0, 65536, False)], [])
    failed = engine.record(_l7.ATTEMPT_FAILED, head[1])
    assert failed[6] == _l7.FAIL_CONNECT
    engine.worker.answer([], [(head[1], 502, "UF", "no")])
    assert read_response(client).status == 502
    client.close()
    upstream.close()


def test_http2_upstream_through_the_entry_gets_the_header_before_the_preface(
    engine: Engine, entry: FakeEntry
) -> None:
    client = adopt_from(engine, SOURCE_POD)
    request_via_mesh(engine, client, b"GET /h2 HTTP/1.1\r\nHost: web\r\n\r\n", http2=True)
    upstream = entry.accept()
    assert read_header(upstream).source_ip == SOURCE_POD
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    upstream.sendall(server.data_to_send())
    answered = False
    deadline = time.monotonic() + 10
    while not answered and time.monotonic() < deadline:
        data = upstream.recv(65536)
        assert data
        for event in server.receive_data(data):  # the preface comes first, or h2 raises
            if isinstance(event, h2.events.RequestReceived):
                assert dict(event.headers)[b":path"] == b"/h2"
                server.send_headers(event.stream_id, [(":status", "200"), ("content-length", "2")])
                server.send_data(event.stream_id, b"h2", end_stream=True)
                answered = True
        upstream.sendall(server.data_to_send())
    assert read_response(client).body == b"h2"
    client.close()
    upstream.close()


def test_nothing_of_the_request_goes_before_the_tunnel_is_open(engine: Engine, entry: FakeEntry) -> None:
    client = adopt_from(engine, SOURCE_POD)
    request_via_mesh(engine, client, b"GET /wait HTTP/1.1\r\nHost: web\r\n\r\n")
    upstream = entry.accept()
    read_header(upstream, announce=False)
    upstream.settimeout(0.3)
    with pytest.raises(TimeoutError):
        upstream.recv(100)  # the request waits for the open byte
    upstream.settimeout(10)
    upstream.sendall(b"\0")
    assert recv_until(upstream, b"\r\n\r\n").startswith(b"GET /wait ")
    upstream.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    client.settimeout(10)
    assert client.recv(100).startswith(b"HTTP/1.1 204")
    client.close()
    upstream.close()


@pytest.mark.parametrize("ending", ["reset", "close", "wrong byte"])
def test_a_tunnel_that_does_not_open_is_a_connect_failure(
    engine: Engine, entry: FakeEntry, ending: str
) -> None:
    """So the default retry policy (connect-failure) tries another endpoint: the pod never saw the
    request."""
    client = adopt_from(engine, SOURCE_POD)
    post = b"POST /once HTTP/1.1\r\nHost: web\r\ncontent-length: 2\r\n\r\nhi"
    request_id = request_via_mesh(engine, client, post)
    upstream = entry.accept()
    read_header(upstream, announce=False)
    if ending == "reset":
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    elif ending == "wrong byte":
        upstream.sendall(b"H")
    upstream.close()
    failed = engine.record(_l7.ATTEMPT_FAILED, request_id)
    assert failed[6] == _l7.FAIL_CONNECT, failed
    # The retry (here to the same entry) resends the request whole on a new connection.
    engine.worker.answer([via_mesh_forward(request_id)], [])
    again = entry.accept()
    read_header(again)
    assert recv_until(again, b"hi").endswith(b"\r\n\r\nhi")
    again.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    assert read_response(client).status == 200
    client.close()
    again.close()


def test_via_mesh_needs_the_entry_and_the_entry_is_set_once(engine: Engine) -> None:
    with pytest.raises(ValueError, match="set_mesh_entry"):
        engine.worker.answer([via_mesh_forward(1)], [])
    with pytest.raises(ValueError, match="16 bytes"):
        engine.worker.set_mesh_entry("127.0.0.1", 1, b"short")
    engine.worker.set_mesh_entry("127.0.0.1", 1, TOKEN)
    engine.worker.set_mesh_entry("127.0.0.1", 1, TOKEN)  # the same again: fine
    with pytest.raises(ValueError, match="once"):
        engine.worker.set_mesh_entry("127.0.0.1", 2, TOKEN)


# -- the entry -----------------------------------------------------------------------------------------


class EntryLoop:
    """A MeshEntry on an event loop thread; the handler keeps the sockets it is given."""

    def __init__(self, refuse: str | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.taken: list[tuple[int, int, EntryHeader]] = []
        self.refuse = refuse
        self.entry = MeshEntry(self.handle)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.loop.call_soon_threadsafe(self.entry.start, self.loop)

    def handle(self, entry_id: int, fd: int, parsed: EntryHeader) -> str | None:
        if self.refuse is not None:
            return self.refuse
        self.taken.append((entry_id, fd, parsed))
        return None

    def connect(self) -> socket.socket:
        return socket.create_connection(self.entry.address, timeout=10)

    def wait_taken(self, count: int) -> None:
        deadline = time.monotonic() + 5
        while len(self.taken) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.taken) >= count

    def close(self) -> None:
        done = threading.Event()

        def stop() -> None:
            self.entry.close()
            done.set()

        self.loop.call_soon_threadsafe(stop)
        done.wait(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        for _, fd, _ in self.taken:
            os.close(fd)


def is_reset(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        sock.recv(10)
    except ConnectionResetError:
        return True
    return False


@pytest.fixture()
def entry_loop() -> Iterator[EntryLoop]:
    running = EntryLoop()
    try:
        yield running
    finally:
        running.close()


def test_the_entry_takes_exactly_the_header_and_leaves_the_payload(entry_loop: EntryLoop) -> None:
    entry_loop.entry.token = TOKEN
    with entry_loop.connect() as sock:
        sock.sendall(header()[:20])  # in two parts: the entry waits for the rest
        time.sleep(0.1)
        assert not entry_loop.taken
        sock.sendall(header()[20:] + b"payload")
        entry_loop.wait_taken(1)
        entry_id, fd, parsed = entry_loop.taken[0]
        assert parsed == EntryHeader(SOURCE_POD, *ENDPOINT, HEADER_BYTES)
        assert entry_id >= 1 << 56
        assert os.read(fd, 100) == b"payload"


def test_a_connection_without_the_token_is_reset(entry_loop: EntryLoop) -> None:
    entry_loop.entry.token = TOKEN
    with entry_loop.connect() as sock:
        sock.sendall(header(token=bytes(16)) + b"GET / HTTP/1.1\r\n\r\n")
        assert is_reset(sock)
    assert not entry_loop.taken and entry_loop.entry.refused == 1


def test_a_connection_that_never_sends_its_header_is_reset(
    entry_loop: EntryLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mesh_entry, "HEADER_TIMEOUT", 0.2)
    with entry_loop.connect() as sock:
        sock.sendall(header()[:10])
        started = time.monotonic()
        assert is_reset(sock)
        assert time.monotonic() - started < 3


def test_a_refusal_by_the_handler_resets_the_connection() -> None:
    running = EntryLoop(refuse="no identity")
    try:
        running.entry.token = TOKEN
        with running.connect() as sock:
            sock.sendall(header())
            assert is_reset(sock)
        assert running.entry.refused == 1
    finally:
        running.close()
