"""The daemon itself (`python -m nodeproxy run`) as the node proxy of the mesh, on both nodes of the
two-node lab with a real CA service (nodeproxy.lab_mesh: who is who, and the generated configs).

    node-a: a0 (lab/a0), a1 (lab/a1: denied by node-b's DENY policy), a2 (no identity)
    node-b: b0 (namespace secure: STRICT), b1 (lab/b1), b2 (lab/b2)

SVIDs live 90 s (renewed 40.5-49.5 s after issue), so they rotate during the module.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path

import pytest
from joserfc import jwk, jws

from nodeproxy import netns
from nodeproxy.identity.ca import CertificateAuthority, init_ca, private_key_pem
from nodeproxy.identity.spiffeid import SpiffeId
from nodeproxy.lab import ECHO_PORT, HTTP_PORT, Pod
from nodeproxy.lab_mesh import (
    FLAKY_VIP,
    FLAKY_WEB_VIP,
    GHOST_POD,
    METRICS_PORT,
    SECURE_WEB_VIP,
    TRUST_DOMAIN,
    WEB_PORT,
    WEB_VIP,
    Daemon,
    MeshLab,
    bundle_path,
    running_mesh,
    start_ca_service,
)
from nodeproxy.lab_nodes import UNDERLAY_INTERFACE
from nodeproxy.proxy.tunnel import PemCredential, StreamDone, TunnelEngine
from tests.test_tunnel_lab import TLS_APPLICATION_DATA, Sniffer

pytestmark = pytest.mark.netns


def test_a_node_started_while_the_ca_is_down_serves_and_tunnels_once_it_is_up(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No CA at start: the daemons still come up; a pod's cross-node connection is refused (no SVID,
    never sent in plaintext) while same-node traffic flows; once the CA answers, the renewal backoff
    gets the SVIDs and the same connection goes through the tunnel."""
    directory = tmp_path_factory.mktemp("mesh-no-ca")
    fast_retries = {"retry_initial": "200ms", "retry_max": "1s"}
    prefix = f"npt{secrets.token_hex(2)}"
    with running_mesh(
        directory, prefix, relay_threads=1, start_ca=False, identity_settings=fast_retries
    ) as down:
        a0, a1, b1 = down.a.pods[0], down.a.pods[1], down.b.pods[1]
        node_a = down.daemons["node-a"]
        assert is_reset(a0, b1.ip, ECHO_PORT)
        refused = node_a.wait_record(lambda r: r.get("event") == "connection refused")
        assert "no valid SVID" in str(refused["reason"]), refused
        assert echoes(a0, a1.ip, ECHO_PORT)  # same node: the relay needs no certificate
        start_ca_service(down.lab, down.directory)
        node_a.wait_record(
            lambda r: (
                r.get("event") == "svid renewed"
                and r.get("spiffe_id") == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
            ),
            timeout=15,
        )
        down.daemons["node-b"].wait_record(lambda r: r.get("event") == "svid renewed", timeout=15)
        answer = http_get(a0, b1.ip)
        assert answer.startswith("HTTP/1.1 200") and f"client={a0.ip}:" in answer, answer


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    with running_mesh(tmp_path_factory.mktemp("mesh"), f"npt{secrets.token_hex(2)}") as running:
        yield running


def connect(pod_or_ns: Pod | str, ip: str, port: int) -> socket.socket:
    ns = pod_or_ns if isinstance(pod_or_ns, str) else pod_or_ns.ns
    with netns.entered(ns):
        return socket.create_connection((ip, port), timeout=10)


