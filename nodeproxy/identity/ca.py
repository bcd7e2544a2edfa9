"""The certificate authority of a trust domain: creating it (``nodeproxy ca init``) and signing SVIDs.

A CA directory holds (keys 0600, certificates 0644, the directory 0700)::

    root.pem  root.key                  self-signed root, cA=true pathLen=1, 10 years by default
    intermediate.pem  intermediate.key  signed by the root, cA=true pathLen=0, 1 year; signs the SVIDs
    bundle.pem                          the trust bundle (the root): what every node proxy trusts

Without an intermediate (``init_ca(..., intermediate=False)``) the root signs SVIDs itself. Every
certificate the CA issues is checked against the X.509-SVID rules before it is handed out, and the CA
never copies an extension from a CSR: it takes only the public key and the requested SPIFFE ID.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nodeproxy.identity.lifetimes import (
    BACKDATE,
    DEFAULT_INTERMEDIATE_TTL,
    DEFAULT_NODE_CREDENTIAL_TTL,
    DEFAULT_ROOT_TTL,
    DEFAULT_SVID_TTL,
    MIN_SVID_TTL,
)
from nodeproxy.identity.spiffe import (
    SpiffeId,
    SpiffeIdError,
    SvidError,
    check_signing_certificate,
    validate_trust_domain,
    verify_svid_chain,
)

__all__ = [
    "BACKDATE",
    "DEFAULT_INTERMEDIATE_TTL",
    "DEFAULT_NODE_CREDENTIAL_TTL",
    "DEFAULT_ROOT_TTL",
    "DEFAULT_SVID_TTL",
    "CaError",
    "CaPaths",
    "CertificateAuthority",
    "CsrError",
    "IssuedCertificate",
    "KeyType",
    "PrivateKey",
    "generate_private_key",
    "init_ca",
    "load_certificates",
    "load_private_key",
    "make_csr",
    "private_key_pem",
    "write_credential",
]

# Smallest RSA modulus accepted in a CSR (NIST SP 800-131A); larger than this is allowed up to 8192.
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

KeyType = Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {"secp256r1": ec.SECP256R1, "secp384r1": ec.SECP384R1}


class CaError(Exception):
    """The CA cannot be created, loaded or used (files, keys, lifetimes)."""


class CsrError(ValueError):
    """A certificate signing request the CA refuses (malformed, bad signature, wrong identity, weak key)."""


@dataclass(frozen=True, slots=True)
class CaPaths:
    """The files of a CA directory."""

    directory: Path

    @property
    def root_cert(self) -> Path:
        return self.directory / "root.pem"

    @property
    def root_key(self) -> Path:
        return self.directory / "root.key"

    @property
    def intermediate_cert(self) -> Path:
        return self.directory / "intermediate.pem"

    @property
    def intermediate_key(self) -> Path:
        return self.directory / "intermediate.key"

    @property
    def bundle(self) -> Path:
        return self.directory / "bundle.pem"

    def all_files(self) -> tuple[Path, ...]:
        return self.root_cert, self.root_key, self.intermediate_cert, self.intermediate_key, self.bundle


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A certificate the CA signed, with the chain a TLS peer needs (leaf first, root excluded)."""

    spiffe_id: SpiffeId
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def chain_pem(self) -> bytes:
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    @property
    def not_after(self) -> datetime:
        return self.certificate.not_valid_after_utc


# --------------------------------------------------------------------------------------------
# Keys and files


