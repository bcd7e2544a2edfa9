"""HTTP/2 (h2c) clients through the HTTP engine on loopback: curl --http2-prior-knowledge and the `h2`
package against the HTTP/1.1 test backend of test_l7 (HTTP/2 -> HTTP/1.1 translation), each stream a
request of its own; flow control both ways; RST_STREAM and GOAWAY; gRPC local replies; the HTTP/2 DoS
classes leave memory bounded and another client unaffected."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest

from nodeproxy import _l7
from nodeproxy.proxy.http_route import grpc_status_for
from tests.test_l7 import GIB, PATTERN, blob, make_backend, wait_until
from tests.test_l7_loopback import LoopbackProxy, free_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class Response:
    headers: dict[str, str] = field(default_factory=dict)
    informational: list[dict[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[str, str] = field(default_factory=dict)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> int:
        return int(self.headers[":status"])

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


def fields(headers: object) -> dict[str, str]:
    """A header list the h2 package decoded (header_encoding set: str pairs) as a dict."""
    assert isinstance(headers, list)
    return {str(name): str(value) for name, value in headers}


class H2Client:
    """A blocking HTTP/2 client on the `h2` package. auto_window=False never opens any window."""

    def __init__(self, port: int, auto_window: bool = True, initial_window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="latin-1",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window})
        self.auto_window = auto_window
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str,
        method: str = "GET",
        headers: tuple[tuple[str, str], ...] = (),
        body: bytes | None = None,
        trailers: tuple[tuple[str, str], ...] = (),
        end: bool = True,
    ) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "web"), *headers]
        ends_here = end and body is None and not trailers
        self.conn.send_headers(sid, fields, end_stream=ends_here)
        self.responses[sid] = Response()
        self.flush()
        if body is not None:
            self.send_body(sid, body, end=end and not trailers)
        if trailers:
            self.conn.send_headers(sid, list(trailers), end_stream=True)
            self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        view = memoryview(body)
        while view:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.read_once()
                continue
            self.conn.send_data(sid, bytes(view[:window]))
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def read_once(self, timeout: float = 10.0) -> None:
        self.sock.settimeout(timeout)
        data = self.sock.recv(1 << 20)
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            self.on_event(event)
        self.flush()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.responses[event.stream_id].headers = fields(event.headers)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            self.responses[event.stream_id].informational.append(fields(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            self.responses[event.stream_id].data += event.data
            if self.auto_window:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            self.responses[event.stream_id].trailers = fields(event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            if event.stream_id in self.responses:
                self.responses[event.stream_id].reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the proxy"
            assert not self.closed, "the proxy closed the connection"
            self.read_once(left)

    def get(self, path: str, **kwargs: object) -> Response:
        sid = self.request(path, **kwargs)  # type: ignore[arg-type]
        self.wait(lambda: self.responses[sid].done)
        return self.responses[sid]

    def close(self) -> None:
        self.sock.close()


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


def curl_h2(port: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", str(timeout), *args],
        capture_output=True,
        timeout=timeout + 5,
    )


# -- curl ---------------------------------------------------------------------------------------------------


def test_curl_prior_knowledge_get_post_and_download(proxy: LoopbackProxy) -> None:
    url = f"http://127.0.0.1:{proxy.port}"
    got = curl_h2(proxy.port, "-i", f"{url}/hello?x=1")
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith(b"HTTP/2 200") and b"path=/hello?x=1" in got.stdout
    body = blob(3_000_000)  # several stream windows: the upload only finishes if credit flows back
    got = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "30", "--data-binary", "@-", f"{url}/sink"],
        input=body,
        capture_output=True,
        timeout=35,
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.split()[:2] == [hashlib.sha256(body).hexdigest().encode(), b"3000000"]
    got = curl_h2(proxy.port, f"{url}/blob/5000000")
    assert got.returncode == 0, got.stderr
    assert got.stdout == blob(5_000_000)
    assert proxy.proxy.stats.requests == 3


def test_auto_port_takes_the_h2_preface_as_http(backend: int) -> None:
    handed: list[int] = []

    def to_l4(conn_id: int, fd: int, *_: object) -> None:
        handed.append(conn_id)
        socket.socket(fileno=fd).close()

    running = LoopbackProxy(["127.0.0.1"], backend, not_http=to_l4)
    try:
        got = curl_h2(running.port, f"http://127.0.0.1:{running.port}/auto")
        assert got.returncode == 0, got.stderr
        assert b"path=/auto" in got.stdout and not handed
    finally:
        running.close()


# -- streams ------------------------------------------------------------------------------------------------


def test_streams_are_requests_each_with_its_own_head_record(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    sids = [client.request(f"/s{i}") for i in range(20)]
    client.wait(lambda: all(client.responses[s].done for s in sids))
    for i, sid in enumerate(sids):
        response = client.responses[sid]
        assert response.status == 200 and f"path=/s{i}".encode() in response.data
        # Connection-specific fields never reach an HTTP/2 client (RFC 9113 §8.2.2).
        assert "connection" not in response.headers and "keep-alive" not in response.headers
    assert proxy.proxy.stats.requests == 20
    client.close()


def test_request_and_response_trailers_cross_the_translation(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    body = b"x" * 100_000
    response = client.get("/sink", method="POST", body=body, trailers=(("x-sum", "42"), ("x-more", "y")))
    assert response.status == 200
    digest, count, trailers = response.data.decode().split(" ")
    assert digest == hashlib.sha256(body).hexdigest() and count == "100000"
    assert sorted(trailers.split(";")) == ["x-more:y", "x-sum:42"]
    response = client.get("/blob/300000")
    assert bytes(response.data) == blob(300_000)
    assert response.trailers == {"x-checksum": hashlib.sha256(blob(300_000)).hexdigest()}
    client.close()


def test_cookies_are_joined_for_http1(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    response = client.get("/headers", headers=(("cookie", "a=1"), ("cookie", "b=2")))
    assert ["cookie", "a=1; b=2"] in __import__("json").loads(bytes(response.data))
    client.close()


def test_field_value_http1_cannot_carry_never_reaches_the_upstream(proxy: LoopbackProxy) -> None:
    # nghttp2 rejects these itself (RFC 9113 §8.2.1); the engine's own h1_field_is_valid check behind it
    # answers 400. Either way no such request is decided, let alone forwarded.
    client = H2Client(proxy.port)
    for value in ("a\x01b", "a\x7fb", " lead", "trail\t", "a\x00b"):
        response = client.get("/headers", headers=(("x-bad", value),))
        assert response.reset == 1 or (
            response.status == 400 and response.headers["x-nodeproxy-flags"] == "DPE"
        )
    response = client.get("/sink", method="POST", body=b"abc", trailers=(("x-t", "1\x7f"),))
    assert response.reset == 1 or response.data.decode().endswith(" 3 ")  # reset, or the trailer dropped
    assert proxy.proxy.stats.requests <= 1
    assert client.get("/after").status == 200  # the connection goes on
    client.close()


def test_rst_stream_from_the_client_cancels_the_upstream_request(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    sid = client.request("/slow/3000")
    assert wait_until(lambda: proxy.proxy.upstream_connections == 1, 2)
    started = time.monotonic()
    client.conn.reset_stream(sid)
    client.flush()
    # The upstream connection is closed (not left to finish a request nobody wants) well before 3 s.
    assert wait_until(lambda: proxy.proxy.upstream_connections == 0, 2)
    assert time.monotonic() - started < 2
    assert wait_until(lambda: not proxy.proxy.requests, 2)
    assert client.get("/next").status == 200
    client.close()


def test_goaway_on_drain_lets_streams_in_flight_finish(proxy: LoopbackProxy) -> None:
    # Raw frames: the h2 package treats any GOAWAY as the end of the connection.
    sock = raw_h2(proxy.port)
    sock.sendall(frame(1, 0x5, 1, hpack_get("/slow/500")))
    assert wait_until(lambda: proxy.proxy.upstream_connections == 1, 2)
    proxy.proxy.begin_drain()
    frames = parse_frames(read_until_closed(sock))
    kinds = [(kind, flags & 1, sid) for kind, flags, sid, _ in frames]
    goaway = next(i for i, f in enumerate(frames) if f[0] == 7)
    assert int.from_bytes(frames[goaway][3][4:8], "big") == 0  # NO_ERROR: graceful
    assert int.from_bytes(frames[goaway][3][:4], "big") == 1  # stream 1 will still be processed
    # The answer to stream 1 comes after the GOAWAY, complete, then the connection closes.
    assert (1, 0, 1) in kinds[goaway:] and (0, 1, 1) in kinds[goaway:]
    assert b"path=/slow/500" in b"".join(f[3] for f in frames if f[0] == 0)
    sock.close()
    assert wait_until(lambda: proxy.proxy.live_connections == 0, 2)


def test_at_most_100_concurrent_streams(proxy: LoopbackProxy) -> None:
    # Sent before the server's SETTINGS can arrive, so the client's own limit does not apply.
    client = H2Client(proxy.port)
    sids = [client.request("/slow/800") for _ in range(101)]
    client.wait(lambda: all(client.responses[s].done for s in sids), 15)
    refused = [s for s in sids if client.responses[s].reset is not None]
    assert len(refused) == 1 and client.responses[refused[0]].reset == 7  # REFUSED_STREAM
    assert all(client.responses[s].status == 200 for s in sids if s not in refused)
    client.close()


# -- gRPC local replies -------------------------------------------------------------------------------------


def test_engine_grpc_status_agrees_with_http_route() -> None:
    for status in range(200, 600):
        for flag in ("NR", "UH", "UF", "UC", "UT", "DPE", "UPE"):
            assert _l7.grpc_status_for(status, flag) == grpc_status_for(status, flag), (status, flag)


def grpc_headers() -> tuple[tuple[str, str], ...]:
    return (("content-type", "application/grpc"), ("te", "trailers"))


def test_grpc_local_reply_is_trailers_only(backend: int) -> None:
    running = LoopbackProxy([], backend, protocol="grpc")  # no endpoint: 503 UH -> UNAVAILABLE
    try:
        client = H2Client(running.port)
        response = client.get("/pkg.Svc/Call", method="POST", headers=grpc_headers(), body=b"\0\0\0\0\0")
        assert response.status == 200 and not response.data and not response.trailers
        assert response.headers["grpc-status"] == "14" and response.headers["x-nodeproxy-flags"] == "UH"
        assert response.headers["content-type"] == "application/grpc" and "grpc-message" in response.headers
        client.close()
    finally:
        running.close()


def test_grpc_connect_failure_is_unavailable(backend: int) -> None:
    running = LoopbackProxy(["127.0.0.1"], free_port(), protocol="grpc")
    try:
        client = H2Client(running.port)
        response = client.get("/pkg.Svc/Call", method="POST", headers=grpc_headers(), body=b"\0\0\0\0\0")
        assert response.status == 200 and response.headers["grpc-status"] == "14"
        assert response.headers["x-nodeproxy-flags"] == "UF"
        client.close()
    finally:
        running.close()


# -- DoS classes --------------------------------------------------------------------------------------------


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def assert_other_client_served(port: int) -> None:
    other = H2Client(port)
    started = time.monotonic()
    response = other.get("/blob/1000000")
    assert bytes(response.data) == blob(1_000_000) and time.monotonic() - started < 3
    other.close()


def test_zero_window_client_is_bounded_and_does_not_stall_others(proxy: LoopbackProxy) -> None:
    stalled = H2Client(proxy.port, auto_window=False, initial_window=0)
    before = rss_kib()
    sids = [stalled.request("/blob/40000000") for _ in range(8)]  # 320 MB it never lets us send
    stalled.wait(lambda: all(stalled.responses[s].headers for s in sids))
    time.sleep(1.0)
    assert_other_client_served(proxy.port)
    worker = proxy.proxy.workers[0]
    held = sum(row[5] + row[6] + row[7] + row[8] for row in worker.debug_connections())
    assert held < 8 * (_l7.HIGH_WATER_BYTES + _l7.IO_CHUNK_BYTES), held
    assert rss_kib() - before < 64 * 1024  # far below what the streams asked for
    assert all(not stalled.responses[s].data for s in sids)
    stalled.close()
    assert wait_until(lambda: proxy.proxy.upstream_connections == 0 and proxy.proxy.live_connections == 0, 5)


def raw_h2(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(PREFACE + frame(4, 0, 0))  # empty SETTINGS
    return sock


def read_until_closed(sock: socket.socket, limit: float = 10.0) -> bytes:
    """Everything the proxy sends until it closes the connection (fails after `limit` seconds)."""
    got = bytearray()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(1 << 16)
        except ConnectionResetError:
            return bytes(got)
        if not data:
            return bytes(got)
        got += data
    raise AssertionError("the proxy kept the connection open")


def parse_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each whole frame in data."""
    frames, at = [], 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        sid = int.from_bytes(data[at + 5 : at + 9], "big") & 0x7FFFFFFF
        frames.append((data[at + 3], data[at + 4], sid, data[at + 9 : at + 9 + length]))
        at += 9 + length
    return frames


