"""The HTTP/2 session core (nodeproxy._h2 on libnghttp2), sans-IO: the python-hyper `h2` package is the
peer, and hand-built frames (hyperframe + hpack) play the attacker. No sockets needed."""

from __future__ import annotations

import hashlib

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeproxy._h2 import (
    DEFAULT_MAX_HEADER_FIELDS,
    DEFAULT_STREAM_WINDOW,
    H2_PREFACE,
    H2Connection,
)
from nodeproxy.proxy import http_events as ev

PROTOCOL_ERROR = 0x1
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB
REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"svc")]


def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


def h2_server() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    conn.initiate_connection()
    return conn


def raw_frames(*frames: Frame) -> bytes:
    return b"".join(f.serialize() for f in frames)


def handshake(server: H2Connection) -> bytes:
    """A client preface and empty SETTINGS, as a raw attacker would start."""
    events = server.receive_data(H2_PREFACE + SettingsFrame(0).serialize())
    assert not [e for e in events if isinstance(e, ev.ProtocolErrored)]
    return server.data_to_send()


def headers_frame(
    stream_id: int, fields: list[tuple[bytes, bytes]], encoder: hpack.Encoder, **flags: bool
) -> Frame:
    frame = HeadersFrame(stream_id)
    frame.data = encoder.encode(fields)
    frame.flags.add("END_HEADERS")
    if flags.get("end_stream"):
        frame.flags.add("END_STREAM")
    return frame


def goaway_code(data: bytes) -> int | None:
    """The error code of the first GOAWAY frame in `data` (frames we sent), if any."""
    at = 0
    while at + 9 <= len(data):
        length = int.from_bytes(data[at : at + 3], "big")
        kind = data[at + 3]
        if kind == 0x7:
            payload = data[at + 9 : at + 9 + length]
            return int.from_bytes(payload[4:8], "big")
        at += 9 + length
    return None


def test_request_and_response_with_bodies_and_trailers_round_trip() -> None:
    server, client = H2Connection(auto_acknowledge=True), h2_client()
    sid = client.get_next_available_stream_id()
    client.send_headers(
        sid, [*REQUEST[:1], (b":method", b"POST")][1:] + REQUEST[1:] + [(b"x-env", b"staging")]
    )
    client.send_data(sid, b"hello" * 1000)
    client.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
    events = server.receive_data(client.data_to_send())
    kinds = [type(e) for e in events]
    assert kinds == [ev.RequestReceived, ev.DataReceived, ev.TrailersReceived, ev.MessageEnded]
    head = events[0]
    assert isinstance(head, ev.RequestReceived)
    assert (head.method, head.target, head.authority, head.scheme) == (b"POST", b"/", b"svc", b"http")
    assert head.headers == ((b"x-env", b"staging"),)
    assert events[1] == ev.DataReceived(sid, b"hello" * 1000)
    assert events[2] == ev.TrailersReceived(sid, ((b"x-checksum", b"abc"),))

    body = bytes(range(256)) * 2000  # 512 KB: more than the peer's initial 64 KiB window
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(sid, body)
    server.send_trailers(sid, [(b"grpc-status", b"0")])
    received, trailers, ended = bytearray(), None, False
    for _ in range(100):
        out = server.data_to_send()
        if not out:
            break
        for e in client.receive_data(out):
            if isinstance(e, h2.events.DataReceived):
                received += e.data
                client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            elif isinstance(e, h2.events.TrailersReceived):
                trailers = e.headers
            elif isinstance(e, h2.events.StreamEnded):
                ended = True
        server.receive_data(client.data_to_send())
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
    assert trailers == [(b"grpc-status", b"0")]
    assert ended


