"""The daemon's node-to-node mTLS: a worker's certificates, tunnel engine and inbound listeners.

One :class:`MeshWorker` per worker process (nodeproxy.daemon.Worker) when the config has `mesh`:

- a CertManager (nodeproxy.identity.certmanager) holding this node's workload SVIDs, renewed at half
  life; only worker 0 renews the node credential files (the others re-read them when they change: the
  CA client reads them per request), so N workers do not rewrite one file N times;
- a TunnelEngine (nodeproxy.proxy.tunnel) on its own native thread, following the CertManager's
  rotations and trust bundle changes, presenting the node credential on its inbound side;
- the HBONE listener (0.0.0.0:mesh.hbone_port, transparent, SO_REUSEPORT: every worker has its own, as
  for the outbound listener, and the kernel spreads peers' tunnels over them);
- the plaintext inbound listener (mesh.inbound_port on listeners.outbound's address): connections for
  local pods from elsewhere, captured by InboundPlan; PERMISSIVE/STRICT and the policies decide, the
  outbound listener's relay carries what is allowed (from the caller's own address);
- the mesh entry (nodeproxy.proxy.mesh_entry, loopback, ephemeral port): the HTTP engine's upstream
  connections to pods on peer nodes, adopted into the tunnel like captured L4 connections
  (:meth:`MeshWorker.http_path` tells the HTTP engine which endpoints go that way).

Why one engine per worker and not one per daemon: a worker is a process (descriptor limits are per
process) and the engine adopts the client socket the worker accepted; sockets cannot move to another
process without SCM_RIGHTS per connection. Each worker's engine pools its own tunnel connections per peer
and identity (at most workers x peers x identities TLS connections).

The decisions are pure functions of a :class:`MeshDirectory` (one per config snapshot):
:meth:`MeshDirectory.outbound_path` says whether a captured connection goes into the tunnel, plain, or
is refused; nodeproxy.proxy.inbound decides inbound streams with the authorization engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import structlog

from nodeproxy import _fastpath
from nodeproxy.authz.engine import AuthzEngine, compile_authz, workloads_on_node
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.peer import CompiledPeerAuthentication, compile_peer_authentication
from nodeproxy.authz.policy import L4Request, Workload
from nodeproxy.config import Config, MeshConfig
from nodeproxy.identity.certmanager import CertManager, NoSvid
from nodeproxy.identity.spiffeid import SpiffeId
from nodeproxy.proxy.inbound import (
    STATUS_DENIED,
    InboundDecision,
    Verdict,
    authz_policy,
    decide_inbound,
    decide_plaintext,
    parse_authority,
    parse_forwarded_for,
)
from nodeproxy.proxy.mesh_entry import EntryHeader, MeshEntry
from nodeproxy.proxy.tunnel import (
    EngineSettings,
    InboundAnswer,
    InboundStream,
    PemCredential,
    StreamDone,
    TlsFailed,
    TunnelClient,
    TunnelEngine,
)

if TYPE_CHECKING:
    from nodeproxy.balance import Endpoint
    from nodeproxy.proxy.listener import OutboundListener

log = structlog.get_logger("nodeproxy.mesh")

ACCEPT_BATCH = 128
# Seconds a worker waits at start for its first SVIDs (each CA request has identity.ca.timeout on top
# of it being parallel); past it the worker serves anyway and connections from a source without an SVID
# yet are refused until the renewal loop gets one.
FIRST_SVIDS_TIMEOUT = 15.0


def node_identity(trust_domain: str, node: str) -> str:
    """The SPIFFE ID a node proxy presents on its tunnel port (its node credential)."""
    return str(SpiffeId.for_node(trust_domain, node))


class TunnelTo(NamedTuple):
    """Send the connection through the tunnel to `peer_ip` as `identity` (the source workload)."""

    peer_node: str
    peer_ip: str
    peer_identity: str  # the only identity the peer's tunnel port may present
    identity: str


class InboundStreamInfo(NamedTuple):
    source_ip: str | None
    peer_identity: str
    authority: str
    started: float


# Access-log flags of inbound stream endings (the pod could not be reached: UF; reset by the proxy: LR).
INBOUND_FLAGS: dict[str, str] = {
    "CLOSED": "-",
    "PLAIN_RESET": "UR",  # the pod reset it
    "PEER_RESET": "-",  # the caller reset it
    "TUNNEL_FAILED": "UR",  # the tunnel connection to the caller failed
    "CONNECT_FAILED": "UF",
    "ABORTED": "LR",
    "LOCAL_RESOURCES": "LR",
}


class MeshRefusal(NamedTuple):
    reason: str


OutboundPath = TunnelTo | MeshRefusal | None  # None: not the mesh's business, relay it as before


@dataclass(frozen=True)
class MeshDirectory:
    """Who is where, for one config snapshot: pure lookups, no I/O."""

    node: str
    trust_domain: str
    peers: dict[str, str]  # peer node -> underlay address
    workload_nodes: dict[str, str]  # pod IP -> node, every node's workloads
    local_identities: dict[str, str]  # pod IP -> SPIFFE ID, this node's workloads
    workload_identities: dict[str, str]  # pod IP -> SPIFFE ID, every node's workloads
    destination_workloads: dict[str, Workload]  # pod IP -> Workload, every node's (their STRICT mode)
    peer_authentication: CompiledPeerAuthentication
    endpoint_nodes: dict[str, str]  # endpoint IP -> its node, from the services' endpoints (`node`)
    # (pod IP, port) of this node's pods that serve an http, http2 or grpc service port -> HTTP/2 or not:
    # where a plaintext caller can be judged per request (MeshWorker._on_plaintext).
    inbound_http: dict[tuple[str, int], bool]

    @classmethod
    def build(cls, config: Config) -> MeshDirectory:
        identity, mesh = config.identity, config.mesh
        if identity is None or mesh is None:
            raise ValueError("the mesh needs the identity and mesh sections")
        node = config.node.name
        index = identity.workload_index()
        return cls(
            node=node,
            trust_domain=identity.trust_domain,
            peers={name: str(address) for name, address in mesh.peers.items()},
            workload_nodes={str(w.ip): w.node for w in identity.workloads},
            local_identities={str(w.ip): str(w.spiffe_id) for w in index.by_ip.values() if w.node == node},
            workload_identities={str(w.ip): str(w.spiffe_id) for w in index.by_ip.values()},
            destination_workloads={
                str(w.ip): Workload.of(w.namespace, w.service_account, w.labels) for w in identity.workloads
            },
            peer_authentication=compile_peer_authentication(config.authz.peer_authentication),
            endpoint_nodes={
                str(e.address): e.node for service in config.services for e in service.endpoints if e.node
            },
            inbound_http=inbound_http_ports(config, node, {str(w.ip): w.node for w in identity.workloads}),
        )

    @property
    def local_pods(self) -> frozenset[str]:
        return frozenset(ip for ip, node in self.workload_nodes.items() if node == self.node)

    def identity_of(self, source_ip: str) -> str | None:
        """The identity of a pod of this node (what its connections travel as), else None."""
        return self.local_identities.get(source_ip)

    def workload_identity(self, pod_ip: str) -> str | None:
        """The identity of a pod on any node, else None."""
        return self.workload_identities.get(pod_ip)

    def forged_source(self, peer_identity: str, source_ip: str | None, peer_ip: str) -> str | None:
        """Why an inbound stream's claimed source cannot be right, or None if it can.

        The pod is reached from the source address the peer names (`forwarded`), which policies (ip
        blocks) and the pod trust: a peer may name only a pod that has the identity the peer proved,
        and only from the node that pod runs on (when that node is a known peer). Without a named
        source the pod is reached from this node's own address: nothing to check."""
        if source_ip is None:
            return None
        owner = self.workload_identities.get(source_ip)
        if owner != peer_identity:
            return f"the stream names source {source_ip}, which is not a pod of {peer_identity}"
        node_ip = self.peers.get(self.workload_nodes.get(source_ip, ""))
        if node_ip is not None and node_ip != peer_ip:
            return f"source {source_ip} runs on the node at {node_ip}, not at {peer_ip}"
        return None

    def outbound_path(
        self, source_ip: str, destination_ip: str, destination_port: int, endpoint_node: str | None
    ) -> OutboundPath:
        """Where a captured connection to destination_ip:port goes.

        The destination's node is the endpoint's (`Endpoint.node`) or, for a pod addressed directly,
        the identity config's. On this node or on a node that is not a peer: None (the plain relay, as
        before the mesh). On a peer: the tunnel when the source pod has an identity; without one, plain
        when the destination accepts plaintext (PERMISSIVE), refused when it is STRICT (its node would
        refuse it anyway: better a reset here than a connection that dies at the peer)."""
        node = endpoint_node or self.workload_nodes.get(destination_ip)
        if node is None or node == self.node:
            return None
        peer_ip = self.peers.get(node)
        if peer_ip is None:
            return None
        identity = self.local_identities.get(source_ip)
        if identity is not None:
            return TunnelTo(node, peer_ip, node_identity(self.trust_domain, node), identity)
        decision = self.peer_authentication.plaintext(
            self.destination_workloads.get(destination_ip), destination_port
        )
        if decision.accepted:
            return None
        return MeshRefusal(f"source {source_ip} has no identity and {destination_ip}: {decision.reason}")


