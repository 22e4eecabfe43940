"""P2 (issue 15): a file several times larger than the page cache its reader may hold.

The reader (`dd bs=1M`) runs in a cgroup v1 memory cgroup whose limit is a quarter of the
file: the page cache of its read is charged to it, so the kernel reclaims the file's
pages behind the read. The same cold read without the limit is the baseline, in the same
repeat, the order alternating. Rows: throughput, registry bytes (write-behind settled),
the daemon's peak RSS against G9's bound, and what the disk cache holds after the fill
(the policy: the chunks still in memory or the page cache when reads paused; the others
are counted as dropped and not fetched again). The cgroup is always removed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

GOALS = ["P2"]
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
FULL_LIMIT = 256 << 20
QUICK_LIMIT = 16 << 20


def chunk_size(bench: Any) -> int:
    """The mount's chunk size: the bench's --chunk-size, else galleryfs mount's default."""
    from galleryfs.mount.reader import DEFAULT_CHUNK

    text = (bench.args.chunk_size or "").strip().upper().removesuffix("B").removesuffix("I")
    if not text:
        return DEFAULT_CHUNK
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    return int(text.rstrip("KMG")) * scale


def limit_for(bench: Any) -> int:
    return QUICK_LIMIT if bench.args.quick else FULL_LIMIT


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A fresh cgroup v1 memory cgroup limited to `limit` bytes; removed on exit."""
    from scripts.bench import BenchError

    path = CGROUP_ROOT / f"galleryfs-p2-{os.getpid()}"
    try:
        path.mkdir()
    except OSError as exc:
        raise BenchError(f"cannot create a memory cgroup under {CGROUP_ROOT} "
                         f"({exc.strerror})") from None
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        yield path
    except OSError as exc:
        raise BenchError(f"memory cgroup {path}: {exc.strerror}") from None
    finally:
        # Empty once its reader exited; its page cache is handed to the parent.
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def setup(bench: Any) -> None:
    from scripts.bench import BenchError

    if not (CGROUP_ROOT / "memory.limit_in_bytes").is_file():
        raise BenchError(f"no cgroup v1 memory controller at {CGROUP_ROOT}")
    if not os.access(CGROUP_ROOT, os.W_OK):
        raise BenchError(f"{CGROUP_ROOT} is not writable (needs root)")
    with memory_cgroup(limit_for(bench)):
        pass


def timed_dd(path: str, cgroup: Path | None) -> float:
    """Seconds of `dd bs=1M` of `path` to /dev/null, in `cgroup` (None: where we are)."""
    from scripts.bench import BenchError, first_line

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    t0 = time.perf_counter()
    proc = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"], capture_output=True,
                          text=True, timeout=600, preexec_fn=enter)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchError(f"dd of {path} failed: {first_line(proc.stderr)}")
    return dt


def one(bench: Any, limited: bool) -> None:
    from scripts.bench import MB, BenchError, Mount, vm_hwm
    from scripts.scale.p1 import settle

    size = bench.file_size("bench/big", "model.safetensors")
    key = "p2.lim" if limited else "p2.free"
    with Mount(bench, "p2", bench.fresh_cache_dir()) as m:
        path = m.file("bench/big", "model.safetensors")
        os.stat(path)
        before = m.stats()
        bench.drop_caches()
        if limited:
            with memory_cgroup(limit_for(bench)) as cg:
                dt = timed_dd(path, cg)
                peak = int((cg / "memory.max_usage_in_bytes").read_text())
            bench.add("p2.cg_peak", peak)
        else:
            dt = timed_dd(path, None)
        after = settle(m)
        if m.pid is None:
            raise BenchError("daemon process not found")
        hwm = vm_hwm(m.pid)
        cap = after.get("readahead_cap")
    bench.add(f"{key}.mbs", size / dt / MB)
    bench.add(f"{key}.bytes", after["registry_bytes"] - before["registry_bytes"])
    bench.add(f"{key}.size", size)
    if hwm is not None:
        bench.add(f"{key}.hwm", hwm)
    bench.add("p2.cap", cap if isinstance(cap, int) else 64 << 20)
    bench.add(f"{key}.cached", after.get("disk_bytes", 0))
    bench.add(f"{key}.filled", after.get("fill_chunks", 0) - before.get("fill_chunks", 0))
    bench.add(f"{key}.dropped", after.get("fill_dropped", 0) - before.get("fill_dropped", 0))
    bench.add(f"{key}.missed", after.get("fill_missed", 0) - before.get("fill_missed", 0))
    bench.add(f"{key}.chunks", -(-size // chunk_size(bench)))


def measure(bench: Any, i: int) -> None:
    # Alternating: which side goes first changes with every repeat.
    for limited in ((True, False) if i % 2 == 0 else (False, True)):
        one(bench, limited)


def steps(bench: Any) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(["P2"], lambda i: measure(bench, i))]


def rows(bench: Any, row: Callable[..., None]) -> None:
    from scripts.bench import MiB

    s = bench.samples
    limit = limit_for(bench)
    size = bench.file_size("bench/big", "model.safetensors") if bench.pushed else 0
    what = f"{size // MiB} MiB file, reader limited to {limit // MiB} MiB (cgroup v1 memory)"

    def div(x: float, y: float) -> float:
        return x / y

    note = ""
    if s.get("p2.cg_peak"):
        note = (f"the reader's cgroup peaked at {max(s['p2.cg_peak']) / MiB:.0f} MiB "
                "(page cache included)")
    row("P2.speed", f"cold dd bs=1M of the {what} (vs the same read unlimited)", "MB/s",
        "≥ 0.9×", "p2.lim.mbs", base="p2.free.mbs", ratio=div,
        check=lambda r: r.ratio >= 0.9, note=note)
    row("P2.bytes", "registry bytes of that read, write-behind settled, worst run "
        "(vs file bytes)", "bytes", "≤ 1.02×", "p2.lim.bytes", base="p2.lim.size",
        ratio=div, gfs_agg=max, check=lambda r: max(r.samples["ratio"]) <= 1.02)
    cap = max(s.get("p2.cap", [64 << 20]))
    row("P2.rss", "daemon peak RSS (VmHWM) during that read, max of repeats", "bytes",
        f"≤ 64 MiB + {cap // MiB} MiB", "p2.lim.hwm", gfs_agg=max,
        check=lambda r: r.galleryfs <= 64 * MiB + cap)
    cache_note = ""
    if s.get("p2.lim.cached") and s.get("p2.free.cached"):
        med = {k: statistics.median(s[k]) for k in (
            "p2.lim.filled", "p2.lim.dropped", "p2.lim.missed", "p2.lim.chunks",
            "p2.free.cached", "p2.free.dropped")}
        cache_note = (f"limited: {med['p2.lim.filled']:.0f} chunks written from memory or the "
                      f"page cache, {med['p2.lim.dropped']:.0f} dropped (not fetched again), "
                      f"{med['p2.lim.missed']:.0f} missed, of {med['p2.lim.chunks']:.0f}; "
                      f"unlimited: {med['p2.free.cached'] / MiB:.0f} MiB cached, "
                      f"{med['p2.free.dropped']:.0f} chunks dropped")

    def as_promised(r: Any) -> bool:
        # Every chunk written or counted as dropped, none lost otherwise, and no more
        # on disk than the reader's page cache and the daemon's memory (read-ahead
        # window and the chunk being read) could hand over.
        ok = all(f + d + x == c for f, d, x, c in zip(
            s["p2.lim.filled"], s["p2.lim.dropped"], s["p2.lim.missed"], s["p2.lim.chunks"],
            strict=False))
        return ok and not any(s["p2.lim.missed"]) and \
            r.galleryfs <= limit + cap + chunk_size(bench)
    row("P2.cache", "disk cache after the fill of that read, median (vs file bytes)", "bytes",
        "what the page cache held", "p2.lim.cached", base="p2.lim.size", ratio=div,
        check=as_promised, note=cache_note)
