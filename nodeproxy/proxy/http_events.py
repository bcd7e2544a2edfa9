"""Past-tense events of the HTTP codecs (sans-IO, as python-hyper/h2 names them).

Both the HTTP/1.1 and the HTTP/2 codec speak this vocabulary on their Python side, so routing, retries
and metrics do not care which protocol a request came in on, and translating between HTTP/1.1 and
HTTP/2 is re-encoding the same events. Header names are lower-case bytes; values are bytes as received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A complete request head."""

    stream_id: int  # 1, 2, 3... per HTTP/1.1 connection in order; the HTTP/2 stream id otherwise
    method: bytes
    target: bytes  # request-target (HTTP/1.1) or :path (HTTP/2)
    authority: bytes  # Host or :authority
    headers: Headers
    http_version: bytes = b"1.1"
    scheme: bytes = b"http"


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A complete response head (also informational 1xx heads)."""

    stream_id: int
    status: int
    headers: Headers
    reason: bytes = b""
    http_version: bytes = b"1.1"


@dataclass(frozen=True, slots=True)
class DataReceived:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class TrailersReceived:
    stream_id: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class MessageEnded:
    """The body (and trailers, if any) of a request or response is complete."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer said it is done (HTTP/2 GOAWAY, or HTTP/1.1 `Connection: close` / end of stream)."""

    last_stream_id: int = 0
    error_code: int = 0


@dataclass(frozen=True, slots=True)
class ProtocolErrored:
    """The input broke a rule: `status` is the local reply a proxy sends (400, 431, 501...) and `reason`
    says which rule, for the log and the response flag DPE."""

    status: int
    reason: str
    stream_id: int = 0
    details: dict[str, str] = field(default_factory=dict)


Event = (
    RequestReceived
    | ResponseReceived
    | DataReceived
    | TrailersReceived
    | MessageEnded
    | StreamReset
    | ConnectionClosed
    | ProtocolErrored
)
