"""Configuration of workload identity: the trust domain, where the CA is, the node's credential, the SVID
lifetimes and renewal, and the workloads of every node (pod IP -> namespace, service account, node).

The root config holds it as ``identity:`` (see docs/identity.md). ``nodeproxy ca serve`` reads the same
section of a config file on its own (:func:`load_identity_config`), so the CA and the node proxies share
one inventory of workloads. Durations take the forms used everywhere in the config (``250ms``, ``1.5s``,
``2m``, ``24h``, or a bare number of seconds).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nodeproxy.identity.lifetimes import DEFAULT_SVID_TTL, MIN_SVID_TTL
from nodeproxy.identity.spiffeid import SpiffeId, SpiffeIdError, validate_trust_domain
from nodeproxy.validation import (
    dns_label as _dns_label,
)
from nodeproxy.validation import (
    ipv4_input as _ipv4,
)
from nodeproxy.validation import (
    label_key as _label_key,
)
from nodeproxy.validation import (
    label_value as _label_value,
)
from nodeproxy.validation import (
    parse_duration_value as _duration,
)

__all__ = [
    "DEFAULT_CA_PORT",
    "CaClientConfig",
    "IdentityConfig",
    "NodeCredentialConfig",
    "WorkloadConfig",
    "WorkloadIndex",
    "load_identity_config",
]

# The port of Istio's CA (istiod) gRPC service, which node agents and ztunnel call for certificates.
DEFAULT_CA_PORT = 15012


def _trust_domain(value: str) -> str:
    try:
        return validate_trust_domain(value)
    except SpiffeIdError as err:
        raise ValueError(str(err)) from None


_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)


def _service_account(value: str) -> str:
    # Kubernetes names service accounts with DNS subdomains (RFC 1123, at most 253 characters); each is
    # also a valid SPIFFE path segment.
    if len(value) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(value):
        raise ValueError(
            "must be a Kubernetes service account name: an RFC 1123 DNS subdomain of at most 253 lowercase "
            "letters, digits, '-' and '.'"
        )
    return value


def _at_least_svid_minimum(value: float) -> float:
    if value < MIN_SVID_TTL.total_seconds():
        raise ValueError(f"must be at least {MIN_SVID_TTL.total_seconds():g} s (the CA's shortest lifetime)")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than 0")
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
TrustDomain = Annotated[str, AfterValidator(_trust_domain)]
IPv4 = Annotated[IPv4Address, BeforeValidator(_ipv4)]
DnsLabel = Annotated[str, AfterValidator(_dns_label)]
ServiceAccount = Annotated[str, AfterValidator(_service_account)]
LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, AfterValidator(_label_value)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkloadConfig(_Frozen):
    """One pod: its IP, which identity it has, and which node runs it."""

    ip: IPv4 = Field(description="The pod's IP; a captured connection from it carries this identity.")
    namespace: DnsLabel = Field(description="Kubernetes namespace of the pod.")
    service_account: ServiceAccount = Field(description="Kubernetes service account the pod runs as.")
    node: DnsLabel = Field(description="Node the pod runs on; only that node's proxy gets its certificate.")
    labels: dict[LabelKey, LabelValue] = Field(
        default={}, description="The pod's Kubernetes labels, for authorization policies' selectors."
    )

    def spiffe_id(self, trust_domain: str) -> SpiffeId:
        return SpiffeId.for_workload(trust_domain, self.namespace, self.service_account)


class CaClientConfig(_Frozen):
    """Where a node proxy asks for certificates."""

    host: IPv4 = Field(description="Address of `nodeproxy ca serve`.")
    port: int = Field(default=DEFAULT_CA_PORT, strict=True, ge=1, le=65535, description="Its port (15012).")
    # 10 s: a CA round trip is a TLS handshake and one signature, milliseconds; longer means it is down.
    timeout: Annotated[Duration, AfterValidator(_positive)] = Field(
        default=10.0, description="Connect + TLS handshake + response deadline per request (10 s)."
    )

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"(?P<host>[^:]+)(?::(?P<port>[0-9]+))?", value.strip(), re.ASCII)
        if match is None:
            raise ValueError("expected 'IPv4[:port]', e.g. '10.0.0.5:15012'")
        parsed: dict[str, object] = {"host": match["host"]}
        if match["port"]:
            parsed["port"] = int(match["port"])
        return parsed


class NodeCredentialConfig(_Frozen):
    """The node proxy's own certificate (``spiffe://<td>/nodeproxy/node/<node>``), which it shows the CA.

    Written by ``nodeproxy ca issue-node``; re-read when the files change, so the operator can rotate it
    without restarting the proxy.
    """

    cert: Path = Field(description="PEM certificate chain (leaf first).")
    key: Path = Field(description="PEM private key (keep it 0600).")


class IdentityConfig(_Frozen):
    """Workload identity (SPIFFE) and certificates."""

    trust_domain: TrustDomain = Field(description="The SPIFFE trust domain, e.g. 'cluster.local'.")
    trust_bundle: Path | None = Field(
        default=None,
        description="PEM file with the trusted roots (the CA's bundle.pem); re-read when it changes. "
        "Required with `ca`.",
    )
    ca: CaClientConfig | None = Field(default=None, description="The CA service; none: issue no SVIDs.")
    node_credential: NodeCredentialConfig | None = Field(
        default=None, description="This node's credential for the CA service; required with `ca`."
    )
    svid_ttl: Annotated[Duration, AfterValidator(_at_least_svid_minimum)] = Field(
        default=DEFAULT_SVID_TTL.total_seconds(),
        description="Lifetime requested for workload SVIDs (24 h; the CA may shorten it).",
    )
    key_type: Literal["ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"] = Field(
        default="ecdsa-p256", description="Key type of workload SVIDs (a new key on every renewal)."
    )
    # Half life, as Istio and ztunnel renew; the jitter spreads the renewals of many nodes that started
    # together so they do not all hit the CA at once. The lifetime runs from issuance (not from the
    # backdated notBefore) to notAfter: nodeproxy.identity.lifetimes.renewal_point.
    renew_fraction: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="Renew when this fraction of the lifetime has passed (0.5)."
    )
    renew_jitter: float = Field(
        default=0.1,
        ge=0.0,
        lt=0.5,
        description="Renewal is moved by up to ± half this fraction of the lifetime, at random (0.1).",
    )
    retry_initial: Annotated[Duration, AfterValidator(_positive)] = Field(
        default=1.0, description="First retry delay after a failed renewal (1 s), doubled per failure."
    )
    retry_max: Annotated[Duration, AfterValidator(_positive)] = Field(
        default=60.0, description="Longest retry delay (60 s); a delay is never later than the expiry."
    )
    watch_interval: Annotated[Duration, AfterValidator(_positive)] = Field(
        default=5.0, description="How often the trust bundle and node credential files are checked (5 s)."
    )
    workloads: list[WorkloadConfig] = Field(
        default=[], description="Every pod with an identity, on every node (the CA checks against it)."
    )
    nodes: list[DnsLabel] | None = Field(
        default=None,
        description="Nodes the CA serves (none: every node with a valid node credential). A node removed "
        "here gets no SVIDs and no node credential renewal after the CA reloads.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        from nodeproxy.config import _raise_problems

        problems: list[tuple[str, str]] = []
        if self.ca is not None:
            for name in ("node_credential", "trust_bundle"):
                if getattr(self, name) is None:
                    problems.append(
                        (name, "required with `ca` (the node and the CA authenticate each other)")
                    )
        if self.retry_initial > self.retry_max:
            problems.append(("retry_initial", "must not be more than retry_max"))
        if self.renew_fraction + self.renew_jitter / 2 >= 1.0:
            problems.append(
                ("renew_jitter", "renew_fraction + renew_jitter/2 must stay below 1 (renew before expiry)")
            )
        if self.renew_fraction - self.renew_jitter / 2 <= 0.0:
            problems.append(
                ("renew_jitter", "renew_fraction - renew_jitter/2 must stay above 0 (renew after issuance)")
            )
        if self.nodes is not None:
            listed = set(self.nodes)
            if len(listed) != len(self.nodes):
                problems.append(("nodes", "a node is listed twice"))
            for i, workload in enumerate(self.workloads):
                if workload.node not in listed:
                    problems.append((f"workloads[{i}].node", f"node {workload.node!r} is not in `nodes`"))
        first_with_ip: dict[IPv4Address, int] = {}
        for i, workload in enumerate(self.workloads):
            j = first_with_ip.setdefault(workload.ip, i)
            if j != i:
                problems.append(
                    (f"workloads[{i}].ip", f"pod IP {workload.ip} is listed twice (workloads[{j}])")
                )
            try:
                workload.spiffe_id(self.trust_domain)
            except SpiffeIdError as err:
                problems.append((f"workloads[{i}]", str(err)))
        _raise_problems(problems)
        return self

    def workload_index(self) -> WorkloadIndex:
        return WorkloadIndex.build(self.trust_domain, self.workloads, self.nodes)

    @property
    def svid_lifetime(self) -> timedelta:
        return timedelta(seconds=self.svid_ttl)


@dataclass(frozen=True, slots=True)
class Workload:
    ip: IPv4Address
    node: str
    spiffe_id: SpiffeId


@dataclass(frozen=True)
class WorkloadIndex:
    """Who is where: pod IP -> workload, and the identities each node may hold."""

    trust_domain: str
    by_ip: dict[IPv4Address, Workload]
    identities_by_node: dict[str, frozenset[SpiffeId]]
    nodes: frozenset[str] | None = None  # the nodes the CA serves; None: any node

    @classmethod
    def build(
        cls, trust_domain: str, workloads: Iterable[WorkloadConfig], nodes: Iterable[str] | None = None
    ) -> WorkloadIndex:
        by_ip: dict[IPv4Address, Workload] = {}
        by_node: dict[str, set[SpiffeId]] = {}
        for config in workloads:
            if config.ip in by_ip:
                raise ValueError(f"pod IP {config.ip} is listed twice")
            workload = Workload(config.ip, config.node, config.spiffe_id(trust_domain))
            by_ip[config.ip] = workload
            by_node.setdefault(config.node, set()).add(workload.spiffe_id)
        return cls(
            trust_domain,
            by_ip,
            {node: frozenset(ids) for node, ids in by_node.items()},
            None if nodes is None else frozenset(nodes),
        )

    def identity_of(self, pod_ip: IPv4Address | str) -> SpiffeId | None:
        """The identity of the pod at ``pod_ip``, or None for a source that is not a known workload."""
        workload = self.by_ip.get(IPv4Address(pod_ip))
        return None if workload is None else workload.spiffe_id

    def local_identity_of(self, node: str, pod_ip: IPv4Address | str) -> SpiffeId | None:
        """The identity of ``pod_ip`` if that pod runs on ``node`` (what a node proxy may present for it)."""
        workload = self.by_ip.get(IPv4Address(pod_ip))
        return workload.spiffe_id if workload is not None and workload.node == node else None

    def node_may_hold(self, node: str, spiffe_id: SpiffeId) -> bool:
        """Whether some workload with ``spiffe_id`` runs on ``node`` (the CA's authorization rule)."""
        return spiffe_id in self.identities_by_node.get(node, frozenset())

    def identities_on(self, node: str) -> frozenset[SpiffeId]:
        return self.identities_by_node.get(node, frozenset())


def load_identity_config(path: str | os.PathLike[str]) -> IdentityConfig:
    """The ``identity`` section of the nodeproxy config file at ``path`` (the rest is not validated:
    ``nodeproxy ca serve`` needs only this). Raises nodeproxy.config.ConfigError."""
    from pydantic import ValidationError

    from nodeproxy.config import (
        MAX_DOCUMENT_BYTES,
        ConfigError,
        _format_validation_error,
        _load_yaml,
        _node_at,
        _read_config_file,
        _unprintable_problem,
        _yaml_problem,
    )

    source = str(path)
    text = _read_config_file(path, source)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"the config is larger than {MAX_DOCUMENT_BYTES:,} bytes (the limit)", source)
    unprintable = _unprintable_problem(text)
    if unprintable is not None:
        raise ConfigError(unprintable, source)
    import yaml

    try:
        data, root = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, text), source) from None
    section: Any = data.get("identity") if isinstance(data, dict) else None
    if section is None:
        raise ConfigError("no 'identity' section (trust_domain, workloads, ...)", source)
    try:
        return IdentityConfig.model_validate(section)
    except ValidationError as err:
        node = None if root is None else _node_at(root, ["identity"])
        raise ConfigError(
            [f"identity: {line}" for line in _format_validation_error(err, node)], source
        ) from None
