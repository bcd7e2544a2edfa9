"""Nonsense configurations that used to be accepted (issue 6, defect 5): each is a field-level error."""

from __future__ import annotations

import re

import pytest

from nodeproxy.config import ConfigError, parse_config

HEAD = "node: {name: a}\ncapture: {pod_cidrs: [10.244.1.0/24], pod_interfaces: [npv+]}\n"
POSITION_RE = re.compile(r"line ([0-9]+), column ([0-9]+): (.*)")


def problems(text: str) -> list[tuple[int, str]]:
    """``(line, 'path: why')`` of every problem in ``text``, which must be rejected."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    found = []
    for problem in info.value.problems:
        match = POSITION_RE.fullmatch(problem)
        assert match, f"problem without a position: {problem}"
        found.append((int(match[1]), match[3]))
    return found


def only_problem(text: str) -> tuple[int, str]:
    found = problems(text)
    assert len(found) == 1, found
    return found[0]


def services(*entries: str, listener: str = "127.0.0.1:15001") -> str:
    return HEAD + f"listeners: {{outbound: '{listener}'}}\nservices:\n" + "".join(f"- {e}\n" for e in entries)


WEB = (
    "{name: web, vip: 10.96.0.10, ports: [{port: 80, target_port: 8080}], endpoints: [{address: 10.244.1.5}]}"
)


def test_reference_config_is_valid() -> None:
    config = parse_config(services(WEB))
    assert str(config.services[0].vip) == "10.96.0.10"


@pytest.mark.parametrize(
    ("vip", "why"),
    [
        ("127.0.0.1", "a loopback address (127.0.0.0/8)"),
        ("127.1.2.3", "a loopback address (127.0.0.0/8)"),
        ("169.254.169.254", "link-local (169.254.0.0/16)"),
        ("224.0.0.1", "multicast (224.0.0.0/4)"),
        ("239.255.255.250", "multicast (224.0.0.0/4)"),
        ("255.255.255.255", "reserved (240.0.0.0/4) or the broadcast address 255.255.255.255"),
        ("240.0.0.1", "reserved (240.0.0.0/4)"),
        ("0.0.0.0", "in 0.0.0.0/8"),
        ("0.1.2.3", "in 0.0.0.0/8"),
    ],
)
def test_vip_must_be_a_routable_unicast_address(vip: str, why: str) -> None:
    line, problem = only_problem(services(WEB.replace("10.96.0.10", vip)))
    assert line == 5
    assert problem.startswith(f"services[0].vip: a VIP must be a routable unicast address; {vip} is {why}")


def test_vip_that_is_the_listener_address() -> None:
    line, problem = only_problem(services(WEB, listener="10.96.0.10:15001"))
    assert (line, problem) == (
        5,
        "services[0].vip: VIP 10.96.0.10 is the address of the outbound listener (listeners.outbound: "
        "10.96.0.10:15001); the proxy would capture connections to its own listener",
    )


def test_listener_on_a_service_vip_and_port() -> None:
    # It used to start and even report ready.
    _, problem = only_problem(services(WEB, listener="10.96.0.10:80"))
    assert problem.startswith("services[0].vip: VIP 10.96.0.10 is the address of the outbound listener")
    assert "(listeners.outbound: 10.96.0.10:80), on the same port;" in problem


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("224.0.0.5", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.1.1.1", "reserved"),
        ("0.0.0.7", "0.0.0.0/8"),
    ],
)
def test_listener_must_be_a_local_unicast_address(host: str, why: str) -> None:
    line, problem = only_problem(services(WEB, listener=f"{host}:15001"))
    assert line == 3 and problem.startswith(f"listeners.outbound: cannot listen on {host}: it is ")
    assert why in problem


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "0.0.0.0", "169.254.1.1", "10.0.0.1"])
def test_listener_addresses_that_are_fine(host: str) -> None:
    assert str(parse_config(services(WEB, listener=f"{host}:15001")).listeners.outbound.host) == host


def test_endpoint_that_is_its_own_vip() -> None:
    web = WEB.replace("{address: 10.244.1.5}", "{address: 10.244.1.5}, {address: 10.96.0.10}")
    line, problem = only_problem(services(web))
    assert line == 5
    assert problem.startswith(
        "services[0].endpoints[1].address: endpoint 10.96.0.10 is this service's own VIP; a VIP is not "
    )


def test_endpoint_that_is_another_services_vip() -> None:
    api = "{name: api, vip: 10.96.0.11, ports: [{port: 80}], endpoints: [{address: 10.96.0.10}]}"
    line, problem = only_problem(services(WEB, api))
    assert line == 6
    assert problem.startswith(
        "services[1].endpoints[0].address: endpoint 10.96.0.10 is the VIP of service 'web' (services[0].vip)"
    )


def test_endpoint_that_is_the_listener() -> None:
    web = WEB.replace("target_port: 8080", "target_port: 15001").replace("10.244.1.5", "127.0.0.1")
    _, problem = only_problem(services(web))
    assert problem.startswith(
        "services[0].endpoints[0].address: endpoint 127.0.0.1:15001 is the outbound listener"
    )
    # The same address on another port is a different socket.
    assert parse_config(services(web.replace("15001", "8080"))).services[0].endpoints[0].address


@pytest.mark.parametrize(
    ("cidrs", "expected"),
    [
        (
            "[10.244.1.0/24, 10.244.2.0/24, 10.244.1.0/24]",
            "pod_cidrs[2]: 10.244.1.0/24 is listed twice (pod_cidrs[0])",
        ),
        (
            "[10.244.0.0/16, 10.244.1.0/24]",
            "pod_cidrs[1]: 10.244.1.0/24 overlaps 10.244.0.0/16 (pod_cidrs[0])",
        ),
    ],
)
def test_duplicate_or_overlapping_pod_cidrs(cidrs: str, expected: str) -> None:
    line, problem = only_problem(f"node: {{name: a}}\ncapture: {{pod_cidrs: {cidrs}}}\n")
    assert line == 2 and problem == f"capture.{expected}"


@pytest.mark.parametrize(
    ("interfaces", "expected"),
    [
        ("[eth0, veth+, eth0]", "pod_interfaces[2]: 'eth0' is listed twice (pod_interfaces[0])"),
        ("[veth+, veth12]", "pod_interfaces[1]: 'veth12' overlaps 'veth+' (pod_interfaces[0])"),
        ("[cali12+, cali+]", "pod_interfaces[1]: 'cali+' overlaps 'cali12+' (pod_interfaces[0])"),
    ],
)
def test_duplicate_or_overlapping_pod_interfaces(interfaces: str, expected: str) -> None:
    line, problem = only_problem(f"node: {{name: a}}\ncapture: {{pod_interfaces: {interfaces}}}\n")
    assert line == 2 and problem == f"capture.{expected}"


def test_distinct_interfaces_and_cidrs_are_fine() -> None:
    capture = (
        "capture: {pod_cidrs: [10.244.1.0/24, 10.244.2.0/24], pod_interfaces: [eth0, eth1, veth+, cali+]}"
    )
    parse_config(f"node: {{name: a}}\n{capture}\n")


@pytest.mark.parametrize("value", ["0.5ms", "0.999ms", "0.0001", "1e-4"])
def test_connect_timeout_below_a_millisecond_is_rejected(value: str) -> None:
    # The relay used int(seconds * 1000): 0.5ms became 0 ms and every connect timed out at once.
    line, problem = only_problem(HEAD + f"relay: {{connect_timeout: {value}}}\n")
    assert line == 3
    assert problem.startswith("relay.connect_timeout: must be at least 1ms, the relay's timer resolution")


@pytest.mark.parametrize("value", ["0.4ms", "0.0009"])
def test_idle_timeout_below_a_millisecond_is_rejected(value: str) -> None:
    # 0.4ms became 0 ms, which silently turned the idle timeout off.
    _, problem = only_problem(HEAD + f"relay: {{idle_timeout: {value}}}\n")
    assert problem.startswith("relay.idle_timeout: must be 0 (off) or at least 1ms")


@pytest.mark.parametrize("field", ["peek_timeout", "header_timeout", "upstream_idle_timeout"])
def test_http_timeouts_below_a_millisecond_are_rejected(field: str) -> None:
    # The HTTP engine keeps milliseconds too: 0.5ms would become 0 (no wait at all, or "off").
    _, problem = only_problem(HEAD + f"http: {{{field}: 0.5ms}}\n")
    assert problem.startswith(f"http.{field}: must be")
    assert "1ms" in problem


def test_millisecond_values_are_exact() -> None:
    relay = parse_config(HEAD + "relay: {connect_timeout: 1ms, idle_timeout: 1001ms}\n").relay
    assert (relay.connect_timeout_ms, relay.idle_timeout_ms) == (1, 1001)
    assert int(relay.idle_timeout * 1000) == 1000  # what truncation gives: why the properties round
    assert parse_config(HEAD + "relay: {idle_timeout: 0}\n").relay.idle_timeout_ms == 0


def test_every_problem_is_reported_once_per_line() -> None:
    text = services(
        WEB.replace("10.96.0.10", "127.0.0.1"),
        "{name: api, vip: 224.0.0.9, ports: [{port: 80}], endpoints: [{address: 10.244.1.6}]}",
        listener="255.255.255.255:15001",
    ).replace("pod_interfaces: [npv+]", "pod_interfaces: [npv+, npv1]")
    paths = sorted(problem.split(":", 1)[0] for _, problem in problems(text))
    assert paths == ["capture.pod_interfaces[1]", "listeners.outbound", "services[0].vip", "services[1].vip"]