def http_get(pod: Pod, ip: str) -> str:
    with connect(pod, ip, HTTP_PORT) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def echo(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def is_reset(pod_or_ns: Pod | str, ip: str, port: int) -> bool:
    """True when a connection to ip:port is reset (at connect, or at the first read) instead of echoing."""
    try:
        with connect(pod_or_ns, ip, port) as sock:
            sock.sendall(b"hello")
            return sock.recv(100) == b""  # an orderly close without the echo also counts as refused
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return True


def test_cross_node_traffic_goes_through_the_tunnel_keeping_the_source_ip(mesh: MeshLab) -> None:
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    answer = http_get(a0, b1.ip)
    assert answer.startswith("HTTP/1.1 200"), answer
    assert f"client={a0.ip}:" in answer  # the pod on node-b saw a0's own address
    # node-b's daemon decided the stream, with a0's verified identity
    stream = mesh.daemons["node-b"].wait_record(
        lambda r: r.get("event") == "tunnel stream" and r.get("authority") == f"{b1.ip}:{HTTP_PORT}"
    )
    assert stream["peer_identity"] == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    assert stream["allowed"] is True and stream["source_ip"] == a0.ip
    # node-a's access log: the connection ended as a tunnel stream (CONNECT answered 200)
    closed = mesh.daemons["node-a"].wait_record(
        lambda r: (
            r.get("event") == "connection closed"
            and str(r.get("src", "")).startswith(f"{a0.ip}:")
            and r.get("dst") == f"{b1.ip}:{HTTP_PORT}"
        )
    )
    assert closed["ending"] == "tunnel_closed_200", closed
    assert closed["src_identity"] == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    assert closed["dst_identity"] == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/b1"
    # node-b's access log has the stream too, from its side: what the pod received and sent back.
    inbound = mesh.daemons["node-b"].wait_record(
        lambda r: (
            r.get("event") == "connection closed"
            and r.get("src") == f"{a0.ip}:0"
            and r.get("dst") == f"{b1.ip}:{HTTP_PORT}"
        )
    )
    assert inbound["ending"] == "inbound_closed" and inbound["flags"] == "-", inbound
    assert inbound["src_identity"] == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    assert inbound["bytes_up"] == closed["bytes_up"] and inbound["bytes_down"] == closed["bytes_down"]


def test_underlay_shows_tls_not_the_plaintext(mesh: MeshLab) -> None:
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    marker = f"NODEPROXY-MESH-MARKER-{secrets.token_hex(8)}".encode() * 200
    sniffer = Sniffer(mesh.a.ns, UNDERLAY_INTERFACE)
    try:
        with connect(a0, b1.ip, ECHO_PORT) as sock:
            assert echo(sock, marker) == marker
        time.sleep(0.2)
    finally:
        captured = sniffer.stop()
    assert marker[:40] not in captured
    assert any(p.startswith(TLS_APPLICATION_DATA) for p in sniffer.tcp_payloads(15008))
    # Control: the node's own connection is not captured, so it crosses the underlay in the clear and
    # the same sniffer sees it (b1 is PERMISSIVE: node-b's inbound capture lets plaintext in).
    control = Sniffer(mesh.a.ns, UNDERLAY_INTERFACE)
    try:
        with connect(mesh.a.ns, b1.ip, ECHO_PORT) as sock:
            assert echo(sock, marker[:1000]) == marker[:1000]
        time.sleep(0.2)
    finally:
        assert marker[:40] in control.stop()


def test_same_node_traffic_stays_plain(mesh: MeshLab) -> None:
    a0, a1 = mesh.a.pods[0], mesh.a.pods[1]
    sniffer = Sniffer(mesh.a.ns, UNDERLAY_INTERFACE)
    try:
        with connect(a0, a1.ip, ECHO_PORT) as sock:
            assert echo(sock, b"same node") == b"same node"
    finally:
        frames = sniffer.stop()
    assert not sniffer.tcp_payloads(15008), "same-node traffic crossed the underlay"
    assert b"same node" not in frames
    closed = mesh.daemons["node-a"].wait_record(
        lambda r: (
            r.get("event") == "connection closed"
            and str(r.get("src", "")).startswith(f"{a0.ip}:")
            and r.get("dst") == f"{a1.ip}:{ECHO_PORT}"
        )
    )
    assert closed["ending"] == "closed" and "src_identity" not in closed, closed  # the splice relay


def http_requests(
    pod: Pod, ip: str, paths: list[str], marker: str = "-"
) -> list[tuple[int, dict[str, str], str]]:
    """GET each path on one kept-alive connection to ip:WEB_PORT; (status, headers, body) of each."""
    answers = []
    with connect(pod, ip, WEB_PORT) as sock, sock.makefile("rb") as replies:
        for path in paths:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: web\r\nx-marker: {marker}\r\n\r\n".encode())
            status = int(replies.readline().split()[1])
            headers = {}
            while (line := replies.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            answers.append((status, headers, replies.read(int(headers["content-length"])).decode()))
    return answers


def test_http_ports_requests_to_another_node_ride_the_tunnel(mesh: MeshLab) -> None:
    """The HTTP engine's upstream to a pod on node-b goes through the mTLS tunnel (the mesh entry), keeps
    the source address and carries a0's identity; the underlay shows TLS, never the request."""
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    marker = f"NODEPROXY-L7-MARKER-{secrets.token_hex(8)}"
    sniffer = Sniffer(mesh.a.ns, UNDERLAY_INTERFACE)
    try:
        answers = http_requests(a0, WEB_VIP, ["/one", "/two", "/three"], marker)
        time.sleep(0.2)
    finally:
        captured = sniffer.stop()
    for status, _, body in answers:
        assert status == 200 and body == f"backend=b1 client={a0.ip}:{body.split(':')[-1]}", body
        assert f"client={a0.ip}:" in body
    assert marker.encode() not in captured
    assert any(p.startswith(TLS_APPLICATION_DATA) for p in sniffer.tcp_payloads(15008))
    stream = mesh.daemons["node-b"].wait_record(
        lambda r: r.get("event") == "tunnel stream" and r.get("authority") == f"{b1.ip}:{HTTP_PORT}"
    )
    assert stream["peer_identity"] == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    assert stream["allowed"] is True and stream["source_ip"] == a0.ip
    request = mesh.daemons["node-a"].wait_record(
        lambda r: r.get("event") == "request" and r.get("path") == "/three"
    )
    assert request["status"] == 200 and request["upstream"] == f"{b1.ip}:{HTTP_PORT}", request


def test_a_strict_destination_takes_http_through_the_tunnel_and_a_pod_without_identity_is_refused(
    mesh: MeshLab,
) -> None:
    a0, a2 = mesh.a.pods[0], mesh.a.pods[2]
    [(status, _, body)] = http_requests(a0, SECURE_WEB_VIP, ["/secure"])
    assert status == 200 and body.startswith("backend=b0 "), body
    # a2 has no identity: the tunnel cannot carry it, and b0 refuses plaintext (STRICT): 503 UAEX here.
    [(status, headers, _)] = http_requests(a2, SECURE_WEB_VIP, ["/secure"])
    assert status == 503 and headers["x-nodeproxy-flags"] == "UAEX", headers


def test_an_http_request_to_an_endpoint_whose_tunnel_does_not_open_is_retried_on_another(
    mesh: MeshLab,
) -> None:
    """GHOST_POD is a workload of node-b with no pod: node-b answers the CONNECT 503. The HTTP engine
    counts that as a connect failure (the tunnel never opened, the request never left), which Istio's
    default retry policy retries on another endpoint: every request is answered by b1."""
    a0 = mesh.a.pods[0]
    answers = http_requests(a0, FLAKY_WEB_VIP, [f"/try{i}" for i in range(6)])
    assert [status for status, _, _ in answers] == [200] * 6, answers
    assert all(body.startswith("backend=b1 ") for _, _, body in answers)
    retried = mesh.daemons["node-a"].wait_record(
        lambda r: r.get("event") == "request" and r.get("service") == "flaky-web" and r.get("attempts") == 2
    )
    assert retried["status"] == 200 and retried["upstream"] == f"{mesh.b.pods[1].ip}:{HTTP_PORT}", retried


def test_l7_policies_apply_per_request_through_the_tunnel_and_l4_streams_stay_denied(mesh: MeshLab) -> None:
    """An ALLOW policy with paths on b1, pushed to both nodes (as a control plane does): node-a's HTTP
    engine answers 403 for a path it does not allow, and sends the allowed one through the tunnel,
    where node-b admits the stream (it says its requests were checked: the principal is allowed at
    L4). A connection from a0 straight to b1:8080 (a plain L4 stream, nothing checked per request)
    is still judged at L4 by node-b, where a rule with paths never matches: reset."""
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    policy = {
        "name": "b1-public-paths",
        "namespace": "lab",
        "selector": {"service_account": "b1"},
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"principals": [f"{TRUST_DOMAIN}/ns/lab/sa/a0"]}],
                "to": [{"paths": ["/public*"], "methods": ["GET"]}],
            },
            {"to": [{"ports": [ECHO_PORT]}]},  # the other tests' echo traffic
        ],
    }
    with authz_added(mesh, policy):
        # A tunnel stream is judged when it opens: let the HTTP engine's pooled upstream connections of
        # the earlier tests (opened before the policy) close first (http.upstream_idle_timeout, 4 s).
        time.sleep(4.5)
        deadline = time.monotonic() + 5  # every worker applies it from its control pipe
        while http_requests(a0, WEB_VIP, ["/private"])[0][0] != 403 and time.monotonic() < deadline:
            time.sleep(0.1)
        [public, private] = http_requests(a0, WEB_VIP, ["/public/x", "/private"])
        assert public[0] == 200 and public[2].startswith("backend=b1 "), public
        assert private[0] == 403 and private[1]["x-nodeproxy-flags"] == "RBAC", private
        stream = mesh.daemons["node-b"].wait_record(
            lambda r: (
                r.get("event") == "tunnel stream"
                and r.get("authority") == f"{b1.ip}:{HTTP_PORT}"
                and "b1-public-paths" in str(r.get("reason"))
            )
        )
        assert stream["allowed"] is True, stream
        assert is_reset(a0, b1.ip, HTTP_PORT)  # L4 to the same port: node-b denies at L4
        assert echoes(a0, b1.ip, ECHO_PORT)
    deadline = time.monotonic() + 5
    while http_get(a0, b1.ip)[:12] != "HTTP/1.1 200" and time.monotonic() < deadline:
        time.sleep(0.1)


