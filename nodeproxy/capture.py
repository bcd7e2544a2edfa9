"""Traffic capture: the iptables TPROXY rules and the policy routing that deliver pod TCP to the proxy.

What gets installed (all in the current network namespace, i.e. the node's):

    mangle PREROUTING ─► <P>_PREROUTING
        -p tcp ! --syn -m socket --transparent ─► <P>_DIVERT  (packets of a socket the proxy already owns,
                                                               incl. replies to its transparent upstreams)
        -p tcp -m addrtype --dst-type LOCAL   ─► RETURN       (traffic for the node itself)
        -p tcp [-i pod-if | -s pod-cidr] --syn ─► TPROXY --on-ip <listener> --on-port <port>
                                                   --tproxy-mark <mark>/<mask>
    <P>_DIVERT: MARK <mark>/<mask>, ACCEPT

    ip rule  fwmark <mark>/<mask> lookup <table>  (priority <rule_priority>)
    ip route local 0.0.0.0/0 dev lo table <table>

Only PREROUTING is touched, so the node's own traffic and the proxy's upstream connections (which leave
through OUTPUT) are never captured: no loops. The chains are replaced in one iptables-restore transaction,
so re-installing is atomic and idempotent.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute

from nodeproxy.config import Config

_AF_INET = 2
_SCOPE_HOST = 254  # local routes must be host-scoped or the kernel rejects them (EINVAL)


@dataclass(frozen=True)
class CapturePlan:
    """Everything capture needs, independent of the config file's shape."""

    pod_cidrs: tuple[str, ...]
    pod_interfaces: tuple[str, ...]
    listen_ip: str
    listen_port: int
    mark: int
    mask: int
    table: int
    rule_priority: int
    chain_prefix: str

    @classmethod
    def from_config(cls, config: Config) -> CapturePlan:
        cap = config.capture
        return cls(
            pod_cidrs=tuple(str(c) for c in cap.pod_cidrs),
            pod_interfaces=tuple(cap.pod_interfaces),
            listen_ip=str(config.listeners.outbound.host),
            listen_port=config.listeners.outbound.port,
            mark=cap.mark,
            mask=cap.mark_mask,
            table=cap.route_table,
            rule_priority=cap.rule_priority,
            chain_prefix=cap.chain_prefix,
        )

    @property
    def prerouting_chain(self) -> str:
        return f"{self.chain_prefix}_PREROUTING"

    @property
    def divert_chain(self) -> str:
        return f"{self.chain_prefix}_DIVERT"


def _capture_matches(plan: CapturePlan) -> list[str]:
    """One iptables match per (interface, cidr) combination; an empty side matches everything."""
    ifaces = [f"-i {i}" for i in plan.pod_interfaces] or [""]
    cidrs = [f"-s {c}" for c in plan.pod_cidrs] or [""]
    return [" ".join(p for p in (i, c) if p) for i in ifaces for c in cidrs]


