"""Inbound decisions (nodeproxy.proxy.inbound): pure functions, and the policy hook backed by the real
authorization engine (nodeproxy.authz)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.authz.config import AuthzConfig
from nodeproxy.authz.engine import compile_authz
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.policy import Workload
from nodeproxy.proxy.inbound import (
    STATUS_BAD_AUTHORITY,
    STATUS_DENIED,
    STATUS_NOT_LOCAL,
    InboundRequest,
    Verdict,
    allow_all,
    authz_policy,
    decide_inbound,
    decide_plaintext,
    parse_authority,
    parse_forwarded_for,
    with_peer_authentication,
)
from nodeproxy.proxy.tunnel import InboundStream

WEB = "spiffe://cluster.local/ns/shop/sa/web"
BLOCKED = "spiffe://cluster.local/ns/blocked/sa/bot"
POD = "10.244.2.10"


def _stream(
    authority: str = f"{POD}:8080",
    forwarded: str = "for=10.244.1.10",
    peer: str = WEB,
    l7_checked: bool = False,
) -> InboundStream:
    return InboundStream(1, 1, peer, authority, forwarded, "192.168.100.1", 40000, l7_checked)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.244.2.10:8080", ("10.244.2.10", 8080)),
        ("10.244.2.10:65535", ("10.244.2.10", 65535)),
        ("10.244.2.10:0", None),
        ("10.244.2.10:65536", None),
        ("10.244.2.10", None),
        ("web.shop:80", None),
        ("[::1]:80", None),
        ("10.244.2.10:+80", None),
        ("10.244.2.10:080000", None),
        (":80", None),
    ],
)
def test_parse_authority(authority: str, expected: tuple[str, int] | None) -> None:
    assert parse_authority(authority) == expected


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=65535))
def test_parse_authority_round_trips(address: ipaddress.IPv4Address, port: int) -> None:
    assert parse_authority(f"{address}:{port}") == (str(address), port)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("for=10.244.1.10", "10.244.1.10"),
        ('for="10.244.1.10"', "10.244.1.10"),
        ("proto=https;for=10.244.1.10", "10.244.1.10"),
        ("For=10.244.1.10", "10.244.1.10"),
        ("", None),
        ("for=unknown", None),
        ("for=10.244.1.10, for=10.0.0.1", None),  # a chain: not what our peers send
        ("by=10.244.1.10", None),
        ('for="[2001:db8::1]"', None),
    ],
)
def test_parse_forwarded_for(value: str, expected: str | None) -> None:
    assert parse_forwarded_for(value) == expected


def test_allowed_stream_connects_from_the_original_source() -> None:
    decision = decide_inbound(_stream(), {POD}, allow_all)
    assert decision.answer.allow and decision.answer.dst_ip == POD and decision.answer.dst_port == 8080
    assert decision.answer.bind_ip == "10.244.1.10" and decision.source_ip == "10.244.1.10"
    assert decide_inbound(_stream(), {POD}, allow_all, transparent=False).answer.bind_ip is None
    # Without a usable `forwarded`, the pod is reached from the node's own address.
    assert decide_inbound(_stream(forwarded="for=junk"), {POD}, allow_all).answer.bind_ip is None


def test_refusals_have_their_status() -> None:
    assert (
        decide_inbound(_stream(authority="nope"), {POD}, allow_all).answer.deny_status == STATUS_BAD_AUTHORITY
    )
    assert decide_inbound(_stream(), {"10.244.2.11"}, allow_all).answer.deny_status == STATUS_NOT_LOCAL
    seen: list[InboundRequest] = []

    def deny(request: InboundRequest) -> Verdict:
        seen.append(request)
        return Verdict(False, "no")

    denied = decide_inbound(_stream(), {POD}, deny)
    assert not denied.answer.allow and denied.answer.deny_status == STATUS_DENIED and denied.reason == "no"
    assert seen == [InboundRequest("10.244.1.10", WEB, POD, 8080)]


def test_strict_refuses_plaintext_only() -> None:
    strict = with_peer_authentication(allow_all, "STRICT")
    assert not strict(InboundRequest("10.0.0.1", None, POD, 80)).allowed
    assert strict(InboundRequest("10.0.0.1", WEB, POD, 80)).allowed
    assert with_peer_authentication(allow_all, "PERMISSIVE")(
        InboundRequest("10.0.0.1", None, POD, 80)
    ).allowed
    assert not decide_plaintext("10.0.0.1", POD, 80, {POD}, strict).allowed
    assert decide_plaintext("10.0.0.1", POD, 80, {POD}, allow_all).allowed
    assert not decide_plaintext("10.0.0.1", "10.244.2.99", 80, {POD}, allow_all).allowed


def test_authz_engine_as_the_policy_hook() -> None:
    config = AuthzConfig.model_validate(
        {
            "peer_authentication": [{"name": "strict", "mode": "STRICT"}],
            "authorization_policies": [
                {
                    "name": "no-bots",
                    "namespace": "shop",
                    "action": "DENY",
                    "rules": [{"from": [{"namespaces": ["blocked"]}]}],
                }
            ],
        }
    )
    engine = compile_authz(config, JwksRefresher(), {POD: Workload.of("shop", "api")})
    policy = authz_policy(engine)
    assert decide_inbound(_stream(peer=WEB), {POD}, policy).answer.allow
    blocked = decide_inbound(_stream(peer=BLOCKED), {POD}, policy)
    assert not blocked.answer.allow and blocked.answer.deny_status == STATUS_DENIED
    # STRICT (PeerAuthentication): plaintext to the pod is refused, by the same hook.
    assert not decide_plaintext("10.0.0.1", POD, 8080, {POD}, policy).allowed


def test_forwarded_source_must_belong_to_the_verified_identity() -> None:
    owners = {"10.244.1.10": WEB, "10.244.1.11": BLOCKED}.get
    assert decide_inbound(_stream(), {POD}, allow_all, identity_of=owners).answer.allow
    borrowed = decide_inbound(_stream(forwarded="for=10.244.1.11"), {POD}, allow_all, identity_of=owners)
    assert not borrowed.answer.allow and borrowed.answer.deny_status == STATUS_DENIED
    unknown = decide_inbound(_stream(forwarded="for=10.9.9.9"), {POD}, allow_all, identity_of=owners)
    assert not unknown.answer.allow
    # Without a mapping, the peer node's word is taken (the lab and tests without an identity config).
    assert decide_inbound(_stream(forwarded="for=10.9.9.9"), {POD}, allow_all).answer.allow


def test_l7_checked_streams_are_judged_by_what_their_connection_decides() -> None:
    """ALLOW shop/web on /api/* only, DENY /admin (L7 only), DENY port 9090 (L4 only). A stream the
    sending node checked per request passes on its principal; the same stream as plain L4 is refused;
    plaintext is never taken as checked, even if a caller says so."""
    config = AuthzConfig.model_validate(
        {
            "authorization_policies": [
                {
                    "name": "web-api",
                    "namespace": "shop",
                    "rules": [
                        {
                            "from": [{"principals": [WEB.removeprefix("spiffe://")]}],
                            "to": [{"paths": ["/api/*"]}],
                        }
                    ],
                },
                {
                    "name": "no-admin",
                    "namespace": "shop",
                    "action": "DENY",
                    "rules": [{"to": [{"paths": ["/admin"]}]}],
                },
                {
                    "name": "no-9090",
                    "namespace": "shop",
                    "action": "DENY",
                    "rules": [{"to": [{"ports": [9090]}]}],
                },
            ]
        }
    )
    engine = compile_authz(config, JwksRefresher(), {POD: Workload.of("shop", "api")})
    policy = authz_policy(engine)
    checked = decide_inbound(_stream(l7_checked=True), {POD}, policy)
    assert checked.answer.allow and "shop/web-api" in checked.reason
    plain = decide_inbound(_stream(), {POD}, policy)
    assert not plain.answer.allow and plain.answer.deny_status == STATUS_DENIED
    assert "shop/no-admin" in plain.reason  # the L7-only DENY denies a plain connection
    other = decide_inbound(_stream(peer=BLOCKED, l7_checked=True), {POD}, policy)
    assert not other.answer.allow and "matched no ALLOW policy (shop/web-api)" in other.reason
    legacy = decide_inbound(_stream(authority=f"{POD}:9090", l7_checked=True), {POD}, policy)
    assert not legacy.answer.allow and "shop/no-9090" in legacy.reason
    # Plaintext has no verified peer to make the claim: judged at L4 (the L7-only DENY applies).
    claimed = policy(InboundRequest("10.244.1.10", None, POD, 8080, l7_checked=True))
    assert not claimed.allowed and "shop/no-admin" in claimed.reason


def test_decide_inbound_passes_the_claim_to_the_policy() -> None:
    seen: list[InboundRequest] = []

    def record(request: InboundRequest) -> Verdict:
        seen.append(request)
        return Verdict(True, "ok")

    decide_inbound(_stream(l7_checked=True), {POD}, record)
    decide_inbound(_stream(), {POD}, record)
    assert [r.l7_checked for r in seen] == [True, False]
