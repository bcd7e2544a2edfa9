"""Metrics through the whole daemon on a namespace lab: the metrics port and the admin socket's
GET /v1/metrics, the TCP metrics of relayed and refused connections, and a real Prometheus server
(Debian's `prometheus`) scraping the daemon, queried over its HTTP API with PromQL.

Prometheus runs in the lab's node namespace, listening on that namespace's loopback; it scrapes the
daemon's 127.0.0.1:15020 there. Nothing leaves the lab."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy import netns
from nodeproxy.ctl import AdminClient, _UnixConnection
from nodeproxy.lab import HTTP_PORT, Lab, stop_process
from tests.conftest import RunningProxy, running_lab, start_proxy
from tests.helpers import connect

pytestmark = pytest.mark.netns

ECHO_VIP = "10.96.0.11"
EMPTY_VIP = "10.96.0.40"  # a service without endpoints: its connections are refused (UH)
PAGES_VIP = "10.96.0.50"  # an HTTP service answering 200, 404 and 503 by path
LABELED_VIP = "10.96.0.60"  # echo on be1, whose endpoint labels name a workload
REQUESTS_BY_PATH = {"/ok/1": 7, "/missing": 3, "/gone/x": 2}
EXPECTED_BY_CODE = {"200": 7.0, "404": 3.0, "503": 2.0}
METRICS_PORT = 15020
PROMETHEUS_PORT = 19090  # on the node namespace's loopback
ECHO_CONNECTIONS = 12
PAYLOAD = b"m" * 1000
PROMETHEUS = shutil.which("prometheus")


def empty_service() -> str:
    return f"  - name: empty\n    vip: {EMPTY_VIP}\n    ports: [{{port: 80}}]\n    endpoints: []\n"


def labeled_echo_service(lab: Lab) -> str:
    """A TCP service whose endpoint has an `app` label (the lab's own services have none)."""
    be = lab.backend_pods[1]
    return (
        f"  - name: labeled\n    vip: {LABELED_VIP}\n    ports: [{{port: 9000}}]\n"
        f"    endpoints: [{{address: {be.ip}, labels: {{app: echo-app, version: v3}}}}]\n"
    )


def pages_service(lab: Lab) -> str:
    """An HTTP service: /ok* is served (200), /gone* goes to an empty subset (503 UH), anything else
    matches no route (404 NR)."""
    be = lab.backend_pods[0]
    return (
        f"  - name: pages\n    vip: {PAGES_VIP}\n"
        f"    ports: [{{port: 80, target_port: {HTTP_PORT}, protocol: http}}]\n"
        f"    endpoints: [{{address: {be.ip}, labels: {{app: pages, version: v7}}}}]\n"
        "    subsets: [{name: gone, labels: {env: nowhere}}]\n"
        "    routes:\n"
        "      - {name: ok, match: [{path: {prefix: /ok}}]}\n"
        "      - {name: gone, match: [{path: {prefix: /gone}}], to: [{subset: gone}]}\n"
    )


@pytest.fixture(scope="module")
def metrics_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


@pytest.fixture(scope="module")
def metrics_proxy(metrics_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    config = (
        metrics_lab.config_yaml(extra="relay:\n  threads: 2\n")
        + empty_service()
        + pages_service(metrics_lab)
        + labeled_echo_service(metrics_lab)
    )
    proxy = start_proxy(metrics_lab, tmp_path_factory.mktemp("metrics"), config)
    try:
        yield proxy
    finally:
        stop_process(proxy.proc)


def http_get(ns: str, port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    with netns.entered(ns):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.connect()
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def admin_socket(proxy: RunningProxy) -> str:
    for line in proxy.wait_log("admin socket open").splitlines():
        if "admin socket open" in line:
            return str(json.loads(line)["path"])
    raise AssertionError("unreachable")


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value for found, value in samples(text, name) if all(found.get(k) == v for k, v in labels.items())
    )


def echo_round_trips(lab: Lab, count: int, vip: str = ECHO_VIP) -> None:
    for _ in range(count):
        with connect(lab.client_pods[0].ns, vip, 9000) as sock:
            sock.sendall(PAYLOAD)
            received = b""
            while len(received) < len(PAYLOAD):
                chunk = sock.recv(65536)
                assert chunk, "echo closed early"
                received += chunk
            assert received == PAYLOAD


def refused(lab: Lab) -> None:
    """A connection to the service without endpoints is reset by the proxy (at once: often before the
    client's connect() has returned)."""
    try:
        with connect(lab.client_pods[0].ns, EMPTY_VIP, 80) as sock:
            assert sock.recv(1) == b"", "expected a reset or EOF"
    except ConnectionResetError:
        pass


def counts(http_stats: dict[str, Any], key: str) -> int:
    """A counter of /v1/stats' `http` section: requests, a response class ("2xx") or a local-reply flag."""
    if key == "requests":
        return int(http_stats.get("requests", 0))
    section = "responses_by_class" if key.endswith("xx") else "local_replies_by_flag"
    return int(http_stats.get(section, {}).get(key, 0))


def http_requests(lab: Lab) -> None:
    """REQUESTS_BY_PATH over one keep-alive connection from the client pod to the pages service."""
    with netns.entered(lab.client_pods[0].ns):
        conn = http.client.HTTPConnection(PAGES_VIP, 80, timeout=10)
        conn.connect()
    try:
        for path, count in REQUESTS_BY_PATH.items():
            for _ in range(count):
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                expected = {"/ok/1": 200, "/missing": 404, "/gone/x": 503}[path]
                assert response.status == expected, (path, response.status)
    finally:
        conn.close()


def wait_metric(proxy: RunningProxy, name: str, expected: float, timeout: float = 10.0, **labels: str) -> str:
    """Scrape the metrics port until `name` (summed over matching series) reaches `expected` (connections
    are counted when the relay reports them closed, a moment after the client's close)."""
    deadline = time.monotonic() + timeout
    while True:
        status, _headers, body = http_get(proxy.lab.node_ns, METRICS_PORT, "/metrics")
        assert status == 200
        text = body.decode()
        found = total(text, name, **labels)
        if found == expected:
            return text
        assert time.monotonic() < deadline, f"{name}{labels}: {found}, expected {expected}"
        time.sleep(0.1)


def test_tcp_metrics_on_the_metrics_port_and_the_admin_socket(
    metrics_lab: Lab, metrics_proxy: RunningProxy
) -> None:
    echo_round_trips(metrics_lab, ECHO_CONNECTIONS)
    refused(metrics_lab)
    text = wait_metric(
        metrics_proxy, "istio_tcp_connections_closed_total", ECHO_CONNECTIONS, destination_service_name="echo"
    )
    echo = {"destination_service_name": "echo"}
    assert total(text, "istio_tcp_connections_opened_total", **echo) == ECHO_CONNECTIONS
    assert total(text, "istio_tcp_connections_closed_total", **echo) == ECHO_CONNECTIONS
    assert total(text, "istio_tcp_received_bytes_total", **echo) == ECHO_CONNECTIONS * len(PAYLOAD)
    assert total(text, "istio_tcp_sent_bytes_total", **echo) == ECHO_CONNECTIONS * len(PAYLOAD)
    # The echo endpoints carry `version` labels in the lab config; the client pod is not an endpoint.
    versions = {
        labels["destination_version"] for labels, _ in samples(text, "istio_tcp_connections_closed_total")
    }
    assert versions & {"v1", "v2"}
    closed = samples(text, "istio_tcp_connections_closed_total")
    assert all(labels["reporter"] == "source" and labels["request_protocol"] == "tcp" for labels, _ in closed)
    assert all(labels["source_workload"] == "unknown" for labels, _ in closed)
    assert (
        total(
            text, "istio_tcp_connections_closed_total", destination_service_name="empty", response_flags="UH"
        )
        == 1
    )
    assert "10.244." not in text, "no pod address in any label"
    assert total(text, "nodeproxy_relay_bytes_total", direction="upstream") >= ECHO_CONNECTIONS * len(PAYLOAD)
    assert total(text, "nodeproxy_connections_refused_total") == 1
    assert total(text, "nodeproxy_workers") == 2 and total(text, "nodeproxy_config_version") == 1
    assert total(text, "nodeproxy_metrics_workers_missing") == 0
    generations = samples(text, "nodeproxy_worker_config_generation")
    assert sorted(labels["worker"] for labels, _ in generations) == ["0", "1"]
    # Istio's path serves the same; other paths do not.
    status, headers, body = http_get(metrics_lab.node_ns, METRICS_PORT, "/stats/prometheus")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert total(body.decode(), "istio_tcp_connections_opened_total", **echo) == ECHO_CONNECTIONS
    assert http_get(metrics_lab.node_ns, METRICS_PORT, "/v1/config")[0] == 404
    with netns.entered(metrics_lab.node_ns):
        post = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=10)
        post.connect()
    try:
        post.request("POST", "/metrics", body=b"x")
        response = post.getresponse()
        response.read()
        assert (response.status, response.getheader("allow")) == (405, "GET")
    finally:
        post.close()
    # The admin socket answers with the same text.
    conn = _UnixConnection(admin_socket(metrics_proxy), 10)
    try:
        conn.request("GET", "/v1/metrics")
        response = conn.getresponse()
        admin_text = response.read().decode()
        assert response.status == 200
        assert response.getheader("content-type", "").startswith("text/plain; version=0.0.4")
    finally:
        conn.close()
    assert total(admin_text, "istio_tcp_connections_closed_total", **echo) == ECHO_CONNECTIONS


def test_metrics_survive_a_worker_being_killed(metrics_lab: Lab, metrics_proxy: RunningProxy) -> None:
    """A worker that dies takes no counts with it: what it reported at the last scrape stays."""
    before = wait_metric(metrics_proxy, "nodeproxy_workers", 2)
    opened = total(before, "istio_tcp_connections_opened_total", destination_service_name="echo")
    assert opened >= ECHO_CONNECTIONS
    pids = [
        int(p)
        for p in subprocess.run(
            ["pgrep", "-P", str(metrics_proxy.proc.pid)], capture_output=True, text=True
        ).stdout.split()
    ]
    assert len(pids) == 2, pids
    subprocess.run(["kill", "-9", str(pids[0])], check=True)
    after = wait_metric(metrics_proxy, "nodeproxy_worker_restarts_total", 1)
    assert total(after, "nodeproxy_worker_restarts_total") == 1
    assert total(after, "istio_tcp_connections_opened_total", destination_service_name="echo") == opened
    wait_metric(metrics_proxy, "nodeproxy_workers", 2)


def test_access_log_level_reaches_the_workers(metrics_lab: Lab, metrics_proxy: RunningProxy) -> None:
    path = admin_socket(metrics_proxy)

    def put(level: str) -> tuple[int, Any]:
        conn = _UnixConnection(path, 10)
        try:
            conn.request("PUT", "/v1/access-log-level", body=json.dumps({"level": level}).encode())
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def closed_so_far() -> float:
        text = http_get(metrics_lab.node_ns, METRICS_PORT, "/metrics")[2].decode()
        return total(text, "istio_tcp_connections_closed_total", destination_service_name="echo")

    assert put("loud")[0] == 400
    assert put("off") == (200, {"level": "off"})
    before = closed_so_far()
    log_size = metrics_proxy.log_path.stat().st_size
    echo_round_trips(metrics_lab, 4)
    # The workers counted the four connections as closed, where they would have logged them.
    wait_metric(
        metrics_proxy, "istio_tcp_connections_closed_total", before + 4, destination_service_name="echo"
    )
    assert '"connection closed"' not in metrics_proxy.log()[log_size:]
    assert put("info") == (200, {"level": "info"})
    echo_round_trips(metrics_lab, 1)
    deadline = time.monotonic() + 10
    while '"connection closed"' not in metrics_proxy.log()[log_size:]:
        assert time.monotonic() < deadline, "no access-log record after the level went back to info"
        time.sleep(0.05)


# -- a real Prometheus --------------------------------------------------------------------------------


def start_prometheus(lab: Lab, tmp: Path, scrape_port: int = METRICS_PORT) -> subprocess.Popen[bytes]:
    assert PROMETHEUS is not None
    config = tmp / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: nodeproxy\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 900ms\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{scrape_port}']}}]\n"
    )
    log = (tmp / "prometheus.log").open("wb")
    proc = lab.spawn(
        lab.node_ns,
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    deadline = time.monotonic() + 30
    while True:
        try:
            if http_get(lab.node_ns, PROMETHEUS_PORT, "/-/ready")[0] == 200:
                return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"prometheus did not start:\n{(tmp / 'prometheus.log').read_text()[-3000:]}")
        time.sleep(0.2)


