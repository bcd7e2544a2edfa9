"""The X.509-SVID rules (https://github.com/spiffe/spiffe/blob/main/standards/X509-SVID.md), and the
SPIFFE IDs of nodeproxy.identity.spiffeid (re-exported: ``SpiffeId``, ``SpiffeIdError`` ...), whose
syntax rules are listed there.

An X.509-SVID leaf has exactly one URI SAN (the SPIFFE ID), basicConstraints with cA=false, a critical
keyUsage with digitalSignature and without keyCertSign or cRLSign, and, when it has an extendedKeyUsage,
both serverAuth and clientAuth. A signing certificate has cA=true and keyCertSign.

Workloads are named ``spiffe://<td>/ns/<namespace>/sa/<service-account>`` (Istio's form); node proxies
authenticate to the CA as ``spiffe://<td>/nodeproxy/node/<node-name>`` (a path no workload ID can have),
and the CA service itself serves as ``spiffe://<td>/nodeproxy/ca``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeproxy.identity.spiffeid import (
    CA_SERVICE_PATH,
    MAX_SPIFFE_ID_BYTES,
    MAX_TRUST_DOMAIN_LENGTH,
    NODE_PATH_PREFIX,
    SpiffeId,
    SpiffeIdError,
    validate_trust_domain,
)

__all__ = [
    "CA_SERVICE_PATH",
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_LENGTH",
    "NODE_PATH_PREFIX",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "check_signing_certificate",
    "check_x509_svid",
    "peer_identity_from_der",
    "validate_trust_domain",
    "verify_svid_chain",
]

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


class SvidError(ValueError):
    """A certificate that is not a valid X.509-SVID (or not one for the expected trust domain/time)."""


# --------------------------------------------------------------------------------------------
# X.509-SVID rules


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> x509.Extension[_Ext] | None:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None


def _uri_sans(cert: x509.Certificate) -> list[str]:
    san = _extension(cert, x509.SubjectAlternativeName)
    return [] if san is None else list(san.value.get_values_for_type(x509.UniformResourceIdentifier))


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("an aware datetime is needed (a naive one has no defined time zone)")
    return moment.astimezone(UTC)


def _check_validity(cert: x509.Certificate, now: datetime | None, what: str) -> None:
    if now is None:
        return
    at = _as_utc(now)
    if at < cert.not_valid_before_utc:
        raise SvidError(f"{what} is not valid yet (notBefore {cert.not_valid_before_utc.isoformat()})")
    if at > cert.not_valid_after_utc:
        raise SvidError(f"{what} has expired (notAfter {cert.not_valid_after_utc.isoformat()})")


def check_x509_svid(
    cert: x509.Certificate, trust_domain: str | None = None, *, now: datetime | None = None
) -> SpiffeId:
    """The SPIFFE ID of the leaf X.509-SVID ``cert``, after checking every leaf rule.

    ``trust_domain``: the ID must belong to it (None: any). ``now``: the certificate must be valid at that
    (aware) time (None: not checked, e.g. when the TLS library already checked it). The chain is not
    verified here (see :func:`verify_svid_chain`). Raises :class:`SvidError`.
    """
    uris = _uri_sans(cert)
    if len(uris) != 1:
        raise SvidError(f"an X.509-SVID has exactly one URI SAN, this certificate has {len(uris)}")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as err:
        raise SvidError(f"the URI SAN is not a SPIFFE ID: {err}") from None
    basic = _extension(cert, x509.BasicConstraints)
    if basic is None:
        raise SvidError("a leaf X.509-SVID must have basicConstraints with cA=false (it has none)")
    if basic.value.ca:
        raise SvidError("a leaf X.509-SVID must have cA=false (this certificate is a CA)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is None:
        raise SvidError("a leaf X.509-SVID must have a keyUsage extension")
    if not usage.critical:
        raise SvidError("the keyUsage extension of an X.509-SVID must be critical")
    if not usage.value.digital_signature:
        raise SvidError("a leaf X.509-SVID's keyUsage must include digitalSignature")
    if usage.value.key_cert_sign or usage.value.crl_sign:
        raise SvidError("a leaf X.509-SVID's keyUsage must not include keyCertSign or cRLSign")
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        missing = [
            name
            for oid, name in (
                (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
            )
            if oid not in eku.value
        ]
        if missing:
            raise SvidError(f"a leaf X.509-SVID's extendedKeyUsage lacks {' and '.join(missing)}")
    if trust_domain is not None and spiffe_id.trust_domain != validate_trust_domain(trust_domain):
        raise SvidError(f"{spiffe_id} is not in the trust domain {trust_domain!r}")
    _check_validity(cert, now, f"the X.509-SVID of {spiffe_id}")
    return spiffe_id


def peer_identity_from_der(der: bytes, trust_domain: str, *, now: datetime | None = None) -> SpiffeId:
    """The SPIFFE ID of a peer's leaf certificate in DER (as a TLS library hands it over).

    Raises :class:`SvidError` for anything that is not an X.509-SVID of ``trust_domain`` (forged or
    several URI SANs, cA=true, missing or wrong key usage, wrong trust domain, expired at ``now``). The
    chain is the TLS library's job (verified against the trust bundle during the handshake).
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as err:
        raise SvidError(f"the peer certificate is not valid DER: {err}") from None
    return check_x509_svid(cert, trust_domain, now=now)


