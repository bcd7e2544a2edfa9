"""The resilience scenarios' lab pieces: misbehaving backends, per-scenario services, an HTTP client.

Shared by tests/test_resilience_lab.py and bench/scenario.py (docs/resilience.md, issue 8):

- :class:`ScenarioBackends`: a `nodeproxy.lab_backend` on SCENARIO_PORT in every backend pod of a lab,
  each with its own behaviour file (so a test turns one endpoint bad, slow or dying, and good again,
  while the proxy runs) and its own request log (so a test counts the attempts every endpoint saw, and
  when, in CLOCK_MONOTONIC seconds like ``time.monotonic()``);
- :func:`scenario_service` and :func:`scenario_config`: a daemon config whose HTTP services all point
  at those backends, each with its own `resilience` blocks;
- :class:`HttpClient` and :func:`run_load`: bounded HTTP/1.1 keep-alive load from inside a pod's
  network namespace, recording each request's status, response flags, retry-after, the backend that
  answered and how long it took.

Everything here is bounded: every request has a socket timeout, every load a request count and a time
limit.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from nodeproxy import netns
from nodeproxy.lab import POD_CIDR, POD_INTERFACE_PATTERN, Lab, wait_listening
from nodeproxy.lab_backend import Behaviour, write_behaviour

# The scenario backends' HTTP port (the lab's own backends keep HTTP_PORT).
SCENARIO_PORT = 8090
# Longest a single request may take before the client gives up on it (seconds).
REQUEST_TIMEOUT = 5.0
MAX_RESPONSE_HEAD = 65536


def backend_name(pod_ns: str) -> str:
    """`npt1234-be0` -> `be0`: the name a lab backend puts in its answers."""
    return pod_ns.rsplit("-", 1)[1]


class ScenarioBackends:
    """`nodeproxy.lab_backend --http-only` on SCENARIO_PORT in every backend pod of `lab`."""

    def __init__(self, lab: Lab, workdir: Path, port: int = SCENARIO_PORT) -> None:
        self.lab = lab
        self.workdir = workdir
        self.port = port
        self.pods = lab.backend_pods
        self.names = [backend_name(pod.ns) for pod in self.pods]
        self.behaviour_files = [workdir / f"{name}.behaviour.json" for name in self.names]
        self.logs = [workdir / f"{name}.requests.jsonl" for name in self.names]
        self.output: IO[bytes] | None = None

    @property
    def addresses(self) -> list[str]:
        return [pod.ip for pod in self.pods]

    def start(self, timeout: float = 15.0) -> None:
        """Start the backends (the lab stops them on down()) and wait until each one listens."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output = (self.workdir / "backends.out").open("ab")
        for pod, name, behaviour, log in zip(
            self.pods, self.names, self.behaviour_files, self.logs, strict=True
        ):
            write_behaviour(behaviour, Behaviour())
            argv = [sys.executable, "-m", "nodeproxy.lab_backend", "--name", name, "--http-only"]
            argv += [
                "--http-port",
                str(self.port),
                "--behaviour-file",
                str(behaviour),
                "--request-log",
                str(log),
            ]
            self.lab.spawn(pod.ns, argv, stdout=self.output, stderr=subprocess.STDOUT)
        for pod in self.pods:
            wait_listening(self.lab.node_ns, pod.ip, self.port, timeout)

    def close(self) -> None:
        if self.output is not None:
            self.output.close()
            self.output = None

    def set(self, index: int, behaviour: Behaviour) -> None:
        write_behaviour(self.behaviour_files[index], behaviour)

    def set_all(self, behaviour: Behaviour | None = None) -> None:
        """Every backend to `behaviour` (default: answer 200 at once)."""
        behaviour = behaviour or Behaviour()
        for index in range(len(self.pods)):
            self.set(index, behaviour)

    def requests(self, index: int, since: float = -math.inf, until: float = math.inf) -> list[dict[str, Any]]:
        """The request log entries of backend `index` whose arrival time is in [since, until)."""
        try:
            lines = self.logs[index].read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            if not line.strip():
                continue
            entry: dict[str, Any] = json.loads(line)
            if since <= entry["t"] < until:
                entries.append(entry)
        return entries

    def hits(self, since: float = -math.inf, until: float = math.inf) -> Counter[str]:
        """Requests each backend saw in [since, until), by backend name (every name present)."""
        return Counter({name: len(self.requests(i, since, until)) for i, name in enumerate(self.names)})

    def tagged(self, tag_header: str, tag: str) -> list[dict[str, Any]]:
        """Every backend's log entries whose `tag_header` is `tag`, in arrival order."""
        found = [
            entry
            for index in range(len(self.pods))
            for entry in self.requests(index)
            if entry["headers"].get(tag_header) == tag
        ]
        return sorted(found, key=lambda entry: float(entry["t"]))


