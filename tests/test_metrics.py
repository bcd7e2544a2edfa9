"""nodeproxy.metrics: recording, label derivation, merging and the Prometheus text it renders (parsed back
with prometheus_client's own parser)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nodeproxy.balance import Endpoint
from nodeproxy.config import Config, MetricsConfig, parse_config
from nodeproxy.metrics import (
    HISTOGRAM_BOUNDS,
    HTTP_LABELS,
    INTERNAL,
    TCP_LABELS,
    MetricsAggregate,
    SupervisorMetrics,
    WorkerMetrics,
    render,
)

CLIENT_IP = "10.244.1.10"  # a pod of the `frontend` service's endpoints: a known source workload
STRANGER_IP = "10.244.1.77"  # not in the config
REVIEWS_V1 = Endpoint("10.244.1.100", 8080, labels={"app": "reviews", "version": "v1"})
REVIEWS_V2 = Endpoint(
    "10.244.1.101",
    8080,
    labels={"service.istio.io/canonical-name": "reviews-canon", "app": "reviews", "version": "v2"},
)

CONFIG_YAML = f"""
node: {{name: node-a}}
capture: {{pod_cidrs: [10.244.1.0/24]}}
services:
  - name: reviews
    vip: 10.96.0.20
    ports: [{{port: 80, target_port: 8080, protocol: http}}]
    endpoints:
      - {{address: 10.244.1.100, labels: {{app: reviews, version: v1}}}}
      - address: 10.244.1.101
        labels: {{service.istio.io/canonical-name: reviews-canon, app: reviews, version: v2}}
  - name: frontend
    vip: 10.96.0.21
    ports: [{{port: 80}}]
    endpoints:
      - {{address: {CLIENT_IP}, labels: {{app.kubernetes.io/name: frontend, app.kubernetes.io/version: "3"}}}}
