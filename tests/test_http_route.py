"""Tests for the per-request routing decision (nodeproxy.proxy.http_route): tables, no sockets."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy.balance import Endpoint, RoundRobin
from nodeproxy.config import Config, parse_config
from nodeproxy.proxy.http_route import (
    GRPC_INTERNAL,
    GRPC_UNAVAILABLE,
    GRPC_UNIMPLEMENTED,
    Forward,
    LocalReply,
    RequestAttrs,
    decide_request,
    grpc_status_for,
    parse_query,
)
from nodeproxy.routes import HttpServiceRoutes, Route, RouteMatch, RouteRegex, StringMatch, Subset
from nodeproxy.state.routing import StateUpdater

VIP = "10.96.0.20"

ENDPOINTS: list[dict[str, Any]] = [
    {"address": "10.244.1.10", "labels": {"env": "prod", "version": "v1"}},
    {"address": "10.244.1.11", "labels": {"env": "prod", "version": "v2"}},
    {"address": "10.244.1.20", "labels": {"env": "staging", "version": "v1"}},
]
SUBSETS: list[dict[str, Any]] = [
    {"name": "prod", "labels": {"env": "prod"}},
    {"name": "staging", "labels": {"env": "staging"}},
    {"name": "v2", "labels": {"version": "v2", "env": "prod"}},
    {"name": "empty", "labels": {"env": "test"}},
]


def config_for(
    routes: list[dict[str, Any]],
    *,
    protocol: str = "http",
    subsets: list[dict[str, Any]] | None = None,
    endpoints: list[dict[str, Any]] | None = None,
) -> Config:
    data = {
        "node": {"name": "node-a"},
        "capture": {"pod_cidrs": ["10.244.1.0/24"]},
        "services": [
            {
                "name": "reviews",
                "vip": VIP,
                "ports": [{"port": 80, "target_port": 9080, "protocol": protocol}],
                "balancer": "round_robin",
                "endpoints": ENDPOINTS if endpoints is None else endpoints,
                "subsets": SUBSETS if subsets is None else subsets,
                "routes": routes,
            }
        ],
    }
    return Config.model_validate(data)


def compiled(
    routes: list[dict[str, Any]], *, protocol: str = "http", seed: int = 7, **kw: Any
) -> HttpServiceRoutes:
    state = StateUpdater(rng=random.Random(seed)).apply(config_for(routes, protocol=protocol, **kw))
    route = state.lookup(VIP, 80)
    assert route is not None and route.http is not None
    assert route.protocol == protocol
    return route.http


def attrs(
    path: str = "/",
    *,
    method: str = "GET",
    query: str = "",
    headers: Mapping[str, str] | None = None,
    authority: str = "reviews",
) -> RequestAttrs:
    return RequestAttrs(method=method, authority=authority, path=path, query=query, headers=headers or {})


def route_name(routes: HttpServiceRoutes, request: RequestAttrs) -> str | None:
    """The matching route's name, or None for a local reply."""
    decision = decide_request(routes, request)
    return decision.route if isinstance(decision, Forward) else None


