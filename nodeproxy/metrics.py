"""Prometheus metrics: Istio's standard metrics and nodeproxy's own, recorded per worker, merged and
rendered by the supervisor.

Recording (worker processes, on the event-loop thread): `WorkerMetrics` keeps plain Python counters and
fixed bucket arrays keyed by a label tuple. A finished request or connection costs a dict lookup on the
raw facts (service, source address, endpoint address, status ...) and a few integer additions; the Istio
label values are derived from the config once per distinct raw key, not per request. Nothing touches
prometheus-client on the hot path. Bytes moved by the splice relay are counted natively per connection
and arrive in its completion records; Python adds them once per connection, never per chunk.

Collection: on a scrape the supervisor asks every worker for `WorkerMetrics.snapshot()` (JSON over the
status pipe, like the admin API's other snapshots), merges them (`MetricsAggregate`) and renders the
Prometheus text format through a custom prometheus-client Collector (`render`). Counters stay monotonic across
worker restarts: the last snapshot of a worker that died is folded into a retired total, and a worker that
does not answer a scrape in time contributes its previous snapshot (`SupervisorMetrics`).

Labels are Istio's (https://istio.io/latest/docs/reference/config/metrics/), with reporter="source": the
proxy sits on the client's side. What the config cannot tell is "unknown" (see docs/observability.md for
how each label is derived). Label values come from the config, the protocol and the response only: never a
path or a pod address, so the number of series is bounded by the config; `max_series` caps it anyway.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from nodeproxy.balance import Endpoint
    from nodeproxy.config import Config

# Envoy's default histogram buckets, which Istio's standard histograms use: milliseconds for
# istio_request_duration_milliseconds, bytes for istio_request_bytes / istio_response_bytes.
HISTOGRAM_BOUNDS: Final[tuple[float, ...]] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000, 1800000,
    3600000,
)  # fmt: skip
# The same bounds in seconds: durations arrive in seconds and are compared without a multiplication.
_DURATION_BOUNDS_S: Final[tuple[float, ...]] = tuple(bound / 1000 for bound in HISTOGRAM_BOUNDS)
_BUCKETS: Final = len(HISTOGRAM_BOUNDS) + 1  # the last one is +Inf
# Bucket bounds written as Envoy writes them ("0.5", "1", "3600000"), so that a query naming a bucket
# (le="100") works as it does against Istio's proxies.
_LE: Final[tuple[str, ...]] = (*(str(int(b)) if b == int(b) else str(b) for b in HISTOGRAM_BOUNDS), "+Inf")

UNKNOWN: Final = "unknown"
REPORTER: Final = "source"  # Istio's value for metrics reported by the client side's proxy
# Istio's connection_security_policy for plaintext; "mutual_tls" once the mTLS tunnel exists.
SECURITY_POLICY: Final = "none"
PASSTHROUGH_SERVICE: Final = "PassthroughCluster"  # Istio's destination_service_name for non-services
# Series kept per family (request and TCP metrics separately) per worker; beyond it new label sets are
# not recorded (counted in nodeproxy_metrics_series_dropped_total). The labels come from the config, so
# only a config with thousands of services and workloads (times status codes) gets near it.
DEFAULT_MAX_SERIES: Final = 20000
# Raw-fact keys remembered per family before the cache is cleared (they include source addresses, so
# they are not bounded by the config alone; the series they map to are kept).
_KEY_CACHE_LIMIT: Final = 65536

# One peer's labels, in Istio's order; source_* and destination_* each have all of them.
PEER_LABELS: Final[tuple[str, ...]] = (
    "workload",
    "canonical_service",
    "canonical_revision",
    "workload_namespace",
    "principal",
    "app",
    "version",
    "cluster",
)
SERVICE_LABELS: Final[tuple[str, ...]] = (
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
)
_IDENTITY_LABELS: Final[tuple[str, ...]] = (
    "reporter",
    *(f"source_{name}" for name in PEER_LABELS),
    *(f"destination_{name}" for name in PEER_LABELS),
    *SERVICE_LABELS,
)
HTTP_LABELS: Final[tuple[str, ...]] = (
    *_IDENTITY_LABELS,
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
TCP_LABELS: Final[tuple[str, ...]] = (
    *_IDENTITY_LABELS,
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)

# Endpoint labels the peer labels come from, first present wins (Istio's own precedence for the
# canonical service and revision; the config names no Deployment, so the workload is the canonical
# service).
_CANONICAL_NAME_KEYS: Final = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_KEYS: Final = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)
_UNKNOWN_PEER: Final[tuple[str, ...]] = (UNKNOWN,) * len(PEER_LABELS)


@dataclass(frozen=True)
class Family:
    """A metric family nodeproxy exports besides Istio's."""

    name: str
    kind: str  # "counter" or "gauge"
    help: str
    labels: tuple[str, ...] = ()
    # How the workers' values of one label set combine: "sum" (counts), or "min" for a gauge that is a
    # point in time every worker reports alike (a certificate's expiry: the earliest one counts).
    merge: str = "sum"


