"""P6 (issue 15): Mountpoint-S3's published fio jobs through galleryfs and on a cold local file.

The job files are in scripts/fio/ms3/ (each names its source and what was scaled). Each job
runs as Mountpoint's scripts run it, `fio --thread --directory=DIR JOB`, where DIR holds
links under fio's own file names (<job>.<jobnum>.0) to the mount's files or to the local
copies. Both sides cold: a fresh mount with an empty cache directory, then the page cache
dropped; the local side right after, page cache dropped. Per repeat the two sides alternate
job by job, so both see the same moment of a shared machine.

The issue sets no bound for P6 (it asks for a table): a row is met when it was measured,
and its ratio to the local file is reported, not judged.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scripts.bench import Bench, Mount

GOALS = ["P6"]

JOB_DIR = Path(__file__).resolve().parent.parent / "fio" / "ms3"
SMALL_FILE = 5 << 20  # Mountpoint's sequential_read_small_file: size=5m
FULL_RUNTIME = 30  # s, Mountpoint's runtime=30s, kept as a cap
QUICK_RUNTIME = 5
# seq_read_skip_17m reads 256 MiB blocks and skips 17 MiB; --quick's 64 MiB file gets the
# same shape at 1/16: 16 MiB blocks, 1 MiB skips.
FULL_SKIP = ("256m", "17m")
QUICK_SKIP = ("16m", "1m")
# Four threads read four different files, as Mountpoint's four objects: the bench's two
# 1 GiB files and two more of the same size made here.
EXTRA_BIG = (("p6-big3", 3), ("p6-big4", 4))
SMALL_REPO = "bench/p6-small"
SMALL_PATH = "small.bin"
BIG_PATH = "model.safetensors"


@dataclass(frozen=True)
class Job:
    name: str  # Mountpoint's job name: the row is P6.<name>
    file: str  # under scripts/fio/ms3/
    readers: int  # files read at once (numjobs)
    small: bool = False
    latency: bool = False  # a figure in ms (first read), not MB/s


JOBS = (
    Job("sequential_read", "seq_read.fio", 1),
    Job("sequential_read_four_threads", "seq_read_4t.fio", 4),
    Job("seq_read_skip_17m", "seq_read_skip_17m.fio", 1),
    Job("random_read", "rand_read.fio", 1),
    Job("sequential_read_small_file", "seq_read_small.fio", 1, small=True),
    Job("time_to_first_byte_read", "ttfb.fio", 1, latency=True),
)


def _big_repos() -> list[str]:
    return ["bench/big", "bench/big2"] + [f"bench/{name}" for name, _ in EXTRA_BIG]


def _local(bench: Bench, repo: str, path: str) -> Path:
    return bench.data / repo.removeprefix("bench/") / path


# ---- set-up ----------------------------------------------------------------------------------


def setup(bench: Bench) -> None:
    """Two more big files (the four-thread job) and the 5 MiB file, made once under the
    bench's data folder, then pushed (a push of blobs the registry holds sends nothing)."""
    import trio

    from scripts.bench import BenchError, log, write_safetensors

    if bench.args.only and "P6" not in bench.args.only:
        return  # 2 GiB to make and push that no other goal reads
    if shutil.which("fio") is None:
        raise BenchError("fio not found (Debian: apt-get install fio)")
    sizes = bench.sizes
    stamp = bench.data / "p6" / "stamp.json"
    want = json.dumps({"format": 1, "tensors": sizes.big_tensors, "tensor": sizes.tensor,
                       "small": SMALL_FILE})
    if not (stamp.is_file() and stamp.read_text() == want):
        t0 = time.monotonic()
        for name, seed in EXTRA_BIG:
            d = bench.data / name
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            (d / "config.json").write_text(json.dumps({"model_type": "bench", "name": name}))
            write_safetensors(d / BIG_PATH, sizes.big_tensors, sizes.tensor, seed)
        d = bench.data / SMALL_REPO.removeprefix("bench/")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        (d / "config.json").write_text(json.dumps({"model_type": "bench", "name": "p6-small"}))
        (d / SMALL_PATH).write_bytes(_deterministic_bytes(SMALL_FILE, seed=6))
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(want)
        log(f"P6: generated two more big files and a 5 MiB file ({time.monotonic() - t0:.1f}s)")
    repos = [f"bench/{name}" for name, _ in EXTRA_BIG] + [SMALL_REPO]
    try:
        files = trio.run(_push, bench, repos)
    except Exception as exc:  # any failure to push: the rows say why, the others still run
        raise BenchError(f"P6 push failed: {type(exc).__name__}: {exc}") from None
    assert bench.pushed is not None
    bench.pushed.files.update(files)


