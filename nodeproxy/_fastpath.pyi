"""Type stub for the Cython module nodeproxy._fastpath (see _fastpath.pyx for the semantics)."""

CLOSED: int
CLIENT_RESET: int
UPSTREAM_RESET: int
CONNECT_FAILED: int
CONNECT_TIMEOUT: int
ABORTED: int
IDLE_TIMEOUT: int
LOCAL_RESOURCES: int

FDS_PER_CONNECTION_MAX: int  # 6: two sockets, and a pipe (two fds) per direction while bytes are in flight
WORKER_FDS: int  # 2: each RelayWorker's epoll instance and wake-up eventfd
PIPE_POOL_FDS_MAX: int  # 256: empty pipes a RelayWorker may keep for reuse, two fds each

def accept_batch(listen_fd: int, max_batch: int = 64) -> list[tuple[int, str, int, str, int]]: ...
def reset_and_close(fd: int) -> None: ...
def set_socket_options(fd: int) -> None: ...

class RelayWorker:
    def __init__(self, notify_fd: int, pipe_size: int = 1048576) -> None: ...
    @property
    def live_connections(self) -> int: ...
    @property
    def connecting(self) -> int: ...
    @property
    def pipes_pooled(self) -> int: ...
    def connect(
        self,
        conn_id: int,
        client_fd: int,
        dst_ip: str,
        dst_port: int,
        timeout_ms: int,
        bind_ip: str | None = None,
        idle_timeout_ms: int = 0,
        client_prepared: bool = False,
        wake: bool = True,
    ) -> None: ...
    def wake(self) -> None: ...
    def adopt_established(
        self, conn_id: int, client_fd: int, upstream_fd: int, idle_timeout_ms: int = 0
    ) -> None: ...
    def drain(self) -> list[tuple[int, int, int, int, int, int]]: ...
    def stop(self) -> None: ...
    def run(self) -> None: ...
