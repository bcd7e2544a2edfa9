"""Authorization policies compiled into pure decision functions.

:func:`compile_policies` turns the config's :class:`~nodeproxy.authz.config.AuthorizationPolicy`
list into a :class:`CompiledPolicies`, once per config snapshot. Per connection or request the
caller asks :meth:`CompiledPolicies.evaluate` with an :class:`L4Request` (a TCP connection the proxy
relays without parsing) or an :class:`L7Request` (one HTTP request head) and gets a
:class:`Decision`: allowed or not, and a reason for the logs. No I/O, no clock, no randomness.

Order (Istio's): DENY policies first, any matching rule denies; then, when ALLOW policies apply
to the destination workload, the request must match a rule of one of them; with no ALLOW policy
the request is allowed.

L7 attributes at L4 (Istio's rule for TCP traffic): a rule that uses an L7 attribute (hosts,
methods, paths, request principals, `request.*` conditions) cannot be decided from a TCP connection.
Such a rule in an ALLOW policy does not match (it never lets a connection in); in a DENY policy its
L7 parts are dropped and the rest must hold, so a DENY rule made only of L7 parts denies every
connection. Both err on the side of denial.

Connections whose every request is checked with :meth:`CompiledPolicies.evaluate` (an L7Request) by
someone else -- an HTTP stream the sending node proxy checked per request -- are judged by
:meth:`CompiledPolicies.evaluate_connection_for_l7` instead: only what one connection can decide.
A DENY rule made only of L4 parts that matches denies; a DENY rule with L7 parts is left to the
per-request check. When ALLOW policies apply, some ALLOW rule's L4 parts (its L7 parts dropped) must
match: otherwise no request on the connection could be allowed. This never refuses a connection that
carries a request :meth:`~CompiledPolicies.evaluate` allows.

Match strings are Istio's: exact, 'prefix*', '*suffix', '*' (any non-empty value). They are not
nodeproxy.routes' exact/prefix/regex matchers, which take a whole request and a query, hence the
small compiler here; the header-name and method validation is the routes module's rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from nodeproxy.authz.config import AuthorizationPolicy, Condition, Operation, Rule, Source, WorkloadSelector

if TYPE_CHECKING:
    from nodeproxy.authz.jwt import JwtIdentity

__all__ = [
    "ALLOW_NO_POLICY",
    "CompiledPolicies",
    "Decision",
    "L4Request",
    "L7Request",
    "Workload",
    "compile_policies",
    "normalize_path",
    "selector_matches",
    "source_namespace",
]

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class Workload:
    """The destination workload a policy's scope is compared with.

    Build it with :meth:`of` so labels are a sorted tuple (the value is hashable and equal for equal
    label sets; the per-workload policy selection is cached on it)."""

    namespace: str
    service_account: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, namespace: str, service_account: str, labels: Mapping[str, str] | None = None) -> Workload:
        return cls(namespace, service_account, tuple(sorted((labels or {}).items())))

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None


class L4Request(NamedTuple):
    """A TCP connection to a workload.

    source_principal: the SPIFFE ID ('spiffe://td/ns/x/sa/y') the tunnel verified for the source
    workload; None for plaintext."""

    source_ip: str
    source_principal: str | None
    destination_ip: str
    destination_port: int


class L7Request(NamedTuple):
    """One HTTP request on a connection to a workload.

    path: already normalized (:func:`normalize_path`) and without the query. headers: lower-case
    names -> values (repeated fields comma-joined), at least those in
    :attr:`CompiledPolicies.header_names`. jwt: the validated token, None without one."""

    source_ip: str
    source_principal: str | None
    destination_ip: str
    destination_port: int
    method: str
    host: str
    path: str
    headers: Mapping[str, str]
    jwt: JwtIdentity | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """Allowed or not, and why (for the access log and debug logs)."""

    allowed: bool
    reason: str
    policy: str | None = None  # 'namespace/name' of the policy that decided; None: the default


ALLOW_NO_POLICY: Final = Decision(True, "no authorization policy applies")


def source_namespace(principal: str | None) -> str | None:
    """The namespace of a SPIFFE ID of the form <td>/ns/<namespace>/sa/<sa> (scheme optional)."""
    if principal is None:
        return None
    parts = principal.removeprefix("spiffe://").split("/")
    if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2]:
        return parts[2]
    return None


# --------------------------------------------------------------------------------------------
# Request attributes, computed once per evaluation


class _Attrs:
    __slots__ = (
        "destination_ip",
        "destination_port",
        "headers",
        "host",
        "host_no_port",
        "jwt",
        "method",
        "path",
        "principal",
        "request_principal",
        "source_ip",
        "source_namespace",
    )

    def __init__(self, request: L4Request | L7Request) -> None:
        self.source_ip: IpAddress | None = _parse_ip(request.source_ip)
        self.destination_ip: IpAddress | None = _parse_ip(request.destination_ip)
        self.destination_port = request.destination_port
        principal = request.source_principal
        self.principal = principal.removeprefix("spiffe://") if principal else None
        self.source_namespace = source_namespace(principal)
        if isinstance(request, L7Request):
            self.method: str | None = request.method
            host = request.host.lower().rstrip(".")
            self.host: str | None = host
            self.host_no_port: str | None = _strip_port(host)
            self.path: str | None = request.path
            self.headers: Mapping[str, str] = request.headers
            self.jwt = request.jwt
            self.request_principal = request.jwt.principal if request.jwt is not None else None
        else:
            self.method = self.host = self.host_no_port = self.path = None
            self.headers = {}
            self.jwt = None
            self.request_principal = None


@functools.lru_cache(maxsize=4096)  # peers repeat; ipaddress parsing costs several microseconds
def _parse_ip(text: str) -> IpAddress | None:
    try:
        address = ip_address(text)
    except ValueError:
        return None
    # A dual-stack socket reports an IPv4 peer as ::ffff:a.b.c.d; it must match IPv4 blocks.
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_PORT_RE = re.compile(r":[0-9]*\Z")


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    return _PORT_RE.sub("", host).rstrip(".")


# --------------------------------------------------------------------------------------------
# Match-string compilation

StringTest = Callable[[str | None], bool]
Predicate = Callable[[_Attrs], bool]


def compile_strings(patterns: Iterable[str]) -> StringTest:
    """One test for 'any of these Istio match strings'; None (absent) never matches."""
    exact: set[str] = set()
    prefixes: list[str] = []
    suffixes: list[str] = []
    any_value = False
    for p in patterns:
        if p == "*":
            any_value = True
        elif p.endswith("*"):
            prefixes.append(p[:-1])
        elif p.startswith("*"):
            suffixes.append(p[1:])
        else:
            exact.add(p)
    exact_set = frozenset(exact)
    prefix_tuple = tuple(prefixes)
    suffix_tuple = tuple(suffixes)

    def test(value: str | None) -> bool:
        if value is None:
            return False
        if any_value:
            return value != ""
        return (
            value in exact_set
            or (bool(prefix_tuple) and value.startswith(prefix_tuple))
            or (bool(suffix_tuple) and value.endswith(suffix_tuple))
        )

    return test


def _values_test(
    values: Sequence[str] | None, not_values: Sequence[str] | None
) -> Callable[[list[str]], bool]:
    """Over all of an attribute's values (empty: absent): one matches `values`, none `not_values`."""
    positive = compile_strings(values) if values is not None else None
    negative = compile_strings(not_values) if not_values is not None else None

    def test(candidates: list[str]) -> bool:
        if positive is not None and not any(positive(c) for c in candidates):
            return False
        return not (negative is not None and any(negative(c) for c in candidates))

    return test


