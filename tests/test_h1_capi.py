"""The C API of nodeproxy._h1 as the engine uses it: through a cimport from another Cython module
(tests/h1_capi_probe.pyx, compiled here), with the body fed in pieces and its unconsumed rest kept."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
TRUNCATED = "connection closed before the end of the body"
CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the cimport probe")
    build = tmp_path_factory.mktemp("h1probe")
    shutil.copy(ROOT / "tests" / "h1_capi_probe.pyx", build / "h1_capi_probe.pyx")
    script = textwrap.dedent(
        f"""
        from Cython.Build import cythonize
        from setuptools import Extension, setup
        setup(
            script_args=["build_ext", "--inplace", "-q"],
            ext_modules=cythonize(
                [Extension("h1_capi_probe", ["h1_capi_probe.pyx"], extra_compile_args=["-O1"])],
                include_path=[{str(ROOT)!r}],
                quiet=True,
            ),
        )
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=build, check=True, capture_output=True, timeout=240)
    built = next(build.glob("h1_capi_probe*.so"))
    spec = importlib.util.spec_from_file_location("h1_capi_probe", built)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_constants_match_the_python_side(probe: ModuleType) -> None:
    from nodeproxy import _h1

    constants = probe.constants()
    assert constants["max_head_bytes"] == _h1.DEFAULT_MAX_HEAD_BYTES == 61440
    assert constants["max_fields"] == _h1.DEFAULT_MAX_FIELDS == 100
    assert constants["fields_cap"] >= constants["max_fields"]
    assert constants["max_chunk_line"] == _h1.MAX_CHUNK_LINE


@pytest.mark.parametrize(
    ("raw", "is_request", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\n", True, (1, 1, 27)),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", True, (-1, -1, 0)),
        (b"GET / HTTP/1.1\r\nHost: a\r\n", True, (0, 0, 0)),
        (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n", False, (1, 1, 27)),
    ],
)
def test_a_finished_head_stays_finished(
    probe: ModuleType, raw: bytes, is_request: bool, expected: tuple[int, int, int]
) -> None:
    """Calling the parser again without h1_head_init must not read the next message as fields."""
    assert probe.parse_again(raw, is_request) == expected


BODY = (
    b"5;ext=1\r\nhello\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"1\r\n!\r\n"
    b"0\r\nGrpc-Status: 0\r\nGrpc-Message: ok\r\n\r\n"
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(BODY)), max_size=20))
def test_relayed_chunked_body_is_exact_whatever_the_pieces(probe: ModuleType, cuts: list[int]) -> None:
    payload, trailers, forwarded, ended, largest_rest, error = probe.relay_body(CHUNKED_HEAD, BODY, cuts)
    assert error is None and ended
    assert payload == b"hello" + b"x" * 1024 + b"!"
    assert trailers == [b"Grpc-Status: 0\r\nGrpc-Message: ok\r\n"]
    assert forwarded == BODY  # h1 -> h1 forwards exactly what was consumed
    # What the engine must keep between reads is bounded by one chunk line or the trailer section.
    assert largest_rest < 64


def test_unconsumed_rest_is_bounded_by_the_chunk_line_limit(probe: ModuleType) -> None:
    long_line = b"5;" + b"e" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    _, _, forwarded, ended, largest_rest, error = probe.relay_body(
        CHUNKED_HEAD, long_line, list(range(0, 6000, 100))
    )
    assert (ended, error, forwarded) == (False, "chunk-size line too long", b"")
    assert largest_rest <= 4096 + 100


def test_bytes_after_the_body_are_not_consumed(probe: ModuleType) -> None:
    body = b"3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\n"
    payload, _, forwarded, ended, _, error = probe.relay_body(CHUNKED_HEAD, body, [])
    assert (payload, forwarded, ended, error) == (b"abc", b"3\r\nabc\r\n0\r\n\r\n", True, None)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n"
    payload, _, forwarded, ended, _, _ = probe.relay_body(head, b"abcdGET", [2])
    assert (payload, forwarded, ended) == (b"abcd", b"abcd", True)


@pytest.mark.parametrize(
    ("head", "body", "is_response", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", b"stream", True, (1, None)),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", b"short", True, (-1, TRUNCATED)),
        (CHUNKED_HEAD, b"3\r\nab", False, (-1, TRUNCATED)),
        (CHUNKED_HEAD, b"0\r\n\r\n", False, (1, None)),
    ],
)
def test_eof(
    probe: ModuleType, head: bytes, body: bytes, is_response: bool, expected: tuple[int, str | None]
) -> None:
    assert probe.eof_after(head, body, is_response) == expected


def test_serializer_never_writes_past_its_capacity(probe: ModuleType) -> None:
    raw = b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nX-A: 1\r\nContent-Length: 0\r\n\r\n"
    expected = b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    for cap in range(len(expected)):
        result, _, guard_intact = probe.serialize_with_capacity(raw, cap)
        assert (result, guard_intact) == (-1, True), cap
    assert probe.serialize_with_capacity(raw, len(expected)) == (len(expected), expected, True)


@given(st.integers(0, 2**64 - 1))
def test_chunk_header(probe: ModuleType, size: int) -> None:
    assert probe.chunk_header_bytes(size) == f"{size:x}\r\n".encode()