def goaway_codes(data: bytes) -> list[int]:
    return [int.from_bytes(payload[4:8], "big") for kind, _, _, payload in parse_frames(data) if kind == 7]


def hpack_get(path: str) -> bytes:
    import hpack

    return bytes(
        hpack.Encoder().encode(
            [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "web")]
        )
    )


def test_rapid_reset_is_cut_off(proxy: LoopbackProxy) -> None:
    sock = raw_h2(proxy.port)
    block = hpack_get("/slow/200")
    burst = b"".join(
        frame(1, 0x5, sid, block) + frame(3, 0, sid, struct.pack(">I", 8)) for sid in range(1, 6001, 2)
    )
    sock.sendall(burst)
    assert 11 in goaway_codes(read_until_closed(sock))  # ENHANCE_YOUR_CALM
    sock.close()
    assert_other_client_served(proxy.port)
    assert wait_until(lambda: proxy.proxy.live_connections == 0 and not proxy.proxy.requests, 5)


def test_continuation_flood_is_cut_off(proxy: LoopbackProxy) -> None:
    sock = raw_h2(proxy.port)
    block = hpack_get("/x")
    flood = frame(1, 0x1, 1, block[:3]) + b"".join(frame(9, 0, 1, b"") for _ in range(10_000))
    with pytest.raises(OSError):
        sock.sendall(flood * 10)  # the proxy closes long before this is sent
        read_until_closed(sock)
        raise ConnectionResetError
    sock.close()
    assert_other_client_served(proxy.port)