"""


def config() -> Config:
    return parse_config(CONFIG_YAML, source="test")


def scrape(*workers: WorkerMetrics) -> dict[str, list[Sample]]:
    """Render the merged workers and parse the text back: samples by family name."""
    aggregate = MetricsAggregate()
    for worker in workers:
        aggregate.add(worker.snapshot())
    return parse(render(aggregate))


def parse(text: bytes) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text.decode())}


def only(samples: list[Sample], name: str, **labels: str) -> Sample:
    matching = [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (name, labels, matching)
    return matching[0]


def request(metrics: WorkerMetrics, **overrides: Any) -> None:
    args: dict[str, Any] = {
        "service": "reviews",
        "source_ip": CLIENT_IP,
        "endpoint": REVIEWS_V1,
        "protocol": "http",
        "status": 200,
        "grpc_status": -1,
        "flags": "-",
        "duration_s": 0.003,
        "bytes_in": 0,
        "bytes_out": 700,
    }
    args.update(overrides)
    metrics.http_request(**args)


def test_request_labels_come_from_the_config() -> None:
    metrics = WorkerMetrics(config())
    request(metrics)
    request(metrics, endpoint=REVIEWS_V2, status=503, flags="UF,URX")
    families = scrape(metrics)
    ok = only(families["istio_requests"], "istio_requests_total", response_code="200")
    assert ok.value == 1
    assert set(ok.labels) == set(HTTP_LABELS)
    assert ok.labels == {
        "reporter": "source",
        "source_workload": "frontend",
        "source_canonical_service": "frontend",
        "source_canonical_revision": "3",
        "source_workload_namespace": "unknown",
        "source_principal": "unknown",
        "source_app": "unknown",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_workload": "reviews",
        "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v1",
        "destination_workload_namespace": "unknown",
        "destination_principal": "unknown",
        "destination_app": "reviews",
        "destination_version": "v1",
        "destination_cluster": "unknown",
        "destination_service": "reviews",
        "destination_service_name": "reviews",
        "destination_service_namespace": "unknown",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "none",
    }
    failed = only(families["istio_requests"], "istio_requests_total", response_code="503")
    assert failed.labels["response_flags"] == "UF,URX"
    assert failed.labels["destination_canonical_service"] == "reviews-canon"  # Istio's label wins over app
    assert failed.labels["destination_workload"] == "reviews-canon"
    assert failed.labels["destination_version"] == "v2"


def test_no_address_becomes_a_label() -> None:
    """Many unknown clients are one series: addresses never reach a label value."""
    metrics = WorkerMetrics(config())
    for i in range(50):
        request(metrics, source_ip=f"10.244.2.{i}", endpoint=Endpoint(f"10.244.3.{i}", 80))
    families = scrape(metrics)
    samples = families["istio_requests"]
    assert len(samples) == 1 and samples[0].value == 50
    assert samples[0].labels["source_workload"] == "unknown"
    text = render(MetricsAggregate()).decode() + str(metrics.snapshot()["http"][0][0])
    assert "10.244." not in text


def test_grpc_status_and_no_response() -> None:
    metrics = WorkerMetrics(config())
    request(metrics, protocol="grpc", status=200, grpc_status=14)
    request(metrics, status=0, flags="DC")
    samples = scrape(metrics)["istio_requests"]
    grpc = only(samples, "istio_requests_total", request_protocol="grpc")
    assert grpc.labels["grpc_response_status"] == "14"
    gone = only(samples, "istio_requests_total", response_code="0")
    assert gone.labels["response_flags"] == "DC"


def test_histograms_use_istio_buckets() -> None:
    metrics = WorkerMetrics(config())
    request(metrics, duration_s=0.003, bytes_in=0, bytes_out=700)  # 3 ms: in le=5; 700 B: le=1000
    request(metrics, duration_s=0.1, bytes_in=10, bytes_out=5_000_000)  # exactly 100 ms: in le=100
    request(metrics, duration_s=7200.0, bytes_in=1, bytes_out=0)  # beyond the last bound: +Inf only
    families = scrape(metrics)
    duration = families["istio_request_duration_milliseconds"]
    buckets = {s.labels["le"]: s.value for s in duration if s.name.endswith("_bucket")}
    expected_bounds = "0.5 1 5 10 25 50 100 250 500 1000 2500 5000 10000 30000 60000 300000 600000 1800000 "
    expected_bounds += "3600000 +Inf"
    assert list(buckets) == expected_bounds.split()
    assert len(HISTOGRAM_BOUNDS) + 1 == len(expected_bounds.split())
    assert (buckets["1"], buckets["5"], buckets["50"], buckets["100"]) == (0, 1, 1, 2)
    assert (buckets["3600000"], buckets["+Inf"]) == (2, 3)
    total = only(duration, "istio_request_duration_milliseconds_sum").value
    assert total == pytest.approx(3 + 100 + 7_200_000)
    assert only(duration, "istio_request_duration_milliseconds_count").value == 3
    response = {
        s.labels["le"]: s.value for s in families["istio_response_bytes"] if s.name.endswith("_bucket")
    }
    assert (response["0.5"], response["500"], response["1000"], response["3600000"]) == (1, 1, 2, 2)
    assert response["+Inf"] == 3
    request_sizes = {
        s.labels["le"]: s.value for s in families["istio_request_bytes"] if s.name.endswith("_bucket")
    }
    assert (request_sizes["0.5"], request_sizes["1"], request_sizes["10"]) == (1, 2, 3)
    assert only(families["istio_request_bytes"], "istio_request_bytes_sum").value == 11


def test_tcp_metrics_and_passthrough() -> None:
    metrics = WorkerMetrics(config())
    metrics.tcp_opened("reviews", CLIENT_IP, REVIEWS_V1.address)
    metrics.tcp_closed("reviews", CLIENT_IP, REVIEWS_V1.address, "-", 100, 2000)
    metrics.tcp_opened(None, STRANGER_IP, "192.0.2.1")  # not a service: passed through
    metrics.tcp_opened("reviews", CLIENT_IP, None)
    metrics.tcp_closed("reviews", CLIENT_IP, None, "UH", 0, 0)  # refused: no endpoint
    families = scrape(metrics)
    opened = families["istio_tcp_connections_opened"]
    served = only(opened, "istio_tcp_connections_opened_total", destination_workload="reviews")
    assert set(served.labels) == set(TCP_LABELS)
    assert served.labels["request_protocol"] == "tcp" and served.labels["source_workload"] == "frontend"
    assert served.value == 1
    passthrough = only(
        opened, "istio_tcp_connections_opened_total", destination_service_name="PassthroughCluster"
    )
    assert passthrough.labels["destination_service"] == "unknown"
    closed = families["istio_tcp_connections_closed"]
    assert only(closed, "istio_tcp_connections_closed_total", response_flags="UH").value == 1
    received = families["istio_tcp_received_bytes"]
    assert only(received, "istio_tcp_received_bytes_total", destination_workload="reviews").value == 100
    sent = families["istio_tcp_sent_bytes"]
    assert only(sent, "istio_tcp_sent_bytes_total", destination_workload="reviews").value == 2000


def test_internal_counters_and_every_family_present() -> None:
    metrics = WorkerMetrics(config())
    metrics.retry("reviews")
    metrics.retry("reviews")
    metrics.ejection("reviews")
    metrics.overflow("reviews", "pending")
    metrics.rate_limited("reviews", "canary")
    metrics.fault_injected("reviews", "canary")
    families = scrape(metrics)
    assert only(families["nodeproxy_retries"], "nodeproxy_retries_total", service="reviews").value == 2
    overflows = families["nodeproxy_circuit_breaker_overflows"]
    assert only(overflows, "nodeproxy_circuit_breaker_overflows_total", resource="pending").value == 1
    assert families["nodeproxy_rate_limited_requests"][0].labels == {"service": "reviews", "route": "canary"}
    text = render(MetricsAggregate()).decode()
    for name, spec in INTERNAL.items():
        kind = "counter" if spec.kind == "counter" else "gauge"
        assert f"# TYPE {name} {kind}" in text
    assert "# TYPE istio_request_duration_milliseconds histogram" in text
    # The certificate family exists with no samples until mTLS lands.
    assert "nodeproxy_certificate_expiry_timestamp_seconds{" not in text
    with pytest.raises(ValueError, match="not an internal counter"):
        metrics.count("nodeproxy_active_connections", ("tcp",))


def test_merge_adds_workers_label_set_by_label_set() -> None:
    first, second = WorkerMetrics(config()), WorkerMetrics(config())
    for _ in range(3):
        request(first)
    request(second)
    request(second, status=404, flags="NR", endpoint=None)
    second.tcp_opened("reviews", CLIENT_IP, REVIEWS_V1.address)
    first.tcp_opened("reviews", CLIENT_IP, REVIEWS_V1.address)
    samples = scrape(first, second)
    assert only(samples["istio_requests"], "istio_requests_total", response_code="200").value == 4
    not_found = only(samples["istio_requests"], "istio_requests_total", response_code="404")
    assert not_found.labels["destination_workload"] == "unknown"
    count = only(samples["istio_request_duration_milliseconds"], "istio_request_duration_milliseconds_count",
                 response_code="200")  # fmt: skip
    assert count.value == 4
    assert samples["istio_tcp_connections_opened"][0].value == 2


def test_counters_survive_worker_restarts_and_missed_scrapes() -> None:
    state = SupervisorMetrics()
    worker_a, worker_b = WorkerMetrics(config()), WorkerMetrics(config())
    request(worker_a)
    request(worker_b)
    gauges = {"nodeproxy_active_connections": [(("tcp",), 5.0)]}
    total, missing = state.merge(
        {1: worker_a.snapshot(gauges=gauges), 2: worker_b.snapshot()}, running=[1, 2]
    )
    assert (
        missing == 0 and total.http and list(total.gauges["nodeproxy_active_connections"].values()) == [5.0]
    )
    # Worker 1 does not answer this time: its previous counters are shown, not its gauges.
    request(worker_b)
    total, missing = state.merge({2: worker_b.snapshot()}, running=[1, 2])
    assert missing == 1
    assert sum(v[0] for v in total.http.values()) == 3
    assert "nodeproxy_active_connections" not in total.gauges
    # Worker 1 died and was replaced by pid 3: what it reported last stays counted.
    state.worker_gone(1)
    fresh = WorkerMetrics(config())
    request(fresh)
    total, missing = state.merge({2: worker_b.snapshot(), 3: fresh.snapshot()}, running=[2, 3])
    assert missing == 0
    assert sum(v[0] for v in total.http.values()) == 4
    samples = parse(render(total))
    assert only(samples["istio_requests"], "istio_requests_total").value == 4


def test_series_are_capped() -> None:
    metrics = WorkerMetrics(config(), max_series=2)
    for status in (200, 201, 202, 203, 203, 203, 200):
        request(metrics, status=status)
    for destination in ("10.244.1.100", "10.244.1.101", "10.244.1.102"):
        metrics.tcp_opened("reviews", CLIENT_IP, destination)
        metrics.tcp_closed("reviews", CLIENT_IP, destination, "-", 1, 1)
    samples = scrape(metrics)
    assert len(samples["istio_requests"]) == 2
    assert only(samples["istio_requests"], "istio_requests_total", response_code="200").value == 2
    assert len(samples["istio_tcp_connections_opened"]) == 2
    dropped = {
        s.labels["family"]: s.value
        for s in samples["nodeproxy_metrics_series_dropped"]
        if s.name == "nodeproxy_metrics_series_dropped_total"
    }
    assert dropped == {
        "istio_requests_total": 4,  # 202 once, 203 three times
        "istio_tcp_connections_opened_total": 1,
        "istio_tcp_connections_closed_total": 1,
    }


def test_a_reload_relabels_new_observations() -> None:
    metrics = WorkerMetrics(config())
    request(metrics)
    renamed = parse_config(CONFIG_YAML.replace("version: v1}", "version: v9}"), source="test")
    metrics.update_config(renamed)
    request(metrics)
    samples = scrape(metrics)["istio_requests"]
    assert {s.labels["destination_version"] for s in samples} == {"v1", "v9"}


def test_snapshot_shape_is_checked_when_merged() -> None:
    aggregate = MetricsAggregate()
    with pytest.raises(ValueError, match="labels"):
        aggregate.add({"tcp": [[["source"], 1, 1, 1, 1]]})


def test_every_metric_and_label_is_documented() -> None:
    docs = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    istio = [
        "istio_requests_total",
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ]
    rendered = render(MetricsAggregate()).decode()
    for name in (*istio, *INTERNAL):
        assert f"`{name}`" in docs, name
        assert f"# TYPE {name.removesuffix('_total')}" in rendered or f"# TYPE {name}" in rendered, name
    for label in {*HTTP_LABELS, *TCP_LABELS}:
        assert f"`{label}`" in docs or f"`destination_{label.removeprefix('destination_')}`" in docs, label
    for family in INTERNAL.values():
        for label in family.labels:
            assert f"`{label}`" in docs, (family.name, label)
    for key in MetricsConfig.model_fields:
        assert f"| `{key}` |" in docs, key


def test_a_pod_in_several_services_gets_the_labels_of_the_service_used() -> None:
    text = CONFIG_YAML + (
        "  - name: admin\n    vip: 10.96.0.22\n    ports: [{port: 81}]\n"
        "    endpoints: [{address: 10.244.1.100, labels: {app: reviews-admin, team: a}}]\n"
    )
    metrics = WorkerMetrics(parse_config(text, source="test"))
    request(metrics)  # reviews, endpoint 10.244.1.100
    metrics.tcp_opened("admin", CLIENT_IP, REVIEWS_V1.address)
    metrics.tcp_opened(None, CLIENT_IP, REVIEWS_V1.address)  # passthrough to the pod itself
    families = scrape(metrics)
    assert families["istio_requests"][0].labels["destination_app"] == "reviews"
    opened = families["istio_tcp_connections_opened"]
    admin = only(opened, "istio_tcp_connections_opened_total", destination_service_name="admin")
    assert (admin.labels["destination_app"], admin.labels["destination_version"]) == (
        "reviews-admin",
        "unknown",
    )
    direct = only(opened, "istio_tcp_connections_opened_total", destination_service_name="PassthroughCluster")
    # The pod's labels from every service, the first service's value where they differ.
    assert (direct.labels["destination_app"], direct.labels["destination_version"]) == ("reviews", "v1")


def test_certificate_expiry_merges_to_the_earliest() -> None:
    """Every worker reports the certificates it holds; summing timestamps would be nonsense."""
    family = "nodeproxy_certificate_expiry_timestamp_seconds"
    identity = ("spiffe://cluster.local/ns/default/sa/web",)
    state = SupervisorMetrics()
    first = WorkerMetrics(config()).snapshot(gauges={family: [(identity, 2000.0)]})
    second = WorkerMetrics(config()).snapshot(gauges={family: [(identity, 1500.0)]})
    total, _missing = state.merge({1: first, 2: second}, running=[1, 2])
    samples = parse(render(total))["nodeproxy_certificate_expiry_timestamp_seconds"]
    assert [(s.labels, s.value) for s in samples] == [({"identity": identity[0]}, 1500.0)]
    assert all(f.merge in ("sum", "min") for f in INTERNAL.values())


def test_the_mesh_inventory_names_namespaces_principals_and_client_pods() -> None:
    """With identity.workloads, a pod's namespace and SPIFFE ID become its workload_namespace and
    principal labels, and a client pod that is no service's endpoint gets its own labels."""
    mesh_config = parse_config(
        CONFIG_YAML
        + """identity:
  trust_domain: cluster.local
  ca: 192.168.100.1:15012
  trust_bundle: /etc/nodeproxy/bundle.pem
  node_credential: {cert: /etc/nodeproxy/node.pem, key: /etc/nodeproxy/node.key}
  workloads:
    - {ip: 10.244.1.100, namespace: shop, service_account: reviews, node: node-a}
    - {ip: 10.244.1.77, namespace: web, service_account: ui, node: node-a, labels: {app: ui, version: v9}}
""",
        source="test",
    )
    metrics = WorkerMetrics(mesh_config)
    request(metrics, source_ip="10.244.1.77")
    labels = only(scrape(metrics)["istio_requests"], "istio_requests_total", response_code="200").labels
    assert labels["destination_workload_namespace"] == "shop"
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/shop/sa/reviews"
    assert labels["destination_app"] == "reviews" and labels["destination_version"] == "v1"  # endpoint's
    assert labels["source_workload_namespace"] == "web"
    assert labels["source_principal"] == "spiffe://cluster.local/ns/web/sa/ui"
    assert labels["source_app"] == "ui" and labels["source_version"] == "v9"
