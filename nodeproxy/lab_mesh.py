"""The daemon itself (`python -m nodeproxy run`) as the mesh's node proxy on both nodes of the two-node
lab (nodeproxy.lab_nodes), with certificates from a real `nodeproxy ca serve` on node-a's underlay
address. Used by tests/test_mesh_daemon.py and bench/mesh_daemon.py.

    node-a: a0 (lab/a0), a1 (lab/a1: denied by node-b's DENY policy), a2 (no identity)
    node-b: b0 (namespace secure: STRICT), b1 (lab/b1), b2 (lab/b2)

Each daemon's config is generated (daemon_config): identity (the CA, the node's credential, every pod's
identity), mesh (the other node as peer), authz (STRICT for namespace secure, DENY for lab/a1 into
namespace lab).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from nodeproxy import netns
from nodeproxy.identity.ca import DEFAULT_NODE_CREDENTIAL_TTL, CertificateAuthority, init_ca, write_credential
from nodeproxy.identity.spiffeid import SpiffeId
from nodeproxy.lab import HTTP_PORT, Pod, wait_listening
from nodeproxy.lab_nodes import Node, NodeLab, start_backends

TRUST_DOMAIN = "cluster.local"
CA_PORT = 15012
METRICS_PORT = 15020
# A service of node-a (TCP, port 9000) whose endpoints are b1 and GHOST_POD: an address node-b's
# config lists as its workload but no pod has, so node-b accepts tunnels for it and cannot connect (503).
FLAKY_VIP = "10.96.0.50"
GHOST_POD = "10.244.2.50"
# A 90 s SVID is renewed at half its life from issuance (the CA's backdated minute does not count,
# nodeproxy.identity.lifetimes): 45 s (+-4.5 s jitter) after it was issued.
DEFAULT_LAB_SVID_TTL = timedelta(seconds=90)
# HTTP services of node-a (port 80, protocol http: the HTTP engine) whose endpoints run on node-b: b1's
# lab backend, and b0's (namespace secure: STRICT, so plaintext from node-a would be refused).
WEB_VIP = "10.96.0.60"
SECURE_WEB_VIP = "10.96.0.61"
# An HTTP service of node-a whose endpoints are GHOST_POD (node-b cannot connect: the tunnel does not
# open) and b1, round robin: a request to the ghost is retried on b1.
FLAKY_WEB_VIP = "10.96.0.62"
WEB_PORT = 80


@dataclass(frozen=True)
class MeshLab:
    lab: NodeLab
    directory: Path
    daemons: dict[str, Daemon]

    @property
    def a(self) -> Node:
        return self.lab.nodes[0]

    @property
    def b(self) -> Node:
        return self.lab.nodes[1]


@dataclass
class Daemon:
    node: Node
    proc: subprocess.Popen[bytes]
    config_path: Path
    ready_file: Path
    log_path: Path

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def wait_record(
        self, predicate: Callable[[dict[str, object]], bool], timeout: float = 10.0
    ) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.records():
                if predicate(record):
                    return record
            time.sleep(0.05)
        raise TimeoutError(f"{self.node.name}: no such log record; log:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pod_name(pod: Pod) -> str:
    """The short name of a lab pod ("a0"), also its service account."""
    return pod.ns.rsplit("-", 1)[1]  # "a0"


def workloads(lab: NodeLab) -> list[dict[str, object]]:
    """Every pod but a2 (no identity), in namespace lab, except b0 in namespace secure (STRICT); and
    GHOST_POD on node-b, which no pod has."""
    a, b = lab.nodes
    listed: list[dict[str, object]] = []
    for node in (a, b):
        for pod in node.pods:
            name = pod_name(pod)
            if name == "a2":
                continue
            namespace = "secure" if name == "b0" else "lab"
            listed.append({"ip": pod.ip, "namespace": namespace, "service_account": name, "node": node.name})
    listed.append({"ip": GHOST_POD, "namespace": "lab", "service_account": "ghost", "node": b.name})
    return listed


def bundle_path(directory: Path) -> Path:
    """The trust bundle file both daemons watch (identity.trust_bundle)."""
    return directory / "bundle.pem"


def identity_section(
    lab: NodeLab, directory: Path, node: Node | None, svid_ttl: timedelta
) -> dict[str, object]:
    """The `identity` section of `node`'s config (None: the CA's copy, which only needs the inventory)."""
    section: dict[str, object] = {
        "trust_domain": TRUST_DOMAIN,
        "ca": f"{lab.nodes[0].underlay_ip}:{CA_PORT}",
        # The nodes' copy of the bundle (bundle_path), which tests may change; the CA keeps its own.
        "trust_bundle": str(directory / "ca" / "bundle.pem" if node is None else bundle_path(directory)),
        "svid_ttl": f"{int(svid_ttl.total_seconds())}s",
        "watch_interval": "1s",
        "workloads": workloads(lab),
        "nodes": [n.name for n in lab.nodes],
    }
    if node is not None:
        section["node_credential"] = {
            "cert": str(directory / node.name / "node.pem"),
            "key": str(directory / node.name / "node.key"),
        }
    else:  # the CA's own copy: its node credential is not needed, but `ca` requires one
        section["node_credential"] = {
            "cert": str(directory / "node-a" / "node.pem"),
            "key": str(directory / "node-a" / "node.key"),
        }
    return section


def daemon_config(
    lab: NodeLab, directory: Path, node: Node, svid_ttl: timedelta, relay_threads: int
) -> dict[str, object]:
    """`node`'s daemon config: identity, mesh (the other node as peer), authz (STRICT for namespace
    secure, DENY for lab/a1 into namespace lab)."""
    other = next(n for n in lab.nodes if n.name != node.name)
    return {
        "node": {"name": node.name},
        "capture": {"pod_cidrs": [node.pod_cidr], "pod_interfaces": ["npv+"]},
        "relay": {"threads": relay_threads},
        "metrics": {"port": METRICS_PORT},
        "identity": identity_section(lab, directory, node, svid_ttl),
        "mesh": {"peers": {other.name: other.underlay_ip}},
        # Both nodes know every service, as a control plane pushes them: node-b needs them to know which
        # of its pods' ports speak HTTP (plaintext callers of a pod with L7 policies: judged per request).
        "services": [flaky_service(lab), *web_services(lab)],
        "authz": {
            "peer_authentication": [{"name": "secure-strict", "namespace": "secure", "mode": "STRICT"}],
            "authorization_policies": [
                {
                    "name": "deny-a1",
                    "namespace": "lab",
                    "action": "DENY",
                    "rules": [{"from": [{"principals": [f"{TRUST_DOMAIN}/ns/lab/sa/a1"]}]}],
                }
            ],
        },
    }


def flaky_service(lab: NodeLab) -> dict[str, object]:
    """FLAKY_VIP:9000 -> b1 and GHOST_POD on node-b; a dead endpoint is ejected after two failures."""
    b1 = lab.nodes[1].pods[1]
    return {
        "name": "flaky",
        "vip": FLAKY_VIP,
        "ports": [{"port": 9000, "protocol": "tcp"}],
        "balancer": "round_robin",
        "endpoints": [{"address": b1.ip, "node": "node-b"}, {"address": GHOST_POD, "node": "node-b"}],
        "resilience": {
            "outlier_detection": {
                "consecutive_gateway_failures": 2,
                "max_ejection_percent": 50,
                "base_ejection_time": "60s",
            }
        },
    }


def web_services(lab: NodeLab) -> list[dict[str, object]]:
    """WEB_VIP:80 -> b1:8080, SECURE_WEB_VIP:80 -> b0:8080 and FLAKY_WEB_VIP:80 -> GHOST_POD:8080 and
    b1:8080, HTTP ports on node-b's pods."""
    b0, b1 = lab.nodes[1].pods[0].ip, lab.nodes[1].pods[1].ip
    return [
        {
            "name": name,
            "vip": vip,
            "ports": [{"port": WEB_PORT, "target_port": HTTP_PORT, "protocol": "http"}],
            "balancer": "round_robin",
            "endpoints": [{"address": ip, "node": "node-b"} for ip in ips],
        }
        for name, vip, ips in (
            ("web", WEB_VIP, [b1]),
            ("secure-web", SECURE_WEB_VIP, [b0]),
            ("flaky-web", FLAKY_WEB_VIP, [GHOST_POD, b1]),
        )
    ]


