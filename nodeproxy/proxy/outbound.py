"""The outbound routing decision: a pure function from an accepted connection to where it should go."""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from nodeproxy.balance import Endpoint
from nodeproxy.state.routing import RoutingState, ServiceRoute

# The decisions are NamedTuples: one is built per connection, and a tuple is the cheapest immutable
# record to build (a frozen dataclass sets each field through object.__setattr__).


class Passthrough(NamedTuple):
    """Not a service: connect to the original destination unchanged."""

    ip: str
    port: int


class ToEndpoint(NamedTuple):
    route: ServiceRoute
    endpoint: Endpoint


class Refuse(NamedTuple):
    """Reset the client; `reason` goes to the access log."""

    reason: str


Decision = Passthrough | ToEndpoint | Refuse


def decide(
    state: RoutingState, orig_ip: str, orig_port: int, listener: tuple[str, int], tried: Collection[str] = ()
) -> Decision:
    """Where a connection to orig_ip:orig_port goes, given the endpoints it already tried."""
    if (orig_ip, orig_port) == listener:
        # Someone dialled the listener itself; relaying to the original destination would loop.
        return Refuse("connection to the proxy's own listener")
    route = state.lookup(orig_ip, orig_port)
    if route is None:
        if tried:
            return Refuse("original destination unreachable")
        return Passthrough(orig_ip, orig_port)
    if not route.endpoints:
        return Refuse(f"service {route.service} has no endpoints")
    endpoint = route.balancer.pick(route.endpoints, tried)
    if endpoint is None:
        return Refuse(f"service {route.service}: all {len(route.endpoints)} endpoints failed")
    return ToEndpoint(route, endpoint)
