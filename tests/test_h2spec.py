"""h2spec (the HTTP/2 conformance suite) against a loopback server built on nodeproxy._h2.

h2spec is a development tool that CI cannot fetch (its source is not on a package registry); without the
binary this test skips. test_h2_codec.py covers the
same rules without it. Build: GOPATH mode (GO111MODULE=off) with Debian's golang-go and the
golang-github-spf13-cobra-dev, golang-github-fatih-color-dev, golang-golang-x-net-dev sources."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest

from nodeproxy._h2 import H2Connection
from nodeproxy.proxy import http_events as ev

H2SPEC = shutil.which("h2spec")
pytestmark = pytest.mark.skipif(H2SPEC is None, reason="h2spec not installed (a development tool)")
# http2/5.1.1/2 (a stream id lower than the previous one): the reply to the earlier stream is framed
# before the GOAWAY nghttp2 queues for the later one. nghttpd and the h2 package miss one case too.
ALLOWED_FAILURES = 1


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = H2Connection(auto_acknowledge=True)
    try:
        writer.write(conn.data_to_send())
        while conn.want_read or conn.want_write:
            data = await reader.read(65536)
            if not data:
                break
            for event in conn.receive_data(data) + conn.take_events():
                if isinstance(event, ev.MessageEnded) and not conn.fatal_error:
                    conn.send_headers(event.stream_id, [(b":status", b"200")])
                    conn.send_data(event.stream_id, b"ok\n", end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # h2spec drops connections mid-test on purpose
    finally:
        writer.close()


@pytest.fixture
def h2_server() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, asyncio.Server] = {}

    async def start() -> None:
        holder["server"] = await asyncio.start_server(_serve_connection, "127.0.0.1", 0)
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()))
    thread.start()
    try:
        assert started.wait(5)
        yield holder["server"].sockets[0].getsockname()[1]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def test_h2spec_conformance(h2_server: int) -> None:
    assert H2SPEC is not None
    result = subprocess.run(
        [H2SPEC, "-h", "127.0.0.1", "-p", str(h2_server), "-o", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = re.search(r"(\d+) tests, (\d+) passed, (\d+) skipped, (\d+) failed", result.stdout)
    assert summary, result.stdout[-2000:]
    total, passed, skipped, failed = map(int, summary.groups())
    assert total >= 146
    assert failed <= ALLOWED_FAILURES, result.stdout[-4000:]
    assert passed + skipped + failed == total
