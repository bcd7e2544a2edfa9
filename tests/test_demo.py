"""`nodeproxy demo` end to end (README, "The two commands"): it exits 0, every check it prints held, it
stays short, and it leaves no namespace behind. Plus the demo's metrics arithmetic on a fixed scrape."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from nodeproxy import netns
from nodeproxy.demo import Checks, metric_sum

# The README promises a short demo; the whole run (lab, daemon, traffic, teardown) on the 2-core VM.
DEMO_SECONDS = 90.0
# Every section of the demo, by a claim its check list prints.
CLAIMS = (
    "web: ",
    "passthrough: ",
    "reviews: 20 of 20",
    "sink: ",
    "ratings: 0 of 300 requests failed",
    "ratings: be0 got no attempt while ejected",
    "ratings: be0 serves again",
    "ratings: x-nodeproxy-timeout-ms 200 against 1000 ms backends -> 504 UT",
    "tracing: the upstream got a child traceparent",
    "tracing: the access log has the request",
    "metrics: istio_requests_total of reviews",
    "metrics: nodeproxy_retries_total for ratings",
    "metrics: nodeproxy_outlier_ejections_total",
    "the daemon exited 0 on SIGTERM and left no NODEPROXY rule",
)


@pytest.mark.netns
def test_demo_runs_every_check_and_cleans_up() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "nodeproxy", "demo"], capture_output=True, text=True, timeout=150
    )
    seconds = time.monotonic() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    checks = output.split("== checks", 1)[1]
    for claim in CLAIMS:
        assert f"ok   {claim}" in checks, f"{claim!r} not checked:\n{checks}"
    assert "FAIL" not in checks, checks
    assert seconds < DEMO_SECONDS, f"the demo took {seconds:.1f} s"
    assert not [ns for ns in netns.list_names() if ns.startswith("npdemo-")]


SCRAPE = """\
# HELP istio_requests_total Requests.
# TYPE istio_requests_total counter
istio_requests_total{destination_service="reviews",response_code="200",response_flags="-"} 7.0
istio_requests_total{destination_service="reviews",response_code="200",response_flags="URX"} 2.0
istio_requests_total{destination_service="reviews",response_code="504",response_flags="UT"} 1.0
istio_requests_total{destination_service="ratings",response_code="200",response_flags="-"} 5.0
# HELP nodeproxy_retries_total Retries.
# TYPE nodeproxy_retries_total counter
nodeproxy_retries_total{service="ratings"} 3.0
"""


def test_metric_sum_adds_the_matching_series_per_label_value() -> None:
    assert metric_sum(SCRAPE, "istio_requests_total", "response_code", destination_service="reviews") == {
        "200": 9.0,
        "504": 1.0,
    }
    assert metric_sum(SCRAPE, "istio_requests_total", "destination_service") == {
        "reviews": 10.0,
        "ratings": 5.0,
    }
    assert metric_sum(SCRAPE, "nodeproxy_retries_total", "service") == {"ratings": 3.0}
    assert metric_sum(SCRAPE, "istio_requests_total", "response_code", destination_service="none") == {}


def test_checks_hold_only_when_there_are_some_and_all_held() -> None:
    checks = Checks()
    assert not checks.all_held
    assert checks.check("one", True)
    assert checks.all_held
    assert not checks.check("two", False)
    assert not checks.all_held
    assert checks.results == [("one", True), ("two", False)]
