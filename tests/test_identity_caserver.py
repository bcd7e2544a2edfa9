"""`nodeproxy ca serve` over real TLS on loopback: who gets an SVID, who is refused, and why."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.identity.ca import (
    CertificateAuthority,
    generate_private_key,
    init_ca,
    make_csr,
    write_credential,
)
from nodeproxy.identity.caclient import CaClient, CaClientError
from nodeproxy.identity.caserver import MAX_BODY, CaServer, authorize
from nodeproxy.identity.config import IdentityConfig, WorkloadIndex
from nodeproxy.identity.spiffe import SpiffeId, check_x509_svid, verify_svid_chain
from tests.identity_helpers import forged_leaf, key_pem, pem

TD = "cluster.local"
WEB = SpiffeId.for_workload(TD, "default", "web")  # on node-a
DB = SpiffeId.for_workload(TD, "default", "db")  # on node-b
T = TypeVar("T")


def workloads(trust_domain: str = TD) -> WorkloadIndex:
    config = IdentityConfig.model_validate(
        {
            "trust_domain": trust_domain,
            "workloads": [
                {"ip": "10.244.1.10", "namespace": "default", "service_account": "web", "node": "node-a"},
                {"ip": "10.244.2.10", "namespace": "default", "service_account": "db", "node": "node-b"},
            ],
        }
    )
    return config.workload_index()


@dataclass
class Setup:
    tmp: Path
    ca: CertificateAuthority

    def credential(
        self, spiffe_id: SpiffeId, name: str, *, ttl: timedelta = timedelta(days=1)
    ) -> tuple[Path, Path]:
        issued, key = self.ca.issue_credential(spiffe_id, ttl=ttl)
        cert, key_path = self.tmp / f"{name}.pem", self.tmp / f"{name}.key"
        write_credential(cert, key_path, issued.chain_pem, key)
        return cert, key_path

    def client(self, server: CaServer, address: tuple[str, int], cert: Path, key: Path) -> CaClient:
        return CaClient(*address, TD, cert=cert, key=key, trust_bundle=self.ca.trust_bundle_pem, timeout=5.0)


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    init_ca(tmp_path / "ca", TD)
    return Setup(tmp_path, CertificateAuthority.load(tmp_path / "ca"))


@asynccontextmanager
async def serving(
    ca: CertificateAuthority, index: WorkloadIndex | None = None
) -> AsyncIterator[tuple[CaServer, tuple[str, int]]]:
    server = CaServer(ca, index or workloads())
    address = await server.start("127.0.0.1", 0)
    try:
        yield server, address
    finally:
        await server.close()


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), 30)

    return asyncio.run(bounded())


def csr_pem(spiffe_id: SpiffeId) -> bytes:
    return make_csr(generate_private_key(), spiffe_id).public_bytes(serialization.Encoding.PEM)


def test_node_gets_an_svid_for_its_own_workload(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")

    async def scenario() -> bytes:
        async with serving(setup.ca) as (server, address):
            answer = await setup.client(server, address, cert, key).sign(csr_pem(WEB), pod_ip="10.244.1.10")
            assert server.issued == 1
            assert answer.trust_bundle_pem == setup.ca.trust_bundle_pem()
            return answer.cert_chain_pem

    leaf, *rest = x509.load_pem_x509_certificates(run(scenario))
    now = datetime.now(UTC)
    assert verify_svid_chain(leaf, rest, setup.ca.roots, TD, now=now) == WEB
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(hours=24, minutes=1)


def test_another_nodes_workload_and_unknown_sources_are_refused(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")
    cases = [
        (DB, None, "no workload on node 'node-a' has the identity"),  # node-b's workload
        (DB, "10.244.2.10", "does not run on node 'node-a'"),
        (SpiffeId.for_workload(TD, "default", "ghost"), None, "no workload on node"),  # in no config
        (WEB, "10.244.1.99", "is not a known workload"),  # an unknown source pod
        (WEB, "10.244.2.10", "does not run on node"),  # a pod of node-b claimed for WEB
        (SpiffeId.for_node(TD, "node-b"), None, "not a workload identity"),  # another node's credential
    ]

    async def scenario() -> list[tuple[int | None, str]]:
        results = []
        async with serving(setup.ca) as (server, address):
            client = setup.client(server, address, cert, key)
            for spiffe_id, pod_ip, _ in cases:
                with pytest.raises(CaClientError) as caught:
                    await client.sign(csr_pem(spiffe_id), pod_ip=pod_ip)
                results.append((caught.value.status, str(caught.value)))
            assert server.issued == 0 and server.refused == len(cases)
        return results

    for (status, text), (_, _, why) in zip(run(scenario), cases, strict=True):
        assert status == 403 and why in text


def test_the_authorization_rule_alone() -> None:
    index = workloads()
    assert authorize(index, "node-a", WEB) is None
    assert authorize(index, "node-b", DB) is None
    assert authorize(index, "node-b", WEB) is not None
    assert authorize(index, "node-c", WEB) is not None
    assert authorize(index, "node-a", SpiffeId.for_workload("other.td", "default", "web")) is not None
    # A node may renew its own credential, never another node's, and not as a pod's.
    assert authorize(index, "node-a", SpiffeId.for_node(TD, "node-a")) is None
    assert authorize(index, "node-a", SpiffeId.for_node(TD, "node-b")) is not None
    assert authorize(index, "node-a", SpiffeId.for_node(TD, "node-a"), IPv4Address("10.244.1.10")) is not None
    assert authorize(index, "node-a", SpiffeId.for_ca_service(TD)) is not None


_NAMES = st.sampled_from(["a", "b", "c"])


@given(
    st.lists(st.tuples(_NAMES, _NAMES, _NAMES), max_size=6),  # (namespace, service account, node) per pod
    _NAMES,
    _NAMES,
    _NAMES,
)
def test_authorize_is_exactly_the_inventory(
    pods: list[tuple[str, str, str]], node: str, namespace: str, service_account: str
) -> None:
    """A node may have an identity if and only if one of its pods has it (property over small inventories)."""
    config = IdentityConfig.model_validate(
        {
            "trust_domain": TD,
            "workloads": [
                {"ip": f"10.0.0.{i + 1}", "namespace": ns, "service_account": sa, "node": on}
                for i, (ns, sa, on) in enumerate(pods)
            ],
        }
    )
    index = config.workload_index()
    requested = SpiffeId.for_workload(TD, namespace, service_account)
    expected = any((ns, sa, on) == (namespace, service_account, node) for ns, sa, on in pods)
    assert (authorize(index, node, requested) is None) == expected
    for i, (ns, sa, on) in enumerate(pods):
        by_pod = authorize(index, node, requested, IPv4Address(f"10.0.0.{i + 1}"))
        assert (by_pod is None) == ((ns, sa, on) == (namespace, service_account, node))


def test_nodes_outside_identity_nodes_get_nothing(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")
    only_b = IdentityConfig.model_validate(
        {
            "trust_domain": TD,
            "nodes": ["node-b"],
            "workloads": [
                {"ip": "10.244.2.10", "namespace": "default", "service_account": "db", "node": "node-b"}
            ],
        }
    ).workload_index()

    async def scenario() -> list[str]:
        errors = []
        async with serving(setup.ca, only_b) as (server, address):
            client = setup.client(server, address, cert, key)
            for spiffe_id in (DB, SpiffeId.for_node(TD, "node-a")):
                with pytest.raises(CaClientError) as caught:
                    await client.sign(csr_pem(spiffe_id))
                errors.append(str(caught.value))
            assert server.issued == 0
        return errors

    for error in run(scenario):
        assert "(403)" in error and "not one the CA serves" in error


async def _raw_request(address: tuple[str, int], context: ssl.SSLContext, body: bytes) -> bytes:
    """One POST with a client context of the test's choosing; the raw answer, or the TLS error's text.

    Blocking sockets in a thread: they surface the server's TLS alert as an SSLError, where asyncio's
    transport reports only an end of stream."""

    def blocking() -> bytes:
        with socket.create_connection(address, timeout=5) as raw, context.wrap_socket(raw) as tls:
            head = (
                "POST /v1/svid HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n"
                f"content-type: application/pkcs10\r\ncontent-length: {len(body)}\r\n\r\n"
            )
            try:
                tls.sendall(head.encode() + body)
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
                return answer
            except (ssl.SSLError, ConnectionError) as err:
                return f"{type(err).__name__}: {err}".encode()

    return await asyncio.to_thread(blocking)


def _client_context(
    ca: CertificateAuthority, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.trust_bundle_pem().decode())
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def _refused_at_tls(setup: Setup, context: ssl.SSLContext) -> str:
    """The server's reason for refusing the handshake of a client with ``context`` (which gets no answer)."""

    async def scenario() -> str:
        async with serving(setup.ca) as (server, address):
            answer = await _raw_request(address, context, csr_pem(WEB))
            assert b"HTTP/1.1" not in answer  # not a single byte of HTTP
            assert server.issued == 0 and server.handshake_failures == 1
            return server.last_handshake_error.lower()

    return run(scenario)


