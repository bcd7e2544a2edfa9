"""The mTLS tunnel engine on loopback: two engines (client and server node), real TLS 1.3 and HTTP/2
CONNECT, certificates from the identity package's CA (bad ones hand-made with cryptography)."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nodeproxy.authz.config import AuthzConfig
from nodeproxy.authz.engine import compile_authz
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.policy import Workload
from nodeproxy.proxy.inbound import InboundRequest, Verdict, authz_policy
from nodeproxy.proxy.tunnel import EngineSettings, StreamDone, StreamEnding
from tests.tunnel_harness import (
    CLIENT_ID,
    SERVER_NODE_ID,
    TRUST_DOMAIN,
    Pki,
    PodServer,
    ScriptedPeer,
    Tunnels,
    captured_pair,
    next_conn_id,
    recv_all,
    tunnels,
    wait_for,
)


@pytest.fixture
def echo() -> Iterator[PodServer]:
    server = PodServer("echo")
    yield server
    server.close()


@pytest.fixture
def sink() -> Iterator[PodServer]:
    server = PodServer("sink")
    yield server
    server.close()


def test_round_trip_carries_identity_and_source(tmp_path: Path, echo: PodServer) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with tunnels(tmp_path) as t:
        app = t.tunnel(echo.port)

        def send() -> None:
            app.sendall(payload)
            app.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed = recv_all(app)
        sender.join()
        app.close()
        assert echoed == payload
        wait_for(lambda: len(t.client_records.done()) == 1 and len(t.server_records.done()) == 1, what="done")
        (inbound,) = t.server_records.inbound()
        assert inbound.peer_identity == CLIENT_ID
        assert inbound.authority == f"127.0.0.1:{echo.port}"
        assert inbound.forwarded == "for=127.0.0.1"
        (client_done,) = t.client_records.done()
        (server_done,) = t.server_records.done()
        assert client_done.ending is StreamEnding.CLOSED and client_done.status == 200
        assert client_done.bytes_up == len(payload) and client_done.bytes_down == len(payload)
        assert server_done.ending is StreamEnding.CLOSED
        assert server_done.bytes_down == len(payload) and server_done.bytes_up == len(payload)
        (opened,) = [r for r in t.client_records.opened() if r.outbound]
        assert opened.peer_identity == SERVER_NODE_ID


def test_half_close_both_ways(tmp_path: Path, sink: PodServer) -> None:
    payload = os.urandom(200_000)
    with tunnels(tmp_path) as t:
        app = t.tunnel(sink.port)
        app.sendall(payload)
        app.shutdown(socket.SHUT_WR)  # END_STREAM; the pod answers only after its EOF
        answer = recv_all(app).decode()
        app.close()
    digest, peer = answer.split()
    assert digest == hashlib.sha256(payload).hexdigest()
    assert peer == "127.0.0.1"


def test_streams_share_one_connection(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path) as t:
        apps = [t.tunnel(echo.port) for _ in range(20)]
        for i, app in enumerate(apps):
            app.sendall(f"hello {i}\n".encode())
        for i, app in enumerate(apps):
            assert app.recv(100) == f"hello {i}\n".encode()
        assert t.client.tls_connections == 1
        assert len({r.tls_id for r in t.server_records.inbound()}) == 1
        for app in apps:
            app.close()
        wait_for(lambda: t.client.live_streams == 0 and t.server.live_streams == 0, what="streams to end")


def test_pool_opens_a_second_connection_past_max_streams(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path, settings=EngineSettings(max_streams=4)) as t:
        apps = [t.tunnel(echo.port) for _ in range(6)]
        for app in apps:
            app.sendall(b"x")
            assert app.recv(1) == b"x"
        assert t.client.tls_connections == 2
        for app in apps:
            app.close()


def test_policy_denial_is_403_and_reset(tmp_path: Path, echo: PodServer) -> None:
    seen: list[InboundRequest] = []

    def deny(request: InboundRequest) -> Verdict:
        seen.append(request)
        return Verdict(False, "denied by test")

    with tunnels(tmp_path, policy=deny) as t:
        app = t.tunnel(echo.port)
        app.sendall(b"must not arrive")
        with pytest.raises(ConnectionResetError):
            while app.recv(100):
                pass
        app.close()
        wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
        (done,) = t.client_records.done()
        assert done.ending is StreamEnding.REFUSED and done.status == 403
    assert echo.accepted == 0
    assert seen == [InboundRequest("127.0.0.1", CLIENT_ID, "127.0.0.1", echo.port)]


def test_not_a_local_pod_is_404(tmp_path: Path) -> None:
    with tunnels(tmp_path) as t:
        app = socket.create_connection(("127.0.0.1", t.port))  # only to get a socket: replaced below
        app.close()
        with socket.socket() as acceptor:
            acceptor.bind(("127.0.0.1", 0))
            acceptor.listen(1)
            app = socket.create_connection(acceptor.getsockname())
            captured, _ = acceptor.accept()
        t.client.adopt(77, captured.detach(), "127.0.0.1", "10.9.9.9:80", CLIENT_ID, "127.0.0.1", t.port)
        with pytest.raises(ConnectionResetError):
            app.recv(10)
        app.close()
        wait_for(lambda: bool(t.client_records.done()), what="done")
        assert t.client_records.done()[0].status == 404


def test_unreachable_pod_is_503(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens there once closed
    with tunnels(tmp_path) as t:
        app = t.tunnel(port)
        with pytest.raises(ConnectionResetError):
            app.recv(10)
        app.close()
        wait_for(lambda: len(t.server_records.done()) == len(t.client_records.done()) == 1, what="done")
        assert t.server_records.done()[0].ending is StreamEnding.CONNECT_FAILED
        assert t.client_records.done()[0].status == 503


def test_pod_reset_resets_the_client(tmp_path: Path) -> None:
    pod = socket.socket()
    pod.bind(("127.0.0.1", 0))
    pod.listen(1)
    with tunnels(tmp_path) as t:
        app = t.tunnel(pod.getsockname()[1])
        app.sendall(b"hi")
        conn, _ = pod.accept()
        assert conn.recv(2) == b"hi"
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST
        with pytest.raises(ConnectionResetError):
            while app.recv(10):
                pass
        app.close()
        wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
        assert t.client_records.done()[0].ending is StreamEnding.PEER_RESET
    pod.close()


def test_client_reset_resets_the_pod(tmp_path: Path) -> None:
    pod = socket.socket()
    pod.bind(("127.0.0.1", 0))
    pod.listen(1)
    with tunnels(tmp_path) as t:
        app = t.tunnel(pod.getsockname()[1])
        app.sendall(b"hi")
        conn, _ = pod.accept()
        assert conn.recv(2) == b"hi"
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        app.close()
        conn.settimeout(5)
        with pytest.raises(ConnectionResetError):
            while conn.recv(10):
                pass
        conn.close()
        wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
        assert t.client_records.done()[0].ending is StreamEnding.PLAIN_RESET
    pod.close()


# -- who may connect ---------------------------------------------------------------------------------


def _rejected(t_records_failed: list[object]) -> str:
    assert t_records_failed, "no TLS_FAILED record"
    return " | ".join(str(getattr(r, "reason", r)) for r in t_records_failed)


def _assert_client_rejected(
    tmp_path: Path, pki: Pki, credential: object, needle: str, echo: PodServer
) -> None:
    with tunnels(tmp_path, client_credential=credential, pki=pki) as t:  # type: ignore[arg-type]
        app = t.tunnel(echo.port)
        app.sendall(b"secret")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while app.recv(100):
                pass
        app.close()
        wait_for(lambda: bool(t.server_records.failed()), what="server TLS_FAILED")
        reasons = _rejected(list(t.server_records.failed()))
        assert needle in reasons
        assert not t.server_records.inbound()
        wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
        assert t.client_records.done()[0].ending is StreamEnding.TUNNEL_FAILED
    assert echo.accepted == 0


def test_client_cert_from_another_trust_domain_rejected(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    other = Pki(tmp_path / "other", trust_domain="other.local")
    credential = other.svid("spiffe://other.local/ns/default/sa/client")
    _assert_client_rejected(tmp_path, pki, credential, "unable to get local issuer certificate", echo)


def test_spiffe_id_of_another_trust_domain_rejected_even_from_our_ca(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    credential = pki.forge(["spiffe://other.local/ns/default/sa/client"])
    _assert_client_rejected(tmp_path, pki, credential, "not in our trust domain", echo)


def test_expired_client_cert_rejected(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    now = datetime.now(UTC)
    credential = pki.forge(
        [CLIENT_ID], not_before=now - timedelta(hours=2), not_after=now - timedelta(hours=1)
    )
    _assert_client_rejected(tmp_path, pki, credential, "certificate has expired", echo)


def test_multiple_uri_sans_rejected(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    credential = pki.forge([CLIENT_ID, f"spiffe://{TRUST_DOMAIN}/ns/kube-system/sa/admin"])
    _assert_client_rejected(tmp_path, pki, credential, "more than one URI SAN", echo)


def test_forged_identity_from_untrusted_ca_rejected(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    forger = Pki(tmp_path / "forger")  # same trust domain name, different keys
    credential = forger.svid(CLIENT_ID)
    _assert_client_rejected(tmp_path, pki, credential, "unable to get local issuer certificate", echo)


def test_leaf_that_is_a_ca_rejected(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    credential = pki.forge([CLIENT_ID], ca=True)
    _assert_client_rejected(tmp_path, pki, credential, "", echo)


def test_no_client_certificate_rejected(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path) as t:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as raw:
            tls = context.wrap_socket(raw)
            # TLS 1.3: the client finishes first; the server's verdict comes as an alert on the next read.
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                while tls.recv(100):
                    pass
        wait_for(lambda: bool(t.server_records.failed()), what="server TLS_FAILED")
        assert "certificate" in _rejected(list(t.server_records.failed()))
        assert not t.server_records.inbound()
    assert echo.accepted == 0


def test_plaintext_to_the_tunnel_port_rejected(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path) as t:
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as raw:
            raw.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                + f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            answer = b""
            try:
                while chunk := raw.recv(100):
                    answer += chunk
            except ConnectionResetError:
                pass
            # Closed with at most a TLS alert record (content type 21), never an HTTP answer.
            assert answer == b"" or answer[0] == 21, answer
        wait_for(lambda: bool(t.server_records.failed()), what="server TLS_FAILED")
        assert "wrong version number" in _rejected(list(t.server_records.failed()))
        assert not t.server_records.inbound()
    assert echo.accepted == 0


def test_server_of_another_trust_domain_rejected_by_the_client(tmp_path: Path, echo: PodServer) -> None:
    pki = Pki(tmp_path / "ca")
    server_credential = pki.forge(["spiffe://other.local/nodeproxy/node/node-b"])
    with tunnels(tmp_path, server_credential=server_credential, pki=pki) as t:
        app = t.tunnel(echo.port)
        with pytest.raises(ConnectionResetError):
            app.recv(10)
        app.close()
        wait_for(lambda: bool(t.client_records.failed()), what="client TLS_FAILED")
        assert "not in our trust domain" in _rejected(list(t.client_records.failed()))
    assert echo.accepted == 0


def test_unexpected_peer_identity_rejected(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path) as t:
        app = t.tunnel(echo.port, peer_identity=f"spiffe://{TRUST_DOMAIN}/nodeproxy/node/node-c")
        with pytest.raises(ConnectionResetError):
            app.recv(10)
        app.close()
        wait_for(lambda: bool(t.client_records.failed()), what="client TLS_FAILED")
        assert "not the expected one" in _rejected(list(t.client_records.failed()))
        good = t.tunnel(echo.port, peer_identity=SERVER_NODE_ID)
        good.sendall(b"ok")
        assert good.recv(2) == b"ok"
        good.close()
    assert echo.accepted == 1


# -- rotation ----------------------------------------------------------------------------------------


def test_rotation_under_continuous_traffic_drops_nothing(tmp_path: Path, echo: PodServer) -> None:
    """Long streams keep flowing while the client's certificate is replaced three times and new
    connections keep opening; every stream ends CLOSED with every byte echoed, and streams opened after
    a rotation ride a new TLS connection made with the new certificate."""
    pki = Pki(tmp_path / "ca")
    failures: list[str] = []
    stop = threading.Event()

    def long_stream(t: object, index: int) -> None:
        app = t.tunnel(echo.port)  # type: ignore[attr-defined]
        app.settimeout(20)
        sent = received = 0
        chunk = os.urandom(32768)
        try:
            while not stop.is_set():
                app.sendall(chunk)
                sent += len(chunk)
                while received < sent:
                    got = app.recv(65536)
                    if not got:
                        failures.append(f"stream {index}: EOF after {received}")
                        return
                    received += len(got)
            app.shutdown(socket.SHUT_WR)
            if app.recv(1) != b"":
                failures.append(f"stream {index}: bytes after the echo")
        except OSError as err:
            failures.append(f"stream {index}: {err!r}")
        finally:
            app.close()

    def short_streams(t: object) -> None:
        count = 0
        while not stop.is_set() and count < 2000:  # bounded; paced to span every rotation
            count += 1
            time.sleep(0.005)
            try:
                app = t.tunnel(echo.port)  # type: ignore[attr-defined]
                app.settimeout(20)
                app.sendall(b"ping")
                if app.recv(4) != b"ping":
                    failures.append(f"short stream {count}: bad echo")
                app.close()
            except OSError as err:
                failures.append(f"short stream {count}: {err!r}")

    with tunnels(tmp_path, pki=pki) as t:
        workers = [threading.Thread(target=long_stream, args=(t, i)) for i in range(4)]
        workers.append(threading.Thread(target=short_streams, args=(t,)))
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        tls_ids_before = {r.tls_id for r in t.server_records.inbound()}
        for _ in range(3):
            t.client.set_identity(CLIENT_ID, pki.svid(CLIENT_ID))
            time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(30)
        wait_for(lambda: t.client.live_streams == 0, what="streams to end")
        tls_ids_after = {r.tls_id for r in t.server_records.inbound()} - tls_ids_before
        endings = [d.ending for d in t.client_records.done()]
    assert failures == []
    assert endings and set(endings) == {StreamEnding.CLOSED}
    assert len(tls_ids_after) >= 3  # a new connection after each rotation


# -- flow control, timeouts, pool ------------------------------------------------------------------


def test_a_stalled_pod_holds_one_window_and_stalls_nobody_else(tmp_path: Path, echo: PodServer) -> None:
    """A pod that stops reading: its stream fills its window (and the socket buffers) and stops there;
    the other stream on the same TLS connection keeps flowing at full speed."""
    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(1)
    settings = EngineSettings(stream_window=256 * 1024, connection_window=1024 * 1024)
    with tunnels(tmp_path, settings=settings) as t:
        blocked = t.tunnel(stalled.getsockname()[1])
        blocked.setblocking(False)
        pod_side, _ = stalled.accept()  # never read from
        sent = 0
        deadline = time.monotonic() + 5
        chunk = b"z" * 65536
        while time.monotonic() < deadline:
            try:
                sent += blocked.send(chunk)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sent += blocked.send(chunk)
                except BlockingIOError:
                    break
        # Bounded: the window plus what the kernel buffers on both sides, never everything offered.
        assert sent < 64 * 1024 * 1024
        moving = t.tunnel(echo.port)
        payload = os.urandom(8 * 1024 * 1024)
        sender = threading.Thread(target=moving.sendall, args=(payload,))
        sender.start()
        got = b""
        moving.settimeout(10)
        while len(got) < len(payload):
            got += moving.recv(1 << 20)
        sender.join()
        assert got == payload
        assert t.client.tls_connections == 1  # both streams share the connection
        # The stalled stream resumes once its pod reads: nothing was lost.
        pod_side.setblocking(True)
        pod_side.settimeout(10)
        received = 0
        blocked.setblocking(True)
        blocked.shutdown(socket.SHUT_WR)
        while chunk := pod_side.recv(1 << 20):
            received += len(chunk)
        assert received == sent
        moving.close()
        blocked.close()
        pod_side.close()
    stalled.close()


def test_undecided_stream_is_answered_503(tmp_path: Path, echo: PodServer) -> None:
    settings = EngineSettings(handshake_timeout=0.5)
    with tunnels(tmp_path, settings=settings) as t:
        t.decider.local_pods = set()  # nothing is answered for a while: simulate a stuck decision
        t.decider.handle = lambda name: None  # type: ignore[method-assign]
        app = t.tunnel(echo.port)
        app.settimeout(5)
        with pytest.raises(ConnectionResetError):
            app.recv(10)
        app.close()
    assert echo.accepted == 0


def test_idle_pooled_connection_is_closed(tmp_path: Path, echo: PodServer) -> None:
    with tunnels(tmp_path, settings=EngineSettings(pool_idle_timeout=0.5)) as t:
        app = t.tunnel(echo.port)
        app.sendall(b"x")
        assert app.recv(1) == b"x"
        app.close()
        wait_for(lambda: t.client.live_streams == 0, what="stream to end")
        assert t.client.tls_connections == 1  # kept for reuse ...
        wait_for(lambda: t.client.tls_connections == 0, timeout=5, what="idle close")  # ... until idle
        wait_for(lambda: t.server.tls_connections == 0, timeout=5, what="server side close")


def test_trust_bundle_change_applies_to_new_connections(tmp_path: Path, echo: PodServer) -> None:
    """A client of a second CA is refused, then accepted once the server's bundle holds that CA too
    (no restart); the client trusts the server's CA from the start."""
    pki = Pki(tmp_path / "ca")
    other = Pki(tmp_path / "other")
    with tunnels(tmp_path, pki=pki, client_credential=other.svid(CLIENT_ID)) as t:
        t.client.set_trust_bundle(pki.bundle + other.bundle)
        refused = t.tunnel(echo.port)
        with pytest.raises(ConnectionResetError):
            while refused.recv(10):
                pass
        refused.close()
        wait_for(lambda: bool(t.server_records.failed()), what="server TLS_FAILED")
        t.server.set_trust_bundle(pki.bundle + other.bundle)
        accepted = t.tunnel(echo.port)
        accepted.sendall(b"in")
        assert accepted.recv(2) == b"in"
        accepted.close()
    assert echo.accepted == 1


