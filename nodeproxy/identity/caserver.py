"""`nodeproxy ca serve`: the CA as a network service that signs workload SVIDs for node proxies.

HTTPS (TLS 1.3 only) with mandatory client certificates: a caller must present a node credential, an
X.509-SVID ``spiffe://<td>/nodeproxy/node/<node>`` that chains to the CA's trust bundle (``nodeproxy ca
issue-node`` makes one). The server itself presents ``spiffe://<td>/nodeproxy/ca``, issued by the CA at
start and renewed at half life. API (docs/identity.md):

``POST /v1/svid``
    ``Content-Type: application/json``, body ``{"csr": "<PEM CSR>", "pod_ip": "10.244.1.10",
    "ttl_seconds": 86400}`` (``pod_ip`` and ``ttl_seconds`` optional), answer ``200`` with
    ``{"spiffe_id", "cert_chain" (PEM, leaf first), "trust_bundle" (PEM), "not_before", "not_after"}``;
    or ``Content-Type: application/pkcs10`` with a PEM or DER CSR as the body, answer ``200`` with the
    chain as ``application/pem-certificate-chain``.
``GET /v1/trust-bundle``
    The trust bundle (``application/pem-certificate-chain``).

The CSR names the identity (its one URI SAN). It is signed only if the config places a workload with that
identity on the calling node (and, when ``pod_ip`` is given, if that pod is such a workload on that
node): a node can never obtain another node's workload identity, and an unknown source gets nothing.
Refusals are ``403``, bad requests ``400``/``404``/``405``/``411``/``413``/``415``, a CA that cannot
sign ``503``; error bodies are ``{"error": "<why>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import h11
import structlog
from cryptography import x509

from nodeproxy.identity.ca import (
    CaError,
    CertificateAuthority,
    CsrError,
    IssuedCertificate,
    generate_private_key,
    private_key_pem,
)
from nodeproxy.identity.config import WorkloadIndex
from nodeproxy.identity.lifetimes import (
    DEFAULT_NODE_CREDENTIAL_TTL,
    DEFAULT_SVID_TTL,
    MIN_SVID_TTL,
    renewal_point,
)
from nodeproxy.identity.spiffe import SpiffeId, SpiffeIdError, SvidError, peer_identity_from_der

__all__ = [
    "MAX_BODY",
    "CaServer",
    "Clock",
    "authorize",
    "serve_forever",
    "server_tls_context",
    "utc_now",
]

log = structlog.get_logger("nodeproxy.identity.caserver")

Clock = Callable[[], datetime]

# A CSR is 0.5-3 KB of PEM (an RSA-8192 one about 2.5 KB); 64 KiB leaves room for JSON and is still small.
MAX_BODY = 64 << 10
MAX_HEAD = 8 << 10
# A node makes one request per SVID renewal (every 12 h per identity): anything slow is a stuck or
# hostile peer. The whole TLS handshake, and each request from its first byte, must fit in these.
HANDSHAKE_TIMEOUT = 10.0
REQUEST_TIMEOUT = 10.0
IDLE_TIMEOUT = 30.0
# Connections served at once; more wait in the listen backlog.
MAX_CONNECTIONS = 256
# The server's own certificate: as short-lived as an SVID, renewed at half life.
SERVER_CERT_TTL = timedelta(hours=24)
PEM_CHAIN = "application/pem-certificate-chain"


def utc_now() -> datetime:
    return datetime.now(UTC)


class Refused(Exception):
    """A request the server answers with an error status."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def authorize(
    index: WorkloadIndex, node: str, requested: SpiffeId, pod_ip: IPv4Address | None = None
) -> str | None:
    """None if ``node`` may obtain an SVID for ``requested`` (for ``pod_ip``), else why not."""
    if requested.trust_domain != index.trust_domain:
        return f"{requested} is not in the trust domain {index.trust_domain!r}"
    if index.nodes is not None and node not in index.nodes:
        return f"node {node!r} is not one the CA serves (identity.nodes)"
    if requested == SpiffeId.for_node(index.trust_domain, node):
        # A node renews its own credential; it can never ask for another node's.
        return None if pod_ip is None else "a node credential is not issued for a pod"
    if requested.workload is None:
        return f"{requested} is not a workload identity (spiffe://<td>/ns/<namespace>/sa/<service-account>)"
    if pod_ip is not None:
        workload = index.by_ip.get(pod_ip)
        if workload is None:
            return f"{pod_ip} is not a known workload"
        if workload.node != node:
            return f"the pod {pod_ip} does not run on node {node!r}"
        if workload.spiffe_id != requested:
            return f"the pod {pod_ip} has the identity {workload.spiffe_id}, not {requested}"
        return None
    if not index.node_may_hold(node, requested):
        return f"no workload on node {node!r} has the identity {requested}"
    return None


