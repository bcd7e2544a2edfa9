"""`nodeproxy demo`: a lab node with pods, the proxy capturing their traffic, and what it does, shown.

Every claim the demo prints is also checked; it exits 1 when any check did not hold (the list of checks
is printed at the end).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from nodeproxy import netns
from nodeproxy.lab import REVIEWS_VIP, Lab, stop_process
from nodeproxy.lab_backend import Behaviour
from nodeproxy.lab_resilience import HttpClient, Response, ScenarioBackends, scenario_service

WEB = ("10.96.0.10", 80)
REVIEWS = (REVIEWS_VIP, 80)
SINK = ("10.96.0.12", 9001)
# The resilience part: an HTTP service whose endpoints are ScenarioBackends (one behaviour file each).
RATINGS = ("10.96.0.21", 80)
RATINGS_REQUESTS = 300
CONSECUTIVE_5XX = 5  # failures in a row that eject an endpoint
EJECTION_SECONDS = 2.0  # base and longest ejection: short, so the demo sees the endpoint come back
RECOVERY_REQUESTS = 30  # after the ejection; p2c over 3 endpoints misses one in all of them with p < 1e-5
SLOW_MS = 1000  # the slow backends' delay
CALLER_TIMEOUT_MS = 200  # x-nodeproxy-timeout-ms of the deadline request
# 504 expected after CALLER_TIMEOUT_MS; the margin covers scheduling on a busy 2-core machine.
DEADLINE_EARLIEST, DEADLINE_LATEST = 0.180, 0.350
# The tracing part: a header echo (served by this process, its socket bound in a backend pod).
TRACED = ("10.96.0.22", 80)
HEADER_ECHO_PORT = 8082
METRICS = ("127.0.0.1", 15020)  # the daemon's metrics listener, inside the node namespace
DEMO_TAG = "x-demo"  # a request header the scenario backends log, to find one request's attempts


def _say(title: str) -> None:
    print(f"\n== {title}", flush=True)


@dataclass
class Checks:
    """What the demo claims, each with whether it held."""

    results: list[tuple[str, bool]] = field(default_factory=list)

    def check(self, claim: str, held: bool) -> bool:
        self.results.append((claim, held))
        return held

    @property
    def all_held(self) -> bool:
        return bool(self.results) and all(held for _, held in self.results)


def _get(ns: str, host: str, port: int) -> str:
    with netns.entered(ns):
        sock = socket.create_connection((host, port), timeout=5)
    with sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1].strip()


def _upload(ns: str, size: int) -> tuple[bool, float]:
    block = hashlib.shake_256(b"demo").digest(1 << 20)
    digest = hashlib.sha256()
    with netns.entered(ns):
        sock = socket.create_connection(SINK, timeout=30)
    started = time.perf_counter()
    with sock:
        for _ in range(size >> 20):
            sock.sendall(block)
            digest.update(block)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile().read().split()
    seconds = time.perf_counter() - started
    return answer == [digest.hexdigest(), str(size)], size * 8 / seconds / 1e9


def _backends_answering(ns: str, count: int, headers: dict[str, str]) -> tuple[Counter[str], set[str]]:
    """`count` requests over one keep-alive connection to the reviews service: who answered each, and
    the x-served-by response headers seen."""
    with netns.entered(ns):
        conn = http.client.HTTPConnection(*REVIEWS, timeout=5)
        conn.connect()
    answered: Counter[str] = Counter()
    served_by: set[str] = set()
    try:
        for _ in range(count):
            conn.request("GET", "/reviews/1", headers=headers)
            response = conn.getresponse()
            body = response.read().decode()
            answered[
                body.split()[0].removeprefix("backend=") if response.status == 200 else str(response.status)
            ] += 1
            served_by.add(response.getheader("x-served-by") or "-")
    finally:
        conn.close()
    return answered, served_by


# -- the config ----------------------------------------------------------------------------------------------


def demo_config(lab: Lab, scenario_addresses: list[str], echo_address: str) -> str:
    """The lab's L7 config, plus `ratings` (retries on 503, outlier detection with short ejections), the
    header-echo service `traced` and the metrics listener spelled out."""
    data: dict[str, Any] = yaml.safe_load(lab.config_yaml(l7=True))
    data["metrics"] = {"address": METRICS[0], "port": METRICS[1]}
    data["services"] += [
        scenario_service(
            "ratings",
            RATINGS[0],
            scenario_addresses,
            resilience={
                "outlier_detection": {
                    "consecutive_5xx": CONSECUTIVE_5XX,
                    "base_ejection_time": f"{EJECTION_SECONDS:g}s",
                    "max_ejection_time": f"{EJECTION_SECONDS:g}s",
                }
            },
            route_resilience={
                "retries": {"max_retries": 2, "retry_on": ["retriable-status-codes", "connect-failure"]}
            },
        ),
        scenario_service("traced", TRACED[0], [echo_address], port=HEADER_ECHO_PORT),
    ]
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text


# -- resilience ----------------------------------------------------------------------------------------------


def _describe(responses: list[Response]) -> str:
    statuses = Counter(r.status for r in responses)
    answered = Counter(r.backend or f"status {r.status}" for r in responses)
    return f"statuses {dict(statuses)}, answered by {dict(sorted(answered.items()))}"


def show_resilience(backends: ScenarioBackends, client_ns: str, checks: Checks) -> tuple[Counter[int], int]:
    """One endpoint answers 503 to everything: retried and ejected, the client sees no failure; restored,
    it serves again once its ejection ends. Then a caller's 200 ms deadline against 1 s backends.

    Returns the statuses the client saw and how many attempts a backend answered 503 (each one retried).
    """
    bad, bad_name = 0, backends.names[0]
    _say(
        f"resilience: service ratings {RATINGS[0]}:{RATINGS[1]} ({', '.join(backends.names)} on"
        f" :{backends.port}); retries on 503, {CONSECUTIVE_5XX} 5xx in a row eject for {EJECTION_SECONDS:g} s"
    )
    # One connection for all of it: ejections are per worker process, and it stays on one.
    with HttpClient(client_ns, *RATINGS) as client:
        backends.set(bad, Behaviour(status=503))
        print(f"  {bad_name} now answers 503 to every request (its behaviour file)")
        began = time.monotonic()
        responses = [client.request(path="/ratings/1") for _ in range(RATINGS_REQUESTS)]
        connection = client.sock
        ended = time.monotonic()
        failed = [r for r in responses if r.status != 200]
        attempts = backends.requests(bad, since=began, until=ended)
        print(
            f"  {RATINGS_REQUESTS} requests from {client_ns} in {ended - began:.2f} s: {len(failed)} failed"
            f" as the client saw them; {_describe(responses)}"
        )
        checks.check(
            f"ratings: 0 of {RATINGS_REQUESTS} requests failed with {bad_name} answering 503", not failed
        )
        enough = checks.check(
            f"ratings: {bad_name} got at least {CONSECUTIVE_5XX} attempts before its ejection",
            len(attempts) >= CONSECUTIVE_5XX,
        )
        if enough:
            ejected_at = float(attempts[CONSECUTIVE_5XX - 1]["t"])
            during = backends.requests(bad, since=ejected_at + 1e-4, until=ejected_at + EJECTION_SECONDS)
            print(
                f"  {bad_name} saw {len(attempts)} attempts (each answered 503 and retried elsewhere);"
                f" in the {EJECTION_SECONDS:g} s after its {CONSECUTIVE_5XX}th (ejected): {len(during)}"
            )
            checks.check(f"ratings: {bad_name} got no attempt while ejected", not during)

        backends.set(bad, Behaviour())
        # The last attempt it saw began its last ejection (each lasts EJECTION_SECONDS at most).
        last = float(attempts[-1]["t"]) if attempts else began
        time.sleep(max(0.0, last + EJECTION_SECONDS + 0.2 - time.monotonic()))
        recovered = [client.request(path="/ratings/1") for _ in range(RECOVERY_REQUESTS)]
        print(
            f"  {bad_name} restored; once its ejection ended, {RECOVERY_REQUESTS} requests:"
            f" {_describe(recovered)}"
        )
        checks.check(
            f"ratings: {bad_name} serves again after its ejection ended (on the same connection, so in"
            " the worker process that ejected it)",
            all(r.status == 200 for r in recovered)
            and any(r.backend == bad_name for r in recovered)
            and client.sock is connection is not None,
        )

        backends.set_all(Behaviour(delay_ms=SLOW_MS))
        tag = secrets.token_hex(4)
        slow = client.request(
            path="/ratings/1", headers={"x-nodeproxy-timeout-ms": str(CALLER_TIMEOUT_MS), DEMO_TAG: tag}
        )
        backends.set_all(Behaviour())
        sent = [
            entry["headers"].get("x-nodeproxy-timeout-ms", "-") for entry in backends.tagged(DEMO_TAG, tag)
        ]
        print(
            f"  every backend now takes {SLOW_MS} ms; a request with 'x-nodeproxy-timeout-ms:"
            f" {CALLER_TIMEOUT_MS}': {slow.status} flags {slow.flags or '-'}"
            f" after {slow.elapsed * 1000:.0f} ms; the backend got x-nodeproxy-timeout-ms"
            f" {', '.join(sent) or '(no attempt)'} (the time left)"
        )
        checks.check(
            f"ratings: x-nodeproxy-timeout-ms {CALLER_TIMEOUT_MS} against {SLOW_MS} ms backends"
            f" -> 504 UT after {DEADLINE_EARLIEST * 1000:.0f}..{DEADLINE_LATEST * 1000:.0f} ms",
            slow.status == 504
            and "UT" in slow.flags.split(",")
            and DEADLINE_EARLIEST <= slow.elapsed <= DEADLINE_LATEST,
        )
        checks.check(
            "ratings: the attempt carried the time left upstream"
            f" (0 < x-nodeproxy-timeout-ms <= {CALLER_TIMEOUT_MS})",
            bool(sent) and all(v.isdigit() and 0 < int(v) <= CALLER_TIMEOUT_MS for v in sent),
        )
    statuses = Counter(r.status for r in [*responses, *recovered, slow])
    answered_503 = sum(
        1
        for index in range(len(backends.names))
        for entry in backends.requests(index)
        if entry["status"] == 503
    )
    return statuses, answered_503


# -- tracing -------------------------------------------------------------------------------------------------


class _HeaderEcho(BaseHTTPRequestHandler):
    """Answers 200 with the request's header fields as a JSON object (lower-case names)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        fields: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            fields[key] = f"{fields[key]}, {value}" if key in fields else value
        body = json.dumps(fields).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the proxy's access log is what the demo shows


