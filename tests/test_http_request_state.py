"""The per-request state of the HTTP engine's Python side: what its hand-tuned fast paths must keep."""

from __future__ import annotations

import dataclasses
import itertools
from typing import cast

import pytest

from nodeproxy import _l7
from nodeproxy.proxy.http import FLAG_NAMES, HttpConnection, PendingRequest, _flag_text, flag_text
from nodeproxy.proxy.http_route import RequestAttrs


def test_pending_request_starts_with_every_declared_default() -> None:
    # PendingRequest's __init__ is written out by hand: a field added to the class but not to it would
    # be unset (AttributeError at its first read), one given another value would change behaviour.
    conn = HttpConnection(1, "10.244.1.2", 40000, "10.96.0.23", 80, 0.0, cast(_l7.HttpWorker, None))
    attrs = RequestAttrs("GET", "web", "/", "", {})
    request = PendingRequest(conn, attrs)
    assert request.conn is conn and request.attrs is attrs
    for spec in dataclasses.fields(PendingRequest):
        if spec.name in ("conn", "attrs"):
            continue
        assert spec.default is not dataclasses.MISSING, f"{spec.name} has no default"
        assert getattr(request, spec.name) is spec.default, spec.name
    named = PendingRequest(conn, attrs, service="web", route="default")
    assert (named.service, named.route) == ("web", "default")


def reference_flag_text(bits: int, local_flag: str | None, extra_flag: str | None) -> str:
    """flag_text's contract without its fast path or cache: the uncached general case."""
    return _flag_text.__wrapped__(bits, local_flag, extra_flag)


@pytest.mark.parametrize("local_flag", [None, "", "RL", "UF"])
@pytest.mark.parametrize("extra_flag", [None, "", "URX"])
def test_flag_text_matches_its_contract(local_flag: str | None, extra_flag: str | None) -> None:
    bits = [bit for bit, _ in FLAG_NAMES]
    masks = {0, *bits, *(a | b for a, b in itertools.combinations(bits, 2))}
    for mask in sorted(masks):
        assert flag_text(mask, local_flag, extra_flag) == reference_flag_text(mask, local_flag, extra_flag)
    assert flag_text(0) == "-"
