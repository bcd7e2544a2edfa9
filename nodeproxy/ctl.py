"""`nodeproxy ctl ...`: the admin API from the command line (readable tables, or --json for scripts).

Only the standard library at module level: cli.build_parser() imports this module before `nodeproxy run`
has blocked its signals (see cli.py)."""

from __future__ import annotations

import argparse
import difflib
import errno
import http.client
import json
import socket
import sys
from typing import Any

REQUEST_TIMEOUT = 10.0  # seconds for one admin request (GET clusters waits up to 2 s for the workers)


# admin.LOG_LEVELS, repeated to keep admin's imports out of the parser (run() checks they agree).
LOG_LEVELS = ("debug", "info", "warning", "error")
ACCESS_LOG_LEVELS = ("debug", "info", "warning", "error", "off")


class CtlError(RuntimeError):
    """What went wrong talking to the daemon, said for an operator; exit status 1."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class AdminClient:
    def __init__(self, path: str, timeout: float = REQUEST_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout

    def request(
        self,
        method: str,
        target: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        text: bool = False,
    ) -> tuple[int, dict[str, str], Any]:
        """(status, headers, decoded JSON body, or the body as text with `text`); CtlError when the
        daemon cannot be reached."""
        conn = _UnixConnection(self.path, self.timeout)
        try:
            conn.request(method, target, body=body, headers=headers or {})
            response = conn.getresponse()
            raw = response.read()
            status, response_headers = response.status, {k.lower(): v for k, v in response.getheaders()}
        except FileNotFoundError:
            raise CtlError(
                f"no admin socket at {self.path}: is nodeproxy running? (--socket chooses another path)"
            ) from None
        except PermissionError:
            raise CtlError(
                f"permission denied on {self.path}: the admin socket is for root (mode 0600), or for the "
                "group given to `nodeproxy run --admin-group` (mode 0660); run as root or as a member"
            ) from None
        except ConnectionRefusedError:
            raise CtlError(
                f"nothing listens on {self.path}: nodeproxy is not running (a stale socket)"
            ) from None
        except TimeoutError:
            raise CtlError(f"no answer from {self.path} within {self.timeout:.0f} s") from None
        except OSError as err:
            if err.errno == errno.ENOTSOCK or err.errno == errno.ECONNREFUSED:
                raise CtlError(f"{self.path} is not nodeproxy's admin socket: {err}") from None
            raise CtlError(f"cannot talk to {self.path}: {err}") from None
        except http.client.HTTPException as err:
            raise CtlError(f"bad answer from {self.path}: {err!r}") from None
        finally:
            conn.close()
        if text and status == 200:
            return status, response_headers, raw.decode("utf-8", "replace")
        try:
            document = json.loads(raw) if raw else None
        except ValueError:
            raise CtlError(f"{method} {target}: answer is not JSON: {raw[:200]!r}") from None
        return status, response_headers, document

    def get(self, target: str) -> Any:
        status, _headers, document = self.request("GET", target)
        if status != 200:
            raise CtlError(f"GET {target}: {status} {describe_error(document)}")
        return document


def describe_error(document: Any) -> str:
    if isinstance(document, dict) and "error" in document:
        return str(document["error"])
    return json.dumps(document)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Left-aligned columns, two spaces apart (numbers right-aligned)."""
    cells = [headers, *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(isinstance(row[i], int | float) for row in rows) and bool(rows) for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if is_number else cell.ljust(width)
            for cell, width, is_number in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def normalized_yaml(config: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False)


# -- commands ------------------------------------------------------------------------------------------


def cmd_status(client: AdminClient, args: argparse.Namespace) -> int:
    _status, _h, ready = client.request("GET", "/v1/ready")
    _status, _h, health = client.request("GET", "/v1/healthz")
    config = client.get("/v1/config")
    workers = client.get("/v1/workers")
    stats = client.get("/v1/stats")
    if args.json:
        del config["config"]
        _print_json({"ready": ready, "health": health, "config": config, "workers": workers, "stats": stats})
        return 0 if ready.get("ready") else 3
    print(f"state:        {ready['reason']} ({'ready' if ready['ready'] else 'not ready'})")
    print(f"health:       {'ok' if health['healthy'] else 'UNHEALTHY'}")
    print(f"config:       version {config['version']} from {config['source']} ({config['hash'][:19]}...)")
    print(
        f"workers:      {len(workers['workers'])} of {workers['expected']} ({workers['restarts']} restarts)"
    )
    print(
        f"connections:  {stats['active_connections']} active, {stats['accepted']} accepted, "
        f"{stats['refused']} refused, {stats['connect_failures']} connect failures"
    )
    print(f"uptime:       {stats['uptime_seconds']:.0f} s")
    return 0 if ready.get("ready") else 3


def cmd_config_get(client: AdminClient, args: argparse.Namespace) -> int:
    document = client.get("/v1/config")
    if args.json:
        _print_json(document)
    else:
        print(f"# version {document['version']}, {document['hash']}, from {document['source']}")
        print(normalized_yaml(document["config"]), end="")
    return 0


def cmd_config_apply(client: AdminClient, args: argparse.Namespace) -> int:
    with open(args.file, "rb") as source:
        body = source.read()
    headers = {"Content-Type": "application/yaml"}
    if args.if_version is not None:
        headers["If-Match"] = f'"{args.if_version}"'
    status, _h, document = client.request("PUT", "/v1/config", body=body, headers=headers)
    if args.json:
        _print_json(document)
    elif status == 200:
        print(f"applied: version {document['version']} ({document['hash']})")
        if document.get("persisted"):
            print(f"saved as {document['persisted']} (used at the next start)")
    else:
        print(f"rejected ({status}): {describe_error(document)}", file=sys.stderr)
        problems = document.get("problems", []) if isinstance(document, dict) else []
        if problems:
            rows = [[p.get("path") or "-", p.get("line"), p["reason"]] for p in problems]
            print(table(["FIELD", "LINE", "PROBLEM"], rows), file=sys.stderr)
        if status == 412:
            print(f"the running config is at version {document['version']}", file=sys.stderr)
    return 0 if status == 200 else 2


def cmd_config_diff(client: AdminClient, args: argparse.Namespace) -> int:
    """Compare a file with the running config, both normalized (validated, defaults filled in)."""
    from nodeproxy.config import load_config

    running = client.get("/v1/config")
    wanted = load_config(args.file).model_dump(mode="json")
    before = normalized_yaml(running["config"]).splitlines(keepends=True)
    after = normalized_yaml(wanted).splitlines(keepends=True)
    diff = list(difflib.unified_diff(before, after, f"running (version {running['version']})", args.file))
    if args.json:
        _print_json({"version": running["version"], "differs": bool(diff), "diff": "".join(diff)})
    else:
        print("".join(diff), end="" if diff else "no difference\n")
    return 1 if diff else 0


def cmd_clusters(client: AdminClient, args: argparse.Namespace) -> int:
    document = client.get("/v1/clusters")
    if args.json:
        _print_json(document)
        return 0
    rows = [
        [
            cluster["service"],
            f"{cluster['vip']}:{cluster['port']}",
            f"{ep['address']}:{ep['port']}",
            ep["weight"],
            ep["active"],
            ep["total"],
            ep["connect_failures"],
        ]
        for cluster in document["clusters"]
        for ep in cluster["endpoints"]
    ]
    print(table(["SERVICE", "VIP", "ENDPOINT", "WEIGHT", "ACTIVE", "TOTAL", "FAILURES"], rows))
    if document["workers_missing"]:
        print(f"(workers {document['workers_missing']} did not answer: their counts are missing)")
    return 0


def cmd_workers(client: AdminClient, args: argparse.Namespace) -> int:
    document = client.get("/v1/workers")
    if args.json:
        _print_json(document)
        return 0
    rows = [
        [
            w["index"],
            w["pid"],
            "yes" if w["ready"] else "no",
            f"{w['last_heartbeat_seconds_ago']:.1f}s ago",
            w["active_connections"],
            w["accepted"],
        ]
        for w in document["workers"]
    ]
    print(table(["WORKER", "PID", "READY", "HEARD", "ACTIVE", "ACCEPTED"], rows))
    return 0


def cmd_drain(client: AdminClient, args: argparse.Namespace) -> int:
    status, _h, document = client.request("POST", "/v1/drain")
    if args.json:
        _print_json(document)
    elif status == 202:
        print(f"draining: {document['active_connections']} active connections finish; no new ones taken")
    else:
        raise CtlError(f"POST /v1/drain: {status} {describe_error(document)}")
    return 0


def cmd_log_level(client: AdminClient, args: argparse.Namespace) -> int:
    return _level(client, args, "/v1/log-level")


def cmd_access_log_level(client: AdminClient, args: argparse.Namespace) -> int:
    return _level(client, args, "/v1/access-log-level")


def _level(client: AdminClient, args: argparse.Namespace, target: str) -> int:
    """Print the level at `target`, or set it to args.level first."""
    if args.level is None:
        document = client.get(target)
    else:
        body = json.dumps({"level": args.level}).encode()
        status, _h, document = client.request(
            "PUT", target, body=body, headers={"Content-Type": "application/json"}
        )
        if status != 200:
            raise CtlError(f"PUT {target}: {status} {describe_error(document)}")
    if args.json:
        _print_json(document)
    else:
        print(document["level"])
    return 0


def cmd_metrics(client: AdminClient, args: argparse.Namespace) -> int:
    """The Prometheus text of every worker, as port 15020 serves it (no TCP listener needed)."""
    status, _h, document = client.request("GET", "/v1/metrics", text=True)
    if status != 200:
        raise CtlError(f"GET /v1/metrics: {status} {describe_error(document)}")
    sys.stdout.write(document)
    return 0


def cmd_upgrade(client: AdminClient, args: argparse.Namespace) -> int:
    """Start a successor and wait until it serves on the admin socket's path."""
    import time

    status, _h, started = client.request("POST", "/v1/upgrade")
    if status != 202:
        raise CtlError(f"POST /v1/upgrade: {status} {describe_error(started)}")
    old, new = started["pid"], started["successor_pid"]
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            status, _h, workers = client.request("GET", "/v1/workers")
        except CtlError:
            continue  # the path is being switched over
        if status == 200 and workers.get("supervisor_pid") == new:
            _status, _h, ready = client.request("GET", "/v1/ready")
            if ready.get("ready"):
                if args.json:
                    _print_json({"pid": old, "successor_pid": new, "ready": True})
                else:
                    print(f"upgraded: pid {old} -> {new}; {old} drains its established connections")
                return 0
    raise CtlError(
        f"the successor (pid {new}) did not serve within {args.wait:.0f} s; pid {old} still serves"
    )


def add_parser(sub: Any) -> None:
    """`nodeproxy ctl ...` under the main parser's subcommands."""
    ctl = sub.add_parser("ctl", help="talk to a running daemon through its admin socket")
    ctl.add_argument("--socket", help="admin socket path (default: the daemon's default for this namespace)")
    ctl.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    ctl.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT, help="seconds per request")
    commands = ctl.add_subparsers(dest="ctl_command", required=True)
    commands.add_parser(
        "status", help="readiness, health, config version, workers, connections"
    ).set_defaults(ctl_func=cmd_status)
    config = commands.add_parser("config", help="get, apply or diff the running config")
    config_actions = config.add_subparsers(dest="config_action", required=True)
    config_actions.add_parser("get", help="print the running config (YAML)").set_defaults(
        ctl_func=cmd_config_get
    )
    apply = config_actions.add_parser("apply", help="push a config file (validated; all or nothing)")
    apply.add_argument("file")
    apply.add_argument("--if-version", type=int, help="apply only if the running config has this version")
    apply.set_defaults(ctl_func=cmd_config_apply)
    diff = config_actions.add_parser("diff", help="show what applying a file would change (exit 1 if any)")
    diff.add_argument("file")
    diff.set_defaults(ctl_func=cmd_config_diff)
    commands.add_parser("clusters", help="endpoints and their live connections").set_defaults(
        ctl_func=cmd_clusters
    )
    commands.add_parser("workers", help="worker processes and their heartbeats").set_defaults(
        ctl_func=cmd_workers
    )
    commands.add_parser("drain", help="stop taking new connections; established ones finish").set_defaults(
        ctl_func=cmd_drain
    )
    upgrade = commands.add_parser(
        "upgrade", help="start the installed nodeproxy and hand it the listeners (no connection dropped)"
    )
    upgrade.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the successor")
    upgrade.set_defaults(ctl_func=cmd_upgrade)
    level = commands.add_parser("log-level", help="print or set the log level")
    level.add_argument("level", nargs="?", choices=LOG_LEVELS)
    level.set_defaults(ctl_func=cmd_log_level)
    access = commands.add_parser(
        "access-log-level", help="print or set the access-log level of every worker (warning: failures only)"
    )
    access.add_argument("level", nargs="?", choices=ACCESS_LOG_LEVELS)
    access.set_defaults(ctl_func=cmd_access_log_level)
    commands.add_parser("metrics", help="print the Prometheus metrics of every worker").set_defaults(
        ctl_func=cmd_metrics
    )


def run(args: argparse.Namespace) -> int:
    from nodeproxy import admin

    assert admin.LOG_LEVELS == LOG_LEVELS, "ctl offers the levels the daemon accepts"
    assert admin.ACCESS_LOG_LEVELS == ACCESS_LOG_LEVELS, "ctl offers the access-log levels it accepts"
    path = args.socket or admin.default_socket_path()
    client = AdminClient(path, timeout=args.timeout)
    try:
        return int(args.ctl_func(client, args))
    except CtlError as err:
        print(f"nodeproxy ctl: {err}", file=sys.stderr)
        return 1