# Counters and gauges of nodeproxy itself. Workers send values for those whose `kind` they record; the
# supervisor adds its own (configuration, workers). Documented in docs/observability.md.
INTERNAL: Final[dict[str, Family]] = {
    family.name: family
    for family in (
        Family("nodeproxy_retries_total", "counter", "HTTP request attempts retried.", ("service",)),
        Family(
            "nodeproxy_outlier_ejections_total",
            "counter",
            "Endpoints ejected by outlier detection.",
            ("service",),
        ),
        Family(
            "nodeproxy_circuit_breaker_overflows_total",
            "counter",
            "Requests or connections refused because a circuit breaker limit was reached.",
            ("service", "resource"),
        ),
        Family(
            "nodeproxy_rate_limited_requests_total",
            "counter",
            "Requests answered 429 by the local rate limiter.",
            ("service", "route"),
        ),
        Family(
            "nodeproxy_faults_injected_total",
            "counter",
            "Requests delayed or aborted by fault injection.",
            ("service", "route"),
        ),
        Family("nodeproxy_connections_accepted_total", "counter", "Connections accepted by the listener."),
        Family(
            "nodeproxy_connections_refused_total",
            "counter",
            "Accepted connections reset without reaching an upstream (no endpoint, limit, failures).",
        ),
        Family(
            "nodeproxy_upstream_connect_failures_total",
            "counter",
            "Failed upstream connects of TCP connections.",
        ),
        Family("nodeproxy_dispatch_errors_total", "counter", "Connections reset by an internal error."),
        Family(
            "nodeproxy_relay_connections_closed_total",
            "counter",
            "Relayed TCP connections that ended, by how they ended (the relay's completion kinds; "
            "failed connects are counted by nodeproxy_upstream_connect_failures_total).",
            ("ending",),
        ),
        Family(
            "nodeproxy_relay_bytes_total",
            "counter",
            "Bytes the splice relay moved, counted natively per connection and added when it ends "
            "(direction upstream: client to upstream).",
            ("direction",),
        ),
        Family(
            "nodeproxy_access_log_dropped_total",
            "counter",
            "Access-log records lost to a full or closed output.",
        ),
        Family(
            "nodeproxy_tracing_spans_total",
            "counter",
            "Sampled spans by what became of them: queued for export, dropped (queue full, or left at "
            "stop), exported, rejected by the collector.",
            ("outcome",),
        ),
        Family("nodeproxy_tracing_export_failures_total", "counter", "OTLP exports that failed."),
        Family(
            "nodeproxy_metrics_series_dropped_total",
            "counter",
            "Observations not recorded because their family reached the series limit.",
            ("family",),
        ),
        Family(
            "nodeproxy_active_connections",
            "gauge",
            "Client connections open now: tcp on the splice relay (also upgraded HTTP), http in the HTTP "
            "engine.",
            ("protocol",),
        ),
        Family("nodeproxy_relay_connecting", "gauge", "Upstream connects of the splice relay in progress."),
        Family("nodeproxy_relay_pipes_pooled", "gauge", "Empty splice pipes kept for reuse."),
        Family("nodeproxy_http_upstream_connections", "gauge", "Upstream connections of the HTTP engine."),
        Family(
            "nodeproxy_worker_config_generation",
            "gauge",
            "Routing-state generation each worker runs (all equal once a config has reached every worker).",
            ("worker",),
        ),
        Family("nodeproxy_tracing_spans_pending", "gauge", "Spans waiting in the export queue."),
        # Supervisor-level families.
        Family(
            "nodeproxy_config_version", "gauge", "Version of the running config (1 at start, +1 per change)."
        ),
        Family("nodeproxy_config_applied_timestamp_seconds", "gauge", "When the running config was applied."),
        Family("nodeproxy_workers", "gauge", "Worker processes running."),
        Family("nodeproxy_worker_restarts_total", "counter", "Worker processes replaced since start."),
        Family(
            "nodeproxy_metrics_workers_missing",
            "gauge",
            "Workers that did not answer this scrape in time (their previous counters are shown).",
        ),
        Family(
            "nodeproxy_certificate_expiry_timestamp_seconds",
            "gauge",
            "Expiry time of each workload certificate the proxy holds. Empty until mTLS exists.",
            ("identity",),
            merge="min",
        ),
    )
}


