"""The L7 path through the whole daemon: TPROXY capture -> listener -> HTTP engine -> routing, on a lab.

Per-request routing by a header over 1,000 requests, a 90/10 canary over 2,000 (within 3 points), and an
`auto` port: HTTP on it is routed per request, a server-first protocol on it works after at most the peek
timeout, and a client-first non-HTTP protocol is relayed as TCP."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from nodeproxy import netns
from nodeproxy.lab import REVIEWS_VIP, Lab, stop_process
from tests.conftest import RunningProxy, running_lab, start_proxy
from tests.helpers import connect, listen

pytestmark = pytest.mark.netns

AUTO_VIP = "10.96.0.30"
BANNER_PORT = 2525  # a server-first protocol (SMTP-like): the server speaks before the client
PEEK_TIMEOUT = 0.1


@pytest.fixture(scope="module")
def l7_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


def auto_service(lab: Lab) -> str:
    """`mixed`: one VIP with an auto port for HTTP (8080) and one for the banner server."""
    be = lab.backend_pods[0]
    return (
        f"  - name: mixed\n    vip: {AUTO_VIP}\n"
        "    ports:\n"
        "      - {port: 80, target_port: 8080, protocol: auto}\n"
        f"      - {{port: {BANNER_PORT}, protocol: auto}}\n"
        "      - {port: 9000, protocol: auto}\n"
        f"    endpoints: [{{address: {be.ip}}}]\n"
    )


@pytest.fixture(scope="module")
def l7_proxy(l7_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    config = l7_lab.config_yaml(l7=True, extra=f"http:\n  peek_timeout: {int(PEEK_TIMEOUT * 1000)}ms\n")
    proxy = start_proxy(l7_lab, tmp_path_factory.mktemp("l7"), config + auto_service(l7_lab))
    try:
        yield proxy
    finally:
        stop_process(proxy.proc)


def answered_by(lab: Lab, count: int, headers: dict[str, str], vip: str = REVIEWS_VIP) -> Counter[str]:
    """`count` requests over one keep-alive connection; which backend answered each."""
    with netns.entered(lab.client_pods[0].ns):
        conn = http.client.HTTPConnection(vip, 80, timeout=5)
        conn.connect()
    answers: Counter[str] = Counter()
    try:
        for _ in range(count):
            conn.request("GET", "/reviews/7", headers=headers)
            response = conn.getresponse()
            body = response.read().decode()
            answers[body.split()[0] if response.status == 200 else f"status {response.status}"] += 1
    finally:
        conn.close()
    return answers


def test_header_routes_every_request_to_staging(l7_lab: Lab, l7_proxy: RunningProxy) -> None:
    staging = f"backend={l7_lab.backend_pods[2].ns.rsplit('-', 1)[1]}"
    assert answered_by(l7_lab, 1000, {"x-env": "staging"}) == Counter({staging: 1000})


def test_canary_split_is_ninety_ten(l7_lab: Lab, l7_proxy: RunningProxy) -> None:
    v1, v2, _ = (f"backend={pod.ns.rsplit('-', 1)[1]}" for pod in l7_lab.backend_pods)
    answers = answered_by(l7_lab, 2000, {})
    assert set(answers) == {v1, v2}
    assert abs(answers[v2] / 2000 - 0.10) <= 0.03, answers


def test_the_backend_sees_the_pod_address_on_the_l7_path(l7_lab: Lab, l7_proxy: RunningProxy) -> None:
    with netns.entered(l7_lab.client_pods[0].ns):
        conn = http.client.HTTPConnection(REVIEWS_VIP, 80, timeout=5)
        conn.connect()
    try:
        conn.request("GET", "/")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    assert f"client={l7_lab.client_pods[0].ip}:" in body


def test_http_on_an_auto_port_is_routed_per_request(l7_lab: Lab, l7_proxy: RunningProxy) -> None:
    answers = answered_by(l7_lab, 20, {}, vip=AUTO_VIP)
    assert answers == Counter({f"backend={l7_lab.backend_pods[0].ns.rsplit('-', 1)[1]}": 20})
    assert '"service": "mixed"' in l7_proxy.log() and '"event": "request"' in l7_proxy.log()


def test_server_first_protocol_on_an_auto_port_starts_within_the_peek_timeout(
    l7_lab: Lab, l7_proxy: RunningProxy
) -> None:
    server = listen(l7_lab.backend_pods[0].ns, BANNER_PORT)

    def serve() -> None:
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"220 banner ready\r\n")
            peer.sendall(peer.recv(64).upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        started = time.monotonic()
        with connect(l7_lab.client_pods[0].ns, AUTO_VIP, BANNER_PORT) as sock:
            sock.settimeout(5)
            banner = sock.recv(64)
            waited = time.monotonic() - started
            sock.sendall(b"helo\r\n")
            assert sock.recv(64) == b"HELO\r\n"
        assert banner == b"220 banner ready\r\n"
        # The engine waits PEEK_TIMEOUT for the client before relaying as TCP, never Linkerd's 10 s.
        assert PEEK_TIMEOUT * 0.9 <= waited < PEEK_TIMEOUT + 1.0, waited
    finally:
        thread.join(5)
        server.close()


def test_client_first_non_http_on_an_auto_port_is_relayed_as_tcp(l7_lab: Lab, l7_proxy: RunningProxy) -> None:
    with connect(l7_lab.client_pods[0].ns, AUTO_VIP, 9000) as sock:  # the lab's echo server
        sock.settimeout(5)
        payload = b"\x16\x03\x01 not an HTTP request line\r\n"
        sock.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = sock.recv(4096)
            assert chunk, "connection closed early"
            received += chunk
        sock.shutdown(socket.SHUT_WR)
    assert received == payload


def test_http2_prior_knowledge_is_routed_per_request_through_the_daemon(
    l7_lab: Lab, l7_proxy: RunningProxy
) -> None:
    """An h2c client (curl, prior knowledge) on the HTTP port: every stream is decided on its own, by the
    same routes, and answered over HTTP/2 while the backend speaks HTTP/1.1."""
    staging = l7_lab.backend_pods[2].ns.rsplit("-", 1)[1]
    url = f"http://{REVIEWS_VIP}/reviews/7"
    argv = ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-o", "/dev/null"]
    argv += ["-w", "%{http_version} %{http_code}\\n", "-H", "x-env: staging", url]
    out = netns.run(l7_lab.client_pods[0].ns, argv)
    assert out.split() == ["2", "200"]
    body = netns.run(
        l7_lab.client_pods[0].ns,
        ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "10", "-H", "x-env: staging", url],
    )
    assert body.startswith(f"backend={staging} "), body