def _deterministic_bytes(n: int, seed: int) -> bytes:
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


async def _push(bench: Bench, repos: list[str]) -> dict[str, dict[str, tuple[str, int]]]:
    from galleryfs import gallery
    from galleryfs.gallery.locations import BlobLocations
    from galleryfs.reference import parse
    from galleryfs.registry.client import ClientOptions, RegistryClient

    out: dict[str, dict[str, tuple[str, int]]] = {}
    async with RegistryClient(bench.host, ClientOptions(plain_http=True, timeout=600)) as client:
        locs = BlobLocations(bench.run_dir / "locations-p6.json")
        for repo in repos:
            ref = parse(f"{bench.host}/{repo}:v1")
            await gallery.push(client, bench.data / repo.removeprefix("bench/"), ref, locations=locs)
            rev = await gallery.resolve(client, ref)
            out[repo] = {f.path: (f.digest, f.size) for f in rev.files}
    return out


# ---- measurement ------------------------------------------------------------------------------


def steps(bench: Bench) -> list[tuple[list[str], Callable[[int], None]]]:
    return [(["P6"], lambda i: measure(bench, i))]


def _targets(bench: Bench, job: Job) -> list[tuple[str, str]]:
    if job.small:
        return [(SMALL_REPO, SMALL_PATH)]
    return [(repo, BIG_PATH) for repo in _big_repos()[: job.readers]]


def _link_dir(bench: Bench, job: Job, side: str, files: list[str]) -> Path:
    """A folder holding `files` under the names fio gives a job's files (<job>.<n>.0)."""
    d = bench.run_dir / "out" / "p6" / f"{job.name}-{side}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for n, target in enumerate(files):
        (d / f"{job.name}.{n}.0").symlink_to(target)
    return d


def _env(bench: Bench, job: Job, size: int, direct: bool) -> dict[str, str]:
    bs, skip = QUICK_SKIP if bench.args.quick else FULL_SKIP
    return {"SIZE": str(size), "RUNTIME": str(QUICK_RUNTIME if bench.args.quick else FULL_RUNTIME),
            "BS": bs, "SKIP": skip, "DIRECT": "1" if direct else "0"}


def run_job(bench: Bench, job: Job, directory: Path, env: dict[str, str]) -> dict[str, float]:
    """One fio run as Mountpoint's scripts run it; its figures: bytes, MB/s as fio reports
    bandwidth (its read.bw, which Mountpoint publishes, in bytes), latencies in ms."""
    from scripts.bench import BenchError, first_line, run

    lat_prefix = directory.parent / f"{directory.name}-lat"
    cmd = ["fio", "--thread", "--readonly", "--eta=never", "--output-format=json",
           f"--directory={str(directory).replace(':', chr(92) + ':')}"]
    if job.latency:
        cmd += [f"--write_lat_log={lat_prefix}", "--log_avg_msec=0"]
    cmd.append(str(JOB_DIR / job.file))
    runtime = int(env["RUNTIME"])
    proc = run(cmd, timeout=runtime * 4 + 120, env=env, what=f"fio {job.file}")
    text = proc.stdout
    try:
        data = json.loads(text[text.index("{"):])
        (result,) = data["jobs"]  # group_reporting, or one job
    except (ValueError, KeyError):
        raise BenchError(f"fio {job.file}: unexpected output: {first_line(text)}") from None
    if result.get("error"):
        raise BenchError(f"fio {job.file}: error {result['error']}")
    read = result["read"]
    if not read["io_bytes"]:
        raise BenchError(f"fio {job.file}: read nothing")
    out = {"io_bytes": float(read["io_bytes"]), "mbps": float(read["bw_bytes"]) / 1e6,
           "runtime_s": float(read["runtime"]) / 1000}
    if job.latency:
        out["mean_ms"] = float(read["lat_ns"]["mean"]) / 1e6
        out["first_ms"] = _first_latency(lat_prefix)
    return out


