"""HTTP routing configuration: port protocols, subsets, routes, and their compiled per-snapshot form.

The pydantic models here are fields of :class:`nodeproxy.config.Service` and
:class:`nodeproxy.config.ServicePort`; :func:`service_route_problems` runs the checks that span
several fields of a service. :func:`compile_service_routes` turns one service port's routes into an
:class:`HttpServiceRoutes`, once per config snapshot (the StateUpdater calls it), so the per-request
decision in :mod:`nodeproxy.proxy.http_route` only compares strings and runs compiled regexes.

Regexes use RE2 (the ``google-re2`` package), as Envoy's ``safe_regex`` and Istio do: matching is
linear in the input, so a route regex applied to attacker-controlled paths and header values can
never backtrack catastrophically, which Python's ``re`` cannot promise for an arbitrary pattern.
Patterns must match the whole value (``fullmatch``), as in Envoy and Istio.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self
from urllib.parse import unquote_plus

import re2
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from nodeproxy.balance import Balancer, Endpoint, Picker
from nodeproxy.resilience.config import RouteResilience
from nodeproxy.resilience.guard import RouteGuards, ServiceGuards
from nodeproxy.validation import (
    dns_label as _dns_label,
)
from nodeproxy.validation import (
    label_key as _label_key,
)
from nodeproxy.validation import (
    label_value as _label_value,
)

if TYPE_CHECKING:
    from nodeproxy.config import Service
    from nodeproxy.proxy.http_route import Forward, RequestAttrs

__all__ = [
    "DEFAULT_ROUTE_NAME",
    "GRPC_DETECTION_HEADER",
    "L7_PROTOCOLS",
    "MAX_REGEX_PROGRAM_SIZE",
    "CompiledDestination",
    "CompiledRoute",
    "Destination",
    "HeaderEdits",
    "HeaderMatch",
    "HttpServiceRoutes",
    "Protocol",
    "QueryMatch",
    "Route",
    "RouteMatch",
    "RouteRegex",
    "StringMatch",
    "Subset",
    "compile_service_routes",
    "form_decoded",
    "protocol_from_app_protocol",
    "protocol_from_port_name",
    "query_parameters",
    "service_route_problems",
]

Protocol = Literal["tcp", "http", "http2", "grpc", "auto"]
# Protocols whose connections go through the HTTP engine (auto only when sniffing finds HTTP).
L7_PROTOCOLS: frozenset[str] = frozenset({"http", "http2", "grpc", "auto"})

# Istio's port-name convention `<protocol>[-<suffix>]` and appProtocol values, mapped onto ours.
# Protocols we relay opaquely (TLS, databases, ...) are tcp; the HTTP engine never sees them.
_ISTIO_NAME_PROTOCOLS: dict[str, Protocol] = {
    "http": "http",
    "http2": "http2",
    "grpc": "grpc",
    "grpc-web": "http",  # gRPC-Web is HTTP/1.1 or HTTP/2 requests, not native gRPC framing
    "tcp": "tcp",
    "https": "tcp",
    "tls": "tcp",
    "mongo": "tcp",
    "mysql": "tcp",
    "redis": "tcp",
}
_APP_PROTOCOLS: dict[str, Protocol] = {
    **_ISTIO_NAME_PROTOCOLS,
    "h2c": "http2",
    "kubernetes.io/h2c": "http2",  # Kubernetes' standard name for HTTP/2 over cleartext
    "kubernetes.io/ws": "http",
    "kubernetes.io/wss": "tcp",
}

# Envoy rejects RE2 programs above 100 instructions by default (re2.max_program_size.error_level);
# the same bound keeps the per-request cost of a route regex small and predictable. Typical route
# regexes are far below it: '/api/v[0-9]+/users/[^/]+' is 28, a UUID pattern about 75.
MAX_REGEX_PROGRAM_SIZE = 100
# Cheap guard checked before RE2 parses the pattern at all.
MAX_REGEX_LENGTH = 1024

# RFC 9110 §5.6.2 token characters (field names and methods).
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Fields a route may not add or remove: they carry the message framing, the connection's own
# options, or the target, which the engine manages itself (Envoy likewise refuses host and the
# pseudo-headers in its header mutations).
_UNEDITABLE_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_MAX_HEADER_VALUE = 8192


def protocol_from_port_name(name: str | None) -> Protocol | None:
    """The protocol Istio's naming convention `<protocol>[-<suffix>]` gives a port name, if any."""
    if name is None:
        return None
    if name in _ISTIO_NAME_PROTOCOLS:
        return _ISTIO_NAME_PROTOCOLS[name]
    # 'grpc-web-x' must be gRPC-Web, not gRPC with suffix 'web-x': try the longest prefix first.
    for prefix in sorted(_ISTIO_NAME_PROTOCOLS, key=len, reverse=True):
        if name.startswith(prefix + "-"):
            return _ISTIO_NAME_PROTOCOLS[prefix]
    return None


