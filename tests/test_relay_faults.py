"""The native relay under faults: small pipes, a descriptor limit, a crash, stale epoll entries, SIGPIPE.

Most tests run the relay in a child process (`python3 -m tests.test_relay_faults ...`, see child_main) so
that its capabilities, descriptor limit or life can be taken away without touching the test process. The
test itself plays the client and the backend, inside a namespace it creates.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import resource
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nodeproxy import _fastpath, netns
from nodeproxy.proxy.relay import FDS_PER_CONNECTION_MAX, Completion, Ending

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent
PIPE_SOFT_LIMIT = Path("/proc/sys/fs/pipe-user-pages-soft")
SIGPIPE_BIT = 1 << (signal.SIGPIPE - 1)


# -- the child: a RelayWorker behind a listener, reporting on stdout ------------------------------------


def child_main(argv: list[str]) -> None:
    """`child <backend_port> [--nofile-spare N]`: relay 127.0.0.1:<ephemeral> to 127.0.0.1:<backend_port>.

    Prints one JSON line `{"port": ..., "pipe_size": ...}` when ready (pipe_size: what a new pipe gets
    here), then one `{"completion": [...]}` line per finished connection, until its stdin closes.
    --front-sndbuf N gives the relay's client sockets a send buffer of N bytes.
    --nofile-spare N lowers RLIMIT_NOFILE so that only N descriptors beyond those open now can be had.
    """
    backend_port = int(argv[0])
    notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    worker = _fastpath.RelayWorker(notify_fd)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    front = socket.socket()
    if "--front-sndbuf" in argv:
        # Inherited by accepted sockets: the relay's sends to the client then take only a few KiB.
        front.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(argv[argv.index("--front-sndbuf") + 1]))
    front.bind(("127.0.0.1", 0))
    front.listen(64)
    front.setblocking(False)
    _fastpath.set_socket_options(front.fileno())
    probe_r, probe_w = os.pipe()
    pipe_size = fcntl.fcntl(probe_w, fcntl.F_GETPIPE_SZ)
    os.close(probe_r)
    os.close(probe_w)
    if "--nofile-spare" in argv:
        spare = int(argv[argv.index("--nofile-spare") + 1])
        highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        resource.setrlimit(
            resource.RLIMIT_NOFILE, (highest + 1 + spare, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        )
    print(json.dumps({"port": front.getsockname()[1], "pipe_size": pipe_size}), flush=True)
    conn_id = 0
    while True:
        readable, _, _ = select.select([front, notify_fd, sys.stdin], [], [], 1.0)
        if sys.stdin in readable and not sys.stdin.readline():
            break
        if front in readable:
            # As the listener does: accept_batch's sockets need no preparation, one wake-up per batch.
            for fd, *_ in _fastpath.accept_batch(front.fileno()):
                conn_id += 1
                worker.connect(conn_id, fd, "127.0.0.1", backend_port, 5000, client_prepared=True, wake=False)
            worker.wake()
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(notify_fd)
        for record in worker.drain():
            print(json.dumps({"completion": list(record)}), flush=True)
    worker.stop()
    thread.join(10)


@dataclass
class ChildRelay:
    proc: subprocess.Popen[str]
    port: int
    pipe_size: int
    records: list[Completion] = field(default_factory=list)

    def completion(self, timeout: float = 10.0) -> Completion:
        """The next completion record the child reports."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if ready:
                line = self.proc.stdout.readline()
                assert line, f"relay child exited ({self.proc.poll()})"
                return Completion._make(json.loads(line)["completion"])
        raise AssertionError("no completion from the relay child")


