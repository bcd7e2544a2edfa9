"""The admin API: HTTP/1.1 + JSON on a Unix socket, served by the supervisor's own event loop.

The supervisor never blocks and runs no threads, so the server is sans-IO: h11 parses and frames HTTP,
this module moves bytes between h11 and non-blocking sockets registered in the supervisor's selector,
and `AdminApi` maps requests to the supervisor (the `AdminControl` protocol). A handler answers through
a callback, at once or later: GET clusters waits for the workers' snapshots while the loop goes on.

Access control is the socket file's: mode 0600 (root only) by default, 0660 with a group. Every request
that changes something is logged with the peer's pid and uid (SO_PEERCRED). docs/openapi.yaml describes
the endpoints; tests/test_admin_api.py checks the live server against it. The same HTTP serving runs the
read-only metrics port on TCP (`TcpHttpServer`).
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import re
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
import structlog

from nodeproxy import accesslog

log = structlog.get_logger("nodeproxy.admin")

DEFAULT_SOCKET = "/run/nodeproxy/admin.sock"
NETNS_RUN_DIR = "/run/netns"  # where `ip netns` names namespaces (nodeproxy.netns.NETNS_RUN_DIR)
MAX_BODY = 8 << 20  # bytes of a request body (a pushed config); larger gets 413
MAX_HEAD = 16 << 10  # bytes of a request line + headers; larger gets 431 (h11's limit)
MAX_CONNECTIONS = 32  # open admin connections; more are closed at once (a local client looping on us)
IDLE_TIMEOUT = 30.0  # seconds a connection may sit without a complete request before it is closed
MAX_OUTBOX = 64 << 20  # bytes queued for a client that does not read; beyond it the connection is dropped
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes with the terminating NUL
LOG_LEVELS = ("debug", "info", "warning", "error")
# "warning" keeps failures only, "off" writes none.
ACCESS_LOG_LEVELS = tuple(accesslog.LEVELS)

JsonObject = dict[str, Any]


class AdminError(RuntimeError):
    """The admin socket cannot be served (path too long, in use by a live server, unknown group)."""


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps the last value
    body: bytes
    peer: str  # "pid <pid> uid <uid>" of the client process
    peer_pid: int = 0
    peer_uid: int = -1


@dataclass
class Response:
    status: int
    body: JsonObject | list[Any]
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Descriptors sent with the response (SCM_RIGHTS on its first byte), then closed here: they must be
    # copies the response owns (an upgrade's listeners and lock).
    fds: list[int] = field(default_factory=list)
    # A body that is not JSON (the Prometheus text of GET /v1/metrics): sent as is, with content_type.
    raw: bytes | None = None
    content_type: str = "application/json"

    def encode(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.body, indent=None, separators=(",", ":")).encode() + b"\n"


def text_response(status: int, body: bytes, content_type: str) -> Response:
    return Response(status, {}, raw=body, content_type=content_type)


Respond = Callable[[Response], None]
Handler = Callable[[Request, Respond], None]


def error(status: int, message: str, **extra: Any) -> Response:
    return Response(status, {"error": message, **extra})


# -- socket path ---------------------------------------------------------------------------------------


def default_socket_path(chain_prefix: str = "NODEPROXY") -> str:
    """/run/nodeproxy/admin.sock for the node's daemon; a per-namespace path for any other.

    A daemon in another network namespace (a lab, a test) or with its own chain prefix shares /run with
    the node's daemon, so it gets the path its instance lock uses (network namespace + chain prefix):
    `ip netns exec <ns> nodeproxy ctl ...` then finds that namespace's daemon by itself. "Another network
    namespace" is one that differs from pid 1's or is named under /run/netns (pid 1's may be hidden from
    us, e.g. in a container).
    """
    own = os.stat("/proc/self/ns/net")
    if chain_prefix == "NODEPROXY" and not _in_other_namespace((own.st_dev, own.st_ino)):
        return DEFAULT_SOCKET
    return os.path.join(
        os.path.dirname(DEFAULT_SOCKET), f"netns-{own.st_dev}-{own.st_ino}-{chain_prefix}.admin.sock"
    )


def _in_other_namespace(own: tuple[int, int]) -> bool:
    with contextlib.suppress(OSError):
        init = os.stat("/proc/1/ns/net")
        if (init.st_dev, init.st_ino) != own:
            return True
    try:
        names = os.listdir(NETNS_RUN_DIR)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            named = os.stat(os.path.join(NETNS_RUN_DIR, name))
            if (named.st_dev, named.st_ino) == own:
                return True
    return False


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by a dead daemon; refuse if a live server still answers on it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AdminError(f"{path} exists and is not a socket; remove it or choose another --admin-socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as err:
        raise AdminError(f"cannot check whether {path} is in use: {err}") from err
    finally:
        probe.close()
    raise AdminError(f"another process serves the admin socket {path}; is another nodeproxy running?")


# -- connections ---------------------------------------------------------------------------------------


class _Connection:
    def __init__(self, sock: socket.socket, pid: int, uid: int, peer: str) -> None:
        self.sock = sock
        self.peer_pid, self.peer_uid = pid, uid
        self.peer = peer
        self.http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.outbox = bytearray()
        self.outbox_fds: list[int] = []  # go out with the next byte sent
        self.awaiting_response = False  # a handler holds the request; no new one is read meanwhile
        self.processing = False  # _process is on the stack: an answer given at once returns to it
        self.closed = False
        self.last_active = time.monotonic()
        self.events = selectors.EVENT_READ


class HttpServer:
    """HTTP/1.1 connections accepted on a listening socket and run on the given selector; subclasses
    open the socket (`AdminServer`: a Unix socket, `TcpHttpServer`: TCP) and name the peer.

    The selector's keys carry a callback taking the ready events (the supervisor's convention)."""

    def __init__(self, selector: selectors.BaseSelector, handler: Handler) -> None:
        self.selector = selector
        self.handler = handler
        self.connections: dict[int, _Connection] = {}
        self.sock: socket.socket | None = None

    def _peer(self, client: socket.socket) -> tuple[int, int, str]:
        """(pid, uid, description) of a client; pid 0 and uid -1 when the transport cannot tell."""
        raise NotImplementedError

    def _start_accepting(self, sock: socket.socket) -> None:
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, self._on_acceptable)

    def _stop_accepting(self) -> None:
        for conn in list(self.connections.values()):
            self._close(conn)
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None

    def close_in_child(self) -> None:
        """In a forked worker: drop the inherited descriptors (the supervisor keeps serving them)."""
        for conn in self.connections.values():
            conn.sock.close()
        if self.sock is not None:
            self.sock.close()

    def flush(self, timeout: float) -> None:
        """Best effort before exit: send what is queued (a POST quit's answer) for up to `timeout` s."""
        deadline = time.monotonic() + timeout
        for conn in list(self.connections.values()):
            conn.sock.setblocking(True)
            with contextlib.suppress(OSError):
                conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
                conn.sock.sendall(conn.outbox)
                conn.outbox.clear()

    def expire_idle(self, now: float) -> None:
        for conn in list(self.connections.values()):
            if not conn.awaiting_response and not conn.outbox and now - conn.last_active > IDLE_TIMEOUT:
                self._close(conn)

    # -- events ------------------------------------------------------------------------------------------

    def _on_acceptable(self, _events: int) -> None:
        assert self.sock is not None
        for _ in range(64):  # bounded: the rest waits for the next turn
            try:
                client, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and friends: log, let the loop go on
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("admin socket cannot accept", error=str(err))
                    return
                if err.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):  # that client only (TCP)
                    continue
                raise
            if len(self.connections) >= MAX_CONNECTIONS:
                client.close()
                continue
            client.setblocking(False)
            pid, uid, peer = self._peer(client)
            conn = _Connection(client, pid, uid, peer)
            self.connections[client.fileno()] = conn
            self.selector.register(client, selectors.EVENT_READ, lambda ev, c=conn: self._on_event(c, ev))

    def _on_event(self, conn: _Connection, events: int) -> None:
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(conn)
            if events & selectors.EVENT_READ and not conn.closed:
                self._on_readable(conn)
        except Exception:  # one client's trouble must not end the supervisor's loop
            log.exception("admin connection failed", peer=conn.peer)
            self._close(conn)

    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.last_active = time.monotonic()
        try:
            conn.http.receive_data(data)
        except RuntimeError:  # data after the client closed its side: nothing left to serve
            self._close(conn)
            return
        self._process(conn)

    def _process(self, conn: _Connection) -> None:
        if conn.processing:  # an answer given at once: the loop below goes on by itself (no recursion)
            return
        conn.processing = True
        try:
            self._process_events(conn)
        finally:
            conn.processing = False

    def _process_events(self, conn: _Connection) -> None:
        while not conn.closed and not conn.awaiting_response:
            try:
                event = conn.http.next_event()
            except h11.RemoteProtocolError as err:
                self._protocol_error(conn, err)
                return
            if event is h11.NEED_DATA:
                if conn.http.their_state is h11.CLOSED or (
                    conn.http.their_state is h11.DONE and conn.http.our_state is h11.MUST_CLOSE
                ):
                    self._close(conn)
                break
            if event is h11.PAUSED:
                if conn.http.our_state is h11.DONE and conn.http.their_state is h11.DONE:
                    conn.http.start_next_cycle()
                    continue
                break
            if isinstance(event, h11.Request):
                conn.request, conn.body = event, bytearray()
                # h11 bounds only a head that arrives in pieces; one that came whole is checked here.
                head_size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if head_size > MAX_HEAD:
                    self._reply(conn, error(431, f"request head over {MAX_HEAD} bytes"), close=True)
                    return
                length = _content_length(event)
                if length is not None and length > MAX_BODY:
                    self._reply(conn, error(413, f"request body over {MAX_BODY} bytes"), close=True)
                    return
            elif isinstance(event, h11.Data):
                conn.body += event.data
                if len(conn.body) > MAX_BODY:
                    self._reply(conn, error(413, f"request body over {MAX_BODY} bytes"), close=True)
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch(conn)
            elif isinstance(event, h11.ConnectionClosed):
                self._close(conn)
                return
        self._update_interest(conn)

    def _dispatch(self, conn: _Connection) -> None:
        assert conn.request is not None
        target = urlsplit(conn.request.target.decode("ascii", "replace"))
        request = Request(
            method=conn.request.method.decode("ascii", "replace"),
            path=target.path,
            query=target.query,
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in conn.request.headers},
            body=bytes(conn.body),
            peer=conn.peer,
            peer_pid=conn.peer_pid,
            peer_uid=conn.peer_uid,
        )
        conn.awaiting_response = True
        answered = False

        def respond(response: Response) -> None:
            nonlocal answered
            if answered:
                raise RuntimeError(f"{request.method} {request.path} answered twice")
            answered = True
            if conn.closed:  # the client went away: descriptors meant for it are ours to close
                _close_all(response.fds)
            else:
                self._reply(conn, response)

        try:
            self.handler(request, respond)
        except Exception as err:  # a bug in one handler must not end the supervisor
            log.exception("admin handler failed", method=request.method, path=request.path)
            if not answered:
                respond(error(500, f"internal error: {err!r}"))

    def _reply(self, conn: _Connection, response: Response, close: bool = False) -> None:
        body = response.encode()
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(body))),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            head = conn.http.send(h11.Response(status_code=response.status, headers=headers))
            data = conn.http.send(h11.Data(data=body))
            end = conn.http.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # the client already broke the exchange; nothing to say
            _close_all(response.fds)
            self._close(conn)
            return
        assert head is not None and data is not None and end is not None
        if response.fds:
            assert not conn.outbox, "descriptors go with the first byte of their response"
            conn.outbox_fds = list(response.fds)
        conn.outbox += head + data + end
        conn.awaiting_response = False
        conn.request, conn.body = None, bytearray()
        if len(conn.outbox) > MAX_OUTBOX:
            self._close(conn)
            return
        self._flush(conn)
        if not conn.closed:
            self._process(conn)  # a pipelined request may already be buffered

    def _protocol_error(self, conn: _Connection, err: h11.RemoteProtocolError) -> None:
        if conn.http.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = err.error_status_hint
            self._reply(conn, error(status, f"bad request: {err}"), close=True)
        else:
            self._close(conn)

    def _flush(self, conn: _Connection) -> None:
        while conn.outbox:
            try:
                if conn.outbox_fds:
                    sent = socket.send_fds(conn.sock, [conn.outbox], conn.outbox_fds)
                    _close_all(conn.outbox_fds)
                else:
                    sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._close(conn)
                return
            del conn.outbox[:sent]
        if not conn.outbox and conn.http.our_state is h11.MUST_CLOSE:
            self._close(conn)
            return
        self._update_interest(conn)

    def _update_interest(self, conn: _Connection) -> None:
        if conn.closed:
            return
        wanted = 0 if conn.awaiting_response else selectors.EVENT_READ
        if conn.outbox:
            wanted |= selectors.EVENT_WRITE
        if wanted == conn.events:
            return
        if conn.events and wanted:
            self.selector.modify(conn.sock, wanted, self.selector.get_key(conn.sock).data)
        elif wanted:
            self.selector.register(conn.sock, wanted, lambda ev, c=conn: self._on_event(c, ev))
        else:
            self.selector.unregister(conn.sock)
        conn.events = wanted

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events:
            self.selector.unregister(conn.sock)
            conn.events = 0
        self.connections.pop(conn.sock.fileno(), None)
        conn.sock.close()
        _close_all(conn.outbox_fds)


