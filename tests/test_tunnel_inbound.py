"""Inbound capture on the receiving node (nodeproxy.capture's InboundPlan, in the two-node lab): plaintext
for a local pod goes through 15006 (PERMISSIVE relays it from the caller's address, STRICT refuses it),
tunnels addressed to a pod's own address reach 15008, and tunnels to the node are not captured twice."""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeproxy import netns
from nodeproxy.capture import CapturePlan, InboundPlan, render_iptables
from nodeproxy.lab import HTTP_PORT
from nodeproxy.lab_nodes import NodeLab, RunningNode, start_backends, start_tunnel_nodes, write_pki

LabDir = tuple[NodeLab, Path]


def _plan(inbound: InboundPlan | None) -> CapturePlan:
    return CapturePlan(
        ("10.244.1.0/24",), ("npv+",), "127.0.0.1", 15001, 0x539, 0xFFF, 133, 100, "NP", inbound
    )


def test_inbound_rules_follow_the_outbound_ones() -> None:
    rules = render_iptables(_plan(InboundPlan(("10.244.1.0/24",), "127.0.0.1")), hook_present=True)
    lines = rules.splitlines()
    outbound = next(i for i, line in enumerate(lines) if "--on-port 15001" in line)
    hbone = next(i for i, line in enumerate(lines) if "--dport 15008" in line)
    plaintext = next(i for i, line in enumerate(lines) if "--on-port 15006" in line)
    assert outbound < hbone < plaintext
    assert "-d 10.244.1.0/24 --dport 15008 --syn -j TPROXY --on-port 15008" in lines[hbone]
    assert "-d 10.244.1.0/24 --syn -j TPROXY --on-ip 127.0.0.1 --on-port 15006" in lines[plaintext]
    assert "15006" not in render_iptables(_plan(None), hook_present=True)
    # Draining stops capturing new connections, inbound ones included.
    assert "15006" not in render_iptables(
        _plan(InboundPlan(("10.244.1.0/24",), "127.0.0.1")), hook_present=True, capture_new=False
    )


def test_inbound_plan_needs_pod_cidrs() -> None:
    with pytest.raises(ValueError, match="CIDRs"):
        InboundPlan((), "127.0.0.1")


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabDir]:
    lab = NodeLab(prefix=f"npt{secrets.token_hex(2)}")
    directory = tmp_path_factory.mktemp("inbound")
    try:
        lab.up()
        write_pki(directory, lab)
        start_backends(lab, lab.nodes[1], output=(directory / "backends.log").open("wb"))
        yield lab, directory
    finally:
        lab.down()


def _get(ns: str, ip: str, port: int = HTTP_PORT) -> str:
    with netns.entered(ns):
        sock = socket.create_connection((ip, port), timeout=10)
    with sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode()


def _nodes(lab_dir: LabDir, **options: object) -> tuple[RunningNode, RunningNode]:
    lab, directory = lab_dir
    return start_tunnel_nodes(lab, directory, "tunnel", **options)  # type: ignore[arg-type]


@pytest.mark.netns
def test_permissive_plaintext_is_relayed_from_the_callers_address(lab_dir: LabDir) -> None:
    lab, _ = lab_dir
    a, b = lab.nodes
    nodes = _nodes(lab_dir, inbound_capture=True, plaintext="PERMISSIVE")
    try:
        # From node-a's own namespace: not a pod, so not tunnelled; plaintext over the underlay.
        answer = _get(a.ns, b.pods[0].ip)
        assert answer.startswith("HTTP/1.1 200") and f"client={a.underlay_ip}:" in answer
        event = nodes[1].wait_event(lambda e: e.get("event") == "plaintext_inbound")
        assert event["allowed"] is True and str(event["source"]).startswith(a.underlay_ip)
        done = nodes[1].wait_event(lambda e: e.get("event") == "relay_done" and e.get("path") == "inbound")
        assert done["ending"] == "CLOSED"
        # A tunnel to the node is local traffic there: it is not captured again as plaintext.
        tunnelled = _get(a.pods[0].ns, b.pods[0].ip)
        assert f"client={a.pods[0].ip}:" in tunnelled
        assert len([e for e in nodes[1].events() if e.get("event") == "plaintext_inbound"]) == 1
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.netns
def test_strict_refuses_plaintext_but_takes_the_tunnel(lab_dir: LabDir) -> None:
    lab, _ = lab_dir
    a, b = lab.nodes
    nodes = _nodes(lab_dir, inbound_capture=True, plaintext="STRICT")
    try:
        with pytest.raises(ConnectionResetError):
            _get(a.ns, b.pods[0].ip)
        event = nodes[1].wait_event(lambda e: e.get("event") == "plaintext_inbound")
        assert event["allowed"] is False and "STRICT" in str(event["reason"])
        assert f"client={a.pods[0].ip}:" in _get(a.pods[0].ns, b.pods[0].ip)
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.netns
def test_without_inbound_capture_plaintext_goes_straight_to_the_pod(lab_dir: LabDir) -> None:
    """The control of the two tests above: the same request with inbound capture off never meets 15006."""
    lab, _ = lab_dir
    a, b = lab.nodes
    nodes = _nodes(lab_dir, inbound_capture=False, plaintext="STRICT")
    try:
        assert _get(a.ns, b.pods[0].ip).startswith("HTTP/1.1 200")
        assert not [e for e in nodes[1].events() if e.get("event") == "plaintext_inbound"]
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.netns
def test_tunnel_addressed_to_the_pod_reaches_15008(lab_dir: LabDir) -> None:
    lab, _ = lab_dir
    a, b = lab.nodes
    nodes = _nodes(lab_dir, inbound_capture=True, plaintext="STRICT", via_pod=True)
    try:
        answer = _get(a.pods[0].ns, b.pods[1].ip)
        assert f"client={a.pods[0].ip}:" in answer
        opened = nodes[0].wait_event(lambda e: e.get("event") == "tls_open")
        assert opened["peer_ip"] == b.pods[1].ip and opened["peer_port"] == 15008
        inbound = nodes[1].wait_event(lambda e: e.get("event") == "inbound")
        assert inbound["allowed"] is True
    finally:
        for node in nodes:
            node.stop()