def scenario_service(
    name: str,
    vip: str,
    addresses: Sequence[str],
    *,
    port: int = SCENARIO_PORT,
    balancer: str = "p2c",
    resilience: Mapping[str, Any] | None = None,
    route_resilience: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One HTTP service on `vip`:80 with the given endpoints and one catch-all route `all`."""
    route: dict[str, Any] = {"name": "all"}
    if route_resilience is not None:
        route["resilience"] = dict(route_resilience)
    service: dict[str, Any] = {
        "name": name,
        "vip": vip,
        "ports": [{"port": 80, "target_port": port, "protocol": "http"}],
        "balancer": balancer,
        "endpoints": [{"address": address, "node": "node-a"} for address in addresses],
        "routes": [route],
    }
    if resilience is not None:
        service["resilience"] = dict(resilience)
    return service


def scenario_config(
    services: Iterable[Mapping[str, Any]], threads: int = 1, outbound_port: int = 15001
) -> str:
    """A daemon config for a lab with `services`.

    One worker by default: circuit breakers, budgets, ejections and rate limits are per proxy process
    (docs/resilience.md), so with one worker a scenario's counts are the whole proxy's.
    """
    data = {
        "node": {"name": "node-a"},
        "capture": {"pod_cidrs": [POD_CIDR], "pod_interfaces": [POD_INTERFACE_PATTERN]},
        "listeners": {"outbound": f"127.0.0.1:{outbound_port}"},
        "relay": {"threads": threads},
        "services": [dict(service) for service in services],
    }
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text


# -- client --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    body: bytes
    started: float  # time.monotonic() when the request was sent
    elapsed: float  # seconds from sending the request to the end of the response

    @property
    def flags(self) -> str:
        return self.headers.get("x-nodeproxy-flags", "")

    @property
    def backend(self) -> str | None:
        """The backend that answered (`backend=<name>` at the start of a lab backend's body)."""
        if self.body.startswith(b"backend="):
            return self.body[8:].split(b" ", 1)[0].decode()
        return None


class HttpClient:
    """HTTP/1.1 over one keep-alive connection from inside `ns` (None: the caller's own namespace),
    reconnecting when the server closes.

    Deliberately small (no pipelining): a request is written whole, then its response read whole
    (Content-Length, chunked, or to EOF), so the time measured is one request's.
    """

    def __init__(self, ns: str | None, host: str, port: int = 80, timeout: float = REQUEST_TIMEOUT) -> None:
        self.ns = ns
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = b""

    def connect(self) -> None:
        if self.sock is None:
            with netns.entered(self.ns) if self.ns is not None else contextlib.nullcontext():
                sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock, self.buffer = sock, b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock, self.buffer = None, b""

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def send(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> float:
        """Write a request (connecting first if needed); returns when it was sent (time.monotonic())."""
        self.connect()
        assert self.sock is not None
        started = time.monotonic()
        self.sock.sendall(self.encode(method, path, headers or {}, body))
        return started

    def receive(self, started: float, method: str = "GET") -> Response:
        """Read one whole response; closes the connection when the response or the server says so."""
        assert self.sock is not None
        try:
            while (end := self.buffer.find(b"\r\n\r\n")) < 0:
                if len(self.buffer) > MAX_RESPONSE_HEAD:
                    raise ConnectionError("response head too long")
                self._fill()
            head, self.buffer = self.buffer[:end].decode("latin-1"), self.buffer[end + 4 :]
            status_line, *lines = head.split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers: dict[str, str] = {}
            for line in lines:
                name, _, value = line.partition(":")
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            body = self._body(headers, status, method)
        except BaseException:
            self.close()
            raise
        if "close" in headers.get("connection", "").lower():
            self.close()
        return Response(status, headers, body, started, time.monotonic() - started)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        return self.receive(self.send(method, path, headers, body), method)

    def _fill(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the end of the response")
        self.buffer += chunk

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._fill()
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _body(self, headers: Mapping[str, str], status: int, method: str) -> bytes:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = b""
            while True:
                while (end := self.buffer.find(b"\r\n")) < 0:
                    self._fill()
                size = int(self.buffer[:end].split(b";", 1)[0], 16)
                self.buffer = self.buffer[end + 2 :]
                if size == 0:
                    while (end := self.buffer.find(b"\r\n")) != 0:  # trailer fields, then an empty line
                        if end < 0:
                            self._fill()
                        else:
                            self.buffer = self.buffer[end + 2 :]
                    self.buffer = self.buffer[2:]
                    return body
                body += self._take(size + 2)[:-2]
        if "content-length" in headers:
            return self._take(int(headers["content-length"]))
        while True:  # delimited by the end of the connection
            try:
                self._fill()
            except ConnectionError:
                body, self.buffer = self.buffer, b""
                self.close()
                return body


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request of a load: its response, or the error that ended it."""

    index: int
    started: float
    elapsed: float
    status: int = 0  # 0: no response (see error)
    flags: str = ""
    retry_after: str | None = None
    backend: str | None = None
    error: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    began: float = 0.0
    ended: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.began

    def statuses(self) -> Counter[int]:
        return Counter(o.status for o in self.outcomes)

    def backends(self) -> Counter[str]:
        return Counter(o.backend or f"status {o.status}" for o in self.outcomes)

    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != 200]


def run_load(
    ns: str,
    host: str,
    count: int,
    *,
    concurrency: int = 1,
    rate: float | None = None,
    max_seconds: float = 30.0,
    path: str = "/",
    headers: Callable[[int], Mapping[str, str]] | None = None,
    port: int = 80,
) -> Load:
    """`count` GETs over `concurrency` keep-alive connections from `ns`, at most `rate` per second in all
    (None: as fast as they complete), stopping early after `max_seconds`; every outcome recorded."""
    if count < 0 or concurrency < 1 or (rate is not None and rate <= 0):
        raise ValueError(f"bad load: count {count}, concurrency {concurrency}, rate {rate}")
    load = Load()
    lock = threading.Lock()
    next_index = 0
    load.began = time.monotonic()
    stop_at = load.began + max_seconds

    def claim() -> int | None:
        nonlocal next_index
        with lock:
            if next_index >= count or time.monotonic() >= stop_at:
                return None
            next_index += 1
            return next_index - 1

    def worker() -> None:
        with HttpClient(ns, host, port) as client:
            while (index := claim()) is not None:
                if rate is not None:
                    wait = load.began + index / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                started = time.monotonic()
                try:
                    response = client.request(path=path, headers=headers(index) if headers else None)
                except (OSError, ValueError, IndexError) as err:
                    outcome = Outcome(
                        index, started, time.monotonic() - started, error=f"{type(err).__name__}: {err}"
                    )
                else:
                    outcome = Outcome(
                        index,
                        response.started,
                        response.elapsed,
                        response.status,
                        response.flags,
                        response.headers.get("retry-after"),
                        response.backend,
                    )
                with lock:
                    load.outcomes.append(outcome)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max_seconds + REQUEST_TIMEOUT + 5)
    load.ended = time.monotonic()
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(
            f"load on {host}:{port} did not finish within {max_seconds + REQUEST_TIMEOUT + 5:g} s"
        )
    load.outcomes.sort(key=lambda o: o.index)
    return load


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of `values` (pct in 0..100); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