def test_a_caller_without_a_client_certificate_is_refused(setup: Setup) -> None:
    assert "peer did not return a certificate" in _refused_at_tls(setup, _client_context(setup.ca))


def test_a_node_credential_from_another_ca_is_refused(setup: Setup) -> None:
    init_ca(setup.tmp / "rogue", TD)  # same trust domain name, different keys
    rogue = CertificateAuthority.load(setup.tmp / "rogue")
    issued, key = rogue.issue_credential(SpiffeId.for_node(TD, "node-a"), ttl=timedelta(days=1))
    write_credential(setup.tmp / "rogue.pem", setup.tmp / "rogue.key", issued.chain_pem, key)
    context = _client_context(setup.ca, setup.tmp / "rogue.pem", setup.tmp / "rogue.key")
    assert "certificate verify failed" in _refused_at_tls(setup, context)


def test_an_expired_node_credential_is_refused(setup: Setup) -> None:
    now = datetime.now(UTC)
    cert, key = forged_leaf(
        setup.ca,
        [str(SpiffeId.for_node(TD, "node-a"))],
        not_before=now - timedelta(hours=2),
        not_after=now - timedelta(minutes=5),
    )
    (setup.tmp / "old.pem").write_bytes(pem(cert, setup.ca.signing_cert))
    (setup.tmp / "old.key").write_bytes(key_pem(key))
    context = _client_context(setup.ca, setup.tmp / "old.pem", setup.tmp / "old.key")
    assert "certificate has expired" in _refused_at_tls(setup, context)


