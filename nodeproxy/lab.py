"""A namespace lab that looks like one Kubernetes node: pods behind veths, routed by a node namespace.

    pod0 (10.244.1.10) ──veth npv-c0──┐
    pod1 (10.244.1.11) ──veth npv-c1──┤  node ns: ip_forward, no default route,
    be0  (10.244.1.100)──veth npv-b0──┤  nodeproxy runs here and captures
    be1  (10.244.1.101)──veth npv-b1──┤  TCP arriving on npv+ from 10.244.1.0/24
    be2  (10.244.1.102)──veth npv-b2──┘

Pods are routed Calico-style: a /32 address, a link route to 169.254.1.1 and a default route through it;
every node-side veth answers for 169.254.1.1. Nothing links the lab to the root namespace, so no packet
can leave the machine. Tests build their labs with the same class (a pytest fixture that always tears down).
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from nodeproxy import netns

GATEWAY = "169.254.1.1"
POD_CIDR = "10.244.1.0/24"
POD_INTERFACE_PATTERN = "npv+"
CLIENT_BASE = 10
BACKEND_BASE = 100
# Ports served by nodeproxy.lab_backend in every backend pod.
HTTP_PORT = 8080
ECHO_PORT = 9000
SINK_PORT = 9001
IPERF_PORT = 5201
# The HTTP service of `config_yaml(l7=True)`.
REVIEWS_VIP = "10.96.0.20"


@dataclass(frozen=True)
class Pod:
    ns: str
    ip: str
    node_veth: str


@dataclass
class Lab:
    """Namespaces named `<prefix>-node`, `<prefix>-pod<i>`, `<prefix>-be<i>`."""

    prefix: str = "np"
    clients: int = 2
    backends: int = 3
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def node_ns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def client_pods(self) -> list[Pod]:
        net = ipaddress.ip_network(POD_CIDR)
        return [
            Pod(f"{self.prefix}-pod{i}", str(net[CLIENT_BASE + i]), f"npv-c{i}") for i in range(self.clients)
        ]

    @property
    def backend_pods(self) -> list[Pod]:
        net = ipaddress.ip_network(POD_CIDR)
        return [
            Pod(f"{self.prefix}-be{i}", str(net[BACKEND_BASE + i]), f"npv-b{i}") for i in range(self.backends)
        ]

    @property
    def namespaces(self) -> list[str]:
        return [self.node_ns] + [p.ns for p in self.client_pods + self.backend_pods]

    # -- lifecycle ---------------------------------------------------------------------------------------

    def up(self) -> Lab:
        if not 0 < self.clients <= 80 or not 0 < self.backends <= 100:
            raise ValueError("clients must be 1..80 and backends 1..100")
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        node = self.node_ns
        pods = self.client_pods + self.backend_pods
        # `ip -batch` takes no per-line -n, so: one batch in the root namespace, then one per namespace.
        batches: dict[str | None, list[str]] = {None: [f"netns add {ns}" for ns in self.namespaces]}
        batches[node] = ["link set lo up"]
        for pod in pods:
            batches[None].append(
                f"link add {pod.node_veth} netns {node} type veth peer name eth0 netns {pod.ns}"
            )
            batches[pod.ns] = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {pod.ip}/32 dev eth0",
                f"route add {GATEWAY} dev eth0 scope link",
                f"route add default via {GATEWAY} dev eth0",
            ]
            batches[node] += [
                f"addr add {GATEWAY}/32 dev {pod.node_veth} scope link",
                f"link set {pod.node_veth} up",
                f"route add {pod.ip}/32 dev {pod.node_veth} scope link",
            ]
        for ns, commands in batches.items():
            argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
            proc = subprocess.run(argv, input="\n".join(commands) + "\n", text=True, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"lab setup in netns {ns or 'root'} failed: {proc.stderr.strip()}")
        netns.run(
            node,
            [
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.core.somaxconn=65535",
                "net.ipv4.tcp_max_syn_backlog=65535",
            ],
        )
        for pod in pods:
            netns.run(
                pod.ns,
                ["sysctl", "-qw", "net.core.somaxconn=65535", "net.ipv4.ip_local_port_range=10000 65000"],
            )

    def down(self) -> None:
        """Stop what the lab started and delete its namespaces; safe to call any number of times."""
        for proc in self.processes:
            stop_process(proc)
        self.processes.clear()
        netns.delete(self.namespaces)

    # -- processes ---------------------------------------------------------------------------------------

    def spawn(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside `ns`; the lab stops it on down()."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(netns.exec_argv(ns, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc

    def start_backends(self, timeout: float = 15.0, output: IO[bytes] | None = None) -> None:
        """Start nodeproxy.lab_backend in every backend pod and wait until each one listens.

        `output` receives their stdout and stderr (default: ours); a command that returns while they
        run on must pass a file, or whoever reads its output would wait for them too.
        """
        for pod in self.backend_pods:
            argv = [sys.executable, "-m", "nodeproxy.lab_backend", "--name", pod.ns.rsplit("-", 1)[1]]
            self.spawn(pod.ns, argv, stdout=output, stderr=output, start_new_session=output is not None)
        for pod in self.backend_pods:
            for port in (HTTP_PORT, ECHO_PORT, SINK_PORT):
                wait_listening(self.node_ns, pod.ip, port, timeout)

    def config_yaml(self, outbound_port: int = 15001, extra: str = "", l7: bool = False) -> str:
        """A daemon config for this lab: the services of nodeproxy/default-config.yaml on this lab's pods,
        and with `l7` the HTTP service `reviews` (REVIEWS_VIP) routed per request (see l7_service)."""
        bes = self.backend_pods

        def endpoints(pods: Sequence[Pod]) -> str:
            return "".join(
                f"      - address: {p.ip}\n        node: node-a\n"
                f"        labels: {{version: v{1 + (i == 2)}}}\n"
                for i, p in enumerate(pods)
            )

        return (
            "node:\n  name: node-a\n"
            f'capture:\n  pod_cidrs: [{POD_CIDR}]\n  pod_interfaces: ["{POD_INTERFACE_PATTERN}"]\n'
            f"listeners:\n  outbound: 127.0.0.1:{outbound_port}\n"
            f"{extra}"
            "services:\n"
            "  - name: web\n    vip: 10.96.0.10\n    ports: [{port: 80, target_port: 8080}]\n"
            f"    balancer: p2c\n    endpoints:\n{endpoints(bes)}"
            "  - name: echo\n    vip: 10.96.0.11\n    ports: [{port: 9000}]\n"
            f"    balancer: least_conn\n    endpoints:\n{endpoints(bes)}"
            "  - name: sink\n    vip: 10.96.0.12\n    ports: [{port: 9001}]\n"
            f"    balancer: round_robin\n    endpoints:\n{endpoints(bes)}"
            "  - name: iperf\n    vip: 10.96.0.13\n    ports: [{port: 5201}]\n"
            f"    balancer: round_robin\n    endpoints:\n{endpoints(bes[:1])}"
            + (self.l7_service() if l7 else "")
        )

    def l7_service(self) -> str:
        """`reviews`: an HTTP service whose requests are routed one by one. be0 is prod v1, be1 prod v2,
        be2 staging; `x-env: staging` goes to staging, everything else is a 90/10 canary v1/v2."""
        labels = ("{env: prod, version: v1}", "{env: prod, version: v2}", "{env: staging, version: v2}")
        endpoints = "".join(
            f"      - {{address: {pod.ip}, labels: {label}}}\n"
            for pod, label in zip(self.backend_pods, labels, strict=False)
        )
        return (
            f"  - name: reviews\n    vip: {REVIEWS_VIP}\n"
            f"    ports: [{{port: 80, target_port: {HTTP_PORT}, protocol: http}}]\n"
            f"    endpoints:\n{endpoints}"
            "    subsets:\n"
            "      - {name: v1, labels: {env: prod, version: v1}}\n"
            "      - {name: v2, labels: {env: prod, version: v2}}\n"
            "      - {name: staging, labels: {env: staging}}\n"
            "    routes:\n"
            "      - name: staging\n"
            "        match: [{headers: [{name: x-env, exact: staging}]}]\n"
            "        to: [{subset: staging}]\n"
            "        response_headers: {set: {x-served-by: staging}}\n"
            "      - name: canary\n"
            "        to: [{subset: v1, weight: 90}, {subset: v2, weight: 10}]\n"
        )


def wait_listening(ns: str, host: str, port: int, timeout: float) -> None:
    """Poll until a TCP connect from `ns` to host:port succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with netns.entered(ns):
                sock = socket.create_connection((host, port), timeout=1)
            sock.close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} in netns {ns} not listening after {timeout}s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