# One route per table: name 'hit' when the match holds; a request it misses gets 404 NR.
MATCH_TABLE: list[tuple[str, dict[str, Any], RequestAttrs, bool]] = [
    ("path exact hit", {"path": {"exact": "/a"}}, attrs("/a"), True),
    ("path exact is not a prefix", {"path": {"exact": "/a"}}, attrs("/ab"), False),
    ("path exact is case-sensitive", {"path": {"exact": "/a"}}, attrs("/A"), False),
    ("path exact ignores the query", {"path": {"exact": "/a"}}, attrs("/a", query="x=1"), True),
    ("path prefix hit", {"path": {"prefix": "/api/"}}, attrs("/api/v1"), True),
    ("path prefix miss", {"path": {"prefix": "/api/"}}, attrs("/apix"), False),
    ("path regex hit", {"path": {"regex": "/users/[0-9]+"}}, attrs("/users/42"), True),
    ("path regex must match whole path", {"path": {"regex": "/users/[0-9]+"}}, attrs("/users/42/x"), False),
    ("path regex no substring search", {"path": {"regex": "[0-9]+"}}, attrs("/users/42"), False),
    ("method hit", {"methods": ["GET", "HEAD"]}, attrs(method="HEAD"), True),
    ("method miss", {"methods": ["GET", "HEAD"]}, attrs(method="POST"), False),
    ("method is case-sensitive", {"methods": ["GET"]}, attrs(method="get"), False),
    (
        "header exact hit",
        {"headers": [{"name": "x-env", "exact": "staging"}]},
        attrs(headers={"x-env": "staging"}),
        True,
    ),
    (
        "header exact miss",
        {"headers": [{"name": "x-env", "exact": "staging"}]},
        attrs(headers={"x-env": "stag"}),
        False,
    ),
    ("header exact absent", {"headers": [{"name": "x-env", "exact": "staging"}]}, attrs(), False),
    (
        "header name case-insensitive",
        {"headers": [{"name": "X-Env", "exact": "a"}]},
        attrs(headers={"x-env": "a"}),
        True,
    ),
    (
        "header prefix hit",
        {"headers": [{"name": "user-agent", "prefix": "curl/"}]},
        attrs(headers={"user-agent": "curl/8"}),
        True,
    ),
    (
        "header prefix miss",
        {"headers": [{"name": "user-agent", "prefix": "curl/"}]},
        attrs(headers={"user-agent": "wget"}),
        False,
    ),
    (
        "header regex hit",
        {"headers": [{"name": "x-user", "regex": "(alice|bob)"}]},
        attrs(headers={"x-user": "bob"}),
        True,
    ),
    (
        "header regex whole value",
        {"headers": [{"name": "x-user", "regex": "(alice|bob)"}]},
        attrs(headers={"x-user": "bobby"}),
        False,
    ),
    ("header regex absent", {"headers": [{"name": "x-user", "regex": ".*"}]}, attrs(), False),
    (
        "header present hit",
        {"headers": [{"name": "x-debug", "present": True}]},
        attrs(headers={"x-debug": ""}),
        True,
    ),
    ("header present miss", {"headers": [{"name": "x-debug", "present": True}]}, attrs(), False),
    ("header absent hit", {"headers": [{"name": "x-debug", "absent": True}]}, attrs(), True),
    (
        "header absent miss",
        {"headers": [{"name": "x-debug", "absent": True}]},
        attrs(headers={"x-debug": "1"}),
        False,
    ),
    ("query exact hit", {"query": [{"name": "env", "exact": "test"}]}, attrs(query="a=1&env=test"), True),
    ("query exact miss", {"query": [{"name": "env", "exact": "test"}]}, attrs(query="env=prod"), False),
    (
        "query exact form-decoded",
        {"query": [{"name": "q", "exact": "a b@c"}]},
        attrs(query="q=a+b%40c"),
        True,
    ),
    (
        "query first occurrence counts",
        {"query": [{"name": "env", "exact": "test"}]},
        attrs(query="env=prod&env=test"),
        False,
    ),
    ("query regex hit", {"query": [{"name": "id", "regex": "[0-9]{3}"}]}, attrs(query="id=123"), True),
    ("query regex miss", {"query": [{"name": "id", "regex": "[0-9]{3}"}]}, attrs(query="id=1234"), False),
    (
        "query present without value",
        {"query": [{"name": "debug", "present": True}]},
        attrs(query="debug"),
        True,
    ),
    (
        "query present with empty value",
        {"query": [{"name": "debug", "present": True}]},
        attrs(query="debug="),
        True,
    ),
    ("query present miss", {"query": [{"name": "debug", "present": True}]}, attrs(query="debugx=1"), False),
    ("query on empty query", {"query": [{"name": "debug", "present": True}]}, attrs(), False),
    (
        "authority exact, case-insensitive",
        {"authority": {"exact": "Reviews:80"}},
        attrs(authority="REVIEWS:80"),
        True,
    ),
    ("authority prefix miss", {"authority": {"prefix": "ratings"}}, attrs(authority="reviews"), False),
    (
        "all conditions of a match must hold",
        {"path": {"prefix": "/api"}, "methods": ["POST"], "headers": [{"name": "x-env", "exact": "a"}]},
        attrs("/api", method="POST", headers={"x-env": "b"}),
        False,
    ),
    (
        "all conditions of a match hold",
        {"path": {"prefix": "/api"}, "methods": ["POST"], "headers": [{"name": "x-env", "exact": "a"}]},
        attrs("/api", method="POST", headers={"x-env": "a"}),
        True,
    ),
]


