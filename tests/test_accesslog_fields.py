"""Access-log records of issue 9: the request record's tracing fields, each response flag the proxy
produces (as a failure record that sampling never drops), identities, sampling, the run-time level
(set_level) and the configured output."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from nodeproxy import _l7, accesslog
from nodeproxy.accesslog import (
    ACCESS_LEVEL,
    MAX_LINE,
    MAX_TEXT,
    AccessLog,
    AccessLogConfig,
    get_level,
    set_level,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"

# Every response flag a record can carry: the HTTP engine's (nodeproxy._l7.FLAGS), Python's local
# replies (NR, UH, UF, IE, RL, UAEX of the resilience layers, URX after retries), and the TCP listener's
# refusals (UO, UH, UF, NR, LR).
HTTP_FLAGS = sorted({*_l7.FLAGS, "NR", "UH", "UF", "URX", "UT", "DC", "RL", "UAEX", "UO", "IE"})
TCP_FLAGS = ["UO", "UH", "UF", "NR", "LR"]


@pytest.fixture(autouse=True)
def info_level() -> Iterator[None]:
    set_level("info")
    yield
    set_level("info")


class Capture:
    """An AccessLog writing into a pipe; records() reads back what was written, one JSON object a line."""

    def __init__(self, **options: object) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.log = AccessLog(self.write_fd, **options)  # type: ignore[arg-type]

    def records(self) -> list[dict[str, object]]:
        data = b""
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        lines = data.decode().splitlines()
        assert all(len(line.encode()) + 1 <= MAX_LINE for line in lines)
        return [json.loads(line) for line in lines]

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture()
def capture() -> Iterator[Capture]:
    cap = Capture()
    yield cap
    cap.close()


def write_request(log: AccessLog, status: int = 200, flags: str = "-", **extra: object) -> None:
    fields = log.http_request_fields(
        3, ("10.244.1.5", 40000), ("10.96.0.30", 80), "web", ("10.244.2.7", 8080), **extra.pop("ids", {})
    )  # type: ignore[arg-type]
    log.request(
        9, fields, method="GET", authority="web.example", path="/items", route="default", status=status,
        flags=flags, err=0, bytes_in=10, bytes_out=20, decide_ms=0.01, upstream_ms=1.0, duration_ms=1.5,
        attempts=2, reused=False, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


def test_request_record_carries_trace_and_request_ids(capture: Capture) -> None:
    write_request(
        capture.log, grpc_status=0, trace_id=TRACE_ID, x_request_id="dab83714-c3e6-46ce-8bd5-32141a2efc57"
    )
    (record,) = capture.records()
    assert record["event"] == "request" and record["level"] == "info"
    assert record["trace_id"] == TRACE_ID
    assert record["request_id"] == "dab83714-c3e6-46ce-8bd5-32141a2efc57"
    assert record["grpc_status"] == 0
    assert (record["request"], record["conn"], record["src"], record["dst"]) == (
        9, 3, "10.244.1.5:40000", "10.96.0.30:80",
    )  # fmt: skip
    assert (record["service"], record["route"], record["upstream"], record["status"]) == (
        "web", "default", "10.244.2.7:8080", 200,
    )  # fmt: skip
    assert (record["flags"], record["bytes_in"], record["bytes_out"], record["attempts"]) == ("-", 10, 20, 2)
    assert record["duration_ms"] == 1.5 and str(record["timestamp"]).endswith("Z")


def test_request_record_without_tracing_fields_keeps_its_old_keys(capture: Capture) -> None:
    write_request(capture.log)
    (record,) = capture.records()
    assert not {"trace_id", "request_id", "grpc_status", "src_workload"} & set(record)


def test_a_hostile_request_id_is_escaped_and_cut(capture: Capture) -> None:
    hostile = '"}\n{"event": "forged"' + "\u00e9" * 2000
    write_request(capture.log, x_request_id=hostile)
    (record,) = capture.records()
    assert record["request_id"] == hostile[:MAX_TEXT]


@pytest.mark.parametrize("flag", HTTP_FLAGS)
def test_each_http_flag_makes_a_warning_record_that_sampling_keeps(flag: str) -> None:
    cap = Capture(sampling=0.0)
    try:
        status = {"NR": 404, "RL": 429, "UAEX": 403}.get(flag, 503)
        write_request(cap.log, status=status, flags=flag)
        write_request(cap.log, status=200, flags=f"URX,{flag}")
        write_request(cap.log, status=200)  # a success: sampled out at 0%
        records = cap.records()
    finally:
        cap.close()
    assert [(r["status"], r["flags"], r["level"]) for r in records] == [
        (status, flag, "warning"),
        (200, f"URX,{flag}", "warning"),
    ]
    assert cap.log.sampled_out == 1


@pytest.mark.parametrize("status", [500, 502, 503, 504, 0])
def test_5xx_and_no_response_are_failures_without_a_flag(status: int) -> None:
    cap = Capture(sampling=0.0)
    try:
        write_request(cap.log, status=status)
        (record,) = cap.records()
    finally:
        cap.close()
    assert record["level"] == "warning" and record["status"] == status


@pytest.mark.parametrize("flag", TCP_FLAGS)
def test_tcp_refusals_and_flagged_closes_are_failures(flag: str) -> None:
    cap = Capture(sampling=0.0)
    try:
        fields = cap.log.connection_fields(4, ("10.244.1.5", 40001), ("10.96.0.40", 5432), "db", None)
        cap.log.refused(fields, "no endpoint", 0, flag)
        cap.log.closed(fields, "reset", 104, 1, 2, 3.0, 1, flag)
        cap.log.closed(fields, "closed", 0, 1, 2, 3.0, 1)  # a clean close: sampled out at 0%
        records = cap.records()
    finally:
        cap.close()
    assert [(r["event"], r["flags"], r["level"]) for r in records] == [
        ("connection refused", flag, "warning"),
        ("connection closed", flag, "warning"),
    ]


def test_identities_are_written_when_known(capture: Capture) -> None:
    ids = {
        "source_workload": "frontend",
        "source_identity": "spiffe://cluster.local/ns/shop/sa/frontend",
        "destination_workload": "web-v2",
        "destination_identity": "spiffe://cluster.local/ns/shop/sa/web",
    }
    write_request(capture.log, ids=ids)
    fields = capture.log.connection_fields(
        1, ("10.0.0.1", 1), ("10.0.0.2", 2), None, None, source_workload="x"
    )
    capture.log.closed(fields, "closed", 0, 0, 0, 0.0, 1)
    request, closed = capture.records()
    assert (request["src_workload"], request["src_identity"]) == (
        "frontend", "spiffe://cluster.local/ns/shop/sa/frontend",
    )  # fmt: skip
    assert (request["dst_workload"], request["dst_identity"]) == (
        "web-v2", "spiffe://cluster.local/ns/shop/sa/web",
    )  # fmt: skip
    assert closed["src_workload"] == "x" and "dst_identity" not in closed


def test_sampling_keeps_about_its_share_of_successes() -> None:
    random.seed(99)
    cap = Capture(sampling=25.0)
    try:
        for _ in range(4000):
            write_request(cap.log)
            if len(cap.records()) > 10_000:
                break
        kept = 4000 - cap.log.sampled_out
    finally:
        cap.close()
    # Binomial(4000, 0.25): standard deviation 27; 6 of them.
    assert abs(kept - 1000) < 165, kept


def test_set_level_changes_what_is_written_at_once(capture: Capture) -> None:
    set_level("warning")
    assert get_level() == "warning"
    write_request(capture.log)  # success: not written
    write_request(capture.log, status=502, flags="UF")
    set_level("off")
    write_request(capture.log, status=502, flags="UF")
    set_level("info")
    write_request(capture.log, status=201)
    assert [r["status"] for r in capture.records()] == [502, 201]
    with pytest.raises(ValueError, match="unknown access-log level"):
        set_level("verbose")
    assert ACCESS_LEVEL.name == "info"


def test_an_explicit_level_source_still_wins(capture: Capture) -> None:
    """The daemon may hand its own run-time level (structlog's) to an AccessLog; set_level then does not
    apply to it."""
    log = AccessLog(capture.write_fd, level=accesslog.FixedLevel(accesslog.INFO))
    set_level("off")
    write_request(log)
    assert len(capture.records()) == 1


def test_warning_enabled_is_the_cheap_pre_check(capture: Capture) -> None:
    set_level("warning")
    assert capture.log.warning_enabled and not capture.log.info_enabled
    set_level("off")
    assert not capture.log.warning_enabled
    assert not AccessLog(capture.write_fd, enabled=False).warning_enabled


def test_config_output_file_appends_and_sampling_applies(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    umask = os.umask(0o022)
    try:
        first = AccessLog.from_config(AccessLogConfig(output=str(path)))
    finally:
        os.umask(umask)
    second = AccessLog.from_config(AccessLogConfig(output=str(path), sampling=0))
    try:
        write_request(first, status=201)
        write_request(second)  # sampled out
        write_request(second, status=503, flags="UO")
        write_request(first, status=202)
    finally:
        first.close()
        second.close()
    assert path.stat().st_mode & 0o777 == 0o640
    records = [json.loads(line) for line in path.read_text().splitlines()]
    # Two open descriptions of one file: O_APPEND keeps every record whole and in order.
    assert [(r["status"], r["flags"]) for r in records] == [(201, "-"), (503, "UO"), (202, "-")]


def test_config_stdout_stderr_and_disabled() -> None:
    assert AccessLog.from_config(AccessLogConfig(output="stdout")).fd == 1
    assert AccessLog.from_config(AccessLogConfig()).fd == 2
    assert not AccessLog.from_config(AccessLogConfig(enabled=False)).enabled
    assert not AccessLog.from_config(AccessLogConfig(), enabled=False).enabled  # --no-access-log wins


@pytest.mark.parametrize(
    "changes",
    [{"output": "access.log"}, {"output": "/var/log/a\0b"}, {"sampling": -1}, {"level": "loud"}, {"x": 1}],
)
def test_access_log_config_refuses(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AccessLogConfig.model_validate(changes)


def test_access_log_rejects_a_sampling_outside_a_percentage() -> None:
    with pytest.raises(ValueError, match="percentage"):
        AccessLog(2, sampling=101.0)


@given(st.text(max_size=700))
def test_text_fast_path_is_what_json_would_write(value: str) -> None:
    assert accesslog._text(value) == json.dumps(value[:MAX_TEXT])