def test_peer_engine_stopping_resets_its_streams_and_the_pool_recovers(
    tmp_path: Path, echo: PodServer
) -> None:
    """The receiving node stops (a restart): its streams are reset on both ends (a truncated transfer
    never looks complete), and the client opens a new connection for the next stream."""
    pki = Pki(tmp_path / "ca")
    with tunnels(tmp_path, pki=pki) as t:
        app = t.tunnel(echo.port)
        app.sendall(b"one")
        assert app.recv(3) == b"one"
        t.server.stop()
        with pytest.raises(ConnectionResetError):
            while app.recv(10):
                pass
        app.close()
        wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
        assert t.client_records.done()[0].ending in (StreamEnding.PEER_RESET, StreamEnding.TUNNEL_FAILED)
        wait_for(lambda: t.client.tls_connections == 0, timeout=5, what="the dead connection to go")
        # A new server engine on a new port: the client pools a fresh connection to it.
        with tunnels(tmp_path / "again", pki=pki) as second:
            again = second.tunnel(echo.port)
            again.sendall(b"two")
            assert again.recv(3) == b"two"
            again.close()


def test_bytes_sent_before_the_decision_arrive_after_it(tmp_path: Path, echo: PodServer) -> None:
    """The client's first bytes follow the CONNECT at once; the receiving node holds them while Python
    decides and delivers them, in order, once the pod is connected."""

    def slow(request: InboundRequest) -> Verdict:
        time.sleep(0.3)
        return Verdict(True, "after a while")

    payload = os.urandom(300_000)
    with tunnels(tmp_path, policy=slow) as t:
        app = t.tunnel(echo.port)
        app.sendall(payload)  # all of it before the answer: it fits the 4 MiB stream window
        app.shutdown(socket.SHUT_WR)
        assert recv_all(app) == payload
        app.close()
        wait_for(lambda: len(t.server_records.done()) == 1, what="server done")
        assert t.server_records.done()[0].ending is StreamEnding.CLOSED