def _networks(blocks: Iterable[str]) -> tuple[IpNetwork, ...]:
    return tuple(ip_network(b) for b in blocks)


def _in_networks(address: IpAddress | None, networks: tuple[IpNetwork, ...]) -> bool:
    if address is None:
        return False
    # A v4 address is never 'in' a v6 network (ipaddress compares versions first).
    return any(address in n for n in networks)


# --------------------------------------------------------------------------------------------
# Rule compilation


def _negated(predicate: Predicate) -> Predicate:
    def not_(a: _Attrs) -> bool:
        return not predicate(a)

    return not_


def _all(predicates: Sequence[Predicate]) -> Predicate:
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    items = tuple(predicates)

    def all_hold(a: _Attrs) -> bool:
        for p in items:  # noqa: SIM110 (a plain loop: no generator frame per call)
            if not p(a):
                return False
        return True

    return all_hold


def _any(predicates: Sequence[Predicate]) -> Predicate:
    if len(predicates) == 1:
        return predicates[0]
    items = tuple(predicates)

    def any_holds(a: _Attrs) -> bool:
        for p in items:  # noqa: SIM110 (as in all_hold)
            if p(a):
                return True
        return False

    return any_holds


def _always(a: _Attrs) -> bool:
    return True


def _never(a: _Attrs) -> bool:
    return False


