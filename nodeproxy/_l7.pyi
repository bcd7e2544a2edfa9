"""Type stub for the Cython module nodeproxy._l7 (see _l7.pyx for the semantics)."""

from collections.abc import Sequence
from typing import Any

HEAD: int
DONE: int
ATTEMPT_FAILED: int
CONN_CLOSED: int
UPGRADED: int
NOT_HTTP: int
FLAGS: dict[str, int]

# Answers to HEAD / ATTEMPT_FAILED records (type aliases for the checker; nothing at run time).
# (request_id, ip, port, request_add, request_remove, response_add, response_remove, try_timeout_ms[,
# http2]): http2 speaks HTTP/2 (h2c) to the upstream.
ForwardAnswer = (
    tuple[
        int,
        str,
        int,
        tuple[tuple[bytes, bytes], ...],
        tuple[bytes, ...],
        tuple[tuple[bytes, bytes], ...],
        tuple[bytes, ...],
        int,
    ]
    | tuple[
        int,
        str,
        int,
        tuple[tuple[bytes, bytes], ...],
        tuple[bytes, ...],
        tuple[tuple[bytes, bytes], ...],
        tuple[bytes, ...],
        int,
        bool,
    ]
)
# (request_id, status, flag, detail[, grpc_status]): grpc_status answers a gRPC request over HTTP/2.
ReplyAnswer = tuple[int, int, str, str] | tuple[int, int, str, str, int | None]
HIGH_WATER_BYTES: int
IO_CHUNK_BYTES: int

def grpc_status_for(status: int, flag: str) -> int: ...

class HttpWorker:
    def __init__(
        self,
        notify_fd: int,
        max_head_bytes: int = 61440,
        max_fields: int = 100,
        header_timeout_ms: int = 10000,
        idle_timeout_ms: int = 300000,
        connect_timeout_ms: int = 1000,
        pool_max_idle: int = 256,
        pool_max_conns: int = 1024,
        pool_idle_timeout_ms: int = 4000,
        hand_off_upgrades: bool = False,
    ) -> None: ...
    @property
    def live_connections(self) -> int: ...
    @property
    def pools(self) -> int: ...
    @property
    def upstream_connections(self) -> int: ...
    def debug_connections(self) -> list[tuple[int, int, bool, bool, bool, int, int, int, int]]: ...
    def adopt(
        self, conn_id: int, client_fd: int, source_ip: str | None = None, sniff_timeout_ms: int = 0
    ) -> None: ...
    def answer(
        self,
        forwards: Sequence[ForwardAnswer],
        replies: Sequence[ReplyAnswer],
    ) -> None: ...
    # Records of several shapes, told apart by their first item (HEAD, DONE, ATTEMPT_FAILED, CONN_CLOSED).
    def drain(self, with_headers: bool = True) -> list[tuple[Any, ...]]: ...
    def begin_draining(self) -> None: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
