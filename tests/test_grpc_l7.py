"""gRPC through the HTTP engine: a grpcio client and server (generic handlers on raw bytes, no protoc
step) on loopback, the proxy on a `grpc` port between them. Unary, client-, server- and bidirectional
streaming; status, message and trailing metadata intact; a cancelled call cancels the server's; local
replies as gRPC statuses."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import pytest

from tests.test_l7_loopback import LoopbackProxy, free_port

grpc: Any = pytest.importorskip("grpc")  # the test extra; no type stubs

SERVICE = "test.Echo"
CHANNEL_OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.max_receive_message_length", 64 << 20)]


class EchoServer:
    def __init__(self, address: str = "127.0.0.1:0", name: str = "") -> None:
        self.name = name
        self.cancelled = threading.Event()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8), options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
            "Spray": grpc.unary_stream_rpc_method_handler(self.spray),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hang": grpc.unary_unary_rpc_method_handler(self.hang),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port: int = self.server.add_insecure_port(address)
        self.server.start()

    def unary(self, request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata(
            (
                ("x-trailer", "t1"),
                ("x-size", str(len(request))),
                ("x-server", self.name),
                ("x-peer", context.peer()),
            )
        )
        return request[::-1]

    def collect(self, requests: Iterator[bytes], context: Any) -> bytes:
        return b"|".join(requests)

    def spray(self, request: bytes, context: Any) -> Iterator[bytes]:
        count = int(request)
        for i in range(count):
            yield i.to_bytes(4, "big") * 256

    def chat(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield b"echo:" + request

    def fail(self, request: bytes, context: Any) -> bytes:
        context.set_trailing_metadata((("x-why", "because"),))
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        raise AssertionError("context.abort returns only by raising")

    def hang(self, request: bytes, context: Any) -> bytes:
        deadline = time.monotonic() + 10
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not context.is_active():
            self.cancelled.set()
        return b""

    def stop(self) -> None:
        self.server.stop(0).wait(5)


@pytest.fixture(scope="module")
def server() -> Iterator[EchoServer]:
    running = EchoServer()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture()
def channel(server: EchoServer) -> Iterator[Any]:
    proxy = LoopbackProxy(["127.0.0.1"], server.port, protocol="grpc")
    chan = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=CHANNEL_OPTIONS)
    try:
        yield chan
    finally:
        chan.close()
        proxy.close()


def method(chan: Any, kind: str, name: str) -> Any:
    factory = getattr(chan, kind)
    return factory(f"/{SERVICE}/{name}")  # no serializers: requests and responses are bytes


def test_unary_with_trailing_metadata(channel: Any) -> None:
    call = method(channel, "unary_unary", "Unary")
    response, info = call.with_call(b"hello", timeout=10)
    assert response == b"olleh"
    assert dict(info.trailing_metadata())["x-trailer"] == "t1"
    assert info.code() == grpc.StatusCode.OK
    big = bytes(range(256)) * 40_000  # 10 MB in one message: many DATA frames, windows both ways
    assert call(big, timeout=30) == big[::-1]


def test_client_streaming(channel: Any) -> None:
    call = method(channel, "stream_unary", "Collect")
    assert call(iter([b"a", b"b", b"c" * 100_000]), timeout=10) == b"a|b|" + b"c" * 100_000


def test_server_streaming(channel: Any) -> None:
    call = method(channel, "unary_stream", "Spray")
    messages = list(call(b"2000", timeout=20))
    assert len(messages) == 2000
    assert all(m == i.to_bytes(4, "big") * 256 for i, m in enumerate(messages))


def test_bidirectional_streaming_is_not_buffered(channel: Any) -> None:
    # Each answer must come back before the next request is sent: a proxy that waited for the end of
    # the request stream (or buffered the response) would deadlock here.
    call = method(channel, "stream_stream", "Chat")
    outbox: list[bytes] = []
    ready = threading.Event()

    def requests() -> Iterator[bytes]:
        for i in range(50):
            yield f"m{i}".encode()
            assert ready.wait(5), "no answer came back while the call was open"
            ready.clear()

    for i, answer in enumerate(call(requests(), timeout=30)):
        assert answer == f"echo:m{i}".encode()
        outbox.append(answer)
        ready.set()
    assert len(outbox) == 50


def test_error_status_message_and_metadata_intact(channel: Any) -> None:
    call = method(channel, "unary_unary", "Fail")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"x", timeout=10)
    error = raised.value
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "no such thing: x"
    assert dict(error.trailing_metadata())["x-why"] == "because"


def test_cancelled_call_cancels_the_server_call(server: EchoServer, channel: Any) -> None:
    call = method(channel, "unary_unary", "Hang")
    server.cancelled.clear()
    with pytest.raises(grpc.RpcError) as raised:
        call(b"", timeout=0.5)  # the deadline passes: the client resets the stream
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert server.cancelled.wait(5)


def test_local_replies_are_grpc_statuses() -> None:
    for endpoints, port, expected, detail, flag in (
        ([], free_port(), grpc.StatusCode.UNAVAILABLE, "has no endpoints", "UH"),
        (["127.0.0.1"], free_port(), grpc.StatusCode.UNAVAILABLE, "upstream connect failed", "UF"),
    ):
        proxy = LoopbackProxy(endpoints, port, protocol="grpc")
        chan = grpc.insecure_channel(f"127.0.0.1:{proxy.port}", options=CHANNEL_OPTIONS)
        try:
            with pytest.raises(grpc.RpcError) as raised:
                method(chan, "unary_unary", "Unary")(b"x", timeout=10)
            assert raised.value.code() == expected
            # The proxy's own answer (grpc-message, the flags header), not a client-side failure.
            assert detail in raised.value.details()
            assert dict(raised.value.trailing_metadata())["x-nodeproxy-flags"] == flag
        finally:
            chan.close()
            proxy.close()


if __name__ == "__main__":  # pragma: no cover - run inside a lab's backend pod
    import sys

    EchoServer(f"0.0.0.0:{sys.argv[1]}", sys.argv[2]).server.wait_for_termination()
