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
import functools
import gc
import hashlib
import itertools
import json
import logging
import os
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
import uvloop

from nodeproxy import _reuseport, accesslog, admin, capture, metrics
from nodeproxy.accesslog import AtomicLineLoggerFactory
from nodeproxy.config import Config, ConfigError, load_config, parse_config
from nodeproxy.proxy.http import HttpProxy
from nodeproxy.proxy.listener import OutboundListener, open_listener
from nodeproxy.proxy.relay import RelayPool
from nodeproxy.state.routing import StateUpdater
from nodeproxy.tracing import Tracer

if TYPE_CHECKING:
    from nodeproxy.proxy.mesh import MeshWorker

log = structlog.get_logger("nodeproxy")

# Settings bound at start-up; a reload that changes them is refused with this explanation.
RESTART_ONLY = (
    "listeners",
    "relay.threads",
    "relay.pipe_size",
    "capture",
    "metrics.enabled",
    "metrics.address",
    "metrics.port",
    "access_log.output",
)
# identity and mesh: everything but the inventory (workloads, nodes, peers) is bound at start.
IDENTITY_RELOADABLE = frozenset({"workloads", "nodes"})
MESH_RELOADABLE = frozenset({"peers"})
SUPERVISOR_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD})
WORKER_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
RESPAWN_BACKOFF = 1.0  # seconds between replacing crashed workers, so a crash loop cannot spin
KILL_GRACE = 5.0  # seconds after the drain deadline before workers are killed
# Seconds a stopping worker spends exporting its queued spans: within KILL_GRACE, so it is never killed
# for it.
TRACE_FLUSH_TIMEOUT = 2.0
HEARTBEAT_INTERVAL = 1.0  # seconds between a worker's heartbeats
HEARTBEAT_TIMEOUT = 10.0  # seconds without a heartbeat before a worker is SIGKILLed and replaced
START_TIMEOUT = 30.0  # seconds for every worker to report ready at start (systemd's TimeoutStartSec)
CRASH_LOOP_LIMIT = 5  # more than this many worker deaths ...
CRASH_LOOP_WINDOW = 60.0  # ... within this many seconds end the daemon (exit status 1)
SNAPSHOT_TIMEOUT = 2.0  # seconds an admin request waits for the workers' snapshots before answering without
# The watchdog is fed only while every worker was heard this recently (seconds).
WATCHDOG_HEARTBEAT_AGE = 3 * HEARTBEAT_INTERVAL
STATUS_INTERVAL = 2.0  # seconds between checks for a changed sd_notify STATUS= line (connection counts)
PUSHED_SUFFIX = ".pushed"  # a config pushed through the admin API is kept next to the file: <file>.pushed
# Status pipe lines, worker -> supervisor (each ends in a newline):
MSG_READY = b"R"  # the worker serves its listener
MSG_HEARTBEAT = b"H"  # "H <active connections> <accepted>": alive, with the counts for STATUS= lines
MSG_SNAPSHOT = b"S"  # "S <request id> <json>": the worker's live state, asked for by a control line
# Control pipe lines, supervisor -> worker (each ends in a newline):
CTL_CONFIG = b"C"  # "C <config json>": apply this validated config
CTL_SNAPSHOT = b"S"  # "S <request id>[ m]": send a snapshot (with " m": the metrics only)
SNAPSHOT_METRICS_ONLY = b"m"
CTL_LOG_LEVEL = b"L"  # "L <level>"
CTL_ACCESS_LOG_LEVEL = b"A"  # "A <access-log level>"
CTL_DRAIN = b"D"  # stop accepting; established connections go on
CTL_HANDOFF = b"U"  # send the listener over the handoff socket (an upgrade)
HANDOVER_TIMEOUT = START_TIMEOUT + 10.0  # seconds a successor has from taking the listeners to its commit
MAX_QUEUED_CONTROL_LINES = 64  # per worker; beyond it the oldest non-config lines are dropped
MAX_STATUS_BUFFER = 64 << 20  # bytes of an unfinished status line before the worker counts as broken


