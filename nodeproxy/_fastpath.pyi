"""Type stub for the Cython module nodeproxy._fastpath (see _fastpath.pyx for the semantics)."""

CLOSED: int
CLIENT_RESET: int
UPSTREAM_RESET: int
CONNECT_FAILED: int
CONNECT_TIMEOUT: int
ABORTED: int

def accept_batch(listen_fd: int, max_batch: int = 64) -> list[tuple[int, str, int, str, int]]: ...
def reset_and_close(fd: int) -> None: ...

class RelayWorker:
    def __init__(self, notify_fd: int, pipe_size: int = 1048576) -> None: ...
    @property
    def live_connections(self) -> int: ...
    @property
    def connecting(self) -> int: ...
    def connect(
        self,
        conn_id: int,
        client_fd: int,
        dst_ip: str,
        dst_port: int,
        timeout_ms: int,
        bind_ip: str | None = None,
    ) -> None: ...
    def drain(self) -> list[tuple[int, int, int, int, int, int]]: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