@contextlib.contextmanager
def authz_added(mesh: MeshLab, policy: Mapping[str, object], **authz: object) -> Iterator[None]:
    """Both daemons reloaded with `policy` added (and `authz` keys set), as a control plane pushes the
    same policies to every node; their configs restored at the end."""
    originals = {name: json.loads(d.config_path.read_text()) for name, d in mesh.daemons.items()}
    try:
        for name, daemon in mesh.daemons.items():
            changed = json.loads(json.dumps(originals[name]))
            changed["authz"]["authorization_policies"].append(policy)
            changed["authz"].update(authz)
            reload(daemon, changed, "config reloaded")
        yield
    finally:
        for name, daemon in mesh.daemons.items():
            reload(daemon, originals[name], "config reloaded")


def test_a_caller_outside_the_mesh_is_judged_per_request_by_the_destination(mesh: MeshLab) -> None:
    """a2 has no identity: its requests to b1 cross the underlay in plaintext and reach node-b's inbound
    port. b1's policies need the requests (paths, a JWT's request principal), so node-b's HTTP engine
    checks each one and sends what is allowed to b1, from a2's address. (At L4 these rules could only
    deny: before, every connection was reset.)"""
    a2, b1 = mesh.a.pods[2], mesh.b.pods[1]
    key = jwk.ECKey.generate_key("P-256", parameters={"kid": "lab-idp"}, private=True)
    other_key = jwk.ECKey.generate_key("P-256", parameters={"kid": "lab-idp"}, private=True)
    jwks_path = mesh.directory / "lab-idp-jwks.json"
    jwks_path.write_text(json.dumps({"keys": [key.as_dict(private=False)]}))

    def token(signer: jwk.ECKey) -> str:
        claims = {"iss": "https://idp.lab", "sub": "alice", "aud": "lab", "exp": int(time.time()) + 600}
        header = {"alg": "ES256", "typ": "JWT", "kid": "lab-idp"}
        return jws.serialize_compact(header, json.dumps(claims).encode(), signer, algorithms=["ES256"])

    policy = {
        "name": "b1-by-request",
        "namespace": "lab",
        "selector": {"service_account": "b1"},
        "action": "ALLOW",
        "rules": [
            {"to": [{"paths": ["/public*"]}]},
            {"from": [{"request_principals": ["https://idp.lab/alice"]}], "to": [{"paths": ["/private*"]}]},
            {"to": [{"ports": [ECHO_PORT]}]},  # the other tests' echo traffic
        ],
    }
    authentication = {
        "name": "lab-idp",
        "namespace": "lab",
        "selector": {"service_account": "b1"},
        "jwt_rules": [{"issuer": "https://idp.lab", "audiences": ["lab"], "jwks_file": str(jwks_path)}],
    }

    def get(path: str, bearer: str | None = None) -> tuple[int, str]:
        auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
        with connect(a2, b1.ip, HTTP_PORT) as sock, sock.makefile("rb") as replies:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: b1\r\n{auth}Connection: close\r\n\r\n".encode())
            status = int(replies.readline().split()[1])
            return status, replies.read().decode("latin-1")

    with authz_added(mesh, policy, request_authentication=[authentication]):
        deadline = time.monotonic() + 5  # every worker applies it from its control pipe
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, IndexError, ValueError):
                if get("/public")[0] == 200:
                    break
            time.sleep(0.1)
        status, body = get("/public")
        assert status == 200 and f"client={a2.ip}:" in body, body  # from the caller's own address
        assert get("/private")[0] == 403  # no token: no request principal
        assert get("/private", token(key))[0] == 200
        assert get("/private", token(other_key))[0] == 401  # signed by a key the JWKS does not have
        denied = mesh.daemons["node-b"].wait_record(
            lambda r: r.get("event") == "request" and r.get("path") == "/private" and r.get("status") == 403
        )
        assert denied["flags"] == "RBAC" and str(denied["src"]).startswith(f"{a2.ip}:"), denied