def _string_field(get: Callable[[_Attrs], str | None], values: Sequence[str], negate: bool) -> Predicate:
    test = compile_strings(values)

    def holds(a: _Attrs) -> bool:
        return test(get(a))

    return _negated(holds) if negate else holds


def _compile_source(source: Source, with_l7: bool) -> Predicate:
    conditions: list[Predicate] = []

    def principal(a: _Attrs) -> str | None:
        return a.principal

    def namespace(a: _Attrs) -> str | None:
        return a.source_namespace

    def request_principal(a: _Attrs) -> str | None:
        return a.request_principal

    if source.principals is not None:
        conditions.append(_string_field(principal, source.principals, False))
    if source.not_principals is not None:
        conditions.append(_string_field(principal, source.not_principals, True))
    if source.namespaces is not None:
        conditions.append(_string_field(namespace, source.namespaces, False))
    if source.not_namespaces is not None:
        conditions.append(_string_field(namespace, source.not_namespaces, True))
    for blocks, negate in ((source.ip_blocks, False), (source.not_ip_blocks, True)):
        if blocks is not None:
            networks = _networks(blocks)

            def source_in(a: _Attrs, networks: tuple[IpNetwork, ...] = networks) -> bool:
                return _in_networks(a.source_ip, networks)

            conditions.append(_negated(source_in) if negate else source_in)
    if with_l7:
        if source.request_principals is not None:
            conditions.append(_string_field(request_principal, source.request_principals, False))
        if source.not_request_principals is not None:
            conditions.append(_string_field(request_principal, source.not_request_principals, True))
    return _all(conditions)


def _compile_operation(operation: Operation, with_l7: bool) -> Predicate:
    conditions: list[Predicate] = []
    for ports, negate in ((operation.ports, False), (operation.not_ports, True)):
        if ports is not None:
            port_set = frozenset(ports)

            def port_in(a: _Attrs, port_set: frozenset[int] = port_set) -> bool:
                return a.destination_port in port_set

            conditions.append(_negated(port_in) if negate else port_in)
    if with_l7:
        for hosts, negate in ((operation.hosts, False), (operation.not_hosts, True)):
            if hosts is not None:
                test = compile_strings(hosts)

                # 'example.com' matches 'example.com' and 'example.com:8080' (the port is `ports`'
                # business); a pattern with a port matches only that authority.
                def host_is(a: _Attrs, test: StringTest = test) -> bool:
                    return test(a.host) or test(a.host_no_port)

                conditions.append(_negated(host_is) if negate else host_is)

        def method(a: _Attrs) -> str | None:
            return a.method

        def path(a: _Attrs) -> str | None:
            return a.path

        if operation.methods is not None:
            conditions.append(_string_field(method, operation.methods, False))
        if operation.not_methods is not None:
            conditions.append(_string_field(method, operation.not_methods, True))
        if operation.paths is not None:
            conditions.append(_string_field(path, operation.paths, False))
        if operation.not_paths is not None:
            conditions.append(_string_field(path, operation.not_paths, True))
    return _all(conditions)


