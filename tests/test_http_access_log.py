"""The per-request access-log record of the HTTP engine is one JSON line within PIPE_BUF, whatever the
client sent: a record longer than PIPE_BUF is not written atomically to a pipe and can be split by another
worker's line (as the listener's connection records, see nodeproxy.accesslog)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest
import structlog

from nodeproxy.accesslog import MAX_LINE, MAX_TEXT, AtomicLineLoggerFactory
from nodeproxy.config import HttpConfig, RelayConfig
from nodeproxy.daemon import LOG_LEVEL, configure_logging
from nodeproxy.proxy.http import HttpConnection, HttpProxy, PendingRequest
from nodeproxy.proxy.http_route import RequestAttrs
from nodeproxy.state.routing import RoutingState, StateUpdater


@pytest.fixture()
def daemon_logging() -> Iterator[None]:
    """structlog as the daemon configures it (JSON lines on stderr, run-time level)."""
    configure_logging("info")
    # On fd 2 itself (which capfd captures), not on the sys.stderr object pytest swaps and closes.
    stderr = os.fdopen(2, "w", closefd=False)
    structlog.configure(logger_factory=AtomicLineLoggerFactory(stderr))
    try:
        yield
    finally:
        stderr.close()
        LOG_LEVEL.set("info")
        structlog.reset_defaults()


def make_proxy() -> HttpProxy:
    updater = StateUpdater()

    def routing() -> RoutingState:
        return updater.current

    proxy = HttpProxy(routing, HttpConfig(), RelayConfig(), access_log=True, bind_source=False)
    proxy.start()
    return proxy


def finish_request(proxy: HttpProxy, path: str, authority: str) -> None:
    conn = HttpConnection(7, "10.244.1.5", 40000, "10.96.0.30", 80, time.monotonic(), proxy.workers[0])
    proxy.connections[conn.id] = conn
    proxy.requests[11] = PendingRequest(
        conn, RequestAttrs("GET", authority, path, "", {}), service="web", route="default"
    )
    # DONE record: kind, request, conn, status, flags, errno, bytes in/out, decide/upstream/total ns,
    # attempts, reused.
    proxy._on_done((0, 11, conn.id, 200, 0, 0, 120, 4000, 20_000, 1_500_000, 2_000_000, 1, 1, 1_000_000, -1))


@pytest.mark.parametrize("path_length", [10, 20_000])
def test_request_record_is_one_json_line_within_pipe_buf(
    capfd: pytest.CaptureFixture[str], daemon_logging: None, path_length: int
) -> None:
    proxy = make_proxy()
    try:
        capfd.readouterr()
        path = "/" + 'a"\\é' * (path_length // 4)
        finish_request(proxy, path, "web.example")
        lines = [line for line in capfd.readouterr().err.splitlines() if line]
    finally:
        proxy.close()
    assert len(lines) == 1, lines
    assert len(lines[0].encode()) + 1 <= MAX_LINE
    record = json.loads(lines[0])
    assert record["event"] == "request" and record["level"] == "info"
    assert record["path"] == path[:MAX_TEXT]
    assert (record["src"], record["dst"], record["service"], record["route"]) == (
        "10.244.1.5:40000",
        "10.96.0.30:80",
        "web",
        "default",
    )
    assert (record["status"], record["bytes_out"], record["duration_ms"], record["reused"]) == (
        200,
        4000,
        2.0,
        True,
    )


def test_request_records_follow_the_run_time_log_level(
    capfd: pytest.CaptureFixture[str], daemon_logging: None
) -> None:
    proxy = make_proxy()
    try:
        LOG_LEVEL.set("warning")
        capfd.readouterr()
        finish_request(proxy, "/quiet", "web.example")
        assert '"event": "request"' not in capfd.readouterr().err
        LOG_LEVEL.set("info")
        finish_request(proxy, "/heard", "web.example")
        assert '"path": "/heard"' in capfd.readouterr().err
    finally:
        proxy.close()
