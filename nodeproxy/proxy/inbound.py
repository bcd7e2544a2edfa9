"""Inbound decisions: may a tunnelled stream (or a plaintext connection) reach a local pod?

Pure functions of the stream's attributes, the pods of this node and a policy hook, so they are tested
without sockets. The policy hook takes an InboundRequest (who is calling whom) and says allow or deny;
`authz_policy` adapts nodeproxy.authz's AuthzEngine to it (its PeerAuthentication decides whether
plaintext is accepted: PERMISSIVE or STRICT), and `allow_all` is the hook with no policy configured.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Literal, NamedTuple

from nodeproxy.authz.policy import L4Request
from nodeproxy.proxy.tunnel import InboundAnswer, InboundStream

if TYPE_CHECKING:
    from nodeproxy.authz.engine import AuthzEngine

# Answers to a CONNECT that cannot be served: the authority is not a pod of this node (or not an
# address at all), and what policy denies (Istio answers 403 for an RBAC denial at HBONE).
STATUS_BAD_AUTHORITY = 400
STATUS_NOT_LOCAL = 404
STATUS_DENIED = 403


class InboundRequest(NamedTuple):
    """A connection arriving for a local pod. source_principal is the verified SPIFFE ID of the source
    workload (tunnel), None for plaintext; source_ip is its pod address (from `forwarded` or the packet).
    l7_checked: the sending node proxy applied this destination's policies to every HTTP request on
    the stream (InboundStream.l7_checked); never for plaintext."""

    source_ip: str | None
    source_principal: str | None
    destination_ip: str
    destination_port: int
    l7_checked: bool = False


class Verdict(NamedTuple):
    allowed: bool
    reason: str


Policy = Callable[[InboundRequest], Verdict]


def allow_all(request: InboundRequest) -> Verdict:
    """The hook when no authorization is configured: the issue's "no policy = allow"."""
    return Verdict(True, "no policy")


def with_peer_authentication(policy: Policy, mode: Literal["PERMISSIVE", "STRICT"]) -> Policy:
    """`policy`, except that plaintext (no verified principal) is refused outright under STRICT: one
    mode for every workload (nodeproxy.authz's PeerAuthentication gives it per namespace, workload and
    port through authz_policy instead)."""

    def check(request: InboundRequest) -> Verdict:
        if request.source_principal is None and mode == "STRICT":
            return Verdict(False, "STRICT: plaintext connections are refused")
        return policy(request)

    return check


def authz_policy(engine: AuthzEngine) -> Policy:
    """The policy hook backed by nodeproxy.authz (AuthzEngine.check_connection: its PeerAuthentication
    decides plaintext, its AuthorizationPolicies the rest). A plain L4 stream is judged at L4; a stream
    the sending node checked per request (l7_checked) only by what its connection decides (L4-only
    DENY rules, the L4 parts of ALLOW rules), its L7 rules having been applied there."""

    def check(request: InboundRequest) -> Verdict:
        # The claim comes only from a verified tunnel peer: without a principal it is not taken.
        checked_upstream = request.l7_checked and request.source_principal is not None
        verdict = engine.check_connection(
            L4Request(
                request.source_ip or "",
                request.source_principal,
                request.destination_ip,
                request.destination_port,
            ),
            http=checked_upstream,
        )
        return Verdict(verdict.allowed, verdict.reason)

    return check


class InboundDecision(NamedTuple):
    answer: InboundAnswer
    reason: str
    source_ip: str | None


def parse_authority(authority: str) -> tuple[str, int] | None:
    """Split "10.244.2.100:8080" into ("10.244.2.100", 8080); None unless an IPv4 address and a port."""
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5:
        return None
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return None
    number = int(port)
    return (str(address), number) if 0 < number < 65536 else None


def parse_forwarded_for(value: str) -> str | None:
    """The IPv4 address of a `forwarded: for=<ip>` field (RFC 7239; quotes allowed), else None.

    Only the form our peers send is understood: one element, for= an IPv4 address. Anything else means
    the original source is unknown and the pod is reached from the node's own address."""
    if not value:
        return None
    pairs = [part.strip() for part in value.split(";")]
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if sep and name.strip().lower() == "for" and "," not in raw:
            text = raw.strip().strip('"')
            try:
                return str(ipaddress.IPv4Address(text))
            except ValueError:
                return None
    return None


def decide_inbound(
    stream: InboundStream,
    local_pods: Container[str],
    policy: Policy,
    transparent: bool = True,
    identity_of: Callable[[str], object | None] | None = None,
) -> InboundDecision:
    """Allow the stream to its pod (bound to the original source when it is known and `transparent`),
    or deny it with a status: 400 bad authority, 404 not a pod of this node, 403 policy.

    identity_of (pod IP -> SPIFFE ID, e.g. WorkloadIndex.identity_of): when given, a `forwarded` source
    address must be a pod of the verified identity; otherwise the stream is refused (403): the peer
    node vouches for the address, and one node must not borrow another workload's address."""
    target = parse_authority(stream.authority)
    if target is None:
        return InboundDecision(
            InboundAnswer(stream.key, False, deny_status=STATUS_BAD_AUTHORITY),
            f"authority {stream.authority!r} is not ip:port",
            None,
        )
    pod_ip, port = target
    source_ip = parse_forwarded_for(stream.forwarded)
    if pod_ip not in local_pods:
        return InboundDecision(
            InboundAnswer(stream.key, False, deny_status=STATUS_NOT_LOCAL),
            f"{pod_ip} is not a pod of this node",
            source_ip,
        )
    if identity_of is not None and source_ip is not None:
        owner = identity_of(source_ip)
        if owner is None or str(owner) != stream.peer_identity:
            return InboundDecision(
                InboundAnswer(stream.key, False, deny_status=STATUS_DENIED),
                f"source {source_ip} is not a workload of {stream.peer_identity}",
                source_ip,
            )
    verdict = policy(InboundRequest(source_ip, stream.peer_identity or None, pod_ip, port, stream.l7_checked))
    if not verdict.allowed:
        return InboundDecision(
            InboundAnswer(stream.key, False, deny_status=STATUS_DENIED), verdict.reason, source_ip
        )
    bind = source_ip if transparent else None
    return InboundDecision(InboundAnswer(stream.key, True, pod_ip, port, bind), verdict.reason, source_ip)


def decide_plaintext(
    source_ip: str, destination_ip: str, destination_port: int, local_pods: Container[str], policy: Policy
) -> Verdict:
    """A plaintext connection captured on its way to a pod (15006): only to a pod of this node, and only
    if the policy (with no principal: PERMISSIVE/STRICT) lets it."""
    if destination_ip not in local_pods:
        return Verdict(False, f"{destination_ip} is not a pod of this node")
    return policy(InboundRequest(source_ip, None, destination_ip, destination_port))
