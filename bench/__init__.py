"""Side-by-side benchmark: nodeproxy against no proxy and against HAProxy on one namespace lab.

Run it with `python -m bench.run` (see bench/README.md).
"""
