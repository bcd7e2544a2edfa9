"""Certificates for the identity tests: a real CA (nodeproxy.identity.ca) and hand-built leaves that break
one X.509-SVID rule each (cryptography's builder, since the CA itself refuses to make them)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeproxy.identity.ca import CertificateAuthority, PrivateKey, generate_private_key, init_ca

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
BOTH_USAGES = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)


def make_ca(
    directory: Path, trust_domain: str = "cluster.local", *, now: datetime = NOW
) -> CertificateAuthority:
    init_ca(directory, trust_domain, now=now - timedelta(days=1))
    return CertificateAuthority.load(directory)


def key_usage(*, digital_signature: bool = True, key_cert_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def forged_leaf(
    ca: CertificateAuthority,
    uris: Sequence[str],
    *,
    is_ca: bool = False,
    usage: x509.KeyUsage | None = None,
    usage_critical: bool = True,
    eku: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
    basic_constraints: bool = True,
    not_before: datetime = NOW - timedelta(hours=1),
    not_after: datetime = NOW + timedelta(hours=23),
    signer: tuple[x509.Certificate, PrivateKey] | None = None,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A leaf signed by ``signer`` (default: the CA's intermediate) with exactly the given properties."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    issuer_cert, issuer_key = signer or (ca.signing_cert, ca.signing_key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.KeyUsage(**_usage_kwargs(usage or key_usage())), critical=usage_critical)
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
        )
    return builder.sign(issuer_key, hashes.SHA256()), key


def _usage_kwargs(usage: x509.KeyUsage) -> dict[str, bool]:
    agreement = usage.key_agreement
    return {
        "digital_signature": usage.digital_signature,
        "content_commitment": usage.content_commitment,
        "key_encipherment": usage.key_encipherment,
        "data_encipherment": usage.data_encipherment,
        "key_agreement": agreement,
        "key_cert_sign": usage.key_cert_sign,
        "crl_sign": usage.crl_sign,
        "encipher_only": usage.encipher_only if agreement else False,
        "decipher_only": usage.decipher_only if agreement else False,
    }


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_key() -> PrivateKey:
    return generate_private_key()


class FixedRandom(random.Random):
    """random() always returns ``value``: jitter and backoff become exact (0.5: no jitter)."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


class FakeClock:
    """A clock the test moves (the managers' and the CA's ``clock``)."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta
