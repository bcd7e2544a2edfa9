"""HAProxy 2.6 as the reference transparent L4 proxy: a config rendered from a nodeproxy config.

HAProxy gets exactly the services nodeproxy gets: one frontend on the TPROXY port picks a backend by the
connection's original destination (`dst`, `dst_port`), each backend lists the service's endpoints, and
`source 0.0.0.0 usesrc clientip` makes upstream connections come from the client pod's address, as
nodeproxy's do. nodeproxy's own capture rules (`nodeproxy capture install`) steer the traffic to it.

Services named in `http_services` are proxied in HTTP mode instead. All captured traffic arrives on the one
TPROXY port, so the frontend stays `mode tcp` and switches those connections to HTTP by destination with
`tcp-request content switch-mode http proto h1|h2` (HAProxy >= 2.4): the same as a `mode http` frontend
with `bind ... proto h2` for the h2 ones. Their backends are `mode http` with `option http-keep-alive`
(`proto h2` to an HTTP/2 server) and pool upstream connections (`http-reuse safe`, HAProxy's default), so
they do not use `usesrc clientip`: a transparent source would tie each upstream connection to one client.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from typing import Literal

from nodeproxy.config import Config

HttpVersion = Literal["h1", "h2"]

BINARY = "/usr/sbin/haproxy"
# The bench runs under a 20000 descriptor limit; HAProxy wants about 2 per connection and refuses to
# start if the limit cannot hold maxconn. 4000 is plenty for 32 concurrent benchmark connections.
MAX_CONNECTIONS = 4000


def render_config(
    config: Config, threads: int = 2, http_services: Mapping[str, HttpVersion] | None = None
) -> str:
    """haproxy.cfg for the services of `config`, listening on its outbound listener with `transparent`.

    http_services: service name -> the HTTP version its clients and endpoints speak (h1 or h2); those
    services are proxied in HTTP mode, every other one in TCP mode.
    """
    http_services = http_services or {}
    if unknown := set(http_services) - {service.name for service in config.services}:
        raise ValueError(f"http_services names services the config does not have: {sorted(unknown)}")
    listen = config.listeners.outbound
    switch_rules: list[str] = []
    frontend_rules: list[str] = []
    backends: list[str] = []
    for service in config.services:
        version = http_services.get(service.name)
        for port in service.ports:
            name = f"{service.name}_{port.port}"
            destination = f"{{ dst {service.vip} }} {{ dst_port {port.port} }}"
            frontend_rules.append(f"    use_backend {name} if {destination}")
            server_options = " proto h2" if version == "h2" else ""
            servers = [
                f"    server ep{i} {ep.address}:{port.backend_port}{server_options}"
                for i, ep in enumerate(service.endpoints)
            ]
            if version is None:
                settings = ["    balance roundrobin", "    source 0.0.0.0 usesrc clientip"]
            else:
                switch_rules.append(
                    f"    tcp-request content switch-mode http proto {version} if {destination}"
                )
                settings = ["    mode http", "    balance roundrobin", "    option http-keep-alive"]
            backends.append("\n".join([f"backend {name}", *settings, *servers]))
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
        *switch_rules,
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
