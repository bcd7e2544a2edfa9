"""The node proxy daemon: a supervisor process and its worker processes.

    supervisor: capture rules, the transparent listener socket, config reloads, signals, readiness
      └─ worker x relay.threads (forked): accept loop + routing decisions (uvloop) + one relay thread

Workers are processes rather than threads because every relayed connection holds descriptors and the
descriptor limit is per process (and may be fixed below what one process would need); each has its own
SO_REUSEPORT listener, which the supervisor keeps open so a replacement worker inherits its queue.
Like Envoy's worker threads, each balances on its own view of load.

Lifecycle: listener → workers → capture → ready (ready file, sd_notify) → serve. SIGTERM/SIGINT: workers
stop accepting and drain live connections for up to relay.drain_timeout, then reset the rest; the
supervisor removes the capture rules last. SIGHUP re-reads the config file: a config that does not validate
is logged and the running one kept; a valid one is sent to every worker. A worker that dies is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import uvloop

from nodeproxy import capture
from nodeproxy.config import Config, ConfigError, load_config
from nodeproxy.proxy.listener import OutboundListener, open_listener
from nodeproxy.proxy.relay import RelayPool
from nodeproxy.state.routing import StateUpdater

log = structlog.get_logger("nodeproxy")

# Settings bound at start-up; a reload that changes them is refused with this explanation.
RESTART_ONLY = ("listeners", "relay.threads", "relay.pipe_size", "capture")
SUPERVISOR_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
RESPAWN_BACKOFF = 1.0  # seconds between replacing a crashed worker, so a crash loop cannot spin
KILL_GRACE = 5.0  # seconds after the drain deadline before workers are killed


def configure_logging(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one (raising the hard one needs CAP_SYS_RESOURCE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    for target in (nr_open, hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
    return soft


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), path)


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# -- worker process -------------------------------------------------------------------------------------


class Worker:
    """One worker process: accepts from its own listener and owns one relay thread."""

    def __init__(
        self, index: int, config: Config, listen_sock: socket.socket, control_fd: int, access_log: bool
    ) -> None:
        self.index = index
        self.config = config
        self.listen_sock = listen_sock
        self.control_fd = control_fd
        self.access_log = access_log
        self.updater = StateUpdater()
        self._control_buffer = b""

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        self.updater.apply(self.config)
        pool = RelayPool(1, self.config.relay.pipe_size)
        listen = self.config.listeners.outbound
        self.listener = OutboundListener(
            (str(listen.host), listen.port),
            self.config.relay,
            self.updater,
            pool,
            self.access_log,
            worker=self.index,
            workers=self.config.relay.effective_threads,
        )
        pool.start()
        self.listener.start(loop, self.listen_sock)
        loop.add_reader(self.control_fd, self._on_control)
        await stopping.wait()
        self.listener.stop_accepting()
        deadline = time.monotonic() + self.config.relay.drain_timeout
        if pool.live_connections:
            log.info("draining", worker=self.index, live_connections=pool.live_connections)
        while pool.live_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.listener.close()
        stats = self.listener.stats
        log.info(
            "worker stopped",
            worker=self.index,
            accepted=stats.accepted,
            refused=stats.refused,
            connect_failures=stats.connect_failures,
            closed=stats.closed,
        )

    def _on_control(self) -> None:
        """Validated configs from the supervisor, one JSON document per line."""
        chunk = os.read(self.control_fd, 1 << 20)
        if not chunk:  # the supervisor is gone: stop like on SIGTERM
            asyncio.get_running_loop().remove_reader(self.control_fd)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._control_buffer += chunk
        while b"\n" in self._control_buffer:
            line, self._control_buffer = self._control_buffer.split(b"\n", 1)
            config = Config.model_validate_json(line)
            state = self.updater.apply(config)
            self.listener.relay_config = config.relay
            self.config = config
            log.debug("worker applied config", worker=self.index, generation=state.generation)


def _worker_main(
    index: int, config: Config, listen_sock: socket.socket, control_fd: int, access_log: bool
) -> None:
    """Entry point of a forked worker; never returns."""
    code = 0
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads arrive through the control pipe
        uvloop.run(Worker(index, config, listen_sock, control_fd, access_log).serve())
    except BaseException as err:  # a worker must report why it died before it goes
        log.exception("worker crashed", worker=index, error=repr(err))
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


# -- supervisor -----------------------------------------------------------------------------------------


@dataclass
class WorkerHandle:
    index: int
    pid: int
    control_w: int


class Supervisor:
    def __init__(
        self, config: Config, config_path: str | None, ready_file: str | None = None, access_log: bool = True
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.ready_file = ready_file
        self.access_log = access_log
        self.plan = capture.CapturePlan.from_config(config)
        self.workers: dict[int, WorkerHandle] = {}
        self.listen_socks: list[socket.socket] = []

    def run(self) -> int:
        fd_limit = raise_fd_limit()
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        listen = self.config.listeners.outbound
        address = (str(listen.host), listen.port)
        try:
            # One SO_REUSEPORT listener per worker, kept here so a replacement worker inherits its queue.
            self.listen_socks = [open_listener(address) for _ in range(self.config.relay.effective_threads)]
            for index in range(len(self.listen_socks)):
                self._spawn(index)
            capture.install(self.plan)
            log.info(
                "nodeproxy ready",
                node=self.config.node.name,
                listener=str(listen),
                workers=len(self.workers),
                services=len(self.config.services),
                fd_limit_per_worker=fd_limit,
            )
            if self.ready_file:
                Path(self.ready_file).write_text(f"{os.getpid()}\n")
            sd_notify("READY=1")
            self._supervise()
            sd_notify("STOPPING=1")
            # Drain: new connections stop being captured (passthrough ones then go direct, VIPs fail
            # fast) while established ones keep their divert rule; closing our listener copies lets
            # the kernel reset whatever still waits in an accept queue once each worker closes its own.
            capture.install(self.plan, capture_new=False)
            for sock in self.listen_socks:
                sock.close()
            self._stop_workers()
        finally:
            self._kill_workers()
            capture.remove(self.plan)
            for sock in self.listen_socks:
                sock.close()
            if self.ready_file:
                Path(self.ready_file).unlink(missing_ok=True)
        log.info("nodeproxy stopped")
        return 0

    def _spawn(self, index: int) -> None:
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(control_w)
            for other in self.workers.values():
                os.close(other.control_w)
            for i, sock in enumerate(self.listen_socks):
                if i != index:
                    sock.close()
            _worker_main(index, self.config, self.listen_socks[index], control_r, self.access_log)
        os.close(control_r)
        self.workers[index] = WorkerHandle(index, pid, control_w)

    def _supervise(self) -> None:
        last_respawn = 0.0
        while True:
            info = signal.sigtimedwait(SUPERVISOR_SIGNALS, 1.0)
            if info is None:
                continue
            if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                log.info("stopping", signal=signal.Signals(info.si_signo).name)
                return
            if info.si_signo == signal.SIGHUP:
                self.reload()
            elif info.si_signo == signal.SIGCHLD:
                for handle in self._reap():
                    wait = RESPAWN_BACKOFF - (time.monotonic() - last_respawn)
                    if wait > 0:
                        time.sleep(wait)
                    last_respawn = time.monotonic()
                    log.error("worker died; replacing it", worker=handle.index, pid=handle.pid)
                    self._spawn(handle.index)

    def _reap(self) -> list[WorkerHandle]:
        dead = []
        for handle in list(self.workers.values()):
            pid, _status = os.waitpid(handle.pid, os.WNOHANG)
            if pid:
                os.close(handle.control_w)
                del self.workers[handle.index]
                dead.append(handle)
        return dead

    def reload(self) -> None:
        """SIGHUP: re-read the config file; keep the running config unless the new one is fully valid."""
        if self.config_path is None:
            log.warning("reload ignored: running the embedded default config, no file to re-read")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            log.error("config reload rejected; keeping the running config", problems=err.problems)
            return
        changed = [key for key in RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        if changed:
            log.error("config reload rejected; these settings need a restart", fields=changed)
            return
        line = new.model_dump_json().encode() + b"\n"
        for handle in self.workers.values():
            try:
                os.write(handle.control_w, line)
            except OSError as err:  # a dying worker; its replacement starts from self.config
                log.warning("could not send config to worker", worker=handle.index, error=str(err))
        self.config = new
        log.info(
            "config reloaded",
            services=len(new.services),
            endpoints=sum(len(s.endpoints) for s in new.services),
        )

    def _stop_workers(self) -> None:
        for handle in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.relay.drain_timeout + KILL_GRACE
        while self.workers and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)

    def _kill_workers(self) -> None:
        for handle in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
            os.waitpid(handle.pid, 0)
            os.close(handle.control_w)
        self.workers.clear()


def run(
    config: Config, config_path: str | None, ready_file: str | None = None, access_log: bool = True
) -> int:
    return Supervisor(config, config_path, ready_file, access_log).run()
