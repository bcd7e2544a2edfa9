"""HAProxy 2.6 as the reference transparent L4 proxy: a config rendered from a nodeproxy config.

HAProxy gets exactly the services nodeproxy gets: one frontend on the TPROXY port picks a backend by the
connection's original destination (`dst`, `dst_port`), each backend lists the service's endpoints, and
`source 0.0.0.0 usesrc clientip` makes upstream connections come from the client pod's address, as
nodeproxy's do. nodeproxy's own capture rules (`nodeproxy capture install`) steer the traffic to it.
"""

from __future__ import annotations

import subprocess

from nodeproxy.config import Config

BINARY = "/usr/sbin/haproxy"
# The bench runs under a 20000 descriptor limit; HAProxy wants about 2 per connection and refuses to
# start if the limit cannot hold maxconn. 4000 is plenty for 32 concurrent benchmark connections.
MAX_CONNECTIONS = 4000


def render_config(config: Config, threads: int = 2) -> str:
    """haproxy.cfg for the services of `config`, listening on its outbound listener with `transparent`."""
    listen = config.listeners.outbound
    frontend_rules: list[str] = []
    backends: list[str] = []
    for service in config.services:
        for port in service.ports:
            name = f"{service.name}_{port.port}"
            frontend_rules.append(
                f"    use_backend {name} if {{ dst {service.vip} }} {{ dst_port {port.port} }}"
            )
            servers = [
                f"    server ep{i} {ep.address}:{port.backend_port}" for i, ep in enumerate(service.endpoints)
            ]
            backends.append(
                "\n".join(
                    [
                        f"backend {name}",
                        "    balance roundrobin",
                        "    source 0.0.0.0 usesrc clientip",
                        *servers,
                    ]
                )
            )
    global_section = [
        "global",
        f"    nbthread {threads}",
        f"    maxconn {MAX_CONNECTIONS}",
        "",
        "defaults",
        "    mode tcp",
        "    option splice-auto",
        f"    maxconn {MAX_CONNECTIONS}",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "",
        "frontend captured",
        f"    bind {listen.host}:{listen.port} transparent",
        *frontend_rules,
    ]
    return "\n".join(global_section) + "\n\n" + "\n\n".join(backends) + "\n"


def version() -> str:
    """First line of `haproxy -v`, or why there is none."""
    try:
        out = subprocess.run([BINARY, "-v"], capture_output=True, text=True, timeout=10).stdout
    except OSError as err:
        return f"unavailable: {err}"
    return out.splitlines()[0] if out else "unknown"
