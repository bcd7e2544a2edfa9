"""Fault injection (issue 8 point 7): delay and abort percentages, header match."""

from __future__ import annotations

import random

import pytest

from nodeproxy.resilience.fault import FaultAction, FaultPolicy, HeaderCondition
from nodeproxy.resilience.outcome import GrpcStatus
from nodeproxy.routes import RouteRegex


def test_percentages_are_honoured_independently() -> None:
    policy = FaultPolicy(delay=0.5, delay_percent=20.0, abort_status=503, abort_percent=10.0)
    rng = random.Random(9)
    actions = [policy.decide({}, rng) for _ in range(20_000)]
    delayed = sum(a.delay == 0.5 for a in actions) / len(actions)
    aborted = sum(a.abort is not None for a in actions) / len(actions)
    both = sum(a.delay > 0 and a.abort is not None for a in actions) / len(actions)
    assert abs(delayed - 0.20) < 0.01 and abs(aborted - 0.10) < 0.01
    assert abs(both - 0.02) < 0.005  # independent draws


def test_abort_answer() -> None:
    action = FaultPolicy(
        abort_status=418, abort_grpc_status=GrpcStatus.UNAVAILABLE, abort_percent=100.0
    ).decide({}, random.Random(1))
    assert action.delay == 0.0 and action.abort is not None
    assert (action.abort.status, action.abort.flag, action.abort.grpc_status) == (418, "FI", 14)


def test_zero_percent_and_no_policy_never_fault() -> None:
    rng = random.Random(2)
    assert FaultPolicy(delay=1.0, delay_percent=0.0).decide({}, rng) == FaultAction(0.0, None)
    assert all(FaultPolicy().decide({}, rng) == FaultAction(0.0, None) for _ in range(100))
    always = FaultPolicy(delay=0.1, delay_percent=100.0)
    assert all(always.decide({}, rng).delay == 0.1 for _ in range(1000))


def test_only_requests_whose_headers_match() -> None:
    policy = FaultPolicy(
        abort_status=500,
        abort_percent=100.0,
        headers=(
            HeaderCondition("x-chaos", exact="on"),
            HeaderCondition("x-user", prefix="test-"),
            HeaderCondition("x-build", regex=RouteRegex("[0-9]+")),
            HeaderCondition("x-present"),
        ),
    )
    assert policy.header_names == {"x-chaos", "x-user", "x-build", "x-present"}
    rng = random.Random(3)
    good = {"x-chaos": "on", "x-user": "test-1", "x-build": "42", "x-present": ""}
    assert policy.decide(good, rng).abort is not None
    for name, value in [("x-chaos", "off"), ("x-user", "prod-1"), ("x-build", "42a")]:
        assert policy.decide({**good, name: value}, rng).abort is None, name
    missing = dict(good)
    del missing["x-present"]
    assert policy.decide(missing, rng).abort is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delay_percent": 101.0}, "delay_percent"),
        ({"abort_percent": -1.0, "abort_status": 500}, "abort_percent"),
        ({"abort_percent": 5.0}, "needs abort_status"),
        ({"abort_status": 100}, "abort_status"),
        ({"abort_status": 500, "abort_grpc_status": 17}, "gRPC code"),
        ({"delay": -1.0}, "delay"),
    ],
)
def test_policy_checks(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FaultPolicy(**kwargs)  # type: ignore[arg-type]


def test_header_condition_checks() -> None:
    with pytest.raises(ValueError, match="at most one"):
        HeaderCondition("x", exact="a", prefix="b")
    with pytest.raises(ValueError, match="lower case"):
        HeaderCondition("X-Chaos")