def inbound_http_ports(
    config: Config, node: str, workload_nodes: Mapping[str, str]
) -> dict[tuple[str, int], bool]:
    """(pod IP, port) -> speaks HTTP/2, for the endpoints on `node` (by their `node`, else the identity
    inventory's) of service ports whose protocol is http, http2 or grpc (`auto` is not known to be HTTP).
    Two services that disagree about a pod's port: HTTP/1.1 wins, which every HTTP server speaks."""
    ports: dict[tuple[str, int], bool] = {}
    for service in config.services:
        for port in service.ports:
            protocol = port.resolved_protocol
            if protocol not in ("http", "http2", "grpc"):
                continue
            for endpoint in service.endpoints:
                address = str(endpoint.address)
                if (endpoint.node or workload_nodes.get(address)) != node:
                    continue
                key = (address, port.backend_port)
                ports[key] = ports.get(key, True) and protocol != "http"
    return ports


def engine_settings(mesh: MeshConfig) -> EngineSettings:
    return EngineSettings(
        stream_window=mesh.stream_window,
        connection_window=mesh.connection_window,
        max_streams=mesh.max_streams,
        handshake_timeout=mesh.handshake_timeout,
        connect_timeout=mesh.connect_timeout,
        pool_idle_timeout=mesh.pool_idle_timeout,
    )


