"""A two-node namespace lab: two node namespaces joined by an underlay link, pods behind each.

    a0 (10.244.1.10) ─veth npv-p0─┐                                  ┌─veth npv-p0─ b0 (10.244.2.10)
    a1 (10.244.1.11) ─veth npv-p1─┤ <P>-na ══ npu0 ════ npu0 ══ <P>-nb ├─veth npv-p1─ b1 (10.244.2.11)
                                  │   192.168.100.1/24   192.168.100.2/24 │
                                  │   10.244.2.0/24 via .2   10.244.1.0/24 via .1

Each node namespace routes its own pods Calico-style (a /32 per pod behind 169.254.1.1, as nodeproxy.lab
does) and the other node's pod CIDR over the underlay. The underlay is the only link between the nodes,
so whatever crosses it can be captured there (tests look for TLS records, not plaintext). Nothing links
the lab to the root namespace: no packet can leave the machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO

from nodeproxy import netns
from nodeproxy.lab import ECHO_PORT, GATEWAY, HTTP_PORT, SINK_PORT, Pod, wait_listening

UNDERLAY_CIDR = "192.168.100.0/24"
UNDERLAY_INTERFACE = "npu0"
POD_INTERFACE_PATTERN = "npv+"


@dataclass(frozen=True)
class Node:
    name: str  # "node-a"
    ns: str
    underlay_ip: str
    pod_cidr: str
    pods: tuple[Pod, ...]

    @property
    def pod_ips(self) -> tuple[str, ...]:
        return tuple(p.ip for p in self.pods)


@dataclass
class NodeLab:
    """Namespaces `<prefix>-na`, `<prefix>-nb` (nodes) and `<prefix>-a<i>`, `<prefix>-b<i>` (pods)."""

    prefix: str = "np2"
    pods_per_node: int = 2
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def nodes(self) -> tuple[Node, Node]:
        underlay = ipaddress.ip_network(UNDERLAY_CIDR)
        built = []
        for index, letter in enumerate("ab"):
            cidr = ipaddress.ip_network(f"10.244.{index + 1}.0/24")
            pods = tuple(
                Pod(f"{self.prefix}-{letter}{i}", str(cidr[10 + i]), f"npv-p{i}")
                for i in range(self.pods_per_node)
            )
            built.append(
                Node(f"node-{letter}", f"{self.prefix}-n{letter}", str(underlay[index + 1]), str(cidr), pods)
            )
        return built[0], built[1]

    @property
    def namespaces(self) -> list[str]:
        return [ns for node in self.nodes for ns in (node.ns, *(p.ns for p in node.pods))]

    def up(self) -> NodeLab:
        if not 0 < self.pods_per_node <= 50:
            raise ValueError("pods_per_node must be 1..50")
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        a, b = self.nodes
        batches: dict[str | None, list[str]] = {None: [f"netns add {ns}" for ns in self.namespaces]}
        link = UNDERLAY_INTERFACE
        batches[None].append(f"link add {link} netns {a.ns} type veth peer name {link} netns {b.ns}")
        for node, other in ((a, b), (b, a)):
            batches[node.ns] = [
                "link set lo up",
                f"addr add {node.underlay_ip}/24 dev {UNDERLAY_INTERFACE}",
                f"link set {UNDERLAY_INTERFACE} up",
                f"route add {other.pod_cidr} via {other.underlay_ip} dev {UNDERLAY_INTERFACE}",
            ]
            for pod in node.pods:
                batches[None].append(
                    f"link add {pod.node_veth} netns {node.ns} type veth peer name eth0 netns {pod.ns}"
                )
                batches[pod.ns] = [
                    "link set lo up",
                    "link set eth0 up",
                    f"addr add {pod.ip}/32 dev eth0",
                    f"route add {GATEWAY} dev eth0 scope link",
                    f"route add default via {GATEWAY} dev eth0",
                ]
                batches[node.ns] += [
                    f"addr add {GATEWAY}/32 dev {pod.node_veth} scope link",
                    f"link set {pod.node_veth} up",
                    f"route add {pod.ip}/32 dev {pod.node_veth} scope link",
                ]
        # The root batch first (it creates the namespaces and links), then each namespace's.
        for ns, commands in batches.items():
            argv = ["ip", *(["-n", ns] if ns else []), "-batch", "-"]
            proc = subprocess.run(argv, input="\n".join(commands) + "\n", text=True, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(
                    f"two-node lab setup in netns {ns or 'root'} failed: {proc.stderr.strip()}"
                )
        for node in (a, b):
            netns.run(
                node.ns,
                [
                    "sysctl",
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    "net.core.somaxconn=65535",
                ],
            )
            for pod in node.pods:
                netns.run(pod.ns, ["sysctl", "-qw", "net.ipv4.ip_local_port_range=10000 65000"])

    def down(self) -> None:
        """Stop what the lab started and delete its namespaces; safe to call any number of times."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.processes.clear()
        netns.delete(self.namespaces)

    def spawn(self, ns: str, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process inside `ns`; the lab stops it on down()."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(netns.exec_argv(ns, argv), **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc


# -- the tunnel node proxies of the lab ------------------------------------------------------------------

TRUST_DOMAIN = "cluster.local"
WORKLOAD_NAMESPACE = "lab"
OUTBOUND = "127.0.0.1:15001"


def workload_id(pod: Pod) -> str:
    """The lab's identity of a pod: spiffe://cluster.local/ns/lab/sa/<pod name, e.g. a0>."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{WORKLOAD_NAMESPACE}/sa/{pod.ns.rsplit('-', 1)[1]}"


def node_id(node: Node) -> str:
    return f"spiffe://{TRUST_DOMAIN}/nodeproxy/node/{node.name}"


def write_pki(directory: Path, lab: NodeLab, svid_ttl: timedelta = timedelta(hours=1)) -> Path:
    """A CA (nodeproxy.identity) in directory/ca, the trust bundle, each node's credential and each
    pod's SVID, as PEM files under `directory`; returns the bundle's path."""
    from nodeproxy.identity.ca import CertificateAuthority, init_ca

    init_ca(directory / "ca", TRUST_DOMAIN)
    ca = CertificateAuthority.load(directory / "ca")
    bundle = directory / "bundle.pem"
    bundle.write_bytes(ca.trust_bundle_pem())
    reissue(directory, lab, svid_ttl)
    return bundle


def reissue(directory: Path, lab: NodeLab, svid_ttl: timedelta = timedelta(hours=1)) -> None:
    """New certificates and keys for every node and pod from the CA in directory/ca (rotation: the files
    are replaced atomically; a node agent takes them on SIGHUP)."""
    from nodeproxy.identity.ca import CertificateAuthority, private_key_pem
    from nodeproxy.identity.spiffe import SpiffeId

    ca = CertificateAuthority.load(directory / "ca")
    for node in lab.nodes:
        for name, spiffe_id in [(node.name, node_id(node))] + [(p.ns, workload_id(p)) for p in node.pods]:
            issued, key = ca.issue_credential(SpiffeId.parse(spiffe_id), ttl=svid_ttl)
            for path, data, mode in (
                (directory / f"{name}.key", private_key_pem(key), 0o600),
                (directory / f"{name}.pem", issued.chain_pem, 0o644),
            ):
                staged = path.with_suffix(path.suffix + ".new")
                staged.write_bytes(data)
                staged.chmod(mode)
                staged.replace(path)


def node_config(
    lab: NodeLab,
    node: Node,
    directory: Path,
    mode: str,
    deny_principals: Sequence[str] = (),
    inbound_capture: bool = False,
    plaintext: str = "PERMISSIVE",
    via_pod: bool = False,
) -> dict[str, object]:
    """The nodeproxy.proxy.tunnel_node config of `node` (PEM files from write_pki in `directory`)."""
    other = next(n for n in lab.nodes if n.name != node.name)
    return {
        "node": node.name,
        "trust_domain": TRUST_DOMAIN,
        "mode": mode,
        "outbound": OUTBOUND,
        "hbone": "0.0.0.0:15008",
        "inbound": "127.0.0.1:15006",
        "inbound_capture": inbound_capture,
        "plaintext": plaintext,
        "pod_cidrs": [node.pod_cidr],
        "pod_interfaces": [POD_INTERFACE_PATTERN],
        "local_pods": list(node.pod_ips),
        "bundle": str(directory / "bundle.pem"),
        "node_cert": str(directory / f"{node.name}.pem"),
        "node_key": str(directory / f"{node.name}.key"),
        "workloads": {
            p.ip: {
                "spiffe_id": workload_id(p),
                "cert": str(directory / f"{p.ns}.pem"),
                "key": str(directory / f"{p.ns}.key"),
            }
            for p in node.pods
        },
        "peers": [
            {
                "cidr": other.pod_cidr,
                "node_ip": other.underlay_ip,
                "identity": node_id(other),
                "via_pod": via_pod,
            }
        ],
        "workload_identities": {p.ip: workload_id(p) for n in lab.nodes for p in n.pods},
        "deny_principals": list(deny_principals),
    }


@dataclass
class RunningNode:
    node: Node
    proc: subprocess.Popen[bytes]
    log_path: Path

    def events(self) -> list[dict[str, object]]:
        events = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def wait_event(
        self, predicate: Callable[[dict[str, object]], bool], timeout: float = 10.0
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if predicate(event):
                    return event
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise TimeoutError(f"{self.node.name}: no such event; log:\n{self.log_path.read_text()[-3000:]}")

    def reload(self) -> None:
        """SIGHUP: the agent re-reads its certificate files."""
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_tunnel_nodes(
    lab: NodeLab,
    directory: Path,
    mode: str,
    deny_principals: Sequence[str] = (),
    inbound_capture: bool = False,
    plaintext: str = "PERMISSIVE",
    via_pod: bool = False,
) -> tuple[RunningNode, RunningNode]:
    """Run nodeproxy.proxy.tunnel_node in both node namespaces (PEM files from write_pki in `directory`)
    and wait until both serve; their logs are directory/<node>-<mode>.log."""
    running = []
    for node in lab.nodes:
        config_path = directory / f"{node.name}-{mode}.json"
        config = node_config(lab, node, directory, mode, deny_principals, inbound_capture, plaintext, via_pod)
        config_path.write_text(json.dumps(config))
        log_path = directory / f"{node.name}-{mode}.log"
        with log_path.open("wb") as log:
            proc = lab.spawn(
                node.ns,
                [sys.executable, "-m", "nodeproxy.proxy.tunnel_node", str(config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        running.append(RunningNode(node, proc, log_path))
    try:
        for started in running:
            started.wait_event(lambda e: e.get("event") == "ready", timeout=20)
    except BaseException:
        for started in running:
            started.stop()
        raise
    return running[0], running[1]


def start_backends(lab: NodeLab, node: Node, output: IO[bytes] | None = None, timeout: float = 15.0) -> None:
    """nodeproxy.lab_backend (HTTP 8080, echo 9000, sink 9001) in every pod of `node`."""
    for pod in node.pods:
        lab.spawn(
            pod.ns,
            [sys.executable, "-m", "nodeproxy.lab_backend", "--name", pod.ns.rsplit("-", 1)[1]],
            stdout=output,
            stderr=output,
        )
    for pod in node.pods:
        for port in (HTTP_PORT, ECHO_PORT, SINK_PORT):
            wait_listening(node.ns, pod.ip, port, timeout)
