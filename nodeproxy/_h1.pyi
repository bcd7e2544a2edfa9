"""Type stub for the Cython module nodeproxy._h1 (see _h1.pyx and _h1.pxd for the semantics)."""

from collections.abc import Iterable

from nodeproxy.proxy.http_events import Event

DEFAULT_MAX_HEAD_BYTES: int
DEFAULT_MAX_FIELDS: int
FIELDS_CAP: int
MAX_CHUNK_LINE: int
SERIALIZE_SLACK: int
FRAMING_AS_PARSED: int
FRAMING_NONE: int
FRAMING_CHUNKED: int
FRAMING_LENGTH: int

class _H1Parser:
    def __init__(self, max_head_bytes: int = 61440, max_fields: int = 100) -> None: ...
    @property
    def should_keep_alive(self) -> bool: ...
    @property
    def paused(self) -> bool: ...
    @property
    def stream_id(self) -> int: ...
    def trailing_data(self) -> bytes: ...
    def feed(self, data: bytes) -> list[Event]: ...
    def resume(self) -> list[Event]: ...
    def feed_eof(self) -> list[Event]: ...

class H1RequestParser(_H1Parser): ...

class H1ResponseParser(_H1Parser):
    def expect_response(self, method: bytes) -> int: ...

def head_info(
    raw: bytes, *, is_request: bool = True, max_head_bytes: int = 61440, max_fields: int = 100
) -> dict[str, object]: ...
def field_is_valid(name: bytes, value: bytes) -> bool: ...
def chunk_header(size: int) -> bytes: ...
def serialize_trailers(
    raw_fields: bytes, *, add: Iterable[tuple[bytes, bytes]] = (), remove: Iterable[bytes] = ()
) -> bytes: ...
def sniff_request(data: bytes) -> int: ...
def serialize_head(
    raw_head: bytes,
    *,
    is_request: bool = True,
    add: Iterable[tuple[bytes, bytes]] = (),
    remove: Iterable[bytes] = (),
    framing: int = 0,
    content_length: int = -1,
    upgrading: bool = False,
    keep_te_trailers: bool = False,
    conn_close: bool = False,
    target: bytes | None = None,
) -> bytes: ...