def test_deny_policy_on_the_destination_node_resets_the_connection(mesh: MeshLab) -> None:
    a1, b1 = mesh.a.pods[1], mesh.b.pods[1]
    assert is_reset(a1, b1.ip, ECHO_PORT)
    denied = mesh.daemons["node-b"].wait_record(
        lambda r: (
            r.get("event") == "tunnel stream"
            and r.get("allowed") is False
            and r.get("peer_identity") == f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a1"
        )
    )
    assert "deny-a1" in str(denied["reason"])
    closed = mesh.daemons["node-a"].wait_record(
        lambda r: r.get("event") == "connection closed" and str(r.get("src", "")).startswith(f"{a1.ip}:")
    )
    assert closed["ending"] == "tunnel_refused_403" and closed["flags"] == "UR", closed
    # Control: the same source to a pod the policy does not cover (b0, namespace secure) goes through.
    with connect(a1, mesh.b.pods[0].ip, ECHO_PORT) as sock:
        assert echo(sock, b"allowed") == b"allowed"


def test_strict_rejects_plaintext_and_permissive_accepts_it(mesh: MeshLab) -> None:
    a2 = mesh.a.pods[2]  # no identity: its connections cannot travel in the tunnel
    b0, b1 = mesh.b.pods[0], mesh.b.pods[1]
    # From a mesh-less pod: to STRICT b0 refused already by node-a (no point sending it) ...
    assert is_reset(a2, b0.ip, ECHO_PORT)
    refused = mesh.daemons["node-a"].wait_record(
        lambda r: r.get("event") == "connection refused" and str(r.get("src", "")).startswith(f"{a2.ip}:")
    )
    assert "STRICT" in str(refused["reason"]), refused
    # ... to PERMISSIVE b1 relayed in plaintext, with a2's own address, through node-b's 15006
    answer = http_get(a2, b1.ip)
    assert answer.startswith("HTTP/1.1 200") and f"client={a2.ip}:" in answer, answer
    # From outside the mesh (node-a's own address, not captured): node-b's inbound capture decides.
    assert is_reset(mesh.a.ns, b0.ip, ECHO_PORT)
    rejected = mesh.daemons["node-b"].wait_record(
        lambda r: (
            r.get("event") == "plaintext inbound refused" and r.get("destination") == f"{b0.ip}:{ECHO_PORT}"
        )
    )
    assert "STRICT" in str(rejected["reason"])
    with connect(mesh.a.ns, b1.ip, ECHO_PORT) as sock:
        assert echo(sock, b"permissive") == b"permissive"


