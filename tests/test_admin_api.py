"""The admin API on its Unix socket (issue 10, points 1 and 2): the live server against docs/openapi.yaml,
config push (validation, compare-and-swap, endpoints taking effect, persistence and its precedence over
the file), log level, drain and quit, socket permissions."""

from __future__ import annotations

import grp
import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec

from nodeproxy import netns
from nodeproxy.admin import AdminApi, describe_problems, parse_if_match
from nodeproxy.capture import SurvivorLock
from nodeproxy.config import default_config
from nodeproxy.ctl import AdminClient
from nodeproxy.daemon import Worker
from nodeproxy.lab import Lab, stop_process
from nodeproxy.proxy.listener import OutboundListener
from nodeproxy.proxy.relay import RelayPool
from tests.conftest import RunningProxy, running_lab, start_proxy, wait_ready
from tests.helpers import connect, http_get, listen, wait_for

SPEC_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
FLAKY_VIP = "10.96.0.20"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
    validate_spec(document)
    return document


def check_against_spec(
    spec: dict[str, Any], method: str, path: str, status: int, headers: dict[str, str], body: Any
) -> None:
    """The status is documented for the operation and the body matches its schema."""
    operation = spec["paths"][path][method.lower()]
    documented = operation["responses"]
    assert str(status) in documented, f"{method} {path} answered {status}, documented: {sorted(documented)}"
    response = documented[str(status)]
    assert headers.get("content-type") == "application/json"
    schema = {**response["content"]["application/json"]["schema"], "components": spec["components"]}
    errors = sorted(OAS31Validator(schema).iter_errors(body), key=str)
    assert not errors, f"{method} {path} {status}: {[e.message for e in errors]}\n{json.dumps(body)[:2000]}"
    for name in response.get("headers", {}):
        assert name.lower() in headers, f"{method} {path} {status}: no {name} header"


def oversized_put(path: str) -> tuple[int, dict[str, str], Any]:
    """PUT /v1/config announcing a 9 MiB body: refused from the head alone, before any body is sent."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"PUT /v1/config HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (9 << 20))
        response = http.client.HTTPResponse(sock)
        response.begin()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, json.loads(response.read())


def admin_path(proxy: RunningProxy) -> str:
    for line in proxy.wait_log("admin socket open").splitlines():
        if "admin socket open" in line:
            return str(json.loads(line)["path"])
    raise AssertionError("unreachable")


def flaky_service(endpoints: list[str], port: int = 9200) -> str:
    lines = "".join(f"      - address: {ip}\n" for ip in endpoints)
    return (
        f"  - name: flaky\n    vip: {FLAKY_VIP}\n    ports: [{{port: 80, target_port: {port}}}]\n"
        f"    balancer: round_robin\n    endpoints:\n{lines}"
    )


@pytest.fixture
def fresh_lab() -> Iterator[Lab]:
    with running_lab(clients=1) as lab:
        yield lab


def test_every_route_is_documented_and_every_documented_operation_served(spec: dict[str, Any]) -> None:
    documented = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    served = set(AdminApi(control=None).routes)  # type: ignore[arg-type]  # routes only, no calls
    assert documented == served


def test_problem_lines_become_field_paths_and_reasons() -> None:
    problems = [
        "line 3, column 7: services[0].endpoints[1].address: not an IPv4 address (got '10.0.0.999')",
        "relay.threads: Input should be greater than or equal to 0 (got -1)",
        "line 1, column 1: mapping values are not allowed here",
    ]
    assert describe_problems(problems) == [
        {
            "path": "services[0].endpoints[1].address",
            "reason": "not an IPv4 address (got '10.0.0.999')",
            "line": 3,
            "column": 7,
        },
        {"path": "relay.threads", "reason": "Input should be greater than or equal to 0 (got -1)"},
        {"path": "", "reason": "mapping values are not allowed here", "line": 1, "column": 1},
    ]
    assert parse_if_match('"7"') == 7 and parse_if_match('W/"7"') == 7 and parse_if_match("*") is None
    with pytest.raises(ValueError):
        parse_if_match('"seven"')


def test_worker_drain_runs_its_hooks_once_before_it_stops_accepting() -> None:
    """The L7 engine's Connection: close / GOAWAY hook runs while the listener still exists."""
    events: list[str] = []

    class Listener:
        def stop_accepting(self) -> None:
            events.append("stop_accepting")

    class Pool:
        live_connections = 3

    worker = Worker(0, default_config(), socket.socket(), -1, -1, False, cast(SurvivorLock, None), 1)
    worker.listener = cast(OutboundListener, Listener())
    worker.pool = cast(RelayPool, Pool())
    worker.drain_hooks.append(lambda: events.append("hook"))
    worker.begin_drain()
    worker.begin_drain()  # POST drain, then SIGTERM: once
    worker.listen_sock.close()
    assert events == ["hook", "stop_accepting"] and worker.draining