class AdminServer(HttpServer):
    """The admin API's Unix socket: access control by the file's mode, peers named by SO_PEERCRED."""

    def __init__(
        self,
        path: str,
        selector: selectors.BaseSelector,
        handler: Handler,
        group: str | None = None,
    ) -> None:
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise AdminError(f"admin socket path is longer than {_SUN_PATH_MAX} bytes: {path}")
        super().__init__(selector, handler)
        self.path = path
        self.group = group
        self.bound_path = path  # where the socket file is: `path`, or beside it until publish()
        self._inode: tuple[int, int] | None = None

    def _peer(self, client: socket.socket) -> tuple[int, int, str]:
        pid, uid, _gid = peer_credentials(client)
        return pid, uid, f"pid {pid} uid {uid}"

    def open(self, staged: bool = False) -> None:
        """Bind the socket (mode 0600, or 0660 owned by the group) and start accepting.

        staged (an upgrade): bind next to the path, leaving the running daemon's socket where it is;
        publish() then renames ours over it in one step, so clients always find one of the two."""
        gid = self._group_id()
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        bound = f"{self.path}.{os.getpid()}.new" if staged else self.path
        if len(os.fsencode(bound)) > _SUN_PATH_MAX:
            raise AdminError(f"admin socket path is longer than {_SUN_PATH_MAX} bytes: {bound}")
        _remove_stale_socket(bound)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # the file is born 0600: no window in which others could connect
        try:
            sock.bind(bound)
        except OSError as err:
            sock.close()
            raise AdminError(f"cannot bind the admin socket {bound}: {err}") from err
        finally:
            os.umask(old_umask)
        if gid is not None:
            try:
                os.chown(bound, -1, gid)
                os.chmod(bound, 0o660)
            except OSError as err:
                sock.close()
                os.unlink(bound)
                raise AdminError(
                    f"cannot give the admin socket {bound} to group {self.group}: {err}"
                ) from err
        sock.listen(64)
        info = os.stat(bound)
        self._inode = (info.st_dev, info.st_ino)
        self.bound_path = bound
        self._start_accepting(sock)
        log.info("admin socket open", path=bound, group=self.group)

    def publish(self) -> None:
        """After a staged open: take over the path (the predecessor's socket file goes; its connections
        stay with it)."""
        if self.bound_path != self.path:
            os.rename(self.bound_path, self.path)
            self.bound_path = self.path
            log.info("admin socket published", path=self.path)

    def _group_id(self) -> int | None:
        if self.group is None:
            return None
        if self.group.isdigit():
            return int(self.group)
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise AdminError(f"admin socket group {self.group!r} does not exist") from None

    def close(self) -> None:
        """Stop serving: close every connection, then the socket, and unlink the file if it is ours."""
        was_open = self.sock is not None
        self._stop_accepting()
        if was_open:
            with contextlib.suppress(FileNotFoundError):
                info = os.stat(self.bound_path)
                if (info.st_dev, info.st_ino) == self._inode:  # not a successor's socket
                    os.unlink(self.bound_path)


