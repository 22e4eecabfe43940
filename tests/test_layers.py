"""The layers of galleryfs, as the README's Development section draws them, hold.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them
on the source tree. A second test plants an import that breaks each rule in a copy of
the tree, so a contract that stopped matching anything would be noticed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: scripts/setup installs import-linter with the test extras")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layering_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout, result.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    ("galleryfs/registry/retry.py", "import galleryfs.gallery", "layers"),
    ("galleryfs/mount/tree.py", "import galleryfs.gallery.metadata", "layers"),
    ("galleryfs/gallery/hintfile.py", "import galleryfs.mount.tree", "layers"),
    ("galleryfs/digest.py", "import pyfuse3", "only mount/ imports pyfuse3"),
    ("galleryfs/gallery/hintfile.py", "import http.client", "only registry/ speaks HTTP"),
    ("galleryfs/mount/tree.py", "import httpx", "only registry/ speaks HTTP"),
    ("galleryfs/gallery/pushing.py", "import socket", "only registry/ speaks HTTP"),
    ("galleryfs/__init__.py", "import galleryfs.mount.tree", "the package root loads no layer"),
    ("galleryfs/__init__.py", "import pyfuse3", "the package root loads no layer"),
])
def test_a_planted_violation_is_caught(tmp_path: Path, module: str, line: str, contract: str
                                       ) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "galleryfs", tree / "galleryfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    with open(tree / module, "a") as f:
        f.write(f"\n{line}  # noqa\n")
    result = lint(tree)
    assert result.returncode != 0, result.stdout
    broken = [ln for ln in result.stdout.splitlines() if ln.endswith("BROKEN")]
    assert any(contract in ln for ln in broken), result.stdout
