"""Routing state: which (VIP, port) belongs to which service, and that service's endpoints.

A RoutingState is immutable once built; the StateUpdater is the only writer and swaps in a new one on
every config change. Endpoint objects (with their live counters) are carried across swaps by identity,
so connections opened before a reload keep decrementing the same counters they incremented.

For HTTP ports (protocol http, http2, grpc or auto) the updater also compiles the service's routes and
subsets into an HttpServiceRoutes here, once per snapshot, so no request ever compiles a regex or
filters endpoints by label.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from nodeproxy.balance import Balancer, Endpoint, make_balancer
from nodeproxy.config import Config
from nodeproxy.routes import L7_PROTOCOLS, HttpServiceRoutes, Protocol, compile_service_routes


@dataclass(frozen=True)
class ServiceRoute:
    """One service port: where its connections may go and how to choose."""

    service: str
    vip: str
    port: int
    endpoints: tuple[Endpoint, ...]
    balancer: Balancer
    protocol: Protocol = "tcp"
    # Compiled routes for an HTTP port (protocol other than tcp); None for tcp ports.
    http: HttpServiceRoutes | None = None


@dataclass(frozen=True)
class RoutingState:
    generation: int
    routes: Mapping[tuple[str, int], ServiceRoute]

    def lookup(self, ip: str, port: int) -> ServiceRoute | None:
        return self.routes.get((ip, port))


EMPTY = RoutingState(generation=0, routes={})


class StateUpdater:
    """Owns every write to the routing state; readers take `current` and never mutate it."""

    def __init__(self, rng: random.Random | None = None) -> None:
        # Drives the weighted choice between a route's subsets; tests inject a seeded one.
        self.rng = rng or random.Random()
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
            protocol = service_port.resolved_protocol
            http = (
                compile_service_routes(service, protocol, tuple(members), balancer, self.rng)
                if protocol in L7_PROTOCOLS
                else None
            )
            routes[(vip, port)] = ServiceRoute(
                service.name, vip, port, tuple(members), balancer, protocol=protocol, http=http
            )
        self._endpoints, self._balancers = endpoints, balancers
        self.current = RoutingState(generation=self.current.generation + 1, routes=routes)
        return self.current