def expiry_of(ns: str, identity: str) -> float | None:
    with netns.entered(ns):
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("nodeproxy_certificate_expiry_timestamp_seconds") and f'"{identity}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def test_certificates_rotate_under_continuous_traffic_without_dropping_it(mesh: MeshLab) -> None:
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    identity = f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    node_a = mesh.daemons["node-a"]

    def renewals() -> int:
        return sum(
            1 for r in node_a.records() if r.get("event") == "svid renewed" and r.get("spiffe_id") == identity
        )

    first_expiry = expiry_of(mesh.a.ns, identity)
    assert first_expiry is not None
    before = renewals()
    rounds = 0
    deadline = time.monotonic() + 75  # each SVID is renewed 40.5-49.5 s after it was issued
    with connect(a0, b1.ip, ECHO_PORT) as long_lived:
        while renewals() < before + 2 and time.monotonic() < deadline:  # both workers renewed a0
            payload = f"round {rounds} ".encode() * 50
            assert echo(long_lived, payload) == payload, f"the long-lived stream broke in round {rounds}"
            rounds += 1
            time.sleep(0.1)
        assert renewals() >= before + 2, f"no rotation within 75 s:\n{node_a.log_path.read_text()[-3000:]}"
        # New connections (new SVID: a new TLS connection) work, and the old stream still flows.
        for _ in range(4):
            answer = http_get(a0, b1.ip)
            assert answer.startswith("HTTP/1.1 200") and f"client={a0.ip}:" in answer
        for _ in range(10):
            assert echo(long_lived, b"after rotation") == b"after rotation"
        sent = long_lived.getsockname()
    # The metric is the earliest expiry over the workers: it moves once every worker has renewed a0
    # (two renewals may be one worker's twice), within a renewal period (at most 49.5 s).
    deadline = time.monotonic() + 55
    later_expiry = expiry_of(mesh.a.ns, identity)
    while (later_expiry is None or later_expiry <= first_expiry) and time.monotonic() < deadline:
        time.sleep(0.5)
        later_expiry = expiry_of(mesh.a.ns, identity)
    assert later_expiry is not None and later_expiry > first_expiry  # the metric follows the new SVID
    # The long-lived connection ended as a tunnel stream that closed normally, after the rotation.
    closed = node_a.wait_record(
        lambda r: r.get("event") == "connection closed" and r.get("src") == f"{sent[0]}:{sent[1]}"
    )
    assert closed["ending"] == "tunnel_closed_200" and closed["flags"] == "-", closed
    assert rounds > 10


def echoes(pod: Pod, ip: str, port: int) -> bool:
    try:
        with connect(pod, ip, port) as sock:
            return echo(sock, b"ping") == b"ping"
    except OSError:
        return False