class LogLevel:
    """The level below which log events are dropped; changed at run time through the admin API.

    A processor rather than make_filtering_bound_logger's fixed level: loggers are cached on first use,
    so a level baked into their class could not change afterwards. Below-level calls then cost a dict
    lookup each; nothing logs at debug level per connection."""

    _NUMBERS: ClassVar[dict[str, int]] = {
        "debug": 10,
        "info": 20,
        "msg": 20,
        "warning": 30,
        "warn": 30,
        "error": 40,
        "exception": 40,
    }

    def __init__(self, level: str = "info") -> None:
        self.level = level
        self.threshold = self._NUMBERS[level]

    def set(self, level: str) -> None:
        if level not in admin.LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}")
        self.level, self.threshold = level, self._NUMBERS[level]

    def __call__(
        self, _logger: object, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self._NUMBERS.get(method, 50) < self.threshold:
            raise structlog.DropEvent
        return event


LOG_LEVEL = LogLevel()
# The level access-log records are filtered at: the higher of the log level and the access-log level
# (accesslog.set_level), so both PUT /v1/log-level and PUT /v1/access-log-level can quiet them. A plain
# attribute, recomputed when either changes, because it is read once per record.
ACCESS_LOG_THRESHOLD = accesslog.FixedLevel()


def update_access_log_threshold() -> None:
    ACCESS_LOG_THRESHOLD.threshold = max(LOG_LEVEL.threshold, accesslog.ACCESS_LEVEL.threshold)


def configure_logging(level: str = "info") -> None:
    LOG_LEVEL.set(level)
    update_access_log_threshold()
    structlog.configure(
        processors=[
            LOG_LEVEL,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),  # LOG_LEVEL filters
        logger_factory=AtomicLineLoggerFactory(sys.stderr),  # one write() per line, also unbuffered
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode(), path)
        except OSError as err:  # like libsystemd's sd_notify: report, never fail the caller
            log.warning("sd_notify failed", message=message.split("\n", 1)[0], error=str(err))


def _get(config: Config, dotted: str) -> object:
    value: object = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def mesh_restart_changes(old: Config, new: Config) -> list[str]:
    """The identity/mesh settings that differ and need a restart (SIGHUP and pushes refuse them)."""
    changed: list[str] = []
    for section, reloadable in (("identity", IDENTITY_RELOADABLE), ("mesh", MESH_RELOADABLE)):
        before, after = getattr(old, section), getattr(new, section)
        if (before is None) != (after is None):
            changed.append(section)
        elif before is not None and after is not None:
            changed += [
                f"{section}.{name}"
                for name in type(before).model_fields
                if name not in reloadable and getattr(before, name) != getattr(after, name)
            ]
    return changed


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
        handoff_sock: socket.socket | None = None,
        load_table: _reuseport.LoadTable | None = None,
    ) -> None:
        self.index = index
        self.load_table = load_table
        self.handoff_sock = handoff_sock  # passes our listener to the supervisor for an upgrade
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
        self._status_outbox = bytearray()  # status lines the pipe did not take yet (a large snapshot)
        self._stopping = asyncio.Event()
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self.draining = False
        # Called once when the worker starts draining (POST drain, SIGTERM, supervisor gone), before it
        # stops accepting. The L7 engine registers here to send `Connection: close` to HTTP/1 clients
        # and GOAWAY to HTTP/2 clients; a hook must not block.
        self.drain_hooks: list[Callable[[], None]] = []
        # (SPIFFE id, expiry as Unix time) of the workload certificates this worker holds, for
        # nodeproxy_certificate_expiry_timestamp_seconds; None until the mTLS tunnel gives it one.
        self.certificate_expiry: Callable[[], Iterable[tuple[str, float]]] | None = None
        self.mesh: MeshWorker | None = None  # the mTLS tunnel, when the config has `mesh`

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in WORKER_STOP_SIGNALS:
            loop.add_signal_handler(sig, self._stopping.set)
        self.updater.apply(self.config)
        self.metrics = metrics.WorkerMetrics(self.config, self.config.metrics.max_series)
        # Propagation and span export; its settings are read at start (a reload keeps them).
        self.tracer = Tracer(self.config.tracing)
        pool = self.pool = RelayPool(1, self.config.relay.pipe_size)
        listen = self.config.listeners.outbound
        update_access_log_threshold()
        self.listener = OutboundListener(
            (str(listen.host), listen.port),
            self.config.relay,
            self.updater,
            pool,
            self.access_log and self.config.access_log.enabled,
            worker=self.index,
            workers=self.config.relay.effective_threads,
            on_load_change=(
                functools.partial(self.load_table.set, self.index) if self.load_table is not None else None
            ),
            metrics=self.metrics if self.config.metrics.enabled else None,
            # stdout, stderr or a file (O_APPEND: every worker appends whole records), and sampling.
            access_log_writer=accesslog.AccessLog.from_config(
                self.config.access_log, self.access_log, ACCESS_LOG_THRESHOLD
            ),
        )
        # The HTTP engine serves the ports whose protocol is HTTP; upgraded (101) connections move to
        # the splice relay, and `auto` connections that are not HTTP come back to the listener as TCP.
        http = self.http = HttpProxy(
            lambda: self.updater.current,
            self.config.http,
            self.config.relay,
            access_log=self.access_log and self.config.access_log.enabled,
            splice_relay=pool,
            not_http=self.listener.adopt_tcp,
            access_log_writer=self.listener.access_log,
            metrics=self.metrics if self.config.metrics.enabled else None,
            tracer=self.tracer,
            # JWT and authorization policies per request, once the mesh (identities, policies) runs.
            authz=lambda: self.mesh.http_authz if self.mesh is not None else None,
        )
        self.listener.http = http
        self.drain_hooks.append(http.begin_drain)
        pool.start()  # the relay thread inherits the blocked stop signals: they go to this thread
        http.start(loop)
        # Everything built so far (config models, routing state, modules) lives as long as the worker:
        # move it out of the collector's generations, so the young-generation collections that the
        # per-request objects trigger never scan it (a full collection over a large heap took
        # milliseconds, several times a second under load).
        gc.collect()
        gc.freeze()
        if self.config.mesh is not None:
            await self._start_mesh(loop)
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
        self.begin_drain()
        deadline = time.monotonic() + self.config.relay.drain_timeout
        if pool.live_connections:
            log.info("draining", worker=self.index, live_connections=pool.live_connections)
        mesh = self.mesh
        while (
            pool.live_connections or http.live_connections or (mesh is not None and mesh.live_streams)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        http.close()  # first: an upgraded connection may still move to the splice relay
        self.tracer.close(TRACE_FLUSH_TIMEOUT)  # the spans of the last requests, within a bound
        if mesh is not None:  # before the listener: the streams it resets are accounted there
            mesh.close()
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

    async def _start_mesh(self, loop: asyncio.AbstractEventLoop) -> None:
        """The mTLS tunnel of this worker (nodeproxy.proxy.mesh): certificates, engine, 15008 and 15006."""
        from nodeproxy.proxy.mesh import MeshWorker

        mesh = self.mesh = MeshWorker(self.config, self.index, self.listener)
        self.listener.mesh = mesh
        self.drain_hooks.append(mesh.stop_accepting)
        self.certificate_expiry = mesh.certificate_expiry
        await mesh.start(loop)
        # HTTP ports' requests to pods on peer nodes ride the same tunnel (nodeproxy.proxy.mesh_entry).
        self.http.use_mesh(mesh.entry.address, mesh.entry.token, mesh.http_path, mesh.identity_of)

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

    def begin_drain(self) -> None:
        """Stop accepting (new connections go to the other workers or, with capture stopped, direct);
        established connections go on. Idempotent."""
        if self.draining:
            return
        self.draining = True
        for hook in self.drain_hooks:
            hook()
        self.listener.stop_accepting()
        log.info("worker draining", worker=self.index, live_connections=self.pool.live_connections)

    def _hand_over_listener(self) -> None:
        """An upgrade: a copy of our listener goes to the supervisor, for the successor. We keep
        accepting on it until the successor commits (then CTL_DRAIN)."""
        if self.handoff_sock is None or self.draining or self.listen_sock.fileno() < 0:
            log.error("cannot hand over the listener (draining)", worker=self.index)
            return
        socket.send_fds(self.handoff_sock, [b"L"], [self.listen_sock.fileno()])

    def snapshot(self) -> dict[str, Any]:
        """This worker's live state for the admin API: counters and every endpoint's connections."""
        stats = self.listener.stats
        routes = []
        for (vip, port), route in sorted(self.updater.current.routes.items()):
            routes.append(
                {
                    "service": route.service,
                    "vip": vip,
                    "port": port,
                    "protocol": route.protocol,
                    "endpoints": [
                        {
                            "address": ep.address,
                            "port": ep.port,
                            "weight": ep.weight,
                            "node": ep.node,
                            "active": ep.active,
                            "total": ep.total,
                            "connect_failures": ep.connect_failures,
                        }
                        for ep in route.endpoints
                    ],
                }
            )
        return {
            "pid": os.getpid(),
            "generation": self.updater.current.generation,
            "draining": self.draining,
            "active_connections": self.pool.live_connections,
            "stats": {
                "accepted": stats.accepted,
                "refused": stats.refused,
                "connect_failures": stats.connect_failures,
                "dispatch_errors": stats.dispatch_errors,
                "closed": dict(stats.closed),
            },
            "routes": routes,
            "http": self._http_snapshot(),
            "mesh": self._mesh_snapshot(),
        }

    def _http_snapshot(self) -> dict[str, Any]:
        """The HTTP engine's counters (nodeproxy.proxy.http.HttpStats)."""
        stats = self.http.stats
        return {
            "requests": stats.requests,
            "local_replies": stats.local_replies,
            "local_replies_by_flag": dict(stats.local_replies_by_flag),
            "attempts_failed": stats.attempts_failed,
            "retries": stats.retries,
            "ejections": stats.ejections,
            "responses_by_class": {
                f"{i}xx" if i else "none": n for i, n in enumerate(stats.status_classes) if n
            },
        }

    def _mesh_snapshot(self) -> dict[str, Any] | None:
        mesh = self.mesh
        if mesh is None:
            return None
        return {
            "tunneled": self.listener.stats_tunneled,
            "live_streams": mesh.live_streams,
            "tls_connections": mesh.engine.tls_connections,
            "inbound_allowed": mesh.inbound_allowed,
            "inbound_denied": mesh.inbound_denied,
            "tls_failures": mesh.tls_failures,
            "http_tunneled": mesh.entry.accepted,
            "http_tunnel_refused": mesh.entry.refused,
            "certificates": {identity: expiry for identity, expiry in mesh.certificate_expiry()},
        }

    def metrics_snapshot(self) -> dict[str, Any]:
        """This worker's metrics (nodeproxy.metrics.WorkerMetrics.snapshot) with the listener's and the
        relay's counters and gauges."""
        stats = self.listener.stats
        relays = self.pool.workers
        http = self.http
        counters: dict[str, list[tuple[tuple[str, ...], float]]] = {
            "nodeproxy_connections_accepted_total": [((), stats.accepted)],
            "nodeproxy_connections_refused_total": [((), stats.refused)],
            "nodeproxy_upstream_connect_failures_total": [((), stats.connect_failures)],
            "nodeproxy_dispatch_errors_total": [((), stats.dispatch_errors)],
            "nodeproxy_relay_connections_closed_total": [((name,), n) for name, n in stats.closed.items()],
            "nodeproxy_relay_bytes_total": [
                (("upstream",), stats.relay_bytes_up),
                (("downstream",), stats.relay_bytes_down),
            ],
            "nodeproxy_access_log_dropped_total": [((), self.listener.access_log.dropped)],
        }
        spans = self.tracer.stats()
        counters["nodeproxy_tracing_spans_total"] = [
            ((outcome,), spans[outcome]) for outcome in ("queued", "dropped", "exported", "rejected")
        ]
        counters["nodeproxy_tracing_export_failures_total"] = [((), spans["failed"])]
        gauges: dict[str, list[tuple[tuple[str, ...], float]]] = {
            "nodeproxy_active_connections": [
                (("tcp",), self.pool.live_connections),
                (("http",), http.live_connections),
            ],
            "nodeproxy_relay_connecting": [((), sum(r.connecting for r in relays))],
            "nodeproxy_relay_pipes_pooled": [((), sum(r.pipes_pooled for r in relays))],
            "nodeproxy_http_upstream_connections": [((), http.upstream_connections)],
            "nodeproxy_worker_config_generation": [((str(self.index),), self.updater.current.generation)],
            "nodeproxy_tracing_spans_pending": [((), spans["pending"])],
        }
        if self.certificate_expiry is not None:
            gauges["nodeproxy_certificate_expiry_timestamp_seconds"] = [
                ((identity,), expiry) for identity, expiry in self.certificate_expiry()
            ]
        return {
            "pid": os.getpid(),
            "generation": self.updater.current.generation,
            "metrics": self.metrics.snapshot(counters, gauges),
        }

    def _tell_supervisor(self, message: bytes) -> None:
        """Queue one status line; a line is never split by another, so a snapshot that does not fit the
        pipe makes later lines wait behind it (heartbeats are skipped instead: see _heartbeat)."""
        self._status_outbox += message + b"\n"
        self._flush_status()

    def _flush_status(self) -> None:
        while self._status_outbox:
            try:
                written = os.write(self.status_fd, self._status_outbox)
            except BlockingIOError:  # the supervisor is behind on reading; finish when the pipe drains
                break
            except BrokenPipeError:
                self._status_outbox.clear()
                self._supervisor_lost()
                break
            del self._status_outbox[:written]
        loop = asyncio.get_running_loop()
        if self._status_outbox:
            loop.add_writer(self.status_fd, self._flush_status)
        else:
            loop.remove_writer(self.status_fd)

    def _heartbeat(self) -> None:
        """Also while draining, however long relay.drain_timeout is: a draining worker is alive."""
        if not self._status_outbox:  # else the supervisor is reading a snapshot of ours: alive enough
            self._tell_supervisor(
                b"%s %d %d" % (MSG_HEARTBEAT, self.pool.live_connections, self.listener.stats.accepted)
            )
        self._heartbeat_timer = asyncio.get_running_loop().call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    def _supervisor_lost(self) -> None:
        self.supervisor_gone = True
        self._stopping.set()

    def _on_control(self) -> None:
        """Lines from the supervisor: a validated config, a snapshot request, a log level, drain."""
        chunk = os.read(self.control_fd, 1 << 20)
        if not chunk:  # the supervisor is gone: stop like on SIGTERM
            asyncio.get_running_loop().remove_reader(self.control_fd)
            self._supervisor_lost()
            return
        self._control_buffer += chunk
        while b"\n" in self._control_buffer:
            line, self._control_buffer = self._control_buffer.split(b"\n", 1)
            kind, _, payload = line.partition(b" ")
            if kind == CTL_CONFIG:
                config = Config.model_validate_json(payload)
                state = self.updater.apply(config)
                self.listener.relay_config = config.relay
                self.metrics.update_config(config)
                if self.mesh is not None:
                    self.mesh.apply_config(config)
                self.config = config
                log.debug("worker applied config", worker=self.index, generation=state.generation)
            elif kind == CTL_SNAPSHOT:
                request_text, _, what = payload.partition(b" ")
                request_id = int(request_text)
                document = self.metrics_snapshot() if what == SNAPSHOT_METRICS_ONLY else self.snapshot()
                self._tell_supervisor(b"%s %d %s" % (MSG_SNAPSHOT, request_id, json.dumps(document).encode()))
            elif kind == CTL_LOG_LEVEL:
                LOG_LEVEL.set(payload.decode())
                update_access_log_threshold()
            elif kind == CTL_ACCESS_LOG_LEVEL:
                accesslog.set_level(payload.decode())
                update_access_log_threshold()
            elif kind == CTL_DRAIN:
                self.begin_drain()
            elif kind == CTL_HANDOFF:
                self._hand_over_listener()
            else:
                raise ValueError(f"unknown control line from the supervisor: {line[:40]!r}")


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
    status_buffer: bytes = b""  # the unfinished status line
    outbox: bytes = b""  # unsent rest of the control line being written; a worker reads whole lines
    # Control lines waiting for the outbox, in order; a new config replaces a waiting older one.
    queue: collections.deque[bytes] = field(default_factory=collections.deque)
    killed_for_silence: bool = False
    active_connections: int = 0  # as of the last heartbeat
    accepted: int = 0
    handoff: socket.socket | None = None  # receives the worker's listener for an upgrade


@dataclass
class Handover:
    """An upgrade in progress on the running daemon: a successor is taking the listeners."""

    successor_pid: int
    deadline: float
    respond: Callable[[admin.Response], None]
    waiting: set[int]
    listeners: dict[int, int] = field(default_factory=dict)  # worker index -> received descriptor
    sent: bool = False  # the successor has the listeners


@dataclass
class PendingSnapshots:
    """An admin request waiting for the workers' snapshots."""

    waiting: set[int]
    deadline: float
    done: Callable[[dict[str, Any]], None]
    results: dict[str, Any] = field(default_factory=dict)


@dataclass
class ActiveConfig:
    """The running config and where it came from, as GET /v1/config shows it."""

    config: Config
    version: int  # 1 at start, +1 for every reload or push that took effect
    source: str  # "file", "pushed" (through the admin API, or restored from <file>.pushed), "default"
    applied_at: float  # time.time()

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.config.model_dump_json().encode()).hexdigest()