def promql(lab: Lab, query: str) -> list[dict[str, Any]]:
    status, _headers, body = http_get(
        lab.node_ns, PROMETHEUS_PORT, "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    )
    document = json.loads(body)
    assert status == 200 and document["status"] == "success", document
    result: list[dict[str, Any]] = document["data"]["result"]
    return result


def wait_promql(lab: Lab, query: str, expected: dict[str, float], by: str, timeout: float = 30.0) -> None:
    """Poll the query until its vector, keyed by the label `by`, equals `expected`."""
    deadline = time.monotonic() + timeout
    while True:
        got = {item["metric"].get(by, ""): float(item["value"][1]) for item in promql(lab, query)}
        if got == expected:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{query}: {got}, expected {expected}")
        time.sleep(0.5)


@pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus package (apt-get install prometheus)"
)
def test_prometheus_scrapes_tcp_connections_by_service(
    metrics_lab: Lab, metrics_proxy: RunningProxy, tmp_path: Path
) -> None:
    prometheus = start_prometheus(metrics_lab, tmp_path)
    try:
        wait_promql(metrics_lab, 'up{job="nodeproxy"}', {"nodeproxy": 1.0}, by="job")
        before = {
            item["metric"]["destination_service_name"]: float(item["value"][1])
            for item in promql(
                metrics_lab, "sum by (destination_service_name) (istio_tcp_connections_closed_total)"
            )
        }
        echo_round_trips(metrics_lab, 5)
        refused(metrics_lab)
        expected = {"echo": before.get("echo", 0) + 5, "empty": before.get("empty", 0) + 1}
        wait_promql(
            metrics_lab,
            "sum by (destination_service_name) (istio_tcp_connections_closed_total)",
            expected,
            by="destination_service_name",
        )
    finally:
        stop_process(prometheus)


@pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus package (apt-get install prometheus)"
)
def test_prometheus_counts_requests_by_response_code(
    metrics_lab: Lab, metrics_proxy: RunningProxy, tmp_path: Path
) -> None:
    """The acceptance test of issue 9: after bounded HTTP requests (200, 404, 503), a PromQL query
    over Prometheus' HTTP API returns the request count by response code."""
    prometheus = start_prometheus(metrics_lab, tmp_path)
    try:
        wait_promql(metrics_lab, 'up{job="nodeproxy"}', {"nodeproxy": 1.0}, by="job")
        before = AdminClient(admin_socket(metrics_proxy)).get("/v1/stats")["http"]
        http_requests(metrics_lab)
        # The same requests in the admin API's counters (summed over the workers; a request is counted
        # when its DONE record is handled, a moment after the client read the response).
        deadline = time.monotonic() + 10
        while True:
            after = AdminClient(admin_socket(metrics_proxy)).get("/v1/stats")["http"]
            added = {key: counts(after, key) - counts(before, key) for key in ("requests", "2xx", "NR", "UH")}
            if added["requests"] >= 12 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert added == {"requests": 12, "2xx": 7, "NR": 3, "UH": 2}, (before, after)
        query = 'sum by (response_code) (istio_requests_total{destination_service_name="pages"})'
        wait_promql(metrics_lab, query, EXPECTED_BY_CODE, by="response_code")
        flags = 'sum by (response_flags) (istio_requests_total{destination_service_name="pages"})'
        wait_promql(metrics_lab, flags, {"-": 7.0, "NR": 3.0, "UH": 2.0}, by="response_flags")
        served = (
            "sum by (destination_app) (istio_request_duration_milliseconds_count"
            '{destination_service_name="pages", response_code="200"})'
        )
        wait_promql(metrics_lab, served, {"pages": 7.0}, by="destination_app")
    finally:
        stop_process(prometheus)


