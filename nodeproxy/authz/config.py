"""Configuration of workload authentication and authorization (the `authz` section).

Three kinds of object, shaped like their Istio namesakes (field names in snake_case, as everywhere
in nodeproxy's config; docs/authorization.md maps them to Istio's camelCase):

* :class:`PeerAuthentication`: whether a workload also accepts plaintext from outside the mesh
  (PERMISSIVE) or only mutual TLS through the node tunnel (STRICT), per mesh, namespace, workload
  and port.
* :class:`RequestAuthentication`: which JWT issuers a workload accepts, where their keys come from
  (a JWKS file, an HTTPS URL, or inline), and what of a valid token is forwarded upstream.
* :class:`AuthorizationPolicy`: ALLOW and DENY rules on the source (principal, namespace, IP block),
  the destination (port; at L7 host, method, path) and conditions (headers, JWT claims, ...).

Scope, as in Istio: `namespace` omitted means mesh-wide (Istio's root namespace); with a namespace,
the object applies to that namespace's workloads, narrowed by `selector` when one is given.

Values of principals, namespaces, hosts, methods, paths and `when` values are Istio match strings:
``"abc"`` exact, ``"abc*"`` prefix, ``"*abc"`` suffix, ``"*"`` any non-empty value.

These models are validated and frozen; :mod:`nodeproxy.authz.engine` compiles them once per config
snapshot into the pure decision functions the request path calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from nodeproxy.validation import (
    dns_label as _dns_label,
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
    "DEFAULT_CLOCK_SKEW",
    "DEFAULT_JWKS_FETCH_TIMEOUT",
    "DEFAULT_JWKS_MIN_REFETCH_INTERVAL",
    "DEFAULT_JWKS_REFRESH_INTERVAL",
    "DEFAULT_MAX_JWKS_BYTES",
    "L7_CONDITION_KEYS",
    "MAX_CLOCK_SKEW",
    "SUPPORTED_CONDITION_KEYS",
    "AuthorizationPolicy",
    "AuthzConfig",
    "ClaimToHeader",
    "Condition",
    "JwtHeaderLocation",
    "JwtRule",
    "JwtSettings",
    "Operation",
    "PeerAuthentication",
    "RequestAuthentication",
    "Rule",
    "Source",
    "WorkloadSelector",
    "match_string_problem",
]

# The JWT clock skew Istio/Envoy allow by default (60 s) is also the most we accept: a larger skew
# would keep an expired token valid for longer than any sane clock drift explains.
MAX_CLOCK_SKEW = 60.0
DEFAULT_CLOCK_SKEW = 60.0
# Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default.
DEFAULT_JWKS_REFRESH_INTERVAL = 20 * 60.0
# An unknown `kid` asks for a re-fetch at most this often per JWKS source: a flood of tokens with
# made-up kids must not turn into a flood of requests to the identity provider.
DEFAULT_JWKS_MIN_REFETCH_INTERVAL = 30.0
DEFAULT_JWKS_FETCH_TIMEOUT = 5.0
# Real JWKS documents are a few KiB; this bounds what a misbehaving endpoint can make us hold.
DEFAULT_MAX_JWKS_BYTES = 1 << 20

_MAX_MATCH_STRING = 1024
_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", re.ASCII)
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# request.headers[name], request.auth.claims[a][b]...: the bracketed parts.
_BRACKETS_RE = re.compile(r"\[([^\[\]]+)\]")

# `when` keys and the layer that can see them. A rule with an L7 key cannot be decided on a plain
# TCP connection (see AuthorizationPolicy).
_L4_CONDITION_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
L7_CONDITION_KEYS = frozenset(
    {
        "request.headers",
        "request.auth.principal",
        "request.auth.audiences",
        "request.auth.presenter",
        "request.auth.claims",
    }
)
SUPPORTED_CONDITION_KEYS = _L4_CONDITION_KEYS | L7_CONDITION_KEYS


# --------------------------------------------------------------------------------------------
# Field validators


def _object_name(value: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            "must be a DNS subdomain-like name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters"
        )
    return value


def match_string_problem(value: str) -> str | None:
    """Why `value` is not an Istio match string (exact, 'prefix*', '*suffix' or '*'), or None."""
    if not value:
        return "must not be empty"
    if len(value) > _MAX_MATCH_STRING:
        return f"must be at most {_MAX_MATCH_STRING} characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        return "must not contain control characters"
    inner = value[1:-1] if len(value) > 1 else ""
    if "*" in inner or value == "**":
        return "'*' may only be the first or the last character (prefix 'abc*', suffix '*abc', or '*' alone)"
    if len(value) > 1 and value.startswith("*") and value.endswith("*"):
        return "'*abc*' (contains) is not supported: use a prefix 'abc*' or a suffix '*abc'"
    return None


def _match_string(value: str) -> str:
    problem = match_string_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _principal(value: str) -> str:
    # Istio writes principals without the scheme ("cluster.local/ns/default/sa/web"); a full SPIFFE
    # ID is accepted too and compared the same way.
    value = value.removeprefix("spiffe://")
    return _match_string(value)


def _method(value: str) -> str:
    if value != "*" and not (value.rstrip("*").lstrip("*") and set(value.strip("*")) <= _TCHAR):
        raise ValueError("must be an HTTP method (token characters, e.g. GET), optionally with '*'")
    return _match_string(value)


def _host(value: str) -> str:
    # Hosts are compared case-insensitively (RFC 9110 §4.2.3).
    return _match_string(value.lower())


def _path(value: str) -> str:
    _match_string(value)
    if not value.startswith(("/", "*")):
        raise ValueError("must start with '/' (or '*' for a suffix match)")
    if "?" in value or "#" in value:
        raise ValueError("paths are matched without the query: remove '?...' (match a query with a header)")
    return value


def _ip_block(value: str) -> str:
    try:
        network: IPv4Network | IPv6Network = ip_network(value, strict=True)
    except ValueError as err:
        raise ValueError(f"must be an IP address or CIDR block with no host bits set ({err})") from None
    return str(network)


def _header_name(value: str) -> str:
    if not value or not set(value) <= _TCHAR:
        raise ValueError("must be an HTTP field name (token characters)")
    return value.lower()


def _condition_key(value: str) -> str:
    base, _, rest = value.partition("[")
    subscripts = _BRACKETS_RE.findall("[" + rest) if rest else []
    if rest and "".join(f"[{s}]" for s in subscripts) != "[" + rest:
        raise ValueError(f"malformed key {value!r}: expected e.g. request.headers[x-user]")
    if base not in SUPPORTED_CONDITION_KEYS:
        raise ValueError(
            f"unsupported key {base!r}; supported: {', '.join(sorted(SUPPORTED_CONDITION_KEYS))}"
        )
    if base == "request.headers":
        if len(subscripts) != 1:
            raise ValueError("request.headers takes one header name: request.headers[x-user]")
        _header_name(subscripts[0])
    elif base == "request.auth.claims":
        if not 1 <= len(subscripts) <= 8:
            raise ValueError("request.auth.claims takes 1 to 8 claim names: request.auth.claims[groups]")
    elif subscripts:
        raise ValueError(f"{base} takes no [...] subscript")
    return value


def _https_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.hostname:
        # A JWKS over plain HTTP can be replaced by anyone on the path: then any token verifies.
        raise ValueError("must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    return value


def _header_output_name(value: str) -> str:
    name = _header_name(value)
    if name in {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "upgrade",
        "authorization",
    }:
        raise ValueError(f"'{name}' cannot receive a claim: it belongs to the message or the token itself")
    return name


DnsLabel = Annotated[str, AfterValidator(_dns_label)]
ObjectName = Annotated[str, AfterValidator(_object_name)]
MatchString = Annotated[str, AfterValidator(_match_string)]
Principal = Annotated[str, AfterValidator(_principal)]
Method = Annotated[str, AfterValidator(_method)]
Host = Annotated[str, AfterValidator(_host)]
Path = Annotated[str, AfterValidator(_path)]
IpBlock = Annotated[str, AfterValidator(_ip_block)]
ConditionKey = Annotated[str, AfterValidator(_condition_key)]
HeaderName = Annotated[str, AfterValidator(_header_name)]
OutputHeader = Annotated[str, AfterValidator(_header_output_name)]
HttpsUrl = Annotated[str, AfterValidator(_https_url)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
LabelKey = Annotated[str, AfterValidator(_label_key)]
LabelValue = Annotated[str, AfterValidator(_label_value)]


def _seconds_between(low: float, high: float) -> AfterValidator:
    def check(value: float) -> float:
        if not low <= value <= high:
            raise ValueError(f"must be between {low:g} s and {high:g} s")
        return value

    return AfterValidator(check)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------
# Scope


class WorkloadSelector(_Model):
    """The workloads of the object's namespace it applies to: all of `match_labels` are labels of the
    workload, and its service account is `service_account` when that is given."""

    match_labels: dict[LabelKey, LabelValue] = Field(default={}, description="All of these labels.")
    service_account: DnsLabel | None = Field(default=None, description="The workload's service account.")

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.match_labels and self.service_account is None:
            raise ValueError("a selector needs match_labels or service_account (omit it to select all)")
        return self


class _Scoped(_Model):
    name: ObjectName
    namespace: DnsLabel | None = Field(
        default=None, description="Omitted: mesh-wide. Set: this namespace's workloads only."
    )
    selector: WorkloadSelector | None = Field(
        default=None, description="Narrows a namespaced object to matching workloads."
    )

    @model_validator(mode="after")
    def _selector_needs_namespace(self) -> Self:
        if self.selector is not None and self.namespace is None:
            # Istio ignores a selector in the root namespace only for some kinds; refusing is clearer.
            raise ValueError("a selector needs a namespace (a mesh-wide object applies to every workload)")
        return self

    @property
    def scope(self) -> str:
        """'mesh', 'namespace' or 'workload': how specific the object is."""
        if self.namespace is None:
            return "mesh"
        return "namespace" if self.selector is None else "workload"

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace or '(mesh)'}/{self.name}"


# --------------------------------------------------------------------------------------------
# PeerAuthentication

MtlsMode = Literal["STRICT", "PERMISSIVE", "UNSET"]


class PeerAuthentication(_Scoped):
    """Whether plaintext from outside the mesh is accepted (PERMISSIVE) or only mTLS (STRICT).

    The most specific object wins: workload (selector) over namespace over mesh; UNSET inherits from
    the next less specific one; with none at all the mode is PERMISSIVE (Istio's default).
    `port_level` overrides the mode for single destination ports (workload-scoped objects only, as
    in Istio)."""

    mode: MtlsMode = "UNSET"
    port_level: dict[Port, MtlsMode] = Field(default={}, description="Destination port -> mode.")

    @model_validator(mode="after")
    def _port_level_needs_selector(self) -> Self:
        if self.port_level and self.selector is None:
            raise ValueError("port_level needs a selector (Istio applies port-level modes to workloads only)")
        return self


# --------------------------------------------------------------------------------------------
# RequestAuthentication (JWT)


class JwtHeaderLocation(_Model):
    """A request header that may carry the token, after an optional prefix (e.g. 'Bearer ')."""

    name: HeaderName
    prefix: str = Field(default="", max_length=64, description="Compared case-insensitively, then removed.")


class ClaimToHeader(_Model):
    """Copy a claim of a valid token into a request header sent upstream.

    A string claim is copied as is, a number or boolean in its JSON form, a list of strings joined
    with ','. A value with control characters is not copied. Any header of that name the client sent
    is removed first, whether or not the request carries a token, so it cannot be spoofed."""

    header: OutputHeader
    claim: str = Field(min_length=1, max_length=256)


_DEFAULT_LOCATIONS = (JwtHeaderLocation(name="authorization", prefix="Bearer "),)


class JwtRule(_Model):
    """One accepted issuer and where its keys come from: exactly one of jwks_uri, jwks_file, jwks."""

    issuer: str = Field(min_length=1, max_length=1024, description="The token's `iss`, exactly.")
    audiences: list[str] = Field(
        default=[], description="The token's `aud` must name one of these; empty: `aud` is not checked."
    )
    jwks_uri: HttpsUrl | None = Field(
        default=None, description="Fetched in the background, never per request."
    )
    jwks_ca_file: str | None = Field(
        default=None, description="CA bundle to verify jwks_uri's server; default: the system's."
    )
    jwks_file: str | None = Field(default=None, description="A JWKS document on disk, re-read on refresh.")
    jwks: str | None = Field(default=None, max_length=DEFAULT_MAX_JWKS_BYTES, description="Inline JWKS JSON.")
    from_headers: list[JwtHeaderLocation] = Field(
        default=list(_DEFAULT_LOCATIONS), min_length=0, description="Default: Authorization: Bearer <token>."
    )
    from_params: list[str] = Field(default=[], description="Query parameters that may carry the token.")
    forward_original_token: bool = Field(
        default=False, description="false (Istio's default): the token's header is removed after validation."
    )
    output_claim_to_headers: list[ClaimToHeader] = []
    output_payload_to_header: OutputHeader | None = Field(
        default=None, description="Header receiving the verified payload, base64url-encoded."
    )
    require_expiration: bool = Field(default=True, description="A token without `exp` is rejected.")

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        given = [f for f in ("jwks_uri", "jwks_file", "jwks") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError(f"exactly one of jwks_uri, jwks_file, jwks must be set (got {given or 'none'})")
        if self.jwks_ca_file is not None and self.jwks_uri is None:
            raise ValueError("jwks_ca_file only applies to jwks_uri")
        if not self.from_headers and not self.from_params:
            raise ValueError("from_headers and from_params are both empty: the token could never be found")
        if self.jwks is not None:
            # Inline keys are checked with the config (a file or URL is checked when it is loaded).
            from nodeproxy.authz.jwt import JwksError, parse_jwks

            try:
                parse_jwks(self.jwks)
            except JwksError as err:
                raise ValueError(f"jwks: {err}") from None
        return self


class RequestAuthentication(_Scoped):
    """The JWT issuers a workload accepts.

    A request without a token passes authentication (Istio's rule; require a request principal with
    an AuthorizationPolicy) unless `require_token` is set. A request with an invalid token, or with
    a token from an issuer no applicable rule names, is answered 401. Every object whose scope covers
    the workload (mesh, namespace, selector) contributes its rules."""

    jwt_rules: list[JwtRule] = Field(min_length=1)
    require_token: bool = Field(default=False, description="true: a request without a token gets 401.")

    @model_validator(mode="after")
    def _unique_issuers(self) -> Self:
        seen: set[str] = set()
        for rule in self.jwt_rules:
            if rule.issuer in seen:
                raise ValueError(f"issuer {rule.issuer!r} appears in two jwt_rules")
            seen.add(rule.issuer)
        return self


class JwtSettings(_Model):
    """How tokens are checked and JWKS documents kept fresh (all rules share these)."""

    clock_skew: Annotated[float, BeforeValidator(_duration), _seconds_between(0, MAX_CLOCK_SKEW)] = Field(
        default=DEFAULT_CLOCK_SKEW, description="Leeway for exp, nbf and iat; at most 60 s. Default 60 s."
    )
    jwks_refresh_interval: Annotated[float, BeforeValidator(_duration), _seconds_between(1, 86400)] = Field(
        default=DEFAULT_JWKS_REFRESH_INTERVAL, description="Re-fetch every JWKS this often. Default 20 m."
    )
    jwks_min_refetch_interval: Annotated[float, BeforeValidator(_duration), _seconds_between(1, 3600)] = (
        Field(
            default=DEFAULT_JWKS_MIN_REFETCH_INTERVAL,
            description="An unknown kid re-fetches a JWKS at most this often. Default 30 s.",
        )
    )
    jwks_fetch_timeout: Annotated[float, BeforeValidator(_duration), _seconds_between(0.1, 60)] = Field(
        default=DEFAULT_JWKS_FETCH_TIMEOUT, description="Whole fetch of one JWKS. Default 5 s."
    )
    max_jwks_bytes: int = Field(default=DEFAULT_MAX_JWKS_BYTES, ge=1024, le=16 << 20)


# --------------------------------------------------------------------------------------------
# AuthorizationPolicy


class Source(_Model):
    """Where the request comes from. All given fields must hold; within a field, any value.

    principals and namespaces come from the peer's verified SPIFFE identity, so plaintext (no
    identity) never matches them and always matches their not_ forms. request_principals
    ('<iss>/<sub>' of a valid JWT) are L7."""

    principals: list[Principal] | None = Field(default=None, min_length=1)
    not_principals: list[Principal] | None = Field(default=None, min_length=1)
    request_principals: list[MatchString] | None = Field(default=None, min_length=1)
    not_request_principals: list[MatchString] | None = Field(default=None, min_length=1)
    namespaces: list[MatchString] | None = Field(default=None, min_length=1)
    not_namespaces: list[MatchString] | None = Field(default=None, min_length=1)
    ip_blocks: list[IpBlock] | None = Field(default=None, min_length=1)
    not_ip_blocks: list[IpBlock] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("a source needs at least one field (omit `from` to match any source)")
        return self

    @property
    def uses_l7(self) -> bool:
        return self.request_principals is not None or self.not_request_principals is not None


class Operation(_Model):
    """What the request asks for. ports apply at L4 and L7; hosts, methods and paths are L7."""

    ports: list[Port] | None = Field(default=None, min_length=1)
    not_ports: list[Port] | None = Field(default=None, min_length=1)
    hosts: list[Host] | None = Field(default=None, min_length=1)
    not_hosts: list[Host] | None = Field(default=None, min_length=1)
    methods: list[Method] | None = Field(default=None, min_length=1)
    not_methods: list[Method] | None = Field(default=None, min_length=1)
    paths: list[Path] | None = Field(default=None, min_length=1)
    not_paths: list[Path] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if all(getattr(self, f) is None for f in type(self).model_fields):
            raise ValueError("an operation needs at least one field (omit `to` to match any operation)")
        return self

    @property
    def uses_l7(self) -> bool:
        return any(
            getattr(self, f) is not None
            for f in ("hosts", "not_hosts", "methods", "not_methods", "paths", "not_paths")
        )


class Condition(_Model):
    """`key` has one of `values` (if given) and none of `not_values`.

    An absent attribute (a header not sent, a claim not in the token) holds none of the values, so
    it fails `values` and satisfies `not_values`, as in Istio."""

    key: ConditionKey
    values: list[MatchString] | None = Field(default=None, min_length=1)
    not_values: list[MatchString] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _values(self) -> Self:
        if self.values is None and self.not_values is None:
            raise ValueError("a condition needs values or not_values")
        base = self.key.partition("[")[0]
        if base in ("source.ip", "destination.ip"):
            for v in [*(self.values or ()), *(self.not_values or ())]:
                _ip_block(v)
        elif base == "destination.port":
            for v in [*(self.values or ()), *(self.not_values or ())]:
                if not v.isdigit() or not 1 <= int(v) <= 65535:
                    raise ValueError(f"destination.port values are port numbers, got {v!r}")
        return self

    @property
    def uses_l7(self) -> bool:
        return self.key.partition("[")[0] in L7_CONDITION_KEYS


class Rule(_Model):
    """All of its parts must hold: one of `from`, one of `to`, and every `when`. An omitted part holds."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    from_: list[Source] | None = Field(default=None, alias="from", min_length=1)
    to: list[Operation] | None = Field(default=None, min_length=1)
    when: list[Condition] | None = Field(default=None, min_length=1)

    @property
    def uses_l7(self) -> bool:
        """True when the rule looks at something only an HTTP request has."""
        return (
            any(s.uses_l7 for s in self.from_ or ())
            or any(o.uses_l7 for o in self.to or ())
            or any(c.uses_l7 for c in self.when or ())
        )