def test_a_workload_svid_is_not_a_node_credential(setup: Setup) -> None:
    # A valid SVID of the trust domain, but a workload's: it may not ask the CA for anything.
    cert, key = setup.credential(WEB, "web")

    async def scenario() -> CaClientError:
        async with serving(setup.ca) as (server, address):
            with pytest.raises(CaClientError) as caught:
                await setup.client(server, address, cert, key).sign(csr_pem(WEB))
            assert server.issued == 0
            return caught.value

    err = run(scenario)
    assert err.status == 403 and "only node proxies" in str(err)


def test_a_forged_node_credential_with_two_uri_sans_is_refused(setup: Setup) -> None:
    now = datetime.now(UTC)
    cert, key = forged_leaf(
        setup.ca,
        [str(SpiffeId.for_node(TD, "node-a")), str(SpiffeId.for_node(TD, "node-b"))],
        not_before=now - timedelta(minutes=1),
        not_after=now + timedelta(hours=1),
    )
    (setup.tmp / "two.pem").write_bytes(pem(cert, setup.ca.signing_cert))
    (setup.tmp / "two.key").write_bytes(key_pem(key))

    async def scenario() -> CaClientError:
        async with serving(setup.ca) as (server, address):
            client = setup.client(server, address, setup.tmp / "two.pem", setup.tmp / "two.key")
            with pytest.raises(CaClientError) as caught:
                await client.sign(csr_pem(WEB))
            assert server.issued == 0
            return caught.value

    err = run(scenario)
    assert err.status == 403 and "exactly one URI SAN" in str(err)