@pytest.mark.netns
def test_live_server_matches_the_openapi_document(
    fresh_lab: Lab, tmp_path: Path, spec: dict[str, Any]
) -> None:
    lab = fresh_lab
    config = lab.config_yaml(extra="relay:\n  threads: 2\n")
    proxy = start_proxy(lab, tmp_path, config)
    try:
        client = AdminClient(admin_path(proxy))

        def call(method: str, path: str, body: bytes | None = None, **headers: str) -> tuple[int, Any]:
            status, response_headers, document = client.request(method, path, body, headers)
            check_against_spec(spec, method, path, status, response_headers, document)
            return status, document

        with connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as established:
            established.sendall(b"x")
            assert established.recv(1) == b"x"
            status, clusters = call("GET", "/v1/clusters")
            echo = next(c for c in clusters["clusters"] if c["service"] == "echo")
            assert sum(ep["active"] for ep in echo["endpoints"]) == 1
            assert clusters["workers_answered"] == [0, 1] and clusters["workers_missing"] == []
            status, stats = call("GET", "/v1/stats")
            assert stats["active_connections"] == 1 and stats["accepted"] >= 1
        for path in ("/v1/listeners", "/v1/workers", "/v1/log-level", "/v1/ready", "/v1/healthz"):
            assert call("GET", path)[0] == 200, path
        status, current = call("GET", "/v1/config")
        assert current["version"] == 1 and current["source"] == "file"

        # Every documented error answer of PUT config.
        bad = config + flaky_service(["10.244.1.999"])
        assert call("PUT", "/v1/config", bad.encode())[0] == 400
        assert call("PUT", "/v1/config", config.encode(), **{"If-Match": '"9"'})[0] == 412
        assert call("PUT", "/v1/config", config.replace("threads: 2", "threads: 3").encode())[0] == 409
        status, response_headers, document = oversized_put(client.path)
        check_against_spec(spec, "PUT", "/v1/config", status, response_headers, document)
        assert status == 413
        status, applied = call("PUT", "/v1/config", config.encode(), **{"If-Match": '"1"'})
        assert status == 200 and applied["version"] == 2
        assert call("PUT", "/v1/log-level", b'{"level": "loud"}')[0] == 400
        assert call("PUT", "/v1/log-level", b'{"level": "debug"}') == (200, {"level": "debug"})
        assert client.request("GET", "/v1/nope")[0] == 404
        assert client.request("DELETE", "/v1/config")[0] == 405
        assert call("POST", "/v1/drain")[0] == 202
        status, ready = call("GET", "/v1/ready")
        assert (status, ready) == (503, {"ready": False, "reason": "draining"})
        assert call("POST", "/v1/quit") == (202, {"stopping": True})
        assert proxy.proc.wait(timeout=15) == 0
        assert not os.path.exists(client.path), "the socket file is removed on exit"
    finally:
        stop_process(proxy.proc)


