"""JWT authentication with joserfc: key sets, background JWKS refresh, and the per-request check.

Three parts:

* :func:`parse_jwks` turns a JWKS document into a :class:`KeySnapshot` in which every key is bound
  to the algorithms it may verify (RSA >= 2048 bits: RS256; EC P-256: ES256; OKP Ed25519: EdDSA and
  Ed25519). A key whose `alg` says otherwise, symmetric keys, encryption keys and private keys are
  left out (with the reason kept for the logs). So `alg: none`, HS256 made with an RSA public key
  as the secret (CVE-2022-29217's confusion) and an `alg` other than the key's are all refused.
* :class:`JwksSource` holds one JWKS (an HTTPS URL, a file, or inline text) and
  :class:`JwksRefresher` keeps the sources fresh from an asyncio task: every refresh interval, with
  backoff after failures (the last good keys stay), and at once when a request met an unknown `kid`,
  at most once per min_refetch_interval per source. HTTPS fetches run on the event loop (asyncio
  streams and h11, the whole fetch under one timeout); file reads run in a worker thread.
* :class:`JwtAuthenticator` checks one request's token against the in-memory snapshots: no I/O, no
  waiting. An unknown kid asks the source for a re-fetch (a flag and a wake-up, never a fetch) and
  the request fails with 401 until the key is there.

Claims: `iss` must be the rule's issuer; `aud` must name one of the rule's audiences (if it lists
any); `exp` (required unless the rule says otherwise), `nbf` and `iat` are checked with the
configured clock skew (<= 60 s). A `crit` header is refused (no extension is understood), and
`jku`, `x5u`, `jwk` and `x5c` in a token are never used to find a key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import json
import math
import random
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import h11
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwk, jws
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwa import JWSAlgModel
from joserfc.jws import JWSRegistry

from nodeproxy.authz.config import JwtRule, JwtSettings
from nodeproxy.routes import form_decoded, query_parameters

__all__ = [
    "ALLOWED_ALGORITHMS",
    "BoundKey",
    "JwksError",
    "JwksRefresher",
    "JwksSource",
    "JwtAuthenticator",
    "JwtFailure",
    "JwtIdentity",
    "JwtSuccess",
    "KeySnapshot",
    "Loader",
    "VerifiedTokens",
    "blocking_loader",
    "fetch_https",
    "parse_jwks",
]

log = structlog.get_logger(__name__)

# Token algorithms accepted at all. "EdDSA" (RFC 8037) and "Ed25519" (RFC 9864) are the same
# signature with an Ed25519 key.
ALLOWED_ALGORITHMS: Final = frozenset({"RS256", "ES256", "EdDSA", "Ed25519"})
_MIN_RSA_BITS = 2048
# A token longer than this is refused before any parsing (real ones are 0.5-4 KiB).
MAX_TOKEN_LENGTH = 16384
# Verified tokens remembered per config snapshot (shared by all destination workloads): at most
# this many, holding at most this many bytes of tokens and payloads.
VERIFIED_TOKEN_CACHE_ENTRIES = 4096
VERIFIED_TOKEN_CACHE_BYTES = 8 << 20
# joserfc's default header limit (512 bytes) refuses some real tokens with long kids or x5t#S256.
_MAX_HEADER_BYTES = 4096
# Backoff after a failed fetch: 1 s doubling, at most this (or the refresh interval if shorter).
_MAX_BACKOFF = 300.0


class JwksError(ValueError):
    """A JWKS document that cannot be used (not JSON, not a key set, no usable key)."""


# --------------------------------------------------------------------------------------------
# Keys


@dataclass(frozen=True, slots=True)
class BoundKey:
    """A public key and the token algorithms it may verify."""

    kid: str | None
    algorithms: frozenset[str]
    key: jwk.Key


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """The usable keys of one JWKS document, as fetched at `fetched_at` (monotonic seconds)."""

    keys: tuple[BoundKey, ...]
    by_kid: Mapping[str, BoundKey]
    fetched_at: float
    skipped: tuple[str, ...] = ()  # why each left-out key was left out


def _bind(entry: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWK may verify; raises JwksError with the reason it may verify none."""
    kty = entry.get("kty")
    alg = entry.get("alg")
    if "d" in entry or "p" in entry or "k" in entry:
        raise JwksError(
            "holds private or symmetric key material; a JWKS for verification has public keys only"
        )
    use = entry.get("use")
    if use is not None and use != "sig":
        raise JwksError(f"use is {use!r}, not 'sig'")
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise JwksError("key_ops does not include 'verify'")
    if kty == "RSA":
        allowed = frozenset({"RS256"})
    elif kty == "EC":
        if entry.get("crv") != "P-256":
            raise JwksError(f"EC curve {entry.get('crv')!r} is not P-256 (only ES256 is accepted)")
        allowed = frozenset({"ES256"})
    elif kty == "OKP":
        if entry.get("crv") != "Ed25519":
            raise JwksError(f"OKP curve {entry.get('crv')!r} is not Ed25519")
        allowed = frozenset({"EdDSA", "Ed25519"})
    else:
        raise JwksError(f"key type {kty!r} is not accepted (RSA, EC P-256 and OKP Ed25519 are)")
    if alg is None:
        return allowed
    if alg not in allowed:
        raise JwksError(f"alg {alg!r} does not fit a {kty} key or is not accepted")
    return frozenset({alg})


