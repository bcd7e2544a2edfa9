"""HTTP/2 and gRPC through the HTTP engine in a namespace lab, as the daemon runs it: TPROXY capture in
the node namespace, pods dialling service VIPs, the engine connecting upstream from the client pod's own
address. Backend pods run the h2c test backend (tests/l7_h2_backend.py) and the grpcio echo server
(tests/test_grpc_l7.py); clients are curl, h2load and grpcio inside the client pod."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.config import HttpConfig
from nodeproxy.lab import POD_CIDR, Lab, wait_listening
from tests.conftest import running_lab
from tests.test_l7 import Engine

pytestmark = pytest.mark.netns

H2_PORT = 8082
GRPC_PORT = 50051
H2_VIP = "10.96.0.40"
GRPC_VIP = "10.96.0.41"
ROOT = Path(__file__).resolve().parent.parent


def h2_lab_config(lab: Lab) -> str:
    endpoints = "".join(f"      - {{address: {p.ip}}}\n" for p in lab.backend_pods)
    # p2c: the tests count the servers reached; peak_ewma (the default) keeps sequential requests on
    # the fastest (docs/resilience.md)
    balanced = "    balancer: p2c\n    endpoints:\n" + endpoints
    return (
        "node:\n  name: node-a\n"
        f'capture:\n  pod_cidrs: [{POD_CIDR}]\n  pod_interfaces: ["npv+"]\n'
        "listeners:\n  outbound: 127.0.0.1:15001\n"
        "services:\n"
        f"  - name: h2web\n    vip: {H2_VIP}\n"
        f"    ports: [{{port: 80, target_port: {H2_PORT}, protocol: http2}}]\n{balanced}"
        f"  - name: rpc\n    vip: {GRPC_VIP}\n"
        f"    ports: [{{port: 80, target_port: {GRPC_PORT}, protocol: grpc}}]\n{balanced}"
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    pytest.importorskip("grpc")
    with running_lab(clients=1, backends=2) as lab:
        for pod in lab.backend_pods:
            name = pod.ns.rsplit("-", 1)[1]
            lab.spawn(pod.ns, [sys.executable, "-m", "tests.l7_h2_backend", str(H2_PORT), name], cwd=ROOT)
            lab.spawn(pod.ns, [sys.executable, "-m", "tests.test_grpc_l7", str(GRPC_PORT), name], cwd=ROOT)
        for pod in lab.backend_pods:
            for port in (H2_PORT, GRPC_PORT):
                wait_listening(lab.node_ns, pod.ip, port, 20)
        yield lab


@pytest.fixture(scope="module")
def engine(lab: Lab) -> Iterator[Engine]:
    running = Engine(lab, HttpConfig(), capture=True, config_text=h2_lab_config(lab))
    try:
        yield running
    finally:
        running.close()


def in_pod(lab: Lab, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        netns.exec_argv(lab.client_pods[0].ns, argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_curl_h2c_and_http1_to_an_http2_service_from_the_pods_address(lab: Lab, engine: Engine) -> None:
    pod_ip = lab.client_pods[0].ip
    urls = [f"http://{H2_VIP}/r{i}" for i in range(12)]
    # One HTTP/2 connection, twelve streams (nghttp multiplexes the URIs of one authority; curl 7.88
    # cannot reuse a prior-knowledge connection): each balanced on its own, so both backends answer.
    got = in_pod(lab, ["nghttp", "-t", "20", *urls])
    assert got.returncode == 0, got.stderr
    got.stdout = got.stdout.replace("h2backend", "\nh2backend")
    assert len(re.findall("h2backend", got.stdout)) == 12
    answers = re.findall(r"path=/r(\d+) name=(\S+) peer=([\d.]+):\d+", got.stdout)
    assert sorted(int(a[0]) for a in answers) == list(range(12)), got.stdout
    assert {a[1] for a in answers} == {p.ns.rsplit("-", 1)[1] for p in lab.backend_pods}
    assert {a[2] for a in answers} == {pod_ip}  # transparent: the backend sees the pod, not the node
    got = in_pod(lab, ["curl", "-sS", "--http2-prior-knowledge", "--max-time", "20", f"http://{H2_VIP}/curl"])
    assert got.returncode == 0 and f"peer={pod_ip}:" in got.stdout, (got.stdout, got.stderr)
    # HTTP/1.1 from the pod, HTTP/2 to the backend.
    got = in_pod(lab, ["curl", "-sS", "--http1.1", "--max-time", "20", f"http://{H2_VIP}/h1"])
    assert got.returncode == 0 and f"peer={pod_ip}:" in got.stdout, (got.stdout, got.stderr)


def test_h2load_from_the_pod(lab: Lab, engine: Engine) -> None:
    got = in_pod(lab, ["h2load", "-n", "4000", "-c", "16", "-m", "10", f"http://{H2_VIP}/load"])
    assert "4000 succeeded, 0 failed, 0 errored" in got.stdout, got.stdout + got.stderr
    assert "status codes: 4000 2xx" in got.stdout


GRPC_CLIENT = textwrap.dedent(
    """
    import sys, grpc
    chan = grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)])
    unary = chan.unary_unary("/test.Echo/Unary")
    servers = set()
    for i in range(20):
        response, call = unary.with_call(b"ping%d" % i, timeout=10)
        assert response == (b"ping%d" % i)[::-1], response
        meta = dict(call.trailing_metadata())
        servers.add(meta["x-server"])
        print("peer", meta["x-peer"])
    spray = list(chan.unary_stream("/test.Echo/Spray")(b"500", timeout=20))
    assert len(spray) == 500
    chat = list(chan.stream_stream("/test.Echo/Chat")(iter([b"a", b"b", b"c"]), timeout=10))
    assert chat == [b"echo:a", b"echo:b", b"echo:c"], chat
    collected = chan.stream_unary("/test.Echo/Collect")(iter([b"x", b"y"]), timeout=10)
    assert collected == b"x|y", collected
    try:
        chan.unary_unary("/test.Echo/Fail")(b"z", timeout=10)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND and error.details() == "no such thing: z"
    print("servers", len(servers))
    """
)


def test_grpcio_client_in_the_pod_to_grpc_service(lab: Lab, engine: Engine) -> None:
    got = in_pod(lab, [sys.executable, "-c", GRPC_CLIENT, f"{GRPC_VIP}:80"])
    assert got.returncode == 0, got.stdout + got.stderr
    assert "servers 2" in got.stdout  # per-request balancing over one client channel
    peers = set(re.findall(r"peer ipv4:([\d.]+):\d+", got.stdout))
    assert peers == {lab.client_pods[0].ip}, got.stdout