def pushed_path(config_path: str) -> str:
    return config_path + PUSHED_SUFFIX


def choose_startup_config(config_path: str | None) -> tuple[Config, str]:
    """The config to start with, and its source ("file", "pushed" or "default").

    Precedence: the config last applied wins, also across restarts. A config pushed through the admin API
    is saved as <file>.pushed; at start it is used if it is at least as new as the file (an operator who
    edits the file afterwards means the file). SIGHUP applies the file and deletes <file>.pushed. A
    <file>.pushed that no longer validates is logged and skipped. Raises ConfigError for an invalid file.
    """
    from nodeproxy.config import default_config

    if config_path is None:
        return default_config(), "default"
    pushed = pushed_path(config_path)
    try:
        newer = os.stat(pushed).st_mtime >= os.stat(config_path).st_mtime
    except FileNotFoundError:
        newer = False
    if newer:
        try:
            return load_config(pushed), "pushed"
        except ConfigError as err:
            log.error("ignoring the saved pushed config; using the file", path=pushed, problems=err.problems)
    return load_config(config_path), "file"


def write_atomically(path: str, text: str, mode: int = 0o600) -> None:
    """Replace `path` with `text` so a crash leaves the old or the new content, never a mix."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


class DaemonFailure(RuntimeError):
    """The daemon cannot go on (crash loop, failed start); the message says why."""


class Supervisor:
    def __init__(
        self,
        config: Config,
        config_path: str | None,
        ready_file: str | None = None,
        access_log: bool = True,
        admin_socket: str | None = None,
        admin_group: str | None = None,
        config_source: str | None = None,
        takeover_from: str | None = None,
    ) -> None:
        """admin_socket: the admin API's path (admin.default_socket_path() if None, "" for none).
        takeover_from: a running daemon's admin socket: take its listeners over (an upgrade)."""
        self.config = config
        self.active = ActiveConfig(
            config, 1, config_source or ("file" if config_path else "default"), time.time()
        )
        self.config_path = config_path
        self.ready_file = ready_file
        self.access_log = access_log
        self.plan = capture.CapturePlan.from_config(config)
        self.load_table: _reuseport.LoadTable | None = None
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
        self.started_at = time.monotonic()
        self.ready = False  # READY=1 sent: rules, listeners and the admin socket are up
        self.draining = False  # POST drain: no new connections, established ones go on
        self.restarts = 0  # workers replaced since start
        self._snapshot_ids = itertools.count(1)
        self._snapshots: dict[int, PendingSnapshots] = {}
        if admin_socket is None:
            admin_socket = admin.default_socket_path(self.plan.chain_prefix)
        self.admin = (
            admin.AdminServer(admin_socket, self.selector, admin.AdminApi(self), admin_group)
            if admin_socket
            else None
        )
        # The Prometheus endpoint (config metrics.port; 0: none), served from the workers' snapshots.
        self.metrics_state = metrics.SupervisorMetrics()
        self.metrics_server: admin.TcpHttpServer | None = None
        accesslog.set_level(config.access_log.level)  # forked workers start with it
        update_access_log_threshold()
        self.takeover_from = takeover_from
        # An upgrade in progress (we are the old daemon), or done: the successor owns the capture.
        self._handover: Handover | None = None
        self.handed_over = False
        self._successor: subprocess.Popen[bytes] | None = None
        # We are the successor and have not committed: the capture and listeners are still the old
        # daemon's, so a failure now must not touch them.
        self._predecessor_owns_capture = takeover_from is not None
        self._watchdog_interval = _watchdog_interval()
        self._next_watchdog = 0.0
        self._next_status = 0.0
        self._last_status = ""

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
        handoff: admin.HandoffClient | None = None
        if self.takeover_from is not None:  # the old daemon's lock and listeners (raises RuntimeError)
            handoff, lock_fd, self._unforked = self._take_over(self.takeover_from)
            self._instance = capture.InstanceLock.adopt(lock_fd, self.plan)
        else:
            # Refuse before touching anything if another daemon owns the capture here (CaptureError).
            self._instance = capture.InstanceLock(self.plan)
        self._survivors = capture.SurvivorLock(self.plan, fresh=True)
        clean = False
        installed = False
        try:
            if self.admin is not None:  # first: `nodeproxy ctl` can watch the start (ready: 503)
                try:
                    self.admin.open(staged=handoff is not None)
                except admin.AdminError as err:
                    raise DaemonFailure(str(err)) from err
            self._open_metrics_server()
            try:
                # Least-loaded balancing over the workers' listeners (nodeproxy._reuseport).
                self.load_table = _reuseport.LoadTable(self.config.relay.effective_threads)
            except OSError as err:  # no CAP_BPF/CAP_SYS_ADMIN, or a kernel without SK_REUSEPORT programs
                log.warning(
                    "least-loaded balancing unavailable; the kernel's hash spreads connections",
                    error=str(err),
                )
            # Every listener first, then the forks: the SO_REUSEPORT group is complete before any worker
            # serves.
            if handoff is None:
                self._unforked = {
                    i: self._open_listener(i) for i in range(self.config.relay.effective_threads)
                }
            for index in sorted(self._unforked):
                self._spawn(index)
            self._wait_until_ready()
            if handoff is not None and self._stop_signal is None:
                self._commit_takeover(handoff)
            if self._stop_signal is None:
                installed = True
                capture.install(self.plan)  # an upgrade: the same rules again (idempotent, atomic)
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
                self.ready = True
                sd_notify(f"READY=1\nSTATUS={self._status_line()}\nMAINPID={os.getpid()}")
                self._supervise()
            log.info("stopping", signal=self._stop_signal)
            if not self.handed_over:  # else systemd follows the successor (MAINPID) already
                sd_notify("STOPPING=1\nSTATUS=stopping: draining connections")
            self._drain(stop_capture=installed and not self.handed_over)
            clean = True
        except DaemonFailure as failure:
            log.error(str(failure))
            sd_notify("STOPPING=1")
            self._drain(
                stop_capture=installed
                and self.config.capture.on_failure == "open"
                and not self._predecessor_owns_capture
            )
        finally:
            if handoff is not None:
                handoff.close()  # before the commit: the old daemon goes on as if nothing happened
            for sock in self._unforked.values():  # a start that failed half way
                sock.close()
            self._kill_workers()
            self._finish_snapshots()  # requests still waiting get what came
            if self.admin is not None:
                self.admin.flush(timeout=1.0)  # e.g. the answer to POST quit
                self.admin.close()
            if self.metrics_server is not None:
                self.metrics_server.close()
            code = self._release_capture(clean, installed)
            if self.ready_file:
                with contextlib.suppress(FileNotFoundError):
                    if Path(self.ready_file).read_text().strip() == str(os.getpid()):  # not a successor's
                        Path(self.ready_file).unlink()
            self._survivors.close()
            self._instance.close()
        log.info("nodeproxy stopped", exit_code=code)
        return code

    def _release_capture(self, clean: bool, installed: bool) -> int:
        """Remove the capture after a clean stop, or after a failure when on_failure is open."""
        if self.handed_over:
            log.info("capture left in place: the successor owns it")
            return 0
        if self._predecessor_owns_capture:
            log.error("upgrade failed; the running daemon keeps serving")
            return 1
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
        wake_ups = [*self._respawn_due.values(), *(p.deadline for p in self._snapshots.values())]
        if self._watchdog_interval:
            wake_ups.append(self._next_watchdog)
        if wake_ups:
            timeout = max(0.0, min(timeout, min(wake_ups) - now))
        for key, events in self.selector.select(timeout):
            callback: Callable[[int], None] = key.data
            callback(events)
        # Right after reading the status pipes: time we spent elsewhere (a slow reload) is not held
        # against the workers.
        self._check_heartbeats()
        now = time.monotonic()
        self._feed_watchdog(now)
        self._expire_snapshots(now)
        self._expire_handover(now)
        if self.admin is not None:
            self.admin.expire_idle(now)
        if self.metrics_server is not None:
            self.metrics_server.expire_idle(now)
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
                if self.draining:  # a replacement joins the drain (its listener takes nothing new)
                    self._send(self.workers[index], CTL_DRAIN)
        if self.ready and self._stop_signal is None and now >= self._next_status:
            self._next_status = now + STATUS_INTERVAL
            self._notify_status()

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
        if self.load_table is not None:  # a fresh, a handed-over or a replacement listener alike
            try:
                self.load_table.add_listener(index, listen_sock.fileno())
            except OSError as err:
                log.warning("listener not balanced by load", worker=index, error=str(err))
        control_r, control_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        handoff_ours, handoff_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
                    handoff_ours.close()
                    for fd in (self._wakeup_r, self._wakeup_w, self.selector.fileno()):
                        os.close(fd)
                    for other in self.workers.values():
                        os.close(other.control_w)
                        os.close(other.status_r)
                        if other.handoff is not None:
                            other.handoff.close()
                    for received in self._handover.listeners.values() if self._handover else ():
                        os.close(received)
                    for sibling in self._unforked.values():
                        sibling.close()
                    if self.admin is not None:
                        self.admin.close_in_child()
                    if self.metrics_server is not None:
                        self.metrics_server.close_in_child()
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
                        handoff_sock=handoff_theirs,
                        load_table=self.load_table,
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
        handoff_theirs.close()
        os.set_blocking(control_w, False)
        os.set_blocking(status_r, False)
        handoff_ours.setblocking(False)
        handle = WorkerHandle(
            index, pid, control_w, status_r, last_heard=time.monotonic(), handoff=handoff_ours
        )
        self.workers[index] = handle
        self.selector.register(status_r, selectors.EVENT_READ, lambda _e: self._on_status(handle))
        self.selector.register(handoff_ours, selectors.EVENT_READ, lambda _e: self._on_handoff(handle))
        log.debug("worker started", worker=index, pid=pid)

    def _on_status(self, handle: WorkerHandle) -> None:
        try:
            data = os.read(handle.status_r, 1 << 16)
        except BlockingIOError:
            return
        if not data:  # the worker is gone; SIGCHLD reaps it
            self._close_status(handle)
            return
        handle.last_heard = time.monotonic()
        handle.status_buffer += data
        *lines, handle.status_buffer = handle.status_buffer.split(b"\n")
        if len(handle.status_buffer) > MAX_STATUS_BUFFER:
            log.error("worker sent an endless status line; killing it", worker=handle.index, pid=handle.pid)
            handle.status_buffer = b""
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
            return
        for line in lines:
            self._on_status_line(handle, line)

    def _on_status_line(self, handle: WorkerHandle, line: bytes) -> None:
        kind, _, payload = line.partition(b" ")
        if kind == MSG_READY:
            if not handle.ready:
                handle.ready = True
                log.debug("worker ready", worker=handle.index, pid=handle.pid)
        elif kind == MSG_HEARTBEAT:
            active, accepted = payload.split()
            handle.active_connections, handle.accepted = int(active), int(accepted)
        elif kind == MSG_SNAPSHOT:
            request_id, _, document = payload.partition(b" ")
            pending = self._snapshots.get(int(request_id))
            if pending is not None and handle.index in pending.waiting:
                pending.results[str(handle.index)] = json.loads(document)
                pending.waiting.discard(handle.index)
                if not pending.waiting:
                    self._finish_snapshot(int(request_id))
        else:
            log.error(
                "unknown status line from a worker", worker=handle.index, line=line[:40].decode("latin-1")
            )

    def _close_status(self, handle: WorkerHandle) -> None:
        if handle.status_open:
            self.selector.unregister(handle.status_r)
            os.close(handle.status_r)
            handle.status_open = False

    def _check_heartbeats(self) -> None:
        now = time.monotonic()
        for handle in self.workers.values():
            # A worker heartbeats once it serves; until then it has START_TIMEOUT (from its fork) to get
            # there, like the daemon as a whole (building the relay and the HTTP engine can be slow).
            allowed = HEARTBEAT_TIMEOUT if handle.ready else START_TIMEOUT
            if not handle.killed_for_silence and now - handle.last_heard > allowed:
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
            self.restarts += 1

    def _forget(self, handle: WorkerHandle) -> None:
        self.metrics_state.worker_gone(handle.pid)
        self._close_status(handle)
        if handle.handoff is not None:
            self.selector.unregister(handle.handoff)
            handle.handoff.close()
            handle.handoff = None
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
        changed = self._restart_only_changes(new)
        if changed:
            log.error("config reload rejected; these settings need a restart", fields=changed)
            return
        self._apply(new, "file")
        if self.config_path is not None:  # the file is now what runs, also after a restart
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pushed_path(self.config_path))
        log.info(
            "config reloaded",
            services=len(new.services),
            endpoints=sum(len(s.endpoints) for s in new.services),
            version=self.active.version,
        )

    def _restart_only_changes(self, new: Config) -> list[str]:
        changed = [key for key in RESTART_ONLY if _get(new, key) != _get(self.config, key)]
        return changed + mesh_restart_changes(self.config, new)

    def _apply(self, new: Config, source: str) -> None:
        """Send a validated config to every worker and make it the active one."""
        line = CTL_CONFIG + b" " + new.model_dump_json().encode()
        for handle in self.workers.values():
            self._send(handle, line)
        if new.access_log.level != self.config.access_log.level:  # else a run-time change stays
            self.set_access_log_level(new.access_log.level, "config")
        self.config = new  # a worker started from now on begins with it
        self.active = ActiveConfig(new, self.active.version + 1, source, time.time())

    def _send(self, handle: WorkerHandle, line: bytes) -> None:
        """Queue one control line (without its newline) for a worker; never blocks."""
        if line.startswith(CTL_CONFIG):  # only the newest waiting config matters
            kept = [queued for queued in handle.queue if not queued.startswith(CTL_CONFIG)]
            handle.queue.clear()
            handle.queue.extend(kept)
        handle.queue.append(line + b"\n")
        while len(handle.queue) > MAX_QUEUED_CONTROL_LINES:  # a stopped worker: snapshot requests pile up
            oldest = next(i for i, queued in enumerate(handle.queue) if not queued.startswith(CTL_CONFIG))
            del handle.queue[oldest]
        if not handle.outbox:
            self._write_outbox(handle)

    def _write_outbox(self, handle: WorkerHandle) -> None:
        if not handle.outbox and handle.queue:
            handle.outbox = handle.queue.popleft()
        while handle.outbox:
            try:
                written = os.write(handle.control_w, handle.outbox)
            except BlockingIOError:
                break
            except BrokenPipeError:  # the worker is dying; its replacement starts from self.config
                handle.outbox = b""
                handle.queue.clear()
                break
            handle.outbox = handle.outbox[written:]
            if not handle.outbox and handle.queue:
                handle.outbox = handle.queue.popleft()
        registered = handle.control_w in self.selector.get_map()
        if handle.outbox and not registered:
            self.selector.register(
                handle.control_w, selectors.EVENT_WRITE, lambda _e: self._write_outbox(handle)
            )
        elif not handle.outbox and registered:
            self.selector.unregister(handle.control_w)

    # -- systemd -----------------------------------------------------------------------------------------

    def workers_answering(self, now: float) -> bool:
        """Every worker is up and was heard within WATCHDOG_HEARTBEAT_AGE (while starting: not yet)."""
        expected = self.config.relay.effective_threads
        if self._starting:
            return True  # START_TIMEOUT bounds the start
        return len(self.workers) == expected and all(
            h.ready and now - h.last_heard <= WATCHDOG_HEARTBEAT_AGE for h in self.workers.values()
        )

    def _feed_watchdog(self, now: float) -> None:
        """WATCHDOG=1 from this loop, only while the workers answer: a supervisor that runs but cannot keep
        its workers alive (or is wedged itself) gets restarted by systemd."""
        if not self._watchdog_interval or now < self._next_watchdog:
            return
        # While stopping, workers exit on purpose; TimeoutStopSec bounds the stop, not the watchdog.
        if self._stop_signal is not None or self.workers_answering(now):
            sd_notify("WATCHDOG=1")
            self._next_watchdog = now + self._watchdog_interval
        else:
            self._next_watchdog = now + min(self._watchdog_interval, HEARTBEAT_INTERVAL / 2)

    def _status_line(self) -> str:
        active = sum(h.active_connections for h in self.workers.values())
        accepted = sum(h.accepted for h in self.workers.values())
        state = "draining" if self.draining else "serving"
        return (
            f"{state}: {len(self.workers)} workers, {active} active connections, {accepted} accepted, "
            f"config v{self.active.version}"
        )

    def _notify_status(self) -> None:
        line = self._status_line()
        if line != self._last_status:
            self._last_status = line
            sd_notify(f"STATUS={line}")

    # -- the admin API (admin.AdminControl) --------------------------------------------------------------

    def config_document(self) -> dict[str, Any]:
        active = self.active
        return {
            "version": active.version,
            "hash": active.digest,
            "source": active.source,
            "applied_at": active.applied_at,
            "path": self.config_path,
            "config": active.config.model_dump(mode="json"),
        }

    def push_config(self, text: str, expected_version: int | None, peer: str) -> dict[str, Any]:
        if self._handover is not None or self.handed_over:
            raise admin.ConfigRejected(
                409, "an upgrade is under way; push to the new daemon once it serves", []
            )
        if expected_version is not None and expected_version != self.active.version:
            raise admin.VersionMismatch(self.active.version)
        try:
            new = parse_config(text, source="pushed config")
        except ConfigError as err:
            log.warning("pushed config rejected", peer=peer, problems=err.problems)
            raise admin.ConfigRejected(400, "invalid config", admin.describe_problems(err.problems)) from None
        changed = self._restart_only_changes(new)
        if changed:
            raise admin.ConfigRejected(
                409,
                "these settings need a restart",
                [
                    {"path": key, "reason": "differs from the running config; needs a restart"}
                    for key in changed
                ],
            )
        persisted: str | None = None
        if self.config_path is not None:
            # Saved before it is applied: a config that took effect is never lost by a restart.
            persisted = pushed_path(self.config_path)
            try:
                write_atomically(persisted, text)
            except OSError as err:
                raise admin.ConfigRejected(
                    500, "cannot save the pushed config; nothing changed", [{"path": "", "reason": str(err)}]
                ) from None
        self._apply(new, "pushed")
        log.info(
            "config pushed",
            peer=peer,
            version=self.active.version,
            services=len(new.services),
            endpoints=sum(len(s.endpoints) for s in new.services),
        )
        return {"version": self.active.version, "hash": self.active.digest, "persisted": persisted}

    def collect_snapshots(self, done: Callable[[dict[str, Any]], None], metrics_only: bool = False) -> None:
        request_id = next(self._snapshot_ids)
        waiting = {h.index for h in self.workers.values() if h.ready and h.status_open}
        self._snapshots[request_id] = PendingSnapshots(waiting, time.monotonic() + SNAPSHOT_TIMEOUT, done)
        line = b"%s %d" % (CTL_SNAPSHOT, request_id)
        if metrics_only:
            line += b" " + SNAPSHOT_METRICS_ONLY
        for index in waiting:
            self._send(self.workers[index], line)
        if not waiting:
            self._finish_snapshot(request_id)

    def _finish_snapshot(self, request_id: int) -> None:
        pending = self._snapshots.pop(request_id)
        expected = set(range(self.config.relay.effective_threads))
        pending.done(
            {
                "workers": pending.results,
                "missing": sorted(expected - {int(i) for i in pending.results}),
                "config_version": self.active.version,
                "uptime_seconds": round(time.monotonic() - self.started_at, 3),
            }
        )

    def _expire_snapshots(self, now: float) -> None:
        for request_id, pending in list(self._snapshots.items()):
            if pending.deadline <= now:
                self._finish_snapshot(request_id)

    def _finish_snapshots(self) -> None:
        for request_id in list(self._snapshots):
            self._finish_snapshot(request_id)

    def listeners_document(self) -> dict[str, Any]:
        listen = self.config.listeners.outbound
        return {
            "listeners": [
                {
                    "name": "outbound",
                    "address": f"{listen.host}:{listen.port}",
                    "workers": len(self.workers),
                    "accepting": self.ready and not self.draining and self._stop_signal is None,
                    "capture": {
                        "chain_prefix": self.plan.chain_prefix,
                        "route_table": self.plan.table,
                        "capturing_new_connections": self.ready
                        and not self.draining
                        and self._stop_signal is None,
                    },
                }
            ]
        }

    def workers_document(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "workers": [
                {
                    "index": h.index,
                    "pid": h.pid,
                    "ready": h.ready,
                    "last_heartbeat_seconds_ago": round(now - h.last_heard, 3),
                    "active_connections": h.active_connections,
                    "accepted": h.accepted,
                }
                for h in sorted(self.workers.values(), key=lambda h: h.index)
            ],
            "expected": self.config.relay.effective_threads,
            "restarts": self.restarts,
            "supervisor_pid": os.getpid(),
        }

    def readiness(self) -> tuple[bool, str]:
        if self._stop_signal is not None:
            return False, "stopping"
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "starting"
        return True, "serving"

    def health(self) -> tuple[bool, dict[str, Any]]:
        answering = self.workers_answering(time.monotonic())
        return answering, {
            "workers": len(self.workers),
            "expected_workers": self.config.relay.effective_threads,
            "workers_answering": answering,
        }

    def collect_metrics(self, done: Callable[[bytes, str], None]) -> None:
        """The Prometheus text of the whole daemon, once the workers answered (or SNAPSHOT_TIMEOUT)."""

        def rendered(snapshots: dict[str, Any]) -> None:
            answered = {
                int(document["pid"]): document["metrics"]
                for document in snapshots["workers"].values()
                if "metrics" in document
            }
            running = [handle.pid for handle in self.workers.values() if handle.ready]
            try:
                aggregate, missing = self.metrics_state.merge(answered, running)
            except (ValueError, TypeError, KeyError) as err:  # a worker's snapshot of another shape
                log.error("worker metrics could not be merged", error=repr(err))
                aggregate, missing = self.metrics_state.retired.copy(), len(running)
            aggregate.set_gauge("nodeproxy_config_version", (), self.active.version)
            aggregate.set_gauge("nodeproxy_config_applied_timestamp_seconds", (), self.active.applied_at)
            aggregate.set_gauge("nodeproxy_workers", (), len(self.workers))
            aggregate.set_gauge("nodeproxy_metrics_workers_missing", (), missing)
            aggregate.set_counter("nodeproxy_worker_restarts_total", (), self.restarts)
            done(metrics.render(aggregate), metrics.CONTENT_TYPE)

        self.collect_snapshots(rendered, metrics_only=True)

    def _open_metrics_server(self) -> None:
        """Listen on metrics.address:metrics.port unless the port is 0. A port that cannot be bound is
        logged, not fatal: the proxy serves traffic without it (GET /v1/metrics still answers)."""
        settings = self.config.metrics
        if settings.port == 0 or not settings.enabled:
            return
        server = admin.TcpHttpServer(
            (str(settings.address), settings.port), self.selector, self._serve_metrics
        )
        try:
            server.open()
        except admin.AdminError as err:
            log.error(
                "metrics listener unavailable; GET /v1/metrics on the admin socket still works",
                error=str(err),
            )
            return
        self.metrics_server = server
        log.info("metrics listener open", address=f"{server.address[0]}:{server.address[1]}")

    def _serve_metrics(self, request: admin.Request, respond: admin.Respond) -> None:
        """The metrics port: GET /metrics or /stats/prometheus (Istio's path); nothing else."""
        if request.path not in metrics.METRICS_PATHS:
            respond(admin.text_response(404, b"not found: try /metrics\n", "text/plain; charset=utf-8"))
            return
        if request.method != "GET":
            respond(
                admin.Response(
                    405,
                    {},
                    [("Allow", "GET")],
                    raw=b"method not allowed\n",
                    content_type="text/plain; charset=utf-8",
                )
            )
            return

        def done(text: bytes, content_type: str) -> None:
            respond(admin.text_response(200, text, content_type))

        self.collect_metrics(done)

    def get_log_level(self) -> str:
        return LOG_LEVEL.level

    def get_access_log_level(self) -> str:
        return accesslog.get_level()

    def set_access_log_level(self, level: str, peer: str) -> None:
        accesslog.set_level(level)  # replacement workers inherit it
        update_access_log_threshold()
        for handle in self.workers.values():
            self._send(handle, CTL_ACCESS_LOG_LEVEL + b" " + level.encode())
        log.warning("access-log level changed", level=level, peer=peer)

    def set_log_level(self, level: str, peer: str) -> None:
        LOG_LEVEL.set(level)
        update_access_log_threshold()
        for handle in self.workers.values():
            self._send(handle, CTL_LOG_LEVEL + b" " + level.encode())
        log.warning("log level changed", level=level, peer=peer)

    def begin_drain(self, peer: str) -> dict[str, Any]:
        """Stop taking new connections (capture stops diverting them, workers stop accepting); established
        ones go on. The daemon keeps running (POST quit or SIGTERM ends it)."""
        if not self.draining:
            log.warning("draining", peer=peer)
            self.draining = True
            if self.ready:
                try:
                    capture.install(
                        self.plan, capture_new=False, lock_budget=capture.IPTABLES_LOCK_BUDGET / 2
                    )
                except capture.CaptureError as err:
                    log.error("could not stop capturing new connections; draining anyway", error=str(err))
            for handle in self.workers.values():
                self._send(handle, CTL_DRAIN)
            self._notify_status()
        return {
            "draining": True,
            "active_connections": sum(h.active_connections for h in self.workers.values()),
        }

    def quit(self, peer: str) -> None:
        log.warning("quit requested", peer=peer)
        self._stop_signal = self._stop_signal or "admin quit"

    # -- upgrades: the running daemon's side ---------------------------------------------------------

    def start_upgrade(self, peer: str) -> dict[str, Any]:
        """POST /v1/upgrade: start a successor (the nodeproxy now installed, same arguments) that takes
        the listeners over. A child of ours, so it stays in our service's cgroup; systemd follows it
        through MAINPID= once it commits."""
        self._check_can_hand_over()
        if self._successor is not None and self._successor.poll() is None:
            raise admin.Refused(f"a successor (pid {self._successor.pid}) is already starting")
        assert self.admin is not None  # the request came through it
        argv = successor_argv(sys.orig_argv, self.admin.path)
        env = {k: v for k, v in os.environ.items() if k != "WATCHDOG_PID"}  # it is not our watchdog's
        self._successor = subprocess.Popen(argv, env=env, close_fds=True)
        log.warning("upgrade: successor started", peer=peer, successor_pid=self._successor.pid)
        return {"pid": os.getpid(), "successor_pid": self._successor.pid}

    def _check_can_hand_over(self) -> None:
        if not self.ready or self.draining or self._stop_signal is not None or self.handed_over:
            raise admin.Refused(
                "only a serving daemon can be upgraded (this one is starting, draining or stopping)"
            )
        if self._handover is not None:
            raise admin.Refused(f"an upgrade to pid {self._handover.successor_pid} is under way")
        if (
            not all(h.ready for h in self.workers.values())
            or len(self.workers) != self.config.relay.effective_threads
        ):
            raise admin.Refused("a worker is being replaced; try again in a moment")

    def hand_over(self, peer_pid: int, respond: Callable[[admin.Response], None]) -> None:
        """POST /v1/handoff: collect every worker's listener and send them with our instance lock."""
        self._check_can_hand_over()
        self._handover = Handover(
            peer_pid, time.monotonic() + HANDOVER_TIMEOUT, respond, waiting=set(self.workers)
        )
        log.warning("upgrade: handing the listeners over", successor_pid=peer_pid)
        for handle in self.workers.values():
            self._send(handle, CTL_HANDOFF)

    def _on_handoff(self, handle: WorkerHandle) -> None:
        assert handle.handoff is not None
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(handle.handoff, 16, 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            fds = []
        if not fds:  # the worker is gone (EOF)
            self.selector.unregister(handle.handoff)
            handle.handoff.close()
            handle.handoff = None
            return
        handover = self._handover
        if handover is None or handover.sent or handle.index not in handover.waiting:
            for fd in fds:
                os.close(fd)
            return
        handover.waiting.discard(handle.index)
        handover.listeners[handle.index] = fds[0]
        if handover.waiting:
            return
        assert self._instance is not None
        listen = self.config.listeners.outbound
        handover.sent = True
        handover.respond(
            admin.Response(
                200,
                {
                    "pid": os.getpid(),
                    "listen": f"{listen.host}:{listen.port}",
                    "listeners": len(handover.listeners),
                    "config_version": self.active.version,
                    "descriptors": ["instance lock", *(f"listener {i}" for i in sorted(handover.listeners))],
                },
                fds=[os.dup(self._instance.fd), *(handover.listeners[i] for i in sorted(handover.listeners))],
            )
        )
        handover.listeners.clear()  # the response owns (and closes) them now

    def commit_handover(self, peer_pid: int) -> dict[str, Any]:
        """POST /v1/handoff/commit: the successor serves. Stop accepting, hand systemd over, drain, and
        leave the capture in place."""
        handover = self._handover
        if handover is None or not handover.sent or handover.successor_pid != peer_pid:
            raise admin.Refused("no handoff to this process is under way")
        self.handed_over = True
        self._handover = None
        if self.metrics_server is not None:  # the successor serves the port (bound with SO_REUSEPORT)
            self.metrics_server.close()
            self.metrics_server = None
        sd_notify(f"MAINPID={peer_pid}")
        for handle in self.workers.values():
            self._send(handle, CTL_DRAIN)
        self._stop_signal = self._stop_signal or "upgrade"
        log.warning("upgrade: the successor serves; draining", successor_pid=peer_pid)
        return {"pid": os.getpid(), "draining": True}

    def _expire_handover(self, now: float) -> None:
        handover = self._handover
        if handover is None:
            return
        successor_gone = (
            self._successor is not None
            and self._successor.pid == handover.successor_pid
            and self._successor.poll() is not None
        )
        if now < handover.deadline and not successor_gone:
            return
        log.error(
            "upgrade abandoned: the successor exited or did not commit in time; still serving",
            successor_pid=handover.successor_pid,
        )
        for fd in handover.listeners.values():
            os.close(fd)
        if not handover.sent:
            handover.respond(admin.error(503, "the workers did not hand their listeners over in time"))
        self._handover = None

    # -- upgrades: the successor's side ----------------------------------------------------------------

    def _take_over(self, path: str) -> tuple[admin.HandoffClient, int, dict[int, socket.socket]]:
        """Ask the running daemon for its instance lock and listeners; checks they fit our config."""
        client = admin.HandoffClient(path)
        status, document, fds = client.request("POST", "/v1/handoff")
        try:
            if status != 200:
                raise DaemonFailure(
                    f"the running daemon refused the upgrade: {status} {document.get('error')}"
                )
            listen = self.config.listeners.outbound
            expected = self.config.relay.effective_threads
            if len(fds) != 1 + document["listeners"]:
                raise DaemonFailure(f"expected {1 + document['listeners']} descriptors, got {len(fds)}")
            if document["listen"] != f"{listen.host}:{listen.port}" or document["listeners"] != expected:
                raise DaemonFailure(
                    f"the running daemon listens on {document['listen']} with {document['listeners']} "
                    f"workers; this config wants {listen} with {expected}: change those with a restart"
                )
            sockets = {i: socket.socket(fileno=fd) for i, fd in enumerate(fds[1:])}
            fds = fds[:1]
        except BaseException:
            for fd in fds:
                os.close(fd)
            client.close()
            raise
        for sock in sockets.values():  # what our workers' listeners must be
            assert sock.getsockname() == (str(listen.host), listen.port), sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1, "not listening"
        log.warning(
            "upgrade: took over the listeners", predecessor_pid=document["pid"], listeners=len(sockets)
        )
        return client, fds[0], sockets

    def _commit_takeover(self, handoff: admin.HandoffClient) -> None:
        status, document, fds = handoff.request("POST", "/v1/handoff/commit")
        for fd in fds:
            os.close(fd)
        if status != 200:
            raise DaemonFailure(f"the running daemon refused the commit: {status} {document.get('error')}")
        self._predecessor_owns_capture = False
        if self.admin is not None:
            self.admin.publish()
        log.warning("upgrade: committed; the predecessor drains", predecessor_pid=document["pid"])

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


def _watchdog_interval() -> float:
    """Seconds between WATCHDOG=1 pings (a third of WatchdogSec), or 0 when systemd set no watchdog."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return 0.0
    return int(usec) / 1e6 / 3


def successor_argv(argv: list[str], admin_socket: str) -> list[str]:
    """The command line of a successor: ours (interpreter options included), taking over from us."""
    own = list(argv[1:])
    while "--takeover-from" in own:  # we were a successor ourselves
        at = own.index("--takeover-from")
        del own[at : at + 2]
    own = [arg for arg in own if not arg.startswith("--takeover-from=")]
    return [sys.executable, *own, "--takeover-from", admin_socket]


def run(
    config: Config,
    config_path: str | None,
    ready_file: str | None = None,
    access_log: bool = True,
    admin_socket: str | None = None,
    admin_group: str | None = None,
    config_source: str | None = None,
    takeover_from: str | None = None,
) -> int:
    return Supervisor(
        config, config_path, ready_file, access_log, admin_socket, admin_group, config_source, takeover_from
    ).run()