@pytest.mark.parametrize(
    ("why", "match", "request_attrs", "hit"), MATCH_TABLE, ids=[t[0] for t in MATCH_TABLE]
)
def test_match_kinds(why: str, match: dict[str, Any], request_attrs: RequestAttrs, hit: bool) -> None:
    routes = compiled([{"name": "hit", "match": [match]}])
    decision = decide_request(routes, request_attrs)
    if hit:
        assert isinstance(decision, Forward), why
        assert decision.route == "hit"
    else:
        assert decision == LocalReply(404, "NR", "no route of service reviews matches the request"), why


def test_matches_are_alternatives_and_the_first_route_wins() -> None:
    routes = compiled(
        [
            {
                "name": "either",
                "match": [{"path": {"exact": "/a"}}, {"headers": [{"name": "x-env", "exact": "staging"}]}],
            },
            {"name": "api", "match": [{"path": {"prefix": "/"}}]},
            {"name": "never", "match": [{"path": {"prefix": "/"}}]},
        ]
    )
    assert route_name(routes, attrs("/a")) == "either"
    assert route_name(routes, attrs("/b", headers={"x-env": "staging"})) == "either"
    assert route_name(routes, attrs("/b")) == "api"


def test_a_route_without_match_catches_everything_and_unnamed_routes_get_their_index() -> None:
    routes = compiled([{"match": [{"path": {"exact": "/a"}}]}, {"to": [{"subset": "staging"}]}])
    assert route_name(routes, attrs("/a")) == "routes[0]"
    assert route_name(routes, attrs("/zzz", method="DELETE")) == "routes[1]"


def test_service_without_routes_sends_everything_to_all_endpoints() -> None:
    routes = compiled([])
    seen: Counter[str] = Counter()
    for _ in range(30):
        decision = decide_request(routes, attrs("/anything", method="PUT"))
        assert isinstance(decision, Forward)
        assert (decision.route, decision.subset, decision.upstream_protocol) == ("default", None, "http1")
        seen[decision.endpoint.address] += 1
    # round_robin over all three endpoints, subsets play no part
    assert seen == {"10.244.1.10": 10, "10.244.1.11": 10, "10.244.1.20": 10}


def test_routes_send_to_the_subset_selected_by_labels() -> None:
    routes = compiled(
        [
            {
                "name": "staging",
                "match": [{"headers": [{"name": "x-env", "exact": "staging"}]}],
                "to": [{"subset": "staging"}],
            },
            {"name": "v2", "match": [{"path": {"prefix": "/v2"}}], "to": [{"subset": "v2"}]},
            {"name": "prod", "to": [{"subset": "prod"}]},
        ]
    )
    for _ in range(10):
        staging = decide_request(routes, attrs(headers={"x-env": "staging"}))
        v2 = decide_request(routes, attrs("/v2/x"))
        prod = decide_request(routes, attrs("/"))
        assert isinstance(staging, Forward) and isinstance(v2, Forward) and isinstance(prod, Forward)
        assert (staging.subset, staging.endpoint.address) == ("staging", "10.244.1.20")
        assert (v2.subset, v2.endpoint.address) == ("v2", "10.244.1.11")
        assert prod.subset == "prod" and prod.endpoint.address in ("10.244.1.10", "10.244.1.11")
        assert staging.endpoint.port == 9080  # target_port


