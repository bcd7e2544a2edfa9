"""The L4 data path through a real daemon: integrity, half-close, resets, transparency, scale."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
import uvloop

from nodeproxy import netns
from nodeproxy.lab import ECHO_PORT, Lab
from nodeproxy.proxy.relay import FDS_PER_CONNECTION_MAX
from tests.conftest import RunningProxy
from tests.helpers import connect, http_get, listen, pattern, recv_all, stream_echo

pytestmark = pytest.mark.netns

WEB_VIP, ECHO_VIP, SINK_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12"
GIB = 1 << 30


def test_gib_echo_through_vip_keeps_every_byte(lab: Lab, proxy: RunningProxy) -> None:
    pod = lab.client_pods[0]
    with connect(pod.ns, ECHO_VIP, 9000, timeout=60) as sock:
        sent, received, count = stream_echo(sock, GIB, pattern(1 << 20))
    assert count == GIB
    assert sent == received


def test_upload_sha256_seen_by_backend(lab: Lab, proxy: RunningProxy) -> None:
    data = pattern(64 << 20, seed=11)
    with connect(lab.client_pods[1].ns, SINK_VIP, 9001, timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)  # half-close: the backend answers only after our FIN
        answer = recv_all(sock).decode().split()
    assert answer == [hashlib.sha256(data).hexdigest(), str(len(data))]


def test_half_close_both_directions(lab: Lab, proxy: RunningProxy) -> None:
    with connect(lab.client_pods[0].ns, ECHO_VIP, 9000) as sock:
        sock.sendall(b"hello, ")
        sock.sendall(b"world")
        sock.shutdown(socket.SHUT_WR)
        # The echo backend only half-closes after it saw our FIN; we must still receive everything.
        assert recv_all(sock) == b"hello, world"


def test_backend_sees_client_pod_ip(lab: Lab, proxy: RunningProxy) -> None:
    for pod in lab.client_pods:
        body = http_get(pod.ns, WEB_VIP)
        assert f"client={pod.ip}:" in body, body


def test_round_robin_over_vip_reaches_every_backend(lab: Lab, proxy: RunningProxy) -> None:
    seen = {http_get(lab.client_pods[0].ns, WEB_VIP).split()[0] for _ in range(30)}
    assert seen == {f"backend=be{i}" for i in range(lab.backends)}


def test_non_service_traffic_passes_through_to_original_destination(lab: Lab, proxy: RunningProxy) -> None:
    target = lab.backend_pods[2]
    body = http_get(lab.client_pods[1].ns, target.ip, 8080)
    assert body.startswith("backend=be2 ") and f"client={lab.client_pods[1].ip}:" in body
    # It went through the proxy: the access log has it, with no service.
    text = proxy.wait_log(f'"dst": "{target.ip}:8080"')
    assert '"service": null' in text


def test_node_own_traffic_is_not_captured(lab: Lab, proxy: RunningProxy) -> None:
    """Only pod traffic is diverted: the node's own connection to a pod goes straight there."""
    target = lab.backend_pods[1]
    needle = f'"dst": "{target.ip}:8080"'
    logged_before = proxy.log().count(needle)
    body = http_get(lab.node_ns, target.ip, 8080)
    assert body.startswith("backend=be1 "), body
    node_ip = body.split("client=")[1].split(":")[0]
    # A pod's connection made after it is logged; the node's one, which ended first, never is.
    http_get(lab.client_pods[0].ns, target.ip, 8080)
    deadline = time.monotonic() + 5
    while proxy.log().count(needle) == logged_before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # room for a line about the node's connection, were there one, from another worker
    text = proxy.log()
    assert text.count(needle) == logged_before + 1
    assert f'"src": "{node_ip}:' not in text


def _accept_in_thread(server: socket.socket) -> tuple[socket.socket, tuple[str, int]]:
    conn, peer = server.accept()
    return conn, peer