@contextlib.contextmanager
def child_relay(
    ns: str, backend_port: int, wrapper: list[str] | None = None, extra: list[str] | None = None
) -> Iterator[ChildRelay]:
    argv = [
        *(wrapper or []),
        sys.executable,
        "-m",
        "tests.test_relay_faults",
        "child",
        str(backend_port),
        *(extra or []),
    ]
    proc = subprocess.Popen(
        netns.exec_argv(ns, argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "relay child did not start"
        hello = json.loads(proc.stdout.readline())
        yield ChildRelay(proc, hello["port"], hello["pipe_size"])
    finally:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    name = f"npt{secrets.token_hex(2)}-rf"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        netns.run(name, ["ip", "link", "set", "lo", "up"])
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def server_in(ns: str, rcvbuf: int = 0) -> socket.socket:
    """A listener in `ns`; rcvbuf > 0 gives its accepted sockets a small receive buffer (inherited)."""
    with netns.entered(ns):
        server = socket.socket()
        if rcvbuf:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        server.bind(("127.0.0.1", 0))
        server.listen(64)
    server.settimeout(10)
    return server


def client_in(ns: str, port: int, rcvbuf: int = 0) -> socket.socket:
    with netns.entered(ns):
        client = socket.socket()
        if rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.settimeout(10)
        client.connect(("127.0.0.1", port))
        return client


def upload(sock: socket.socket, data: bytes, chunk: int, pause: float = 0.0) -> None:
    """Send `data` in `chunk`-sized writes `pause` seconds apart, then a FIN (quietly stops on a reset)."""
    with contextlib.suppress(ConnectionError):
        for at in range(0, len(data), chunk):
            sock.sendall(data[at : at + chunk])
            if pause:
                time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)


def read_all(sock: socket.socket, limit: float = 20.0) -> bytes:
    sock.settimeout(limit)
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)


# -- defect 1: small pipes ----------------------------------------------------------------------------


@contextlib.contextmanager
def pipe_soft_limit(pages: int) -> Iterator[None]:
    """fs.pipe-user-pages-soft lowered for the block (only processes without CAP_SYS_RESOURCE and
    CAP_SYS_ADMIN are held to it, so other root processes on the machine keep their pipes)."""
    before = PIPE_SOFT_LIMIT.read_text()
    PIPE_SOFT_LIMIT.write_text(f"{pages}\n")
    try:
        yield
    finally:
        PIPE_SOFT_LIMIT.write_text(before)


DROP_PIPE_PRIVILEGES = ["capsh", "--drop=cap_sys_resource,cap_sys_admin", "--", "-c", '"$0" "$@"']


@pytest.mark.skipif(shutil.which("capsh") is None, reason="needs capsh (libcap2-bin)")
def test_small_pipes_keep_every_byte_and_no_transfer_stalls(ns: str) -> None:
    """Without CAP_SYS_RESOURCE, past pipe-user-pages-soft, pipes are one or two pages and cannot grow.

    Messages just under the copy buffer, sent to a client that is slow to read through a small socket
    buffer, leave the copy path with more bytes than such a pipe holds; bulk transfers after that must
    neither lose a byte nor stall on a pipe that went back to the pool with bytes in it.
    """
    with (
        server_in(ns) as server,
        pipe_soft_limit(1),
        child_relay(ns, server.getsockname()[1], DROP_PIPE_PRIVILEGES, ["--front-sndbuf", "4096"]) as relay,
    ):
        assert relay.pipe_size <= 8192, f"the kernel still gave a {relay.pipe_size}-byte pipe"
        data = secrets.token_bytes(2 << 20)
        client = client_in(ns, relay.port, rcvbuf=4096)
        backend, _ = server.accept()
        first_error: str | None = None
        with client, backend:
            # 16,000-byte writes, paced so that each relay read takes one (the copy path), while the
            # client does not read yet: the relay's send takes a few KiB and keeps the rest.
            sender = threading.Thread(target=upload, args=(backend, data, 16000, 0.001), daemon=True)
            sender.start()
            time.sleep(0.5)
            try:
                got = read_all(client)
                client.shutdown(socket.SHUT_WR)
                assert backend.recv(1) == b""
                if hashlib.sha256(got).digest() != hashlib.sha256(data).digest():
                    first_error = f"{len(got)} of {len(data)} bytes, or not the same"
            except ConnectionResetError as err:
                first_error = repr(err)  # the bulk rounds below still show whether the worker stalls
            sender.join(20)
        first = relay.completion()
        if first_error is None and (Ending(first.ending), first.bytes_down) != (Ending.CLOSED, len(data)):
            first_error = repr(first)
        for round_ in range(4):
            data = secrets.token_bytes(8 << 20)
            client = client_in(ns, relay.port)
            backend, _ = server.accept()
            with client, backend:
                sender = threading.Thread(target=upload, args=(client, data, 1 << 20))
                sender.start()
                got = read_all(backend)  # a stalled transfer times out here
                sender.join(20)
                backend.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), (round_, len(got))
            done = relay.completion()
            assert (Ending(done.ending), done.bytes_up) == (Ending.CLOSED, len(data)), done
        assert first_error is None, f"the transfer through small pipes failed: {first_error}"


