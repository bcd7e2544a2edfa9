"""Tests for nodeproxy.config: parsing, defaults and the wording of validation errors."""

from __future__ import annotations

import copy
import math
import re
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.config import (
    Config,
    ConfigError,
    RelayConfig,
    SocketAddress,
    default_config,
    load_config,
    parse_config,
    parse_duration,
)

SOURCE = "config.yaml"

BASE: dict[str, Any] = {
    "node": {"name": "node-a"},
    "capture": {"pod_cidrs": ["10.244.1.0/24"], "pod_interfaces": ["npv+"]},
    "services": [
        {
            "name": "web",
            "vip": "10.96.0.10",
            "ports": [{"port": 80, "target_port": 8080}],
            "endpoints": [{"address": "10.244.1.100"}, {"address": "10.244.1.101"}],
        },
        {
            "name": "echo",
            "vip": "10.96.0.11",
            "ports": [{"port": 9000}],
            "endpoints": [{"address": "10.244.1.100"}],
        },
        {"name": "sink", "vip": "10.96.0.12", "ports": [{"port": 9001}]},
    ],
}


def base() -> dict[str, Any]:
    return copy.deepcopy(BASE)


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def errors_for(data: dict[str, Any] | str) -> ConfigError:
    text = data if isinstance(data, str) else to_yaml(data)
    with pytest.raises(ConfigError) as info:
        parse_config(text, SOURCE)
    return info.value


POSITION_RE = re.compile(r"line [0-9]+, column [0-9]+: ")


def without_position(problem: str) -> str:
    """``problem`` without its leading 'line L, column C: ' (each problem in a parsed file has one)."""
    match = POSITION_RE.match(problem)
    return problem[match.end() :] if match else problem


def problem_at(err: ConfigError, path: str) -> str:
    """The one problem at exactly ``path``, its position stripped; fails listing all problems otherwise."""
    matches = [p for p in err.problems if without_position(p).startswith(f"{path}: ")]
    assert len(matches) == 1, f"expected one problem at {path!r}, got:\n{err}"
    assert f"{SOURCE}: {matches[0]}" in str(err).splitlines()
    return without_position(matches[0])


# --------------------------------------------------------------------------------------------
# Valid configs


def test_default_config_parses_and_matches_lab() -> None:
    cfg = default_config()
    assert cfg.node.name == "node-a"
    assert cfg.capture.pod_cidrs == [IPv4Network("10.244.1.0/24")]
    assert cfg.capture.pod_interfaces == ["npv+"]
    assert str(cfg.listeners.outbound) == "127.0.0.1:15001"
    assert [s.name for s in cfg.services] == ["web", "echo", "sink", "iperf"]
    ports = cfg.service_ports()
    assert set(ports) == {
        ("10.96.0.10", 80),
        ("10.96.0.11", 9000),
        ("10.96.0.12", 9001),
        ("10.96.0.13", 5201),
    }
    web, web_port = ports[("10.96.0.10", 80)]
    assert web.name == "web" and web.balancer == "p2c" and web_port.backend_port == 8080
    assert [str(e.address) for e in web.endpoints] == ["10.244.1.100", "10.244.1.101", "10.244.1.102"]
    assert [e.labels["version"] for e in web.endpoints] == ["v1", "v1", "v2"]
    assert all(e.node == "node-a" for e in web.endpoints)
    assert ports[("10.96.0.11", 9000)][0].balancer == "least_conn"
    assert ports[("10.96.0.12", 9001)][0].balancer == "round_robin"
    assert ports[("10.96.0.12", 9001)][1].backend_port == 9001
    iperf = ports[("10.96.0.13", 5201)][0]
    assert [str(e.address) for e in iperf.endpoints] == ["10.244.1.100"]


def test_default_config_file_is_the_packaged_resource(tmp_path: Path) -> None:
    text = resources.files("nodeproxy").joinpath("default-config.yaml").read_text(encoding="utf-8")
    path = tmp_path / "nodeproxy.yaml"
    path.write_text(text, encoding="utf-8")
    assert load_config(path) == default_config()


def test_minimal_config_takes_documented_defaults() -> None:
    cfg = parse_config("node: {name: n1}\ncapture: {pod_interfaces: [eth0]}\n")
    assert cfg.services == []
    assert cfg.capture.pod_cidrs == []
    assert cfg.capture.mark == 0x539 and cfg.capture.mark_mask == 0xFFF
    assert cfg.capture.route_table == 133 and cfg.capture.rule_priority == 100
    assert cfg.capture.chain_prefix == "NODEPROXY"
    assert cfg.listeners.outbound == SocketAddress(host=IPv4Address("127.0.0.1"), port=15001)
    relay = cfg.relay
    assert (relay.threads, relay.pipe_size, relay.connect_attempts, relay.max_connections) == (
        0,
        1048576,
        3,
        100000,
    )
    assert (relay.connect_timeout, relay.drain_timeout, relay.idle_timeout) == (1.0, 5.0, 3600.0)