def protocol_from_app_protocol(app_protocol: str | None) -> Protocol | None:
    """The protocol a Kubernetes `appProtocol` value names, if nodeproxy knows it."""
    if app_protocol is None:
        return None
    return _APP_PROTOCOLS.get(app_protocol.lower())


# --------------------------------------------------------------------------------------------
# Field validators


def _regex(pattern: str) -> str:
    RouteRegex(pattern)  # raises ValueError with the reason
    return pattern


# google-re2's public wrapper spends about 5 us per match building a match object with
# character offsets; a route needs only yes or no, so the binding's own RE2 object is called
# directly (about 0.5 us). Check once that the binding still has the shape this relies on.
_re2_binding: Any = importlib.import_module("re2._re2")
if not all(hasattr(_re2_binding.RE2, attr) for attr in ("Match", "ok", "error", "ProgramSize", "Anchor")):
    raise ImportError(
        f"google-re2 {getattr(re2, '__version__', '?')}: re2._re2.RE2 lacks Match/ok/error/ProgramSize/Anchor"
    )
_ANCHOR_BOTH = _re2_binding.RE2.Anchor.ANCHOR_BOTH


class RouteRegex:
    """An RE2 pattern that answers whether it matches a whole value, checked when built."""

    __slots__ = ("_native", "pattern", "program_size")

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_REGEX_LENGTH:
            raise ValueError(
                f"regex is {len(pattern)} characters long; at most {MAX_REGEX_LENGTH} are allowed"
            )
        options = re2.Options()
        options.log_errors = False  # the reason goes into the config error instead of stderr
        options.never_capture = True  # groups only group: no capture bookkeeping per match
        native = _re2_binding.RE2(pattern.encode("utf-8", "surrogatepass"), options)
        if not native.ok():
            raw = native.error()
            reason = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            if reason.startswith(("invalid escape sequence", "invalid perl operator")):
                reason += " (RE2 has no backreferences or lookaround)"
            raise ValueError(f"invalid RE2 regex: {reason}")
        size = int(native.ProgramSize())
        if size > MAX_REGEX_PROGRAM_SIZE:
            raise ValueError(
                f"regex is too complex: its RE2 program has {size} instructions, at most "
                f"{MAX_REGEX_PROGRAM_SIZE} are allowed (simplify it or split it over several matches)"
            )
        self.pattern = pattern
        self.program_size = size
        self._native = native

    def fullmatch(self, value: str) -> bool:
        """True when the pattern matches all of `value` (compared as UTF-8, as RE2 does)."""
        data = value.encode("utf-8", "surrogatepass")
        spans = self._native.Match(_ANCHOR_BOTH, data, 0, len(data))
        return bool(spans[0][0] >= 0)  # (-1, -1): no match

    def __repr__(self) -> str:
        return f"RouteRegex({self.pattern!r})"


def _header_name(value: str) -> str:
    if not value or not set(value) <= _TCHAR:
        raise ValueError(
            "must be an HTTP field name: one or more token characters (letters, digits and !#$%&'*+-.^_`|~)"
        )
    return value.lower()  # field names are case-insensitive; HTTP/2 and the engine use lower case


def _method(value: str) -> str:
    if not value or not set(value) <= _TCHAR:
        raise ValueError("must be an HTTP method: one or more token characters, e.g. GET")
    return value  # methods are case-sensitive (RFC 9110 §9.1)


def _editable_header(value: str) -> str:
    name = _header_name(value)
    if name in _UNEDITABLE_HEADERS:
        raise ValueError(
            f"'{name}' cannot be edited by a route: it belongs to the message framing or the connection, "
            "which nodeproxy manages"
        )
    return name