def parse_jwks(data: bytes | str, fetched_at: float = 0.0) -> KeySnapshot:
    """The usable keys of a JWKS document. Raises JwksError if it is malformed or has none."""
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise JwksError(f"not JSON: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('not a JWKS: expected a JSON object with a "keys" list')
    keys: list[BoundKey] = []
    by_kid: dict[str, BoundKey] = {}
    skipped: list[str] = []
    for i, entry in enumerate(document["keys"]):
        if not isinstance(entry, dict):
            skipped.append(f"keys[{i}]: not an object")
            continue
        kid = entry.get("kid")
        name = f"keys[{i}]" + (f" (kid {kid!r})" if isinstance(kid, str) else "")
        if kid is not None and not isinstance(kid, str):
            skipped.append(f"{name}: kid is not a string")
            continue
        try:
            algorithms = _bind(entry)
            key = jwk.import_key(dict(entry))
            if key.is_private:
                raise JwksError("is a private key")
            raw = key.raw_value
            if isinstance(raw, rsa.RSAPublicKey) and raw.key_size < _MIN_RSA_BITS:
                raise JwksError(f"RSA key of {raw.key_size} bits; at least {_MIN_RSA_BITS} are required")
        except (JwksError, JoseError, ValueError, TypeError, KeyError) as err:
            skipped.append(f"{name}: {err}")
            continue
        if kid is not None and kid in by_kid:
            skipped.append(f"{name}: a second key with this kid (the first one is used)")
            continue
        bound = BoundKey(kid, algorithms, key)
        keys.append(bound)
        if kid is not None:
            by_kid[kid] = bound
    if not keys:
        detail = "; ".join(skipped) if skipped else "the key list is empty"
        raise JwksError(f"no usable key ({detail})")
    return KeySnapshot(tuple(keys), by_kid, fetched_at, tuple(skipped))


# --------------------------------------------------------------------------------------------
# Sources and the refresher

Clock = Callable[[], float]
Loader = Callable[[], Awaitable[bytes]]


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 3


async def fetch_https(url: str, ca_file: str | None, timeout: float, max_bytes: int) -> bytes:
    """GET a JWKS over HTTPS on the running event loop (asyncio streams + h11, no thread), all of it
    (name resolution, TLS handshake, redirects, body) within `timeout` seconds.

    The server certificate and host name are verified against `ca_file`, else the system's CAs; no
    proxy is used; at most 3 redirects, each to https; at most `max_bytes` of body are accepted."""
    loop = asyncio.get_running_loop()
    # Building a context reads the CA file (and the system's CAs): not on the loop's thread.
    context = await loop.run_in_executor(None, functools.partial(ssl.create_default_context, cafile=ca_file))
    async with asyncio.timeout(timeout):
        for _ in range(_MAX_REDIRECTS + 1):
            status, location, body = await _get(url, context, max_bytes)
            if status in _REDIRECTS and location is not None:
                target = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(target).scheme != "https":
                    raise JwksError(f"refusing a redirect away from https (to {target[:200]!r})")
                url = target
                continue
            if status != 200:
                raise JwksError(f"HTTP status {status}")
            return body
    raise JwksError(f"more than {_MAX_REDIRECTS} redirects")


async def _get(url: str, context: ssl.SSLContext, max_bytes: int) -> tuple[int, str | None, bytes]:
    """One GET: (status, Location if any, body)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise JwksError(f"not an https URL: {url[:200]!r}")
    host = parts.hostname
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    reader, writer = await asyncio.open_connection(host, parts.port or 443, ssl=context, server_hostname=host)
    try:
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", parts.netloc.rpartition("@")[2]),
                ("Accept", "application/jwk-set+json, application/json"),
                ("User-Agent", "nodeproxy"),
                ("Connection", "close"),
            ],
        )
        writer.write(connection.send(request) + connection.send(h11.EndOfMessage()))
        await writer.drain()
        status = 0
        location: str | None = None
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(65536))  # b"" is the end of the stream
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    if name == b"location":
                        location = value.decode("ascii", "replace")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise JwksError(f"larger than {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage):
                return status, location, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise JwksError("the server closed the connection before the end of the response")
            # InformationalResponse (1xx): wait for the final response.
    finally:
        writer.close()


def _read_file(path: str, max_bytes: int) -> bytes:
    with Path(path).open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JwksError(f"larger than {max_bytes} bytes")
    return data


class JwksSource:
    """One JWKS and its current keys. The request path only reads `snapshot` and may call
    :meth:`request_refetch`; everything else runs in :class:`JwksRefresher`'s task."""

    def __init__(
        self,
        description: str,
        load: Loader,
        settings: JwtSettings,
        clock: Clock = time.monotonic,
        load_blocking: Callable[[], bytes] | None = None,
    ) -> None:
        self.description = description
        self.load = load  # a coroutine function: the refresher awaits it
        # Local sources (a file, inline text) can also be loaded synchronously at config time.
        self.load_blocking = load_blocking
        self.settings = settings
        self.clock = clock
        self.snapshot: KeySnapshot | None = None
        self.last_error: str | None = None
        self.failures = 0
        self.fetches = 0  # attempts, for tests and stats
        self.refetch_requests = 0  # on-demand re-fetches granted
        self.next_fetch = -math.inf  # due at once
        self.last_attempt = -math.inf
        self.wanted = False
        self.waker: Callable[[], None] | None = None

    def request_refetch(self) -> bool:
        """Ask for a re-fetch soon (an unknown kid). Granted at most once per min_refetch_interval
        since the last fetch attempt of any kind; returns whether it was. Never blocks."""
        now = self.clock()
        if self.wanted or now - self.last_attempt < self.settings.jwks_min_refetch_interval:
            return False
        self.wanted = True
        self.refetch_requests += 1
        if self.waker is not None:
            self.waker()
        return True

    def install(self, data: bytes) -> None:
        """Parse `data` and make it the current snapshot; on error the previous one stays."""
        snapshot = parse_jwks(data, self.clock())
        for reason in snapshot.skipped:
            log.warning("jwks key skipped", source=self.description, reason=reason)
        self.snapshot = snapshot

    @property
    def remote(self) -> bool:
        return self.load_blocking is None

    def load_now(self) -> None:
        """Load a local source synchronously (at config load time); raises on error."""
        if self.load_blocking is None:
            raise ValueError(f"{self.description} is fetched over the network: only the refresher loads it")
        self.last_attempt = self.clock()
        self.fetches += 1
        self.install(self.load_blocking())
        self._succeeded()

    def _succeeded(self) -> None:
        self.failures = 0
        self.last_error = None
        interval = self.settings.jwks_refresh_interval
        # +-10% jitter so that workers and nodes do not fetch in lockstep.
        self.next_fetch = self.clock() + interval * random.uniform(0.9, 1.1)

    def _failed(self, reason: str) -> None:
        self.failures += 1
        self.last_error = reason
        cap = min(_MAX_BACKOFF, self.settings.jwks_refresh_interval)
        delay = min(cap, 2.0 ** min(self.failures - 1, 20))  # the exponent bounded: no float overflow
        self.next_fetch = self.clock() + delay * random.uniform(0.8, 1.0)

    async def refresh(self) -> None:
        """One fetch (in a worker thread) and install; failures are recorded, never raised."""
        self.wanted = False
        self.last_attempt = self.clock()
        self.fetches += 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives as
            # the awaited thing completes (see JwksRefresher.run).
            async with asyncio.timeout(self.settings.jwks_fetch_timeout + 1.0):
                data = await self.load()
            self.install(data)
        except Exception as err:
            reason = f"{type(err).__name__}: {err}"
            self._failed(reason)
            log.warning(
                "jwks fetch failed",
                source=self.description,
                reason=reason,
                keeping_old=self.snapshot is not None,
            )
            return
        self._succeeded()
        log.info("jwks loaded", source=self.description, keys=len(self.snapshot.keys) if self.snapshot else 0)


def _source_key(rule: JwtRule) -> tuple[str, ...]:
    if rule.jwks_uri is not None:
        return ("uri", rule.jwks_uri, rule.jwks_ca_file or "")
    if rule.jwks_file is not None:
        return ("file", rule.jwks_file)
    assert rule.jwks is not None
    return ("inline", hashlib.sha256(rule.jwks.encode()).hexdigest())


def make_source(rule: JwtRule, settings: JwtSettings, clock: Clock = time.monotonic) -> JwksSource:
    """The JwksSource a rule's keys come from (not loaded yet)."""
    max_bytes = settings.max_jwks_bytes
    if rule.jwks_uri is not None:
        fetch = functools.partial(
            fetch_https, rule.jwks_uri, rule.jwks_ca_file, settings.jwks_fetch_timeout, max_bytes
        )
        return JwksSource(rule.jwks_uri, fetch, settings, clock)
    if rule.jwks_file is not None:
        read = functools.partial(_read_file, rule.jwks_file, max_bytes)
        return JwksSource(
            f"file {rule.jwks_file}", blocking_loader(read), settings, clock, load_blocking=read
        )
    text = (rule.jwks or "").encode()

    def inline() -> bytes:
        return text

    description = f"inline JWKS of issuer {rule.issuer}"
    return JwksSource(description, blocking_loader(inline), settings, clock, load_blocking=inline)


def blocking_loader(load: Callable[[], bytes]) -> Loader:
    """A Loader that runs a blocking `load` (a file read) in the loop's default executor."""

    async def run() -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, load)

    return run


