"""The authorization entry points the proxy calls: one :class:`AuthzEngine` per config snapshot.

Build it with :func:`compile_authz` where the routing snapshot is built (config load / reload), and
keep one :class:`~nodeproxy.authz.jwt.JwksRefresher` per worker process for the process's lifetime
(its :meth:`~nodeproxy.authz.jwt.JwksRefresher.run` task keeps JWKS documents fresh; recompiling
reuses the keys of unchanged sources).

Per connection, :meth:`AuthzEngine.check_connection`; per HTTP request head,
:meth:`AuthzEngine.check_request`. Both are pure given the snapshot and the in-memory keys: no I/O,
no waiting. Their answers are data the caller acts on:

* :class:`ConnectionVerdict` -- allowed, or close the connection (reason for the log);
* :class:`RequestAllowed` -- forward, with header edits (claims out, token and spoofed claim
  headers removed);
* :class:`RequestDenied` -- a local reply: 401 + WWW-Authenticate (gRPC UNAUTHENTICATED, 16) for
  a failed JWT check, 403 (gRPC PERMISSION_DENIED, 7) for a policy denial.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Final, Protocol

from nodeproxy.authz.config import AuthzConfig, JwtRule
from nodeproxy.authz.jwt import (
    JwksRefresher,
    JwksSource,
    JwtAuthenticator,
    JwtFailure,
    JwtIdentity,
    VerifiedTokens,
)
from nodeproxy.authz.peer import CompiledPeerAuthentication, compile_peer_authentication
from nodeproxy.authz.policy import (
    ALLOW_NO_POLICY,
    CompiledPolicies,
    L4Request,
    L7Request,
    Workload,
    compile_policies,
    normalize_path,
    selector_matches,
)
from nodeproxy.proxy.http_route import RequestAttrs
from nodeproxy.resilience.outcome import LocalAnswer

__all__ = [
    "GRPC_PERMISSION_DENIED",
    "GRPC_UNAUTHENTICATED",
    "AuthzEngine",
    "ConnectionVerdict",
    "RequestAllowed",
    "RequestDenied",
    "RequestVerdict",
    "compile_authz",
    "workloads_on_node",
]

GRPC_UNAUTHENTICATED: Final = 16
GRPC_PERMISSION_DENIED: Final = 7
# Response flags (x-nodeproxy-flags and the access log), after Envoy's RBAC flag.
FLAG_RBAC: Final = "RBAC"  # denied by an authorization policy (403)
FLAG_JWT: Final = "JWT"  # JWT authentication failed (401)


@dataclass(frozen=True, slots=True)
class ConnectionVerdict:
    allowed: bool
    reason: str


@dataclass(frozen=True, slots=True)
class RequestAllowed:
    """Forward the request; apply `headers_remove` then `headers_add` to the upstream request."""

    reason: str
    identity: JwtIdentity | None
    headers_add: tuple[tuple[str, str], ...] = ()
    headers_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RequestDenied:
    """Answer locally. `detail` is the generic text the client sees; `reason` is for the logs."""

    status: int  # 401 or 403
    grpc_status: int  # 16 UNAUTHENTICATED or 7 PERMISSION_DENIED
    flag: str
    detail: str
    reason: str
    response_headers: tuple[tuple[str, str], ...] = ()  # WWW-Authenticate on 401

    def local_answer(self, grpc: bool) -> LocalAnswer:
        """The local reply for http.py's _reply(): for a gRPC request the engine answers HTTP 200 with
        grpc-status 16 or 7 instead of the status; WWW-Authenticate goes with a 401 either way."""
        return LocalAnswer(
            self.status, self.flag, self.detail, self.grpc_status if grpc else None, self.response_headers
        )


RequestVerdict = RequestAllowed | RequestDenied


@dataclass(eq=False)
class AuthzEngine:
    """Authentication and authorization of one config snapshot."""

    config: AuthzConfig
    refresher: JwksRefresher
    workloads: Mapping[str, Workload]  # pod IP -> workload, for the destination's policies
    policies: CompiledPolicies
    peer_authentication: CompiledPeerAuthentication
    # Request header names check_request() reads (policy conditions and JWT locations): copy these
    # from the engine's request head into RequestAttrs.headers.
    header_names: frozenset[str]
    jwks_sources: Mapping[tuple[str, ...], JwksSource]  # by what they load (JwksRefresher.sources_for)
    # Verified tokens, shared by the authenticators of every workload of this snapshot.
    verified_tokens: VerifiedTokens = field(default_factory=VerifiedTokens, repr=False)
    _authenticators: dict[Workload | None, JwtAuthenticator | None] = field(default_factory=dict, repr=False)

    def workload(self, ip: str) -> Workload | None:
        return self.workloads.get(ip)

    def check_connection(self, request: L4Request, http: bool) -> ConnectionVerdict:
        """A new connection to `request.destination_ip`:port. Plaintext (no source principal) must be
        accepted by the destination's PeerAuthentication first.

        http=False: nobody looks at requests on this connection; the policies are applied now at L4
        (an ALLOW rule with L7 parts never matches, a DENY rule's L7 parts are dropped).
        http=True: check_request() judges every request on it (here, or on the sending node for an
        HTTP stream that arrived through the tunnel); only what the connection decides is applied
        now (CompiledPolicies.evaluate_connection_for_l7: L4-only DENY rules, and some ALLOW rule's L4
        parts must match)."""
        workload = self.workloads.get(request.destination_ip)
        if request.source_principal is None:
            peer = self.peer_authentication.plaintext(workload, request.destination_port)
            if not peer.accepted:
                return ConnectionVerdict(False, peer.reason)
        if http:
            decision = self.policies.evaluate_connection_for_l7(workload, request)
        else:
            decision = self.policies.evaluate(workload, request)
        return ConnectionVerdict(decision.allowed, decision.reason)

    def decides_per_request(self, destination_ip: str) -> bool:
        """Whether connections to this pod can only be judged request by request: a JWT rule covers it,
        or one of its policies has an L7 attribute (a connection check would apply that rule as L4:
        deny). The inbound path then gives a plaintext connection to an HTTP port to the HTTP engine."""
        workload = self.workloads.get(destination_ip)
        return self.authenticator(workload) is not None or self.policies.applicable(workload).uses_l7

    def authenticator(self, workload: Workload | None) -> JwtAuthenticator | None:
        """The JWT check for requests to `workload`; None when no RequestAuthentication covers it."""
        if workload in self._authenticators:
            return self._authenticators[workload]
        applicable = [
            ra
            for ra in self.config.request_authentication
            if selector_matches(ra.namespace, ra.selector, workload)
        ]
        authenticator: JwtAuthenticator | None = None
        if applicable:
            order = {"workload": 0, "namespace": 1, "mesh": 2}
            applicable.sort(key=lambda ra: order[ra.scope])  # stable: config order within a scope
            rules: list[JwtRule] = [rule for ra in applicable for rule in ra.jwt_rules]
            authenticator = JwtAuthenticator.build(
                rules,
                self.jwks_sources,
                self.config.jwt,
                any(ra.require_token for ra in applicable),
                verified=self.verified_tokens,
            )
        if len(self._authenticators) >= 4096:
            self._authenticators.clear()
        self._authenticators[workload] = authenticator
        return authenticator

    def check_request(self, request: L4Request, attrs: RequestAttrs) -> RequestVerdict:
        """One HTTP request head on a connection described by `request` (the same L4Request as
        check_connection's). `attrs.headers` must hold :attr:`header_names`."""
        workload = self.workloads.get(request.destination_ip)
        identity: JwtIdentity | None = None
        add: tuple[tuple[str, str], ...] = ()
        remove: tuple[str, ...] = ()
        authenticator = self.authenticator(workload)
        if authenticator is not None:
            outcome = authenticator.authenticate(attrs.headers, attrs.query)
            if isinstance(outcome, JwtFailure):
                return RequestDenied(
                    401,
                    GRPC_UNAUTHENTICATED,
                    FLAG_JWT,
                    "Jwt is missing" if outcome.missing else "Jwt verification fails",
                    f"JWT: {outcome.reason}"
                    + (" (JWKS re-fetch requested)" if outcome.refetch_requested else ""),
                    (("www-authenticate", outcome.www_authenticate),),
                )
            identity, add, remove = outcome.identity, outcome.headers_add, outcome.headers_remove
        if self.policies.applicable(workload).empty:
            return RequestAllowed(ALLOW_NO_POLICY.reason, identity, add, remove)
        l7 = L7Request(
            request.source_ip,
            request.source_principal,
            request.destination_ip,
            request.destination_port,
            attrs.method,
            attrs.authority,
            normalize_path(attrs.path, self.config.path_normalization),
            attrs.headers,
            identity,
        )
        decision = self.policies.evaluate(workload, l7)
        if not decision.allowed:
            return RequestDenied(
                403, GRPC_PERMISSION_DENIED, FLAG_RBAC, "RBAC: access denied", decision.reason
            )
        return RequestAllowed(decision.reason, identity, add, remove)


class WorkloadRecord(Protocol):
    """What the identity config says about one pod (nodeproxy.identity.config.WorkloadConfig)."""

    @property
    def ip(self) -> IPv4Address | str: ...
    @property
    def namespace(self) -> str: ...
    @property
    def service_account(self) -> str: ...
    @property
    def node(self) -> str: ...


def workloads_on_node(
    records: Iterable[WorkloadRecord], node: str, labels: Mapping[str, Mapping[str, str]] | None = None
) -> dict[str, Workload]:
    """Pod IP -> Workload for the pods on `node` (whose inbound traffic this node authorizes).

    `labels`: pod IP -> labels, for policies and objects with a `selector.match_labels` (the identity
    config has no labels; the services' endpoint labels are a source of them)."""
    labels = labels or {}
    return {
        str(r.ip): Workload.of(r.namespace, r.service_account, labels.get(str(r.ip)))
        for r in records
        if r.node == node
    }


def compile_authz(
    config: AuthzConfig, refresher: JwksRefresher, workloads: Mapping[str, Workload] | None = None
) -> AuthzEngine:
    """The engine for one config snapshot. `workloads`: pod IP -> Workload of the pods whose
    inbound traffic this node authorizes (the identity config's workloads on this node)."""
    rules = [rule for ra in config.request_authentication for rule in ra.jwt_rules]
    sources = refresher.sources_for(rules, config.jwt)
    policies = compile_policies(config.authorization_policies)
    header_names = set(policies.header_names)
    for rule in rules:
        header_names.update(location.name for location in rule.from_headers)
    return AuthzEngine(
        config=config,
        refresher=refresher,
        workloads=dict(workloads or {}),
        policies=policies,
        peer_authentication=compile_peer_authentication(config.peer_authentication),
        header_names=frozenset(header_names),
        jwks_sources=sources,
    )
