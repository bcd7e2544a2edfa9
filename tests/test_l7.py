"""The HTTP engine (nodeproxy._l7 + nodeproxy.proxy.http) with real sockets, curl, wrk and a WebSocket
client, in a namespace lab.

The engine runs in this process, its threads inside the lab's node namespace (a thread created inside
`netns.entered` stays in that namespace), behind plain listeners on the node's gateway address (no
TPROXY capture: each listener port stands for one service VIP:port). Each backend pod runs this file as
a small HTTP/1.1 server (`--serve`) whose answers show what it received, plus a WebSocket echo server.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import http.client
import itertools
import json
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nodeproxy import capture as capture_rules
from nodeproxy import netns
from nodeproxy.capture import CapturePlan
from nodeproxy.config import HttpConfig, RelayConfig, parse_config
from nodeproxy.lab import GATEWAY, POD_CIDR, Lab, wait_listening
from nodeproxy.proxy.http import HttpProxy
from nodeproxy.proxy.listener import open_listener
from nodeproxy.state.routing import StateUpdater
from tests.conftest import running_lab

pytestmark = pytest.mark.netns

BACKEND_PORT = 8090
WS_PORT = 8091
DEAD_PORT = 8099  # nothing listens here
# Listener port on the node -> the service VIP:port it stands for.
SERVICES = {
    18080: ("10.96.0.30", 80),  # web: the three backends
    18081: ("10.96.0.31", 80),  # ws: WebSocket echo on the three backends
    18082: ("10.96.0.32", 80),  # nr: routes only for `x-env: staging`
    18083: ("10.96.0.33", 80),  # uh: staging subset with no endpoint
    18084: ("10.96.0.34", 80),  # uf: an endpoint where nothing listens
}
WEB, WS, NR, UH, UF = SERVICES
SECOND = 100  # port offset of an engine started beside the module's
CAPTURED = -1  # Engine.listeners key of the transparent (TPROXY) listener
PATTERN = hashlib.sha256(b"nodeproxy").digest() * 32768  # 1 MiB, the unit of big bodies
GIB = 1 << 30


def lab_config(lab: Lab) -> str:
    """web, ws, nr, uh and uf (see SERVICES) on this lab's backends; every endpoint is `env: prod`."""
    everyone = "".join(f"      - {{address: {p.ip}, labels: {{env: prod}}}}\n" for p in lab.backend_pods)

    def service(name: str, vip: str, target_port: int, endpoints: str = everyone, extra: str = "") -> str:
        port = f"{{port: 80, target_port: {target_port}, protocol: http}}"
        return f"  - name: {name}\n    vip: {vip}\n    ports: [{port}]\n    endpoints:\n{endpoints}{extra}"

    be0 = lab.backend_pods[0].ip
    staging_only = "[{headers: [{name: x-env, exact: staging}]}]"
    return (
        "node:\n  name: node-a\n"
        f'capture:\n  pod_cidrs: [{POD_CIDR}]\n  pod_interfaces: ["npv+"]\n'
        "listeners:\n  outbound: 127.0.0.1:15001\n"
        "services:\n"
        # p2c: these tests count requests per backend; peak_ewma would keep sequential requests on
        # the fastest endpoints (docs/resilience.md)
        + service("web", SERVICES[WEB][0], BACKEND_PORT, extra="    balancer: p2c\n")
        + service("ws", SERVICES[WS][0], WS_PORT)
        + service(
            "nr",
            SERVICES[NR][0],
            BACKEND_PORT,
            extra="    subsets: [{name: prod, labels: {env: prod}}]\n    routes:\n"
            f"      - {{name: staging-only, match: {staging_only}, to: [{{subset: prod}}]}}\n",
        )
        + service(
            "uh",
            SERVICES[UH][0],
            BACKEND_PORT,
            extra="    subsets: [{name: staging, labels: {env: staging}}]\n"
            "    routes:\n      - {name: all, to: [{subset: staging}]}\n",
        )
        + service("uf", SERVICES[UF][0], DEAD_PORT, endpoints=f"      - {{address: {be0}}}\n")
    )


