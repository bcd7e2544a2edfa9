"""The tunnel driven by the identity package's CertManager: the first use of an identity takes its SVID
from the manager (TunnelClient), a renewal reaches the engine through TunnelEngine.follow, new streams
then ride a connection made with the new certificate while the old stream keeps flowing."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from nodeproxy.identity.caclient import SignedChain
from nodeproxy.identity.certmanager import CertManager
from nodeproxy.identity.spiffe import SpiffeId
from nodeproxy.proxy.tunnel import NoIdentity, TunnelClient
from tests.tunnel_harness import (
    CLIENT_ID,
    TRUST_DOMAIN,
    Pki,
    PodServer,
    captured_pair,
    next_conn_id,
    tunnels,
    wait_for,
)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Signer:
    """Signs CSRs in process with the test CA, on the test's clock."""

    def __init__(self, pki: Pki, clock: Clock) -> None:
        self.pki = pki
        self.clock = clock
        self.signed = 0

    async def sign(
        self, csr_pem: bytes, *, ttl: timedelta | None = None, pod_ip: str | None = None
    ) -> SignedChain:
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = SpiffeId.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
        issued = self.pki.ca.sign_csr(csr, spiffe_id, ttl=ttl or timedelta(hours=1), now=self.clock())
        self.signed += 1
        return SignedChain(issued.chain_pem, self.pki.bundle)


@pytest.fixture
def echo() -> Iterator[PodServer]:
    server = PodServer("echo")
    yield server
    server.close()


def test_certmanager_renewal_rotates_the_tunnel(tmp_path: Path, echo: PodServer) -> None:
    real_now = datetime.now(UTC)
    # The manager's clock starts 40 min in the past, so that moving it to the present is past the SVID's
    # half life (renewal) while both certificates are valid for OpenSSL, which uses the real time.
    clock = Clock(real_now - timedelta(minutes=40))
    pki = Pki(tmp_path / "ca", now=real_now - timedelta(days=1))
    signer = Signer(pki, clock)
    manager = CertManager(
        TRUST_DOMAIN,
        signer,
        trust_bundle_pem=pki.bundle,
        svid_ttl=timedelta(hours=1),
        clock=clock,
        rng=random.Random(7),
    )
    client_id = SpiffeId.parse(CLIENT_ID)
    manager.set_identities([client_id])
    asyncio.run(manager.refresh_due())
    first = manager.svid_for(client_id)
    with tunnels(tmp_path, pki=pki, client_credential=first) as t:
        t.client.follow(manager)
        client = TunnelClient(
            t.client,
            identity_of={"127.0.0.1": CLIENT_ID}.get,
            credential_for=lambda spiffe_id: manager.svid_for(SpiffeId.parse(spiffe_id)),
            peer_port=t.port,
        )
        with pytest.raises(NoIdentity):
            client.identity("10.9.9.9")

        def open_stream() -> socket.socket:
            app, captured = captured_pair()
            client.adopt(
                next_conn_id(), captured.detach(), "127.0.0.1", f"127.0.0.1:{echo.port}", "127.0.0.1"
            )
            app.settimeout(10)
            return app

        old = open_stream()
        old.sendall(b"before")
        assert old.recv(6) == b"before"
        clock.now = real_now
        asyncio.run(manager.refresh_due())
        renewed = manager.svid_for(client_id)
        assert renewed.not_after > first.not_after and signer.signed == 2
        new = open_stream()
        new.sendall(b"after")
        assert new.recv(5) == b"after"
        old.sendall(b"still")
        assert old.recv(5) == b"still"
        inbound = t.server_records.inbound()
        assert len(inbound) == 2 and inbound[0].tls_id != inbound[1].tls_id
        assert {r.peer_identity for r in inbound} == {CLIENT_ID}
        for app in (old, new):
            app.close()
        wait_for(lambda: t.client.live_streams == 0, what="streams to end")
        # The connection made with the replaced certificate closes once its last stream ended.
        wait_for(lambda: t.client.tls_connections == 1, timeout=5, what="old connection to close")
