"""HTTP/2 to the upstream (`http2` ports) through the HTTP engine on loopback: HTTP/1.1 and HTTP/2 clients
against an h2c backend (tests/l7_h2_backend.py, and nghttpd), streams multiplexed over a small pool,
trailers both ways, RST_STREAM both ways, a server's GOAWAY, 1 GiB each way."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.l7_h2_backend import H2Backend
from tests.test_l7 import GIB, PATTERN, blob, read_response, wait_until
from tests.test_l7_h2 import H2Client, gib_digest
from tests.test_l7_loopback import LoopbackProxy, free_port


@pytest.fixture()
def backend() -> Iterator[H2Backend]:
    server = H2Backend()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture()
def proxy(backend: H2Backend) -> Iterator[LoopbackProxy]:
    running = LoopbackProxy(["127.0.0.1"], backend.port, protocol="http2")
    try:
        yield running
    finally:
        running.close()


def h1_exchange(proxy: LoopbackProxy, request: bytes) -> tuple[socket.socket, object]:
    sock = proxy.connect()
    sock.sendall(request)
    reader = sock.makefile("rb")
    return sock, read_response(reader)


# -- HTTP/1.1 client -> HTTP/2 upstream ---------------------------------------------------------------------


def test_http1_client_to_http2_upstream(proxy: LoopbackProxy, backend: H2Backend) -> None:
    sock = proxy.connect()
    reader = sock.makefile("rb")
    sock.sendall(
        b"GET /hello?q=1 HTTP/1.1\r\nHost: web\r\nX-Mine: yes\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\n"
    )
    response = read_response(reader)
    assert response.status == 200 and response.body == b"h2backend path=/hello?q=1"
    sock.sendall(b"GET /headers HTTP/1.1\r\nHost: web\r\nX-Mine: yes\r\nTE: trailers\r\n\r\n")
    fields = dict(json.loads(read_response(reader).body))
    assert fields[":authority"] == "web" and fields[":method"] == "GET" and fields[":scheme"] == "http"
    assert fields["x-mine"] == "yes" and fields["te"] == "trailers" and "host" not in fields
    # A chunked upload with trailers arrives as DATA and trailers.
    sock.sendall(
        b"POST /sink HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n"
    )
    response = read_response(reader)
    assert response.body == f"{hashlib.sha256(b'hello world').hexdigest()} 11 x-sum:11".encode()
    # A response with trailers reaches an HTTP/1.1 client as a chunked body with a trailer section.
    sock.sendall(b"GET /blob/300000 HTTP/1.1\r\nHost: web\r\nTE: trailers\r\n\r\n")
    response = read_response(reader)
    assert response.header("transfer-encoding") == "chunked" and response.body == blob(300_000)
    sock.sendall(b"GET /status/204 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert read_response(reader).status == 204
    sock.sendall(b"HEAD /hello HTTP/1.1\r\nHost: web\r\n\r\n")
    assert read_response(reader, head_request=True).status == 200
    sock.sendall(b"GET /last HTTP/1.1\r\nHost: web\r\n\r\n")
    assert read_response(reader).body == b"h2backend path=/last"
    # Every request went over one multiplexed connection.
    assert backend.connections == 1 and backend.requests == 7
    sock.close()


def test_many_http1_clients_share_few_http2_connections(proxy: LoopbackProxy, backend: H2Backend) -> None:
    socks = [proxy.connect() for _ in range(40)]
    for i, sock in enumerate(socks):
        sock.sendall(f"GET /slow/300?i={i} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
    for i, sock in enumerate(socks):
        with sock.makefile("rb") as reader:
            assert read_response(reader).body == f"h2backend path=/slow/300?i={i}".encode()
        sock.close()
    assert backend.connections == 1  # 40 concurrent streams on one connection (its limit is 100)


# -- HTTP/2 client -> HTTP/2 upstream -----------------------------------------------------------------------


def test_http2_end_to_end_streams_trailers_and_pool(proxy: LoopbackProxy, backend: H2Backend) -> None:
    first, second = H2Client(proxy.port), H2Client(proxy.port)
    sids = [first.request("/slow/600") for _ in range(80)] + [second.request("/slow/600") for _ in range(80)]
    first.wait(lambda: all(first.responses[s].done for s in sids[:80]))
    second.wait(lambda: all(second.responses[s].done for s in sids[80:]))
    assert all(
        c.responses[s].status == 200
        for c, s in [(first, s) for s in sids[:80]] + [(second, s) for s in sids[80:]]
    )
    # 160 concurrent streams: a second upstream connection once the first had 100.
    assert backend.connections == 2
    body = PATTERN[:200_000]
    response = first.get("/sink", method="POST", body=body, trailers=(("x-a", "1"),))
    assert response.data.decode() == f"{hashlib.sha256(body).hexdigest()} 200000 x-a:1"
    response = first.get("/blob/2000000")
    assert bytes(response.data) == blob(2_000_000)
    assert response.trailers["x-checksum"] == hashlib.sha256(blob(2_000_000)).hexdigest()
    first.close()
    second.close()


def test_rst_stream_both_ways(proxy: LoopbackProxy, backend: H2Backend) -> None:
    client = H2Client(proxy.port)
    sid = client.request("/slow/3000")
    assert wait_until(lambda: backend.requests == 1, 2)
    client.conn.reset_stream(sid, error_code=8)
    client.flush()
    assert wait_until(lambda: backend.resets_received == [8], 2)  # CANCEL reached the server
    assert wait_until(lambda: not proxy.proxy.requests, 2)
    # The server resets a stream before answering: 502 UC, as for an HTTP/1.1 upstream that closes.
    response = client.get("/reset")
    assert response.status == 502 and response.headers["x-nodeproxy-flags"] == "UC"
    assert response.data == b"upstream connection closed or reset before the response (not retriable)\n"
    # ... or in the middle of its answer: the client's stream is reset too, with the server's code.
    response = client.get("/reset-mid")
    assert response.reset == 8  # (its head may not have gone out before the reset)
    assert client.get("/fine").status == 200
    client.close()
    # An HTTP/1.1 client learns of it as a 502 (nothing of the response was sent).
    sock = proxy.connect()
    sock.sendall(b"GET /reset HTTP/1.1\r\nHost: web\r\n\r\n")
    with sock.makefile("rb") as reader:
        h1_response = read_response(reader)
    assert h1_response.status == 502 and h1_response.header("x-nodeproxy-flags") == "UC"
    sock.close()


def test_server_goaway_moves_new_requests_to_a_new_connection() -> None:
    backend = H2Backend(goaway_after=5)
    running = LoopbackProxy(["127.0.0.1"], backend.port, protocol="http2")
    try:
        client = H2Client(running.port)
        for i in range(23):
            response = client.get(f"/r{i}")
            assert response.status == 200 and response.data == f"h2backend path=/r{i}".encode()
        assert backend.connections == 5
        client.close()
    finally:
        running.close()
        backend.close()


def test_upstream_connect_failure_is_retried_then_502() -> None:
    running = LoopbackProxy(["127.0.0.1"], free_port(), protocol="http2")
    try:
        sock = running.connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        with sock.makefile("rb") as reader:
            response = read_response(reader)
        assert response.status == 502 and response.header("x-nodeproxy-flags") == "UF"
        sock.close()
        assert wait_until(lambda: running.proxy.upstream_connections == 0, 2)
    finally:
        running.close()


def test_zero_window_client_over_http2_upstream_is_bounded(proxy: LoopbackProxy, backend: H2Backend) -> None:
    stalled = H2Client(proxy.port, auto_window=False, initial_window=0)
    sids = [stalled.request("/blob/30000000") for _ in range(4)]
    stalled.wait(lambda: all(stalled.responses[s].headers for s in sids))
    time.sleep(1.0)
    other = H2Client(proxy.port)
    assert bytes(other.get("/blob/1000000").data) == blob(1_000_000)
    other.close()
    worker = proxy.proxy.workers[0]
    held = sum(row[5] + row[6] + row[7] + row[8] for row in worker.debug_connections())
    assert held < 4 * 1024 * 1024, held
    stalled.close()
    assert wait_until(lambda: proxy.proxy.live_connections == 0, 5)
    assert wait_until(lambda: len(backend.resets_received) == 4, 5)  # the server stops sending too


# -- real peers ---------------------------------------------------------------------------------------------


@pytest.fixture()
def nghttpd(tmp_path: object) -> Iterator[int]:
    if shutil.which("nghttpd") is None:
        pytest.skip("nghttpd (Debian nghttp2-server) is not installed")
    port = free_port()
    docroot = str(tmp_path)
    with open(f"{docroot}/index.html", "wb") as page:
        page.write(b"nghttpd index\n")
    proc = subprocess.Popen(
        ["nghttpd", "--no-tls", "--echo-upload", "-d", docroot, "-a", "127.0.0.1", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _listening(port), 5)
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_curl_and_h2load_through_to_nghttpd(nghttpd: int) -> None:
    running = LoopbackProxy(["127.0.0.1"], nghttpd, protocol="http2")
    try:
        url = f"http://127.0.0.1:{running.port}/index.html"
        got = subprocess.run(["curl", "-sS", "--max-time", "10", url], capture_output=True, timeout=15)
        assert got.returncode == 0 and got.stdout == b"nghttpd index\n", got.stderr
        got = subprocess.run(
            ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", url],
            capture_output=True,
            timeout=15,
        )
        assert got.returncode == 0 and got.stdout == b"nghttpd index\n", got.stderr
        load = subprocess.run(
            ["h2load", "-n", "5000", "-c", "16", "-m", "10", url], capture_output=True, text=True, timeout=60
        )
        assert "5000 succeeded, 0 failed, 0 errored" in load.stdout, load.stdout
        assert running.proxy.upstream_connections <= 2
    finally:
        running.close()


def test_one_gib_each_way_http2_to_http2(nghttpd: int) -> None:
    # nghttpd --echo-upload sends the upload back: 1 GiB up and the same GiB down in one exchange.
    running = LoopbackProxy(["127.0.0.1"], nghttpd, protocol="http2")
    try:
        expected = gib_digest()
        echo = subprocess.Popen(
            [
                "curl", "-sS", "--http2-prior-knowledge", "--max-time", "180", "-T", "-",
                f"http://127.0.0.1:{running.port}/echo",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        assert echo.stdin is not None and echo.stdout is not None
        import threading

        def feed() -> None:
            assert echo.stdin is not None
            for _ in range(GIB // len(PATTERN)):
                echo.stdin.write(PATTERN)
            echo.stdin.close()

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        digest, total = hashlib.sha256(), 0
        while data := echo.stdout.read(1 << 20):
            digest.update(data)
            total += len(data)
        feeder.join(10)
        assert echo.wait(185) == 0
        assert total == GIB and digest.hexdigest() == expected
    finally:
        running.close()


def test_sequential_requests_do_not_wait_for_delayed_acks(proxy: LoopbackProxy) -> None:
    client = H2Client(proxy.port)
    client.get("/warm")
    started = time.monotonic()
    for i in range(100):
        assert client.get(f"/q{i}").status == 200
    assert time.monotonic() - started < 2.0  # 100 x 40 ms would be 4 s
    client.close()
