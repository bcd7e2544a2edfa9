"""Time the HTTP/1.1 codec's C API (nodeproxy._h1) on a typical request head: parse, serialize for
forwarding, and chunked framing. Builds bench/h1_codec_probe.pyx (a cimport of nodeproxy._h1) in a
temporary directory, then reports the median of a few rounds in CPU nanoseconds.

    python3 bench/h1_codec.py [--iterations 1000000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import timeit
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent

# 322 bytes: what a mesh client sends (curl-like agent, JSON accept, request id, a routing header).
TYPICAL_HEAD = (
    b"GET /api/v1/reviews/12345?lang=en&page=2 HTTP/1.1\r\n"
    b"Host: reviews.default.svc.cluster.local:9080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) curl/8.5.0\r\n"
    b"Accept: application/json, text/plain, */*\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"X-Request-Id: 5f0c6e2a-9b1d-4c8e-a2f3-7d6e5c4b3a21\r\n"
    b"X-Env: staging\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
CHUNKED_BODY = b"".join(b"3e8\r\n" + b"x" * 1000 + b"\r\n" for _ in range(64)) + b"0\r\n\r\n"


def build_probe(workdir: Path) -> ModuleType:
    shutil.copy(ROOT / "bench" / "h1_codec_probe.pyx", workdir / "h1_codec_probe.pyx")
    script = textwrap.dedent(
        f"""
        from Cython.Build import cythonize
        from setuptools import Extension, setup
        setup(
            script_args=["build_ext", "--inplace", "-q"],
            ext_modules=cythonize(
                [Extension("h1_codec_probe", ["h1_codec_probe.pyx"], extra_compile_args=["-O2"])],
                include_path=[{str(ROOT)!r}],
                quiet=True,
            ),
        )
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=workdir, check=True, capture_output=True, timeout=300)
    spec = importlib.util.spec_from_file_location("h1_codec_probe", next(workdir.glob("h1_codec_probe*.so")))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from nodeproxy._h1 import H1RequestParser

    with tempfile.TemporaryDirectory(prefix="h1bench") as tmp:
        probe = build_probe(Path(tmp))
        parse_ns = statistics.median(
            probe.parse_request(TYPICAL_HEAD, args.iterations) * 1e9 for _ in range(args.rounds)
        )
        serialize_ns = statistics.median(
            probe.serialize_request(TYPICAL_HEAD, args.iterations) * 1e9 for _ in range(args.rounds)
        )
        chunked_ns = statistics.median(
            probe.frame_chunked(CHUNKED_BODY, max(1, args.iterations // 50)) * 1e9 for _ in range(args.rounds)
        )
    python_iterations = max(1, args.iterations // 10)
    python_us = (
        min(timeit.repeat(lambda: H1RequestParser().feed(TYPICAL_HEAD), number=python_iterations, repeat=3))
        / python_iterations
        * 1e6
    )
    print(f"request head: {len(TYPICAL_HEAD)} bytes, median of {args.rounds} rounds (thread CPU time)")
    print(f"h1_parse_request     {parse_ns:8.1f} ns/head  ({1e3 / parse_ns:.2f} M heads/s per core)")
    print(f"h1_serialize_head    {serialize_ns:8.1f} ns/head")
    print(f"h1_body_feed chunked {chunked_ns / 65:8.1f} ns/chunk (64 x 1000-byte chunks + last chunk)")
    print(f"H1RequestParser.feed {python_us * 1e3:8.1f} ns/head  (Python API, events built; wall time)")


if __name__ == "__main__":
    main()