def _first_latency(prefix: Path) -> float:
    """The first read's latency (ms) from fio's per-I/O log: `time, value (ns), dir, bs, ...`."""
    from scripts.bench import BenchError

    logs = sorted(prefix.parent.glob(f"{prefix.name}_lat.*.log"))
    if not logs:
        raise BenchError(f"fio wrote no latency log ({prefix}_lat.*.log)")
    with open(logs[0]) as f:
        line = f.readline()
    try:
        return int(line.split(",")[1]) / 1e6
    except (IndexError, ValueError):
        raise BenchError(f"fio latency log {logs[0].name}: unexpected line {line.strip()!r}") from None


def measure(bench: Bench, i: int) -> None:
    from scripts.bench import BenchError, Mount, log

    # --quick is a smoke test that must stay fast: one mount for all six jobs there (each
    # still starts with the page cache dropped, but the daemon holds what earlier jobs read).
    with contextlib.ExitStack() as stack:
        shared = None
        if bench.args.quick:
            shared = stack.enter_context(Mount(bench, "p6", bench.fresh_cache_dir()))
            if i == 0:
                bench.notes.append("P6 --quick: one galleryfs mount for all six jobs (not cold "
                                   "between jobs); the full run mounts afresh for each")
        for job in JOBS:
            try:
                mount = (contextlib.nullcontext(shared) if shared is not None
                         else Mount(bench, "p6", bench.fresh_cache_dir()))
                with mount as m:
                    _one(bench, job, m)
            except BenchError as exc:
                # One job that cannot run (say O_DIRECT refused) leaves its own row
                # unmeasured; the other jobs still run.
                log(f"P6.{job.name}: {exc}")
                if i == 0:
                    bench.notes.append(f"P6.{job.name}: {exc}")


def _one(bench: Bench, job: Job, m: Mount) -> None:
    """One job through the mount `m`, then on the local copies; both cold."""
    targets = _targets(bench, job)
    size = bench.file_size(*targets[0])
    key = f"p6.{job.name}"
    paths = [m.file(repo, path) for repo, path in targets]
    for p in paths:
        os.stat(p)  # metadata first: registry bytes count file bytes only
    d = _link_dir(bench, job, "galleryfs", paths)
    before = m.registry_bytes()
    bench.drop_caches()
    gfs = run_job(bench, job, d, _env(bench, job, size, direct=True))
    fetched = m.registry_bytes() - before
    local = [str(_local(bench, repo, path)) for repo, path in targets]
    d = _link_dir(bench, job, "local", local)
    bench.drop_caches()
    base = run_job(bench, job, d, _env(bench, job, size, direct=False))
    if job.latency:
        bench.add(f"{key}.gfs", gfs["first_ms"])
        bench.add(f"{key}.base", base["first_ms"])
        bench.add(f"{key}.gfs_mean", gfs["mean_ms"])
        bench.add(f"{key}.base_mean", base["mean_ms"])
    else:
        bench.add(f"{key}.gfs", gfs["mbps"])
        bench.add(f"{key}.base", base["mbps"])
        bench.add(f"{key}.read", gfs["io_bytes"])
        bench.add(f"{key}.gfs_s", gfs["runtime_s"])
        bench.add(f"{key}.base_s", base["runtime_s"])
    bench.add(f"{key}.fetched", fetched)


# ---- rows -----------------------------------------------------------------------------------


def _size(n: int) -> str:
    from scripts.bench import GiB, MiB

    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n / MiB:g} MiB"