# -- defect 2: no pipe to be had ----------------------------------------------------------------------


def test_bulk_transfer_without_pipes_falls_back_to_copying(ns: str) -> None:
    """Under RLIMIT_NOFILE with room for the two sockets only, pipe2() fails with EMFILE mid-stream: the
    bulk directions copy through the worker's buffer instead of resetting the connection as a peer."""
    with (
        server_in(ns) as server,
        child_relay(ns, server.getsockname()[1], extra=["--nofile-spare", "2"]) as relay,
    ):
        up, down = secrets.token_bytes(8 << 20), secrets.token_bytes(8 << 20)
        client = client_in(ns, relay.port)
        backend, _ = server.accept()
        with client, backend:
            senders = [
                threading.Thread(target=upload, args=(client, up, 1 << 20), daemon=True),
                threading.Thread(target=upload, args=(backend, down, 1 << 20), daemon=True),
            ]
            for sender in senders:
                sender.start()
            got_down: list[bytes] = []
            reader = threading.Thread(target=lambda: got_down.append(read_all(client)), daemon=True)
            reader.start()
            got_up = read_all(backend)
            reader.join(20)
            for sender in senders:
                sender.join(20)
        done = relay.completion()
        assert (Ending(done.ending), done.err) == (Ending.CLOSED, 0), done
        assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
        assert got_down and hashlib.sha256(got_down[0]).digest() == hashlib.sha256(down).digest()
        assert (done.bytes_up, done.bytes_down) == (len(up), len(down))


def test_local_resources_ending_is_exposed() -> None:
    assert Ending(_fastpath.LOCAL_RESOURCES) is Ending.LOCAL_RESOURCES and Ending.LOCAL_RESOURCES.local
    assert not any(e.local for e in Ending if e is not Ending.LOCAL_RESOURCES)
    assert FDS_PER_CONNECTION_MAX == 6  # 2 sockets + 2 pipes of 2 fds


# -- defect 8: a crash resets ------------------------------------------------------------------------


def test_killed_relay_resets_the_backend_mid_upload(ns: str) -> None:
    """kill -9 of the relaying process mid-upload: the backend must see a reset, not a clean EOF that a
    protocol without its own framing would take for the end of a complete upload."""
    with server_in(ns) as server, child_relay(ns, server.getsockname()[1]) as relay:
        client = client_in(ns, relay.port)
        backend, _ = server.accept()
        with client, backend:
            stop = threading.Event()

            def keep_sending() -> None:
                with contextlib.suppress(OSError):
                    while not stop.is_set():
                        client.sendall(b"u" * 65536)

            sender = threading.Thread(target=keep_sending, daemon=True)
            sender.start()
            received = 0
            while received < 4 << 20:
                received += len(backend.recv(1 << 20))
            os.kill(relay.proc.pid, signal.SIGKILL)
            relay.proc.wait(10)
            backend.settimeout(10)
            with pytest.raises(ConnectionResetError):
                while backend.recv(1 << 20):
                    pass  # what was in flight before the reset may still arrive
            stop.set()
            sender.join(10)


# -- the relay in this process ------------------------------------------------------------------------


