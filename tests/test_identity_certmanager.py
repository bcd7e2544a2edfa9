"""The node's certificate manager: first SVIDs, rotation at half life with jitter, failure handling with
backoff while keeping the old SVID, expiry, trust-bundle changes without restart. An injected clock moves
through lifetimes instantly; the last tests use the real CA service over TLS on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodeproxy.identity.ca import DEFAULT_SVID_TTL, CertificateAuthority, init_ca, write_credential
from nodeproxy.identity.caclient import CaClient, CaClientError, SignedChain
from nodeproxy.identity.caserver import CaServer
from nodeproxy.identity.certmanager import CertEvent, CertManager, NoSvid, TrustBundleError
from nodeproxy.identity.config import IdentityConfig
from nodeproxy.identity.spiffe import SpiffeId, verify_svid_chain
from tests.identity_helpers import NOW, FakeClock, FixedRandom, key_pem

TD = "cluster.local"
WEB = SpiffeId.for_workload(TD, "default", "web")
API = SpiffeId.for_workload(TD, "default", "api")
T = TypeVar("T")


class LocalSigner:
    """Signs in process with a real CA, on the test's clock; can be made to fail like an unreachable CA."""

    def __init__(
        self, ca: CertificateAuthority, clock: FakeClock, node_ttl: timedelta = timedelta(days=30)
    ) -> None:
        self.ca = ca
        self.clock = clock
        self.node_ttl = node_ttl
        self.failing = False
        self.calls: list[datetime] = []
        self.tamper: Callable[[bytes], bytes] | None = None

    async def sign(
        self, csr_pem: bytes, *, ttl: timedelta | None = None, pod_ip: str | None = None
    ) -> SignedChain:
        self.calls.append(self.clock())
        if self.failing:
            raise CaClientError("no answer from the CA (test)")
        csr = x509.load_pem_x509_csr(csr_pem)
        uri = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = SpiffeId.parse(uri.get_values_for_type(x509.UniformResourceIdentifier)[0])
        default = self.node_ttl if spiffe_id.node_name else DEFAULT_SVID_TTL
        issued = self.ca.sign_csr(csr, spiffe_id, ttl=ttl or default, now=self.clock())
        chain = issued.chain_pem if self.tamper is None else self.tamper(issued.chain_pem)
        return SignedChain(chain, self.ca.trust_bundle_pem())


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(factory(), 60)

    return asyncio.run(bounded())


def new_ca(directory: Path, now: datetime = NOW) -> CertificateAuthority:
    init_ca(directory, TD, now=now - timedelta(days=1))
    return CertificateAuthority.load(directory)


def manager(
    ca: CertificateAuthority, clock: FakeClock, signer: LocalSigner, *, rng: float = 0.5, **kwargs: object
) -> tuple[CertManager, list[CertEvent]]:
    events: list[CertEvent] = []
    certs = CertManager(
        TD,
        signer,
        trust_bundle_pem=ca.trust_bundle_pem(),
        clock=clock,
        rng=FixedRandom(rng),
        **kwargs,  # type: ignore[arg-type]
    )
    certs.on_change(events.append)
    return certs, events


def serial(certs: CertManager, spiffe_id: SpiffeId = WEB) -> int:
    return certs.svid_for(spiffe_id).certificate.serial_number