# -- recording (worker) -------------------------------------------------------------------------------


class _HttpSeries:
    """One label set of the request metrics: a count, sums and non-cumulative bucket counts."""

    __slots__ = (
        "bytes_in",
        "bytes_in_buckets",
        "bytes_out",
        "bytes_out_buckets",
        "count",
        "duration_buckets",
        "duration_s",
        "labels",
    )

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.count = 0
        self.duration_s = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration_buckets = [0] * _BUCKETS
        self.bytes_in_buckets = [0] * _BUCKETS
        self.bytes_out_buckets = [0] * _BUCKETS


class _TcpSeries:
    """One label set of the TCP metrics."""

    __slots__ = ("closed", "labels", "opened", "received", "sent")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.opened = 0
        self.closed = 0
        self.received = 0  # client -> upstream (Istio: bytes received during the request)
        self.sent = 0  # upstream -> client (Istio: bytes sent during the response)


def _first_label(labels: Mapping[str, str], keys: Iterable[str]) -> str | None:
    for key in keys:
        value = labels.get(key)
        if value:
            return value
    return None


def peer_labels(
    labels: Mapping[str, str], namespace: str | None = None, principal: str | None = None
) -> tuple[str, ...]:
    """The PEER_LABELS values of a workload with these Kubernetes labels (an endpoint's `labels`) and,
    when the mesh's identity section lists the pod, its namespace and SPIFFE ID."""
    canonical = _first_label(labels, _CANONICAL_NAME_KEYS)
    revision = _first_label(labels, _CANONICAL_REVISION_KEYS)
    return (
        canonical or UNKNOWN,  # workload: the config has no owner (Deployment) name
        canonical or UNKNOWN,
        revision or ("latest" if canonical else UNKNOWN),  # Istio's default revision is "latest"
        namespace or UNKNOWN,  # identity.workloads[].namespace; services carry none
        principal or UNKNOWN,  # the pod's SPIFFE ID (identity.workloads), as Istio's principal labels
        labels.get("app") or UNKNOWN,
        labels.get("version") or UNKNOWN,
        UNKNOWN,  # cluster
    )


