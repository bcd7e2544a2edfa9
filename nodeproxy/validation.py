"""Field validators shared by every configuration model (nodeproxy.config and the models of
routes, resilience, tracing, identity and authz, which nodeproxy.config imports in turn): a leaf
module, so each of them imports these directly."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from ipaddress import IPv4Address

_DURATION_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)?", re.ASCII)
_UNIT_SECONDS = {"ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}


def parse_duration_value(value: object) -> float:
    # Messages leave out the value: pydantic errors already show it as "(got ...)".
    if isinstance(value, bool):  # bool is an int subclass; `timeout: yes` is a typo, not 1 s
        raise ValueError("expected a duration such as '250ms' or '1.5s', not a boolean")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("duration must not be negative")
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            raise ValueError("duration is too large") from None
        if not math.isfinite(seconds):
            raise ValueError("duration must be finite")
        return seconds
    if not isinstance(value, str):
        # Not TypeError: that would escape pydantic's per-field error collection.
        raise ValueError(f"expected a duration such as '250ms' or '1.5s', not {type(value).__name__}")
    text = value.strip()
    if text.startswith("-"):
        raise ValueError("duration must not be negative")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(
            "expected a number with an optional unit ms, s, m or h (e.g. '250ms', '1.5s', '2m'); "
            "a bare number means seconds"
        )
    # Fraction keeps the arithmetic exact so "1500ms" is exactly 1.5 and the result is the
    # correctly rounded float, identical to n / 1000 for any integer n.
    exact = Fraction(match["num"]) * _UNIT_SECONDS[match["unit"] or "s"]
    try:
        return float(exact)
    except OverflowError:
        raise ValueError("duration is too large") from None


# The relay keeps timeouts in whole milliseconds (RelayConfig.connect_timeout_ms, idle_timeout_ms).
_MILLISECOND = 0.001


def at_least_a_millisecond(value: float) -> float:
    if value < _MILLISECOND:
        raise ValueError("must be at least 1ms, the relay's timer resolution (less would round to 0)")
    return value


def off_or_at_least_a_millisecond(value: float) -> float:
    if 0 < value < _MILLISECOND:
        raise ValueError(
            "must be 0 (off) or at least 1ms, the relay's timer resolution: a shorter time would round "
            "to 0, which turns the timeout off"
        )
    return value


_DNS_LABEL_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
_LABEL_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", re.ASCII)
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", re.ASCII)


def dns_label(value: str) -> str:
    if not _DNS_LABEL_RE.fullmatch(value):
        raise ValueError(
            "must be an RFC 1123 DNS label: 1-63 lowercase letters, digits or '-', "
            "starting and ending with a letter or digit"
        )
    return value


def label_key(value: str) -> str:
    prefix, slash, name = value.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(prefix)):
        raise ValueError("the label key's prefix must be a lowercase DNS subdomain of at most 253 characters")
    if not _LABEL_NAME_RE.fullmatch(name):
        raise ValueError(
            "a label key must be 1-63 characters from [A-Za-z0-9._-], starting and ending with a letter "
            "or digit, after an optional 'prefix/'"
        )
    return value


def label_value(value: str) -> str:
    if len(value) > 63:
        raise ValueError(f"a label value must be at most 63 characters (has {len(value)})")
    return value


def ipv4_input(value: object) -> object:
    # pydantic would also take an int (`vip: 10` -> 0.0.0.10), which is always a typo in YAML.
    if isinstance(value, IPv4Address):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"expected an IPv4 address as a string such as '10.96.0.10', not {type(value).__name__}"
        )
    try:
        return IPv4Address(value)
    except ValueError:
        raise ValueError("not a valid IPv4 address (expected dotted quad such as '10.96.0.10')") from None