class Engine:
    """HttpProxy in this process, its engine threads and listeners in the lab's node namespace."""

    def __init__(
        self,
        lab: Lab,
        http: HttpConfig,
        pool_max_conns: int = 1024,
        offset: int = 0,
        capture: bool = False,
        config_text: str | None = None,
    ) -> None:
        """offset: listener ports are SERVICES' plus this, so a second engine can run beside the first.
        capture: also install the daemon's TPROXY capture in the node namespace and serve its
        transparent listener, connecting upstream from the client pod's own address, as the daemon does.
        config_text: the configuration to serve instead of lab_config(lab).
        """
        self.lab = lab
        self.offset = offset
        updater = StateUpdater()
        config = parse_config(config_text if config_text is not None else lab_config(lab))
        updater.apply(config)
        self.capture = CapturePlan.from_config(config) if capture else None
        self.loop = asyncio.new_event_loop()
        self.ids = itertools.count(1)
        self.stopping = threading.Event()
        self.listeners: dict[int, socket.socket] = {}
        with netns.entered(lab.node_ns):
            for port in SERVICES:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("0.0.0.0", port + offset))
                sock.listen(1024)
                sock.settimeout(0.1)
                self.listeners[port] = sock
            if self.capture is not None:
                captured = open_listener((self.capture.listen_ip, self.capture.listen_port))
                captured.settimeout(0.1)
                self.listeners[CAPTURED] = captured
                capture_rules.install(self.capture)
            self.proxy = HttpProxy(
                lambda: updater.current,
                http,
                RelayConfig(connect_attempts=2),
                threads=1,
                access_log=False,
                bind_source=capture,
                pool_max_conns=pool_max_conns,
            )
            self.proxy.start(self.loop)
        self.threads = [threading.Thread(target=self.loop.run_forever, daemon=True)]
        self.threads += [
            threading.Thread(target=self._accept, args=(p,), daemon=True) for p in self.listeners
        ]
        for t in self.threads:
            t.start()

    def _accept(self, port: int) -> None:
        sock = self.listeners[port]
        while not self.stopping.is_set():
            try:
                conn, (ip, cport) = sock.accept()
            except TimeoutError:
                continue
            # A captured connection's local address is the destination the client dialled.
            vip, vport = conn.getsockname() if port == CAPTURED else SERVICES[port]
            fd = conn.detach()
            self.loop.call_soon_threadsafe(self.proxy.adopt, next(self.ids), fd, ip, cport, vip, vport)

    def call(self, fn: object) -> object:
        """Run fn() on the proxy's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(10)

    def close(self) -> None:
        self.stopping.set()
        for t in self.threads[1:]:
            t.join(5)
        for sock in self.listeners.values():
            sock.close()
        if self.capture is not None:
            with netns.entered(self.lab.node_ns):
                capture_rules.remove(self.capture)
        self.call(self.proxy.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.threads[0].join(5)
        self.loop.close()


async def _call(fn: object) -> object:
    assert callable(fn)
    return fn()


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(clients=2, backends=3) as lab:
        for pod in lab.backend_pods:
            name = pod.ns.rsplit("-", 1)[1]
            lab.spawn(
                pod.ns,
                [sys.executable, "-m", "tests.test_l7", "--serve", str(BACKEND_PORT), str(WS_PORT), name],
                cwd=Path(__file__).resolve().parent.parent,
            )
        for pod in lab.backend_pods:
            for port in (BACKEND_PORT, WS_PORT):
                wait_listening(lab.node_ns, pod.ip, port, 15)
        yield lab


@pytest.fixture(scope="module")
def engine(lab: Lab) -> Iterator[Engine]:
    running = Engine(lab, HttpConfig(header_timeout=1.0))
    try:
        yield running
    finally:
        running.close()


# -- clients -----------------------------------------------------------------------------------------


def pod_socket(lab: Lab, port: int, client: int = 0) -> socket.socket:
    with netns.entered(lab.client_pods[client].ns):
        sock = socket.create_connection((GATEWAY, port), timeout=10)
    return sock


def curl(lab: Lab, *args: str, client: int = 0, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        netns.exec_argv(lab.client_pods[client].ns, ["curl", "-sS", "--max-time", str(timeout), *args]),
        capture_output=True,
        timeout=timeout + 5,
    )


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes, raw_head: bytes) -> None:
        self.status, self.headers, self.body, self.raw_head = status, headers, body, raw_head

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


def read_response(reader: socket.SocketIO | object, head_request: bool = False) -> Response:
    """Parse one HTTP/1.1 response from a buffered reader (strict enough to notice framing mistakes)."""
    f = reader
    assert hasattr(f, "readline") and hasattr(f, "read")
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers: list[tuple[str, str]] = []
    raw = status_line
    while True:
        line = f.readline()
        raw += line
        if line in (b"\r\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    response = Response(status, headers, b"", raw)
    if head_request or status in (204, 304) or 100 <= status < 200:
        return response
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body = b""
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b""):
                    pass
                break
            body += f.read(size)
            assert f.readline() == b"\r\n"
        response.body = body
    elif (length := response.header("content-length")) is not None:
        response.body = f.read(int(length))
    else:
        response.body = f.read()
    return response


def get(sock: socket.socket, path: str, reader: object, extra: str = "") -> Response:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: web\r\n{extra}\r\n".encode())
    return read_response(reader)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


# -- tests -------------------------------------------------------------------------------------------


def test_get_through_engine_balances_each_request(lab: Lab, engine: Engine) -> None:
    sock = pod_socket(lab, WEB)
    reader = sock.makefile("rb")
    backends = set()
    for i in range(30):
        response = get(sock, f"/hello/{i}", reader)
        assert response.status == 200
        text = response.body.decode()
        assert f"path=/hello/{i}" in text
        backends.add(text.split()[0])
    sock.close()
    # One client connection, yet every request is balanced on its own.
    assert len(backends) == 3, backends


def test_keep_alive_reuse_seen_at_backend(lab: Lab, engine: Engine) -> None:
    """1,000 requests over 8 keep-alive client connections reach each backend over at most 8 upstream
    connections: each client connection holds one upstream connection at a time, and a finished
    exchange returns its connection to the pool instead of closing it."""
    upstream_conns: set[str] = set()
    lock = threading.Lock()

    def client(n: int) -> int:
        with netns.entered(lab.client_pods[n % 2].ns):
            conn = http.client.HTTPConnection(GATEWAY, WEB, timeout=10)
            conn.connect()
        ok = 0
        for i in range(125):
            conn.request("GET", f"/k/{n}/{i}")
            response = conn.getresponse()
            body = response.read().decode()
            if response.status == 200:
                ok += 1
                with lock:
                    upstream_conns.add(body.split(" path=")[0])
        conn.close()
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(client, range(8))) == 1000
    per_backend = Counter(seen.split()[0] for seen in upstream_conns)
    assert len(per_backend) == 3 and max(per_backend.values()) <= 8, per_backend


def test_pool_bound_holds_under_load(lab: Lab) -> None:
    """With at most 2 connections per (source, endpoint), 1,000 requests from 12 concurrent keep-alive
    clients use at most 2 upstream connections per backend: the others wait for a pooled connection."""
    bounded = Engine(lab, HttpConfig(), pool_max_conns=2, offset=SECOND)
    try:
        upstream_conns: set[str] = set()
        lock = threading.Lock()

        def client(n: int) -> int:
            with netns.entered(lab.client_pods[n % 2].ns):
                conn = http.client.HTTPConnection(GATEWAY, WEB + SECOND, timeout=10)
                conn.connect()
            ok = 0
            for i in range(1000 // 12 + (n < 1000 % 12)):
                conn.request("GET", f"/b/{n}/{i}")
                response = conn.getresponse()
                body = response.read().decode()
                if response.status == 200:
                    ok += 1
                    with lock:
                        upstream_conns.add(body.split(" path=")[0])
            conn.close()
            return ok

        with ThreadPoolExecutor(12) as pool:
            assert sum(pool.map(client, range(12))) == 1000
        per_backend = Counter(seen.split()[0] for seen in upstream_conns)
        assert len(per_backend) == 3 and max(per_backend.values()) <= 2, per_backend
    finally:
        bounded.close()


def test_pipelined_requests_answered_in_order(lab: Lab, engine: Engine) -> None:
    sock = pod_socket(lab, WEB)
    body = b"x" * 5000
    sock.sendall(
        b"GET /p1 HTTP/1.1\r\nHost: web\r\n\r\n"
        b"POST /sink HTTP/1.1\r\nHost: web\r\nContent-Length: 5000\r\n\r\n"
        + body
        + b"GET /p3 HTTP/1.1\r\nHost: web\r\n\r\n"
        b"GET /p4 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    )
    reader = sock.makefile("rb")
    first, second, third, fourth = (read_response(reader) for _ in range(4))
    assert b"path=/p1" in first.body
    assert second.body.split()[:2] == [hashlib.sha256(body).hexdigest().encode(), b"5000"]
    assert b"path=/p3" in third.body
    assert b"path=/p4" in fourth.body
    assert fourth.header("connection") == "close"
    assert reader.read() == b""  # closed after the Connection: close request
    sock.close()


def test_no_body_rules_head_204_304_keep_the_connection_in_sync(lab: Lab, engine: Engine) -> None:
    sock = pod_socket(lab, WEB)
    reader = sock.makefile("rb")
    sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n")
    head = read_response(reader, head_request=True)
    assert head.status == 200 and int(head.header("content-length") or 0) > 0
    for code in (204, 304):
        response = get(sock, f"/status/{code}", reader)
        assert response.status == code and response.body == b""
    after = get(sock, "/after", reader)
    assert after.status == 200 and b"path=/after" in after.body
    sock.close()


def test_hop_by_hop_headers_removed_end_to_end_kept(lab: Lab, engine: Engine) -> None:
    sock = pod_socket(lab, WEB)
    reader = sock.makefile("rb")
    response = get(
        sock,
        "/headers",
        reader,
        "Connection: keep-alive, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        "Proxy-Connection: keep-alive\r\nX-End: 2\r\n",
    )
    seen = dict(json.loads(response.body))
    assert seen["host"] == "web" and seen["x-end"] == "2"
    for name in ("x-hop", "keep-alive", "te", "proxy-connection"):
        assert name not in seen, seen
    assert "connection" not in seen or seen["connection"].lower() in ("keep-alive",)
    # The backend's own hop-by-hop response fields do not reach the client either.
    assert response.header("keep-alive") is None and response.header("x-backend-hop") is None
    assert response.header("x-backend-end") == "1"
    sock.close()


def test_chunked_trailers_forwarded_both_ways(lab: Lab, engine: Engine) -> None:
    sock = pod_socket(lab, WEB)
    reader = sock.makefile("rb")
    sock.sendall(
        b"POST /sink HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-digest: abc\r\n\r\n"
    )
    response = read_response(reader)
    assert response.body.decode().split() == [
        hashlib.sha256(b"hello world").hexdigest(),
        "11",
        "x-digest:abc",
    ]
    sock.sendall(b"GET /blob/3000000 HTTP/1.1\r\nHost: web\r\n\r\n")
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 200")
    raw = b""
    while not raw.endswith(b"\r\n0\r\n") and b"\r\n0\r\n" not in raw[-64:]:
        chunk = reader.readline()
        assert chunk
        raw += chunk
    trailer = reader.readline()
    assert trailer.lower().startswith(b"x-checksum: " + hashlib.sha256(blob(3000000)).hexdigest().encode())
    assert reader.readline() == b"\r\n"
    assert get(sock, "/after-trailers", reader).status == 200  # still in sync
    sock.close()


def blob(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


def test_expect_100_continue(lab: Lab, engine: Engine) -> None:
    body = os.urandom(200_000)
    proc = subprocess.run(
        netns.exec_argv(
            lab.client_pods[0].ns,
            ["curl", "-sS", "-v", "--max-time", "10", "--expect100-timeout", "5",
             "-H", "Expect: 100-continue", "--data-binary", "@-", f"http://{GATEWAY}:{WEB}/sink"],
        ),
        input=body,
        capture_output=True,
        timeout=20,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert b"HTTP/1.1 100 Continue" in proc.stderr
    assert proc.stdout.split()[:2] == [hashlib.sha256(body).hexdigest().encode(), b"200000"]


def test_local_replies_carry_flags(lab: Lab, engine: Engine) -> None:
    cases = [(NR, 404, "NR"), (UH, 503, "UH"), (UF, 502, "UF")]
    for port, status, flag in cases:
        proc = curl(lab, "-i", f"http://{GATEWAY}:{port}/x")
        text = proc.stdout.decode()
        assert text.startswith(f"HTTP/1.1 {status} "), text
        assert f"x-nodeproxy-flags: {flag}" in text, text
    # The NR service routes `x-env: staging` requests.
    proc = curl(lab, "-H", "x-env: staging", f"http://{GATEWAY}:{NR}/ok")
    assert b"path=/ok" in proc.stdout


def test_header_timeout_408_and_bad_request_400_leave_others_alone(lab: Lab, engine: Engine) -> None:
    healthy = pod_socket(lab, WEB, client=1)
    healthy_reader = healthy.makefile("rb")
    assert get(healthy, "/before", healthy_reader).status == 200

    slow = pod_socket(lab, WEB)
    slow.sendall(b"GET /slow HTTP/1.1\r\nHost: web\r\n")  # never finishes its head
    bad = pod_socket(lab, WEB)
    bad.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    bad_response = read_response(bad.makefile("rb"))
    assert bad_response.status == 400 and bad_response.header("x-nodeproxy-flags") == "DPE"
    assert bad.recv(1) == b""  # closed after the protocol error
    smuggle = pod_socket(lab, WEB)
    smuggle.sendall(
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert read_response(smuggle.makefile("rb")).status == 400

    assert get(healthy, "/during", healthy_reader).status == 200
    started = time.monotonic()
    timed_out = read_response(slow.makefile("rb"))
    assert timed_out.status == 408 and timed_out.header("x-nodeproxy-flags") == "DPE"
    assert 0.5 < time.monotonic() - started < 2.5
    assert get(healthy, "/after", healthy_reader).status == 200
    for sock in (healthy, slow, bad, smuggle):
        sock.close()


def test_websocket_upgrade_echo(lab: Lab, engine: Engine) -> None:
    from websockets.sync.client import connect

    sock = pod_socket(lab, WS)
    with connect(f"ws://{GATEWAY}:{WS}/echo", sock=sock, max_size=None) as ws:
        for message in ("hello", "x" * 100_000):
            ws.send(message)
            assert ws.recv(timeout=10) == message
        big = os.urandom(3 << 20)
        ws.send(big)
        assert ws.recv(timeout=20) == big


def test_captured_connection_goes_upstream_from_the_client_pods_address(lab: Lab, engine: Engine) -> None:
    """As the daemon runs it: TPROXY capture, the pod dials the service VIP, the engine connects upstream
    bound to the pod's address (IP_TRANSPARENT), and the backend sees the pod, not the node."""
    captured = Engine(lab, HttpConfig(), offset=SECOND, capture=True)
    try:
        for client in range(2):
            pod_ip = lab.client_pods[client].ip
            proc = curl(lab, f"http://{SERVICES[WEB][0]}/who", "http://10.96.0.30/again", client=client)
            assert proc.returncode == 0, proc.stderr
            seen = re.findall(r"conn=([\d.]+):\d+", proc.stdout.decode())
            assert seen == [pod_ip, pod_ip], proc.stdout
    finally:
        captured.close()


