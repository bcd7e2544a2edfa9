"""Scripted loopback backends for the engine's retry tests (tests/test_l7_engine_retry.py).

ScriptedBackend speaks HTTP/1.1, ScriptedH2Backend h2c (on the `h2` package). Each request takes the
next action from the backend's `plan` (then "ok"), and every request that arrived completely is kept
(head and body), so a test can compare what two backends saw byte for byte.

HTTP/1.1 actions: ok (200, body `ok <name> <sha256 of the request body> <its size>`), 503 (with a
body and x-backend), close-mid (read the head and part of the body, then close), reset (read the head,
then close with an RST), hang (read the whole request, never answer), empty (200 with Content-Length:
0), garbage (a malformed status line).
HTTP/2 actions: ok, refuse (RST_STREAM REFUSED_STREAM), goaway (GOAWAY with last stream id 0),
grpc-unavailable (trailers-only grpc-status 14), grpc-ok (a message, then trailers grpc-status 0), hang
(never answer). Streams the proxy resets are counted in `resets`.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import threading

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions


class ScriptedBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.plan: list[str] = []
        self.received: list[tuple[bytes, bytes]] = []  # (head, body) of every complete request
        self.partial: list[bytes] = []  # heads of requests cut short by close-mid / reset
        self.connections = 0
        self.closed_connections = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _next_action(self) -> str:
        with self.lock:
            return self.plan.pop(0) if self.plan else "ok"

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(10)
        reader = sock.makefile("rb")
        try:
            while not self.stopping.is_set():
                head = b""
                while True:
                    line = reader.readline(65536)
                    if not line:
                        return
                    head += line
                    if line == b"\r\n":
                        break
                fields = {}
                for raw in head.split(b"\r\n")[1:]:
                    name, _, value = raw.partition(b":")
                    fields[name.strip().lower()] = value.strip()
                action = self._next_action()
                if action == "reset":
                    with self.lock:
                        self.partial.append(head)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                if action == "close-mid":
                    # Part of the body (if any) is read, so the proxy has sent some of it already.
                    if b"content-length" in fields:
                        reader.read(min(int(fields[b"content-length"]), 1000))
                    with self.lock:
                        self.partial.append(head)
                    return
                body = self._read_body(reader, fields)
                with self.lock:
                    self.received.append((head, body))
                if action == "hang":
                    while sock.recv(65536):
                        pass
                    return
                if action == "503":
                    payload = b"backend unavailable\n"
                    sock.sendall(
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: %d\r\nx-backend: %s\r\n"
                        b"retry-after: 7\r\n\r\n%s" % (len(payload), self.name.encode(), payload)
                    )
                    continue
                if action == "garbage":
                    sock.sendall(b"HTTP/1.1 2x0 OK\r\n\r\n")
                    continue
                if action == "empty":
                    sock.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-backend: %s\r\n\r\n" % self.name.encode()
                    )
                    continue
                assert action == "ok", action
                payload = b"ok %s %s %d" % (
                    self.name.encode(),
                    hashlib.sha256(body).hexdigest().encode(),
                    len(body),
                )
                sock.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-backend: %s\r\n\r\n%s"
                    % (len(payload), self.name.encode(), payload)
                )
        except OSError:
            return
        finally:
            reader.close()
            sock.close()
            with self.lock:
                self.closed_connections += 1

    @staticmethod
    def _read_body(reader: object, fields: dict[bytes, bytes]) -> bytes:
        assert hasattr(reader, "read") and hasattr(reader, "readline")
        if b"content-length" in fields:
            data: bytes = reader.read(int(fields[b"content-length"]))
            return data
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size = int(reader.readline().split(b";")[0], 16)
                if size == 0:
                    while reader.readline() not in (b"\r\n", b""):
                        pass
                    return body
                body += reader.read(size)
                reader.readline()
        return b""

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def grpc_message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


class ScriptedH2Backend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.plan: list[str] = []
        self.received: list[tuple[dict[str, str], bytes]] = []  # (headers, body) of answered requests
        self.resets: list[int] = []  # error codes of the proxy's RST_STREAM frames
        self.connections = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )
        conn.initiate_connection()
        streams: dict[int, tuple[dict[str, str], bytearray, str]] = {}
        try:
            sock.sendall(conn.data_to_send())
            while not self.stopping.is_set():
                data = sock.recv(1 << 20)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers = {str(k): str(v) for k, v in event.headers}
                        with self.lock:
                            action = self.plan.pop(0) if self.plan else "ok"
                        if action == "refuse":
                            conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        elif action == "goaway":
                            conn.close_connection(last_stream_id=0)
                        else:
                            streams[event.stream_id] = (headers, bytearray(), action)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id in streams:
                            streams[event.stream_id][1].extend(event.data)
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
                        headers, body, action = streams.pop(event.stream_id)
                        with self.lock:
                            self.received.append((headers, bytes(body)))
                        self._answer(conn, event.stream_id, action, bytes(body))
                    elif isinstance(event, h2.events.StreamReset):
                        streams.pop(event.stream_id, None)
                        if event.remote_reset:
                            with self.lock:
                                self.resets.append(int(event.error_code))
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def _answer(self, conn: h2.connection.H2Connection, sid: int, action: str, body: bytes) -> None:
        if action == "hang":
            return
        if action == "grpc-unavailable":
            conn.send_headers(
                sid,
                [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "14"),
                 ("grpc-message", "backend draining")],
                end_stream=True,
            )  # fmt: skip
            return
        if action == "grpc-ok":
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            conn.send_data(sid, grpc_message(self.name.encode()))
            conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            return
        assert action == "ok", action
        payload = b"ok %s %s %d" % (self.name.encode(), hashlib.sha256(body).hexdigest().encode(), len(body))
        conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(payload)))])
        conn.send_data(sid, payload, end_stream=True)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