def test_client_side_talks_to_an_h2_server() -> None:
    client, server = H2Connection(client_side=True, auto_acknowledge=True), h2_server()
    sid = client.send_headers(None, REQUEST, end_stream=True)
    assert sid == 1
    for e in server.receive_data(client.data_to_send()):
        if isinstance(e, h2.events.RequestReceived):
            server.send_headers(e.stream_id, [(b":status", b"100")])
            server.send_headers(e.stream_id, [(b":status", b"204"), (b"x-a", b"1")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    responses = [e for e in events if isinstance(e, ev.ResponseReceived)]
    assert [r.status for r in responses] == [100, 204]
    assert responses[1].headers == ((b"x-a", b"1"),)
    assert ev.MessageEnded(sid) in events


def test_unacknowledged_data_stops_at_the_stream_window() -> None:
    """Backpressure: what we have not forwarded keeps the peer's window closed, so a slow upstream
    bounds what one stream can make us hold; acknowledging reopens it."""
    server, client = H2Connection(), h2_client()
    client.receive_data(server.data_to_send())  # our SETTINGS: 1 MiB stream window
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(b":method", b"POST"), *REQUEST[1:]])
    payload = b"z" * (4 * DEFAULT_STREAM_WINDOW)
    sent = 0

    def pump() -> int:
        nonlocal sent
        window = client.local_flow_control_window(sid)
        chunk = min(window, len(payload) - sent, 16384 * 4)
        while chunk > 0:
            piece = min(chunk, client.max_outbound_frame_size)
            client.send_data(sid, payload[sent : sent + piece])
            sent += piece
            chunk -= piece
        got = 0
        for e in server.receive_data(client.data_to_send()):
            if isinstance(e, ev.DataReceived):
                got += len(e.data)
        client.receive_data(server.data_to_send())
        return got

    held = 0
    for _ in range(200):
        held += pump()
    assert held == DEFAULT_STREAM_WINDOW  # and not a byte more while nothing is acknowledged
    server.acknowledge_received_data(sid, held)
    client.receive_data(server.data_to_send())
    more = sum(pump() for _ in range(50))
    assert more > 0


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([*REQUEST, (b"X-Upper", b"1")], id="uppercase-name"),
        pytest.param([*REQUEST, (b"connection", b"keep-alive")], id="connection-specific"),
        pytest.param([*REQUEST, (b"transfer-encoding", b"chunked")], id="transfer-encoding"),
        pytest.param([*REQUEST, (b"te", b"gzip")], id="te-not-trailers"),
        pytest.param([*REQUEST, (b"x-bad", b"a\x00b")], id="nul-in-value"),
        pytest.param([*REQUEST, (b"x-bad", b" padded")], id="leading-whitespace"),
        pytest.param(REQUEST[:1] + REQUEST[2:], id="missing-path"),
        pytest.param([(b"x-first", b"1"), *REQUEST], id="pseudo-after-regular"),
        pytest.param([*REQUEST, (b":method", b"GET")], id="duplicate-pseudo"),
        pytest.param([*REQUEST, (b":unknown", b"1")], id="unknown-pseudo"),
    ],
)
def test_malformed_request_heads_reset_the_stream(fields: list[tuple[bytes, bytes]]) -> None:
    server = H2Connection()
    handshake(server)
    events = server.receive_data(raw_frames(headers_frame(1, fields, hpack.Encoder(), end_stream=True)))
    assert not [e for e in events if isinstance(e, ev.RequestReceived)]
    server.data_to_send()
    assert ev.StreamReset(1, PROTOCOL_ERROR) in server.take_events()
    # The connection survives for the next, well-formed request.
    events = server.receive_data(raw_frames(headers_frame(3, REQUEST, hpack.Encoder(), end_stream=True)))
    assert [type(e) for e in events] == [ev.RequestReceived, ev.MessageEnded]


def test_content_length_must_match_the_data() -> None:
    server = H2Connection()
    handshake(server)
    encoder = hpack.Encoder()
    head = headers_frame(1, [(b":method", b"POST"), *REQUEST[1:], (b"content-length", b"10")], encoder)
    data = DataFrame(1, b"12345")
    data.flags.add("END_STREAM")
    events = server.receive_data(raw_frames(head, data))
    server.data_to_send()
    events += server.take_events()
    assert ev.StreamReset(1, PROTOCOL_ERROR) in events
    assert ev.MessageEnded(1) not in events


def test_too_many_header_fields_is_reported_as_431() -> None:
    server = H2Connection()
    handshake(server)
    fields = REQUEST + [(f"x-{i}".encode(), b"v") for i in range(DEFAULT_MAX_HEADER_FIELDS)]
    events = server.receive_data(raw_frames(headers_frame(1, fields, hpack.Encoder(), end_stream=True)))
    assert [e for e in events if isinstance(e, ev.ProtocolErrored)] == [
        ev.ProtocolErrored(431, "header block over the field count or size limit", stream_id=1)
    ]


def test_hpack_bomb_stays_bounded() -> None:
    """CVE-2016-6581: one 4 KiB entry in the dynamic table, then blocks of 1-byte references to it."""
    server = H2Connection()
    handshake(server)
    encoder = hpack.Encoder()
    big = (b"x-big", b"b" * 4000)
    events = server.receive_data(raw_frames(headers_frame(1, [*REQUEST, big], encoder, end_stream=True)))
    assert isinstance(events[0], ev.RequestReceived)
    bomb = HeadersFrame(3)
    bomb.data = encoder.encode(REQUEST) + encoder.encode([big]) * 2000  # 8 MB once decoded
    bomb.flags.add("END_HEADERS")
    bomb.flags.add("END_STREAM")
    events = server.receive_data(bomb.serialize())
    assert any(isinstance(e, ev.ProtocolErrored) and e.status == 431 for e in events)
    assert not any(isinstance(e, ev.RequestReceived) for e in events)