@pytest.mark.netns
def test_pushed_endpoints_take_effect_and_established_connections_stay(
    fresh_lab: Lab, tmp_path: Path
) -> None:
    lab = fresh_lab
    be = lab.backend_pods
    proxy = start_proxy(lab, tmp_path, lab.config_yaml() + flaky_service([be[0].ip]))
    servers = [listen(p.ns, 9200) for p in be]
    try:
        for server, pod in zip(servers, be, strict=True):
            serve_names(server, pod.ns.encode())
        client = AdminClient(admin_path(proxy))
        with (
            connect(lab.client_pods[0].ns, "10.96.0.11", 9000) as unrelated,
            connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as to_removed,
        ):
            assert to_removed.recv(64) == be[0].ns.encode()
            unrelated.sendall(b"before")
            assert unrelated.recv(16) == b"before"
            status, _h, applied = client.request(
                "PUT", "/v1/config", (lab.config_yaml() + flaky_service([be[1].ip, be[2].ip])).encode()
            )
            assert status == 200, applied
            pushed_at = time.monotonic()
            answers = set()
            for _ in range(10):
                with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
                    answers.add(sock.recv(64).decode())
            assert time.monotonic() - pushed_at < 1.0 + 10 * 0.1  # the first one already went to the new set
            assert answers == {be[1].ns, be[2].ns}, "a removed endpoint got a new connection"
            unrelated.sendall(b"after")
            assert unrelated.recv(16) == b"after"
            # The connection to the removed endpoint is still open (the backend keeps it until we close).
            to_removed.settimeout(0.3)
            with pytest.raises(TimeoutError):
                to_removed.recv(1)
            # Invalid: 400 with each field and reason; the running config (version, hash) is untouched.
            before = client.get("/v1/config")
            status, _h, rejected = client.request(
                "PUT", "/v1/config", (lab.config_yaml() + flaky_service(["10.244.1.999", "x"])).encode()
            )
            assert status == 400
            paths = [p["path"] for p in rejected["problems"]]
            assert paths == ["services[4].endpoints[0].address", "services[4].endpoints[1].address"]
            after = client.get("/v1/config")
            assert (after["version"], after["hash"]) == (before["version"], before["hash"])
            with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
                assert sock.recv(64).decode() in answers
    finally:
        for server in servers:
            server.close()
        stop_process(proxy.proc)


def serve_names(server: socket.socket, name: bytes) -> None:
    """Answer every connection with `name` and keep it open until the client closes."""
    import threading

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.sendall(name)
            while conn.recv(4096):
                pass

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


