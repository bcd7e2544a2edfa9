"""The resilience layers as the HTTP engine's Python side calls them, on loopback.

HttpProxy and its native engine in this process, real backends on 127.0.0.1 / 127.0.0.2 (the same
port, so one service port reaches both) that answer as each test says. The namespace-lab scenarios
of issue 8 (ejection shares, peak-EWMA, budgets under load) are in test_resilience_lab.py; these
check each decision of nodeproxy/proxy/http.py on its own: retry on another endpoint, replay of the
body, the held response given back when retries run out, deadlines, 429 / 503 UO / fault aborts.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nodeproxy.authz.config import AuthzConfig
from nodeproxy.authz.engine import AuthzEngine, compile_authz
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.policy import Workload
from tests.test_l7_loopback import VIP, LoopbackProxy

GOOD, BAD = "127.0.0.1", "127.0.0.2"


@dataclass
class Seen:
    """What a backend received."""

    address: str
    method: str
    path: str
    headers: dict[str, str]
    body_sha: str
    at: float


@dataclass
class Backends:
    """One HTTP server per loopback address on a shared port; `status` / `delay` per address."""

    port: int = 0
    status: dict[str, int] = field(default_factory=dict)
    delay: dict[str, float] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    servers: list[http.server.ThreadingHTTPServer] = field(default_factory=list)

    def start(self, addresses: tuple[str, ...]) -> None:
        backends = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                address = str(self.connection.getsockname()[0])
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                backends.seen.append(
                    Seen(
                        str(address),
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        hashlib.sha256(body).hexdigest(),
                        time.monotonic(),
                    )
                )
                time.sleep(backends.delay.get(str(address), 0.0))
                status = backends.status.get(str(address), 200)
                payload = f"{address} {status}\n".encode()
                self.send_response(status)
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = _serve

        for address in addresses:
            server = http.server.ThreadingHTTPServer((address, self.port), Handler)
            server.daemon_threads = True
            self.port = server.server_address[1]
            self.servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()

    def hits(self, address: str) -> int:
        return sum(1 for s in self.seen if s.address == address)

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


class Proxy(LoopbackProxy):
    """HttpProxy on its own loop thread behind a loopback listener standing for VIP:80, with the
    service's `resilience` (and one route's) from the test."""

    def __init__(
        self, backends: Backends, resilience: str = "", route: str = "", authz: AuthzEngine | None = None
    ) -> None:
        extra = f"    resilience: {resilience}\n" if resilience else ""
        if route:
            extra += f"    routes:\n      - name: api\n        resilience: {route}\n"
        super().__init__([BAD, GOOD], backends.port, service_extra=extra, authz=authz)

    def request(
        self, path: str = "/", method: str = "GET", headers: dict[str, str] | None = None, body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes, float]:
        """One request on a new connection: status, headers (lower-case), body, seconds taken."""
        lines = [f"{method} {path} HTTP/1.1", f"host: {VIP}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if body or method == "POST":
            lines.append(f"content-length: {len(body)}")
        started = time.monotonic()
        with socket.create_connection(self.listener.getsockname(), timeout=10) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        took = time.monotonic() - started
        head, _, rest = data.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parsed = {k.strip().lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        return int(status_line.split()[1]), parsed, rest, took


@pytest.fixture()
def backends() -> Iterator[Backends]:
    running = Backends()
    running.start((GOOD, BAD))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture()
def make_proxy(backends: Backends) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(resilience: str = "", route: str = "", authz: AuthzEngine | None = None) -> Proxy:
        made.append(Proxy(backends, resilience, route, authz))
        return made[-1]

    try:
        yield make
    finally:
        for proxy in made:
            proxy.close()


def test_a_503_is_retried_on_the_other_endpoint(backends: Backends, make_proxy: Callable[..., Proxy]) -> None:
    backends.status[BAD] = 503
    proxy = make_proxy(
        resilience="{outlier_detection: {consecutive_5xx: 0, consecutive_gateway_failures: 0}}"
    )
    results = [proxy.request(f"/{i}") for i in range(20)]
    assert [status for status, *_ in results] == [200] * 20
    assert all(body == f"{GOOD} 200\n".encode() for _, _, body, _ in results)
    assert backends.hits(BAD) >= 5  # round robin sent about half the first attempts there
    assert proxy.proxy.stats.retries == backends.hits(BAD)


def test_the_request_body_is_replayed_on_the_retry(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.status[BAD] = 503
    proxy = make_proxy()
    body = bytes(range(256)) * 40  # 10 KiB, under the 64 KiB replay limit
    for _ in range(4):
        status, _, _, _ = proxy.request("/upload", "POST", body=body)
        assert status == 200
    digests = {s.body_sha for s in backends.seen}
    assert digests == {hashlib.sha256(body).hexdigest()}
    assert backends.hits(BAD) >= 1


def test_a_body_over_the_replay_limit_is_not_retried(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.status[BAD] = 503
    proxy = make_proxy(route="{retries: {max_replay_body: 1024}}")
    statuses = [proxy.request("/upload", "POST", body=b"x" * 4096)[0] for _ in range(4)]
    assert sorted(statuses) == [200, 200, 503, 503]  # round robin: every other one met the 503
    assert proxy.proxy.stats.retries == 0


def test_when_retries_run_out_the_client_gets_the_upstream_response(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.status[BAD] = backends.status[GOOD] = 503
    proxy = make_proxy(route="{retries: {max_retries: 1}}")
    status, headers, body, _ = proxy.request("/")
    # The held 503 is forwarded as the upstream sent it: not a local reply.
    assert status == 503 and body in (f"{GOOD} 503\n".encode(), f"{BAD} 503\n".encode())
    assert "x-nodeproxy-flags" not in headers
    assert len(backends.seen) == 2 and {s.address for s in backends.seen} == {GOOD, BAD}


def test_a_caller_deadline_answers_504_in_time_and_is_propagated(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.delay[GOOD] = backends.delay[BAD] = 1.0
    proxy = make_proxy()
    status, headers, _, took = proxy.request("/", headers={"x-nodeproxy-timeout-ms": "200"})
    assert status == 504 and headers.get("x-nodeproxy-flags") == "UT"
    assert 0.15 <= took <= 0.35, took
    assert len(backends.seen) == 1  # no attempt after the deadline
    assert 100 <= int(backends.seen[0].headers["x-nodeproxy-timeout-ms"]) <= 200


def test_the_route_timeout_applies_without_a_caller_deadline(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.delay[GOOD] = backends.delay[BAD] = 1.0
    proxy = make_proxy(route="{timeout: 300ms}")
    status, headers, _, took = proxy.request("/")
    assert status == 504 and headers.get("x-nodeproxy-flags") == "UT"
    assert 0.25 <= took <= 0.5, took


def test_rate_limit_answers_429_with_retry_after(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(resilience="{rate_limit: {requests_per_second: 1, burst: 2}}")
    statuses = []
    for _ in range(4):
        status, headers, _, _ = proxy.request("/")
        statuses.append(status)
        if status == 429:
            assert headers.get("x-nodeproxy-flags") == "RL" and int(headers["retry-after"]) >= 1
    assert statuses == [200, 200, 429, 429]


def test_circuit_breaker_overflow_answers_503_uo_at_once(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    backends.delay[GOOD] = backends.delay[BAD] = 0.5
    proxy = make_proxy(resilience="{circuit_breakers: {max_requests: 1}}")
    slow = threading.Thread(target=proxy.request, args=("/slow",))
    slow.start()
    try:
        deadline = time.monotonic() + 2
        while not backends.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, _, took = proxy.request("/")
        assert status == 503 and headers.get("x-nodeproxy-flags") == "UO"
        assert took < 0.1, took
    finally:
        slow.join(5)


def test_fault_abort_only_for_requests_with_the_header(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(
        route="{fault: {abort: {status: 418, percent: 100}, headers: [{name: x-chaos, exact: 'on'}]}}"
    )
    status, headers, _, _ = proxy.request("/", headers={"x-chaos": "on"})
    assert status == 418 and headers.get("x-nodeproxy-flags") == "FI"
    assert proxy.request("/")[0] == 200


def test_fault_delay_holds_the_request(backends: Backends, make_proxy: Callable[..., Proxy]) -> None:
    proxy = make_proxy(route="{fault: {delay: {duration: 200ms, percent: 100}}}")
    status, _, _, took = proxy.request("/")
    assert status == 200 and 0.18 <= took <= 0.6, took


def test_consecutive_503s_eject_the_endpoint(backends: Backends, make_proxy: Callable[..., Proxy]) -> None:
    backends.status[BAD] = 503
    proxy = make_proxy(
        resilience="{outlier_detection: {consecutive_5xx: 3, max_ejection_percent: 50,"
        " base_ejection_time: 30s}}",
        route="{retries: {max_retries: 0}}",
    )
    for _ in range(12):
        proxy.request("/")
    assert proxy.proxy.stats.ejections == 1
    before = backends.hits(BAD)
    statuses = [proxy.request("/")[0] for _ in range(10)]
    assert statuses == [200] * 10 and backends.hits(BAD) == before


# -- authorization and JWT, applied per request against the workload the request goes to -----------

ISSUER = "https://idp.example"


def authz_engine(config: dict[str, Any]) -> AuthzEngine:
    workloads = {
        GOOD: Workload.of("shop", "web", {"app": "web"}),
        BAD: Workload.of("shop", "web", {"app": "web"}),
    }
    return compile_authz(AuthzConfig.model_validate(config), JwksRefresher(), workloads)


def test_a_deny_policy_answers_403_and_the_request_never_leaves(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    policy = {
        "authorization_policies": [
            {
                "name": "no-admin",
                "namespace": "shop",
                "action": "DENY",
                "rules": [{"to": [{"paths": ["/admin*"]}]}],
            }
        ]
    }
    proxy = make_proxy(authz=authz_engine(policy))
    status, headers, _, _ = proxy.request("/admin/users")
    assert status == 403 and headers.get("x-nodeproxy-flags") == "RBAC"
    assert proxy.request("//admin")[0] == 403, "the path is normalized before matching"
    assert backends.seen == []
    assert proxy.request("/public")[0] == 200


def test_jwt_required_401_without_a_token_and_claims_forwarded_with_one(
    backends: Backends, make_proxy: Callable[..., Proxy]
) -> None:
    from joserfc import jwk, jws

    key = jwk.ECKey.generate_key("P-256", parameters={"kid": "k1"})
    config = {
        "request_authentication": [
            {
                "name": "idp",
                "namespace": "shop",
                "require_token": True,
                "jwt_rules": [
                    {
                        "issuer": ISSUER,
                        "audiences": ["shop"],
                        "jwks": json.dumps({"keys": [key.as_dict(private=False)]}),
                        "output_claim_to_headers": [{"header": "x-user", "claim": "sub"}],
                    }
                ],
            }
        ]
    }
    proxy = make_proxy(authz=authz_engine(config))
    status, headers, _, _ = proxy.request("/")
    assert status == 401 and headers.get("www-authenticate", "").startswith("Bearer")
    claims = {"iss": ISSUER, "sub": "alice", "aud": "shop", "exp": int(time.time()) + 300}
    token = jws.serialize_compact(
        {"alg": "ES256", "kid": "k1"}, json.dumps(claims), key, algorithms=["ES256"]
    )
    status, _, _, _ = proxy.request("/", headers={"authorization": f"Bearer {token}", "x-user": "mallory"})
    assert status == 200
    assert backends.seen[-1].headers.get("x-user") == "alice", "the claim replaces what the client sent"
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert proxy.request("/", headers={"authorization": f"Bearer {forged}"})[0] == 401
    assert len(backends.seen) == 1
