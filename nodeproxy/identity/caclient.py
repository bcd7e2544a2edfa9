"""The node proxy's side of `nodeproxy ca serve`: one authenticated CSR round trip per call.

Every call builds a fresh TLS context from the node credential files and the current trust bundle, so a
rotated node credential or a new bundle is used from the next renewal on without a restart (renewals are
rare: one per identity per half lifetime). The server must present ``spiffe://<td>/nodeproxy/ca`` with a
chain to the trust bundle; its hostname is not checked (SPIFFE authenticates the URI SAN instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import IPv4Address
from pathlib import Path

import h11

from nodeproxy.identity.spiffe import SpiffeId, SvidError, peer_identity_from_der

__all__ = ["CaClient", "CaClientError", "SignedChain", "client_tls_context"]

# The largest answer read: a chain of three certificates and a bundle of a few roots is under 10 KiB.
MAX_RESPONSE = 256 << 10


class CaClientError(Exception):
    """The CA could not be reached, was not who it should be, or refused (``status`` then set)."""

    def __init__(self, why: str, status: int | None = None) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True, slots=True)
class SignedChain:
    """What the CA answered: the chain (PEM, leaf first) and the CA's trust bundle (PEM)."""

    cert_chain_pem: bytes
    trust_bundle_pem: bytes


def client_tls_context(cert_path: Path, key_path: Path, trust_bundle_pem: bytes) -> ssl.SSLContext:
    """TLS 1.3 client context presenting the node credential and trusting only the bundle."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the server's SPIFFE ID is checked after the handshake instead
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=trust_bundle_pem.decode("ascii"))
    context.load_cert_chain(cert_path, key_path)
    return context


class CaClient:
    """Requests SVIDs from the CA at ``host:port`` as the node whose credential is in ``cert``/``key``."""

    def __init__(
        self,
        host: IPv4Address | str,
        port: int,
        trust_domain: str,
        *,
        cert: Path,
        key: Path,
        trust_bundle: Callable[[], bytes],
        timeout: float = 10.0,
    ) -> None:
        """``trust_bundle``: returns the current bundle (PEM), called for every request."""
        self.host = str(host)
        self.port = port
        self.server_id = SpiffeId.for_ca_service(trust_domain)
        self.trust_domain = trust_domain
        self.cert = cert
        self.key = key
        self.trust_bundle = trust_bundle
        self.timeout = timeout

    async def sign(
        self, csr_pem: bytes, *, ttl: timedelta | None = None, pod_ip: str | None = None
    ) -> SignedChain:
        """Ask the CA to sign ``csr_pem``; raises :class:`CaClientError`."""
        request: dict[str, object] = {"csr": csr_pem.decode("ascii")}
        if ttl is not None:
            request["ttl_seconds"] = int(ttl.total_seconds())
        if pod_ip is not None:
            request["pod_ip"] = pod_ip
        status, body = await self._exchange(b"POST", b"/v1/svid", json.dumps(request).encode())
        try:
            answer = json.loads(body)
        except ValueError:
            raise CaClientError(f"the CA answered {status} with a body that is not JSON", status) from None
        if status != 200:
            why = answer.get("error") if isinstance(answer, dict) else None
            raise CaClientError(f"the CA refused ({status}): {why or body[:200]!r}", status)
        try:
            return SignedChain(answer["cert_chain"].encode("ascii"), answer["trust_bundle"].encode("ascii"))
        except (KeyError, TypeError, AttributeError, UnicodeEncodeError):
            raise CaClientError("the CA's answer lacks cert_chain or trust_bundle", status) from None

    async def fetch_trust_bundle(self) -> bytes:
        status, body = await self._exchange(b"GET", b"/v1/trust-bundle", None)
        if status != 200:
            raise CaClientError(f"the CA answered {status} for the trust bundle", status)
        return body

    async def _exchange(self, method: bytes, target: bytes, body: bytes | None) -> tuple[int, bytes]:
        try:
            context = client_tls_context(self.cert, self.key, self.trust_bundle())
        except (OSError, ssl.SSLError, ValueError) as err:
            raise CaClientError(f"cannot load the node credential or trust bundle: {err}") from None
        try:
            async with asyncio.timeout(self.timeout):
                return await self._round_trip(context, method, target, body)
        except TimeoutError:
            raise CaClientError(
                f"no answer from the CA at {self.host}:{self.port} within {self.timeout:g} s"
            ) from None
        except (OSError, ssl.SSLError, h11.ProtocolError) as err:
            raise CaClientError(f"CA at {self.host}:{self.port}: {type(err).__name__}: {err}") from None

    async def _round_trip(
        self, context: ssl.SSLContext, method: bytes, target: bytes, body: bytes | None
    ) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=context, server_hostname="")
        try:
            self._check_server(writer)
            conn = h11.Connection(h11.CLIENT)
            headers = [("host", f"{self.host}:{self.port}"), ("connection", "close")]
            if body is not None:
                headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
            writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)) or b"")
            if body is not None:
                writer.write(conn.send(h11.Data(data=body)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            status = 0
            answer = bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(16384))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > MAX_RESPONSE:
                        raise CaClientError(f"the CA's answer is larger than {MAX_RESPONSE} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    return status, bytes(answer)
                elif isinstance(event, h11.ConnectionClosed):
                    raise CaClientError("the CA closed the connection before answering")
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _check_server(self, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise CaClientError("the CA presented no certificate")
        try:
            server = peer_identity_from_der(der, self.trust_domain)
        except SvidError as err:
            raise CaClientError(f"the CA's certificate is not an SVID: {err}") from None
        if server != self.server_id:
            raise CaClientError(f"the server is {server}, not the CA ({self.server_id})")
