"""A small OTLP/HTTP trace receiver for the tests: decodes every POSTed ExportTraceServiceRequest with
opentelemetry-proto and keeps its spans. Run in-process (:class:`OtlpReceiver`) on loopback, or as a
process inside a lab namespace (``python -m tests.otlp_receiver HOST PORT OUT_FILE``), which appends
one JSON line per received span to OUT_FILE.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def attribute_value(value: AnyValue) -> object:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


def span_dict(span: Span, resource: dict[str, object]) -> dict[str, Any]:
    """The fields the tests check, ids as hex."""
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "trace_state": span.trace_state,
        "flags": span.flags,
        "name": span.name,
        "kind": span.kind,
        "start": span.start_time_unix_nano,
        "end": span.end_time_unix_nano,
        "status": span.status.code,
        "attributes": {a.key: attribute_value(a.value) for a in span.attributes},
        "resource": resource,
    }


def decode(body: bytes) -> list[dict[str, Any]]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: attribute_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            spans += [span_dict(span, resource) for span in scope_spans.spans]
    return spans


class OtlpReceiver:
    """Loopback receiver. `status`: what it answers; `stall`: while set, requests wait for it to clear
    (a collector that does not answer); `batches`: span counts per request, in arrival order."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, out_file: Path | None = None) -> None:
        self.spans: list[dict[str, Any]] = []
        self.batches: list[int] = []
        self.request_times: list[float] = []
        self.content_types: list[str] = []
        self.paths: list[str] = []
        self.status = 200
        self.retry_after: str | None = None
        self.rejected = 0
        # Close each connection after answering without saying so (no `Connection: close`), as a
        # collector whose keep-alive idle timeout has run out does between two exports.
        self.drop_idle_connections = False
        self.answer_body: bytes | None = None  # answer this instead of an ExportTraceServiceResponse
        self.stall = threading.Event()
        self.unstalled = threading.Event()
        self.arrived = threading.Condition()
        self.out_file = out_file
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.request_times.append(time.monotonic())
                if receiver.stall.is_set():
                    receiver.unstalled.wait(30)
                receiver.received(self.path, self.headers.get("Content-Type", ""), body)
                status = receiver.status
                answer = b""
                if status == 200:
                    response = ExportTraceServiceResponse()
                    if receiver.rejected:
                        response.partial_success.rejected_spans = receiver.rejected
                        response.partial_success.error_message = "test rejects"
                    answer = response.SerializeToString()
                if receiver.answer_body is not None:
                    answer = receiver.answer_body
                self.send_response(status)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                if receiver.retry_after is not None:
                    self.send_header("Retry-After", receiver.retry_after)
                self.end_headers()
                self.wfile.write(answer)
                if receiver.drop_idle_connections:
                    self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def received(self, path: str, content_type: str, body: bytes) -> None:
        spans = decode(body)
        with self.arrived:
            self.paths.append(path)
            self.content_types.append(content_type)
            self.batches.append(len(spans))
            self.spans += spans
            self.arrived.notify_all()
        if self.out_file is not None:
            with self.out_file.open("a") as out:
                for span in spans:
                    out.write(json.dumps(span) + "\n")

    def wait_spans(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        with self.arrived:
            if not self.arrived.wait_for(lambda: len(self.spans) >= count, timeout):
                raise AssertionError(f"{len(self.spans)} spans arrived, wanted {count}")
            return list(self.spans)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.unstalled.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def main() -> None:
    host, port, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    with OtlpReceiver(host, port, out):
        print("listening", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