def reload(daemon: Daemon, config: dict[str, object], expect: str) -> dict[str, object]:
    """Write `config`, SIGHUP, and wait for the next log record whose event starts with `expect`."""
    seen = len(daemon.records())
    daemon.config_path.write_text(json.dumps(config))
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in daemon.records()[seen:]:
            if str(record.get("event", "")).startswith(expect):
                return record
        time.sleep(0.05)
    raise AssertionError(f"no {expect!r} after the reload:\n{daemon.log_path.read_text()[-3000:]}")


def tcp_pair(ns: str) -> tuple[socket.socket, socket.socket]:
    with netns.entered(ns):
        server = socket.create_server(("127.0.0.1", 0))
        client = socket.create_connection(server.getsockname(), timeout=10)
    accepted, _ = server.accept()
    server.close()
    return client, accepted


def test_a_peer_may_not_name_a_source_address_its_identity_does_not_own(mesh: MeshLab) -> None:
    """A node holding a0's certificate may claim only a0's address as the source: node-b connects to
    the pod from that address, which ip-block policies and the pod trust."""
    a0, a1, b1 = mesh.a.pods[0], mesh.a.pods[1], mesh.b.pods[1]
    a0_id = f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    authority = CertificateAuthority.load(mesh.directory / "ca")
    issued, key = authority.issue_credential(SpiffeId.parse(a0_id), ttl=timedelta(minutes=5))
    with netns.entered(mesh.a.ns):  # the engine thread (and its sockets) live in node-a's namespace
        engine = TunnelEngine(TRUST_DOMAIN, authority.trust_bundle_pem())
        engine.set_identity(a0_id, PemCredential(issued.chain_pem, private_key_pem(key)))
        engine.start()
    ours: list[socket.socket] = []
    try:
        for conn_id, claimed in ((1, a0.ip), (2, a1.ip)):
            local, theirs = tcp_pair(mesh.a.ns)
            ours.append(local)
            engine.adopt(
                conn_id,
                theirs.detach(),
                mesh.b.underlay_ip,
                f"{b1.ip}:{ECHO_PORT}",
                a0_id,
                claimed,
                peer_identity=f"spiffe://{TRUST_DOMAIN}/nodeproxy/node/node-b",
            )
        assert echo(ours[0], b"honest") == b"honest"  # a0's own address: allowed
        ours[0].close()
        done: dict[int, StreamDone] = {}
        deadline = time.monotonic() + 10
        while len(done) < 2 and time.monotonic() < deadline:
            done.update((r.id, r) for r in engine.records() if isinstance(r, StreamDone))
            time.sleep(0.05)
        assert set(done) == {1, 2}, f"only {sorted(done)} ended: the forged source was let through"
        assert done[1].status == 200
        assert done[2].ending.name == "REFUSED" and done[2].status == 403, done[2]
        refused = mesh.daemons["node-b"].wait_record(
            lambda r: r.get("event") == "tunnel stream" and "not a pod of" in str(r.get("reason"))
        )
        assert refused["allowed"] is False and refused["peer_identity"] == a0_id
    finally:
        for sock in ours:
            sock.close()
        engine.stop()


def stream_outcome(engine: TunnelEngine, conn_id: int, timeout: float = 10.0) -> StreamDone:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in engine.records():
            if isinstance(record, StreamDone) and record.id == conn_id:
                return record
        time.sleep(0.05)
    raise AssertionError(f"stream {conn_id} did not end within {timeout} s")


