"""YAML configuration for nodeproxy, validated with pydantic.

Entry points: :func:`load_config`, :func:`parse_config`, :func:`default_config`.  Every problem in a
file is reported at once as a :class:`ConfigError`, one line per problem, so an operator can fix a
config in a single pass instead of one error per restart.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import reprlib
from collections.abc import Callable, Iterable, Sequence
from importlib import resources
from ipaddress import IPv4Address, IPv4Network
from typing import Annotated, Any, ClassVar, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from nodeproxy.accesslog import AccessLogConfig
from nodeproxy.authz.config import AuthzConfig
from nodeproxy.identity.config import IdentityConfig
from nodeproxy.resilience.config import ServiceResilience
from nodeproxy.routes import (
    Protocol,
    Route,
    Subset,
    protocol_from_app_protocol,
    protocol_from_port_name,
    service_route_problems,
)
from nodeproxy.tracing import TracingConfig
from nodeproxy.validation import (
    at_least_a_millisecond as _at_least_a_millisecond,
)
from nodeproxy.validation import (
    dns_label as _dns_label,
)
from nodeproxy.validation import (
    ipv4_input as _ipv4_input,
)
from nodeproxy.validation import (
    label_key as _label_key,
)
from nodeproxy.validation import (
    label_value as _label_value,
)
from nodeproxy.validation import (
    off_or_at_least_a_millisecond as _off_or_at_least_a_millisecond,
)
from nodeproxy.validation import (
    parse_duration_value as _parse_duration,
)

__all__ = [
    "CaptureConfig",
    "Config",
    "ConfigError",
    "Endpoint",
    "HttpConfig",
    "ListenersConfig",
    "MeshConfig",
    "MetricsConfig",
    "NodeConfig",
    "RelayConfig",
    "Service",
    "ServicePort",
    "SocketAddress",
    "default_config",
    "load_config",
    "parse_config",
    "parse_duration",
]

DEFAULT_CONFIG_RESOURCE = "default-config.yaml"

# Longest repr of an offending value quoted in an error message; a whole mis-indented subtree
# would otherwise drown the message.
_MAX_GOT = 60


# Line breaks and other control characters, escaped in problems so that each stays one line.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _one_line(problem: str) -> str:
    return _CONTROL_RE.sub(lambda match: repr(match[0])[1:-1], problem)


class ConfigError(Exception):
    """An invalid configuration: ``str(err)`` has one ``'<source>: <problem>'`` line per problem."""

    def __init__(self, problems: str | Iterable[str], source: str | None = None) -> None:
        # A key or value quoted in a problem may hold a line break; the one-line format is a promise.
        self.problems: list[str] = [
            _one_line(p) for p in ([problems] if isinstance(problems, str) else problems)
        ]
        self.source = source
        prefix = f"{_one_line(source)}: " if source is not None else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


# --------------------------------------------------------------------------------------------
# Durations


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"``, or a bare number of seconds.

    Raises ValueError for negative, non-finite or malformed values and unknown units.
    """
    try:
        return _parse_duration(value)
    except ValueError as err:
        raise ValueError(f"invalid duration {_trunc(value)}: {err}") from None


def _seconds_between(low: float, high: float, *, low_exclusive: bool = False) -> AfterValidator:
    def check(value: float) -> float:
        if value < low or (low_exclusive and value == low) or value > high:
            lower = f"more than {low:g} s" if low_exclusive else f"at least {low:g} s"
            raise ValueError(f"must be {lower} and at most {high:g} s")
        return value

    return AfterValidator(check)


# --------------------------------------------------------------------------------------------
# Field types and validators

_IFACE_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}\+?", re.ASCII)
_CHAIN_PREFIX_RE = re.compile(r"[A-Z0-9_]{1,20}", re.ASCII)
_KERNEL_TABLES = {253: "default", 254: "main", 255: "local"}


def _iface_pattern(value: str) -> str:
    # IFNAMSIZ is 16 including the NUL, and iptables stores the '+' inside that buffer too.
    if len(value) > 15 or not _IFACE_RE.fullmatch(value):
        raise ValueError(
            "must be an iptables interface pattern: 1-15 characters from [A-Za-z0-9_.-], "
            "optionally ending in a single '+' wildcard (e.g. 'eth0', 'veth+')"
        )
    return value


def _iface_covers(pattern: str, name: str) -> bool:
    """Whether iptables ``-i pattern`` matches every interface ``name`` (a pattern too) matches."""
    if pattern.endswith("+"):
        return name.removesuffix("+").startswith(pattern[:-1])
    return pattern == name


def _chain_prefix(value: str) -> str:
    if not _CHAIN_PREFIX_RE.fullmatch(value):
        raise ValueError("must be 1-20 characters from uppercase letters, digits and '_'")
    return value


def _route_table(value: int) -> int:
    if value in _KERNEL_TABLES:
        raise ValueError(
            f"table {value} is the kernel's '{_KERNEL_TABLES[value]}' table; nodeproxy needs a table of "
            "its own because it installs a catch-all 'local' route there"
        )
    return value


def _power_of_two(value: int) -> int:
    # The kernel rounds pipe sizes up to a power-of-two number of pages; ask for what we get.
    if value & (value - 1):
        raise ValueError("must be a power of two")
    return value


def _ipv4_network_input(value: object) -> object:
    if isinstance(value, IPv4Network):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"expected an IPv4 CIDR as a string such as '10.244.1.0/24', not {type(value).__name__}"
        )
    try:
        return IPv4Network(value)
    except ValueError:
        pass
    try:
        loose = IPv4Network(value, strict=False)
    except ValueError:
        raise ValueError("not a valid IPv4 CIDR such as '10.244.1.0/24'") from None
    # A CIDR with host bits set is almost always a pod IP pasted where its subnet was meant.
    raise ValueError(f"host bits are set; did you mean '{loose}'?")


def _routable(value: IPv4Address) -> IPv4Address:
    if value.is_unspecified or value.is_multicast or value == IPv4Address("255.255.255.255"):
        raise ValueError("must be a unicast address (not 0.0.0.0, multicast or broadcast)")
    return value


# Ranges a service VIP must not come from, and why. A VIP is matched by the capture rules on the
# pods' outbound packets and never assigned to an interface.
_NOT_A_VIP: tuple[tuple[IPv4Network, str], ...] = (
    (IPv4Network("0.0.0.0/8"), "in 0.0.0.0/8 ('this network'), which is never a destination"),
    (
        IPv4Network("127.0.0.0/8"),
        "a loopback address (127.0.0.0/8): a pod's connection to it stays inside the pod and is never "
        "captured",
    ),
    (
        IPv4Network("169.254.0.0/16"),
        "link-local (169.254.0.0/16), the range of node-local services such as cloud metadata",
    ),
    (IPv4Network("224.0.0.0/4"), "multicast (224.0.0.0/4); TCP has no multicast"),
    (IPv4Network("240.0.0.0/4"), "reserved (240.0.0.0/4) or the broadcast address 255.255.255.255"),
)