def _claim_strings(value: Any) -> list[str]:
    """A claim's values as match candidates: a string, each string/number/bool of a list, a number or
    boolean in its JSON spelling. Objects and null hold nothing."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool):
        return ["true" if value else "false"]
    if isinstance(value, int | float):
        return [str(value)]
    if isinstance(value, list):
        out: list[str] = []
        for item in value:
            if isinstance(item, str | bool | int | float) and not isinstance(item, list):
                out.extend(_claim_strings(item))
        return out
    return []


def _condition_getter(key: str) -> Callable[[_Attrs], list[str]]:
    base, _, rest = key.partition("[")
    subscripts = re.findall(r"\[([^\[\]]+)\]", "[" + rest) if rest else []
    if base == "source.ip":
        raise AssertionError("ip keys are compiled separately")
    if base == "source.namespace":
        return lambda a: [a.source_namespace] if a.source_namespace is not None else []
    if base == "source.principal":
        return lambda a: [a.principal] if a.principal is not None else []
    if base == "destination.port":
        return lambda a: [str(a.destination_port)]
    if base == "request.headers":
        name = subscripts[0].lower()
        return lambda a: [v] if (v := a.headers.get(name)) is not None else []
    if base == "request.auth.principal":
        return lambda a: [a.request_principal] if a.request_principal is not None else []
    if base == "request.auth.audiences":
        return lambda a: list(a.jwt.audiences) if a.jwt is not None else []
    if base == "request.auth.presenter":
        return lambda a: [a.jwt.presenter] if a.jwt is not None and a.jwt.presenter is not None else []
    if base == "request.auth.claims":
        path = tuple(subscripts)

        def claim(a: _Attrs) -> list[str]:
            if a.jwt is None:
                return []
            value: Any = a.jwt.claims
            for part in path:
                if not isinstance(value, Mapping) or part not in value:
                    return []
                value = value[part]
            return _claim_strings(value)

        return claim
    raise AssertionError(f"unsupported condition key {key!r} passed validation")


def _compile_condition(condition: Condition) -> Predicate:
    base = condition.key.partition("[")[0]
    if base in ("source.ip", "destination.ip"):
        positive = _networks(condition.values) if condition.values is not None else None
        negative = _networks(condition.not_values) if condition.not_values is not None else None
        source = base == "source.ip"

        def ip_holds(a: _Attrs) -> bool:
            address = a.source_ip if source else a.destination_ip
            if positive is not None and not _in_networks(address, positive):
                return False
            return not (negative is not None and _in_networks(address, negative))

        return ip_holds
    get = _condition_getter(condition.key)
    test = _values_test(condition.values, condition.not_values)

    def holds(a: _Attrs) -> bool:
        return test(get(a))

    return holds


def _compile_rule(rule: Rule, with_l7: bool) -> Predicate:
    parts: list[Predicate] = []
    if rule.from_ is not None:
        parts.append(_any([_compile_source(s, with_l7) for s in rule.from_]))
    if rule.to is not None:
        parts.append(_any([_compile_operation(o, with_l7) for o in rule.to]))
    for condition in rule.when or ():
        if with_l7 or not condition.uses_l7:
            parts.append(_compile_condition(condition))
    return _all(parts)


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    index: int
    l7: Predicate  # every part of the rule
    l4: Predicate  # what a TCP connection is judged by (see the module docstring)
    # What a connection whose requests are checked per request elsewhere is judged by: the whole rule
    # when it is L4 only; with L7 parts, never (DENY: left to the request check) or its L4 parts (ALLOW:
    # some request on the connection may match).
    l4_prefilter: Predicate
    uses_l7: bool  # some part is an L7 attribute: only a request check decides it exactly


@dataclass(frozen=True, slots=True)
class _CompiledPolicy:
    name: str  # namespace/name
    deny: bool
    selector: WorkloadSelector | None
    namespace: str | None
    rules: tuple[_CompiledRule, ...]


def _compile_policy(policy: AuthorizationPolicy) -> _CompiledPolicy:
    deny = policy.action == "DENY"
    rules = []
    for i, rule in enumerate(policy.rules):
        l7 = _compile_rule(rule, with_l7=True)
        if not rule.uses_l7:
            l4 = l4_prefilter = l7
        else:
            l4_parts = _compile_rule(rule, with_l7=False)
            # A TCP connection nobody checks per request: an L7 ALLOW rule never lets it in, an L7
            # DENY rule's L4 parts keep it out. A connection checked per request: the request check
            # applies the L7 rules, the connection needs only a possible ALLOW match.
            l4, l4_prefilter = (l4_parts, _never) if deny else (_never, l4_parts)
        rules.append(_CompiledRule(i, l7, l4, l4_prefilter, rule.uses_l7))
    return _CompiledPolicy(policy.qualified_name, deny, policy.selector, policy.namespace, tuple(rules))


def selector_matches(
    namespace: str | None, selector: WorkloadSelector | None, workload: Workload | None
) -> bool:
    """Whether an object scoped to (namespace, selector) applies to `workload`.

    Mesh-wide objects apply to every workload, also an unknown one (None); namespaced ones only to
    known workloads of that namespace."""
    if namespace is None:
        return True
    if workload is None or workload.namespace != namespace:
        return False
    if selector is None:
        return True
    if selector.service_account is not None and selector.service_account != workload.service_account:
        return False
    return all(workload.label(k) == v for k, v in selector.match_labels.items())


@dataclass(frozen=True, slots=True)
class _PolicySet:
    deny: tuple[_CompiledPolicy, ...]
    allow: tuple[_CompiledPolicy, ...]

    @property
    def empty(self) -> bool:
        return not self.deny and not self.allow

    @property
    def uses_l7(self) -> bool:
        """Some rule of these policies needs a request to be decided exactly."""
        return any(rule.uses_l7 for policy in (*self.deny, *self.allow) for rule in policy.rules)


# What _evaluate judges by, and how its reasons name it: each rule's l7, l4 or l4_prefilter predicate.
# (Plain strings: an Enum member lookup costs more than the rest of the choice on the per-request path.)
_BY_REQUEST: Final = "request"
_BY_CONNECTION: Final = "connection"
_BY_CONNECTION_FOR_L7: Final = "connection (L7 rules checked per request)"


# Bound on the per-workload selection cache (distinct workloads seen in one snapshot).
_MAX_CACHED_WORKLOADS = 4096


@dataclass(eq=False)
class CompiledPolicies:
    """Every authorization policy of one config snapshot, ready to evaluate."""

    policies: tuple[_CompiledPolicy, ...]
    # Header names some `request.headers[...]` condition reads: the engine must copy them.
    header_names: frozenset[str]
    _by_workload: dict[Workload | None, _PolicySet] = field(default_factory=dict, repr=False)

    def applicable(self, workload: Workload | None) -> _PolicySet:
        cached = self._by_workload.get(workload)
        if cached is not None:
            return cached
        chosen = [p for p in self.policies if selector_matches(p.namespace, p.selector, workload)]
        result = _PolicySet(tuple(p for p in chosen if p.deny), tuple(p for p in chosen if not p.deny))
        if len(self._by_workload) >= _MAX_CACHED_WORKLOADS:
            self._by_workload.clear()
        self._by_workload[workload] = result
        return result

    def evaluate(self, workload: Workload | None, request: L4Request | L7Request) -> Decision:
        """The decision for one connection (L4Request) or request (L7Request) to `workload`."""
        if isinstance(request, L7Request):
            return self._evaluate(workload, request, _BY_REQUEST)
        return self._evaluate(workload, request, _BY_CONNECTION)

    def evaluate_connection_for_l7(self, workload: Workload | None, request: L4Request) -> Decision:
        """The decision for a connection to `workload` whose every request is checked with
        :meth:`evaluate` by someone else (an HTTP stream the sending node proxy checked per request):
        denied by a matching DENY rule made only of L4 parts, and, when ALLOW policies apply, allowed
        only if the L4 parts of some ALLOW rule match (see the module docstring)."""
        return self._evaluate(workload, request, _BY_CONNECTION_FOR_L7)

    def _evaluate(self, workload: Workload | None, request: L4Request | L7Request, layer: str) -> Decision:
        applicable = self.applicable(workload)
        if applicable.empty:
            return ALLOW_NO_POLICY
        attrs = _Attrs(request)
        by_request, by_connection = layer == _BY_REQUEST, layer == _BY_CONNECTION
        for policy in applicable.deny:
            for rule in policy.rules:
                # A conditional, not an attribute getter: this loop is on every HTTP request's path.
                if (rule.l7 if by_request else rule.l4 if by_connection else rule.l4_prefilter)(attrs):
                    return Decision(
                        False,
                        f"{layer} denied by DENY policy {policy.name} rules[{rule.index}]",
                        policy.name,
                    )
        if not applicable.allow:
            return Decision(True, f"{layer} matched none of {len(applicable.deny)} DENY policies")
        for policy in applicable.allow:
            for rule in policy.rules:
                if (rule.l7 if by_request else rule.l4 if by_connection else rule.l4_prefilter)(attrs):
                    return Decision(
                        True,
                        f"{layer} allowed by ALLOW policy {policy.name} rules[{rule.index}]",
                        policy.name,
                    )
        names = ", ".join(p.name for p in applicable.allow)
        return Decision(False, f"{layer} matched no ALLOW policy ({names})")


def compile_policies(policies: Sequence[AuthorizationPolicy]) -> CompiledPolicies:
    """Compile the config's policies once per snapshot."""
    headers: set[str] = set()
    for policy in policies:
        for rule in policy.rules:
            for condition in rule.when or ():
                base, _, rest = condition.key.partition("[")
                if base == "request.headers":
                    headers.add(rest.rstrip("]").lower())
    return CompiledPolicies(tuple(_compile_policy(p) for p in policies), frozenset(headers))