def test_empty_subset_is_503_uh_and_tried_endpoints_are_skipped() -> None:
    routes = compiled(
        [
            {
                "name": "test",
                "match": [{"headers": [{"name": "x-env", "exact": "test"}]}],
                "to": [{"subset": "empty"}],
            },
            {"name": "prod", "to": [{"subset": "prod"}]},
        ]
    )
    assert decide_request(routes, attrs(headers={"x-env": "test"})) == LocalReply(
        503, "UH", "subset empty of service reviews has no endpoints"
    )
    retry = decide_request(routes, attrs(), tried={"10.244.1.10"})
    assert isinstance(retry, Forward) and retry.endpoint.address == "10.244.1.11"
    assert decide_request(routes, attrs(), tried={"10.244.1.10", "10.244.1.11"}) == LocalReply(
        503, "UH", "all 2 endpoints of subset prod of service reviews were tried"
    )
    no_endpoints = compiled([], endpoints=[], subsets=[])
    assert decide_request(no_endpoints, attrs()) == LocalReply(503, "UH", "service reviews has no endpoints")


def test_grpc_local_replies_carry_grpc_status() -> None:
    routes = compiled(
        [
            {"name": "m", "match": [{"path": {"prefix": "/pkg.Svc/"}}], "to": [{"subset": "empty"}]},
            {"name": "n", "match": [{"path": {"prefix": "/pkg.Other/"}}], "to": [{"subset": "prod"}]},
        ],
        protocol="grpc",
    )
    no_route = decide_request(routes, attrs("/pkg.Nope/Call", method="POST"))
    assert isinstance(no_route, LocalReply)
    assert (no_route.status, no_route.flag, no_route.grpc_status) == (404, "NR", GRPC_UNIMPLEMENTED)
    no_endpoint = decide_request(routes, attrs("/pkg.Svc/Call", method="POST"))
    assert isinstance(no_endpoint, LocalReply)
    assert (no_endpoint.status, no_endpoint.flag, no_endpoint.grpc_status) == (503, "UH", GRPC_UNAVAILABLE)
    ok = decide_request(routes, attrs("/pkg.Other/Call", method="POST"))
    assert isinstance(ok, Forward) and ok.upstream_protocol == "http2"
    # the grpc port needs no content-type to know; other ports copy it to detect gRPC
    assert routes.matched_headers == frozenset()


@pytest.mark.parametrize(
    ("protocol", "content_type", "upstream", "grpc_status"),
    [
        ("http", None, "http1", None),
        ("http", "application/grpc", "http2", GRPC_UNIMPLEMENTED),
        ("http", "application/grpc+proto", "http2", GRPC_UNIMPLEMENTED),
        ("auto", "Application/GRPC; charset=utf-8", "http2", GRPC_UNIMPLEMENTED),
        ("http", "application/grpc-web", "http1", None),  # gRPC-Web is plain HTTP
        ("http", "application/grpcx", "http1", None),
        ("auto", "text/plain", "http1", None),
        ("http2", None, "http2", None),
        ("http2", "application/grpc", "http2", GRPC_UNIMPLEMENTED),
        ("grpc", None, "http2", GRPC_UNIMPLEMENTED),
    ],
)
def test_upstream_protocol_and_grpc_detection(
    protocol: str, content_type: str | None, upstream: str, grpc_status: int | None
) -> None:
    routes = compiled([{"name": "a", "match": [{"path": {"exact": "/a"}}]}], protocol=protocol)
    headers = {} if content_type is None else {"content-type": content_type}
    forward = decide_request(routes, attrs("/a", headers=headers))
    assert isinstance(forward, Forward) and forward.upstream_protocol == upstream
    reply = decide_request(routes, attrs("/b", headers=headers))
    assert isinstance(reply, LocalReply) and reply.grpc_status == grpc_status
    assert reply.status == 404 and reply.flag == "NR"


def test_matched_headers_are_exactly_those_routes_look_at() -> None:
    routes = compiled(
        [
            {"match": [{"headers": [{"name": "X-Env", "exact": "a"}, {"name": "x-debug", "absent": True}]}]},
            {"match": [{"path": {"prefix": "/"}}, {"headers": [{"name": "user-agent", "prefix": "curl"}]}]},
        ],
        protocol="auto",
    )
    assert routes.matched_headers == {"x-env", "x-debug", "user-agent", "content-type"}


