"""Fuzzing the config loader: any input gives a Config or a ConfigError (issue 6, defects 3-5).

A ConfigError must carry one line per problem, never the "internal error" fallback (which exists so
the daemon survives a bug, not as an answer), and each example must finish in bounded time. The whole
file takes about 8 s of CPU (about 750 examples).
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nodeproxy.config as config_module
from nodeproxy.config import Config, ConfigError, load_config, parse_config

# Per example: far above the milliseconds a small input takes, far below the seconds of the defects.
EXAMPLE_SECONDS = 1.0
FUZZ = settings(
    max_examples=150,
    deadline=None,  # timed by check_outcome instead: hypothesis deadlines flake on a shared 2-core VM
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def check_outcome(load: Any, *args: Any) -> Config | None:
    started = time.perf_counter()
    try:
        result = load(*args)
    except ConfigError as err:
        elapsed = time.perf_counter() - started
        assert err.problems, "a ConfigError without problems"
        for problem in err.problems:
            assert "\n" not in problem and "\r" not in problem, problem
            assert "internal error" not in problem, problem
        assert len(str(err).splitlines()) == len(err.problems)
        assert elapsed < EXAMPLE_SECONDS, (elapsed, args)
        return None
    elapsed = time.perf_counter() - started
    assert isinstance(result, Config)
    assert elapsed < EXAMPLE_SECONDS, (elapsed, args)
    return result


@pytest.fixture(params=["libyaml", "python"])
def yaml_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "libyaml" and not yaml.__with_libyaml__:
        pytest.skip("PyYAML was built without libyaml")
    monkeypatch.setattr(config_module, "USE_LIBYAML", request.param == "libyaml")
    yield request.param


# --------------------------------------------------------------------------------------------
# Unstructured: bytes and text


@FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_in_a_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    check_outcome(load_config, path)


@settings(FUZZ, max_examples=100)
@given(st.text(max_size=1024))
def test_any_text(yaml_parser: str, text: str) -> None:
    check_outcome(parse_config, text)


# --------------------------------------------------------------------------------------------
# YAML-ish: token soup with the syntax and the YAML 1.1 forms that broke PyYAML's loader

TOKENS = [
    *("node", "capture", "services", "relay", "listeners", "name", "vip", "ports", "port"),
    *("endpoints", "address", "labels", "weight", "balancer", "pod_cidrs", "pod_interfaces"),
    *("connect_timeout", "idle_timeout", "outbound", "target_port", "mark", "threads"),
    *(": ", ":", "- ", "-", "[", "]", "{", "}", ", ", "\n", "\n  ", "\n    ", "  ", "#", "'", '"', "|", ">"),
    *("&a ", "*a", "&b ", "*b", "<<: ", "!!binary ", "!!str ", "!!int ", "!!set ", "!x ", "? ", "---\n"),
    *("2024-02-30", "2024-13-45", "2001-12-14t21:59:43.10-05:00", "1:20", "190:20:30", "0755", "0o17"),
    *("0x539", "0b101", "1_000", "yes", "no", "on", "Off", "~", "null", "true", "FALSE", ".nan", "-.inf"),
    *("1e999", "9" * 60, "0.5ms", "250ms", "10.96.0.10", "127.0.0.1", "10.244.1.0/24", "255.255.255.255"),
    *("0.0.0.0:15001", "p2c", "least_conn", "web", "npv+", "\t", "\\", "%YAML 1.1\n", "\x85", "\ufeff"),
]


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), max_size=120))
def test_yaml_token_soup(yaml_parser: str, tokens: list[str]) -> None:
    check_outcome(parse_config, "".join(tokens))


# --------------------------------------------------------------------------------------------
# Structured: config-shaped documents with wrong types, values and keys in every place

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["10.96.0.10", "10.244.1.5", "127.0.0.1", "224.0.0.1", "10.244.1.0/24", "1s", "0.4ms", "web", "veth+"]
    ),
)
KEYS = st.sampled_from(
    [
        *("node", "capture", "listeners", "relay", "services", "name", "vip", "ports", "port", "target_port"),
        *("endpoints", "address", "labels", "weight", "balancer", "pod_cidrs", "pod_interfaces", "mark"),
        *("mark_mask", "route_table", "outbound", "threads", "connect_timeout", "idle_timeout", "x"),
    ]
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=12,
)


def config_shaped() -> st.SearchStrategy[dict[str, Any]]:
    port = st.fixed_dictionaries({"port": VALUES}, optional={"target_port": VALUES, "name": VALUES})
    endpoint = st.fixed_dictionaries({"address": VALUES}, optional={"weight": VALUES, "labels": VALUES})
    service = st.fixed_dictionaries(
        {"name": VALUES, "vip": VALUES, "ports": st.lists(port, max_size=3)},
        optional={"endpoints": st.lists(endpoint, max_size=4), "balancer": VALUES},
    )
    return st.fixed_dictionaries(
        {"node": st.fixed_dictionaries({"name": VALUES}), "capture": VALUES},
        optional={
            "services": st.lists(service, max_size=3),
            "relay": st.dictionaries(KEYS, VALUES, max_size=4),
            "listeners": st.fixed_dictionaries({"outbound": VALUES}),
        },
    )


# Fewer examples: generating nested documents costs hypothesis far more than loading them.
@settings(FUZZ, max_examples=60)
@given(config_shaped(), st.sampled_from([False, True]))
def test_config_shaped_documents(document: dict[str, Any], flow_style: bool) -> None:
    text = yaml.safe_dump(document, default_flow_style=flow_style, allow_unicode=True)
    check_outcome(parse_config, text)


@settings(FUZZ, max_examples=100)
@given(
    st.sampled_from([2, 4, 8, 16]), st.integers(min_value=1, max_value=12), st.sampled_from(["relay", "x"])
)
def test_alias_chains_stay_bounded(fanout: int, levels: int, where: str) -> None:
    lines = ["node: {name: a}", "capture: {pod_interfaces: [eth0]}", "d0: &d0 [1]"]
    lines += [f"d{i}: &d{i} [" + ", ".join([f"*d{i - 1}"] * fanout) + "]" for i in range(1, levels)]
    lines.append(f"{where}: {{threads: *d{levels - 1}}}")
    tracemalloc.start()
    try:
        check_outcome(parse_config, "\n".join(lines) + "\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, peak  # 16^11 strings if aliases were expanded; the limit keeps ~250k
