"""A routing reload applies to the very next request, also on a kept-alive connection (loopback).

HttpProxy reads the routing snapshot per batch; whatever it keeps per connection (e.g. the service
port looked up once) must follow a new snapshot. The requests here ride one connection across three
reloads: the port turns tcp (no HTTP routing: 404 NR), back to http with a header route only (404 NR
without the header, 200 with it), then without routes again.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nodeproxy.config import HttpConfig, RelayConfig, parse_config
from nodeproxy.proxy.http import HttpProxy
from nodeproxy.state.routing import StateUpdater
from tests.test_l7 import get, make_backend

VIP = "10.96.0.30"


def config_text(backend_port: int, protocol: str, routes: str = "") -> str:
    return (
        "node:\n  name: node-a\ncapture:\n  pod_cidrs: [10.244.1.0/24]\n"
        "services:\n"
        f"  - name: web\n    vip: {VIP}\n"
        f"    ports: [{{port: 80, target_port: {backend_port}, protocol: {protocol}}}]\n"
        "    endpoints: [{address: 127.0.0.1}]\n" + routes
    )


STAGING_ONLY = "    routes: [{name: staging-only, match: [{headers: [{name: x-env, exact: staging}]}]}]\n"


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


@pytest.fixture()
def backend_port() -> Iterator[int]:
    server = make_backend(("127.0.0.1", 0), "lo")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_reload_applies_to_the_next_request_on_a_kept_alive_connection(backend_port: int) -> None:
    updater = StateUpdater()
    updater.apply(parse_config(config_text(backend_port, "http")))
    loop = asyncio.new_event_loop()
    proxy = HttpProxy(
        lambda: updater.current, HttpConfig(), RelayConfig(), access_log=False, bind_source=False
    )
    proxy.start(loop)
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=10)
    accepted, (ip, port) = listener.accept()
    ids = itertools.count(1)

    def on_loop(fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(_call(fn), loop).result(10)

    def reload(text: str) -> None:
        on_loop(lambda: updater.apply(parse_config(text)))

    try:
        fd = accepted.detach()
        on_loop(lambda: proxy.adopt(next(ids), fd, ip, port, VIP, 80))
        with client.makefile("rb") as reader:
            first = get(client, "/one", reader)
            assert first.status == 200 and b"path=/one" in first.body

            reload(config_text(backend_port, "tcp"))
            gone = get(client, "/two", reader)
            assert (gone.status, gone.header("x-nodeproxy-flags")) == (404, "NR"), gone.raw_head

            reload(config_text(backend_port, "http", STAGING_ONLY))
            unrouted = get(client, "/three", reader)
            assert (unrouted.status, unrouted.header("x-nodeproxy-flags")) == (404, "NR"), unrouted.raw_head
            staged = get(client, "/four", reader, "x-env: staging\r\n")
            assert staged.status == 200 and b"path=/four" in staged.body

            reload(config_text(backend_port, "http"))
            last = get(client, "/five", reader)
            assert last.status == 200 and b"path=/five" in last.body
        assert proxy.stats.requests == 5
    finally:
        client.close()
        listener.close()
        on_loop(proxy.close)
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
        loop.close()
