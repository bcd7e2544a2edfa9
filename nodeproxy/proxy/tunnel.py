"""Python side of the node-to-node mTLS tunnel (nodeproxy/_tunnel.pyx): identities, records, outbound API.

The native engine moves and encrypts every byte; Python only decides: which identity a captured
connection travels as (from its source pod address), which peer node it goes to, and whether an inbound
stream may reach a local pod (nodeproxy.proxy.inbound). Certificates come from the identity engineer's
CertManager when there is one (`TunnelEngine.follow`), or are set directly (`set_identity`).

Outbound use (the listener's cross-node path)::

    engine = TunnelEngine(trust_domain, bundle_pem)
    engine.start()
    client = TunnelClient(engine, identity_of=index.identity_of, credential_for=manager.svid_for)
    client.adopt(conn_id, fd, peer_node_ip="192.168.100.2", authority="10.244.2.100:8080",
                 source_ip="10.244.1.10")          # NoIdentity: none for that source (reset it)
    client.adopt(..., l7_checked=True)             # the HTTP engine's upstream connection: every
                                                   # request on it was checked against the
                                                   # destination's policies here
    ...
    for record in engine.records():                # when engine.notify_fd is readable
        ...                                        # StreamDone carries conn_id, ending and bytes
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol

from nodeproxy import _tunnel

# The HBONE port: every node proxy accepts tunnels here (ztunnel's number).
HBONE_PORT = 15008


class StreamEnding(IntEnum):
    """How a tunnelled stream ended (the engine's STREAM_DONE kinds)."""

    CLOSED = _tunnel.CLOSED
    PLAIN_RESET = _tunnel.PLAIN_RESET  # the pod side failed; the stream was reset
    PEER_RESET = _tunnel.PEER_RESET  # the tunnel peer reset the stream; the pod side got an RST
    # The TLS connection failed (handshake, verification, I/O); err ECONNREFUSED: the peer turned the
    # stream away unprocessed (GOAWAY, REFUSED_STREAM) after client bytes had gone out with it, or after
    # STREAM_RETRIES tries (a stream refused before sending a byte is tried again on a new connection).
    TUNNEL_FAILED = _tunnel.TUNNEL_FAILED
    REFUSED = _tunnel.REFUSED  # outbound: the peer answered non-2xx; inbound: policy denied it
    CONNECT_FAILED = _tunnel.CONNECT_FAILED  # inbound: the local pod could not be reached
    ABORTED = _tunnel.ABORTED  # the engine stopped
    LOCAL_RESOURCES = _tunnel.LOCAL_RESOURCES  # this host ran short of memory or descriptors


class InboundStream(NamedTuple):
    """A CONNECT stream that arrived over a verified mTLS connection; answer it (TunnelEngine.answer)."""

    key: int
    tls_id: int
    peer_identity: str  # the SPIFFE ID of the source workload, verified against the trust bundle
    authority: str  # "podip:port" as sent
    forwarded: str  # the `forwarded` field as sent ("for=<source ip>"), "" if absent
    peer_ip: str  # the peer node's address
    peer_port: int
    # The peer node proxy applied this destination's L7 policies to every request on the stream (the
    # CONNECT carried `x-nodeproxy-authorized: l7`); False for a plain L4 stream.
    l7_checked: bool = False


class StreamDone(NamedTuple):
    id: int  # adopt()'s conn_id (outbound) or the InboundStream key
    outbound: bool
    ending: StreamEnding
    err: int
    status: int  # the CONNECT's HTTP status (0 if none was sent or received)
    bytes_up: int  # plain side -> tunnel
    bytes_down: int  # tunnel -> plain side


class TlsFailed(NamedTuple):
    tls_id: int
    outbound: bool
    peer_ip: str
    peer_port: int
    reason: str


class TlsOpened(NamedTuple):
    tls_id: int
    outbound: bool
    peer_ip: str
    peer_port: int
    peer_identity: str


TunnelRecord = InboundStream | StreamDone | TlsFailed | TlsOpened


class InboundAnswer(NamedTuple):
    """allow: connect to dst_ip:dst_port from bind_ip (transparently; None: the node's own address);
    otherwise answer deny_status (403) and reset the stream."""

    key: int
    allow: bool
    dst_ip: str = ""
    dst_port: int = 0
    bind_ip: str | None = None
    deny_status: int = 403


def parse_record(raw: tuple[object, ...]) -> TunnelRecord:
    kind, *fields = raw
    if kind == _tunnel.INBOUND:
        return InboundStream._make(fields)
    if kind == _tunnel.STREAM_DONE:
        done = StreamDone._make(fields)
        return done._replace(ending=StreamEnding(done.ending))
    if kind == _tunnel.TLS_FAILED:
        return TlsFailed._make(fields)
    if kind == _tunnel.TLS_OPEN:
        return TlsOpened._make(fields)
    raise ValueError(f"unknown tunnel record kind {kind!r}")


class Credential(Protocol):
    """What a certificate source hands out (nodeproxy.identity.certmanager.Svid fits)."""

    @property
    def cert_chain_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...


@dataclass(frozen=True)
class PemCredential:
    """A certificate chain (leaf first) and its private key, PEM."""

    cert_chain_pem: bytes
    key_pem: bytes


class CertSource(Protocol):
    """The part of nodeproxy.identity.certmanager.CertManager the tunnel uses."""

    def trust_bundle_pem(self) -> bytes: ...

    def on_change(self, callback: Callable[[object], None]) -> Callable[[], None]: ...


@dataclass(frozen=True)
class EngineSettings:
    """Flow control and timeouts of one engine (defaults: ztunnel's HBONE pool windows and streams)."""

    stream_window: int = 4 * 1024 * 1024  # bytes a stream may have in flight towards us
    connection_window: int = 16 * 1024 * 1024  # bytes all streams of a connection may have in flight
    max_streams: int = 100  # streams per TLS connection (we announce it; the client side honours it)
    handshake_timeout: float = 10.0  # seconds for a TLS handshake, and for Python to decide a stream
    connect_timeout: float = 5.0  # seconds to reach a peer node or a local pod
    pool_idle_timeout: float = 30.0  # seconds a pooled connection without streams stays open


class TunnelEngine:
    """One native tunnel engine on its own thread, with the certificates it serves and presents."""

    def __init__(
        self, trust_domain: str, trust_bundle_pem: bytes, settings: EngineSettings | None = None
    ) -> None:
        self.settings = settings or EngineSettings()
        self.trust_domain = trust_domain
        self._bundle = trust_bundle_pem
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        s = self.settings
        self.worker = _tunnel.TunnelWorker(
            self._notify_fd,
            trust_domain,
            stream_window=s.stream_window,
            connection_window=s.connection_window,
            max_streams=s.max_streams,
            handshake_timeout_ms=round(s.handshake_timeout * 1000),
            connect_timeout_ms=round(s.connect_timeout * 1000),
            pool_idle_timeout_ms=round(s.pool_idle_timeout * 1000),
        )
        self._lock = threading.Lock()  # identities may change from a CertManager callback thread
        self._credentials: dict[str, Credential] = {}
        self._server_credential: Credential | None = None
        self._thread = threading.Thread(target=self.worker.run, name="nodeproxy-tunnel", daemon=True)
        self._unsubscribe: Callable[[], None] | None = None
        self._stopped = False

    @property
    def notify_fd(self) -> int:
        """Readable when records wait (call records())."""
        return self._notify_fd

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> list[TunnelRecord]:
        """Stop the engine (live streams are reset) and return its last records; idempotent."""
        if self._stopped:
            return []
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.worker.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        last = self.records()
        self._stopped = True
        os.close(self._notify_fd)
        return last

    def begin_draining(self) -> None:
        """The worker drains: peers are told (HTTP/2 GOAWAY) to open their next streams elsewhere, and
        this engine's own pooled connections take no new stream; every live stream flows on to its end,
        and connections close as their last stream ends. Adoptions still work (on new connections).
        Idempotent; nothing once stopped. See TunnelWorker.begin_draining."""
        if not self._stopped:
            self.worker.begin_draining()

    def records(self) -> list[TunnelRecord]:
        """The records posted since the last call (none once stopped)."""
        if self._stopped:
            return []
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._notify_fd)
        return [parse_record(raw) for raw in self.worker.drain()]

    # -- identities ---------------------------------------------------------------------------------

    def _context(self, credential: Credential, server: bool) -> _tunnel.TlsContext:
        return _tunnel.TlsContext(
            credential.cert_chain_pem, credential.key_pem, self._bundle, self.trust_domain, server
        )

    def set_identity(self, spiffe_id: str, credential: Credential) -> None:
        """Present `credential` for `spiffe_id` on connections opened from now on (rotation: existing
        connections keep their streams, take no new one, and close when those end)."""
        with self._lock:
            self.worker.set_identity(spiffe_id, self._context(credential, server=False))
            self._credentials[spiffe_id] = credential

    def has_identity(self, spiffe_id: str) -> bool:
        return self.worker.has_identity(spiffe_id)

    def set_server_identity(self, credential: Credential) -> None:
        """What the inbound side presents (the node's credential); used for connections accepted next."""
        with self._lock:
            self.worker.set_server_context(self._context(credential, server=True))
            self._server_credential = credential

    def set_trust_bundle(self, trust_bundle_pem: bytes) -> None:
        """A new trust bundle: every context is rebuilt with it (new connections verify against it)."""
        with self._lock:
            self._bundle = trust_bundle_pem
            for spiffe_id, credential in self._credentials.items():
                self.worker.set_identity(spiffe_id, self._context(credential, server=False))
            if self._server_credential is not None:
                self.worker.set_server_context(self._context(self._server_credential, server=True))

    def follow(self, source: CertSource) -> None:
        """Take certificate changes from a CertManager: new SVIDs replace the identity's context, a new
        bundle rebuilds them all. Identities are added on first use (TunnelClient)."""

        def changed(event: object) -> None:
            kind = getattr(event, "kind", None)
            spiffe_id = getattr(event, "spiffe_id", None)
            svid = getattr(event, "svid", None)
            if kind == "bundle":
                self.set_trust_bundle(source.trust_bundle_pem())
            elif (
                kind == "svid"
                and spiffe_id is not None
                and svid is not None
                and self.has_identity(str(spiffe_id))
            ):
                self.set_identity(str(spiffe_id), svid)

        self._unsubscribe = source.on_change(changed)

    # -- traffic ------------------------------------------------------------------------------------

    def listen(self, sock: socket.socket) -> None:
        """Serve inbound tunnels on a bound, listening socket (the caller keeps it open)."""
        sock.setblocking(False)
        self.worker.listen(sock.fileno())

    def stop_listening(self) -> None:
        """Accept no more tunnels on the socket given to listen(); on return the engine no longer uses
        it, so the caller may close it (a draining worker: the kernel then hands peers' new connections
        to the other sockets of its SO_REUSEPORT group). Idempotent; nothing once stopped."""
        if not self._stopped:
            self.worker.stop_listening()

    def adopt(
        self,
        conn_id: int,
        fd: int,
        peer_ip: str,
        authority: str,
        identity: str,
        source_ip: str | None,
        peer_port: int = HBONE_PORT,
        peer_identity: str | None = None,
        *,
        l7_checked: bool = False,
        announce_open: bool = False,
    ) -> None:
        """Tunnel `fd` (see TunnelWorker.adopt); the socket belongs to the engine once this returns.
        l7_checked: every request on this connection was checked against the destination's policies
        here (the HTTP engine's upstream connections), so the peer judges the stream by what its
        connection decides; False (the default) for captured L4 connections. announce_open: one 0x00
        byte to `fd` once the stream is open (the HTTP engine's connect completion)."""
        self.worker.adopt(
            conn_id,
            fd,
            peer_ip,
            peer_port,
            authority,
            identity,
            source_ip,
            peer_identity,
            l7_checked,
            announce_open,
        )

    def answer(self, answers: list[InboundAnswer]) -> None:
        self.worker.answer([tuple(a) for a in answers])  # type: ignore[misc]

    @property
    def live_streams(self) -> int:
        return self.worker.live_streams

    @property
    def tls_connections(self) -> int:
        return self.worker.tls_connections

    @property
    def closing_connections(self) -> int:
        """Connections that take no new stream and close when their last one ends."""
        return self.worker.closing_connections

    @property
    def draining(self) -> bool:
        return self.worker.draining


