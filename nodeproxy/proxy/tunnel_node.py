"""A node proxy for cross-node traffic: outbound capture into the mTLS tunnel, inbound tunnel to pods.

`python -m nodeproxy.proxy.tunnel_node CONFIG.json` runs in a node's network namespace until SIGTERM or
SIGINT; SIGHUP re-reads the certificate files (rotation). It is the tunnel's integration as one
process, used by the two-node lab tests and bench/tunnel.py (the daemon's own listener will route
cross-node connections into TunnelClient the same way):

- outbound: the capture rules of nodeproxy.capture (TPROXY from the pod interfaces to `outbound`); a
  connection to a pod of a peer node goes into the tunnel to that node's 15008 as the source pod's
  identity (mode "tunnel"), or through the L4 splice relay straight to the pod, transparently (mode
  "plain", the baseline of the bench); anything else is relayed to its original destination.
- inbound: 15008 (mTLS) for tunnels; each stream is decided by nodeproxy.proxy.inbound (local pods only,
  then the policy) and connected to the pod from the original source address.

- inbound capture (`inbound_capture: true`): connections for local pods that come from elsewhere are
  taken (nodeproxy.capture's InboundPlan): plaintext to `inbound` (15006), where `plaintext`
  (PERMISSIVE, the default, or STRICT) and the policy decide, then the L4 relay connects to the pod from
  the caller's address; HBONE addressed to a pod (podip:15008) to the tunnel listener.

Config (JSON): node, trust_domain, mode, outbound ("ip:port"), hbone ("ip:port"; transparent, so
0.0.0.0:15008 also takes tunnels addressed to pods), inbound ("ip:port", default 127.0.0.1:15006),
inbound_capture, plaintext, pod_cidrs, pod_interfaces, local_pods, bundle / node_cert / node_key (PEM
paths), workloads ({pod ip: {spiffe_id, cert, key}}: the credentials of this node's workloads),
workload_identities ({pod ip: spiffe_id} of every node, optional: checks `forwarded`), peers
([{cidr, node_ip, identity, via_pod}]), and deny_principals (SPIFFE IDs the inbound policy refuses; the
authorization engineer's policies plug in through the same hook). Events go to stdout as JSON lines.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeproxy import _fastpath
from nodeproxy.capture import CapturePlan, InboundPlan, install, remove
from nodeproxy.proxy.inbound import (
    InboundRequest,
    Verdict,
    decide_inbound,
    decide_plaintext,
    with_peer_authentication,
)
from nodeproxy.proxy.listener import open_listener
from nodeproxy.proxy.relay import Ending, RelayPool
from nodeproxy.proxy.tunnel import (
    InboundStream,
    NoIdentity,
    PemCredential,
    StreamDone,
    TlsFailed,
    TlsOpened,
    TunnelClient,
    TunnelEngine,
)

CONNECT_TIMEOUT_MS = 1000  # the L4 relay's connect timeout (plain mode and passthrough)


@dataclass(frozen=True)
class Peer:
    network: ipaddress.IPv4Network
    node_ip: str
    identity: str | None
    via_pod: bool  # tunnel to the destination pod's own address (podip:15008, ztunnel's way), not the node's


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


_pending_events: list[str] = []


def emit(event: str, **fields: object) -> None:
    """Queue one JSON line; flush_events() writes what a loop iteration queued with one write()."""
    _pending_events.append(json.dumps({"event": event, **fields}) + "\n")


def flush_events() -> None:
    if _pending_events:
        sys.stdout.write("".join(_pending_events))
        sys.stdout.flush()
        _pending_events.clear()


class TunnelNode:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.mode = config["mode"]
        if self.mode not in ("tunnel", "plain"):
            raise ValueError(f"mode must be tunnel or plain, not {self.mode!r}")
        self.local_pods = frozenset(config["local_pods"])
        self.peers = [
            Peer(ipaddress.IPv4Network(p["cidr"]), p["node_ip"], p.get("identity"), p.get("via_pod", False))
            for p in config["peers"]
        ]
        self.deny = frozenset(config.get("deny_principals", ()))
        self.checked_policy = with_peer_authentication(self.policy, config.get("plaintext", "PERMISSIVE"))
        inbound_address = _address(config.get("inbound", "127.0.0.1:15006"))
        workloads = config["workloads"]
        self.workload_ids = {ip: w["spiffe_id"] for ip, w in workloads.items()}
        self.workload_files = {w["spiffe_id"]: (w["cert"], w["key"]) for w in workloads.values()}
        # Every workload of the mesh (pod IP -> SPIFFE ID), when known: a tunnel's `forwarded` source
        # address must then be a pod of the identity the peer verified.
        everyone: dict[str, str] | None = config.get("workload_identities")
        self.identity_of = everyone.get if everyone is not None else None
        bundle = Path(config["bundle"]).read_bytes()
        self.engine = TunnelEngine(config["trust_domain"], bundle)
        self.engine.set_server_identity(
            PemCredential(Path(config["node_cert"]).read_bytes(), Path(config["node_key"]).read_bytes())
        )
        self.client = TunnelClient(self.engine, self.workload_ids.get, self._credential)
        self.relay = RelayPool(1, 1 << 20)
        self.plan = CapturePlan(
            pod_cidrs=tuple(config["pod_cidrs"]),
            pod_interfaces=tuple(config["pod_interfaces"]),
            listen_ip=_address(config["outbound"])[0],
            listen_port=_address(config["outbound"])[1],
            mark=0x539,
            mask=0xFFF,
            table=133,
            rule_priority=100,
            chain_prefix="NODEPROXY",
            inbound=InboundPlan(tuple(config["pod_cidrs"]), inbound_address[0], inbound_address[1])
            if config.get("inbound_capture")
            else None,
        )
        self.outbound = open_listener(_address(config["outbound"]))
        self.outbound.setblocking(False)
        self.inbound = open_listener(inbound_address)
        self.inbound.setblocking(False)
        # Transparent: with inbound capture, TPROXY hands it tunnels addressed to pod ip:15008 as well.
        self.hbone = open_listener(_address(config["hbone"]), backlog=4096)
        self.next_id = 0
        self.pending: dict[int, dict[str, object]] = {}
        self.stopping = False
        self.reload_due = False

    def reload_certificates(self) -> None:
        """SIGHUP: re-read the node's and the workloads' certificate files (rotation). New connections use
        them; established ones keep their streams until those end."""
        try:
            self.engine.set_server_identity(
                PemCredential(
                    Path(self.config["node_cert"]).read_bytes(), Path(self.config["node_key"]).read_bytes()
                )
            )
            for spiffe_id in self.workload_files:
                if self.engine.has_identity(spiffe_id):
                    self.engine.set_identity(spiffe_id, self._credential(spiffe_id))
        except (OSError, ValueError) as err:
            emit("reload_failed", error=str(err))  # the certificates in use stay
            return
        emit("reloaded")

    def _credential(self, spiffe_id: str) -> PemCredential:
        cert, key = self.workload_files[spiffe_id]
        return PemCredential(Path(cert).read_bytes(), Path(key).read_bytes())

    def policy(self, request: InboundRequest) -> Verdict:
        if request.source_principal in self.deny:
            return Verdict(False, f"{request.source_principal} is denied")
        return Verdict(True, "allowed")

    def on_plaintext(self) -> None:
        try:
            batch = _fastpath.accept_batch(self.inbound.fileno(), 128)
        except OSError as err:
            emit("accept_failed", error=str(err))
            return
        for fd, src_ip, src_port, dst_ip, dst_port in batch:
            self.next_id += 1
            conn_id = self.next_id
            verdict = decide_plaintext(src_ip, dst_ip, dst_port, self.local_pods, self.checked_policy)
            info: dict[str, object] = {
                "source": f"{src_ip}:{src_port}",
                "destination": f"{dst_ip}:{dst_port}",
                "path": "inbound",
            }
            emit("plaintext_inbound", conn_id=conn_id, allowed=verdict.allowed, reason=verdict.reason, **info)
            if not verdict.allowed:
                _fastpath.reset_and_close(fd)
                continue
            self.pending[conn_id] = info
            try:
                self.relay.next_worker().connect(
                    conn_id, fd, dst_ip, dst_port, CONNECT_TIMEOUT_MS, bind_ip=src_ip, client_prepared=True
                )
            except OSError as err:
                emit("refused", conn_id=conn_id, reason=str(err), **self.pending.pop(conn_id))
                _fastpath.reset_and_close(fd)
        self.relay.workers[0].wake()

    def peer_for(self, ip: str) -> Peer | None:
        address = ipaddress.IPv4Address(ip)
        return next((p for p in self.peers if address in p.network), None)

    # -- events ---------------------------------------------------------------------------------------

    def on_accept(self) -> None:
        try:
            batch = _fastpath.accept_batch(self.outbound.fileno(), 128)
        except OSError as err:
            emit("accept_failed", error=str(err))
            return
        for fd, src_ip, src_port, dst_ip, dst_port in batch:
            self.next_id += 1
            conn_id = self.next_id
            self.pending[conn_id] = {"source": f"{src_ip}:{src_port}", "destination": f"{dst_ip}:{dst_port}"}
            peer = self.peer_for(dst_ip)
            try:
                if peer is not None and self.mode == "tunnel":
                    endpoint = dst_ip if peer.via_pod else peer.node_ip
                    self.client.adopt(conn_id, fd, endpoint, f"{dst_ip}:{dst_port}", src_ip, peer.identity)
                    self.pending[conn_id]["path"] = "tunnel"
                else:
                    worker = self.relay.next_worker()
                    worker.connect(
                        conn_id,
                        fd,
                        dst_ip,
                        dst_port,
                        CONNECT_TIMEOUT_MS,
                        bind_ip=src_ip,
                        client_prepared=True,
                    )
                    self.pending[conn_id]["path"] = "relay"
            except (NoIdentity, OSError, ValueError, KeyError) as err:
                emit("refused", conn_id=conn_id, reason=str(err), **self.pending.pop(conn_id))
                _fastpath.reset_and_close(fd)
        self.relay.workers[0].wake()

    def on_relay(self) -> None:
        for done in self.relay.completions():
            info = self.pending.pop(done.conn_id, {})
            if done.client_fd >= 0:
                _fastpath.reset_and_close(done.client_fd)
            emit(
                "relay_done",
                conn_id=done.conn_id,
                ending=Ending(done.ending).name,
                bytes_up=done.bytes_up,
                bytes_down=done.bytes_down,
                **info,
            )

    def on_tunnel(self) -> None:
        answers = []
        for record in self.engine.records():
            if isinstance(record, InboundStream):
                decision = decide_inbound(record, self.local_pods, self.policy, identity_of=self.identity_of)
                answers.append(decision.answer)
                emit(
                    "inbound",
                    key=record.key,
                    peer_identity=record.peer_identity,
                    authority=record.authority,
                    source_ip=decision.source_ip,
                    peer_node=record.peer_ip,
                    allowed=decision.answer.allow,
                    reason=decision.reason,
                )
            elif isinstance(record, StreamDone):
                info = self.pending.pop(record.id, {}) if record.outbound else {}
                emit("stream_done", **{**record._asdict(), "ending": record.ending.name}, **info)
            elif isinstance(record, TlsFailed):
                emit("tls_failed", **record._asdict())
            elif isinstance(record, TlsOpened):
                emit("tls_open", **record._asdict())
        if answers:
            self.engine.answer(answers)

    # -- lifecycle ------------------------------------------------------------------------------------

    def run(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGHUP, lambda *_: setattr(self, "reload_due", True))
        self.relay.start()
        self.engine.listen(self.hbone)
        self.engine.start()
        install(self.plan)
        try:
            emit("ready", node=self.config["node"], mode=self.mode)
            flush_events()
            poller = select.poll()
            fds = (self.outbound.fileno(), self.inbound.fileno(), self.relay.notify_fd, self.engine.notify_fd)
            for fd in (*fds, wake_r):
                poller.register(fd, select.POLLIN)
            while not self.stopping:
                for fd, _ in poller.poll(1000):
                    if fd == self.outbound.fileno():
                        self.on_accept()
                    elif fd == self.inbound.fileno():
                        self.on_plaintext()
                    elif fd == self.relay.notify_fd:
                        self.on_relay()
                    elif fd == self.engine.notify_fd:
                        self.on_tunnel()
                    else:
                        os.read(wake_r, 64)
                if self.reload_due:
                    self.reload_due = False
                    self.reload_certificates()
                flush_events()
        finally:
            remove(self.plan)
            self.outbound.close()
            self.inbound.close()
            for record in self.engine.stop():
                emit("final", record=repr(record))
            self.relay.stop()
            self.hbone.close()
            emit("stopped")
            flush_events()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m nodeproxy.proxy.tunnel_node CONFIG.json\n")
        return 2
    TunnelNode(json.loads(Path(args[0]).read_text())).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
