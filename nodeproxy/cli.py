"""Command line: `nodeproxy run|ctl|cleanup|check-config|capture|lab|demo|ca`.

Only the standard library is imported at module level: `nodeproxy run` blocks the daemon's signals before
the slow imports (pydantic, pyroute2, uvloop), so a SIGHUP or SIGINT that arrives while it starts waits for
the daemon's handlers instead of killing it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeproxy.config import Config

# The daemon supervisor's signals (nodeproxy.daemon.SUPERVISOR_SIGNALS), listed here to avoid its imports.
_DAEMON_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
# Seconds `cleanup --after-stop` waits for the daemon's last processes to exit (they drain for
# relay.drain_timeout, 5 s by default, and may wait 10 s for the xtables lock); under TimeoutStopSec.
AFTER_STOP_WAIT = 20.0


def _load(path: str | None) -> Config:
    from nodeproxy.config import default_config, load_config

    return load_config(path) if path else default_config()


def cmd_run(args: argparse.Namespace) -> int:
    from nodeproxy import daemon

    assert _DAEMON_SIGNALS == daemon.SUPERVISOR_SIGNALS, "cli blocks what the daemon handles"
    daemon.configure_logging(args.log_level)
    config, source = daemon.choose_startup_config(args.config)
    return daemon.run(
        config,
        args.config,
        args.ready_file,
        access_log=not args.no_access_log,
        admin_socket=args.admin_socket,
        admin_group=args.admin_group,
        config_source=source,
        takeover_from=args.takeover_from,
    )


def cmd_ctl(args: argparse.Namespace) -> int:
    from nodeproxy import ctl

    return ctl.run(args)


def cmd_cleanup(args: argparse.Namespace) -> int:
    from nodeproxy import capture

    config = _load(args.config)
    plan = capture.CapturePlan.from_config(config)
    # Never pull the rules from under a running daemon (raises CaptureError naming its pid). After a stop,
    # workers that outlived a killed supervisor may still be draining: give them time to finish.
    instance = capture.InstanceLock(plan, wait=AFTER_STOP_WAIT if args.after_stop else 0.0)
    try:
        if args.after_stop and config.capture.on_failure == "closed":
            print("capture.on_failure is closed: capture rules left in place")
            return 0
        removed = capture.remove(plan)
    finally:
        instance.close()
    print("\n".join(f"removed {item}" for item in removed) or "nothing to remove")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from nodeproxy.config import load_config

    config = load_config(args.config)
    ports = sum(len(s.ports) for s in config.services)
    endpoints = sum(len(s.endpoints) for s in config.services)
    print(
        f"{args.config}: ok (node {config.node.name}, {len(config.services)} services, {ports} ports, "
        f"{endpoints} endpoints)"
    )
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from nodeproxy import capture

    plan = capture.CapturePlan.from_config(_load(args.config))
    if args.action in ("install", "remove"):
        instance = capture.InstanceLock(plan)  # not under a running daemon's feet (CaptureError)
        try:
            if args.action == "install":
                capture.install(plan)
            else:
                capture.remove(plan)
        finally:
            instance.close()
    elif args.action == "render":
        print(capture.render_iptables(plan, hook_present=False), end="")
    else:
        print(capture.installed_summary(plan))
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from nodeproxy.lab import Lab

    lab = Lab(prefix=args.prefix, clients=args.clients, backends=args.backends)
    if args.action == "up":
        lab.up()
        # Backends outlive this command (`lab down` kills every process in the lab's namespaces), so their
        # output goes to a file rather than to whoever reads ours.
        log_path = Path(tempfile.gettempdir()) / f"nodeproxy-lab-{args.prefix}-backends.log"
        with log_path.open("ab") as log:
            lab.start_backends(output=log)
        lab.processes.clear()
        print(
            f"lab {args.prefix} up: node {lab.node_ns}, pods "
            f"{', '.join(f'{p.ns}={p.ip}' for p in lab.client_pods)}, backends "
            f"{', '.join(f'{p.ns}={p.ip}' for p in lab.backend_pods)}; backend output in {log_path}"
        )
    elif args.action == "down":
        lab.down()
        print(f"lab {args.prefix} down")
    else:
        print(lab.config_yaml(l7=args.l7), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nodeproxy.demo import run_demo

    return run_demo(args.requests)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodeproxy", description="Per-node transparent service-mesh proxy.")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.set_defaults(func=None)

    run = sub.add_parser("run", help="run the daemon (installs capture rules; removes them on exit)")
    run.add_argument("--config", help="YAML config file (default: the embedded default config)")
    run.add_argument("--ready-file", help="write the pid here once serving; removed on exit")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-access-log", action="store_true", help="do not log every connection")
    run.add_argument(
        "--admin-socket",
        help="admin API socket (default /run/nodeproxy/admin.sock; in another network namespace or with "
        "another capture.chain_prefix, /run/nodeproxy/netns-<dev>-<inode>-<prefix>.admin.sock); '' for none",
    )
    run.add_argument("--admin-group", help="group allowed to use the admin socket (mode 0660; default 0600)")
    run.add_argument(
        "--takeover-from",
        metavar="ADMIN_SOCKET",
        help="take the listeners over from the daemon serving ADMIN_SOCKET (an upgrade; POST /v1/upgrade "
        "and `nodeproxy ctl upgrade` start the successor with it)",
    )
    run.set_defaults(func=cmd_run)

    from nodeproxy import ctl

    ctl.add_parser(sub)

    from nodeproxy.identity import cli as identity_cli

    identity_cli.add_parser(sub)

    cleanup = sub.add_parser("cleanup", help="remove capture rules and routes left by a crashed daemon")
    cleanup.add_argument("--config", help="the config the daemon ran with (chain names, mark, table)")
    cleanup.add_argument(
        "--after-stop",
        action="store_true",
        help="run by the service manager after the daemon ended: honour capture.on_failure (closed: keep)",
    )
    cleanup.set_defaults(func=cmd_cleanup)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    check.set_defaults(func=cmd_check_config)

    cap = sub.add_parser("capture", help="install, remove, show or render the capture rules alone")
    cap.add_argument("action", choices=["install", "remove", "show", "render"])
    cap.add_argument("--config")
    cap.set_defaults(func=cmd_capture)

    lab = sub.add_parser("lab", help="a namespace lab that looks like a node with pods")
    lab.add_argument("action", choices=["up", "down", "config"])
    lab.add_argument("--prefix", default="np")
    lab.add_argument("--clients", type=int, default=2)
    lab.add_argument("--backends", type=int, default=3)
    lab.add_argument(
        "--l7", action="store_true", help="config: also the HTTP service reviews (header routing, a canary)"
    )
    lab.set_defaults(func=cmd_lab)

    demo = sub.add_parser("demo", help="build a lab, run the proxy on it, show captured traffic, tear down")
    demo.add_argument("--requests", type=int, default=6)
    demo.set_defaults(func=cmd_demo)
    sub.choices["ctl"].set_defaults(func=cmd_ctl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.func is cmd_run:
        signal.pthread_sigmask(signal.SIG_BLOCK, _DAEMON_SIGNALS)  # the daemon unblocks them
    from nodeproxy.config import ConfigError

    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"nodeproxy: invalid config:\n{err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"nodeproxy: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