def test_ping_and_settings_floods_of_a_client_that_does_not_read(proxy: LoopbackProxy) -> None:
    # CVE-2019-9512 / 9515: acks pile up while the client does not read. The proxy stops reading a
    # client its frames do not drain for, and nghttp2's outbound-ack bound ends the session.
    for flood_frame in (frame(6, 0, 0, b"12345678"), frame(4, 0, 0)):
        sock = raw_h2(proxy.port)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        before = rss_kib()
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            for _ in range(200):  # 200,000 frames, never reading an ack
                sock.sendall(flood_frame * 1000)
        read_until_closed(sock)
        assert rss_kib() - before < 32 * 1024
        sock.close()
        assert_other_client_served(proxy.port)
    assert wait_until(lambda: proxy.proxy.live_connections == 0, 5)


def test_empty_data_frame_flood_is_cut_off(proxy: LoopbackProxy) -> None:
    sock = raw_h2(proxy.port)
    block = hpack_get("/slow/2000")
    sock.sendall(frame(1, 0x4, 1, block) + b"".join(frame(0, 0, 1) for _ in range(1000)))
    assert 11 in goaway_codes(read_until_closed(sock))
    sock.close()
    assert_other_client_served(proxy.port)


def test_window_is_credited_only_as_the_upstream_takes_bytes(proxy: LoopbackProxy) -> None:
    # /stall/1500: the backend reads nothing for 1.5 s. The client can send its windows' worth and the
    # engine's bounded buffers, not the 20 MB it wants to.
    client = H2Client(proxy.port)
    sid = client.request("/stall/1500", method="POST", end=False)
    sent = 0
    chunk = PATTERN[:16384]
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and sent < 20_000_000:
        if client.conn.local_flow_control_window(sid) < len(chunk):
            with contextlib.suppress(TimeoutError):
                client.read_once(0.05)
            continue
        client.conn.send_data(sid, chunk)
        client.flush()
        sent += len(chunk)
    assert sent < 8 * 1024 * 1024  # the connection window (8 MiB) at most, never the whole body
    client.conn.end_stream(sid)
    client.flush()
    client.wait(lambda: client.responses[sid].done, 15)
    _, count, _ = client.responses[sid].data.decode().split(" ")
    assert count == str(sent)
    client.close()