class JwksRefresher:
    """Keeps a set of JwksSources fresh from one asyncio task (:meth:`run`).

    Sources are looked up by what they load (URL and CA file, file path, inline text hash) so that a
    config reload keeps the keys and schedule of unchanged sources (:meth:`sources_for`)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._sources: dict[tuple[str, ...], JwksSource] = {}
        self._wake = asyncio.Event()
        self._settings: JwtSettings | None = None

    def sources_for(
        self, rules: Iterable[JwtRule], settings: JwtSettings
    ) -> dict[tuple[str, ...], JwksSource]:
        """The sources of `rules`, reusing known ones; sources no rule uses any more are dropped.
        Files and inline JWKS are loaded now (config time); URLs are fetched by the task.

        With changed settings (intervals, limits) every source is rebuilt, but a rebuilt source keeps
        the keys its predecessor had, so a reload never makes valid tokens fail."""
        rebuild = settings != self._settings
        self._settings = settings
        wanted: dict[tuple[str, ...], JwksSource] = {}
        for rule in rules:
            key = _source_key(rule)
            if key in wanted:
                continue
            known = self._sources.get(key)
            source = known if known is not None and not rebuild else make_source(rule, settings, self.clock)
            if source is not known:
                if known is not None:
                    source.snapshot = known.snapshot
                if not source.remote:
                    try:
                        source.load_now()
                    except (OSError, JwksError) as err:
                        source._failed(f"{type(err).__name__}: {err}")
                        log.warning("jwks load failed", source=source.description, reason=source.last_error)
            source.waker = self._wake.set
            wanted[key] = source
        self._sources = wanted
        self._wake.set()
        return wanted

    @property
    def sources(self) -> tuple[JwksSource, ...]:
        return tuple(self._sources.values())

    async def run(self) -> None:
        """Refresh due sources until cancelled, each fetch in its own task so that a slow JWKS
        server delays only its own source."""
        in_flight: dict[JwksSource, asyncio.Task[None]] = {}

        def finished(source: JwksSource, _: asyncio.Task[None]) -> None:
            in_flight.pop(source, None)
            self._wake.set()

        try:
            while True:
                now = self.clock()
                for source in self._sources.values():
                    if source not in in_flight and (source.wanted or source.next_fetch <= now):
                        task = asyncio.create_task(source.refresh())
                        in_flight[source] = task
                        task.add_done_callback(functools.partial(finished, source))
                self._wake.clear()
                idle = [s.next_fetch for s in self._sources.values() if s not in in_flight]
                timeout = min(idle, default=now + 3600.0) - now
                with contextlib.suppress(TimeoutError):
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when a
                    # cancellation arrives in the iteration the wake-up completes, so a refresher
                    # woken as it is cancelled would never stop.
                    async with asyncio.timeout(min(max(timeout, 0.0), 3600.0)):
                        await self._wake.wait()
        finally:
            for task in in_flight.values():
                task.cancel()

    async def wait_loaded(self, timeout: float) -> bool:
        """Wait until every source has keys or has failed at least once; True if all have keys."""
        deadline = self.clock() + timeout
        while self.clock() < deadline:
            if all(s.snapshot is not None or s.failures for s in self._sources.values()):
                break
            await asyncio.sleep(0.02)
        return all(s.snapshot is not None for s in self._sources.values())


# --------------------------------------------------------------------------------------------
# The per-request check


@dataclass(frozen=True, slots=True)
class JwtIdentity:
    """What a valid token says, for authorization and forwarding."""

    issuer: str
    subject: str | None
    audiences: tuple[str, ...]
    presenter: str | None  # azp
    claims: Mapping[str, Any]
    payload: bytes  # the verified payload as sent (JSON)

    @property
    def principal(self) -> str:
        """Istio's request principal: '<iss>/<sub>'."""
        return f"{self.issuer}/{self.subject or ''}"


