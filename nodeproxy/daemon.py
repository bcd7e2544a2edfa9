"""The node proxy daemon: a supervisor process and its worker processes.

    supervisor: instance lock, capture rules, config reloads, signals, readiness, worker health
      └─ worker x relay.threads (forked): its own SO_REUSEPORT listener, accept loop + routing decisions
         (uvloop) + one relay thread

Workers are processes rather than threads because every relayed connection holds descriptors and the
descriptor limit is per process (and may be fixed below what one process would need). Like Envoy's worker
threads, each balances on its own view of load.

Each worker owns the only copy of its listener (the supervisor opens it just before the fork and closes
its own copy right after). When a worker dies its listener dies with it: the kernel resets what waited in
its accept queue and hashes new connections (TPROXY's listener lookup included) over the remaining
members of the SO_REUSEPORT group, instead of queueing a share nobody accepts. The replacement gets a
fresh listener.

The supervisor never blocks on a worker. Configs go down a non-blocking control pipe through a per-worker
outbox that keeps only the newest config (older ones are superseded). Workers write to a status pipe: one
READY byte once their listener is served, then a heartbeat byte every HEARTBEAT_INTERVAL. A worker silent
for HEARTBEAT_TIMEOUT (stopped, wedged) is SIGKILLed and replaced.

Lifecycle: instance lock → workers → all workers READY → capture → ready file, sd_notify(READY=1) → serve.
SIGTERM/SIGINT: capture stops taking new connections, workers stop accepting and drain live connections for
up to relay.drain_timeout, then reset the rest; the supervisor removes the capture rules last. SIGHUP
re-reads the config file: a config that does not validate is logged and the running one kept; a valid one
is sent to every worker. A worker that dies is logged with its exit status or signal and replaced; more
than CRASH_LOOP_LIMIT deaths within CRASH_LOOP_WINDOW end the daemon with exit status 1.

If the supervisor itself dies (kill -9, OOM killer), its workers see the control pipe close and drain.
With capture.on_failure: open (the default) they first stop capture of new connections, and the last of
them to finish removes the capture rules and routing, so pods keep talking directly (unproxied). With
closed, the rules stay and captured connections fail until a daemon runs again: right once mTLS is STRICT,
when a bypass would be a security hole. The same choice applies when the daemon ends on an error (crash
loop, failed start); a clean stop (SIGTERM) always removes the capture.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

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
SUPERVISOR_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
WORKER_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
RESPAWN_BACKOFF = 1.0  # seconds between replacing crashed workers, so a crash loop cannot spin
KILL_GRACE = 5.0  # seconds after the drain deadline before workers are killed
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats
HEARTBEAT_TIMEOUT = 10.0  # seconds without a heartbeat before a worker is SIGKILLed and replaced
START_TIMEOUT = 30.0  # seconds for every worker to report ready at start (systemd's TimeoutStartSec)
CRASH_LOOP_LIMIT = 5  # more than this many worker deaths ...
CRASH_LOOP_WINDOW = 60.0  # ... within this many seconds end the daemon (exit status 1)
# Status pipe bytes, worker -> supervisor.
MSG_READY = b"R"
MSG_HEARTBEAT = b"H"


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


def describe_exit(status: int) -> dict[str, object]:
    """A waitpid status as log fields: the exit code, or the signal that killed the process."""
    if os.WIFSIGNALED(status):
        return {"signal": signal.Signals(os.WTERMSIG(status)).name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


# -- worker process -------------------------------------------------------------------------------------


class Worker:
    """One worker process: accepts from its own listener and owns one relay thread."""

    def __init__(
        self,
        index: int,
        config: Config,
        listen_sock: socket.socket,
        control_fd: int,
        status_fd: int,
        access_log: bool,
        survivors: capture.SurvivorLock,
        supervisor_pid: int,
    ) -> None:
        self.index = index
        self.config = config
        self.listen_sock = listen_sock
        self.control_fd = control_fd
        self.status_fd = status_fd
        self.access_log = access_log
        self.survivors = survivors
        self.supervisor_pid = supervisor_pid
        self.supervisor_gone = False
        self.fail_open = False  # set when serve() ends: the supervisor died and capture.on_failure is open
        self.updater = StateUpdater()
        self._control_buffer = b""
        self._stopping = asyncio.Event()
        self._heartbeat_timer: asyncio.TimerHandle | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in WORKER_STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stopping.set)
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
        pool.start()  # the relay thread inherits the blocked stop signals: they go to this thread
        self.listener.start(loop, self.listen_sock)
        loop.add_reader(self.control_fd, self._on_control)
        # Handlers are in place: a stop signal that arrived since the fork is delivered now, not lost.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_STOP_SIGNALS)
        self._tell_supervisor(MSG_READY)
        self._heartbeat_timer = loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)
        await self._stopping.wait()
        if os.getppid() != self.supervisor_pid:  # e.g. systemd's SIGTERM after the supervisor died
            self.supervisor_gone = True
        self.fail_open = self.supervisor_gone and self.config.capture.on_failure == "open"
        if self.fail_open:
            log.error("supervisor is gone; taking no new connections (capture.on_failure: open)")
            plan = capture.CapturePlan.from_config(self.config)
            # In a thread: pyroute2 runs its own event loop, which cannot nest in ours.
            with contextlib.suppress(capture.CaptureError):  # the last one standing retries it all
                await asyncio.to_thread(capture.install, plan, capture_new=False)
        elif self.supervisor_gone:
            log.error("supervisor is gone; capture stays in place (capture.on_failure: closed)")
        self.listener.stop_accepting()
        deadline = time.monotonic() + self.config.relay.drain_timeout
        if pool.live_connections:
            log.info("draining", worker=self.index, live_connections=pool.live_connections)
        while pool.live_connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
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

    def remove_capture_if_last(self) -> None:
        """After serve(), on_failure open, supervisor dead: the last process of the daemon removes the
        capture. Runs after the event loop ended (pyroute2 cannot run inside it)."""
        if not self.fail_open:
            return
        plan = capture.CapturePlan.from_config(self.config)
        if not self.survivors.last_one_standing():
            log.info("another nodeproxy process is still running; it removes the capture", worker=self.index)
            return
        try:
            removed = capture.remove(plan)
        except capture.CaptureError as err:
            log.error("could not remove the capture; run `nodeproxy cleanup`", error=str(err))
            return
        self.survivors.mark_done()
        log.warning("removed the capture after the supervisor died", worker=self.index, removed=removed)

    def _tell_supervisor(self, message: bytes) -> None:
        try:
            os.write(self.status_fd, message)
        except BlockingIOError:  # the supervisor is behind on reading; it knows we are alive anyway
            pass
        except BrokenPipeError:
            self._supervisor_lost()

    def _heartbeat(self) -> None:
        """Also while draining, however long relay.drain_timeout is: a draining worker is alive."""
        self._tell_supervisor(MSG_HEARTBEAT)
        self._heartbeat_timer = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    def _supervisor_lost(self) -> None:
        self.supervisor_gone = True
        self._stopping.set()

    def _on_control(self) -> None:
        """Validated configs from the supervisor, one JSON document per line."""
        chunk = os.read(self.control_fd, 1 << 20)
        if not chunk:  # the supervisor is gone: stop like on SIGTERM
            asyncio.get_running_loop().remove_reader(self.control_fd)
            self._supervisor_lost()
            return
        self._control_buffer += chunk
        while b"\n" in self._control_buffer:
            line, self._control_buffer = self._control_buffer.split(b"\n", 1)
            config = Config.model_validate_json(line)
            state = self.updater.apply(config)
            self.listener.relay_config = config.relay
            self.config = config
            log.debug("worker applied config", worker=self.index, generation=state.generation)


def _worker_main(worker: Worker) -> None:
    """Entry point of a forked worker; never returns. Stop signals are still blocked (see _spawn)."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)  # the supervisor's wakeup pipe is not ours
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads arrive through the control pipe
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for sig in WORKER_STOP_SIGNALS:  # until serve() installs the loop's handlers (still blocked)
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP, signal.SIGCHLD})
        uvloop.run(worker.serve())
        worker.remove_capture_if_last()
    except BaseException as err:  # a worker must report why it died before it goes
        log.exception("worker crashed", worker=worker.index, error=repr(err))
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