class TcpHttpServer(HttpServer):
    """The same HTTP/1.1 serving on a TCP address (the metrics endpoint). SO_REUSEPORT lets an
    upgrade's successor bind the address while its predecessor still serves it."""

    def __init__(self, address: tuple[str, int], selector: selectors.BaseSelector, handler: Handler) -> None:
        super().__init__(selector, handler)
        self.address = address

    def _peer(self, client: socket.socket) -> tuple[int, int, str]:
        try:
            host, port = client.getpeername()[:2]
        except OSError:
            return 0, -1, "tcp peer gone"
        return 0, -1, f"{host}:{port}"

    def open(self) -> None:
        """Bind and listen; AdminError if the address cannot be bound (in use, not local)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self.address)
            sock.listen(64)
        except OSError as err:
            sock.close()
            raise AdminError(f"cannot listen on {self.address[0]}:{self.address[1]}: {err}") from err
        self.address = sock.getsockname()[:2]  # the port the kernel chose when asked for 0
        self._start_accepting(sock)

    def close(self) -> None:
        self._stop_accepting()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _content_length(request: h11.Request) -> int | None:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return None


# -- the API -------------------------------------------------------------------------------------------


class ConfigRejected(Exception):
    """A pushed config is invalid: `problems` has one ConfigError line each."""

    def __init__(self, status: int, message: str, problems: list[JsonObject]) -> None:
        super().__init__(message)
        self.status = status
        self.problems = problems


class AdminControl(Protocol):
    """What the admin API needs from the supervisor."""

    def config_document(self) -> JsonObject: ...
    def push_config(self, text: str, expected_version: int | None, peer: str) -> JsonObject: ...
    def collect_snapshots(self, done: Callable[[JsonObject], None]) -> None: ...
    def listeners_document(self) -> JsonObject: ...
    def workers_document(self) -> JsonObject: ...
    def readiness(self) -> tuple[bool, str]: ...
    def health(self) -> tuple[bool, JsonObject]: ...
    def get_log_level(self) -> str: ...
    def set_log_level(self, level: str, peer: str) -> None: ...
    def get_access_log_level(self) -> str: ...
    def set_access_log_level(self, level: str, peer: str) -> None: ...
    def collect_metrics(self, done: Callable[[bytes, str], None]) -> None: ...
    def begin_drain(self, peer: str) -> JsonObject: ...
    def quit(self, peer: str) -> None: ...
    def start_upgrade(self, peer: str) -> JsonObject: ...
    def hand_over(self, peer_pid: int, respond: Respond) -> None: ...
    def commit_handover(self, peer_pid: int) -> JsonObject: ...


class Refused(Exception):
    """The daemon cannot do this now (draining, an upgrade under way, ...): 409 with the reason."""


class VersionMismatch(Exception):
    def __init__(self, current: int) -> None:
        super().__init__(f"the config is at version {current}")
        self.current = current


_PROBLEM_RE = re.compile(
    r"^(?:line (?P<line>\d+), column (?P<column>\d+): )?(?:(?P<path>[\w.\[\]-]+): )?(?P<reason>.*)$"
)


def describe_problems(problems: list[str]) -> list[JsonObject]:
    """ConfigError lines ('line 3, column 5: services[0].vip: reason') as {path, reason, line, column}."""
    described: list[JsonObject] = []
    for problem in problems:
        match = _PROBLEM_RE.match(problem)
        assert match is not None  # every part but the reason is optional
        item: JsonObject = {"path": match["path"] or "", "reason": match["reason"]}
        if match["line"]:
            item["line"], item["column"] = int(match["line"]), int(match["column"])
        described.append(item)
    return described


def parse_if_match(value: str | None) -> int | None:
    """The version an If-Match header names ('"7"', '7', W/ prefixes tolerated); None for absent or *."""
    if value is None or value.strip() == "*":
        return None
    text = value.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise ValueError(f'If-Match must name a config version such as "7", not {value!r}')
    return int(text)


def etag(version: int) -> tuple[str, str]:
    return ("ETag", f'"{version}"')


class AdminApi:
    """Routes admin requests to the supervisor."""

    def __init__(self, control: AdminControl) -> None:
        self.control = control
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/v1/config"): self.get_config,
            ("PUT", "/v1/config"): self.put_config,
            ("GET", "/v1/clusters"): self.get_clusters,
            ("GET", "/v1/stats"): self.get_stats,
            ("GET", "/v1/listeners"): self.get_listeners,
            ("GET", "/v1/workers"): self.get_workers,
            ("GET", "/v1/log-level"): self.get_log_level,
            ("PUT", "/v1/log-level"): self.put_log_level,
            ("GET", "/v1/access-log-level"): self.get_access_log_level,
            ("PUT", "/v1/access-log-level"): self.put_access_log_level,
            ("GET", "/v1/metrics"): self.get_metrics,
            ("GET", "/v1/ready"): self.get_ready,
            ("GET", "/v1/healthz"): self.get_healthz,
            ("POST", "/v1/drain"): self.post_drain,
            ("POST", "/v1/quit"): self.post_quit,
            ("POST", "/v1/upgrade"): self.post_upgrade,
            ("POST", "/v1/handoff"): self.post_handoff,
            ("POST", "/v1/handoff/commit"): self.post_handoff_commit,
        }

    def __call__(self, request: Request, respond: Respond) -> None:
        handler = self.routes.get((request.method, request.path))
        if handler is not None:
            handler(request, respond)
            return
        allowed = sorted(method for method, path in self.routes if path == request.path)
        if allowed:
            respond(error(405, f"{request.method} not allowed here", allowed=allowed))
        else:
            respond(error(404, f"no such endpoint: {request.path}"))

    def get_config(self, _request: Request, respond: Respond) -> None:
        document = self.control.config_document()
        respond(Response(200, document, [etag(document["version"])]))

    def put_config(self, request: Request, respond: Respond) -> None:
        try:
            expected = parse_if_match(request.headers.get("if-match"))
        except ValueError as err:
            respond(error(400, str(err)))
            return
        try:
            text = request.body.decode("utf-8")
        except UnicodeDecodeError as err:
            respond(error(400, "invalid config", problems=[{"path": "", "reason": f"not UTF-8: {err}"}]))
            return
        try:
            result = self.control.push_config(text, expected, request.peer)
        except VersionMismatch as err:
            respond(error(412, str(err), version=err.current))
            return
        except ConfigRejected as err:
            respond(error(err.status, str(err), problems=err.problems))
            return
        respond(Response(200, result, [etag(result["version"])]))

    def get_clusters(self, _request: Request, respond: Respond) -> None:
        def done(snapshots: JsonObject) -> None:
            respond(Response(200, clusters_document(snapshots)))

        self.control.collect_snapshots(done)

    def get_stats(self, _request: Request, respond: Respond) -> None:
        def done(snapshots: JsonObject) -> None:
            respond(Response(200, stats_document(snapshots)))

        self.control.collect_snapshots(done)

    def get_listeners(self, _request: Request, respond: Respond) -> None:
        respond(Response(200, self.control.listeners_document()))

    def get_workers(self, _request: Request, respond: Respond) -> None:
        respond(Response(200, self.control.workers_document()))

    def get_log_level(self, _request: Request, respond: Respond) -> None:
        respond(Response(200, {"level": self.control.get_log_level()}))

    def put_log_level(self, request: Request, respond: Respond) -> None:
        try:
            level = json.loads(request.body)["level"]
        except (ValueError, KeyError, TypeError):
            respond(error(400, 'body must be JSON like {"level": "debug"}'))
            return
        if level not in LOG_LEVELS:
            respond(error(400, f"level must be one of {', '.join(LOG_LEVELS)}", level=str(level)))
            return
        self.control.set_log_level(level, request.peer)
        respond(Response(200, {"level": level}))

    def get_access_log_level(self, _request: Request, respond: Respond) -> None:
        respond(Response(200, {"level": self.control.get_access_log_level()}))

    def put_access_log_level(self, request: Request, respond: Respond) -> None:
        try:
            level = json.loads(request.body)["level"]
        except (ValueError, KeyError, TypeError):
            respond(error(400, 'body must be JSON like {"level": "warning"}'))
            return
        if level not in ACCESS_LOG_LEVELS:
            respond(error(400, f"level must be one of {', '.join(ACCESS_LOG_LEVELS)}", level=str(level)))
            return
        self.control.set_access_log_level(level, request.peer)
        respond(Response(200, {"level": level}))

    def get_metrics(self, _request: Request, respond: Respond) -> None:
        """The Prometheus text of the metrics port, also here (no TCP listener needed)."""

        def done(text: bytes, content_type: str) -> None:
            respond(text_response(200, text, content_type))

        self.control.collect_metrics(done)

    def get_ready(self, _request: Request, respond: Respond) -> None:
        ready, reason = self.control.readiness()
        respond(Response(200 if ready else 503, {"ready": ready, "reason": reason}))

    def get_healthz(self, _request: Request, respond: Respond) -> None:
        healthy, details = self.control.health()
        respond(Response(200 if healthy else 503, {"healthy": healthy, **details}))

    def post_drain(self, request: Request, respond: Respond) -> None:
        respond(Response(202, self.control.begin_drain(request.peer)))

    def post_quit(self, request: Request, respond: Respond) -> None:
        respond(Response(202, {"stopping": True}))
        self.control.quit(request.peer)

    def post_upgrade(self, request: Request, respond: Respond) -> None:
        try:
            respond(Response(202, self.control.start_upgrade(request.peer)))
        except Refused as err:
            respond(error(409, str(err)))

    def post_handoff(self, request: Request, respond: Respond) -> None:
        """Only root may take the listeners: the socket's group (--admin-group) may not."""
        if request.peer_uid != 0:
            respond(error(403, "only root may take over the listeners"))
            return
        try:
            self.control.hand_over(request.peer_pid, respond)
        except Refused as err:
            respond(error(409, str(err)))

    def post_handoff_commit(self, request: Request, respond: Respond) -> None:
        if request.peer_uid != 0:
            respond(error(403, "only root may take over the listeners"))
            return
        try:
            respond(Response(200, self.control.commit_handover(request.peer_pid)))
        except Refused as err:
            respond(error(409, str(err)))