def test_upstream_reset_reaches_client(lab: Lab, proxy: RunningProxy) -> None:
    backend, client_pod = lab.backend_pods[0], lab.client_pods[0]
    with listen(backend.ns, 9100) as server, connect(client_pod.ns, backend.ip, 9100) as client:
        conn, peer = server.accept()
        assert peer[0] == client_pod.ip
        client.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
        with pytest.raises(ConnectionResetError):
            for _ in range(50):
                if not client.recv(1):
                    pytest.fail("client saw a FIN, not the backend's RST")


def test_client_reset_reaches_backend(lab: Lab, proxy: RunningProxy) -> None:
    backend, client_pod = lab.backend_pods[1], lab.client_pods[1]
    with listen(backend.ns, 9101) as server:
        client = connect(client_pod.ns, backend.ip, 9101)
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            conn.settimeout(5)
            with pytest.raises(ConnectionResetError):
                for _ in range(50):
                    if not conn.recv(1):
                        pytest.fail("backend saw a FIN, not the client's RST")


def test_slow_reader_does_not_make_the_proxy_buffer(lab: Lab, proxy: RunningProxy) -> None:
    """Backpressure: a backend that reads nothing stops the client's writes after bounded buffering."""
    backend, client_pod = lab.backend_pods[2], lab.client_pods[0]
    with listen(backend.ns, 9102) as server, connect(client_pod.ns, backend.ip, 9102) as client:
        conn, _ = server.accept()
        with conn:
            client.setblocking(False)
            chunk, written = b"\0" * 65536, 0
            deadline = time.monotonic() + 5
            stalled_since = None
            while time.monotonic() < deadline:
                try:
                    written += client.send(chunk)
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > 0.5:
                        break
                    time.sleep(0.01)
            # Client and backend socket buffers (autotuned, a few MiB each) plus a pipe (at most pipe_size).
            assert stalled_since is not None, f"client never blocked after {written} bytes"
            assert written < 48 << 20, f"proxy accepted {written} bytes for a reader that reads nothing"
            # Once the reader reads, everything arrives intact.
            conn.settimeout(10)
            got = 0
            while got < written:
                got += len(conn.recv(1 << 20))
            assert got == written


def _connection_capacity(proxy: RunningProxy) -> int:
    """Connections the daemon's workers can hold at once: each one's descriptor limit over the relay's
    per-connection maximum (FDS_PER_CONNECTION_MAX), less a reserve, with room for SO_REUSEPORT's uneven
    hash spread."""
    capacity = 0
    for pid in _worker_fds(proxy):
        limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
        fd_limit = int(next(line.split()[3] for line in limits if line.startswith("Max open files")))
        capacity += (fd_limit - FDS_RESERVE_MARGIN) // FDS_PER_CONNECTION_MAX
    return capacity * 9 // 10


# Descriptors a worker keeps apart from its connections': listener, relay threads' epoll and pooled pipes,
# log and control pipes (the listener's own reserve is smaller).
FDS_RESERVE_MARGIN = 1024