def start_daemon(lab: NodeLab, directory: Path, node: Node, config: dict[str, object]) -> Daemon:
    """`python -m nodeproxy run` in `node`'s namespace with `config`; its log is directory/<node>.log."""
    config_path = directory / f"{node.name}.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    ready = directory / f"{node.name}.ready"
    log_path = directory / f"{node.name}.log"
    with log_path.open("wb") as log:
        proc = lab.spawn(
            node.ns,
            [
                sys.executable,
                "-m",
                "nodeproxy",
                "run",
                "--config",
                str(config_path),
                "--ready-file",
                str(ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Daemon(node, proc, config_path, ready, log_path)


def wait_ready(daemon: Daemon, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while not daemon.ready_file.exists():
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(
                f"{daemon.node.name} did not become ready:\n{daemon.log_path.read_text()[-6000:]}"
            )
        time.sleep(0.1)


def start_ca_service(lab: NodeLab, directory: Path, svid_ttl: timedelta = DEFAULT_LAB_SVID_TTL) -> None:
    """`nodeproxy ca serve` on node-a's underlay address (the CA made in directory/ca), until lab.down()."""
    a = lab.nodes[0]
    ca_config = directory / "ca.yaml"
    ca_config.write_text(json.dumps({"identity": identity_section(lab, directory, None, svid_ttl)}))
    with (directory / "ca.log").open("ab") as ca_log:
        lab.spawn(
            a.ns,
            [
                sys.executable, "-m", "nodeproxy", "ca", "serve", "--dir", str(directory / "ca"),
                "--config", str(ca_config), "--listen", f"{a.underlay_ip}:{CA_PORT}",
            ],
            stdout=ca_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    wait_listening(a.ns, a.underlay_ip, CA_PORT, 20)


@contextlib.contextmanager
def running_mesh(
    directory: Path,
    prefix: str,
    svid_ttl: timedelta = DEFAULT_LAB_SVID_TTL,
    relay_threads: int = 2,
    backends: bool = True,
    start_ca: bool = True,
    identity_settings: Mapping[str, object] | None = None,
) -> Iterator[MeshLab]:
    """The lab with a CA service (on node-a's underlay address; unless `start_ca` is False: then
    start_ca_service() later), the lab backends in every pod (unless `backends` is False) and a daemon on
    each node (`identity_settings` go into their identity sections); everything is stopped and removed
    at the end."""
    lab = NodeLab(prefix=prefix, pods_per_node=3)
    daemons: dict[str, Daemon] = {}
    try:
        lab.up()
        a, b = lab.nodes
        init_ca(directory / "ca", TRUST_DOMAIN)
        authority = CertificateAuthority.load(directory / "ca")
        bundle_path(directory).write_bytes(authority.trust_bundle_pem())
        for node in lab.nodes:
            issued, key = authority.issue_credential(
                SpiffeId.for_node(TRUST_DOMAIN, node.name), ttl=DEFAULT_NODE_CREDENTIAL_TTL
            )
            (directory / node.name).mkdir()
            write_credential(
                directory / node.name / "node.pem", directory / node.name / "node.key", issued.chain_pem, key
            )
        if start_ca:
            start_ca_service(lab, directory, svid_ttl)
        if backends:
            with (directory / "backends.log").open("wb") as backends_log:
                start_backends(lab, a, output=backends_log)
                start_backends(lab, b, output=backends_log)
        for node in lab.nodes:
            config = daemon_config(lab, directory, node, svid_ttl, relay_threads)
            identity = config["identity"]
            assert isinstance(identity, dict)
            identity.update(identity_settings or {})
            daemons[node.name] = start_daemon(lab, directory, node, config)
        for daemon in daemons.values():
            wait_ready(daemon)
        yield MeshLab(lab, directory, daemons)
    finally:
        for daemon in daemons.values():
            daemon.stop()
            subprocess.run(
                netns.exec_argv(
                    daemon.node.ns,
                    [sys.executable, "-m", "nodeproxy", "cleanup", "--config", str(daemon.config_path)],
                ),
                capture_output=True,
                timeout=60,
            )
        lab.down()
