"""Authorization policies: every field allows and denies as written, DENY wins, the L4 rule for L7
attributes, scoping by namespace and selector, path normalization, and the config checks."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nodeproxy.authz.config import AuthorizationPolicy, AuthzConfig
from nodeproxy.authz.jwt import JwtIdentity
from nodeproxy.authz.policy import (
    ALLOW_NO_POLICY,
    CompiledPolicies,
    L4Request,
    L7Request,
    Workload,
    compile_policies,
    normalize_path,
    source_namespace,
)

WEB = Workload.of("shop", "web", {"app": "web", "version": "v1"})
DB = Workload.of("data", "db", {"app": "db"})
FRONT = "spiffe://cluster.local/ns/front/sa/frontend"
OTHER = "spiffe://cluster.local/ns/other/sa/client"


def l4(
    source_ip: str = "10.0.0.5",
    principal: str | None = FRONT,
    dest_ip: str = "10.1.0.9",
    port: int = 8080,
) -> L4Request:
    return L4Request(source_ip, principal, dest_ip, port)


def jwt_identity(**claims: Any) -> JwtIdentity:
    claims.setdefault("iss", "https://issuer.example")
    claims.setdefault("sub", "alice")
    aud = claims.get("aud", ())
    audiences = (aud,) if isinstance(aud, str) else tuple(aud)
    return JwtIdentity(claims["iss"], claims["sub"], audiences, claims.get("azp"), claims, b"{}")


def l7(
    method: str = "GET",
    path: str = "/",
    host: str = "web.shop",
    headers: dict[str, str] | None = None,
    jwt: JwtIdentity | None = None,
    **kw: Any,
) -> L7Request:
    base = l4(**kw)
    return L7Request(*base, method, host, path, headers or {}, jwt)


def policies(*items: dict[str, Any]) -> CompiledPolicies:
    return compile_policies(
        [AuthorizationPolicy.model_validate({"name": f"p{i}", **p}) for i, p in enumerate(items)]
    )


def allow(rule: dict[str, Any]) -> CompiledPolicies:
    return policies({"action": "ALLOW", "rules": [rule]})


def deny(rule: dict[str, Any]) -> CompiledPolicies:
    return policies({"action": "DENY", "rules": [rule]})


# (rule, a request it matches, a request it does not match). Each is checked as ALLOW (the match is
# allowed, the other denied) and as DENY (the match is denied, the other allowed).
FIELD_CASES: list[tuple[str, dict[str, Any], L4Request | L7Request, L4Request | L7Request]] = [
    (
        "principals exact",
        {"from": [{"principals": ["cluster.local/ns/front/sa/frontend"]}]},
        l4(),
        l4(principal=OTHER),
    ),
    ("principals full spiffe id", {"from": [{"principals": [FRONT]}]}, l4(), l4(principal=OTHER)),
    (
        "principals prefix",
        {"from": [{"principals": ["cluster.local/ns/front/*"]}]},
        l4(),
        l4(principal=OTHER),
    ),
    ("principals suffix", {"from": [{"principals": ["*/sa/frontend"]}]}, l4(), l4(principal=OTHER)),
    ("principals any: plaintext has none", {"from": [{"principals": ["*"]}]}, l4(), l4(principal=None)),
    ("not_principals", {"from": [{"not_principals": [FRONT]}]}, l4(principal=OTHER), l4()),
    (
        "not_principals any: matches plaintext",
        {"from": [{"not_principals": ["*"]}]},
        l4(principal=None),
        l4(),
    ),
    ("namespaces", {"from": [{"namespaces": ["front"]}]}, l4(), l4(principal=OTHER)),
    ("namespaces: plaintext has none", {"from": [{"namespaces": ["*"]}]}, l4(), l4(principal=None)),
    ("not_namespaces", {"from": [{"not_namespaces": ["front"]}]}, l4(principal=OTHER), l4()),
    ("ip_blocks cidr", {"from": [{"ip_blocks": ["10.0.0.0/24"]}]}, l4(), l4(source_ip="10.0.1.5")),
    ("ip_blocks single", {"from": [{"ip_blocks": ["10.0.0.5"]}]}, l4(), l4(source_ip="10.0.0.6")),
    (
        "ip_blocks v4-mapped source",
        {"from": [{"ip_blocks": ["10.0.0.0/24"]}]},
        l4(source_ip="::ffff:10.0.0.5"),
        l4(source_ip="::ffff:10.0.1.5"),
    ),
    (
        "ip_blocks v6",
        {"from": [{"ip_blocks": ["fd00::/64"]}]},
        l4(source_ip="fd00::5"),
        l4(source_ip="fd01::5"),
    ),
    ("not_ip_blocks", {"from": [{"not_ip_blocks": ["10.0.0.0/24"]}]}, l4(source_ip="10.9.0.1"), l4()),
    (
        "request_principals",
        {"from": [{"request_principals": ["https://issuer.example/alice"]}]},
        l7(jwt=jwt_identity()),
        l7(jwt=jwt_identity(sub="bob")),
    ),
    (
        "request_principals any: no token",
        {"from": [{"request_principals": ["*"]}]},
        l7(jwt=jwt_identity()),
        l7(),
    ),
    (
        "not_request_principals",
        {"from": [{"not_request_principals": ["*/alice"]}]},
        l7(jwt=jwt_identity(sub="bob")),
        l7(jwt=jwt_identity()),
    ),
    ("ports", {"to": [{"ports": [8080]}]}, l4(), l4(port=9090)),
    ("not_ports", {"to": [{"not_ports": [8080]}]}, l4(port=9090), l4()),
    ("methods", {"to": [{"methods": ["GET", "HEAD"]}]}, l7(method="HEAD"), l7(method="POST")),
    ("methods are case-sensitive", {"to": [{"methods": ["GET"]}]}, l7(method="GET"), l7(method="get")),
    ("not_methods", {"to": [{"not_methods": ["DELETE"]}]}, l7(method="GET"), l7(method="DELETE")),
    ("paths exact", {"to": [{"paths": ["/admin"]}]}, l7(path="/admin"), l7(path="/admin/x")),
    ("paths prefix", {"to": [{"paths": ["/api/*"]}]}, l7(path="/api/v1"), l7(path="/apix")),
    ("paths suffix", {"to": [{"paths": ["*.png"]}]}, l7(path="/i/a.png"), l7(path="/i/a.png.exe")),
    ("not_paths", {"to": [{"not_paths": ["/private*"]}]}, l7(path="/public"), l7(path="/private/x")),
    ("hosts", {"to": [{"hosts": ["web.shop"]}]}, l7(host="web.shop"), l7(host="db.shop")),
    (
        "hosts case-insensitive and port",
        {"to": [{"hosts": ["Web.Shop"]}]},
        l7(host="WEB.shop:8080"),
        l7(host="x"),
    ),
    ("hosts suffix", {"to": [{"hosts": ["*.shop"]}]}, l7(host="api.shop"), l7(host="api.shop.evil")),
    (
        "hosts with a port",
        {"to": [{"hosts": ["web.shop:8080"]}]},
        l7(host="web.shop:8080"),
        l7(host="web.shop"),
    ),
    ("not_hosts", {"to": [{"not_hosts": ["admin.shop"]}]}, l7(host="web.shop"), l7(host="admin.shop")),
    (
        "when request.headers",
        {"when": [{"key": "request.headers[x-user]", "values": ["alice", "bob*"]}]},
        l7(headers={"x-user": "bobby"}),
        l7(headers={"x-user": "carol"}),
    ),
    (
        "when request.headers absent fails values",
        {"when": [{"key": "request.headers[x-user]", "values": ["*"]}]},
        l7(headers={"x-user": "a"}),
        l7(),
    ),
    (
        "when request.headers '*' needs a non-empty value",
        {"when": [{"key": "request.headers[x-user]", "values": ["*"]}]},
        l7(headers={"x-user": "a"}),
        l7(headers={"x-user": ""}),
    ),
    (
        "when request.headers not_values (absent satisfies it)",
        {"when": [{"key": "request.headers[x-env]", "not_values": ["prod"]}]},
        l7(),
        l7(headers={"x-env": "prod"}),
    ),
    (
        "when claims string",
        {"when": [{"key": "request.auth.claims[role]", "values": ["admin"]}]},
        l7(jwt=jwt_identity(role="admin")),
        l7(jwt=jwt_identity(role="user")),
    ),
    (
        "when claims list",
        {"when": [{"key": "request.auth.claims[groups]", "values": ["ops"]}]},
        l7(jwt=jwt_identity(groups=["dev", "ops"])),
        l7(jwt=jwt_identity(groups=["dev"])),
    ),
    (
        "when claims nested",
        {"when": [{"key": "request.auth.claims[realm][role]", "values": ["root"]}]},
        l7(jwt=jwt_identity(realm={"role": "root"})),
        l7(jwt=jwt_identity(realm={"role": "user"})),
    ),
    (
        "when claims boolean",
        {"when": [{"key": "request.auth.claims[admin]", "values": ["true"]}]},
        l7(jwt=jwt_identity(admin=True)),
        l7(jwt=jwt_identity(admin=False)),
    ),
    (
        "when claims without a token",
        {"when": [{"key": "request.auth.claims[role]", "values": ["*"]}]},
        l7(jwt=jwt_identity(role="x")),
        l7(),
    ),
    (
        "when claims not_values",
        {"when": [{"key": "request.auth.claims[role]", "not_values": ["guest"]}]},
        l7(jwt=jwt_identity(role="admin")),
        l7(jwt=jwt_identity(role="guest")),
    ),
    (
        "when request.auth.principal",
        {"when": [{"key": "request.auth.principal", "values": ["https://issuer.example/*"]}]},
        l7(jwt=jwt_identity()),
        l7(jwt=jwt_identity(iss="https://other.example")),
    ),
    (
        "when request.auth.audiences",
        {"when": [{"key": "request.auth.audiences", "values": ["shop"]}]},
        l7(jwt=jwt_identity(aud=["web", "shop"])),
        l7(jwt=jwt_identity(aud="web")),
    ),
    (
        "when request.auth.presenter",
        {"when": [{"key": "request.auth.presenter", "values": ["cli"]}]},
        l7(jwt=jwt_identity(azp="cli")),
        l7(jwt=jwt_identity(azp="web")),
    ),
    (
        "when source.ip",
        {"when": [{"key": "source.ip", "values": ["10.0.0.0/24"]}]},
        l4(),
        l4(source_ip="10.0.2.1"),
    ),
    (
        "when source.ip not_values",
        {"when": [{"key": "source.ip", "not_values": ["10.0.0.5"]}]},
        l4(source_ip="10.0.0.6"),
        l4(),
    ),
    (
        "when source.namespace",
        {"when": [{"key": "source.namespace", "values": ["front"]}]},
        l4(),
        l4(principal=OTHER),
    ),
    (
        "when source.principal",
        {"when": [{"key": "source.principal", "values": ["*/sa/frontend"]}]},
        l4(),
        l4(principal=None),
    ),
    (
        "when destination.ip",
        {"when": [{"key": "destination.ip", "values": ["10.1.0.0/16"]}]},
        l4(),
        l4(dest_ip="10.2.0.1"),
    ),
    (
        "when destination.port",
        {"when": [{"key": "destination.port", "values": ["8080"]}]},
        l4(),
        l4(port=8081),
    ),
    (
        "all parts of a rule must hold",
        {"from": [{"namespaces": ["front"]}], "to": [{"ports": [8080]}]},
        l4(),
        l4(port=9090),
    ),
    (
        "any source of from",
        {"from": [{"namespaces": ["nope"]}, {"ip_blocks": ["10.0.0.0/8"]}]},
        l4(),
        l4(source_ip="192.168.0.1"),
    ),
    (
        "all fields of one source",
        {"from": [{"namespaces": ["front"], "ip_blocks": ["10.0.0.0/24"]}]},
        l4(),
        l4(source_ip="10.0.9.9"),
    ),
    (
        "all conditions of when",
        {
            "when": [
                {"key": "request.headers[a]", "values": ["1"]},
                {"key": "request.headers[b]", "values": ["2"]},
            ]
        },
        l7(headers={"a": "1", "b": "2"}),
        l7(headers={"a": "1", "b": "3"}),
    ),
]


@pytest.mark.parametrize(
    ("rule", "hit", "miss"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_field_allows_as_written(
    rule: dict[str, Any], hit: L4Request | L7Request, miss: L4Request | L7Request
) -> None:
    compiled = allow(rule)
    assert compiled.evaluate(WEB, hit).allowed, compiled.evaluate(WEB, hit).reason
    denied = compiled.evaluate(WEB, miss)
    assert not denied.allowed
    assert "matched no ALLOW policy" in denied.reason


@pytest.mark.parametrize(
    ("rule", "hit", "miss"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_field_denies_as_written(
    rule: dict[str, Any], hit: L4Request | L7Request, miss: L4Request | L7Request
) -> None:
    compiled = deny(rule)
    decision = compiled.evaluate(WEB, hit)
    assert not decision.allowed
    layer = "request" if isinstance(hit, L7Request) else "connection"
    assert decision.reason == f"{layer} denied by DENY policy (mesh)/p0 rules[0]"
    assert decision.policy == "(mesh)/p0"
    assert compiled.evaluate(WEB, miss).allowed


def test_no_policy_allows() -> None:
    decision = compile_policies([]).evaluate(WEB, l4())
    assert decision.allowed and decision.reason == "no authorization policy applies"


def test_allow_policy_without_rules_denies_everything() -> None:
    compiled = policies({"action": "ALLOW"})
    assert not compiled.evaluate(WEB, l4()).allowed
    assert not compiled.evaluate(WEB, l7()).allowed


def test_deny_policy_without_rules_denies_nothing() -> None:
    assert policies({"action": "DENY"}).evaluate(WEB, l4()).allowed


def test_empty_rule_matches_everything() -> None:
    assert allow({}).evaluate(WEB, l4(principal=None)).allowed
    assert not deny({}).evaluate(WEB, l7()).allowed


def test_deny_wins_over_allow() -> None:
    compiled = policies(
        {"action": "ALLOW", "rules": [{"from": [{"namespaces": ["front"]}]}]},
        {"action": "DENY", "rules": [{"to": [{"paths": ["/admin*"]}]}]},
    )
    assert compiled.evaluate(WEB, l7(path="/shop")).allowed
    decision = compiled.evaluate(WEB, l7(path="/admin/users"))
    assert not decision.allowed and decision.policy == "(mesh)/p1"


# ---- L7 attributes at L4 ---------------------------------------------------------------------


def test_allow_rule_with_l7_attributes_does_not_match_at_l4() -> None:
    compiled = allow({"from": [{"namespaces": ["front"]}], "to": [{"methods": ["GET"]}]})
    assert not compiled.evaluate(WEB, l4()).allowed  # the GET cannot be seen on a TCP connection
    assert compiled.evaluate(WEB, l7(method="GET")).allowed


def test_deny_rule_with_l7_attributes_drops_them_at_l4() -> None:
    compiled = deny({"from": [{"namespaces": ["front"]}], "to": [{"paths": ["/admin"]}]})
    # At L4 the rule is 'from namespace front': that connection is denied, others are not.
    assert not compiled.evaluate(WEB, l4()).allowed
    assert compiled.evaluate(WEB, l4(principal=OTHER)).allowed
    # At L7 the whole rule applies.
    assert compiled.evaluate(WEB, l7(path="/shop")).allowed
    assert not compiled.evaluate(WEB, l7(path="/admin")).allowed


def test_deny_rule_of_only_l7_attributes_denies_every_connection_at_l4() -> None:
    compiled = deny({"when": [{"key": "request.headers[x-debug]", "values": ["1"]}]})
    assert not compiled.evaluate(WEB, l4(principal=None)).allowed
    assert compiled.evaluate(WEB, l7()).allowed


def test_l4_only_allow_rule_applies_at_l7_too() -> None:
    compiled = allow({"from": [{"ip_blocks": ["10.0.0.0/24"]}]})
    assert compiled.evaluate(WEB, l7()).allowed
    assert not compiled.evaluate(WEB, l7(source_ip="10.9.9.9")).allowed


# ---- connections whose requests are checked per request (l7_checked tunnel streams) ----------------


def test_connection_for_l7_allow_with_paths_decided_by_its_principal() -> None:
    compiled = allow(
        {"from": [{"principals": ["cluster.local/ns/front/sa/frontend"]}], "to": [{"paths": ["/api/*"]}]}
    )
    allowed = compiled.evaluate_connection_for_l7(WEB, l4())
    assert allowed.allowed and allowed.policy == "(mesh)/p0"
    assert (
        allowed.reason
        == "connection (L7 rules checked per request) allowed by ALLOW policy (mesh)/p0 rules[0]"
    )
    refused = compiled.evaluate_connection_for_l7(WEB, l4(principal=OTHER))
    assert not refused.allowed
    assert refused.reason == "connection (L7 rules checked per request) matched no ALLOW policy ((mesh)/p0)"
    assert not compiled.evaluate_connection_for_l7(WEB, l4(principal=None)).allowed
    # A plain TCP connection with the same attributes is still refused: nobody checks its paths.
    assert not compiled.evaluate(WEB, l4()).allowed


def test_connection_for_l7_drops_every_kind_of_l7_part_of_an_allow_rule() -> None:
    compiled = allow(
        {
            "from": [{"namespaces": ["front"], "request_principals": ["https://issuer.example/alice"]}],
            "to": [{"ports": [8080], "hosts": ["web.shop"], "methods": ["GET"], "not_paths": ["/admin"]}],
            "when": [
                {"key": "request.auth.claims[group]", "values": ["admins"]},
                {"key": "source.ip", "values": ["10.0.0.0/24"]},
            ],
        }
    )
    assert compiled.evaluate_connection_for_l7(WEB, l4()).allowed
    # Its L4 parts still hold: port, source namespace and the source.ip condition.
    assert not compiled.evaluate_connection_for_l7(WEB, l4(port=9090)).allowed
    assert not compiled.evaluate_connection_for_l7(WEB, l4(principal=OTHER)).allowed
    assert not compiled.evaluate_connection_for_l7(WEB, l4(source_ip="10.9.9.9")).allowed


def test_connection_for_l7_denied_by_an_l4_only_deny_rule() -> None:
    compiled = policies(
        {"action": "ALLOW", "rules": [{"to": [{"paths": ["/api/*"]}]}]},
        {"action": "DENY", "rules": [{"from": [{"namespaces": ["front"]}], "to": [{"ports": [8080]}]}]},
    )
    denied = compiled.evaluate_connection_for_l7(WEB, l4())
    assert not denied.allowed and denied.policy == "(mesh)/p1"
    assert (
        denied.reason == "connection (L7 rules checked per request) denied by DENY policy (mesh)/p1 rules[0]"
    )
    assert compiled.evaluate_connection_for_l7(WEB, l4(port=9090)).allowed


def test_connection_for_l7_leaves_deny_rules_with_l7_parts_to_the_request_check() -> None:
    l7_only = deny({"to": [{"paths": ["/admin*"]}]})
    assert not l7_only.evaluate(WEB, l4()).allowed  # a plain TCP connection: denied
    decision = l7_only.evaluate_connection_for_l7(WEB, l4())
    assert decision.allowed
    assert decision.reason == "connection (L7 rules checked per request) matched none of 1 DENY policies"
    mixed = deny({"from": [{"namespaces": ["front"]}], "to": [{"methods": ["DELETE"]}]})
    assert not mixed.evaluate(WEB, l4()).allowed
    assert mixed.evaluate_connection_for_l7(WEB, l4()).allowed
    # The request check still denies what those rules match.
    assert not l7_only.evaluate(WEB, l7(path="/admin/x")).allowed
    assert not mixed.evaluate(WEB, l7(method="DELETE")).allowed


def test_connection_for_l7_without_policies_allows() -> None:
    assert compile_policies([]).evaluate_connection_for_l7(WEB, l4(principal=None)) == ALLOW_NO_POLICY
    scoped = policies({"namespace": "data", "action": "ALLOW", "rules": [{"to": [{"paths": ["/x"]}]}]})
    assert scoped.evaluate_connection_for_l7(WEB, l4()) == ALLOW_NO_POLICY  # scoped to another namespace
    # A rule of L7 parts only: any connection may carry a request to /x (a TCP connection may not).
    assert scoped.evaluate_connection_for_l7(DB, l4()).allowed
    assert not scoped.evaluate(DB, l4()).allowed
    # An ALLOW policy without rules allows nothing, also here.
    assert not policies({"action": "ALLOW"}).evaluate_connection_for_l7(WEB, l4()).allowed


# ---- scope -----------------------------------------------------------------------------------


def test_namespace_scope() -> None:
    compiled = policies({"namespace": "shop", "action": "DENY", "rules": [{}]})
    assert not compiled.evaluate(WEB, l4()).allowed
    assert compiled.evaluate(DB, l4()).allowed
    assert compiled.evaluate(None, l4()).allowed  # unknown workload: only mesh-wide policies apply


def test_selector_scope_labels_and_service_account() -> None:
    compiled = policies(
        {"namespace": "shop", "selector": {"match_labels": {"app": "web"}}, "action": "DENY", "rules": [{}]},
        {"namespace": "shop", "selector": {"service_account": "api"}, "action": "DENY", "rules": [{}]},
    )
    assert not compiled.evaluate(WEB, l4()).allowed
    assert compiled.evaluate(Workload.of("shop", "web", {"app": "other"}), l4()).allowed
    assert not compiled.evaluate(Workload.of("shop", "api"), l4()).allowed
    assert compiled.evaluate(Workload.of("shop2", "api", {"app": "web"}), l4()).allowed


def test_allow_policies_of_other_workloads_do_not_apply() -> None:
    compiled = policies(
        {"namespace": "data", "action": "ALLOW", "rules": [{"from": [{"namespaces": ["x"]}]}]}
    )
    assert compiled.evaluate(WEB, l4()).allowed  # no ALLOW applies to shop/web
    assert not compiled.evaluate(DB, l4()).allowed


def test_mesh_wide_allow_applies_to_unknown_workload() -> None:
    compiled = policies({"action": "ALLOW", "rules": [{"from": [{"namespaces": ["front"]}]}]})
    assert compiled.evaluate(None, l4()).allowed
    assert not compiled.evaluate(None, l4(principal=None)).allowed


# ---- path normalization --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "mode", "expected"),
    [
        ("/a/../admin", "base", "/admin"),
        ("/a/./b", "base", "/a/b"),
        ("/%61dmin", "base", "/admin"),
        ("/%2e%2e/admin", "base", "/admin"),
        ("/a%2fb", "base", "/a%2Fb"),
        ("/a\\..\\admin", "base", "/admin"),
        ("//admin", "base", "//admin"),
        ("//admin", "merge_slashes", "/admin"),
        ("/admin/", "merge_slashes", "/admin/"),
        ("/a/b/..", "merge_slashes", "/a/"),
        ("/..", "merge_slashes", "/"),
        ("/a%2fb", "decode_and_merge_slashes", "/a/b"),
        ("/x/..%2f..%2fadmin", "decode_and_merge_slashes", "/admin"),
        ("/a/../b", "none", "/a/../b"),
        ("*", "merge_slashes", "*"),
    ],
)
def test_normalize_path(raw: str, mode: str, expected: str) -> None:
    assert normalize_path(raw, mode) == expected


@given(st.text(alphabet="/.%2aefAE\\", max_size=24))
@settings(max_examples=300, deadline=None)
def test_normalize_path_is_idempotent_and_has_no_dot_segments(tail: str) -> None:
    once = normalize_path("/" + tail, "merge_slashes")
    assert normalize_path(once, "merge_slashes") == once
    assert "/../" not in once + "/" and "/./" not in once + "/" and "//" not in once


def test_source_namespace() -> None:
    assert source_namespace(FRONT) == "front"
    assert source_namespace("cluster.local/ns/a/sa/b") == "a"
    assert source_namespace("spiffe://td/other/path") is None
    assert source_namespace(None) is None


# ---- properties ------------------------------------------------------------------------------

NAMESPACES = ["front", "other", "data"]
PORTS = [80, 8080, 9090]
PATHS = ["/", "/admin", "/api/v1", "/public"]


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["from"] = [{"namespaces": draw(st.lists(st.sampled_from(NAMESPACES), min_size=1, max_size=2))}]
    if draw(st.booleans()):
        op: dict[str, Any] = {"ports": draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=2))}
        if draw(st.booleans()):
            op["paths"] = draw(st.lists(st.sampled_from([*PATHS, "/api/*"]), min_size=1, max_size=2))
        rule["to"] = [op]
    return rule


@st.composite
def requests(draw: st.DrawFn) -> L7Request:
    ns = draw(st.sampled_from([*NAMESPACES, None]))
    principal = None if ns is None else f"spiffe://cluster.local/ns/{ns}/sa/x"
    return l7(path=draw(st.sampled_from(PATHS)), principal=principal, port=draw(st.sampled_from(PORTS)))


policy_lists = st.lists(
    st.fixed_dictionaries(
        {"action": st.sampled_from(["ALLOW", "DENY"]), "rules": st.lists(rules(), max_size=3)}
    ),
    max_size=4,
)


def _reference(items: list[dict[str, Any]], request: L7Request) -> bool:
    """Istio's algorithm written out directly, over the same rule shapes."""

    def rule_matches(rule: dict[str, Any]) -> bool:
        ns = source_namespace(request.source_principal)
        if "from" in rule and ns not in rule["from"][0]["namespaces"]:
            return False
        if "to" in rule:
            op = rule["to"][0]
            if request.destination_port not in op["ports"]:
                return False
            if "paths" in op and not any(
                request.path == p or (p.endswith("*") and request.path.startswith(p[:-1]))
                for p in op["paths"]
            ):
                return False
        return True

    if any(p["action"] == "DENY" and any(rule_matches(r) for r in p["rules"]) for p in items):
        return False
    allows = [p for p in items if p["action"] == "ALLOW"]
    return not allows or any(rule_matches(r) for p in allows for r in p["rules"])


