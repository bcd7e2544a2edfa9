"""Side-by-side benchmark of nodeproxy against no proxy and HAProxy on one namespace lab: `python -m bench.run`."""