@pytest.mark.netns
def test_compare_and_swap_on_the_version(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    proxy = start_proxy(lab, tmp_path, lab.config_yaml())
    try:
        client = AdminClient(admin_path(proxy))
        first = client.get("/v1/config")
        body = (lab.config_yaml() + flaky_service([lab.backend_pods[0].ip])).encode()
        status, headers, applied = client.request(
            "PUT", "/v1/config", body, {"If-Match": f'"{first["version"]}"'}
        )
        assert status == 200 and headers["etag"] == f'"{first["version"] + 1}"'
        # A second writer that read version 1 loses: 412 names the current version, nothing changes.
        status, _h, lost = client.request(
            "PUT", "/v1/config", lab.config_yaml().encode(), {"If-Match": '"1"'}
        )
        assert status == 412 and lost["version"] == applied["version"]
        assert client.get("/v1/config")["hash"] == applied["hash"]
        assert client.request("PUT", "/v1/config", body, {"If-Match": "one"})[0] == 400
    finally:
        stop_process(proxy.proc)


@pytest.mark.netns
def test_pushed_config_survives_a_restart_until_the_file_is_reloaded(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    pushed_text = lab.config_yaml() + flaky_service([lab.backend_pods[1].ip])
    proxy = start_proxy(lab, tmp_path, lab.config_yaml())
    server = listen(lab.backend_pods[1].ns, 9200)
    serve_names(server, lab.backend_pods[1].ns.encode())
    try:
        client = AdminClient(admin_path(proxy))
        status, _h, applied = client.request("PUT", "/v1/config", pushed_text.encode())
        assert status == 200 and applied["persisted"] == f"{proxy.config_path}.pushed"
        saved = Path(applied["persisted"])
        assert saved.read_text() == pushed_text and stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert stop_process(proxy.proc) == 0
        # Restart with the same (older) file: the pushed config is what runs.
        proxy = spawn_daemon(lab, tmp_path, None)
        restarted = client.get("/v1/config")
        assert (restarted["source"], restarted["hash"]) == ("pushed", applied["hash"])
        with connect(lab.client_pods[0].ns, FLAKY_VIP, 80) as sock:
            assert sock.recv(64) == lab.backend_pods[1].ns.encode()
        # SIGHUP applies the file: it runs from now on, also after the next restart.
        proxy.reload(lab.config_yaml())
        proxy.wait_log("config reloaded")
        reloaded = client.get("/v1/config")
        assert reloaded["source"] == "file" and reloaded["version"] == 2 and not saved.exists()
    finally:
        server.close()
        stop_process(proxy.proc)


def spawn_daemon(lab: Lab, tmp: Path, config_yaml: str | None, *extra: str) -> RunningProxy:
    """`nodeproxy run` with extra arguments (conftest's spawn_proxy takes none); config_yaml None starts
    it with the config file as it is."""
    config_path, ready, log_path = tmp / "config.yaml", tmp / "ready", tmp / "daemon.log"
    if config_yaml is not None:
        config_path.write_text(config_yaml)
    argv = [
        sys.executable,
        "-m",
        "nodeproxy",
        "run",
        "--config",
        str(config_path),
        "--ready-file",
        str(ready),
    ]
    with log_path.open("ab") as log_file:
        proc = lab.spawn(lab.node_ns, [*argv, *extra], stdout=log_file, stderr=subprocess.STDOUT)
    return wait_ready(RunningProxy(lab, proc, config_path, ready, log_path))


@pytest.mark.netns
def test_socket_permissions_default_and_with_a_group(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    path = str(tmp_path / "admin.sock")
    group = grp.getgrall()[-1]
    proxy = spawn_daemon(lab, tmp_path, lab.config_yaml(), "--admin-socket", path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_uid == 0
        assert stop_process(proxy.proc) == 0
        assert not os.path.exists(path)
        proxy = spawn_daemon(
            lab, tmp_path, lab.config_yaml(), "--admin-socket", path, "--admin-group", group.gr_name
        )
        info = os.stat(path)
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, group.gr_gid)
        assert AdminClient(path).get("/v1/ready") == {"ready": True, "reason": "serving"}
    finally:
        stop_process(proxy.proc)


@pytest.mark.netns
def test_a_live_admin_socket_is_not_taken_over(fresh_lab: Lab, tmp_path: Path) -> None:
    lab = fresh_lab
    path = str(tmp_path / "admin.sock")
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(path)
    holder.listen(1)
    try:
        config_path = tmp_path / "config.yaml"
        config_path.write_text(lab.config_yaml())
        argv = [
            sys.executable,
            "-m",
            "nodeproxy",
            "run",
            "--config",
            str(config_path),
            "--admin-socket",
            path,
        ]
        result = subprocess.run(
            netns.exec_argv(lab.node_ns, argv), capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1
        assert "another process serves the admin socket" in result.stderr
        assert os.path.exists(path)
        assert "NODEPROXY" not in netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
    finally:
        holder.close()
    # A stale socket file (nobody listening) is replaced.
    proxy = spawn_daemon(lab, tmp_path, lab.config_yaml(), "--admin-socket", path)
    try:
        assert AdminClient(path).get("/v1/healthz")["healthy"] is True
    finally:
        stop_process(proxy.proc)


@pytest.mark.netns
def test_drain_keeps_established_takes_no_new_and_quit_removes_the_rules(
    fresh_lab: Lab, tmp_path: Path
) -> None:
    lab = fresh_lab
    pod, backend = lab.client_pods[0], lab.backend_pods[0]
    proxy = start_proxy(lab, tmp_path, lab.config_yaml(extra="relay:\n  threads: 2\n"))
    try:
        client = AdminClient(admin_path(proxy))
        with connect(pod.ns, "10.96.0.11", 9000) as established:
            established.sendall(b"one")
            assert established.recv(8) == b"one"
            accepted = client.get("/v1/stats")["accepted"]
            status, _h, drained = client.request("POST", "/v1/drain")
            assert status == 202 and drained["draining"] is True
            wait_for(lambda: client.get("/v1/stats")["active_connections"] == 1, 5, "1 active connection")
            assert "TPROXY" not in proxy.iptables_save() and "NODEPROXY_DIVERT" in proxy.iptables_save()
            wait_for(lambda: proxy.log().count("worker draining") == 2, 5, "both workers draining")
            established.sendall(b"two")
            assert established.recv(8) == b"two"
            # New connections are not captured any more: passthrough goes straight to the pod.
            body = http_get(pod.ns, backend.ip, 8080)
            assert body.startswith("backend=be0")
            assert client.get("/v1/stats")["accepted"] == accepted
            listener = client.get("/v1/listeners")["listeners"][0]
            assert listener["accepting"] is False
            assert client.get("/v1/healthz")["healthy"] is True  # draining workers still answer
            # SIGHUP while draining keeps working (the config is applied, capture stays stopped).
            proxy.proc.send_signal(signal.SIGHUP)
            proxy.wait_log("config reloaded")
            assert "TPROXY" not in proxy.iptables_save()
        assert client.request("POST", "/v1/quit")[0] == 202
        assert proxy.proc.wait(timeout=15) == 0
        save = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"])
        assert "NODEPROXY" not in save
    finally:
        stop_process(proxy.proc)
