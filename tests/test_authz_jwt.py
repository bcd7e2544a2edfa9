"""JWT authentication: key binding, every rejection the issue lists, the unknown-kid re-fetch and its
rate bound, header extraction and forwarding, and JWKS fetched from a real HTTPS server on loopback
with a test CA."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from joserfc import jwk, jws

from nodeproxy.authz.config import JwtRule, JwtSettings, RequestAuthentication
from nodeproxy.authz.jwt import (
    JwksError,
    JwksRefresher,
    JwksSource,
    JwtAuthenticator,
    JwtFailure,
    JwtSuccess,
    VerifiedTokens,
    blocking_loader,
    fetch_https,
    parse_jwks,
)

ISSUER = "https://issuer.example"
NOW = 1_800_000_000.0  # the injected wall clock


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Keys:
    rsa: jwk.RSAKey = field(default_factory=lambda: jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa1"}))
    ec: jwk.ECKey = field(default_factory=lambda: jwk.ECKey.generate_key("P-256", parameters={"kid": "ec1"}))
    ed: jwk.OKPKey = field(
        default_factory=lambda: jwk.OKPKey.generate_key("Ed25519", parameters={"kid": "ed1"})
    )

    def jwks(self, *keys: jwk.Key) -> str:
        chosen = keys or (self.rsa, self.ec, self.ed)
        return json.dumps({"keys": [k.as_dict(private=False) for k in chosen]})


KEYS = Keys()  # key generation is slow-ish: one set for the module


def sign(
    claims: dict[str, Any] | None = None,
    *,
    key: jwk.Key | None = None,
    alg: str = "RS256",
    header: dict[str, Any] | None = None,
    **overrides: Any,
) -> str:
    body: dict[str, Any] = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 600, "iat": NOW - 10}
    body.update(claims or {})
    body.update(overrides)
    body = {k: v for k, v in body.items() if v is not None}
    key = key or KEYS.rsa
    protected = {"alg": alg, "typ": "JWT", **({"kid": key.kid} if key.kid else {}), **(header or {})}
    protected = {k: v for k, v in protected.items() if v is not None}
    return jws.serialize_compact(protected, json.dumps(body).encode(), key, algorithms=[alg])


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def authenticator(
    rule: dict[str, Any] | None = None,
    *,
    jwks: str | None = None,
    settings: dict[str, Any] | None = None,
    require_token: bool = False,
    clock: FakeClock | None = None,
) -> tuple[JwtAuthenticator, JwksSource]:
    spec = {"issuer": ISSUER, "audiences": ["shop"], "jwks": jwks or KEYS.jwks(), **(rule or {})}
    ra = RequestAuthentication.model_validate(
        {"name": "ra", "jwt_rules": [spec], "require_token": require_token}
    )
    jwt_settings = JwtSettings.model_validate(settings or {})
    refresher = JwksRefresher(clock=clock or FakeClock())
    sources = refresher.sources_for(ra.jwt_rules, jwt_settings)
    auth = JwtAuthenticator.build(ra.jwt_rules, sources, jwt_settings, require_token, wall_clock=lambda: NOW)
    return auth, next(iter(sources.values()))


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def rejected(outcome: JwtSuccess | JwtFailure, description: str) -> JwtFailure:
    assert isinstance(outcome, JwtFailure), outcome
    assert outcome.www_authenticate == f'Bearer error="invalid_token", error_description="{description}"', (
        outcome
    )
    return outcome


# ---- valid tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"), [(KEYS.rsa, "RS256"), (KEYS.ec, "ES256"), (KEYS.ed, "EdDSA"), (KEYS.ed, "Ed25519")]
)
def test_valid_token_each_algorithm(key: jwk.Key, alg: str) -> None:
    auth, _ = authenticator()
    outcome = auth.authenticate(bearer(sign(key=key, alg=alg, groups=["ops"])))
    assert isinstance(outcome, JwtSuccess), outcome
    assert outcome.identity is not None
    assert outcome.identity.principal == f"{ISSUER}/alice"
    assert outcome.identity.audiences == ("shop",)
    assert outcome.identity.claims["groups"] == ["ops"]
    assert outcome.headers_remove == ("authorization",)  # forward_original_token is off by default


def test_token_without_kid_tries_keys_bound_to_its_alg() -> None:
    auth, _ = authenticator()
    anonymous = jwk.ECKey.import_key(KEYS.ec.as_dict(private=True))  # same key material
    token = sign(key=anonymous, alg="ES256", header={"kid": None})
    assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert isinstance(auth.authenticate(bearer(token)), JwtSuccess)


def test_audience_list_and_no_audience_check() -> None:
    auth, _ = authenticator()
    assert isinstance(auth.authenticate(bearer(sign(aud=["other", "shop"]))), JwtSuccess)
    open_auth, _ = authenticator({"audiences": []})
    assert isinstance(open_auth.authenticate(bearer(sign(aud="anything"))), JwtSuccess)
    assert isinstance(open_auth.authenticate(bearer(sign(aud=None))), JwtSuccess)


# ---- each rejection --------------------------------------------------------------------------


def test_expired() -> None:
    auth, _ = authenticator()
    rejected(auth.authenticate(bearer(sign(exp=NOW - 61))), "token expired")
    # Within the default 60 s clock skew it still passes.
    assert isinstance(auth.authenticate(bearer(sign(exp=NOW - 59))), JwtSuccess)


def test_clock_skew_is_configurable() -> None:
    auth, _ = authenticator(settings={"clock_skew": "5s"})
    rejected(auth.authenticate(bearer(sign(exp=NOW - 6))), "token expired")
    rejected(auth.authenticate(bearer(sign(nbf=NOW + 6))), "token not yet valid")
    assert isinstance(auth.authenticate(bearer(sign(exp=NOW - 4, nbf=NOW + 4))), JwtSuccess)


def test_clock_skew_above_60s_is_refused() -> None:
    with pytest.raises(ValueError, match="between 0 s and 60 s"):
        JwtSettings.model_validate({"clock_skew": "61s"})


def test_not_yet_valid_and_issued_in_the_future() -> None:
    auth, _ = authenticator()
    rejected(auth.authenticate(bearer(sign(nbf=NOW + 120))), "token not yet valid")
    rejected(auth.authenticate(bearer(sign(iat=NOW + 120))), "token issued in the future")


def test_missing_exp_rejected_unless_allowed() -> None:
    auth, _ = authenticator()
    rejected(auth.authenticate(bearer(sign(exp=None))), "no expiration")
    lenient, _ = authenticator({"require_expiration": False})
    assert isinstance(lenient.authenticate(bearer(sign(exp=None))), JwtSuccess)


@pytest.mark.parametrize("bad", ["soon", True, None])
def test_non_numeric_times(bad: Any) -> None:
    auth, _ = authenticator({"require_expiration": False})
    if bad is None:
        return
    rejected(auth.authenticate(bearer(sign(exp=bad))), "malformed token")
    rejected(auth.authenticate(bearer(sign(nbf=bad))), "malformed token")


def test_wrong_audience() -> None:
    auth, _ = authenticator()
    rejected(auth.authenticate(bearer(sign(aud="billing"))), "audience not accepted")
    rejected(auth.authenticate(bearer(sign(aud=None))), "audience not accepted")
    rejected(auth.authenticate(bearer(sign(aud=[1, 2]))), "malformed token")


def test_wrong_issuer() -> None:
    auth, _ = authenticator()
    failure = rejected(auth.authenticate(bearer(sign(iss="https://evil.example"))), "issuer not accepted")
    assert "evil.example" in failure.reason


def test_tampered_signature() -> None:
    auth, _ = authenticator()
    header, payload, signature = sign().split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    raw[10] ^= 1
    rejected(auth.authenticate(bearer(f"{header}.{payload}.{b64(bytes(raw))}")), "invalid signature")


def test_tampered_payload() -> None:
    auth, _ = authenticator()
    header, _, signature = sign().split(".")
    forged = b64(json.dumps({"iss": ISSUER, "sub": "root", "aud": "shop", "exp": NOW + 600}).encode())
    rejected(auth.authenticate(bearer(f"{header}.{forged}.{signature}")), "invalid signature")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none(alg: str) -> None:
    auth, _ = authenticator()
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 600}
    rejected(
        auth.authenticate(bearer(unsigned({"alg": alg, "kid": "rsa1"}, claims))), "algorithm not accepted"
    )
    rejected(auth.authenticate(bearer(unsigned({"alg": alg}, claims))), "algorithm not accepted")


@pytest.mark.parametrize(
    "secret",
    [
        KEYS.rsa.as_pem(private=False),  # the PEM public key as the HMAC secret (CVE-2022-29217)
        json.dumps(KEYS.rsa.as_dict(private=False)).encode(),
        base64.urlsafe_b64decode(str(KEYS.rsa.as_dict(private=False)["n"]) + "=="),
    ],
)
def test_hs256_signed_with_the_public_key(secret: bytes) -> None:
    auth, _ = authenticator()
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 600}
    for kid in ("rsa1", None):
        header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        rejected(auth.authenticate(bearer(f"{signing_input}.{b64(mac)}")), "algorithm not accepted")


def test_alg_not_matching_the_key() -> None:
    auth, _ = authenticator()
    # An ES256 signature made with the EC key but naming the RSA key's kid.
    token = sign(key=KEYS.ec, alg="ES256", header={"kid": "rsa1"})
    failure = rejected(auth.authenticate(bearer(token)), "algorithm does not match the key")
    assert "bound to RS256" in failure.reason
    # A JWK's own alg narrows the binding: an Ed25519 key pinned to "EdDSA" refuses "Ed25519".
    pinned = json.dumps({"keys": [{**KEYS.ed.as_dict(private=False), "alg": "EdDSA"}]})
    auth2, _ = authenticator(jwks=pinned)
    assert isinstance(auth2.authenticate(bearer(sign(key=KEYS.ed, alg="EdDSA"))), JwtSuccess)
    rejected(auth2.authenticate(bearer(sign(key=KEYS.ed, alg="Ed25519"))), "algorithm does not match the key")


def rs256_by_hand(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A correctly RS256-signed token with any header (joserfc refuses to make some of them)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    private = KEYS.rsa.get_op_key("sign")
    assert isinstance(private, rsa.RSAPrivateKey)
    signature = private.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64(signature)}"


def test_crit_header_rejected() -> None:
    auth, _ = authenticator()
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": NOW + 600}
    assert isinstance(
        auth.authenticate(bearer(rs256_by_hand({"alg": "RS256", "kid": "rsa1"}, claims))), JwtSuccess
    )
    token = rs256_by_hand({"alg": "RS256", "kid": "rsa1", "crit": ["x-ext"], "x-ext": 1}, claims)
    rejected(auth.authenticate(bearer(token)), "unsupported header")


def test_embedded_jwk_is_never_used() -> None:
    auth, _ = authenticator()
    attacker = jwk.RSAKey.generate_key(2048, parameters={"kid": "rsa1"})
    token = sign(key=attacker, header={"jwk": attacker.as_dict(private=False), "jku": "https://evil/jwks"})
    rejected(auth.authenticate(bearer(token)), "invalid signature")


@pytest.mark.parametrize("token", ["abc", "a.b", "a.b.c.d.e", "!!.??.**", "e30.e30.", "W10.e30.AA"])
def test_malformed(token: str) -> None:
    auth, _ = authenticator()
    outcome = auth.authenticate(bearer(token))
    assert isinstance(outcome, JwtFailure)
    assert outcome.www_authenticate.startswith('Bearer error="invalid_token"')


def test_oversized_token() -> None:
    auth, _ = authenticator()
    rejected(auth.authenticate(bearer("a" * 20000)), "token too large")


# ---- unknown kid: re-fetch requested, rate bounded ---------------------------------------------


def test_unknown_kid_requests_a_bounded_refetch() -> None:
    clock = FakeClock(1000.0)
    auth, source = authenticator(settings={"jwks_min_refetch_interval": "30s"}, clock=clock)
    wakes: list[None] = []
    source.waker = lambda: wakes.append(None)
    stranger = jwk.RSAKey.generate_key(2048, parameters={"kid": "new"})
    # The inline source was loaded at t=1000: within 30 s of that, no re-fetch.
    failure = rejected(auth.authenticate(bearer(sign(key=stranger))), "unknown key id")
    assert not failure.refetch_requested
    clock.now += 31
    failure = rejected(auth.authenticate(bearer(sign(key=stranger))), "unknown key id")
    assert failure.refetch_requested and source.wanted and len(wakes) == 1
    # A flood of unknown kids while one re-fetch is pending or recent asks for nothing more.
    for i in range(100):
        token = sign(key=stranger, header={"kid": f"k{i}"})
        assert not rejected(auth.authenticate(bearer(token)), "unknown key id").refetch_requested
    assert source.refetch_requests == 1 and len(wakes) == 1


def test_refetch_rate_over_time_with_the_refresher() -> None:
    """Unknown kids every 0.1 s for 3 s of fake time; with a 1 s bound the source is fetched about
    once a second, never more."""
    clock = FakeClock(0.0)
    loads: list[float] = []

    async def scenario() -> None:
        settings = JwtSettings.model_validate(
            {"jwks_min_refetch_interval": "1s", "jwks_refresh_interval": "1h"}
        )

        def load() -> bytes:
            loads.append(clock.now)
            return KEYS.jwks().encode()

        source = JwksSource("test", blocking_loader(load), settings, clock)
        refresher = JwksRefresher(clock=clock)
        refresher._sources = {("test",): source}  # a source built by hand, as sources_for would
        source.waker = refresher._wake.set
        task = asyncio.create_task(refresher.run())
        try:
            for _ in range(30):
                source.request_refetch()
                # Let the refresher finish whatever it started before fake time moves on (real time
                # bounded, so that a loaded machine changes nothing but the wait).
                deadline = time.monotonic() + 10
                await asyncio.sleep(0)
                while (source.wanted or len(loads) < source.fetches) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.005)
                clock.now += 0.1
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert 3 <= len(loads) <= 4, loads
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(loads)), loads


def test_keys_not_loaded_yet_requests_fetch() -> None:
    settings = JwtSettings()
    rule = JwtRule.model_validate({"issuer": ISSUER, "jwks_uri": "https://127.0.0.1:1/jwks"})
    refresher = JwksRefresher(clock=FakeClock())
    sources = refresher.sources_for([rule], settings)
    auth = JwtAuthenticator.build([rule], sources, settings, False, wall_clock=lambda: NOW)
    failure = rejected(auth.authenticate(bearer(sign())), "keys unavailable")
    assert "first fetch pending" in failure.reason


# ---- extraction and forwarding --------------------------------------------------------------


def test_missing_token_allowed_or_required() -> None:
    auth, _ = authenticator()
    outcome = auth.authenticate({})
    assert isinstance(outcome, JwtSuccess) and outcome.identity is None
    strict, _ = authenticator(require_token=True)
    failure = strict.authenticate({})
    assert isinstance(failure, JwtFailure) and failure.www_authenticate == "Bearer"
    # Another scheme in Authorization is not a bearer token.
    assert isinstance(strict.authenticate({"authorization": "Basic YTpi"}), JwtFailure)
    assert isinstance(auth.authenticate({"authorization": "Basic YTpi"}), JwtSuccess)


def test_bearer_scheme_is_case_insensitive() -> None:
    auth, _ = authenticator()
    assert isinstance(auth.authenticate({"authorization": f"bearer {sign()}"}), JwtSuccess)


def test_token_from_custom_header_and_query_parameter() -> None:
    auth, _ = authenticator({"from_headers": [{"name": "x-jwt"}], "from_params": ["access_token"]})
    assert auth.header_names == frozenset({"x-jwt"})
    ok = auth.authenticate({"x-jwt": sign()})
    assert isinstance(ok, JwtSuccess) and ok.headers_remove == ("x-jwt",)
    ok = auth.authenticate({}, f"a=1&access_token={sign()}")
    assert isinstance(ok, JwtSuccess) and ok.identity is not None
    # The default Authorization location is replaced, not added to.
    assert isinstance(auth.authenticate(bearer(sign())), JwtSuccess)
    assert auth.authenticate(bearer(sign())) == JwtSuccess(None, (), ())


def test_two_different_tokens_rejected() -> None:
    auth, _ = authenticator(
        {"from_headers": [{"name": "authorization", "prefix": "Bearer "}, {"name": "x-jwt"}]}
    )
    rejected(auth.authenticate({**bearer(sign()), "x-jwt": sign(sub="bob")}), "multiple tokens")
    same = sign()
    assert isinstance(auth.authenticate({**bearer(same), "x-jwt": same}), JwtSuccess)


def test_claims_to_headers_and_spoofing_removed() -> None:
    auth, _ = authenticator(
        {
            "forward_original_token": True,
            "output_claim_to_headers": [
                {"header": "x-user", "claim": "sub"},
                {"header": "x-groups", "claim": "groups"},
                {"header": "x-admin", "claim": "admin"},
                {"header": "x-evil", "claim": "evil"},
            ],
            "output_payload_to_header": "x-jwt-payload",
        }
    )
    outcome = auth.authenticate(bearer(sign(groups=["a", "b"], admin=True, evil="x\r\nset-cookie: y")))
    assert isinstance(outcome, JwtSuccess) and outcome.identity is not None
    added = dict(outcome.headers_add)
    assert added["x-user"] == "alice" and added["x-groups"] == "a,b" and added["x-admin"] == "true"
    assert "x-evil" not in added  # a value with CR/LF is never copied into a header
    assert json.loads(base64.urlsafe_b64decode(added["x-jwt-payload"] + "==")) == outcome.identity.claims
    # Client-sent copies of every output header go, the token stays (forward_original_token).
    assert set(outcome.headers_remove) == {"x-user", "x-groups", "x-admin", "x-evil", "x-jwt-payload"}
    # Without a token the spoofable headers are still removed.
    anonymous = auth.authenticate({"x-user": "root"})
    assert isinstance(anonymous, JwtSuccess) and "x-user" in anonymous.headers_remove


def test_rule_config_checks() -> None:
    with pytest.raises(ValueError, match="exactly one of jwks_uri, jwks_file, jwks"):
        JwtRule.model_validate({"issuer": ISSUER})
    with pytest.raises(ValueError, match="https:// URL"):
        JwtRule.model_validate({"issuer": ISSUER, "jwks_uri": "http://idp/jwks"})
    with pytest.raises(ValueError, match="cannot receive a claim"):
        JwtRule.model_validate(
            {
                "issuer": ISSUER,
                "jwks": KEYS.jwks(),
                "output_claim_to_headers": [{"header": "host", "claim": "sub"}],
            }
        )
    jwks = KEYS.jwks()
    with pytest.raises(ValueError, match="appears in two jwt_rules"):
        RequestAuthentication.model_validate(
            {"name": "a", "jwt_rules": [{"issuer": ISSUER, "jwks": jwks}, {"issuer": ISSUER, "jwks": jwks}]}
        )
    with pytest.raises(ValueError, match='jwks: not a JWKS: expected a JSON object with a "keys" list'):
        JwtRule.model_validate({"issuer": ISSUER, "jwks": "{}"})
    with pytest.raises(
        ValueError, match=r"jwks: no usable key \(keys\[0\]: holds private or symmetric key material"
    ):
        JwtRule.model_validate({"issuer": ISSUER, "jwks": '{"keys": [{"kty": "oct", "k": "AA"}]}'})


# ---- key binding in parse_jwks ----------------------------------------------------------------


def test_parse_jwks_binds_and_skips() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    small_jwk = jwk.RSAKey.import_key(small.public_key()).as_dict(private=False)
    p384 = jwk.ECKey.generate_key("P-384").as_dict(private=False)
    entries = [
        {**KEYS.rsa.as_dict(private=False)},
        {**KEYS.ec.as_dict(private=False), "kid": "ec-as-rs", "alg": "RS256"},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {**small_jwk, "kid": "small"},
        {**p384, "kid": "p384"},
        {**KEYS.ed.as_dict(private=True), "kid": "private"},
        {**KEYS.ec.as_dict(private=False), "kid": "enc", "use": "enc"},
        {**KEYS.ec.as_dict(private=False), "kid": "rsa1"},  # duplicate kid
        {**KEYS.rsa.as_dict(private=False), "kid": "ps", "alg": "PS256"},
        "junk",
    ]
    snapshot = parse_jwks(json.dumps({"keys": entries}))
    assert [k.kid for k in snapshot.keys] == ["rsa1"]
    assert snapshot.keys[0].algorithms == frozenset({"RS256"})
    reasons = "\n".join(snapshot.skipped)
    for expected in (
        "ec-as-rs",
        "hmac",
        "1024 bits",
        "P-384",
        "private",
        "'enc'",
        "second key with this kid",
        "PS256",
        "not an object",
    ):
        assert expected in reasons, expected


@pytest.mark.parametrize(
    "document", ["", "[]", '{"keys": 1}', '{"keys": []}', '{"keys": [{"kty": "oct", "k": "AA"}]}']
)
def test_parse_jwks_unusable(document: str) -> None:
    with pytest.raises(JwksError):
        parse_jwks(document)


def test_rfc8037_ed25519_vector() -> None:
    """RFC 8037 appendix A.1 (public key) and A.4 (the JWS over 'Example of Ed25519 signing')."""
    public = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    snapshot = parse_jwks(json.dumps({"keys": [public]}))
    token = (
        "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
    )
    assert JwtAuthenticator._signature_valid(token, "EdDSA", snapshot.keys) == b"Example of Ed25519 signing"
    assert JwtAuthenticator._signature_valid(token[:-2] + "AA", "EdDSA", snapshot.keys) is None


# ---- file source --------------------------------------------------------------------------------


def test_jwks_file_loaded_at_config_time_and_failures_keep_old_keys(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(KEYS.jwks(KEYS.rsa))
    rule = JwtRule.model_validate({"issuer": ISSUER, "jwks_file": str(path)})
    settings = JwtSettings()
    refresher = JwksRefresher(clock=FakeClock())
    sources = refresher.sources_for([rule], settings)
    source = next(iter(sources.values()))
    assert source.snapshot is not None and [k.kid for k in source.snapshot.keys] == ["rsa1"]
    path.write_text("not json")

    async def refresh() -> None:
        await source.refresh()

    asyncio.run(refresh())
    assert source.last_error is not None and "not JSON" in source.last_error
    assert source.snapshot is not None and [k.kid for k in source.snapshot.keys] == ["rsa1"]
    # A reload with the same rule keeps the same source (and its keys).
    assert next(iter(refresher.sources_for([rule], settings).values())) is source


# ---- JWKS over real HTTPS on loopback --------------------------------------------------------


@dataclass
class Pki:
    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def _make_pki(directory: Path, *, ca_name: str = "nodeproxy test CA") -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca_name)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test server")]))
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return pki


@dataclass
class JwksServer:
    url: str
    hits: list[str]
    set_body: Callable[[str], None]
    set_redirect: Callable[[str | None], None]
    set_dribble: Callable[[float], None]
    set_chunked: Callable[[bool], None]


@pytest.fixture
def https_jwks(tmp_path: Path) -> Iterator[tuple[JwksServer, Pki]]:
    """An HTTPS server on 127.0.0.1 (ephemeral port) with a certificate from a throwaway CA."""
    pki = _make_pki(tmp_path / "pki")
    state: dict[str, Any] = {"body": KEYS.jwks(KEYS.rsa), "redirect": None, "dribble": 0.0, "chunked": False}
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            hits.append(self.path)
            if state["redirect"] is not None and self.path == "/jwks":
                self.send_response(302)
                self.send_header("Location", state["redirect"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = state["body"].encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/jwk-set+json")
            if state["chunked"]:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for i in range(0, len(body), 100):
                    piece = body[i : i + 100]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.write(b"0\r\n\r\n")
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not state["dribble"]:
                self.wfile.write(body)
                return
            # A slow server: one byte per `dribble` seconds, at most 40 of them (bounded).
            try:
                for byte in body[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(state["dribble"])
            except OSError:
                pass  # the client gave up: what this mode is for

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert_pem, pki.key_pem)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]

    def set_body(body: str) -> None:
        state["body"] = body

    def set_redirect(location: str | None) -> None:
        state["redirect"] = location

    def set_dribble(seconds: float) -> None:
        state["dribble"] = seconds

    def set_chunked(chunked: bool) -> None:
        state["chunked"] = chunked

    try:
        url = f"https://127.0.0.1:{port}/jwks"
        yield JwksServer(url, hits, set_body, set_redirect, set_dribble, set_chunked), pki
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_fetch_https_verifies_the_server(https_jwks: tuple[JwksServer, Pki], tmp_path: Path) -> None:
    server, pki = https_jwks
    data = asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 1 << 20))
    assert parse_jwks(data).keys[0].kid == "rsa1"
    other = _make_pki(tmp_path / "other", ca_name="another CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(fetch_https(server.url, str(other.ca_pem), 5.0, 1 << 20))
    # Without the test CA (the system's CAs) the server is not trusted either.
    with pytest.raises(ssl.SSLCertVerificationError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(fetch_https(server.url, None, 5.0, 1 << 20))
    with pytest.raises(JwksError, match="larger than 100 bytes"):
        asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 100))
    server.set_chunked(True)
    assert asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 1 << 20)) == data
    with pytest.raises(JwksError, match="larger than 150 bytes"):
        asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 150))


def test_fetch_https_follows_https_redirects_a_few_times(https_jwks: tuple[JwksServer, Pki]) -> None:
    server, pki = https_jwks
    server.set_redirect("/keys")  # relative, on the same https server
    data = asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 1 << 20))
    assert parse_jwks(data).keys[0].kid == "rsa1"
    assert server.hits[-2:] == ["/jwks", "/keys"]
    server.set_redirect(server.url)  # to itself, forever
    with pytest.raises(JwksError, match="more than 3 redirects"):
        asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 1 << 20))


def test_fetch_https_refuses_redirect_to_http(https_jwks: tuple[JwksServer, Pki]) -> None:
    server, pki = https_jwks
    server.set_redirect("http://127.0.0.1:1/jwks")
    with pytest.raises(JwksError, match="refusing a redirect away from https"):
        asyncio.run(fetch_https(server.url, str(pki.ca_pem), 5.0, 1 << 20))


def test_jwks_over_https_with_rotation_and_unknown_kid(https_jwks: tuple[JwksServer, Pki]) -> None:
    """The refresher fetches over real TLS; a key added at the IdP is picked up through the unknown-kid
    re-fetch; a flood of unknown kids costs one fetch per min_refetch_interval."""
    server, pki = https_jwks
    rule = JwtRule.model_validate(
        {"issuer": ISSUER, "audiences": ["shop"], "jwks_uri": server.url, "jwks_ca_file": str(pki.ca_pem)}
    )
    settings = JwtSettings.model_validate({"jwks_min_refetch_interval": "1s", "jwks_refresh_interval": "1h"})
    rotated = jwk.ECKey.generate_key("P-256", parameters={"kid": "rotated"})

    async def scenario() -> None:
        refresher = JwksRefresher()
        sources = refresher.sources_for([rule], settings)
        auth = JwtAuthenticator.build([rule], sources, settings, False, wall_clock=lambda: NOW)
        task = asyncio.create_task(refresher.run())
        try:
            assert await refresher.wait_loaded(10.0)
            assert len(server.hits) == 1
            assert isinstance(auth.authenticate(bearer(sign())), JwtSuccess)
            # The IdP rotates in a new key; a token signed with it is unknown until the re-fetch.
            server.set_body(KEYS.jwks(KEYS.rsa, rotated))
            new_token = sign(key=rotated, alg="ES256")
            await asyncio.sleep(1.05)  # past min_refetch_interval since the first fetch
            hits_before = len(server.hits)
            first = auth.authenticate(bearer(new_token))
            assert isinstance(first, JwtFailure) and first.refetch_requested
            # The request path did not fetch: the server saw nothing yet (the fetch needs the loop).
            assert len(server.hits) == hits_before
            outcome: JwtSuccess | JwtFailure = first
            deadline = time.monotonic() + 10
            flood = 0
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                outcome = auth.authenticate(bearer(new_token))
                if isinstance(outcome, JwtSuccess):
                    break
            assert isinstance(outcome, JwtSuccess), outcome
            hits_after_rotation = len(server.hits)
            assert hits_after_rotation >= 2
            # 2 s of unknown-kid tokens, ~100 per second: about 2 fetches (1 s bound), never 200.
            stranger = jwk.RSAKey.generate_key(2048, parameters={"kid": "stranger"})
            bogus = sign(key=stranger)
            flood_start = time.monotonic()
            end = flood_start + 2.0
            while time.monotonic() < end:
                assert isinstance(auth.authenticate(bearer(bogus)), JwtFailure)
                flood += 1
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            elapsed = time.monotonic() - flood_start
            fetches = len(server.hits) - hits_after_rotation
            assert flood >= 20
            # At most one fetch per started second (plus the one a flood may find already due).
            assert 1 <= fetches <= int(elapsed) + 1, (fetches, elapsed, flood)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_https_failure_keeps_old_keys_and_backs_off(https_jwks: tuple[JwksServer, Pki]) -> None:
    server, pki = https_jwks
    rule = JwtRule.model_validate({"issuer": ISSUER, "jwks_uri": server.url, "jwks_ca_file": str(pki.ca_pem)})
    settings = JwtSettings.model_validate({"jwks_refresh_interval": "1s", "jwks_min_refetch_interval": "1s"})

    async def scenario() -> None:
        refresher = JwksRefresher()
        sources = refresher.sources_for([rule], settings)
        source = next(iter(sources.values()))
        task = asyncio.create_task(refresher.run())
        try:
            assert await refresher.wait_loaded(10.0)
            server.set_body("{not json")
            deadline = time.monotonic() + 10
            while source.failures == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert source.failures >= 1 and source.last_error is not None
            assert source.snapshot is not None and source.snapshot.keys[0].kid == "rsa1"
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_reload_with_new_settings_keeps_loaded_keys(https_jwks: tuple[JwksServer, Pki]) -> None:
    """Changing jwt settings rebuilds the sources; tokens must keep verifying right after the reload
    (before the rebuilt source's first fetch)."""
    server, pki = https_jwks
    rule = JwtRule.model_validate({"issuer": ISSUER, "jwks_uri": server.url, "jwks_ca_file": str(pki.ca_pem)})

    async def scenario() -> None:
        refresher = JwksRefresher()
        refresher.sources_for([rule], JwtSettings())
        task = asyncio.create_task(refresher.run())
        try:
            assert await refresher.wait_loaded(10.0)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        changed = JwtSettings.model_validate({"clock_skew": "10s"})
        sources = refresher.sources_for([rule], changed)
        auth = JwtAuthenticator.build([rule], sources, changed, False, wall_clock=lambda: NOW)
        assert next(iter(sources.values())).settings.clock_skew == 10.0
        assert isinstance(auth.authenticate(bearer(sign(aud=None))), JwtSuccess)

    asyncio.run(scenario())


def test_a_slow_jwks_server_does_not_hold_up_other_sources() -> None:
    release = threading.Event()
    fast_loads: list[float] = []
    settings = JwtSettings.model_validate({"jwks_fetch_timeout": "5s", "jwks_min_refetch_interval": "1s"})

    def slow() -> bytes:
        release.wait(5.0)
        return KEYS.jwks().encode()

    def fast() -> bytes:
        fast_loads.append(time.monotonic())
        return KEYS.jwks().encode()

    async def scenario() -> None:
        refresher = JwksRefresher()
        slow_source = JwksSource("slow", blocking_loader(slow), settings)
        fast_source = JwksSource("fast", blocking_loader(fast), settings)
        refresher._sources = {("slow",): slow_source, ("fast",): fast_source}
        for source in (slow_source, fast_source):
            source.waker = refresher._wake.set
        task = asyncio.create_task(refresher.run())
        try:
            deadline = time.monotonic() + 3
            while fast_source.snapshot is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert fast_source.snapshot is not None and slow_source.snapshot is None
            # An on-demand re-fetch of the fast source is served while the slow one still hangs.
            await asyncio.sleep(1.0)
            assert fast_source.request_refetch()
            deadline = time.monotonic() + 3
            while len(fast_loads) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert len(fast_loads) == 2 and slow_source.snapshot is None
        finally:
            release.set()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


_VALID = sign(key=KEYS.ec, alg="ES256", role="user")


def _decoded_parts(token: str) -> list[bytes] | None:
    try:
        return [
            base64.b64decode(p + "=" * (-len(p) % 4), altchars=b"-_", validate=True) for p in token.split(".")
        ]
    except (ValueError, binascii.Error):
        return None


@given(
    st.integers(0, len(_VALID) - 1),
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "),
)
@hypothesis_settings(max_examples=400, deadline=None)
def test_any_one_character_change_is_rejected_unless_the_bytes_are_the_same(position: int, char: str) -> None:
    """Change one character of a valid token anywhere: it is rejected, unless the change only touched
    base64 padding bits (then the header, payload and signature bytes are exactly the original's)."""
    mutated = _VALID[:position] + char + _VALID[position + 1 :]
    if mutated == _VALID:
        return
    auth, _ = _MUTATION_AUTH
    outcome = auth.authenticate(bearer(mutated))
    if isinstance(outcome, JwtSuccess):
        assert _decoded_parts(mutated) == _decoded_parts(_VALID), mutated


_MUTATION_AUTH = authenticator()


def test_characters_outside_base64url_make_the_token_malformed() -> None:
    """A lenient base64 decoder skips '!' and would read the original header back (four of them
    keep the padding the same); the strict one refuses the token before any key is looked up."""
    auth, _ = authenticator()
    header, payload, signature = sign().split(".")
    for broken in (
        f"{header[:5]}!!!!{header[5:]}.{payload}.{signature}",
        f"{header}.{payload}!!!!.{signature}",
    ):
        rejected(auth.authenticate(bearer(broken)), "malformed token")


def test_verified_token_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeated token skips the signature check but not the claims; a JWKS change invalidates it."""
    now = [NOW]
    spec = {"issuer": ISSUER, "audiences": ["shop"], "jwks": KEYS.jwks()}
    rule = JwtRule.model_validate(spec)
    refresher = JwksRefresher(clock=FakeClock())
    sources = refresher.sources_for([rule], JwtSettings())
    auth = JwtAuthenticator.build([rule], sources, JwtSettings(), False, wall_clock=lambda: now[0])
    source = next(iter(sources.values()))
    checks: list[str] = []
    original = JwtAuthenticator._signature_valid

    def counting(token: str, alg: str, candidates: Any) -> bytes | None:
        checks.append(token)
        return original(token, alg, candidates)

    monkeypatch.setattr(JwtAuthenticator, "_signature_valid", staticmethod(counting))
    token = sign(exp=NOW + 100)
    for _ in range(5):
        assert isinstance(auth.authenticate(bearer(token)), JwtSuccess)
    assert len(checks) == 1
    now[0] = NOW + 200  # expired now: the cached entry does not skip the time checks
    rejected(auth.authenticate(bearer(token)), "token expired")
    now[0] = NOW
    # The IdP drops the RSA key: a new snapshot, so the token is verified again, and fails.
    source.install(KEYS.jwks(KEYS.ec).encode())
    rejected(auth.authenticate(bearer(token)), "unknown key id")


def test_verified_tokens_are_bounded_in_count_and_bytes() -> None:
    rule = JwtRule.model_validate({"issuer": ISSUER, "jwks": KEYS.jwks()})
    snapshot = parse_jwks(KEYS.jwks())
    cache = VerifiedTokens(max_entries=3, max_bytes=1000)
    for i in range(5):
        cache.put(f"t{i}", rule, snapshot, b"x" * 10, {})
    assert list(cache) == ["t2", "t3", "t4"] and cache.bytes == 3 * 12
    cache.put("big", rule, snapshot, b"x" * 990, {})  # 993 bytes: the older ones make room
    assert list(cache) == ["big"] and cache.bytes == 993
    cache.put("huge", rule, snapshot, b"x" * 2000, {})  # larger than the whole cache: not kept
    assert list(cache) == ["big"]
    cache.put("big", rule, snapshot, b"y" * 10, {})  # replacing an entry recounts its bytes
    assert list(cache) == ["big"] and cache.bytes == 13


def test_verified_token_cache_is_shared_between_workloads_with_the_same_rule() -> None:
    """One engine-wide cache: a token verified for one workload is not verified again for another
    workload under the same rule, and a workload whose rules differ does not take the entry."""
    from nodeproxy.authz.config import AuthzConfig
    from nodeproxy.authz.engine import compile_authz
    from nodeproxy.authz.policy import L4Request, Workload
    from nodeproxy.proxy.http_route import RequestAttrs

    config = AuthzConfig.model_validate(
        {
            "request_authentication": [
                {"name": "ns", "namespace": "shop", "jwt_rules": [{"issuer": ISSUER, "jwks": KEYS.jwks()}]},
                {
                    "name": "other",
                    "namespace": "data",
                    "jwt_rules": [{"issuer": ISSUER, "audiences": ["data"], "jwks": KEYS.jwks()}],
                },
            ]
        }
    )
    workloads = {
        "10.0.0.1": Workload.of("shop", "a"),
        "10.0.0.2": Workload.of("shop", "b"),
        "10.0.0.3": Workload.of("data", "c"),
    }
    engine = compile_authz(config, JwksRefresher(clock=FakeClock()), workloads)
    token = sign(exp=int(time.time()) + 300, iat=None)
    attrs = RequestAttrs("GET", "h", "/", "", bearer(token))
    assert (
        engine.check_request(L4Request("10.9.9.9", None, "10.0.0.1", 80), attrs).__class__.__name__
        == "RequestAllowed"
    )
    entry = engine.verified_tokens.get(token)
    assert entry is not None
    engine.check_request(L4Request("10.9.9.9", None, "10.0.0.2", 80), attrs)
    assert engine.verified_tokens.get(token) is entry  # used as it was, not verified again
    denied = engine.check_request(L4Request("10.9.9.9", None, "10.0.0.3", 80), attrs)
    assert denied.__class__.__name__ == "RequestDenied"  # aud 'shop' is not accepted in data
    assert engine.verified_tokens.get(token) is not entry  # verified under data's own rule


def test_refresher_stops_when_cancelled_as_it_is_woken() -> None:
    """Cancelling the refresher in the same loop iteration in which it is woken must stop it (with
    asyncio.wait_for on Python 3.11 the wake-up won and the cancellation was lost: a hang at stop)."""

    async def scenario() -> None:
        refresher = JwksRefresher()
        task = asyncio.create_task(refresher.run())
        await asyncio.sleep(0.01)  # it is waiting for a wake-up now
        refresher._wake.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:
            task.cancel()  # a second cancel gets through; fail rather than hang
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pytest.fail("the refresher ignored its cancellation")
        assert task.cancelled()

    for _ in range(20):
        asyncio.run(scenario())


def test_fetch_https_bounds_the_whole_body_time(https_jwks: tuple[JwksServer, Pki]) -> None:
    """A server that sends one byte every 0.25 s: the whole fetch still ends after the timeout (1 s),
    not after the 10 s the dribble lasts."""
    server, pki = https_jwks
    server.set_dribble(0.25)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(fetch_https(server.url, str(pki.ca_pem), 1.0, 1 << 20))
    assert time.monotonic() - started < 3.0


def test_backoff_after_very_many_failures_does_not_overflow() -> None:
    source = JwksSource("test", blocking_loader(lambda: b""), JwtSettings(), FakeClock(0.0))
    for _ in range(1100):
        source._failed("down")
    assert 0 < source.next_fetch <= 300.0


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def _hostile_tokens(draw: st.DrawFn) -> str:
    header = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256"]) | _JSON_VALUES,
                "kid": st.sampled_from(["rsa1", "ec1", "nope"]) | _JSON_VALUES,
                "crit": _JSON_VALUES,
                "typ": _JSON_VALUES,
            },
        )
    )
    claims = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "iss": st.just(ISSUER) | _JSON_VALUES,
                "aud": st.just("shop") | _JSON_VALUES,
                "exp": st.just(NOW + 100) | _JSON_VALUES,
                "nbf": _JSON_VALUES,
                "iat": _JSON_VALUES,
                "sub": _JSON_VALUES,
            },
        )
    )
    signature = draw(st.binary(max_size=80))
    token = unsigned(header, claims, signature)
    if draw(st.booleans()):  # sometimes not even well-formed
        position = draw(st.integers(0, len(token)))
        token = token[:position] + draw(st.text(max_size=4)) + token[position:]
    return token


@given(_hostile_tokens())
@hypothesis_settings(max_examples=500, deadline=None)
def test_hostile_tokens_never_raise(token: str) -> None:
    """Whatever the token holds (wrong JSON types, unhashable alg or kid, junk), authenticate answers
    with a failure: an exception here would become a 500 for the request."""
    auth, _ = _MUTATION_AUTH
    outcome = auth.authenticate({"authorization": f"Bearer {token}"})
    assert isinstance(outcome, JwtFailure)


@given(
    st.fixed_dictionaries(
        {"iss": st.just(ISSUER)},
        optional={
            "aud": st.just("shop") | _JSON_VALUES,
            "exp": st.just(NOW + 100) | _JSON_VALUES,
            "nbf": _JSON_VALUES,
            "iat": _JSON_VALUES,
            "sub": _JSON_VALUES,
            "azp": _JSON_VALUES,
            "groups": _JSON_VALUES,
            "realm": _JSON_VALUES,
        },
    )
)
@hypothesis_settings(max_examples=200, deadline=None)
def test_validly_signed_hostile_claims_never_raise(claims: dict[str, Any]) -> None:
    """Correctly signed tokens with claims of any JSON type go through authentication, claim
    forwarding and claim conditions without an exception; success needs a numeric exp and aud
    'shop'."""
    from nodeproxy.authz.config import AuthzConfig
    from nodeproxy.authz.engine import RequestAllowed, RequestDenied, compile_authz
    from nodeproxy.authz.policy import L4Request, Workload
    from nodeproxy.proxy.http_route import RequestAttrs

    engine = _HOSTILE_ENGINE[0]
    if engine is None:
        config = AuthzConfig.model_validate(
            {
                "request_authentication": [
                    {
                        "name": "ra",
                        "jwt_rules": [
                            {
                                "issuer": ISSUER,
                                "audiences": ["shop"],
                                "jwks": KEYS.jwks(),
                                "output_claim_to_headers": [
                                    {"header": "x-sub", "claim": "sub"},
                                    {"header": "x-groups", "claim": "groups"},
                                ],
                            }
                        ],
                    }
                ],
                "authorization_policies": [
                    {
                        "name": "p",
                        "rules": [
                            {"when": [{"key": "request.auth.claims[realm][role]", "values": ["admin"]}]},
                            {"when": [{"key": "request.auth.claims[groups]", "not_values": ["x*"]}]},
                            {"when": [{"key": "request.auth.presenter", "values": ["*"]}]},
                        ],
                    }
                ],
            }
        )
        engine = _HOSTILE_ENGINE[0] = compile_authz(
            config, JwksRefresher(), {"10.0.0.1": Workload.of("a", "b")}
        )
    body = json.dumps(claims).encode()
    token = jws.serialize_compact({"alg": "RS256", "kid": "rsa1"}, body, KEYS.rsa, algorithms=["RS256"])
    verdict = engine.check_request(
        L4Request("10.0.0.9", None, "10.0.0.1", 80), RequestAttrs("GET", "h", "/", "", bearer(token))
    )
    assert isinstance(verdict, RequestAllowed | RequestDenied)
    exp = claims.get("exp")
    aud = claims.get("aud")
    if isinstance(verdict, RequestAllowed) or verdict.status == 403:  # authentication passed
        assert isinstance(exp, int | float) and not isinstance(exp, bool) and exp + 60 >= time.time()
        assert aud == "shop" or (isinstance(aud, list) and "shop" in aud)


_HOSTILE_ENGINE: list[Any] = [None]