def test_header_edits_set_is_remove_then_add() -> None:
    routes = compiled(
        [
            {
                "name": "edit",
                "request_headers": {
                    "set": {"X-Env": "staging"},
                    "add": {"x-trace": "1"},
                    "remove": ["x-internal", "Cookie"],
                },
                "response_headers": {"set": {"cache-control": "no-store"}, "remove": ["server"]},
            }
        ]
    )
    forward = decide_request(routes, attrs())
    assert isinstance(forward, Forward)
    assert forward.request_headers_remove == ("x-internal", "cookie", "x-env")
    assert forward.request_headers_add == (("x-env", "staging"), ("x-trace", "1"))
    assert forward.response_headers_remove == ("server", "cache-control")
    assert forward.response_headers_add == (("cache-control", "no-store"),)
    plain = compiled([{"name": "plain"}])
    forward = decide_request(plain, attrs())
    assert isinstance(forward, Forward)
    assert (forward.request_headers_add, forward.request_headers_remove) == ((), ())
    assert (forward.response_headers_add, forward.response_headers_remove) == ((), ())


def test_zero_weight_destination_never_gets_a_request() -> None:
    routes = compiled([{"to": [{"subset": "prod", "weight": 1}, {"subset": "staging", "weight": 0}]}])
    assert {
        d.subset for d in (decide_request(routes, attrs()) for _ in range(200)) if isinstance(d, Forward)
    } == {"prod"}


def test_subsets_follow_labels_across_reloads() -> None:
    updater = StateUpdater(rng=random.Random(1))
    routes = [{"to": [{"subset": "staging"}]}]
    first = updater.apply(config_for(routes)).lookup(VIP, 80)
    assert first is not None and first.http is not None
    assert [e.address for e in first.http.subsets["staging"]] == ["10.244.1.20"]
    relabelled = [dict(e, labels={"env": "staging"}) for e in ENDPOINTS]
    second = updater.apply(config_for(routes, endpoints=relabelled)).lookup(VIP, 80)
    assert second is not None and second.http is not None
    assert [e.address for e in second.http.subsets["staging"]] == [e["address"] for e in ENDPOINTS]
    # the live Endpoint objects (and their counters) are the same ones across the reload
    assert second.http.subsets["staging"][2] is first.http.subsets["staging"][0]


def test_tcp_ports_get_no_http_routes() -> None:
    config = parse_config(
        """
node: {name: node-a}
capture: {pod_cidrs: ["10.244.1.0/24"]}
services:
  - name: mixed
    vip: 10.96.0.30
    ports: [{port: 80, name: http}, {port: 5432, name: tcp-db}, {port: 6379}]
    endpoints: [{address: 10.244.1.10}]
"""
    )
    state = StateUpdater().apply(config)
    http, db, plain = (state.lookup("10.96.0.30", p) for p in (80, 5432, 6379))
    assert http is not None and http.protocol == "http" and http.http is not None
    assert db is not None and db.protocol == "tcp" and db.http is None
    assert plain is not None and plain.protocol == "tcp" and plain.http is None


@pytest.mark.parametrize(
    ("status", "flag", "grpc_status"),
    [
        (404, "NR", GRPC_UNIMPLEMENTED),
        (503, "UH", GRPC_UNAVAILABLE),
        (502, "UF", GRPC_UNAVAILABLE),  # never reached the server: safe for the client to retry
        (502, "UC", GRPC_INTERNAL),
        (400, "DPE", GRPC_INTERNAL),
        (431, "DPE", GRPC_INTERNAL),
        (408, "DPE", 4),
        (504, "UT", 4),
        (500, "", 2),
    ],
)
def test_grpc_status_mapping(status: int, flag: str, grpc_status: int) -> None:
    assert grpc_status_for(status, flag) == grpc_status


def test_route_regex_runs_in_linear_time_on_hostile_input() -> None:
    # (a+)+b backtracks exponentially in Python's re on 'aaaa...c'; RE2 answers at once.
    routes = compiled([{"match": [{"path": {"regex": "/(a+)+b"}}]}])
    hostile = attrs("/" + "a" * 50_000 + "c")
    start = time.perf_counter()
    for _ in range(10):
        assert isinstance(decide_request(routes, hostile), LocalReply)
    assert time.perf_counter() - start < 0.5


