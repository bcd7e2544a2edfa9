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

Inbound capture (a plan with `inbound`; from_config makes one when the config has `mesh`): connections
that arrive for a pod of this node from elsewhere (another node, a client outside the mesh) are taken
too, after the outbound rules (a local pod's own SYN has been taken by those already):

        -p tcp -d <local pod cidr> --dport 15008 --syn ─► TPROXY --on-port 15008   (HBONE addressed to a
                                                           pod: the tunnel's transparent listener)
        -p tcp -d <local pod cidr> --syn ─► TPROXY --on-ip <inbound ip> --on-port 15006   (plaintext: the
                                                           PERMISSIVE/STRICT decision and policy apply)

Tunnels addressed to the node itself (node ip:15008) are local traffic and reach the listener as is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from pyroute2 import IPRoute

from nodeproxy.config import Config

log = structlog.get_logger("nodeproxy.capture")

_AF_INET = 2
_RTN_LOCAL = 2  # rtnetlink route type of `ip route local ...`
_SCOPE_HOST = 254  # local routes must be host-scoped or the kernel rejects them (EINVAL)
# iptables-legacy serialises every change through the xtables lock (/run/xtables.lock), which other agents
# (kube-proxy, CNIs) may hold for seconds. Each install/remove waits for it at most this long in all, then
# fails with CaptureError instead of hanging a drain (iptables-nft ignores the lock; the bound still covers
# a hung binary).
IPTABLES_LOCK_BUDGET = 10.0  # seconds
IPTABLES_HANG_GRACE = 5.0  # seconds a single iptables run may take beyond its lock wait before it is killed
_IPTABLES_LOCK_EXIT = 4  # iptables' exit status when it gave up waiting for the xtables lock
_IPTABLES_RETRY_PAUSE = 0.2  # seconds between attempts after a lock timeout
# Where the single-instance lock lives; /run is a tmpfs, so a reboot leaves no stale lock files (and a
# lock file left by a dead process is free: flock locks die with their last holder).
RUN_DIR = "/run/nodeproxy"


class CaptureError(RuntimeError):
    """Installing or removing the capture failed; the message says what is left and why."""


@dataclass(frozen=True)
class InboundPlan:
    """Inbound capture: traffic for the pods in local_pod_cidrs that does not come from them."""

    local_pod_cidrs: tuple[str, ...]
    plaintext_ip: str  # the transparent plaintext inbound listener (15006)
    plaintext_port: int = 15006
    hbone_port: int | None = 15008  # tunnels addressed to a pod go to the (transparent) 15008 listener

    def __post_init__(self) -> None:
        if not self.local_pod_cidrs:
            raise ValueError("inbound capture needs the local pod CIDRs (none would take everything)")


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
    inbound: InboundPlan | None = None  # None: outbound capture only

    @classmethod
    def from_config(cls, config: Config) -> CapturePlan:
        """The capture of `config`: with `mesh.inbound_capture` (the default once `mesh` is set), also
        the inbound capture of this node's pods (capture.pod_cidrs, which the config then requires)."""
        cap = config.capture
        mesh = config.mesh
        inbound = None
        if mesh is not None and mesh.inbound_capture:
            inbound = InboundPlan(
                local_pod_cidrs=tuple(str(c) for c in cap.pod_cidrs),
                plaintext_ip=str(config.listeners.outbound.host),
                plaintext_port=mesh.inbound_port,
                hbone_port=mesh.hbone_port,
            )
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
            inbound=inbound,
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
    inbound = plan.inbound if capture_new else None
    for cidr in inbound.local_pod_cidrs if inbound is not None else ():
        assert inbound is not None  # for the type checker: the loop runs only with a plan
        if inbound.hbone_port is not None:
            # No --on-ip: the socket lookup uses the pod address itself, which the tunnel's listener
            # (transparent, bound to 0.0.0.0:15008) takes.
            lines.append(
                f"-A {pre} -p tcp -d {cidr} --dport {inbound.hbone_port} --syn -j TPROXY"
                f" --on-port {inbound.hbone_port} --tproxy-mark {mark}"
            )
        lines.append(
            f"-A {pre} -p tcp -d {cidr} --syn -j TPROXY --on-ip {inbound.plaintext_ip}"
            f" --on-port {inbound.plaintext_port} --tproxy-mark {mark}"
        )
    if not hook_present:
        lines.append(f"-I PREROUTING 1 -j {pre}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class _Budget:
    """A deadline shared by every iptables run of one install or remove."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _iptables(
    args: Iterable[str], budget: _Budget, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run iptables / iptables-restore, waiting for the xtables lock only within `budget`.

    `-w <seconds>` makes iptables-legacy give up on the lock (exit status 4) instead of waiting forever;
    the subprocess timeout covers a binary that hangs for any other reason. Both end in CaptureError.
    """
    argv = list(args)
    assert argv[1] == "-w", "every iptables call passes -w first so the lock wait is bounded"
    while True:
        wait = max(1, int(budget.left()))
        command = [argv[0], "-w", str(wait), *argv[2:]]
        try:
            result = subprocess.run(
                command, input=stdin, text=True, capture_output=True, timeout=wait + IPTABLES_HANG_GRACE
            )
        except subprocess.TimeoutExpired:
            raise CaptureError(
                f"{' '.join(command)} did not finish within {wait + IPTABLES_HANG_GRACE:.0f} s "
                "(another program holding the xtables lock?)"
            ) from None
        if result.returncode != _IPTABLES_LOCK_EXIT or "xtables lock" not in result.stderr:
            return result
        if budget.left() <= _IPTABLES_RETRY_PAUSE:
            raise CaptureError(
                f"{' '.join(command)}: another program held the xtables lock for more than "
                f"{IPTABLES_LOCK_BUDGET:.0f} s: {result.stderr.strip()}"
            )
        time.sleep(_IPTABLES_RETRY_PAUSE)


def _hook_present(plan: CapturePlan, budget: _Budget) -> bool:
    check = _iptables(
        ["iptables", "-w", "-t", "mangle", "-C", "PREROUTING", "-j", plan.prerouting_chain], budget
    )
    return check.returncode == 0


def install(plan: CapturePlan, capture_new: bool = True, lock_budget: float = IPTABLES_LOCK_BUDGET) -> None:
    """Install (or atomically replace) the capture rules and policy routing in this namespace.

    The policy routing goes in first: a SYN that TPROXY marks before the fwmark rule and the local route
    exist would be routed (forwarded) instead of delivered to our listener. Raises CaptureError.
    """
    with IPRoute() as ipr:
        if not _our_rules(ipr, plan):
            _fwmark_rule(ipr, "add", plan, plan.rule_priority)
        _local_route(ipr, "replace", plan, oif=ipr.link_lookup(ifname="lo")[0])
    budget = _Budget(lock_budget)
    ruleset = render_iptables(plan, hook_present=_hook_present(plan, budget), capture_new=capture_new)
    result = _iptables(["iptables-restore", "-w", "--noflush"], budget, stdin=ruleset)
    if result.returncode != 0:
        raise CaptureError(f"iptables-restore failed: {result.stderr.strip()}\n--- ruleset ---\n{ruleset}")


def remove(plan: CapturePlan, lock_budget: float = IPTABLES_LOCK_BUDGET) -> list[str]:
    """Remove everything install() may have left; returns what was removed. Safe when nothing is there.

    The iptables rules go first and the policy routing last (the reverse of install), so no captured SYN
    ever meets a missing route. If the rules cannot be removed (CaptureError), the routing stays too.
    """
    removed: list[str] = []
    budget = _Budget(lock_budget)
    while _hook_present(plan, budget):
        unhook = _iptables(
            ["iptables", "-w", "-t", "mangle", "-D", "PREROUTING", "-j", plan.prerouting_chain], budget
        )
        if unhook.returncode != 0:
            raise CaptureError(f"could not unhook {plan.prerouting_chain}: {unhook.stderr.strip()}")
        removed.append(f"mangle PREROUTING -j {plan.prerouting_chain}")
    for chain in (plan.prerouting_chain, plan.divert_chain):
        if _iptables(["iptables", "-w", "-t", "mangle", "-F", chain], budget).returncode == 0:
            _iptables(["iptables", "-w", "-t", "mangle", "-X", chain], budget)
            removed.append(f"mangle chain {chain}")
    with IPRoute() as ipr:
        for rule in _our_rules(ipr, plan):
            _fwmark_rule(ipr, "del", plan, rule.get("priority"))
            removed.append(f"ip rule fwmark {plan.mark:#x}/{plan.mask:#x} lookup {plan.table}")
        for route in _our_routes(ipr, plan):
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


def _our_routes(ipr: IPRoute, plan: CapturePlan) -> list[Any]:
    """The routes of our table (the kernel may return other tables' routes when asked for one)."""
    return [
        r for r in ipr.get_routes(family=_AF_INET, table=plan.table) if r.get_attr("RTA_TABLE") == plan.table
    ]


# -- ownership of the capture in this network namespace ---------------------------------------------------


def _lock_path(plan: CapturePlan, suffix: str) -> str:
    """A path unique to (this network namespace, chain prefix): two daemons with different chain prefixes
    may share a namespace, and every lab namespace on one host gets its own."""
    ns = os.stat("/proc/self/ns/net")
    return os.path.join(RUN_DIR, f"netns-{ns.st_dev}-{ns.st_ino}-{plan.chain_prefix}.{suffix}")


class InstanceLock:
    """Single-instance guard: an exclusive flock(2) held on an open file description.

    Forked workers inherit the descriptor, and a flock lives until the last descriptor of its open file
    description closes, so the capture stays owned until the daemon's last process is gone, including
    workers still draining or cleaning up after their supervisor was killed.
    """

    def __init__(self, plan: CapturePlan, wait: float = 0.0) -> None:
        """Take the lock, waiting up to `wait` seconds for its holder to go; CaptureError if it stays."""
        self.path = _lock_path(plan, "lock")
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            owner = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise CaptureError(
                f"another nodeproxy (pid {owner}) owns the capture (chains {plan.chain_prefix}_*) in this "
                f"network namespace; stop it first (lock {self.path})"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    @classmethod
    def adopt(cls, fd: int, plan: CapturePlan) -> InstanceLock:
        """Take over the lock a running daemon handed us (an upgrade): `fd` shares its open file
        description, so the lock stays held without a moment in between. Checked, not assumed."""
        lock = cls.__new__(cls)
        lock.path, lock.fd = _lock_path(plan, "lock"), fd
        held, ours = os.fstat(fd), os.stat(lock.path)
        if (held.st_dev, held.st_ino) != (ours.st_dev, ours.st_ino):
            os.close(fd)
            raise CaptureError(f"the handed-over lock is not {lock.path} (another network namespace?)")
        try:  # we share the holder's lock: a non-blocking exclusive request on it succeeds at once
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CaptureError(f"the handed-over descriptor does not hold {lock.path}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return lock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class SurvivorLock:
    """Decides which process of a daemon whose supervisor died removes the capture (on_failure: open).

    Every process of the daemon (the supervisor and each worker) holds a shared flock on its own open file
    description of one file. A worker that outlives its supervisor drops its shared lock when done and then
    tries for the exclusive lock without waiting: only the last process standing gets it. The winner
    records the removal in the file, so a worker that wins after it (a second "last") does nothing.
    """

    _DONE = b"removed\n"

    def __init__(self, plan: CapturePlan, fresh: bool = False) -> None:
        path = _lock_path(plan, "survivors")
        os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        if fresh:  # a new daemon: forget the record of a previous one's cleanup
            os.ftruncate(self.fd, 0)

    def reopen_in_child(self, plan: CapturePlan) -> SurvivorLock:
        """A forked child shares our open file description (and so our lock); give it its own."""
        os.close(self.fd)
        return SurvivorLock(plan)

    def last_one_standing(self) -> bool:
        """Release our share; True if no other process of the daemon holds one and nobody cleaned up."""
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return os.pread(self.fd, len(self._DONE), 0) != self._DONE

    def mark_done(self) -> None:
        os.pwrite(self.fd, self._DONE, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def installed_summary(plan: CapturePlan) -> str:
    """What is installed now (for `nodeproxy capture show`): our iptables rules as iptables-save prints
    them, then our policy routing read over netlink, in `ip rule` / `ip route` notation."""
    # iptables-save takes no lock (it only reads), so no -w and no lock budget.
    save = subprocess.run(["iptables-save", "-t", "mangle"], capture_output=True, text=True, timeout=30)
    if save.returncode != 0:
        raise CaptureError(f"iptables-save failed: {save.stderr.strip()}")
    lines = [line for line in save.stdout.splitlines() if plan.chain_prefix in line]
    with IPRoute() as ipr:
        lines.extend(describe_rule(rule) for rule in _our_rules(ipr, plan))
        lines.extend(describe_route(route) for route in _our_routes(ipr, plan))
    return "\n".join(lines)


def describe_rule(rule: Any) -> str:
    """One of our fwmark rules the way `ip rule show` prints it."""
    mask = rule.get_attr("FRA_FWMASK")
    fwmark = f"{rule.get_attr('FRA_FWMARK'):#x}" + (f"/{mask:#x}" if mask is not None else "")
    return f"{rule.get_attr('FRA_PRIORITY')}:\tfrom all fwmark {fwmark} lookup {rule.get_attr('FRA_TABLE')}"


def describe_route(route: Any) -> str:
    """One of our table routes the way `ip route show table <table>` prints it (dev as an index)."""
    kind = "local" if route["type"] == _RTN_LOCAL else f"type {route['type']}"
    dst = route.get_attr("RTA_DST")
    where = f"{dst}/{route['dst_len']}" if dst else "default"
    return f"{kind} {where} dev #{route.get_attr('RTA_OIF')} table {route.get_attr('RTA_TABLE')}"
