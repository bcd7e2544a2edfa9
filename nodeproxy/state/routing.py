"""Routing state: which (VIP, port) belongs to which service, and that service's endpoints.

A RoutingState is immutable once built; the StateUpdater is the only writer and swaps in a new one on
every config change. Endpoint objects (with their live counters) are carried across swaps by identity,
so connections opened before a reload keep decrementing the same counters they incremented.

For HTTP ports (protocol http, http2, grpc or auto) the updater also compiles the service's routes and
subsets into an HttpServiceRoutes here, once per snapshot, so no request ever compiles a regex or
filters endpoints by label.

Each service also has one ServiceGuards (nodeproxy/resilience/guard.py): its circuit breakers,
retry budget, outlier detector and rate-limit buckets. Like the endpoints, it is live state carried
across swaps (reconfigured, not rebuilt, by a reload), and the service's balancers come from it so
that every pick skips ejected endpoints.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from nodeproxy.balance import Balancer, Endpoint
from nodeproxy.config import Config, Service
from nodeproxy.resilience.guard import ServiceGuards
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
    # The service's live resilience state (shared by all its ports); None only in hand-built states.
    guards: ServiceGuards | None = None


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
        # (service, port) -> (what the balancer was made from, the balancer)
        self._balancers: dict[tuple[str, int], tuple[object, Balancer]] = {}
        self._guards: dict[str, ServiceGuards] = {}

    def apply(self, config: Config) -> RoutingState:
        """Build the state for `config` and make it current; returns it."""
        endpoints: dict[tuple[str, int, str, int], Endpoint] = {}
        port_members: dict[tuple[str, int], tuple[Endpoint, ...]] = {}
        service_members: dict[str, list[Endpoint]] = {}
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
            port_members[(vip, port)] = tuple(members)
            service_members.setdefault(service.name, []).extend(members)
        guards = {
            service.name: self._service_guards(
                config.node.name, service, service_members.get(service.name, [])
            )
            for service in config.services
        }
        routes: dict[tuple[str, int], ServiceRoute] = {}
        balancers: dict[tuple[str, int], tuple[object, Balancer]] = {}
        for (vip, port), (service, service_port) in config.service_ports().items():
            members_here = port_members[(vip, port)]
            service_guards = guards[service.name]
            made_from = (service.balancer, service.resilience.load_balancing, config.node.name)
            kept = self._balancers.get((service.name, port))
            # A kept balancer keeps its latency estimates; it was made by these same guards.
            balancer = (
                kept[1]
                if kept and kept[0] == made_from and service.name in self._guards
                else service_guards.balancer(service.balancer)
            )
            balancers[(service.name, port)] = (made_from, balancer)
            protocol = service_port.resolved_protocol
            http = (
                compile_service_routes(service, protocol, members_here, balancer, self.rng, service_guards)
                if protocol in L7_PROTOCOLS
                else None
            )
            routes[(vip, port)] = ServiceRoute(
                service.name,
                vip,
                port,
                members_here,
                balancer,
                protocol=protocol,
                http=http,
                guards=service_guards,
            )
        self._endpoints, self._balancers, self._guards = endpoints, balancers, guards
        self.current = RoutingState(generation=self.current.generation + 1, routes=routes)
        return self.current

    def _service_guards(self, node: str, service: Service, members: list[Endpoint]) -> ServiceGuards:
        """The service's guards: the live ones reconfigured (ejections, budget and in-flight counts
        kept), or new ones."""
        routes = {r.name or f"routes[{i}]": r.resilience for i, r in enumerate(service.routes)}
        kept = self._guards.get(service.name)
        if kept is None:
            return ServiceGuards(service.name, service.resilience, members, routes, local_node=node)
        kept.reconfigure(service.resilience, members, routes)
        kept.local_node = node
        return kept