# -- documents built from worker snapshots -----------------------------------------------------------------


def clusters_document(snapshots: JsonObject) -> JsonObject:
    """Every service port's endpoints with their live state summed over the workers that answered."""
    clusters: dict[tuple[str, int], JsonObject] = {}
    endpoints: dict[tuple[str, int, str, int], JsonObject] = {}
    for snapshot in snapshots["workers"].values():
        for route in snapshot["routes"]:
            key = (route["service"], route["port"])
            cluster = clusters.setdefault(
                key,
                {
                    "service": route["service"],
                    "vip": route["vip"],
                    "port": route["port"],
                    "protocol": route["protocol"],
                    "endpoints": [],
                },
            )
            for ep in route["endpoints"]:
                ep_key = (*key, ep["address"], ep["port"])
                total = endpoints.get(ep_key)
                if total is None:
                    total = {**ep, "active": 0, "total": 0, "connect_failures": 0}
                    endpoints[ep_key] = total
                    cluster["endpoints"].append(total)
                for counter in ("active", "total", "connect_failures"):
                    total[counter] += ep[counter]
    return {
        "clusters": sorted(clusters.values(), key=lambda c: (c["service"], c["port"])),
        "workers_answered": sorted(int(i) for i in snapshots["workers"]),
        "workers_missing": snapshots["missing"],
    }