@contextmanager
def header_echo(ns: str, address: str, port: int) -> Iterator[None]:
    """A header echo on address:port inside `ns`, served by a thread of this process while the block runs."""
    with netns.entered(ns):  # a socket stays in the namespace it was created in
        server = ThreadingHTTPServer((address, port), _HeaderEcho)
    server.daemon_threads = True
    try:
        thread = threading.Thread(target=server.serve_forever, name="header-echo", daemon=True)
        thread.start()
        try:
            yield
        finally:
            server.shutdown()
            thread.join(5)
    finally:
        server.server_close()


def show_tracing(client_ns: str, log: Path, checks: Checks) -> None:
    """A request with a sampled W3C traceparent: the upstream must get the same trace with the proxy's span
    as parent, and the access log a record carrying the trace id."""
    trace, caller_span = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace}-{caller_span}-01"
    _say(f"tracing: a request to service traced {TRACED[0]}:{TRACED[1]} (a header echo) with a traceparent")
    with netns.entered(client_ns):
        conn = http.client.HTTPConnection(*TRACED, timeout=5)
        conn.connect()
    try:
        conn.request("GET", "/traced", headers={"traceparent": traceparent})
        response = conn.getresponse()
        received: dict[str, str] = json.loads(response.read()) if response.status == 200 else {}
    finally:
        conn.close()
    upstream = received.get("traceparent", "")
    print(f"  sent traceparent      {traceparent}\n  the upstream received {upstream or '(none)'}")
    match = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", upstream)
    checks.check(
        "tracing: the upstream got a child traceparent (same trace id, the proxy's span as parent)",
        match is not None and match[1] == trace and match[2] not in (caller_span, "0" * 16),
    )
    record = _access_record(log, trace)
    print(f"  its access-log line: {json.dumps(record) if record else '(none)'}")
    checks.check(
        "tracing: the access log has the request with its trace id and request id",
        record is not None and record.get("status") == 200 and bool(record.get("request_id")),
    )


