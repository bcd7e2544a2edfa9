"""The per-request HTTP routing decision: a pure function of (compiled service routes, request attributes).

The engine calls :func:`decide_request` once per request head and acts on the plain value it
returns: :class:`Forward` (send to this endpoint with these header edits) or :class:`LocalReply`
(answer the client itself). No I/O happens here; the only state touched is the routes' random
generator (weighted subset choice) and the balancer's own bookkeeping, as in the L4 ``decide()``.

Local replies carry an Envoy-style response flag, sent to the client in the
:data:`RESPONSE_FLAGS_HEADER` header and written to the access log:

====  ==========================================================================
NR    no route matched the request (404)
UH    no healthy endpoint: the chosen subset is empty or all its endpoints were tried (503)
UF    upstream connection failure (502)
UC    upstream connection reset or closed before a complete response (502)
UT    upstream request timeout (504)
DPE   downstream protocol error: a malformed request (400), a head too large (431)
      or one that did not arrive within the header timeout (408)
====  ==========================================================================

For gRPC requests (the port's protocol is grpc, or the request's content-type is
application/grpc...) a local reply is HTTP 200 with a ``grpc-status`` (:func:`grpc_status_for`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import unquote_plus

from nodeproxy.balance import Endpoint
from nodeproxy.routes import (
    GRPC_DETECTION_HEADER,
    MAX_CACHED_FORWARDS,
    CompiledMatch,
    CompiledRoute,
    HttpServiceRoutes,
)

__all__ = [
    "GRPC_DEADLINE_EXCEEDED",
    "GRPC_INTERNAL",
    "GRPC_UNAVAILABLE",
    "GRPC_UNIMPLEMENTED",
    "GRPC_UNKNOWN",
    "RESPONSE_FLAGS_HEADER",
    "Forward",
    "HttpServiceRoutes",
    "LocalReply",
    "RequestAttrs",
    "RouteDecision",
    "decide_request",
    "grpc_status_for",
    "is_grpc_request",
    "local_reply",
    "parse_query",
]

RESPONSE_FLAGS_HEADER: Final = "x-nodeproxy-flags"

# gRPC status codes (grpc/doc/statuscodes.md).
GRPC_UNKNOWN: Final = 2
GRPC_DEADLINE_EXCEEDED: Final = 4
GRPC_UNIMPLEMENTED: Final = 12
GRPC_INTERNAL: Final = 13
GRPC_UNAVAILABLE: Final = 14


@dataclass(frozen=True, slots=True)
class RequestAttrs:
    """What routing may look at in one request head."""

    method: str
    authority: str
    path: str  # without the query
    query: str  # raw query string without '?', '' if none
    # Lower-case names -> value (comma-joined if repeated); the engine passes only the names in
    # HttpServiceRoutes.matched_headers.
    headers: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to `endpoint`.

    Header edits are applied removals first, then additions, so a configured `set` (a removal plus
    an addition of the same name) replaces the field."""

    service: str
    route: str  # route name, for logs/metrics
    subset: str | None
    endpoint: Endpoint  # nodeproxy.balance.Endpoint (live counters)
    upstream_protocol: Literal["http1", "http2"]
    request_headers_add: tuple[tuple[str, str], ...] = ()
    request_headers_remove: tuple[str, ...] = ()
    response_headers_add: tuple[tuple[str, str], ...] = ()
    response_headers_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class LocalReply:
    """Answer the client without an upstream."""

    status: int  # 404 no route, 503 no endpoint, ...
    flag: str  # Envoy response flag: NR, UH, UF, UC, DPE, ...
    detail: str
    grpc_status: int | None = None  # set for grpc requests: answer HTTP 200 + this grpc-status


RouteDecision = Forward | LocalReply


def grpc_status_for(status: int, flag: str) -> int:
    """The grpc-status a gRPC client gets instead of HTTP `status` with response flag `flag`.

    A connect failure (UF) never reached the server, so it is UNAVAILABLE, which gRPC clients may
    retry; any other upstream failure (502) may have reached it and is INTERNAL, which they do not
    retry blindly."""
    if status == 404:
        return GRPC_UNIMPLEMENTED
    if status in (503, 429) or flag == "UF":
        return GRPC_UNAVAILABLE
    if status in (408, 504):
        return GRPC_DEADLINE_EXCEEDED
    if status in (400, 431, 502):
        return GRPC_INTERNAL
    return GRPC_UNKNOWN


