"""Per-identity X.509-SVIDs on a node proxy: obtained from the CA, renewed before they expire.

For every identity it manages (the workloads the config places on this node), the manager holds the
current SVID and renews it when ``renew_fraction`` (0.5) of its lifetime has passed, moved by a random
jitter of up to ± ``renew_jitter``/2 of the lifetime so that nodes started together do not renew together.
The lifetime runs from issuance to notAfter (:attr:`Svid.issued_at`), not from notBefore, which the CA
backdates for peers' clock skew: a 1 h SVID is renewed 30 min after it arrived, not 30 s earlier.
Every renewal uses a new key, generated (and the CSR signed) on a small thread pool of the manager's
own, never on the event loop, which is the proxy's request path: an RSA key takes tens of milliseconds.
A failed renewal keeps the current SVID (it is still valid) and is retried after ``retry_initial``
doubling up to ``retry_max`` (each delay randomized between half and all of it), never later than the
SVID's expiry; an SVID that expires without a replacement is dropped and ``svid_for`` raises
:class:`NoSvid` for it until a renewal succeeds.

What the CA returns is checked before it is used: the leaf must carry our new public key, be an
X.509-SVID of the requested identity, and chain to the trust bundle.

With ``node_credential`` files, the node's own credential (what it authenticates to the CA with) is
renewed the same way through the CA and written back atomically; files an operator replaces are re-read.

The trust bundle comes from one file (the CA's ``bundle.pem``, distributed to the nodes), re-read when it
changes, or from :meth:`CertManager.set_trust_bundle` (an admin push). Subscribers registered with
:meth:`CertManager.on_change` are told of every new SVID, expiry, removal and bundle change, so the TLS
side reloads without a restart. SVIDs that no longer chain to a new bundle are renewed at once.

Time comes from an injected clock (aware UTC datetimes) so tests can move through a lifetime instantly;
:meth:`CertManager.refresh_due` does the work due at the clock's current time, :meth:`CertManager.run`
calls it in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, Protocol

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodeproxy.identity.ca import (
    DEFAULT_SVID_TTL,
    CaError,
    KeyType,
    PrivateKey,
    generate_private_key,
    load_certificates,
    load_private_key,
    make_csr,
    private_key_pem,
    write_credential,
)
from nodeproxy.identity.caclient import CaClient, SignedChain
from nodeproxy.identity.config import IdentityConfig
from nodeproxy.identity.lifetimes import issuance_time, renewal_point
from nodeproxy.identity.spiffe import (
    SpiffeId,
    SvidError,
    check_signing_certificate,
    check_x509_svid,
    verify_svid_chain,
)

__all__ = [
    "CertEvent",
    "CertManager",
    "Clock",
    "NoSvid",
    "Svid",
    "SvidSigner",
    "TrustBundleError",
    "parse_trust_bundle",
]

log = structlog.get_logger("nodeproxy.identity.certmanager")

Clock = Callable[[], datetime]

# Identities renewed at the same time: a node with hundreds of workloads still sends a few at a time.
MAX_CONCURRENT_RENEWALS = 8
# The longest sleep of run() between looks at the clock, so a clock that jumps (suspend, NTP step) is
# noticed within this time.
MAX_SLEEP = 5.0
# Threads of a manager's pool for key generation, CSR signing and the node credential's (fsynced) file
# writes, kept off the event loop. cryptography releases the GIL while it generates a key, so the loop
# runs on meanwhile; two threads keep a burst of renewals from taking every core of the node.
CRYPTO_THREADS = 2


def _utc_now() -> datetime:
    return datetime.now(UTC)


class NoSvid(LookupError):
    """No valid SVID for an identity (not managed, not yet obtained, or expired without renewal)."""


class TrustBundleError(ValueError):
    """A trust bundle that cannot be used (not PEM, empty, or not CA certificates)."""


class SvidSigner(Protocol):
    """What signs our CSRs: :class:`nodeproxy.identity.caclient.CaClient` (or an in-process CA in tests)."""

    async def sign(
        self, csr_pem: bytes, *, ttl: timedelta | None = None, pod_ip: str | None = None
    ) -> SignedChain: ...


@dataclass(frozen=True, slots=True)
class Svid:
    """An X.509-SVID and its key, ready for a TLS library."""

    spiffe_id: SpiffeId
    cert_chain_pem: bytes  # leaf first, then intermediates; the root is in the trust bundle
    key_pem: bytes  # PKCS#8
    not_before: datetime  # backdated by the CA for peers' clock skew: not the start of the lifetime
    not_after: datetime
    certificate: x509.Certificate = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    # Where the lifetime that renewal is measured over starts: when the SVID arrived from the CA (it was
    # issued then), or, for a credential read from a file, notBefore + the CA's BACKDATE.
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class CertEvent:
    """A change subscribers hear about. ``spiffe_id`` is None for a bundle change; ``node_credential``:
    the node's own credential was renewed (and its files rewritten)."""

    kind: Literal["svid", "expired", "removed", "bundle", "node_credential"]
    spiffe_id: SpiffeId | None
    svid: Svid | None = None


