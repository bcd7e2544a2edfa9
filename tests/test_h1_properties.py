"""Properties of the HTTP/1.1 codec (nodeproxy._h1): packet boundaries never change the events, arbitrary
bytes never crash or hang it, the serializer round-trips, sniffing agrees with parsing. The strategies
here also feed test_h1_h11.py (h11 as a reference peer)."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodeproxy._h1 import H1RequestParser, H1ResponseParser, field_is_valid, serialize_head, sniff_request
from nodeproxy.proxy.http_events import (
    ConnectionClosed,
    DataReceived,
    Event,
    Headers,
    MessageEnded,
    ProtocolErrored,
    RequestReceived,
    ResponseReceived,
    TrailersReceived,
)

pytestmark = pytest.mark.timeout(120)

TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
# Fields whose meaning the generator controls itself.
RESERVED = {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect", b"te"}

tokens = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=10).map(str.encode)
field_names = tokens.filter(lambda name: name.lower() not in RESERVED)
value_bytes = st.one_of(st.integers(0x21, 0x7E), st.integers(0x80, 0xFF), st.sampled_from([0x20, 0x09]))
field_values = st.lists(value_bytes, max_size=24).map(lambda b: bytes(b).strip(b" \t"))
fields = st.lists(st.tuples(field_names, field_values), max_size=6)
path_chars = string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@%/"
targets = st.builds(
    lambda path, query: b"/" + path + (b"?" + query if query is not None else b""),
    st.text(alphabet=path_chars, max_size=20).map(str.encode),
    st.none() | st.text(alphabet=path_chars + "?", max_size=12).map(str.encode),
)
hosts = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,20}[a-z0-9])?(:[0-9]{1,5})?\Z", fullmatch=True).map(
    str.encode
)
chunk_exts = st.lists(st.tuples(tokens, st.none() | tokens | st.just(b'"quoted \\" value"')), max_size=2).map(
    lambda exts: b"".join(b";" + n + (b"=" + v if v is not None else b"") for n, v in exts)
)


@dataclass(frozen=True)
class Message:
    raw: bytes
    method: bytes
    target: bytes
    host: bytes
    headers: Headers  # as the parser reports them (lower-case names)
    body: bytes
    trailers: Headers


@st.composite
def requests(draw: st.DrawFn) -> Message:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]) | tokens)
    target = draw(targets)
    host = draw(hosts)
    extra = draw(fields)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = draw(st.binary(max_size=300)) if framing != "none" else b""
    lines = [(b"Host", host), *extra]
    trailers: list[tuple[bytes, bytes]] = []
    wire_body = b""
    if framing == "length":
        lines.append((b"Content-Length", str(len(body)).encode()))
        wire_body = body
    elif framing == "chunked":
        lines.append((b"Transfer-Encoding", b"chunked"))
        cuts = sorted(draw(st.sets(st.integers(1, max(1, len(body) - 1)), max_size=4))) if body else []
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True) if b > a]
        for piece in pieces:
            size = draw(st.sampled_from(["{:x}", "{:X}", "000{:x}"])).format(len(piece)).encode()
            wire_body += size + draw(chunk_exts) + b"\r\n" + piece + b"\r\n"
        trailers = draw(fields)
        wire_body += (
            b"0" + draw(chunk_exts) + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers)
        )
        wire_body += b"\r\n"
    raw = method + b" " + target + b" HTTP/1.1\r\n"
    raw += b"".join(n + b":" + draw(st.sampled_from([b"", b" ", b"\t "])) + v + b"\r\n" for n, v in lines)
    raw += b"\r\n" + wire_body
    return Message(
        raw,
        method,
        target,
        host,
        tuple((n.lower(), v) for n, v in lines),
        body,
        tuple((n.lower(), v) for n, v in trailers),
    )


def normalized(events: list[Event]) -> list[Event]:
    """Merge consecutive data events of a stream: how payload is cut depends on the packets."""
    merged: list[Event] = []
    for event in events:
        if isinstance(event, DataReceived):
            last = merged[-1] if merged else None
            if isinstance(last, DataReceived) and last.stream_id == event.stream_id:
                merged[-1] = DataReceived(event.stream_id, last.data + event.data)
                continue
        merged.append(event)
    return merged


def expected_events(messages: list[Message]) -> list[Event]:
    events: list[Event] = []
    for stream_id, m in enumerate(messages, start=1):
        events.append(RequestReceived(stream_id, m.method, m.target, m.host, m.headers))
        if m.body:
            events.append(DataReceived(stream_id, m.body))
        if m.trailers:
            events.append(TrailersReceived(stream_id, m.trailers))
        events.append(MessageEnded(stream_id))
    return events


def feed_in_pieces(parser: H1RequestParser | H1ResponseParser, raw: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    bounds = sorted({c for c in cuts if 0 < c < len(raw)})
    for a, b in zip([0, *bounds], [*bounds, len(raw)], strict=True):
        events += parser.feed(raw[a:b])
    return events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(requests(), min_size=1, max_size=3), st.lists(st.integers(0, 4000), max_size=12))
def test_any_split_of_valid_pipelined_requests_gives_the_same_events(
    messages: list[Message], cuts: list[int]
) -> None:
    raw = b"".join(m.raw for m in messages)
    expected = expected_events(messages)
    assert normalized(H1RequestParser().feed(raw)) == expected
    assert normalized(feed_in_pieces(H1RequestParser(), raw, cuts)) == expected


def test_every_byte_boundary_of_a_pipeline() -> None:
    raw = (
        b"\r\nPOST /a?b=c HTTP/1.1\r\nHost: h.example\r\nTransfer-Encoding: chunked\r\nX-A:  v \r\n\r\n"
        b'3;e="q"\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: t\r\n\r\n'
        b"PUT /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    whole = normalized(H1RequestParser().feed(raw))
    assert [type(e).__name__ for e in whole] == [
        "RequestReceived", "DataReceived", "TrailersReceived", "MessageEnded",
        "RequestReceived", "DataReceived", "MessageEnded",
        "RequestReceived", "MessageEnded", "ConnectionClosed",
    ]  # fmt: skip
    for i in range(len(raw) + 1):
        assert normalized(feed_in_pieces(H1RequestParser(), raw, [i])) == whole, i
    assert normalized(feed_in_pieces(H1RequestParser(), raw, list(range(len(raw))))) == whole


def test_every_byte_boundary_of_responses() -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nGrpc-Status: 0\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil close"
    )

    def run(cuts: list[int]) -> list[Event]:
        parser = H1ResponseParser()
        for method in (b"POST", b"GET", b"GET"):
            parser.expect_response(method)
        return normalized(feed_in_pieces(parser, raw, cuts) + parser.feed_eof())

    whole = run([])
    assert [type(e).__name__ for e in whole] == [
        "ResponseReceived", "ResponseReceived", "DataReceived", "TrailersReceived", "MessageEnded",
        "ResponseReceived", "MessageEnded", "ResponseReceived", "DataReceived", "MessageEnded",
        "ConnectionClosed",
    ]  # fmt: skip
    for i in range(len(raw) + 1):
        assert run([i]) == whole, i
    assert run(list(range(len(raw)))) == whole


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), st.data())
def test_serialized_head_round_trips_without_hop_by_hop_fields(message: Message, data: st.DataObject) -> None:
    """Forwarding a head keeps every end-to-end field in order and the framing, and drops the hop-by-hop
    fields and every field the Connection field names."""
    head_end = message.raw.index(b"\r\n\r\n") + 2
    extra_names = sorted(
        {n for n, _ in message.headers[1:-1] if n not in (b"content-length", b"transfer-encoding")}
    )
    nominated = data.draw(st.lists(st.sampled_from(extra_names), unique=True) if extra_names else st.just([]))
    hop_by_hop = (
        b"Connection: keep-alive, " + b", ".join(n.upper() for n in nominated) + b"\r\nKeep-Alive: 5\r\n"
    )
    head = message.raw[:head_end] + hop_by_hop + b"\r\n"
    forwarded = serialize_head(head)
    assert (
        forwarded.endswith(b"\r\n\r\n") and b"onnection" not in forwarded and b"Keep-Alive" not in forwarded
    )
    kept = tuple((n, v) for n, v in message.headers if n not in nominated)
    expected = expected_events([message])
    expected[0] = RequestReceived(1, message.method, message.target, message.host, kept)
    assert normalized(H1RequestParser().feed(forwarded + message.raw[head_end + 2 :])) == expected


plain_value_bytes = st.lists(st.integers(0x20, 0x7E) | st.integers(0x80, 0xFF), max_size=70)
control_bytes = st.sampled_from([0x00, 0x01, 0x08, 0x0B, 0x0C, 0x1B, 0x1F, 0x7F])


@settings(max_examples=500, deadline=None)
@given(
    plain_value_bytes,
    st.lists(st.tuples(st.integers(0, 80), control_bytes), max_size=2),
    st.binary(max_size=9),
)
def test_field_value_check_agrees_with_the_grammar_at_every_alignment(
    plain: list[int], bad: list[tuple[int, int]], pad: bytes
) -> None:
    """The value check skips 8 bytes at a time; whatever the alignment of a control byte it is found,
    and obs-text next to it never hides it."""
    value = bytearray(plain)
    for where, byte in bad:
        value.insert(where % (len(value) + 1), byte)
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad-" + pad.hex().encode() + b": " + value + b"\r\n\r\n"
    events = H1RequestParser().feed(raw)
    if not bad:
        head = events[0]
        assert isinstance(head, RequestReceived), events
        assert head.headers[1][1] == bytes(value).strip(b" \t")
    else:
        error = events[-1]
        assert isinstance(error, ProtocolErrored) and error.status == 400, events


def field_is_valid_reference(name: bytes, value: bytes) -> bool:
    token = bool(name) and all(chr(c) in TOKEN_CHARS for c in name)
    chars = all(c == 0x09 or 0x20 <= c <= 0x7E or c >= 0x80 for c in value)
    return token and chars and value == value.strip(b" \t")


@settings(max_examples=500, deadline=None)
@given(
    st.binary(max_size=12) | tokens,
    st.binary(max_size=40) | st.builds(bytes, plain_value_bytes),
)
def test_field_is_valid_matches_the_grammar(name: bytes, value: bytes) -> None:
    assert field_is_valid(name, value) == field_is_valid_reference(name, value)


@dataclass(frozen=True)
class Exchange:
    """A request method and the response bytes an upstream sends for it."""

    method: bytes
    raw: bytes
    events: tuple[Event, ...]  # expected, with stream id 0 (filled in by position)
    closes: bool  # the body runs until the connection closes


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST"]))
    interim = draw(st.lists(st.sampled_from([(100, b"Continue"), (103, b"Early Hints")]), max_size=2))
    status, reason = draw(st.sampled_from([(200, b"OK"), (204, b"No Content"), (304, b"Not Modified"),
                                           (404, b""), (503, b"Service Unavailable")]))  # fmt: skip
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    extra = draw(fields)
    body = draw(st.binary(max_size=200))
    raw = b"".join(b"HTTP/1.1 %d %s\r\n\r\n" % s for s in interim)
    events: list[Event] = [ResponseReceived(0, code, (), text) for code, text in interim]
    lines = list(extra)
    no_body = method == b"HEAD" or status in (204, 304)
    wire = b""
    trailers: list[tuple[bytes, bytes]] = []
    if framing == "length":
        lines.append((b"Content-Length", str(len(body)).encode()))
        wire = body
    elif framing == "chunked":
        lines.append((b"Transfer-Encoding", b"chunked"))
        trailers = draw(fields)
        wire = (b"%x\r\n" % len(body) + body + b"\r\n" if body else b"") + b"0\r\n"
        wire += b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
    else:
        wire = body
    raw += b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(n + b": " + v + b"\r\n" for n, v in lines)
    raw += b"\r\n" + (b"" if no_body else wire)
    events.append(ResponseReceived(0, status, tuple((n.lower(), v) for n, v in lines), reason))
    if not no_body and body:
        events.append(DataReceived(0, body))
    if not no_body and trailers:
        events.append(TrailersReceived(0, tuple((n.lower(), v) for n, v in trailers)))
    events.append(MessageEnded(0))
    return Exchange(method, raw, tuple(events), framing == "close" and not no_body)


def with_stream_id(event: Event, stream_id: int) -> Event:
    assert not isinstance(event, ConnectionClosed)
    return dataclasses.replace(event, stream_id=stream_id)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(exchanges(), min_size=1, max_size=4), st.lists(st.integers(0, 3000), max_size=12))
def test_any_split_of_pipelined_responses_gives_the_expected_events(
    pipeline: list[Exchange], cuts: list[int]
) -> None:
    """The no-body rules (HEAD, 1xx, 204, 304), the three framings and the until-close end, whatever
    the packets."""
    closing = next((i for i, x in enumerate(pipeline) if x.closes), None)
    if closing is not None:
        pipeline = pipeline[: closing + 1]  # nothing can follow a body that runs until the close
    parser = H1ResponseParser()
    for exchange in pipeline:
        parser.expect_response(exchange.method)
    raw = b"".join(x.raw for x in pipeline)
    events = normalized(feed_in_pieces(parser, raw, cuts) + parser.feed_eof())
    expected = [with_stream_id(e, i) for i, x in enumerate(pipeline, start=1) for e in x.events]
    assert events == [*expected, ConnectionClosed(last_stream_id=len(pipeline))]


def check_invariants(events: list[Event], parser: H1RequestParser | H1ResponseParser) -> None:
    errors = [i for i, e in enumerate(events) if isinstance(e, ProtocolErrored)]
    assert errors in ([], [len(events) - 1]), events
    if errors:
        error = events[-1]
        assert isinstance(error, ProtocolErrored)
        assert error.status in (400, 431, 501, 502, 505) and error.reason
        assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []
    heads = [e.stream_id for e in events if isinstance(e, RequestReceived | ResponseReceived)]
    assert heads == sorted(heads)


def mutate(raw: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    data = bytearray(raw)
    for kind, where, byte in edits:
        at = where % (len(data) + 1)
        if kind == 0:
            data.insert(at, byte)
        elif kind == 1 and at < len(data):
            del data[at]
        elif at < len(data):
            data[at] = byte
    return bytes(data)


# (insert / delete / replace, where, byte): the bytes that matter to framing and field syntax.
edit_bytes = st.sampled_from(b'\r\n \t\x00:;,"0aF-+x\xff')
edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), edit_bytes), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600) | st.builds(mutate, requests().map(lambda m: m.raw), edits),
       st.lists(st.integers(0, 700), max_size=8))  # fmt: skip
def test_request_parser_survives_any_bytes(data: bytes, cuts: list[int]) -> None:
    parser = H1RequestParser(max_head_bytes=512, max_fields=8)
    events = feed_in_pieces(parser, data, cuts)
    events += parser.feed_eof()
    check_invariants(events, parser)
    # The same bytes in one piece give the same events.
    assert normalized(events) == normalized(H1RequestParser(512, 8).feed(data) + _eof_after(data))


def _eof_after(data: bytes) -> list[Event]:
    parser = H1RequestParser(512, 8)
    parser.feed(data)
    return parser.feed_eof()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=600)
    | st.builds(
        mutate,
        st.sampled_from([
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: y\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nab",
        ]),
        edits,
    ),
    st.lists(st.integers(0, 700), max_size=8),
)  # fmt: skip
def test_response_parser_survives_any_bytes(data: bytes, cuts: list[int]) -> None:
    parser = H1ResponseParser(max_head_bytes=512, max_fields=8)
    for method in (b"GET", b"HEAD", b"POST"):
        parser.expect_response(method)
    events = feed_in_pieces(parser, data, cuts) + parser.feed_eof()
    check_invariants(events, parser)
    assert all(e.status == 502 for e in events if isinstance(e, ProtocolErrored))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_sniffing_never_refuses_a_prefix_of_a_valid_request(message: Message) -> None:
    verdicts = [sniff_request(message.raw[:k]) for k in range(len(message.raw) + 1)]
    assert set(verdicts) <= {0, 1} and verdicts[-1] == 1
    assert verdicts == sorted(verdicts)  # once sure, more bytes do not change its mind


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=80) | st.builds(mutate, requests().map(lambda m: m.raw), edits))
def test_what_sniffing_refuses_the_parser_refuses(data: bytes) -> None:
    if sniff_request(data) == -1:
        events = H1RequestParser().feed(data)
        accepted = [e for e in events if isinstance(e, RequestReceived)]
        # The one exception by design: methods longer than 24 characters are not taken for HTTP.
        assert not accepted or len(accepted[0].method) > 24
