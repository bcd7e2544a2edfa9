"""`nodeproxy check-config` on the inputs of issue 6 (defects 3-5): a list of problems, never a traceback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_config_yaml import HEAD, billion_laughs

CASES = {
    "timestamp": "2024-02-30\n",
    "timestamp-vip": HEAD + "services:\n- {name: web, vip: 2024-13-45, ports: [{port: 80}]}\n",
    "deep-nesting": "a: " + "[" * 500 + "]" * 500 + "\n",
    "alias-bomb": billion_laughs(),
    "sexagesimal-and-loopback": HEAD + "services:\n- {name: web, vip: 127.0.0.1, ports: [{port: 1:20}]}\n",
}


@pytest.mark.parametrize("name", list(CASES))
def test_check_config_lists_problems(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CASES[name])
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "nodeproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    header, *problems = proc.stderr.splitlines()
    assert header == "nodeproxy: invalid config:"
    assert problems and all(p.startswith(f"{path}: ") for p in problems), proc.stderr
    assert elapsed < 20, elapsed  # interpreter start-up included; the alias bomb alone used to take minutes


def test_check_config_of_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"node: {name: \xff\xfe}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "nodeproxy", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[1:] == [
        f"{path}: line 1, column 14: config file is not valid UTF-8: invalid start byte (byte 13)"
    ]
