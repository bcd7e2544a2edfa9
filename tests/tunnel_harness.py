"""Helpers of the tunnel tests: a test PKI (the identity package's CA, plus hand-made bad certificates),
two in-process tunnel engines with a decider thread, and small pod servers. Everything on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from nodeproxy.identity.ca import CertificateAuthority, init_ca, private_key_pem
from nodeproxy.identity.spiffe import SpiffeId
from nodeproxy.proxy.inbound import Policy, allow_all, decide_inbound
from nodeproxy.proxy.tunnel import (
    Credential,
    EngineSettings,
    InboundStream,
    PemCredential,
    StreamDone,
    TlsFailed,
    TlsOpened,
    TunnelEngine,
    TunnelRecord,
)

TRUST_DOMAIN = "cluster.local"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/client"
SERVER_NODE_ID = f"spiffe://{TRUST_DOMAIN}/nodeproxy/node/node-b"


class Pki:
    """A CA made by nodeproxy.identity (root + intermediate) and SVIDs from it; `forge` makes the
    certificates the CA would refuse to issue."""

    def __init__(
        self, directory: Path, trust_domain: str = TRUST_DOMAIN, now: datetime | None = None
    ) -> None:
        init_ca(directory, trust_domain, now=now)
        self.ca = CertificateAuthority.load(directory)
        self.trust_domain = trust_domain

    @property
    def bundle(self) -> bytes:
        return self.ca.trust_bundle_pem()

    def svid(self, spiffe_id: str, ttl: timedelta = timedelta(hours=1)) -> PemCredential:
        issued, key = self.ca.issue_credential(SpiffeId.parse(spiffe_id), ttl=ttl)
        return PemCredential(issued.chain_pem, private_key_pem(key))

    def forge(
        self,
        uris: list[str],
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        ca: bool = False,
    ) -> PemCredential:
        """A leaf signed by this CA's intermediate with exactly the given URI SANs and validity."""
        now = datetime.now(UTC)
        key = ec.generate_private_key(ec.SECP256R1())
        signer = self.ca.signing_cert
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(signer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=5))
            .not_valid_after(not_after or now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, ca, ca, False, False),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=True
            )
        )
        cert = builder.sign(self.ca.signing_key, hashes.SHA256())
        chain = cert.public_bytes(serialization.Encoding.PEM) + signer.public_bytes(
            serialization.Encoding.PEM
        )
        return PemCredential(chain, private_key_pem(key))


@dataclass
class Recorder:
    """Every record an engine posted, kept for the assertions (appended by the decider thread)."""

    records: list[TunnelRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, kind: type[TunnelRecord]) -> list[TunnelRecord]:
        with self.lock:
            return [r for r in self.records if isinstance(r, kind)]

    def inbound(self) -> list[InboundStream]:
        return [r for r in self.of(InboundStream) if isinstance(r, InboundStream)]

    def done(self) -> list[StreamDone]:
        return [r for r in self.of(StreamDone) if isinstance(r, StreamDone)]

    def failed(self) -> list[TlsFailed]:
        return [r for r in self.of(TlsFailed) if isinstance(r, TlsFailed)]

    def opened(self) -> list[TlsOpened]:
        return [r for r in self.of(TlsOpened) if isinstance(r, TlsOpened)]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Decider:
    """The Python side of both engines on one thread: records are kept, inbound streams decided."""

    def __init__(self, engines: dict[str, TunnelEngine], local_pods: set[str], policy: Policy) -> None:
        self.engines = engines
        self.local_pods = local_pods
        self.policy = policy
        self.recorders = {name: Recorder() for name in engines}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tunnel-decider", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        poller = select.poll()
        by_fd = {}
        for name, engine in self.engines.items():
            poller.register(engine.notify_fd, select.POLLIN)
            by_fd[engine.notify_fd] = name
        while not self._stop.is_set():
            for fd, events in poller.poll(50):
                if events & select.POLLNVAL:  # that engine was stopped by the test
                    poller.unregister(fd)
                    continue
                self.handle(by_fd[fd])

    def handle(self, name: str) -> None:
        engine = self.engines[name]
        records = engine.records()
        answers = []
        for record in records:
            if isinstance(record, InboundStream):
                answers.append(decide_inbound(record, self.local_pods, self.policy).answer)
        if answers:
            engine.answer(answers)
        recorder = self.recorders[name]
        with recorder.lock:
            recorder.records.extend(records)


@dataclass
class Tunnels:
    pki: Pki
    client: TunnelEngine
    server: TunnelEngine
    decider: Decider
    listener: socket.socket

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    @property
    def client_records(self) -> Recorder:
        return self.decider.recorders["client"]

    @property
    def server_records(self) -> Recorder:
        return self.decider.recorders["server"]

    def tunnel(
        self, pod_port: int, identity: str = CLIENT_ID, peer_identity: str | None = None
    ) -> socket.socket:
        """A connected client socket whose other end the client engine tunnels to 127.0.0.1:pod_port."""
        app, captured = captured_pair()
        conn_id = next_conn_id()
        self.client.adopt(
            conn_id,
            captured.detach(),
            "127.0.0.1",
            f"127.0.0.1:{pod_port}",
            identity,
            "127.0.0.1",
            peer_port=self.port,
            peer_identity=peer_identity,
        )
        return app