def test_a_new_root_in_the_trust_bundle_file_applies_without_a_restart(mesh: MeshLab) -> None:
    """An SVID from a second CA (the same trust domain) is refused by node-b until that CA's root is in
    the bundle file node-b's daemon watches; then it is accepted, with no restart."""
    a0, b1 = mesh.a.pods[0], mesh.b.pods[1]
    a0_id = f"spiffe://{TRUST_DOMAIN}/ns/lab/sa/a0"
    init_ca(mesh.directory / "ca2", TRUST_DOMAIN)
    second = CertificateAuthority.load(mesh.directory / "ca2")
    first = CertificateAuthority.load(mesh.directory / "ca")
    issued, key = second.issue_credential(SpiffeId.parse(a0_id), ttl=timedelta(minutes=5))
    with netns.entered(mesh.a.ns):
        engine = TunnelEngine(TRUST_DOMAIN, first.trust_bundle_pem() + second.trust_bundle_pem())
        engine.set_identity(a0_id, PemCredential(issued.chain_pem, private_key_pem(key)))
        engine.start()
    node_b = mesh.daemons["node-b"]
    node_b_id = f"spiffe://{TRUST_DOMAIN}/nodeproxy/node/node-b"
    try:
        before, theirs = tcp_pair(mesh.a.ns)
        engine.adopt(
            1,
            theirs.detach(),
            mesh.b.underlay_ip,
            f"{b1.ip}:{ECHO_PORT}",
            a0_id,
            a0.ip,
            peer_identity=node_b_id,
        )
        refused = stream_outcome(engine, 1)
        before.close()
        assert refused.ending.name == "TUNNEL_FAILED", refused  # node-b does not know the second root
        changes = sum(1 for r in node_b.records() if r.get("event") == "trust bundle changed")
        bundle = bundle_path(mesh.directory)
        staged = bundle.with_suffix(".new")
        staged.write_bytes(first.trust_bundle_pem() + second.trust_bundle_pem())
        staged.replace(bundle)  # atomically, as an operator's tooling would
        deadline = time.monotonic() + 10  # watch_interval is 1 s; every worker re-reads it
        while time.monotonic() < deadline:
            if sum(1 for r in node_b.records() if r.get("event") == "trust bundle changed") >= changes + 2:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(
                f"node-b's workers did not take the new bundle:\n{node_b.log_path.read_text()[-3000:]}"
            )
        after, theirs = tcp_pair(mesh.a.ns)
        try:
            engine.adopt(
                2,
                theirs.detach(),
                mesh.b.underlay_ip,
                f"{b1.ip}:{ECHO_PORT}",
                a0_id,
                a0.ip,
                peer_identity=node_b_id,
            )
            assert echo(after, b"new root") == b"new root"
        finally:
            after.close()
        assert stream_outcome(engine, 2).status == 200
        assert node_b.proc.poll() is None  # the same daemon, not a restart
    finally:
        engine.stop()


def test_a_dead_endpoint_behind_the_tunnel_is_ejected(mesh: MeshLab) -> None:
    """A service endpoint node-b cannot reach answers the tunnel's CONNECT with 503: each such
    connection is reset (the tunnel owns the client socket, no retry), counted as a connect failure
    (flag UF) and after two of them outlier detection ejects the endpoint: the rest all reach b1."""
    a0 = mesh.a.pods[0]
    node_a = mesh.daemons["node-a"]
    results = [echoes(a0, FLAKY_VIP, ECHO_PORT) for _ in range(24)]
    failed = results.count(False)
    # Each of node-a's two workers balances (and ejects) on its own: two failures each at most, where
    # round robin without ejection would fail every second connection.
    assert 1 <= failed <= 4, results
    ejected = node_a.wait_record(lambda r: r.get("event") == "endpoint ejected")
    assert ejected["endpoint"] == f"{GHOST_POD}:{ECHO_PORT}" and ejected["service"] == "flaky"
    dead = [
        r
        for r in node_a.records()
        if r.get("event") == "connection closed" and r.get("upstream") == f"{GHOST_POD}:{ECHO_PORT}"
    ]
    assert len(dead) == failed, dead
    assert all(r["ending"] == "tunnel_refused_503" and r["flags"] == "UF" for r in dead), dead


def test_strict_destination_rejects_plaintext_from_a_pod_its_own_node_lets_through(mesh: MeshLab) -> None:
    """node-b enforces STRICT itself: with node-a's peer authentication emptied by a reload (a node whose
    proxy does not know b0 is STRICT, or that has no proxy at all), a2's plaintext reaches node-b from
    a2's own address and node-b's inbound capture resets it; b1 (PERMISSIVE) still takes it."""
    node_a, node_b = mesh.daemons["node-a"], mesh.daemons["node-b"]
    a2, b0, b1 = mesh.a.pods[2], mesh.b.pods[0], mesh.b.pods[1]
    original = json.loads(node_a.config_path.read_text())
    lenient = json.loads(json.dumps(original))
    lenient["authz"]["peer_authentication"] = []
    try:
        reload(node_a, lenient, "config reloaded")
        deadline = time.monotonic() + 5  # until both of node-a's workers let a2 -> b0 go out
        while not any(
            r.get("event") == "plaintext inbound refused" and str(r.get("source", "")).startswith(f"{a2.ip}:")
            for r in node_b.records()
        ):
            assert time.monotonic() < deadline, node_b.log_path.read_text()[-3000:]
            assert is_reset(a2, b0.ip, ECHO_PORT)
        refused = node_b.wait_record(
            lambda r: (
                r.get("event") == "plaintext inbound refused"
                and str(r.get("source", "")).startswith(f"{a2.ip}:")
            )
        )
        assert refused["destination"] == f"{b0.ip}:{ECHO_PORT}" and "STRICT" in str(refused["reason"])
        assert echoes(a2, b1.ip, ECHO_PORT)
    finally:
        reload(node_a, original, "config reloaded")


