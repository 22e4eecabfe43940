"""Smoke test of scripts/bench.py: `--quick` runs end to end and reports every goal.

No timing assertions: the machine is shared and the quick sizes say nothing about speed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Every goal the bench knows, G1..G11 and the scale goals of scripts/scale/: each needs a row.
from scripts.bench import GOALS
from tests.mounting import fuse_available

ROOT = Path(__file__).resolve().parent.parent


def _galleryfs_mounts(under: Path) -> list[str]:
    """galleryfs mount points below `under`: other tests (and other people) on this
    machine mount galleryfs elsewhere at the same time."""
    prefix = str(under.resolve()) + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if " - fuse.galleryfs " not in line:
                continue
            # Field 5 is the mount point, with space, tab, newline and backslash in octal.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point.startswith(prefix):
                found.append(point)
    return found


@pytest.mark.mount
@pytest.mark.timeout(300)
@pytest.mark.skipif(not fuse_available(), reason="/dev/fuse cannot be opened")
def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run_dir = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--quick", "--json", str(out),
         "--workdir", str(run_dir)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr}"
    left = _galleryfs_mounts(tmp_path)
    assert not left, f"the bench left mounts behind: {left}"
    assert not list(run_dir.glob("run-*")), "the bench left its run directory behind"

    result = json.loads(out.read_text())
    rows = result["rows"]
    for goal in GOALS:
        mine = [r for r in rows if r["goal_id"] == goal]
        assert mine, f"no row for {goal}"
        for r in mine:
            if r["na"] is not None:
                assert isinstance(r["na"], str) and r["na"].strip(), f"{r['id']}: n/a without a reason"
                assert r["met"] is None
            else:
                assert isinstance(r["galleryfs"], (int, float)), r
                assert isinstance(r["met"], bool), r
                if r["baseline"] is not None:
                    assert isinstance(r["baseline"], (int, float)), r
    for goal in GOALS:
        assert goal in proc.stdout, f"{goal} missing from the printed table"
    # G4 reads a warmed cache, and its note says what each timed remount still fetched.
    g4 = next(r for r in rows if r["id"] == "G4")
    assert g4["na"] is None, g4["na"]
    assert "`galleryfs warm` then fetched" in g4["note"], g4["note"]
    assert "the timed remount fetched" in g4["note"], g4["note"]
    assert not [n for n in result["notes"] if n.startswith("G4")], result["notes"]


@pytest.mark.parametrize("only", ["G99", "G1,foo", ","])
def test_bench_only_refuses_unknown_goals(tmp_path: Path, only: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--only", only,
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "expected goals among G1, G2," in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before starting anything