# --------------------------------------------------------------------------------------------
# Path normalization

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})")


def normalize_path(path: str, mode: str = "merge_slashes") -> str:
    """The path policies compare, so '/a/../admin', '/%61dmin' or '//admin' cannot slip past a
    rule on '/admin'.

    base: percent-encoded unreserved characters decoded and other escapes upper-cased (RFC 3986
    §6.2.2), '\\' read as '/', '.' and '..' segments removed (§5.2.4). merge_slashes: also runs of '/'
    made one. decode_and_merge_slashes: also %2F and %5C decoded to '/' first (for backends that
    decode them). none: as sent. A path that does not start with '/' (e.g. '*') is returned as is."""
    if mode == "none" or not path.startswith(("/", "\\")):
        return path
    decode_slashes = mode == "decode_and_merge_slashes"
    if "%" in path:

        def decode(m: re.Match[str]) -> str:
            char = chr(int(m[1], 16))
            if char in _UNRESERVED or (decode_slashes and char in "/\\"):
                return char
            return "%" + m[1].upper()

        path = _PERCENT_RE.sub(decode, path)
    path = path.replace("\\", "/")
    merge = mode in ("merge_slashes", "decode_and_merge_slashes")
    segments = path.split("/")[1:]
    out: list[str] = []
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == "" and merge and not last:
            continue
        else:
            out.append(segment)
    return "/" + "/".join(out)