def check_signing_certificate(cert: x509.Certificate, trust_domain: str | None = None) -> None:
    """Raise :class:`SvidError` unless ``cert`` may sign SVIDs: cA=true and keyUsage keyCertSign.

    A signing certificate may carry one URI SAN, the trust domain's own ID (no path).
    """
    basic = _extension(cert, x509.BasicConstraints)
    if basic is None or not basic.value.ca:
        raise SvidError(f"{cert.subject.rfc4514_string()!r} is not a CA certificate (cA is not true)")
    usage = _extension(cert, x509.KeyUsage)
    if usage is None or not usage.value.key_cert_sign:
        raise SvidError(f"{cert.subject.rfc4514_string()!r} may not sign certificates (no keyCertSign)")
    uris = _uri_sans(cert)
    if len(uris) > 1:
        raise SvidError("a signing certificate has at most one URI SAN")
    if uris:
        try:
            own = SpiffeId.parse(uris[0])
        except SpiffeIdError as err:
            raise SvidError(f"the signing certificate's URI SAN is not a SPIFFE ID: {err}") from None
        if own.path:
            raise SvidError(f"a signing certificate's SPIFFE ID has no path (got {own})")
        if trust_domain is not None and own.trust_domain != trust_domain:
            raise SvidError(f"the signing certificate belongs to {own.trust_domain!r}, not {trust_domain!r}")


def _directly_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_svid_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Iterable[x509.Certificate],
    trust_domain: str,
    *,
    now: datetime,
) -> SpiffeId:
    """Check the leaf rules and that ``leaf`` chains through ``intermediates`` (in order, leaf's issuer
    first) to one of ``roots``, every certificate valid at ``now``; returns the leaf's SPIFFE ID.

    Used on what the CA returns before a node proxy starts presenting it. Raises :class:`SvidError`.
    """
    spiffe_id = check_x509_svid(leaf, trust_domain, now=now)
    child = leaf
    for depth, intermediate in enumerate(intermediates, start=1):
        check_signing_certificate(intermediate, trust_domain)
        _check_validity(intermediate, now, f"the intermediate CA certificate at depth {depth}")
        if not _directly_issued_by(child, intermediate):
            raise SvidError(f"the certificate at depth {depth - 1} is not signed by the one at depth {depth}")
        child = intermediate
    for root in roots:
        if _directly_issued_by(child, root):
            _check_validity(root, now, "the root CA certificate")
            return spiffe_id
    raise SvidError("the chain does not lead to a root of the trust bundle")
