"""The mesh's config sections (identity, mesh, authz on the root Config), the daemon's restart-only rules
for them, the outbound path decision (nodeproxy.proxy.mesh.MeshDirectory) and the inbound capture plan.
No sockets: the lab test is tests/test_mesh_daemon.py."""

from __future__ import annotations

import pytest

from nodeproxy.capture import CapturePlan, render_iptables
from nodeproxy.config import Config, ConfigError, parse_config
from nodeproxy.daemon import mesh_restart_changes
from nodeproxy.proxy.mesh import MeshDirectory, MeshRefusal, TunnelTo

BASE = """
node: {name: node-a}
capture: {pod_cidrs: [10.244.1.0/24], pod_interfaces: ["npv+"]}
identity:
  trust_domain: cluster.local
  ca: 192.168.100.1:15012
  trust_bundle: /etc/nodeproxy/bundle.pem
  node_credential: {cert: /etc/nodeproxy/node.pem, key: /etc/nodeproxy/node.key}
  workloads:
    - {ip: 10.244.1.10, namespace: lab, service_account: a0, node: node-a}
    - {ip: 10.244.2.10, namespace: secure, service_account: b0, node: node-b}
    - {ip: 10.244.2.11, namespace: lab, service_account: b1, node: node-b}
    - {ip: 10.244.3.10, namespace: lab, service_account: c0, node: node-c}
mesh:
  peers: {node-b: 192.168.100.2}
authz:
  peer_authentication: [{name: strict, namespace: secure, mode: STRICT}]
"""


def config(extra: str = "", base: str = BASE) -> Config:
    return parse_config(base + extra)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_the_sections_parse_with_their_defaults() -> None:
    parsed = config()
    assert parsed.identity is not None and parsed.identity.trust_domain == "cluster.local"
    assert parsed.mesh is not None
    assert (parsed.mesh.hbone_port, parsed.mesh.inbound_port, parsed.mesh.inbound_capture) == (
        15008,
        15006,
        True,
    )
    assert str(parsed.mesh.peers["node-b"]) == "192.168.100.2"
    assert parsed.authz.peer_authentication[0].mode == "STRICT"
    # No mesh: none of it is required, and a config without these sections is what it was.
    assert parse_config("node: {name: n}\ncapture: {pod_cidrs: [10.0.0.0/24]}\n").mesh is None


def test_mesh_needs_identity_with_a_ca() -> None:
    found = problems("node: {name: node-a}\ncapture: {pod_cidrs: [10.244.1.0/24]}\nmesh: {}\n")
    assert len(found) == 1 and "needs `identity` with `ca`" in found[0]


def test_this_node_must_be_in_identity_nodes() -> None:
    text = BASE.replace("  workloads:\n", "  nodes: [node-b, node-c]\n  workloads:\n").replace(
        "node: node-a}", "node: node-b}"
    )
    found = problems(text)
    assert any("identity.nodes" in p and "'node-a'" in p for p in found), found


@pytest.mark.parametrize(
    ("mesh", "expected"),
    [
        ("{peers: {node-a: 192.168.100.1}}", "this node itself is not a peer"),
        ("{peers: {node-b: 192.168.100.2, node-c: 192.168.100.2}}", "also the address of 'node-b'"),
        ("{hbone_port: 15006}", "must differ from mesh.hbone_port"),
        ("{inbound_port: 15001}", "outbound listener"),
        ("{hbone_port: 70000}", "less than or equal to 65535"),
        ("{stream_window: 100}", "greater than or equal to 65535"),
        ("{connect_timeout: 0s}", "at least 0.001 s"),
    ],
)
def test_mesh_problems(mesh: str, expected: str) -> None:
    found = problems(BASE.replace("mesh:\n  peers: {node-b: 192.168.100.2}\n", f"mesh: {mesh}\n"))
    assert any(expected in p for p in found), found


def test_inbound_capture_needs_the_pod_cidrs() -> None:
    text = BASE.replace(
        'capture: {pod_cidrs: [10.244.1.0/24], pod_interfaces: ["npv+"]}',
        'capture: {pod_interfaces: ["npv+"]}',
    )
    assert any("mesh.inbound_capture" in p for p in problems(text))
    off = text.replace("mesh:\n", "mesh:\n  inbound_capture: false\n")
    assert parse_config(off).mesh is not None


def test_reload_takes_inventory_and_policies_but_not_the_identity_setup() -> None:
    running = config()
    more = config().model_copy(deep=True)
    reloadable = parse_config(
        BASE.replace(
            "mesh:\n  peers: {node-b: 192.168.100.2}",
            "mesh:\n  peers: {node-b: 192.168.100.2, node-c: 192.168.100.3}",
        ).replace(
            "    - {ip: 10.244.3.10",
            "    - {ip: 10.244.3.11, namespace: lab, service_account: c1, node: node-c}\n"
            "    - {ip: 10.244.3.10",
        )
        + "\n"
    )
    assert mesh_restart_changes(running, more) == []
    assert mesh_restart_changes(running, reloadable) == []
    other = parse_config(BASE.replace("trust_domain: cluster.local", "trust_domain: other.local"))
    assert mesh_restart_changes(running, other) == ["identity.trust_domain"]
    ports = parse_config(BASE.replace("mesh:\n", "mesh:\n  hbone_port: 15009\n"))
    assert mesh_restart_changes(running, ports) == ["mesh.hbone_port"]
    no_mesh = parse_config(BASE.split("mesh:\n")[0])
    assert mesh_restart_changes(running, no_mesh) == ["mesh"]