@dataclass
class LocalRelay:
    ns: str
    worker: _fastpath.RelayWorker
    thread: threading.Thread
    notify_fd: int
    server: socket.socket
    next_id: int = 1
    records: dict[int, Completion] = field(default_factory=dict)
    arrivals: dict[int, float] = field(default_factory=dict)  # when each record was drained

    def pair(self) -> tuple[socket.socket, socket.socket]:
        """Two connected TCP pairs in the namespace: (client, proxy side) and (proxy side, server)."""
        with netns.entered(self.ns):
            client = socket.create_connection(self.server.getsockname(), timeout=10)
        accepted, _ = self.server.accept()
        accepted.settimeout(10)
        return client, accepted

    def completion(self, conn_id: int, timeout: float = 10.0) -> Completion:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.notify_fd)
            for record in self.worker.drain():
                self.records[record[0]] = Completion._make(record)
                self.arrivals[record[0]] = time.monotonic()
            if conn_id in self.records:
                return self.records.pop(conn_id)
            select.select([self.notify_fd], [], [], 0.02)
        raise AssertionError(f"no completion for connection {conn_id}")

    def relayed(self, idle_timeout_ms: int = 0) -> tuple[int, socket.socket, socket.socket, int]:
        """A connection through connect(): (id, client, server, the worker's client fd)."""
        with netns.entered(self.ns):
            client = socket.create_connection(self.server.getsockname(), timeout=10)
        accepted, _ = self.server.accept()
        conn_id, self.next_id = self.next_id, self.next_id + 1
        client_fd = accepted.detach()
        port = self.server.getsockname()[1]
        with netns.entered(self.ns):  # the upstream socket is made on this thread
            self.worker.connect(conn_id, client_fd, "127.0.0.1", port, 2000, idle_timeout_ms=idle_timeout_ms)
        server, _ = self.server.accept()
        server.settimeout(10)
        return conn_id, client, server, client_fd

    def adopt(
        self, idle_timeout_ms: int = 0, before: bytes = b""
    ) -> tuple[int, socket.socket, socket.socket, socket.socket, socket.socket]:
        """An established pair handed to the worker: (id, client, server, client's proxy side, upstream)."""
        client, client_side = self.pair()
        upstream, server = self.pair()
        if before:
            client.sendall(before)  # already queued when the worker takes the sockets
        conn_id, self.next_id = self.next_id, self.next_id + 1
        self.worker.adopt_established(conn_id, client_side.fileno(), upstream.fileno(), idle_timeout_ms)
        return conn_id, client, server, client_side, upstream


def eventpoll_fds() -> set[int]:
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventpoll]":
                fds.add(int(name))
    return fds


@pytest.fixture(scope="module")
def local(ns: str) -> Iterator[tuple[LocalRelay, int]]:
    """A RelayWorker on a thread of this process, and its epoll descriptor."""
    notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    before = eventpoll_fds()
    worker = _fastpath.RelayWorker(notify_fd)
    (epfd,) = eventpoll_fds() - before
    thread = threading.Thread(target=worker.run, daemon=True)
    server = server_in(ns)
    thread.start()
    try:
        yield LocalRelay(ns, worker, thread, notify_fd, server), epfd
    finally:
        worker.stop()
        thread.join(10)
        server.close()
        os.close(notify_fd)


def detach_all(*socks: socket.socket) -> None:
    for sock in socks:
        sock.detach()  # the worker owns these descriptors now


def test_adopted_pair_is_relayed_and_closes_cleanly(local: tuple[LocalRelay, int]) -> None:
    relay, _ = local
    conn_id, client, server, client_side, upstream = relay.adopt(before=b"GET /chat HTTP/1.1 tail")
    detach_all(client_side, upstream)
    with client, server:
        assert recv_exactly(server, 23) == b"GET /chat HTTP/1.1 tail"
        payload = secrets.token_bytes(1 << 20)
        sender = threading.Thread(target=server.sendall, args=(payload,), daemon=True)
        sender.start()
        assert recv_exactly(client, len(payload)) == payload
        sender.join(10)
        client.shutdown(socket.SHUT_WR)
        assert server.recv(1) == b""
        server.sendall(b"bye")
        server.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 3) == b"bye" and client.recv(1) == b""
    done = relay.completion(conn_id)
    assert (Ending(done.ending), done.bytes_up, done.bytes_down, done.client_fd) == (
        Ending.CLOSED,
        23,
        len(payload) + 3,
        -1,
    )


def test_adopted_pair_idle_timeout_closes_with_fin(local: tuple[LocalRelay, int]) -> None:
    relay, _ = local
    conn_id, client, server, client_side, upstream = relay.adopt(idle_timeout_ms=300)
    detach_all(client_side, upstream)
    with client, server:
        started = time.monotonic()
        assert client.recv(1) == b"" and server.recv(1) == b""  # FIN, not RST
        assert 0.25 < time.monotonic() - started < 2.0
    done = relay.completion(conn_id)
    assert Ending(done.ending) is Ending.IDLE_TIMEOUT