class NoIdentity(LookupError):
    """The source address is not a known workload of this node: it gets no certificate, no tunnel."""


class TunnelClient:
    """The outbound API: tunnel a captured connection as its source workload's identity.

    identity_of(source_ip) gives the SPIFFE ID of a local pod (nodeproxy.identity.config.WorkloadIndex's
    local_identity_of bound to this node, or a plain mapping's get); credential_for(spiffe_id) gives its
    current certificate (CertManager.svid_for) the first time an identity is used; afterwards the engine
    follows rotations (TunnelEngine.follow).
    """

    def __init__(
        self,
        engine: TunnelEngine,
        identity_of: Callable[[str], object | None],
        credential_for: Callable[[str], Credential],
        peer_port: int = HBONE_PORT,
    ) -> None:
        self.engine = engine
        self._identity_of = identity_of
        self._credential_for = credential_for
        self.peer_port = peer_port

    def identity(self, source_ip: str) -> str:
        """The SPIFFE ID connections from source_ip travel as; NoIdentity if it has none."""
        found = self._identity_of(source_ip)
        if found is None:
            raise NoIdentity(f"{source_ip} is not a workload of this node")
        spiffe_id = str(found)
        if not self.engine.has_identity(spiffe_id):
            self.engine.set_identity(spiffe_id, self._credential_for(spiffe_id))
        return spiffe_id

    def adopt(
        self,
        conn_id: int,
        fd: int,
        peer_node_ip: str,
        authority: str,
        source_ip: str,
        peer_identity: str | None = None,
        *,
        l7_checked: bool = False,
        announce_open: bool = False,
    ) -> None:
        """Tunnel client socket `fd` (from the source pod at source_ip) to `authority` ("podip:port") on
        the node at peer_node_ip. Raises NoIdentity (or the credential source's error) with fd still the
        caller's; otherwise fd belongs to the engine and a StreamDone with conn_id follows.
        l7_checked: see TunnelEngine.adopt (True only for a connection whose every request this node
        checked against the destination's policies as source_ip's workload); announce_open: see
        TunnelEngine.adopt."""
        identity = self.identity(source_ip)
        self.engine.adopt(
            conn_id,
            fd,
            peer_node_ip,
            authority,
            identity,
            source_ip,
            self.peer_port,
            peer_identity,
            l7_checked=l7_checked,
            announce_open=announce_open,
        )