def server_tls_context(
    cert_chain_pem: bytes, key_pem: bytes, trust_bundle_pem: bytes, workdir: Path
) -> ssl.SSLContext:
    """TLS 1.3 server context that requires a client certificate chaining to ``trust_bundle_pem``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    _load_chain(context, cert_chain_pem, key_pem, workdir)
    return context


def _load_chain(context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes, workdir: Path) -> None:
    # The ssl module loads a certificate and key only from files; they live in a private 0700 directory for
    # as long as it takes to load them.
    cert_path, key_path = workdir / "server.pem", workdir / "server.key"
    for path, data in ((cert_path, cert_chain_pem), (key_path, key_pem)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    try:
        context.load_cert_chain(cert_path, key_path)
    finally:
        key_path.unlink(missing_ok=True)
        cert_path.unlink(missing_ok=True)


@dataclass
class _Response:
    status: int
    body: bytes
    content_type: str = "application/json"

    @classmethod
    def error(cls, status: int, why: str) -> _Response:
        return cls(status, json.dumps({"error": why}).encode())


class CaServer:
    """The CSR-signing service. ``start()`` it in a running event loop; ``close()`` stops it."""

    def __init__(
        self,
        ca: CertificateAuthority,
        workloads: WorkloadIndex,
        *,
        svid_ttl: timedelta = DEFAULT_SVID_TTL,
        node_credential_ttl: timedelta = DEFAULT_NODE_CREDENTIAL_TTL,
        clock: Clock = utc_now,
        dns_names: tuple[str, ...] = (),
    ) -> None:
        """``svid_ttl``: the longest workload SVID issued (a request may ask for less);
        ``node_credential_ttl``: the same for a node renewing its own credential. ``dns_names``: extra
        DNS SANs of the server certificate, for clients that reach it by name."""
        if workloads.trust_domain != ca.trust_domain:
            raise CaError(
                f"the workloads are in the trust domain {workloads.trust_domain!r}, the CA signs for "
                f"{ca.trust_domain!r}"
            )
        if min(svid_ttl, node_credential_ttl) < MIN_SVID_TTL:
            raise CaError(f"svid_ttl and node_credential_ttl must be at least {MIN_SVID_TTL}")
        self.ca = ca
        self.workloads = workloads
        self.svid_ttl = svid_ttl
        self.node_credential_ttl = node_credential_ttl
        self.clock = clock
        self.dns_names = dns_names
        self.server_id = SpiffeId.for_ca_service(ca.trust_domain)
        self.issued = 0  # SVIDs signed
        self.refused = 0  # requests answered with an error
        self.handshake_failures = 0  # callers refused during the TLS handshake
        self.last_handshake_error = ""
        self._server: asyncio.Server | None = None
        self._context: ssl.SSLContext | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._renew_handle: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        # The limits of one connection (module constants; attributes so that tests can shorten them).
        self.handshake_timeout = HANDSHAKE_TIMEOUT
        self.request_timeout = REQUEST_TIMEOUT
        self.idle_timeout = IDLE_TIMEOUT
        self._tasks: set[asyncio.Task[None]] = set()

    # ---------------------------------------------------------------------------------------
    # Lifecycle

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port); returns the bound address."""
        self._workdir = tempfile.TemporaryDirectory(prefix="nodeproxy-ca-")
        os.chmod(self._workdir.name, 0o700)
        chain, key = self._server_credential()
        self._context = server_tls_context(chain, key, self.ca.trust_bundle_pem(), Path(self._workdir.name))
        # TLS is started per connection (not with start_server's ssl=) so that a refused handshake (no
        # client certificate, unknown CA, expired) reaches this code, which logs and counts it.
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        bound = self._server.sockets[0].getsockname()
        log.info("ca serving", address=f"{bound[0]}:{bound[1]}", trust_domain=self.ca.trust_domain)
        return str(bound[0]), int(bound[1])

    async def close(self) -> None:
        if self._renew_handle is not None:
            self._renew_handle.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def set_workloads(self, workloads: WorkloadIndex) -> None:
        """Replace the inventory (a config reload); the next request is decided by it."""
        if workloads.trust_domain != self.ca.trust_domain:
            raise CaError(f"the workloads are in the trust domain {workloads.trust_domain!r}")
        self.workloads = workloads

    def set_ca(self, ca: CertificateAuthority) -> None:
        """Sign with a reloaded CA (a new intermediate); the server certificate and trusted roots follow."""
        if ca.trust_domain != self.ca.trust_domain:
            raise CaError(f"the new CA is for {ca.trust_domain!r}, not {self.ca.trust_domain!r}")
        self.ca = ca
        if self._context is not None and self._workdir is not None:
            self._context.load_verify_locations(cadata=ca.trust_bundle_pem().decode("ascii"))
            self._renew_server_credential()

    def _server_credential(self) -> tuple[bytes, bytes]:
        key = generate_private_key()
        now = self.clock()
        issued = self.ca.issue(
            self.server_id, key.public_key(), ttl=SERVER_CERT_TTL, now=now, dns_names=self.dns_names
        )
        self._schedule_server_renewal(issued, now)
        return issued.chain_pem, private_key_pem(key)

    def _schedule_server_renewal(self, issued: IssuedCertificate, issued_at: datetime) -> None:
        # Half of the lifetime from issuance: its notBefore is backdated, which the lifetime does not include.
        due = renewal_point(issued_at, issued.not_after, 0.5)
        delay = max((due - self.clock()).total_seconds(), 1.0)
        if self._renew_handle is not None:
            self._renew_handle.cancel()
        self._renew_handle = asyncio.get_running_loop().call_later(delay, self._renew_server_credential)

    def _renew_server_credential(self) -> None:
        assert self._context is not None and self._workdir is not None, "renewed only while serving"
        try:
            chain, key = self._server_credential()
            # New handshakes use the new certificate; established connections keep theirs.
            _load_chain(self._context, chain, key, Path(self._workdir.name))
            log.info("ca server certificate renewed", spiffe_id=str(self.server_id))
        except (CaError, OSError, ssl.SSLError) as err:
            log.error("ca server certificate renewal failed; retrying in 60 s", error=str(err))
            self._renew_handle = asyncio.get_running_loop().call_later(60.0, self._renew_server_credential)

    # ---------------------------------------------------------------------------------------
    # Connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            async with self._slots:
                if await self._handshake(writer, peer):
                    await self._serve(reader, writer)
        except (ConnectionError, TimeoutError, ssl.SSLError, h11.ProtocolError) as err:
            log.debug("ca connection ended", peer=peer, error=f"{type(err).__name__}: {err}")
        except asyncio.CancelledError:
            # close() cancels open connections; this task is the top of its connection, so it ends
            # normally (asyncio's stream callback logs the exception of a cancelled task as an error).
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _handshake(self, writer: asyncio.StreamWriter, peer: object) -> bool:
        assert self._context is not None, "connections are accepted only after start()"
        try:
            await writer.start_tls(self._context, ssl_handshake_timeout=self.handshake_timeout)
        except (ssl.SSLError, ConnectionError, TimeoutError) as err:
            self.handshake_failures += 1
            self.last_handshake_error = f"{type(err).__name__}: {err}"
            log.warning(
                "ca refused a caller during the TLS handshake", peer=peer, error=self.last_handshake_error
            )
            return False
        return True

    def _caller_node(self, writer: asyncio.StreamWriter) -> tuple[str | None, str]:
        """The calling node's name (None if the peer is not a node), and how to describe the peer."""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:  # CERT_REQUIRED makes this unreachable; checked rather than assumed
            return None, "a peer without a certificate"
        try:
            peer = peer_identity_from_der(der, self.ca.trust_domain, now=self.clock())
        except SvidError as err:
            return None, f"a peer whose certificate is not a valid SVID ({err})"
        return peer.node_name, str(peer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node, peer = self._caller_node(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            try:
                request, body = await self._read_request(conn, reader)
            except h11.RemoteProtocolError as err:
                await self._bad_request(conn, writer, peer, err)
                return
            if request is None:
                return
            if body is None:
                response = _Response.error(413, f"the request body is larger than {MAX_BODY} bytes")
            elif node is None:
                response = _Response.error(403, f"only node proxies may call the CA; this is {peer}")
            else:
                response = self._handle(node, request, body)
            if response.status >= 400:
                self.refused += 1
                log.warning(
                    "ca request refused",
                    peer=peer,
                    target=request.target.decode("ascii", "replace")[:100],
                    status=response.status,
                    error=json.loads(response.body)["error"],
                )
            close = node is None or response.status >= 400
            headers = [
                ("content-type", response.content_type),
                ("content-length", str(len(response.body))),
                ("cache-control", "no-store"),
            ]
            if close:
                headers.append(("connection", "close"))
            writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
            writer.write(conn.send(h11.Data(data=response.body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await asyncio.wait_for(writer.drain(), self.request_timeout)
            if close or conn.our_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _bad_request(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, peer: str, err: h11.RemoteProtocolError
    ) -> None:
        """Answer a request h11 cannot parse (400, or 431 for a head over MAX_HEAD) and close."""
        self.refused += 1
        log.warning("ca request refused", peer=peer, status=err.error_status_hint, error=str(err))
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = json.dumps({"error": f"malformed HTTP request: {err}"}).encode()
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("connection", "close"),
        ]
        writer.write(conn.send(h11.Response(status_code=err.error_status_hint, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), self.request_timeout)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request | None, bytes | None]:
        """The next request and its body (None: larger than MAX_BODY); no request when the peer is done."""
        request: h11.Request | None = None
        body = bytearray()
        first = True
        async with asyncio.timeout(self.idle_timeout) as deadline:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(16384)
                    if first and data:
                        # The request has started: from here it gets REQUEST_TIMEOUT, not the idle time.
                        first = False
                        deadline.reschedule(asyncio.get_running_loop().time() + self.request_timeout)
                    conn.receive_data(data)
                elif isinstance(event, h11.Request):
                    request = event
                    length = _content_length(event)
                    if length is not None and length > MAX_BODY:
                        return event, None  # answered 413 without reading the body
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        return request, None
                elif isinstance(event, h11.EndOfMessage):
                    return request, bytes(body)
                else:  # ConnectionClosed, or PAUSED after a response: nothing more to serve
                    return None, b""

    def _handle(self, node: str, request: h11.Request, body: bytes | None) -> _Response:
        target = request.target.split(b"?", 1)[0]
        method = request.method
        if target == b"/v1/trust-bundle":
            if method != b"GET":
                return _Response.error(405, "use GET")
            return _Response(200, self.ca.trust_bundle_pem(), PEM_CHAIN)
        if target != b"/v1/svid":
            return _Response.error(404, "unknown path (POST /v1/svid, GET /v1/trust-bundle)")
        if method != b"POST":
            return _Response.error(405, "use POST")
        if body is None:
            return _Response.error(413, f"the request body is larger than {MAX_BODY} bytes")
        if _content_length(request) is None and not _chunked(request):
            return _Response.error(411, "a Content-Length is required")
        content_type = _header(request, b"content-type").split(b";", 1)[0].strip().lower()
        try:
            if content_type == b"application/json":
                csr, pod_ip, ttl = _parse_json_request(body)
            elif content_type == b"application/pkcs10":
                csr, pod_ip, ttl = _load_csr(body), None, None
            else:
                return _Response.error(415, "send application/json or application/pkcs10")
            issued = self._sign(node, csr, pod_ip, ttl)
        except Refused as err:
            return _Response.error(err.status, str(err))
        if content_type == b"application/pkcs10":
            return _Response(200, issued.chain_pem, PEM_CHAIN)
        answer = {
            "spiffe_id": str(issued.spiffe_id),
            "cert_chain": issued.chain_pem.decode("ascii"),
            "trust_bundle": self.ca.trust_bundle_pem().decode("ascii"),
            "not_before": issued.certificate.not_valid_before_utc.isoformat(),
            "not_after": issued.not_after.isoformat(),
        }
        return _Response(200, json.dumps(answer).encode())

    def _sign(
        self,
        node: str,
        csr: x509.CertificateSigningRequest,
        pod_ip: IPv4Address | None,
        ttl: timedelta | None,
    ) -> IssuedCertificate:
        requested = _requested_identity(csr)
        why = authorize(self.workloads, node, requested, pod_ip)
        if why is not None:
            raise Refused(403, why)
        longest = self.node_credential_ttl if requested.node_name == node else self.svid_ttl
        lifetime = longest if ttl is None else min(ttl, longest)
        try:
            issued = self.ca.sign_csr(csr, requested, ttl=lifetime, now=self.clock())
        except CsrError as err:
            raise Refused(400, str(err)) from None
        except CaError as err:
            log.error("ca cannot sign", error=str(err))
            raise Refused(503, f"the CA cannot sign now: {err}") from None
        self.issued += 1
        log.info(
            "svid issued",
            node=node,
            spiffe_id=str(requested),
            serial=f"{issued.certificate.serial_number:x}",
            not_after=issued.not_after.isoformat(),
        )
        return issued


def _header(request: h11.Request, name: bytes) -> bytes:
    return b",".join(value for key, value in request.headers if key == name)


def _content_length(request: h11.Request) -> int | None:
    # h11 has validated the header (digits only; repeated identical values are folded into one).
    value = _header(request, b"content-length")
    return int(value) if value else None


def _chunked(request: h11.Request) -> bool:
    return b"chunked" in _header(request, b"transfer-encoding").lower()


def _load_csr(data: bytes) -> x509.CertificateSigningRequest:
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as err:
        raise Refused(400, f"not a CSR (PEM or DER): {err}") from None


def _parse_json_request(
    body: bytes,
) -> tuple[x509.CertificateSigningRequest, IPv4Address | None, timedelta | None]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise Refused(400, f"the body is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise Refused(400, "the body must be a JSON object")
    unknown = set(data) - {"csr", "pod_ip", "ttl_seconds"}
    if unknown:
        raise Refused(400, f"unknown fields: {', '.join(sorted(unknown))[:200]}")
    csr_text = data.get("csr")
    if not isinstance(csr_text, str):
        raise Refused(400, "'csr' must be a PEM CSR string")
    pod_ip: IPv4Address | None = None
    if data.get("pod_ip") is not None:
        try:
            pod_ip = IPv4Address(data["pod_ip"])
        except ValueError:
            raise Refused(400, "'pod_ip' must be an IPv4 address") from None
    ttl: timedelta | None = None
    if data.get("ttl_seconds") is not None:
        seconds = data["ttl_seconds"]
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, int)
            or seconds < MIN_SVID_TTL.total_seconds()
        ):
            raise Refused(
                400, f"'ttl_seconds' must be an integer of at least {MIN_SVID_TTL.total_seconds():g}"
            )
        ttl = timedelta(seconds=min(seconds, 10 * 365 * 86400))
    return _load_csr(csr_text.encode("ascii", "replace")), pod_ip, ttl


def _requested_identity(csr: x509.CertificateSigningRequest) -> SpiffeId:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise Refused(400, "the CSR has no subjectAltName with a SPIFFE ID") from None
    except ValueError as err:
        raise Refused(400, f"the CSR's extensions cannot be parsed: {err}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise Refused(400, f"the CSR must name exactly one URI SAN, it has {len(uris)}")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as err:
        raise Refused(400, f"the CSR's URI SAN is not a SPIFFE ID: {err}") from None


# --------------------------------------------------------------------------------------------
# `nodeproxy ca serve`


def serve_forever(
    ca_dir: Path,
    config_path: Path,
    host: str,
    port: int,
    *,
    svid_ttl: timedelta,
    node_credential_ttl: timedelta,
    dns_names: tuple[str, ...],
) -> int:
    """Run the service until SIGTERM/SIGINT; SIGHUP reloads the workloads (config) and the CA directory."""
    from nodeproxy.identity.config import load_identity_config

    ca = CertificateAuthority.load(ca_dir)
    identity = load_identity_config(config_path)
    if identity.trust_domain != ca.trust_domain:
        raise CaError(
            f"{config_path} is for the trust domain {identity.trust_domain!r}, "
            f"{ca_dir} for {ca.trust_domain!r}"
        )

    async def main() -> None:
        server = CaServer(
            ca,
            identity.workload_index(),
            svid_ttl=svid_ttl,
            node_credential_ttl=node_credential_ttl,
            dns_names=dns_names,
        )
        await server.start(host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def reload() -> None:
            from nodeproxy.config import ConfigError

            try:
                fresh = load_identity_config(config_path)
                server.set_workloads(fresh.workload_index())
                server.set_ca(CertificateAuthority.load(ca_dir))
                log.info("ca reloaded", workloads=len(fresh.workloads))
            except (ConfigError, CaError, SvidError, OSError) as err:
                log.error("ca reload failed; keeping the previous state", error=str(err))

        loop.add_signal_handler(signal.SIGHUP, reload)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(main())
    return 0
