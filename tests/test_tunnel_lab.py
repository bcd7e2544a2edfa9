"""The tunnel across two namespace nodes (nodeproxy.lab_nodes): pods on node-a reach pods on node-b
through node-a's capture, the mTLS tunnel over the underlay and node-b's inbound side."""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from nodeproxy import netns
from nodeproxy.lab import ECHO_PORT, HTTP_PORT, SINK_PORT
from nodeproxy.lab_nodes import (
    UNDERLAY_INTERFACE,
    NodeLab,
    RunningNode,
    reissue,
    start_backends,
    start_tunnel_nodes,
    workload_id,
    write_pki,
)

pytestmark = pytest.mark.netns

ETH_P_ALL = 0x0003
TLS_APPLICATION_DATA = b"\x17\x03\x03"


class Sniffer:
    """Every frame on an interface of a namespace (a raw AF_PACKET socket), kept while it runs."""

    def __init__(self, ns: str, interface: str) -> None:
        with netns.entered(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> bytes:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        return b"".join(self.frames)

    def tcp_payloads(self, port: int) -> list[bytes]:
        """TCP payloads of IPv4 frames from or to `port`."""
        payloads = []
        for frame in self.frames:
            if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
                continue
            ip_header = (frame[14] & 0x0F) * 4
            tcp = 14 + ip_header
            src, dst = struct.unpack("!HH", frame[tcp : tcp + 4])
            data = tcp + (frame[tcp + 12] >> 4) * 4
            if port in (src, dst) and len(frame) > data:
                payloads.append(frame[data:])
        return payloads


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeLab, RunningNode, RunningNode]]:
    lab = NodeLab(prefix=f"npt{secrets.token_hex(2)}")
    directory = tmp_path_factory.mktemp("two-nodes")
    try:
        lab.up()
        write_pki(directory, lab)
        a, b = lab.nodes
        # a1 is denied by node-b's inbound policy (the hook the authorization policies plug into).
        start_backends(lab, b, output=(directory / "backends.log").open("wb"))
        node_a, node_b = start_tunnel_nodes(
            lab, directory, "tunnel", deny_principals=[workload_id(a.pods[1])]
        )
        try:
            yield lab, node_a, node_b
        finally:
            node_a.stop()
            node_b.stop()
    finally:
        lab.down()


def _connect(ns: str, ip: str, port: int) -> socket.socket:
    with netns.entered(ns):
        return socket.create_connection((ip, port), timeout=10)


def _http_get(ns: str, ip: str) -> str:
    with _connect(ns, ip, HTTP_PORT) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def test_cross_node_request_keeps_source_ip_and_carries_identity(
    two_nodes: tuple[NodeLab, RunningNode, RunningNode],
) -> None:
    lab, node_a, node_b = two_nodes
    a, b = lab.nodes
    answer = _http_get(a.pods[0].ns, b.pods[0].ip)
    assert answer.startswith("HTTP/1.1 200")
    assert f"client={a.pods[0].ip}:" in answer  # the pod saw the original source address
    event = node_b.wait_event(
        lambda e: e.get("event") == "inbound" and e.get("authority") == f"{b.pods[0].ip}:{HTTP_PORT}"
    )
    assert event["peer_identity"] == workload_id(a.pods[0])
    assert event["source_ip"] == a.pods[0].ip and event["allowed"] is True
    done = node_a.wait_event(lambda e: e.get("event") == "stream_done" and e.get("path") == "tunnel")
    assert done["ending"] == "CLOSED" and done["status"] == 200
    opened = node_a.wait_event(lambda e: e.get("event") == "tls_open")
    assert opened["peer_identity"] == "spiffe://cluster.local/nodeproxy/node/node-b"


def test_underlay_carries_tls_records_not_plaintext(
    two_nodes: tuple[NodeLab, RunningNode, RunningNode],
) -> None:
    lab, _, _ = two_nodes
    a, b = lab.nodes
    marker = f"NODEPROXY-PLAINTEXT-MARKER-{secrets.token_hex(8)}".encode()
    sniffer = Sniffer(a.ns, UNDERLAY_INTERFACE)
    try:
        with _connect(a.pods[0].ns, b.pods[0].ip, ECHO_PORT) as sock:
            sock.sendall(marker * 1000)
            echoed = b""
            while len(echoed) < len(marker) * 1000:
                echoed += sock.recv(65536)
        time.sleep(0.2)
    finally:
        captured = sniffer.stop()
    assert echoed == marker * 1000
    assert marker not in captured
    tunnel_payloads = sniffer.tcp_payloads(15008)
    assert any(p.startswith(TLS_APPLICATION_DATA) for p in tunnel_payloads)
    # Control: the same capture does see plaintext where there is some (the node's own connection to the
    # pod is not captured by the proxy, so it crosses the underlay in the clear).
    control = Sniffer(a.ns, UNDERLAY_INTERFACE)
    try:
        with _connect(a.ns, b.pods[0].ip, ECHO_PORT) as sock:
            sock.sendall(marker)
            assert sock.recv(len(marker)) == marker
        time.sleep(0.2)
    finally:
        assert marker in control.stop()


