"""nodeproxy.lab_backend's HTTP server on loopback (no namespaces): its default answers, the request
bodies it reads, and each misbehaviour the resilience scenarios rely on (docs/resilience.md, issue 8)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeproxy.lab import stop_process
from nodeproxy.lab_backend import Behaviour, write_behaviour
from nodeproxy.lab_resilience import HttpClient


@dataclass
class Backend:
    port: int
    behaviour: Path
    log: Path
    stderr: Path

    def set(self, behaviour: Behaviour) -> None:
        write_behaviour(self.behaviour, behaviour)

    def entries(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def client(self) -> HttpClient:
        return HttpClient(None, "127.0.0.1", self.port, timeout=2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    found = Backend(free_port(), tmp_path / "b.json", tmp_path / "log.jsonl", tmp_path / "stderr")
    argv = [
        sys.executable,
        "-m",
        "nodeproxy.lab_backend",
        "--name",
        "t",
        "--http-only",
        "--host",
        "127.0.0.1",
    ]
    argv += ["--http-port", str(found.port), "--behaviour-file", str(found.behaviour)]
    argv += ["--request-log", str(found.log)]
    with found.stderr.open("wb") as err:
        proc = subprocess.Popen(argv, stderr=err)
    try:
        wait_listening_here(found.port)
        yield found
    finally:
        stop_process(proc)


def wait_listening_here(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def raw_exchange(port: int, data: bytes, timeout: float = 2) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


def test_default_answer_and_keep_alive(backend: Backend) -> None:
    with backend.client() as client:
        first = client.request()
        second = client.request()
    assert first.status == second.status == 200
    assert first.body.startswith(b"backend=t client=127.0.0.1:") and first.body == second.body
    assert [e["status"] for e in backend.entries()] == [200, 200]


def test_request_bodies_are_read_not_parsed_as_requests(backend: Backend) -> None:
    """A body that contains a blank line is one request, not two (the server used to answer each
    CRLFCRLF it found, so this body earned a second response)."""
    body = b"GET /smuggled HTTP/1.1\r\n\r\n"
    request = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    chunked = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"5;ext=1\r\nhello\r\n3\r\n!!!\r\n0\r\nx-t: 1\r\n\r\n"
    answer = raw_exchange(
        backend.port, request + chunked + b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 3, answer
    entries = backend.entries()
    assert [(e["target"], e["body_bytes"]) for e in entries] == [("/a", len(body)), ("/b", 8), ("/c", 0)]
    digests = [hashlib.sha256(data).hexdigest() for data in (body, b"hello!!!", b"")]
    assert [e["body_sha256"] for e in entries] == digests


def test_status_and_delay_from_the_behaviour_file_take_effect_on_the_next_request(backend: Backend) -> None:
    with backend.client() as client:
        assert client.request().status == 200
        backend.set(Behaviour(status=503, delay_ms=80))
        slow = client.request(headers={"x-tag": "slow"})
        assert slow.status == 503 and slow.elapsed >= 0.08
        backend.set(Behaviour())
        assert client.request().status == 200
    entries = backend.entries()
    assert entries[1]["headers"] == {"x-tag": "slow"} and entries[1]["delay_ms"] == 80


def test_pipelined_requests_with_a_delay_are_answered_in_order(backend: Backend) -> None:
    backend.set(Behaviour(delay_ms=50))
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3))
    began = time.monotonic()
    answer = raw_exchange(
        backend.port, requests + b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 4 and time.monotonic() - began >= 0.2
    assert [e["target"] for e in backend.entries()] == ["/0", "/1", "/2", "/last"]


def test_close_and_reset_after_the_head_and_close_mid_response(backend: Backend) -> None:
    backend.set(Behaviour(action="close-after-head"))
    assert raw_exchange(backend.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    backend.set(Behaviour(action="reset-after-head"))
    with socket.create_connection(("127.0.0.1", backend.port), timeout=2) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            sock.recv(100)
    backend.set(Behaviour(action="close-mid-response"))
    answer = raw_exchange(backend.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    announced = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert head.startswith(b"HTTP/1.1 200") and 0 < len(body) < announced
    assert [e["action"] for e in backend.entries()] == [
        "close-after-head",
        "reset-after-head",
        "close-mid-response",
    ]


def test_hang_never_answers(backend: Backend) -> None:
    backend.set(Behaviour(action="hang"))
    with socket.create_connection(("127.0.0.1", backend.port), timeout=0.3) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            sock.recv(100)


def test_a_bad_behaviour_file_keeps_the_last_good_one_and_says_why(backend: Backend) -> None:
    backend.set(Behaviour(status=502))
    with backend.client() as client:
        assert client.request().status == 502
        backend.behaviour.write_text('{"status": 503, "bogus": 1}')
        assert client.request().status == 502
    assert "unknown behaviour keys: bogus" in backend.stderr.read_text()


@pytest.mark.parametrize(
    "text",
    ['{"status": 99}', '{"delay_ms": -1}', '{"action": "explode"}', '{"status": "503"}', "[]", '{"x": 1}'],
)
def test_behaviour_rejects_bad_values(text: str) -> None:
    with pytest.raises(ValueError):
        Behaviour.parse(text)


def test_behaviour_round_trips_and_empty_is_default() -> None:
    behaviour = Behaviour(status=503, delay_ms=12.5, action="hang")
    assert Behaviour.parse(behaviour.to_json()) == behaviour
    assert Behaviour.parse("  ") == Behaviour() == Behaviour.parse("{}")