def test_models_are_frozen() -> None:
    cfg = default_config()
    with pytest.raises(pydantic.ValidationError):
        cfg.node.name = "other"  # type: ignore[misc]


def test_service_defaults_and_empty_endpoints() -> None:
    data = base()
    data["services"] = [{"name": "empty", "vip": "10.96.0.20", "ports": [{"port": 443, "name": "https"}]}]
    svc = parse_config(to_yaml(data)).services[0]
    assert svc.endpoints == [] and svc.balancer == "peak_ewma"
    assert svc.ports[0].target_port is None and svc.ports[0].backend_port == 443


def test_endpoint_fields() -> None:
    data = base()
    data["services"][0]["endpoints"] = [
        {"address": "10.244.2.7", "node": "node-b", "labels": {"app.kubernetes.io/name": "web"}, "weight": 5}
    ]
    ep = parse_config(to_yaml(data)).services[0].endpoints[0]
    assert ep.address == IPv4Address("10.244.2.7") and ep.node == "node-b" and ep.weight == 5
    assert ep.labels == {"app.kubernetes.io/name": "web"}


def test_socket_address_string_and_mapping() -> None:
    data = base()
    data["listeners"] = {"outbound": "0.0.0.0:15006"}
    assert str(parse_config(to_yaml(data)).listeners.outbound) == "0.0.0.0:15006"
    data["listeners"] = {"outbound": {"host": "127.0.0.2", "port": 15001}}
    addr = parse_config(to_yaml(data)).listeners.outbound
    assert addr.host == IPv4Address("127.0.0.2") and addr.port == 15001


def test_relay_durations_and_threads() -> None:
    data = base()
    data["relay"] = {"connect_timeout": "250ms", "drain_timeout": "1m", "idle_timeout": "0", "threads": 4}
    relay = parse_config(to_yaml(data)).relay
    assert relay.connect_timeout == 0.25 and relay.drain_timeout == 60.0 and relay.idle_timeout == 0
    assert relay.effective_threads == 4
    auto = RelayConfig.model_validate({"threads": 0}).effective_threads
    assert 1 <= auto <= 64


# --------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("3", 3.0),
        (".5s", 0.5),
        (" 10 ms ", 0.01),
        (2, 2.0),
        (0.75, 0.75),
    ],
)
def test_parse_duration_examples(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["-1s", "-5", -0.1, "1d", "5 sec", "ms", "", "1.5.0s", "nan", math.inf, True])
def test_parse_duration_rejects(bad: str | int | float) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


@given(st.integers(min_value=0))
def test_parse_duration_milliseconds_property(n: int) -> None:
    assert parse_duration(f"{n}ms") == n / 1000


@given(st.integers(min_value=0, max_value=10**9))
def test_parse_duration_units_agree(n: int) -> None:
    assert parse_duration(f"{n}s") == parse_duration(n) == parse_duration(f"{n * 1000}ms")
    assert parse_duration(f"{n}m") == parse_duration(f"{n * 60}s")


def test_relay_duration_errors_name_field() -> None:
    data = base()
    data["relay"] = {"connect_timeout": "0s", "drain_timeout": "3x"}
    err = errors_for(data)
    assert "more than 0 s" in problem_at(err, "relay.connect_timeout")
    assert "(got '3x')" in problem_at(err, "relay.drain_timeout")


# --------------------------------------------------------------------------------------------
# One test per validation rule: the exact field path must be in the message


def test_bad_endpoint_ip() -> None:
    data = base()
    data["services"][0]["endpoints"][1]["address"] = "10.244.1.300"
    line = problem_at(errors_for(data), "services[0].endpoints[1].address")
    assert "not a valid IPv4 address" in line and "(got '10.244.1.300')" in line


def test_integer_ip_is_rejected() -> None:
    data = base()
    data["services"][2]["vip"] = 10
    assert "(got 10)" in problem_at(errors_for(data), "services[2].vip")


def test_port_out_of_range() -> None:
    data = base()
    data["services"][1]["ports"][0]["port"] = 70000
    err = errors_for(data)
    assert str(err) == (
        "config.yaml: line 20, column 11: services[1].ports[0].port: "
        "Input should be less than or equal to 65535 (got 70000)"
    )