def rows(bench: Bench, row: Callable[..., None]) -> None:
    s = bench.samples
    big = _size(bench.sizes.big)
    bs, skip = QUICK_SKIP if bench.args.quick else FULL_SKIP
    cap = QUICK_RUNTIME if bench.args.quick else FULL_RUNTIME
    what = {
        "sequential_read": f"{big} file, 256 KiB reads",
        "sequential_read_four_threads": f"four {big} files, four threads, 256 KiB reads, aggregate",
        "seq_read_skip_17m": f"{big} file, {bs} reads skipping {skip}",
        "random_read": f"{big} file, 256 KiB random reads",
        "sequential_read_small_file": f"{_size(SMALL_FILE)} file, 256 KiB reads",
        "time_to_first_byte_read": f"{big} file, first 1-byte read",
    }

    def div(x: float, y: float) -> float:
        return x / y

    for job in JOBS:
        key = f"p6.{job.name}"
        note = _note(s, key, job, cap)
        row(f"P6.{job.name}", f"Mountpoint-S3 fio job {job.name} ({what[job.name]}), cold "
            "(vs cold local file)", "ms" if job.latency else "MB/s", "report (table)",
            f"{key}.gfs", base=f"{key}.base", ratio=div,
            check=lambda r: r.galleryfs is not None and r.galleryfs > 0, note=note)


def _note(s: dict[str, list[float]], key: str, job: Job, cap: int) -> str:
    from scripts.bench import MiB

    if not s.get(f"{key}.gfs"):
        return ""
    parts = ["no bound in the issue (a table): met = measured"]
    if s.get(f"{key}.fetched") and s.get(f"{key}.read"):
        ratio = statistics.median(f / r for f, r in zip(s[f"{key}.fetched"], s[f"{key}.read"],
                                                         strict=False))
        parts.append(f"registry bytes during the job {ratio:.2f}× the bytes fio read "
                     f"({statistics.median(s[f'{key}.read']) / MiB:.0f} MiB)")
    if s.get(f"{key}.gfs_s"):
        gfs_s, base_s = max(s[f"{key}.gfs_s"]), max(s.get(f"{key}.base_s", [0]))
        if max(gfs_s, base_s) >= cap * 0.98:
            parts.append(f"a run reached the {cap} s cap (galleryfs {gfs_s:.1f} s, local "
                         f"{base_s:.1f} s): MB/s over what it read")
    if job.latency and s.get(f"{key}.gfs_mean"):
        gm = statistics.median(s[f"{key}.gfs_mean"])
        bm = statistics.median(s[f"{key}.base_mean"])
        fetched = statistics.median(s.get(f"{key}.fetched", [0]))
        parts.append(f"fio's mean over its 10 loops (Mountpoint's published figure; loops 2-10 "
                     f"warm on both sides): galleryfs {gm:.3f} ms, local {bm:.3f} ms; "
                     f"galleryfs O_DIRECT, local buffered (1-byte O_DIRECT refused); "
                     f"{fetched / MiB:.1f} MiB fetched")
    return "; ".join(parts)


def markdown(result: dict[str, Any]) -> str:
    """The README's P6 table from `scripts/bench --json FILE`'s output: `python -c 'import json,
    sys; from scripts.scale.p6 import markdown; print(markdown(json.load(open(sys.argv[1]))))'
    FILE`."""
    lines = ["| Mountpoint-S3 job | what it reads here | galleryfs | local file, cold | ratio |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["goal_id"] != "P6":
            continue
        name = r["id"].split(".", 1)[1]
        what = r["metric"].split("(", 1)[1].rsplit("), cold", 1)[0]
        if r["na"]:
            lines.append(f"| `{name}` | {what} | n/a ({r['na']}) | | |")
            continue
        unit = "ms" if r["unit"] == "ms" else "MB/s"
        fmt = "{:.2f} ms" if unit == "ms" else "{:.0f} MB/s"
        lines.append(f"| `{name}` | {what} | {fmt.format(r['galleryfs'])} | "
                     f"{fmt.format(r['baseline'])} | {r['ratio']:.2f}× |")
    return "\n".join(lines)