def _header_value(value: str) -> str:
    if len(value) > _MAX_HEADER_VALUE:
        raise ValueError(f"a header value must be at most {_MAX_HEADER_VALUE} characters")
    # RFC 9110 §5.5: visible characters, space and tab inside, no control characters (CR, LF, NUL
    # would split or truncate the header), and no leading or trailing whitespace.
    if any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in value):
        raise ValueError("a header value must not contain control characters (CR, LF, NUL, ...)")
    if value != value.strip(" \t"):
        raise ValueError("a header value must not start or end with whitespace")
    return value


def _matchable_header(name: str) -> str:
    # HTTP/2 requests carry the host as :authority, not as a host field, so a match on 'host'
    # would silently never hold for them.
    if name == "host":
        raise ValueError("match the host with `authority`, which covers HTTP/1.1 Host and HTTP/2 :authority")
    return name


SubsetName = Annotated[str, AfterValidator(_dns_label)]
RouteName = Annotated[str, AfterValidator(_dns_label)]
Regex = Annotated[str, AfterValidator(_regex)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
EditableHeader = Annotated[str, AfterValidator(_editable_header)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
Method = Annotated[str, AfterValidator(_method)]
SelectorKey = Annotated[str, AfterValidator(_label_key)]
SelectorValue = Annotated[str, AfterValidator(_label_value)]


class _RouteModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _exactly_one(model: BaseModel, fields: Sequence[str]) -> None:
    given = [f for f in fields if getattr(model, f) not in (None, False)]
    if len(given) != 1:
        what = f"got {', '.join(given)}" if given else "got none"
        raise ValueError(f"exactly one of {', '.join(fields)} must be set ({what})")


# --------------------------------------------------------------------------------------------
# Models


class StringMatch(_RouteModel):
    """Compare a request value: exactly one of `exact`, `prefix` or `regex` (RE2, whole value)."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        _exactly_one(self, ("exact", "prefix", "regex"))
        return self


class HeaderMatch(_RouteModel):
    """A request header condition: `name` plus exactly one of exact, prefix, regex, present, absent.

    Repeated fields are compared as one value joined with ', ' (RFC 9110 §5.3)."""

    name: Annotated[HeaderName, AfterValidator(_matchable_header)]
    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None
    present: Literal[True] | None = Field(default=None, description="true: the header is sent (any value).")
    absent: Literal[True] | None = Field(default=None, description="true: the header is not sent.")

    @model_validator(mode="after")
    def _one(self) -> Self:
        _exactly_one(self, ("exact", "prefix", "regex", "present", "absent"))
        return self


class QueryMatch(_RouteModel):
    """A query parameter condition: `name` plus exactly one of exact, regex, present.

    Names and values are compared after form decoding ('%41' is 'A', '+' is a space); with a
    repeated parameter the first occurrence counts."""

    name: str = Field(min_length=1, max_length=256)
    exact: str | None = None
    regex: Regex | None = None
    present: Literal[True] | None = None

    @model_validator(mode="after")
    def _one(self) -> Self:
        _exactly_one(self, ("exact", "regex", "present"))
        return self


class RouteMatch(_RouteModel):
    """Conditions that must all hold (an omitted one always holds)."""

    path: StringMatch | None = Field(default=None, description="The path without the query.")
    methods: list[Method] | None = Field(default=None, min_length=1, description="Any of these methods.")
    authority: StringMatch | None = Field(
        default=None, description="Host / :authority, compared in lower case."
    )
    headers: list[HeaderMatch] = Field(default=[], description="All of these header conditions.")
    query: list[QueryMatch] = Field(default=[], description="All of these query parameter conditions.")


class Destination(_RouteModel):
    """Where a share of a route's requests go."""

    subset: SubsetName | None = Field(default=None, description="A subset name; omitted: every endpoint.")
    weight: int = Field(
        default=1, strict=True, ge=0, le=1_000_000, description="Relative share among the route's `to`."
    )


class HeaderEdits(_RouteModel):
    """Header changes applied in the order remove, set, add."""

    add: dict[EditableHeader, HeaderValue] = Field(default={}, description="Appended as extra fields.")
    set: dict[EditableHeader, HeaderValue] = Field(default={}, description="Replace any existing field.")
    remove: list[EditableHeader] = Field(default=[], description="Fields removed.")


class Route(_RouteModel):
    """One entry of a service's ordered route list: the first whose `match` holds decides."""

    name: RouteName | None = Field(default=None, description="For logs and metrics; default 'routes[i]'.")
    # A list of alternatives (any one may hold), as in Istio; empty matches every request.
    match: list[RouteMatch] = Field(default=[], description="Any of these; empty: every request.")
    to: list[Destination] = Field(default=[], description="Weighted destinations; empty: every endpoint.")
    request_headers: HeaderEdits = HeaderEdits()
    response_headers: HeaderEdits = HeaderEdits()
    # Timeout, retries, rate limit and fault injection (docs/resilience.md).
    resilience: RouteResilience = RouteResilience()


class Subset(_RouteModel):
    """A named group of a service's endpoints: those whose labels include all of `labels`."""

    name: SubsetName
    labels: dict[SelectorKey, SelectorValue] = Field(min_length=1)


def service_route_problems(
    protocols: Sequence[Protocol], subsets: Sequence[Subset], routes: Sequence[Route]
) -> list[tuple[str, str]]:
    """Problems spanning a service's fields, as (path relative to the service, reason) pairs."""
    problems: list[tuple[str, str]] = []
    if (subsets or routes) and not any(p in L7_PROTOCOLS for p in protocols):
        where = "routes" if routes else "subsets"
        problems.append(
            (
                where,
                "routes and subsets apply to HTTP ports only, and every port of this service is tcp; "
                "set `protocol` (http, http2, grpc or auto) on a port, or name it http-..., grpc-...",
            )
        )
    first_subset: dict[str, int] = {}
    for i, subset in enumerate(subsets):
        j = first_subset.setdefault(subset.name, i)
        if j != i:
            problems.append(
                (
                    f"subsets[{i}].name",
                    f"subset '{subset.name}' is defined twice (subsets[{j}] and subsets[{i}])",
                )
            )
    first_route: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name is not None:
            j = first_route.setdefault(route.name, i)
            if j != i:
                problems.append(
                    (
                        f"routes[{i}].name",
                        f"route '{route.name}' is defined twice (routes[{j}] and routes[{i}])",
                    )
                )
        if route.to and sum(d.weight for d in route.to) == 0:
            problems.append((f"routes[{i}].to", "the weights sum to 0; at least one must be positive"))
        first_dest: dict[str | None, int] = {}
        for k, dest in enumerate(route.to):
            if dest.subset is not None and dest.subset not in first_subset:
                known = ", ".join(f"'{s}'" for s in first_subset) or "none"
                problems.append(
                    (f"routes[{i}].to[{k}].subset", f"unknown subset '{dest.subset}' (defined: {known})")
                )
            j = first_dest.setdefault(dest.subset, k)
            if j != k:
                what = f"subset '{dest.subset}'" if dest.subset is not None else "the whole service"
                problems.append(
                    (
                        f"routes[{i}].to[{k}]",
                        f"{what} is listed twice (to[{j}] and to[{k}]); merge the weights",
                    )
                )
        for e, edits in (
            ("request_headers", route.request_headers),
            ("response_headers", route.response_headers),
        ):
            for name in edits.remove:
                if name in edits.set or name in edits.add:
                    problems.append((f"routes[{i}].{e}.remove", f"'{name}' is both removed and added or set"))
            for name in edits.add:
                if name in edits.set:
                    problems.append((f"routes[{i}].{e}.add", f"'{name}' is both added and set; use one"))
    return problems


# --------------------------------------------------------------------------------------------
# Compiled forms (built once per config snapshot)
#
# Every match condition becomes one small function of (request attributes, query parameters), each
# specialised for its field and kind (`a.path == text`, `a.headers.get(name) == text`, ...), and the
# conditions of a match and the alternatives of a route are combined into one function: the decision
# makes one call per route, no dispatch on kinds, no loop over empty condition lists.

# (request attributes, the query parameters) -> whether the condition holds. The parameters
# (query_parameters(): names decoded, values decoded by the condition that reads them) are parsed
# only for a route that has a query condition (CompiledRoute.uses_query); others get an empty mapping.
Matcher = Callable[["RequestAttrs", Mapping[str, str]], bool]
ValueTest = Callable[[str], bool]


def _value_test(match: StringMatch) -> ValueTest:
    """exact / prefix / regex on one value."""
    if match.exact is not None:
        return match.exact.__eq__  # a bound method: no Python frame of its own
    if match.prefix is not None:
        prefix = match.prefix

        def starts_with(value: str) -> bool:
            return value.startswith(prefix)

        return starts_with
    assert match.regex is not None
    return RouteRegex(match.regex).fullmatch


def _path_matcher(match: StringMatch) -> Matcher:
    if match.exact is not None:
        exact = match.exact

        def path_is(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return a.path == exact

        return path_is
    if match.prefix is not None:
        prefix = match.prefix

        def path_starts_with(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return a.path.startswith(prefix)

        return path_starts_with
    test = _value_test(match)

    def path_matches(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        return test(a.path)

    return path_matches


def _authority_matcher(match: StringMatch) -> Matcher:
    # Host names are case-insensitive: the request's authority is compared in lower case, against
    # exact and prefix values lowered here (a regex is the config's, applied to the lowered value).
    test = _value_test(
        StringMatch(
            exact=None if match.exact is None else match.exact.lower(),
            prefix=None if match.prefix is None else match.prefix.lower(),
            regex=match.regex,
        )
    )

    def authority_matches(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        return bool(test(a.authority.lower()))

    return authority_matches


def _methods_matcher(methods: Iterable[str]) -> Matcher:
    allowed = frozenset(methods)

    def method_is_one_of(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        return a.method in allowed

    return method_is_one_of


def _field_test(name: str, prefix: str | None, regex: str | None) -> Callable[[Mapping[str, str]], bool]:
    """A prefix or regex condition on one request header."""
    test = _value_test(StringMatch(prefix=prefix, regex=regex))

    def field_matches(fields: Mapping[str, str]) -> bool:
        value = fields.get(name)
        return value is not None and bool(test(value))

    return field_matches


def _header_matcher(header: HeaderMatch) -> Matcher:
    name = header.name
    if header.exact is not None:
        exact = header.exact

        def header_is(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return a.headers.get(name) == exact

        return header_is
    if header.present:

        def header_present(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return name in a.headers

        return header_present
    if header.absent:

        def header_absent(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return name not in a.headers

        return header_absent
    test = _field_test(name, header.prefix, header.regex)

    def header_matches(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        return test(a.headers)

    return header_matches


def query_parameters(query: str) -> dict[str, str]:
    """The query's parameters as the matchers take them: form-decoded names -> values still encoded,
    the first occurrence of each name winning (as in Envoy). A value is decoded only when a condition
    looks at it (decoding costs about 1 us, splitting a few parameters a fraction of that)."""
    params: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name, errors="replace")
        if name not in params:
            params[name] = value
    return params


def form_decoded(value: str) -> str:
    """A query value as the client meant it ('%41' is 'A', '+' a space); as it is when plain."""
    return unquote_plus(value, errors="replace") if "%" in value or "+" in value else value


def _query_matcher(param: QueryMatch) -> Matcher:
    # `q` is query_parameters(): decoded names, encoded values.
    name = param.name
    if param.present:

        def parameter_present(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return name in q

        return parameter_present
    test = _value_test(StringMatch(exact=param.exact, regex=param.regex))

    def parameter_matches(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        value = q.get(name)
        return value is not None and bool(test(form_decoded(value)))

    return parameter_matches


def _all_of(matchers: Sequence[Matcher]) -> Matcher:
    if len(matchers) == 1:
        return matchers[0]
    if len(matchers) == 2:
        first, second = matchers

        def both_hold(a: RequestAttrs, q: Mapping[str, str]) -> bool:
            return first(a, q) and second(a, q)

        return both_hold
    conditions = tuple(matchers)

    def all_hold(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        # A plain loop: all() over a generator costs a generator frame per call.
        for condition in conditions:  # noqa: SIM110
            if not condition(a, q):
                return False
        return True

    return all_hold


def _any_of(matchers: Sequence[Matcher]) -> Matcher:
    if len(matchers) == 1:
        return matchers[0]
    alternatives = tuple(matchers)

    def any_holds(a: RequestAttrs, q: Mapping[str, str]) -> bool:
        for alternative in alternatives:  # noqa: SIM110 (as in all_hold)
            if alternative(a, q):
                return True
        return False

    return any_holds


def _compile_match(match: RouteMatch) -> Matcher | None:
    """One function for all of a match's conditions; None when it has none (it always holds).

    The conditions are pure, so their order does not change the answer, only the cost: cheap
    comparisons first, regexes (which encode the value and run RE2) last."""
    cheap: list[Matcher] = []
    costly: list[Matcher] = []
    if match.methods is not None:
        cheap.append(_methods_matcher(match.methods))
    if match.path is not None:
        (costly if match.path.regex is not None else cheap).append(_path_matcher(match.path))
    cheap.extend(_header_matcher(h) for h in match.headers if h.regex is None)
    if match.authority is not None:
        (costly if match.authority.regex is not None else cheap).append(_authority_matcher(match.authority))
    cheap.extend(_query_matcher(q) for q in match.query if q.regex is None)
    costly.extend(_header_matcher(h) for h in match.headers if h.regex is not None)
    costly.extend(_query_matcher(q) for q in match.query if q.regex is not None)
    conditions = cheap + costly
    return _all_of(conditions) if conditions else None


@dataclass(frozen=True, slots=True, eq=False)
class CompiledDestination:
    """One weighted destination of a route: a subset (or the whole service) and its picker."""

    subset: str | None  # None: every endpoint of the service
    endpoints: tuple[Endpoint, ...]
    # The balancer prepared for these endpoints (Balancer.prepare): pick(tried).
    pick: Picker
    # How a local reply names it: "subset v2 of service reviews" or "service reviews".
    description: str
    # Decisions are immutable values: the Forward to each endpoint is built once per snapshot and
    # reused (keys are this destination's endpoints, so each holds at most len(endpoints)).
    http1_forwards: dict[Endpoint, Forward] = field(default_factory=dict, repr=False)
    http2_forwards: dict[Endpoint, Forward] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRoute:
    """A route ready for matching; `destinations[i]` gets a share `cumulative[i] - cumulative[i-1]`
    of the requests it matches."""

    name: str
    matcher: Matcher | None  # None: every request
    uses_query: bool  # some condition looks at the query parameters: parse them for `matcher`
    destinations: tuple[CompiledDestination, ...]  # never empty
    cumulative: tuple[int, ...]  # running sums of the weights, for a bisect
    draw_bits: int  # bits of a draw below cumulative[-1] (rejection sampling, as random.randrange)
    request_headers_add: tuple[tuple[str, str], ...]
    request_headers_remove: tuple[str, ...]
    response_headers_add: tuple[tuple[str, str], ...]
    response_headers_remove: tuple[str, ...]
    # Timeout, retries, rate limit and fault injection of the route, compiled (resilience/guard.py).
    guards: RouteGuards

    @property
    def subsets(self) -> tuple[str | None, ...]:
        return tuple(d.subset for d in self.destinations)


@dataclass(frozen=True, slots=True, eq=False)
class HttpServiceRoutes:
    """Everything the per-request decision needs for one HTTP service port, for one snapshot."""

    service: str
    protocol: Protocol
    routes: tuple[CompiledRoute, ...]  # never empty: a service without routes gets the default route
    subsets: Mapping[str, tuple[Endpoint, ...]]
    endpoints: tuple[Endpoint, ...]
    balancer: Balancer
    # Request header names some route matches on.
    matched_headers: frozenset[str]
    # What the engine copies into RequestAttrs.headers: matched_headers and the names the routes'
    # guards read (grpc-timeout, x-nodeproxy-timeout-ms, fault-injection conditions).
    copied_headers: frozenset[str]
    # False when the service has no routes: then everything goes to all endpoints (route 'default').
    has_routes: bool
    rng: random.Random  # draws a route's weighted destination
    # The service's live resilience state (breakers, budget, ejections, rate limits), kept across
    # snapshots by the StateUpdater like the endpoints.
    guards: ServiceGuards
    # Every request goes upstream over HTTP/2 (http2 and grpc ports); otherwise only gRPC requests.
    http2_upstream: bool = False


def _edits(edits: HeaderEdits) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    # `set` is a remove followed by an add: the engine applies removals first, then additions.
    remove = tuple(dict.fromkeys([*edits.remove, *edits.set]))
    add = tuple([*edits.set.items(), *edits.add.items()])
    return add, remove


def _select(endpoints: Iterable[Endpoint], labels: Mapping[str, str]) -> tuple[Endpoint, ...]:
    return tuple(e for e in endpoints if all(e.labels.get(k) == v for k, v in labels.items()))


def _compile_route(
    service: str,
    name: str,
    route: Route,
    subsets: Mapping[str, tuple[Endpoint, ...]],
    endpoints: tuple[Endpoint, ...],
    balancer: Balancer,
) -> CompiledRoute:
    # Zero-weight destinations stay in the config (a drained canary) but never receive a request.
    dests = [d for d in route.to if d.weight > 0] if route.to else [Destination()]
    if not dests:
        raise ValueError(f"route {name}: the weights sum to 0")  # the config check rejects this first
    req_add, req_remove = _edits(route.request_headers)
    resp_add, resp_remove = _edits(route.response_headers)
    alternatives = [_compile_match(m) for m in route.match]
    # No alternatives, or one without conditions: the route takes every request.
    matcher = (
        None
        if not alternatives or any(m is None for m in alternatives)
        else _any_of([m for m in alternatives if m is not None])
    )
    destinations = []
    for d in dests:
        members = endpoints if d.subset is None else subsets[d.subset]
        destinations.append(
            CompiledDestination(
                subset=d.subset,
                endpoints=members,
                pick=balancer.prepare(members),
                description=f"subset {d.subset} of service {service}" if d.subset else f"service {service}",
            )
        )
    cumulative = tuple(accumulate(d.weight for d in dests))
    return CompiledRoute(
        name=name,
        matcher=matcher,
        uses_query=matcher is not None and any(m.query for m in route.match),
        destinations=tuple(destinations),
        cumulative=cumulative,
        draw_bits=(cumulative[-1] - 1).bit_length(),
        request_headers_add=req_add,
        request_headers_remove=req_remove,
        response_headers_add=resp_add,
        response_headers_remove=resp_remove,
        guards=RouteGuards.from_config(name, route.resilience),
    )


DEFAULT_ROUTE_NAME = "default"

# On ports not declared grpc the engine also copies content-type: it tells a gRPC request
# (application/grpc...), which must go upstream over HTTP/2 and gets gRPC-style local replies.
GRPC_DETECTION_HEADER = "content-type"


def compile_service_routes(
    service: Service,
    protocol: Protocol,
    endpoints: tuple[Endpoint, ...],
    balancer: Balancer,
    rng: random.Random,
    guards: ServiceGuards,
) -> HttpServiceRoutes:
    """The compiled routing of one HTTP port of `service` over its live `endpoints`.

    Subsets are resolved against the endpoints' labels now, so call this again for every snapshot.
    `guards` is the service's live resilience state; `balancer` should be one of its balancers
    (ServiceGuards.balancer), so that picks skip ejected endpoints."""
    if protocol not in L7_PROTOCOLS:
        raise ValueError(f"service {service.name}: protocol {protocol} has no HTTP routing")
    subsets = {s.name: _select(endpoints, s.labels) for s in service.subsets}
    if service.routes:
        routes = tuple(
            _compile_route(service.name, r.name or f"routes[{i}]", r, subsets, endpoints, balancer)
            for i, r in enumerate(service.routes)
        )
    else:
        routes = (_compile_route(service.name, DEFAULT_ROUTE_NAME, Route(), subsets, endpoints, balancer),)
    matched = {h.name for r in service.routes for m in r.match for h in m.headers}
    if protocol != "grpc":
        matched.add(GRPC_DETECTION_HEADER)
    copied = set(matched)
    for route in routes:  # the deadline's and the fault's headers
        copied |= route.guards.header_names
    return HttpServiceRoutes(
        service=service.name,
        protocol=protocol,
        routes=routes,
        subsets=subsets,
        endpoints=endpoints,
        balancer=balancer,
        matched_headers=frozenset(matched),
        copied_headers=frozenset(copied),
        has_routes=bool(service.routes),
        rng=rng,
        guards=guards,
        http2_upstream=protocol in ("http2", "grpc"),
    )
