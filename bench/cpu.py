"""A proxy's own CPU time, from /proc: utime + stime of every process in its process tree.

`/proc/<pid>/stat` of a process reports the time of all its threads (live ones and the ones that have
exited), so one line per process covers the relay threads too. A process that has exited and was reaped
by its parent (a replaced worker, an `iptables` child) has its time added by the kernel to the parent's
`cutime`/`cstime`, so the tree's total is

    sum over the live processes of the tree of (utime + stime + cutime + cstime)

which counts every process that ever lived in the tree once, as long as its parent (inside the tree)
reaped it. Time is lost only for a process that died unreaped (a zombie until its parent waits) or was
reaped outside the tree (re-parented to init after its parent died): both are rare in a bench run and
make the figure smaller, never larger.

The CPU cost of a workload is the difference of two samples, taken just before and just after it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PROC = pathlib.Path("/proc")
# Kernel clock ticks per second: the unit of the time fields of /proc/<pid>/stat (USER_HZ, 100 on Linux).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcStat:
    """The fields of one /proc/<pid>/stat line the accounting needs (times in clock ticks)."""

    pid: int
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def ticks(self) -> int:
        """Own time (all threads) plus the time of reaped children."""
        return self.utime + self.stime + self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """Parse one /proc/<pid>/stat line (proc(5)).

    The second field is the command name in parentheses and may itself hold spaces and parentheses, so
    the fields after it are found from the *last* ')'.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 1 or close_paren < open_paren:
        raise ValueError(f"not a /proc/<pid>/stat line: {text[:80]!r}")
    pid = int(text[:open_paren])
    # After "pid (comm) ": state(3) ppid(4) pgrp session tty_nr tpgid flags minflt cminflt majflt
    # cmajflt utime(14) stime(15) cutime(16) cstime(17) ...; rest[0] is field 3.
    rest = text[close_paren + 1 :].split()
    if len(rest) < 15:
        raise ValueError(f"/proc/{pid}/stat has {len(rest) + 2} fields, expected at least 17")
    return ProcStat(
        pid=pid,
        ppid=int(rest[1]),
        utime=int(rest[11]),
        stime=int(rest[12]),
        cutime=int(rest[13]),
        cstime=int(rest[14]),
    )


def read_stats(proc: pathlib.Path = PROC) -> dict[int, ProcStat]:
    """Every process's stat line; processes that vanish while being read are skipped."""
    stats: dict[int, ProcStat] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_stat((entry / "stat").read_text())
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between listing and reading
        stats[stat.pid] = stat
    return stats


def tree(stats: Mapping[int, ProcStat], root: int) -> set[int]:
    """`root` and all its descendants among `stats` (empty when root is not running)."""
    if root not in stats:
        return set()
    children: dict[int, list[int]] = {}
    for stat in stats.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found = {root}
    pending = [root]
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:  # a pid cannot be its own ancestor, but /proc is read non-atomically
                found.add(child)
                pending.append(child)
    return found


def trees(stats: Mapping[int, ProcStat], roots: Iterable[int]) -> set[int]:
    """The union of the trees under `roots` (a process under two roots is counted once)."""
    pids: set[int] = set()
    for root in roots:
        pids |= tree(stats, root)
    return pids


def tree_ticks(stats: Mapping[int, ProcStat], roots: Iterable[int]) -> int:
    """Clock ticks used by the trees under `roots`."""
    return sum(stats[pid].ticks for pid in trees(stats, roots))


@dataclass(frozen=True, slots=True)
class CpuSample:
    seconds: float
    processes: int  # live processes in the tree when sampled


def sample(roots: Iterable[int], proc: pathlib.Path = PROC) -> CpuSample:
    """CPU seconds used so far by the process trees under `roots`."""
    stats = read_stats(proc)
    pids = trees(stats, roots)
    return CpuSample(seconds=sum(stats[pid].ticks for pid in pids) / CLOCK_TICKS, processes=len(pids))


def cost(cpu_seconds: float, work: float, per: float) -> float | None:
    """CPU seconds per `per` units of work (None when no work was done)."""
    if work <= 0:
        return None
    return cpu_seconds * per / work
