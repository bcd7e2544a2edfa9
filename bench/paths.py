"""The lab the bench runs on, the servers in it, and the three ways a client pod can reach them.

Every path gets a fresh lab (namespaces `npb<pid>-node`, `-pod0`, `-be0`) with nginx and iperf3 in the
backend pod be0, so one path cannot leave state behind that skews the next. The lab has no link to the
root namespace: no benchmark packet can leave it.

- DirectPath: the client connects to the backend pod's address; packets are routed through the node
  namespace with no capture rules and no proxy.
- NodeProxyPath: `python -m nodeproxy run` in the node namespace (it installs and removes its own capture
  rules); the client connects to the service VIP.
- HAProxyPath: HAProxy in the node namespace, fed by the same capture rules pointed at its port
  (`python -m nodeproxy capture install`); the client connects to the service VIP.

The L7 workloads use two more services (L7_SERVICES): `web-h1` (HTTP/1.1 to nginx) and `web-h2` (h2c to
nginx's http2 listener). nodeproxy gets them with `protocol: http` / `protocol: http2` on their ports.
Its L7 targets are "not available" (and it runs with the L4 services only) while its config rejects that
field or the daemon does not start with them; they are also "not available" when nodeproxy accepts the
field but still relays those connections as opaque TCP, which l7_relay_problem() detects. HAProxy
carries them in HTTP mode (checked the same way).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import yaml

from bench import haproxy
from nodeproxy import netns
from nodeproxy.config import Config, ConfigError, parse_config
from nodeproxy.lab import Lab, Pod, stop_process

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# One prefix per run (npb + the bench's pid in hex): Lab.up() first deletes namespaces of its own names,
# so two benches started side by side on a shared machine with one fixed prefix took each other's labs
# (and daemons) down.
LAB_PREFIX = f"npb{os.getpid():x}"
NGINX = "/usr/sbin/nginx"
IPERF3 = "iperf3"
NODEPROXY_PORT = 15001
HAPROXY_PORT = 15101
READY_TIMEOUT = 20.0
START_TIMEOUT = 10.0
COMMAND_TIMEOUT = 60.0
# nginx's h2c (HTTP/2 with prior knowledge, no TLS) listener in be0; nginx 1.22's plain `listen ... http2`
# speaks only HTTP/2 on that port.
H2C_PORT = 8082

NGINX_CONFIG = """\
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    default_type text/plain;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {port} reuseport backlog=4096;
        location / {{ return 200 "ok"; }}
        location = /whoami {{ return 200 "$remote_addr"; }}
    }}
    server {{
        listen {h2c_port} http2 reuseport backlog=4096;
        location / {{ return 200 "ok"; }}
        location = /whoami {{ return 200 "$remote_addr"; }}
    }}
}}
"""


class BenchError(RuntimeError):
    """A path or server that could not be set up, or a workload that produced no number."""


TargetKind = Literal["web", "iperf", "h1", "h2"]


@dataclass(frozen=True)
class Targets:
    """Where the client pod sends each kind of traffic on one path.

    web and iperf are the L4 targets (every path has them); h1 (HTTP/1.1) and h2 (h2c) are the L7 ones,
    None on a path that cannot carry them, with the reason in `unavailable`.
    """

    web: tuple[str, int]
    iperf: tuple[str, int]
    h1: tuple[str, int] | None = None
    h2: tuple[str, int] | None = None
    unavailable: Mapping[str, str] = field(default_factory=dict)  # target kind -> why it is None

    @property
    def url(self) -> str:
        host, port = self.web
        return f"http://{host}:{port}/"

    def get(self, kind: TargetKind) -> tuple[str, int] | None:
        address: tuple[str, int] | None = getattr(self, kind)
        return address

    def why_unavailable(self, kind: TargetKind) -> str:
        return self.unavailable.get(kind, f"this path has no {kind} target")


@dataclass(frozen=True)
class L7Service:
    """A service the L7 workloads go through (added to the lab's services by with_l7_services)."""

    name: str
    vip: str
    port: int
    protocol: Literal["http", "http2"]  # nodeproxy's `protocol` of the port (issue 7)
    kind: TargetKind

    def backend_port(self, http_port: int) -> int:
        return http_port if self.protocol == "http" else H2C_PORT


L7_SERVICES = (
    L7Service("web-h1", "10.96.0.20", 80, "http", "h1"),
    L7Service("web-h2", "10.96.0.21", 80, "http2", "h2"),
)


def new_lab() -> Lab:
    """The bench topology: one client pod, one backend pod, the node namespace between them."""
    return Lab(prefix=LAB_PREFIX, clients=1, backends=1)


def client_pod(lab: Lab) -> Pod:
    return lab.client_pods[0]


def server_pod(lab: Lab) -> Pod:
    return lab.backend_pods[0]


def service_config(lab: Lab, outbound_port: int, extra: str = "") -> str:
    """The daemon config for this lab: every service has be0 as its only endpoint (the lab has one)."""
    return lab.config_yaml(outbound_port=outbound_port, extra=extra)


def with_l7_services(config_text: str, lab: Lab, declare_protocol: bool) -> str:
    """`config_text` plus L7_SERVICES, each with be0 as its only endpoint.

    declare_protocol adds `protocol: http|http2` to their ports (nodeproxy's L7 path); without it they
    are plain TCP services (what `nodeproxy capture` and the HAProxy config need to know of them).
    """
    data: dict[str, Any] = yaml.safe_load(config_text)
    http_port = service_address(parsed(config_text), "web")[2]
    for service in L7_SERVICES:
        port: dict[str, object] = {"port": service.port, "target_port": service.backend_port(http_port)}
        if declare_protocol:
            port["protocol"] = service.protocol
        data["services"].append(
            {
                "name": service.name,
                "vip": service.vip,
                "ports": [port],
                "balancer": "round_robin",
                "endpoints": [{"address": server_pod(lab).ip, "node": "node-a"}],
            }
        )
    text: str = yaml.safe_dump(data, sort_keys=False)
    return text


def l7_targets(unavailable: str | None = None) -> dict[str, Any]:
    """Targets keyword arguments for the L7 VIPs, or for none of them with the reason."""
    if unavailable is not None:
        return {"unavailable": {s.kind: unavailable for s in L7_SERVICES}}
    return {s.kind: (s.vip, s.port) for s in L7_SERVICES}


def parsed(config_text: str) -> Config:
    return parse_config(config_text, "bench config")


def service_address(config: Config, name: str) -> tuple[str, int, int]:
    """(VIP, port, endpoint port) of the first port of service `name`."""
    for service in config.services:
        if service.name == name:
            port = service.ports[0]
            return str(service.vip), port.port, port.backend_port
    raise BenchError(f"the lab config has no service {name!r}")


# -- processes ---------------------------------------------------------------------------------------


def python_env() -> dict[str, str]:
    """The environment for `python -m nodeproxy` and bench helpers: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_in(ns: str, argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command inside `ns` from the repository root; raise BenchError with its output on failure."""
    try:
        proc = subprocess.run(
            netns.exec_argv(ns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=python_env(),
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{' '.join(argv)} (netns {ns}) did not finish in {timeout:g} s") from err
    if proc.returncode != 0:
        output = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise BenchError(f"{' '.join(argv)} (netns {ns}) exited {proc.returncode}: {output}")
    return proc.stdout


def spawn_logged(lab: Lab, ns: str, argv: Sequence[str], log: pathlib.Path) -> subprocess.Popen[bytes]:
    """Start a long-running process in `ns` with its output in `log`; lab.down() stops it at the latest."""
    with log.open("wb") as out:
        return lab.spawn(
            ns,
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=python_env(),
        )


def log_tail(log: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_for(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log: pathlib.Path | None = None,
) -> None:
    """Poll `ready` until true; fail early when `proc` exits, with the tail of `log` in the message."""
    deadline = time.monotonic() + timeout
    while not ready():
        exited = proc is not None and proc.poll() is not None
        if exited or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if exited and proc else f"not ready after {timeout:g} s"
            tail = log_tail(log) if log else ""
            raise BenchError(f"{what} {why}" + (f"; last output:\n{tail}" if tail else ""))
        time.sleep(0.05)


def can_connect(ns: str, host: str, port: int) -> bool:
    try:
        with netns.entered(ns), socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def listening(ns: str, port: int) -> bool:
    """Whether a TCP socket listens on `port` in `ns` (without connecting, which iperf3 would log)."""
    out = subprocess.run(
        netns.exec_argv(ns, ["ss", "-Hltn", f"sport = :{port}"]), capture_output=True, text=True
    ).stdout
    return bool(out.strip())


def http_get(ns: str, host: str, port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    """One HTTP/1.0 GET from inside `ns`: (status, body)."""
    with netns.entered(ns):
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")


# -- servers in the backend pod ----------------------------------------------------------------------


def start_servers(lab: Lab, workdir: pathlib.Path) -> dict[str, int]:
    """nginx and iperf3 in be0 on the ports the lab config's services name; returns those ports."""
    config = parsed(service_config(lab, NODEPROXY_PORT))
    http_port = service_address(config, "web")[2]
    iperf_port = service_address(config, "iperf")[2]
    be = server_pod(lab)
    nginx_dir = workdir / "nginx"
    (nginx_dir / "tmp").mkdir(parents=True, exist_ok=True)
    nginx_conf = nginx_dir / "nginx.conf"
    nginx_conf.write_text(NGINX_CONFIG.format(dir=nginx_dir, port=http_port, h2c_port=H2C_PORT))
    nginx_log = nginx_dir / "nginx.out"
    nginx = spawn_logged(
        lab,
        be.ns,
        [NGINX, "-c", str(nginx_conf), "-p", str(nginx_dir), "-e", str(nginx_dir / "nginx-error.log")],
        nginx_log,
    )
    iperf_log = workdir / "iperf3-server.log"
    iperf = spawn_logged(lab, be.ns, [IPERF3, "-s", "-p", str(iperf_port)], iperf_log)
    wait_for(
        lambda: can_connect(lab.node_ns, be.ip, http_port),
        "nginx",
        START_TIMEOUT,
        nginx,
        nginx_dir / "nginx-error.log",
    )
    wait_for(lambda: listening(be.ns, H2C_PORT), "nginx h2c", START_TIMEOUT, nginx, nginx_log)
    wait_for(lambda: listening(be.ns, iperf_port), "iperf3 -s", START_TIMEOUT, iperf, iperf_log)
    return {"http": http_port, "h2c": H2C_PORT, "iperf": iperf_port}


# Silent client connections l7_relay_problem() opens to one L7 target, and how long it watches them.
L7_CHECK_CONNECTIONS = 4
L7_CHECK_SECONDS = 0.5

# How the bench decides whether nodeproxy's L7 path carries the L7 services (bench.run --nodeproxy-l7):
# auto: give it the services with `protocol`, measure them only if l7_relay_problem() finds no problem;
# on: measure them even then (the problem becomes a warning); off: L4 services only, L7 rows n/a.
L7Mode = Literal["auto", "on", "off"]
L7_MODES: tuple[L7Mode, ...] = ("auto", "on", "off")


def established(ns: str, port: int) -> int:
    """Established TCP connections with local port `port` in `ns`."""
    out = run_in(ns, ["ss", "-Htn", "state", "established", f"( sport = :{port} )"], timeout=10)
    return len(out.splitlines())


def l7_relay_problem(lab: Lab, proxy: str, service: L7Service) -> str | None:
    """None when `proxy` handles `service` as HTTP; otherwise why its L7 numbers would be wrong.

    An HTTP proxy connects to an endpoint (or takes a pooled connection) only once it has read a
    request; an opaque TCP relay connects as soon as the client does. So the check opens
    L7_CHECK_CONNECTIONS client connections that send nothing and counts nginx's established connections
    for L7_CHECK_SECONDS: as many new ones as silent clients means an opaque relay. It needs no
    particular HTTP feature (pooling, header handling) of the proxy.
    """
    pod, backend = client_pod(lab), server_pod(lab)
    port = service.backend_port(service_address(parsed(service_config(lab, NODEPROXY_PORT)), "web")[2])
    before = established(backend.ns, port)
    silent: list[socket.socket] = []
    try:
        with netns.entered(pod.ns):
            for _ in range(L7_CHECK_CONNECTIONS):
                silent.append(socket.create_connection((service.vip, service.port), timeout=2))
        deadline = time.monotonic() + L7_CHECK_SECONDS
        while time.monotonic() < deadline:
            if (opened := established(backend.ns, port) - before) >= L7_CHECK_CONNECTIONS:
                return (
                    f"{proxy} relays `protocol: {service.protocol}` as opaque TCP: {opened} connections "
                    f"to nginx opened for {L7_CHECK_CONNECTIONS} clients that sent no request"
                )
            time.sleep(0.05)
    except (OSError, BenchError) as err:
        return f"cannot check {proxy}'s handling of {service.vip}:{service.port}: {brief(str(err))}"
    finally:
        for sock in silent:
            sock.close()
    return None


def probe(lab: Lab, targets: Targets, timeout: float = 5.0) -> str:
    """GET /whoami from the client pod through the path; returns the client address nginx saw."""
    pod = client_pod(lab)
    host, port = targets.web
    deadline = time.monotonic() + timeout
    while True:
        try:
            status, body = http_get(pod.ns, host, port, "/whoami")
            if status == 200:
                return body.strip()
            problem = f"HTTP status {status}"
        except (OSError, ValueError, IndexError) as err:
            problem = str(err) or type(err).__name__
        if time.monotonic() > deadline:
            raise BenchError(f"GET http://{host}:{port}/whoami from {pod.ns} fails: {problem}")
        time.sleep(0.1)


def leftover_capture(lab: Lab) -> list[str]:
    """TPROXY rules, fwmark ip rules and nodeproxy chains still in the node namespace."""
    save = subprocess.run(
        netns.exec_argv(lab.node_ns, ["iptables-save", "-t", "mangle"]), capture_output=True, text=True
    ).stdout
    rules = subprocess.run(
        netns.exec_argv(lab.node_ns, ["ip", "rule", "show"]), capture_output=True, text=True
    ).stdout
    return [line for line in save.splitlines() if "TPROXY" in line or "NODEPROXY" in line] + [
        line for line in rules.splitlines() if "fwmark" in line
    ]


# -- the three paths ---------------------------------------------------------------------------------


class TrafficPath:
    """One way from the client pod to the servers in be0: setup(), measure, teardown() (always)."""

    name: ClassVar[str]
    description: ClassVar[str]

    def __init__(self, lab: Lab, workdir: pathlib.Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.config_text = service_config(lab, NODEPROXY_PORT)

    def targets(self) -> Targets:
        """Service VIPs by default: what a pod would dial."""
        config = parsed(self.config_text)
        web_vip, web_port, _ = service_address(config, "web")
        iperf_vip, iperf_port, _ = service_address(config, "iperf")
        return Targets(web=(web_vip, web_port), iperf=(iperf_vip, iperf_port), **self.l7_targets())

    def l7_targets(self) -> dict[str, Any]:
        """The L7 part of targets(); none by default."""
        return l7_targets(f"the {self.name} path carries no L7 traffic")

    def cpu_roots(self) -> list[int]:
        """Pids whose process trees are the proxy, for its CPU time (none: no proxy)."""
        return []

    def setup(self) -> None:
        """Start whatever carries the traffic; raise BenchError when it does not come up."""

    def check(self) -> None:
        """Raise BenchError when what carries the traffic has died (checked after every workload)."""

    def teardown(self) -> list[str]:
        """Stop it and remove what setup installed; returns problems worth reporting (never raises)."""
        return []

    def info(self) -> dict[str, object]:
        """What the JSON should record about this path's setup."""
        return {"description": self.description}


def brief(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[:3])[:300] if lines else "(no message)"


def check_running(what: str, proc: subprocess.Popen[bytes] | None, log: pathlib.Path) -> None:
    if proc is not None and proc.poll() is not None:
        tail = log_tail(log)
        raise BenchError(f"{what} exited with {proc.returncode} during the run; last output:\n{tail}")


class DirectPath(TrafficPath):
    name = "direct"
    description = "client -> backend pod IP, routed through the node namespace; no capture, no proxy"

    def targets(self) -> Targets:
        config = parsed(self.config_text)
        ip = server_pod(self.lab).ip
        web_port = service_address(config, "web")[2]
        iperf_port = service_address(config, "iperf")[2]
        return Targets(web=(ip, web_port), iperf=(ip, iperf_port), h1=(ip, web_port), h2=(ip, H2C_PORT))


class NodeProxyPath(TrafficPath):
    name = "nodeproxy"
    description = "client -> service VIP, captured by TPROXY into `python -m nodeproxy run` in the node ns"

    def __init__(
        self,
        lab: Lab,
        workdir: pathlib.Path,
        relay_threads: int | None = None,
        l7: L7Mode = "auto",
    ) -> None:
        super().__init__(lab, workdir)
        self.relay_threads = relay_threads
        extra = f"relay:\n  threads: {relay_threads}\n" if relay_threads is not None else ""
        self.l4_config_text = service_config(lab, NODEPROXY_PORT, extra)
        self.config_text = self.l4_config_text
        self.l7_mode = l7
        # Why nodeproxy's L7 targets are not available, per target kind (absent: available).
        self.l7_problems: dict[str, str] = {}
        # Problems found with --nodeproxy-l7 on, measured anyway: warnings.
        self.l7_doubts: list[str] = []
        if l7 == "off":
            self._l7_unavailable("nodeproxy's L7 path not selected (--nodeproxy-l7 off or --workloads l4)")
        else:
            candidate = with_l7_services(self.l4_config_text, lab, declare_protocol=True)
            try:
                parse_config(candidate, "bench config with L7 services")
            except ConfigError as err:
                self._l7_unavailable(f"nodeproxy's config rejects the L7 services: {brief(str(err))}")
            else:
                self.config_text = candidate
        self.config_file = workdir / "nodeproxy.yaml"
        self.ready_file = workdir / "nodeproxy.ready"
        self.log = workdir / "nodeproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None

    def _l7_unavailable(self, reason: str) -> None:
        self.l7_problems = {service.kind: reason for service in L7_SERVICES}

    def setup(self) -> None:
        try:
            self._start()
        except BenchError as err:
            if self.config_text == self.l4_config_text:
                raise
            # The config takes `protocol` but the daemon does not run with it: measure L4 anyway.
            self._stop()
            self._l7_unavailable(f"nodeproxy did not start with the L7 services: {brief(str(err))}")
            self.config_text = self.l4_config_text
            self._start()
            return
        if self.config_text != self.l4_config_text:
            for service in L7_SERVICES:
                if problem := l7_relay_problem(self.lab, "nodeproxy", service):
                    if self.l7_mode == "on":
                        self.l7_doubts.append(f"measured anyway (--nodeproxy-l7 on): {problem}")
                    else:
                        self.l7_problems[service.kind] = problem

    def _start(self) -> None:
        self.config_file.write_text(self.config_text)
        self.ready_file.unlink(missing_ok=True)
        self.proc = spawn_logged(
            self.lab,
            self.lab.node_ns,
            [
                sys.executable,
                "-m",
                "nodeproxy",
                "run",
                "--config",
                str(self.config_file),
                "--ready-file",
                str(self.ready_file),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            self.log,
        )
        wait_for(self.ready_file.exists, "nodeproxy run", READY_TIMEOUT, self.proc, self.log)

    def _stop(self) -> int | None:
        if self.proc is None:
            return None
        code = stop_process(self.proc, timeout=15)
        self.proc = None
        return code

    def l7_targets(self) -> dict[str, Any]:
        available = l7_targets()
        return {
            **{kind: address for kind, address in available.items() if kind not in self.l7_problems},
            "unavailable": dict(self.l7_problems),
        }

    def cpu_roots(self) -> list[int]:
        # `ip netns exec` execs the command, so the Popen pid is the supervisor; workers are its children.
        return [self.proc.pid] if self.proc is not None else []

    def check(self) -> None:
        check_running("nodeproxy", self.proc, self.log)

    def teardown(self) -> list[str]:
        problems: list[str] = list(self.l7_doubts)
        if self.proc is not None:
            died_earlier = self.proc.poll() is not None  # setup() or check() has reported that already
            self.exit_code = self._stop()
            if self.exit_code not in (0, -15) and not died_earlier:
                problems.append(f"nodeproxy exited with {self.exit_code}; last output:\n{log_tail(self.log)}")
        # It runs at --log-level warning: anything logged at error level is worth a look.
        with contextlib.suppress(OSError):
            errors = [
                line
                for line in self.log.read_text(errors="replace").splitlines()
                if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
            ]
            if errors:
                problems.append(f"nodeproxy logged {len(errors)} errors, e.g. {errors[0][:300]}")
        return problems

    def info(self) -> dict[str, object]:
        return {
            **super().info(),
            "config": self.config_text,
            "relay_threads": self.relay_threads,
            "l7_mode": self.l7_mode,
            "l7_not_available": self.l7_problems,
            "exit_code": self.exit_code,
        }


class HAProxyPath(TrafficPath):
    name = "haproxy"
    description = (
        "client -> service VIP, captured by the same TPROXY rules into HAProxy (mode tcp, "
        "transparent, usesrc clientip, splice-auto) in the node ns"
    )

    def __init__(self, lab: Lab, workdir: pathlib.Path, threads: int = 2, l7: bool = True) -> None:
        super().__init__(lab, workdir)
        self.threads = threads
        self.l7 = l7
        self.config_text = service_config(lab, HAPROXY_PORT)
        http_services: dict[str, haproxy.HttpVersion] = {}
        if l7:
            # The L7 services as plain TCP services: `nodeproxy capture` reads this file, and the HAProxy
            # config carries them in HTTP mode (http_services).
            self.config_text = with_l7_services(self.config_text, lab, declare_protocol=False)
            http_services = {s.name: "h1" if s.protocol == "http" else "h2" for s in L7_SERVICES}
        self.capture_file = workdir / "capture-haproxy.yaml"
        self.haproxy_cfg = haproxy.render_config(parsed(self.config_text), threads, http_services)
        self.cfg_file = workdir / "haproxy.cfg"
        self.log = workdir / "haproxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.capture_installed = False
        self.l7_doubts: list[str] = []

    def setup(self) -> None:
        self.capture_file.write_text(self.config_text)
        self.cfg_file.write_text(self.haproxy_cfg)
        self.proc = spawn_logged(
            self.lab, self.lab.node_ns, [haproxy.BINARY, "-db", "-f", str(self.cfg_file)], self.log
        )
        wait_for(
            lambda: listening(self.lab.node_ns, HAPROXY_PORT), "haproxy", START_TIMEOUT, self.proc, self.log
        )
        self.capture_installed = True  # set first: a half-done install is removed too
        run_in(self.lab.node_ns, self._capture("install"))
        if self.l7:  # Its HTTP-mode switch is what makes the L7 rows HTTP numbers: check it did switch.
            self.l7_doubts = [p for s in L7_SERVICES if (p := l7_relay_problem(self.lab, "haproxy", s))]

    def l7_targets(self) -> dict[str, Any]:
        return l7_targets(None if self.l7 else "L7 workloads not selected (--workloads l4)")

    def cpu_roots(self) -> list[int]:
        # One process (`-db`: no master-worker), its nbthread threads counted in its /proc stat.
        return [self.proc.pid] if self.proc is not None else []

    def check(self) -> None:
        check_running("haproxy", self.proc, self.log)

    def _capture(self, action: str) -> list[str]:
        return [sys.executable, "-m", "nodeproxy", "capture", action, "--config", str(self.capture_file)]

    def teardown(self) -> list[str]:
        problems: list[str] = list(self.l7_doubts)
        if self.capture_installed:
            try:
                run_in(self.lab.node_ns, self._capture("remove"))
            except BenchError as err:
                problems.append(str(err))
            self.capture_installed = False
        if self.proc is not None:
            died_earlier = self.proc.poll() is not None
            code = stop_process(self.proc)
            if code not in (0, -15) and not died_earlier:
                problems.append(f"haproxy exited with {code}; last output:\n{log_tail(self.log)}")
            self.proc = None
        return problems

    def info(self) -> dict[str, object]:
        return {
            **super().info(),
            "threads": self.threads,
            "haproxy_cfg": self.haproxy_cfg,
            "capture_config": self.config_text,
        }


PATHS: dict[str, type[TrafficPath]] = {p.name: p for p in (DirectPath, NodeProxyPath, HAProxyPath)}
