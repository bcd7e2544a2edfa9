"""The HTTP/1.1 codec (nodeproxy._h1): every strictness rule as a table, body framing, pipelining, the
response side's no-body rules, and the forwarded-head serializer."""

from __future__ import annotations

import pytest

from nodeproxy import _h1
from nodeproxy._h1 import H1RequestParser, H1ResponseParser, serialize_head, sniff_request
from nodeproxy.proxy.http_events import (
    ConnectionClosed,
    DataReceived,
    Event,
    MessageEnded,
    ProtocolErrored,
    RequestReceived,
    ResponseReceived,
    TrailersReceived,
)


def request(head_fields: bytes = b"Host: a.example\r\n", start: bytes = b"GET / HTTP/1.1") -> bytes:
    return start + b"\r\n" + head_fields + b"\r\n"


def parse(data: bytes) -> list[Event]:
    return H1RequestParser().feed(data)


def only_error(events: list[Event]) -> ProtocolErrored:
    errors = [e for e in events if isinstance(e, ProtocolErrored)]
    assert len(errors) == 1, events
    assert events[-1] is errors[0], "nothing may follow an error"
    return errors[0]


def body_of(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived))


# Requests that must be rejected: (id, bytes, status, the rule named in the reason).
BAD_REQUESTS: list[tuple[str, bytes, int, str]] = [
    # RFC 9112 §6.3: Content-Length with Transfer-Encoding, either order.
    (
        "cl-then-te",
        request(b"Host: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
        400,
        "content-length with transfer-encoding",
    ),
    (
        "te-then-cl",
        request(b"Host: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"),
        400,
        "content-length with transfer-encoding",
    ),
    # RFC 9110 §8.6: differing or malformed Content-Length.
    (
        "cl-differs-fields",
        request(b"Host: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n"),
        400,
        "differing content-length",
    ),
    ("cl-differs-list", request(b"Host: a\r\nContent-Length: 3, 4\r\n"), 400, "differing content-length"),
    ("cl-plus", request(b"Host: a\r\nContent-Length: +3\r\n"), 400, "invalid content-length"),
    ("cl-minus", request(b"Host: a\r\nContent-Length: -3\r\n"), 400, "invalid content-length"),
    ("cl-hex", request(b"Host: a\r\nContent-Length: 0x3\r\n"), 400, "invalid content-length"),
    ("cl-suffix", request(b"Host: a\r\nContent-Length: 3a\r\n"), 400, "invalid content-length"),
    ("cl-inner-space", request(b"Host: a\r\nContent-Length: 3 3\r\n"), 400, "invalid content-length"),
    ("cl-empty", request(b"Host: a\r\nContent-Length: \r\n"), 400, "invalid content-length"),
    ("cl-trailing-comma", request(b"Host: a\r\nContent-Length: 3,\r\n"), 400, "invalid content-length"),
    ("cl-2^63", request(b"Host: a\r\nContent-Length: 9223372036854775808\r\n"), 400, "overflows"),
    # RFC 9112 §6.1, §6.3, §7: transfer codings.
    ("te-gzip-final", request(b"Host: a\r\nTransfer-Encoding: gzip\r\n"), 400, "final coding is not chunked"),
    ("te-after-chunked", request(b"Host: a\r\nTransfer-Encoding: chunked, gzip\r\n"), 400, "after chunked"),
    (
        "te-after-chunked-2-fields",
        request(b"Host: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n"),
        400,
        "after chunked",
    ),
    ("te-chunked-twice", request(b"Host: a\r\nTransfer-Encoding: chunked, chunked\r\n"), 400, "twice"),
    ("te-empty", request(b"Host: a\r\nTransfer-Encoding: \r\n"), 400, "final coding is not chunked"),
    ("te-chunked-param", request(b"Host: a\r\nTransfer-Encoding: chunked;q=1\r\n"), 400, "parameters"),
    ("te-unknown", request(b"Host: a\r\nTransfer-Encoding: foo\r\n"), 501, "unknown transfer coding"),
    ("te-unknown-then-chunked", request(b"Host: a\r\nTransfer-Encoding: foo, chunked\r\n"), 501, "unknown"),
    (
        "te-gzip-chunked",
        request(b"Host: a\r\nTransfer-Encoding: gzip, chunked\r\n"),
        501,
        "other than chunked",
    ),
    ("te-chunkedx", request(b"Host: a\r\nTransfer-Encoding: chunkedx\r\n"), 501, "unknown transfer coding"),
    ("te-vtab", request(b"Host: a\r\nTransfer-Encoding: chunked\x0b\r\n"), 400, "control character"),
    ("te-quoted", request(b'Host: a\r\nTransfer-Encoding: "chunked"\r\n'), 400, "invalid transfer-encoding"),
    (
        "te-in-http10",
        request(b"Transfer-Encoding: chunked\r\n", b"POST / HTTP/1.0"),
        400,
        "transfer-encoding in an http/1.0",
    ),
    # RFC 9112 §5.2, §2.2: obs-fold and whitespace after the start line.
    ("obs-fold-sp", request(b"Host: a\r\nX-A: b\r\n c\r\n"), 400, "obs-fold"),
    ("obs-fold-tab", request(b"Host: a\r\nX-A: b\r\n\tc\r\n"), 400, "obs-fold"),
    ("ws-after-start-line", request(b" Host: a\r\n"), 400, "whitespace between the start line"),
    # RFC 9112 §2.2: bare CR anywhere; bare LF as a line terminator (rejected, not tolerated).
    ("bare-cr-value", request(b"Host: a\r\nX-A: b\rc\r\n"), 400, "bare CR"),
    ("bare-cr-name", request(b"Host: a\r\nX\rA: b\r\n"), 400, "bare CR"),
    ("bare-cr-target", b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bare CR"),
    ("bare-cr-end-of-value", request(b"Host: a\r\nX-A: b\r\r\n"), 400, "bare CR"),
    ("bare-lf-all", b"GET / HTTP/1.1\nHost: a\n\n", 400, "bare LF"),
    ("bare-lf-field", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400, "bare LF"),
    ("bare-lf-end", b"GET / HTTP/1.1\r\nHost: a\r\n\n", 400, "bare LF"),
    ("bare-lf-first", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bare LF"),
    # RFC 9110 §5.5: NUL / CTL in values.
    ("nul-value", request(b"Host: a\r\nX-A: b\x00c\r\n"), 400, "NUL"),
    ("ctl-value", request(b"Host: a\r\nX-A: b\x01c\r\n"), 400, "control character in field value"),
    ("del-value", request(b"Host: a\r\nX-A: b\x7fc\r\n"), 400, "control character in field value"),
    ("esc-value", request(b"Host: a\r\nX-A: \x1b[31m\r\n"), 400, "control character in field value"),
    # RFC 9112 §5.1: whitespace before the colon; RFC 9110 §5.1: names are tokens.
    ("sp-before-colon", request(b"Host : a\r\n"), 400, "whitespace between field name and colon"),
    ("tab-before-colon", request(b"Host\t: a\r\n"), 400, "whitespace between field name and colon"),
    ("name-paren", request(b"Host: a\r\nX(A): b\r\n"), 400, "invalid character in field name"),
    ("name-at", request(b"Host: a\r\nX@A: b\r\n"), 400, "invalid character in field name"),
    ("name-non-ascii", request(b"Host: a\r\nX\xc3\xa9: b\r\n"), 400, "invalid character in field name"),
    ("name-nul", request(b"Host: a\r\nX\x00: b\r\n"), 400, "NUL"),
    ("name-empty", request(b"Host: a\r\n: b\r\n"), 400, "empty field name"),
    ("no-colon", request(b"Host: a\r\nX-A\r\n"), 400, "without a colon"),
    # RFC 9112 §3: method token, single SP.
    ("method-paren", b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method"),
    ("method-tab", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method"),
    ("method-leading-space", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method"),
    ("method-non-ascii", b"G\xc3\x89T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid method"),
    ("method-only", b"GET\r\nHost: a\r\n\r\n", 400, "invalid method"),
    ("double-sp", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("trailing-sp", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "invalid http version"),
    # RFC 9112 §3.2: request-target forms.
    ("target-relative", b"GET a/b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("target-fragment", b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("target-del", b"GET /a\x7f HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("target-non-ascii", b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("target-nul", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "NUL"),
    ("asterisk-get", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "asterisk-form"),
    ("connect-origin", b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "authority-form"),
    ("connect-no-port", b"CONNECT a.example HTTP/1.1\r\nHost: a\r\n\r\n", 400, "authority-form"),
    ("connect-empty-host", b"CONNECT :443 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "authority-form"),
    ("absolute-ftp", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    ("absolute-userinfo", b"GET http://u@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid authority"),
    ("absolute-no-authority", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "invalid authority"),
    # RFC 9112 §2.3: versions.
    ("version-2", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "version not supported"),
    ("version-1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, "version not supported"),
    ("version-0.9", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "version not supported"),
    ("version-lower", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400, "invalid http version"),
    ("version-short", b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400, "invalid http version"),
    ("version-long", b"GET / HTTP/1.10\r\nHost: a\r\n\r\n", 400, "invalid http version"),
    ("version-missing", b"GET /\r\nHost: a\r\n\r\n", 400, "invalid request-target"),
    # RFC 9112 §3.2: Host.
    ("host-missing", request(b"X-A: b\r\n"), 400, "missing host"),
    ("host-duplicate", request(b"Host: a\r\nHost: a\r\n"), 400, "duplicate host"),
    ("host-duplicate-case", request(b"Host: a\r\nhOST: b\r\n"), 400, "duplicate host"),
    ("host-space", request(b"Host: a b\r\n"), 400, "invalid host"),
    ("host-userinfo", request(b"Host: u@a\r\n"), 400, "invalid host"),
    ("host-slash", request(b"Host: a/b\r\n"), 400, "invalid host"),
    # RFC 9112 §2.2: a few empty lines before the request line are tolerated, a flood is not.
    ("many-empty-lines", b"\r\n" * 5 + request(), 400, "empty lines"),
    # Limits: 100 fields, 60 KiB.
    ("101-fields", request(b"Host: a\r\n" + b"X-F: v\r\n" * 100), 431, "too many header fields"),
    ("head-over-60k", request(b"Host: a\r\nX-Big: " + b"v" * 61440 + b"\r\n"), 431, "larger than the limit"),
]


@pytest.mark.parametrize(
    ("raw", "status", "rule"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_rejected(raw: bytes, status: int, rule: str) -> None:
    error = only_error(parse(raw))
    assert (error.status, rule in error.reason) == (status, True), error
    assert error.stream_id == 1


@pytest.mark.parametrize(
    ("raw", "status", "rule"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_request_rejected_byte_by_byte(raw: bytes, status: int, rule: str) -> None:
    """The resumable scan finds the same error whatever the packet boundaries."""
    parser = H1RequestParser()
    events: list[Event] = []
    for i in range(len(raw)):
        events += parser.feed(raw[i : i + 1])
    error = only_error(events)
    assert (error.status, rule in error.reason) == (status, True), error


def test_error_is_final() -> None:
    parser = H1RequestParser()
    assert isinstance(parser.feed(request(b"Host : a\r\n"))[-1], ProtocolErrored)
    assert parser.feed(request()) == []
    assert parser.feed_eof() == []
    assert not parser.should_keep_alive


def test_incomplete_head_over_the_limit_is_431_without_its_end() -> None:
    parser = H1RequestParser(max_head_bytes=1024)
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * 900) == []
    error = only_error(parser.feed(b"v" * 200))
    assert error.status == 431


def test_head_exactly_at_the_limit_passes() -> None:
    head = request(b"Host: a\r\nX-Big: ")
    filler = b"v" * (61440 - len(head) - 2)
    exact = request(b"Host: a\r\nX-Big: " + filler + b"\r\n")
    assert len(exact) == 61440
    assert isinstance(parse(exact)[0], RequestReceived)
    assert only_error(parse(request(b"Host: a\r\nX-Big: v" + filler + b"\r\n"))).status == 431


def test_100_fields_pass() -> None:
    events = parse(request(b"Host: a\r\n" + b"X-F: v\r\n" * 99))
    assert isinstance(events[0], RequestReceived)
    assert len(events[0].headers) == 100


def test_field_limit_is_configurable_and_checked() -> None:
    assert (
        only_error(H1RequestParser(max_fields=2).feed(request(b"Host: a\r\nA: 1\r\nB: 2\r\n"))).status == 431
    )
    with pytest.raises(ValueError):
        H1RequestParser(max_fields=_h1.FIELDS_CAP + 1)
    with pytest.raises(ValueError):
        H1RequestParser(max_head_bytes=0)


def test_request_head_fields() -> None:
    raw = (
        b"POST /v1/items?id=7&x=%20 HTTP/1.1\r\nHost: api.example:8080\r\nX-Empty:\r\n"
        b"X-Pad: \t padded value \t\r\nX-Obs: caf\xc3\xa9\r\nContent-Length: 0\r\n\r\n"
    )
    events = parse(raw)
    assert events == [
        RequestReceived(
            1,
            b"POST",
            b"/v1/items?id=7&x=%20",
            b"api.example:8080",
            (
                (b"host", b"api.example:8080"),
                (b"x-empty", b""),
                (b"x-pad", b"padded value"),
                (b"x-obs", b"caf\xc3\xa9"),
                (b"content-length", b"0"),
            ),
        ),
        MessageEnded(1),
    ]


@pytest.mark.parametrize(
    ("raw", "method", "target", "authority"),
    [
        (
            b"GET http://b.example:81/p?q HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET",
            b"http://b.example:81/p?q",
            b"b.example:81",
        ),
        (b"GET HTTPS://b.example HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"HTTPS://b.example", b"b.example"),
        (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", b"OPTIONS", b"*", b"a"),
        (b"CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n", b"CONNECT", b"[::1]:443", b"[::1]:443"),
        (b"GET /x HTTP/1.0\r\n\r\n", b"GET", b"/x", b""),
        (b"M-SEARCH /a|b{c}^ HTTP/1.1\r\nHost: a\r\n\r\n", b"M-SEARCH", b"/a|b{c}^", b"a"),
        (b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"/", b"a"),
    ],
)
def test_request_target_forms(raw: bytes, method: bytes, target: bytes, authority: bytes) -> None:
    head = parse(raw)[0]
    assert isinstance(head, RequestReceived)
    assert (head.method, head.target, head.authority) == (method, target, authority)


@pytest.mark.parametrize(
    ("fields", "length"),
    [
        (b"Content-Length: 5\r\n", 5),
        (b"Content-Length: 5, 5\r\n", 5),
        (b"Content-Length: 5\r\nContent-Length: 5\r\n", 5),
        (b"Content-Length: 005\r\n", 5),
        (b"content-length:5\r\n", 5),
    ],
)
def test_content_length_forms(fields: bytes, length: int) -> None:
    body = b"0123456789"
    events = parse(request(b"Host: a\r\n" + fields) + body)
    assert body_of(events) == body[:length]
    assert events[-1] == MessageEnded(1)  # the rest is taken as the start of the next request


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: Chunked\r\n",
        b"Transfer-Encoding:\tCHUNKED \r\n",
        b"Transfer-Encoding: ,chunked,\r\n",  # empty list elements are ignored (RFC 9110 §5.6.1.2)
    ],
)
def test_transfer_encoding_forms(fields: bytes) -> None:
    events = parse(request(b"Host: a\r\n" + fields, b"POST / HTTP/1.1") + b"2\r\nok\r\n0\r\n\r\n")
    assert body_of(events) == b"ok" and events[-1] == MessageEnded(1)


def test_largest_content_length_is_accepted() -> None:
    parser = H1RequestParser()
    events = parser.feed(request(b"Host: a\r\nContent-Length: 9223372036854775807\r\n") + b"abc")
    assert isinstance(events[0], RequestReceived)
    assert body_of(events) == b"abc"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            b"\r\nPOST /a/b?c=d&e HTTP/1.1\r\nHost: h:1\r\nContent-Length: 1, 1\r\n"
            b"Expect: 100-Continue\r\n\r\nx",
            {
                "method_id": "POST",
                "target_form": "origin",
                "path": b"/a/b",
                "query": b"c=d&e",
                "authority": b"h:1",
                "host": b"h:1",
                "content_length": 1,
                "expect_continue": True,
                "head_len": 85,
                "keep_alive": True,
            },
        ),
        (
            b"GET http://x.example/?q HTTP/1.1\r\nHost: other\r\nConnection: Upgrade, close\r\n"
            b"Upgrade: h2c\r\n\r\n",
            {
                "method_id": "GET",
                "target_form": "absolute",
                "path": b"/",
                "query": b"q",
                "authority": b"x.example",
                "host": b"other",
                "conn_upgrade": True,
                "conn_close": True,
                "upgrade": b"h2c",
                "keep_alive": False,
            },
        ),
        (
            b"GET https://x.example HTTP/1.1\r\nHost: x.example\r\nTE: gzip;q=0.5, trailers\r\n\r\n",
            {
                "target_form": "absolute",
                "path": b"",
                "query": b"",
                "authority": b"x.example",
                "te_trailers": True,
            },
        ),
        (
            b"CONNECT x.example:443 HTTP/1.1\r\nHost: x.example:443\r\n\r\n",
            {"method_id": "CONNECT", "target_form": "authority", "path": b"", "authority": b"x.example:443"},
        ),
        (
            b"OPTIONS * HTTP/1.0\r\nExpect: 100-continue\r\nConnection: keep-alive\r\n\r\n",
            {
                "method_id": "OPTIONS",
                "target_form": "asterisk",
                "path": b"*",
                "authority": b"",
                "has_host": False,
                "version_minor": 0,
                "expect_continue": False,
                "keep_alive": True,
            },
        ),
        (
            b"PURGE /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            {"method_id": "OTHER", "chunked": True, "has_transfer_encoding": True, "content_length": -1},
        ),
    ],
)
def test_head_fields_for_the_engine(raw: bytes, expected: dict[str, object]) -> None:
    info = _h1.head_info(raw)
    assert info["result"] == 1
    assert {key: info[key] for key in expected} == expected


def test_response_head_fields_for_the_engine() -> None:
    info = _h1.head_info(b"HTTP/1.1 404 Not  Found\r\nContent-Length: 0\r\n\r\n", is_request=False)
    assert (info["status"], info["reason"], info["content_length"], info["head_len"]) == (
        404,
        b"Not  Found",
        0,
        46,
    )
    info = _h1.head_info(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", is_request=False)
    assert (info["result"], info["error_status"], info["error"]) == (-1, 502, "invalid content-length")


def test_error_offset_points_at_the_rule_broken() -> None:
    raw = request(b"Host: a\r\nX-A: b\x00c\r\n")
    info = _h1.head_info(raw)
    assert (info["result"], info["error_status"]) == (-1, 400)
    offset = info["error_off"]
    assert isinstance(offset, int) and raw[offset : offset + 1] == b"\x00"
    assert _h1.head_info(b"GET / HTTP/1.1\r\nHost: a\r\n") == {"result": 0}


# ------------------------------------------------------------------------------------------- chunked

CHUNKED_HEAD = request(b"Host: a\r\nTransfer-Encoding: chunked\r\n", b"POST /up HTTP/1.1")


@pytest.mark.parametrize(
    ("body", "payload", "trailers"),
    [
        (b"5\r\nhello\r\n0\r\n\r\n", b"hello", None),
        (b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", b"hello world", None),
        (b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789", None),
        (b"a\r\n0123456789\r\n0000\r\n\r\n", b"0123456789", None),
        (b"00005\r\nhello\r\n0\r\n\r\n", b"hello", None),
        (b"5;name=value\r\nhello\r\n0;last\r\n\r\n", b"hello", None),
        (b'5 ; a = "q \\" ;x" ;b\t;c=d\r\nhello\r\n0\r\n\r\n', b"hello", None),
        (b"0\r\n\r\n", b"", None),
        (
            b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nx-other:  two \r\n\r\n",
            b"abc",
            ((b"x-sum", b"1"), (b"x-other", b"two")),
        ),
    ],
)
def test_chunked_body(body: bytes, payload: bytes, trailers: tuple[tuple[bytes, bytes], ...] | None) -> None:
    events = parse(CHUNKED_HEAD + body)
    assert body_of(events) == payload
    assert [e.headers for e in events if isinstance(e, TrailersReceived)] == ([trailers] if trailers else [])
    assert events[-1] == MessageEnded(1)


BAD_CHUNKS: list[tuple[str, bytes, str]] = [
    ("0x", b"0x5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    ("plus", b"+5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    ("minus", b"-5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    ("underscore", b"1_0\r\n", "invalid chunk size"),
    ("leading-space", b" 5\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    ("empty", b"\r\nhello\r\n0\r\n\r\n", "invalid chunk size"),
    ("trailing-space", b"5 \r\nhello\r\n0\r\n\r\n", "whitespace at the end"),
    ("overflow-2^63", b"8000000000000000\r\n", "overflows"),
    ("overflow-long", b"1" + b"0" * 20 + b"\r\n", "overflows"),
    ("bare-lf", b"5\nhello\r\n0\r\n\r\n", "bare LF"),
    ("ext-empty", b"5;\r\nhello\r\n0\r\n\r\n", "invalid chunk extension"),
    ("ext-no-name", b"5;=v\r\nhello\r\n0\r\n\r\n", "invalid chunk extension"),
    ("ext-no-value", b"5;n=\r\nhello\r\n0\r\n\r\n", "invalid chunk extension"),
    ("ext-two-tokens", b"5;n=a b\r\nhello\r\n0\r\n\r\n", "invalid chunk extension"),
    ("ext-open-quote", b'5;n="ab\r\nhello\r\n0\r\n\r\n', "invalid chunk extension"),
    ("ext-ctl-in-quote", b'5;n="a\x01b"\r\nhello\r\n0\r\n\r\n', "invalid chunk extension"),
    ("ext-bare-cr", b"5;n=a\rb\r\nhello\r\n0\r\n\r\n", "bare CR"),
    ("size-bare-cr", b"5\r\r\nhello\r\n0\r\n\r\n", "bare CR"),
    ("ext-trailing-space", b"5;n=a \r\nhello\r\n0\r\n\r\n", "whitespace at the end"),
    ("ext-too-long", b"5;n=" + b"a" * _h1.MAX_CHUNK_LINE + b"\r\nhello\r\n0\r\n\r\n", "too long"),
    ("data-overrun", b"3\r\nabcd\r\n0\r\n\r\n", "not followed by CRLF"),
    ("data-no-crlf", b"3\r\nabc0\r\n\r\n", "not followed by CRLF"),
    ("data-bare-lf", b"3\r\nabc\n0\r\n\r\n", "not followed by CRLF"),
    ("trailer-space-colon", b"0\r\nX-T : 1\r\n\r\n", "whitespace between field name and colon"),
    ("trailer-obs-fold", b"0\r\nX-T: 1\r\n 2\r\n\r\n", "obs-fold"),
    ("trailer-nul", b"0\r\nX-T: \x00\r\n\r\n", "NUL"),
    ("trailer-bare-lf", b"0\r\nX-T: 1\n\r\n", "bare LF"),
    ("trailer-too-big", b"0\r\nX-T: " + b"v" * 61440 + b"\r\n\r\n", "trailer section larger"),
    ("trailer-too-many", b"0\r\n" + b"X-T: 1\r\n" * 101 + b"\r\n", "too many trailer fields"),
]


@pytest.mark.parametrize(("body", "rule"), [c[1:] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_bad_chunked_body_rejected(body: bytes, rule: str) -> None:
    error = only_error(parse(CHUNKED_HEAD + body))
    assert (error.status, rule in error.reason) == (400, True), error


@pytest.mark.parametrize(("body", "rule"), [c[1:] for c in BAD_CHUNKS], ids=[c[0] for c in BAD_CHUNKS])
def test_bad_chunked_body_rejected_byte_by_byte(body: bytes, rule: str) -> None:
    parser = H1RequestParser()
    events = parser.feed(CHUNKED_HEAD)
    for i in range(len(body)):
        events += parser.feed(body[i : i + 1])
    error = only_error(events)
    assert (error.status, rule in error.reason) == (400, True), error


def test_largest_chunk_size_is_accepted() -> None:
    events = parse(CHUNKED_HEAD + b"7fffffffffffffff\r\nabc")
    assert body_of(events) == b"abc"
    assert not any(isinstance(e, ProtocolErrored) for e in events)


def test_truncated_bodies_are_errors_at_eof() -> None:
    for raw in (CHUNKED_HEAD + b"5\r\nhel", request(b"Host: a\r\nContent-Length: 5\r\n") + b"hel"):
        parser = H1RequestParser()
        parser.feed(raw)
        assert only_error(parser.feed_eof()).status == 400
    parser = H1RequestParser()
    parser.feed(b"GET / HTTP/1.1\r\nHo")
    assert only_error(parser.feed_eof()).reason == "connection closed in the middle of a head"


def test_clean_eof_between_requests() -> None:
    parser = H1RequestParser()
    parser.feed(request())
    assert parser.feed_eof() == [ConnectionClosed(last_stream_id=1)]


# -------------------------------------------------------------------------------- pipelining, keep-alive


def test_pipelined_requests_get_stream_ids_in_order() -> None:
    raw = (
        request(b"Host: a\r\n", b"GET /1 HTTP/1.1")
        + request(b"Host: a\r\nContent-Length: 2\r\n", b"POST /2 HTTP/1.1")
        + b"xy"
        + CHUNKED_HEAD
        + b"1\r\nz\r\n0\r\n\r\n"
        + request(b"Host: a\r\n", b"GET /4 HTTP/1.1")
    )
    events = parse(raw)
    heads = [e for e in events if isinstance(e, RequestReceived)]
    assert [(h.stream_id, h.target) for h in heads] == [(1, b"/1"), (2, b"/2"), (3, b"/up"), (4, b"/4")]
    assert [e.stream_id for e in events if isinstance(e, MessageEnded)] == [1, 2, 3, 4]
    assert [(e.stream_id, e.data) for e in events if isinstance(e, DataReceived)] == [(2, b"xy"), (3, b"z")]


def test_connection_close_ends_the_pipeline() -> None:
    parser = H1RequestParser()
    events = parser.feed(request(b"Host: a\r\nConnection: close\r\n") + request())
    assert events[-2:] == [MessageEnded(1), ConnectionClosed(last_stream_id=1)]
    assert next(e for e in events if isinstance(e, RequestReceived)).stream_id == 1
    assert not parser.should_keep_alive
    assert parser.feed(request()) == []


@pytest.mark.parametrize(
    ("start", "fields", "keep_alive"),
    [
        (b"GET / HTTP/1.1", b"Host: a\r\n", True),
        (b"GET / HTTP/1.1", b"Host: a\r\nConnection: Keep-Alive, CLOSE\r\n", False),
        (b"GET / HTTP/1.0", b"", False),
        (b"GET / HTTP/1.0", b"Connection: keep-alive\r\n", True),
    ],
)
def test_should_keep_alive(start: bytes, fields: bytes, keep_alive: bool) -> None:
    parser = H1RequestParser()
    parser.feed(request(fields, start))
    assert parser.should_keep_alive is keep_alive


def test_upgrade_request_pauses_until_resumed() -> None:
    parser = H1RequestParser()
    upgrade = request(b"Host: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n")
    events = parser.feed(upgrade + b"\x81\x05hello" + request())
    assert events[-1] == MessageEnded(1) and parser.paused
    assert parser.feed(b"more") == []
    assert parser.trailing_data() == b"\x81\x05hello" + request() + b"more"
    # Refused upgrade: the same connection goes on with HTTP/1.1.
    parser = H1RequestParser()
    parser.feed(upgrade + request())
    events = parser.resume()
    assert events == [
        RequestReceived(2, b"GET", b"/", b"a.example", ((b"host", b"a.example"),)),
        MessageEnded(2),
    ]
    assert not parser.paused


def test_upgrade_without_connection_option_is_a_plain_request() -> None:
    parser = H1RequestParser()
    events = parser.feed(request(b"Host: a\r\nUpgrade: websocket\r\n") + request())
    assert [type(e) for e in events] == [RequestReceived, MessageEnded] * 2
    assert not parser.paused


def test_connect_pauses() -> None:
    parser = H1RequestParser()
    events = parser.feed(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n\x16\x03\x01")
    assert events[-1] == MessageEnded(1) and parser.paused
    assert parser.trailing_data() == b"\x16\x03\x01"


# ------------------------------------------------------------------------------------------- responses


def parse_responses(data: bytes, *methods: bytes) -> tuple[H1ResponseParser, list[Event]]:
    parser = H1ResponseParser()
    for method in methods:
        parser.expect_response(method)
    return parser, parser.feed(data)


BAD_RESPONSES: list[tuple[str, bytes, str]] = [
    ("cl-invalid", b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", "invalid content-length"),
    ("cl-differs", b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "differing"),
    (
        "cl-and-te",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "with transfer",
    ),
    ("te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "final coding is not chunked"),
    ("version-2", b"HTTP/2.0 200 OK\r\n\r\n", "version not supported"),
    ("version-bad", b"HTTP/1.x 200 OK\r\n\r\n", "invalid http version"),
    ("status-short", b"HTTP/1.1 20 OK\r\n\r\n", "invalid status"),
    ("status-long", b"HTTP/1.1 2000 OK\r\n\r\n", "invalid status"),
    ("status-099", b"HTTP/1.1 099 Low\r\n\r\n", "invalid status code"),
    ("status-600", b"HTTP/1.1 600 High\r\n\r\n", "invalid status code"),
    ("status-alpha", b"HTTP/1.1 2x0 OK\r\n\r\n", "invalid status code"),
    ("reason-ctl", b"HTTP/1.1 200 O\x01K\r\n\r\n", "control character in reason"),
    ("bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n 2\r\n\r\n", "obs-fold"),
    ("bad-chunk", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x1\r\n", "invalid chunk size"),
]


@pytest.mark.parametrize(("raw", "rule"), [c[1:] for c in BAD_RESPONSES], ids=[c[0] for c in BAD_RESPONSES])
def test_bad_response_is_502(raw: bytes, rule: str) -> None:
    error = only_error(parse_responses(raw, b"GET")[1])
    assert (error.status, rule in error.reason) == (502, True), error


def test_response_without_request_is_an_error() -> None:
    error = only_error(parse_responses(b"HTTP/1.1 200 OK\r\n\r\n")[1])
    assert (error.status, error.reason) == (502, "response without a request")


def test_response_bodies_and_no_body_rules() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"  # HEAD: no body despite Content-Length
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nGrpc-Status: 0\r\n\r\n"
        b"HTTP/1.1 200\r\nContent-Length: 3\r\n\r\nabc"
    )
    parser, events = parse_responses(raw, b"HEAD", b"POST", b"GET", b"GET", b"GET")
    heads = [(e.stream_id, e.status, e.reason) for e in events if isinstance(e, ResponseReceived)]
    assert heads == [
        (1, 200, b"OK"),
        (2, 100, b"Continue"),
        (2, 204, b"No Content"),
        (3, 304, b"Not Modified"),
        (4, 200, b"OK"),
        (5, 200, b""),
    ]
    assert [e.stream_id for e in events if isinstance(e, MessageEnded)] == [1, 2, 3, 4, 5]
    assert [(e.stream_id, e.data) for e in events if isinstance(e, DataReceived)] == [(4, b"ok"), (5, b"abc")]
    assert [e.headers for e in events if isinstance(e, TrailersReceived)] == [((b"grpc-status", b"0"),)]
    assert parser.should_keep_alive


def test_response_until_close() -> None:
    parser, events = parse_responses(b"HTTP/1.1 200 OK\r\n\r\npart one ", b"GET")
    assert not parser.should_keep_alive
    events += parser.feed(b"part two")
    assert body_of(events) == b"part one part two"
    assert parser.feed_eof() == [MessageEnded(1), ConnectionClosed(last_stream_id=1)]


def test_truncated_response_is_502() -> None:
    parser, _ = parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", b"GET")
    assert only_error(parser.feed_eof()).status == 502
    parser, _ = parse_responses(b"HTTP/1.1 200 OK\r\nCont", b"GET")
    assert only_error(parser.feed_eof()).status == 502


def test_switching_protocols_and_connect_tunnel() -> None:
    parser, events = parse_responses(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi",
        b"GET",
    )
    assert [type(e) for e in events] == [ResponseReceived] and parser.paused
    assert parser.trailing_data() == b"\x81\x02hi"
    parser, events = parse_responses(b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03", b"CONNECT")
    assert events[-1] == MessageEnded(1) and parser.paused
    assert parser.trailing_data() == b"\x16\x03"
    # A refused CONNECT has an ordinary body and the connection stays HTTP.
    parser, events = parse_responses(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", b"CONNECT")
    assert body_of(events) == b"no" and not parser.paused


def test_response_connection_close_and_http10() -> None:
    parser, events = parse_responses(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", b"GET"
    )
    assert events[-1] == ConnectionClosed(last_stream_id=1) and not parser.should_keep_alive
    parser, events = parse_responses(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", b"GET")
    assert events[0] == ResponseReceived(1, 200, ((b"content-length", b"0"),), b"OK", b"1.0")
    assert not parser.should_keep_alive


# -------------------------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (b"GET / HTTP/1.1\r\n", 1),
        (b"POST /a?b HTTP/1.0", 1),
        (b"GET / HTTP/1.", 1),
        (b"GET / HTTP/", 0),
        (b"GET /", 0),
        (b"GET", 0),
        (b"", 0),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", -1),
        (b"\x16\x03\x01\x02\x00", -1),
        (b"SSH-2.0-OpenSSH_9.2\r\n", -1),
        (b"GET  / HTTP/1.1", -1),
        (b"GET / FTP/1.1", -1),
        (b"A" * 30, -1),
        (b"\r\n\r\nGET / HTTP/1.1", 1),
        (b"\r\n\r", 0),
        (b"\r\r", -1),
        (b"\r\n" * 5 + b"GET / HTTP/1.1", -1),
    ],
)
def test_sniff_request(data: bytes, verdict: int) -> None:
    assert sniff_request(data) == verdict


# ------------------------------------------------------------------------------------------ serializer


def reparse(raw: bytes) -> RequestReceived:
    events = parse(raw)
    assert isinstance(events[0], RequestReceived), events
    return events[0]


def test_serializer_drops_hop_by_hop_fields() -> None:
    raw = request(
        b"Host: a\r\nConnection: keep-alive, X-Hop, host\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\n"
        b"TE: trailers, deflate\r\nUpgrade: websocket\r\nX-Hop: 1\r\nx-hop: 2\r\nX-End: e2e\r\n"
        b"Transfer-Encoding: chunked\r\nTrailer: X-Sum\r\n"
    )
    out = serialize_head(raw)
    assert out == (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-End: e2e\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert reparse(out).headers == (
        (b"host", b"a"),
        (b"x-end", b"e2e"),
        (b"trailer", b"X-Sum"),
        (b"transfer-encoding", b"chunked"),
    )


def test_serializer_drops_a_field_named_by_connection_close() -> None:
    out = serialize_head(request(b"Host: a\r\nConnection: close\r\nClose: x\r\nX-A: 1\r\n"))
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n"
    out = serialize_head(request(b"Host: a\r\nConnection: keep-alive, upgrade\r\nX-A: 1\r\n"))
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n"


def test_serializer_options() -> None:
    raw = request(
        b"Host: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nTE: trailers\r\nX-Drop: 1\r\n"
        b"Content-Length: 4, 4\r\n",
        b"GET http://a/chat HTTP/1.0",
    )
    out = serialize_head(
        raw,
        add=[(b"X-Added", b"yes"), (b"x-request-id", b"r1")],
        remove=[b"x-DROP"],
        upgrading=True,
        keep_te_trailers=True,
        conn_close=True,
        target=b"/chat",
    )
    assert out == (
        b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nContent-Length: 4\r\n"
        b"Connection: upgrade, close\r\nTE: trailers\r\nX-Added: yes\r\nx-request-id: r1\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("framing", "content_length", "expected"),
    [
        (_h1.FRAMING_NONE, -1, b""),
        (_h1.FRAMING_CHUNKED, -1, b"Transfer-Encoding: chunked\r\n"),
        (_h1.FRAMING_LENGTH, 12345678901, b"Content-Length: 12345678901\r\n"),
        (_h1.FRAMING_LENGTH, 0, b"Content-Length: 0\r\n"),
        (_h1.FRAMING_AS_PARSED, -1, b"Content-Length: 7\r\n"),
    ],
)
def test_serializer_framing(framing: int, content_length: int, expected: bytes) -> None:
    raw = request(b"Host: a\r\nContent-Length: 7\r\n", b"POST / HTTP/1.1")
    out = serialize_head(raw, framing=framing, content_length=content_length)
    assert out == b"POST / HTTP/1.1\r\nHost: a\r\n" + expected + b"\r\n"


def test_serializer_response() -> None:
    raw = (
        b"HTTP/1.0 404 Not Found\r\nKeep-Alive: x\r\nConnection: keep-alive\r\nServer: s\r\n"
        b"Content-Length: 3\r\n\r\n"
    )
    out = serialize_head(raw, is_request=False, remove=[b"server"], add=[(b"x-nodeproxy-flags", b"NR")])
    assert out == b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nx-nodeproxy-flags: NR\r\n\r\n"
    _, events = parse_responses(out, b"GET")
    assert events[0] == ResponseReceived(
        1, 404, ((b"content-length", b"3"), (b"x-nodeproxy-flags", b"NR")), b"Not Found"
    )


@pytest.mark.parametrize(
    "field",
    [
        (b"X-Bad", b"a\r\nInjected: 1"),
        (b"X-Bad", b"a\nb"),
        (b"X-Bad", b"\x00"),
        (b"X Bad", b"v"),
        (b"", b"v"),
    ],
)
def test_serializer_refuses_invalid_added_fields(field: tuple[bytes, bytes]) -> None:
    with pytest.raises(ValueError, match="invalid field to add"):
        serialize_head(request(), add=[field])


def test_serializer_refuses_unparsable_heads() -> None:
    with pytest.raises(ValueError, match="bare LF"):
        serialize_head(b"GET / HTTP/1.1\nHost: a\n\n")
    with pytest.raises(ValueError, match="incomplete"):
        serialize_head(b"GET / HTTP/1.1\r\nHost: a\r\n")


def test_trailers_obey_the_parser_limits() -> None:
    parser = H1RequestParser(max_head_bytes=256)
    events = parser.feed(CHUNKED_HEAD + b"0\r\nX-T: " + b"v" * 300 + b"\r\n\r\n")
    assert only_error(events).reason == "trailer section larger than the limit"


def test_payload_before_a_body_error_in_the_same_feed_is_delivered() -> None:
    events = parse(CHUNKED_HEAD + b"1\r\na\r\n1\r\nb\r\n0\r\nX-T : y\r\n\r\n")
    assert body_of(events) == b"ab"
    assert only_error(events).reason == "whitespace between field name and colon"


def test_serialize_trailers_filters_like_a_head() -> None:
    raw = b"Grpc-Status: 0\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n"
    raw += b"Connection: x-hop\r\nX-Hop: 1\r\n"
    out = _h1.serialize_trailers(raw, add=[(b"x-added", b"1")], remove=[b"GRPC-STATUS"])
    assert out == b"0\r\nx-added: 1\r\n\r\n"
    assert _h1.serialize_trailers(b"") == b"0\r\n\r\n"
    events = parse(
        CHUNKED_HEAD + _h1.chunk_header(3) + b"abc\r\n" + _h1.serialize_trailers(b"Grpc-Status: 0\r\n")
    )
    assert [e for e in events if isinstance(e, TrailersReceived)] == [
        TrailersReceived(1, ((b"grpc-status", b"0"),))
    ]
    assert events[-1] == MessageEnded(1)
    with pytest.raises(ValueError, match="invalid field to add"):
        _h1.serialize_trailers(b"", add=[(b"x", b"\r\n")])
    with pytest.raises(ValueError, match="whitespace between field name and colon"):
        _h1.serialize_trailers(b"X : 1\r\n")


def test_chunk_header() -> None:
    assert [_h1.chunk_header(n) for n in (0, 1, 15, 16, 0xABCDEF, 2**64 - 1)] == [
        b"0\r\n",
        b"1\r\n",
        b"f\r\n",
        b"10\r\n",
        b"abcdef\r\n",
        b"ffffffffffffffff\r\n",
    ]
    with pytest.raises(ValueError):
        _h1.chunk_header(-1)


def test_serialized_head_stays_within_the_documented_slack() -> None:
    """Worst case for growth: every field written without a space after the colon, the longest
    Content-Length, and every line the options add."""
    fields = (
        b"Host:a\r\nContent-Length:9223372036854775807\r\nTE:trailers\r\nUpgrade:x\r\nConnection:upgrade\r\n"
    )
    raw = request(fields + b"a:b\r\n" * 95, b"GET / HTTP/1.0")
    out = serialize_head(raw, upgrading=True, conn_close=True, keep_te_trailers=True)
    # One space after each of 97 colons, in Content-Length, in TE; then "Connection: upgrade, close".
    assert len(out) - len(raw) == 97 + 1 + 1 + 8
    assert len(out) <= len(raw) + _h1.SERIALIZE_SLACK