class WorkerMetrics:
    """One worker process's metrics. Not thread-safe: call it from the worker's event-loop thread only.

    The recording methods are the hot path; the others run per config change or per scrape.
    `max_series` bounds the request and the TCP families separately (DEFAULT_MAX_SERIES).
    """

    def __init__(self, config: Config | None = None, max_series: int = DEFAULT_MAX_SERIES) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, not {max_series}")
        self.max_series = max_series
        # PEER_LABELS values by address (labels of every endpoint with that address merged) and by
        # (service, address): a pod listed in several services with different labels (a config
        # written by hand) gets the labels of the service a connection went to.
        self._peers: dict[str, tuple[str, ...]] = {}
        self._service_peers: dict[tuple[str, str], tuple[str, ...]] = {}
        self._services: dict[str, tuple[str, ...]] = {}  # service name -> SERVICE_LABELS values
        self._http: dict[tuple[str, ...], _HttpSeries] = {}
        self._http_keys: dict[tuple[Any, ...], _HttpSeries] = {}
        self._tcp: dict[tuple[str, ...], _TcpSeries] = {}
        self._tcp_keys: dict[tuple[Any, ...], _TcpSeries] = {}
        self._counters: dict[str, dict[tuple[str, ...], int]] = {}
        # Where observations beyond max_series go: counted, never exported as series.
        self._http_overflow = _HttpSeries(())
        self._tcp_overflow = _TcpSeries(())
        if config is not None:
            self.update_config(config)

    def update_config(self, config: Config) -> None:
        """Derive the label values of the services and workloads this config names. Call on every
        config change; series recorded under the old labels keep their counts."""
        merged: dict[str, dict[str, str]] = {}
        service_peers: dict[tuple[str, str], tuple[str, ...]] = {}
        services: dict[str, tuple[str, ...]] = {}
        # The mesh's inventory (identity.workloads): namespace, SPIFFE ID and labels of every pod, also
        # of client pods that are no service's endpoint.
        workloads: dict[str, tuple[str, str]] = {}
        workload_labels: dict[str, Mapping[str, str]] = {}
        if config.identity is not None:
            trust_domain = config.identity.trust_domain
            for workload in config.identity.workloads:
                address = str(workload.ip)
                workloads[address] = (workload.namespace, str(workload.spiffe_id(trust_domain)))
                workload_labels[address] = workload.labels
                merged[address] = dict(workload.labels)
        for service in config.services:
            # No namespace in the config: destination_service is the bare name, not Istio's FQDN.
            services[service.name] = (service.name, service.name, UNKNOWN)
            for endpoint in service.endpoints:
                address = str(endpoint.address)
                namespace, principal = workloads.get(address, (None, None))
                service_peers[(service.name, address)] = peer_labels(
                    {**workload_labels.get(address, {}), **endpoint.labels}, namespace, principal
                )
                labels = merged.setdefault(address, {})
                for key, value in endpoint.labels.items():
                    labels.setdefault(key, value)
        self._peers = {
            address: peer_labels(labels, *workloads.get(address, (None, None)))
            for address, labels in merged.items()
        }
        self._service_peers, self._services = service_peers, services
        self._http_keys.clear()
        self._tcp_keys.clear()

    def _identity(
        self, service: str | None, source_ip: str, destination_ip: str | None, tcp: bool
    ) -> tuple[str, ...]:
        source = self._peers.get(source_ip, _UNKNOWN_PEER)
        if destination_ip is None:
            destination = _UNKNOWN_PEER
        elif service is not None and (service, destination_ip) in self._service_peers:
            destination = self._service_peers[(service, destination_ip)]
        else:  # a passthrough connection to a pod, or a service gone since
            destination = self._peers.get(destination_ip, _UNKNOWN_PEER)
        if service is None:
            # A TCP connection to an address that is no service is passed through, as Istio's
            # PassthroughCluster; a request without a service had its route removed under it.
            service_labels: tuple[str, ...] = (UNKNOWN, PASSTHROUGH_SERVICE if tcp else UNKNOWN, UNKNOWN)
        else:
            service_labels = self._services.get(service) or (service, service, UNKNOWN)
        return (REPORTER, *source, *destination, *service_labels)

    def workload(self, address: str | None, service: str | None = None) -> str | None:
        """The workload name the metrics give the pod at `address` (as an endpoint of `service`, when
        given), or None when the config does not know it: for access-log records."""
        if address is None:
            return None
        peer = self._service_peers.get((service, address)) if service is not None else None
        if peer is None:
            peer = self._peers.get(address)
        if peer is None or peer[0] == UNKNOWN:
            return None
        return peer[0]

    # -- hot path ------------------------------------------------------------------------------------

    def http_request(
        self,
        service: str | None,
        source_ip: str,
        endpoint: Endpoint | None,
        protocol: str,
        status: int,
        grpc_status: int,
        flags: str,
        duration_s: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        """One finished HTTP request. protocol: Istio's request_protocol, "http" or "grpc"; status 0: no
        response; grpc_status -1: none; flags: Envoy-style response flags ("UF,URX") or "-"; bytes_in:
        request body bytes, bytes_out: response body bytes."""
        key = (service, source_ip, endpoint.address if endpoint is not None else None, protocol, status,
               grpc_status, flags)  # fmt: skip
        series = self._http_keys.get(key)
        if series is None:
            series = self._http_series(key)
        series.count += 1
        series.duration_s += duration_s
        series.bytes_in += bytes_in
        series.bytes_out += bytes_out
        series.duration_buckets[bisect_left(_DURATION_BOUNDS_S, duration_s)] += 1
        series.bytes_in_buckets[bisect_left(HISTOGRAM_BOUNDS, bytes_in)] += 1
        series.bytes_out_buckets[bisect_left(HISTOGRAM_BOUNDS, bytes_out)] += 1

    def tcp_opened(self, service: str | None, source_ip: str, destination_ip: str | None) -> None:
        """A client connection was taken on: service None for a passthrough (not a service);
        destination_ip: the endpoint (or original destination) it goes to, if one is chosen."""
        series = self._tcp_keys.get((service, source_ip, destination_ip, "-"))
        if series is None:
            series = self._tcp_series((service, source_ip, destination_ip, "-"))
        series.opened += 1

    def tcp_closed(
        self,
        service: str | None,
        source_ip: str,
        destination_ip: str | None,
        flags: str,
        bytes_received: int,
        bytes_sent: int,
    ) -> None:
        """A client connection ended. bytes_received: client to upstream, bytes_sent: upstream to
        client; flags: Envoy-style response flags ("UF", "UO", "UH") or "-"."""
        key = (service, source_ip, destination_ip, flags)
        series = self._tcp_keys.get(key)
        if series is None:
            series = self._tcp_series(key)
        series.closed += 1
        series.received += bytes_received
        series.sent += bytes_sent

    def count(self, family: str, labels: tuple[str, ...], amount: int = 1) -> None:
        """Add to one of the INTERNAL counters (labels in the family's order)."""
        values = self._counters.get(family)
        if values is None:
            spec = INTERNAL.get(family)
            if spec is None or spec.kind != "counter" or len(spec.labels) != len(labels):
                raise ValueError(f"not an internal counter with {len(labels)} labels: {family}")
            values = self._counters[family] = {}
        values[labels] = values.get(labels, 0) + amount

    def retry(self, service: str) -> None:
        self.count("nodeproxy_retries_total", (service,))

    def ejection(self, service: str) -> None:
        self.count("nodeproxy_outlier_ejections_total", (service,))

    def overflow(self, service: str, resource: str) -> None:
        """resource: which limit, e.g. "connections", "pending", "requests", "retries"."""
        self.count("nodeproxy_circuit_breaker_overflows_total", (service, resource))

    def rate_limited(self, service: str, route: str) -> None:
        self.count("nodeproxy_rate_limited_requests_total", (service, route))

    def fault_injected(self, service: str, route: str) -> None:
        self.count("nodeproxy_faults_injected_total", (service, route))

    # -- new series ----------------------------------------------------------------------------------

    def _http_series(self, key: tuple[Any, ...]) -> _HttpSeries:
        service, source_ip, destination_ip, protocol, status, grpc_status, flags = key
        labels = (
            *self._identity(service, source_ip, destination_ip, tcp=False),
            protocol,
            str(status),
            str(grpc_status) if grpc_status >= 0 else "",  # Istio leaves it empty for non-gRPC requests
            flags,
            SECURITY_POLICY,
        )
        series = self._http.get(labels)
        if series is None:
            # Beyond the limit the key maps to a series that is never exported, so the next request
            # with it costs no more than any other (no label building each time).
            series = self._http_overflow
            if len(self._http) < self.max_series:
                series = self._http[labels] = _HttpSeries(labels)
        if len(self._http_keys) >= _KEY_CACHE_LIMIT:
            self._http_keys.clear()
        self._http_keys[key] = series
        return series

    def _tcp_series(self, key: tuple[Any, ...]) -> _TcpSeries:
        service, source_ip, destination_ip, flags = key
        labels = (
            *self._identity(service, source_ip, destination_ip, tcp=True),
            "tcp",
            flags,
            SECURITY_POLICY,
        )
        series = self._tcp.get(labels)
        if series is None:
            series = self._tcp_overflow
            if len(self._tcp) < self.max_series:
                series = self._tcp[labels] = _TcpSeries(labels)
        if len(self._tcp_keys) >= _KEY_CACHE_LIMIT:
            self._tcp_keys.clear()
        self._tcp_keys[key] = series
        return series

    # -- scrape --------------------------------------------------------------------------------------

    def snapshot(
        self,
        counters: Mapping[str, Iterable[tuple[tuple[str, ...], float]]] | None = None,
        gauges: Mapping[str, Iterable[tuple[tuple[str, ...], float]]] | None = None,
    ) -> dict[str, Any]:
        """Everything recorded so far, JSON-ready, plus the caller's `counters` (cumulative values it
        keeps itself, e.g. the listener's) and `gauges` (sampled now), by INTERNAL family name."""
        all_counters: dict[str, list[list[Any]]] = {
            name: [[list(labels), value] for labels, value in values.items()]
            for name, values in self._counters.items()
        }
        dropped = [
            [["istio_requests_total"], self._http_overflow.count],
            [["istio_tcp_connections_opened_total"], self._tcp_overflow.opened],
            [["istio_tcp_connections_closed_total"], self._tcp_overflow.closed],
        ]
        if any(count for _labels, count in dropped):
            all_counters["nodeproxy_metrics_series_dropped_total"] = [d for d in dropped if d[1]]
        for name, values in (counters or {}).items():
            all_counters.setdefault(name, []).extend([list(labels), value] for labels, value in values)
        return {
            "http": [
                [
                    list(s.labels),
                    s.count,
                    s.duration_s,
                    s.bytes_in,
                    s.bytes_out,
                    s.duration_buckets,
                    s.bytes_in_buckets,
                    s.bytes_out_buckets,
                ]
                for s in self._http.values()
            ],
            "tcp": [[list(s.labels), s.opened, s.closed, s.received, s.sent] for s in self._tcp.values()],
            "counters": all_counters,
            "gauges": {
                name: [[list(labels), value] for labels, value in values]
                for name, values in (gauges or {}).items()
            },
        }


# -- merging (supervisor) -----------------------------------------------------------------------------


@dataclass
class MetricsAggregate:
    """Worker snapshots added together, label set by label set."""

    http: dict[tuple[str, ...], list[Any]] = field(default_factory=dict)
    tcp: dict[tuple[str, ...], list[int]] = field(default_factory=dict)
    counters: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    gauges: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)

    def add(self, snapshot: Mapping[str, Any], with_gauges: bool = True) -> None:
        """Add one worker's snapshot; with_gauges False adds only what is cumulative (counters and
        histograms): the state of a worker that is gone, or did not answer."""
        for labels, count, duration_s, bytes_in, bytes_out, duration_b, in_b, out_b in snapshot.get(
            "http", ()
        ):
            key = tuple(labels)
            if len(key) != len(HTTP_LABELS) or len(duration_b) != _BUCKETS:
                raise ValueError(f"request series with {len(key)} labels and {len(duration_b)} buckets")
            total = self.http.get(key)
            if total is None:
                self.http[key] = [
                    count,
                    duration_s,
                    bytes_in,
                    bytes_out,
                    list(duration_b),
                    list(in_b),
                    list(out_b),
                ]
                continue
            total[0] += count
            total[1] += duration_s
            total[2] += bytes_in
            total[3] += bytes_out
            for buckets, more in ((total[4], duration_b), (total[5], in_b), (total[6], out_b)):
                for i, value in enumerate(more):
                    buckets[i] += value
        for labels, *values in snapshot.get("tcp", ()):
            key = tuple(labels)
            if len(key) != len(TCP_LABELS) or len(values) != 4:
                raise ValueError(f"TCP series with {len(key)} labels and {len(values)} values")
            tcp_total = self.tcp.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate(values):
                tcp_total[i] += value
        kinds = ("counters", "gauges") if with_gauges else ("counters",)
        for kind in kinds:
            target = self.counters if kind == "counters" else self.gauges
            for name, samples in snapshot.get(kind, {}).items():
                spec = INTERNAL.get(name)
                if spec is None:
                    continue  # a newer worker's family this supervisor does not know (an upgrade)
                values = target.setdefault(name, {})
                for labels, value in samples:
                    key = tuple(labels)
                    if len(key) != len(spec.labels):
                        raise ValueError(f"{name} with labels {key}")
                    if spec.merge == "min" and key in values:
                        values[key] = min(values[key], value)
                    else:
                        values[key] = values.get(key, 0) + value

    def copy(self) -> MetricsAggregate:
        result = MetricsAggregate()
        result.add(self.to_snapshot())
        return result

    def to_snapshot(self) -> dict[str, Any]:
        return {
            "http": [[list(k), v[0], v[1], v[2], v[3], v[4], v[5], v[6]] for k, v in self.http.items()],
            "tcp": [[list(k), *v] for k, v in self.tcp.items()],
            "counters": {n: [[list(k), v] for k, v in vs.items()] for n, vs in self.counters.items()},
            "gauges": {n: [[list(k), v] for k, v in vs.items()] for n, vs in self.gauges.items()},
        }

    def set_gauge(self, name: str, labels: tuple[str, ...], value: float) -> None:
        spec = INTERNAL[name]
        if len(labels) != len(spec.labels):
            raise ValueError(f"{name} takes labels {spec.labels}")
        self.gauges.setdefault(name, {})[labels] = value

    def set_counter(self, name: str, labels: tuple[str, ...], value: float) -> None:
        spec = INTERNAL[name]
        if spec.kind != "counter" or len(labels) != len(spec.labels):
            raise ValueError(f"{name} is not a counter with labels {labels}")
        self.counters.setdefault(name, {})[labels] = value