@given(policy_lists, requests())
@settings(max_examples=400, deadline=None)
def test_matches_reference_algorithm(items: list[dict[str, Any]], request: L7Request) -> None:
    assert policies(*items).evaluate(WEB, request).allowed == _reference(items, request)


@given(policy_lists, requests(), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_policy_order_does_not_change_the_outcome(
    items: list[dict[str, Any]], request: L7Request, rnd: Any
) -> None:
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert (
        policies(*items).evaluate(WEB, request).allowed == policies(*shuffled).evaluate(WEB, request).allowed
    )


@given(policy_lists, rules(), requests())
@settings(max_examples=300, deadline=None)
def test_a_matching_deny_rule_always_wins(
    items: list[dict[str, Any]], deny_rule: dict[str, Any], request: L7Request
) -> None:
    compiled = policies(*items, {"action": "DENY", "rules": [deny_rule]})
    matches = deny(deny_rule).evaluate(WEB, request).allowed is False
    if matches:
        assert not compiled.evaluate(WEB, request).allowed


@given(policy_lists, requests())
@settings(max_examples=300, deadline=None)
def test_adding_an_allow_policy_never_unblocks_a_denied_request_when_deny_matched(
    items: list[dict[str, Any]], request: L7Request
) -> None:
    base = policies(*items)
    widened = policies(*items, {"action": "ALLOW", "rules": [{}]})
    if not base.evaluate(WEB, request).allowed and any(
        p["action"] == "DENY" and not deny(r).evaluate(WEB, request).allowed
        for p in items
        for r in p["rules"]
    ):
        assert not widened.evaluate(WEB, request).allowed
    # An allow-everything policy allows whatever no DENY rule matches.
    if not any(p["action"] == "DENY" for p in items):
        assert widened.evaluate(WEB, request).allowed


@given(policy_lists, requests())
@settings(max_examples=200, deadline=None)
def test_l4_is_never_more_permissive_than_every_l7_request(
    items: list[dict[str, Any]], request: L7Request
) -> None:
    """If a connection is allowed at L4, at least the rules that allowed it exist without L7 parts,
    so an L7 request with the same L4 attributes is judged by a superset of matching ALLOW rules
    and by DENY rules that are at least as specific: allowed at L4 and denied at L7 only through a
    DENY rule's L7 parts, never through ALLOW."""
    compiled = policies(*items)
    l4_request = L4Request(*request[:4])
    if compiled.evaluate(WEB, l4_request).allowed and not compiled.evaluate(WEB, request).allowed:
        assert compiled.evaluate(WEB, request).reason.startswith("request denied by DENY")


@given(policy_lists, requests())
@settings(max_examples=300, deadline=None)
def test_connection_for_l7_never_refuses_a_connection_carrying_an_allowed_request(
    items: list[dict[str, Any]], request: L7Request
) -> None:
    """Sound pre-filter: whatever request the per-request check allows, the connection it travels on is
    allowed; and for policies without L7 parts it decides exactly as the plain L4 evaluation."""
    compiled = policies(*items)
    connection = L4Request(*request[:4])
    if compiled.evaluate(WEB, request).allowed:
        assert compiled.evaluate_connection_for_l7(WEB, connection).allowed
    l4_only = [{**p, "rules": [r for r in p["rules"] if "paths" not in r.get("to", [{}])[0]]} for p in items]
    plain = policies(*l4_only)
    assert (
        plain.evaluate_connection_for_l7(WEB, connection).allowed == plain.evaluate(WEB, connection).allowed
    )


# ---- config validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"name": "a", "rules": [{"from": [{}]}]}, "a source needs at least one field"),
        ({"name": "a", "rules": [{"to": [{}]}]}, "an operation needs at least one field"),
        ({"name": "a", "rules": [{"to": [{"paths": ["/a*b"]}]}]}, "'*' may only be the first or the last"),
        ({"name": "a", "rules": [{"to": [{"paths": ["*a*"]}]}]}, "'*abc*' (contains) is not supported"),
        ({"name": "a", "rules": [{"to": [{"paths": ["admin"]}]}]}, "must start with '/'"),
        ({"name": "a", "rules": [{"to": [{"paths": ["/a?b=1"]}]}]}, "without the query"),
        ({"name": "a", "rules": [{"to": [{"ports": [0]}]}]}, "greater than or equal to 1"),
        ({"name": "a", "rules": [{"from": [{"ip_blocks": ["10.0.0.1/24"]}]}]}, "no host bits set"),
        ({"name": "a", "rules": [{"when": [{"key": "request.bogus", "values": ["x"]}]}]}, "unsupported key"),
        (
            {"name": "a", "rules": [{"when": [{"key": "request.headers", "values": ["x"]}]}]},
            "one header name",
        ),
        (
            {"name": "a", "rules": [{"when": [{"key": "request.headers[a b]", "values": ["x"]}]}]},
            "field name",
        ),
        (
            {"name": "a", "rules": [{"when": [{"key": "source.ip", "values": ["nope"]}]}]},
            "IP address or CIDR",
        ),
        ({"name": "a", "rules": [{"when": [{"key": "destination.port", "values": ["x"]}]}]}, "port numbers"),
        ({"name": "a", "rules": [{"when": [{"key": "source.ip"}]}]}, "values or not_values"),
        ({"name": "a", "selector": {"match_labels": {"app": "x"}}}, "a selector needs a namespace"),
        ({"name": "a", "action": "AUDIT"}, "Input should be 'ALLOW' or 'DENY'"),
        ({"name": "Bad_Name"}, "DNS subdomain-like name"),
    ],
)
def test_invalid_policies_are_rejected(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(
        ValidationError,
        match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*").replace("?", r"\?"),
    ):
        AuthorizationPolicy.model_validate(policy)


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValidationError, match="is also authorization_policies"):
        AuthzConfig.model_validate({"authorization_policies": [{"name": "a"}, {"name": "a"}]})
    AuthzConfig.model_validate({"authorization_policies": [{"name": "a"}, {"name": "a", "namespace": "x"}]})


