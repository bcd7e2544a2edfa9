"""Where nodeproxy's CPU goes per HTTP/1.1 request, thread by thread, through the real daemon.

    sudo python -m bench.l7_threads [--duration 5] [--rounds 3] [--rate 5000]

The lab, nginx and `python -m nodeproxy run` are set up as bench.run's nodeproxy path does (its L7
service `web-h1`, VIP 10.96.0.20:80, `protocol: http`, one endpoint). Then, per round:

- `wrk -t1 -c32 -dD` keep-alive to that VIP (the load of the issue's measurements), and
- `h2load --h1 -c10 -m1` at a fixed `--rate` requests/s in all (bench.run's CPU row),

and around each one the CPU time of every thread of every nodeproxy process (/proc/<pid>/task/<tid>/stat,
utime + stime), grouped by role: `python` (a worker's main thread: the asyncio loop where
HttpProxy.process_records decides), `threads` (the workers' other threads: the HTTP engine thread,
and the splice relay threads, idle under this load), `supervisor` (the supervisor process). Python
3.11 does not give threads OS names, so the engine thread is told apart only as "not the main one".
Prints req/s and microseconds of CPU per request per group, each round and the median. Tick
resolution is 10 ms per thread: at 5 s and 70k req/s that is under 0.03 us per request. Shared
machines make single runs swing by 20% or more: compare medians of several rounds.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from bench.cpu import read_stats, trees
from bench.paths import NodeProxyPath, client_pod, new_lab, start_servers
from bench.workloads import client_run, fixed_rate_requests, parse_wrk

PROC = pathlib.Path("/proc")
GROUPS = ("python", "threads", "supervisor")


def thread_ticks(pids: Iterable[int], roots: Iterable[int]) -> dict[str, int]:
    """Clock ticks (utime + stime) of every live thread of `pids`, summed per role; `roots` are the
    supervisors (their main thread is `other`)."""
    supervisors = set(roots)
    totals: dict[str, int] = defaultdict(int)
    for pid in pids:
        try:
            tasks = list((PROC / str(pid) / "task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
            if pid in supervisors:
                role = "supervisor"
            elif task.name == str(pid):
                role = "python"  # a worker's main thread
            else:
                role = "threads"
            totals[role] += ticks
    return totals


def measure(roots: list[int], run: Callable[[], tuple[float, float]]) -> tuple[float, dict[str, float]]:
    """Run `run()` (returns requests done and req/s); req/s and CPU microseconds per request per group."""
    pids = trees(read_stats(), roots)
    hz = os.sysconf("SC_CLK_TCK")
    before = thread_ticks(pids, roots)
    requests, rate = run()
    after = thread_ticks(pids, roots)
    return rate, {g: (after[g] - before[g]) / hz / requests * 1e6 for g in GROUPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per run (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both runs (default 3)")
    parser.add_argument("--rate", type=float, default=5000.0, help="fixed-rate requests/s (default 5000)")
    args = parser.parse_args()
    rows: dict[str, list[tuple[float, dict[str, float]]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="np-l7-threads-") as tmp:
        workdir = pathlib.Path(tmp)
        lab = new_lab()
        try:
            lab.up()
            start_servers(lab, workdir)
            path = NodeProxyPath(lab, workdir)
            try:
                path.setup()
                target = path.targets().get("h1")
                if target is None:
                    raise SystemExit(f"nodeproxy's L7 HTTP/1.1 target is not available: {path.l7_problems}")
                url = f"http://{target[0]}:{target[1]}/"
                ns = client_pod(lab).ns
                roots = path.cpu_roots()

                def keep_alive() -> tuple[float, float]:
                    argv = ["wrk", "-t1", "-c32", f"-d{args.duration}s", url]
                    proc = client_run(ns, argv, args.duration)
                    if proc.returncode != 0:
                        raise SystemExit(f"wrk exited {proc.returncode}: {proc.stderr[-500:]}")
                    report = parse_wrk(proc.stdout)
                    if report.requests is None or report.non_2xx_3xx or any(report.socket_errors.values()):
                        raise SystemExit(f"wrk did not get clean answers: {proc.stdout}")
                    return float(report.requests), report.rps

                def fixed_rate() -> tuple[float, float]:
                    measurement = fixed_rate_requests(ns, url, args.duration, http1=True, rate=args.rate)
                    return measurement.work["requests"], measurement.work["requests"] / args.duration

                runs: tuple[tuple[str, Callable[[], tuple[float, float]]], ...] = (
                    ("wrk -t1 -c32 keep-alive", keep_alive),
                    (f"h2load --h1 {args.rate:g}/s", fixed_rate),
                )
                for _ in range(args.rounds):
                    for name, run in runs:
                        rate, per = measure(roots, run)
                        rows[name].append((rate, per))
                        print(f"{name:24s} {rate:9,.0f} req/s   CPU us/request: {_groups(per)}", flush=True)
                        time.sleep(1)
            finally:
                path.teardown()
        finally:
            lab.down()
    print("median of rounds:")
    for name, samples in rows.items():
        rate = statistics.median(s[0] for s in samples)
        per = {g: statistics.median(s[1][g] for s in samples) for g in GROUPS}
        print(f"  {name:22s} {rate:9,.0f} req/s   CPU us/request: {_groups(per)}")


def _groups(per: dict[str, float]) -> str:
    return "  ".join(f"{g} {per[g]:6.2f}" for g in GROUPS) + f"  total {sum(per.values()):6.2f}"


if __name__ == "__main__":
    main()
