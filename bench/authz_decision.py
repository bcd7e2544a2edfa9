"""CPU cost of the authorization decisions the proxy makes per connection and per request.

    python3 bench/authz_decision.py [--number 20000] [--repeat 5]

Prints microseconds of this thread's CPU time (thread_time), the best of `repeat` runs, for:

- check_connection on a tcp port (peer authentication + L4 policies of docs/authorization.md);
- check_request without any authz config, with the documented policies and no token, and with a
  valid JWT per algorithm: a repeated token (the verified-token cache hit, the common case: a
  client reuses its token) and a fresh token every time (the signature check included).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

from joserfc import jwk, jws
from joserfc.errors import SecurityWarning

from nodeproxy.authz.config import AuthzConfig
from nodeproxy.authz.engine import AuthzEngine, compile_authz
from nodeproxy.authz.jwt import JwksRefresher
from nodeproxy.authz.policy import L4Request, Workload
from nodeproxy.proxy.http_route import RequestAttrs

ISSUER = "https://idp.example.com"
WEB = "10.244.1.10"
WORKLOADS = {WEB: Workload.of("shop", "web", {"app": "web"})}
CONN = L4Request("10.244.2.5", "spiffe://cluster.local/ns/front/sa/frontend", WEB, 8080)

KEYS: dict[str, jwk.Key] = {
    "RS256": jwk.RSAKey.generate_key(2048, {"kid": "rsa"}),
    "ES256": jwk.ECKey.generate_key("P-256", {"kid": "ec"}),
    "EdDSA": jwk.OKPKey.generate_key("Ed25519", {"kid": "ed"}),
}


def config() -> dict[str, Any]:
    jwks = json.dumps({"keys": [k.as_dict(private=False) for k in KEYS.values()]})
    return {
        "peer_authentication": [{"name": "strict", "namespace": "shop", "mode": "STRICT"}],
        "request_authentication": [
            {
                "name": "idp",
                "namespace": "shop",
                "jwt_rules": [
                    {
                        "issuer": ISSUER,
                        "audiences": ["shop"],
                        "jwks": jwks,
                        "output_claim_to_headers": [{"header": "x-user", "claim": "sub"}],
                    }
                ],
            }
        ],
        "authorization_policies": [
            {
                "name": "web-readers",
                "namespace": "shop",
                "selector": {"match_labels": {"app": "web"}},
                "rules": [
                    {
                        "from": [{"principals": ["cluster.local/ns/front/sa/frontend"]}],
                        "to": [{"methods": ["GET", "HEAD"], "paths": ["/api/*", "/static/*"]}],
                    },
                    {"to": [{"paths": ["/healthz"], "ports": [8080]}]},
                ],
            },
            {
                "name": "admin-only",
                "namespace": "shop",
                "action": "DENY",
                "rules": [
                    {
                        "to": [{"paths": ["/admin", "/admin/*"]}],
                        "when": [{"key": "request.auth.claims[role]", "not_values": ["admin"]}],
                    }
                ],
            },
        ],
    }


def token(alg: str, serial: int) -> str:
    claims = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": "shop",
        "exp": int(time.time()) + 3600,
        "jti": str(serial),
    }
    key = KEYS[alg]
    return jws.serialize_compact({"alg": alg, "kid": key.kid}, json.dumps(claims), key, algorithms=[alg])


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.thread_time()
        for _ in range(number):
            fn()
        runs.append((time.thread_time() - start) / number * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    # joserfc warns when this script *signs* with "EdDSA" (RFC 9864 prefers "Ed25519"); tokens use it.
    warnings.filterwarnings("ignore", category=SecurityWarning)
    n, r = args.number, args.repeat
    empty = compile_authz(AuthzConfig(), JwksRefresher(), WORKLOADS)
    engine: AuthzEngine = compile_authz(AuthzConfig.model_validate(config()), JwksRefresher(), WORKLOADS)
    plain = RequestAttrs("GET", "web.shop", "/api/items", "", {})
    rows = [
        ("check_connection, tcp port, documented policies", lambda: engine.check_connection(CONN, False)),
        ("check_request, no authz config", lambda: empty.check_request(CONN, plain)),
        ("check_request, documented policies, no token", lambda: engine.check_request(CONN, plain)),
    ]
    for label, fn in rows:
        print(f"{label + ':':50} {best(fn, n, r):7.2f} us")
    verified = engine.verified_tokens

    def uncached(attrs: RequestAttrs) -> object:
        verified.clear()  # a dict clear: well under a microsecond
        return engine.check_request(CONN, attrs)

    for alg in KEYS:
        attrs = RequestAttrs(
            "GET", "web.shop", "/api/items", "", {"authorization": f"Bearer {token(alg, 0)}"}
        )
        hit = best(functools.partial(engine.check_request, CONN, attrs), n, r)
        miss = best(functools.partial(uncached, attrs), max(1, n // 10), r)
        print(f"{f'check_request, valid {alg} JWT, repeated token:':50} {hit:7.2f} us")
        print(f"{f'check_request, valid {alg} JWT, signature checked:':50} {miss:7.2f} us")


if __name__ == "__main__":
    main()