def test_a_taken_metrics_port_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """Something else holds 15020: the daemon logs it, serves traffic, and GET /v1/metrics still answers."""
    with running_lab(clients=1) as lab:
        with netns.entered(lab.node_ns):
            squatter = socket.create_server(("127.0.0.1", METRICS_PORT))  # no SO_REUSEPORT: exclusive
        try:
            proxy = start_proxy(lab, tmp_path, lab.config_yaml())
            try:
                proxy.wait_log("metrics listener unavailable")
                echo_round_trips(lab, 2)
                conn = _UnixConnection(admin_socket(proxy), 10)
                try:
                    deadline = time.monotonic() + 10
                    while True:
                        conn.request("GET", "/v1/metrics")
                        response = conn.getresponse()
                        text = response.read().decode()
                        assert response.status == 200
                        found = total(
                            text, "istio_tcp_connections_closed_total", destination_service_name="echo"
                        )
                        if found == 2:
                            break
                        assert time.monotonic() < deadline, found
                        time.sleep(0.1)
                finally:
                    conn.close()
                assert proxy.proc.poll() is None
            finally:
                stop_process(proxy.proc)
        finally:
            squatter.close()


def test_workload_labels_in_metrics_and_access_log(metrics_lab: Lab, metrics_proxy: RunningProxy) -> None:
    log_size = metrics_proxy.log_path.stat().st_size
    echo_round_trips(metrics_lab, 3, vip=LABELED_VIP)
    text = wait_metric(
        metrics_proxy, "istio_tcp_connections_closed_total", 3, destination_service_name="labeled"
    )
    [labels] = [
        found
        for found, _ in samples(text, "istio_tcp_connections_closed_total")
        if found["destination_service_name"] == "labeled"
    ]
    assert (labels["destination_workload"], labels["destination_app"], labels["destination_version"]) == (
        "echo-app",
        "echo-app",
        "v3",
    )
    records = [
        json.loads(line)
        for line in metrics_proxy.log()[log_size:].splitlines()
        if '"connection closed"' in line and '"labeled"' in line
    ]
    assert len(records) == 3 and all(r["dst_workload"] == "echo-app" for r in records), records
    assert all("src_workload" not in r for r in records)  # the client pod is no endpoint: unknown


