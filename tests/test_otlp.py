"""OTLP/HTTP export: spans reach a real receiver (on loopback) with the right ids and attributes, in
batches; a slow, failing or absent collector costs spans (counted), never a blocked submit, and no
retry storm; close() flushes within its bound."""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from nodeproxy.otlp import OtlpExporter, SpanRecord, encode_spans
from nodeproxy.tracing import Tracer, TracingConfig
from tests.otlp_receiver import OtlpReceiver, decode

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def record(index: int = 0, **changes: Any) -> SpanRecord:
    fields: dict[str, Any] = {
        "trace_id": f"{index + 1:032x}",
        "span_id": f"{index + 1:016x}",
        "parent": None,
        "tracestate": None,
        "start_ns": 1_700_000_000_000_000_000,
        "end_ns": 1_700_000_000_002_000_000,
        "method": "GET",
        "authority": "web.example",
        "path": "/a",
        "route": "default",
        "service": "web",
        "status": 200,
        "grpc_status": -1,
        "upstream": "10.244.2.7:8080",
        "attempts": 1,
        "flags": "-",
        "request_id": "rid",
    }
    fields.update(changes)
    return (
        fields["trace_id"], fields["span_id"], fields["parent"], fields["tracestate"], fields["start_ns"],
        fields["end_ns"], fields["method"], fields["authority"], fields["path"], fields["route"],
        fields["service"], fields["status"], fields["grpc_status"], fields["upstream"], fields["attempts"],
        fields["flags"], fields["request_id"],
    )  # fmt: skip


def config(url: str, **changes: Any) -> TracingConfig:
    return TracingConfig(otlp_endpoint=url, **changes)


def test_span_continues_the_callers_trace_as_a_child() -> None:
    with OtlpReceiver() as receiver:
        tracer = Tracer(config(receiver.url, sampling=0, export_interval="50ms", service_name="node-a"))
        try:
            start = tracer.start(
                {
                    "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
                    "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
                    "x-request-id": "req-1",
                }
            )
            assert start.sampled  # the caller's flag wins over sampling 0
            upstream = dict(start.set_headers)["traceparent"]
            _, trace_id, proxy_span, flags = upstream.split("-")
            assert (trace_id, flags) == (CALLER_TRACE, "01") and proxy_span != CALLER_SPAN
            now = time.time_ns()
            tracer.finish(
                start, start_ns=now - 3_000_000, end_ns=now, method="POST", authority="web.example",
                path="/orders", route="orders-v2", service="web", status=503, grpc_status=-1,
                upstream="10.244.2.7:8080", attempts=3, flags="URX,UF",
            )  # fmt: skip
            (span,) = receiver.wait_spans(1)
        finally:
            tracer.close()
    assert receiver.paths == ["/v1/traces"]
    assert receiver.content_types == ["application/x-protobuf"]
    assert (span["trace_id"], span["parent_span_id"], span["span_id"]) == (
        CALLER_TRACE,
        CALLER_SPAN,
        proxy_span,
    )
    assert span["trace_state"] == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    assert span["kind"] == 3  # SPAN_KIND_CLIENT
    assert span["status"] == 2  # STATUS_CODE_ERROR: a 5xx
    assert span["end"] - span["start"] == 3_000_000
    assert span["flags"] & 0x301 == 0x301  # sampled, with a remote parent
    assert span["resource"]["service.name"] == "node-a"
    attributes = span["attributes"]
    assert attributes["http.request.method"] == attributes["http.method"] == "POST"
    assert attributes["url.path"] == "/orders"
    assert attributes["http.response.status_code"] == attributes["http.status_code"] == 503
    assert attributes["nodeproxy.route"] == "orders-v2"
    assert attributes["nodeproxy.service"] == "web"
    assert attributes["upstream.address"] == "10.244.2.7:8080"
    assert attributes["nodeproxy.attempts"] == 3
    assert attributes["http.request.resend_count"] == 2
    assert attributes["response_flags"] == "URX,UF"
    assert attributes["guid:x-request-id"] == "req-1"
    assert "rpc.grpc.status_code" not in attributes


