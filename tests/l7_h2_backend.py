"""An h2c test backend on the `h2` package: one thread per connection reading frames, one per request
writing its answer under flow control. It records what the engine's HTTP/2 upstream side does (connections,
streams reset by the proxy) so tests can check pooling and cancellation at the server.

Paths: /sink (sha256, size and trailers of the request body), /blob/N (N pattern bytes, then an
x-checksum trailer), /slow/MS, /headers (the request fields as JSON), /status/N (no body), /reset (the
stream is reset with CANCEL), /reset-mid (the same after a head and 1000 bytes), /echo (answers at once
and echoes each DATA chunk as it arrives: a bidirectional stream), anything else: "h2backend path=...".
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

PATTERN = hashlib.sha256(b"nodeproxy").digest() * 32768  # the same 1 MiB unit as tests/test_l7.py


class _Stream:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers
        self.body = hashlib.sha256()
        self.size = 0
        self.trailers: list[str] = []


class H2Backend:
    def __init__(
        self, goaway_after: int = 0, address: tuple[str, int] = ("127.0.0.1", 0), name: str = ""
    ) -> None:
        """goaway_after > 0: each connection sends a graceful GOAWAY after that many requests. name: shown
        in default answers (with the connection's peer address), to tell backends apart."""
        self.name = name
        self.listener = socket.create_server(address)
        self.port: int = self.listener.getsockname()[1]
        self.goaway_after = goaway_after
        self.connections = 0
        self.requests = 0
        self.resets_received: list[int] = []  # error codes of RST_STREAM frames from the proxy
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )  # headers and data go in separate writes
            with self.lock:
                self.connections += 1
                self.sockets.append(sock)
            threading.Thread(target=_Connection(self, sock).run, daemon=True).start()

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                sock.close()


class _Connection:
    def __init__(self, server: H2Backend, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="latin-1")
        )
        self.cond = threading.Condition()
        self.streams: dict[int, _Stream] = {}
        self.served = 0
        self.closed = False

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            try:
                self.sock.sendall(data)
            except OSError:
                self.closed = True

    def run(self) -> None:
        with self.cond:
            self.conn.initiate_connection()
            self.flush()
        while not self.closed:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            with self.cond:
                if not data:
                    self.closed = True
                    self.cond.notify_all()
                    return
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self.flush()
                    self.closed = True
                    self.cond.notify_all()
                    return
                for event in events:
                    self.on_event(event)
                self.flush()
                self.cond.notify_all()

    def on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            headers = {str(k): str(v) for k, v in event.headers}
            self.streams[event.stream_id] = _Stream(headers)
            with self.server.lock:
                self.server.requests += 1
            self.served += 1
            if headers[":path"] == "/echo":
                self.conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "x/echo")])
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if stream is None:
                return
            stream.body.update(event.data)
            stream.size += len(event.data)
            if stream.headers[":path"] == "/echo" and event.data:
                self.conn.send_data(event.stream_id, event.data)
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = sorted(f"{k!s}:{v!s}" for k, v in event.headers)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                threading.Thread(target=self.answer, args=(event.stream_id, stream), daemon=True).start()
        elif isinstance(event, h2.events.StreamReset):
            self.streams.pop(event.stream_id, None)
            if event.remote_reset:
                with self.server.lock:
                    self.server.resets_received.append(int(event.error_code))

    def send(self, stream_id: int, data: bytes, end: bool = False) -> bool:
        """Send under flow control; False if the stream or connection went away."""
        view = memoryview(data)
        with self.cond:
            while view:
                if self.closed or stream_id not in self.streams:
                    return False
                try:
                    window = min(
                        self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
                    )
                except h2.exceptions.StreamClosedError:
                    return False
                if window <= 0:
                    self.cond.wait(1)
                    continue
                self.conn.send_data(stream_id, bytes(view[:window]))
                view = view[window:]
                self.flush()
            if end:
                self.conn.end_stream(stream_id)
                self.flush()
        return True

    def answer(self, sid: int, stream: _Stream) -> None:
        full_path = stream.headers[":path"]
        path = full_path.partition("?")[0]
        try:
            if path == "/echo":
                with self.cond:
                    self.conn.send_headers(
                        sid, [("grpc-status", "0"), ("x-echo-size", str(stream.size))], end_stream=True
                    )
                    self.flush()
                return
            if path in ("/reset", "/reset-mid"):
                with self.cond:
                    if path == "/reset-mid":  # part of a response first
                        self.conn.send_headers(sid, [(":status", "200")])
                        self.conn.send_data(sid, b"x" * 1000)
                    self.conn.reset_stream(sid, error_code=8)
                    self.flush()
                return
            if path.startswith("/slow/"):
                time.sleep(int(path.rsplit("/", 1)[1]) / 1000)
            if path.startswith("/status/"):
                with self.cond:
                    self.conn.send_headers(sid, [(":status", path.rsplit("/", 1)[1])], end_stream=True)
                    self.flush()
                return
            if path.startswith("/blob/"):
                n = int(path.rsplit("/", 1)[1])
                with self.cond:
                    self.conn.send_headers(sid, [(":status", "200")])
                    self.flush()
                sent, check = 0, hashlib.sha256()
                while sent < n:
                    piece = PATTERN[: min(len(PATTERN), n - sent)]
                    check.update(piece)
                    if not self.send(sid, piece):
                        return
                    sent += len(piece)
                with self.cond:
                    self.conn.send_headers(sid, [("x-checksum", check.hexdigest())], end_stream=True)
                    self.flush()
                return
            if path == "/sink":
                body = f"{stream.body.hexdigest()} {stream.size} {';'.join(stream.trailers)}".encode()
            elif path == "/headers":
                body = json.dumps(sorted(stream.headers.items())).encode()
            else:
                body = f"h2backend path={full_path}".encode()
                if self.server.name:
                    body += " name={} peer={}:{}".format(self.server.name, *self.sock.getpeername()).encode()
            with self.cond:
                self.conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                self.flush()
            self.send(sid, body, end=True)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass  # the proxy reset the stream meanwhile
        finally:
            with self.cond:
                self.streams.pop(sid, None)
                if self.server.goaway_after and self.served >= self.server.goaway_after and not self.streams:
                    # Graceful, once this answer is out (the h2 package sends nothing after a GOAWAY).
                    self.conn.close_connection(last_stream_id=sid)
                    self.flush()


if __name__ == "__main__":  # pragma: no cover - run inside a lab's backend pod
    import sys

    server = H2Backend(address=("0.0.0.0", int(sys.argv[1])), name=sys.argv[2])
    server.stopping.wait()