def _weighted_routes(weights: list[int], seed: int) -> tuple[HttpServiceRoutes, list[str]]:
    names = [f"s{i}" for i in range(len(weights))]
    endpoints = [{"address": f"10.244.1.{10 + i}", "labels": {"slot": name}} for i, name in enumerate(names)]
    subsets = [{"name": name, "labels": {"slot": name}} for name in names]
    to = [{"subset": name, "weight": w} for name, w in zip(names, weights, strict=True)]
    return compiled([{"name": "split", "to": to}], seed=seed, endpoints=endpoints, subsets=subsets), names


SAMPLES = 4000


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=5).filter(
        lambda w: sum(w) > 0
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_split_weights_are_honoured(weights: list[int], seed: int) -> None:
    routes, names = _weighted_routes(weights, seed)
    counts: Counter[str | None] = Counter()
    for _ in range(SAMPLES):
        decision = decide_request(routes, attrs())
        assert isinstance(decision, Forward)
        assert decision.endpoint.labels == {"slot": decision.subset}  # the endpoint is in its subset
        counts[decision.subset] += 1
    total = sum(weights)
    for name, weight in zip(names, weights, strict=True):
        expected = weight / total
        share = counts[name] / SAMPLES
        if weight == 0:
            assert counts[name] == 0
            continue
        # Binomial standard deviation; 5 sigma makes a false failure about one in two million.
        sigma = math.sqrt(expected * (1 - expected) / SAMPLES)
        assert abs(share - expected) <= 5 * sigma + 1e-9, (name, weight, weights, share)


class _EveryDraw(random.Random):
    """getrandbits(k) returns 0, 1, 2, ... (mod 2**k) in turn. decide_request draws a point below the
    total weight from getrandbits, rejecting points at or above the total, so `total` decisions see
    every point exactly once."""

    def __init__(self) -> None:
        super().__init__(0)
        self.next = 0

    def getrandbits(self, k: int) -> int:
        value = self.next % (1 << k)
        self.next += 1
        return value

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        raise AssertionError("decide_request draws with getrandbits")


@pytest.mark.parametrize("weights", [[90, 10], [1, 1], [1, 2, 3], [0, 5, 0, 7], [1000, 1]])
def test_every_draw_maps_to_a_destination_in_exact_proportion(weights: list[int]) -> None:
    routes, names = _weighted_routes(weights, seed=0)
    routes = dataclasses.replace(routes, rng=_EveryDraw())
    counts: Counter[str | None] = Counter()
    for _ in range(sum(weights)):
        decision = decide_request(routes, attrs())
        assert isinstance(decision, Forward)
        counts[decision.subset] += 1
    assert counts == {name: w for name, w in zip(names, weights, strict=True) if w}


def test_canary_90_10_within_3_percent_over_2000_requests() -> None:
    routes, _ = _weighted_routes([90, 10], seed=2026)
    counts: Counter[str | None] = Counter()
    for _ in range(2000):
        decision = decide_request(routes, attrs())
        assert isinstance(decision, Forward)
        counts[decision.subset] += 1
    assert abs(counts["s1"] / 2000 - 0.10) <= 0.03


def test_decision_can_be_built_without_config_for_the_engine() -> None:
    # HttpServiceRoutes is a plain value: the engine's tests may compile one from models directly.
    from nodeproxy.config import Service
    from nodeproxy.resilience.guard import ServiceGuards
    from nodeproxy.routes import compile_service_routes

    service = Service.model_validate(
        {
            "name": "svc",
            "vip": "10.96.0.40",
            "ports": [{"port": 80, "protocol": "http"}],
            "subsets": [Subset(name="all", labels={"app": "svc"})],
            "routes": [Route(to=[])],
        }
    )
    endpoint = Endpoint("10.0.0.1", 8080, labels={"app": "svc"})
    guards = ServiceGuards("svc", service.resilience, (endpoint,))
    routes = compile_service_routes(service, "http", (endpoint,), RoundRobin(), random.Random(0), guards)
    decision = decide_request(routes, attrs())
    assert isinstance(decision, Forward) and decision.endpoint is endpoint and decision.route == "routes[0]"


EQUIVALENCE_PATTERNS = ["/users/[0-9]+", "(?i)mozilla.*firefox.*", "a.c", "é+|[^/]*x", "(alice|bob)", ""]


@settings(max_examples=200, deadline=None)
@given(
    pattern=st.sampled_from(EQUIVALENCE_PATTERNS),
    value=st.text(alphabet="aAbcxé/0123456789\x00\n", max_size=12),
)
def test_route_regex_agrees_with_the_public_re2_api(pattern: str, value: str) -> None:
    # RouteRegex calls google-re2's binding directly for speed; it must answer as re2.fullmatch does.
    import re2

    assert RouteRegex(pattern).fullmatch(value) == (re2.fullmatch(pattern, value) is not None)


FUZZ_ROUTES: list[dict[str, Any]] = [
    {"name": "re", "match": [{"path": {"regex": "/(a|é)+"}, "query": [{"name": "q", "regex": "[0-9]+"}]}]},
    {
        "name": "hdr",
        "match": [{"headers": [{"name": "x-a", "prefix": "v"}, {"name": "x-b", "absent": True}]}],
    },
    {"name": "q", "match": [{"query": [{"name": "k", "exact": "v w"}]}], "to": [{"subset": "empty"}]},
    {
        "name": "auth",
        "match": [{"authority": {"regex": "rev.*"}}],
        "to": [{"subset": "prod", "weight": 3}, {"subset": "v2"}],
    },
]
FUZZ_COMPILED = compiled(FUZZ_ROUTES)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "get", ""]),
    authority=st.text(max_size=20),
    path=st.text(max_size=30),
    query=st.text(alphabet=st.characters(), max_size=30) | st.just("q=1&k=v+w&%zz=%&&=="),
    headers=st.dictionaries(
        st.sampled_from(["x-a", "x-b", "content-type"]), st.text(max_size=10), max_size=3
    ),
)
def test_any_request_gets_a_decision(
    method: str, authority: str, path: str, query: str, headers: dict[str, str]
) -> None:
    # Whatever bytes a client sends (the engine hands them over as str), the decision is a value.
    decision = decide_request(FUZZ_COMPILED, RequestAttrs(method, authority, path, query, headers))
    assert isinstance(decision, Forward | LocalReply)
    if isinstance(decision, LocalReply):
        assert (decision.status, decision.flag) in {(404, "NR"), (503, "UH")}


