"""`nodeproxy demo`: a lab node with pods, the proxy capturing their traffic, and what it does, shown."""

from __future__ import annotations

import hashlib
import http.client
import socket
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from nodeproxy import netns
from nodeproxy.lab import REVIEWS_VIP, Lab, stop_process

WEB = ("10.96.0.10", 80)
REVIEWS = (REVIEWS_VIP, 80)
SINK = ("10.96.0.12", 9001)


def _say(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _get(ns: str, host: str, port: int) -> str:
    with netns.entered(ns):
        sock = socket.create_connection((host, port), timeout=5)
    with sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.decode().split("\r\n\r\n", 1)[1].strip()


def _upload(ns: str, size: int) -> tuple[bool, float]:
    block = hashlib.shake_256(b"demo").digest(1 << 20)
    digest = hashlib.sha256()
    with netns.entered(ns):
        sock = socket.create_connection(SINK, timeout=30)
    started = time.perf_counter()
    with sock:
        for _ in range(size >> 20):
            sock.sendall(block)
            digest.update(block)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile().read().split()
    seconds = time.perf_counter() - started
    return answer == [digest.hexdigest(), str(size)], size * 8 / seconds / 1e9


def _backends_answering(ns: str, count: int, headers: dict[str, str]) -> tuple[Counter[str], set[str]]:
    """`count` requests over one keep-alive connection to the reviews service: who answered each, and
    the x-served-by response headers seen."""
    with netns.entered(ns):
        conn = http.client.HTTPConnection(*REVIEWS, timeout=5)
        conn.connect()
    answered: Counter[str] = Counter()
    served_by: set[str] = set()
    try:
        for _ in range(count):
            conn.request("GET", "/reviews/1", headers=headers)
            response = conn.getresponse()
            body = response.read().decode()
            answered[
                body.split()[0].removeprefix("backend=") if response.status == 200 else str(response.status)
            ] += 1
            served_by.add(response.getheader("x-served-by") or "-")
    finally:
        conn.close()
    return answered, served_by


def run_demo(requests: int = 6) -> int:
    lab = Lab(prefix="npdemo", clients=2, backends=3)  # not "np": that is `nodeproxy lab up`'s
    work = Path(tempfile.mkdtemp(prefix="nodeproxy-demo-"))
    config, ready, log = work / "config.yaml", work / "ready", work / "daemon.log"
    try:
        _say(
            f"building the lab: node {lab.node_ns}, pods and backends {', '.join(lab.namespaces[1:])}"
            "; no outside route"
        )
        lab.up()
        lab.start_backends()
        config.write_text(lab.config_yaml(l7=True))
        print(f"config: {config}")
        with log.open("wb") as out:
            proxy = lab.spawn(
                lab.node_ns,
                [
                    sys.executable,
                    "-m",
                    "nodeproxy",
                    "run",
                    "--config",
                    str(config),
                    "--ready-file",
                    str(ready),
                ],
                stdout=out,
                stderr=out,
            )
        deadline = time.monotonic() + 20
        while not ready.exists():
            if proxy.poll() is not None or time.monotonic() > deadline:
                print(log.read_text())
                raise RuntimeError("the daemon did not become ready")
            time.sleep(0.05)

        _say(f"capture rules the daemon installed in {lab.node_ns} (iptables mangle + policy routing)")
        print(
            netns.run(
                lab.node_ns, [sys.executable, "-m", "nodeproxy", "capture", "show", "--config", str(config)]
            )
        )

        _say(
            f"{requests} requests from {lab.client_pods[0].ns} ({lab.client_pods[0].ip})"
            f" to service web {WEB[0]}:{WEB[1]}"
        )
        answers = [_get(lab.client_pods[0].ns, *WEB) for _ in range(requests)]
        for answer in answers:
            print(f"  {answer}")
        print(
            f"  balanced over: {dict(Counter(a.split()[0] for a in answers))}; "
            "each backend saw the pod's own address as the client"
        )

        target = lab.backend_pods[2]
        _say(
            f"a connection that is no service ({lab.client_pods[1].ns} -> {target.ip}:8080)"
            " goes to its original destination"
        )
        print(f"  {_get(lab.client_pods[1].ns, target.ip, 8080)}")

        be = [pod.ns.rsplit("-", 1)[1] for pod in lab.backend_pods]
        _say(
            f"L7: service reviews {REVIEWS[0]}:{REVIEWS[1]} is HTTP; every request is routed on its own"
            f" ({be[0]}: prod v1, {be[1]}: prod v2, {be[2]}: staging)"
        )
        staged, served_by = _backends_answering(lab.client_pods[0].ns, 20, {"x-env": "staging"})
        print(
            f"  20 requests with 'x-env: staging' on one connection: {dict(staged)}; x-served-by: {served_by}"
        )
        canary, _ = _backends_answering(lab.client_pods[0].ns, 1000, {})
        share = {name: f"{100 * n / 1000:.1f}%" for name, n in sorted(canary.items())}
        print(f"  1000 requests without it (the 90/10 canary v1/v2): {share}")
        l7_ok = staged == Counter({be[2]: 20}) and abs(canary[be[0]] - 900) <= 45 and canary[be[1]] > 0

        _say("256 MiB upload to service sink; the backend returns the sha256 it received")
        ok, gbps = _upload(lab.client_pods[1].ns, 256 << 20)
        print(f"  sha256 matches: {ok}; {gbps:.1f} Gb/s through the proxy (Python client)")

        _say("the access log (last 3 lines)")
        for line in log.read_text().splitlines()[-3:]:
            print(f"  {line}")

        _say("SIGTERM: the daemon drains, removes its rules and exits")
        code = stop_process(proxy)
        left = netns.run(lab.node_ns, ["iptables-save", "-t", "mangle"]).count("NODEPROXY")
        print(f"  exit code {code}; NODEPROXY rules left: {left}")
        return 0 if ok and l7_ok and code == 0 and left == 0 else 1
    finally:
        lab.down()
        print("\nlab removed")