def _service_vip(value: IPv4Address) -> IPv4Address:
    for network, why in _NOT_A_VIP:
        if value in network:
            raise ValueError(f"a VIP must be a routable unicast address; {value} is {why}")
    return value


DnsLabel = Annotated[str, AfterValidator(_dns_label)]
IPv4 = Annotated[IPv4Address, BeforeValidator(_ipv4_input)]
UnicastIPv4 = Annotated[IPv4Address, BeforeValidator(_ipv4_input), AfterValidator(_routable)]
ServiceVip = Annotated[IPv4Address, BeforeValidator(_ipv4_input), AfterValidator(_service_vip)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, AfterValidator(_label_value)]
ChainPrefix = Annotated[str, AfterValidator(_chain_prefix)]
RouteTable = Annotated[int, Field(strict=True, ge=1, le=0x7FFFFFFF), AfterValidator(_route_table)]
PipeSize = Annotated[int, Field(strict=True, ge=4096, le=1048576), AfterValidator(_power_of_two)]
PodCidr = Annotated[IPv4Network, BeforeValidator(_ipv4_network_input)]
IfacePattern = Annotated[str, AfterValidator(_iface_pattern)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Problems(ValueError):
    """Several problems found by one model validator, each at a path relative to that model.

    pydantic keeps only one error per validator call; this carries all of them through it and
    :func:`_format_validation_error` expands them back into separate lines.
    """

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.items = list(problems)
        super().__init__("; ".join(f"{path}: {why}" if path else why for path, why in self.items))


def _raise_problems(problems: Sequence[tuple[str, str]]) -> None:
    if problems:
        raise _Problems(problems)


# --------------------------------------------------------------------------------------------
# Models


class NodeConfig(_Frozen):
    """The node this daemon runs on."""

    name: DnsLabel = Field(description="Kubernetes node name; compared with Endpoint.node.")


class CaptureConfig(_Frozen):
    """Which pod traffic is captured with iptables TPROXY, and the policy routing that delivers it."""

    pod_cidrs: list[PodCidr] = Field(
        default=[], description="Source CIDRs of local pods whose outbound TCP is captured."
    )
    pod_interfaces: list[IfacePattern] = Field(
        default=[],
        description="iptables `-i` patterns ('eth0', 'veth+') of the interfaces pod traffic arrives on.",
    )
    # 0x539 (1337) and table 133 are what Istio's TPROXY interception mode uses: familiar to
    # operators and known not to collide with the common CNIs.
    mark: int = Field(
        default=0x539, strict=True, ge=1, le=0xFFFFFFFF, description="fwmark the TPROXY target sets."
    )
    # The low 12 bits stay clear of kube-proxy's 0x4000/0x8000 marks and Calico's default
    # 0xffff0000 mark bits, so we never clobber another component's bits.
    mark_mask: int = Field(
        default=0xFFF, strict=True, ge=1, le=0xFFFFFFFF, description="fwmark bits nodeproxy owns."
    )
    route_table: RouteTable = Field(
        default=133, description="Routing table holding the 'local 0.0.0.0/0 dev lo' route (Istio: 133)."
    )
    # Must sort before the main table's rule at 32766; a low number also keeps it ahead of rules
    # that CNIs append with automatically assigned priorities.
    rule_priority: int = Field(
        default=100, strict=True, ge=1, le=32765, description="Priority of the 'fwmark -> table' ip rule."
    )
    # iptables chain names are limited to 28 characters; 20 leaves room for suffixes like "_OUTPUT".
    chain_prefix: ChainPrefix = Field(
        default="NODEPROXY", description="Prefix of the iptables chains nodeproxy creates and owns."
    )
    # "open": if the supervisor dies (kill -9, OOM), the last surviving process of the daemon removes the
    # capture so pod traffic flows direct, unproxied. "closed": the rules stay and new captured
    # connections fail until a daemon runs again; right once mTLS is STRICT (no plaintext bypass).
    on_failure: Literal["open", "closed"] = Field(
        default="open",
        description="What happens to the capture rules when the daemon dies without a clean stop.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems: list[tuple[str, str]] = []
        if not self.pod_cidrs and not self.pod_interfaces:
            problems.append(
                (
                    "",
                    "at least one of pod_cidrs or pod_interfaces must be non-empty, otherwise no pod "
                    "traffic would be captured",
                )
            )
        if self.mark & ~self.mark_mask:
            problems.append(
                (
                    "mark",
                    f"mark {self.mark:#x} does not fit in mark_mask {self.mark_mask:#x}: it must only "
                    "use bits inside the mask, or the ip rule matching mark/mask never sees it",
                )
            )
        # A repeated or covered entry only duplicates iptables rules, but is almost always a typo
        # for another range or interface.
        for i, cidr in enumerate(self.pod_cidrs):
            for j, earlier in enumerate(self.pod_cidrs[:i]):
                if cidr.overlaps(earlier):
                    how = "is listed twice" if cidr == earlier else f"overlaps {earlier}"
                    problems.append((f"pod_cidrs[{i}]", f"{cidr} {how} (pod_cidrs[{j}])"))
                    break
        for i, pattern in enumerate(self.pod_interfaces):
            for j, earlier_pattern in enumerate(self.pod_interfaces[:i]):
                if _iface_covers(earlier_pattern, pattern) or _iface_covers(pattern, earlier_pattern):
                    how = "is listed twice" if pattern == earlier_pattern else f"overlaps '{earlier_pattern}'"
                    problems.append((f"pod_interfaces[{i}]", f"'{pattern}' {how} (pod_interfaces[{j}])"))
                    break
        _raise_problems(problems)
        return self


class SocketAddress(_Frozen):
    """An IPv4 address and TCP port, written ``"host:port"`` or as a ``{host, port}`` mapping."""

    host: IPv4
    port: Port

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: object) -> object:
        if not isinstance(value, str):
            return value  # a mapping (or an instance) goes through normal field validation
        match = re.fullmatch(r"(?P<host>[^:]+):(?P<port>[0-9]+)", value.strip(), re.ASCII)
        if match is None:
            raise ValueError("expected 'IPv4:port', e.g. '127.0.0.1:15001'")
        return {"host": match["host"], "port": int(match["port"])}

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class ListenersConfig(_Frozen):
    """Sockets nodeproxy listens on."""

    # 15001 is the outbound capture port of both ztunnel and Istio's Envoy sidecar.
    outbound: SocketAddress = Field(
        default=SocketAddress(host=IPv4Address("127.0.0.1"), port=15001),
        description="Where TPROXY delivers captured outbound connections.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        host = self.outbound.host
        # Loopback (the default) and link-local are fine for a local listener, and 0.0.0.0 means
        # every local address; the other ranges a VIP may not use can never be a local TCP address.
        for network, why in _NOT_A_VIP:
            local_ok = network.is_loopback or network.is_link_local
            if host in network and not local_ok and not host.is_unspecified:
                raise _Problems([("outbound", f"cannot listen on {host}: it is {why}")])
        return self


def _usable_cpus() -> int:
    # The affinity mask honours taskset/cpusets, which os.cpu_count() ignores.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class RelayConfig(_Frozen):
    """Tuning of the splice relay."""

    threads: int = Field(
        default=0,
        strict=True,
        ge=0,
        le=64,
        description="Worker processes (one relay thread each); 0 means one per usable CPU (max 64).",
    )
    # Pipes start at Linux's default 64 KiB and grow to pipe_size once a direction moves bulk data,
    # so this bounds what one direction buffers in the proxy. 1 MiB matches Envoy's default
    # per_connection_buffer_limit_bytes and is the default fs.pipe-max-size, the most an
    # unprivileged F_SETPIPE_SZ may ask for.
    pipe_size: PipeSize = Field(default=1048576, description="Largest capacity a splice pipe grows to.")
    # Envoy's connect_timeout defaults to 5 s; we use 1 s because endpoints are at most a hop or
    # two away and the first SYN retransmit is at 1 s, so a timed-out attempt is better spent on
    # the next endpoint (connect_attempts) than on waiting for a retransmission.
    connect_timeout: Annotated[
        float,
        BeforeValidator(_parse_duration),
        _seconds_between(0, 300, low_exclusive=True),
        AfterValidator(_at_least_a_millisecond),
    ] = Field(default=1.0, description="Per-attempt upstream connect timeout in seconds.")
    # Istio retries a failed connection twice by default (three tries in all); we match that.
    connect_attempts: int = Field(
        default=3,
        strict=True,
        ge=1,
        le=16,
        description="Distinct endpoints tried before the client is reset.",
    )
    # Envoy's tcp_proxy idle_timeout defaults to 1 h; HAProxy needs `timeout client/server` set.
    # Checked once a second by the relay, so it fires up to a second late. 0 turns it off (TCP
    # keepalive still clears connections whose peer vanished).
    idle_timeout: Annotated[
        float,
        BeforeValidator(_parse_duration),
        _seconds_between(0, 7 * 86400),
        AfterValidator(_off_or_at_least_a_millisecond),
    ] = Field(
        default=3600.0,
        description="Seconds without a byte either way before a connection is closed; 0: never.",
    )
    # Istio's sidecar terminationDrainDuration defaults to 5 s.
    drain_timeout: Annotated[float, BeforeValidator(_parse_duration), _seconds_between(0, 3600)] = Field(
        default=5.0, description="Seconds open connections may finish after shutdown starts."
    )
    # Each relayed connection holds two sockets and a pipe per direction (six fds), so the
    # default needs RLIMIT_NOFILE of about 600k; Envoy's per-cluster breaker is 1024, far too low
    # for a whole node.
    max_connections: int = Field(
        default=100000,
        strict=True,
        ge=1,
        le=10_000_000,
        description="Concurrent connections; beyond it new ones are reset.",
    )

    @property
    def effective_threads(self) -> int:
        """Number of relay threads to start."""
        return self.threads or min(_usable_cpus(), 64)

    @property
    def connect_timeout_ms(self) -> int:
        """connect_timeout in whole milliseconds, rounded to nearest (at least 1, by validation)."""
        return round(self.connect_timeout * 1000)

    @property
    def idle_timeout_ms(self) -> int:
        """idle_timeout in whole milliseconds, rounded to nearest; 0 means off."""
        return round(self.idle_timeout * 1000)


class HttpConfig(_Frozen):
    """Limits and timeouts of the HTTP engine (ports whose protocol is http, http2, grpc or auto)."""

    # An `auto` port waits this long for the client's first bytes before it treats the connection
    # as opaque TCP, so a server-first protocol (SMTP, MySQL) starts at most this late. Linkerd
    # waits 10 s there, a stall its users keep reporting.
    peek_timeout: Annotated[
        float,
        BeforeValidator(_parse_duration),
        _seconds_between(0, 10, low_exclusive=True),
        AfterValidator(_at_least_a_millisecond),
    ] = Field(default=0.1, description="How long an auto port waits for the client to speak first.")
    # Envoy's request_headers_timeout is off by default; 10 s is nginx's client_header_timeout
    # order of magnitude and bounds what a slowloris client can hold.
    header_timeout: Annotated[
        float,
        BeforeValidator(_parse_duration),
        _seconds_between(0, 3600, low_exclusive=True),
        AfterValidator(_at_least_a_millisecond),
    ] = Field(default=10.0, description="A request head must arrive within this, else 408.")
    # Envoy's defaults: max_request_headers_kb 60 and max_headers_count 100.
    max_head_bytes: int = Field(
        default=61440, strict=True, ge=1024, le=1048576, description="Largest request head; beyond: 431."
    )
    # At most 128: the capacity of the native HTTP/1 parser's field table (H1_FIELDS_CAP).
    max_header_fields: int = Field(
        default=100, strict=True, ge=1, le=128, description="Most header fields in a head; beyond: 431."
    )
    # Idle upstream HTTP/1.1 connections kept per endpoint by each worker; more concurrent requests
    # open more connections, which are closed instead of pooled when the pool is full.
    upstream_pool_size: int = Field(
        default=256, strict=True, ge=0, le=65536, description="Idle upstream connections kept per endpoint."
    )
    # Below the 5 s keep-alive timeout of Node.js, Apache and uvicorn, so the proxy closes an idle
    # connection before the server does and rarely reuses one the server is closing at that moment
    # (the race behind sporadic 502s with Envoy's 1 h default). A new connection one hop away costs
    # little. 0 keeps idle connections until the server closes them.
    upstream_idle_timeout: Annotated[
        float,
        BeforeValidator(_parse_duration),
        _seconds_between(0, 86400),
        AfterValidator(_off_or_at_least_a_millisecond),
    ] = Field(default=4.0, description="Idle upstream connections are closed after this.")


class MetricsConfig(_Frozen):
    """The Prometheus endpoint (docs/observability.md). Changing enabled, address or port needs a restart."""

    # Off is for measuring what recording costs (bench) or for a node that scrapes nothing.
    enabled: bool = Field(
        default=True,
        description="Record metrics in the workers; false: no recording and no listener (GET /v1/metrics "
        "then shows the supervisor's own families only).",
    )

    # Loopback by default: a node daemon's listener on the node's own address would be reachable from
    # every pod and the network. Istio's sidecars listen on 15020 on the pod address; a cluster-wide
    # Prometheus scraping this node needs `address: 0.0.0.0` (or the node's address) and a firewall.
    address: IPv4 = Field(
        default=IPv4Address("127.0.0.1"), description="Address the metrics listener binds (IPv4)."
    )
    # 15020 is Istio's merged-metrics port (ztunnel's and the sidecar agent's).
    port: int = Field(
        default=15020,
        strict=True,
        ge=0,
        le=65535,
        description="TCP port serving /metrics and /stats/prometheus; 0: no listener (the admin "
        "socket's GET /v1/metrics still works).",
    )
    # Per worker and family (request metrics, TCP metrics); label values come from the config, so
    # only a config naming thousands of services and workloads gets near it.
    max_series: int = Field(
        default=20000,
        strict=True,
        ge=100,
        le=1_000_000,
        description="Label sets kept per metric family and worker; beyond, new ones are dropped and counted.",
    )


class ServicePort(_Frozen):
    """One port of a service VIP and the endpoint port it forwards to."""

    port: Port
    target_port: Port | None = Field(default=None, description="Endpoint port; defaults to `port`.")
    name: DnsLabel | None = Field(default=None, description="Optional name, for logs and metrics.")
    # Default tcp (unlike Istio, which sniffs ports it cannot classify): an existing port keeps
    # the opaque L4 path unless told otherwise.
    protocol: Protocol | None = Field(
        default=None,
        description="tcp, http, http2, grpc or auto; default from app_protocol, then the name, then tcp.",
    )
    app_protocol: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        description="Kubernetes appProtocol, e.g. kubernetes.io/h2c.",
    )

    @property
    def backend_port(self) -> int:
        """The port connections are forwarded to on an endpoint."""
        return self.port if self.target_port is None else self.target_port

    @property
    def resolved_protocol(self) -> Protocol:
        """`protocol`, else what `app_protocol` or Istio's name prefix (http-, grpc-, ...) says, else tcp."""
        return (
            self.protocol
            or protocol_from_app_protocol(self.app_protocol)
            or protocol_from_port_name(self.name)
            or "tcp"
        )

    @model_validator(mode="after")
    def _check_protocol(self) -> Self:
        implied = protocol_from_app_protocol(self.app_protocol)
        if self.protocol is not None and implied is not None and implied != self.protocol:
            raise ValueError(
                f"protocol '{self.protocol}' contradicts app_protocol '{self.app_protocol}' "
                f"(which means {implied}); set one of them"
            )
        return self


class Endpoint(_Frozen):
    """One backend of a service."""

    address: UnicastIPv4
    node: DnsLabel | None = Field(default=None, description="Node the endpoint runs on, if known.")
    labels: dict[LabelKey, LabelValue] = Field(default={}, description="Kubernetes-style labels.")
    # Relative share of new connections under every balancer (weight 2 carries twice the connections
    # of weight 1; see nodeproxy/balance.py). 1 = all equal, as in Envoy.
    weight: int = Field(default=1, strict=True, ge=1, le=1000, description="Relative balancing weight.")


class Service(_Frozen):
    """A virtual IP, its ports, and the endpoints behind it."""

    name: DnsLabel
    vip: ServiceVip
    ports: list[ServicePort] = Field(min_length=1)
    # peak_ewma (Linkerd's balancer: power of two choices on response-time estimate x requests in
    # flight, docs/resilience.md) prefers the faster of two random endpoints; where no response times
    # are reported (TCP ports) it compares connections in flight, which is p2c. p2c (Envoy's
    # least_request with choice_count 2) avoids round robin's blindness to slow endpoints without
    # least_conn's herding of every new connection onto the same idle endpoint.
    balancer: Literal["round_robin", "least_conn", "p2c", "peak_ewma"] = Field(
        default="peak_ewma", description="Endpoint picker."
    )
    # Empty is valid: the service exists (its VIP is captured) but new connections are reset.
    endpoints: list[Endpoint] = Field(default=[], description="Backends; empty resets new connections.")
    # HTTP routing (docs/routing.md); used by the service's http, http2, grpc and auto ports.
    subsets: list[Subset] = Field(default=[], description="Named endpoint groups selected by labels.")
    routes: list[Route] = Field(default=[], description="Ordered HTTP routes; none: all endpoints.")
    resilience: ServiceResilience = Field(
        default=ServiceResilience(),
        description="Balancing tuning, retry budget, outlier detection, circuit breakers, rate limit.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems: list[tuple[str, str]] = service_route_problems(
            [sp.resolved_protocol for sp in self.ports], self.subsets, self.routes
        )
        first_port: dict[int, int] = {}
        for i, sp in enumerate(self.ports):
            j = first_port.setdefault(sp.port, i)
            if j != i:
                problems.append(
                    (f"ports[{i}].port", f"port {sp.port} is listed twice (ports[{j}] and ports[{i}])")
                )
        first_addr: dict[IPv4Address, int] = {}
        for i, ep in enumerate(self.endpoints):
            j = first_addr.setdefault(ep.address, i)
            if j != i:
                problems.append(
                    (
                        f"endpoints[{i}].address",
                        f"endpoint {ep.address} is listed twice (endpoints[{j}] and endpoints[{i}])",
                    )
                )
        _raise_problems(problems)
        return self


class MeshConfig(_Frozen):
    """Node-to-node mTLS (docs/config.md, section `mesh`): which peer nodes exist and the tunnel's ports.

    A captured connection whose destination pod runs on a peer listed here, from a source pod with an
    identity (`identity.workloads`), travels inside the HBONE tunnel to that peer's `hbone_port`."""

    peers: dict[DnsLabel, IPv4] = Field(
        default={},
        description="Peer node name -> its underlay address (where its tunnel port listens). A node "
        "missing here is reached without the tunnel.",
    )
    # 15008 and 15006 are ztunnel's (and Istio's) HBONE and inbound plaintext ports.
    hbone_port: Port = Field(
        default=15008,
        description="Tunnel port: this node listens on it (0.0.0.0) and peers are dialled on it.",
    )
    inbound_port: Port = Field(
        default=15006, description="Plaintext inbound port (on listeners.outbound's address)."
    )
    inbound_capture: bool = Field(
        default=True,
        description="Capture connections from elsewhere to this node's pods (capture.pod_cidrs): "
        "plaintext to inbound_port, where PERMISSIVE/STRICT and the policies apply; podip:hbone_port "
        "to the tunnel listener.",
    )
    stream_window: int = Field(
        default=4 * 1024 * 1024,
        strict=True,
        ge=65535,
        le=(1 << 31) - 1,
        description="HTTP/2 window of one tunnelled stream, bytes (4 MiB).",
    )
    connection_window: int = Field(
        default=16 * 1024 * 1024,
        strict=True,
        ge=65535,
        le=(1 << 31) - 1,
        description="HTTP/2 window of one tunnel connection, bytes (16 MiB).",
    )
    max_streams: int = Field(
        default=100, strict=True, ge=1, le=10000, description="Streams per tunnel connection (100)."
    )
    handshake_timeout: Annotated[float, BeforeValidator(_parse_duration), _seconds_between(0.001, 600)] = (
        Field(default=10.0, description="TLS handshake and inbound decision deadline (10 s).")
    )
    connect_timeout: Annotated[float, BeforeValidator(_parse_duration), _seconds_between(0.001, 600)] = Field(
        default=5.0, description="Connect to a peer node or a local pod (5 s)."
    )
    pool_idle_timeout: Annotated[float, BeforeValidator(_parse_duration), _seconds_between(0.001, 3600)] = (
        Field(default=30.0, description="An idle pooled tunnel connection closes after this (30 s).")
    )


class Config(_Frozen):
    """The whole nodeproxy configuration file."""

    node: NodeConfig
    capture: CaptureConfig
    listeners: ListenersConfig = ListenersConfig()
    relay: RelayConfig = RelayConfig()
    services: list[Service] = Field(default=[], description="Services whose VIPs are captured and balanced.")
    http: HttpConfig = HttpConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    access_log: AccessLogConfig = AccessLogConfig()
    identity: IdentityConfig | None = Field(
        default=None, description="Workload identities and the CA (docs/identity.md); none: no mTLS."
    )
    mesh: MeshConfig | None = Field(
        default=None, description="Node-to-node mTLS tunnel; needs `identity` with `ca`. None: no tunnel."
    )
    authz: AuthzConfig = Field(
        default=AuthzConfig(),
        description="Peer authentication (PERMISSIVE/STRICT), JWT and authorization policies "
        "(docs/authorization.md), applied to connections for this node's pods.",
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        problems: list[tuple[str, str]] = self._mesh_problems()
        first_name: dict[str, int] = {}
        for i, svc in enumerate(self.services):
            j = first_name.setdefault(svc.name, i)
            if j != i:
                problems.append(
                    (
                        "services",
                        f"service name '{svc.name}' is defined twice (services[{j}] and services[{i}])",
                    )
                )
        claimed: dict[tuple[IPv4Address, int], tuple[int, int]] = {}
        for i, svc in enumerate(self.services):
            for k, sp in enumerate(svc.ports):
                first = claimed.setdefault((svc.vip, sp.port), (i, k))
                if first != (i, k) and first[0] != i:  # duplicates inside one service are Service's job
                    problems.append(
                        (
                            f"services[{i}].ports[{k}].port",
                            f"{svc.vip}:{sp.port} is already claimed by service "
                            f"'{self.services[first[0]].name}' (services[{first[0]}].ports[{first[1]}]); "
                            "each VIP:port can route to only one service",
                        )
                    )
            for c, cidr in enumerate(self.capture.pod_cidrs):
                if svc.vip in cidr:
                    problems.append(
                        (
                            f"services[{i}].vip",
                            f"VIP {svc.vip} is inside pod CIDR {cidr} (capture.pod_cidrs[{c}]); "
                            "VIPs must come from a separate service range, or traffic to the pod that owns "
                            "that address would be captured as service traffic",
                        )
                    )
        problems += self._address_loops()
        _raise_problems(problems)
        return self

    def _mesh_problems(self) -> list[tuple[str, str]]:
        """identity and mesh against the rest: this node's place in them, the ports, what the tunnel needs."""
        problems: list[tuple[str, str]] = []
        identity, mesh = self.identity, self.mesh
        if identity is not None and identity.nodes is not None and self.node.name not in identity.nodes:
            problems.append(
                (
                    "identity.nodes",
                    f"this node ({self.node.name!r}, node.name) is not listed: the CA would "
                    "refuse it every certificate",
                )
            )
        if mesh is None:
            return problems
        if identity is None or identity.ca is None:
            problems.append(
                (
                    "mesh",
                    "needs `identity` with `ca`, `trust_bundle` and `node_credential`: the tunnel "
                    "presents certificates the CA issues",
                )
            )
        if self.node.name in mesh.peers:
            problems.append((f"mesh.peers.{self.node.name}", "this node itself is not a peer"))
        seen: dict[IPv4Address, str] = {}
        for name, address in mesh.peers.items():
            if address in seen:
                problems.append((f"mesh.peers.{name}", f"{address} is also the address of {seen[address]!r}"))
            seen.setdefault(address, name)
        outbound = self.listeners.outbound
        ports = {"hbone_port": mesh.hbone_port, "inbound_port": mesh.inbound_port}
        if mesh.hbone_port == mesh.inbound_port:
            problems.append(("mesh.inbound_port", "must differ from mesh.hbone_port"))
        for name, port in ports.items():
            if port == outbound.port:
                problems.append(
                    (
                        f"mesh.{name}",
                        f"port {port} is the outbound listener's (listeners.outbound: {outbound})",
                    )
                )
        if mesh.inbound_capture and not self.capture.pod_cidrs:
            problems.append(
                (
                    "mesh.inbound_capture",
                    "needs capture.pod_cidrs (this node's pods: what inbound capture "
                    "takes); set it or inbound_capture: false",
                )
            )
        return problems

    def _address_loops(self) -> list[tuple[str, str]]:
        """A VIP that is the listener's address, and endpoints that are a VIP or the listener."""
        problems: list[tuple[str, str]] = []
        listener = self.listeners.outbound
        first_with_vip: dict[IPv4Address, int] = {}
        for i, svc in enumerate(self.services):
            first_with_vip.setdefault(svc.vip, i)
        for i, svc in enumerate(self.services):
            if svc.vip == listener.host:
                on_port = any(sp.port == listener.port for sp in svc.ports)
                problems.append(
                    (
                        f"services[{i}].vip",
                        f"VIP {svc.vip} is the address of the outbound listener (listeners.outbound: "
                        f"{listener}){', on the same port' if on_port else ''}; the proxy would "
                        "capture connections to its own listener",
                    )
                )
            for e, ep in enumerate(svc.endpoints):
                owner = i if ep.address == svc.vip else first_with_vip.get(ep.address)
                if owner is not None:
                    whose = (
                        "this service's own VIP"
                        if owner == i
                        else f"the VIP of service '{self.services[owner].name}' (services[{owner}].vip)"
                    )
                    problems.append(
                        (
                            f"services[{i}].endpoints[{e}].address",
                            f"endpoint {ep.address} is {whose}; a VIP is not a backend (nothing listens "
                            "on it: list the pods behind that service instead)",
                        )
                    )
                elif ep.address == listener.host and listener.port in {sp.backend_port for sp in svc.ports}:
                    problems.append(
                        (
                            f"services[{i}].endpoints[{e}].address",
                            f"endpoint {ep.address}:{listener.port} is the outbound listener "
                            "(listeners.outbound); the proxy would connect to itself",
                        )
                    )
        return problems

    def service_ports(self) -> dict[tuple[str, int], tuple[Service, ServicePort]]:
        """Map ``(str(vip), port)`` to the service and port that claims it."""
        return {(str(svc.vip), sp.port): (svc, sp) for svc in self.services for sp in svc.ports}


# --------------------------------------------------------------------------------------------
# Loading and error reporting


# reprlib bounds the work on big or deeply nested values (aliases can share a subtree many times).
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 2 * _MAX_GOT


def _trunc(value: object) -> str:
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # repr of an int beyond 4300 digits; a cyclic structure
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _MAX_GOT else text[: _MAX_GOT - 3] + "..."


_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _join_path(base: str, loc: Iterable[int | str]) -> str:
    path = base
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _IDENT_RE.fullmatch(part):
            path += f".{part}" if path else part
        else:  # dict keys such as label keys 'app.kubernetes.io/name' would be ambiguous after a '.'
            path += f"[{part!r}]"
    return path


def _fields_at(loc: Sequence[int | str]) -> list[str] | None:
    """Field names of the model that owns the last element of ``loc`` (for 'unknown key' hints)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # list index: the element type was already unwrapped
        field = (
            model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        )
        if field is None:
            return None
        model = _element_model(field.annotation)
        if model is None:
            return None
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return None


def _element_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _element_model(arg)
        if found is not None:
            return found
    return None


def _describe(err: ErrorDetails) -> Iterable[tuple[tuple[int | str, ...], str]]:
    """``(location, 'path: why')`` for each problem in one pydantic error.

    The location ends in ``"[key]"`` when the problem is the last mapping key itself.
    """
    loc = err["loc"]
    in_key = bool(loc) and loc[-1] == "[key]"  # pydantic's marker for an error in a dict key
    if in_key:
        loc = loc[:-1]
    path = _join_path("", loc)
    ctx = err.get("ctx") or {}
    cause = ctx.get("error")
    if isinstance(cause, _Problems):
        for sub, why in cause.items:
            full = f"{path}.{sub}" if path and sub else path or sub
            yield (*loc, *_split_path(sub)), f"{full}: {why}" if full else why
        return
    if err["type"] == "extra_forbidden":
        key = loc[-1] if loc else "?"
        valid = _fields_at(loc) or []
        hint = difflib.get_close_matches(str(key), valid, n=1)
        why = f"unknown key '{key}'"
        if hint:
            why += f"; did you mean '{hint[0]}'?"
        elif valid:
            why += f"; valid keys here: {', '.join(valid)}"
        yield (*loc, "[key]"), f"{path}: {why}"
        return
    if err["type"] == "missing":
        # The input here is the enclosing mapping, which would only add noise.
        yield loc, f"{path}: required key is missing"
        return
    why = str(cause) if err["type"] == "value_error" and cause is not None else err["msg"]
    if in_key:
        why = f"invalid key: {why}"
    line = f"{path}: {why}" if path else why
    yield (*loc, "[key]") if in_key else loc, f"{line} (got {_trunc(err['input'])})"


# --------------------------------------------------------------------------------------------
# YAML: a YAML 1.2 core-schema loader with resource limits

#: Largest config accepted, in bytes of UTF-8. 1,346 services of ten endpoints each fill it, and load
#: in 1.2 CPU-seconds with libyaml (3.6 with PyYAML's pure-Python parser).
MAX_DOCUMENT_BYTES = 1 << 20
#: Deepest nesting of sequences and mappings. The schema needs fewer than ten levels; the bound keeps
#: the recursive composer and constructor far from Python's recursion limit.
MAX_NESTING_DEPTH = 64
#: Most nodes (scalars, sequences, mappings; a mapping key counts) the document may have with every
#: alias expanded, as validation sees it. That 1 MiB config has 140,000. The bound keeps loading
#: and validation near a second and 100 MB: a "billion laughs" stops at the alias that crosses it.
MAX_EXPANDED_NODES = 250_000
#: Longest integer literal in characters: every integer in the schema fits in 32 bits, and Python
#: refuses decimal conversions of more than 4300 digits.
MAX_INTEGER_CHARS = 100
#: Most problems listed in one ConfigError; the rest are counted. A file of 200,000 invalid list items
#: would otherwise log 28 MB on a reload.
MAX_REPORTED_PROBLEMS = 100

_TAG = "tag:yaml.org,2002:"
_ANY_TEXT = re.compile("")
# YAML 1.2.2 section 10.3.2, the core schema, as full matches. No YAML 1.1 forms: no yes/no/on/off,
# no sexagesimal 1:20, no 0b/0755 octal, no '_' digit separators, no timestamps, no '<<' merge.
_CORE_NULL = re.compile(r"(?:~|null|Null|NULL|)\Z")
_CORE_BOOL = re.compile(r"(?:true|True|TRUE|false|False|FALSE)\Z")
_CORE_INT = re.compile(r"(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)\Z")
_CORE_FLOAT = re.compile(
    r"(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"
)


class _LoadError(yaml.MarkedYAMLError):
    """A schema or limit violation at a position in the document (not a syntax error)."""

    # Any: a PyYAML Mark, or libyaml's, which has the same line and column but another type.
    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _CoreResolver(yaml.resolver.BaseResolver):
    """Implicit tags of plain scalars by the YAML 1.2 core schema; everything else is a string."""


# Order matters within a first character: "1" matches both, and must be an int.
_CoreResolver.add_implicit_resolver(_TAG + "null", _CORE_NULL, ["~", "n", "N", ""])
_CoreResolver.add_implicit_resolver(_TAG + "bool", _CORE_BOOL, list("tTfF"))
_CoreResolver.add_implicit_resolver(_TAG + "int", _CORE_INT, list("-+0123456789"))
_CoreResolver.add_implicit_resolver(_TAG + "float", _CORE_FLOAT, list("-+.0123456789"))


class _LimitedComposer(yaml.composer.Composer):
    """Composer that bounds nesting depth and the alias-expanded node count, and refuses cyclic aliases.

    Nodes reached through an alias are shared, not copied, so composing a billion laughs is cheap;
    what explodes is everything after it (construction to shared objects is cheap too, but
    validation walks every path). So the expanded size is counted here, as the document is read:
    each new node adds one, each alias adds the expanded size of the node it names.
    """

    # The event source: PyYAML's Python parser or libyaml's (see _loader_for).
    check_event: Callable[..., bool]
    peek_event: Callable[[], yaml.Event | None]

    def _next_node_event(self) -> yaml.NodeEvent:
        event = self.peek_event()
        if not isinstance(event, yaml.NodeEvent):  # the parser has checked the grammar: never reached
            raise _LoadError(f"expected a YAML node, found {event!r}", getattr(event, "start_mark", None))
        return event

    def __init__(self) -> None:
        yaml.composer.Composer.__init__(self)
        self._depth = 0
        self._expanded = 0
        self._expanded_size: dict[int, int] = {}  # id(node) -> expanded size, once the node is complete

    def _count(self, nodes: int, mark: Any, what: str) -> None:
        self._expanded += nodes
        if self._expanded > MAX_EXPANDED_NODES:
            raise _LoadError(
                f"{what} makes the document larger than {MAX_EXPANDED_NODES:,} nodes with aliases "
                "expanded (the limit, see docs/config.md)",
                mark,
            )

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self._next_node_event()
            target = self.anchors.get(event.anchor)
            if target is not None:
                size = self._expanded_size.get(id(target))
                if size is None:  # the anchored node is still being composed: the alias is inside it
                    raise _LoadError(
                        f"alias *{event.anchor} refers to a node that contains it", event.start_mark
                    )
                self._count(size, event.start_mark, f"alias *{event.anchor} ({size:,} nodes)")
            return super().compose_node(parent, index)  # an undefined alias raises ComposerError there
        event = self._next_node_event()
        if event.anchor is not None and event.anchor in self.anchors:
            first = self.anchors[event.anchor].start_mark
            raise _LoadError(
                f"duplicate anchor &{event.anchor} (first defined on line {first.line + 1})", event.start_mark
            )
        if self._depth >= MAX_NESTING_DEPTH:
            raise _LoadError(
                f"nesting is deeper than {MAX_NESTING_DEPTH} levels (the limit)", event.start_mark
            )
        before = self._expanded
        self._count(1, event.start_mark, "this node")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None:
            self._expanded_size[id(node)] = self._expanded - before
        return node


def _short_tag(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


def _kind(node: yaml.Node) -> str:
    return str(getattr(node, "id", "node"))


class _CoreConstructor(yaml.constructor.BaseConstructor):
    """Builds plain dicts, lists, str, int, float, bool and None; any other tag is an error."""

    def _text(self, node: yaml.Node, pattern: re.Pattern[str], what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise _LoadError(f"expected {what}, found a {_kind(node)}", node.start_mark)
        text = str(node.value)
        if not pattern.match(text):  # only reachable with an explicit tag such as `!!int abc`
            raise _LoadError(f"{_trunc(text)} is not {what} in the YAML 1.2 core schema", node.start_mark)
        return text

    def construct_core_null(self, node: yaml.Node) -> None:
        self._text(node, _CORE_NULL, "a null")

    def construct_core_bool(self, node: yaml.Node) -> bool:
        return self._text(node, _CORE_BOOL, "a boolean (true or false)").lower() == "true"

    def construct_core_int(self, node: yaml.Node) -> int:
        text = self._text(node, _CORE_INT, "an integer")
        if len(text) > MAX_INTEGER_CHARS:
            raise _LoadError(
                f"integer of {len(text)} characters (the limit is {MAX_INTEGER_CHARS})", node.start_mark
            )
        if text.startswith(("0x", "0o")):
            return int(text[2:], 16 if text[1] == "x" else 8)
        digits = text.lstrip("+-")
        if len(digits) > 1 and digits.startswith("0"):
            # YAML 1.1 (and plain PyYAML) reads 0755 as octal 493, YAML 1.2 as decimal 755.
            raise _LoadError(
                f"ambiguous integer {text}: a leading zero is octal in YAML 1.1 and decimal in YAML 1.2; "
                f"write {int(text)} or 0o{digits.lstrip('0') or '0'}",
                node.start_mark,
            )
        return int(text)

    def construct_core_float(self, node: yaml.Node) -> float:
        text = self._text(node, _CORE_FLOAT, "a floating-point number")
        if text.lstrip("+-").lower() == ".inf":
            return -math.inf if text.startswith("-") else math.inf
        if text.lower() == ".nan":
            return math.nan
        return float(text)

    def construct_core_str(self, node: yaml.Node) -> str:
        return self._text(node, _ANY_TEXT, "a string")

    def construct_core_seq(self, node: yaml.Node) -> list[Any]:
        if not isinstance(node, yaml.SequenceNode):
            raise _LoadError(f"expected a sequence, found a {_kind(node)}", node.start_mark)
        return [self.construct_object(child, deep=True) for child in node.value]

    def construct_core_map(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise _LoadError(f"expected a mapping, found a {_kind(node)}", node.start_mark)
        result: dict[str, Any] = {}
        key_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                kind = "null" if key is None else type(key).__name__
                raise _LoadError(
                    f"mapping keys must be strings, found {kind} {_trunc(key)}; quote it if it is a name",
                    key_node.start_mark,
                )
            plain = isinstance(key_node, yaml.ScalarNode) and not key_node.style  # libyaml: "", PyYAML: None
            if key == "<<" and plain:
                raise _LoadError(
                    "merge keys ('<<') are YAML 1.1 and not supported; write the keys out, "
                    "or alias the whole mapping",
                    key_node.start_mark,
                )
            if key in result:
                raise _LoadError(
                    f"duplicate key {key!r} (first defined on line {key_line[key]})", key_node.start_mark
                )
            key_line[key] = key_node.start_mark.line + 1
            result[key] = self.construct_object(value_node, deep=True)
        return result

    def construct_other(self, node: yaml.Node) -> object:
        raise _LoadError(
            f"tag {_short_tag(node.tag)} is not allowed: only the YAML 1.2 core schema is (strings, "
            "integers, floats, true/false, null, sequences and mappings; no !!binary, !!timestamp, !!set "
            "or custom tags)",
            node.start_mark,
        )

    # Replaces BaseConstructor's table: these tags and nothing else (None: any other tag).
    yaml_constructors: ClassVar[dict[str | None, Any]] = {
        _TAG + "null": construct_core_null,
        _TAG + "bool": construct_core_bool,
        _TAG + "int": construct_core_int,
        _TAG + "float": construct_core_float,
        _TAG + "str": construct_core_str,
        _TAG + "seq": construct_core_seq,
        _TAG + "map": construct_core_map,
        None: construct_other,
    }


class _PythonLoader(
    yaml.reader.Reader,
    yaml.scanner.Scanner,
    yaml.parser.Parser,
    _LimitedComposer,
    _CoreConstructor,
    _CoreResolver,
):
    """PyYAML's pure-Python reader, scanner and parser under the limited composer and the core schema."""

    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _LimitedComposer.__init__(self)
        _CoreConstructor.__init__(self)
        _CoreResolver.__init__(self)


if yaml.__with_libyaml__:
    from yaml._yaml import CParser

    class _LibyamlLoader(_LimitedComposer, CParser, _CoreConstructor, _CoreResolver):
        """libyaml's scanner and parser (3-5x faster than PyYAML's) under the same composer and schema.

        Only libyaml's event stream is used: _LimitedComposer comes first in the MRO, so composition,
        where the limits are enforced, stays in Python (PyYAML's C composer recurses without a bound).
        """

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _LimitedComposer.__init__(self)
            _CoreConstructor.__init__(self)
            _CoreResolver.__init__(self)


#: Parse with libyaml when PyYAML was built with it (tests switch this off to cover the other path).
USE_LIBYAML = yaml.__with_libyaml__


def _at(line: int, column: int) -> str:
    return f"line {line}, column {column}"


def _offset_position(text: str, offset: int) -> str:
    line_start = text.rfind("\n", 0, offset) + 1
    return _at(text.count("\n", 0, offset) + 1, offset - line_start + 1)


# What YAML 1.2 allows in a stream (section 5.1), as PyYAML's reader checks it; libyaml's reader
# reports byte offsets instead, so both are preceded by this check on the text.
_NOT_PRINTABLE_RE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _unprintable_problem(text: str) -> str | None:
    match = _NOT_PRINTABLE_RE.search(text)
    if match is None:
        return None
    return (
        f"{_offset_position(text, match.start())}: character U+{ord(match[0]):04X} is not allowed in YAML "
        "(only tab, newline and printable characters; no other control characters, lone surrogates, "
        "U+FFFE or U+FFFF)"
    )


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    if isinstance(err, yaml.reader.ReaderError):  # not reached: _unprintable_problem runs first
        return f"{_offset_position(text, err.position)}: YAML reader error: {err.reason}"
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        why = err.problem or "invalid YAML"
        if isinstance(err, yaml.scanner.ScannerError | yaml.parser.ParserError):
            why = f"YAML syntax error: {why}"
        elif not isinstance(err, _LoadError):
            why = f"YAML error: {why}"
        if err.context and err.context_mark is not None and err.context_mark.line != mark.line:
            why += f" ({err.context} started on line {err.context_mark.line + 1})"
        return f"{_at(mark.line + 1, mark.column + 1)}: {why}"
    return f"YAML error: {_trunc(str(err))}"


def _load_yaml(text: str) -> tuple[object, yaml.Node | None]:
    """The data in ``text`` and its root node (for error positions); raises yaml.YAMLError."""
    loader = _LibyamlLoader(text) if USE_LIBYAML and yaml.__with_libyaml__ else _PythonLoader(text)
    try:
        root = loader.get_single_node()
        return (None if root is None else loader.construct_document(root)), root
    finally:
        loader.dispose()


_PATH_PART_RE = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[([0-9]+)\]", re.ASCII)


def _split_path(path: str) -> list[int | str]:
    """The parts of a relative field path such as ``ports[1].port`` (an unparsable rest is dropped)."""
    parts: list[int | str] = []
    pos = 0
    while match := _PATH_PART_RE.match(path, pos):
        parts.append(match[1] if match[1] is not None else int(match[2]))
        pos = match.end()
    return parts


def _node_at(root: yaml.Node, loc: Sequence[int | str]) -> yaml.Node:
    """The deepest node along ``loc`` (the enclosing mapping for a missing key); a final ``"[key]"``
    selects the key node of the last mapping entry instead of its value."""
    at_key = bool(loc) and loc[-1] == "[key]"
    parts = loc[:-1] if at_key else loc
    node = root
    for i, part in enumerate(parts):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            entry = next(
                ((k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part), None
            )
            if entry is None:
                break
            node = entry[0] if at_key and i == len(parts) - 1 else entry[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _format_validation_error(err: ValidationError, root: yaml.Node | None) -> list[str]:
    lines: list[str] = []
    details = err.errors(include_url=False)
    for shown, detail in enumerate(details):
        if len(lines) >= MAX_REPORTED_PROBLEMS:
            lines.append(
                f"... and {len(details) - shown:,} more problems (only the first {MAX_REPORTED_PROBLEMS} "
                "are listed)"
            )
            break
        for loc, text in _describe(detail):
            if root is None:
                lines.append(text)
            else:
                mark = _node_at(root, loc).start_mark
                lines.append(f"{_at(mark.line + 1, mark.column + 1)}: {text}")
    return lines


def _parse(text: str, source: str) -> Config:
    if not isinstance(text, str):  # a caller passing bytes; checked because the loader assumes str
        raise ConfigError(f"expected the config as text, not {type(text).__name__}", source)
    if len(text) > MAX_DOCUMENT_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"the config is larger than {MAX_DOCUMENT_BYTES:,} bytes (the limit)", source)
    unprintable = _unprintable_problem(text)
    if unprintable is not None:
        raise ConfigError(unprintable, source)
    try:
        data, root = _load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, text), source) from None
    if data is None:
        raise ConfigError("the file is empty; expected a mapping with at least 'node' and 'capture'", source)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level (got {_trunc(data)})", source)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, root), source) from None


def _internal_error(err: Exception, source: str) -> ConfigError:
    return ConfigError(
        f"internal error while checking the config, please report it: {type(err).__name__}: "
        f"{_trunc(str(err))}",
        source,
    )


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate YAML ``text``; ``source`` names it in error messages.

    Any input gives a :class:`Config` or raises :class:`ConfigError`, never another exception, so
    that a reload or ``check-config`` need only catch ConfigError.
    """
    try:
        return _parse(text, source)
    except ConfigError:
        raise
    except Exception as err:  # the guarantee above; the fuzz tests make sure this is not reached
        raise _internal_error(err, source) from err


def _read_config_file(path: str | os.PathLike[str], source: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_DOCUMENT_BYTES + 1)
    except (OSError, ValueError, TypeError) as err:  # ValueError: a NUL in the path
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"cannot read config file: {why}", source) from None
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"config file is larger than {MAX_DOCUMENT_BYTES:,} bytes (the limit)", source)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        where = _at(raw.count(b"\n", 0, err.start) + 1, err.start - line_start + 1)
        raise ConfigError(
            f"{where}: config file is not valid UTF-8: {err.reason} (byte {err.start})", source
        ) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``; like :func:`parse_config`, only raises ConfigError."""
    source = str(path) if isinstance(path, str | os.PathLike) else repr(path)
    try:
        text = _read_config_file(path, source)
    except ConfigError:
        raise
    except Exception as err:  # the guarantee of the docstring, as in parse_config
        raise _internal_error(err, source) from err
    return parse_config(text, source)


def default_config() -> Config:
    """The example config shipped in the package as ``nodeproxy/default-config.yaml``."""
    text = resources.files("nodeproxy").joinpath(DEFAULT_CONFIG_RESOURCE).read_text(encoding="utf-8")
    return parse_config(text, f"nodeproxy/{DEFAULT_CONFIG_RESOURCE}")