def test_reload_applies_policies_and_refuses_identity_changes(mesh: MeshLab) -> None:
    node_b = mesh.daemons["node-b"]
    a0, b1, b2 = mesh.a.pods[0], mesh.b.pods[1], mesh.b.pods[2]
    original = json.loads(node_b.config_path.read_text())
    assert echoes(a0, b2.ip, ECHO_PORT)
    denying = json.loads(json.dumps(original))
    denying["authz"]["authorization_policies"].append(
        {
            "name": "deny-a0-to-b2",
            "namespace": "lab",
            "selector": {"service_account": "b2"},
            "action": "DENY",
            "rules": [{"from": [{"principals": [f"{TRUST_DOMAIN}/ns/lab/sa/a0"]}]}],
        }
    )
    try:
        reload(node_b, denying, "config reloaded")
        deadline = time.monotonic() + 5  # every worker applies it from its control pipe
        while echoes(a0, b2.ip, ECHO_PORT) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert is_reset(a0, b2.ip, ECHO_PORT)
        assert echoes(a0, b1.ip, ECHO_PORT)  # the policy selects b2 only
        # The identity setup is bound at start: a reload that changes it is refused as a whole.
        other_ttl = json.loads(json.dumps(original))
        other_ttl["identity"]["svid_ttl"] = "120s"
        rejected = reload(node_b, other_ttl, "config reload rejected")
        assert rejected["fields"] == ["identity.svid_ttl"], rejected
        assert is_reset(a0, b2.ip, ECHO_PORT)  # still the denying config
    finally:
        reload(node_b, original, "config reloaded")
    deadline = time.monotonic() + 5
    while not echoes(a0, b2.ip, ECHO_PORT) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert echoes(a0, b2.ip, ECHO_PORT)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_upgrade_keeps_tunnelled_streams_and_the_successor_serves_the_mesh(mesh: MeshLab) -> None:
    """`nodeproxy ctl upgrade` on node-b: the successor binds its own 15008/15006 next to the old
    daemon's (SO_REUSEPORT) and serves new tunnels; a stream the old daemon carries goes on until it
    ends, then the old daemon exits."""
    node_b = mesh.daemons["node-b"]
    a0, b1, b2 = mesh.a.pods[0], mesh.b.pods[1], mesh.b.pods[2]
    admin = str(node_b.wait_record(lambda r: r.get("event") == "admin socket open")["path"])
    with connect(a0, b1.ip, ECHO_PORT) as long_lived:
        assert echo(long_lived, b"before") == b"before"
        upgraded = subprocess.run(
            [sys.executable, "-m", "nodeproxy", "ctl", "--socket", admin, "upgrade"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert upgraded.returncode == 0, upgraded.stderr + node_b.log_path.read_text()[-3000:]
        successor = int(upgraded.stdout.split("-> ")[1].split(";")[0])
        assert node_b.proc.poll() is None  # still relaying the long-lived stream
        node_b.wait_record(lambda r: r.get("event") == "mesh serving" and r.get("worker") == 1, 20)
        mesh_serving = [r for r in node_b.records() if r.get("event") == "mesh serving"]
        assert len(mesh_serving) == 4, mesh_serving  # two workers of each daemon
        for _ in range(3):  # new streams (on node-a's pooled tunnel connection, to either daemon)
            assert echoes(a0, b2.ip, ECHO_PORT)
        assert echo(long_lived, b"during") == b"during"
    assert node_b.proc.wait(timeout=30) == 0, node_b.log_path.read_text()[-3000:]
    assert node_b.ready_file.read_text().strip() == str(successor)
    assert alive(successor)
    answer = http_get(a0, b1.ip)
    assert answer.startswith("HTTP/1.1 200") and f"client={a0.ip}:" in answer
    # With the old daemon gone, new tunnels (and new TLS connections) reach the successor's listeners.
    assert echoes(mesh.a.pods[1], mesh.b.pods[0].ip, ECHO_PORT)  # a1 -> b0 (not denied)


def test_the_capture_is_gone_after_the_daemons_stop(mesh: MeshLab) -> None:
    """Last in the module: a daemon stopped by SIGTERM removes its inbound capture too (node-b's serving
    daemon: the upgrade's successor when that test ran)."""
    daemon = mesh.daemons["node-b"]
    assert "--on-port 15006" in netns.run(daemon.node.ns, ["iptables-save", "-t", "mangle"])
    serving = int(daemon.ready_file.read_text().strip())
    os.kill(serving, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while alive(serving) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(serving), daemon.log_path.read_text()[-3000:]
    daemon.stop()
    assert "NODEPROXY" not in netns.run(daemon.node.ns, ["iptables-save", "-t", "mangle"])
    assert re.search(r'"exit_code": 0, "event": "nodeproxy stopped"', daemon.log_path.read_text())