def _add_counters(into: JsonObject, counters: JsonObject) -> None:
    """Sum a worker's counters into `into`: numbers added, nested mappings summed key by key."""
    for name, value in counters.items():
        if isinstance(value, dict):
            _add_counters(into.setdefault(name, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            into[name] = into.get(name, 0) + value


def stats_document(snapshots: JsonObject) -> JsonObject:
    totals: JsonObject = {
        "active_connections": 0,
        "accepted": 0,
        "refused": 0,
        "connect_failures": 0,
        "dispatch_errors": 0,
        "closed": {},
    }
    http: JsonObject = {}
    mesh: JsonObject | None = None
    for snapshot in snapshots["workers"].values():
        totals["active_connections"] += snapshot["active_connections"]
        for counter in ("accepted", "refused", "connect_failures", "dispatch_errors"):
            totals[counter] += snapshot["stats"][counter]
        for how, count in snapshot["stats"]["closed"].items():
            totals["closed"][how] = totals["closed"].get(how, 0) + count
        _add_counters(http, snapshot.get("http") or {})
        if snapshot.get("mesh") is not None:
            mesh = mesh if mesh is not None else {}
            _add_counters(mesh, {k: v for k, v in snapshot["mesh"].items() if k != "certificates"})
    return {
        **totals,
        "http": http,
        "mesh": mesh,
        "config_version": snapshots["config_version"],
        "uptime_seconds": snapshots["uptime_seconds"],
        "workers_answered": sorted(int(i) for i in snapshots["workers"]),
        "workers_missing": snapshots["missing"],
    }


# -- upgrades: the successor's side of the listener handoff --------------------------------------------

HANDOFF_TIMEOUT = 10.0  # seconds the successor waits for each answer of the running daemon


class HandoffClient:
    """The successor's connection to the running daemon: POST /v1/handoff receives the instance lock and
    the listeners (SCM_RIGHTS), POST /v1/handoff/commit tells the old daemon to stop accepting.

    Blocking: the successor uses it before its own loop runs. Closing it without a commit aborts the
    upgrade; the old daemon never stopped serving."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(HANDOFF_TIMEOUT)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise AdminError(f"cannot reach the running daemon at {path} to take over: {err}") from err
        self.http = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str) -> tuple[int, JsonObject, list[int]]:
        """(status, JSON body, descriptors that came with the response)."""
        self.sock.sendall(
            b"".join(
                part
                for part in (
                    self.http.send(
                        h11.Request(
                            method=method,
                            target=target,
                            headers=[("Host", "nodeproxy"), ("Content-Length", "0")],
                        )
                    ),
                    self.http.send(h11.EndOfMessage()),
                )
                if part is not None
            )
        )
        fds: list[int] = []
        status, body = 0, bytearray()
        try:
            while True:
                event = self.http.next_event()
                if event is h11.NEED_DATA:
                    data, received, _flags, _addr = socket.recv_fds(self.sock, 65536, 64)
                    for fd in received:  # ours alone: not for the processes we start
                        os.set_inheritable(fd, False)
                    fds.extend(received)
                    self.http.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise AdminError(f"{method} {target}: the running daemon closed the connection")
        except (OSError, h11.ProtocolError) as err:
            _close_all(fds)
            raise AdminError(f"{method} {target} to {self.path} failed: {err}") from err
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        document: JsonObject = json.loads(body) if body else {}
        return status, document, fds

    def close(self) -> None:
        self.sock.close()