def render_iptables(plan: CapturePlan, hook_present: bool, capture_new: bool = True) -> str:
    """The iptables-restore --noflush input that (re)creates our chains; pure, for tests and dry runs.

    With capture_new=False only the divert rules remain: connections the proxy already owns keep
    working while new ones bypass it (used while draining).
    """
    mark = f"{plan.mark:#x}/{plan.mask:#x}"
    pre, div = plan.prerouting_chain, plan.divert_chain
    lines = [
        "*mangle",
        f":{pre} - [0:0]",  # declaring a chain under --noflush empties it: the whole ruleset is replaced
        f":{div} - [0:0]",
        f"-A {div} -j MARK --set-xmark {mark}",
        f"-A {div} -j ACCEPT",
        # `! --syn`: a new SYN whose 4-tuple matches one of our TIME_WAIT sockets must still reach TPROXY
        # (which handles TIME_WAIT reuse); diverting it would answer with a stray ACK and a 1 s retry.
        f"-A {pre} -p tcp ! --syn -m socket --transparent -j {div}",
        f"-A {pre} -p tcp -m addrtype --dst-type LOCAL -j RETURN",
    ]
    for match in _capture_matches(plan) if capture_new else []:
        lines.append(
            f"-A {pre} -p tcp {match} --syn -j TPROXY --on-ip {plan.listen_ip} --on-port {plan.listen_port}"
            f" --tproxy-mark {mark}"
        )
    if not hook_present:
        lines.append(f"-I PREROUTING 1 -j {pre}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _iptables(args: Iterable[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), input=stdin, text=True, capture_output=True, timeout=30)


def _hook_present(plan: CapturePlan) -> bool:
    check = _iptables(["iptables", "-w", "-t", "mangle", "-C", "PREROUTING", "-j", plan.prerouting_chain])
    return check.returncode == 0


def install(plan: CapturePlan, capture_new: bool = True) -> None:
    """Install (or atomically replace) the capture rules and policy routing in this namespace."""
    ruleset = render_iptables(plan, hook_present=_hook_present(plan), capture_new=capture_new)
    result = _iptables(["iptables-restore", "-w", "--noflush"], stdin=ruleset)
    if result.returncode != 0:
        raise RuntimeError(f"iptables-restore failed: {result.stderr.strip()}\n--- ruleset ---\n{ruleset}")
    with IPRoute() as ipr:
        if not _our_rules(ipr, plan):
            _fwmark_rule(ipr, "add", plan, plan.rule_priority)
        _local_route(ipr, "replace", plan, oif=ipr.link_lookup(ifname="lo")[0])


def remove(plan: CapturePlan) -> list[str]:
    """Remove everything install() may have left; returns what was removed. Safe when nothing is there."""
    removed: list[str] = []
    while _hook_present(plan):
        _iptables(["iptables", "-w", "-t", "mangle", "-D", "PREROUTING", "-j", plan.prerouting_chain])
        removed.append(f"mangle PREROUTING -j {plan.prerouting_chain}")
    for chain in (plan.prerouting_chain, plan.divert_chain):
        if _iptables(["iptables", "-w", "-t", "mangle", "-F", chain]).returncode == 0:
            _iptables(["iptables", "-w", "-t", "mangle", "-X", chain])
            removed.append(f"mangle chain {chain}")
    with IPRoute() as ipr:
        for rule in _our_rules(ipr, plan):
            _fwmark_rule(ipr, "del", plan, rule.get("priority"))
            removed.append(f"ip rule fwmark {plan.mark:#x}/{plan.mask:#x} lookup {plan.table}")
        routes = ipr.get_routes(family=_AF_INET, table=plan.table)
        for route in routes:
            if route.get_attr("RTA_TABLE") == plan.table:
                _local_route(ipr, "del", plan, oif=route.get_attr("RTA_OIF"))
                removed.append(f"ip route local 0.0.0.0/0 table {plan.table}")
    return removed


def _local_route(ipr: IPRoute, action: str, plan: CapturePlan, oif: int) -> None:
    """`local 0.0.0.0/0 dev lo table <table>`: everything marked is delivered to this host's sockets."""
    ipr.route(
        action, family=_AF_INET, dst="0.0.0.0/0", type="local", table=plan.table, oif=oif, scope=_SCOPE_HOST
    )


def _fwmark_rule(ipr: IPRoute, action: str, plan: CapturePlan, priority: int) -> None:
    ipr.rule(action, family=_AF_INET, fwmark=plan.mark, fwmask=plan.mask, table=plan.table, priority=priority)


def _our_rules(ipr: IPRoute, plan: CapturePlan) -> list[Any]:  # pyroute2 messages are untyped
    return [
        r
        for r in ipr.get_rules(family=_AF_INET)
        if r.get_attr("FRA_TABLE") == plan.table and r.get_attr("FRA_FWMARK") == plan.mark
    ]


def installed_summary(plan: CapturePlan) -> str:
    """What is installed now, as iptables-save and ip rule would show it (for `nodeproxy capture show`)."""
    save = _iptables(["iptables-save", "-t", "mangle"]).stdout
    ours = [line for line in save.splitlines() if plan.chain_prefix in line]
    rules = subprocess.run(["ip", "rule", "show"], capture_output=True, text=True).stdout
    routes = subprocess.run(
        ["ip", "route", "show", "table", str(plan.table)], capture_output=True, text=True
    ).stdout
    return "\n".join([*ours, rules.rstrip(), routes.rstrip()])
