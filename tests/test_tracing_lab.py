"""Tracing end to end on a lab: curl in a pod sends a request with a traceparent (or B3) through the
capturing daemon; the backend echoes the headers it got, and an OTLP receiver inside the lab's node
namespace decodes the spans the daemon exported. The proxy's span must be the child of the caller's and
the parent of the upstream request; the access-log record must carry the same trace and request ids."""

from __future__ import annotations

import inspect
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeproxy import netns
from nodeproxy.lab import Lab, stop_process, wait_listening
from nodeproxy.proxy.http import HttpProxy
from tests.conftest import RunningProxy, running_lab, start_proxy

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        "tracer" not in inspect.signature(HttpProxy.__init__).parameters,
        reason="the HTTP engine does not call the tracer yet (nodeproxy/proxy/http.py)",
    ),
]

REPO = Path(__file__).resolve().parent.parent
TRACED_VIP = "10.96.0.40"
ECHO_PORT = 8081
RECEIVER_PORT = 4318
BROKEN_VIP = "10.96.0.41"  # its endpoint's port has no listener: every connect is refused
CLOSED_PORT = 8099
EMPTY_VIP = "10.96.0.42"  # a service without endpoints
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def trace_lab() -> Iterator[Lab]:
    with running_lab(clients=1, backends=1) as lab:
        yield lab


