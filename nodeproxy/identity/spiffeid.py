"""SPIFFE IDs (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md), without cryptography.

A SPIFFE ID is ``spiffe://<trust-domain>/<path>``:

- scheme ``spiffe`` (lower case), then ``//`` and a trust domain of ``[a-z0-9.-_]`` only (lower case, so
  no port, userinfo or percent-encoding can appear), at most 255 characters;
- a path of ``/``-separated segments of ``[a-zA-Z0-9.-_]``, none empty, ``.`` or ``..``, no trailing
  ``/``; no query or fragment (``?`` and ``#`` are not allowed characters);
- the whole ID at most 2048 bytes.

Kept apart from the X.509 rules (nodeproxy.identity.spiffe) so that the config, which every nodeproxy
process imports, does not load cryptography.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "CA_SERVICE_PATH",
    "MAX_SPIFFE_ID_BYTES",
    "MAX_TRUST_DOMAIN_LENGTH",
    "NODE_PATH_PREFIX",
    "SCHEME_PREFIX",
    "SpiffeId",
    "SpiffeIdError",
    "validate_trust_domain",
]

# Limits of the SPIFFE-ID standard (section 2): a URI of at most 2048 bytes, a trust domain (a host name)
# of at most 255 characters.
MAX_SPIFFE_ID_BYTES = 2048
MAX_TRUST_DOMAIN_LENGTH = 255

SCHEME_PREFIX = "spiffe://"
# The node credential's path is /nodeproxy/node/<node-name>: it cannot collide with a workload's
# /ns/<ns>/sa/<sa>, so a node can never be mistaken for a workload or the other way round.
NODE_PATH_PREFIX = "/nodeproxy/node/"
CA_SERVICE_PATH = "/nodeproxy/ca"

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+", re.ASCII)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+", re.ASCII)


class SpiffeIdError(ValueError):
    """A string that is not a valid SPIFFE ID (or trust domain, or path segment)."""


def validate_trust_domain(trust_domain: str) -> str:
    """``trust_domain`` if it is a valid SPIFFE trust domain name, else :class:`SpiffeIdError`."""
    if not isinstance(trust_domain, str):
        raise SpiffeIdError(f"a trust domain is a string, not {type(trust_domain).__name__}")
    if not trust_domain:
        raise SpiffeIdError("the trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise SpiffeIdError(f"the trust domain is longer than {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        if trust_domain.lower() != trust_domain and _TRUST_DOMAIN_RE.fullmatch(trust_domain.lower()):
            raise SpiffeIdError(f"the trust domain {trust_domain!r} must be lower case")
        raise SpiffeIdError(
            f"the trust domain {trust_domain!r} may only contain a-z, 0-9, '.', '-' and '_' "
            "(no port, user info, or percent-encoding)"
        )
    return trust_domain


def _validate_segment(segment: str) -> str:
    if not segment:
        raise SpiffeIdError("a path segment is empty ('//' or a trailing '/')")
    if segment in (".", ".."):
        raise SpiffeIdError(f"the path segment {segment!r} is not allowed")
    if not _SEGMENT_RE.fullmatch(segment):
        raise SpiffeIdError(
            f"the path segment {segment!r} may only contain A-Z, a-z, 0-9, '.', '-' and '_' "
            "(no query, fragment or percent-encoding)"
        )
    return segment


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. ``path`` is empty (the trust domain's own ID) or starts with ``/``."""

    trust_domain: str
    path: str = ""

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if self.path:
            if not self.path.startswith("/"):
                raise SpiffeIdError(f"the path {self.path!r} must start with '/'")
            for segment in self.path[1:].split("/"):
                _validate_segment(segment)
        if len(str(self).encode("ascii")) > MAX_SPIFFE_ID_BYTES:
            raise SpiffeIdError(f"the SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """The SPIFFE ID written in ``text``; :class:`SpiffeIdError` says what is wrong with it."""
        if not isinstance(text, str):
            raise SpiffeIdError(f"a SPIFFE ID is a string, not {type(text).__name__}")
        if not text:
            raise SpiffeIdError("the SPIFFE ID is empty")
        # Checked first so a huge input costs no more than this.
        if (
            len(text) > MAX_SPIFFE_ID_BYTES
            or len(text.encode("utf-8", "surrogatepass")) > MAX_SPIFFE_ID_BYTES
        ):
            raise SpiffeIdError(f"the SPIFFE ID is longer than {MAX_SPIFFE_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            scheme = text.split(":", 1)[0] if ":" in text else ""
            if scheme.lower() == "spiffe":
                raise SpiffeIdError("the scheme must be 'spiffe' in lower case, followed by '//'")
            raise SpiffeIdError(f"expected 'spiffe://<trust-domain>/<path>', got {text[:80]!r}")
        rest = text[len(SCHEME_PREFIX) :]
        trust_domain, slash, path = rest.partition("/")
        if "?" in rest or "#" in rest:
            raise SpiffeIdError("a SPIFFE ID has no query or fragment")
        if "@" in trust_domain:
            raise SpiffeIdError("a SPIFFE ID has no user info in its trust domain")
        if ":" in trust_domain:
            raise SpiffeIdError("a SPIFFE ID has no port in its trust domain")
        return cls(trust_domain, slash + path)

    @classmethod
    def for_workload(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""
        return cls(
            trust_domain, f"/ns/{_validate_segment(namespace)}/sa/{_validate_segment(service_account)}"
        )

    @classmethod
    def for_node(cls, trust_domain: str, node_name: str) -> SpiffeId:
        """The node credential's ID, ``spiffe://<trust_domain>/nodeproxy/node/<node_name>``."""
        return cls(trust_domain, NODE_PATH_PREFIX + _validate_segment(node_name))

    @classmethod
    def for_ca_service(cls, trust_domain: str) -> SpiffeId:
        """The CA service's own ID, ``spiffe://<trust_domain>/nodeproxy/ca``."""
        return cls(trust_domain, CA_SERVICE_PATH)

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path[1:].split("/")) if self.path else ()

    @property
    def workload(self) -> tuple[str, str] | None:
        """``(namespace, service_account)`` for a ``/ns/<ns>/sa/<sa>`` ID, else None."""
        parts = self.segments
        if len(parts) == 4 and parts[0] == "ns" and parts[2] == "sa":
            return parts[1], parts[3]
        return None

    @property
    def node_name(self) -> str | None:
        """The node name of a node credential's ID (``/nodeproxy/node/<name>``), else None."""
        parts = self.segments
        if len(parts) == 3 and parts[0] == "nodeproxy" and parts[1] == "node":
            return parts[2]
        return None