# -- volume -------------------------------------------------------------------------------------------------


def test_h2load_16_connections_10_streams_each(proxy: LoopbackProxy) -> None:
    got = subprocess.run(
        ["h2load", "-n", "3000", "-c", "16", "-m", "10", f"http://127.0.0.1:{proxy.port}/load"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    assert "3000 succeeded, 0 failed, 0 errored" in got.stdout, got.stdout
    assert "status codes: 3000 2xx" in got.stdout, got.stdout
    assert proxy.proxy.stats.requests == 3000


def gib_digest() -> str:
    digest = hashlib.sha256()
    for _ in range(GIB // len(PATTERN)):
        digest.update(PATTERN)
    return digest.hexdigest()


def test_one_gib_each_way_over_http2(proxy: LoopbackProxy) -> None:
    expected = gib_digest()
    url = f"http://127.0.0.1:{proxy.port}"
    # Upload: curl sends DATA without content-length, so the engine re-frames it as chunked.
    upload = subprocess.Popen(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "120", "-T", "-", f"{url}/sink"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert upload.stdin is not None
    for _ in range(GIB // len(PATTERN)):
        upload.stdin.write(PATTERN)
    upload.stdin.close()
    assert upload.stdout is not None and upload.stderr is not None
    out = upload.stdout.read()
    assert upload.wait(125) == 0, upload.stderr.read()
    assert out.split()[:2] == [expected.encode(), str(GIB).encode()]
    # Download: a chunked response framed as DATA; curl writes the bytes to our digest.
    download = subprocess.Popen(
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "120", f"{url}/blob/{GIB}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert download.stdout is not None
    digest, total = hashlib.sha256(), 0
    while data := download.stdout.read(1 << 20):
        digest.update(data)
        total += len(data)
    assert download.wait(125) == 0
    assert total == GIB and digest.hexdigest() == expected


def test_sequential_requests_do_not_wait_for_delayed_acks(proxy: LoopbackProxy) -> None:
    # One request at a time on one connection: frames written one small write each used to meet Nagle
    # and the peer's delayed ACK, 40 ms a request.
    client = H2Client(proxy.port)
    client.get("/warm")
    started = time.monotonic()
    for i in range(100):
        assert client.get(f"/q{i}").status == 200
    assert time.monotonic() - started < 2.0  # 100 x 40 ms would be 4 s
    client.close()


@pytest.mark.parametrize(
    ("fields", "body"),
    [
        ((("X-Upper", "1"),), None),  # uppercase field name (RFC 9113 §8.2.1)
        ((("connection", "keep-alive"),), None),  # connection-specific (§8.2.2)
        ((("transfer-encoding", "chunked"),), None),
        ((("te", "gzip"),), None),  # te other than "trailers"
        ((("content-length", "10"),), b"abc"),  # content-length against DATA (§8.1.1)
    ],
)
def test_malformed_requests_are_reset_and_never_decided(
    proxy: LoopbackProxy, fields: tuple[tuple[str, str], ...], body: bytes | None
) -> None:
    client = H2Client(proxy.port)
    response = client.get("/bad", method="POST" if body else "GET", headers=fields, body=body)
    assert response.reset == 1  # PROTOCOL_ERROR
    assert client.get("/good").status == 200  # a stream error, not a connection error
    assert proxy.proxy.stats.requests == (2 if body else 1)  # a bad head is never decided
    client.close()


def test_pseudo_header_mistakes_are_reset(proxy: LoopbackProxy) -> None:
    sock = raw_h2(proxy.port)
    import hpack

    encoder = hpack.Encoder()
    blocks = [
        [(":method", "GET"), (":scheme", "http"), (":authority", "web")],  # no :path
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "web"), (":path", "/x")],
        [(":method", "GET"), ("x-a", "1"), (":path", "/"), (":scheme", "http")],  # pseudo after regular
        [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":status", "200")],  # response pseudo
    ]
    for i, block in enumerate(blocks):
        sock.sendall(frame(1, 0x5, 1 + 2 * i, bytes(encoder.encode(block))))
    sock.sendall(
        frame(
            1,
            0x5,
            99,
            bytes(
                encoder.encode(
                    [(":method", "GET"), (":path", "/ok"), (":scheme", "http"), (":authority", "web")]
                )
            ),
        )
    )
    got = bytearray()
    sock.settimeout(5)
    while not any(f[0] == 0 and f[2] == 99 and f[1] & 1 for f in parse_frames(bytes(got))):
        got += sock.recv(65536)
    resets = {sid: int.from_bytes(p, "big") for kind, _, sid, p in parse_frames(bytes(got)) if kind == 3}
    assert resets == {1: 1, 3: 1, 5: 1, 7: 1}
    assert proxy.proxy.stats.requests == 1
    sock.close()


def test_client_goaway_lets_its_streams_finish_then_closes(proxy: LoopbackProxy) -> None:
    sock = raw_h2(proxy.port)
    sock.sendall(frame(1, 0x5, 1, hpack_get("/slow/300")) + frame(7, 0, 0, struct.pack(">II", 0, 0)))
    frames = parse_frames(read_until_closed(sock))
    assert (1, 1) in [(kind, sid) for kind, _, sid, _ in frames]  # the answer's HEADERS
    assert b"path=/slow/300" in b"".join(p for kind, _, sid, p in frames if kind == 0 and sid == 1)
    sock.close()
    assert wait_until(lambda: proxy.proxy.live_connections == 0 and not proxy.proxy.requests, 2)


def test_oversized_header_block_is_431_and_the_connection_goes_on(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    many = tuple((f"x-f{i}", "v") for i in range(150))  # more fields than the 100 allowed
    response = client.get("/many", headers=many)
    assert response.status == 431 and response.headers["x-nodeproxy-flags"] == "DPE"
    huge = (("x-big", "v" * 70_000),)  # more than the 60 KiB a head may have
    response = client.get("/huge", headers=huge)
    assert response.status == 431 or response.reset is not None
    assert client.get("/fine").status == 200
    assert proxy.proxy.stats.requests == 1
    client.close()


def test_100_continue_reaches_an_http2_client_as_informational_headers(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    response = client.get("/sink", method="POST", headers=(("expect", "100-continue"),), body=b"abc")
    assert [info[":status"] for info in response.informational] == ["100"]
    assert response.status == 200 and response.data.decode().split(" ")[1] == "3"
    client.close()