def test_only_connect_streams_are_tunnels(tmp_path: Path, echo: PodServer) -> None:
    """A verified peer that sends GET (405) or a CONNECT whose authority is not ip:port (400) gets an
    answer and nothing reaches a pod; a proper CONNECT on the same connection works."""
    import h2.config
    import h2.connection
    import h2.events

    pki = Pki(tmp_path / "ca")
    credential = pki.svid(CLIENT_ID)
    (tmp_path / "client.pem").write_bytes(credential.cert_chain_pem)
    (tmp_path / "client.key").write_bytes(credential.key_pem)
    with tunnels(tmp_path, pki=pki) as t:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=pki.bundle.decode())
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as raw:
            tls = context.wrap_socket(raw)
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            conn.send_headers(
                1, [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "x")]
            )
            conn.send_headers(3, [(":method", "CONNECT"), (":authority", "not-an-address:80")])
            conn.send_headers(5, [(":method", "CONNECT"), (":authority", f"127.0.0.1:{echo.port}")])
            conn.send_data(5, b"ping")
            tls.sendall(conn.data_to_send())
            statuses: dict[int, str] = {}
            echoed = b""
            deadline = time.monotonic() + 5
            while (len(statuses) < 3 or echoed != b"ping") and time.monotonic() < deadline:
                for event in conn.receive_data(tls.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = dict(event.headers)[b":status"].decode()
                    elif isinstance(event, h2.events.DataReceived):
                        echoed += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                tls.sendall(conn.data_to_send())
        assert statuses == {1: "405", 3: "400", 5: "200"}
        assert echoed == b"ping"
    assert echo.accepted == 1


# ---- HTTP streams the sending node checked per request (`x-nodeproxy-authorized: l7`) -------------

PEER_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/peer"


def _adopt(
    t: Tunnels, pod_port: int, identity: str = CLIENT_ID, l7_checked: bool | None = None
) -> socket.socket:
    """Like Tunnels.tunnel, with the l7_checked claim (None: the parameter left at its default)."""
    app, captured = captured_pair()
    args = (next_conn_id(), captured.detach(), "127.0.0.1", f"127.0.0.1:{pod_port}", identity, "127.0.0.1")
    if l7_checked is None:
        t.client.adopt(*args, peer_port=t.port)
    else:
        t.client.adopt(*args, peer_port=t.port, l7_checked=l7_checked)
    return app


def _echo_once(app: socket.socket, payload: bytes) -> bytes:
    """What the pod echoed, or b"<reset>" when the stream was refused (the reset may come before the
    payload is even sent, when the refusal is quick)."""
    with app:
        try:
            app.sendall(payload)
            app.shutdown(socket.SHUT_WR)
            return recv_all(app)
        except OSError as err:  # reset before or after the send, or before the shutdown
            if err.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                raise
            return b"<reset>"


def test_l7_checked_claim_reaches_the_inbound_record(tmp_path: Path, echo: PodServer) -> None:
    seen: list[InboundRequest] = []

    def allow(request: InboundRequest) -> Verdict:
        seen.append(request)
        return Verdict(True, "test")

    with tunnels(tmp_path, policy=allow) as t:
        for claim in (True, False, None):
            assert _echo_once(_adopt(t, echo.port, l7_checked=claim), b"ping") == b"ping"
        wait_for(lambda: len(t.server_records.done()) == 3, what="server done")
        claims = [r.l7_checked for r in t.server_records.inbound()]
    assert claims == [True, False, False]
    assert [r.l7_checked for r in seen] == [True, False, False]  # decide_inbound passes it on


def test_l7_checked_streams_pass_an_allow_policy_with_paths_and_plain_ones_do_not(
    tmp_path: Path, echo: PodServer
) -> None:
    """The destination's ALLOW policy restricts principal AND paths. A stream whose requests the sending
    node checked (l7_checked) is judged by the principal only; a plain L4 stream from the same principal
    is refused (nobody checked its paths), and so is a checked stream from another principal."""
    config = AuthzConfig.model_validate(
        {
            "authorization_policies": [
                {
                    "name": "client-api",
                    "namespace": "default",
                    "rules": [
                        {
                            "from": [{"principals": [CLIENT_ID.removeprefix("spiffe://")]}],
                            "to": [{"paths": ["/api/*"]}],
                        }
                    ],
                }
            ]
        }
    )
    engine = compile_authz(config, JwksRefresher(), {"127.0.0.1": Workload.of("default", "server")})
    with tunnels(tmp_path, policy=authz_policy(engine)) as t:
        t.client.set_identity(PEER_ID, t.pki.svid(PEER_ID))
        assert _echo_once(_adopt(t, echo.port, l7_checked=True), b"GET /api/x") == b"GET /api/x"
        assert _echo_once(_adopt(t, echo.port), b"GET /api/x") in (b"", b"<reset>")
        assert _echo_once(_adopt(t, echo.port, PEER_ID, l7_checked=True), b"GET /api/x") in (b"", b"<reset>")
        wait_for(lambda: len(t.client_records.done()) == 3, what="client done")
        statuses = sorted((d.ending, d.status) for d in t.client_records.done())
    assert statuses == [
        (StreamEnding.CLOSED, 200),
        (StreamEnding.REFUSED, 403),
        (StreamEnding.REFUSED, 403),
    ]
    assert echo.accepted == 1


def test_authorized_field_is_taken_only_once_and_only_as_l7(tmp_path: Path, echo: PodServer) -> None:
    """A verified peer's CONNECT: `x-nodeproxy-authorized: l7` is the claim; any other value is no claim
    (the stream is judged as plain L4); the field twice is a malformed request (400), like `forwarded`."""
    import h2.config
    import h2.connection
    import h2.events

    pki = Pki(tmp_path / "ca")
    credential = pki.svid(CLIENT_ID)
    (tmp_path / "client.pem").write_bytes(credential.cert_chain_pem)
    (tmp_path / "client.key").write_bytes(credential.key_pem)
    field = "x-nodeproxy-authorized"
    cases = {
        1: [(field, "l7")],
        3: [(field, "L7")],
        5: [(field, "l7 ")],
        7: [(field, "l7,l7")],
        9: [(field, "yes")],
        11: [(field, "l7"), (field, "l7")],
        13: [(field, "")],
        15: [],
        17: [(field, "yes"), (field, "l7")],
    }
    with tunnels(tmp_path, pki=pki) as t:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=pki.bundle.decode())
        context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        context.set_alpn_protocols(["h2"])
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as raw:
            tls = context.wrap_socket(raw)
            # h2 would strip or refuse a value with trailing whitespace: send the fields as written.
            config = h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
            conn = h2.connection.H2Connection(config)
            conn.initiate_connection()
            for stream_id, fields in cases.items():
                conn.send_headers(
                    stream_id,
                    [
                        (":method", "CONNECT"),
                        (":authority", f"127.0.0.1:{echo.port}"),
                        ("forwarded", f"for=127.0.0.1;by=case{stream_id}"),
                        *fields,
                    ],
                    end_stream=True,
                )
            tls.sendall(conn.data_to_send())
            statuses: dict[int, str] = {}
            deadline = time.monotonic() + 5
            while len(statuses) < len(cases) and time.monotonic() < deadline:
                for event in conn.receive_data(tls.recv(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        statuses[event.stream_id] = dict(event.headers)[b":status"].decode()
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id not in statuses:
                        statuses[event.stream_id] = f"reset {event.error_code!r}"
                tls.sendall(conn.data_to_send())
        wait_for(lambda: len(t.server_records.inbound()) == len(cases) - 3, what="inbound records")
        claims = {r.forwarded.rpartition("case")[2]: r.l7_checked for r in t.server_records.inbound()}
    # 5: a value with surrounding whitespace is malformed HTTP/2 (RFC 9113 §8.2.1): nghttp2 resets it.
    assert statuses == {
        **{i: "200" for i in cases if i not in (5, 11, 17)},
        5: "reset <ErrorCodes.PROTOCOL_ERROR: 1>",
        11: "400",
        17: "400",
    }
    assert claims == {"1": True, "3": False, "7": False, "9": False, "13": False, "15": False}


# ---- draining (GOAWAY) and streams a peer refused ------------------------------------------------


def _echoes(app: socket.socket, payload: bytes) -> bool:
    """Send payload on a tunnelled socket and read the pod's echo of it (the stream stays open)."""
    app.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = app.recv(65536)
        if not chunk:
            break
        received += chunk
    return received == payload


def test_draining_server_moves_peers_to_a_new_connection_and_lets_streams_finish(
    tmp_path: Path, echo: PodServer
) -> None:
    """begin_draining on the receiving engine: its connection sends GOAWAY; the stream on it flows on to
    its end; the client's next stream opens a new TLS connection and succeeds (that one, accepted while
    draining, is told to go away too); each connection closes once its stream ended. Nothing fails."""
    payload = os.urandom(2 * 1024 * 1024 + 5)
    with tunnels(tmp_path) as t:
        old = t.tunnel(echo.port)
        assert _echoes(old, b"before")
        assert t.client.tls_connections == 1 and t.server.tls_connections == 1
        t.server.begin_draining()
        assert t.server.draining
        wait_for(lambda: t.server.closing_connections == 1, timeout=5, what="the server's final GOAWAY")
        wait_for(lambda: t.client.closing_connections == 1, timeout=5, what="the client to take the GOAWAY")
        new = t.tunnel(echo.port)
        assert _echoes(new, b"after")
        assert t.client.tls_connections == 2 and t.server.tls_connections == 2
        assert len([r for r in t.client_records.opened() if r.outbound]) == 2
        assert len({r.tls_id for r in t.server_records.inbound()}) == 2
        # The stream on the drained connection keeps flowing, both ways, to its end.

        def send() -> None:
            old.sendall(payload)
            old.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        assert recv_all(old) == payload
        sender.join()
        old.close()
        wait_for(lambda: t.server.tls_connections == 1, timeout=5, what="the drained connection to close")
        wait_for(lambda: t.client.tls_connections == 1, timeout=5, what="the client's side of it to close")
        assert t.client.closing_connections == 1  # the new one: its peer is draining as well
        new.close()
        wait_for(
            lambda: t.server.tls_connections == 0 and t.client.tls_connections == 0,
            timeout=5,
            what="the second connection to close after its stream",
        )
        wait_for(lambda: len(t.server_records.done()) == 2, what="server done")
        client_done = t.client_records.done()
        server_done = t.server_records.done()
        assert not t.client_records.failed() and not t.server_records.failed()
    assert [d.ending for d in client_done] == [StreamEnding.CLOSED] * 2
    assert [d.ending for d in server_done] == [StreamEnding.CLOSED] * 2
    assert sorted(d.bytes_up for d in client_done) == [len(b"after"), len(b"before") + len(payload)]


def test_draining_client_retires_its_pooled_connections(tmp_path: Path, echo: PodServer) -> None:
    """begin_draining on the sending engine: its idle pooled connection closes at once, the busy one
    takes no new stream and closes when its stream ends; a new adoption opens a new connection."""
    with tunnels(tmp_path) as t:
        t.client.set_identity(PEER_ID, t.pki.svid(PEER_ID))
        busy = t.tunnel(echo.port)
        assert _echoes(busy, b"busy")
        idle = t.tunnel(echo.port, identity=PEER_ID)  # a second pool: another identity
        assert _echoes(idle, b"idle")
        idle.close()
        wait_for(lambda: t.client.live_streams == 1, what="the idle connection's stream to end")
        assert t.client.tls_connections == 2  # pooled for reuse (the pool idle timeout is 30 s)
        t.client.begin_draining()
        wait_for(lambda: t.client.tls_connections == 1, timeout=5, what="the idle connection to close")
        wait_for(lambda: t.server.tls_connections == 1, timeout=5, what="the server's side of it to close")
        assert t.client.closing_connections == 1  # the busy one
        fresh = t.tunnel(echo.port)
        assert _echoes(fresh, b"fresh")
        assert t.client.tls_connections == 2
        assert len([r for r in t.client_records.opened() if r.outbound]) == 3
        assert _echoes(busy, b"still flowing")
        busy.close()
        fresh.close()
        wait_for(
            lambda: t.client.tls_connections == 0 and t.server.tls_connections == 0,
            timeout=5,
            what="both connections to close after their streams",
        )
        wait_for(lambda: len(t.server_records.done()) == 3, what="server done")
        endings = [d.ending for d in t.client_records.done()]
        assert not t.client_records.failed() and not t.server_records.failed()
    assert endings == [StreamEnding.CLOSED] * 3


def adopt_to_peer(t: Tunnels, captured: socket.socket, peer: ScriptedPeer) -> int:
    """Tunnel `captured` to the scripted peer as CLIENT_ID; its conn id."""
    conn_id = next_conn_id()
    t.client.adopt(
        conn_id, captured.detach(), "127.0.0.1", "127.0.0.1:9", CLIENT_ID, "127.0.0.1", peer_port=peer.port
    )
    return conn_id


def reset_as_tunnel_failed(t: Tunnels, app: socket.socket) -> StreamDone:
    """The application's socket is reset and the stream ends TUNNEL_FAILED with ECONNREFUSED."""
    with app, pytest.raises(ConnectionResetError):
        while app.recv(100):
            pass
    wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
    (done,) = t.client_records.done()
    assert done.ending is StreamEnding.TUNNEL_FAILED and done.err == errno.ECONNREFUSED
    return done


@pytest.mark.parametrize(
    ("actions", "connections"),
    [(["goaway", "echo"], 2), (["refuse", "echo"], 1), (["refuse", "refuse", "refuse", "echo"], 1)],
    ids=["goaway-new-connection", "refused-same-connection", "refused-three-times"],
)
def test_stream_refused_before_its_first_byte_is_tried_again(
    tmp_path: Path, actions: list[str], connections: int
) -> None:
    """A peer turns the CONNECT away unprocessed (GOAWAY with a lower last stream, or REFUSED_STREAM)
    before any client byte went: the engine sends it again (on a new connection after a GOAWAY) and the
    stream works; nothing is reset."""
    pki = Pki(tmp_path / "ca")
    peer = ScriptedPeer(pki, tmp_path / "peer", actions)
    try:
        with tunnels(tmp_path, pki=pki) as t:
            app, captured = captured_pair()
            conn_id = adopt_to_peer(t, captured, peer)
            with app:
                wait_for(lambda: len(peer.requests) == len(actions), timeout=5, what="the retries")
                assert _echoes(app, b"after the refusals")
                app.shutdown(socket.SHUT_WR)
                assert recv_all(app) == b""
            wait_for(lambda: len(t.client_records.done()) == 1, what="client done")
            (done,) = t.client_records.done()
            assert done.id == conn_id and done.ending is StreamEnding.CLOSED and done.status == 200
            assert peer.connections == connections
            assert [number for number, _, _ in peer.requests][-1] == connections
    finally:
        peer.close()


def test_stream_refused_after_client_bytes_went_ends_as_tunnel_failed(tmp_path: Path) -> None:
    """The peer's GOAWAY refuses a stream whose first client bytes already went with it: those bytes are
    gone, so it is not sent again; it ends TUNNEL_FAILED with ECONNREFUSED and the client gets an RST."""
    pki = Pki(tmp_path / "ca")
    peer = ScriptedPeer(pki, tmp_path / "peer", ["goaway-after-data"])
    try:
        with tunnels(tmp_path, pki=pki) as t:
            app, captured = captured_pair()
            app.sendall(b"request")  # waiting in the socket: it goes right after the CONNECT
            adopt_to_peer(t, captured, peer)
            done = reset_as_tunnel_failed(t, app)
            assert done.bytes_up == len(b"request")
            assert len(peer.requests) == 1
    finally:
        peer.close()


def test_stream_refused_every_time_ends_after_its_retries(tmp_path: Path) -> None:
    """A peer that refuses a stream every time: three more tries (STREAM_RETRIES), then TUNNEL_FAILED
    with ECONNREFUSED and an RST to the client; no loop."""
    pki = Pki(tmp_path / "ca")
    peer = ScriptedPeer(pki, tmp_path / "peer", ["refuse"] * 5)
    try:
        with tunnels(tmp_path, pki=pki) as t:
            app, captured = captured_pair()
            adopt_to_peer(t, captured, peer)
            done = reset_as_tunnel_failed(t, app)
            assert done.bytes_up == 0
            assert len(peer.requests) == 4
    finally:
        peer.close()


def test_stop_listening_accepts_no_more_and_keeps_the_connections(tmp_path: Path, echo: PodServer) -> None:
    """stop_listening: the engine takes no connection from the listening socket any more (a peer's TCP
    connection waits in the backlog of the socket, which the caller may now close); the connection it
    had keeps carrying old and new streams."""
    with tunnels(tmp_path) as t:
        app = t.tunnel(echo.port)
        assert _echoes(app, b"before")
        t.server.stop_listening()
        t.server.stop_listening()  # idempotent
        with socket.create_connection(("127.0.0.1", t.port), timeout=5):
            time.sleep(0.5)  # accepted at once when the engine listens (edge-triggered)
            assert t.server.tls_connections == 1
        port = t.port
        t.listener.close()
        assert _echoes(app, b"after")
        fresh, captured = captured_pair()
        t.client.adopt(
            next_conn_id(),
            captured.detach(),
            "127.0.0.1",
            f"127.0.0.1:{echo.port}",
            CLIENT_ID,
            "127.0.0.1",
            peer_port=port,
        )
        assert _echoes(fresh, b"a new stream on the pooled connection")
        assert t.client.tls_connections == 1