class AuthorizationPolicy(_Scoped):
    """ALLOW or DENY requests matching any of `rules`.

    DENY policies are checked first and any match denies; then, if ALLOW policies apply to the
    workload, a request must match one of their rules; with no policy at all, everything is allowed.
    An ALLOW policy with no rules allows nothing (so it denies everything it applies to); a DENY
    policy with no rules denies nothing. `rules: [{}]` matches every request.

    On a connection the proxy handles at L4 (a tcp port), a rule that looks at L7 attributes is
    decided as Istio does: in an ALLOW policy it matches nothing; in a DENY policy its L7 parts are
    dropped and the rest must hold (a DENY rule with only L7 parts denies every connection)."""

    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[Rule] = []


# --------------------------------------------------------------------------------------------
# Root


PathNormalization = Literal["merge_slashes", "decode_and_merge_slashes", "base", "none"]


class AuthzConfig(_Model):
    """The `authz` section of the root config."""

    peer_authentication: list[PeerAuthentication] = []
    request_authentication: list[RequestAuthentication] = []
    authorization_policies: list[AuthorizationPolicy] = []
    jwt: JwtSettings = JwtSettings()
    path_normalization: PathNormalization = Field(
        default="merge_slashes",
        description=(
            "How a request path is normalized before policies compare it: 'base' resolves '.' and '..' "
            "segments and decodes percent-encoded unreserved characters (RFC 3986); 'merge_slashes' "
            "(default) also turns '//' into '/'; 'decode_and_merge_slashes' also decodes %2F and %5C to '/' "
            "first (for backends that decode them); 'none' compares the path as sent."
        ),
    )

    @model_validator(mode="after")
    def _unique(self) -> Self:
        problems: list[tuple[str, str]] = []
        for kind, items in (
            ("peer_authentication", self.peer_authentication),
            ("request_authentication", self.request_authentication),
            ("authorization_policies", self.authorization_policies),
        ):
            seen: dict[tuple[str | None, str], int] = {}
            for i, item in enumerate(items):
                key = (item.namespace, item.name)
                if key in seen:
                    problems.append(
                        (f"{kind}[{i}].name", f"{item.qualified_name} is also {kind}[{seen[key]}]")
                    )
                seen[key] = i
        problems.extend(_one_wide_peer_authentication(self.peer_authentication))
        if problems:
            # The root config's error type: one reported line per problem, each at its own path.
            from nodeproxy.config import _raise_problems

            _raise_problems(problems)
        return self


def _one_wide_peer_authentication(items: Sequence[PeerAuthentication]) -> list[tuple[str, str]]:
    # Two mesh-wide (or two namespace-wide) modes would leave the effective mode to the order of
    # the list; Istio picks the oldest, which a file has no notion of.
    problems = []
    wide: dict[str | None, int] = {}
    for i, item in enumerate(items):
        if item.selector is not None:
            continue
        if item.namespace in wide:
            where = "mesh" if item.namespace is None else f"namespace {item.namespace}"
            problems.append(
                (
                    f"peer_authentication[{i}]",
                    f"a second {where}-wide object (the first is "
                    f"peer_authentication[{wide[item.namespace]}]); keep one",
                )
            )
        else:
            wide[item.namespace] = i
    return problems
