"""The admin server's HTTP handling on its own (no daemon): pipelining, deferred answers that do not hold
up other clients, malformed and oversized requests, idle and surplus connections, descriptor passing."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeproxy import admin
from nodeproxy.admin import AdminServer, Request, Respond, Response


class Loop:
    """The supervisor's loop in miniature: select, then call each key's callback with its events."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.calls: list[Callable[[], None]] = []  # run on the loop thread
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, events in self.selector.select(0.02):
                key.data(events)
            with self._lock:
                calls, self.calls = self.calls, []
            for call in calls:
                call()

    def call_soon(self, call: Callable[[], None]) -> None:
        with self._lock:
            self.calls.append(call)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Loop, dict[str, Respond]]]:
    """An AdminServer with a handler: /fast answers at once, /slow/<name> waits for the test."""
    loop = Loop()
    waiting: dict[str, Respond] = {}

    def handler(request: Request, respond: Respond) -> None:
        if request.path.startswith("/slow/"):
            waiting[request.path.removeprefix("/slow/")] = respond
        elif request.path == "/fds":
            read_end, write_end = os.pipe()
            os.write(write_end, b"through the descriptor")
            os.close(write_end)
            respond(Response(200, {"fds": 1}, fds=[read_end]))
        else:
            respond(Response(200, {"path": request.path, "body": len(request.body), "peer": request.peer}))

    path = str(tmp_path / "admin.sock")
    server = AdminServer(path, loop.selector, handler)
    server.open()
    loop.thread.start()
    try:
        yield path, loop, waiting
    finally:
        loop.stop()
        server.close()


def unix(path: str) -> socket.socket:
    deadline = time.monotonic() + 5
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:  # the listen backlog is full until the server's loop accepts
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Reader:
    """Reads responses off one connection, keeping what it read ahead (pipelined answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a whole response")
        self.buffer += data

    def response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), body


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    reader = Reader(sock)
    return [reader.response() for _ in range(count)]


def test_pipelined_requests_are_answered_in_order(served: tuple[str, Loop, dict[str, Respond]]) -> None:
    path, _loop, _waiting = served
    with unix(path) as sock:
        sock.sendall(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\nGET /two HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = read_responses(sock, 2)
    assert [status for status, _ in answers] == [200, 200]
    assert b'"path":"/one"' in answers[0][1] and b'"path":"/two"' in answers[1][1]


def test_thousands_of_pipelined_requests_in_one_write(served: tuple[str, Loop, dict[str, Respond]]) -> None:
    """Answered one after another, not one inside the other (which would overflow the stack)."""
    path, _loop, _waiting = served
    with unix(path) as sock:
        sock.sendall(b"GET /n HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        answers = read_responses(sock, 3000)
        sock.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"/last" in read_responses(sock, 1)[0][1]
    assert {status for status, _ in answers} == {200}


def test_a_deferred_answer_holds_up_neither_other_clients_nor_its_own_order(
    served: tuple[str, Loop, dict[str, Respond]],
) -> None:
    path, loop, waiting = served
    with unix(path) as slow, unix(path) as fast:
        slow.sendall(b"GET /slow/a HTTP/1.1\r\nHost: x\r\n\r\nGET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while "a" not in waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        fast.sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_responses(fast, 1)[0][0] == 200  # while /slow/a still waits
        loop.call_soon(lambda: waiting["a"](Response(202, {"late": True})))
        answers = read_responses(slow, 2)
    assert answers[0] == (202, b'{"late":true}\n') and b'"path":"/after"' in answers[1][1]


def test_malformed_and_oversized_requests_get_4xx_and_the_server_goes_on(
    served: tuple[str, Loop, dict[str, Respond]],
) -> None:
    path, _loop, _waiting = served
    with unix(path) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        status, body = read_responses(sock, 1)[0]
        assert status == 400 and b"bad request" in body
        assert sock.recv(1) == b""  # then closed
    with unix(path) as sock:
        sock.sendall(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (admin.MAX_BODY + 1))
        assert read_responses(sock, 1)[0][0] == 413
    with unix(path) as sock:  # a head over the limit
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * (admin.MAX_HEAD + 10) + b"\r\n\r\n")
        assert read_responses(sock, 1)[0][0] == 431
    with unix(path) as sock:
        sock.sendall(b"GET /still HTTP/1.1\r\nHost: x\r\n\r\n")
        status, body = read_responses(sock, 1)[0]
        assert status == 200 and f"uid {os.getuid()}".encode() in body


def test_idle_and_surplus_connections_are_closed(
    served: tuple[str, Loop, dict[str, Respond]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, loop, _waiting = served
    server: Any = None
    for key in loop.selector.get_map().values():
        callback = key.data
        if getattr(callback, "__self__", None) is not None and isinstance(callback.__self__, AdminServer):
            server = callback.__self__
    assert server is not None
    monkeypatch.setattr(admin, "IDLE_TIMEOUT", 0.2)
    idle = unix(path)
    time.sleep(0.5)
    loop.call_soon(lambda: server.expire_idle(time.monotonic()))
    assert idle.recv(1) == b""
    idle.close()
    crowd = [unix(path) for _ in range(admin.MAX_CONNECTIONS + 3)]
    try:
        time.sleep(0.3)
        closed = 0
        for sock in crowd:
            sock.settimeout(0.05)
            try:
                if sock.recv(1) == b"":
                    closed += 1
            except TimeoutError:
                pass
        assert closed == 3
    finally:
        for sock in crowd:
            sock.close()


def test_descriptors_travel_with_their_response(served: tuple[str, Loop, dict[str, Respond]]) -> None:
    path, _loop, _waiting = served
    client = admin.HandoffClient(path)
    try:
        status, document, fds = client.request("POST", "/fds")
        again = client.request("GET", "/plain")  # keep-alive: the next exchange works
    finally:
        client.close()
    assert (status, document, len(fds)) == (200, {"fds": 1}, 1)
    assert again[0] == 200 and again[2] == []
    with os.fdopen(fds[0], "rb") as received:
        assert received.read() == b"through the descriptor"
