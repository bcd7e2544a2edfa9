"""The CA: `init_ca` files and permissions, refusing to overwrite, and what `sign_csr` issues or refuses."""

from __future__ import annotations

import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeproxy.identity.ca import (
    BACKDATE,
    CaError,
    CaPaths,
    CertificateAuthority,
    CsrError,
    KeyType,
    generate_private_key,
    init_ca,
    make_csr,
)
from nodeproxy.identity.spiffe import SpiffeId, check_x509_svid, verify_svid_chain
from tests.identity_helpers import NOW, make_ca

TD = "cluster.local"
WEB = SpiffeId.for_workload(TD, "default", "web")


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_init_writes_keys_0600_and_certs_0644(tmp_path: Path, umask: int) -> None:
    # Neither a permissive umask (wider keys) nor a strict one (unreadable files) changes the modes.
    old_umask = os.umask(umask)
    try:
        paths = init_ca(tmp_path / "ca", TD)
    finally:
        os.umask(old_umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in paths.all_files()}
    assert modes == {
        "root.key": 0o600,
        "intermediate.key": 0o600,
        "root.pem": 0o644,
        "intermediate.pem": 0o644,
        "bundle.pem": 0o644,
    }
    assert stat.S_IMODE(paths.directory.stat().st_mode) == 0o700
    ca = CertificateAuthority.load(paths.directory)
    assert ca.trust_domain == TD and ca.signing_cert.subject != ca.roots[0].subject
    assert paths.bundle.read_bytes() == paths.root_cert.read_bytes()


def test_init_refuses_to_overwrite_and_leaves_the_old_ca_intact(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "ca", TD)
    before = {p: p.read_bytes() for p in paths.all_files()}
    with pytest.raises(CaError, match="refusing to overwrite"):
        init_ca(tmp_path / "ca", TD)
    assert {p: p.read_bytes() for p in paths.all_files()} == before


def test_init_refuses_when_any_single_file_exists(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    (directory / "intermediate.key").write_bytes(b"someone else's key")
    with pytest.raises(CaError, match=r"intermediate\.key already exist"):
        init_ca(directory, TD)
    assert sorted(p.name for p in directory.iterdir()) == ["intermediate.key"]  # nothing else written


def test_load_refuses_a_world_readable_key(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "ca", TD)
    paths.intermediate_key.chmod(0o644)
    with pytest.raises(CaError, match="0600"):
        CertificateAuthority.load(paths.directory)


def test_root_only_ca_signs_with_the_root(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "ca", TD, intermediate=False, now=NOW - timedelta(days=1))
    assert not CaPaths(paths.directory).intermediate_cert.exists()
    ca = CertificateAuthority.load(paths.directory)
    key = generate_private_key()
    issued = ca.sign_csr(make_csr(key, WEB), WEB, now=NOW)
    assert issued.chain == (issued.certificate, ca.roots[0])
    assert verify_svid_chain(issued.certificate, [], ca.roots, TD, now=NOW) == WEB


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"])
def test_issued_svid_has_exactly_the_svid_profile(tmp_path: Path, key_type: KeyType) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    key = generate_private_key(key_type)
    issued = ca.sign_csr(make_csr(key, WEB), WEB, now=NOW)
    cert = issued.certificate
    assert check_x509_svid(cert, TD, now=NOW) == WEB
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + timedelta(hours=24)  # the default lifetime
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert usage.value.key_encipherment is key_type.startswith("rsa")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert issued.chain[1:] == (ca.signing_cert,)


def test_lifetime_is_capped_by_the_intermediate(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    late = ca.signing_cert.not_valid_after_utc - timedelta(hours=2)
    issued = ca.sign_csr(make_csr(generate_private_key(), WEB), WEB, now=late)
    assert issued.not_after == ca.signing_cert.not_valid_after_utc
    with pytest.raises(CaError, match="not valid now"):
        ca.sign_csr(make_csr(generate_private_key(), WEB), WEB, now=late + timedelta(hours=3))


def test_csr_for_another_identity_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    csr = make_csr(generate_private_key(), SpiffeId.for_workload(TD, "kube-system", "admin"))
    with pytest.raises(CsrError, match="asks for"):
        ca.sign_csr(csr, WEB, now=NOW)


def test_identity_outside_the_trust_domain_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    foreign = SpiffeId.for_workload("evil.example", "default", "web")
    with pytest.raises(CsrError, match="trust domain"):
        ca.sign_csr(make_csr(generate_private_key(), foreign), foreign, now=NOW)


def _csr_with(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, names: list[x509.GeneralName]
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder(subject_name=x509.Name([]))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    # A CSR asking to be a CA: the CA must never copy it.
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize(
    ("names", "why"),
    [
        ([], "no subjectAltName"),
        ([x509.UniformResourceIdentifier(str(WEB))] * 2, "exactly one URI SAN"),
        ([x509.UniformResourceIdentifier(str(WEB)), x509.DNSName("kubernetes.default")], "only carry"),
    ],
)
def test_csr_shapes_that_are_refused(tmp_path: Path, names: list[x509.GeneralName], why: str) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    with pytest.raises(CsrError, match=why):
        ca.sign_csr(_csr_with(ec.generate_private_key(ec.SECP256R1()), names), WEB, now=NOW)


def test_ca_extensions_requested_in_a_csr_are_ignored(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    issued = ca.sign_csr(
        _csr_with(ec.generate_private_key(ec.SECP256R1()), [x509.UniformResourceIdentifier(str(WEB))]),
        WEB,
        now=NOW,
    )
    assert issued.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_weak_keys_are_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    weak_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CsrError, match="2048"):
        ca.sign_csr(_csr_with(weak_rsa, [x509.UniformResourceIdentifier(str(WEB))]), WEB, now=NOW)
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(CsrError, match="curve"):
        ca.sign_csr(_csr_with(k1, [x509.UniformResourceIdentifier(str(WEB))]), WEB, now=NOW)


def test_a_tampered_csr_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    der = bytearray(make_csr(generate_private_key(), WEB).public_bytes(Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    with pytest.raises(CsrError, match="signature"):
        ca.sign_csr(x509.load_der_x509_csr(bytes(der)), WEB, now=NOW)


def test_too_short_lifetime_is_refused(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca", TD)
    with pytest.raises(CaError, match="lifetime"):
        ca.sign_csr(make_csr(generate_private_key(), WEB), WEB, ttl=timedelta(seconds=5), now=NOW)