def test_log_level_reaches_the_workers(metrics_lab: Lab, metrics_proxy: RunningProxy) -> None:
    """PUT /v1/log-level debug: the workers log their debug events (a reload's "worker applied
    config", one per worker); back at info they do not. Last of the tests on the shared daemon: it
    reloads the config."""
    path = admin_socket(metrics_proxy)

    def put(level: str) -> int:
        conn = _UnixConnection(path, 10)
        try:
            conn.request("PUT", "/v1/log-level", body=json.dumps({"level": level}).encode())
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def generations() -> list[float]:
        text = http_get(metrics_lab.node_ns, METRICS_PORT, "/metrics")[2].decode()
        return [value for _labels, value in samples(text, "nodeproxy_worker_config_generation")]

    def reload_and_count() -> int:
        """Reload, wait until both workers run the new routing generation, count their debug lines."""
        before = generations()
        assert len(before) == 2 and len(set(before)) == 1, before
        size = metrics_proxy.log_path.stat().st_size
        metrics_proxy.reload(metrics_proxy.config_path.read_text())
        deadline = time.monotonic() + 10
        while generations() != [before[0] + 1] * 2:
            assert time.monotonic() < deadline, generations()
            time.sleep(0.05)
        return metrics_proxy.log()[size:].count('"worker applied config"')

    assert reload_and_count() == 0  # info: no debug events
    assert put("debug") == 200
    assert reload_and_count() == 2
    assert put("info") == 200
    assert reload_and_count() == 0


def test_the_metrics_port_moves_to_the_successor_of_an_upgrade(tmp_path: Path) -> None:
    """`nodeproxy ctl upgrade`: the successor binds 15020 beside the old daemon (SO_REUSEPORT) and the
    old one lets go when the successor commits, so every later scrape is the successor's."""
    successor = 0
    with running_lab(clients=1) as lab:
        proxy = start_proxy(lab, tmp_path, lab.config_yaml())
        try:
            path = admin_socket(proxy)
            echo_round_trips(lab, 3)
            wait_metric(proxy, "istio_tcp_connections_closed_total", 3, destination_service_name="echo")
            upgraded = subprocess.run(
                [sys.executable, "-m", "nodeproxy", "ctl", "--socket", path, "upgrade"],
                capture_output=True,
                text=True,
                timeout=90,
            )
            assert upgraded.returncode == 0, upgraded.stderr
            successor = int(upgraded.stdout.split("-> ")[1].split(";")[0])
            # The old daemon may take a moment to close its listener after the commit.
            deadline = time.monotonic() + 10
            while proxy.proc.poll() is None:
                assert time.monotonic() < deadline, "the old daemon did not stop after the upgrade"
                time.sleep(0.05)
            for _ in range(10):  # each scrape a new connection: none reaches the old daemon
                text = http_get(lab.node_ns, METRICS_PORT, "/metrics")[2].decode()
                assert total(text, "istio_tcp_connections_closed_total", destination_service_name="echo") == 0
            echo_round_trips(lab, 2)
            wait_metric(proxy, "istio_tcp_connections_closed_total", 2, destination_service_name="echo")
        finally:
            if successor:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(successor, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while Path(f"/proc/{successor}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            stop_process(proxy.proc)
