"""Type stub for the Cython module nodeproxy._tunnel (see _tunnel.pyx for the semantics)."""

from typing import Any

# Record kinds.
INBOUND: int
STREAM_DONE: int
TLS_FAILED: int
TLS_OPEN: int
# Stream endings (STREAM_DONE's ending item).
CLOSED: int
PLAIN_RESET: int
PEER_RESET: int
TUNNEL_FAILED: int
REFUSED: int
CONNECT_FAILED: int
ABORTED: int
LOCAL_RESOURCES: int

class TlsContext:
    server: bool
    trust_domain: str
    def __init__(
        self, cert_chain_pem: bytes, key_pem: bytes, trust_bundle_pem: bytes, trust_domain: str, server: bool
    ) -> None: ...

# (key, allow, dst_ip, dst_port, bind_ip, deny_status)
Answer = tuple[int, bool, str, int, str | None, int]

class TunnelWorker:
    trust_domain: str
    def __init__(
        self,
        notify_fd: int,
        trust_domain: str,
        stream_window: int = 4194304,
        connection_window: int = 16777216,
        max_streams: int = 100,
        handshake_timeout_ms: int = 10000,
        connect_timeout_ms: int = 5000,
        pool_idle_timeout_ms: int = 30000,
    ) -> None: ...
    @property
    def live_streams(self) -> int: ...
    @property
    def tls_connections(self) -> int: ...
    @property
    def closing_connections(self) -> int: ...
    @property
    def draining(self) -> bool: ...
    def set_identity(self, identity: str, context: TlsContext) -> None: ...
    def has_identity(self, identity: str) -> bool: ...
    def set_server_context(self, context: TlsContext) -> None: ...
    def listen(self, listen_fd: int) -> None: ...
    def stop_listening(self) -> None: ...
    def adopt(
        self,
        conn_id: int,
        client_fd: int,
        peer_ip: str,
        peer_port: int,
        authority: str,
        identity: str,
        source_ip: str | None = None,
        peer_identity: str | None = None,
        l7_checked: bool = False,
        announce_open: bool = False,
    ) -> None: ...
    def answer(self, answers: list[Answer]) -> None: ...
    def drain(self) -> list[tuple[Any, ...]]: ...
    def begin_draining(self) -> None: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
