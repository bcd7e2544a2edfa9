"""The `identity:` config section: what it accepts, what it refuses (with the line), the workload index,
and a node's cert manager built from it against the real CA service."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from nodeproxy.config import ConfigError
from nodeproxy.identity.ca import CertificateAuthority, init_ca, write_credential
from nodeproxy.identity.caserver import CaServer
from nodeproxy.identity.certmanager import CertManager, NoSvid
from nodeproxy.identity.config import DEFAULT_CA_PORT, IdentityConfig, load_identity_config
from nodeproxy.identity.spiffe import SpiffeId

TD = "cluster.local"
WEB = {"ip": "10.244.1.10", "namespace": "default", "service_account": "web", "node": "node-a"}


def identity(**overrides: Any) -> IdentityConfig:
    return IdentityConfig.model_validate({"trust_domain": TD, **overrides})


def test_defaults() -> None:
    config = identity()
    assert config.svid_lifetime == timedelta(hours=24)
    assert (config.renew_fraction, config.renew_jitter) == (0.5, 0.1)
    assert (config.retry_initial, config.retry_max, config.watch_interval) == (1.0, 60.0, 5.0)
    assert config.key_type == "ecdsa-p256" and config.ca is None and config.workloads == []
    labelled = identity(workloads=[{**WEB, "labels": {"app": "web", "example.com/tier": "front"}}])
    assert labelled.workloads[0].labels == {"app": "web", "example.com/tier": "front"}


def test_ca_address_forms_and_durations() -> None:
    config = identity(
        ca="10.0.0.5",
        node_credential={"cert": "/etc/nodeproxy/node.pem", "key": "/etc/nodeproxy/node.key"},
        trust_bundle="/etc/nodeproxy/bundle.pem",
        svid_ttl="1h",
        retry_initial="250ms",
    )
    assert (
        config.ca is not None
        and config.ca.host == IPv4Address("10.0.0.5")
        and config.ca.port == DEFAULT_CA_PORT
    )
    assert config.svid_ttl == 3600.0 and config.retry_initial == 0.25
    mapping = identity(
        ca={"host": "10.0.0.5", "port": 8443, "timeout": "2s"},
        node_credential={"cert": "c", "key": "k"},
        trust_bundle="b",
    )
    assert mapping.ca is not None and (mapping.ca.port, mapping.ca.timeout) == (8443, 2.0)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"trust_domain": "Cluster.local"}, "lower case"),
        ({"trust_domain": "cluster.local:443"}, "no port"),
        ({"ca": "10.0.0.5"}, "node_credential: required with `ca`"),
        ({"svid_ttl": "30s"}, "at least 60 s"),
        ({"renew_fraction": 1.0}, "less than 1"),
        ({"renew_fraction": 0.9, "renew_jitter": 0.3}, "must stay below 1"),
        ({"retry_initial": "2m"}, "retry_initial: must not be more than retry_max"),
        ({"workloads": [WEB, {**WEB, "service_account": "other"}]}, "listed twice"),
        ({"workloads": [{**WEB, "service_account": "Web"}]}, "service account name"),
        ({"workloads": [{**WEB, "namespace": "a/b"}]}, "DNS label"),
        ({"workloads": [{**WEB, "node": "Node_A"}]}, "DNS label"),
        ({"workloads": [{**WEB, "ip": "10.244.1.300"}]}, "IPv4"),
        ({"workloads": [{**WEB, "extra": 1}]}, "Extra inputs"),
        ({"nodes": ["node-b"], "workloads": [WEB]}, "node 'node-a' is not in `nodes`"),
        ({"workloads": [{**WEB, "labels": {"-bad": "x"}}]}, "label key"),
        ({"workloads": [{**WEB, "labels": {"app": "x" * 64}}]}, "at most 63"),
        ({"nodes": ["node-a", "node-a"]}, "listed twice"),
    ],
)
def test_invalid_sections_are_refused(overrides: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why.replace("(", r"\(")):
        identity(**overrides)


def test_workload_index() -> None:
    config = identity(
        workloads=[
            WEB,
            {"ip": "10.244.1.11", "namespace": "default", "service_account": "web", "node": "node-a"},
            {"ip": "10.244.2.10", "namespace": "shop", "service_account": "cart.v2", "node": "node-b"},
        ]
    )
    index = config.workload_index()
    web = SpiffeId.for_workload(TD, "default", "web")
    cart = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart.v2")
    assert index.identity_of("10.244.1.11") == web and index.identity_of("10.244.9.9") is None
    assert index.local_identity_of("node-a", "10.244.2.10") is None  # a pod of another node
    assert index.local_identity_of("node-b", "10.244.2.10") == cart
    assert index.identities_on("node-a") == {web} and index.identities_on("node-c") == frozenset()
    assert index.node_may_hold("node-b", cart) and not index.node_may_hold("node-a", cart)


def test_load_identity_config_reports_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "node: {name: node-a}\n"
        "identity:\n"
        "  trust_domain: cluster.local\n"
        "  workloads:\n"
        "    - {ip: 10.244.1.10, namespace: default, service_account: web, node: node-a}\n"
        "    - {ip: 10.244.1.10, namespace: default, service_account: api, node: node-a}\n"
    )
    with pytest.raises(
        ConfigError, match=r"line 6, column .*workloads\[1\]\.ip: pod IP 10\.244\.1\.10 is listed twice"
    ):
        load_identity_config(path)
    path.write_text("node: {name: node-a}\n")
    with pytest.raises(ConfigError, match="no 'identity' section"):
        load_identity_config(path)
    path.write_text("identity: [\n")
    with pytest.raises(ConfigError):
        load_identity_config(path)


def test_cert_manager_from_config_gets_the_nodes_own_workloads(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca", TD)
    ca = CertificateAuthority.load(tmp_path / "ca")
    issued, key = ca.issue_credential(SpiffeId.for_node(TD, "node-a"), ttl=timedelta(days=1))
    write_credential(tmp_path / "node.pem", tmp_path / "node.key", issued.chain_pem, key)
    api = {"ip": "10.244.2.10", "namespace": "default", "service_account": "api", "node": "node-b"}

    async def scenario() -> None:
        server = CaServer(ca, identity(workloads=[WEB, api]).workload_index())
        host, port = await server.start("127.0.0.1", 0)
        try:
            config = identity(
                ca={"host": host, "port": port},
                node_credential={"cert": str(tmp_path / "node.pem"), "key": str(tmp_path / "node.key")},
                trust_bundle=str(tmp_path / "ca" / "bundle.pem"),
                workloads=[WEB, api],
            )
            certs = CertManager.from_config(config, "node-a")
            assert certs.identities() == {SpiffeId.for_workload(TD, "default", "web")}
            await certs.refresh_due()
            assert certs.svid_for(SpiffeId.for_workload(TD, "default", "web")).cert_chain_pem
            with pytest.raises(NoSvid, match="not an identity of this node"):
                certs.svid_for(SpiffeId.for_workload(TD, "default", "api"))
            # web moves to node-b: node-a stops managing it
            certs.apply_config(identity(workloads=[{**WEB, "node": "node-b"}, api]), "node-a")
            assert certs.identities() == frozenset()
        finally:
            await server.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_the_config_section_does_not_load_cryptography() -> None:
    # Every nodeproxy process imports the config; only those that handle certificates pay for cryptography.
    import subprocess
    import sys

    probe = (
        "import sys, nodeproxy.identity.config; "
        "print(sorted(m for m in sys.modules if m.startswith('cryptography')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