def test_first_svid_then_rotation_exactly_at_half_life(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    signer = LocalSigner(ca, clock)
    certs, events = manager(ca, clock, signer)  # jitter 0: FixedRandom(0.5) is the middle of the range

    async def scenario() -> None:
        certs.set_identities([WEB, API])
        with pytest.raises(NoSvid, match="no valid SVID"):
            certs.svid_for(WEB)
        next_due = await certs.refresh_due()
        first = certs.svid_for(WEB)
        assert [e.kind for e in events] == ["svid", "svid"] and len(signer.calls) == 2
        # Half of the lifetime from issuance: notBefore is backdated a minute, which does not count.
        half_life = first.issued_at + (first.not_after - first.issued_at) / 2
        assert next_due == half_life == NOW + timedelta(hours=12) and first.issued_at == NOW
        assert verify_svid_chain(first.certificate, first.chain[1:], ca.roots, TD, now=NOW) == WEB
        clock.now = half_life - timedelta(seconds=1)
        await certs.refresh_due()
        assert len(signer.calls) == 2 and certs.svid_for(WEB) is first  # not yet
        clock.now = half_life
        await certs.refresh_due()
        second = certs.svid_for(WEB)
        assert len(signer.calls) == 4 and second.certificate.serial_number != first.certificate.serial_number
        assert second.key_pem != first.key_pem  # a new key on every renewal
        assert second.not_after == half_life + timedelta(hours=24)
        assert [e.kind for e in events] == ["svid"] * 4 and events[-1].svid in (second, certs.svid_for(API))

    run(scenario)


@pytest.mark.parametrize(("rng", "fraction"), [(0.0, 0.45), (0.999999, 0.55)])
def test_renewal_jitter_stays_within_its_band(tmp_path: Path, rng: float, fraction: float) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    certs, _ = manager(ca, clock, LocalSigner(ca, clock), rng=rng)

    async def scenario() -> None:
        certs.set_identities([WEB])
        due = await certs.refresh_due()
        svid = certs.svid_for(WEB)
        expected = svid.issued_at + (svid.not_after - svid.issued_at) * fraction
        assert due is not None and abs(due - expected) < timedelta(seconds=1)

    run(scenario)


def test_renewal_failure_keeps_the_old_svid_and_backs_off_until_expiry(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    signer = LocalSigner(ca, clock)
    certs, events = manager(ca, clock, signer, retry_initial=1.0, retry_max=60.0)

    async def scenario() -> None:
        certs.set_identities([WEB])
        due = await certs.refresh_due()
        old = certs.svid_for(WEB)
        assert due is not None
        signer.failing = True
        clock.now = due
        retry_delays = []
        for _ in range(9):
            before = len(signer.calls)
            next_due = await certs.refresh_due()
            assert len(signer.calls) == before + 1  # one attempt per due time, no hammering
            assert certs.svid_for(WEB) is old  # the old SVID is still served
            assert next_due is not None
            retry_delays.append((next_due - clock.now).total_seconds())
            clock.now = next_due - timedelta(milliseconds=1)
            await certs.refresh_due()
            assert len(signer.calls) == before + 1  # nothing before the backoff is over
            clock.now = next_due
        # Exponential from 1 s, each delay randomized to 0.5-1.0 of it (here 0.75), capped at 60 s.
        assert retry_delays == [0.75, 1.5, 3.0, 6.0, 12.0, 24.0, 45.0, 45.0, 45.0]
        # Close to expiry the retry is moved to just before it, not past it.
        clock.now = old.not_after - timedelta(seconds=10)
        next_due = await certs.refresh_due()
        assert next_due == old.not_after - timedelta(seconds=1)
        assert certs.svid_for(WEB) is old
        clock.now = old.not_after + timedelta(seconds=1)
        await certs.refresh_due()
        with pytest.raises(NoSvid, match="no answer from the CA"):
            certs.svid_for(WEB)
        assert [e.kind for e in events] == ["svid", "expired"]
        signer.failing = False
        clock.now += timedelta(minutes=1)
        await certs.refresh_due()
        assert certs.svid_for(WEB).not_before > old.not_after - timedelta(minutes=2)
        assert [e.kind for e in events] == ["svid", "expired", "svid"]

    run(scenario)


def test_a_wrong_answer_from_the_ca_is_not_used(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    rogue = new_ca(tmp_path / "rogue")
    signer = LocalSigner(ca, clock)
    certs, events = manager(ca, clock, signer)

    def other_key(chain: bytes) -> bytes:  # a valid SVID of WEB, but for a key we do not hold
        issued, _ = ca.issue_credential(WEB, ttl=timedelta(hours=24), now=clock())
        return issued.chain_pem

    def other_identity(chain: bytes) -> bytes:
        csr_key = x509.load_pem_x509_certificates(chain)[0].public_key()
        return ca.issue(API, csr_key, now=clock()).chain_pem  # type: ignore[arg-type]

    def other_ca(chain: bytes) -> bytes:
        csr_key = x509.load_pem_x509_certificates(chain)[0].public_key()
        return rogue.issue(WEB, csr_key, now=clock()).chain_pem  # type: ignore[arg-type]

    async def scenario() -> None:
        certs.set_identities([WEB])
        for tamper, why in [
            (other_key, "not for the key we sent"),
            (other_identity, "for spiffe://cluster.local/ns/default/sa/api"),
            (other_ca, "not signed by|does not lead to a root"),
        ]:
            signer.tamper = tamper
            clock.advance(timedelta(minutes=5))
            await certs.refresh_due()
            with pytest.raises(NoSvid, match=why):
                certs.svid_for(WEB)
        assert events == []

    run(scenario)


def test_trust_bundle_file_changes_apply_without_restart(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    signer = LocalSigner(ca, clock)
    events: list[CertEvent] = []
    certs = CertManager(TD, signer, trust_bundle_file=bundle, clock=clock, rng=FixedRandom(0.5))
    certs.on_change(events.append)
    broken_subscriber_calls = []

    def broken_subscriber(event: CertEvent) -> None:
        broken_subscriber_calls.append(event)
        raise RuntimeError("a subscriber's bug")

    certs.on_change(broken_subscriber)

    async def scenario() -> None:
        certs.set_identities([WEB])
        await certs.refresh_due()
        old = certs.svid_for(WEB)
        # A broken file (half written, or garbage) must not take the trust away.
        bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n")
        await certs.refresh_due()
        assert certs.trust_bundle_pem() == ca.trust_bundle_pem()
        # A leaf is not a CA: refused as a bundle.
        bundle.write_bytes(
            old.cert_chain_pem.split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n"
        )
        await certs.refresh_due()
        assert certs.trust_bundle_pem() == ca.trust_bundle_pem()
        # The CA is replaced: the new bundle carries both roots during the change, then only the new one.
        new = new_ca(tmp_path / "new")
        both = ca.trust_bundle_pem() + new.trust_bundle_pem()
        bundle.write_bytes(both)
        await certs.refresh_due()
        assert certs.trust_bundle_pem() == both and [e.kind for e in events] == ["svid", "bundle"]
        assert certs.svid_for(WEB) is old  # still chains to a trusted root: kept
        signer.ca = new
        bundle.write_bytes(new.trust_bundle_pem())
        await certs.refresh_due()
        # The old SVID no longer chains to the bundle: replaced at once, from the new CA.
        renewed = certs.svid_for(WEB)
        assert renewed is not old
        assert verify_svid_chain(renewed.certificate, renewed.chain[1:], new.roots, TD, now=clock()) == WEB
        assert [e.kind for e in events] == ["svid", "bundle", "bundle", "svid"]
        assert len(broken_subscriber_calls) == len(events)  # the failing subscriber did not stop the others

    run(scenario)


def test_set_trust_bundle_refuses_garbage() -> None:
    with pytest.raises(TrustBundleError):
        CertManager(TD, LocalSigner.__new__(LocalSigner), trust_bundle_pem=b"not pem")


def test_removed_identities_and_ensure(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    signer = LocalSigner(ca, clock)
    certs, events = manager(ca, clock, signer)

    async def scenario() -> None:
        with pytest.raises(NoSvid, match="not an identity of this node"):
            await certs.ensure(WEB)
        certs.set_identities([WEB])
        svid = await certs.ensure(WEB)  # obtained on demand, without waiting for the loop
        assert await certs.ensure(WEB) is svid and len(signer.calls) == 1
        certs.set_identities([API])
        with pytest.raises(NoSvid, match="not an identity of this node"):
            certs.svid_for(WEB)
        assert [e.kind for e in events] == ["svid", "removed"]
        signer.failing = True
        with pytest.raises(NoSvid, match="no answer"):
            await certs.ensure(API)
        with pytest.raises(NoSvid):  # in backoff: refused at once, the CA is not called again
            await certs.ensure(API)
        assert len(signer.calls) == 2
        with pytest.raises(ValueError, match="trust domain"):
            certs.set_identities([SpiffeId.for_workload("other.td", "a", "b")])

    run(scenario)


# --------------------------------------------------------------------------------------------
# Against the real CA service


def _node_setup(tmp_path: Path, now: datetime) -> tuple[CertificateAuthority, Path, Path]:
    ca = new_ca(tmp_path / "ca", now)
    issued, key = ca.issue_credential(SpiffeId.for_node(TD, "node-a"), ttl=timedelta(days=30), now=now)
    write_credential(tmp_path / "node.pem", tmp_path / "node.key", issued.chain_pem, key)
    return ca, tmp_path / "node.pem", tmp_path / "node.key"


def _inventory() -> IdentityConfig:
    return IdentityConfig.model_validate(
        {
            "trust_domain": TD,
            "workloads": [
                {"ip": "10.244.1.10", "namespace": "default", "service_account": "web", "node": "node-a"},
                {"ip": "10.244.2.10", "namespace": "default", "service_account": "api", "node": "node-b"},
            ],
        }
    )


def test_rotation_through_the_ca_service_with_an_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))  # TLS checks the node credential in real time
    ca, cert, key = _node_setup(tmp_path, clock())

    async def scenario() -> None:
        server = CaServer(ca, _inventory().workload_index(), clock=clock)
        host, port = await server.start("127.0.0.1", 0)
        try:
            client = CaClient(host, port, TD, cert=cert, key=key, trust_bundle=ca.trust_bundle_pem, timeout=5)
            certs = CertManager(
                TD, client, trust_bundle_pem=ca.trust_bundle_pem(), clock=clock, rng=FixedRandom(0.5)
            )
            certs.set_identities([WEB, API])  # API is node-b's: the CA refuses it to node-a
            due = await certs.refresh_due()
            first = certs.svid_for(WEB)
            with pytest.raises(NoSvid, match="403"):
                certs.svid_for(API)
            assert server.issued == 1 and due is not None
            clock.now = first.issued_at + (first.not_after - first.issued_at) / 2
            await certs.refresh_due()
            second = certs.svid_for(WEB)
            assert second.certificate.serial_number != first.certificate.serial_number
            assert second.not_before == clock.now - timedelta(minutes=1)
            assert server.issued == 2
        finally:
            await server.close()

    run(scenario)


def test_run_loop_obtains_svids_for_new_identities_promptly(tmp_path: Path) -> None:
    ca, cert, key = _node_setup(tmp_path, datetime.now(UTC))

    async def scenario() -> None:
        server = CaServer(ca, _inventory().workload_index())
        host, port = await server.start("127.0.0.1", 0)
        loop_task: asyncio.Task[None] | None = None
        try:
            client = CaClient(host, port, TD, cert=cert, key=key, trust_bundle=ca.trust_bundle_pem, timeout=5)
            certs = CertManager(TD, client, trust_bundle_pem=ca.trust_bundle_pem())
            ready = asyncio.Event()
            certs.on_change(lambda event: ready.set() if event.kind == "svid" else None)
            loop_task = asyncio.create_task(certs.run())
            await asyncio.sleep(0.05)
            certs.set_identities([WEB])  # wakes the sleeping loop
            await asyncio.wait_for(ready.wait(), 5)
            chain = certs.svid_for(WEB).cert_chain_pem
            assert x509.load_pem_x509_certificates(chain)[0].public_bytes(serialization.Encoding.PEM) in chain
        finally:
            if loop_task is not None:
                loop_task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await loop_task
            await server.close()

    run(scenario)


# --------------------------------------------------------------------------------------------
# The node credential


def test_node_credential_is_renewed_at_half_life_and_rewritten(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    node_id = SpiffeId.for_node(TD, "node-a")
    issued, key = ca.issue_credential(node_id, ttl=timedelta(days=30), now=NOW)
    cert_path, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    write_credential(cert_path, key_path, issued.chain_pem, key)
    signer = LocalSigner(ca, clock)
    events: list[CertEvent] = []
    certs = CertManager(
        TD,
        signer,
        trust_bundle_pem=ca.trust_bundle_pem(),
        node_credential=(cert_path, key_path),
        clock=clock,
        rng=FixedRandom(0.5),
    )
    certs.on_change(events.append)
    # Read from a file, its lifetime starts at notBefore + the CA's backdating (issued at NOW).
    half_life = NOW + timedelta(days=15)

    async def scenario() -> None:
        assert await certs.refresh_due() == half_life and signer.calls == []
        clock.now = half_life
        signer.failing = True
        await certs.refresh_due()
        assert cert_path.read_bytes() == issued.chain_pem  # a failed renewal leaves the files alone
        signer.failing = False
        clock.advance(timedelta(seconds=1))
        await certs.refresh_due()
        renewed = x509.load_pem_x509_certificates(cert_path.read_bytes())
        assert renewed[0].serial_number != issued.certificate.serial_number
        assert verify_svid_chain(renewed[0], renewed[1:], ca.roots, TD, now=clock()) == node_id
        assert renewed[0].not_valid_after_utc == clock() + timedelta(days=30)
        assert key_path.stat().st_mode & 0o777 == 0o600 and key_path.read_bytes() != key_pem(key)
        assert [e.kind for e in events] == ["node_credential"]
        # The files written are what the next request authenticates with: a key that fits the certificate.
        from nodeproxy.identity.caclient import client_tls_context

        client_tls_context(cert_path, key_path, ca.trust_bundle_pem())
        # An operator installs a credential of their own: it is read, and its renewal time follows it.
        manual, manual_key = ca.issue_credential(node_id, ttl=timedelta(days=2), now=clock())
        write_credential(cert_path, key_path, manual.chain_pem, manual_key)
        next_due = await certs.refresh_due()
        assert next_due == clock() + timedelta(days=1)  # issued (and read) now, for 2 days
        # A broken file is not taken over: the loaded credential stays and the error is reported.
        key_path.write_bytes(b"garbage")
        assert await certs.refresh_due() == next_due

    run(scenario)


def test_a_node_credential_file_that_is_not_a_node_credential_is_refused(tmp_path: Path) -> None:
    ca = new_ca(tmp_path / "ca")
    issued, key = ca.issue_credential(WEB, ttl=timedelta(days=1), now=NOW)
    write_credential(tmp_path / "n.pem", tmp_path / "n.key", issued.chain_pem, key)
    with pytest.raises(ValueError, match="not a node credential"):
        CertManager(
            TD,
            LocalSigner(ca, FakeClock(NOW)),
            trust_bundle_pem=ca.trust_bundle_pem(),
            node_credential=(tmp_path / "n.pem", tmp_path / "n.key"),
        )


def test_node_credential_renewal_through_the_ca_service(tmp_path: Path) -> None:
    # A 100 s node credential renewed at half life, 50 s after issuance (its notBefore, backdated 60 s,
    # does not count): the clock moves 50 s, and the new credential, backdated 60 s, is also valid for the
    # real-time TLS check that follows.
    clock = FakeClock(datetime.now(UTC).replace(microsecond=0))
    ca = new_ca(tmp_path / "ca", clock())
    node_id = SpiffeId.for_node(TD, "node-a")
    issued, key = ca.issue_credential(node_id, ttl=timedelta(seconds=100), now=clock())
    cert, key_path = tmp_path / "node.pem", tmp_path / "node.key"
    write_credential(cert, key_path, issued.chain_pem, key)

    async def scenario() -> None:
        server = CaServer(
            ca, _inventory().workload_index(), node_credential_ttl=timedelta(seconds=100), clock=clock
        )
        host, port = await server.start("127.0.0.1", 0)
        try:
            client = CaClient(
                host, port, TD, cert=cert, key=key_path, trust_bundle=ca.trust_bundle_pem, timeout=5
            )
            certs = CertManager(
                TD,
                client,
                trust_bundle_pem=ca.trust_bundle_pem(),
                node_credential=(cert, key_path),
                clock=clock,
                rng=FixedRandom(0.5),
            )
            certs.set_identities([WEB])
            await certs.refresh_due()
            assert server.issued == 1
            clock.advance(timedelta(seconds=50))
            await certs.refresh_due()
            new_leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
            assert new_leaf.serial_number != issued.certificate.serial_number and server.issued == 2
            assert new_leaf.not_valid_after_utc - new_leaf.not_valid_before_utc == timedelta(seconds=160)
            # The next request authenticates with the renewed credential.
            certs.set_identities([])
            certs.set_identities([WEB])
            await certs.refresh_due()
            assert server.issued == 3 and certs.svid_for(WEB)
        finally:
            await server.close()

    run(scenario)


def test_run_survives_an_unexpected_error_and_keeps_renewing(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    ca = new_ca(tmp_path / "ca")
    certs, events = manager(ca, clock, LocalSigner(ca, clock))
    original = certs._check_bundle_file
    raised: list[bool] = []

    def broken_once() -> None:
        if not raised:
            raised.append(True)
            raise RuntimeError("a bug")
        original()

    certs._check_bundle_file = broken_once  # type: ignore[method-assign]

    async def scenario() -> None:
        certs.set_identities([WEB])
        loop_task = asyncio.create_task(certs.run())
        try:
            for _ in range(200):  # up to 10 s; the retry after the error comes after retry_initial (1 s)
                if events:
                    break
                await asyncio.sleep(0.05)
        finally:
            loop_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop_task
        assert raised and [e.kind for e in events] == ["svid"]

    run(scenario)
