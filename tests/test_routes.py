"""Tests for the routing configuration: port protocols, subsets, routes, the http block, and the
documented example in docs/routing.md."""

from __future__ import annotations

import copy
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeproxy.config import Config, ConfigError, HttpConfig, ServicePort, parse_config
from nodeproxy.proxy.http_route import GRPC_UNIMPLEMENTED, Forward, LocalReply, RequestAttrs, decide_request
from nodeproxy.routes import MAX_REGEX_PROGRAM_SIZE, protocol_from_port_name
from nodeproxy.state.routing import StateUpdater

SOURCE = "config.yaml"
ROUTING_DOC = Path(__file__).resolve().parent.parent / "docs" / "routing.md"

BASE: dict[str, Any] = {
    "node": {"name": "node-a"},
    "capture": {"pod_cidrs": ["10.244.1.0/24"]},
    "services": [
        {
            "name": "reviews",
            "vip": "10.96.0.20",
            "ports": [{"port": 80, "protocol": "http"}],
            "endpoints": [
                {"address": "10.244.1.10", "labels": {"env": "prod"}},
                {"address": "10.244.1.20", "labels": {"env": "staging"}},
            ],
            "subsets": [
                {"name": "prod", "labels": {"env": "prod"}},
                {"name": "staging", "labels": {"env": "staging"}},
            ],
            "routes": [
                {
                    "name": "staging",
                    "match": [{"headers": [{"name": "x-env", "exact": "staging"}]}],
                    "to": [{"subset": "staging"}],
                },
                {"name": "rest", "to": [{"subset": "prod"}]},
            ],
        }
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def reviews(data: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = data["services"][0]
    return service


def problems(data: dict[str, Any] | str) -> list[str]:
    """Every problem reported for ``data``, without the file name and the optional line/column."""
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    return [re.sub(r"^line [0-9]+, column [0-9]+: ", "", p) for p in info.value.problems]


def problem_at(data: dict[str, Any] | str, path: str) -> str:
    found = [p for p in problems(data) if p.startswith(f"{path}: ")]
    assert len(found) == 1, f"expected one problem at {path!r}, got {problems(data)}"
    return found[0]


def documented_example() -> str:
    text = ROUTING_DOC.read_text(encoding="utf-8")
    match = re.search(r"```yaml\n(.*?)```", text, re.DOTALL)
    assert match is not None, "docs/routing.md lost its example"
    return match.group(1)


# --------------------------------------------------------------------------------------------
# The documented example


def test_documented_example_parses_and_routes_as_the_doc_says() -> None:
    config = parse_config(documented_example(), "docs/routing.md")
    state = StateUpdater(rng=random.Random(2026)).apply(config)
    reviews_route = state.lookup("10.96.0.20", 80)
    ratings_route = state.lookup("10.96.0.21", 50051)
    assert reviews_route is not None and reviews_route.protocol == "http" and reviews_route.http is not None
    assert ratings_route is not None and ratings_route.protocol == "grpc" and ratings_route.http is not None
    routes = reviews_route.http
    assert routes.matched_headers == {"x-env", "content-type"}

    def forward(headers: dict[str, str], query: str = "") -> Forward:
        decision = decide_request(routes, RequestAttrs("GET", "reviews", "/", query, headers))
        assert isinstance(decision, Forward)
        return decision

    staging = forward({"x-env": "staging"})
    assert (staging.route, staging.subset, staging.endpoint.address, staging.endpoint.port) == (
        "staging",
        "staging",
        "10.244.1.20",
        9080,
    )
    assert staging.response_headers_add == (("x-served-by", "staging"),)
    assert forward({}, query="env=staging").endpoint.address == "10.244.1.20"
    assert forward({"x-env": "test"}).endpoint.address == "10.244.1.30"
    prod = {forward({"x-env": "prod"}).endpoint.address for _ in range(50)}
    assert prod == {"10.244.1.10", "10.244.1.11", "10.244.1.12"}

    canary: Counter[str | None] = Counter()
    for _ in range(2000):
        decision = forward({})
        assert decision.route == "canary" and decision.request_headers_remove == ("x-debug",)
        canary[decision.subset] += 1
    assert abs(canary["v2"] / 2000 - 0.10) <= 0.03, canary

    grpc = ratings_route.http
    call = decide_request(grpc, RequestAttrs("POST", "ratings", "/ratings.v2.Ratings/GetRating", "", {}))
    assert (
        isinstance(call, Forward)
        and call.endpoint.address == "10.244.1.41"
        and call.upstream_protocol == "http2"
    )
    other = decide_request(grpc, RequestAttrs("POST", "ratings", "/ratings.v1.Ratings/Get", "", {}))
    assert isinstance(other, Forward) and other.route == "ratings"
    missing = decide_request(grpc, RequestAttrs("POST", "ratings", "/other.Svc/Call", "", {}))
    assert isinstance(missing, LocalReply) and missing.grpc_status == GRPC_UNIMPLEMENTED


def documented_error_lines() -> list[str]:
    """The problems in the error samples of docs/routing.md, without file name and position."""
    text = ROUTING_DOC.read_text(encoding="utf-8")
    lines = re.findall(r"^config\.yaml: (?:line [0-9]+, column [0-9]+: )?(services.*)$", text, re.MULTILINE)
    assert len(lines) == 4, lines
    return lines


def test_documented_error_lines_are_what_the_loader_says() -> None:
    fields = base()
    routes = reviews(fields)["routes"]
    routes.insert(0, {"match": [{"headers": [{"name": "x-a", "exact": "1", "prefix": "x"}]}]})
    routes.insert(1, {"match": [{"path": {"regex": "(a"}}]})
    cross = base()
    reviews(cross)["routes"][1]["to"] = [{"subset": "canary"}]
    reviews(cross)["routes"].append({"name": "x", "to": [{"subset": "prod", "weight": 0}]})

    def key_order_free(lines: list[str]) -> list[str]:
        # '(got {...})' quotes a whole mapping, whose key order is the loader's business
        return [re.sub(r" \(got \{.*\}\)$", " (got {...})", line) for line in lines]

    assert key_order_free(documented_error_lines()) == key_order_free(problems(fields) + problems(cross))


# --------------------------------------------------------------------------------------------
# Protocols


@pytest.mark.parametrize(
    ("port", "protocol"),
    [
        ({"port": 80}, "tcp"),
        ({"port": 80, "name": "web"}, "tcp"),
        ({"port": 80, "name": "httpbin"}, "tcp"),  # a prefix needs the '-'
        ({"port": 80, "name": "http"}, "http"),
        ({"port": 80, "name": "http-web"}, "http"),
        ({"port": 80, "name": "http2-api"}, "http2"),
        ({"port": 80, "name": "grpc"}, "grpc"),
        ({"port": 80, "name": "grpc-ratings"}, "grpc"),
        ({"port": 80, "name": "grpc-web-ui"}, "http"),
        ({"port": 80, "name": "tcp-db"}, "tcp"),
        ({"port": 80, "name": "tls-x"}, "tcp"),
        ({"port": 80, "app_protocol": "kubernetes.io/h2c"}, "http2"),
        ({"port": 80, "app_protocol": "GRPC"}, "grpc"),
        ({"port": 80, "app_protocol": "https", "name": "http-web"}, "tcp"),  # appProtocol wins over the name
        ({"port": 80, "app_protocol": "something-else", "name": "grpc-x"}, "grpc"),  # unknown says nothing
        ({"port": 80, "protocol": "auto", "name": "tcp-x"}, "auto"),  # explicit wins
        ({"port": 80, "protocol": "http2", "app_protocol": "h2c"}, "http2"),
    ],
)
def test_port_protocol_resolution(port: dict[str, Any], protocol: str) -> None:
    assert ServicePort.model_validate(port).resolved_protocol == protocol


def test_port_name_prefix_table() -> None:
    assert protocol_from_port_name(None) is None
    assert protocol_from_port_name("grpcx") is None
    assert protocol_from_port_name("mysql-primary") == "tcp"


def test_contradicting_protocol_and_app_protocol_is_rejected() -> None:
    data = base()
    reviews(data)["ports"] = [{"port": 80, "protocol": "grpc", "app_protocol": "http"}]
    assert "protocol 'grpc' contradicts app_protocol 'http' (which means http)" in problem_at(
        data, "services[0].ports[0]"
    )


def test_unknown_protocol_is_rejected_with_its_path() -> None:
    data = base()
    reviews(data)["ports"] = [{"port": 80, "protocol": "websocket"}]
    assert "'tcp', 'http', 'http2', 'grpc' or 'auto'" in problem_at(data, "services[0].ports[0].protocol")


def test_routes_on_a_tcp_only_service_are_rejected() -> None:
    data = base()
    reviews(data)["ports"] = [{"port": 80, "name": "tcp-x"}]
    assert "routes and subsets apply to HTTP ports only" in problem_at(data, "services[0].routes")


# --------------------------------------------------------------------------------------------
# Route and subset validation


def test_base_config_is_valid() -> None:
    config = Config.model_validate(base())
    assert [r.name for r in config.services[0].routes] == ["staging", "rest"]


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a", "invalid RE2 regex: missing ): (a"),
        ("[z-a]", "invalid RE2 regex: invalid character class range: z-a"),
        (
            "(a)\\1",
            "invalid RE2 regex: invalid escape sequence: \\1 (RE2 has no backreferences or lookaround)",
        ),
        ("/(?=x)", "invalid RE2 regex: invalid perl operator: (?= (RE2 has no backreferences or lookaround)"),
        ("a" * 1025, "regex is 1025 characters long; at most 1024 are allowed"),
        ("[a-z]{1,40}[0-9]{1,40}", f"has 162 instructions, at most {MAX_REGEX_PROGRAM_SIZE} are allowed"),
    ],
)
def test_bad_regexes_are_rejected_at_load_with_field_paths(pattern: str, why: str) -> None:
    for where, path in [
        ({"path": {"regex": pattern}}, "services[0].routes[0].match[0].path.regex"),
        ({"headers": [{"name": "x-a", "regex": pattern}]}, "services[0].routes[0].match[0].headers[0].regex"),
        ({"query": [{"name": "q", "regex": pattern}]}, "services[0].routes[0].match[0].query[0].regex"),
        ({"authority": {"regex": pattern}}, "services[0].routes[0].match[0].authority.regex"),
    ]:
        data = base()
        reviews(data)["routes"][0]["match"] = [where]
        assert why in problem_at(data, path)


def test_unknown_subset_is_rejected_with_its_path() -> None:
    data = base()
    reviews(data)["routes"][1]["to"] = [{"subset": "prod", "weight": 90}, {"subset": "canary", "weight": 10}]
    assert problem_at(data, "services[0].routes[1].to[1].subset") == (
        "services[0].routes[1].to[1].subset: unknown subset 'canary' (defined: 'prod', 'staging')"
    )


def test_weights_summing_to_zero_are_rejected() -> None:
    data = base()
    reviews(data)["routes"][1]["to"] = [{"subset": "prod", "weight": 0}, {"subset": "staging", "weight": 0}]
    assert problem_at(data, "services[0].routes[1].to") == (
        "services[0].routes[1].to: the weights sum to 0; at least one must be positive"
    )


@pytest.mark.parametrize(
    ("weight", "why"),
    [
        (-1, "greater than or equal to 0"),
        (1_000_001, "less than or equal to 1000000"),
        ("5", "valid integer"),
    ],
)
def test_bad_weights_are_rejected(weight: object, why: str) -> None:
    data = base()
    reviews(data)["routes"][1]["to"] = [{"subset": "prod", "weight": weight}]
    assert why in problem_at(data, "services[0].routes[1].to[0].weight")


def test_all_cross_field_route_problems_are_reported_at_once() -> None:
    data = base()
    service = reviews(data)
    service["subsets"].append({"name": "prod", "labels": {"env": "x"}})
    service["routes"][1]["name"] = "staging"
    service["routes"][1]["to"] = [{"subset": "prod"}, {"subset": "prod"}, {"subset": "nope"}]
    found = problems(data)
    assert found == [
        "services[0].subsets[2].name: subset 'prod' is defined twice (subsets[0] and subsets[2])",
        "services[0].routes[1].name: route 'staging' is defined twice (routes[0] and routes[1])",
        "services[0].routes[1].to[1]: subset 'prod' is listed twice (to[0] and to[1]); merge the weights",
        "services[0].routes[1].to[2].subset: unknown subset 'nope' (defined: 'prod', 'staging')",
    ]


@pytest.mark.parametrize(
    ("match", "path", "why"),
    [
        ({"path": {}}, "match[0].path", "exactly one of exact, prefix, regex must be set (got none)"),
        ({"path": {"exact": "/a", "prefix": "/"}}, "match[0].path", "(got exact, prefix)"),
        (
            {"headers": [{"name": "x-a"}]},
            "match[0].headers[0]",
            "exactly one of exact, prefix, regex, present, absent",
        ),
        (
            {"headers": [{"name": "x-a", "present": False}]},
            "match[0].headers[0].present",
            "Input should be True",
        ),
        (
            {"headers": [{"name": "x a", "exact": "1"}]},
            "match[0].headers[0].name",
            "must be an HTTP field name",
        ),
        (
            {"headers": [{"name": ":path", "exact": "1"}]},
            "match[0].headers[0].name",
            "must be an HTTP field name",
        ),
        (
            {"headers": [{"name": "Host", "exact": "a"}]},
            "match[0].headers[0].name",
            "match the host with `authority`",
        ),
        ({"query": [{"name": "a", "prefix": "x"}]}, "match[0].query[0].prefix", "unknown key 'prefix'"),
        ({"query": [{"name": "", "exact": "x"}]}, "match[0].query[0].name", "at least 1 character"),
        ({"methods": []}, "match[0].methods", "at least 1 item"),
        ({"methods": ["G T"]}, "match[0].methods[0]", "must be an HTTP method"),
        ({"pat": {"exact": "/"}}, "match[0].pat", "unknown key 'pat'; did you mean 'path'?"),
    ],
)
def test_malformed_matches_are_rejected_with_field_paths(match: dict[str, Any], path: str, why: str) -> None:
    data = base()
    reviews(data)["routes"][0]["match"] = [match]
    assert why in problem_at(data, f"services[0].routes[0].{path}")


def test_unknown_route_key_gets_a_hint() -> None:
    data = base()
    reviews(data)["routes"][0]["mach"] = reviews(data)["routes"][0].pop("match")
    assert "unknown key 'mach'; did you mean 'match'?" in problem_at(data, "services[0].routes[0].mach")


@pytest.mark.parametrize(
    ("edits", "path", "why"),
    [
        ({"set": {"content-length": "1"}}, "set['content-length']", "cannot be edited by a route"),
        ({"remove": ["Transfer-Encoding"]}, "remove[0]", "'transfer-encoding' cannot be edited"),
        ({"add": {"host": "x"}}, "add.host", "cannot be edited"),
        ({"add": {"x-a": "a\r\nx-b: b"}}, "add['x-a']", "must not contain control characters"),
        ({"add": {"x-a": "a\x00"}}, "add['x-a']", "must not contain control characters"),
        ({"add": {"x-a": "a\x7fb"}}, "add['x-a']", "must not contain control characters"),
        ({"add": {"x-a": "a\tb"}}, None, None),  # tab is allowed inside a value
        ({"add": {"x-a": " a"}}, "add['x-a']", "must not start or end with whitespace"),
        ({"add": {"x-a": "a" * 8193}}, "add['x-a']", "at most 8192 characters"),
        ({"add": {"bad name": "1"}}, "add['bad name']", "must be an HTTP field name"),
    ],
)
def test_bad_header_edits_are_rejected(edits: dict[str, Any], path: str | None, why: str | None) -> None:
    data = base()
    reviews(data)["routes"][0]["request_headers"] = edits
    if path is None or why is None:
        Config.model_validate(data)
        return
    assert why in problem_at(data, f"services[0].routes[0].request_headers.{path}")


def test_header_edit_conflicts_are_rejected() -> None:
    data = base()
    reviews(data)["routes"][0]["response_headers"] = {
        "add": {"x-a": "1"},
        "set": {"x-a": "2"},
        "remove": ["X-A"],
    }
    found = problems(data)
    assert "services[0].routes[0].response_headers.remove: 'x-a' is both removed and added or set" in found
    assert "services[0].routes[0].response_headers.add: 'x-a' is both added and set; use one" in found


@pytest.mark.parametrize(
    ("subset", "path", "why"),
    [
        ({"name": "Prod", "labels": {"env": "prod"}}, "subsets[0].name", "RFC 1123 DNS label"),
        ({"name": "prod", "labels": {}}, "subsets[0].labels", "at least 1 item"),
        ({"name": "prod", "labels": {"-env": "prod"}}, "subsets[0].labels['-env']", "a label key must be"),
        ({"name": "prod", "labels": {"env": "x" * 64}}, "subsets[0].labels.env", "at most 63 characters"),
    ],
)
def test_bad_subsets_are_rejected(subset: dict[str, Any], path: str, why: str) -> None:
    data = base()
    reviews(data)["subsets"] = [subset, {"name": "staging", "labels": {"env": "staging"}}]
    assert why in problem_at(data, f"services[0].{path}")


# --------------------------------------------------------------------------------------------
# The http block


def test_http_defaults_are_the_documented_ones() -> None:
    assert HttpConfig() == HttpConfig(
        peek_timeout=0.1,
        header_timeout=10.0,
        max_head_bytes=61440,
        max_header_fields=100,
        upstream_pool_size=256,
        upstream_idle_timeout=4.0,
    )
    assert Config.model_validate(base()).http == HttpConfig()
    doc = ROUTING_DOC.read_text(encoding="utf-8")
    rows = [
        "`peek_timeout` | duration, (0, 10 s] | `100ms`",
        "`header_timeout` | duration, (0, 1 h] | `10s`",
        "`max_head_bytes` | int, 1024..1048576 | `61440`",
        "`max_header_fields` | int, 1..128 | `100`",
        "`upstream_pool_size` | int, 0..65536 | `256`",
        "`upstream_idle_timeout` | duration, 0..1 day | `4s`",
    ]
    for row in rows:
        assert row in doc


def test_http_block_parses_durations_and_rejects_out_of_range_values() -> None:
    data = base()
    data["http"] = {"peek_timeout": "250ms", "header_timeout": "1m", "upstream_idle_timeout": 0}
    config = Config.model_validate(data)
    assert (config.http.peek_timeout, config.http.header_timeout, config.http.upstream_idle_timeout) == (
        0.25,
        60,
        0,
    )
    data["http"] = {
        "peek_timeout": 0,
        "max_header_fields": 129,
        "max_head_bytes": 100,
        "upstream_pool_sise": 3,
    }
    found = problems(data)
    assert any(p.startswith("http.peek_timeout: must be more than 0 s") for p in found), found
    assert any(
        p.startswith("http.max_header_fields: Input should be less than or equal to 128") for p in found
    )
    assert any(
        p.startswith("http.max_head_bytes: Input should be greater than or equal to 1024") for p in found
    )
    assert (
        "http.upstream_pool_sise: unknown key 'upstream_pool_sise'; did you mean 'upstream_pool_size'?"
        in found
    )
