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
# ATTEMPT_FAILED's failure item.
FAIL_CONNECT: int
FAIL_REFUSED_STREAM: int
FAIL_RESET: int
FAIL_TIMEOUT: int
FAIL_HELD: int

# Answers to HEAD / ATTEMPT_FAILED records (type aliases for the checker; nothing at run time).
# (request_id, ip, port, request_add, request_remove, response_add, response_remove, try_timeout_ms[,
# http2[, hold_min_status, replay_limit[, via_mesh]]]): http2 speaks HTTP/2 (h2c) to the upstream; the
# 11-item form turns on ATTEMPT_FAILED for every failure before the response head, holding and body
# replay; via_mesh (12 items) goes through the mesh entry (HttpWorker.set_mesh_entry), the mTLS tunnel.
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
        int,
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
        int,
        int,
        bool,
    ]
)
# (request_id, status, flag, detail[, grpc_status[, fields]]): grpc_status answers a gRPC request over
# HTTP/2; fields are (name, value) bytes pairs added to the reply (e.g. retry-after).
ReplyAnswer = (
    tuple[int, int, str, str]
    | tuple[int, int, str, str, int | None]
    | tuple[int, int, str, str, int | None, tuple[tuple[bytes, bytes], ...]]
)
HIGH_WATER_BYTES: int
MESH_TOKEN_BYTES: int
PROXY_V2_HEADER_BYTES: int
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
    def set_mesh_entry(self, ip: str, port: int, token: bytes) -> None: ...
    def answer(
        self,
        forwards: Sequence[ForwardAnswer],
        replies: Sequence[ReplyAnswer],
        releases: Sequence[int] = (),
    ) -> None: ...
    # Records of several shapes, told apart by their first item (HEAD, DONE, ATTEMPT_FAILED, CONN_CLOSED).
    # header_names: True (all headers in HEAD records), False (none) or the names to keep (any case).
    def drain(self, header_names: bool | frozenset[bytes] = True) -> list[tuple[Any, ...]]: ...
    def begin_draining(self) -> None: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
