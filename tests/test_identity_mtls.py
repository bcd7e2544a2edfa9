"""SVIDs in a real mutual-TLS handshake on loopback, with the peer's identity taken from what the TLS
library hands over (`peer_identity_from_der`), as the tunnel does. The TLS library verifies the chain;
the SVID rules (one URI SAN, cA=false, trust domain) are the checker's job, and these tests show that a
handshake alone lets such certificates through."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nodeproxy.identity.ca import CertificateAuthority, init_ca, write_credential
from nodeproxy.identity.spiffe import SpiffeId, SvidError, peer_identity_from_der
from tests.identity_helpers import forged_leaf, key_pem, pem

TD = "cluster.local"
WEB = SpiffeId.for_workload(TD, "default", "web")
API = SpiffeId.for_workload(TD, "default", "api")


def _context(side: int, bundle: bytes, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(side)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the identity is the URI SAN, checked by peer_identity_from_der
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=bundle.decode())
    context.load_cert_chain(cert, key)
    return context


def _credential(tmp: Path, ca: CertificateAuthority, spiffe_id: SpiffeId, name: str) -> tuple[Path, Path]:
    issued, key = ca.issue_credential(spiffe_id, ttl=timedelta(hours=24))
    write_credential(tmp / f"{name}.pem", tmp / f"{name}.key", issued.chain_pem, key)
    return tmp / f"{name}.pem", tmp / f"{name}.key"


def _handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[bytes | None, bytes | None, str]:
    """Handshake over loopback; (client cert DER seen by the server, server cert DER seen by the client,
    the server's handshake error)."""

    async def scenario() -> tuple[bytes | None, bytes | None, str]:
        seen: list[bytes | None] = []
        error: list[str] = []
        done = asyncio.Event()

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await writer.start_tls(server_ctx)
                seen.append(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))
                writer.write(b"ok")
                await writer.drain()
            except (ssl.SSLError, ConnectionError) as err:
                error.append(str(err))
            finally:
                writer.close()
                done.set()

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=""
            )
            server_der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            await reader.read()
            writer.close()
            await asyncio.wait_for(done.wait(), 5)
        except (ssl.SSLError, ConnectionError):
            await asyncio.wait_for(done.wait(), 5)
            server_der = None
        finally:
            server.close()
            await server.wait_closed()
        return (seen[0] if seen else None), server_der, (error[0] if error else "")

    return asyncio.run(asyncio.wait_for(scenario(), 20))


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    init_ca(tmp_path / "ca", TD)
    return CertificateAuthority.load(tmp_path / "ca")


def test_both_sides_learn_each_others_identity(tmp_path: Path, ca: CertificateAuthority) -> None:
    bundle = ca.trust_bundle_pem()
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, bundle, *_credential(tmp_path, ca, API, "api"))
    client_ctx = _context(ssl.PROTOCOL_TLS_CLIENT, bundle, *_credential(tmp_path, ca, WEB, "web"))
    client_der, server_der, error = _handshake(server_ctx, client_ctx)
    assert error == "" and client_der is not None and server_der is not None
    now = datetime.now(UTC)
    assert peer_identity_from_der(client_der, TD, now=now) == WEB
    assert peer_identity_from_der(server_der, TD, now=now) == API
    with pytest.raises(SvidError, match="expired"):  # the same certificate a day later (injected clock)
        peer_identity_from_der(client_der, TD, now=now + timedelta(hours=25))


def test_a_certificate_from_another_trust_domain_fails_the_handshake(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    init_ca(tmp_path / "other", "other.example")
    other = CertificateAuthority.load(tmp_path / "other")
    foreign = SpiffeId.for_workload("other.example", "default", "web")
    server_ctx = _context(
        ssl.PROTOCOL_TLS_SERVER, ca.trust_bundle_pem(), *_credential(tmp_path, ca, API, "api")
    )
    client_ctx = _context(
        ssl.PROTOCOL_TLS_CLIENT, ca.trust_bundle_pem(), *_credential(tmp_path, other, foreign, "foreign")
    )
    client_der, _, error = _handshake(server_ctx, client_ctx)
    assert client_der is None and "certificate verify failed" in error


def test_the_checker_refuses_what_the_handshake_lets_through(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    now = datetime.now(UTC)
    bundle = ca.trust_bundle_pem()
    server_ctx = _context(ssl.PROTOCOL_TLS_SERVER, bundle, *_credential(tmp_path, ca, API, "api"))
    cases = {
        "two URI SANs": dict(uris=[str(WEB), str(SpiffeId.for_workload(TD, "kube-system", "admin"))]),
        "cA=true": dict(uris=[str(WEB)], is_ca=True),
        "another trust domain's ID": dict(uris=["spiffe://evil.example/ns/default/sa/web"]),
    }
    whys = {
        "two URI SANs": "has 2",
        "cA=true": "cA=false",
        "another trust domain's ID": "not in the trust domain",
    }
    for name, kwargs in cases.items():
        cert, key = forged_leaf(
            ca, not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1), **kwargs
        )  # type: ignore[arg-type]
        (tmp_path / "forged.pem").write_bytes(pem(cert, ca.signing_cert))
        (tmp_path / "forged.key").write_bytes(key_pem(key))
        client_ctx = _context(
            ssl.PROTOCOL_TLS_CLIENT, bundle, tmp_path / "forged.pem", tmp_path / "forged.key"
        )
        client_der, _, error = _handshake(server_ctx, client_ctx)
        assert error == "" and client_der is not None, name  # OpenSSL accepted the chain ...
        with pytest.raises(SvidError, match=whys[name]):  # ... the SVID rules do not
            peer_identity_from_der(client_der, TD, now=now)