def parse_trust_bundle(pem: bytes, trust_domain: str) -> tuple[x509.Certificate, ...]:
    """The CA certificates in ``pem``; :class:`TrustBundleError` unless every one may sign SVIDs."""
    try:
        roots = load_certificates(pem)
    except CaError as err:
        raise TrustBundleError(f"the trust bundle is unusable: {err}") from None
    for root in roots:
        try:
            check_signing_certificate(root, trust_domain)
        except SvidError as err:
            raise TrustBundleError(f"the trust bundle holds a certificate that is not a CA: {err}") from None
    return tuple(roots)


@dataclass
class _Entry:
    spiffe_id: SpiffeId
    svid: Svid | None = None
    due: datetime | None = None  # next renewal attempt; None: as soon as possible
    failures: int = 0
    last_error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Only for the node credential: its (cert, key) files, renewed in place, and their last stamp.
    files: tuple[Path, Path] | None = None
    stamp: _FileStamp | None = None


@dataclass(frozen=True, slots=True)
class _NewKey:
    """A fresh key and the CSR signed with it, made off the event loop."""

    key: PrivateKey
    key_pem: bytes  # PKCS#8
    csr_pem: bytes


def _new_key(key_type: KeyType, spiffe_id: SpiffeId) -> _NewKey:
    """Runs on the manager's crypto threads (CPU-bound: never on the event loop)."""
    key = generate_private_key(key_type)
    csr_pem = make_csr(key, spiffe_id).public_bytes(serialization.Encoding.PEM)
    return _NewKey(key, private_key_pem(key), csr_pem)


@dataclass(frozen=True)
class _FileStamp:
    device: int
    inode: int
    size: int
    mtime_ns: int