def generate_private_key(key_type: KeyType = "ecdsa-p256") -> PrivateKey:
    """A new private key of ``key_type`` (ECDSA P-256 by default: small, fast, what SPIRE and Istio use)."""
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.removeprefix("rsa-")))
    raise ValueError(f"unknown key type {key_type!r}")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key(data: bytes) -> PrivateKey:
    """A PEM (PKCS#8 or traditional) private key of a type the CA supports; :class:`CaError` otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise CaError(f"not a usable PEM private key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise CaError(f"unsupported private key type {type(key).__name__}")
    return key


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM ``data`` (in order); :class:`CaError` if there is none or one is broken."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as err:
        raise CaError(f"not a PEM certificate list: {err}") from None
    if not certs:
        raise CaError("no certificate in the PEM data")
    return certs


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` and write ``data``; never replaces an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask could have removed bits; it can never have added any
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (a reader sees the old or the new file, never a mix)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    _write_new(temporary, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_credential(cert_path: Path, key_path: Path, chain_pem: bytes, key: PrivateKey) -> None:
    """Write (atomically, replacing what is there) a certificate chain (0644) and its key (0600)."""
    _replace_file(key_path, private_key_pem(key), 0o600)
    _replace_file(cert_path, chain_pem, 0o644)


def _public_key_of(cert: x509.Certificate) -> PublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise CaError(f"unsupported public key type {type(key).__name__}")
    return key


def _same_public_key(a: PublicKey, b: PublicKey) -> bool:
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(*spki) == b.public_bytes(*spki)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None  # EdDSA hashes internally; cryptography requires None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _check_public_key(key: object) -> PublicKey:
    """The CSR's key if it is one the CA signs for: ECDSA P-256/P-384, RSA 2048-8192 (e=65537), Ed25519."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise CsrError(f"unsupported elliptic curve {key.curve.name} (use P-256 or P-384)")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise CsrError(f"RSA keys must have {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {key.key_size}")
        if key.public_numbers().e != 65537:
            raise CsrError("RSA keys must use the public exponent 65537")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise CsrError(f"unsupported public key type {type(key).__name__}")


