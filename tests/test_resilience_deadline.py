"""Deadlines (issue 8 point 3): grpc-timeout per the gRPC spec, x-nodeproxy-timeout-ms, propagation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.resilience.deadline import (
    DEFAULT_ROUTE_TIMEOUT,
    Deadline,
    deadline_exceeded,
    format_grpc_timeout,
    format_timeout_ms,
    parse_grpc_timeout,
    parse_timeout_ms,
)
from nodeproxy.resilience.outcome import GrpcStatus


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("3S", 3.0),
        ("250m", 0.25),
        ("1500u", 0.0015),
        ("100n", 1e-7),
        ("0m", 0.0),
        ("99999999S", 99999999.0),
        ("00000001S", 1.0),
    ],
)
def test_grpc_timeout_parses_every_unit(value: str, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "S", "1", "123456789S", "1s", "1h", "-1S", "+1S", "1.5S", " 1S", "1S ", "1 S", "\u0661S", "0x1S"],
)
def test_grpc_timeout_rejects_what_the_spec_does_not_allow(value: str) -> None:
    assert parse_grpc_timeout(value) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250000u"), (1.0, "1000000u"), (0.0000001, "100n"), (3600.0, "3600000m"), (0.0, "0n")],
)
def test_grpc_timeout_formats_in_the_finest_unit_that_fits(seconds: float, text: str) -> None:
    assert format_grpc_timeout(seconds) == text


@given(st.floats(0, 1e9, allow_nan=False))
def test_grpc_timeout_round_trip_never_shortens(seconds: float) -> None:
    text = format_grpc_timeout(seconds)
    value, unit = text[:-1], text[-1]
    assert 1 <= len(value) <= 8 and unit in "numSMH"
    parsed = parse_grpc_timeout(text)
    assert parsed is not None
    assert parsed >= seconds - 1e-9 * max(1.0, seconds)  # rounded up, never down
    # ... by less than one unit, and the unit is the finest whose 8 digits hold the value.
    units = "numSMH"
    scale = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "S": 1.0, "M": 60.0, "H": 3600.0}
    assert parsed - seconds <= scale[unit] * (1 + 1e-9)
    if unit != "n":
        finer = units[units.index(unit) - 1]
        assert seconds / scale[finer] > 99999999 * (1 - 1e-9)


def test_timeout_ms_header() -> None:
    assert parse_timeout_ms("250") == 0.25
    assert parse_timeout_ms(" 1000 ") == 1.0
    for bad in ("", "-5", "1.5", "1e3", "12345678901", "0x10", "5ms"):
        assert parse_timeout_ms(bad) is None, bad
    assert format_timeout_ms(0.2504) == "251"  # rounded up
    assert format_timeout_ms(-1.0) == "0"


def test_route_timeout_default_is_envoys() -> None:
    assert DEFAULT_ROUTE_TIMEOUT == 15.0


def test_deadline_from_route_timeout_and_caller_headers() -> None:
    d = Deadline.for_request(100.0, 2.0, {}, grpc=False)
    assert d.expires_at == 102.0
    # A caller can shorten the deadline ...
    assert Deadline.for_request(100.0, 2.0, {"x-nodeproxy-timeout-ms": "200"}, grpc=False).expires_at == 100.2
    assert Deadline.for_request(100.0, 2.0, {"grpc-timeout": "300m"}, grpc=True).expires_at == 100.3
    # ... never lengthen it.
    assert (
        Deadline.for_request(100.0, 2.0, {"x-nodeproxy-timeout-ms": "9000"}, grpc=False).expires_at == 102.0
    )
    # Each protocol reads its own header only; malformed values are ignored.
    assert Deadline.for_request(100.0, 2.0, {"grpc-timeout": "1m"}, grpc=False).expires_at == 102.0
    assert Deadline.for_request(100.0, 2.0, {"grpc-timeout": "soon"}, grpc=True).expires_at == 102.0
    # Without a route timeout the caller's applies; with neither there is no deadline.
    assert Deadline.for_request(5.0, 0.0, {"grpc-timeout": "1S"}, grpc=True).expires_at == 6.0
    assert Deadline.for_request(5.0, 0.0, {}, grpc=True).expires_at is None
    # Callers may be ignored by configuration.
    ignored = Deadline.for_request(100.0, 2.0, {"grpc-timeout": "1m"}, grpc=True, honor_caller_timeout=False)
    assert ignored.expires_at == 102.0
    with pytest.raises(ValueError, match="route timeout"):
        Deadline.for_request(0.0, -1.0, {}, grpc=False)


def test_remaining_expired_and_attempt_timeouts() -> None:
    d = Deadline(10.0)
    assert d.remaining(9.75) == 0.25 and not d.expired(9.75)
    assert d.remaining(11.0) == 0.0 and d.expired(10.0)
    assert d.attempt_timeout(9.0, None) == 1.0
    assert d.attempt_timeout(9.0, 0.3) == 0.3
    assert d.attempt_timeout(9.9, 0.3) == pytest.approx(0.1)
    none = Deadline(None)
    assert none.remaining(1e9) == math.inf and not none.expired(1e9)
    assert none.attempt_timeout(0.0, None) is None and none.attempt_timeout(0.0, 2.0) == 2.0


def test_remaining_time_propagates_upstream() -> None:
    d = Deadline(10.0)
    assert d.upstream_headers(9.75, grpc=True) == (("grpc-timeout", "250000u"),)
    assert d.upstream_headers(9.75, grpc=False) == (("x-nodeproxy-timeout-ms", "250"),)
    assert Deadline(None).upstream_headers(0.0, grpc=True) == ()


def test_deadline_exceeded_answer() -> None:
    answer = deadline_exceeded("route timeout 200ms")
    assert (answer.status, answer.flag, answer.grpc_status) == (504, "UT", GrpcStatus.DEADLINE_EXCEEDED)