def test_duplicate_service_names() -> None:
    data = base()
    data["services"][2]["name"] = "web"
    line = problem_at(errors_for(data), "services")
    assert line == "services: service name 'web' is defined twice (services[0] and services[2])"


def test_duplicate_vip_port() -> None:
    data = base()
    data["services"][2]["vip"] = "10.96.0.11"
    data["services"][2]["ports"] = [{"port": 9000, "target_port": 9001}]
    line = problem_at(errors_for(data), "services[2].ports[0].port")
    assert "10.96.0.11:9000 is already claimed by service 'echo' (services[1].ports[0])" in line


def test_duplicate_port_within_service() -> None:
    data = base()
    data["services"][0]["ports"].append({"port": 80})
    assert "listed twice" in problem_at(errors_for(data), "services[0].ports[1].port")


def test_duplicate_endpoint_within_service() -> None:
    data = base()
    data["services"][0]["endpoints"][1]["address"] = "10.244.1.100"
    assert "listed twice" in problem_at(errors_for(data), "services[0].endpoints[1].address")


def test_vip_inside_pod_cidr() -> None:
    data = base()
    data["services"][1]["vip"] = "10.244.1.50"
    line = problem_at(errors_for(data), "services[1].vip")
    assert "inside pod CIDR 10.244.1.0/24 (capture.pod_cidrs[0])" in line


def test_unknown_key_is_named() -> None:
    data = base()
    data["capture"]["mak"] = 0x539
    data["services"][0]["endpoints"][0]["wieght"] = 3
    err = errors_for(data)
    assert "unknown key 'mak'; did you mean 'mark'?" in problem_at(err, "capture.mak")
    assert "unknown key 'wieght'" in problem_at(err, "services[0].endpoints[0].wieght")


def test_unknown_top_level_key_lists_valid_keys() -> None:
    data = base()
    data["xyzzy"] = {}
    assert "valid keys here: node, capture, listeners, relay, services" in problem_at(
        errors_for(data), "xyzzy"
    )


def test_missing_required_keys() -> None:
    err = errors_for("services: []\n")
    problem_at(err, "node")
    problem_at(err, "capture")


def test_neither_cidrs_nor_interfaces() -> None:
    data = base()
    data["capture"] = {"pod_cidrs": [], "pod_interfaces": []}
    data["services"] = []
    line = problem_at(errors_for(data), "capture")
    assert "at least one of pod_cidrs or pod_interfaces must be non-empty" in line


@pytest.mark.parametrize("pattern", ["", "+", "a++", "eth 0", "abcdefghijklmnop", "abcdefghijklmno+", "np*"])
def test_bad_interface_pattern(pattern: str) -> None:
    data = base()
    data["capture"]["pod_interfaces"] = ["eth0", pattern]
    assert "iptables interface pattern" in problem_at(errors_for(data), "capture.pod_interfaces[1]")


@pytest.mark.parametrize("pattern", ["eth0", "npv+", "veth_a.1-x", "abcdefghijklmn+", "abcdefghijklmno"])
def test_good_interface_pattern(pattern: str) -> None:
    data = base()
    data["capture"]["pod_interfaces"] = [pattern]
    assert parse_config(to_yaml(data)).capture.pod_interfaces == [pattern]


def test_pod_cidr_with_host_bits() -> None:
    data = base()
    data["capture"]["pod_cidrs"] = ["10.244.1.7/24"]
    assert "did you mean '10.244.1.0/24'" in problem_at(errors_for(data), "capture.pod_cidrs[0]")


def test_mark_outside_mask() -> None:
    data = base()
    data["capture"]["mark"] = 0x1000
    line = problem_at(errors_for(data), "capture.mark")
    assert "0x1000 does not fit in mark_mask 0xfff" in line


@pytest.mark.parametrize("table", [253, 254, 255])
def test_route_table_reserved(table: int) -> None:
    data = base()
    data["capture"]["route_table"] = table
    assert f"table {table} is the kernel's" in problem_at(errors_for(data), "capture.route_table")