def test_rapid_reset_ends_the_connection() -> None:
    """CVE-2023-44487: open and cancel streams as fast as possible."""
    server = H2Connection()
    handshake(server)
    encoder = hpack.Encoder()
    frames = []
    for i in range(1500):
        sid = 1 + 2 * i
        frames += [headers_frame(sid, REQUEST, encoder), RstStreamFrame(sid, error_code=CANCEL)]
    events = server.receive_data(raw_frames(*frames))
    assert goaway_code(server.data_to_send()) == ENHANCE_YOUR_CALM
    assert len([e for e in events if isinstance(e, ev.RequestReceived)]) <= 1100
    assert not server.want_read


def test_made_you_reset_ends_the_connection() -> None:
    """CVE-2025-8671: frames that make the server reset streams (here malformed heads), so no reset
    comes from the client. (A WINDOW_UPDATE of 0, the other classic trigger, already ends the whole
    connection in nghttp2.)"""
    server = H2Connection()
    handshake(server)
    encoder = hpack.Encoder()
    malformed = [*REQUEST, (b"X-Upper", b"1")]
    frames = [headers_frame(1 + 2 * i, malformed, encoder, end_stream=True) for i in range(1500)]
    server.receive_data(raw_frames(*frames))
    assert goaway_code(server.data_to_send()) == ENHANCE_YOUR_CALM


def test_window_update_of_zero_is_a_connection_error() -> None:
    server = H2Connection()
    handshake(server)
    encoder = hpack.Encoder()
    server.receive_data(
        raw_frames(headers_frame(1, REQUEST, encoder), WindowUpdateFrame(1, window_increment=0))
    )
    assert goaway_code(server.data_to_send()) == PROTOCOL_ERROR


def test_continuation_flood_is_cut_off() -> None:
    """CVE-2024-28182 and siblings: a header block that never ends."""
    server = H2Connection()
    handshake(server)
    head = HeadersFrame(1)
    head.data = hpack.Encoder().encode(REQUEST)
    frames: list[Frame] = [head]
    for _ in range(100):
        cont = ContinuationFrame(1)
        cont.data = b""
        frames.append(cont)
    events = server.receive_data(raw_frames(*frames))
    assert any(isinstance(e, ev.ProtocolErrored) for e in events)
    assert server.fatal_error is not None


@pytest.mark.parametrize(
    "frame", [PingFrame(0, opaque_data=b"12345678"), SettingsFrame(0)], ids=["ping", "settings"]
)
def test_ack_flood_from_a_peer_that_does_not_read(frame: Frame) -> None:
    """CVE-2019-9512 / 9515: every PING or SETTINGS wants an ACK; a peer that never reads them must not
    make the queue of ACKs grow without bound."""
    server = H2Connection()
    handshake(server)
    events = server.receive_data(frame.serialize() * 5000)  # never calling data_to_send()
    assert any(isinstance(e, ev.ProtocolErrored) for e in events)
    assert server.fatal_error is not None


def test_empty_data_frame_flood_ends_the_connection() -> None:
    """CVE-2019-9518: DATA frames with no payload cost work and carry nothing."""
    server = H2Connection()
    handshake(server)
    head = headers_frame(1, [(b":method", b"POST"), *REQUEST[1:]], hpack.Encoder())
    server.receive_data(raw_frames(head, *[DataFrame(1, b"") for _ in range(500)]))
    assert goaway_code(server.data_to_send()) == ENHANCE_YOUR_CALM


def test_client_that_is_not_http2_gets_a_connection_error() -> None:
    server = H2Connection()
    events = server.receive_data(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert [type(e) for e in events] == [ev.ProtocolErrored]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_after_the_preface_give_events_or_an_error(noise: bytes) -> None:
    server = H2Connection()
    handshake(server)
    for event in server.receive_data(noise):
        assert isinstance(
            event,
            ev.RequestReceived
            | ev.DataReceived
            | ev.TrailersReceived
            | ev.MessageEnded
            | ev.StreamReset
            | ev.ConnectionClosed
            | ev.ProtocolErrored
            | ev.ResponseReceived,
        )
    server.data_to_send()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40))
def test_splitting_the_input_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    client = h2_client()
    sid = client.get_next_available_stream_id()
    client.send_headers(sid, [(b":method", b"POST"), *REQUEST[1:], (b"x-a", b"1")])
    client.send_data(sid, b"0123456789" * 30, end_stream=True)
    wire = client.data_to_send()

    whole = H2Connection()
    expected = whole.receive_data(wire)
    split = H2Connection()
    got: list[object] = []
    at = 0
    for cut in cuts:
        got += split.receive_data(wire[at : at + cut])
        at += cut
    got += split.receive_data(wire[at:])
    merged: list[object] = []
    for event in got:  # DATA may arrive in more pieces; compare the bytes, not the chunking
        if merged and isinstance(event, ev.DataReceived) and isinstance(merged[-1], ev.DataReceived):
            merged[-1] = ev.DataReceived(event.stream_id, merged[-1].data + event.data)
        else:
            merged.append(event)
    assert merged == expected
