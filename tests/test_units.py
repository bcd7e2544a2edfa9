"""Pure parts: balancers, the routing decision, the state updater, the capture ruleset."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from nodeproxy.balance import Endpoint, LeastConnections, PowerOfTwoChoices, RoundRobin
from nodeproxy.capture import CapturePlan, render_iptables
from nodeproxy.config import parse_config
from nodeproxy.lab import Lab
from nodeproxy.proxy.outbound import Passthrough, Refuse, ToEndpoint, decide
from nodeproxy.state.routing import StateUpdater

LISTENER = ("127.0.0.1", 15001)


def endpoints(n: int, weights: list[int] | None = None) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80, weight=(weights[i] if weights else 1)) for i in range(n)]


def test_smooth_weighted_round_robin_interleaves() -> None:
    eps = endpoints(3, [5, 1, 1])
    rr = RoundRobin()
    picks = [rr.pick(eps, ()) for _ in range(7)]
    assert [e.address[-1] for e in picks if e] == list("1121311")


@given(st.lists(st.integers(1, 20), min_size=1, max_size=8), st.integers(1, 5))
def test_round_robin_share_matches_weights(weights: list[int], rounds: int) -> None:
    eps = endpoints(len(weights), weights)
    rr = RoundRobin()
    counts = Counter(rr.pick(eps, ()).address for _ in range(sum(weights) * rounds))  # type: ignore[union-attr]
    assert [counts[e.address] for e in eps] == [w * rounds for w in weights]


@given(st.integers(1, 8), st.data())
def test_balancers_never_pick_a_tried_endpoint(n: int, data: st.DataObject) -> None:
    eps = endpoints(n)
    tried = set(data.draw(st.lists(st.sampled_from([e.address for e in eps]), max_size=n)))
    for balancer in (RoundRobin(), LeastConnections(random.Random(1)), PowerOfTwoChoices(random.Random(1))):
        pick = balancer.pick(eps, tried)
        if len(tried) == n:
            assert pick is None
        else:
            assert pick is not None and pick.address not in tried


def test_least_connections_prefers_idle_weighted() -> None:
    eps = endpoints(3, [1, 4, 1])
    eps[0].active, eps[1].active, eps[2].active = 2, 4, 3
    assert LeastConnections().pick(eps, ()) is eps[1]  # 4/4 = 1 < 2 < 3


def test_p2c_never_picks_the_most_loaded_of_many() -> None:
    eps = endpoints(5)
    for i, e in enumerate(eps):
        e.active = i * 10
    p2c = PowerOfTwoChoices(random.Random(7))
    assert all(p2c.pick(eps, ()) is not eps[4] for _ in range(200))


def lab_state() -> StateUpdater:
    updater = StateUpdater()
    updater.apply(parse_config(Lab().config_yaml()))
    return updater


def test_decide_routes_service_passes_through_others_and_refuses_loops() -> None:
    state = lab_state().current
    decision = decide(state, "10.96.0.10", 80, LISTENER)
    assert isinstance(decision, ToEndpoint) and decision.endpoint.port == 8080
    assert decide(state, "10.244.1.100", 22, LISTENER) == Passthrough("10.244.1.100", 22)
    assert isinstance(decide(state, "10.96.0.10", 81, LISTENER), Passthrough)  # VIP, but not a service port
    assert isinstance(decide(state, "127.0.0.1", 15001, LISTENER), Refuse)
    tried = {e.address for e in state.routes[("10.96.0.10", 80)].endpoints}
    assert isinstance(decide(state, "10.96.0.10", 80, LISTENER, tried), Refuse)


def test_updater_keeps_live_counters_across_reloads() -> None:
    updater = lab_state()
    first = updater.current.routes[("10.96.0.11", 9000)].endpoints[0]
    first.active = 3
    updater.apply(parse_config(Lab(backends=2).config_yaml()))
    route = updater.current.routes[("10.96.0.11", 9000)]
    assert route.endpoints[0] is first and first.active == 3
    assert len(route.endpoints) == 2
    assert updater.current.generation == 2


def test_ruleset_captures_only_pod_syns_and_diverts_owned_sockets() -> None:
    plan = CapturePlan.from_config(parse_config(Lab().config_yaml()))
    rules = render_iptables(plan, hook_present=False).splitlines()
    assert rules[0] == "*mangle" and rules[-1] == "COMMIT"
    divert = rules.index("-A NODEPROXY_PREROUTING -p tcp ! --syn -m socket --transparent -j NODEPROXY_DIVERT")
    tproxy = next(i for i, r in enumerate(rules) if "-j TPROXY" in r)
    assert divert < tproxy  # replies to our transparent upstreams must never be re-captured
    assert "-i npv+ -s 10.244.1.0/24 --syn" in rules[tproxy]
    assert "--on-ip 127.0.0.1 --on-port 15001 --tproxy-mark 0x539/0xfff" in rules[tproxy]
    assert "-I PREROUTING 1 -j NODEPROXY_PREROUTING" in rules
    assert "-I PREROUTING 1 -j NODEPROXY_PREROUTING" not in render_iptables(plan, hook_present=True)