def test_the_client_refuses_a_server_that_is_not_the_ca(setup: Setup) -> None:
    # A server with a valid SVID of the trust domain (a workload's), impersonating the CA.
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")

    async def scenario() -> str:
        server = CaServer(setup.ca, workloads())
        server.server_id = WEB  # the server presents a workload identity instead of the CA's
        address = await server.start("127.0.0.1", 0)
        try:
            with pytest.raises(CaClientError) as caught:
                await setup.client(server, address, cert, key).sign(csr_pem(WEB))
            assert server.issued == 0
            return str(caught.value)
        finally:
            await server.close()

    assert "not the CA" in run(scenario)


def test_pkcs10_body_bad_requests_and_the_trust_bundle(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")

    async def scenario() -> list[bytes]:
        async with serving(setup.ca) as (_, address):
            context = _client_context(setup.ca, cert, key)
            answers = [await _raw_request(address, context, csr_pem(WEB))]
            answers.append(await _raw_request(address, context, b"not a csr"))
            answers.append(await _raw_request(address, context, b"x" * (MAX_BODY + 1)))
            reader, writer = await asyncio.open_connection(*address, ssl=context, server_hostname="")
            writer.write(b"GET /v1/trust-bundle HTTP/1.1\r\nhost: ca\r\nconnection: close\r\n\r\n")
            answers.append(await reader.read())
            writer.close()
            await writer.wait_closed()
            return answers

    ok, bad, big, bundle = run(scenario)
    assert ok.startswith(b"HTTP/1.1 200") and b"application/pem-certificate-chain" in ok
    leaf = x509.load_pem_x509_certificate(ok.split(b"\r\n\r\n", 1)[1])
    assert check_x509_svid(leaf, TD) == WEB
    assert bad.startswith(b"HTTP/1.1 400") and b"not a CSR" in bad
    assert big.startswith(b"HTTP/1.1 413")
    assert bundle.startswith(b"HTTP/1.1 200") and bundle.endswith(setup.ca.trust_bundle_pem())


def test_workload_reload_applies_to_the_next_request(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-b"), "node-b")

    async def scenario() -> None:
        async with serving(setup.ca) as (server, address):
            client = setup.client(server, address, cert, key)
            await client.sign(csr_pem(DB))
            # db moved to node-a: node-b may no longer obtain it
            moved = IdentityConfig.model_validate(
                {
                    "trust_domain": TD,
                    "workloads": [
                        {
                            "ip": "10.244.1.11",
                            "namespace": "default",
                            "service_account": "db",
                            "node": "node-a",
                        }
                    ],
                }
            )
            server.set_workloads(moved.workload_index())
            with pytest.raises(CaClientError, match="no workload on node 'node-b'"):
                await client.sign(csr_pem(DB))

    run(scenario)


def test_ttl_request_is_capped_by_the_server(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")

    async def scenario() -> list[x509.Certificate]:
        async with serving(setup.ca) as (server, address):
            client = setup.client(server, address, cert, key)
            short = await client.sign(csr_pem(WEB), ttl=timedelta(hours=1))
            long = await client.sign(csr_pem(WEB), ttl=timedelta(days=30))
            return [x509.load_pem_x509_certificates(a.cert_chain_pem)[0] for a in (short, long)]

    short, long = run(scenario)
    assert short.not_valid_after_utc - short.not_valid_before_utc == timedelta(hours=1, minutes=1)
    assert long.not_valid_after_utc - long.not_valid_before_utc == timedelta(hours=24, minutes=1)


# --------------------------------------------------------------------------------------------
# The commands, as an operator runs them


def _nodeproxy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodeproxy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


CONFIG = """\
node: {{name: node-a}}
capture: {{pod_cidrs: [10.244.1.0/24]}}
identity:
  trust_domain: cluster.local
  workloads:
    - {{ip: 10.244.1.10, namespace: default, service_account: web, node: {web_node}}}
"""


def _wait_for_log(proc: subprocess.Popen[str], needle: str, timeout: float = 15.0) -> dict[str, object]:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if needle in line:
            record: dict[str, object] = json.loads(line)
            return record
    raise AssertionError(f"{needle!r} not logged by `nodeproxy ca serve` (exit {proc.poll()})")


def test_ca_commands_init_issue_node_serve_reload_and_stop(tmp_path: Path) -> None:
    ca_dir, config = tmp_path / "ca", tmp_path / "config.yaml"
    created = _nodeproxy("ca", "init", "--dir", ca_dir, "--trust-domain", TD)
    assert created.returncode == 0, created.stderr
    again = _nodeproxy("ca", "init", "--dir", ca_dir, "--trust-domain", TD)
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr
    bad = _nodeproxy("ca", "init", "--dir", tmp_path / "bad", "--trust-domain", "Cluster.Local")
    assert bad.returncode == 1 and "lower case" in bad.stderr
    node = _nodeproxy(
        "ca",
        "issue-node",
        "--dir",
        ca_dir,
        "--node",
        "node-a",
        "--cert",
        tmp_path / "n.pem",
        "--key",
        tmp_path / "n.key",
    )
    assert node.returncode == 0, node.stderr
    assert (tmp_path / "n.key").stat().st_mode & 0o777 == 0o600
    config.write_text(CONFIG.format(web_node="node-a"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nodeproxy",
            "ca",
            "serve",
            "--dir",
            str(ca_dir),
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        host, port = str(_wait_for_log(proc, "ca serving")["address"]).rsplit(":", 1)
        bundle = (ca_dir / "bundle.pem").read_bytes()
        client = CaClient(
            host, int(port), TD, cert=tmp_path / "n.pem", key=tmp_path / "n.key", trust_bundle=lambda: bundle
        )
        run(lambda: client.sign(csr_pem(WEB)))
        config.write_text(CONFIG.format(web_node="node-b"))  # web moved to another node
        proc.send_signal(signal.SIGHUP)
        _wait_for_log(proc, "ca reloaded")
        with pytest.raises(CaClientError, match="no workload on node 'node-a'"):
            run(lambda: client.sign(csr_pem(WEB)))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


# --------------------------------------------------------------------------------------------
# Limits of a connection: malformed, slow and idle peers


def test_malformed_http_gets_400_and_slow_or_idle_peers_are_dropped(setup: Setup) -> None:
    cert, key = setup.credential(SpiffeId.for_node(TD, "node-a"), "node-a")
    context = _client_context(setup.ca, cert, key)
    address: tuple[str, int] = ("", 0)

    def session(send: bytes, *, tls: bool = True) -> tuple[bytes, float]:
        """Send ``send`` and read until the server closes; (what came back, seconds until it closed)."""
        started = time.monotonic()
        with socket.create_connection(address, timeout=10) as raw:
            stream = context.wrap_socket(raw) if tls else raw
            stream.sendall(send)
            answer = b""
            try:
                while chunk := stream.recv(65536):
                    answer += chunk
            except (ssl.SSLError, ConnectionError):
                pass
            return answer, time.monotonic() - started

    async def scenario() -> None:
        nonlocal address
        async with serving(setup.ca) as (server, address):
            server.handshake_timeout = server.request_timeout = server.idle_timeout = 0.5
            answer, _ = await asyncio.to_thread(session, b"GET /v1/trust-bundle HTTP/1.1\r\nhost ca\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400") and b"malformed HTTP request" in answer
            # A TCP peer that never starts TLS, one that stops mid-request, one that idles after a request:
            answer, took = await asyncio.to_thread(session, b"", tls=False)
            assert answer == b"" and 0.4 < took < 5 and "taking longer than" in server.last_handshake_error
            answer, took = await asyncio.to_thread(session, b"POST /v1/svid HTTP/1.1\r\nhost: ca\r\n")
            assert answer == b"" and 0.4 < took < 5
            answer, took = await asyncio.to_thread(
                session, b"GET /v1/trust-bundle HTTP/1.1\r\nhost: ca\r\n\r\n"
            )
            assert answer.startswith(b"HTTP/1.1 200") and 0.4 < took < 5  # kept alive, then dropped idle
            assert server.issued == 0

    run(scenario)