def test_ten_thousand_concurrent_connections(lab: Lab, proxy: RunningProxy) -> None:
    """10,000 connections open at once, or as many as the descriptor limit lets the workers take (6,000
    and more under a 20,000 limit and 2 workers)."""
    count = min(10_000, _connection_capacity(proxy))
    assert count >= 5_000, f"the descriptor limit leaves room for {count} connections only"
    pod = lab.client_pods[0]

    async def run() -> int:
        opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        sem = asyncio.Semaphore(500)

        async def open_one(i: int) -> None:
            async with sem:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(ECHO_VIP, ECHO_PORT), 30)
                writer.write(b"%08d" % i)
                assert await asyncio.wait_for(reader.readexactly(8), 30) == b"%08d" % i
                opened.append((reader, writer))

        try:
            await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(count))), 120)
            # All are open at once; prove each one still works.
            for i, (reader, writer) in enumerate(opened[:: count // 100]):
                writer.write(b"again%03d" % (i % 1000))
                assert await asyncio.wait_for(reader.readexactly(8), 10) == b"again%03d" % (i % 1000)
            return len(opened)
        finally:
            for _, writer in opened:
                writer.close()

    with netns.entered(pod.ns):
        assert uvloop.run(run()) == count


def _worker_fds(proxy: RunningProxy) -> dict[int, int]:
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children").read_text().split()
    return {int(pid): len(os.listdir(f"/proc/{pid}/fd")) for pid in children}


# A worker may keep up to PIPE_POOL_MAX (128) idle pipes pooled, two descriptors each; beyond that
# nothing opened for a connection may stay open once the connections are gone.
POOLED_PIPE_FDS = 2 * 128


def _assert_fds_settle(proxy: RunningProxy, before: dict[int, int], within: float = 10.0) -> None:
    """Wait (bounded) until every worker is back within its pooled-pipe allowance of `before`."""
    deadline = time.monotonic() + within
    while True:
        after = _worker_fds(proxy)
        settled = after.keys() == before.keys() and all(
            count <= before[pid] + POOLED_PIPE_FDS for pid, count in after.items()
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after.keys() == before.keys(), "a worker died"
    for pid, count in after.items():
        assert count <= before[pid] + POOLED_PIPE_FDS, (pid, before[pid], count)


def test_no_descriptor_leak_after_a_burst_of_every_ending(lab: Lab, proxy: RunningProxy) -> None:
    before = _worker_fds(proxy)
    pod = lab.client_pods[1]
    for i in range(300):
        sock = connect(pod.ns, ECHO_VIP, 9000)
        if i % 3 == 0:  # client reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif i % 3 == 1:  # clean half-close
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b""
        sock.close()
    for _ in range(50):  # refused: nothing listens on be0:9300 (passthrough connect failure)
        with pytest.raises(ConnectionError), connect(pod.ns, lab.backend_pods[0].ip, 9300) as sock:
            sock.recv(1)
    _assert_fds_settle(proxy, before)


def test_relayed_sockets_use_keepalive(lab: Lab, proxy: RunningProxy) -> None:
    """Both of the proxy's sockets for a connection run TCP keepalive timers (ss: timer:(keepalive,...))."""
    backend, pod = lab.backend_pods[0], lab.client_pods[0]
    with listen(backend.ns, 9103) as server, connect(pod.ns, backend.ip, 9103):
        conn, _ = server.accept()
        with conn:
            out = netns.run(lab.node_ns, ["ss", "-tnoH", "state", "established"])
    ours = [line for line in out.splitlines() if ":9103" in line]
    assert len(ours) == 2, out  # client side (to the pod) and upstream side (to the backend)
    assert all("keepalive" in line for line in ours), ours


def test_connection_flood_leaves_established_connections_alone(lab: Lab, proxy: RunningProxy) -> None:
    """Thousands of short-lived and refused connections from one pod while another pod keeps talking."""
    talker, flooder = lab.client_pods
    before = _worker_fds(proxy)

    async def flood() -> int:
        async def one(i: int) -> None:
            target = (ECHO_VIP, ECHO_PORT) if i % 2 else (lab.backend_pods[0].ip, 9300)  # odd: refused
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(*target), 10)
                writer.close()
            except (OSError, TimeoutError):
                pass

        sem = asyncio.Semaphore(256)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.wait_for(asyncio.gather(*(bounded(i) for i in range(4000))), 60)
        return 4000

    with connect(talker.ns, ECHO_VIP, 9000) as established:
        flood_thread_result: list[int] = []

        def run_flood() -> None:
            with netns.entered(flooder.ns):
                flood_thread_result.append(uvloop.run(flood()))

        flood_thread = threading.Thread(target=run_flood)
        flood_thread.start()
        exchanged = 0
        while flood_thread.is_alive() and exchanged < 2000:
            established.sendall(b"%06d" % exchanged)
            assert established.recv(6) == b"%06d" % exchanged
            exchanged += 1
        flood_thread.join(90)
        assert flood_thread_result == [4000]
        established.sendall(b"after!")
        assert established.recv(6) == b"after!"
    assert proxy.proc.poll() is None
    _assert_fds_settle(proxy, before)
