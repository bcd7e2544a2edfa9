"""The Vagrantfile (issue 10, point 8): `vagrant validate` accepts it for two and three nodes, and its
provisioning script parses. Skipped where vagrant is missing (np.sh installs Debian's package)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is not installed")


def validate(tmp_path: Path, nodes: int, vagrantfile: str | None = None) -> subprocess.CompletedProcess[str]:
    """`vagrant validate` on a copy (it writes .vagrant/ where it runs), providers' options ignored: no
    provider (VirtualBox, libvirt) is installed here, and validation needs none of them."""
    (tmp_path / "vagrant").mkdir(exist_ok=True)
    shutil.copy(ROOT / "vagrant" / "node.sh", tmp_path / "vagrant" / "node.sh")
    (tmp_path / "Vagrantfile").write_text(vagrantfile or (ROOT / "Vagrantfile").read_text())
    env = {**os.environ, "VAGRANT_CWD": str(tmp_path), "NODES": str(nodes), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    return subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("nodes", [2, 3])
def test_vagrant_validate_passes(tmp_path: Path, nodes: int) -> None:
    result = validate(tmp_path, nodes)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout
    machines = {
        line.split(":")[0].removeprefix("==> ")
        for line in result.stdout.splitlines()
        if line.startswith("==>")
    }
    assert machines == {f"node-{i}" for i in range(1, nodes + 1)}


def test_vagrant_validate_catches_a_missing_provisioning_script(tmp_path: Path) -> None:
    broken = (ROOT / "Vagrantfile").read_text().replace("vagrant/node.sh", "vagrant/missing.sh")
    result = validate(tmp_path, 2, broken)
    assert result.returncode != 0 and "missing.sh" in result.stdout + result.stderr


def test_node_script_parses() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "vagrant" / "node.sh")], check=True, timeout=30)