def test_outbound_path() -> None:
    directory = MeshDirectory.build(config())
    b_id = "spiffe://cluster.local/nodeproxy/node/node-b"
    a0 = "spiffe://cluster.local/ns/lab/sa/a0"
    # A pod of a peer node, from a pod with an identity: the tunnel, to the peer's node credential.
    assert directory.outbound_path("10.244.1.10", "10.244.2.11", 9000, None) == TunnelTo(
        "node-b", "192.168.100.2", b_id, a0
    )
    # The endpoint's node wins over the inventory (a service endpoint not listed as a workload).
    assert directory.outbound_path("10.244.1.10", "10.9.9.9", 80, "node-b") == TunnelTo(
        "node-b", "192.168.100.2", b_id, a0
    )
    # This node, an unknown node, a node that is no peer: the relay as before.
    assert directory.outbound_path("10.244.1.10", "10.244.1.10", 9000, None) is None
    assert directory.outbound_path("10.244.1.10", "10.9.9.9", 80, None) is None
    assert directory.outbound_path("10.244.1.10", "10.244.3.10", 9000, None) is None
    assert directory.outbound_path("10.244.1.10", "10.9.9.9", 80, "node-a") is None
    # No identity: plaintext where the destination is PERMISSIVE, refused where it is STRICT.
    assert directory.outbound_path("10.244.1.99", "10.244.2.11", 9000, None) is None
    refusal = directory.outbound_path("10.244.1.99", "10.244.2.10", 9000, None)
    assert isinstance(refusal, MeshRefusal) and "STRICT" in refusal.reason
    assert directory.local_pods == frozenset({"10.244.1.10"})
    assert directory.workload_identity("10.244.2.10") == "spiffe://cluster.local/ns/secure/sa/b0"


def test_capture_plan_takes_inbound_only_with_a_mesh() -> None:
    rules = render_iptables(CapturePlan.from_config(config()), hook_present=True)
    assert "-d 10.244.1.0/24 --dport 15008 --syn -j TPROXY --on-port 15008" in rules
    assert "-d 10.244.1.0/24 --syn -j TPROXY --on-ip 127.0.0.1 --on-port 15006" in rules
    off = config().model_copy(update={"mesh": config().mesh.model_copy(update={"inbound_capture": False})})  # type: ignore[union-attr]
    assert "15006" not in render_iptables(CapturePlan.from_config(off), hook_present=True)
    plain = parse_config("node: {name: n}\ncapture: {pod_cidrs: [10.0.0.0/24]}\n")
    assert "15006" not in render_iptables(CapturePlan.from_config(plain), hook_present=True)


def test_the_documented_two_node_example_parses() -> None:
    """The ```yaml block of docs/config.md's mesh section is a valid config."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "\nmesh:" in b]
    assert len(blocks) == 1
    parsed = parse_config(blocks[0])
    assert parsed.mesh is not None and parsed.identity is not None
    directory = MeshDirectory.build(parsed)
    assert isinstance(directory.outbound_path("10.244.1.10", "10.244.2.10", 5432, None), TunnelTo)


def test_an_inbound_stream_may_name_only_a_source_with_the_proven_identity_on_its_node() -> None:
    directory = MeshDirectory.build(
        config().model_copy(update={"node": config().node.model_copy(update={"name": "node-b"})})
    )
    a0 = "spiffe://cluster.local/ns/lab/sa/a0"
    # node-b's view: a0 lives on node-a, whose address it does not know (not a peer of node-b here)
    assert directory.forged_source(a0, "10.244.1.10", "192.168.100.1") is None
    assert directory.forged_source(a0, None, "192.168.100.1") is None  # no source named: node address
    # a0's certificate naming another pod's address, or an address no pod has: refused
    assert "not a pod of" in str(directory.forged_source(a0, "10.244.2.11", "192.168.100.1"))
    assert "not a pod of" in str(directory.forged_source(a0, "10.9.9.9", "192.168.100.1"))
    # with node-a known as a peer, the stream must also come from node-a's address
    known = MeshDirectory.build(
        parse_config(
            BASE.replace("node: {name: node-a}", "node: {name: node-b}").replace(
                "peers: {node-b: 192.168.100.2}", "peers: {node-a: 192.168.100.1}"
            )
        )
    )
    assert known.forged_source(a0, "10.244.1.10", "192.168.100.1") is None
    assert "not at 192.168.100.3" in str(known.forged_source(a0, "10.244.1.10", "192.168.100.3"))


def test_inbound_http_ports_are_this_nodes_pods_of_http_service_ports() -> None:
    """Where a plaintext caller can be judged per request: (pod, target port) of http/http2/grpc ports,
    for endpoints on this node by their `node` or the identity inventory; tcp and auto ports are not."""
    services = """
services:
  - name: web
    vip: 10.96.0.1
    ports: [{port: 80, target_port: 8080, protocol: http}, {port: 9000, protocol: tcp}]
    endpoints: [{address: 10.244.1.10}, {address: 10.244.2.11}, {address: 10.244.1.77, node: node-a}]
  - name: rpc
    vip: 10.96.0.2
    ports: [{port: 50051, protocol: grpc}, {port: 81, target_port: 8080, protocol: http2}]
    endpoints: [{address: 10.244.1.10}]
  - name: sniffed
    vip: 10.96.0.3
    ports: [{port: 82, protocol: auto}]
    endpoints: [{address: 10.244.1.10}]
"""
    directory = MeshDirectory.build(config(services))
    assert directory.inbound_http == {
        ("10.244.1.10", 8080): False,  # http and http2 on one pod port: HTTP/1.1, which both speak
        ("10.244.1.10", 50051): True,
        ("10.244.1.77", 8080): False,  # not in the inventory, but its endpoint says node-a
    }
