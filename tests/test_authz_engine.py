"""The authz engine as http.py and the listener call it: peer-authentication modes, connection
verdicts (L4), request verdicts (401 with WWW-Authenticate / gRPC 16, 403 / gRPC 7, forwarding
edits), path-normalization bypasses, scoping of RequestAuthentication, and the documented example
config."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from joserfc import jwk, jws
from pydantic import ValidationError

from nodeproxy.authz.config import AuthzConfig, PeerAuthentication
from nodeproxy.authz.engine import (
    GRPC_PERMISSION_DENIED,
    GRPC_UNAUTHENTICATED,
    AuthzEngine,
    RequestAllowed,
    RequestDenied,
    compile_authz,
    workloads_on_node,
)
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.peer import compile_peer_authentication
from nodeproxy.authz.policy import L4Request, Workload
from nodeproxy.proxy.http_route import RequestAttrs

ISSUER = "https://idp.example"
KEY = jwk.ECKey.generate_key("P-256", parameters={"kid": "k1"})
JWKS = json.dumps({"keys": [KEY.as_dict(private=False)]})

WEB_IP, API_IP, UNKNOWN_IP = "10.244.1.10", "10.244.1.11", "10.244.1.99"
WORKLOADS = {
    WEB_IP: Workload.of("shop", "web", {"app": "web"}),
    API_IP: Workload.of("shop", "api", {"app": "api"}),
}
FRONT = "spiffe://cluster.local/ns/front/sa/frontend"


def engine(config: dict[str, Any]) -> AuthzEngine:
    return compile_authz(AuthzConfig.model_validate(config), JwksRefresher(), WORKLOADS)


def conn(
    dest: str = WEB_IP, port: int = 8080, principal: str | None = FRONT, source: str = "10.244.2.5"
) -> L4Request:
    return L4Request(source, principal, dest, port)


def attrs(
    path: str = "/", method: str = "GET", headers: dict[str, str] | None = None, query: str = ""
) -> RequestAttrs:
    return RequestAttrs(method, "web.shop", path, query, headers or {})


def token(**claims: Any) -> str:
    import time

    body = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": int(time.time()) + 300, **claims}
    return jws.serialize_compact({"alg": "ES256", "kid": "k1"}, json.dumps(body), KEY, algorithms=["ES256"])


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


# ---- peer authentication ------------------------------------------------------------------------


def pa(*items: dict[str, Any]) -> Any:
    return compile_peer_authentication(
        [PeerAuthentication.model_validate({"name": f"pa{i}", **p}) for i, p in enumerate(items)]
    )


WEB = WORKLOADS[WEB_IP]
API = WORKLOADS[API_IP]


@pytest.mark.parametrize(
    ("objects", "workload", "port", "mode"),
    [
        ([], WEB, 80, "PERMISSIVE"),
        ([{"mode": "STRICT"}], WEB, 80, "STRICT"),
        ([{"mode": "STRICT"}], None, 80, "STRICT"),
        ([{"mode": "STRICT"}, {"namespace": "shop", "mode": "PERMISSIVE"}], WEB, 80, "PERMISSIVE"),
        ([{"mode": "STRICT"}, {"namespace": "other", "mode": "PERMISSIVE"}], WEB, 80, "STRICT"),
        ([{"mode": "STRICT"}, {"namespace": "shop", "mode": "UNSET"}], WEB, 80, "STRICT"),
        (
            [
                {"namespace": "shop", "mode": "STRICT"},
                {"namespace": "shop", "selector": {"match_labels": {"app": "web"}}, "mode": "PERMISSIVE"},
            ],
            WEB,
            80,
            "PERMISSIVE",
        ),
        (
            [
                {"namespace": "shop", "mode": "STRICT"},
                {"namespace": "shop", "selector": {"match_labels": {"app": "web"}}, "mode": "PERMISSIVE"},
            ],
            API,
            80,
            "STRICT",
        ),
        (
            [
                {
                    "namespace": "shop",
                    "selector": {"service_account": "web"},
                    "mode": "STRICT",
                    "port_level": {9090: "PERMISSIVE"},
                }
            ],
            WEB,
            9090,
            "PERMISSIVE",
        ),
        (
            [
                {
                    "namespace": "shop",
                    "selector": {"service_account": "web"},
                    "mode": "STRICT",
                    "port_level": {9090: "PERMISSIVE"},
                }
            ],
            WEB,
            80,
            "STRICT",
        ),
        (
            [
                {"mode": "STRICT"},
                {
                    "namespace": "shop",
                    "selector": {"service_account": "web"},
                    "port_level": {9090: "PERMISSIVE"},
                },
            ],
            WEB,
            80,
            "STRICT",
        ),
        (
            [
                {"namespace": "shop", "selector": {"service_account": "web"}, "mode": "STRICT"},
                {"namespace": "shop", "selector": {"match_labels": {"app": "web"}}, "mode": "PERMISSIVE"},
            ],
            WEB,
            80,
            "STRICT",
        ),
    ],
)
def test_peer_authentication_mode(
    objects: list[dict[str, Any]], workload: Workload | None, port: int, mode: str
) -> None:
    compiled = pa(*objects)
    assert compiled.mode_for(workload, port)[0] == mode
    decision = compiled.plaintext(workload, port)
    assert decision.accepted == (mode == "PERMISSIVE")
    assert decision.mode == mode


def test_peer_authentication_config_checks() -> None:
    with pytest.raises(ValidationError, match="a second mesh-wide object"):
        AuthzConfig.model_validate({"peer_authentication": [{"name": "a", "mode": "STRICT"}, {"name": "b"}]})
    with pytest.raises(ValidationError, match="a second namespace shop-wide object"):
        AuthzConfig.model_validate(
            {"peer_authentication": [{"name": "a", "namespace": "shop"}, {"name": "b", "namespace": "shop"}]}
        )
    with pytest.raises(ValidationError, match="port_level needs a selector"):
        PeerAuthentication.model_validate({"name": "a", "namespace": "x", "port_level": {80: "STRICT"}})
    with pytest.raises(ValidationError, match="Input should be 'STRICT', 'PERMISSIVE' or 'UNSET'"):
        PeerAuthentication.model_validate({"name": "a", "mode": "DISABLE"})


# ---- connections --------------------------------------------------------------------------------


def test_strict_closes_plaintext_and_accepts_mtls() -> None:
    e = engine({"peer_authentication": [{"name": "strict", "namespace": "shop", "mode": "STRICT"}]})
    verdict = e.check_connection(conn(principal=None), http=False)
    assert not verdict.allowed and "STRICT" in verdict.reason and "shop/strict" in verdict.reason
    assert e.check_connection(conn(), http=False).allowed
    assert e.check_connection(conn(dest=UNKNOWN_IP, principal=None), http=False).allowed  # not in shop


def test_l4_policy_at_connection_time_and_per_request_for_http() -> None:
    e = engine(
        {
            "authorization_policies": [
                {"name": "front-only", "namespace": "shop", "rules": [{"from": [{"namespaces": ["front"]}]}]},
                {
                    "name": "no-admin",
                    "namespace": "shop",
                    "action": "DENY",
                    "rules": [{"to": [{"paths": ["/admin*"]}]}],
                },
            ]
        }
    )
    assert e.check_connection(conn(), http=False).allowed is False  # DENY with L7 parts only: denies at L4
    assert "shop/no-admin" in e.check_connection(conn(), http=False).reason
    # Requests checked per request: the L7-only DENY is theirs; the ALLOW's L4 part still applies.
    assert e.check_connection(conn(), http=True).allowed
    assert not e.check_connection(conn(principal=None), http=True).allowed
    assert isinstance(e.check_request(conn(), attrs("/shop")), RequestAllowed)
    denied = e.check_request(conn(), attrs("/admin/x"))
    assert isinstance(denied, RequestDenied) and denied.status == 403
    outsider = e.check_request(conn(principal=None), attrs("/shop"))
    assert (
        isinstance(outsider, RequestDenied) and "matched no ALLOW policy (shop/front-only)" in outsider.reason
    )


FRONT_PATHS_ONLY: dict[str, Any] = {
    "authorization_policies": [
        {
            "name": "front-api",
            "namespace": "shop",
            "rules": [
                {
                    "from": [{"principals": ["cluster.local/ns/front/sa/frontend"]}],
                    "to": [{"methods": ["GET"], "paths": ["/api/*"]}],
                }
            ],
        },
        {
            "name": "no-debug",
            "namespace": "shop",
            "action": "DENY",
            "rules": [{"when": [{"key": "request.headers[x-debug]", "values": ["1"]}]}],
        },
        {
            "name": "no-legacy-port",
            "namespace": "shop",
            "action": "DENY",
            "rules": [{"to": [{"ports": [9090]}]}],
        },
    ]
}


def test_connection_checked_per_request_upstream_gets_the_l4_prefilter() -> None:
    """An HTTP stream the sending node checked per request (http=True): the principal-restricted ALLOW
    with paths lets the right principal's connection in (paths are for the request check) and keeps the
    wrong one out; an L4-only DENY denies; the L7-only DENY is left to the request check."""
    e = engine(FRONT_PATHS_ONLY)
    allowed = e.check_connection(conn(), http=True)
    assert allowed.allowed and "shop/front-api" in allowed.reason
    other = e.check_connection(conn(principal="spiffe://cluster.local/ns/other/sa/client"), http=True)
    assert not other.allowed and "matched no ALLOW policy (shop/front-api)" in other.reason
    legacy = e.check_connection(conn(port=9090), http=True)
    assert not legacy.allowed and "shop/no-legacy-port" in legacy.reason
    # The same connection as plain TCP (nobody checks its requests) is refused.
    assert not e.check_connection(conn(), http=False).allowed
    # The request check on the sending node still applies every part.
    assert isinstance(e.check_request(conn(), attrs("/api/items")), RequestAllowed)
    assert isinstance(e.check_request(conn(), attrs("/admin")), RequestDenied)
    assert isinstance(e.check_request(conn(), attrs("/api/items", headers={"x-debug": "1"})), RequestDenied)


def test_connection_checked_per_request_without_policy_and_under_strict() -> None:
    assert engine({}).check_connection(conn(), http=True).allowed
    assert engine({}).check_connection(conn(principal=None), http=True).allowed
    strict = engine({"peer_authentication": [{"name": "strict", "namespace": "shop", "mode": "STRICT"}]})
    refused = strict.check_connection(conn(principal=None), http=True)
    assert not refused.allowed and "STRICT" in refused.reason
    assert strict.check_connection(conn(), http=True).allowed


# ---- requests: JWT and policy -----------------------------------------------------------------

JWT_CONFIG: dict[str, Any] = {
    "request_authentication": [
        {
            "name": "idp",
            "namespace": "shop",
            "jwt_rules": [
                {
                    "issuer": ISSUER,
                    "audiences": ["shop"],
                    "jwks": JWKS,
                    "output_claim_to_headers": [{"header": "x-user", "claim": "sub"}],
                }
            ],
        }
    ],
    "authorization_policies": [
        {
            "name": "need-jwt",
            "namespace": "shop",
            "selector": {"match_labels": {"app": "web"}},
            "rules": [
                {"from": [{"request_principals": [f"{ISSUER}/*"]}], "to": [{"methods": ["GET"]}]},
                {"to": [{"paths": ["/healthz"]}]},
            ],
        },
        {
            "name": "admins",
            "namespace": "shop",
            "action": "DENY",
            "rules": [
                {
                    "to": [{"paths": ["/admin*"]}],
                    "when": [{"key": "request.auth.claims[role]", "not_values": ["admin"]}],
                }
            ],
        },
    ],
}


def test_valid_token_allowed_with_forwarding_edits() -> None:
    e = engine(JWT_CONFIG)
    assert {"authorization"} <= e.header_names
    verdict = e.check_request(conn(), attrs(headers=bearer(token())))
    assert isinstance(verdict, RequestAllowed), verdict
    assert verdict.identity is not None and verdict.identity.subject == "alice"
    assert verdict.headers_add == (("x-user", "alice"),)
    assert set(verdict.headers_remove) == {"x-user", "authorization"}
    assert verdict.reason == "request allowed by ALLOW policy shop/need-jwt rules[0]"


def test_invalid_token_is_401_with_challenge() -> None:
    e = engine(JWT_CONFIG)
    verdict = e.check_request(conn(), attrs(headers=bearer(token(aud="other"))))
    assert isinstance(verdict, RequestDenied)
    assert (verdict.status, verdict.grpc_status, verdict.flag) == (401, GRPC_UNAUTHENTICATED, "JWT")
    assert verdict.detail == "Jwt verification fails"
    assert verdict.response_headers == (
        ("www-authenticate", 'Bearer error="invalid_token", error_description="audience not accepted"'),
    )
    reply = verdict.local_answer(grpc=True)
    assert (reply.status, reply.grpc_status, reply.flag) == (401, 16, "JWT")
    assert reply.headers == verdict.response_headers
    assert verdict.local_answer(grpc=False).grpc_status is None


def test_missing_token_reaches_policy_and_is_403() -> None:
    e = engine(JWT_CONFIG)
    verdict = e.check_request(conn(), attrs())
    assert isinstance(verdict, RequestDenied)
    assert (verdict.status, verdict.grpc_status, verdict.flag) == (403, GRPC_PERMISSION_DENIED, "RBAC")
    assert verdict.local_answer(grpc=True).grpc_status == 7
    assert verdict.local_answer(grpc=True).headers == ()
    assert isinstance(e.check_request(conn(), attrs("/healthz")), RequestAllowed)


def test_required_token_missing_is_401_without_error_code() -> None:
    config = json.loads(json.dumps(JWT_CONFIG))
    config["request_authentication"][0]["require_token"] = True
    verdict = engine(config).check_request(conn(), attrs("/healthz"))
    assert isinstance(verdict, RequestDenied) and verdict.status == 401
    assert verdict.detail == "Jwt is missing"
    assert verdict.response_headers == (("www-authenticate", "Bearer"),)


def test_claim_conditions_and_deny_wins() -> None:
    e = engine(JWT_CONFIG)
    user = e.check_request(conn(), attrs("/admin/panel", headers=bearer(token(role="user"))))
    assert isinstance(user, RequestDenied) and user.status == 403 and "shop/admins" in user.reason
    admin = e.check_request(conn(), attrs("/admin/panel", headers=bearer(token(role="admin"))))
    assert isinstance(admin, RequestAllowed)
    post = e.check_request(conn(), attrs("/x", method="POST", headers=bearer(token())))
    assert isinstance(post, RequestDenied) and post.status == 403


@pytest.mark.parametrize(
    "path",
    ["/admin", "//admin", "/x/../admin", "/%61dmin", "/./admin/", "/admin/./x", "/x/%2e%2e/admin", "\\admin"],
)
def test_path_normalization_closes_deny_bypasses(path: str) -> None:
    e = engine(
        {
            "authorization_policies": [
                {"name": "d", "action": "DENY", "rules": [{"to": [{"paths": ["/admin", "/admin/*"]}]}]}
            ]
        }
    )
    verdict = e.check_request(conn(), attrs(path))
    assert isinstance(verdict, RequestDenied), path


def test_request_authentication_scope() -> None:
    e = engine(JWT_CONFIG)
    assert e.authenticator(WORKLOADS[WEB_IP]) is not None
    assert e.authenticator(None) is None  # unknown destination: only mesh-wide objects apply
    # A bad token to a workload no RequestAuthentication covers is not checked at all.
    verdict = e.check_request(conn(dest=UNKNOWN_IP), attrs(headers=bearer("garbage")))
    assert isinstance(verdict, RequestAllowed) and verdict.identity is None


def test_policy_header_conditions_are_in_header_names() -> None:
    e = engine(
        {
            "authorization_policies": [
                {"name": "h", "rules": [{"when": [{"key": "request.headers[x-tenant]", "values": ["a"]}]}]}
            ]
        }
    )
    assert e.header_names == frozenset({"x-tenant"})
    assert isinstance(e.check_request(conn(), attrs(headers={"x-tenant": "a"})), RequestAllowed)
    assert isinstance(e.check_request(conn(), attrs(headers={"x-tenant": "b"})), RequestDenied)


# ---- the documented example ---------------------------------------------------------------------


def test_docs_example_config_is_valid() -> None:
    """Every ```yaml block of docs/authorization.md that starts with `authz:` parses."""
    text = (Path(__file__).parent.parent / "docs" / "authorization.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("authz:")]
    assert blocks
    for block in blocks:
        section = yaml.safe_load(block)["authz"]
        for rule in (r for ra in section.get("request_authentication", []) for r in ra["jwt_rules"]):
            if "jwks_file" in rule:  # the docs name a path that does not exist here
                rule["jwks_file"] = "/nonexistent/jwks.json"
        compile_authz(AuthzConfig.model_validate(section), JwksRefresher(), WORKLOADS)


def test_workloads_on_node_from_identity_config() -> None:
    from nodeproxy.identity.config import WorkloadConfig

    records = [
        WorkloadConfig(ip="10.244.1.10", namespace="shop", service_account="web", node="node-a"),
        WorkloadConfig(ip="10.244.2.10", namespace="shop", service_account="web", node="node-b"),
    ]
    table = workloads_on_node(records, "node-a", {"10.244.1.10": {"app": "web"}})
    assert table == {"10.244.1.10": Workload.of("shop", "web", {"app": "web"})}


def test_authz_section_errors_through_the_root_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `authz` on the root Config (as the lead hangs it), every problem is its own line at its
    YAML position, and a valid section parses."""
    import nodeproxy.config as root

    class WithAuthz(root.Config):
        authz: AuthzConfig = AuthzConfig()

    monkeypatch.setattr(root, "Config", WithAuthz)
    base = (Path(root.__file__).parent / "default-config.yaml").read_text()
    bad = (
        base
        + """
authz:
  peer_authentication:
    - {name: a, mode: STRICT}
    - {name: b, mode: PERMISSIVE}
"""
    )
    with pytest.raises(root.ConfigError) as failure:
        root.parse_config(bad, "t.yaml")
    expected = "a second mesh-wide object (the first is peer_authentication[0]); keep one"
    assert failure.value.problems[0].endswith(f"authz.peer_authentication[1]: {expected}")
    bad = (
        base
        + """
authz:
  authorization_policies:
    - name: p
      rules:
        - from: [{principals: ["a*b"], nope: 1}]
          when: [{key: "request.headers", values: [x]}]
"""
    )
    with pytest.raises(root.ConfigError) as failure:
        root.parse_config(bad, "t.yaml")
    problems = "\n".join(failure.value.problems)
    assert "authz.authorization_policies[0].rules[0].from[0].principals[0]: '*' may only be" in problems
    assert "authz.authorization_policies[0].rules[0].from[0].nope: unknown key 'nope'" in problems
    assert (
        "authz.authorization_policies[0].rules[0].when[0].key: request.headers takes one header name"
        in problems
    )
    good = root.parse_config(
        base + "\nauthz:\n  authorization_policies: [{name: p, rules: [{from: [{namespaces: [a]}]}]}]\n"
    )
    assert isinstance(good, WithAuthz)
    assert good.authz.authorization_policies[0].rules[0].from_ is not None


def test_decides_per_request_when_a_jwt_rule_or_an_l7_attribute_covers_the_pod() -> None:
    """What makes the inbound path give a plaintext connection to the HTTP engine (nodeproxy.proxy.mesh)."""
    assert not engine({}).decides_per_request(WEB_IP)
    l4_only = {
        "authorization_policies": [
            {
                "name": "p",
                "namespace": "shop",
                "rules": [{"from": [{"namespaces": ["front"]}], "to": [{"ports": [80]}]}],
            }
        ]
    }
    assert not engine(l4_only).decides_per_request(WEB_IP)
    paths = {
        "authorization_policies": [
            {
                "name": "p",
                "namespace": "shop",
                "selector": {"service_account": "web"},
                "rules": [{"to": [{"paths": ["/x"]}]}],
            }
        ]
    }
    assert engine(paths).decides_per_request(WEB_IP)
    assert not engine(paths).decides_per_request(API_IP)  # the selector picks web only
    assert engine(JWT_CONFIG).decides_per_request(WEB_IP)  # a RequestAuthentication covers it
