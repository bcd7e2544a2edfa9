"""Routing state: which (VIP, port) belongs to which service, and that service's endpoints.

A RoutingState is immutable once built; the StateUpdater is the only writer and swaps in a new one on
every config change. Endpoint objects (with their live counters) are carried across swaps by identity,
so connections opened before a reload keep decrementing the same counters they incremented.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from nodeproxy.balance import Balancer, Endpoint, make_balancer
from nodeproxy.config import Config


@dataclass(frozen=True)
class ServiceRoute:
    """One service port: where its connections may go and how to choose."""

    service: str
    vip: str
    port: int
    endpoints: tuple[Endpoint, ...]
    balancer: Balancer


@dataclass(frozen=True)
class RoutingState:
    generation: int
    routes: Mapping[tuple[str, int], ServiceRoute]

    def lookup(self, ip: str, port: int) -> ServiceRoute | None:
        return self.routes.get((ip, port))


EMPTY = RoutingState(generation=0, routes={})


class StateUpdater:
    """Owns every write to the routing state; readers take `current` and never mutate it."""

    def __init__(self) -> None:
        self.current: RoutingState = EMPTY
        self._endpoints: dict[tuple[str, int, str, int], Endpoint] = {}
        self._balancers: dict[tuple[str, int], tuple[str, Balancer]] = {}

    def apply(self, config: Config) -> RoutingState:
        """Build the state for `config` and make it current; returns it."""
        routes: dict[tuple[str, int], ServiceRoute] = {}
        endpoints: dict[tuple[str, int, str, int], Endpoint] = {}
        balancers: dict[tuple[str, int], tuple[str, Balancer]] = {}
        for (vip, port), (service, service_port) in config.service_ports().items():
            members = []
            for ep in service.endpoints:
                key = (service.name, port, str(ep.address), service_port.backend_port)
                live = self._endpoints.get(key) or Endpoint(
                    address=str(ep.address), port=service_port.backend_port
                )
                # Static attributes follow the config; live counters stay with the object.
                live.weight, live.node, live.labels = ep.weight, ep.node, dict(ep.labels)
                endpoints[key] = live
                members.append(live)
            kept = self._balancers.get((service.name, port))
            balancer = kept[1] if kept and kept[0] == service.balancer else make_balancer(service.balancer)
            balancers[(service.name, port)] = (service.balancer, balancer)
            routes[(vip, port)] = ServiceRoute(service.name, vip, port, tuple(members), balancer)
        self._endpoints, self._balancers = endpoints, balancers
        self.current = RoutingState(generation=self.current.generation + 1, routes=routes)
        return self.current
