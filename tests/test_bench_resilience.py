"""The pure parts of the issue 8 benches: bench/resilience_overhead.py (bench.run's resilience features
on/off pair) and bench/scenario.py's configs and h2load log parsing. No namespaces."""

from __future__ import annotations

import pathlib

import yaml

from bench import paths, resilience_overhead, scenario
from bench.run import metrics_with_resilience, selected_metrics, workloads_with_resilience
from bench.workloads import METRICS
from nodeproxy.config import parse_config
from nodeproxy.lab_resilience import scenario_config


def test_resilience_services_join_nodeproxy_l7_config_and_parse(tmp_path: pathlib.Path) -> None:
    path = paths.NodeProxyPath(paths.new_lab(), tmp_path)
    assert path.config_text != path.l4_config_text  # the L7 services are in
    assert resilience_overhead.add_services(path) is None
    config = parse_config(path.config_text, "test")
    by_name = {s.name: s for s in config.services}
    bare, guarded = by_name["web-h1-bare"], by_name["web-h1-guarded"]
    assert (
        str(bare.vip) == resilience_overhead.BARE_VIP and str(guarded.vip) == resilience_overhead.GUARDED_VIP
    )
    assert bare.routes[0].resilience.retries.max_retries == 0 and bare.routes[0].resilience.timeout == 0
    assert bare.resilience.outlier_detection.consecutive_5xx == 0
    assert guarded.balancer == "peak_ewma" and guarded.routes[0].resilience.retries.max_retries == 2
    assert guarded.resilience.rate_limit is not None and guarded.routes[0].resilience.rate_limit is not None
    # Same endpoint and port as web-h1: the only difference is the resilience settings.
    assert [e.address for e in bare.endpoints] == [e.address for e in by_name["web-h1"].endpoints]
    assert (
        bare.ports[0].backend_port == guarded.ports[0].backend_port == by_name["web-h1"].ports[0].backend_port
    )


def test_resilience_services_are_not_added_without_the_l7_services(tmp_path: pathlib.Path) -> None:
    path = paths.NodeProxyPath(paths.new_lab(), tmp_path, l7="off")
    assert resilience_overhead.add_services(path) == "nodeproxy runs without its L7 services"
    assert "web-h1-guarded" not in path.config_text


def test_resilience_pair_follows_the_l7_wrk_workload_and_row() -> None:
    names = [w.name for w in workloads_with_resilience(resilience_overhead.workload(lambda: []))]
    assert names[names.index("http/1.1 keep-alive") + 1] == "http/1.1 resilience off/on"
    keys = [m.key for m in metrics_with_resilience(METRICS)]
    assert keys[keys.index("h1_rps") + 1 : keys.index("h1_rps") + 5] == [
        "h1_bare_rps",
        "h1_guarded_rps",
        "cpu_h1_bare_requests",
        "cpu_h1_guarded_requests",
    ]
    # Without the L7 group there is no row to follow, and none is added.
    assert metrics_with_resilience(selected_metrics(["l4"])) == selected_metrics(["l4"])


def test_resilience_report_pairs_each_round_and_takes_the_median() -> None:
    rounds = [
        {"h1_bare_rps": 50_000.0, "h1_guarded_rps": 44_000.0},  # 0.88
        {"h1_bare_rps": 20_000.0, "h1_guarded_rps": 19_000.0},  # 0.95
        {"h1_bare_rps": 40_000.0, "h1_guarded_rps": 36_400.0},  # 0.91
        {"h1_rps": 1.0},  # a round without the pair (e.g. it failed): left out
    ]
    report = resilience_overhead.report(rounds)
    assert report["round_ratios"] == [0.88, 0.95, 0.91] and report["ratio"] == 0.91 and report["met"] is True
    assert report["cpu_ratio"] is None and report["cpu_met"] is None  # no CPU rows measured
    assert resilience_overhead.report(rounds[:1])["met"] is False
    text = resilience_overhead.render(rounds[:1])
    assert "median" not in text and "0.880" in text and "MISSED" in text and "44,000/50,000" in text
    assert "CPU-s/100k req @5000/s: not measured" in text
    assert "median of 3 rounds' ratios" in resilience_overhead.render(rounds)
    assert resilience_overhead.report([])["met"] is None
    assert "req/s: not measured" in resilience_overhead.render([{}])


def test_resilience_cpu_ratio_is_bounded_from_above() -> None:
    rounds = [
        {"cpu_h1_bare_requests": 5.0, "cpu_h1_guarded_requests": 5.4},  # 1.08
        {"cpu_h1_bare_requests": 4.0, "cpu_h1_guarded_requests": 4.8},  # 1.2
        {"cpu_h1_bare_requests": 5.0, "cpu_h1_guarded_requests": 5.25},  # 1.05
    ]
    report = resilience_overhead.report(rounds)
    assert report["cpu_round_ratios"] == [1.08, 1.2, 1.05] and report["cpu_ratio"] == 1.08
    assert report["cpu_met"] is True and report["met"] is None
    assert "<= 1.1: met" in resilience_overhead.render(rounds)
    assert resilience_overhead.report(rounds[1:2])["cpu_met"] is False


def test_scenario_bench_config_parses_with_features_off_and_on() -> None:
    config = parse_config(
        scenario_config(scenario.services(["10.244.1.100", "10.244.1.101", "10.244.1.102"]))
    )
    by_name = {s.name: s for s in config.services}
    assert set(by_name) == {c.service for c in scenario.CASES}
    off, on = by_name["failing-off"], by_name["failing-on"]
    assert off.balancer == "p2c" and on.balancer == "peak_ewma"
    assert off.routes[0].resilience.retries.retry_on == ["connect-failure"]
    assert "gateway-error" in on.routes[0].resilience.retries.retry_on
    assert (
        off.resilience.outlier_detection.consecutive_5xx
        == 0
        < on.resilience.outlier_detection.consecutive_5xx
    )
    assert config.relay.threads == 1
    assert yaml.safe_load(scenario_config([]))["services"] == []


def test_scenario_parses_h2load_log_rows() -> None:
    text = "1700000000000000\t200\t512\n1700000000001000\t503\t300\n1700000000002000\t-1\t0\nbroken\n"
    assert scenario.parse_log(text) == [(200, 512), (503, 300), (-1, 0)]
