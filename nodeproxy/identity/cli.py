"""`nodeproxy ca init|issue-node|serve`: create a CA, issue node credentials, run the CSR-signing service.

Imports of cryptography and the CA modules happen inside the commands, so `nodeproxy --help` and the
daemon's start stay as light as nodeproxy.cli promises.
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

KEY_TYPES = ("ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")


def _duration(text: str) -> timedelta:
    from nodeproxy.config import parse_duration

    try:
        return timedelta(seconds=parse_duration(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_parser(sub: Any) -> None:
    """Add `ca` and its subcommands to the top-level subparsers ``sub``."""
    ca = sub.add_parser("ca", help="the identity CA: create it, issue node credentials, serve CSRs")
    actions = ca.add_subparsers(dest="ca_action", required=True)

    init = actions.add_parser("init", help="create a root (and intermediate) CA; refuses to overwrite")
    init.add_argument("--dir", required=True, type=Path, help="directory for the CA files (created 0700)")
    init.add_argument("--trust-domain", required=True, help="SPIFFE trust domain, e.g. cluster.local")
    init.add_argument("--key-type", choices=KEY_TYPES, default="ecdsa-p256", help="(default ecdsa-p256)")
    init.add_argument("--no-intermediate", action="store_true", help="let the root sign SVIDs itself")
    init.add_argument("--root-ttl", type=_duration, default=None, help="root lifetime (default 87600h)")
    init.add_argument(
        "--intermediate-ttl", type=_duration, default=None, help="intermediate lifetime (default 8760h)"
    )

    node = actions.add_parser("issue-node", help="issue a node credential (what a node proxy shows the CA)")
    node.add_argument("--dir", required=True, type=Path, help="the CA directory")
    node.add_argument("--node", required=True, help="node name (config node.name)")
    node.add_argument("--cert", required=True, type=Path, help="where to write the certificate chain")
    node.add_argument("--key", required=True, type=Path, help="where to write the private key (0600)")
    node.add_argument("--ttl", type=_duration, default=None, help="lifetime (default 720h, 30 days)")

    serve = actions.add_parser("serve", help="run the CSR-signing service (HTTPS, node client certificates)")
    serve.add_argument("--dir", required=True, type=Path, help="the CA directory")
    serve.add_argument(
        "--config",
        required=True,
        type=Path,
        help="nodeproxy config whose `identity.workloads` lists every node's pods",
    )
    serve.add_argument("--listen", default="0.0.0.0:15012", help="host:port (default 0.0.0.0:15012)")
    serve.add_argument("--svid-ttl", type=_duration, default=None, help="longest SVID lifetime (default 24h)")
    serve.add_argument(
        "--node-ttl", type=_duration, default=None, help="longest renewed node credential (default 720h)"
    )
    serve.add_argument(
        "--dns-name", action="append", default=[], help="extra DNS SAN of the server certificate (repeatable)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ca.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nodeproxy.identity import ca
    from nodeproxy.identity.spiffe import SpiffeId, SpiffeIdError

    try:
        if args.ca_action == "init":
            paths = ca.init_ca(
                args.dir,
                args.trust_domain,
                key_type=args.key_type,
                intermediate=not args.no_intermediate,
                root_ttl=args.root_ttl or ca.DEFAULT_ROOT_TTL,
                intermediate_ttl=args.intermediate_ttl or ca.DEFAULT_INTERMEDIATE_TTL,
            )
            print(f"CA for trust domain {args.trust_domain} created in {paths.directory}")
            print(f"trust bundle (give it to every node): {paths.bundle}")
            return 0
        authority = ca.CertificateAuthority.load(args.dir)
        if args.ca_action == "issue-node":
            spiffe_id = SpiffeId.for_node(authority.trust_domain, args.node)
            issued, key = authority.issue_credential(
                spiffe_id, ttl=args.ttl or ca.DEFAULT_NODE_CREDENTIAL_TTL
            )
            ca.write_credential(args.cert, args.key, issued.chain_pem, key)
            print(f"{spiffe_id} valid until {issued.not_after.isoformat()}: {args.cert}, {args.key}")
            return 0
        from nodeproxy import daemon
        from nodeproxy.identity.caserver import serve_forever

        host, _, port = args.listen.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise RuntimeError(f"--listen: expected host:port, got {args.listen!r}")
        daemon.configure_logging(args.log_level)
        return serve_forever(
            args.dir,
            args.config,
            host,
            int(port),
            svid_ttl=args.svid_ttl or ca.DEFAULT_SVID_TTL,
            node_credential_ttl=args.node_ttl or ca.DEFAULT_NODE_CREDENTIAL_TTL,
            dns_names=tuple(args.dns_name),
        )
    except (ca.CaError, SpiffeIdError, OSError) as err:
        raise RuntimeError(str(err)) from None