def test_bulk_upload_arrives_intact(two_nodes: tuple[NodeLab, RunningNode, RunningNode]) -> None:
    lab, _, _ = two_nodes
    a, b = lab.nodes
    payload = os.urandom(1 << 20) * 32  # 32 MiB
    with _connect(a.pods[0].ns, b.pods[1].ip, SINK_PORT) as sock:
        view = memoryview(payload)
        for offset in range(0, len(payload), 1 << 20):
            sock.sendall(view[offset : offset + (1 << 20)])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    digest, count = answer.decode().split()
    assert digest == hashlib.sha256(payload).hexdigest() and int(count) == len(payload)


def test_denied_workload_is_reset(two_nodes: tuple[NodeLab, RunningNode, RunningNode]) -> None:
    lab, node_a, node_b = two_nodes
    a, b = lab.nodes
    with _connect(a.pods[1].ns, b.pods[0].ip, ECHO_PORT) as sock:
        sock.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    event = node_b.wait_event(lambda e: e.get("event") == "inbound" and e.get("allowed") is False)
    assert event["peer_identity"] == workload_id(a.pods[1])
    done = node_a.wait_event(lambda e: e.get("event") == "stream_done" and e.get("ending") == "REFUSED")
    assert done["status"] == 403


def test_plaintext_to_the_peer_tunnel_port_is_rejected(
    two_nodes: tuple[NodeLab, RunningNode, RunningNode],
) -> None:
    lab, _, node_b = two_nodes
    a, b = lab.nodes
    with _connect(a.pods[0].ns, b.underlay_ip, 15008) as sock:
        sock.sendall(f"CONNECT {b.pods[0].ip}:{ECHO_PORT} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(100):
                answer += chunk
        except ConnectionResetError:
            pass
    assert b"HTTP" not in answer
    event = node_b.wait_event(lambda e: e.get("event") == "tls_failed")
    # OpenSSL names a plaintext CONNECT for what it is.
    assert "https proxy request" in str(event["reason"])


def test_rotation_on_both_nodes_under_continuous_traffic_drops_nothing(
    two_nodes: tuple[NodeLab, RunningNode, RunningNode],
) -> None:
    """Long echo streams and a stream of new connections run while every certificate of both nodes is
    replaced twice (new files, SIGHUP): nothing fails, every stream ends CLOSED, and the connections
    opened after a rotation use new TLS connections."""
    lab, node_a, node_b = two_nodes
    a, b = lab.nodes
    directory = node_a.log_path.parent
    failures: list[str] = []
    stop = threading.Event()

    def long_stream(index: int) -> None:
        try:
            with _connect(a.pods[0].ns, b.pods[0].ip, ECHO_PORT) as sock:
                chunk = os.urandom(16384)
                while not stop.is_set():
                    sock.sendall(chunk)
                    received = b""
                    while len(received) < len(chunk):
                        got = sock.recv(65536)
                        if not got:
                            failures.append(f"long stream {index}: EOF")
                            return
                        received += got
                    if received != chunk:
                        failures.append(f"long stream {index}: bad echo")
                        return
        except OSError as err:
            failures.append(f"long stream {index}: {err!r}")

    def short_streams() -> None:
        for count in range(3000):  # bounded; paced to span both rotations
            if stop.is_set():
                return
            try:
                answer = _http_get(a.pods[0].ns, b.pods[0].ip)
                if not answer.startswith("HTTP/1.1 200"):
                    failures.append(f"short stream {count}: {answer[:40]!r}")
            except OSError as err:
                failures.append(f"short stream {count}: {err!r}")
            time.sleep(0.01)

    opened_before = len([e for e in node_b.events() if e.get("event") == "tls_open"])
    workers = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
    workers.append(threading.Thread(target=short_streams))
    for worker in workers:
        worker.start()
    try:
        for _ in range(2):
            time.sleep(0.7)
            reissue(directory, lab)
            node_a.reload()
            node_b.reload()
        time.sleep(0.7)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert failures == []
    assert len([e for e in node_a.events() if e.get("event") == "reloaded"]) >= 2
    opened_after = len([e for e in node_b.events() if e.get("event") == "tls_open"])
    assert opened_after - opened_before >= 2  # one after each rotation (a pooled one may carry the first)
    time.sleep(0.5)
    endings = {e.get("ending") for e in node_a.events() if e.get("event") == "stream_done"}
    assert endings <= {"CLOSED", "REFUSED"}  # REFUSED: test_denied_workload_is_reset's stream, if it ran
    assert not [
        e
        for e in node_a.events() + node_b.events()
        if e.get("event") == "tls_failed" and "https proxy request" not in str(e.get("reason"))
    ]