@pytest.mark.parametrize(
    ("field", "value"),
    [("rule_priority", 32766), ("rule_priority", 0), ("mark", 0), ("chain_prefix", "nodeproxy")],
)
def test_capture_ranges(field: str, value: object) -> None:
    data = base()
    data["capture"][field] = value
    problem_at(errors_for(data), f"capture.{field}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threads", 65),
        ("threads", True),
        ("pipe_size", 5000),
        ("pipe_size", 2048),
        ("connect_attempts", 0),
        ("connect_attempts", "3"),
        ("connect_timeout", "10m"),
        ("idle_timeout", "-1s"),
        ("idle_timeout", "169h"),
        ("max_connections", 0),
    ],
)
def test_relay_ranges(field: str, value: object) -> None:
    data = base()
    data["relay"] = {field: value}
    problem_at(errors_for(data), f"relay.{field}")


@pytest.mark.parametrize("name", ["Web", "-web", "web-", "web_1", "a" * 64, ""])
def test_service_name_must_be_dns_label(name: str) -> None:
    data = base()
    data["services"][1]["name"] = name
    assert "RFC 1123 DNS label" in problem_at(errors_for(data), "services[1].name")


def test_bad_label_key_and_value() -> None:
    data = base()
    data["services"][0]["endpoints"][0]["labels"] = {"bad key": "x", "ok": "v" * 64}
    err = errors_for(data)
    assert "invalid key" in problem_at(err, "services[0].endpoints[0].labels['bad key']")
    assert "at most 63 characters" in problem_at(err, "services[0].endpoints[0].labels.ok")


def test_bad_outbound_listener() -> None:
    data = base()
    data["listeners"] = {"outbound": "127.0.0.1"}
    assert "expected 'IPv4:port'" in problem_at(errors_for(data), "listeners.outbound")
    data["listeners"] = {"outbound": {"host": "127.0.0.1", "port": 0}}
    problem_at(errors_for(data), "listeners.outbound.port")


def test_service_needs_a_port() -> None:
    data = base()
    data["services"][0]["ports"] = []
    problem_at(errors_for(data), "services[0].ports")


def test_all_problems_are_reported() -> None:
    data = base()
    data["node"]["name"] = "Node_A"
    data["capture"]["route_table"] = 254
    data["services"][1]["ports"][0]["port"] = 70000
    data["services"][0]["endpoints"][1]["address"] = "bogus"
    err = errors_for(data)
    assert len(err.problems) == 4
    assert all(line.startswith(f"{SOURCE}: ") for line in str(err).splitlines())
    assert not any(p.startswith(SOURCE) for p in err.problems)


def test_long_input_is_truncated() -> None:
    data = base()
    data["node"]["name"] = "X" * 500
    line = problem_at(errors_for(data), "node.name")
    assert line.endswith("...)") and len(line) < 300


# --------------------------------------------------------------------------------------------
# YAML and file errors


def test_yaml_syntax_error_mentions_line() -> None:
    text = "node:\n  name: node-a\ncapture: [\n  pod_interfaces: eth0\n"
    err = errors_for(text)
    assert len(err.problems) == 1
    assert str(err).startswith(f"{SOURCE}: line ")
    assert "YAML syntax error" in str(err) and "column" in str(err)


def test_yaml_error_line_number_is_one_based() -> None:
    err = errors_for("node: {name: a}\ncapture:\n  pod_interfaces: [eth0]\n   bad: indent\n")
    assert "line 4," in str(err)


def test_duplicate_yaml_key() -> None:
    err = errors_for("node:\n  name: a\n  name: b\ncapture: {pod_interfaces: [eth0]}\n")
    assert "line 3, column 3" in str(err) and "duplicate key 'name' (first defined on line 2)" in str(err)


@pytest.mark.parametrize(("text", "why"), [("", "empty"), ("- a\n- b\n", "mapping at the top level")])
def test_non_mapping_document(text: str, why: str) -> None:
    assert why in str(errors_for(text))


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: cannot read config file")
    assert info.value.source == str(path)


def test_load_config_reports_file_as_source(tmp_path: Path) -> None:
    path = tmp_path / "nodeproxy.yaml"
    path.write_text("node: {name: a}\ncapture: {pod_interfaces: [eth0]}\nrelay: {threads: 100}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: line 3, column 18: relay.threads: ")


def test_config_error_from_plain_message() -> None:
    err = ConfigError("something is wrong")
    assert str(err) == "something is wrong" and err.problems == ["something is wrong"]


def test_direct_model_validation_uses_same_rules() -> None:
    data = base()
    data["services"][2]["name"] = "web"
    with pytest.raises(pydantic.ValidationError, match="defined twice"):
        Config.model_validate(data)


def test_docs_example_is_the_default_config() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    example = doc.split("## Complete example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    shipped = resources.files("nodeproxy").joinpath("default-config.yaml").read_text(encoding="utf-8")
    assert example == shipped