class SupervisorMetrics:
    """What the supervisor keeps between scrapes so that merged counters never go down: each worker's
    last snapshot (by pid), and the folded totals of workers that are gone."""

    def __init__(self) -> None:
        self.retired = MetricsAggregate()
        self._last: dict[int, Mapping[str, Any]] = {}  # pid -> last metrics snapshot

    def merge(
        self, answered: Mapping[int, Mapping[str, Any]], running: Iterable[int]
    ) -> tuple[MetricsAggregate, int]:
        """The daemon's metrics from the snapshots of the workers that `answered` (pid -> snapshot) and the
        previous ones of the `running` pids that did not; also how many of those were missing."""
        total = self.retired.copy()
        missing = 0
        for pid in running:
            snapshot = answered.get(pid)
            if snapshot is not None:
                self._last[pid] = snapshot
                total.add(snapshot)
                continue
            missing += 1
            last = self._last.get(pid)
            if last is not None:
                total.add(last, with_gauges=False)
        return total, missing

    def worker_gone(self, pid: int) -> None:
        """A worker exited: what it last reported stays counted (what it counted after that is lost)."""
        last = self._last.pop(pid, None)
        if last is not None:
            self.retired.add(last, with_gauges=False)


# -- rendering ----------------------------------------------------------------------------------------


