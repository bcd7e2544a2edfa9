"""Network namespace helpers: run a command in a named netns, or create sockets inside one.

`entered(name)` switches only the calling thread (setns(2) is per thread), so a socket created inside the
block lives in that namespace for its whole life while the rest of the process stays where it was.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

NETNS_RUN_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block with the calling thread inside network namespace `name`."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_RUN_DIR, name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def exec_argv(name: str | None, argv: Sequence[str]) -> list[str]:
    """The argv that runs `argv` inside namespace `name` (or as is when name is None)."""
    return ["ip", "netns", "exec", name, *argv] if name else list(argv)


def run(name: str | None, argv: Sequence[str], check: bool = True, timeout: float = 60) -> str:
    """Run a command in a namespace and return its stdout; a failure raises with stderr in the message."""
    proc = subprocess.run(exec_argv(name, argv), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} (netns {name}) failed: {proc.stderr.strip() or proc.returncode}"
        )
    return proc.stdout


def pids(name: str) -> list[int]:
    """Processes whose network namespace is `name`.

    Compares /proc/PID/ns/net with the bind mount, as `ip netns pids` does; done here because `ip`
    first probes rtnetlink, which waits on the rtnl lock that the kernel holds for seconds while it
    tears down namespaces deleted just before.
    """
    try:
        target = os.stat(f"{NETNS_RUN_DIR}/{name}")
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # exited meanwhile, or a kernel thread
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(int(entry))
    return found


def delete(names: Sequence[str]) -> None:
    """Kill whatever still runs in each namespace and delete it; a missing one is skipped."""
    for name in names:
        if not exists(name):
            continue
        for pid in pids(name):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
