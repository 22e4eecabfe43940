"""P4 (issue 15): the daemon's CPU per GiB served cold, beside the one cost it cannot shed.

A fresh mount (empty --cache-dir, page cache dropped) reads the bench's big file once
with fio's 1 MiB sequential job, as G1 does. The daemon's CPU (utime + stime from
/proc/PID/stat) is taken before and after the read, and again once the write-behind has
filled the disk cache (the flush xattr): "read" is what serving cost, "with fill" adds
writing the disk cache. The baseline is the verification floor: sha256 of the same
number of bytes in one thread of this process, in 4 MiB pieces, in the same repeat: a
daemon that checks every byte it serves can not cost less than that.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.bench import Bench

GOALS = ["P4"]
GOAL = 0.8  # CPU seconds per GiB served cold
GiB = 1 << 30


def setup(bench: Bench) -> None:
    """Nothing beyond the bench's own models: the big file is G1's."""


def steps(bench: Bench) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(GOALS, lambda i: measure(bench, i))]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sha256_floor(size: int) -> float:
    """CPU seconds per GiB that sha256 of `size` bytes takes here, in 4 MiB pieces."""
    piece = bytes(4 << 20)
    t0 = time.process_time()
    for _ in range(max(1, size // len(piece))):
        hashlib.sha256(piece).digest()
    return (time.process_time() - t0) / (max(1, size // len(piece)) * len(piece)) * GiB


def measure(bench: Bench, i: int) -> None:
    from scripts.bench import BenchError, Mount, fio_seq

    size = bench.file_size("bench/big", "model.safetensors")
    with Mount(bench, "cpu", bench.fresh_cache_dir()) as m:
        if m.pid is None:
            raise BenchError("daemon process not found: its CPU cannot be read")
        path = m.file("bench/big", "model.safetensors")
        os.stat(path)
        bench.drop_caches()
        c0 = cpu_seconds(m.pid)
        fio_seq(path)
        c1 = cpu_seconds(m.pid)
        m.flush()
        c2 = cpu_seconds(m.pid)
    gib = size / GiB
    bench.add("p4.read", (c1 - c0) / gib)
    bench.add("p4.fill", (c2 - c0) / gib)
    bench.add("p4.floor", sha256_floor(size))


def rows(bench: Bench, row: Callable[..., None]) -> None:
    s: dict[str, list[Any]] = bench.samples
    note = ""
    if s.get("p4.fill"):
        fill = sorted(s["p4.fill"])[len(s["p4.fill"]) // 2]
        note = (f"with the write-behind's disk cache fill afterwards: {fill:.2f} CPU-s/GiB; "
                "baseline: sha256 of the same bytes in one thread (every byte served is "
                "checked against its chunk table)")

    def div(x: float, y: float) -> float:
        return x / y

    row("P4", "daemon CPU per GiB served, cold sequential read (vs sha256 of the same bytes)",
        "CPU-s/GiB", f"≤ {GOAL}", "p4.read", base="p4.floor", ratio=div,
        check=lambda r: r.galleryfs <= GOAL, note=note)