def make_csr(key: PrivateKey, spiffe_id: SpiffeId) -> x509.CertificateSigningRequest:
    """A CSR for ``spiffe_id`` (its only URI SAN) signed with ``key``: what a node proxy sends the CA."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))])
    builder = x509.CertificateSigningRequestBuilder(subject_name=x509.Name([]))
    return builder.add_extension(san, critical=True).sign(key, _signature_hash(key))


# --------------------------------------------------------------------------------------------
# Creating a CA


def _ca_certificate(
    *,
    subject: x509.Name,
    key: PrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    trust_domain: str,
    path_length: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    public_key = _public_key_of_private(key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(SpiffeId(trust_domain)))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    signer_public = _public_key_of_private(issuer_key)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_public), critical=False
    )
    return builder.sign(issuer_key, _signature_hash(issuer_key))


def _public_key_of_private(key: PrivateKey) -> PublicKey:
    return key.public_key()


def _ca_name(trust_domain: str, role: str) -> x509.Name:
    # Root and intermediate must have different subjects (OpenSSL treats a matching subject as the
    # same certificate and reports "unknown CA"); the trust domain in O makes them readable.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, f"nodeproxy {role} CA"),
        ]
    )


def init_ca(
    directory: str | os.PathLike[str],
    trust_domain: str,
    *,
    key_type: KeyType = "ecdsa-p256",
    intermediate: bool = True,
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
    now: datetime | None = None,
) -> CaPaths:
    """Create a new CA for ``trust_domain`` in ``directory`` (created 0700 if missing).

    Refuses (:class:`CaError`) if any of the CA's files already exists: overwriting a CA's key would
    silently invalidate every certificate it issued. On failure, files created so far are removed.
    """
    validate_trust_domain(trust_domain)
    if intermediate and intermediate_ttl > root_ttl:
        raise CaError("the intermediate cannot outlive the root (intermediate_ttl > root_ttl)")
    paths = CaPaths(Path(directory))
    try:
        if not paths.directory.is_dir():
            paths.directory.mkdir(mode=0o700, parents=True)
            paths.directory.chmod(0o700)  # mkdir's mode passes through the umask
    except OSError as err:
        raise CaError(f"cannot create the CA directory {paths.directory}: {err.strerror}") from None
    existing = [str(p) for p in paths.all_files() if p.exists() or p.is_symlink()]
    if existing:
        raise CaError(f"refusing to overwrite an existing CA: {', '.join(existing)} already exist")
    start = (now or datetime.now(UTC)).astimezone(UTC)
    root_key = generate_private_key(key_type)
    root = _ca_certificate(
        subject=_ca_name(trust_domain, "root"),
        key=root_key,
        issuer=None,
        issuer_key=root_key,
        trust_domain=trust_domain,
        path_length=1 if intermediate else 0,
        not_before=start - BACKDATE,
        not_after=start + root_ttl,
    )
    pem = serialization.Encoding.PEM
    files: list[tuple[Path, bytes, int]] = [
        (paths.root_key, private_key_pem(root_key), 0o600),
        (paths.root_cert, root.public_bytes(pem), 0o644),
        (paths.bundle, root.public_bytes(pem), 0o644),
    ]
    if intermediate:
        intermediate_key = generate_private_key(key_type)
        signing = _ca_certificate(
            subject=_ca_name(trust_domain, "intermediate"),
            key=intermediate_key,
            issuer=root,
            issuer_key=root_key,
            trust_domain=trust_domain,
            path_length=0,
            not_before=start - BACKDATE,
            not_after=start + intermediate_ttl,
        )
        files += [
            (paths.intermediate_key, private_key_pem(intermediate_key), 0o600),
            (paths.intermediate_cert, signing.public_bytes(pem), 0o644),
        ]
    created: list[Path] = []
    try:
        for path, data, mode in files:
            _write_new(path, data, mode)
            created.append(path)
    except FileExistsError as err:
        _remove(created)
        raise CaError(f"refusing to overwrite an existing CA: {err.filename} appeared meanwhile") from None
    except OSError as err:
        _remove(created)
        raise CaError(f"cannot write {err.filename}: {err.strerror}") from None
    return paths


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Signing


class CertificateAuthority:
    """A loaded CA: signs X.509-SVIDs with the intermediate (or the root when there is none)."""

    def __init__(
        self,
        signing_cert: x509.Certificate,
        signing_key: PrivateKey,
        chain_to_root: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
    ) -> None:
        """``chain_to_root``: the signing certificate's issuers up to (excluding) a root, in order."""
        check_signing_certificate(signing_cert)
        if not _same_public_key(_public_key_of(signing_cert), _public_key_of_private(signing_key)):
            raise CaError("the signing key does not belong to the signing certificate")
        try:
            san = signing_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CaError("the signing certificate has no subjectAltName (spiffe://<trust-domain>)") from None
        ids = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(ids) != 1:
            raise CaError("the signing certificate has no trust domain URI SAN (spiffe://<trust-domain>)")
        try:
            self.trust_domain = SpiffeId.parse(ids[0]).trust_domain
        except SpiffeIdError as err:
            raise CaError(f"the signing certificate's URI SAN: {err}") from None
        if not roots:
            raise CaError("a CA needs at least one root certificate (the trust bundle)")
        self.signing_cert = signing_cert
        self.signing_key = signing_key
        self.chain_to_root = tuple(chain_to_root)
        self.roots = tuple(roots)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> CertificateAuthority:
        """Load the CA that :func:`init_ca` wrote to ``directory``; :class:`CaError` on any problem."""
        paths = CaPaths(Path(directory))
        try:
            roots = load_certificates(paths.bundle.read_bytes())
            if paths.intermediate_cert.exists():
                signing_cert, *issuers = load_certificates(paths.intermediate_cert.read_bytes())
                key_path = paths.intermediate_key
            else:
                signing_cert, issuers = load_certificates(paths.root_cert.read_bytes())[0], []
                key_path = paths.root_key
            _check_key_file_mode(key_path)
            signing_key = load_private_key(key_path.read_bytes())
        except OSError as err:
            raise CaError(f"cannot read the CA in {paths.directory}: {err}") from None
        except SvidError as err:
            raise CaError(str(err)) from None
        return cls(signing_cert, signing_key, issuers, roots)

    def issue_credential(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta,
        key_type: KeyType = "ecdsa-p256",
        now: datetime | None = None,
    ) -> tuple[IssuedCertificate, PrivateKey]:
        """A new key and its SVID, made here (``nodeproxy ca issue-node`` for a node credential)."""
        key = generate_private_key(key_type)
        return self.issue(spiffe_id, key.public_key(), ttl=ttl, now=now), key

    def trust_bundle_pem(self) -> bytes:
        return b"".join(root.public_bytes(serialization.Encoding.PEM) for root in self.roots)

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        now: datetime | None = None,
    ) -> IssuedCertificate:
        """An X.509-SVID for ``spiffe_id`` with the CSR's public key, valid ``ttl`` from ``now``.

        The CSR must be self-signed correctly, name ``spiffe_id`` as its one and only URI SAN, and carry
        an acceptable key; whether the requester may have ``spiffe_id`` is the caller's decision.
        Raises :class:`CsrError` (the request) or :class:`CaError` (the CA, e.g. expired).
        """
        if not csr.is_signature_valid:
            raise CsrError("the CSR's signature does not verify")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise CsrError("the CSR has no subjectAltName with the SPIFFE ID") from None
        except ValueError as err:  # a malformed extension
            raise CsrError(f"the CSR's extensions cannot be parsed: {err}") from None
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if len(uris) != 1:
            raise CsrError(f"the CSR must name exactly one URI SAN, it has {len(uris)}")
        if len(list(san)) != 1:
            raise CsrError("the CSR may only carry the SPIFFE ID as its subjectAltName")
        if uris[0] != str(spiffe_id):
            raise CsrError(f"the CSR asks for {uris[0][:300]!r}, not {str(spiffe_id)!r}")
        return self.issue(spiffe_id, _check_public_key(csr.public_key()), ttl=ttl, now=now)

    def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        *,
        ttl: timedelta = DEFAULT_SVID_TTL,
        now: datetime | None = None,
        dns_names: Sequence[str] = (),
    ) -> IssuedCertificate:
        """An X.509-SVID for ``spiffe_id`` and ``public_key`` (``dns_names`` as extra SANs, for a server
        that clients also reach by name)."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise CsrError(f"{spiffe_id} is not in this CA's trust domain {self.trust_domain!r}")
        if ttl < MIN_SVID_TTL:
            raise CaError(f"an SVID lifetime below {MIN_SVID_TTL} is not allowed (got {ttl})")
        start = (now or datetime.now(UTC)).astimezone(UTC)
        issuer_from, issuer_until = (
            self.signing_cert.not_valid_before_utc,
            self.signing_cert.not_valid_after_utc,
        )
        if not issuer_from <= start < issuer_until:
            raise CaError(f"the signing certificate is not valid now (valid {issuer_from} to {issuer_until})")
        # Never outlive the issuer: a chain is only as valid as its shortest-lived member.
        not_after = min(start + ttl, issuer_until)
        not_before = max(start - BACKDATE, issuer_from)
        rsa_key = isinstance(public_key, rsa.RSAPublicKey)
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        names += [x509.DNSName(name) for name in dns_names]
        builder = (
            x509.CertificateBuilder()
            # An empty subject: the identity is the URI SAN alone (RFC 5280 then wants the SAN critical).
            .subject_name(x509.Name([]))
            .issuer_name(self.signing_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    # RSA key transport (TLS 1.2 RSA key exchange) needs it; other key types cannot use it.
                    key_encipherment=rsa_key,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(_public_key_of(self.signing_cert)),
                critical=False,
            )
        )
        cert = builder.sign(self.signing_key, _signature_hash(self.signing_key))
        chain = (cert, self.signing_cert, *self.chain_to_root)
        # The rules this module promises, checked on the result rather than assumed from the builder.
        issued_id = verify_svid_chain(cert, chain[1:], self.roots, self.trust_domain, now=start)
        if issued_id != spiffe_id:
            raise CaError(f"internal error: issued {issued_id} for {spiffe_id}")
        return IssuedCertificate(spiffe_id, cert, chain)


def _check_key_file_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CaError(f"{path} is readable by others (mode {mode:o}); a CA key must be 0600 (chmod 600)")
