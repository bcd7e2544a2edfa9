"""Peer authentication: is plaintext from outside the mesh accepted by a workload (PERMISSIVE) or
only mutual TLS through the node tunnel (STRICT)?

A pure decision over the config's :class:`~nodeproxy.authz.config.PeerAuthentication` objects,
resolved as Istio does: the most specific object that sets a mode wins, workload (selector) over
namespace over mesh; within a workload object a `port_level` entry for the destination port wins
over its `mode`; UNSET defers to the next less specific object; with nothing set the mode is
PERMISSIVE. When several workload-scoped objects select the same workload, the first in the config
wins (Istio takes the oldest; a file's order is the equivalent it has).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from nodeproxy.authz.config import PeerAuthentication
from nodeproxy.authz.policy import Workload, selector_matches

__all__ = ["DEFAULT_MODE", "CompiledPeerAuthentication", "PeerAuthDecision", "compile_peer_authentication"]

Mode = Literal["STRICT", "PERMISSIVE"]
# Istio's default when no PeerAuthentication applies.
DEFAULT_MODE: Final[Mode] = "PERMISSIVE"


@dataclass(frozen=True, slots=True)
class PeerAuthDecision:
    """Whether a plaintext connection is accepted, the effective mode, and why (for the logs)."""

    accepted: bool
    mode: Mode
    reason: str


_MAX_CACHED = 4096


@dataclass(eq=False)
class CompiledPeerAuthentication:
    objects: tuple[PeerAuthentication, ...]
    _cache: dict[tuple[Workload | None, int], tuple[Mode, str]] = field(default_factory=dict, repr=False)

    def mode_for(self, workload: Workload | None, port: int) -> tuple[Mode, str]:
        """The effective mode for connections to `workload` on `port`, and the object that set it."""
        key = (workload, port)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        result = self._resolve(workload, port)
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()
        self._cache[key] = result
        return result

    def _resolve(self, workload: Workload | None, port: int) -> tuple[Mode, str]:
        by_scope: dict[str, list[PeerAuthentication]] = {"workload": [], "namespace": [], "mesh": []}
        for item in self.objects:
            if selector_matches(item.namespace, item.selector, workload):
                by_scope[item.scope].append(item)
        for item in by_scope["workload"][:1]:
            port_mode = item.port_level.get(port, "UNSET")
            if port_mode != "UNSET":
                return port_mode, f"port {port} of peer authentication {item.qualified_name}"
            if item.mode != "UNSET":
                return item.mode, f"peer authentication {item.qualified_name}"
        for scope in ("namespace", "mesh"):
            for item in by_scope[scope]:
                if item.mode != "UNSET":
                    return item.mode, f"peer authentication {item.qualified_name}"
        return DEFAULT_MODE, "the default (no peer authentication sets a mode)"

    def plaintext(self, workload: Workload | None, port: int) -> PeerAuthDecision:
        """The decision for a plaintext connection (no verified peer identity) to `workload`:`port`."""
        mode, source = self.mode_for(workload, port)
        if mode == "STRICT":
            return PeerAuthDecision(False, mode, f"plaintext refused: STRICT mTLS by {source}")
        return PeerAuthDecision(True, mode, f"plaintext accepted: PERMISSIVE by {source}")


def compile_peer_authentication(objects: Sequence[PeerAuthentication]) -> CompiledPeerAuthentication:
    return CompiledPeerAuthentication(tuple(objects))