# -- supervisor -----------------------------------------------------------------------------------------


@dataclass
class WorkerHandle:
    index: int
    pid: int
    control_w: int  # non-blocking
    status_r: int  # non-blocking
    last_heard: float  # monotonic time of the last byte on the status pipe (or of the fork)
    ready: bool = False
    status_open: bool = True
    outbox: bytes = b""  # unsent rest of the config line being written; a worker reads whole lines
    next_config: bytes | None = None  # newest config waiting for the outbox (older ones are dropped)
    killed_for_silence: bool = False


class DaemonFailure(Exception):
    """The daemon cannot go on (crash loop, failed start); the message says why."""


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
        self.selector = selectors.DefaultSelector()
        self._signals: collections.deque[int] = collections.deque()
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop_signal: str | None = None
        self._starting = True
        self._deaths: collections.deque[float] = collections.deque()
        self._respawn_due: dict[int, float] = {}
        self._last_respawn = 0.0
        self._instance: capture.InstanceLock | None = None
        self._survivors: capture.SurvivorLock | None = None
        self._unforked: dict[int, socket.socket] = {}  # listeners opened at start, not yet handed over

    def run(self) -> int:
        # Block our signals before anything else (cli.main did so already when run from the command line),
        # then let them in only once the handlers are set: nothing early can kill us or get lost.
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        for sig in SUPERVISOR_SIGNALS:
            signal.signal(sig, self._on_signal)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._drain_wakeup)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        fd_limit = raise_fd_limit()
        # Refuse before touching anything if another daemon owns the capture here (raises CaptureError).
        self._instance = capture.InstanceLock(self.plan)
        self._survivors = capture.SurvivorLock(self.plan, fresh=True)
        clean = False
        installed = False
        try:
            # Every listener first, then the forks: the SO_REUSEPORT group is complete before any worker
            # serves (and a group-wide balancer program could be attached to it here).
            self._unforked = {i: self._open_listener(i) for i in range(self.config.relay.effective_threads)}
            for index in sorted(self._unforked):
                self._spawn(index)
            self._wait_until_ready()
            if self._stop_signal is None:
                installed = True
                capture.install(self.plan)
                listen = self.config.listeners.outbound
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
            log.info("stopping", signal=self._stop_signal)
            sd_notify("STOPPING=1")
            self._drain(stop_capture=installed)
            clean = True
        except DaemonFailure as failure:
            log.error(str(failure))
            sd_notify("STOPPING=1")
            self._drain(stop_capture=installed and self.config.capture.on_failure == "open")
        finally:
            for sock in self._unforked.values():  # a start that failed half way
                sock.close()
            self._kill_workers()
            code = self._release_capture(clean, installed)
            if self.ready_file:
                Path(self.ready_file).unlink(missing_ok=True)
            self._survivors.close()
            self._instance.close()
        log.info("nodeproxy stopped", exit_code=code)
        return code

    def _release_capture(self, clean: bool, installed: bool) -> int:
        """Remove the capture after a clean stop, or after a failure when on_failure is open."""
        if not clean and self.config.capture.on_failure == "closed":
            if installed:
                log.error(
                    "leaving the capture rules in place (capture.on_failure: closed): captured "
                    "connections fail until nodeproxy runs again or `nodeproxy cleanup` removes them"
                )
            return 1
        try:
            capture.remove(self.plan)
        except capture.CaptureError as err:
            log.error("could not remove the capture rules; run `nodeproxy cleanup`", error=str(err))
            return 1
        return 0 if clean else 1

    # -- signals and the event loop --------------------------------------------------------------------

    def _on_signal(self, signo: int, _frame: FrameType | None) -> None:
        self._signals.append(signo)  # handled by the loop; the wakeup fd ends its select()

    def _drain_wakeup(self, _events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wakeup_r, 4096):
                pass

    def _turn(self, timeout: float) -> None:
        """One loop turn: wait for pipes or signals at most `timeout` seconds, then handle what came."""
        now = time.monotonic()
        if self._respawn_due:
            timeout = max(0.0, min(timeout, min(self._respawn_due.values()) - now))
        for key, events in self.selector.select(timeout):
            callback: Callable[[int], None] = key.data
            callback(events)
        # Right after reading the status pipes: time we spent elsewhere (a slow reload) is not held
        # against the workers.
        self._check_heartbeats()
        while self._signals:
            signo = self._signals.popleft()
            if signo in (signal.SIGTERM, signal.SIGINT):
                self._stop_signal = self._stop_signal or signal.Signals(signo).name
            elif signo == signal.SIGHUP:
                self.reload()
            elif signo == signal.SIGCHLD:
                self._reap()
        now = time.monotonic()
        for index, due in list(self._respawn_due.items()):
            if due <= now and self._stop_signal is None:
                del self._respawn_due[index]
                self._last_respawn = now
                self._spawn(index)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while self._stop_signal is None and not all(h.ready for h in self.workers.values()):
            if time.monotonic() > deadline:
                slow = sorted(h.index for h in self.workers.values() if not h.ready)
                raise DaemonFailure(f"workers {slow} did not report ready within {START_TIMEOUT:.0f} s")
            self._turn(0.5)
        self._starting = False

    def _supervise(self) -> None:
        while self._stop_signal is None:
            self._turn(HEARTBEAT_INTERVAL)

    # -- workers ---------------------------------------------------------------------------------------

    def _open_listener(self, index: int) -> socket.socket:
        listen = self.config.listeners.outbound
        try:
            return open_listener((str(listen.host), listen.port))
        except OSError as err:
            raise DaemonFailure(f"cannot open the listener {listen} for worker {index}: {err}") from err

    def _spawn(self, index: int) -> None:
        # Each worker's listener is ours only until the fork: the worker holds the only copy. A
        # replacement gets a fresh one (the dead worker's went with it).
        listen_sock = self._unforked.pop(index, None) or self._open_listener(index)
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        assert self._survivors is not None
        # The child starts with every signal we handle blocked, so none reaches it before its own
        # handlers exist (our Python handlers, copied by fork, would swallow a SIGTERM).
        signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(control_w)
                    os.close(status_r)
                    for fd in (self._wakeup_r, self._wakeup_w, self.selector.fileno()):
                        os.close(fd)
                    for other in self.workers.values():
                        os.close(other.control_w)
                        os.close(other.status_r)
                    for sibling in self._unforked.values():
                        sibling.close()
                    os.set_blocking(status_w, False)
                    survivors = self._survivors.reopen_in_child(self.plan)
                    worker = Worker(
                        index,
                        self.config,
                        listen_sock,
                        control_r,
                        status_w,
                        self.access_log,
                        survivors,
                        supervisor_pid=os.getppid(),
                    )
                except BaseException:
                    log.exception("worker setup failed", worker=index)
                    sys.stderr.flush()
                    os._exit(1)
                _worker_main(worker)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISOR_SIGNALS)
        listen_sock.close()
        os.close(control_r)
        os.close(status_w)
        os.set_blocking(control_w, False)
        os.set_blocking(status_r, False)
        handle = WorkerHandle(index, pid, control_w, status_r, last_heard=time.monotonic())
        self.workers[index] = handle
        self.selector.register(status_r, selectors.EVENT_READ, lambda _e: self._on_status(handle))
        log.debug("worker started", worker=index, pid=pid)

    def _on_status(self, handle: WorkerHandle) -> None:
        try:
            data = os.read(handle.status_r, 4096)
        except BlockingIOError:
            return
        if not data:  # the worker is gone; SIGCHLD reaps it
            self._close_status(handle)
            return
        handle.last_heard = time.monotonic()
        if MSG_READY in data and not handle.ready:
            handle.ready = True
            log.debug("worker ready", worker=handle.index, pid=handle.pid)

    def _close_status(self, handle: WorkerHandle) -> None:
        if handle.status_open:
            self.selector.unregister(handle.status_r)
            os.close(handle.status_r)
            handle.status_open = False

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for handle in self.workers.values():
            if not handle.killed_for_silence and now - handle.last_heard > HEARTBEAT_TIMEOUT:
                log.error(
                    "worker stopped answering; killing it",
                    worker=handle.index,
                    pid=handle.pid,
                    silent_for=round(now - handle.last_heard, 1),
                )
                handle.killed_for_silence = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(handle.pid, signal.SIGKILL)

    def _reap(self) -> None:
        for handle in list(self.workers.values()):
            pid, status = os.waitpid(handle.pid, os.WNOHANG)
            if not pid:
                continue
            self._forget(handle)
            how = describe_exit(status)
            if self._stop_signal is not None:
                log.info("worker exited", worker=handle.index, pid=handle.pid, **how)
                continue
            if self._starting:
                raise DaemonFailure(
                    f"worker {handle.index} (pid {handle.pid}) died before it was ready: "
                    + ", ".join(f"{k} {v}" for k, v in how.items())
                )
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths and self._deaths[0] < now - CRASH_LOOP_WINDOW:
                self._deaths.popleft()
            log.error(
                "worker died; replacing it",
                worker=handle.index,
                pid=handle.pid,
                killed_for_silence=handle.killed_for_silence,
                **how,
            )
            if len(self._deaths) > CRASH_LOOP_LIMIT:
                raise DaemonFailure(
                    f"crash loop: {len(self._deaths)} worker deaths within {CRASH_LOOP_WINDOW:.0f} s "
                    f"(limit {CRASH_LOOP_LIMIT}); stopping nodeproxy"
                )
            self._respawn_due[handle.index] = max(now, self._last_respawn + RESPAWN_BACKOFF)

    def _forget(self, handle: WorkerHandle) -> None:
        self._close_status(handle)
        with contextlib.suppress(KeyError):
            self.selector.unregister(handle.control_w)
        os.close(handle.control_w)
        del self.workers[handle.index]

    # -- configs ---------------------------------------------------------------------------------------

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
            self._send(handle, line)
        self.config = new  # a worker started from now on begins with it
        log.info(
            "config reloaded",
            services=len(new.services),
            endpoints=sum(len(s.endpoints) for s in new.services),
        )

    def _send(self, handle: WorkerHandle, line: bytes) -> None:
        if handle.outbox:  # a line is half written: the new config waits, replacing any older one
            handle.next_config = line
            return
        handle.outbox = line
        self._write_outbox(handle)

    def _write_outbox(self, handle: WorkerHandle) -> None:
        while handle.outbox:
            try:
                written = os.write(handle.control_w, handle.outbox)
            except BlockingIOError:
                break
            except BrokenPipeError:  # the worker is dying; its replacement starts from self.config
                handle.outbox, handle.next_config = b"", None
                break
            handle.outbox = handle.outbox[written:]
            if not handle.outbox and handle.next_config is not None:
                handle.outbox, handle.next_config = handle.next_config, None
        registered = handle.control_w in self.selector.get_map()
        if handle.outbox and not registered:
            self.selector.register(
                handle.control_w, selectors.EVENT_WRITE, lambda _e: self._write_outbox(handle)
            )
        elif not handle.outbox and registered:
            self.selector.unregister(handle.control_w)

    # -- stopping --------------------------------------------------------------------------------------

    def _drain(self, stop_capture: bool) -> None:
        """Workers stop accepting, which resets whatever still waits in their accept queues, and drain.

        With stop_capture, new connections stop being captured first (passthrough ones then go direct,
        VIPs fail fast) while established ones keep their divert rule."""
        self._stop_signal = self._stop_signal or "error"  # from now on a worker exit is expected
        self._respawn_due.clear()
        if stop_capture:
            try:
                capture.install(self.plan, capture_new=False, lock_budget=capture.IPTABLES_LOCK_BUDGET / 2)
            except capture.CaptureError as err:
                log.error("could not stop capturing new connections; draining anyway", error=str(err))
        for handle in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.relay.drain_timeout + KILL_GRACE
        while self.workers and time.monotonic() < deadline:
            self._turn(0.05)
            self._reap()

    def _kill_workers(self) -> None:
        for handle in list(self.workers.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
            _pid, status = os.waitpid(handle.pid, 0)
            log.warning("worker killed", worker=handle.index, pid=handle.pid, **describe_exit(status))
            self._forget(handle)


def run(
    config: Config, config_path: str | None, ready_file: str | None = None, access_log: bool = True
) -> int:
    return Supervisor(config, config_path, ready_file, access_log).run()