class CertManager:
    """Holds and renews the SVIDs of this node's workloads; see the module docstring."""

    def __init__(
        self,
        trust_domain: str,
        signer: SvidSigner,
        *,
        trust_bundle_pem: bytes | None = None,
        trust_bundle_file: Path | None = None,
        node_credential: tuple[Path, Path] | None = None,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        key_type: KeyType = "ecdsa-p256",
        renew_fraction: float = 0.5,
        renew_jitter: float = 0.1,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        watch_interval: float = 5.0,
        clock: Clock = _utc_now,
        rng: random.Random | None = None,
    ) -> None:
        """The bundle comes from ``trust_bundle_pem`` or ``trust_bundle_file`` (read now, watched after).

        ``node_credential``: the (cert, key) files the signer authenticates with; given, the manager also
        renews them (at the same fraction of their lifetime) and rewrites them atomically. They are re-read
        when they change (an operator installing a new one). Unreadable now: ValueError."""
        if not 0.0 < renew_fraction < 1.0 or not 0.0 <= renew_jitter < 0.5:
            raise ValueError("renew_fraction must be in (0, 1) and renew_jitter in [0, 0.5)")
        if renew_fraction - renew_jitter / 2 <= 0.0 or renew_fraction + renew_jitter / 2 >= 1.0:
            raise ValueError("renew_fraction ± renew_jitter/2 must stay within (0, 1)")
        if not 0.0 < retry_initial <= retry_max:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.trust_domain = trust_domain
        self.signer = signer
        self.svid_ttl = svid_ttl
        self.key_type: KeyType = key_type
        self.renew_fraction = renew_fraction
        self.renew_jitter = renew_jitter
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.watch_interval = watch_interval
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._entries: dict[SpiffeId, _Entry] = {}
        self._subscribers: list[Callable[[CertEvent], None]] = []
        self._bundle_file = trust_bundle_file
        self._bundle_stamp: _FileStamp | None = None
        self._wake = asyncio.Event()
        self._renewals = asyncio.Semaphore(MAX_CONCURRENT_RENEWALS)
        self._crypto_pool: ThreadPoolExecutor | None = None  # made on first use (see _crypto_threads)
        self._crypto_pool_pid = 0
        if trust_bundle_pem is not None:
            self._bundle_pem = trust_bundle_pem
            self._roots = parse_trust_bundle(trust_bundle_pem, trust_domain)
        elif trust_bundle_file is not None:
            self._bundle_stamp = _stamp(trust_bundle_file)
            try:
                self._bundle_pem = trust_bundle_file.read_bytes()
            except OSError as err:
                raise TrustBundleError(f"cannot read the trust bundle {trust_bundle_file}: {err}") from None
            self._roots = parse_trust_bundle(self._bundle_pem, trust_domain)
        else:
            raise ValueError("a trust bundle is needed (trust_bundle_pem or trust_bundle_file)")
        self._node: _Entry | None = None
        if node_credential is not None:
            self._node = _Entry(SpiffeId(trust_domain), files=node_credential)
            problem = self._check_node_credential_files()
            if problem is not None:
                raise ValueError(problem)

    @classmethod
    def from_config(
        cls,
        config: IdentityConfig,
        node_name: str,
        *,
        clock: Clock = _utc_now,
        renew_node_credential: bool = True,
    ) -> CertManager:
        """The manager of node ``node_name`` for ``config`` (which must have ``ca``), managing the
        identities of the workloads the config places on that node. Raises ValueError without ``ca``.
        ``renew_node_credential``: also renew the node credential files (one process of a node does;
        the CA client of every process reads them per request)."""
        if config.ca is None or config.node_credential is None or config.trust_bundle is None:
            raise ValueError("identity.ca, identity.node_credential and identity.trust_bundle are needed")
        bundle_file = config.trust_bundle
        manager: CertManager

        def current_bundle() -> bytes:
            return manager.trust_bundle_pem()

        client = CaClient(
            config.ca.host,
            config.ca.port,
            config.trust_domain,
            cert=config.node_credential.cert,
            key=config.node_credential.key,
            trust_bundle=current_bundle,
            timeout=config.ca.timeout,
        )
        manager = cls(
            config.trust_domain,
            client,
            trust_bundle_file=bundle_file,
            node_credential=(
                (config.node_credential.cert, config.node_credential.key) if renew_node_credential else None
            ),
            svid_ttl=config.svid_lifetime,
            key_type=config.key_type,
            renew_fraction=config.renew_fraction,
            renew_jitter=config.renew_jitter,
            retry_initial=config.retry_initial,
            retry_max=config.retry_max,
            watch_interval=config.watch_interval,
            clock=clock,
        )
        manager.set_identities(config.workload_index().identities_on(node_name))
        return manager

    def apply_config(self, config: IdentityConfig, node_name: str) -> None:
        """A config reload: manage the identities now placed on ``node_name``. The trust domain, CA and
        timings are fixed for the manager's life (a change there needs a new manager)."""
        if config.trust_domain != self.trust_domain:
            raise ValueError(f"the trust domain changed ({self.trust_domain!r} -> {config.trust_domain!r})")
        self.set_identities(config.workload_index().identities_on(node_name))

    # ---------------------------------------------------------------------------------------
    # What the TLS side uses

    def svid_for(self, spiffe_id: SpiffeId) -> Svid:
        """The current SVID of ``spiffe_id``; :class:`NoSvid` if there is none valid now."""
        entry = self._entries.get(spiffe_id)
        if entry is None:
            raise NoSvid(f"{spiffe_id} is not an identity of this node")
        svid = entry.svid
        if svid is None or self._clock() >= svid.not_after:
            why = f" (last error: {entry.last_error})" if entry.last_error else ""
            raise NoSvid(f"no valid SVID for {spiffe_id} yet{why}")
        return svid

    async def ensure(self, spiffe_id: SpiffeId) -> Svid:
        """The SVID of a managed identity, obtaining it now if there is none (once; a failure in backoff
        raises :class:`NoSvid` at once rather than calling the CA again)."""
        entry = self._entries.get(spiffe_id)
        if entry is None:
            raise NoSvid(f"{spiffe_id} is not an identity of this node")
        async with entry.lock:
            with contextlib.suppress(NoSvid):
                return self.svid_for(spiffe_id)
            if entry.due is None or entry.due <= self._clock():
                await self._renew(entry)
        return self.svid_for(spiffe_id)

    def trust_bundle_pem(self) -> bytes:
        return self._bundle_pem

    def trust_bundle(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    def on_change(self, callback: Callable[[CertEvent], None]) -> Callable[[], None]:
        """Call ``callback`` on every change (in the manager's event loop); returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    # ---------------------------------------------------------------------------------------
    # What is managed

    def set_identities(self, identities: Iterable[SpiffeId]) -> None:
        """Manage exactly ``identities`` (this node's workloads after a config change)."""
        wanted = set(identities)
        for spiffe_id in wanted:
            if spiffe_id.trust_domain != self.trust_domain:
                raise ValueError(f"{spiffe_id} is not in the trust domain {self.trust_domain!r}")
        for spiffe_id in list(self._entries):
            if spiffe_id not in wanted:
                del self._entries[spiffe_id]
                self._notify(CertEvent("removed", spiffe_id))
        for spiffe_id in wanted:
            self._entries.setdefault(spiffe_id, _Entry(spiffe_id))
        self._wake.set()

    def identities(self) -> frozenset[SpiffeId]:
        return frozenset(self._entries)

    def set_trust_bundle(self, pem: bytes) -> bool:
        """Use the bundle ``pem`` (validated; :class:`TrustBundleError`); True if it changed anything."""
        roots = parse_trust_bundle(pem, self.trust_domain)
        if pem == self._bundle_pem:
            return False
        self._bundle_pem, self._roots = pem, roots
        log.info("trust bundle changed", roots=len(roots), sha256=hashlib.sha256(pem).hexdigest()[:16])
        now = self._clock()
        for entry in self._entries.values():
            # An SVID that does not chain to the new roots would be refused by every peer: replace it now.
            if entry.svid is not None and not self._chains_to_bundle(entry.svid, now):
                entry.due = None
                entry.failures = 0
        self._notify(CertEvent("bundle", None))
        self._wake.set()
        return True

    # ---------------------------------------------------------------------------------------
    # The work

    async def refresh_due(self) -> datetime | None:
        """Do everything due at the clock's current time (file check, expiries, renewals); returns when
        the next renewal is due (None: nothing managed)."""
        self._check_bundle_file()
        problem = self._check_node_credential_files()
        if problem is not None:
            log.error("node credential files unusable; keeping the loaded one", error=problem)
        now = self._clock()
        due: list[_Entry] = []
        node = self._node
        if node is not None and node.svid is not None and (node.due is None or node.due <= now):
            due.append(node)
        for entry in self._entries.values():
            if entry.svid is not None and now >= entry.svid.not_after:
                log.error("svid expired without a renewal", spiffe_id=str(entry.spiffe_id))
                entry.svid = None
                self._notify(CertEvent("expired", entry.spiffe_id))
            if entry.due is None or entry.due <= now:
                due.append(entry)
        if due:
            await asyncio.gather(*(self._renew_locked(entry) for entry in due))
        pending = [entry.due for entry in self._entries.values() if entry.due is not None]
        if len(pending) < len(self._entries):
            return self._clock()
        if node is not None and node.due is not None:
            pending.append(node.due)
        return min(pending, default=None)

    async def run(self) -> None:
        """Keep every managed SVID fresh until cancelled."""
        while True:
            # Cleared before the work, so a set_identities() during it wakes the next wait at once.
            self._wake.clear()
            delay = self.watch_interval
            try:
                next_due = await self.refresh_due()
            except Exception:
                # refresh_due handles every expected failure; anything else is a bug, which must not end
                # the renewals of every identity for the rest of the process's life.
                log.exception("certificate refresh failed unexpectedly; retrying")
                next_due, delay = None, self.retry_initial
            if next_due is not None:
                delay = min(delay, (next_due - self._clock()).total_seconds())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(min(delay, MAX_SLEEP), 0.0))

    async def _renew_locked(self, entry: _Entry) -> None:
        if entry.lock.locked():
            return  # ensure() is renewing it right now
        async with entry.lock:
            if entry.files is None and self._entries.get(entry.spiffe_id) is not entry:
                return  # removed meanwhile
            await self._renew(entry)

    async def _renew(self, entry: _Entry) -> None:
        async with self._renewals:
            loop = asyncio.get_running_loop()
            try:
                new = await loop.run_in_executor(
                    self._crypto_threads(), _new_key, self.key_type, entry.spiffe_id
                )
                # The CA decides a node credential's lifetime; a workload asks for svid_ttl.
                answer = await self.signer.sign(new.csr_pem, ttl=None if entry.files else self.svid_ttl)
                svid = self._accept(entry.spiffe_id, answer.cert_chain_pem, new)
                if entry.files is not None:
                    cert_path, key_path = entry.files
                    chain_pem = svid.cert_chain_pem
                    # Blocking writes with fsync: off the loop, like the key.
                    await loop.run_in_executor(
                        self._crypto_threads(), write_credential, cert_path, key_path, chain_pem, new.key
                    )
                    entry.stamp = _stamp(cert_path)
            except Exception as err:  # any failure of one renewal is retried; it must not stop the others
                self._failed(entry, err)
                return
        entry.svid, entry.failures, entry.last_error = svid, 0, None
        entry.due = self._renewal_time(svid)
        log.info(
            "node credential renewed" if entry.files else "svid renewed",
            spiffe_id=str(entry.spiffe_id),
            not_after=svid.not_after.isoformat(),
            next_renewal=entry.due.isoformat(),
        )
        self._notify(CertEvent("node_credential" if entry.files else "svid", entry.spiffe_id, svid))

    def _accept(self, spiffe_id: SpiffeId, chain_pem: bytes, new: _NewKey) -> Svid:
        """The signed chain as an :class:`Svid` after checking it is ours, valid and trusted."""
        leaf, *intermediates = load_certificates(chain_pem)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*spki) != new.key.public_key().public_bytes(*spki):
            raise SvidError("the returned certificate is not for the key we sent")
        # Checked valid now (notBefore <= now < notAfter), so now is a start of its lifetime that renewal
        # can be measured from: the CA issued it a round trip ago, whatever it backdated notBefore by.
        received_at = self._clock()
        got = verify_svid_chain(leaf, intermediates, self._roots, self.trust_domain, now=received_at)
        if got != spiffe_id:
            raise SvidError(f"the returned certificate is for {got}, not {spiffe_id}")
        return Svid(
            spiffe_id,
            chain_pem,
            new.key_pem,
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            leaf,
            (leaf, *intermediates),
            issued_at=received_at,
        )

    def _renewal_time(self, svid: Svid) -> datetime:
        """``renew_fraction`` ± ``renew_jitter``/2 of the lifetime from issuance (not from notBefore)."""
        fraction = self.renew_fraction + self.renew_jitter * (self._rng.random() - 0.5)
        return renewal_point(svid.issued_at, svid.not_after, fraction)

    def _crypto_threads(self) -> ThreadPoolExecutor:
        """The manager's pool for CPU-bound crypto, made on first use; made anew in a forked child (the
        parent's pool threads do not exist there, and its idle count would make it queue work forever)."""
        if self._crypto_pool is None or self._crypto_pool_pid != os.getpid():
            self._crypto_pool = ThreadPoolExecutor(CRYPTO_THREADS, thread_name_prefix="nodeproxy-certs")
            self._crypto_pool_pid = os.getpid()
        return self._crypto_pool

    def _failed(self, entry: _Entry, err: Exception) -> None:
        entry.failures += 1
        entry.last_error = f"{type(err).__name__}: {err}"
        backoff = min(self.retry_max, self.retry_initial * 2 ** min(entry.failures - 1, 30))
        delay = timedelta(seconds=backoff * (0.5 + 0.5 * self._rng.random()))
        now = self._clock()
        entry.due = now + delay
        if entry.svid is not None and entry.due > entry.svid.not_after:
            # Try once more just before it expires rather than after.
            entry.due = max(now, entry.svid.not_after - timedelta(seconds=1))
        what = "node credential" if entry.files else "svid"
        log.warning(
            f"{what} renewal failed; keeping the current one" if entry.svid else f"{what} request failed",
            spiffe_id=str(entry.spiffe_id),
            error=entry.last_error,
            failures=entry.failures,
            retry_in=round((entry.due - now).total_seconds(), 3),
            current_not_after=entry.svid.not_after.isoformat() if entry.svid else None,
        )

    def _chains_to_bundle(self, svid: Svid, now: datetime) -> bool:
        try:
            verify_svid_chain(svid.certificate, svid.chain[1:], self._roots, self.trust_domain, now=now)
        except SvidError:
            return False
        return True

    def _check_node_credential_files(self) -> str | None:
        """(Re)load the node credential if its certificate file changed; returns what is wrong, if so."""
        entry = self._node
        if entry is None or entry.files is None:
            return None
        cert_path, key_path = entry.files
        try:
            stamp = _stamp(cert_path)
            if stamp == entry.stamp:
                return None
            chain_pem, key_pem = cert_path.read_bytes(), key_path.read_bytes()
            leaf, *intermediates = load_certificates(chain_pem)
            key = load_private_key(key_pem)
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
                return f"{key_path} is not the key of {cert_path}"
            node_id = check_x509_svid(leaf, self.trust_domain)
            if node_id.node_name is None:
                return (
                    f"{cert_path} is {node_id}, not a node credential (spiffe://<td>/nodeproxy/node/<name>)"
                )
        except (OSError, CaError, SvidError) as err:
            return f"{cert_path}: {err}"
        entry.stamp = stamp
        entry.spiffe_id = node_id
        # When it arrived is unknown (written by `ca issue-node`, or by us before a restart): its lifetime
        # starts at notBefore + the CA's backdating.
        entry.svid = Svid(
            node_id,
            chain_pem,
            key_pem,
            leaf.not_valid_before_utc,
            leaf.not_valid_after_utc,
            leaf,
            (leaf, *intermediates),
            issued_at=issuance_time(leaf.not_valid_before_utc, seen_at=self._clock()),
        )
        entry.failures, entry.last_error = 0, None
        entry.due = self._renewal_time(entry.svid)
        log.info("node credential loaded", spiffe_id=str(node_id), not_after=entry.svid.not_after.isoformat())
        return None

    def _check_bundle_file(self) -> None:
        if self._bundle_file is None:
            return
        try:
            stamp = _stamp(self._bundle_file)
            if stamp == self._bundle_stamp:
                return
            pem = self._bundle_file.read_bytes()
            self._bundle_stamp = stamp
            self.set_trust_bundle(pem)
        except (OSError, TrustBundleError) as err:
            # A half-written or broken file must not take the trust away: keep the bundle we have.
            log.error("trust bundle file unusable; keeping the current bundle", error=str(err))

    def _notify(self, event: CertEvent) -> None:
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                # One subscriber's bug must not keep the others (other TLS contexts) on stale certificates.
                log.exception("cert change subscriber failed", kind=event.kind)


def _stamp(path: Path) -> _FileStamp:
    st = os.stat(path)
    return _FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