def _access_record(log: Path, trace_id: str, timeout: float = 5.0) -> dict[str, Any] | None:
    """The access-log request record with `trace_id` (written when the request ended: poll briefly)."""
    needle = f'"trace_id": "{trace_id}"'
    deadline = time.monotonic() + timeout
    while True:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                record: dict[str, Any] = json.loads(line)
                return record
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


# -- metrics -------------------------------------------------------------------------------------------------


def scrape(ns: str) -> str:
    with netns.entered(ns):
        conn = http.client.HTTPConnection(*METRICS, timeout=10)
        conn.connect()
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read().decode()
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"GET /metrics answered {response.status}")
    return body


def metric_sum(text: str, name: str, by: str, **labels: str) -> dict[str, float]:
    """Sample `name` summed over the series whose labels match `labels`, per value of label `by`."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                key = sample.labels.get(by, "")
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


def show_metrics(
    node_ns: str, expected_codes: Mapping[str, Counter[int]], retries: int, checks: Checks
) -> None:
    """Scrape the daemon and compare its counters with what the demo sent and saw."""
    _say(f"metrics: GET http://{METRICS[0]}:{METRICS[1]}/metrics in {node_ns} (istio_requests_total summed)")
    text = scrape(node_ns)
    for service, expected in expected_codes.items():
        codes = metric_sum(text, "istio_requests_total", "response_code", destination_service=service)
        for code, value in sorted(codes.items()):
            print(
                f'  istio_requests_total{{destination_service="{service}",response_code="{code}"}} {value:g}'
            )
        want = {str(code): float(n) for code, n in expected.items()}
        checks.check(
            f"metrics: istio_requests_total of {service} by response_code = what the client saw"
            f" {dict(sorted(expected.items()))}",
            codes == want,
        )
    for line in text.splitlines():
        if line.startswith(("nodeproxy_retries_total{", "nodeproxy_outlier_ejections_total{")):
            print(f"  {line}")
    retried = metric_sum(text, "nodeproxy_retries_total", "service").get("ratings", 0.0)
    ejections = metric_sum(text, "nodeproxy_outlier_ejections_total", "service").get("ratings", 0.0)
    checks.check(
        f"metrics: nodeproxy_retries_total for ratings = the {retries} attempts the 503 backend answered",
        retries > 0 and retried == retries,
    )
    checks.check("metrics: nodeproxy_outlier_ejections_total for ratings >= 1", ejections >= 1)


# -- the demo ------------------------------------------------------------------------------------------------


def run_demo(requests: int = 6) -> int:
    started = time.monotonic()
    lab = Lab(prefix="npdemo", clients=2, backends=3)  # not "np": that is `nodeproxy lab up`'s
    work = Path(tempfile.mkdtemp(prefix="nodeproxy-demo-"))
    config, ready, log = work / "config.yaml", work / "ready", work / "daemon.log"
    backends = ScenarioBackends(lab, work / "ratings")
    checks = Checks()
    try:
        _say(
            f"building the lab: node {lab.node_ns}, pods and backends {', '.join(lab.namespaces[1:])}"
            "; no outside route"
        )
        lab.up()
        lab.start_backends()
        backends.start()
        echo_pod = lab.backend_pods[1]
        config.write_text(demo_config(lab, backends.addresses, echo_pod.ip))
        print(f"config: {config}")
        with log.open("wb") as out:
            proxy = lab.spawn(
                lab.node_ns,
                [
                    sys.executable,
                    "-m",
                    "nodeproxy",
                    "run",
                    "--config",
                    str(config),
                    "--ready-file",
                    str(ready),
                ],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proxy.poll() is not None or time.monotonic() > deadline:
                print(log.read_text())
                raise RuntimeError("the daemon did not become ready")
            time.sleep(0.05)

        _say(f"capture rules the daemon installed in {lab.node_ns} (iptables mangle + policy routing)")
        print(
            netns.run(
                lab.node_ns, [sys.executable, "-m", "nodeproxy", "capture", "show", "--config", str(config)]
            )
        )

        client = lab.client_pods[0]
        _say(f"{requests} requests from {client.ns} ({client.ip}) to service web {WEB[0]}:{WEB[1]}")
        answers = [_get(client.ns, *WEB) for _ in range(requests)]
        for answer in answers:
            print(f"  {answer}")
        print(
            f"  balanced over: {dict(Counter(a.split()[0] for a in answers))}; "
            "each backend saw the pod's own address as the client"
        )
        checks.check(
            f"web: {requests} answers, each backend saw {client.ip} as the client",
            len(answers) == requests and all(f" client={client.ip}:" in a for a in answers),
        )

        target = lab.backend_pods[2]
        _say(
            f"a connection that is no service ({lab.client_pods[1].ns} -> {target.ip}:8080)"
            " goes to its original destination"
        )
        passthrough = _get(lab.client_pods[1].ns, target.ip, 8080)
        print(f"  {passthrough}")
        checks.check(
            "passthrough: the original destination answered",
            passthrough.startswith(f"backend={target.ns.rsplit('-', 1)[1]} client={lab.client_pods[1].ip}:"),
        )

        be = [pod.ns.rsplit("-", 1)[1] for pod in lab.backend_pods]
        _say(
            f"L7: service reviews {REVIEWS[0]}:{REVIEWS[1]} is HTTP; every request is routed on its own"
            f" ({be[0]}: prod v1, {be[1]}: prod v2, {be[2]}: staging)"
        )
        staged, served_by = _backends_answering(client.ns, 20, {"x-env": "staging"})
        print(
            f"  20 requests with 'x-env: staging' on one connection: {dict(staged)}; x-served-by: {served_by}"
        )
        canary, _ = _backends_answering(client.ns, 1000, {})
        share = {name: f"{100 * n / 1000:.1f}%" for name, n in sorted(canary.items())}
        print(f"  1000 requests without it (the 90/10 canary v1/v2): {share}")
        checks.check(
            "reviews: 20 of 20 'x-env: staging' requests went to staging", staged == Counter({be[2]: 20})
        )
        checks.check(
            "reviews: the canary split 1000 requests 90/10 (+-4.5 points) between v1 and v2",
            abs(canary[be[0]] - 900) <= 45 and canary[be[1]] > 0 and canary[be[0]] + canary[be[1]] == 1000,
        )

        _say("256 MiB upload to service sink; the backend returns the sha256 it received")
        ok, gbps = _upload(lab.client_pods[1].ns, 256 << 20)
        print(f"  sha256 matches: {ok}; {gbps:.1f} Gb/s through the proxy (Python client)")
        checks.check("sink: the sha256 of 256 MiB matches", ok)

        ratings_codes, answered_503 = show_resilience(backends, client.ns, checks)
        with header_echo(echo_pod.ns, echo_pod.ip, HEADER_ECHO_PORT):
            show_tracing(client.ns, log, checks)
        show_metrics(
            lab.node_ns,
            {"reviews": Counter({200: 1020}), "ratings": ratings_codes, "traced": Counter({200: 1})},
            answered_503,
            checks,
        )

        _say("SIGTERM: the daemon drains, removes its rules and exits")
        code = stop_process(proxy)
        left = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"]).count("NODEPROXY")
        print(f"  exit code {code}; NODEPROXY rules left: {left}")
        checks.check("the daemon exited 0 on SIGTERM and left no NODEPROXY rule", code == 0 and left == 0)
    finally:
        backends.close()
        lab.down()
        print("\nlab removed")
    _say(f"checks ({time.monotonic() - started:.1f} s)")
    for claim, held in checks.results:
        print(f"  {'ok  ' if held else 'FAIL'} {claim}")
    return 0 if checks.all_held else 1