@settings(max_examples=500, deadline=None)
@given(query=st.text(alphabet="ab=&%+2041zé;", max_size=24))
def test_parse_query_agrees_with_parse_qsl_first_values(query: str) -> None:
    expected: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
        expected.setdefault(name, value)
    assert parse_query(query) == expected


# -- compiled matchers against a reference reading of the config --------------------------------

EQUIVALENCE_ROUTES: list[dict[str, Any]] = [
    {
        "name": "three-conditions",
        "match": [
            {
                "path": {"prefix": "/api"},
                "methods": ["GET", "POST"],
                "headers": [{"name": "x-a", "prefix": "v"}],
            }
        ],
    },
    {"name": "authority-regex", "match": [{"authority": {"regex": "rev[a-z]*(:80)?"}}]},
    {
        "name": "authority-either",
        "match": [{"authority": {"exact": "Ratings"}}, {"authority": {"prefix": "DET"}}],
    },
    {
        "name": "query",
        "match": [
            {"query": [{"name": "k", "exact": "v w"}, {"name": "n", "present": True}]},
            {"query": [{"name": "id", "regex": "[0-9]+"}]},
        ],
    },
    {
        "name": "headers",
        "match": [
            {
                "headers": [
                    {"name": "x-b", "absent": True},
                    {"name": "x-c", "present": True},
                    {"name": "x-d", "regex": "a.b"},
                ]
            }
        ],
    },
    {
        "name": "path-regex",
        "match": [{"path": {"regex": "/(a|é)+"}, "headers": [{"name": "x-a", "exact": "v1"}]}],
    },
    {"name": "path-exact-or-method", "match": [{"path": {"exact": "/x"}}, {"methods": ["PUT"]}]},
    {"name": "empty-alternative", "match": [{"path": {"exact": "/never"}}, {}], "to": [{"subset": "v2"}]},
]
EQUIVALENCE_COMPILED = compiled(EQUIVALENCE_ROUTES)
EQUIVALENCE_MODELS = [Route.model_validate(r) for r in EQUIVALENCE_ROUTES]