def test_header_names_needed_by_policies() -> None:
    compiled = allow({"when": [{"key": "request.headers[X-User]", "values": ["a"]}]})
    assert compiled.header_names == frozenset({"x-user"})


_FUZZ_POLICIES = policies(
    {
        "action": "DENY",
        "rules": [
            {
                "to": [
                    {"hosts": ["*.evil", "admin.shop"], "paths": ["/admin*", "*.php"], "methods": ["DELETE"]}
                ],
                "when": [{"key": "request.headers[x-a]", "values": ["1", "2*"]}],
            },
            {"from": [{"ip_blocks": ["10.0.0.0/8", "fd00::/8"], "not_principals": ["*"]}]},
        ],
    },
    {
        "action": "ALLOW",
        "rules": [
            {"from": [{"namespaces": ["front"]}], "to": [{"not_paths": ["/private*"], "ports": [8080]}]},
            {
                "when": [
                    {"key": "request.auth.claims[a][b]", "values": ["c"]},
                    {"key": "destination.ip", "values": ["10.1.0.0/16"]},
                ]
            },
        ],
    },
)


@given(
    st.text(max_size=12),
    st.text(max_size=20),
    st.text(max_size=30),
    st.dictionaries(st.sampled_from(["x-a", "x-b"]), st.text(max_size=6), max_size=2),
    st.text(max_size=40),
    st.one_of(st.none(), st.text(max_size=40)),
    st.integers(0, 70000),
)
@settings(max_examples=400, deadline=None)
def test_any_request_strings_give_a_decision(
    method: str,
    host: str,
    path: str,
    headers: dict[str, str],
    source_ip: str,
    principal: str | None,
    port: int,
) -> None:
    """Whatever the request carries (not an IP, odd hosts, paths and principals), evaluation gives a
    decision and never raises (an exception would turn into a 500)."""
    request = L7Request(source_ip, principal, "10.1.0.9", port, method, host, normalize_path(path), headers)
    assert isinstance(_FUZZ_POLICIES.evaluate(WEB, request).allowed, bool)
    assert isinstance(_FUZZ_POLICIES.evaluate(WEB, L4Request(*request[:4])).allowed, bool)