def captured_pair() -> tuple[socket.socket, socket.socket]:
    """(the application's socket, the proxy's side of the same connection), on loopback."""
    with socket.socket() as acceptor:
        acceptor.bind(("127.0.0.1", 0))
        acceptor.listen(1)
        app = socket.create_connection(acceptor.getsockname(), timeout=10)
        captured, _ = acceptor.accept()
    return app, captured


_conn_ids = iter(range(1, 1 << 62))


def next_conn_id() -> int:
    return next(_conn_ids)


@contextlib.contextmanager
def tunnels(
    tmp: Path,
    policy: Policy = allow_all,
    client_credential: Credential | None = None,
    server_credential: Credential | None = None,
    settings: EngineSettings | None = None,
    pki: Pki | None = None,
) -> Iterator[Tunnels]:
    """A client engine and a server engine (listening on 127.0.0.1:<ephemeral>), certificates from a
    fresh CA unless given, and the decider; local pods: 127.0.0.1."""
    pki = pki or Pki(tmp / "ca")
    client = TunnelEngine(TRUST_DOMAIN, pki.bundle, settings)
    server = TunnelEngine(TRUST_DOMAIN, pki.bundle, settings)
    client.set_identity(CLIENT_ID, client_credential or pki.svid(CLIENT_ID))
    server.set_server_identity(server_credential or pki.svid(SERVER_NODE_ID))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    server.listen(listener)
    decider = Decider({"client": client, "server": server}, {"127.0.0.1"}, policy)
    client.start()
    server.start()
    decider.start()
    try:
        yield Tunnels(pki, client, server, decider, listener)
    finally:
        decider.stop()
        for name, engine in (("client", client), ("server", server)):
            last = engine.stop()
            with decider.recorders[name].lock:
                decider.recorders[name].records.extend(last)
        listener.close()


class PodServer:
    """A TCP server on 127.0.0.1 (the pod): `echo` echoes until EOF then closes; `sink` reads to EOF and
    answers the sha256 of what it read and the peer address it saw, then closes."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.accepted = 0
        self.peers: list[tuple[str, int]] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.peers.append(peer)
            thread = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(60)
            digest = hashlib.sha256()
            try:
                while chunk := conn.recv(262144):
                    if self.mode == "echo":
                        conn.sendall(chunk)
                    else:
                        digest.update(chunk)
                if self.mode == "sink":
                    conn.sendall(f"{digest.hexdigest()} {peer[0]}\n".encode())
            except OSError:
                return

    def close(self) -> None:
        self._closing = True
        self.sock.close()


def recv_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    parts = []
    total = 0
    while total < limit:
        chunk = sock.recv(262144)
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


class ScriptedPeer:
    """A stand-in tunnel peer on 127.0.0.1 (Python's ssl and the h2 package, SERVER_NODE_ID's SVID, client
    certificates required) whose CONNECT streams follow `actions`, one per stream in arrival order:
    "echo" answers 200 and echoes; "refuse" resets the stream with REFUSED_STREAM; "goaway" answers the
    request with GOAWAY(NO_ERROR, last stream 0); "goaway-after-data" does so at the stream's first DATA.
    After a GOAWAY the connection reads until the client closes it."""

    def __init__(self, pki: Pki, directory: Path, actions: list[str]) -> None:
        credential = pki.svid(SERVER_NODE_ID)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "peer.pem").write_bytes(credential.cert_chain_pem)
        (directory / "peer.key").write_bytes(credential.key_pem)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(directory / "peer.pem", directory / "peer.key")
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cadata=pki.bundle.decode())
        self.context.set_alpn_protocols(["h2"])
        self.actions = list(actions)
        self.requests: list[tuple[int, int, str]] = []  # (connection number, stream id, action)
        self.connections = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def _accept(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                number = self.connections
            thread = threading.Thread(target=self._serve, args=(raw, number), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _next_action(self, number: int, stream_id: int) -> str:
        with self.lock:
            action = self.actions.pop(0) if self.actions else "echo"
            self.requests.append((number, stream_id, action))
        return action

    def _serve(self, raw: socket.socket, number: int) -> None:
        import h2.config
        import h2.connection
        import h2.errors
        import h2.events
        import h2.exceptions

        raw.settimeout(10)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
                conn.initiate_connection()
                tls.sendall(conn.data_to_send())
                actions: dict[int, str] = {}
                gone_away = False
                while not gone_away and (data := tls.recv(65536)):
                    for event in conn.receive_data(data):
                        if isinstance(event, h2.events.RequestReceived):
                            action = actions[event.stream_id] = self._next_action(number, event.stream_id)
                            if action == "goaway":
                                gone_away = True
                            elif action == "refuse":
                                conn.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                            elif action == "echo":
                                conn.send_headers(event.stream_id, [(":status", "200")])
                        elif isinstance(event, h2.events.DataReceived):
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                            action = actions.get(event.stream_id, "")
                            if action == "goaway-after-data":
                                gone_away = True
                            elif action == "echo":
                                conn.send_data(event.stream_id, event.data)
                        elif (
                            isinstance(event, h2.events.StreamEnded)
                            and actions.get(event.stream_id) == "echo"
                        ):
                            conn.end_stream(event.stream_id)
                        if gone_away:
                            conn.close_connection(h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
                            break
                    tls.sendall(conn.data_to_send())
                while tls.recv(65536):  # after the GOAWAY: until the client closes
                    pass
        except (OSError, h2.exceptions.H2Error):
            return

    def close(self) -> None:
        self.sock.close()
        for thread in self._threads:
            thread.join(5)