def _cumulative(buckets: Iterable[int]) -> list[tuple[str, float]]:
    running = 0
    out: list[tuple[str, float]] = []
    for le, count in zip(_LE, buckets, strict=True):
        running += count
        out.append((le, running))
    return out


class _AggregateCollector(Collector):
    def __init__(self, aggregate: MetricsAggregate) -> None:
        self.aggregate = aggregate

    def collect(self) -> Iterator[Metric]:
        agg = self.aggregate
        labels = list(HTTP_LABELS)
        requests = CounterMetricFamily(
            "istio_requests_total", "Requests handled (Istio standard metric).", labels=labels
        )
        duration = HistogramMetricFamily(
            "istio_request_duration_milliseconds", "Request durations in milliseconds.", labels=labels
        )
        request_bytes = HistogramMetricFamily(
            "istio_request_bytes", "Request body sizes in bytes.", labels=labels
        )
        response_bytes = HistogramMetricFamily(
            "istio_response_bytes", "Response body sizes in bytes.", labels=labels
        )
        for key, (count, duration_s, bytes_in, bytes_out, duration_b, in_b, out_b) in sorted(
            agg.http.items()
        ):
            requests.add_metric(key, count)
            duration.add_metric(key, _cumulative(duration_b), duration_s * 1000)
            request_bytes.add_metric(key, _cumulative(in_b), bytes_in)
            response_bytes.add_metric(key, _cumulative(out_b), bytes_out)
        yield from (requests, duration, request_bytes, response_bytes)
        tcp_labels = list(TCP_LABELS)
        tcp_families = (
            CounterMetricFamily(
                "istio_tcp_connections_opened_total", "TCP connections opened.", labels=tcp_labels
            ),
            CounterMetricFamily(
                "istio_tcp_connections_closed_total", "TCP connections closed.", labels=tcp_labels
            ),
            CounterMetricFamily(
                "istio_tcp_received_bytes_total",
                "Bytes received from clients (request direction).",
                labels=tcp_labels,
            ),
            CounterMetricFamily(
                "istio_tcp_sent_bytes_total", "Bytes sent to clients (response direction).", labels=tcp_labels
            ),
        )
        for key, values in sorted(agg.tcp.items()):
            for family, value in zip(tcp_families, values, strict=True):
                family.add_metric(key, value)
        yield from tcp_families
        for name, spec in INTERNAL.items():
            samples = (agg.counters if spec.kind == "counter" else agg.gauges).get(name, {})
            family_type = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            metric = family_type(name, spec.help, labels=list(spec.labels))
            for key, sample in sorted(samples.items()):
                metric.add_metric(key, sample)
            yield metric


def render(aggregate: MetricsAggregate) -> bytes:
    """The Prometheus text exposition (format 0.0.4) of an aggregate; every family is present, also
    when it has no samples yet (so dashboards and alerts see the name)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_AggregateCollector(aggregate))
    return generate_latest(registry)


# The classic text format, which every Prometheus version and Istio's scrapers parse (generate_latest
# writes it for the legacy-valid names used here; prometheus-client's CONTENT_TYPE_LATEST may name a
# newer version).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATHS: Final = frozenset({"/metrics", "/stats/prometheus"})  # the second is Istio's sidecar path

__all__ = [
    "CONTENT_TYPE",
    "HISTOGRAM_BOUNDS",
    "HTTP_LABELS",
    "INTERNAL",
    "METRICS_PATHS",
    "TCP_LABELS",
    "MetricsAggregate",
    "SupervisorMetrics",
    "WorkerMetrics",
    "render",
]