def _file_stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class MeshWorker:
    """The mesh side of one worker process; see the module docstring."""

    def __init__(self, config: Config, worker_index: int, listener: OutboundListener) -> None:
        identity, mesh = config.identity, config.mesh
        if identity is None or mesh is None:
            raise ValueError("MeshWorker needs the identity and mesh sections")
        self.config = config
        self.index = worker_index
        self.listener = listener
        self.directory = MeshDirectory.build(config)
        self.refresher = JwksRefresher()
        self.authz = self._compile_authz(config)
        self.http_authz = self._compile_http_authz(config)
        # Only worker 0 renews the node credential files (the CA client of every worker reads them).
        self.certs = CertManager.from_config(
            identity, config.node.name, renew_node_credential=worker_index == 0
        )
        self.engine = TunnelEngine(
            identity.trust_domain, self.certs.trust_bundle_pem(), engine_settings(mesh)
        )
        self.client = TunnelClient(
            self.engine,
            lambda source_ip: self.directory.identity_of(source_ip),
            lambda spiffe_id: self.certs.svid_for(SpiffeId.parse(spiffe_id)),
            peer_port=mesh.hbone_port,
        )
        assert identity.node_credential is not None  # CertManager.from_config checked it
        self._node_files = (identity.node_credential.cert, identity.node_credential.key)
        self._node_stamp: tuple[int, int, int, int] | None = None
        self.hbone_sock: socket.socket | None = None
        self.inbound_sock: socket.socket | None = None
        self.entry = MeshEntry(self._adopt_from_entry)
        self._entry_streams: dict[int, float] = {}  # entry conn id -> when it was adopted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._spiffe_ids: dict[str, SpiffeId] = {}  # parsed once per identity, not per connection
        self._inbound: dict[int, InboundStreamInfo] = {}  # allowed inbound streams, by engine key
        self.inbound_allowed = 0
        self.inbound_denied = 0
        self.tls_failures = 0

    def _compile_authz(self, config: Config) -> AuthzEngine:
        identity = config.identity
        assert identity is not None
        labels = {str(w.ip): w.labels for w in identity.workloads}
        local = workloads_on_node(identity.workloads, config.node.name, labels)
        return compile_authz(config.authz, self.refresher, local)

    def _compile_http_authz(self, config: Config) -> AuthzEngine:
        """The engine the HTTP engine asks per request (nodeproxy/proxy/http.py): the same policies and
        JWT rules, over the workloads of every node, because a request is checked against the workload
        of the endpoint it is about to reach, wherever that runs (the tunnel's inbound check stays L4)."""
        identity = config.identity
        assert identity is not None
        everywhere = {
            str(w.ip): Workload.of(w.namespace, w.service_account, w.labels) for w in identity.workloads
        }
        return compile_authz(config.authz, self.refresher, everywhere)

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """First SVIDs (bounded), the server credential, the listeners, the engine thread."""
        from nodeproxy.proxy.listener import open_listener

        mesh = self.config.mesh
        assert mesh is not None
        self._loop = loop
        try:
            await asyncio.wait_for(self.certs.refresh_due(), FIRST_SVIDS_TIMEOUT)
        except TimeoutError:
            log.error("first SVIDs not obtained in time; serving, renewals go on", worker=self.index)
        self._load_server_credential()
        self.engine.follow(self.certs)
        # Transparent (open_listener): inbound capture hands it tunnels addressed to pod ip:15008 too.
        self.hbone_sock = open_listener(("0.0.0.0", mesh.hbone_port), backlog=4096)
        self.engine.listen(self.hbone_sock)
        self.inbound_sock = open_listener((str(self.config.listeners.outbound.host), mesh.inbound_port))
        self.inbound_sock.setblocking(False)
        self.engine.start()
        loop.add_reader(self.engine.notify_fd, self._on_records)
        loop.add_reader(self.inbound_sock.fileno(), self._on_plaintext)
        self.entry.start(loop)
        self._tasks = [
            loop.create_task(self.certs.run(), name="nodeproxy-certs"),
            loop.create_task(self.refresher.run(), name="nodeproxy-jwks"),
            loop.create_task(self._watch_node_credential(), name="nodeproxy-node-credential"),
        ]
        log.info(
            "mesh serving",
            worker=self.index,
            hbone_port=mesh.hbone_port,
            inbound_port=mesh.inbound_port,
            identities=sorted(str(i) for i in self.certs.identities()),
            peers=self.directory.peers,
        )

    def apply_config(self, config: Config) -> None:
        """A reload: peers, workloads and policies (the restart-only fields are checked by the daemon)."""
        identity = config.identity
        assert identity is not None and config.mesh is not None
        self.directory = MeshDirectory.build(config)
        self.authz = self._compile_authz(config)
        self.http_authz = self._compile_http_authz(config)
        self.certs.apply_config(identity, config.node.name)
        self.config = config

    def stop_accepting(self) -> None:
        """Draining: no new plaintext inbound connections; peers are told (GOAWAY) to open their next
        streams elsewhere (a successor after an upgrade), and the streams already open flow on."""
        self.engine.begin_draining()
        # Out of the SO_REUSEPORT group, as the outbound listener: new peer connections go to the
        # successor (an upgrade) or nowhere, not to a process about to exit.
        self.engine.stop_listening()  # from here on the engine never touches the socket
        if self.hbone_sock is not None:
            self.hbone_sock.close()
            self.hbone_sock = None
        if self.inbound_sock is not None and self._loop is not None:
            self._loop.remove_reader(self.inbound_sock.fileno())
            self.inbound_sock.close()
            self.inbound_sock = None

    def close(self) -> None:
        """Stop the engine (live streams are reset); their last records go to the listener."""
        self.stop_accepting()
        self.entry.close()
        for task in self._tasks:
            task.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self.engine.notify_fd)
        for record in self.engine.stop():
            if isinstance(record, StreamDone) and record.outbound:
                self._outbound_done(record)

    @property
    def live_streams(self) -> int:
        return self.engine.live_streams

    def certificate_expiry(self) -> Iterable[tuple[str, float]]:
        """(SPIFFE ID, notAfter as Unix time) of every SVID this worker holds, for the metrics."""
        for spiffe_id in self.certs.identities():
            with contextlib.suppress(NoSvid):
                yield str(spiffe_id), self.certs.svid_for(spiffe_id).not_after.timestamp()

    # -- certificates -----------------------------------------------------------------------------------

    def _load_server_credential(self) -> None:
        cert, key = self._node_files
        stamp = _file_stamp(cert)
        if stamp == self._node_stamp:
            return
        self.engine.set_server_identity(PemCredential(cert.read_bytes(), key.read_bytes()))
        self._node_stamp = stamp
        log.info("tunnel server credential loaded", worker=self.index, cert=str(cert))

    async def _watch_node_credential(self) -> None:
        """Present the node credential the files hold now (worker 0 or an operator renews them)."""
        identity = self.config.identity
        assert identity is not None
        while True:
            await asyncio.sleep(identity.watch_interval)
            try:
                self._load_server_credential()
            except (OSError, ValueError) as err:  # half-written: keep the loaded one, look again later
                log.error("node credential files unusable; keeping the loaded one", error=str(err))

    # -- outbound ---------------------------------------------------------------------------------------

    def adopt(
        self,
        conn_id: int,
        fd: int,
        path: TunnelTo,
        authority: str,
        source_ip: str,
        l7_checked: bool = False,
        announce_open: bool = False,
    ) -> None:
        """Tunnel client socket `fd`; raises (LookupError: no identity or SVID; OSError) with fd still
        the caller's, else fd is the engine's and a StreamDone with conn_id follows. l7_checked: the
        HTTP engine applied the destination's policies to every request on it; announce_open: it waits
        for one 0x00 byte that says the stream is open (both: the mesh entry's connections)."""
        # The engine keeps presenting the last certificate it was given for an identity; one that expired
        # without a renewal (CA unreachable) would only fail the peer's handshake, so refuse here, saying
        # why (NoSvid).
        spiffe_id = self._spiffe_ids.get(path.identity)
        if spiffe_id is None:
            spiffe_id = self._spiffe_ids[path.identity] = SpiffeId.parse(path.identity)
        self.certs.svid_for(spiffe_id)
        self.client.adopt(
            conn_id,
            fd,
            path.peer_ip,
            authority,
            source_ip,
            path.peer_identity,
            l7_checked=l7_checked,
            announce_open=announce_open,
        )

    # -- the HTTP engine's way in ------------------------------------------------------------------------

    def http_path(self, source_ip: str, endpoint: Endpoint) -> bool | str:
        """For the HTTP engine (HttpProxy.use_mesh), per attempt: True to send the request to `endpoint`
        through the tunnel (via the mesh entry), False to connect to it directly, or why it is refused."""
        path = self.directory.outbound_path(source_ip, endpoint.address, endpoint.port, endpoint.node)
        if path is None:
            return False
        if isinstance(path, MeshRefusal):
            return path.reason
        return True

    def identity_of(self, source_ip: str) -> str | None:
        """The SPIFFE ID a pod of this node travels as (the current snapshot's), else None."""
        return self.directory.identity_of(source_ip)

    def _adopt_from_entry(self, entry_id: int, fd: int, header: EntryHeader) -> str | None:
        """A connection from the HTTP engine arrived at the entry: into the tunnel (None), or the reason
        it cannot go (the entry resets it; the engine sees a failed attempt and may retry elsewhere)."""
        directory = self.directory
        destination, port = header.destination_ip, header.destination_port
        path = directory.outbound_path(
            header.source_ip, destination, port, directory.endpoint_nodes.get(destination)
        )
        if not isinstance(path, TunnelTo):  # a reload moved the endpoint meanwhile, or a refusal
            return path.reason if path is not None else f"{destination} is no longer on a peer node"
        try:
            self.adopt(
                entry_id,
                fd,
                path,
                f"{destination}:{port}",
                header.source_ip,
                l7_checked=True,
                announce_open=True,
            )
        except (LookupError, ValueError, OSError) as err:
            return f"cannot tunnel to {path.peer_node}: {err}"
        self._entry_streams[entry_id] = time.monotonic()
        return None

    def _outbound_done(self, record: StreamDone) -> None:
        """An outbound stream ended: the HTTP engine's (its requests are logged by the engine; only a
        stream that never opened is worth a line) or the listener's."""
        started = self._entry_streams.pop(record.id, None)
        if started is None:
            self.listener.tunnel_done(record)
            return
        if record.ending.name in ("TUNNEL_FAILED", "CONNECT_FAILED", "REFUSED"):
            log.warning(
                "tunnel stream for the HTTP engine failed",
                ending=record.ending.name,
                status=record.status,
                seconds=round(time.monotonic() - started, 3),
            )

    # -- records and inbound ----------------------------------------------------------------------------

    def _on_records(self) -> None:
        answers = []
        policy = authz_policy(self.authz)
        local_pods = self.directory.local_pods
        for record in self.engine.records():
            try:
                if isinstance(record, InboundStream):
                    forged = self.directory.forged_source(
                        record.peer_identity, parse_forwarded_for(record.forwarded), record.peer_ip
                    )
                    decision = (
                        InboundDecision(
                            InboundAnswer(record.key, False, deny_status=STATUS_DENIED), forged, None
                        )
                        if forged is not None
                        else decide_inbound(record, local_pods, policy)
                    )
                    answers.append(decision.answer)
                    if decision.answer.allow:
                        self.inbound_allowed += 1
                        self._inbound[record.key] = InboundStreamInfo(
                            decision.source_ip, record.peer_identity, record.authority, time.monotonic()
                        )
                    else:
                        self.inbound_denied += 1
                    (log.info if decision.answer.allow else log.warning)(
                        "tunnel stream",
                        allowed=decision.answer.allow,
                        peer_identity=record.peer_identity,
                        authority=record.authority,
                        source_ip=decision.source_ip,
                        peer_node=record.peer_ip,
                        l7_checked=record.l7_checked,
                        reason=decision.reason,
                    )
                elif isinstance(record, StreamDone):
                    if record.outbound:
                        self._outbound_done(record)
                    else:
                        self._inbound_done(record)
                elif isinstance(record, TlsFailed):
                    self.tls_failures += 1
                    log.warning(
                        "tunnel TLS failed",
                        outbound=record.outbound,
                        peer=f"{record.peer_ip}:{record.peer_port}",
                        reason=record.reason,
                    )
            except Exception:  # one record's failure must not lose the answers of the others
                log.exception("tunnel record handling failed", record=repr(record))
        if answers:
            self.engine.answer(answers)

    def _inbound_done(self, record: StreamDone) -> None:
        """An allowed inbound stream ended: one access-log record, like the listener's (src: the source
        pod, port unknown: 0; ending inbound_<ending>). Denied streams were logged when decided."""
        info = self._inbound.pop(record.id, None)
        if info is None:
            return
        access_log = self.listener.access_log
        ending = record.ending.name
        flag = INBOUND_FLAGS.get(ending, "LR")
        if not (access_log.info_enabled if flag == "-" else access_log.warning_enabled):
            return
        target = parse_authority(info.authority)
        fields = access_log.connection_fields(
            record.id,
            (info.source_ip or "unknown", 0),
            target or (info.authority, 0),
            None,
            target,
            source_identity=info.peer_identity or None,
            destination_identity=self.directory.workload_identity(target[0]) if target else None,
        )
        # The record's "up" is the pod side towards the tunnel: for the caller it is what came back.
        access_log.closed(
            fields,
            f"inbound_{ending.lower()}",
            record.err,
            record.bytes_down,
            record.bytes_up,
            (time.monotonic() - info.started) * 1000,
            1,
            flag,
        )

    def _on_plaintext(self) -> None:
        sock = self.inbound_sock
        if sock is None:
            return
        try:
            batch = _fastpath.accept_batch(sock.fileno(), ACCEPT_BATCH)
        except OSError as err:
            log.error("inbound accept failed", error=str(err))
            return
        policy = authz_policy(self.authz)
        local_pods = self.directory.local_pods
        inbound_http = self.directory.inbound_http
        started = time.monotonic()
        for fd, src_ip, src_port, dst_ip, dst_port in batch:
            http2 = inbound_http.get((dst_ip, dst_port))
            if http2 is not None and dst_ip in local_pods and self.authz.decides_per_request(dst_ip):
                # Its policies need the requests (JWT, L7 rules): the HTTP engine checks each one. The
                # connection must pass peer authentication (STRICT refuses it) and what of the policies
                # a connection decides (no ALLOW rule could match a caller without principal: refused).
                checked = self.authz.check_connection(L4Request(src_ip, None, dst_ip, dst_port), http=True)
                verdict = Verdict(checked.allowed, checked.reason)
                if verdict.allowed:
                    if self.listener.http_inbound(fd, src_ip, src_port, dst_ip, dst_port, http2):
                        self.inbound_allowed += 1
                        continue
                    verdict = Verdict(False, "the HTTP engine could not take it")
            else:
                verdict = decide_plaintext(src_ip, dst_ip, dst_port, local_pods, policy)
            if not verdict.allowed:
                self.inbound_denied += 1
                _fastpath.reset_and_close(fd)
                log.warning(
                    "plaintext inbound refused",
                    source=f"{src_ip}:{src_port}",
                    destination=f"{dst_ip}:{dst_port}",
                    reason=verdict.reason,
                )
                continue
            self.inbound_allowed += 1
            self.listener.relay_inbound(fd, src_ip, src_port, dst_ip, dst_port, started)
        self.listener.wake_relays()
