"""When certificates are renewed and where their keys are made.

Renewal: at ``renew_fraction`` (± jitter) of the lifetime *from issuance* to notAfter. The CA backdates
notBefore (BACKDATE, 1 min) so that peers whose clocks lag accept a fresh SVID; that minute is no part of
the lifetime asked for, so measuring from notBefore renewed a 1 h SVID 30 s early and a 1 min SVID as soon
as it arrived. Keys: generated, and CSRs signed, on the manager's threads, never on the event loop (the
proxy's request path), so the loop keeps running while an RSA key is made.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import nodeproxy.identity.certmanager as certmanager_module
from nodeproxy.identity.ca import (
    CertificateAuthority,
    KeyType,
    PrivateKey,
    generate_private_key,
    make_csr,
    write_credential,
)
from nodeproxy.identity.caclient import SignedChain
from nodeproxy.identity.caserver import SERVER_CERT_TTL, CaServer
from nodeproxy.identity.certmanager import CertManager
from nodeproxy.identity.config import IdentityConfig
from nodeproxy.identity.lifetimes import BACKDATE, MIN_SVID_TTL, issuance_time, renewal_point
from nodeproxy.identity.spiffe import SpiffeId
from tests.identity_helpers import NOW, FakeClock, FixedRandom, make_ca

TD = "cluster.local"
WEB = SpiffeId.for_workload(TD, "default", "web")
NODE = SpiffeId.for_node(TD, "node-a")
T = TypeVar("T")


class LocalSigner:
    """Signs in process with a real CA on the test's clock. ``extra_backdate``: a CA that backdates
    notBefore by that much more than ours (the lifetime asked for still ends ttl after issuance)."""

    def __init__(
        self, ca: CertificateAuthority, clock: FakeClock, extra_backdate: timedelta = timedelta(0)
    ) -> None:
        self.ca = ca
        self.clock = clock
        self.extra_backdate = extra_backdate
        self.calls = 0

    async def sign(
        self, csr_pem: bytes, *, ttl: timedelta | None = None, pod_ip: str | None = None
    ) -> SignedChain:
        self.calls += 1
        csr = x509.load_pem_x509_csr(csr_pem)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = SpiffeId.parse(san.get_values_for_type(x509.UniformResourceIdentifier)[0])
        lifetime = ttl or timedelta(days=30)  # None: a node credential, whose lifetime the CA decides
        issued = self.ca.sign_csr(
            csr, spiffe_id, ttl=lifetime + self.extra_backdate, now=self.clock() - self.extra_backdate
        )
        return SignedChain(issued.chain_pem, self.ca.trust_bundle_pem())


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), 60)

    return asyncio.run(bounded())


def manager(ca: CertificateAuthority, clock: FakeClock, signer: LocalSigner, **kwargs: object) -> CertManager:
    settings: dict[str, object] = {"rng": FixedRandom(0.5), **kwargs}
    return CertManager(TD, signer, trust_bundle_pem=ca.trust_bundle_pem(), clock=clock, **settings)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# When: half of the lifetime from issuance


@pytest.mark.parametrize("ttl", [MIN_SVID_TTL, timedelta(hours=1), timedelta(hours=24)])
def test_an_svid_is_renewed_half_its_ttl_after_it_was_issued(tmp_path: Path, ttl: timedelta) -> None:
    clock = FakeClock(NOW)
    ca = make_ca(tmp_path / "ca")
    signer = LocalSigner(ca, clock)
    certs = manager(ca, clock, signer, svid_ttl=ttl)

    async def scenario() -> None:
        certs.set_identities([WEB])
        due = await certs.refresh_due()
        first = certs.svid_for(WEB)
        # The CA backdated notBefore; the lifetime the operator configured starts now.
        assert first.not_before == NOW - BACKDATE and first.not_after == NOW + ttl
        assert due == NOW + ttl / 2
        assert first.issued_at == NOW
        clock.now = NOW + ttl / 2 - timedelta(seconds=1)
        await certs.refresh_due()
        assert signer.calls == 1 and certs.svid_for(WEB) is first  # not yet
        clock.now = NOW + ttl / 2
        next_due = await certs.refresh_due()
        second = certs.svid_for(WEB)
        assert signer.calls == 2 and second.certificate.serial_number != first.certificate.serial_number
        assert second.issued_at == clock.now and next_due == clock.now + ttl / 2

    run(scenario)


@pytest.mark.parametrize(("rng", "fraction"), [(0.0, 0.45), (0.999999, 0.55)])
def test_the_jitter_band_is_a_fraction_of_the_lifetime_from_issuance(
    tmp_path: Path, rng: float, fraction: float
) -> None:
    clock = FakeClock(NOW)
    ca = make_ca(tmp_path / "ca")
    certs = manager(ca, clock, LocalSigner(ca, clock), svid_ttl=timedelta(hours=1), rng=FixedRandom(rng))

    async def scenario() -> None:
        certs.set_identities([WEB])
        due = await certs.refresh_due()
        assert due is not None and abs(due - (NOW + timedelta(hours=1) * fraction)) < timedelta(seconds=1)

    run(scenario)


def test_a_ca_that_backdates_more_does_not_move_the_renewal(tmp_path: Path) -> None:
    # A 1 h SVID from a CA that backdates notBefore by 5 min: still renewed 30 min after it arrived.
    clock = FakeClock(NOW)
    ca = make_ca(tmp_path / "ca")
    signer = LocalSigner(ca, clock, extra_backdate=timedelta(minutes=4))
    certs = manager(ca, clock, signer, svid_ttl=timedelta(hours=1))

    async def scenario() -> None:
        certs.set_identities([WEB])
        due = await certs.refresh_due()
        svid = certs.svid_for(WEB)
        assert svid.not_before == NOW - timedelta(minutes=5) and svid.not_after == NOW + timedelta(hours=1)
        assert due == NOW + timedelta(minutes=30)

    run(scenario)


def test_a_node_credential_read_from_a_file_is_renewed_half_its_lifetime_after_issuance(
    tmp_path: Path,
) -> None:
    # Read three days after it was issued (a restart): its issuance is notBefore + BACKDATE.
    clock = FakeClock(NOW + timedelta(days=3))
    ca = make_ca(tmp_path / "ca")
    issued, key = ca.issue_credential(NODE, ttl=timedelta(days=30), now=NOW)
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    write_credential(cert_path, key_path, issued.chain_pem, key)
    signer = LocalSigner(ca, clock)
    certs = manager(ca, clock, signer, node_credential=(cert_path, key_path))

    async def scenario() -> None:
        assert await certs.refresh_due() == NOW + timedelta(days=15)
        clock.now = NOW + timedelta(days=15)
        assert await certs.refresh_due() == clock.now + timedelta(days=15)  # renewed, from its arrival
        renewed = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        assert renewed.serial_number != issued.certificate.serial_number and signer.calls == 1

    run(scenario)


def test_issuance_and_renewal_point_edges() -> None:
    # A certificate read at once (its CA backdated less than ours) was issued no later than it was read.
    assert issuance_time(NOW, seen_at=NOW + timedelta(seconds=10)) == NOW + timedelta(seconds=10)
    assert issuance_time(NOW, seen_at=NOW + timedelta(days=1)) == NOW + BACKDATE
    assert issuance_time(NOW, seen_at=NOW - timedelta(days=1)) == NOW  # never before notBefore
    assert renewal_point(NOW, NOW + timedelta(hours=2), 0.25) == NOW + timedelta(minutes=30)
    assert renewal_point(NOW, NOW - timedelta(hours=2), 0.5) == NOW  # already expired: due at once
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            renewal_point(NOW, NOW + timedelta(hours=1), fraction)


def test_a_jitter_that_could_renew_before_issuance_is_refused(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = make_ca(tmp_path / "ca")
    with pytest.raises(ValueError, match="renew_fraction"):
        manager(ca, clock, LocalSigner(ca, clock), renew_fraction=0.1, renew_jitter=0.4)
    with pytest.raises(ValueError, match="renew_fraction - renew_jitter/2 must stay above 0"):
        IdentityConfig.model_validate({"trust_domain": TD, "renew_fraction": 0.1, "renew_jitter": 0.4})


def test_the_ca_service_renews_its_server_certificate_half_its_lifetime_after_issuance(
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path / "ca")
    # A clock ahead of the loop's is fine: the delay counts from issuance on that same clock.
    inventory = IdentityConfig.model_validate({"trust_domain": TD}).workload_index()

    async def scenario() -> None:
        server = CaServer(ca, inventory, clock=lambda: NOW)
        await server.start("127.0.0.1", 0)
        try:
            handle = server._renew_handle
            assert handle is not None
            delay = handle.when() - asyncio.get_running_loop().time()
            assert abs(delay - (SERVER_CERT_TTL / 2).total_seconds()) < 5.0
        finally:
            await server.close()

    run(scenario)


# --------------------------------------------------------------------------------------------
# Where: off the event loop


def test_keys_csrs_and_credential_files_are_made_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several identities with RSA keys and the node credential renewed at once: every key generation,
    CSR signature and credential write runs on another thread, and the loop keeps running meanwhile.
    Each key generation waits (bounded) until the loop has ticked: on the loop it would wait in vain."""
    clock = FakeClock(NOW)
    ca = make_ca(tmp_path / "ca", now=NOW - timedelta(days=20))
    issued, key = ca.issue_credential(NODE, ttl=timedelta(days=30), now=NOW - timedelta(days=20))
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    write_credential(cert_path, key_path, issued.chain_pem, key)
    identities = [SpiffeId.for_workload(TD, "default", f"sa{i}") for i in range(4)]
    certs = manager(
        ca, clock, LocalSigner(ca, clock), key_type="rsa-2048", node_credential=(cert_path, key_path)
    )
    loop_ticked = threading.Event()
    threads: dict[str, list[tuple[int, bool]]] = {"key": [], "csr": [], "write": []}

    def generate(key_type: KeyType = "ecdsa-p256") -> PrivateKey:
        # Generous for a loaded machine; once one wait ran out (the loop is blocked), the rest do not wait.
        waited_in_vain = any(not ticked for _, ticked in threads["key"])
        ticked = loop_ticked.wait(timeout=0.0 if waited_in_vain else 5.0)
        threads["key"].append((threading.get_ident(), ticked))
        return generate_private_key(key_type)

    def csr(key: PrivateKey, spiffe_id: SpiffeId) -> x509.CertificateSigningRequest:
        threads["csr"].append((threading.get_ident(), True))
        return make_csr(key, spiffe_id)

    def write(cert: Path, key_file: Path, chain_pem: bytes, key: PrivateKey) -> None:
        threads["write"].append((threading.get_ident(), True))
        write_credential(cert, key_file, chain_pem, key)

    monkeypatch.setattr(certmanager_module, "generate_private_key", generate)
    monkeypatch.setattr(certmanager_module, "make_csr", csr)
    monkeypatch.setattr(certmanager_module, "write_credential", write)

    async def ticker() -> None:
        for _ in range(5):
            await asyncio.sleep(0.01)
        loop_ticked.set()

    async def scenario() -> int:
        ticks = asyncio.create_task(ticker())
        try:
            certs.set_identities(identities)
            await certs.refresh_due()
        finally:
            ticks.cancel()
        return threading.get_ident()

    loop_thread = run(scenario)
    assert len(threads["key"]) == len(identities) + 1 and len(threads["csr"]) == len(identities) + 1
    assert len(threads["write"]) == 1  # the node credential, half its life past
    for what, calls in threads.items():
        assert all(thread != loop_thread for thread, _ in calls), f"{what} ran on the event loop"
    assert all(ticked for _, ticked in threads["key"]), "the loop stood still while a key was generated"
    for spiffe_id in identities:
        svid = certs.svid_for(spiffe_id)
        assert isinstance(load_pem_private_key(svid.key_pem, None), rsa.RSAPrivateKey)
        assert isinstance(svid.certificate.public_key(), rsa.RSAPublicKey)