@pytest.fixture(scope="module")
def spans_file(trace_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The receiver in the node namespace (on its loopback) and the header echo in the backend pod."""
    out = tmp_path_factory.mktemp("otlp") / "spans.jsonl"
    out.touch()
    node, backend = trace_lab.node_ns, trace_lab.backend_pods[0]
    argv = [sys.executable, "-m", "tests.otlp_receiver", "127.0.0.1", str(RECEIVER_PORT), str(out)]
    trace_lab.spawn(node, argv, cwd=REPO)
    trace_lab.spawn(
        backend.ns, [sys.executable, "-m", "tests.header_echo", backend.ip, str(ECHO_PORT)], cwd=REPO
    )
    wait_listening(node, "127.0.0.1", RECEIVER_PORT, 15)
    wait_listening(node, backend.ip, ECHO_PORT, 15)
    return out


@pytest.fixture(scope="module")
def traced_proxy(
    trace_lab: Lab, spans_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningProxy]:
    tracing = (
        "tracing:\n"
        "  sampling: 0\n"  # only the callers' sampled flags decide
        f"  otlp_endpoint: http://127.0.0.1:{RECEIVER_PORT}/v1/traces\n"
        "  export_interval: 100ms\n"
        "  service_name: node-a-proxy\n"
    )
    backend = trace_lab.backend_pods[0].ip
    service = (
        f"  - name: traced\n    vip: {TRACED_VIP}\n"
        f"    ports: [{{port: 80, target_port: {ECHO_PORT}, protocol: http}}]\n"
        f"    endpoints: [{{address: {backend}}}]\n"
        f"  - name: broken\n    vip: {BROKEN_VIP}\n"
        f"    ports: [{{port: 80, target_port: {CLOSED_PORT}, protocol: http}}]\n"
        f"    endpoints: [{{address: {backend}}}]\n"
        f"  - name: empty\n    vip: {EMPTY_VIP}\n"
        "    ports: [{port: 80, protocol: http}]\n"
        "    endpoints: []\n"
    )
    proxy = start_proxy(
        trace_lab, tmp_path_factory.mktemp("traced"), trace_lab.config_yaml(extra=tracing) + service
    )
    try:
        yield proxy
    finally:
        stop_process(proxy.proc)


def curl(lab: Lab, path: str, headers: dict[str, str]) -> dict[str, str]:
    """One request from the client pod; the headers the backend received."""
    argv = ["curl", "-sS", "--max-time", "5", "--fail"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    body = netns.run(lab.client_pods[0].ns, [*argv, f"http://{TRACED_VIP}{path}"], timeout=10)
    received: dict[str, str] = json.loads(body)
    return received


def wait_span(spans_file: Path, trace_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in spans_file.read_text().splitlines():
            span: dict[str, Any] = json.loads(line)
            if span["trace_id"] == trace_id:
                return span
        time.sleep(0.05)
    raise AssertionError(f"no span of trace {trace_id} arrived; got:\n{spans_file.read_text()[-3000:]}")


def access_record(proxy: RunningProxy, trace_id: str) -> dict[str, Any]:
    text = proxy.wait_log(f'"trace_id": "{trace_id}"')
    for line in text.splitlines():
        if f'"trace_id": "{trace_id}"' in line:
            record: dict[str, Any] = json.loads(line)
            return record
    raise AssertionError("unreachable")


def test_w3c_caller_proxy_span_is_child_and_upstream_parent(
    trace_lab: Lab, traced_proxy: RunningProxy, spans_file: Path
) -> None:
    sent = curl(
        trace_lab,
        "/orders/7?secret=1",
        {"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01", "tracestate": "congo=t61rcWkgMzE"},
    )
    version, trace_id, proxy_span, flags = sent["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE, "01")
    assert proxy_span != CALLER_SPAN
    assert sent["tracestate"] == "congo=t61rcWkgMzE"
    request_id = sent["x-request-id"]
    assert uuid.UUID(request_id).version == 4

    span = wait_span(spans_file, TRACE)
    assert (span["parent_span_id"], span["span_id"]) == (CALLER_SPAN, proxy_span)
    assert span["trace_state"] == "congo=t61rcWkgMzE"
    assert span["kind"] == 3 and span["status"] == 0
    assert span["resource"]["service.name"] == "node-a-proxy"
    attributes = span["attributes"]
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/orders/7"  # no query string: it may hold secrets
    assert attributes["http.response.status_code"] == 200
    assert attributes["nodeproxy.service"] == "traced"
    assert attributes["upstream.address"] == f"{trace_lab.backend_pods[0].ip}:{ECHO_PORT}"
    assert attributes["nodeproxy.attempts"] == 1
    assert attributes["response_flags"] == "-"
    assert attributes["guid:x-request-id"] == request_id
    assert span["end"] > span["start"] > 0

    record = access_record(traced_proxy, TRACE)
    assert record["event"] == "request" and record["request_id"] == request_id
    assert record["status"] == 200 and record["service"] == "traced"


def test_b3_caller_gets_b3_upstream_and_a_span(
    trace_lab: Lab, traced_proxy: RunningProxy, spans_file: Path
) -> None:
    trace_id = "80f198ee56343ba8"
    sent = curl(trace_lab, "/b3", {"b3": f"{trace_id}-e457b5a2e4d86bd1-1", "x-request-id": "caller-rid-1"})
    assert "traceparent" not in sent
    b3_trace, proxy_span, sampled, parent = sent["b3"].split("-")
    assert (b3_trace, sampled, parent) == (trace_id, "1", "e457b5a2e4d86bd1")
    assert sent["x-request-id"] == "caller-rid-1"
    span = wait_span(spans_file, "0" * 16 + trace_id)
    assert (span["parent_span_id"], span["span_id"]) == ("e457b5a2e4d86bd1", proxy_span)
    assert span["attributes"]["guid:x-request-id"] == "caller-rid-1"


def test_unsampled_caller_is_propagated_but_not_exported(
    trace_lab: Lab, traced_proxy: RunningProxy, spans_file: Path
) -> None:
    quiet_trace = "5bf92f3577b34da6a3ce929d0e0e4737"
    sent = curl(trace_lab, "/quiet", {"traceparent": f"00-{quiet_trace}-{CALLER_SPAN}-00"})
    assert sent["traceparent"].startswith(f"00-{quiet_trace}-") and sent["traceparent"].endswith("-00")
    # A sampled request after it is exported; by then the unsampled one would have been too.
    marker = "6bf92f3577b34da6a3ce929d0e0e4738"
    curl(trace_lab, "/marker", {"traceparent": f"00-{marker}-{CALLER_SPAN}-01"})
    wait_span(spans_file, marker)
    assert quiet_trace not in spans_file.read_text()
    assert access_record(traced_proxy, quiet_trace)["path"] == "/quiet"  # logged all the same


def test_a_request_without_trace_headers_starts_a_trace(trace_lab: Lab, traced_proxy: RunningProxy) -> None:
    sent = curl(trace_lab, "/fresh", {})
    version, trace_id, _span, flags = sent["traceparent"].split("-")
    assert version == "00" and flags == "00"  # sampling 0
    assert len(trace_id) == 32 and trace_id != "0" * 32
    assert uuid.UUID(sent["x-request-id"]).version == 4
    assert access_record(traced_proxy, trace_id)["request_id"] == sent["x-request-id"]


def test_a_failed_request_is_an_error_span_and_a_warning_record(
    trace_lab: Lab, traced_proxy: RunningProxy, spans_file: Path
) -> None:
    failed_trace = "7bf92f3577b34da6a3ce929d0e0e4739"
    argv = ["curl", "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}"]
    argv += ["-H", f"traceparent: 00-{failed_trace}-{CALLER_SPAN}-01", f"http://{BROKEN_VIP}/down"]
    status = int(netns.run(trace_lab.client_pods[0].ns, argv, timeout=10))
    assert status in (502, 503)
    span = wait_span(spans_file, failed_trace)
    assert span["status"] == 2  # STATUS_CODE_ERROR
    assert span["attributes"]["http.response.status_code"] == status
    assert "UF" in span["attributes"]["response_flags"].split(",")
    assert span["attributes"]["nodeproxy.service"] == "broken"
    record = access_record(traced_proxy, failed_trace)
    assert (record["status"], record["level"]) == (status, "warning")
    assert "UF" in record["flags"].split(",") and record["attempts"] >= 1


@pytest.mark.parametrize(
    ("flag", "vip", "path", "headers", "max_time"),
    [
        ("UH", EMPTY_VIP, "/none", {}, 5.0),  # no endpoint at all
        ("UT", TRACED_VIP, "/sleep/1500", {"x-nodeproxy-timeout-ms": "200"}, 5.0),  # deadline passed
    ],
)
def test_each_flag_the_lab_can_cause_is_in_the_access_log_and_the_span(
    trace_lab: Lab,
    traced_proxy: RunningProxy,
    spans_file: Path,
    flag: str,
    vip: str,
    path: str,
    headers: dict[str, str],
    max_time: float,
) -> None:
    trace_id = flag.encode().hex().ljust(32, "b")
    argv = ["curl", "-sS", "--max-time", str(max_time), "-o", "/dev/null", "-w", "%{http_code}"]
    for name, value in {"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01", **headers}.items():
        argv += ["-H", f"{name}: {value}"]
    netns.run(trace_lab.client_pods[0].ns, [*argv, f"http://{vip}{path}"], check=False, timeout=10)
    record = access_record(traced_proxy, trace_id)
    assert flag in str(record["flags"]).split(","), record
    assert record["level"] == "warning"
    span = wait_span(spans_file, trace_id)
    assert flag in span["attributes"]["response_flags"].split(",")
    assert span["status"] == 2  # an error