def is_grpc_request(routes: HttpServiceRoutes, attrs: RequestAttrs) -> bool:
    """True for a gRPC request: on a grpc port, or with content-type application/grpc[+proto|;...]."""
    if routes.protocol == "grpc":
        return True
    content_type = attrs.headers.get(GRPC_DETECTION_HEADER)
    if content_type is None:
        return False
    media = content_type.partition(";")[0].strip().lower()
    # application/grpc-web is gRPC-Web: ordinary HTTP, not gRPC framing over HTTP/2.
    return media == "application/grpc" or media.startswith("application/grpc+")


def local_reply(status: int, flag: str, detail: str, grpc: bool) -> LocalReply:
    """A LocalReply, with the matching grpc-status when the request is gRPC."""
    return LocalReply(status, flag, detail, grpc_status_for(status, flag) if grpc else None)


def parse_query(query: str) -> dict[str, str]:
    """Form-decoded query parameters, the first occurrence of each name winning (as in Envoy).

    Same result as urllib.parse.parse_qsl(keep_blank_values=True) keeping first values, at about a
    third of its cost: names and values without '%' or '+' are taken as they are."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if name in params:
            continue
        if "%" in value or "+" in value:
            value = unquote_plus(value, errors="replace")
        params[name] = value
    return params


def _match_holds(match: CompiledMatch, attrs: RequestAttrs, query: Mapping[str, str] | None) -> bool:
    if match.path is not None and not match.path.test(attrs.path):
        return False
    if match.methods is not None and attrs.method not in match.methods:
        return False
    if match.authority is not None and not match.authority.test(attrs.authority.lower()):
        return False
    for header in match.headers:
        if not header.test(attrs.headers):
            return False
    if match.query:
        assert query is not None  # parsed by the caller whenever the route uses the query
        for param in match.query:
            if not param.test(query):
                return False
    return True


def _first_route(routes: HttpServiceRoutes, attrs: RequestAttrs) -> CompiledRoute | None:
    query: dict[str, str] | None = None
    for route in routes.routes:
        if not route.matches:
            return route
        if route.uses_query and query is None:
            query = parse_query(attrs.query)
        for match in route.matches:
            if _match_holds(match, attrs, query):
                return route
    return None


def decide_request(
    routes: HttpServiceRoutes, attrs: RequestAttrs, tried: Collection[str] = ()
) -> RouteDecision:
    """Where one request goes: the first matching route, a weighted subset, then the balancer.

    `tried` holds the addresses of endpoints this request already failed on (for retries)."""
    grpc = is_grpc_request(routes, attrs)
    route = _first_route(routes, attrs)
    if route is None:
        return local_reply(404, "NR", f"no route of service {routes.service} matches the request", grpc)
    if len(route.cumulative) == 1:
        pick = 0
    else:
        pick = bisect_right(route.cumulative, routes.rng.randrange(route.cumulative[-1]))
    subset = route.subsets[pick]
    endpoints = route.endpoints[pick]
    where = f"subset {subset} of service {routes.service}" if subset else f"service {routes.service}"
    if not endpoints:
        return local_reply(503, "UH", f"{where} has no endpoints", grpc)
    endpoint = routes.balancer.pick(endpoints, tried)
    if endpoint is None:
        return local_reply(503, "UH", f"all {len(endpoints)} endpoints of {where} were tried", grpc)
    http2 = grpc or routes.protocol == "http2"
    key = (pick, endpoint, http2)
    forward = route.forwards.get(key)
    if forward is None:
        forward = Forward(
            service=routes.service,
            route=route.name,
            subset=subset,
            endpoint=endpoint,
            upstream_protocol="http2" if http2 else "http1",
            request_headers_add=route.request_headers_add,
            request_headers_remove=route.request_headers_remove,
            response_headers_add=route.response_headers_add,
            response_headers_remove=route.response_headers_remove,
        )
        if len(route.forwards) < MAX_CACHED_FORWARDS:
            route.forwards[key] = forward
    return forward
