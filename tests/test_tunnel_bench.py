"""The pure parts of bench/tunnel.py: averaging the legs, and the check that each path carried its
connections the way it is named after (a bench that measured the wrong path must fail, not print)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tunnel import _mean, check_path
from nodeproxy.lab_nodes import NodeLab, RunningNode


def test_mean_keeps_keys_every_leg_has() -> None:
    rows = [{"a": 1.0, "b": 4.0}, {"a": 3.0}]
    assert _mean(rows) == {"a": 2.0}


def _node(tmp_path: Path, name: str, events: list[dict[str, str]]) -> RunningNode:
    log = tmp_path / f"{name}.log"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return RunningNode(NodeLab().nodes[0], proc, log)


def test_check_path_refuses_a_mislabelled_leg(tmp_path: Path) -> None:
    tunnelled = [{"event": "stream_done", "path": "tunnel"}]
    relayed = [{"event": "relay_done", "path": "relay"}]
    other = _node(tmp_path, "b", [])
    check_path((_node(tmp_path, "a1", tunnelled), other), "tunnel")
    check_path((_node(tmp_path, "a2", relayed), other), "plain")
    with pytest.raises(RuntimeError, match="carried connections as"):
        check_path((_node(tmp_path, "a3", relayed), other), "tunnel")
    with pytest.raises(RuntimeError):
        check_path((_node(tmp_path, "a4", tunnelled + relayed), other), "plain")
