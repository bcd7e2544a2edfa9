"""SPIFFE ID syntax and the X.509-SVID rules checker (nodeproxy.identity.spiffe)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.identity.ca import CertificateAuthority, make_csr
from nodeproxy.identity.spiffe import (
    MAX_SPIFFE_ID_BYTES,
    SpiffeId,
    SpiffeIdError,
    SvidError,
    check_x509_svid,
    peer_identity_from_der,
    verify_svid_chain,
)
from tests.identity_helpers import NOW, forged_leaf, key_usage, make_ca, new_key

TD = "cluster.local"
WEB = f"spiffe://{TD}/ns/default/sa/web"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("ca") / "ca", TD)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------------------------
# SPIFFE ID syntax


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://cluster.local/ns/default/sa/web",
        "spiffe://example.org",
        "spiffe://a-b_c.d9/x/Y.z/_-",
        "spiffe://td/" + "a" * (MAX_SPIFFE_ID_BYTES - len("spiffe://td/")),
    ],
)
def test_valid_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("http://cluster.local/ns/a/sa/b", "expected 'spiffe://"),
        ("SPIFFE://cluster.local/ns/a", "lower case"),
        ("spiffe:cluster.local/ns/a", "lower case"),
        ("spiffe://Cluster.local/ns/a", "lower case"),
        ("spiffe:///ns/a", "empty"),
        ("spiffe://cluster.local:8443/ns/a", "port"),
        ("spiffe://user@cluster.local/ns/a", "user info"),
        ("spiffe://cluster.local/ns/a?x=1", "query"),
        ("spiffe://cluster.local/ns/a#frag", "fragment"),
        ("spiffe://cluster.local/", "empty"),
        ("spiffe://cluster.local/ns//a", "empty"),
        ("spiffe://cluster.local/ns/a/", "empty"),
        ("spiffe://cluster.local/ns/./a", "'.'"),
        ("spiffe://cluster.local/ns/../a", "'..'"),
        ("spiffe://cluster.local/ns/a%20b", "percent"),
        ("spiffe://cluster.local/ns/é", "may only contain"),
        ("spiffe://clüster.local/ns/a", "may only contain"),
        ("spiffe://" + "a" * 256, "longer than 255"),
        ("spiffe://td/" + "a" * (MAX_SPIFFE_ID_BYTES - len("spiffe://td/") + 1), "longer than 2048"),
    ],
)
def test_invalid_ids_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(SpiffeIdError, match=why.replace("?", r"\?")):
        SpiffeId.parse(text)


def test_workload_and_node_ids() -> None:
    web = SpiffeId.for_workload(TD, "default", "web")
    assert str(web) == WEB and web.workload == ("default", "web") and web.node_name is None
    node = SpiffeId.for_node(TD, "node-a")
    assert str(node) == f"spiffe://{TD}/nodeproxy/node/node-a"
    assert node.node_name == "node-a" and node.workload is None
    with pytest.raises(SpiffeIdError):
        SpiffeId.for_workload(TD, "default", "we/b")  # a separator smuggled into a segment
    with pytest.raises(SpiffeIdError):
        SpiffeId.for_node(TD, "..")


_SEGMENT = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.text(alphabet="abc.-_09", min_size=1, max_size=20), st.lists(_SEGMENT, max_size=5))
def test_any_valid_id_parses_back_to_itself(trust_domain: str, segments: list[str]) -> None:
    spiffe_id = SpiffeId(trust_domain, "".join("/" + s for s in segments))
    assert SpiffeId.parse(str(spiffe_id)) == spiffe_id


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_spiffe_id_error(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert str(parsed) == text  # whatever is accepted is exactly canonical


# --------------------------------------------------------------------------------------------
# X.509-SVID rules


def test_a_ca_issued_svid_passes_every_rule(ca: CertificateAuthority) -> None:
    key = new_key()
    web = SpiffeId.parse(WEB)
    issued = ca.sign_csr(make_csr(key, web), web, now=NOW)
    assert peer_identity_from_der(der(issued.certificate), TD, now=NOW) == web
    assert verify_svid_chain(issued.certificate, issued.chain[1:], ca.roots, TD, now=NOW) == web


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"uris": []}, "exactly one URI SAN, this certificate has 0"),
        ({"uris": [WEB, f"spiffe://{TD}/ns/kube-system/sa/admin"]}, "has 2"),
        ({"uris": ["https://cluster.local/ns/default/sa/web"]}, "not a SPIFFE ID"),
        ({"uris": [f"spiffe://{TD}/ns/default/sa/web?admin=1"]}, "not a SPIFFE ID"),
        ({"uris": [WEB], "is_ca": True}, "cA=false"),
        ({"uris": [WEB], "basic_constraints": False}, "basicConstraints"),
        ({"uris": [WEB], "usage": key_usage(key_cert_sign=True)}, "keyCertSign"),
        ({"uris": [WEB], "usage": key_usage(digital_signature=False)}, "digitalSignature"),
        ({"uris": [WEB], "usage_critical": False}, "critical"),
        ({"uris": [WEB], "eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "lacks clientAuth"),
        ({"uris": [WEB], "eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "lacks serverAuth and clientAuth"),
        ({"uris": ["spiffe://other.domain/ns/default/sa/web"]}, "not in the trust domain"),
        ({"uris": [WEB], "not_after": NOW - timedelta(seconds=1)}, "expired"),
        ({"uris": [WEB], "not_before": NOW + timedelta(minutes=5)}, "not valid yet"),
    ],
)
def test_forged_leaves_are_refused(ca: CertificateAuthority, kwargs: dict[str, object], why: str) -> None:
    cert, _ = forged_leaf(ca, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SvidError, match=why):
        peer_identity_from_der(der(cert), TD, now=NOW)


def test_a_leaf_without_eku_is_an_svid(ca: CertificateAuthority) -> None:
    # The X509-SVID standard makes the extension optional; only when present must it have both usages.
    cert, _ = forged_leaf(ca, [WEB], eku=None)
    assert check_x509_svid(cert, TD, now=NOW) == SpiffeId.parse(WEB)


def test_expiry_follows_the_injected_clock(ca: CertificateAuthority) -> None:
    cert, _ = forged_leaf(ca, [WEB])
    assert check_x509_svid(cert, TD, now=NOW + timedelta(hours=22)) == SpiffeId.parse(WEB)
    with pytest.raises(SvidError, match="expired"):
        check_x509_svid(cert, TD, now=NOW + timedelta(hours=23, seconds=1))


def test_garbage_der_is_an_svid_error() -> None:
    with pytest.raises(SvidError, match="DER"):
        peer_identity_from_der(b"\x30\x03\x02\x01\x00", TD)


def test_chain_from_another_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    other = make_ca(tmp_path / "other", TD)  # same trust domain name, different keys
    cert, _ = forged_leaf(other, [WEB])
    assert check_x509_svid(cert, TD, now=NOW)  # the leaf alone is well-formed ...
    with pytest.raises(SvidError, match="not signed by"):  # ... but not signed by our intermediate
        verify_svid_chain(cert, [ca.signing_cert], ca.roots, TD, now=NOW)
    with pytest.raises(SvidError, match="does not lead to a root"):
        verify_svid_chain(cert, [other.signing_cert], ca.roots, TD, now=NOW)


def test_chain_with_a_leaf_as_intermediate_is_refused(ca: CertificateAuthority) -> None:
    # A valid leaf that signs another "leaf": the middle certificate is not a CA.
    middle, middle_key = forged_leaf(ca, [f"spiffe://{TD}/ns/default/sa/middle"])
    cert, _ = forged_leaf(ca, [WEB], signer=(middle, middle_key))
    with pytest.raises(SvidError, match="not a CA certificate"):
        verify_svid_chain(cert, [middle, ca.signing_cert], ca.roots, TD, now=NOW)