def test_unsampled_requests_export_nothing_and_a_root_span_has_no_parent() -> None:
    with OtlpReceiver() as receiver:
        tracer = Tracer(config(receiver.url, sampling=100, export_interval="20ms"))
        try:
            unsampled = tracer.start({"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
            root = tracer.start({})
            assert not unsampled.sampled and root.sampled
            for start in (unsampled, root):
                tracer.finish(
                    start, start_ns=1, end_ns=2, method="GET", authority=None, path="/", route=None,
                    service=None, status=0, grpc_status=14, upstream=None, attempts=1, flags="UF",
                )  # fmt: skip
            (span,) = receiver.wait_spans(1)
            time.sleep(0.1)
            assert len(receiver.spans) == 1
        finally:
            tracer.close()
    assert span["trace_id"] == root.trace_id and span["parent_span_id"] == ""
    assert span["flags"] & 0x301 == 0x101  # sampled, no remote parent
    assert span["status"] == 2  # no response
    assert span["attributes"]["rpc.grpc.status_code"] == 14


def test_a_64_bit_b3_trace_id_is_exported_padded_to_128_bits() -> None:
    with OtlpReceiver() as receiver:
        tracer = Tracer(config(receiver.url, export_interval="20ms"))
        try:
            start = tracer.start({"b3": "80f198ee56343ba8-e457b5a2e4d86bd1-1"})
            tracer.finish(
                start, start_ns=1, end_ns=2, method="GET", authority=None, path="/", route=None,
                service=None, status=200, grpc_status=0, upstream=None, attempts=1, flags="-",
            )  # fmt: skip
            (span,) = receiver.wait_spans(1)
        finally:
            tracer.close()
    assert span["trace_id"] == "0000000000000000" + "80f198ee56343ba8"
    assert span["parent_span_id"] == "e457b5a2e4d86bd1"
    assert span["status"] == 0  # 200 with grpc-status 0: unset


def test_full_batches_go_at_once_and_close_sends_the_rest() -> None:
    with OtlpReceiver() as receiver:
        exporter = OtlpExporter(config(receiver.url, batch_size=4, queue_size=64, export_interval="60s"))
        for index in range(10):
            exporter.submit(record(index))
        receiver.wait_spans(8, timeout=5)  # long before the 60 s interval
        assert receiver.batches == [4, 4]
        exporter.close(5)
    assert receiver.batches == [4, 4, 2]
    assert [span["trace_id"] for span in receiver.spans] == [f"{i + 1:032x}" for i in range(10)]
    assert exporter.stats() == {
        "queued": 10, "dropped": 0, "exported": 10, "rejected": 0, "failed": 0, "batches": 3, "pending": 0,
    }  # fmt: skip


def test_a_partial_batch_goes_after_the_export_interval() -> None:
    with OtlpReceiver() as receiver:
        exporter = OtlpExporter(config(receiver.url, batch_size=100, export_interval="200ms"))
        try:
            submitted = time.monotonic()
            exporter.submit(record())
            receiver.wait_spans(1, timeout=5)
            waited = receiver.request_times[0] - submitted
        finally:
            exporter.close(2)
    assert 0.05 <= waited <= 1.5, waited


def test_a_stalled_collector_drops_spans_without_blocking_and_close_is_bounded() -> None:
    with OtlpReceiver() as receiver:
        receiver.stall.set()
        exporter = OtlpExporter(
            config(receiver.url, batch_size=4, queue_size=16, export_interval="10ms", timeout="300ms")
        )
        slowest = 0.0
        for index in range(2000):
            began = time.perf_counter()
            exporter.submit(record(index))
            slowest = max(slowest, time.perf_counter() - began)
        assert slowest < 0.05, f"a submit took {slowest * 1000:.1f} ms"
        assert exporter.queued <= 16 + 8  # the queue plus what the thread took out for its batches
        assert exporter.dropped >= 2000 - 24
        # Up to the 300 ms timeout the first batch waits; then it counts as failed and backoff starts.
        deadline = time.monotonic() + 3
        while exporter.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exporter.failed >= 4
        began = time.monotonic()
        exporter.close(0.5)
        assert time.monotonic() - began < 1.5
        stats = exporter.stats()
    assert stats["queued"] == stats["exported"] + stats["failed"] + (stats["dropped"] - exporter.dropped)
    assert stats["pending"] == 0


def test_a_collector_that_is_down_costs_one_try_per_backoff_period() -> None:
    with OtlpReceiver() as receiver:
        receiver.status = 503
        exporter = OtlpExporter(config(receiver.url, batch_size=1, queue_size=1000, export_interval="10ms"))
        try:
            end = time.monotonic() + 3.2
            while time.monotonic() < end:
                exporter.submit(record())
                time.sleep(0.005)
        finally:
            exporter.close(0.2)
    # Backoff 1 s, 2 s: tries at about 0, 1 and 3 s, where without it every 10 ms batch would be sent.
    assert 2 <= len(receiver.request_times) <= 4, receiver.request_times
    gaps = [b - a for a, b in zip(receiver.request_times, receiver.request_times[1:], strict=False)]
    assert all(gap >= 0.9 for gap in gaps), gaps
    assert exporter.failed == len(receiver.request_times)  # one span per batch, each batch one try


def test_retry_after_is_honoured_within_the_backoff_bound() -> None:
    with OtlpReceiver() as receiver:
        receiver.status = 429
        receiver.retry_after = "2"
        exporter = OtlpExporter(config(receiver.url, batch_size=1, export_interval="10ms"))
        try:
            exporter.submit(record())
            receiver.wait_spans(1)
            receiver.status, receiver.retry_after = 200, None
            end = time.monotonic() + 2.6
            while time.monotonic() < end and len(receiver.request_times) < 2:
                exporter.submit(record())
                time.sleep(0.01)
        finally:
            exporter.close(1)
    assert len(receiver.request_times) >= 2
    assert receiver.request_times[1] - receiver.request_times[0] >= 1.9


def test_no_collector_listening_fails_fast_and_is_counted() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        exporter = OtlpExporter(
            config(f"http://127.0.0.1:{port}/v1/traces", batch_size=2, export_interval="10ms")
        )
        exporter.submit(record(0))
        exporter.submit(record(1))
        deadline = time.monotonic() + 3
        while exporter.failed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        exporter.close(0.2)
    assert exporter.failed == 2 and exporter.exported == 0


def test_partial_success_counts_rejected_spans() -> None:
    with OtlpReceiver() as receiver:
        receiver.rejected = 1
        exporter = OtlpExporter(config(receiver.url, batch_size=3, export_interval="10ms"))
        for index in range(3):
            exporter.submit(record(index))
        receiver.wait_spans(3)
        exporter.close(2)
    assert (exporter.exported, exporter.rejected) == (2, 1)


def test_encoding_cuts_client_text_and_decodes_with_opentelemetry_proto() -> None:
    (span,) = decode(encode_spans([record(path="/" + "x" * 5000, request_id="r" * 900)], "svc"))
    assert len(span["attributes"]["url.path"]) == 256
    assert len(span["attributes"]["guid:x-request-id"]) == 256
    assert span["resource"]["service.name"] == "svc"


def test_an_exporter_needs_an_endpoint() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        OtlpExporter(TracingConfig())


def test_tracer_stats_have_the_same_keys_with_and_without_an_exporter() -> None:
    with OtlpReceiver() as receiver:
        exporting = Tracer(config(receiver.url, sampling=100, export_interval="10ms"))
        start = exporting.start({})
        exporting.finish(
            start, start_ns=1, end_ns=2, method="GET", authority=None, path="/", route=None, service=None,
            status=200, grpc_status=-1, upstream=None, attempts=1, flags="-",
        )  # fmt: skip
        receiver.wait_spans(1)
        exporting.close(2)
    assert exporting.stats()["exported"] == 1
    assert Tracer().stats() == dict.fromkeys(exporting.stats(), 0)


def test_a_kept_alive_connection_the_collector_closed_is_replaced_without_losing_a_batch() -> None:
    with OtlpReceiver() as receiver:
        receiver.drop_idle_connections = True
        exporter = OtlpExporter(config(receiver.url, batch_size=1, export_interval="10ms"))
        try:
            for index in range(3):
                exporter.submit(record(index))
                receiver.wait_spans(index + 1, timeout=5)
                time.sleep(0.1)  # the collector's close reaches the exporter's idle socket
        finally:
            exporter.close(2)
    assert (exporter.exported, exporter.failed) == (3, 0)


def test_client_text_is_cut_before_it_is_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled request's head may be 60 KiB of client text; the queue holds at most a few hundred
    characters of it per span (else 2048 queued spans could hold hundreds of megabytes)."""
    tracer = Tracer(config("http://127.0.0.1:9/v1/traces", sampling=100, export_interval="60s"))
    assert tracer.exporter is not None
    queued: list[SpanRecord] = []
    monkeypatch.setattr(tracer.exporter, "submit", queued.append)
    long_state = ",".join(f"v{i}=" + "x" * 20 for i in range(30))  # 32 members may exceed 512 chars
    start = tracer.start(
        {
            "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01",
            "tracestate": long_state,
            "x-request-id": "r" * 9000,
        }
    )
    tracer.finish(
        start, start_ns=1, end_ns=2, method="M" * 5000, authority="a" * 60000, path="/" + "p" * 60000,
        route="default", service="web", status=200, grpc_status=-1, upstream=None, attempts=1, flags="-",
    )  # fmt: skip
    (queued_record,) = queued
    assert queued_record[3] is None  # the long tracestate
    method, authority, path, request_id = (
        queued_record[6],
        queued_record[7],
        queued_record[8],
        queued_record[16],
    )
    assert [len(text or "") for text in (method, authority, path, request_id)] == [256, 256, 256, 256]
    short = tracer.start({"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "a=1"})
    tracer.finish(
        short, start_ns=1, end_ns=2, method="GET", authority=None, path="/", route=None, service=None,
        status=200, grpc_status=-1, upstream=None, attempts=1, flags="-",
    )  # fmt: skip
    assert queued[1][3] == "a=1" and queued[1][6:9] == ("GET", None, "/")


def test_a_2xx_answer_that_is_not_protobuf_counts_as_accepted_and_export_goes_on() -> None:
    """A collector (or a proxy in front of it) answering 200 with HTML or JSON: the spans were taken;
    the export thread must not die on the answer it cannot parse."""
    with OtlpReceiver() as receiver:
        receiver.answer_body = b"<html>ok</html>"
        exporter = OtlpExporter(config(receiver.url, batch_size=1, export_interval="10ms"))
        try:
            exporter.submit(record(0))
            receiver.wait_spans(1)
            time.sleep(0.05)
            exporter.submit(record(1))
            receiver.wait_spans(2)
        finally:
            exporter.close(2)
    assert (exporter.exported, exporter.failed) == (2, 0)