def test_wrk_keep_alive(lab: Lab, engine: Engine) -> None:
    proc = subprocess.run(
        netns.exec_argv(lab.client_pods[0].ns, ["wrk", "-t1", "-c32", "-d2s", f"http://{GATEWAY}:{WEB}/"]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    stalled = engine.proxy.workers[0].debug_connections()
    assert "Non-2xx" not in proc.stdout and "Socket errors" not in proc.stdout, (proc.stdout, stalled)
    requests = int(re.search(r"(\d+) requests in", proc.stdout).group(1))  # type: ignore[union-attr]
    assert requests > 1000, proc.stdout


def test_wrk_new_connection_per_request(lab: Lab, engine: Engine) -> None:
    """Connection: close on every request: adoptions and answers interleave at a high rate (this found
    a lost wake-up when an adoption was queued between the engine's takes of its two queues)."""
    proc = subprocess.run(
        netns.exec_argv(
            lab.client_pods[0].ns,
            ["wrk", "-t1", "-c16", "-d3s", "-H", "Connection: close", f"http://{GATEWAY}:{WEB}/"],
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    stalled = engine.proxy.workers[0].debug_connections()
    assert "Non-2xx" not in proc.stdout and "timeout" not in proc.stdout, (proc.stdout, stalled)
    requests = int(re.search(r"(\d+) requests in", proc.stdout).group(1))  # type: ignore[union-attr]
    assert requests > 500, proc.stdout


def test_one_gib_chunked_both_ways(lab: Lab, engine: Engine) -> None:
    expected = hashlib.sha256()
    for _ in range(GIB // len(PATTERN)):
        expected.update(PATTERN)
    # Upload: curl sends stdin chunked (unknown length); the backend hashes what it received.
    upload = subprocess.Popen(
        netns.exec_argv(
            lab.client_pods[0].ns,
            ["curl", "-sS", "--max-time", "120", "-T", "-", "-H", "Transfer-Encoding: chunked",
             f"http://{GATEWAY}:{WEB}/sink"],
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert upload.stdin is not None
    for _ in range(GIB // len(PATTERN)):
        upload.stdin.write(PATTERN)
    upload.stdin.close()
    assert upload.stdout is not None and upload.stderr is not None
    out, err = upload.stdout.read(), upload.stderr.read()
    assert upload.wait(150) == 0, err
    assert out.split()[:2] == [expected.hexdigest().encode(), str(GIB).encode()], err
    # Download: the backend streams a chunked body; curl writes it to us.
    download = subprocess.Popen(
        netns.exec_argv(
            lab.client_pods[0].ns, ["curl", "-sS", "--max-time", "120", f"http://{GATEWAY}:{WEB}/blob/{GIB}"]
        ),
        stdout=subprocess.PIPE,
    )
    assert download.stdout is not None
    got, count = hashlib.sha256(), 0
    while chunk := download.stdout.read(1 << 20):
        got.update(chunk)
        count += len(chunk)
    assert download.wait(150) == 0
    assert (got.hexdigest(), count) == (expected.hexdigest(), GIB)


def test_no_fd_leak_after_mixed_traffic(lab: Lab, engine: Engine) -> None:
    # The module's engine must hold still while this one is counted: its pooled upstream connections
    # close after the idle timeout (4 s) and earlier tests' clients are gone.
    assert wait_until(lambda: engine.proxy.upstream_connections + engine.proxy.live_connections == 0, 10)
    gc.collect()  # earlier tests' garbage (sockets, workers) must not close descriptors while we count
    before = fd_count()
    _mixed_traffic_then_close(lab)
    gc.collect()  # the workers' epoll and wake-up descriptors go with the objects
    assert fd_count() == before, os.listdir("/proc/self/fd")


def _mixed_traffic_then_close(lab: Lab) -> None:
    running = Engine(lab, HttpConfig(header_timeout=1.0), offset=SECOND)
    try:
        socks = []
        for _ in range(5):
            sock = pod_socket(lab, WEB + SECOND)
            with sock.makefile("rb") as reader:  # a live makefile() keeps the socket open
                assert get(sock, "/x", reader).status == 200
            socks.append(sock)
        aborted = pod_socket(lab, WEB + SECOND)
        aborted.sendall(b"POST /sink HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\nabc")
        bad = pod_socket(lab, WEB + SECOND)
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n")
        curl(lab, f"http://{GATEWAY}:{UF + SECOND}/")
        time.sleep(0.2)
        aborted.close()
        for sock in [*socks, bad]:
            sock.close()
        assert wait_until(lambda: running.call(lambda: running.proxy.live_connections) == 0)
        assert running.call(lambda: len(running.proxy.connections)) == 0
        assert running.call(lambda: len(running.proxy.requests)) == 0
    finally:
        running.close()


# -- the test backend (run in each backend pod) ---------------------------------------------------------


def _serve(http_port: int, ws_port: int, name: str) -> None:  # pragma: no cover - runs in a pod
    server = make_backend(("0.0.0.0", http_port), name)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    from websockets.sync.server import ServerConnection, serve

    def echo(ws: ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with serve(echo, "0.0.0.0", ws_port, max_size=None) as ws_server:
        ws_server.serve_forever()


def make_backend(address: tuple[str, int], name: str) -> socketserver.ThreadingTCPServer:
    """The test backend's HTTP/1.1 server: answers show what it received (see the paths below)."""
    reasons = {200: "OK", 204: "No Content", 304: "Not Modified", 404: "Not Found"}

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = sock.makefile("rb", buffering=1 << 20)
            peer = "{}:{}".format(*self.client_address)
            while self.one(sock, reader, peer):
                pass

        def one(self, sock: socket.socket, reader: object, peer: str) -> bool:
            f = reader
            assert hasattr(f, "readline") and hasattr(f, "read")
            line = f.readline(65537)
            if not line:
                return False
            method, target, _ = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while (h := f.readline(65537)) not in (b"\r\n", b""):
                n, _, v = h.decode("latin-1").partition(":")
                headers.append((n.strip().lower(), v.strip()))
            fields = dict(headers)
            if target == "/early-413":  # answers at once and closes, the request body unread
                sock.sendall(
                    b"HTTP/1.1 413 Too Big\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n"
                )
                return False
            if target.startswith("/stall/"):  # reads the request body only after a while
                time.sleep(int(target.rsplit("/", 1)[1]) / 1000)
            if fields.get("expect", "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            digest, count, trailers = hashlib.sha256(), 0, []
            if "chunked" in fields.get("transfer-encoding", ""):
                while True:
                    size = int(f.readline().split(b";")[0], 16)
                    if size == 0:
                        while (t := f.readline()) not in (b"\r\n", b""):
                            trailers.append(t.decode().strip().replace(" ", ""))
                        break
                    while size:
                        data = f.read(min(size, 1 << 20))
                        digest.update(data)
                        size -= len(data)
                        count += len(data)
                    f.readline()
            elif "content-length" in fields:
                size = int(fields["content-length"])
                while size:
                    data = f.read(min(size, 1 << 20))
                    if not data:
                        return False
                    digest.update(data)
                    size -= len(data)
                    count += len(data)
            close = fields.get("connection", "").lower() == "close"
            code, extra, body = 200, "", b""
            if target == "/until-close":  # no framing: the body ends when the server closes
                sock.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + PATTERN[:100_000])
                return False
            if target == "/bad-response":
                sock.sendall(b"HTTP/1.1 2OO Fine\r\nContent-Length: 0\r\n\r\n")
                return False
            if target == "/silent-close":  # keep-alive by its head, yet closed right after
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return False
            if target.startswith("/slow/"):
                time.sleep(int(target.rsplit("/", 1)[1]) / 1000)
            if target.startswith("/blob/"):
                n = int(target.rsplit("/", 1)[1])
                sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n")
                sent, check = 0, hashlib.sha256()
                while sent < n:
                    piece = PATTERN[: min(len(PATTERN), n - sent)]
                    check.update(piece)
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
                sock.sendall(b"0\r\nx-checksum: %s\r\n\r\n" % check.hexdigest().encode())
                return not close
            if target.startswith("/status/"):
                code = int(target.rsplit("/", 1)[1])
            elif target == "/headers":
                body = json.dumps(headers).encode()
                extra = (
                    "Connection: x-backend-hop\r\nX-Backend-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                    "X-Backend-End: 1\r\n"
                )
            elif target.startswith(("/sink", "/stall/")):
                body = f"{digest.hexdigest()} {count} {';'.join(trailers)}".encode()
            else:
                body = f"backend={name} conn={peer} path={target}".encode()
            head = f"HTTP/1.1 {code} {reasons.get(code, 'X')}\r\n{extra}"
            if code not in (204, 304):
                head += f"Content-Length: {len(body)}\r\n"
            if close:
                head += "Connection: close\r\n"
            sock.sendall(head.encode() + b"\r\n" + (b"" if method == "HEAD" or code in (204, 304) else body))
            return not close

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True
        request_queue_size = 1024

    return Server(address, Handler)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["--serve"]:
        _serve(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