def test_idle_timeout_is_exact_and_spares_busy_connections(local: tuple[LocalRelay, int]) -> None:
    """With a timer per connection the idle timeout fires on time (the old once-a-second scan was up to
    1 s late), and traffic keeps pushing it back."""
    relay, _ = local
    busy_id, busy_client, busy_server, _ = relay.relayed(idle_timeout_ms=400)
    idle_id, idle_client, idle_server, _ = relay.relayed(idle_timeout_ms=400)
    started = time.monotonic()
    idle_closed: list[float] = []

    def wait_for_fin() -> None:
        idle_client.settimeout(5)
        if idle_client.recv(1) == b"":
            idle_closed.append(time.monotonic() - started)

    with busy_client, busy_server, idle_client, idle_server:
        watcher = threading.Thread(target=wait_for_fin, daemon=True)
        watcher.start()
        for i in range(12):  # 1.2 s of traffic, every 100 ms: three idle periods and more
            time.sleep(0.1)
            busy_client.sendall(b"%02d" % i)
            assert recv_exactly(busy_server, 2) == b"%02d" % i
        watcher.join(5)
        assert idle_closed and 0.35 < idle_closed[0] < 0.65, idle_closed
        assert Ending(relay.completion(idle_id).ending) is Ending.IDLE_TIMEOUT
        assert busy_id not in relay.records
        quiet = time.monotonic()
        busy_client.settimeout(5)
        assert busy_client.recv(1) == b""
        assert 0.35 < time.monotonic() - quiet < 0.65
    assert Ending(relay.completion(busy_id).ending) is Ending.IDLE_TIMEOUT