def _string_holds(match: StringMatch, value: str) -> bool:
    import re2

    if match.exact is not None:
        return value == match.exact
    if match.prefix is not None:
        return value.startswith(match.prefix)
    assert match.regex is not None
    return re2.fullmatch(match.regex, value) is not None


def _field_holds(
    fields: Mapping[str, str],
    name: str,
    string: StringMatch | None,
    present: bool | None,
    absent: bool | None,
) -> bool:
    value = fields.get(name)
    if present:
        return value is not None
    if absent:
        return value is None
    assert string is not None
    return value is not None and _string_holds(string, value)


def _reference_holds(match: RouteMatch, request: RequestAttrs) -> bool:
    """The documented meaning of a match, read straight from the config model."""
    query: dict[str, str] = {}
    for name, value in parse_qsl(request.query, keep_blank_values=True, errors="replace"):
        query.setdefault(name, value)
    if match.path is not None and not _string_holds(match.path, request.path):
        return False
    if match.methods is not None and request.method not in match.methods:
        return False
    if match.authority is not None:
        a = match.authority
        lowered = StringMatch(
            exact=None if a.exact is None else a.exact.lower(),
            prefix=None if a.prefix is None else a.prefix.lower(),
            regex=a.regex,
        )
        if not _string_holds(lowered, request.authority.lower()):
            return False
    for h in match.headers:
        string = None if h.present or h.absent else StringMatch(exact=h.exact, prefix=h.prefix, regex=h.regex)
        if not _field_holds(request.headers, h.name, string, h.present, h.absent):
            return False
    for q in match.query:
        string = None if q.present else StringMatch(exact=q.exact, regex=q.regex)
        if not _field_holds(query, q.name, string, q.present, None):
            return False
    return True


def _reference_route(request: RequestAttrs) -> str | None:
    for i, route in enumerate(EQUIVALENCE_MODELS):
        if not route.match or any(_reference_holds(m, request) for m in route.match):
            return route.name or f"routes[{i}]"
    return None


_TEXT = st.characters(exclude_categories=["Cs"])  # RE2 takes UTF-8: no lone surrogates


@settings(max_examples=1500, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "get"]),
    authority=st.sampled_from(["reviews", "REVIEWS:80", "revx:81", "ratings", "details:9", "Det"])
    | st.text(_TEXT, max_size=8),
    path=st.sampled_from(["/api", "/api/v1", "/ap", "/aéa", "/x", "/never", "/"])
    | st.text(_TEXT, max_size=8),
    query=st.sampled_from(["", "k=v+w&n", "k=v%20w&n=", "n&k=v", "id=42", "id=4a", "id=1&id=x", "k=v+w"])
    | st.text(alphabet="kni=&v+w%201", max_size=12),
    headers=st.dictionaries(
        st.sampled_from(["x-a", "x-b", "x-c", "x-d", "content-type"]),
        st.sampled_from(["v", "v1", "w", "a-b", "axb", "ab", ""]) | st.text(_TEXT, max_size=4),
        max_size=4,
    ),
)
def test_compiled_matchers_agree_with_the_config_read_directly(
    method: str, authority: str, path: str, query: str, headers: dict[str, str]
) -> None:
    request = RequestAttrs(method=method, authority=authority, path=path, query=query, headers=headers)
    assert route_name(EQUIVALENCE_COMPILED, request) == _reference_route(request)


def test_request_attrs_are_immutable_and_built_by_keyword() -> None:
    request = RequestAttrs(method="GET", authority="a", path="/", query="", headers={})
    with pytest.raises(AttributeError):
        request.path = "/other"  # type: ignore[misc]
    assert request == attrs(authority="a")