@dataclass(frozen=True, slots=True)
class JwtSuccess:
    """Authentication passed: with a token (identity) or without one where that is allowed.
    Apply the header edits to the request sent upstream (removals first)."""

    identity: JwtIdentity | None
    headers_add: tuple[tuple[str, str], ...] = ()
    headers_remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JwtFailure:
    """Answer 401 with `www_authenticate`; `reason` is for the logs (it may quote the token's claims)."""

    reason: str
    www_authenticate: str
    refetch_requested: bool = False
    missing: bool = False  # no token at all (and one is required), rather than a bad one


JwtOutcome = JwtSuccess | JwtFailure

# RFC 6750 §3: no error code when the request had no token at all.
_CHALLENGE_MISSING: Final = "Bearer"


def _challenge(description: str) -> str:
    # error_description is limited to %x20-21 / %x23-5B / %x5D-7E: only fixed texts go here.
    return f'Bearer error="invalid_token", error_description="{description}"'


def _fail(reason: str, description: str, refetch: bool = False) -> JwtFailure:
    return JwtFailure(reason, _challenge(description), refetch)


def _b64url_json(part: str) -> Any:
    try:
        # validate=True: characters outside the base64url alphabet are an error, not skipped.
        raw = base64.b64decode(part + "=" * (-len(part) % 4), altchars=b"-_", validate=True)
        return json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _OneAlgorithm(JWSRegistry):
    """A joserfc registry that verifies exactly one algorithm.

    joserfc's own get_alg() warns on every use of "EdDSA" (deprecated by RFC 9864 in favour of
    "Ed25519"); tokens still use it, and the key binding makes it as safe as Ed25519, so this one
    looks the algorithm up without the warning (and without changing the process's warning filters)."""

    max_header_length = _MAX_HEADER_BYTES

    def __init__(self, algorithm: str) -> None:
        super().__init__(algorithms=[algorithm], strict_check_header=False)
        if algorithm not in self.algorithms:
            raise ImportError(f"joserfc {jws.__name__} lacks the {algorithm} algorithm")
        self._algorithm = algorithm

    def get_alg(self, name: str) -> JWSAlgModel:
        if name != self._algorithm:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        return self.algorithms[name]