def test_connect_deadlines_fire_in_order_among_many(local: tuple[LocalRelay, int]) -> None:
    """The timer heap under churn: 300 connects to a black hole with shuffled deadlines, interleaved with
    connections that succeed and end (their timers leave the middle of the heap). Each timeout fires at
    its own deadline, not before, not much after."""
    relay, _ = local
    drop = ["iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"]
    netns.run(relay.ns, drop)
    deadlines: dict[int, float] = {}
    kept: list[socket.socket] = []
    try:
        timeouts_ms = [50 + 5 * i for i in range(300)]  # the first fire while others are set up
        random.Random(6).shuffle(timeouts_ms)
        for i, timeout_ms in enumerate(timeouts_ms):
            near, far = socket.socketpair()  # stands in for a client; handed back on timeout
            near.setblocking(False)
            kept.append(far)
            conn_id, relay.next_id = relay.next_id, relay.next_id + 1
            deadlines[conn_id] = time.monotonic() + timeout_ms / 1000
            with netns.entered(relay.ns):
                relay.worker.connect(conn_id, near.detach(), "127.0.0.1", 9, timeout_ms, client_prepared=True)
            if i % 10 == 0:
                ok_id, client, server, _ = relay.relayed(idle_timeout_ms=60_000)
                with client, server:
                    client.shutdown(socket.SHUT_WR)
                    assert server.recv(1) == b""
                    server.shutdown(socket.SHUT_WR)
                    assert client.recv(1) == b""
                assert Ending(relay.completion(ok_id).ending) is Ending.CLOSED
        arrived: dict[int, float] = {}
        give_up = time.monotonic() + 10
        while len(arrived) < len(deadlines) and time.monotonic() < give_up:
            records = [(r, time.monotonic()) for r in map(Completion._make, relay.worker.drain())]
            # Those that came in while the successful connections were being waited for:
            records += [
                (relay.records.pop(i), relay.arrivals[i]) for i in list(relay.records) if i in deadlines
            ]
            for record, when in records:
                assert record.conn_id in deadlines, record
                assert Ending(record.ending) is Ending.CONNECT_TIMEOUT and record.client_fd >= 0, record
                os.close(record.client_fd)
                arrived[record.conn_id] = when
            select.select([relay.notify_fd], [], [], 0.005)
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(relay.notify_fd)
        assert arrived.keys() == deadlines.keys()
        late = sorted(arrived[conn_id] - deadline for conn_id, deadline in deadlines.items())
        assert late[0] > -0.002, late[:5]  # none fired before its deadline
        assert late[len(late) // 2] < 0.05 and late[-1] < 0.5, late[-10:]
    finally:
        netns.run(relay.ns, ["iptables", "-D", *drop[2:]])
        for sock in kept:
            sock.close()


def test_closed_connection_leaves_no_epoll_entry(local: tuple[LocalRelay, int]) -> None:
    """close() alone leaves a socket in the epoll set while another descriptor (a dup, a forked child)
    keeps it open, and epoll would then report events for a freed connection: the relay removes it."""
    relay, epfd = local
    conn_id, client, server, client_fd = relay.relayed()
    kept = os.dup(client_fd)  # as a child forked at that moment would hold it
    inode = os.fstat(kept).st_ino
    try:
        with client, server:
            client.shutdown(socket.SHUT_WR)
            assert server.recv(1) == b""
            server.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        assert Ending(relay.completion(conn_id).ending) is Ending.CLOSED
        info = Path(f"/proc/self/fdinfo/{epfd}").read_text()
        assert f"ino:{inode:x}" not in info.replace(" ", ""), info
    finally:
        os.close(kept)


def test_relay_threads_block_sigpipe(local: tuple[LocalRelay, int]) -> None:
    """splice() into a socket cannot pass MSG_NOSIGNAL: the relay thread blocks SIGPIPE itself rather than
    rely on CPython ignoring it for the whole process."""
    relay, _ = local
    assert relay.thread.native_id is not None
    status = Path(f"/proc/self/task/{relay.thread.native_id}/status").read_text()
    blocked = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:")), 16)
    assert blocked & SIGPIPE_BIT


def test_adopt_rejects_bad_descriptors(local: tuple[LocalRelay, int]) -> None:
    relay, _ = local
    with pytest.raises(ValueError):
        relay.worker.adopt_established(10**9, -1, 5)
    with pytest.raises(ValueError):
        relay.worker.adopt_established(10**9, 7, 7)


def test_accept_batch_sockets_reset_on_close_and_deferred_wake(local: tuple[LocalRelay, int]) -> None:
    """accept_batch's sockets carry SO_LINGER {1, 0}, from the listener (set_socket_options) or set one by
    one, so connect(client_prepared=True) spends no syscall on them; wake=False defers the relay's
    wake-up to wake()."""
    relay, _ = local
    for prepared_listener in (True, False):
        with netns.entered(relay.ns):
            front = socket.create_server(("127.0.0.1", 0))
            if prepared_listener:
                _fastpath.set_socket_options(front.fileno())
            client = socket.create_connection(front.getsockname(), timeout=10)
        with front, client:
            deadline = time.monotonic() + 5
            batch: list[tuple[int, str, int, str, int]] = []
            while not batch and time.monotonic() < deadline:
                front.setblocking(False)
                batch = _fastpath.accept_batch(front.fileno())
            ((fd, *_),) = batch
            accepted = socket.socket(fileno=fd)
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8) == struct.pack("ii", 1, 0)
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
            conn_id, relay.next_id = relay.next_id, relay.next_id + 1
            live = relay.worker.live_connections
            relay.worker.wake()  # nothing waits: must not stop a later submission from waking the relay
            with netns.entered(relay.ns):
                relay.worker.connect(
                    conn_id,
                    accepted.detach(),
                    "127.0.0.1",
                    relay.server.getsockname()[1],
                    2000,
                    client_prepared=True,
                    wake=False,
                )
            server, _ = relay.server.accept()  # the connect itself went out at once
            with server:
                time.sleep(0.2)
                assert relay.worker.live_connections == live  # not taken on yet: nobody woke the relay
                relay.worker.wake()
                client.sendall(b"ping")
                server.settimeout(10)
                assert recv_exactly(server, 4) == b"ping"
                client.shutdown(socket.SHUT_WR)
                assert server.recv(1) == b""
                server.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""
        assert Ending(relay.completion(conn_id).ending) is Ending.CLOSED


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(1 << 20, size - len(buf)))
        assert chunk, f"EOF after {len(buf)} of {size} bytes"
        buf += chunk
    return bytes(buf)


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    child_main(sys.argv[2:])