_REGISTRIES: Final = {alg: _OneAlgorithm(alg) for alg in sorted(ALLOWED_ALGORITHMS)}


@dataclass(frozen=True, slots=True)
class _Rule:
    config: JwtRule
    source: JwksSource
    audiences: frozenset[str]
    header_locations: frozenset[str]  # header names this issuer's token may come in
    param_locations: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token whose signature verified: the rule and key snapshot it verified under, and its claims."""

    rule: JwtRule
    snapshot: KeySnapshot
    payload: bytes
    claims: dict[str, Any]
    size: int


class VerifiedTokens:
    """Tokens whose signature verified, bounded in count and bytes, the oldest evicted first.

    A client sends the same token on many requests, and a signature check costs 30-100 us. An entry
    only saves the signature check: it is used while the token's issuer is configured by the very
    rule object and its JWKS is the very key snapshot that verified it (a key removed from the JWKS
    takes its tokens with it), and the time and audience claims are checked on every request."""

    def __init__(
        self, max_entries: int = VERIFIED_TOKEN_CACHE_ENTRIES, max_bytes: int = VERIFIED_TOKEN_CACHE_BYTES
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("the verified-token cache needs room for at least one token")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: dict[str, _Verified] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def get(self, token: str) -> _Verified | None:
        return self._entries.get(token)

    def put(
        self, token: str, rule: JwtRule, snapshot: KeySnapshot, payload: bytes, claims: dict[str, Any]
    ) -> None:
        size = len(token) + len(payload)
        if size > self.max_bytes:
            return
        old = self._entries.pop(token, None)
        if old is not None:
            self.bytes -= old.size
        while self._entries and (
            len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes
        ):
            # Dicts keep insertion order: the first entry is the oldest.
            self.bytes -= self._entries.pop(next(iter(self._entries))).size
        self._entries[token] = _Verified(rule, snapshot, payload, claims, size)
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _location_ok(rule: _Rule, where: list[str]) -> bool:
    return any(
        (w.startswith("header:") and w[7:] in rule.header_locations)
        or (w.startswith("param:") and w[6:] in rule.param_locations)
        for w in where
    )


@dataclass(frozen=True, eq=False)
class JwtAuthenticator:
    """The JWT check for one workload: the merged rules of every RequestAuthentication covering it."""

    rules: Mapping[str, _Rule]  # by issuer
    require_token: bool
    clock_skew: float
    header_locations: tuple[tuple[str, str], ...]  # (header name, lower-cased prefix)
    param_locations: tuple[str, ...]
    # Headers the engine must copy into the request attributes for authenticate().
    header_names: frozenset[str]
    # Removed from every request (client-sent copies of headers we output): anti-spoofing.
    always_remove: tuple[str, ...]
    wall_clock: Clock = field(default=time.time)
    verified: VerifiedTokens = field(default_factory=VerifiedTokens, repr=False)

    @classmethod
    def build(
        cls,
        rules: Sequence[JwtRule],
        sources: Mapping[tuple[str, ...], JwksSource],
        settings: JwtSettings,
        require_token: bool,
        wall_clock: Clock = time.time,
        verified: VerifiedTokens | None = None,
    ) -> JwtAuthenticator:
        """`rules` in precedence order (the first rule of an issuer wins). `verified`: a cache shared
        with the other authenticators of the same snapshot (default: one of its own)."""
        by_issuer: dict[str, _Rule] = {}
        headers: dict[tuple[str, str], None] = {}
        params: dict[str, None] = {}
        outputs: dict[str, None] = {}
        for rule in rules:
            if rule.issuer in by_issuer:
                continue
            for location in rule.from_headers:
                headers[(location.name, location.prefix.lower())] = None
            for param in rule.from_params:
                params[param] = None
            for claim in rule.output_claim_to_headers:
                outputs[claim.header] = None
            if rule.output_payload_to_header is not None:
                outputs[rule.output_payload_to_header] = None
            by_issuer[rule.issuer] = _Rule(
                rule,
                sources[_source_key(rule)],
                frozenset(rule.audiences),
                frozenset(loc.name for loc in rule.from_headers),
                frozenset(rule.from_params),
            )
        return cls(
            rules=by_issuer,
            require_token=require_token,
            clock_skew=settings.clock_skew,
            header_locations=tuple(headers),
            param_locations=tuple(params),
            header_names=frozenset(name for name, _ in headers),
            always_remove=tuple(outputs),
            wall_clock=wall_clock,
            verified=verified if verified is not None else VerifiedTokens(),
        )

    def _find_token(self, headers: Mapping[str, str], query: str) -> tuple[str | None, list[str], str | None]:
        """(token, where it was found, problem)."""
        found: dict[str, list[str]] = {}
        for name, prefix in self.header_locations:
            value = headers.get(name)
            if value is None:
                continue
            if prefix:
                if value[: len(prefix)].lower() != prefix:
                    continue  # another scheme (e.g. Basic) in this header: not our token
                value = value[len(prefix) :]
            value = value.strip()
            if value:
                found.setdefault(value, []).append(f"header:{name}")
        if self.param_locations and query:
            params = query_parameters(query)
            for name in self.param_locations:
                raw = params.get(name)
                if raw:
                    found.setdefault(form_decoded(raw), []).append(f"param:{name}")
        if not found:
            return None, [], None
        if len(found) > 1:
            return None, [], "the request carries more than one token"
        token, where = next(iter(found.items()))
        return token, where, None

    def authenticate(self, headers: Mapping[str, str], query: str = "") -> JwtOutcome:
        """Check the request's token. `headers`: lower-case names -> values, at least
        :attr:`header_names`; `query`: the raw query string (for from_params)."""
        token, where, problem = self._find_token(headers, query)
        if problem is not None:
            return _fail(problem, "multiple tokens")
        if token is None:
            if self.require_token:
                return JwtFailure(
                    "the request carries no token and one is required", _CHALLENGE_MISSING, missing=True
                )
            return JwtSuccess(None, (), self.always_remove)
        return self._verify(token, where)

    def _verify(self, token: str, where: list[str]) -> JwtOutcome:
        cached = self.verified.get(token)
        if cached is not None:
            rule = self.rules.get(cached.rule.issuer)
            if (
                rule is not None
                and rule.config is cached.rule
                and rule.source.snapshot is cached.snapshot
                and _location_ok(rule, where)
            ):
                return self._check_claims(rule, cached.payload, cached.claims, where)
        if len(token) > MAX_TOKEN_LENGTH:
            return _fail(f"token of {len(token)} characters", "token too large")
        parts = token.split(".")
        if len(parts) != 3:
            return _fail(f"not a signed JWT: {len(parts)} parts instead of 3", "malformed token")
        header = _b64url_json(parts[0])
        unverified = _b64url_json(parts[1])
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            return _fail("header or payload is not a base64url JSON object", "malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:  # a list or dict is unhashable
            return _fail(
                f"algorithm {alg!r} is not accepted (RS256, ES256, EdDSA are)", "algorithm not accepted"
            )
        if "crit" in header:
            return _fail("a crit header names extensions that are not understood", "unsupported header")
        issuer = unverified.get("iss")
        rule = self.rules.get(issuer) if isinstance(issuer, str) else None
        if rule is None:
            return _fail(f"issuer {issuer!r} is not accepted here", "issuer not accepted")
        if not _location_ok(rule, where):
            return _fail(
                f"a token of issuer {issuer!r} is not accepted in {', '.join(where)}", "token location"
            )
        snapshot = rule.source.snapshot
        kid = header.get("kid")
        if snapshot is None:
            refetch = rule.source.request_refetch()
            why = rule.source.last_error or "first fetch pending"
            return _fail(
                f"no keys of issuer {issuer!r} loaded yet ({why})",
                "keys unavailable",
                refetch,
            )
        candidates: Sequence[BoundKey]
        if kid is not None:
            key = snapshot.by_kid.get(kid) if isinstance(kid, str) else None
            if key is None:
                refetch = rule.source.request_refetch()
                return _fail(f"unknown kid {kid!r} for issuer {issuer!r}", "unknown key id", refetch)
            if alg not in key.algorithms:
                return _fail(
                    f"alg {alg} does not match key {kid!r} (bound to {', '.join(sorted(key.algorithms))})",
                    "algorithm does not match the key",
                )
            candidates = (key,)
        else:
            candidates = [k for k in snapshot.keys if alg in k.algorithms]
            if not candidates:
                return _fail(
                    f"no key of issuer {issuer!r} is bound to {alg}", "algorithm does not match the key"
                )
        payload = self._signature_valid(token, alg, candidates)
        if payload is None:
            return _fail("the signature does not verify", "invalid signature")
        try:
            claims = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return _fail("payload is not JSON", "malformed token")
        if not isinstance(claims, dict):
            return _fail("payload is not a JSON object", "malformed token")
        self.verified.put(token, rule.config, snapshot, payload, claims)
        return self._check_claims(rule, payload, claims, where)

    @staticmethod
    def _signature_valid(token: str, alg: str, candidates: Sequence[BoundKey]) -> bytes | None:
        registry = _REGISTRIES[alg]
        for candidate in candidates:
            try:
                obj = jws.deserialize_compact(token, candidate.key, registry=registry)
            except (JoseError, ValueError, TypeError):
                continue
            if obj.payload is not None:
                return obj.payload
        return None

    def _check_claims(
        self, rule: _Rule, payload: bytes, claims: dict[str, Any], where: list[str]
    ) -> JwtOutcome:
        if claims.get("iss") != rule.config.issuer:
            return _fail("the verified payload's iss is not the expected issuer", "malformed token")
        now = self.wall_clock()
        skew = self.clock_skew
        exp = claims.get("exp")
        if exp is None:
            if rule.config.require_expiration:
                return _fail("the token has no exp claim", "no expiration")
        elif not _number(exp):
            return _fail("exp is not a number", "malformed token")
        elif now > exp + skew:
            return _fail(f"the token expired at {exp} (now {now:.0f}, skew {skew:g} s)", "token expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _number(nbf):
                return _fail("nbf is not a number", "malformed token")
            if now + skew < nbf:
                return _fail(f"the token is not valid before {nbf} (now {now:.0f})", "token not yet valid")
        iat = claims.get("iat")
        if iat is not None:
            if not _number(iat):
                return _fail("iat is not a number", "malformed token")
            if now + skew < iat:
                return _fail(
                    f"the token was issued in the future ({iat}, now {now:.0f})", "token issued in the future"
                )
        aud = claims.get("aud")
        audiences: tuple[str, ...]
        if aud is None:
            audiences = ()
        elif isinstance(aud, str):
            audiences = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audiences = tuple(aud)
        else:
            return _fail("aud is neither a string nor a list of strings", "malformed token")
        if rule.audiences and not rule.audiences.intersection(audiences):
            return _fail(
                f"audiences {list(audiences)} include none of {sorted(rule.audiences)}",
                "audience not accepted",
            )
        subject = claims.get("sub")
        presenter = claims.get("azp")
        identity = JwtIdentity(
            issuer=rule.config.issuer,
            subject=subject if isinstance(subject, str) else None,
            audiences=audiences,
            presenter=presenter if isinstance(presenter, str) else None,
            claims=claims,
            payload=payload,
        )
        return JwtSuccess(identity, self._outputs(rule.config, identity), self._removals(rule.config, where))

    def _removals(self, rule: JwtRule, where: list[str]) -> tuple[str, ...]:
        if rule.forward_original_token:
            return self.always_remove
        token_headers = [w[7:] for w in where if w.startswith("header:")]
        return tuple(dict.fromkeys([*self.always_remove, *token_headers]))

    @staticmethod
    def _outputs(rule: JwtRule, identity: JwtIdentity) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        for mapping in rule.output_claim_to_headers:
            value = _header_value(identity.claims.get(mapping.claim))
            if value is not None:
                out.append((mapping.header, value))
        if rule.output_payload_to_header is not None:
            encoded = base64.urlsafe_b64encode(identity.payload).rstrip(b"=").decode()
            out.append((rule.output_payload_to_header, encoded))
        return tuple(out)


_MAX_OUTPUT_VALUE = 8192


def _header_value(claim: Any) -> str | None:
    """A claim as a header value, or None when it has no safe header form."""
    if claim is None:
        return None
    if isinstance(claim, str):
        text = claim
    elif isinstance(claim, bool | int | float):
        text = json.dumps(claim)
    elif isinstance(claim, list) and all(isinstance(c, str) for c in claim):
        text = ",".join(claim)
    else:
        return None
    if len(text) > _MAX_OUTPUT_VALUE or any((ord(c) < 0x20 and c != "\t") or ord(c) == 0x7F for c in text):
        return None
    text = text.strip(" \t")
    return text or None
